"""Standalone reviewer CLI: ``python -m audit {verify,runs,show} PATH [RUN]``.

Exit codes: 0 success (and, for verify, an intact log), 1 verify found the log broken,
2 the log could not be read or the run could not be found.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from audit.errors import AuditError
from audit.journal import AuditRecord
from audit.log import AuditLog
from audit.render import format_runs, format_timeline
from audit.verify import verify_log


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m audit", description="Verify and read a bbrx audit log (read-only)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check the hash chain and append-only triggers")
    verify.add_argument("path")
    runs = commands.add_parser("runs", help="list the runs in the log")
    runs.add_argument("path")
    show = commands.add_parser("show", help="show the events of one run")
    show.add_argument("path")
    show.add_argument("run", help="run id, or a unique prefix of one")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The outcome is printed below; library warnings would only repeat it on stderr.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s: %(message)s")
    try:
        if args.command == "verify":
            report = verify_log(args.path)
            if not report.ok:
                _err(f"audit log BROKEN: {report.problem}")
                for line in report.journal_lines():
                    _err(line)
                return 1
            _out(
                f"audit log intact: {report.count} events, "
                f"head seq {report.head_seq} hash {report.head_hash}"
            )
            for line in report.journal_lines():
                _out(line)
            return 0
        with AuditLog(args.path, readonly=True) as log:
            # The fallback journal's rows count in: they are what the log could not take.
            record = AuditRecord(log)
            if args.command == "runs":
                _out(format_runs(record.runs()))
            else:
                _out(format_timeline(record.timeline(args.run)))
        return 0
    except AuditError as exc:
        _err(f"error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
