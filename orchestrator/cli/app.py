"""The `bbrx` command line: bbr's grammar, plus audit, simulator and diagram commands.

Each command parses, calls one library function and renders what it returns. This is
the only module that turns errors into exit codes, and `main` is the only caller of
`sys.exit`.
"""

from __future__ import annotations

import inspect
import logging
import os
import select
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from typer.core import TyperGroup

try:  # typer >= 0.26 vendors its own click; older releases import the click package
    from typer._click import exceptions as click_exceptions
    from typer._click.core import Context as ClickContext
except ImportError:  # pragma: no cover
    from click import Context as ClickContext  # type: ignore[assignment]
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

from audit import AuditError
from audit.render import printable
from orchestrator import __version__, settings
from orchestrator.engine.options import Outcome, Timeouts
from orchestrator.engine.progress import progress_for
from orchestrator.errors import BbrxError, RunFailed
from orchestrator.operations.procedures import Request, run_director
from orchestrator.transport.targets import Target, director_address, parse_director, parse_host

log = logging.getLogger("bbrx")

# bbr's one-letter command aliases (urfave/cli `Aliases`): runbooks and bbr's own suite use
# `bbr director ... b` as often as `backup`. An alias resolves only in a group that has its
# command, so `b` is nothing at the top level.
ALIASES = {"c": "pre-backup-check", "b": "backup", "r": "restore", "h": "help", "v": "version"}


class _Group(TyperGroup):
    """A typer group that also answers to bbr's aliases."""

    def resolve_command(
        self, ctx: ClickContext, args: list[str]
    ) -> tuple[str | None, Any, list[str]]:
        if args and args[0] not in self.commands and ALIASES.get(args[0]) in self.commands:
            args = [ALIASES[args[0]], *args[1:]]
        return super().resolve_command(ctx, args)


