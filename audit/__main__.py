"""Standalone reviewer CLI, with nothing of bbrx but this package:

    python -m audit verify PATH [--checkpoints F --allowed-signers F] [--export FILE]
    python -m audit runs PATH [FILTERS]
    python -m audit show PATH RUN
    python -m audit export PATH [--format jsonl|csv] [FILTERS] [--output FILE] [--follow]
    python -m audit report PATH [--run RUN | FILTERS] --output FILE.html
    python -m audit evidence PATH [FILTERS] --output FILE.tar.gz
    python -m audit checkpoint PATH --key KEY --output FILE

FILTERS: --since, --until, --target, --operator, --operation, --outcome, --mode. Who
reads is --as NAME (default $BBRX_OPERATOR, else user@host), why is --reason.

Exit codes: 0 success (and, for verify, an intact log), 1 verify found the log broken,
2 the log could not be read, the run could not be found, or the input was wrong.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from audit import reviewer
from audit.errors import AuditError
from audit.journal import AuditRecord
from audit.log import AuditLog
from audit.query import MODE_CHOICES, OUTCOME_CHOICES, RunFilter
from audit.reads import Reader
from audit.render import format_runs, format_timeline, printable


def _out(text: str) -> None:
    sys.stdout.write(printable(text, keep_newlines=True) + "\n")


def _err(text: str) -> None:
    sys.stderr.write(printable(text, keep_newlines=True) + "\n")


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", help="runs started at or after: a date, ISO time or age")
    parser.add_argument("--until", help="runs started before the end of this date or time")
    parser.add_argument("--target", action="append", default=[])
    parser.add_argument("--operator", action="append", default=[], help="who ran them")
    parser.add_argument("--operation", action="append", default=[])
    parser.add_argument("--outcome", action="append", default=[], choices=OUTCOME_CHOICES)
    parser.add_argument("--mode", action="append", default=[], choices=MODE_CHOICES)


def _reader(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--as", dest="reader", help="who is reading (recorded)")
    parser.add_argument("--reason", help="why (a ticket): recorded with the read")


def _signed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoints", type=Path, help="signed checkpoints to hold it to")
    parser.add_argument("--allowed-signers", type=Path, help="the keys whose signatures count")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m audit", description="Verify, read and export a bbrx audit log."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check the chain, fields, guards, checkpoints")
    verify.add_argument("path", type=Path)
    _signed(verify)
    verify.add_argument("--export", type=Path, help="also check this JSONL export")
    _reader(verify)
    runs = commands.add_parser("runs", help="list the runs in the log")
    runs.add_argument("path", type=Path)
    _filters(runs)
    show = commands.add_parser("show", help="show the events of one run")
    show.add_argument("path", type=Path)
    show.add_argument("run", help="run id, or a unique prefix of one")
    export = commands.add_parser("export", help="every event of the selected runs")
    export.add_argument("path", type=Path)
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--output", type=Path)
    export.add_argument("--follow", action="store_true", help="then stream new events")
    _filters(export)
    _reader(export)
    report = commands.add_parser("report", help="a self-contained HTML report")
    report.add_argument("path", type=Path)
    report.add_argument("--run", help="one run instead of filters")
    report.add_argument("--output", type=Path, required=True)
    _signed(report)
    _filters(report)
    _reader(report)
    evidence = commands.add_parser("evidence", help="an evidence pack (.tar.gz)")
    evidence.add_argument("path", type=Path)
    evidence.add_argument("--output", type=Path, required=True)
    _signed(evidence)
    _filters(evidence)
    _reader(evidence)
    checkpoint = commands.add_parser("checkpoint", help="sign the chain head into a file")
    checkpoint.add_argument("path", type=Path)
    checkpoint.add_argument("--key", type=Path, required=True)
    checkpoint.add_argument("--output", type=Path, required=True)
    _reader(checkpoint)
    return parser


def _run_filter(args: argparse.Namespace) -> RunFilter:
    return RunFilter.parse(
        since=args.since,
        until=args.until,
        targets=args.target,
        operators=args.operator,
        operations=args.operation,
        outcomes=args.outcome,
        modes=args.mode,
    )


def _follow(args: argparse.Namespace, reader: Reader) -> reviewer.ReviewOutcome:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
    with reviewer.follow_output(args.output) as stream:
        return reviewer.export_and_follow(
            args.path, _run_filter(args), args.format, stream, reader, stop, output=args.output
        )


def _command(args: argparse.Namespace) -> int:
    reader = Reader.default(getattr(args, "reader", None), getattr(args, "reason", None))
    if args.command == "verify":
        outcome = reviewer.verify(
            args.path,
            reader,
            checkpoints=args.checkpoints,
            allowed_signers=args.allowed_signers,
            exported=args.export,
        )  # PATH is named here, so an export is always compared with it
        for line in outcome.all_lines():
            (_out if outcome.ok else _err)(line)
        return 0 if outcome.ok else 1
    if args.command in ("runs", "show"):
        with AuditLog(args.path, readonly=True) as log:
            # The fallback journal's rows count in: they are what the log could not take.
            record = AuditRecord(log)
            if args.command == "runs":
                _out(format_runs(_run_filter(args).select(record.runs())))
            else:
                _out(format_timeline(record.timeline(args.run)))
        return 0
    if args.command == "export":
        if args.follow:
            outcome = _follow(args, reader)
        elif args.output is None:
            outcome = reviewer.export(args.path, _run_filter(args), args.format, sys.stdout, reader)
        else:
            outcome = reviewer.export_to_file(
                args.path, _run_filter(args), args.format, args.output, reader
            )
        for line in outcome.all_lines():
            _err(line)
        return 0
    if args.command == "report":
        flt = _run_filter(args)
        if args.run is not None and not flt.empty:
            raise AuditError("give --run or filters, not both")
        outcome = reviewer.report(
            args.path,
            flt,
            args.output,
            reader,
            run=args.run,
            checkpoints=args.checkpoints,
            allowed_signers=args.allowed_signers,
        )
    elif args.command == "evidence":
        outcome = reviewer.evidence(
            args.path,
            _run_filter(args),
            args.output,
            reader,
            checkpoints=args.checkpoints,
            allowed_signers=args.allowed_signers,
        )
    else:
        outcome = reviewer.checkpoint(args.path, args.key, args.output, reader)
    for line in outcome.all_lines():
        _out(line)
    # A report or pack of a log that did not verify is written (it is the evidence), but
    # the log is broken: exit 1, as verify would.
    return 0 if outcome.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The outcome is printed below; library warnings would only repeat it on stderr.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s: %(message)s")
    try:
        return _command(args)
    except AuditError as exc:
        _err(f"error: {exc}")
        return 2
    except BrokenPipeError:
        # The reader went away (`| head`): nothing to say. Keep the exit flush quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        _err(f"error: {exc.filename or 'output'}: {exc.strerror or exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
