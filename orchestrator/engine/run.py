"""One audited run: the machine, its audit hook, per-job trackers, signals and errors.

The driver is deliberately dumb: it looks up the action for the current state, runs it,
and fires the trigger the action returned. Where the run goes next is decided by the
tables in `machine.py`. Every trigger, refused ones included, becomes an audit row
through the machines' `finalize_event` hook.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from transitions import EventData, MachineError

from audit import AppendedEvent, AuditError, AuditLog, Journal
from orchestrator import __version__
from orchestrator.engine.fleet import DirectorFleet, Fleet
from orchestrator.engine.machine import (
    PROTECTED_STATES,
    SCRIPTS,
    TERMINAL,
    build_job_machine,
    build_run_machine,
    cleanup_for,
    failure_trigger,
    lock_held_after,
)
from orchestrator.engine.options import DEFAULT_MAX_PARALLEL, Identity, Outcome, Timeouts
from orchestrator.engine.progress import NoProgress, ProgressSink
from orchestrator.errors import (
    AuditUnwritableError,
    BbrxError,
    InterruptedRunError,
    LocksLeftError,
    ScriptError,
    ScriptNotStartedError,
    TransportError,
)
from orchestrator.transport.instance import (
    INTERRUPTED_KILL,
    Instance,
    Job,
    ScriptCall,
    ScriptResult,
)

log = logging.getLogger(__name__)

Action = Callable[["Run"], "str | tuple[str, dict[str, Any]]"]

# Phases whose scripts may lock, or act on data that is only consistent while locked: none
# of them starts unless its intent row is in the audit log. Unlocking is always safe.
RECORDED_PHASES = frozenset({"lock", "backup", "restore"})


def new_run_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


class JobTracker:
    """A job's own machine within a run (the model; transitions adds `state` and triggers).

    A job is one job on one instance: `redis-server` on `redis/0` and on `redis/1` are two
    trackers. `label` is its key in `Run.jobs` and its name in messages, lock plans and
    audit verdicts (the job's name alone in director mode, where there is one instance).
    """

    state: str
    trigger: Callable[..., bool]

    def __init__(self, job: Job, run: Run, instance: Instance | None = None) -> None:
        self.job = job
        self.run = run
        self.instance = instance if instance is not None else run.fleet.instances[0]
        self.label = run.fleet.label(self.instance, job.name)
        # Lock constraints match a job by name and release in deployment mode (bbr's rule).
        self.release = run.fleet.release_of(self.instance, job.name)
        # Kept apart from `state`: a backup drains after a failed unlock, and the job's
        # drain states must not hide that its lock may still be held.
        self.lock_held = False
        run.job_machine.add_model(self)

    @property
    def name(self) -> str:
        """The job's own name, as its scripts and the VM's directories know it."""
        return self.job.name

    @property
    def where(self) -> str:
        """The instance, as error messages name it."""
        return self.run.fleet.where(self.instance)

    @property
    def may_be_locked(self) -> bool:
        # A job with no unlock script cannot be unlocked by bbrx or any cleanup; bbr
        # accepts that, and the checks warn about it before the run locks anything.
        unlock = SCRIPTS.get(self.run.operation, {}).get("unlock")
        return self.lock_held and unlock is not None and self.job.has(unlock)

    def note_state(self) -> None:
        self.lock_held = lock_held_after(self.lock_held, self.state)


class Run:
    """The model of one run-level machine, and everything its actions share."""

    state: str
    trigger: Callable[..., bool]

    def __init__(
        self,
        operation: str,
        instance: Instance | Fleet,
        audit: AuditLog,
        identity: Identity,
        target: str,
        progress: ProgressSink | None = None,
        timeouts: Timeouts | None = None,
        confirm_abandon: Callable[[list[str], threading.Event], bool] | None = None,
        max_parallel: int = DEFAULT_MAX_PARALLEL,
        signal_relay: SignalRelay | None = None,
    ) -> None:
        # Runs driven in worker threads (--all-deployments) get their signals through it.
        self.signal_relay = signal_relay
        self.operation = operation
        # At most this many scripts or copies at once (bbr's bound is 10, and not settable).
        self.max_parallel = max(1, max_parallel)
        # Asks the operator, on a terminal, whether to stop unlocking (None: nobody to ask);
        # its Event is set when the run ends, which withdraws the question.
        self.confirm_abandon = confirm_abandon
        self.abandoned = False
        self._asking = False
        self._run_over = threading.Event()
        self.timeouts = timeouts or Timeouts()
        self.progress: ProgressSink = progress or NoProgress()
        self.fleet: Fleet = (
            instance if isinstance(instance, Fleet) else DirectorFleet(instance, target)
        )
        self.audit = audit
        self.identity = identity
        self.target = target
        self.started = datetime.now(UTC)
        self.tool_version = f"bbrx {__version__}"
        self.run_id = new_run_id(self.started)
        self.errors: list[BbrxError] = []
        self.jobs: dict[str, JobTracker] = {}
        self.interrupted_by: str | None = None
        self._signals_seen = 0
        self._interrupt_fired = False
        self._interrupt_noted = False
        # Whether an interruption may kill what runs now (not while unlocking or cleaning).
        # The driver changes it, and the signal watcher acts on it, only under this lock:
        # a kill decided in `locking` has finished before the first unlock script starts.
        self._killable = True
        self._kill_lock = threading.Lock()
        self._wake: tuple[int, int] | None = None  # the signal watcher's pipe, while driving
        # Once an append fails, every later row of this run goes to the journal: no waiting
        # out the busy timeout again and again, and no interleaving of chain and journal.
        self.audit_failed = False
        self.journal = Journal(audit.path)
        self._journal_failed = False
        self._audit_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_PendingRow] = []
        # This run's own latest audit row: the chain head a backup is sealed with.
        self.last_event: AppendedEvent | None = None
        self._last_event_lock = threading.Lock()
        # Filled by actions as the run goes; see the procedure modules.
        self.data: dict[str, Any] = {}
        self.artifact: Path | None = None
        self.machine = build_run_machine(self, operation, finalize=self.record_run_event)
        # One machine for every job of the run, each tracker a model of it: its tables are
        # built once, not once per job of a hundred-instance deployment. Triggers of
        # different models share only the tables, which transitions reads, never writes.
        self.job_machine = build_job_machine(None, finalize=self.record_job_event)

    @property
    def instance(self) -> Instance:
        """The run's first instance: the director, in director mode."""
        return self.fleet.instances[0]

    @property
    def instances(self) -> list[Instance]:
        return self.fleet.instances

    # --- conditions named in machine.py ---------------------------------------------------

    def backup_succeeded(self, _event: EventData | None = None) -> bool:
        return bool(self.data.get("backup_succeeded"))

    def has_errors(self, _event: EventData | None = None) -> bool:
        return bool(self.errors)

    def was_interrupted(self, _event: EventData | None = None) -> bool:
        return self.interrupted_by is not None

    # --- driving ---------------------------------------------------------------------------

    def drive(self, actions: Mapping[str, Action], **start_detail: Any) -> Outcome:
        """Run the machine from `ready` to a terminal state."""
        with self._signals(), _setting(self._run_over):
            self.fire(
                "start",
                detail={"pid": os.getpid(), "timeouts": asdict(self.timeouts), **start_detail},
            )
            while self.state in actions:
                with self._kill_lock:
                    self._killable = self.state not in PROTECTED_STATES
                current = self.state
                detail: dict[str, Any] = {}
                try:
                    step = actions[current](self)
                    trigger, detail = step if isinstance(step, tuple) else (step, {})
                except BbrxError as error:
                    trigger, detail = self._failure_trigger(current), error.detail()
                    self.fail(error)
                except Exception as exc:  # a bug must not skip the unlock path
                    log.debug("internal error in %s", current, exc_info=True)
                    internal = BbrxError(f"internal error while {current}: {exc!r}")
                    trigger, detail = self._failure_trigger(current), internal.detail()
                    self.fail(internal)
                with self._kill_lock:  # no kill decided for this state lands in the next
                    self._leave(current, trigger, detail)
            with self._kill_lock:
                self._killable = False  # the run is over: nothing of it is left to kill
        if self.interrupted_by:
            self.errors.insert(
                0,
                InterruptedRunError(
                    f"{self.operation} was interrupted by {self.interrupted_by}; "
                    + self._unlock_summary()
                ),
            )
        if self.locked_jobs():
            self.errors.append(
                LocksLeftError(
                    f"jobs that may still be locked on {self.target}: "
                    + ", ".join(self.locked_jobs()),
                    hint=self._recovery_hint(),
                )
            )
        return Outcome(
            run_id=self.run_id,
            operation=self.operation,
            state=self.state,
            errors=list(self.errors),
            artifact=self.artifact,
            audit_db=Path(self.audit.path),
        )

    def _leave(self, current: str, trigger: str, detail: dict[str, Any]) -> None:
        """Take the transition out of `current` that the action's trigger, an abandon or an
        interruption calls for."""
        if self.abandoned and self._can("abandon"):
            confirmed = {**detail, "confirmed_by": self.identity.operator}
            self.fire("abandon", outcome="error", detail=confirmed)
            return
        interrupting = self.interrupted_by and not self._interrupt_fired and self._can("interrupt")
        if interrupting and not self._leads_where(trigger, "interrupt"):
            self._interrupt_fired = self._interrupt_noted = True
            self.fire("interrupt", outcome="error", detail={"signal": self.interrupted_by})
            return
        if self.interrupted_by and not self._interrupt_noted:
            # Signalled in a state that runs to its end, or in one whose work was done and
            # leads where the interruption would (a drain that published its backup): the
            # action's own row stands, with its detail, and says so.
            self._interrupt_noted = True
            detail = {**detail, "interrupted_by": self.interrupted_by}
        self._advance(current, trigger, detail)

    def _leads_where(self, trigger: str, other: str) -> bool:
        """Whether `trigger` from here goes, whatever its conditions, where `other` goes."""
        dests = {
            t.dest
            for name in (trigger, other)
            for t in self.machine.get_transitions(trigger=name, source=self.state)
        }
        return len(dests) == 1 and self._outcome_of(trigger) != "error"

    def _advance(self, current: str, trigger: str, detail: dict[str, Any]) -> None:
        """Fire the trigger an action returned. If the tables refuse it (a bug: the refusal
        is on the record), take the state's failure path instead, so that even then the run
        goes on through unlocking rather than leaving the loop with jobs locked."""
        try:
            self.fire(trigger, outcome=self._outcome_of(trigger), detail=detail)
            if self.state != current:
                return
            error = BbrxError(f"internal error: {trigger} left the run in {current}")
        except BbrxError as refused:
            if self.state != current:
                raise
            error = refused
        self.fail(error)
        failure = self._failure_trigger(current)
        if failure == trigger:
            raise error
        self.fire(failure, outcome="error", detail=error.detail())

    def fire(self, trigger: str, *, outcome: str = "ok", **kwargs: Any) -> None:
        try:
            self.trigger(trigger, outcome=outcome, **kwargs)
        except MachineError as exc:
            # Already recorded as refused by finalize_event; a refused trigger is a bug.
            raise BbrxError(f"internal error: {exc}") from exc
        except AttributeError as exc:  # no such trigger at all: a bug too
            raise BbrxError(f"internal error: {exc}") from exc

    def _can(self, trigger: str) -> bool:
        return trigger in self.machine.get_triggers(self.state)

    def _failure_trigger(self, state: str) -> str:
        return failure_trigger(self.operation, state)

    @staticmethod
    def _outcome_of(trigger: str) -> str:
        return "error" if trigger.endswith("_failed") else "ok"

    def fail(self, error: BbrxError) -> None:
        if self.interrupted_by and (
            isinstance(error, InterruptedRunError)
            or INTERRUPTED_KILL in (getattr(error, "killed_by", None) or "")
        ):
            # What the interruption itself stopped is in the audit log; the run reports
            # the interruption once, not as a lock or backup failure of its own.
            log.info("stopped by the interruption: %s", error.message)
            return
        self.errors.append(error)
        log.error("%s", error.message)

    # --- jobs ------------------------------------------------------------------------------

    def track(self, jobs: Iterable[Job], instance: Instance | None = None) -> list[JobTracker]:
        trackers = [JobTracker(job, self, instance) for job in jobs]
        for tracker in trackers:
            self.jobs[tracker.label] = tracker
        return trackers

    def run_job_script(
        self,
        tracker: JobTracker,
        phase: str,
        script: str,
        error_class: type[ScriptError],
        env: Mapping[str, str] | None = None,
    ) -> ScriptError | None:
        """Run one job script as a job-machine phase: intent row, script, outcome row.

        A lock, backup or restore script does not start once the run is interrupted (it
        returns None without a row); the instance asks `may_start` again at the last moment,
        so a signal that lands while it starts either stops it or is seen by the kill.
        """
        may_start = self._may_start_unlock if phase == "unlock" else self._may_start_work
        if not may_start():
            log.info("Not starting %s of %s: the run is being stopped", script, tracker.label)
            return None
        tracker.trigger(phase, script=script)
        refused = self.refuse_unrecorded(tracker, phase, script)
        if refused is not None:
            return refused
        try:
            marker = secrets.token_hex(16)
            call = ScriptCall(
                tracker.name,
                script,
                dict(env or {}),
                timeout=self.timeouts.for_phase(phase),
                on_start=lambda pid: self._script_started(tracker, script, pid, marker),
                marker=marker,
                may_start=may_start,
                # What a lock, backup or restore script leaves running would run on with
                # the director locked, and past the unlock: it is ended. An unlock script
                # may rightly start a service in the background: that is left alone.
                end_leftovers=phase != "unlock",
            )
            result = tracker.instance.run_script(call)
        except Exception as exc:
            # The script could not even start (or the transport broke in a way it did not
            # foresee: a fork that failed, say): a failure of this phase for this job all the
            # same, so that one job's trouble never skips the other jobs' unlocks.
            if not isinstance(exc, TransportError):
                log.debug("running %s of job %s failed", script, tracker.name, exc_info=True)
            message = exc.message if isinstance(exc, TransportError) else f"internal error: {exc!r}"
            error = error_class(
                job=tracker.name,
                script=script,
                host=tracker.where,
                exit_code=None,
                stderr_tail=message,
            )
            tracker.trigger(f"{phase}_error", outcome="error", script=script, error=error)
            return error
        self._log_script_output(result)
        if result.ok:
            tracker.trigger(f"{phase}_ok", outcome="ok", script=script, result=result)
            return None
        error = error_class(
            job=tracker.name,
            script=script,
            host=tracker.where,
            exit_code=result.exit_code,
            stderr_tail=result.stderr_tail(),
            killed_by=result.killed_by,
        )
        tracker.trigger(
            f"{phase}_error", outcome="error", script=script, result=result, error=error
        )
        return error

    def can_start_script(self, phase: str) -> bool:
        """Whether a script of `phase` may start: a lock, backup or restore script only
        while the audit log takes this run's rows (its intent row is then in the chain)."""
        return phase not in RECORDED_PHASES or not self.audit_failed

    def refuse_unrecorded(
        self, tracker: JobTracker, phase: str, script: str
    ) -> ScriptNotStartedError | None:
        """Called right after a job's intent row: fail the phase, unstarted, if that row
        did not reach the audit log (a lock off the record is one no cleanup knows of)."""
        if self.can_start_script(phase):
            return None
        error = ScriptNotStartedError(
            job=tracker.name,
            script=script,
            host=tracker.where,
            why=f"the audit log {self.audit.path} cannot be written, and bbrx starts no "
            "lock, backup or restore script off the record",
        )
        tracker.trigger(f"{phase}_error", outcome="error", script=script, error=error)
        return error

    def _may_start_work(self) -> bool:
        return self.interrupted_by is None

    def _may_start_unlock(self) -> bool:
        return not self.abandoned

    def _script_started(self, tracker: JobTracker, script: str, pid: int, marker: str) -> None:
        try:
            detail = {"pid": pid, "marker": marker}
            tracker.trigger("script_started", script=script, detail=detail)
        except Exception:  # a missing pid row must not stop the script's phase
            log.warning("could not record the pid of %s/%s", tracker.name, script, exc_info=True)

    def _log_script_output(self, result: ScriptResult) -> None:
        for line in result.stdout.splitlines():
            log.debug("%s/%s: %s", result.job, result.script, line)
        for line in result.stderr.splitlines():
            log.debug("%s/%s (stderr): %s", result.job, result.script, line)

    def parallel(
        self, items: list[Any], work: Callable[[Any], Any], limit: int | None = None
    ) -> list[Any]:
        """Run `work` over `items` in threads, at most `limit` (default: the run's bound)
        at once; results in input order."""
        bound = min(limit or self.max_parallel, self.max_parallel)
        if len(items) <= 1 or bound == 1:
            return [work(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(bound, len(items))) as pool:
            return list(pool.map(work, items))

    def terminate_scripts(self) -> None:
        """Kill what every instance of the run is running now (each may take seconds), and
        stop waiting on the director (a deployment's access being set up)."""
        self.fleet.interrupt()
        self.parallel(list(self.instances), lambda instance: instance.terminate_scripts())

    def locked_jobs(self) -> list[str]:
        return sorted(name for name, tracker in self.jobs.items() if tracker.may_be_locked)

    def _recovery_hint(self) -> str | None:
        if not self.locked_jobs():
            return None
        cleanup = self.fleet.command(cleanup_for(self.operation))
        return (
            f"Fix what stopped the unlock, then run `{cleanup}`: it runs every job's unlock "
            "script again."
        )

    def _unlock_summary(self) -> str:
        if self.abandoned:
            return "the operator stopped the unlock"
        if self.locked_jobs():
            return "not every job could be unlocked"
        return "every job that was locked has been unlocked"

    # --- interruption --------------------------------------------------------------------

    def check_interrupt(self) -> None:
        """Raise if the run was interrupted (called between chunks of long work)."""
        if self.interrupted_by and self._killable:
            raise InterruptedRunError(f"interrupted by {self.interrupted_by}")

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """The SIGINT/SIGTERM handler: record the signal and wake the watcher, nothing else.

        A handler runs between two bytecodes of the main thread, which may be holding
        logging's, threading's or the instance's locks: taking any of them here (to log,
        start a thread, kill) could deadlock. An attribute store and os.write cannot.
        """
        if self.interrupted_by is None:
            self.interrupted_by = signal.Signals(signum).name
        self._signals_seen += 1
        wake = self._wake  # read once: a relayed run may be tearing it down meanwhile
        if wake is not None:
            with contextlib.suppress(OSError):  # a full pipe: the watcher is awake anyway
                os.write(wake[1], bytes([signum]))

    def _watch_signals(self, read_end: int) -> None:
        """The signal watcher's thread: does what a signal asks, outside the handler."""
        seen = 0
        while data := os.read(read_end, 64):
            for signum in data:
                if signum == 0:
                    return  # the run is over
                seen += 1
                try:
                    self._handle_signal(signal.Signals(signum).name, first=seen == 1)
                except Exception:  # the watcher must outlive a failed kill
                    log.warning("handling %s failed", signal.Signals(signum).name, exc_info=True)

    def _handle_signal(self, name: str, *, first: bool) -> None:
        if first:
            log.warning(
                "%s received: stopping; every job that was locked will be unlocked first", name
            )
            with self._kill_lock:
                if self._killable:
                    self.terminate_scripts()
            return
        log.warning(
            "%s received again: bbrx is unlocking and cleaning up and will exit when done; "
            "%s. (Killing bbrx now would leave them locked: run %s then.)",
            name,
            self._unlock_summary(),
            cleanup_for(self.operation),
        )
        if self.state != "unlocking" or not self.locked_jobs() or self._asking or self.abandoned:
            return  # before unlocking starts there is nothing to stop: it will unlock
        if self.confirm_abandon is None:
            log.warning("No terminal to confirm on: bbrx goes on unlocking.")
            return
        # Not in the watcher: the unlock goes on, and further signals are handled, while the
        # operator makes up their mind.
        self._asking = True
        threading.Thread(target=self._ask_abandon, daemon=True).start()

    def _ask_abandon(self) -> None:
        assert self.confirm_abandon is not None
        try:
            answer = self.confirm_abandon(self.locked_jobs(), self._run_over)
        except Exception:  # the terminal went away: no is the answer
            log.debug("asking whether to stop unlocking failed", exc_info=True)
            answer = False
        finally:
            self._asking = False
        if self._run_over.is_set():
            return
        if not answer:
            log.warning("Going on unlocking.")
        else:
            self.stop_unlocking()

    def stop_unlocking(self) -> None:
        """Stop unlocking now: the operator confirmed leaving the remaining jobs locked."""
        # Under the lock the driver holds while it changes state: the check and the kill
        # are one step, so a "y" typed as the last unlock ends cannot cut the drain after it.
        with self._kill_lock:
            if self.state != "unlocking" or not self.locked_jobs():
                log.warning("Unlocking has finished meanwhile; nothing was left locked by choice.")
                return
            log.warning("Stopping the unlock at the operator's request; %s", self._unlock_summary())
            # Set before the kill: an unlock script starting now asks `may_start`, stays put.
            self.abandoned = True
            self.terminate_scripts()

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """The handler, the pipe it wakes the watcher through, and the watcher thread."""
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        watcher = threading.Thread(
            target=self._watch_signals, args=(read_end,), name="bbrx-signals", daemon=True
        )
        watcher.start()
        self._wake = (read_end, write_end)
        relay = self.signal_relay
        try:
            if relay is not None:
                relay.add(self._on_signal)
            with _SignalGuard(self._on_signal):
                yield
        finally:
            if relay is not None:
                relay.discard(self._on_signal)
                relay.settle()
            # The guard has put the old handlers back: what is in the pipe is all there is.
            os.set_blocking(write_end, True)
            os.write(write_end, b"\0")
            watcher.join()
            self._wake = None
            os.close(read_end)
            os.close(write_end)

    # --- audit -----------------------------------------------------------------------------

    def record_run_event(self, event: EventData) -> None:
        self._recorded(event, job=None, state=self.state)

    def record_job_event(self, event: EventData) -> None:
        tracker = event.model
        assert isinstance(tracker, JobTracker)
        tracker.note_state()
        self._recorded(event, job=tracker.name, state=tracker.state, instance=tracker.instance)

    def _recorded(
        self, event: EventData, job: str | None, state: str, instance: Instance | None = None
    ) -> None:
        # transitions swallows what a finalize hook raises: a row that failed to be built
        # would vanish unseen, and a lock script could then start without its intent row.
        try:
            self._record(event, job, state, instance)
        except Exception as exc:
            log.error("internal error while recording %s", event.event.name, exc_info=True)
            if not self.audit_failed:
                self.audit_failed = True
                self._audit_broke(exc)

    def _record(
        self, event: EventData, job: str | None, state: str, instance: Instance | None = None
    ) -> None:
        kwargs = event.kwargs
        result: ScriptResult | None = kwargs.get("result")
        error: BbrxError | None = kwargs.get("error")
        detail: dict[str, Any] = dict(kwargs.get("detail") or {})
        outcome = kwargs.get("outcome", "ok")
        if event.error is not None:
            outcome = "refused" if isinstance(event.error, MachineError) else "error"
            detail["machine_error"] = str(event.error)
        elif event.result is False:
            outcome = "refused"
        if result is not None and result.stderr_tail():
            detail["stderr_tail"] = result.stderr_tail()
            if result.killed_by:
                detail["killed_by"] = result.killed_by
        if error is not None:
            detail.update(error.detail())
        if job is None and state in TERMINAL:
            if self.errors and state != "succeeded":
                detail["errors"] = [e.message for e in self.errors]
            # The run's own verdict on its locks, which `bbrx status` reads back.
            detail["jobs_left_locked"] = self.locked_jobs()
        fields: dict[str, Any] = {
            "run_id": self.run_id,
            "operation": self.operation,
            "target": self.target,
            "mode": self.fleet.mode,
            "operator": self.identity.operator,
            "origin_host": self.identity.origin_host,
            "reason": self.identity.reason,
            # After a transition event.state is the destination; the source is on it.
            "from_state": event.transition.source if event.transition else event.state.name,
            "to_state": state,
            "trigger": event.event.name,
            "job": job,
            "script": kwargs.get("script"),
            "outcome": outcome,
            "exit_code": result.exit_code if result else None,
            "duration": round(result.duration, 6) if result else None,
            "detail": detail or None,
            "tool_version": self.tool_version,
            "instance_group": instance.group if instance is not None else None,
            "instance_index": instance.index if instance is not None else None,
            "instance_id": instance.instance_id if instance is not None else None,
        }
        # Group commit: rows that arrive while another is being committed (parallel
        # scripts of a level, say) wait in order and are committed together, one fsync for
        # the lot, by whichever thread holds the audit lock next. Each call still returns
        # only once its own row is in the chain (or the journal). One committer at a time,
        # in queue order, so a row cannot land in the chain after an earlier one went to
        # the journal.
        pending = _PendingRow(fields)
        with self._queue_lock:
            self._queue.append(pending)
        with self._audit_lock:
            if pending.done:
                return
            with self._queue_lock:
                batch, self._queue = self._queue, []
            self._commit(batch)

    def _commit(self, batch: list[_PendingRow]) -> None:
        """Append `batch` to the log in one transaction, or what cannot be to the journal.

        Every row of the batch ends done, whatever fails: its thread waits on it, and a row
        left undone would let that thread return with its row nowhere."""
        kept = 0
        try:
            if not self.audit_failed:
                kept = self._append_batch(batch)
        except Exception as exc:  # a bug: the rest goes to the journal, and says so
            log.error("internal error while writing the audit log", exc_info=True)
            self.audit_failed = True
            self._audit_broke(exc)
        finally:
            for row in batch[:kept]:
                row.done = True
            for row in batch[kept:]:
                try:
                    self._journal(row.fields)
                except Exception:  # never: Journal.write does not raise; belt and braces
                    log.error("audit event NOT RECORDED: %r", row.fields, exc_info=True)
                row.done = True

    def _append_batch(self, batch: list[_PendingRow]) -> int:
        """Append the longest valid prefix of `batch` in one transaction; how many landed.
        Anything short of the whole batch marks the log failed for the rest of the run."""
        failure: Exception | None = None
        valid: list[dict[str, Any]] = []
        for row in batch:
            try:
                valid.append(self.audit.validated(**row.fields))
            except Exception as exc:  # a bug in a row: it and what follows go aside
                failure = exc
                break
        kept = 0
        try:
            appended = self.audit.append_validated(valid)
        except Exception as exc:
            failure = exc
        else:
            kept = len(appended)
            if appended:
                with self._last_event_lock:
                    if self.last_event is None or appended[-1].seq > self.last_event.seq:
                        self.last_event = appended[-1]
        if failure is not None:
            # Losing the log must not stop the unlock path; it fails the run, and no lock,
            # backup or restore script starts from here on.
            self.audit_failed = True
            self._audit_broke(failure)
        return kept

    def _journal(self, fields: dict[str, Any]) -> None:
        if not self.journal.write(fields) and not self._journal_failed:
            self._journal_failed = True
            self.fail(
                AuditUnwritableError(
                    f"the audit journal {self.journal.path} cannot be written either: "
                    "the events of this run that are in neither are in bbrx's log "
                    "output (lines 'audit event NOT RECORDED')",
                    hint="Keep that output with the audit log: it is the only record "
                    "of how this run ended.",
                )
            )

    def _audit_broke(self, exc: Exception) -> None:
        cause = exc.message if isinstance(exc, AuditError) else f"{exc!r}"
        fix = exc.hint if isinstance(exc, AuditError) and exc.hint else None
        self.fail(
            AuditUnwritableError(
                f"could not write the audit log: {cause}. From then on bbrx started no "
                "lock, backup or restore script, and it still unlocked every job; the "
                f"events it could not log are in the journal {self.journal.path}",
                hint=(f"{fix} " if fix else "")
                + f"Then check the target with `{self.fleet.status_command()}` and the "
                "log with `bbrx audit verify` (both read the journal); keep the journal "
                "beside the log: it is the record of how this run ended.",
            )
        )


@dataclass
class _PendingRow:
    """A row waiting for the run's next audit commit."""

    fields: dict[str, Any]
    done: bool = False


@contextlib.contextmanager
def _setting(event: threading.Event) -> Iterator[None]:
    """Sets `event` on the way out, however the block ends."""
    try:
        yield
    finally:
        event.set()


class SignalRelay:
    """Passes SIGINT, SIGTERM and SIGHUP to every run being driven, from the main thread's
    handler.

    Only the main thread receives signals, so runs driven in worker threads (a batch over
    many deployments) cannot install handlers of their own. The handler this installs does
    what a run's does and no more: for each registered run, its own handler (a flag and a
    pipe write). A run registering after a signal is told of it at once. Handlers are kept
    in a dict whose snapshot (`tuple(...)`, one C call) the handler takes without a lock.
    """

    def __init__(self) -> None:
        # Keyed by the handler itself: bound methods compare equal, their ids need not.
        self._handlers: dict[object, Callable[[int, FrameType | None], None]] = {}
        self.signalled: int | None = None
        self.handling = 0  # > 0 while the handler runs (in the main thread)

    def add(self, handler: Callable[[int, FrameType | None], None]) -> None:
        self._handlers[handler] = handler
        if self.signalled is not None:
            handler(self.signalled, None)

    def discard(self, handler: Callable[[int, FrameType | None], None]) -> None:
        self._handlers.pop(handler, None)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.handling += 1
        try:
            if self.signalled is None:
                self.signalled = signum
            for handler in tuple(self._handlers.values()):
                try:
                    handler(signum, frame)
                except Exception:  # one run's trouble must not keep the signal from the rest
                    continue
        finally:
            self.handling -= 1

    def settle(self) -> None:
        """Wait until the handler is not running: called by a run that has left the relay,
        before it closes the pipe the handler may be about to write to."""
        while self.handling:
            time.sleep(0.001)

    def guard(self) -> _SignalGuard:
        """The handler, installed while the batch runs (main thread only)."""
        return _SignalGuard(self._on_signal)


class _SignalGuard:
    """Routes SIGINT, SIGTERM and SIGHUP to the run while it is driving (main thread only).

    SIGHUP is what the operator's shell gets when their SSH session to the jump box drops:
    by default it would kill bbrx with jobs locked. A SIGHUP already ignored (`nohup`)
    stays ignored."""

    def __init__(self, handler: Callable[[int, FrameType | None], None]) -> None:
        self._handler = handler
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handler)
            if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
                self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._handler)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
