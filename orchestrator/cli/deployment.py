"""`bbrx deployment ...`: bbr's deployment grammar, on the simulator's deployments.

    bbrx deployment --target TARGET (--deployment NAME | --all-deployments)
         [--username U --password P --ca-cert CERT]
         pre-backup-check | backup [-a DIR] [--with-manifest] [--unsafe-lock-free]
         | restore -a DIR | backup-cleanup | restore-cleanup

Deployment flags go before the subcommand, as in bbr; each has bbr's environment
variable. Each command parses, calls one library function and renders it; `app.main`
turns errors into exit codes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli.app import (
    AuditDbOption,
    BackupTimeout,
    DebugOption,
    ForceOption,
    Globals,
    LockTimeout,
    MetadataTimeout,
    OperatorOption,
    QuietOption,
    ReasonOption,
    RestoreTimeout,
    UnlockTimeout,
    _add_help,
    _audit_footer,
    _command,
    _confirm_abandon,
    _Group,
    app,
    merge_run_options,
    run_request,
)
from orchestrator.engine.options import DEFAULT_MAX_PARALLEL, Outcome
from orchestrator.engine.progress import progress_for
from orchestrator.errors import RunFailed, UsageError
from orchestrator.operations.procedures import Request, run_deployment
from orchestrator.transport.targets import parse_director

deployment_app = typer.Typer(
    cls=_Group,
    invoke_without_command=True,
    help="Back up and restore a BOSH deployment (bbr's deployment mode).",
)
app.add_typer(deployment_app, name="deployment")


@deployment_app.callback()
def deployment(
    ctx: typer.Context,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            "-t",
            envvar="BOSH_ENVIRONMENT",
            help="The director: sim://NAME, or its URL (required).",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--deployment", "-d", envvar="BOSH_DEPLOYMENT", help="Deployment name."),
    ] = None,
    all_deployments: Annotated[
        bool, typer.Option("--all-deployments", help="Every deployment of the director.")
    ] = False,
    username: Annotated[
        str | None,
        typer.Option(
            "--username", "-u", envvar="BOSH_CLIENT", help="Director user or UAA client id."
        ),
    ] = None,
    password: Annotated[
        str | None,
        typer.Option(
            "--password",
            "-p",
            envvar="BOSH_CLIENT_SECRET",
            help="Director password or UAA client secret.",
            show_default=False,
        ),
    ] = None,
    ca_cert: Annotated[
        str | None,
        typer.Option(
            "--ca-cert",
            envvar=["CA_CERT", "BOSH_CA_CERT"],
            help="The director's CA certificate (PEM text or a path).",
        ),
    ] = None,
    debug: DebugOption = False,
    quiet: QuietOption = False,
    max_parallel: Annotated[
        int | None,
        typer.Option(
            "--max-parallel",
            min=1,
            help="At most this many scripts at once within a deployment (default "
            f"{DEFAULT_MAX_PARALLEL}; bbr: 10). Copies: at most 4.",
        ),
    ] = None,
    lock_timeout: LockTimeout = None,
    backup_timeout: BackupTimeout = None,
    unlock_timeout: UnlockTimeout = None,
    restore_timeout: RestoreTimeout = None,
    metadata_timeout: MetadataTimeout = None,
    audit_db: AuditDbOption = None,
    operator: OperatorOption = None,
    reason: ReasonOption = None,
) -> None:
    if ctx.invoked_subcommand == "help":
        return
    if not target:
        raise UsageError(
            "--target flag is required.",
            hint="Use --target sim://NAME for the simulator (or set BOSH_ENVIRONMENT).",
        )
    parsed = parse_director(target)
    # Read: the secret need not stay where every ssh this run starts would inherit it.
    os.environ.pop("BOSH_CLIENT_SECRET", None)
    if not parsed.simulated:
        # bbr's checks come before any call to the director.
        for flag, value in (("username", username), ("password", password)):
            if not value:
                raise UsageError(f"--{flag} flag is required.")
    if bool(name) == all_deployments:
        raise UsageError("provide one of '--deployment' or '--all-deployments' flags.")
    if ctx.invoked_subcommand is None:
        ctx.fail("Missing command.")
    merge_run_options(
        ctx,
        locals(),
        target=target,
        deployment=name,
        all_deployments=all_deployments or None,
        max_parallel=max_parallel,
        username=username,
        password=password,
        ca_cert=ca_cert,
    )


def _request(ctx: typer.Context, operation: str, artifact_path: Path | None = None) -> Request:
    options: Globals = ctx.obj
    return run_request(
        ctx,
        operation,
        parse_director(options.target),
        artifact_path=artifact_path,
        deployment=options.deployment,
        max_parallel=options.max_parallel,
        username=options.username,
        password=options.password,
        ca_cert=options.ca_cert,
    )


def _single(ctx: typer.Context, request: Request) -> Outcome:
    options: Globals = ctx.obj
    if options.all_deployments:
        raise UsageError(
            f"{request.operation} does not take --all-deployments: give --deployment NAME",
            hint="Restores and restore cleanups go one deployment at a time.",
        )
    confirm = _confirm_abandon if sys.stdin.isatty() else None
    with progress_for(options.quiet, sys.stderr.isatty()) as sink:
        return run_deployment(replace(request, progress=sink, confirm_abandon=confirm))


def _batch(request: Request) -> None:
    from orchestrator.operations.batch import run_all_deployments  # its threads, its relay

    run_all_deployments(request, typer.echo)


def _name(request: Request) -> str:
    return f"'{request.deployment}'"


@_command(deployment_app, "pre-backup-check")
def pre_backup_check(ctx: typer.Context) -> None:
    """Check that the deployment can be backed up (nothing is locked)."""
    request = _request(ctx, "pre-backup-check")
    if ctx.obj.all_deployments:
        return _batch(request)
    try:
        outcome = _single(ctx, request)
    except RunFailed:
        typer.echo(f"Deployment {_name(request)} cannot be backed up.", err=True)
        raise
    typer.echo(f"Deployment {_name(request)} can be backed up.")
    _audit_footer(outcome)
    return None


@_command(deployment_app, "backup")
def backup(
    ctx: typer.Context,
    artifact_path: Annotated[
        Path | None,
        typer.Option(
            "--artifact-path", "-a", help="Existing directory for the backup. Default: cwd."
        ),
    ] = None,
    with_manifest: Annotated[
        bool, typer.Option("--with-manifest", help="Save the deployment's manifest too.")
    ] = False,
    unsafe_lock_free: Annotated[
        bool,
        typer.Option(
            "--unsafe-lock-free",
            help="Run no lock or unlock script: the data may change while it is copied.",
        ),
    ] = False,
) -> None:
    """Lock, back up, unlock, and copy the deployment's backup to this machine."""
    request = replace(
        _request(ctx, "backup", artifact_path),
        with_manifest=with_manifest,
        unsafe_lock_free=unsafe_lock_free,
    )
    if ctx.obj.all_deployments:
        if unsafe_lock_free:
            raise UsageError(
                "Cannot use the --unsafe-lock-free flag in conjunction with the "
                "--all-deployments flag"
            )
        return _batch(request)
    try:
        outcome = _single(ctx, request)
    except RunFailed as failure:
        published = getattr(failure.outcome, "artifact", None)
        if published is not None:
            typer.echo(f"Backup created: {published}")
        raise
    typer.echo(f"Backup created: {outcome.artifact}")
    _audit_footer(outcome)
    return None


