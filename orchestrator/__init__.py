"""bbrx: audited, bbr-compatible backup and restore for BOSH directors."""

# The package's version, and pyproject's (setuptools reads it from here at build time).
# A literal, not importlib.metadata: looking it up scanned the installed packages'
# metadata at every start of every command, about 40 ms.
__version__ = "0.1.0"

# The bbr release whose contract bbrx follows; job scripts see it as BBR_VERSION.
BBR_COMPATIBLE_VERSION = "1.9.0"
