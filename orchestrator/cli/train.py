"""`bbrx train ...`: scenarios on the simulator for trainees, and their debrief.

    bbrx train list | start SCENARIO [--seed N] | hint | status | debrief [SESSION]
         [--json | --html FILE] | reset

Each command parses, calls one library function of `orchestrator.training` and renders
what it returns; `app.main` turns errors into exit codes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from orchestrator import settings
from orchestrator.cli.app import OperatorOption, _add_help, _Group, app
from orchestrator.errors import UsageError

train_app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    help="Practise backup and restore on the simulator: scenarios, hints, a debrief.",
)
app.add_typer(train_app, name="train")


@train_app.command("list")
def train_list() -> None:
    """The scenarios that come with bbrx."""
    from orchestrator.training.scenario import shipped

    for scenario in shipped():
        minutes = scenario.time_budget // 60
        typer.echo(f"{scenario.id:<28} {scenario.title} ({minutes} min)")
    typer.echo("\nStart one with: bbrx train start SCENARIO [--seed N]")


@train_app.command("start")
def train_start(
    scenario: Annotated[str, typer.Argument(help="A scenario's id (bbrx train list) or a file.")],
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="The seed of the scenario's random choices.", min=0),
    ] = None,
    operator: OperatorOption = None,
) -> None:
    """Set up a scenario's world, arm its faults, and print the brief."""
    from orchestrator.training.session import start

    home = settings.bbrx_home()
    who = settings.identity(operator, None).operator
    started = start(home, settings.audit_db_path(None), scenario, seed, who)
    session, chosen = started.session, started.scenario
    typer.echo(f"Training session {session.id}: {chosen.title}")
    typer.echo(f"Scenario {chosen.id}, seed {session.seed} (the same seed gives the same faults)")
    typer.echo(f"Time budget: {chosen.time_budget // 60} min. Your director: {session.target}")
    if started.backups is not None:
        typer.echo(f"The backups you have: {started.backups}")
    typer.echo("")
    typer.echo(chosen.brief)
    typer.echo(
        "\nUse the ordinary commands: bbrx director --host "
        f"{session.target} ..., bbrx sim ... {session.director}, bbrx status --host "
        f"{session.target}, bbrx audit ...\n"
        "Then: bbrx train hint (costs points), bbrx train status, bbrx train debrief, "
        "bbrx train reset."
    )


@train_app.command("hint")
def train_hint() -> None:
    """The next hint of the running session (each costs points)."""
    from orchestrator.training.session import hint

    number, total, text, cost = hint(settings.bbrx_home())
    typer.echo(f"Hint {number} of {total} (costs {cost} points): {text}")


@train_app.command("status")
def train_status() -> None:
    """Elapsed time, hints used, and whether the goal is reached yet."""
    from orchestrator.training.debrief import debrief
    from orchestrator.training.session import current

    session = current(settings.bbrx_home())
    if session is None:
        raise UsageError(
            "no training session is running",
            hint="Start one with: bbrx train start SCENARIO (see: bbrx train list)",
        )
    report = debrief(Path(session.audit_db), session.id)
    typer.echo(f"Session {session.id}: {report.title} (seed {session.seed})")
    typer.echo(f"Elapsed: {session.elapsed():.0f} s of {report.time_budget} s")
    typer.echo(f"Hints used: {report.hints}")
    goal = " -> ".join(report.goal)
    typer.echo(f"Goal ({goal}): {'reached' if report.goal_reached else 'not reached yet'}")


@train_app.command("debrief")
def train_debrief(
    session: Annotated[
        str | None, typer.Argument(help="A session id. Default: the last session.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The debrief as JSON.")] = False,
    html: Annotated[
        Path | None, typer.Option("--html", help="Write the debrief as an HTML page too.")
    ] = None,
) -> None:
    """What you did, out of order and unsafe, the score and the reference solution."""
    from orchestrator.training.debrief import debrief, render_html, render_text

    report = debrief(settings.audit_db_path(None), session)
    if html is not None:
        try:
            html.write_text(render_html(report), encoding="utf-8")
        except OSError as error:
            raise UsageError(f"cannot write {html}: {error.strerror}") from error
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        typer.echo(render_text(report))
        if html is not None:
            typer.echo(f"\nWritten: {html}")


@train_app.command("reset")
def train_reset() -> None:
    """End the running session: its director goes; its rows stay for the debrief."""
    from orchestrator.training.session import reset

    session = reset(settings.bbrx_home())
    typer.echo(
        f"Ended training session {session.id}; removed {session.target}. "
        f"Debrief it with: bbrx train debrief {session.id}"
    )


_add_help(train_app)
