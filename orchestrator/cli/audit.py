"""`bbrx audit ...`: what compliance reviewers run.

    bbrx audit runs [FILTERS]
    bbrx audit show RUN
    bbrx audit verify [--artifact DIR] [--checkpoints FILE --allowed-signers FILE] [--export FILE]
    bbrx audit export [--format jsonl|csv] [FILTERS] [--output FILE] [--follow]
    bbrx audit report [RUN | FILTERS] --output FILE.html [--checkpoints F --allowed-signers F]
    bbrx audit evidence [FILTERS] --output FILE.tar.gz [--checkpoints F --allowed-signers F]
    bbrx audit checkpoint --key KEY [--output FILE]

FILTERS: --since, --until, --target, --operator, --operation, --outcome, --mode (each
but the times may be given more than once). Who is reading is the root `--operator` (or
$BBRX_OPERATOR), since here `--operator` asks about who ran. Each command parses, calls
one library function and renders; `app.main` turns errors into exit codes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from audit.query import MODE_CHOICES, OUTCOME_CHOICES, RunFilter
from audit.reads import Reader
from audit.render import printable
from orchestrator import settings
from orchestrator.cli.app import AuditDbOption, Globals, _merge, _review, audit_app
from orchestrator.errors import AuditBrokenError, UsageError

if TYPE_CHECKING:
    from audit import reviewer


def _reviewer() -> Any:
    # Imported when a reviewer's command runs: a backup or a restore has no use for it
    # (the report, the export formats, the evidence pack), and every run starts faster.
    from audit import reviewer

    return reviewer


SinceOption = Annotated[
    str | None,
    typer.Option(
        "--since",
        help="Runs that started at or after this: a date (2026-11-30), an ISO time "
        "(2026-11-30T14:00Z; UTC unless it names a zone) or an age (7d, 12h).",
        show_default=False,
    ),
]
UntilOption = Annotated[
    str | None,
    typer.Option(
        "--until",
        help="Runs that started before the end of this: a date includes that whole day, "
        "a time that moment.",
        show_default=False,
    ),
]
TargetFilter = Annotated[
    list[str] | None,
    typer.Option(
        "--target",
        help="Runs on this director (sim://demo, 10.0.0.6) or deployment (sim://demo/redis); "
        "a director includes its deployments.",
        show_default=False,
    ),
]
OperatorFilter = Annotated[
    list[str] | None,
    typer.Option("--operator", help="Runs started by this operator.", show_default=False),
]
OperationFilter = Annotated[
    list[str] | None,
    typer.Option(
        "--operation",
        help="Runs of this operation: backup, restore, backup-cleanup, pre-backup-check, "
        "audit-export...",
        show_default=False,
    ),
]
OutcomeFilter = Annotated[
    list[str] | None,
    typer.Option(
        "--outcome", help=f"Runs that ended so: {', '.join(OUTCOME_CHOICES)}.", show_default=False
    ),
]
ModeFilter = Annotated[
    list[str] | None,
    typer.Option(
        "--mode",
        help=f"{' | '.join(MODE_CHOICES)}: simulated runs, real ones, or reviewers' reads.",
        show_default=False,
    ),
]
ReasonOption = Annotated[
    str | None,
    typer.Option("--reason", help="Why you are reading (ticket...): recorded with the read."),
]
CheckpointsOption = Annotated[
    Path | None,
    typer.Option(
        "--checkpoints",
        help="Also hold the log to the signed checkpoints in this file.",
        show_default=False,
    ),
]
SignersOption = Annotated[
    Path | None,
    typer.Option(
        "--allowed-signers",
        help="The keys whose checkpoint signatures count (ssh-keygen's allowed_signers).",
        show_default=False,
    ),
]


def _filter(
    since: str | None,
    until: str | None,
    target: list[str] | None,
    operator: list[str] | None,
    operation: list[str] | None,
    outcome: list[str] | None,
    mode: list[str] | None,
) -> RunFilter:
    return RunFilter.parse(
        since=since,
        until=until,
        targets=target or (),
        operators=operator or (),
        operations=operation or (),
        outcomes=outcome or (),
        modes=mode or (),
    )


def _context(
    ctx: typer.Context, audit_db: Path | None, reason: str | None = None
) -> tuple[Path, Reader]:
    options: Globals = _merge(ctx, audit_db=audit_db)
    reader = settings.identity(options.operator, reason or options.reason)
    return settings.audit_db_path(options.audit_db), Reader(reader.operator, reader.reason)


def _echo(lines: list[str], *, err: bool = False) -> None:
    for line in lines:
        # Lines quote operators, reasons and files anyone could have written.
        typer.echo(printable(line), err=err)


@audit_app.command("runs")
def audit_runs(
    ctx: typer.Context,
    since: SinceOption = None,
    until: UntilOption = None,
    target: TargetFilter = None,
    operator: OperatorFilter = None,
    operation: OperationFilter = None,
    outcome: OutcomeFilter = None,
    mode: ModeFilter = None,
    audit_db: AuditDbOption = None,
) -> None:
    """One line a run: id, operation, target, mode, operator, start, end, outcome, reason."""
    flt = _filter(since, until, target, operator, operation, outcome, mode)
    path, _ = _context(ctx, audit_db)
    typer.echo(_review().runs(path, flt))


@audit_app.command("show")
def audit_show(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="A run id, or a unique prefix of one.")],
    audit_db: AuditDbOption = None,
) -> None:
    """The timeline of one run: every transition, job and script.

    The rows that went to the fallback journal when the log could not be written follow.
    """
    path, _ = _context(ctx, audit_db)
    typer.echo(_review().timeline(path, run, home=settings.bbrx_home()))


@audit_app.command("verify")
def audit_verify(
    ctx: typer.Context,
    artifact: Annotated[
        Path | None,
        typer.Option("--artifact", help="Also check that this backup's audit head is in the log."),
    ] = None,
    checkpoints: CheckpointsOption = None,
    allowed_signers: SignersOption = None,
    export: Annotated[
        Path | None,
        typer.Option(
            "--export",
            help="Check a JSONL export (a SIEM's copy) row by row, and against the log "
            "where there is one.",
            show_default=False,
        ),
    ] = None,
    reason: ReasonOption = None,
    audit_db: AuditDbOption = None,
) -> None:
    """Check the hash chain, the required fields, the guards, and signed checkpoints.

    With --checkpoints, the log must still hold every signed head: what catches a
    truncated or re-chained log. With --export, a JSONL copy is checked row by row.
    """
    path, reader = _context(ctx, audit_db, reason)
    # An export is compared with a log the reviewer named; a log merely found at the
    # default place only if it is the export's own.
    named = _merge(ctx).audit_db is not None or bool(os.environ.get("BBRX_AUDIT_DB"))
    lines = _review().verify(
        path,
        reader,
        artifact,
        checkpoints=checkpoints,
        allowed_signers=allowed_signers,
        exported=export,
        against_log=named,
    )
    _echo(lines)


def _finish(outcome: reviewer.ReviewOutcome) -> None:
    """Print what a report or evidence command made; a log that did not verify still gets
    its report (that is the evidence), and then exits 1."""
    _echo(outcome.all_lines())
    if not outcome.ok:
        raise AuditBrokenError(
            outcome.problems[0] if outcome.problems else "the audit log did not verify",
            hint="The file was written, saying so. Keep the log as evidence.",
        )


def _stop_on_signals() -> tuple[threading.Event, list[tuple[signal.Signals, Any]]]:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()  # only a flag: the follower sees it at its next poll, and ends cleanly

    previous = [(s, signal.signal(s, handler)) for s in (signal.SIGINT, signal.SIGTERM)]
    return stop, previous


@audit_app.command("export")
def audit_export(
    ctx: typer.Context,
    fmt: Annotated[
        str, typer.Option("--format", help="jsonl (one JSON object a line) or csv.")
    ] = "jsonl",
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write here (atomically) instead of stdout."),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", help="Then stream each new event as it is appended, until Ctrl-C."
        ),
    ] = False,
    since: SinceOption = None,
    until: UntilOption = None,
    target: TargetFilter = None,
    operator: OperatorFilter = None,
    operation: OperationFilter = None,
    outcome: OutcomeFilter = None,
    mode: ModeFilter = None,
    reason: ReasonOption = None,
    audit_db: AuditDbOption = None,
) -> None:
    """Every event of the selected runs, as JSONL or CSV, for a SIEM or a spreadsheet.

    Every column, in the schema's order; --follow then streams new events.
    """
    flt = _filter(since, until, target, operator, operation, outcome, mode)
    path, reader = _context(ctx, audit_db, reason)
    if follow:
        stop, previous = _stop_on_signals()
        try:
            with _reviewer().follow_output(output) as stream:
                outcome_ = _reviewer().export_and_follow(
                    path, flt, fmt, stream, reader, stop, output=output
                )
        finally:
            for signum, handler in previous:
                signal.signal(signum, handler)
    elif output is None:
        outcome_ = _reviewer().export(path, flt, fmt, sys.stdout, reader)
    else:
        outcome_ = _reviewer().export_to_file(path, flt, fmt, output, reader)
    _echo(outcome_.all_lines(), err=True)


@audit_app.command("report")
def audit_report(
    ctx: typer.Context,
    run: Annotated[
        str | None,
        typer.Argument(help="One run (id or unique prefix); else the runs the filters select."),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The HTML file to write.", show_default=False)
    ] = Path("bbrx-audit-report.html"),
    checkpoints: CheckpointsOption = None,
    allowed_signers: SignersOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    target: TargetFilter = None,
    operator: OperatorFilter = None,
    operation: OperationFilter = None,
    outcome: OutcomeFilter = None,
    mode: ModeFilter = None,
    reason: ReasonOption = None,
    audit_db: AuditDbOption = None,
) -> None:
    """One self-contained HTML page: who ran what and why, verified, run by run.

    Each run has a timeline picture and its events table.
    """
    flt = _filter(since, until, target, operator, operation, outcome, mode)
    if run is not None and not flt.empty:
        raise UsageError("give a RUN or filters, not both")
    path, reader = _context(ctx, audit_db, reason)
    outcome_ = _reviewer().report(
        path,
        flt,
        output,
        reader,
        run=run,
        checkpoints=checkpoints,
        allowed_signers=allowed_signers,
    )
    _finish(outcome_)


@audit_app.command("evidence")
def audit_evidence(
    ctx: typer.Context,
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="The .tar.gz to write (never overwritten)."),
    ],
    checkpoints: CheckpointsOption = None,
    allowed_signers: SignersOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    target: TargetFilter = None,
    operator: OperatorFilter = None,
    operation: OperationFilter = None,
    outcome: OutcomeFilter = None,
    mode: ModeFilter = None,
    reason: ReasonOption = None,
    audit_db: AuditDbOption = None,
) -> None:
    """An evidence pack (.tar.gz) to attach to a ticket, with SHA-256 digests.

    It holds the export (JSONL and CSV), the report, the verification, the checkpoints
    and a manifest.
    """
    flt = _filter(since, until, target, operator, operation, outcome, mode)
    path, reader = _context(ctx, audit_db, reason)
    outcome_ = _reviewer().evidence(
        path, flt, output, reader, checkpoints=checkpoints, allowed_signers=allowed_signers
    )
    _finish(outcome_)


@audit_app.command("checkpoint")
def audit_checkpoint(
    ctx: typer.Context,
    key: Annotated[
        Path | None,
        typer.Option(
            "--key",
            help="The SSH key to sign with (a private key, or a public one whose private half "
            "is in ssh-agent). Default: the config file's audit.checkpoint_key.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="The checkpoint file to append to (keep it elsewhere than the log). Default: "
            "the config file's audit.checkpoint_file.",
            show_default=False,
        ),
    ] = None,
    reason: ReasonOption = None,
    audit_db: AuditDbOption = None,
) -> None:
    """Sign the log's chain head with an SSH key into a checkpoint file kept elsewhere.

    The head (seq, hash, time, log id) is signed with ssh-keygen -Y sign: what later
    catches a truncated or re-chained log.
    """
    path, reader = _context(ctx, audit_db, reason)
    signing = settings.checkpoint_signing(key, output)
    outcome_ = _reviewer().checkpoint(path, signing.key, signing.file, reader)
    _echo(outcome_.all_lines())