app = typer.Typer(
    name="bbrx",
    cls=_Group,
    help="Audited, bbr-compatible backup and restore for BOSH directors.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# No `no_args_is_help` here: a bare `bbrx director` is bbr's usage error (--host missing,
# exit 1); the callback says so, and lets `director help` through without a host.
director_app = typer.Typer(
    cls=_Group, invoke_without_command=True, help="Back up and restore a BOSH director."
)
audit_app = typer.Typer(cls=_Group, no_args_is_help=True, help="Read and verify the audit log.")
sim_app = typer.Typer(
    cls=_Group, no_args_is_help=True, help="Manage simulated directors (sim://NAME)."
)
app.add_typer(director_app, name="director")
app.add_typer(audit_app, name="audit")
app.add_typer(sim_app, name="sim")

F = TypeVar("F", bound=Callable[..., Any])


def _command(group: typer.Typer, name: str) -> Callable[[F], F]:
    """Register a command; its help names its bbr alias, if it has one."""

    def register(function: F) -> F:
        doc = inspect.getdoc(function) or ""
        alias = next((a for a, command in ALIASES.items() if command == name), None)
        group.command(name, help=f"{doc} (alias: {alias})" if alias else doc)(function)
        return function

    return register


@dataclass(frozen=True)
class Globals:
    audit_db: Path | None = None
    operator: str | None = None
    reason: str | None = None
    host: str = ""
    username: str | None = None
    private_key_path: Path | None = None
    accept_new_host_key: bool = False
    known_hosts: Path | None = None
    quiet: bool = False
    # Only the timeouts given on the command line; the config file and defaults fill the rest.
    timeouts: dict[str, float | None] = field(default_factory=dict)
    # bbrx deployment: the director, the deployment (or all of them), the bound on parallelism.
    target: str = ""
    deployment: str | None = None
    all_deployments: bool = False
    max_parallel: int | None = None
    password: str | None = field(default=None, repr=False)
    ca_cert: str | None = field(default=None, repr=False)


def _timeout_option(phase: str, default: float | None) -> Any:
    return typer.Option(
        f"--{phase}-timeout",
        help=f"Seconds each {phase} script may run before it is killed "
        f"(default {default:g}, or the config file's; 0: no limit).",
        show_default=False,
        min=0,
    )


# A run's options, shared by `bbrx director` and `bbrx deployment`.
LockTimeout = Annotated[float | None, _timeout_option("lock", Timeouts.lock)]
BackupTimeout = Annotated[float | None, _timeout_option("backup", Timeouts.backup)]
UnlockTimeout = Annotated[float | None, _timeout_option("unlock", Timeouts.unlock)]
RestoreTimeout = Annotated[float | None, _timeout_option("restore", Timeouts.restore)]
MetadataTimeout = Annotated[float | None, _timeout_option("metadata", Timeouts.metadata)]
QuietOption = Annotated[
    bool, typer.Option("--quiet", help="No progress and no log lines: errors only.")
]


def _timeouts(**given: float | None) -> dict[str, float | None]:
    # 0 means "no limit"; an option not given keeps the config file's value or the default.
    return {k: (None if v == 0 else v) for k, v in given.items() if v is not None}


AuditDbOption = Annotated[
    Path | None,
    typer.Option(
        "--audit-db",
        help="The audit log (SQLite). Default: $BBRX_AUDIT_DB, else $BBRX_HOME/audit.db.",
        show_default=False,
    ),
]
OperatorOption = Annotated[
    str | None,
    typer.Option("--operator", help="Who runs this. Default: $BBRX_OPERATOR, else user@host."),
]
ReasonOption = Annotated[
    str | None,
    typer.Option(
        "--reason", help="Why this run happens (change ticket...): recorded in the audit."
    ),
]


def _merge(ctx: typer.Context, **values: object) -> Globals:
    # Options may be given before or after the subcommand group; the environment is
    # consulted later (settings.py), so an explicit option anywhere wins over it.
    parent: Globals = ctx.obj if isinstance(ctx.obj, Globals) else Globals()
    given = {k: v for k, v in values.items() if v is not None}
    merged = replace(parent, **given)  # type: ignore[arg-type]
    ctx.obj = merged
    return merged


@app.callback()
def root(
    ctx: typer.Context,
    audit_db: AuditDbOption = None,
    operator: OperatorOption = None,
    reason: ReasonOption = None,
) -> None:
    _merge(ctx, audit_db=audit_db, operator=operator, reason=reason)


# The director's connection flags, spelled as bbr spells them (`-u`, `--key` are its aliases).
# `status` accepts the same spellings, so a line copied from a runbook works there too.
def _host_option(help_: str = "HOST[:PORT], or sim://NAME.") -> Any:
    return typer.Option("--host", help=help_)


def _username_option(help_: str) -> Any:
    return typer.Option("--username", "-u", help=help_)


def _private_key_option(help_: str) -> Any:
    # Its help says "--key" too: a narrow terminal cuts the option column short.
    return typer.Option("--private-key-path", "--key", help=help_)


def _known_hosts_option(help_: str) -> Any:
    return typer.Option("--known-hosts", envvar="BBRX_KNOWN_HOSTS", help=help_)


def _accept_new_host_key_option(help_: str) -> Any:
    return typer.Option("--accept-new-host-key", help=help_)


def _debug_option(help_: str) -> Any:
    return typer.Option("--debug", help=help_)


DebugOption = Annotated[bool, _debug_option("Show scripts' output.")]


@director_app.callback()
def director(
    ctx: typer.Context,
    # Not required by the parser: `bbrx director help` needs no host; the check is below.
    host: Annotated[str | None, _host_option("HOST[:PORT], or sim://NAME (required).")] = None,
    username: Annotated[str | None, _username_option("SSH user.")] = None,
    private_key_path: Annotated[
        Path | None, _private_key_option("SSH private key (or --key).")
    ] = None,
    debug: DebugOption = False,
    quiet: QuietOption = False,
    lock_timeout: LockTimeout = None,
    backup_timeout: BackupTimeout = None,
    unlock_timeout: UnlockTimeout = None,
    restore_timeout: RestoreTimeout = None,
    metadata_timeout: MetadataTimeout = None,
    accept_new_host_key: Annotated[
        bool,
        _accept_new_host_key_option(
            "Trust an unknown host key on first use (recorded in the audit log)."
        ),
    ] = False,
    known_hosts: Annotated[
        Path | None,
        _known_hosts_option("known_hosts file to verify the director against. Default: ssh's own."),
    ] = None,
    audit_db: AuditDbOption = None,
    operator: OperatorOption = None,
    reason: ReasonOption = None,
) -> None:
    if ctx.invoked_subcommand == "help":
        return
    if not host:
        # What click says for a missing required option; exit 1 like every usage error.
        raise click_exceptions.UsageError("Missing option '--host'.", ctx=ctx)
    if ctx.invoked_subcommand is None:
        ctx.fail("Missing command.")
    merge_run_options(
        ctx,
        locals(),
        host=host,
        username=username,
        private_key_path=private_key_path,
        accept_new_host_key=accept_new_host_key or None,
        known_hosts=known_hosts,
    )


def merge_run_options(ctx: typer.Context, given: dict[str, Any], **target: object) -> None:
    """What a run's callback (`director`, `deployment`) was given, kept for its command:
    `given` is the callback's locals (the shared run options), `target` its own options."""
    set_verbosity(debug=given["debug"], quiet=given["quiet"])
    _merge(
        ctx,
        **target,
        quiet=given["quiet"] or None,
        timeouts=_timeouts(**{p: given[f"{p}_timeout"] for p in settings.TIMEOUT_PHASES}),
        audit_db=given["audit_db"],
        operator=given["operator"],
        reason=given["reason"],
    )


def _simulation() -> Any:
    # Imported by `bbrx sim` alone: a run against a real director needs none of it.
    from orchestrator import simulation

    return simulation


def _review() -> Any:
    # Imported by the commands that read the log: a run needs none of it, and the command
    # line's own imports stay light (see operations/procedures.py).
    from orchestrator.state import review

    return review


def set_verbosity(*, debug: bool, quiet: bool) -> None:
    if debug:
        logging.getLogger().setLevel(logging.DEBUG)
    elif quiet:
        # Warnings still show; errors are printed once, as the final "Error:" lines.
        root_logger = logging.getLogger()
        root_logger.setLevel(logging.WARNING)
        for handler in root_logger.handlers:
            handler.addFilter(lambda record: record.levelno != logging.ERROR)


def run_request(ctx: typer.Context, operation: str, target: Target, **given: Any) -> Request:
    """The Request a run's command makes: who, why, where the log is, the timeouts, and
    whatever the command adds (`given`)."""
    options: Globals = ctx.obj
    return Request(
        operation=operation,
        target=target,
        identity=settings.identity(options.operator, options.reason),
        audit_db=settings.audit_db_path(options.audit_db),
        home=settings.bbrx_home(),
        timeouts=replace(_configured_timeouts(operation), **options.timeouts),
        checkpoint=_configured_checkpoint(operation),
        **given,
    )


def _request(ctx: typer.Context, operation: str, artifact_path: Path | None = None) -> Request:
    options: Globals = ctx.obj
    return run_request(
        ctx,
        operation,
        parse_host(options.host),
        artifact_path=artifact_path,
        username=options.username,
        private_key_path=options.private_key_path,
        accept_new_host_key=options.accept_new_host_key,
        known_hosts=options.known_hosts,
    )


def _configured_timeouts(operation: str) -> Timeouts:
    try:
        return settings.configured_timeouts()
    except BbrxError as error:
        if not operation.endswith("-cleanup"):
            raise
        # A typo in the config file must not stand between the operator and an unlock.
        log.warning("%s; this cleanup uses the built-in timeouts", error.message)
        return Timeouts()


def _configured_checkpoint(operation: str) -> settings.CheckpointSigning | None:
    try:
        return settings.configured_checkpoint()
    except BbrxError as error:
        if not operation.endswith("-cleanup"):
            raise
        log.warning("%s; this cleanup signs no checkpoint", error.message)
        return None


def _run(ctx: typer.Context, request: Request) -> Outcome:
    """Run a director operation with the progress display this terminal calls for."""
    confirm = _confirm_abandon if sys.stdin.isatty() else None
    with progress_for(ctx.obj.quiet, sys.stderr.isatty()) as sink:
        return run_director(replace(request, progress=sink, confirm_abandon=confirm))


def _confirm_abandon(locked: list[str], cancelled: threading.Event) -> bool:
    """Ask on the terminal while the unlock goes on. No answer, or the run ending, is no."""
    fd = sys.stdin.fileno()
    try:
        foreground = os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        foreground = False
    if not foreground:
        # Reading the terminal from the background would stop bbrx (SIGTTIN) mid-unlock.
        log.warning(
            "bbrx is not in the terminal's foreground: it cannot ask; it goes on unlocking."
        )
        return False
    typer.echo(
        f"Still locked: {printable(', '.join(locked))}. bbrx is unlocking them. "
        "Stop now and leave them locked? [y/N]: ",
        err=True,
        nl=False,
    )
    # Unbuffered reads with a timeout: a thread blocked inside sys.stdin would hold its
    # lock when the run ends and the interpreter shuts down.
    answer = b""
    while b"\n" not in answer:
        if cancelled.is_set():
            typer.echo("", err=True)
            return False
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 1024)
            if not chunk:
                return False
            answer += chunk
    return answer.strip().lower() in (b"y", b"yes")


