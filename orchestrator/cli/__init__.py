"""The command line: typer commands that parse, call one library function, and render.

`app.py` holds the root, `director`, `audit`, `sim` and the rest, and is the only place
in bbrx where errors become exit codes; `deployment.py` adds `bbrx deployment`, and
`audit.py` the reviewers' `bbrx audit ...`.
"""

from orchestrator.cli import audit, deployment, train
from orchestrator.cli.app import app, main

__all__ = ["app", "audit", "deployment", "main", "train"]
