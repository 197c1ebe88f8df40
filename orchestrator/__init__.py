"""bbrx: audited, bbr-compatible backup and restore for BOSH directors."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bbrx")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# The bbr release whose contract bbrx follows; job scripts see it as BBR_VERSION.
BBR_COMPATIBLE_VERSION = "1.9.0"