def _audit_footer(outcome: Outcome) -> None:
    typer.echo(f"Audit: run {outcome.run_id} in {outcome.audit_db}")
    typer.echo(f"  see it with: bbrx audit show {outcome.run_id}")


@_command(director_app, "pre-backup-check")
def pre_backup_check(
    ctx: typer.Context,
    artifact_path: Annotated[
        Path | None,
        typer.Option(
            "--artifact-path", "-a", help="Where the backup will go, for the space check."
        ),
    ] = None,
) -> None:
    """Check that the director can be backed up (nothing is locked)."""
    request = _request(ctx, "pre-backup-check", artifact_path)
    try:
        outcome = _run(ctx, request)
    except RunFailed:
        typer.echo(f"Director {request.target.address} cannot be backed up.", err=True)
        raise
    typer.echo(f"Director {request.target.address} can be backed up.")
    _audit_footer(outcome)


@_command(director_app, "backup")
def backup(
    ctx: typer.Context,
    artifact_path: Annotated[
        Path | None,
        typer.Option(
            "--artifact-path", "-a", help="Existing directory for the backup. Default: cwd."
        ),
    ] = None,
) -> None:
    """Lock, back up, unlock, and copy the backup to this machine."""
    try:
        outcome = _run(ctx, _request(ctx, "backup", artifact_path))
    except RunFailed as failure:
        # An unlock failure after a good backup still publishes it (exit 8): say where.
        published = getattr(failure.outcome, "artifact", None)
        if published is not None:
            typer.echo(f"Backup created: {published}")
        raise
    typer.echo(f"Backup created: {outcome.artifact}")
    _audit_footer(outcome)


