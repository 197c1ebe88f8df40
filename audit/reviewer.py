"""What a compliance reviewer runs, as library calls: export, report, verify, evidence
pack and checkpoint. ``bbrx audit ...`` and ``python -m audit ...`` are both thin
wrappers round these, so the two say the same and record each read the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

from audit.checkpoint import Checkpoint, read_checkpoints, sign_checkpoint, verify_checkpoints
from audit.errors import AuditError
from audit.export import FORMATS, follow, verify_export, write_rows
from audit.journal import AuditRecord
from audit.log import AuditLog, RunSummary, utc_now
from audit.query import RunFilter
from audit.reads import Reader, ReadRecord, record_read
from audit.report import Verification, render_report
from audit.verify import verify_log

logger = logging.getLogger(__name__)


@dataclass
class ReviewOutcome:
    """What a reviewer command tells its CLI: lines to print, whether all was well, and
    where the read was recorded."""

    ok: bool
    lines: list[str] = field(default_factory=list)
    record: ReadRecord | None = None
    # The first line of each check that failed, for an error message to lead with.
    problems: list[str] = field(default_factory=list)

    def all_lines(self) -> list[str]:
        return [*self.lines, *([self.record.line()] if self.record else [])]


# --- selecting ---------------------------------------------------------------------------


def select_runs(log: AuditLog, flt: RunFilter, run: str | None = None) -> list[RunSummary]:
    """The runs the filter (or the one run named) selects, journal rows counted in."""
    record = AuditRecord(log)
    runs = record.runs()
    if run is not None:
        wanted = record.resolve(run)
        return [r for r in runs if r.run_id == wanted]
    return flt.select(runs)


# --- writing files -----------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output(path: Path, *, binary: bool = False, replace: bool = True) -> Iterator[Any]:
    """A file written beside ``path`` and renamed onto it once complete and synced, so a
    reader never sees half of it; ``replace=False`` refuses an existing ``path``."""
    directory = path.parent
    if not directory.is_dir():
        raise AuditError(f"cannot write {path}: directory {directory} does not exist")
    if not replace and path.exists():
        raise AuditError(
            f"{path} already exists: evidence is never overwritten",
            hint="Give another --output, or move the old file away first.",
        )
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    except OSError as error:
        raise AuditError(f"cannot write {path}: {error.strerror}") from error
    try:
        opened = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="")
        with opened as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # fails if path appeared meanwhile: never clobbers
            os.unlink(temporary)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise AuditError(f"cannot write {path}: {error.strerror}") from error
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _umask() -> int:
    # Read it the only way there is (set and restore): the CLIs are single-threaded here.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- export ------------------------------------------------------------------------------


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise AuditError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")


def _exported(db: Path, flt: RunFilter, fmt: str, out: TextIO) -> tuple[int, int, int | None]:
    """Write the selected runs' events, up to the head as it was when the runs were
    selected (so the count recorded is what was written); (events, runs, head seq)."""
    with AuditLog(db, readonly=True) as log:
        head = log.head()
        ids = {r.run_id for r in select_runs(log, flt)}
        last = head.seq if head else 0
        runs: set[str] = set()

        def rows() -> Iterator[dict[str, Any]]:
            for row in log.rows():
                if row["seq"] > last:
                    return
                if row["run_id"] in ids:
                    runs.add(row["run_id"])
                    yield row

        count = write_rows(rows(), out, fmt)
    return count, len(runs), head.seq if head else None


def _export_detail(
    flt: RunFilter, fmt: str, output: Path | None, counts: tuple[int, int, int | None]
) -> dict[str, Any]:
    events, runs, head_seq = counts
    return {
        "filters": flt.as_dict(),
        "format": fmt,
        "output": str(output.resolve()) if output else "stdout",
        "events": events,
        "runs": runs,
        "head_seq": head_seq,
    }


def export(db: Path, flt: RunFilter, fmt: str, out: TextIO, reader: Reader) -> ReviewOutcome:
    """Every event of the selected runs, one a line (JSONL) or row (CSV), to ``out``
    (stdout, say); the read is recorded once they are all written."""
    _check_format(fmt)
    counts = _exported(db, flt, fmt, out)
    out.flush()
    record = record_read(
        db, "export", reader, ok=True, detail=_export_detail(flt, fmt, None, counts)
    )
    line = f"exported {counts[0]} events of {counts[1]} runs ({flt.describe()})"
    return ReviewOutcome(True, [line], record)


def export_to_file(
    db: Path, flt: RunFilter, fmt: str, output: Path, reader: Reader
) -> ReviewOutcome:
    """``export`` into ``output``, written atomically; the read, recorded once the file is
    in place, carries its SHA-256."""
    _check_format(fmt)
    with atomic_output(output) as out:
        counts = _exported(db, flt, fmt, out)
    detail = {**_export_detail(flt, fmt, output, counts), "sha256": _sha256(output)}
    record = record_read(db, "export", reader, ok=True, detail=detail)
    line = f"exported {counts[0]} events of {counts[1]} runs ({flt.describe()}) to {output}"
    return ReviewOutcome(True, [line], record)


@contextlib.contextmanager
def follow_output(output: Path | None) -> Iterator[Any]:
    """Where a follower writes: stdout, or a new file (removed again if the follow fails
    before writing anything, so that a retry is not refused)."""
    if output is None:
        yield sys.stdout
        return
    try:
        stream = output.open("x", encoding="utf-8", newline="")
    except FileExistsError:
        raise AuditError(
            f"{output} already exists: a follower writes a new file",
            hint="Give another --output, or follow to stdout and redirect it.",
        ) from None
    except OSError as error:
        raise AuditError(f"cannot write {output}: {error.strerror}") from error
    try:
        with stream:
            yield stream
    except BaseException:
        with contextlib.suppress(OSError):
            if output.stat().st_size == 0:
                output.unlink()
        raise


def export_and_follow(
    db: Path,
    flt: RunFilter,
    fmt: str,
    out: TextIO,
    reader: Reader,
    stop: threading.Event,
    *,
    output: Path | None = None,
    poll: float = 0.5,
) -> ReviewOutcome:
    """``export``, then every new event of a matching run as it is appended, until
    ``stop`` is set (Ctrl-C or SIGTERM in the CLI). The read is recorded when following
    starts, so a shipper that runs for months still shows in the trail."""
    _check_format(fmt)
    if flt.outcomes:
        flt.first_row_matches({})  # raises: an outcome cannot be followed
    with AuditLog(db, readonly=True) as log:
        # The head first: a run that starts after it is judged by its first row when it
        # is followed; one that started before is in the summaries read next.
        head = log.head()
        after = head.seq if head else 0
        decided = {r.run_id: flt.matches(r) for r in AuditRecord(log).runs()}
        count = write_rows(
            (r for r in log.rows() if r["seq"] <= after and decided.get(r["run_id"], False)),
            out,
            fmt,
        )
    out.flush()
    detail = {
        "filters": flt.as_dict(),
        "format": fmt,
        "output": str(output.resolve()) if output else "stdout",
        "follow": True,
        "from_seq": after + 1,
    }
    record = record_read(db, "export", reader, ok=True, detail=detail)

    def keep(row: Any) -> bool:
        run_id = row["run_id"]
        if run_id not in decided:
            decided[run_id] = flt.first_row_matches(row)
        return decided[run_id]

    count += follow(db, out, fmt, keep=keep, after_seq=after, stop=stop, poll=poll)
    return ReviewOutcome(True, [f"exported {count} events, following until stopped"], record)


# --- verify ------------------------------------------------------------------------------


def _problems(found: list[Verification]) -> list[str]:
    """The first line of each check that failed: what an error message leads with."""
    return [v.lines[0] for v in found if not v.ok and v.lines]


def _need_signers(checkpoints: Path | None, allowed_signers: Path | None) -> None:
    if checkpoints is not None and allowed_signers is None:
        raise AuditError(
            "--checkpoints needs --allowed-signers FILE: the keys whose signatures count",
            hint="One line a signer, as ssh-keygen -Y verify reads it: "
            "`reviewer@example.com ssh-ed25519 AAAA...`.",
        )
    if allowed_signers is not None and checkpoints is None:
        raise AuditError("--allowed-signers is for --checkpoints FILE: give that too")


def verifications(
    db: Path | None,
    *,
    checkpoints: Path | None = None,
    allowed_signers: Path | None = None,
    exported: Path | None = None,
) -> list[Verification]:
    """Each check asked for, as a Verification: the chain (when there is a log), the
    signed checkpoints, an exported copy."""
    _need_signers(checkpoints, allowed_signers)
    found = []
    if db is not None:
        report = verify_log(db)
        if report.ok:
            lines = [
                f"audit log {db} intact: {report.count} events, "
                f"head seq {report.head_seq} hash {report.head_hash}"
            ]
        else:
            lines = [f"audit log {db} is BROKEN: {report.problem}"]
        found.append(Verification("Hash chain", report.ok, (*lines, *report.journal_lines())))
    if checkpoints is not None and allowed_signers is not None and db is not None:
        signed = verify_checkpoints(db, checkpoints, allowed_signers)
        found.append(Verification("Signed checkpoints", signed.ok, tuple(signed.lines())))
    if exported is not None:
        check = verify_export(exported, db)
        found.append(Verification(f"Exported copy {exported.name}", check.ok, tuple(check.lines())))
    return found


def _export_is_of(exported: Path, db: Path) -> bool:
    """Whether the log at ``db`` holds the export's first row: that the export was made
    from this log, so a difference between them means one of them was altered."""
    try:
        with exported.open(encoding="utf-8") as stream:
            first = json.loads(next(line for line in stream if line.strip()))
        with AuditLog(db, readonly=True) as log:
            row = log.event(int(first["seq"]))
    except (OSError, ValueError, KeyError, TypeError, StopIteration, AuditError):
        return False  # verify_export says what is wrong with the file itself
    return row is not None and row["hash"] == first.get("hash")


def verify(
    db: Path,
    reader: Reader,
    *,
    checkpoints: Path | None = None,
    allowed_signers: Path | None = None,
    exported: Path | None = None,
    against_log: bool = True,
) -> ReviewOutcome:
    """Verify what was asked. With an export and ``against_log`` False (the log was not
    named, only found at the default place), the log is compared with the export only if
    it holds the export's first row; else the export is checked on its own, and the
    unrelated log is neither verified nor written."""
    log: Path | None = db if db.exists() else None
    note = None
    if exported is not None and log is None:
        note = f"(no audit log at {db}: the export was checked on its own)"
    elif exported is not None and log is not None and not against_log:
        log = log if _export_is_of(exported, log) else None
        if log is None:
            note = (
                f"(the audit log {db} does not hold the export's first row, so the export is "
                "of another log: it was checked on its own; give --audit-db FILE to compare "
                "it with its log)"
            )
    if log is None and checkpoints is not None:
        raise AuditError(f"no audit log at {db} to hold the checkpoints against")
    if log is None and exported is None:
        raise AuditError(f"no audit log at {db}: check the path (--audit-db, BBRX_AUDIT_DB)")
    found = verifications(
        log, checkpoints=checkpoints, allowed_signers=allowed_signers, exported=exported
    )
    ok = all(v.ok for v in found)
    lines = [line for v in found for line in v.lines]
    problems = _problems(found)
    if log is None:
        return ReviewOutcome(ok, [*lines, *([note] if note else [])], problems=problems)
    detail = {
        "result": "intact" if ok else "BROKEN",
        "checks": {v.title: "ok" if v.ok else v.lines[0] for v in found},
        "checkpoints": str(checkpoints.resolve()) if checkpoints else None,
        "export": str(exported.resolve()) if exported else None,
    }
    record = record_read(db, "verify", reader, ok=ok, detail=detail)
    return ReviewOutcome(ok, lines, record, problems)


# --- report ------------------------------------------------------------------------------


def _render(
    db: Path,
    flt: RunFilter,
    run: str | None,
    reader: Reader,
    found: list[Verification],
) -> tuple[str, list[RunSummary], int]:
    with AuditLog(db, readonly=True) as log:
        runs = select_runs(log, flt, run)
        record = AuditRecord(log)
        timelines = {r.run_id: record.timeline(r.run_id) for r in runs}
    events = sum(len(rows) for rows in timelines.values())
    html = render_report(
        log_path=str(db),
        runs=runs,
        timelines=timelines,
        verifications=found,
        filters=f"run {runs[0].run_id}" if run and runs else flt.describe(),
        generated_at=utc_now(),
        generated_by=reader.operator,
    )
    return html, runs, events


def report(
    db: Path,
    flt: RunFilter,
    output: Path,
    reader: Reader,
    *,
    run: str | None = None,
    checkpoints: Path | None = None,
    allowed_signers: Path | None = None,
) -> ReviewOutcome:
    """One self-contained HTML page: the summary, the verification, each run's picture
    and events."""
    found = verifications(db, checkpoints=checkpoints, allowed_signers=allowed_signers)
    html, runs, events = _render(db, flt, run, reader, found)
    with atomic_output(output) as out:
        out.write(html)
    ok = all(v.ok for v in found)
    detail = {
        "filters": flt.as_dict(),
        "run": run,
        "output": str(output.resolve()),
        "sha256": _sha256(output),
        "runs": len(runs),
        "events": events,
        "verified": "intact" if ok else "BROKEN",
    }
    lines = [f"report of {len(runs)} runs ({events} events) written to {output}"]
    problems = _problems(found)
    if not ok:
        lines.append("the log did NOT verify: the report says how")
    record = record_read(db, "report", reader, ok=True, detail=detail)
    return ReviewOutcome(ok, lines, record, problems)


# --- evidence ----------------------------------------------------------------------------

EVIDENCE_README = """\
bbrx evidence pack
==================
{summary}

