"""YAML from places bbrx does not control, loaded with a size cap and no anchors or aliases.

An artifact's `metadata` and a job's `metadata` script output are both input a stranger
may have written. A few lines of YAML aliases ("billion laughs") expand into gigabytes
when loaded, and no bbr document uses anchors, so any anchor or alias is refused before
anything is built. libyaml's C loader is kept (a blobstore's metadata lists every blob;
the pure-Python loader takes seconds over tens of thousands of entries); the check is an
event scan, needed only when the text holds an `&` or a `*` at all, since YAML spells
every anchor with `&` and every alias with `*`.
"""

from __future__ import annotations

import yaml

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

MIB = 1 << 20
#: An artifact's metadata: a blobstore lists every blob (~100 bytes each), so a million
#: blobs stay well inside this.
ARTIFACT_METADATA_CAP = 256 * MIB
#: What a job's metadata script prints: a few lines in practice.
SCRIPT_METADATA_CAP = 1 * MIB


class YamlRefused(ValueError):
    """The text was not loaded; the message says why, without naming where it came from.

    `invalid`: it is not YAML at all (the message is the parser's), rather than YAML that
    bbrx refuses (too big, anchors or aliases)."""

    def __init__(self, message: str, *, invalid: bool = False) -> None:
        super().__init__(message)
        self.invalid = invalid


def describe_cap(cap: int) -> str:
    return f"{cap // MIB} MiB" if cap >= MIB and cap % MIB == 0 else f"{cap} bytes"


def load(text: str | bytes, *, cap: int) -> object:
    """The document in `text`, or YamlRefused (too big, anchors or aliases, invalid YAML)."""
    if len(text) > cap:
        raise YamlRefused(f"it is {len(text)} bytes, over the {describe_cap(cap)} cap")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise YamlRefused(f"it is not UTF-8 (byte {exc.start})", invalid=True) from None
    if len(text.encode("utf-8")) > cap:  # a str's length counts characters, the cap bytes
        raise YamlRefused(f"it is over the {describe_cap(cap)} cap")
    try:
        if "&" in text or "*" in text:
            _refuse_anchors(text)
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else "parse error"
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise YamlRefused(f"{first_line}{where}", invalid=True) from None
    except RecursionError:  # the pure-Python loader on deeply nested input
        raise YamlRefused("it nests too deeply") from None


def _refuse_anchors(text: str) -> None:
    for event in yaml.parse(text, Loader=_Loader):
        line = event.start_mark.line + 1 if event.start_mark is not None else "?"
        if isinstance(event, yaml.AliasEvent):
            raise YamlRefused(
                f"it uses the YAML alias *{event.anchor} (line {line}): "
                "anchors and aliases are refused, since they can expand without bound"
            )
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise YamlRefused(
                f"it uses the YAML anchor &{anchor} (line {line}): "
                "anchors and aliases are refused, since they can expand without bound"
            )