@_command(director_app, "restore")
def restore(
    ctx: typer.Context,
    artifact_path: Annotated[
        Path, typer.Option("--artifact-path", "-a", help="The backup directory to restore.")
    ],
) -> None:
    """Restore a backup onto the director."""
    request = _request(ctx, "restore", artifact_path)
    outcome = _run(ctx, request)
    typer.echo(f"Restored {artifact_path} to {request.target.address}")
    _audit_footer(outcome)


ForceOption = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Clean up even if the work dir was created by a bbrx run this audit log does not "
        "know (from another jump box or audit log): only once you know that run is over.",
    ),
]


@director_app.command("backup-cleanup")
def backup_cleanup(ctx: typer.Context, force: ForceOption = False) -> None:
    """Unlock every job and remove what a failed backup left on the director."""
    request = replace(_request(ctx, "backup-cleanup"), force=force)
    outcome = _run(ctx, request)
    typer.echo(
        f"Backup cleanup of {request.target.address} done: every job unlocked, work dir removed."
    )
    _audit_footer(outcome)


@director_app.command("restore-cleanup")
def restore_cleanup(ctx: typer.Context, force: ForceOption = False) -> None:
    """Unlock every job and remove what a failed restore left on the director."""
    request = replace(_request(ctx, "restore-cleanup"), force=force)
    outcome = _run(ctx, request)
    typer.echo(
        f"Restore cleanup of {request.target.address} done: every job unlocked, work dir removed."
    )
    _audit_footer(outcome)


# --- simulator ----------------------------------------------------------------------------

NameArgument = Annotated[str, typer.Argument(help="The simulated director's name (sim://NAME).")]


@sim_app.command("create")
def sim_create(
    name: NameArgument,
    empty: Annotated[bool, typer.Option("--empty", help="Jobs and scripts, no data.")] = False,
) -> None:
    """Create a simulated director (with demo data unless --empty)."""
    typer.echo(_simulation().create(settings.bbrx_home(), name, empty=empty))


@sim_app.command("vms")
def sim_vms(name: NameArgument) -> None:
    """Play `bosh vms`: the deployments and VMs the simulated director knows."""
    typer.echo(_simulation().vms(settings.bbrx_home(), name))


DeploymentOption = Annotated[
    str | None, typer.Option("--deployment", "-d", help="A deployment of the director.")
]