Files (their SHA-256 are in SHA256SUMS and MANIFEST.json):
  events.jsonl       every event of the selected runs, one JSON object a line, as stored
  events.csv         the same rows for a spreadsheet (cells that would start a formula
                     are prefixed with a quote: verify the JSONL, not the CSV)
  report.html        the report: summary, verification, each run's timeline and events
  verification.txt   what verification said when the pack was made
  checkpoints.txt    the signed checkpoints of this log, if any were given
  allowed_signers    the keys that count for them, if given
  MANIFEST.json      what was asked, of which log, by whom, when, and each file's digest

To check it later:
  sha256sum -c SHA256SUMS                       # nothing changed in the pack
  bbrx audit verify --export events.jsonl       # each row's hash, and the links between
                                                # consecutive rows (against the log too,
                                                # where it is at hand: --audit-db FILE)
  ssh-keygen -Y verify ...                      # each checkpoint: see the bbrx README
"""


def evidence(
    db: Path,
    flt: RunFilter,
    output: Path,
    reader: Reader,
    *,
    checkpoints: Path | None = None,
    allowed_signers: Path | None = None,
) -> ReviewOutcome:
    """A .tar.gz to attach to a ticket: export (JSONL and CSV), report, verification,
    checkpoints, and a manifest of SHA-256 digests. Never overwrites a file."""
    if output.exists():
        raise AuditError(
            f"{output} already exists: evidence is never overwritten",
            hint="Give another --output, or move the old file away first.",
        )
    found = verifications(db, checkpoints=checkpoints, allowed_signers=allowed_signers)
    ok = all(v.ok for v in found)
    html, runs, _ = _render(db, flt, None, reader, found)
    ids = {r.run_id for r in runs}
    with AuditLog(db, readonly=True) as log:
        head = log.head()
        first = log.event(1)
        jsonl, csv_text = io.StringIO(), io.StringIO()
        rows = [r for r in log.rows() if r["run_id"] in ids]
    write_rows(rows, jsonl, "jsonl")
    write_rows(rows, csv_text, "csv")
    verification = "\n".join(
        f"== {v.title}: {'ok' if v.ok else 'FAILED'}\n" + "\n".join(v.lines) for v in found
    )
    files: dict[str, bytes] = {
        "events.jsonl": jsonl.getvalue().encode(),
        "events.csv": csv_text.getvalue().encode(),
        "report.html": html.encode(),
        "verification.txt": (verification + "\n").encode(),
    }
    covering: list[Checkpoint] = []
    if checkpoints is not None and allowed_signers is not None:
        covering = read_checkpoints(checkpoints)
        files["checkpoints.txt"] = checkpoints.read_bytes()
        files["allowed_signers"] = allowed_signers.read_bytes()
    created = utc_now()
    summary = (
        f"Made {created} by {reader.operator} from the audit log {db}\n"
        f"Runs: {flt.describe()} ({len(runs)} runs, {len(rows)} events); "
        f"verification: {'intact' if ok else 'BROKEN'}"
    )
    files["README.txt"] = EVIDENCE_README.format(summary=summary).encode()
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
    manifest = {
        "created": created,
        "created_by": reader.operator,
        "reason": reader.reason,
        "audit_log": str(db),
        "log_id": first["hash"] if first else None,
        "head": {"seq": head.seq, "hash": head.hash} if head else None,
        "filters": flt.as_dict(),
        "runs": sorted(ids),
        "events": len(rows),
        "verified": "intact" if ok else "BROKEN",
        "checkpoints": [
            {"number": c.number, "seq": c.seq, "hash": c.hash, "time": c.time} for c in covering
        ],
        "files": digests,
    }
    files["MANIFEST.json"] = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode()
    sums = "".join(f"{digest}  {name}\n" for name, digest in digests.items())
    sums += f"{hashlib.sha256(files['MANIFEST.json']).hexdigest()}  MANIFEST.json\n"
    files["SHA256SUMS"] = sums.encode()
    folder = f"bbrx-evidence-{created[:19].replace(':', '').replace('-', '')}Z"
    with atomic_output(output, binary=True, replace=False) as out:
        _write_tar(out, folder, files)
    digest = _sha256(output)
    detail = {
        "filters": flt.as_dict(),
        "output": str(output.resolve()),
        "sha256": digest,
        "runs": len(runs),
        "events": len(rows),
        "verified": "intact" if ok else "BROKEN",
    }
    lines = [
        f"evidence pack {output}: {len(runs)} runs, {len(rows)} events, "
        f"verification {'intact' if ok else 'BROKEN'}",
        f"sha256 {digest}  (record it in the ticket)",
    ]
    problems = _problems(found)
    record = record_read(db, "evidence", reader, ok=True, detail=detail)
    return ReviewOutcome(ok, lines, record, problems)


def _write_tar(out: IO[bytes], folder: str, files: dict[str, bytes]) -> None:
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))


# --- checkpoint --------------------------------------------------------------------------


def _fingerprint(key: Path) -> str | None:
    """The key's SHA256 fingerprint as ssh-keygen prints it, for the record; None if it
    cannot say (the signature itself is what counts)."""
    try:
        done = subprocess.run(
            ["ssh-keygen", "-l", "-f", str(key)],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    words = done.stdout.split()
    return words[1] if done.returncode == 0 and len(words) > 1 else None


def checkpoint(db: Path, key: Path, output: Path, reader: Reader) -> ReviewOutcome:
    """Sign the log's head into ``output``, then record that it was done."""
    signed = sign_checkpoint(db, key, output)
    detail = {
        "output": str(output.resolve()),
        "number": signed.number,
        "seq": signed.seq,
        "hash": signed.hash,
        "key": str(key.resolve()),
        "key_fingerprint": _fingerprint(key),
    }
    lines = [f"checkpoint {signed.number} of {output}: seq {signed.seq} hash {signed.hash}"]
    return ReviewOutcome(True, lines, record_read(db, "checkpoint", reader, ok=True, detail=detail))


__all__ = [
    "ReviewOutcome",
    "atomic_output",
    "checkpoint",
    "evidence",
    "export",
    "export_and_follow",
    "export_to_file",
    "follow_output",
    "report",
    "select_runs",
    "verifications",
    "verify",
]