@_command(deployment_app, "restore")
def restore(
    ctx: typer.Context,
    artifact_path: Annotated[
        Path | None,
        typer.Option("--artifact-path", "-a", help="The backup directory to restore."),
    ] = None,
) -> None:
    """Restore a backup onto the deployment."""
    if artifact_path is None:
        raise UsageError("--artifact-path flag is required.")
    request = _request(ctx, "restore", artifact_path)
    outcome = _single(ctx, request)
    typer.echo(f"Restored {artifact_path} to deployment {_name(request)} of {ctx.obj.target}")
    _audit_footer(outcome)


@deployment_app.command("backup-cleanup")
def backup_cleanup(ctx: typer.Context, force: ForceOption = False) -> None:
    """Unlock every job and remove what a failed backup left on the deployment's VMs."""
    request = replace(_request(ctx, "backup-cleanup"), force=force)
    if ctx.obj.all_deployments:
        return _batch(request)
    outcome = _single(ctx, request)
    typer.echo(f"'{request.deployment}' cleaned up: every job unlocked, work dirs removed.")
    _audit_footer(outcome)
    return None


@deployment_app.command("restore-cleanup")
def restore_cleanup(ctx: typer.Context, force: ForceOption = False) -> None:
    """Unlock every job and remove what a failed restore left on the deployment's VMs."""
    request = replace(_request(ctx, "restore-cleanup"), force=force)
    outcome = _single(ctx, request)
    typer.echo(f"'{request.deployment}' cleaned up: every job unlocked, work dirs removed.")
    _audit_footer(outcome)


_add_help(deployment_app)