@sim_app.command("wipe")
def sim_wipe(name: NameArgument, deployment: DeploymentOption = None) -> None:
    """The disaster: recreate the director VM empty (jobs there, data gone), or with
    --deployment, every VM of that deployment."""
    typer.echo(_simulation().wipe(settings.bbrx_home(), name, deployment=deployment))


@sim_app.command("deploy")
def sim_deploy(
    name: NameArgument,
    deployment: Annotated[str, typer.Argument(help="The deployment's name.")],
    manifest: Annotated[
        Path, typer.Option("--manifest", help="A BOSH manifest (name, instance_groups, jobs).")
    ],
) -> None:
    """Add or replace a deployment of the simulated director, from a BOSH manifest."""
    typer.echo(_simulation().deploy(settings.bbrx_home(), name, deployment, manifest))


@sim_app.command("delete-deployment")
def sim_delete_deployment(
    name: NameArgument,
    deployment: Annotated[str, typer.Argument(help="The deployment's name.")],
) -> None:
    """Remove a deployment and its VMs (refused while a run holds one of them)."""
    typer.echo(_simulation().delete_deployment(settings.bbrx_home(), name, deployment))


@sim_app.command("destroy")
def sim_destroy(name: NameArgument) -> None:
    """Remove a simulated director entirely."""
    typer.echo(_simulation().destroy(settings.bbrx_home(), name))


@sim_app.command("list")
def sim_list() -> None:
    """The simulated directors under $BBRX_HOME/sim."""
    typer.echo(_simulation().listing(settings.bbrx_home()))


@sim_app.command("fault")
def sim_fault(
    name: NameArgument,
    job: Annotated[str, typer.Argument(help="Job name, e.g. director.")],
    script: Annotated[
        str,
        typer.Argument(help="Script name, e.g. pre-backup-lock, or 'transfer' (the copy)."),
    ],
    spec: Annotated[
        str | None,
        typer.Argument(
            help="A script's: 'fail [CODE [MESSAGE]]', 'hang', 'sleep SECONDS' or 'kill-bbrx'."
            " The copy's: 'fail [MESSAGE]', 'corrupt', 'corrupt-local', 'disk-full' or"
            " 'sleep SECONDS'. Either after 'after SECONDS' (a delay) and/or 'call N' (the Nth"
            " call only). Omit to clear."
        ),
    ] = None,
    deployment: DeploymentOption = None,
    instance: Annotated[
        str | None,
        typer.Option("--instance", help="GROUP/INDEX of the deployment's VM, e.g. redis/1."),
    ] = None,
) -> None:
    """Make a simulated job script, or the copy of its data, fail, hang, slow down, or kill
    the bbrx running it (for practice): the director's, or with --deployment and
    --instance, one VM's of a deployment."""
    home = settings.bbrx_home()
    typer.echo(
        _simulation().fault(home, name, job, script, spec, deployment=deployment, instance=instance)
    )


# --- misc ---------------------------------------------------------------------------------


_IGNORED = "Accepted for a copied director command line; ignored (status reads the audit log)."


@app.command("status")
def status(
    ctx: typer.Context,
    host: Annotated[str | None, _host_option("A director: HOST[:PORT], or sim://NAME.")] = None,
    target: Annotated[
        str | None,
        typer.Option("--target", "-t", help="A deployment's director (with --deployment)."),
    ] = None,
    deployment: Annotated[
        str | None, typer.Option("--deployment", "-d", help="A deployment of --target.")
    ] = None,
    # Accepted and ignored, so that the director line an operator copies from a runbook
    # works here too: status reads only the audit log and never connects.
    username: Annotated[str | None, _username_option(_IGNORED)] = None,
    private_key_path: Annotated[Path | None, _private_key_option(_IGNORED)] = None,
    known_hosts: Annotated[Path | None, _known_hosts_option(_IGNORED)] = None,
    accept_new_host_key: Annotated[bool, _accept_new_host_key_option(_IGNORED)] = False,
    debug: Annotated[bool, _debug_option(_IGNORED)] = False,
    audit_db: AuditDbOption = None,
) -> None:
    """Is the target idle, in progress (by whom, since when, which phase), or interrupted?

    Reads only the audit log: it never connects to the director, so the director
    connection flags (--username, --private-key-path...) are accepted and ignored.
    """
    if deployment:
        if not target:
            raise BbrxError("--deployment needs --target: the director the deployment is on")
        from orchestrator.engine.fleet import deployment_target

        name = deployment_target(director_address(parse_director(target)), deployment)
    elif host:
        name = parse_host(host).address
    else:
        raise BbrxError(
            "give --host HOST (a director) or --target TARGET --deployment NAME (a deployment)"
        )
    log_path = settings.audit_db_path(_merge(ctx, audit_db=audit_db).audit_db)
    shown = _review().status(log_path, name, home=settings.bbrx_home())
    # The text quotes the log (operator, job names): no terminal control reaches the screen.
    typer.echo(printable(shown, keep_newlines=True))


