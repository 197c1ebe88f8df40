"""The command line: typer commands that parse, call one library function, and render.

`app.py` is the only place in bbrx where errors become exit codes.
"""

from orchestrator.cli.app import app, main

__all__ = ["app", "main"]