@app.command("diagram")
def diagram(
    operation: Annotated[
        str,
        typer.Argument(
            help="backup, restore, pre-backup-check, backup-cleanup, restore-cleanup, job."
        ),
    ],
) -> None:
    """Print an operation's state machine as a Mermaid state diagram."""
    from orchestrator.engine import machine

    typer.echo(machine.mermaid(operation))


@_command(app, "version")
def version() -> None:
    """Print the version."""
    typer.echo(f"bbrx version {__version__}")


# --- help: bbr's `help` and `h` ----------------------------------------------------------


def _help_of(ctx: ClickContext, words: list[str]) -> str:
    """The help of the command that `words` name below the group of `ctx`."""
    for word in words:
        group = ctx.command
        command = None
        if isinstance(group, TyperGroup):
            name = word if word in group.commands else ALIASES.get(word, word)
            command = group.get_command(ctx, name)
        if command is None:
            raise click_exceptions.UsageError(f"No such command {word!r}.", ctx=ctx)
        ctx = ClickContext(command, parent=ctx, info_name=command.name)
    # typer prints rich help itself and returns the rest (nothing, when rich is there).
    return ctx.get_help()


def _add_help(group: typer.Typer) -> None:
    @_command(group, "help")
    def help_(
        ctx: typer.Context,
        command: Annotated[
            list[str] | None,
            typer.Argument(
                help="The command to describe, e.g. director backup.", show_default=False
            ),
        ] = None,
    ) -> None:
        """Show the commands, or the help of one command."""
        assert ctx.parent is not None  # a group's command always has its group's context
        text = _help_of(ctx.parent, command or [])
        if text:
            typer.echo(text)


for _group in (app, director_app, audit_app, sim_app):
    _add_help(_group)


# --- the one place errors become exit codes -----------------------------------------------


class _PrintableFormatter(logging.Formatter):
    """Log lines quote the director (job names; scripts' output with --debug): a VM must not
    be able to drive the operator's terminal, so control characters are shown escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), keep_newlines=True)


def _print_error(error: BaseException) -> None:
    # Errors quote what scripts on the VM wrote (stderr tails): escape terminal controls.
    typer.echo(printable(f"Error: {error}", keep_newlines=True), err=True)


def main(argv: list[str] | None = None) -> NoReturn:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _PrintableFormatter("[bbrx] %(asctime)s %(levelname)s - %(message)s", "%Y/%m/%d %H:%M:%S")
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # transitions logs every callback at INFO; the audit log already has every transition.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    command = typer.main.get_command(app)
    code = 0
    try:
        result = command.main(args=argv, prog_name="bbrx", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except RunFailed as failure:
        for error in failure.errors:
            _print_error(error)
        typer.echo(f"See what happened: bbrx audit show {failure.run_id}", err=True)
        code = failure.exit_code
    except BbrxError as error:
        _print_error(error)
        code = error.exit_bit
    except AuditError as error:
        _print_error(error)
        code = 1
    except click_exceptions.NoArgsIsHelpError as error:
        # bbr prints its help and exits 0 when given nothing to do; so does bbrx (a group
        # with no command). typer has printed rich help already; plain help is the message.
        if error.message:
            typer.echo(error.message)
        code = 0
    except click_exceptions.UsageError as error:
        # bbr exits 1 on usage errors; so does bbrx (click's own default would be 2).
        error.show()
        code = 1
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        code = 1
    except typer.Exit as exit_:
        code = exit_.exit_code
    except click_exceptions.ClickException as error:
        error.show()
        code = 1
    except BrokenPipeError:
        # Whoever read our stdout went away (`bbrx audit export | head`): nothing to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except Exception as error:  # a bug: say so plainly, keep the traceback for --debug
        log.debug("internal error", exc_info=True)
        typer.echo(
            f"Error: internal error in bbrx: {error!r} (run with --debug for details)", err=True
        )
        code = 1
    sys.exit(code)
