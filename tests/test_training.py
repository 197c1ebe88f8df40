"""Training: scenarios solved end to end with the commands a trainee would type (real
`bbrx` processes on the simulator), a session that breaks the rules, the scenario schema's
errors, and the seeds' determinism. Every verdict is read from the debrief, which reads the
audit log alone."""

from __future__ import annotations

import json
import re
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import yaml

from audit import AuditLog
from orchestrator.errors import UsageError
from orchestrator.training import scenario as scenarios
from simulator.director import SimDirector, sim_root
from tests.browser import NOT_INSTALLED, Browser, chromium_path
from tests.conftest import Bbrx, wait_for

SHIPPED = [s.id for s in scenarios.shipped()]


@pytest.fixture
def trainee(tmp_path: Path) -> Bbrx:
    home = tmp_path / "home"
    home.mkdir()
    (home / "backups").mkdir()
    return Bbrx(home)


def ok(result) -> str:
    assert result.code == 0, result
    return result.stdout


def start(trainee: Bbrx, scenario: str, seed: int = 1) -> str:
    out = ok(trainee("train", "start", scenario, "--seed", str(seed)))
    [session] = re.findall(r"^Training session (\S+):", out, re.M)
    return session


def director(trainee: Bbrx, target: str, *args: str):
    return trainee("director", "--host", target, *args)


def published(trainee: Bbrx, name: str) -> list[Path]:
    return sorted(p for p in (trainee.home / "backups").iterdir() if p.name.startswith(name))


def debrief(trainee: Bbrx, *args: str) -> dict:
    return json.loads(ok(trainee("train", "debrief", *args, "--json")))


def test_list_names_every_shipped_scenario(trainee: Bbrx) -> None:
    out = ok(trainee("train", "list"))
    for scenario_id in SHIPPED:
        assert scenario_id in out
    assert len(SHIPPED) >= 5


def test_the_director_disaster_recovery_solved_by_the_runbook(trainee: Bbrx, tmp_path) -> None:
    """The seed runbook, whole: backup-cleanup, pre-backup-check, backup, backup-cleanup;
    the scenario loses the director; restore, restore-cleanup, vms. A clean debrief."""
    session = start(trainee, "director-disaster-recovery")
    dr = "sim://dr-drill"
    ok(director(trainee, dr, "backup-cleanup"))
    ok(director(trainee, dr, "pre-backup-check"))
    backup = director(trainee, dr, "backup", "--artifact-path", str(trainee.home / "backups"))
    assert backup.code == 0, backup
    assert "Training scenario: The director sim://dr-drill has failed" in backup.stderr
    ok(director(trainee, dr, "backup-cleanup"))
    assert "No deployments" in ok(trainee("sim", "vms", "dr-drill"))  # the director is lost
    [artifact] = published(trainee, "dr-drill_")
    ok(director(trainee, dr, "restore", "--artifact-path", str(artifact)))
    ok(director(trainee, dr, "restore-cleanup"))
    assert "No deployments" not in ok(trainee("sim", "vms", "dr-drill"))
    assert "reached" in ok(trainee("train", "status"))

    report = debrief(trainee)
    assert report["session"] == session
    assert (report["goal_reached"], report["order"], report["safety"]) == (True, [], [])
    assert report["score"] == 100 and report["hints"] == 0
    assert report["time_to_recover"] is not None and report["time_to_recover"] > 0
    steps = [(a["step"], a["outcome"], a["by"]) for a in report["timeline"]]
    assert steps == [
        ("start", "ok", "trainee"),
        ("backup-cleanup", "succeeded", "trainee"),
        ("pre-backup-check", "succeeded", "trainee"),
        ("backup", "succeeded", "trainee"),
        ("wipe", "ok", "scenario"),
        ("backup-cleanup", "succeeded", "trainee"),
        ("vms", "ok", "trainee"),
        ("restore", "succeeded", "trainee"),
        ("restore-cleanup", "succeeded", "trainee"),
        ("vms", "ok", "trainee"),
    ]
    # Every row of the session is a sim row, tied to it; the terminal and HTML agree.
    with AuditLog(trainee.audit_db, readonly=True) as audit:
        rows = list(audit.rows())
    assert {r["mode"] for r in rows} == {"sim"}
    page = tmp_path / "debrief.html"
    text = ok(trainee("train", "debrief", session, "--html", str(page)))
    assert "Score: 100/100" in text and "Out of order: nothing" in text
    assert "<span id='score'>100</span>" in page.read_text()
    ok(trainee("train", "reset"))
    assert not (trainee.home / "sim/dr-drill").exists()


def test_a_session_that_breaks_the_runbook_is_debriefed_with_what_was_out_of_order(
    trainee: Bbrx,
) -> None:
    """No pre-backup-check before the backup, no cleanup after it, no restore-cleanup, and a
    hint: each is named in the debrief, and the score says what each cost."""
    start(trainee, "director-disaster-recovery")
    dr = "sim://dr-drill"
    ok(director(trainee, dr, "backup", "--artifact-path", str(trainee.home / "backups")))
    assert "costs 5 points" in ok(trainee("train", "hint"))
    [artifact] = published(trainee, "dr-drill_")
    ok(director(trainee, dr, "restore", "--artifact-path", str(artifact)))
    report = debrief(trainee)
    assert report["goal_reached"] is False
    assert any(
        "backup (run" in o and "without a successful pre-backup-check" in o for o in report["order"]
    )
    assert any("restore (run" in o and "without a restore-cleanup" in o for o in report["order"])
    assert any("procedure step 1 (backup-cleanup) was not done" in o for o in report["order"])
    assert report["hints"] == 1 and report["hint_cost"] == 5
    penalties = len(report["order"]) * 10 + 5 + 40
    assert report["score"] == max(0, 100 - penalties)
    text = ok(trainee("train", "debrief"))
    assert "without a restore-cleanup after it" in text and "NOT reached" in text


@pytest.mark.parametrize(
    ("scenario", "name", "error"),
    [
        ("corrupted-in-transit", "dr-transit", "is corrupted: the VM sent"),
        ("jump-box-disk-full", "dr-full", "No space left on device"),
    ],
)
def test_a_backup_that_fails_on_its_way_publishes_nothing_and_is_taken_again(
    trainee: Bbrx, scenario: str, name: str, error: str
) -> None:
    """A copy corrupted on the link, or a jump box whose disk is full: the backup fails
    after every job was unlocked, nothing is published, and the next one is good."""
    start(trainee, scenario, seed=3)
    target = f"sim://{name}"
    backups = str(trainee.home / "backups")
    ok(director(trainee, target, "pre-backup-check"))
    failed = director(trainee, target, "backup", "--artifact-path", backups)
    assert failed.code == 1 and error in failed.stderr, failed
    assert published(trainee, name) == []  # neither published nor left .incomplete
    ok(director(trainee, target, "pre-backup-check"))
    ok(director(trainee, target, "backup", "--artifact-path", backups))
    assert len(published(trainee, f"{name}_")) == 1
    report = debrief(trainee)
    assert (report["goal_reached"], report["order"], report["safety"]) == (True, [], [])
    assert [a["outcome"] for a in report["timeline"] if a["step"] == "backup"] == [
        "failed",
        "succeeded",
    ]


def test_a_leftover_work_dir_is_cleaned_up_by_the_runbook(trainee: Bbrx) -> None:
    start(trainee, "leftover-work-dir")
    target = "sim://dr-leftover"
    refused = director(trainee, target, "pre-backup-check")
    assert refused.code == 1 and "bbr-backup already exists" in refused.stderr, refused
    ok(director(trainee, target, "backup-cleanup"))
    ok(director(trainee, target, "pre-backup-check"))
    ok(director(trainee, target, "backup", "--artifact-path", str(trainee.home / "backups")))
    report = debrief(trainee)
    assert (report["goal_reached"], report["order"], report["safety"]) == (True, [], [])


def test_an_unlock_failure_is_cleaned_up_before_the_backup_is_taken_again(trainee: Bbrx) -> None:
    start(trainee, "unlock-failure", seed=5)
    target = "sim://dr-unlock"
    backups = str(trainee.home / "backups")
    ok(director(trainee, target, "pre-backup-check"))
    failed = director(trainee, target, "backup", "--artifact-path", backups)
    assert failed.code != 0 and "could not release the lock" in failed.stderr, failed
    ok(director(trainee, target, "backup-cleanup"))
    ok(director(trainee, target, "pre-backup-check"))
    ok(director(trainee, target, "backup", "--artifact-path", backups))
    report = debrief(trainee)
    assert (report["goal_reached"], report["order"], report["safety"]) == (True, [], [])


@pytest.mark.parametrize(("seed", "phase"), [(3, "backing_up"), (4, "locking")])
def test_a_bbrx_killed_at_a_phase_is_recovered_by_a_cleanup(
    trainee: Bbrx, seed: int, phase: str
) -> None:
    """The seed draws the phase the trainee's own bbrx is killed at. A trainee who looks
    (status), cleans up, deletes the incomplete backup and backs up again is safe; one who
    deletes it before looking and walks away is called unsafe twice."""
    start(trainee, "jump-box-crash", seed=seed)
    target = "sim://dr-crash"
    backups = trainee.home / "backups"
    ok(director(trainee, target, "pre-backup-check"))
    killed = director(trainee, target, "backup", "--artifact-path", str(backups))
    assert killed.code == -9, killed
    [partial] = backups.glob("dr-crash_*.incomplete")  # what the killed run was writing
    if seed == 4:  # the trainee who deletes it unseen, then walks away
        shutil.rmtree(partial)
    status = ok(trainee("status", "--host", target))
    assert "interrupted: run" in status and f"phase {phase}" in status, status
    if seed == 4:
        report = debrief(trainee)
        assert report["goal_reached"] is False
        unsafe = "\n".join(report["safety"])
        assert "no cleanup unlocked them" in unsafe, report
        assert f"the incomplete backup {partial} was deleted by hand before anyone" in unsafe
        return
    ok(director(trainee, target, "backup-cleanup"))
    shutil.rmtree(partial)  # after a look and a cleanup: safe
    ok(director(trainee, target, "pre-backup-check"))
    ok(director(trainee, target, "backup", "--artifact-path", str(backups)))
    report = debrief(trainee)
    assert (report["goal_reached"], report["order"], report["safety"]) == (True, [], [])
    steps = [(a["step"], a["note"]) for a in report["timeline"]]
    assert ("status", "") in steps and ("deleted", str(partial)) in steps


def test_a_hanging_lock_script_is_bounded_by_the_lock_timeout(trainee: Bbrx) -> None:
    start(trainee, "lock-hangs", seed=2)
    target = "sim://dr-hang"
    backups = str(trainee.home / "backups")
    ok(director(trainee, target, "pre-backup-check"))
    timed_out = trainee(
        "director", "--host", target, "--lock-timeout", "1", "backup", "--artifact-path", backups
    )
    assert timed_out.code != 0 and "timed out" in timed_out.stderr.lower(), timed_out
    ok(director(trainee, target, "pre-backup-check"))
    ok(director(trainee, target, "backup", "--artifact-path", backups))
    report = debrief(trainee)
    assert (report["goal_reached"], report["order"], report["safety"]) == (True, [], [])


def test_a_job_left_locked_is_a_safety_violation(trainee: Bbrx) -> None:
    """The unlock fails and the trainee walks away: the debrief says what is still locked."""
    start(trainee, "unlock-failure", seed=5)
    target = "sim://dr-unlock"
    ok(director(trainee, target, "pre-backup-check"))
    director(trainee, target, "backup", "--artifact-path", str(trainee.home / "backups"))
    report = debrief(trainee)
    assert report["goal_reached"] is False
    [unsafe] = report["safety"]
    assert "locked, and no cleanup unlocked them" in unsafe


def test_hints_run_out_and_a_second_session_waits_for_the_first(trainee: Bbrx) -> None:
    start(trainee, "leftover-work-dir")
    assert "Hint 1 of 2" in ok(trainee("train", "hint"))
    assert "Hint 2 of 2" in ok(trainee("train", "hint"))
    done = trainee("train", "hint")
    assert done.code == 1 and "no more hints" in done.stderr
    again = trainee("train", "start", "lock-hangs")
    assert again.code == 1 and "is still running" in again.stderr
    ok(trainee("train", "reset"))
    none = trainee("train", "status")
    assert none.code == 1 and "no training session is running" in none.stderr


def test_start_leaves_a_director_the_trainee_made_alone(trainee: Bbrx) -> None:
    ok(trainee("sim", "create", "dr-drill"))
    refused = trainee("train", "start", "director-disaster-recovery")
    assert refused.code == 1 and "was not made for training" in refused.stderr
    assert (trainee.home / "sim/dr-drill").exists()


def test_a_live_run_is_not_debriefed(trainee: Bbrx) -> None:
    with AuditLog(trainee.audit_db) as audit:
        audit.append(
            run_id="20261201T000000Z-abcdef", operation="backup", target="10.0.0.6:22",
            mode="live", operator="op", origin_host="jump", reason=None, from_state="ready",
            to_state="discovering", trigger="start", tool_version="bbrx test",
        )  # fmt: skip
    refused = trainee("train", "debrief", "20261201T000000Z-abcdef")
    assert refused.code == 1 and "is a live run" in refused.stderr, refused


@pytest.mark.parametrize("scenario_id", SHIPPED)
def test_the_same_seed_draws_the_same_faults(scenario_id: str) -> None:
    scenario = scenarios.find(scenario_id)
    plans = {seed: scenarios.plan(scenario, seed) for seed in range(100)}
    assert all(scenarios.plan(scenario, seed) == plans[seed] for seed in range(100))
    if any(len(f.jobs) > 1 for f in scenario.faults):
        assert len({p.faults for p in plans.values()}) > 1  # the seed does choose


def test_for_100_seeds_two_sessions_arm_and_log_the_same(tmp_path: Path) -> None:
    """For seeds 0 to 99 (each with one of the scenarios a backup sets off), two starts arm
    the same faults on disk and record the same plan, and one backup in each logs the same
    events (times, ids and paths aside). Driven in-process by two worker processes (the
    CLI adds nothing here); the seeds do not all draw the same world."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tests.training_drive import DRIVES, two_sessions

    halves = [list(range(0, 100, 2)), list(range(1, 100, 2))]
    # In memory where the machine has it: 400 fsyncs of backups and audit rows are this
    # test's cost, not its subject (direct I/O then falls back to the page cache).
    shm = Path("/dev/shm")
    with (
        tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else tmp_path) as work,
        ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool,
    ):
        done = pool.map(two_sessions, [f"{work}/w{n}" for n in (0, 1)], halves)
        results = {seed: pair for half in done for seed, pair in half.items()}
    assert sorted(results) == list(range(100))
    for seed, (first, second) in results.items():
        assert first == second, seed
        assert first["runs"][-1][""][0][0] == "backup", seed  # the trainee's run is there
    for scenario, _ in DRIVES:
        worlds = {
            json.dumps(r[0]["armed"]) for r in results.values() if r[0]["scenario"] == scenario
        }
        if scenario != "leftover-work-dir":  # its world has no choice to draw
            assert len(worlds) > 1, scenario


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id: x\n: [", "is not valid YAML"),
        ("- a list\n", "(top level): must be a mapping"),
        ("id: x\ntitle: t\n", "brief: is required"),
    ],
)
def test_a_malformed_scenario_is_refused_naming_the_file_and_key(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)) as caught:
        scenarios.parse(text, "my.yml")
    assert "scenario my.yml" in caught.value.message


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (("id", "Bad Name"), "id: must be a name"),
        (("time_budget", "5"), "time_budget"),
        (("surprise", "1"), "unknown key(s) surprise"),
        (("procedure", "[backup, dance]"), "procedure[1]"),
        (("faults", "[{job: uaa, script: backup, spec: explode}]"), "faults[0].spec"),
        (("faults", "[{job: uaa, script: nap, spec: hang}]"), "faults[0].script"),
        (("faults", "[{job: uaa, script: backup, spec: hang, call: 0}]"), "faults[0].call"),
        (("faults", "[{job: uaa, phase: backup/dancing, spec: hang}]"), "faults[0].phase"),
        (
            ("faults", "[{job: uaa, phase: backup/locking, script: backup, spec: hang}]"),
            "faults[0]",
        ),
        (
            ("faults", "[{job: uaa, phase: [backup/locking, backup/draining], spec: hang}]"),
            "faults[0].spec",
        ),  # a hang is no copy's fault
        (("faults", "[{job: uaa, script: backup, spec: hang, after: [5, x]}]"), "faults[0].after"),
        (("faults", "[{job: uaa, script: backup, spec: after 5 hang}]"), "faults[0].spec"),
        (("faults", "[{job: uaa, phase: restore/copying, spec: disk-full}]"), "faults[0].spec"),
        (("hints", "[{cost: 3}]"), "hints[0].text"),
        (("events", "[{after: backup, action: explode, message: m}]"), "events[0].action"),
    ],
)
def test_each_scenario_key_is_checked(change: tuple[str, str], key: str, tmp_path) -> None:
    good = (Path(scenarios.__file__).parent / "scenarios/leftover-work-dir.yml").read_text()
    name, value = change
    document = yaml.safe_load(good)
    document[name] = yaml.safe_load(value)
    path = tmp_path / "custom.yml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(UsageError, match=re.escape(key)) as caught:
        scenarios.load(path)
    assert str(path) in caught.value.message


def test_the_readme_documents_the_schema_the_commands_and_the_scenarios() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Training\n", 1)[1].split("\n## ", 1)[0]
    world = ("director", "leftover_work_dir", "lost", "backups", "of", "name", "corrupt")
    world += ("killed_backup", "deployment", "job", "instance")
    for key in (*scenarios.KEYS, *world, "job", "script", "phase", "spec", "call", "after"):
        assert f"`{key}`" in section, key
    for step in scenarios.STEPS:
        assert f"`{step}`" in section, step
    for phase in scenarios.PHASES:
        assert f"`{phase}`" in section, phase
    for scenario_id in SHIPPED:
        assert f"`{scenario_id}`" in section, scenario_id
    from orchestrator.cli.train import train_app

    for command in train_app.registered_commands:
        if command.name != "help":
            assert f"bbrx train {command.name}" in section, command.name


def test_the_right_backup_is_found_and_restored(trainee: Bbrx) -> None:
    """The newest backup of the director is corrupted (refused before anything is locked),
    a backup of another director hides under its name: the trainee restores the right one."""
    out = ok(trainee("train", "start", "wrong-backup"))
    folder = Path(re.search(r"^The backups you have: (\S+)$", out, re.M).group(1))
    target = "sim://dr-restore"
    refused = director(
        trainee, target, "restore", "--artifact-path", str(folder / "dr-restore_20261201T020000Z")
    )
    assert refused.code == 1 and "Backup is corrupted" in refused.stderr, refused
    tied = ok(trainee("audit", "verify", "--artifact", str(folder / "dr-restore_20261201T030000Z")))
    [run] = re.findall(r"is tied to run (\S+)", tied)
    [line] = [line for line in ok(trainee("audit", "runs")).splitlines() if line.startswith(run)]
    assert "sim://dr-other" in line
    ok(
        director(
            trainee,
            target,
            "restore",
            "--artifact-path",
            str(folder / "dr-restore_20261130T020000Z"),
        )
    )
    ok(director(trainee, target, "restore-cleanup"))
    ok(trainee("sim", "vms", "dr-restore"))
    report = debrief(trainee)
    assert (report["goal_reached"], report["order"], report["safety"]) == (True, [], [])


def test_restoring_another_directors_backup_is_unsafe(trainee: Bbrx) -> None:
    out = ok(trainee("train", "start", "wrong-backup"))
    folder = Path(re.search(r"^The backups you have: (\S+)$", out, re.M).group(1))
    target = "sim://dr-restore"
    wrong = folder / "dr-restore_20261201T030000Z"
    ok(director(trainee, target, "restore", "--artifact-path", str(wrong)))  # bbr allows it
    ok(director(trainee, target, "restore-cleanup"))
    ok(trainee("sim", "vms", "dr-restore"))
    report = debrief(trainee)
    [unsafe] = report["safety"]
    assert f"of {wrong}, a backup of sim://dr-other, onto sim://dr-restore" in unsafe
    assert report["goal_reached"] is False  # an unsafe restore is no recovery
    assert report["score"] == 100 - 25 - 40
    assert "not reached yet" in ok(trainee("train", "status"))


def alive(pid: int) -> bool:
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False


def test_a_killed_deployment_backup_is_recovered_by_the_matching_cleanup(trainee: Bbrx) -> None:
    """The world starts with a real bbrx backup of redis SIGKILLed mid-backup: its locks held
    and a backup script still running on one VM. The trainee reads status, runs the
    deployment's backup-cleanup (which ends that script), checks and backs up."""
    start(trainee, "killed-deployment-backup", seed=4)
    session = json.loads((trainee.home / "train/session.json").read_text())
    [pid] = session["left_running"]
    assert alive(pid)
    deployment = ("deployment", "--target", "sim://dr-killed", "--deployment", "redis")
    status = ok(trainee("status", "--target", "sim://dr-killed", "--deployment", "redis"))
    assert "interrupted" in status and "backup-cleanup" in status
    ok(trainee(*deployment, "backup-cleanup"))
    assert not alive(pid)
    ok(trainee(*deployment, "pre-backup-check"))
    ok(trainee(*deployment, "backup", "--artifact-path", str(trainee.home / "backups")))
    report = debrief(trainee)
    assert (report["goal_reached"], report["order"], report["safety"]) == (True, [], [])


def test_the_wrong_cleanup_after_a_killed_backup_is_out_of_order(trainee: Bbrx) -> None:
    start(trainee, "killed-deployment-backup", seed=4)
    session = json.loads((trainee.home / "train/session.json").read_text())
    deployment = ("deployment", "--target", "sim://dr-killed", "--deployment", "redis")
    trainee(*deployment, "restore-cleanup")
    report = debrief(trainee)
    assert any(
        "restore-cleanup after the interrupted backup" in o and "is backup-cleanup" in o
        for o in report["order"]
    ), report["order"]
    ok(trainee("train", "reset"))  # ends the script the killed run left, too
    assert not any(alive(pid) for pid in session["left_running"])


def test_the_html_debrief_reads_the_same_in_a_browser_and_runs_nothing(
    trainee: Bbrx, tmp_path: Path
) -> None:
    """Headless Chromium opens the page: the score, the violations and the timeline are
    what the JSON says; a trainee's name made of markup stays text; nothing is fetched."""
    if chromium_path() is None:
        pytest.skip(NOT_INSTALLED)
    hostile = "<img src=x onerror=document.title='owned'>"
    ok(trainee("train", "start", "director-disaster-recovery", "--operator", hostile))
    ok(
        director(
            trainee, "sim://dr-drill", "backup", "--artifact-path", str(trainee.home / "backups")
        )
    )
    report = debrief(trainee)
    page = tmp_path / "debrief.html"
    ok(trainee("train", "debrief", "--html", str(page)))
    with Browser() as browser:
        browser.send("Network.enable")
        browser.take_events("Network.requestWillBeSent")
        browser.open(page.as_uri())
        seen = browser.evaluate(
            """({score: document.getElementById('score').innerText,
                 order: [...document.querySelectorAll('#order li')].map(e => e.innerText),
                 rows: document.querySelectorAll('table tr').length - 1,
                 text: document.body.innerText, title: document.title,
                 images: document.images.length})"""
        )
        requested = [e["request"]["url"] for e in browser.take_events("Network.requestWillBeSent")]
    assert seen["score"] == str(report["score"])
    assert seen["order"] == report["order"] and seen["rows"] == len(report["timeline"])
    assert hostile in seen["text"] and seen["images"] == 0 and seen["title"] != "owned"
    assert requested == [page.as_uri()]


def test_a_scenario_fault_on_one_instance_of_a_deployment(tmp_path: Path) -> None:
    """A scenario file (loaded from a path) arms a fault on the one VM of redis the seed
    picks, and only there; its plan names that instance."""
    from orchestrator.training.session import reset, start
    from simulator.deploy import find_vm
    from simulator.director import SimDirector, sim_root

    good = (Path(scenarios.__file__).parent / "scenarios/leftover-work-dir.yml").read_text()
    document = yaml.safe_load(good)
    document["faults"] = [
        {
            "job": "redis-server",
            "script": "backup",
            "spec": "fail 3 disk full",
            "deployment": "redis",
            "instance": ["redis/0", "redis/1", "redis/2"],
        }
    ]
    path = tmp_path / "one-vm.yml"
    path.write_text(yaml.safe_dump(document))
    home = tmp_path / "home"
    picked = set()
    for seed in range(6):
        started = start(home, home / "audit.db", str(path), seed, "trainee@test")
        [fault] = started.faults
        director = SimDirector(sim_root(home, "dr-leftover"))
        armed = {
            i: find_vm(director, "redis", i).faults() for i in ("redis/0", "redis/1", "redis/2")
        }
        assert armed == {
            i: ({("redis-server", "backup"): "fail 3 disk full"} if i == fault["instance"] else {})
            for i in armed
        }
        picked.add(fault["instance"])
        reset(home)
    assert len(picked) > 1
    document["faults"][0].pop("deployment")
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(UsageError, match=r"faults\[0\]: deployment and instance go together"):
        scenarios.load(path)


def test_the_wrong_target_does_not_solve_the_killed_deployment_backup(trainee: Bbrx) -> None:
    """Cleaning up and backing up the director, not the deployment the killed run left:
    out of order, the killed run's locks unsafe, the goal not reached."""
    start(trainee, "killed-deployment-backup", seed=4)
    for step in ("backup-cleanup", "pre-backup-check"):
        ok(director(trainee, "sim://dr-killed", step))
    ok(
        director(
            trainee, "sim://dr-killed", "backup", "--artifact-path", str(trainee.home / "backups")
        )
    )
    report = debrief(trainee)
    assert report["goal_reached"] is False
    assert (
        len([o for o in report["order"] if "this scenario is about sim://dr-killed/redis" in o])
        == 3
    )
    assert any("the killed run's jobs on sim://dr-killed/redis" in s for s in report["safety"])
    ok(trainee("train", "reset"))


def test_a_damaged_session_file_fails_no_run_and_reset_removes_it(trainee: Bbrx) -> None:
    start(trainee, "leftover-work-dir")
    session_file = trainee.home / "train/session.json"
    session_file.write_text('{"id": 5}')
    ok(trainee("sim", "create", "mine"))
    ok(director(trainee, "sim://mine", "pre-backup-check"))  # a warning, not a failure
    status = trainee("train", "status")
    assert (
        status.code == 1 and f"the training session file {session_file} is damaged" in status.stderr
    )
    reset = trainee("train", "reset")
    assert reset.code == 1 and "removed it" in reset.stderr, reset
    assert not session_file.exists()
    none = trainee("train", "status")
    assert "no training session is running" in none.stderr


def test_every_sim_action_on_the_session_director_is_a_session_row(tmp_path: Path) -> None:
    """`bbrx sim` create, destroy, deploy, delete-deployment and a deployment's wipe are
    rows of the session too (a deployment's as its target), in the debrief's timeline."""
    from orchestrator import simulation
    from orchestrator.training.debrief import debrief as read_debrief
    from orchestrator.training.session import start as start_session

    home = tmp_path / "home"
    start_session(home, home / "audit.db", "leftover-work-dir", 1, "trainee@test")
    simulation.wipe(home, "dr-leftover", deployment="redis")
    manifest = tmp_path / "m.yml"
    manifest.write_text(
        "name: tiny\nreleases: [{name: redis, version: latest}]\ninstance_groups:\n"
        "- {name: kv, instances: 1, jobs: [{name: redis-server, release: redis}]}\n"
    )
    simulation.deploy(home, "dr-leftover", "tiny", manifest)
    simulation.delete_deployment(home, "dr-leftover", "tiny")
    simulation.destroy(home, "dr-leftover")
    simulation.create(home, "dr-leftover")
    simulation.create(home, "elsewhere")  # not the session's director: not its row
    with AuditLog(home / "audit.db", readonly=True) as audit:
        rows = [r for r in audit.rows() if r["operation"].startswith("sim-")]
    assert [(r["operation"], r["target"]) for r in rows] == [
        ("sim-create", "sim://dr-leftover"),  # the world's, by the scenario
        ("sim-wipe", "sim://dr-leftover/redis"),
        ("sim-deploy", "sim://dr-leftover/tiny"),
        ("sim-delete-deployment", "sim://dr-leftover/tiny"),
        ("sim-destroy", "sim://dr-leftover"),
        ("sim-create", "sim://dr-leftover"),
    ]
    report = read_debrief(home / "audit.db")
    steps = [(a.step, a.note) for a in report.timeline if a.step != "start"]
    assert steps == [
        ("wipe", "deployment redis"),
        ("deploy", "deployment tiny"),
        ("delete-deployment", "deployment tiny"),
        ("destroy", ""),
        ("create", ""),
    ]


def test_a_director_made_anew_has_no_past_but_one_with_a_run_on_it_is_not_removed(
    trainee: Bbrx,
) -> None:
    """After a killed backup, the session's director destroyed and created again is idle
    (what ran on the old one is over); while a run is live, it cannot be destroyed, and its
    status says so whatever was created since."""
    start(trainee, "jump-box-crash", seed=3)
    target = "sim://dr-crash"
    backups = str(trainee.home / "backups")
    assert director(trainee, target, "backup", "--artifact-path", backups).code == -9
    assert "interrupted: run" in ok(trainee("status", "--host", target))
    ok(trainee("sim", "destroy", "dr-crash"))
    ok(trainee("sim", "create", "dr-crash"))
    assert ok(trainee("status", "--host", target)).startswith(f"{target}: idle")

    vm = SimDirector(sim_root(trainee.home, "dr-crash"))
    vm.set_fault("director", "pre-backup-lock", "hang")
    running = trainee.start("director", "--host", target, "backup", "--artifact-path", backups)
    try:
        wait_for(lambda: any(c.script == "pre-backup-lock" for c in vm.calls()), what="a lock")
        refused = trainee("sim", "destroy", "dr-crash")
        assert refused.code == 1 and "cannot destroy sim://dr-crash: run " in refused.stderr
        assert f"(pid {running.pid}) is running" in refused.stderr, refused
        assert ": in progress" in ok(trainee("status", "--host", target))
    finally:
        running.send_signal(signal.SIGINT)  # bbrx ends its hanging lock and unlocks
        running.communicate(timeout=60)
    assert vm.locked_jobs() == []


def test_a_backup_bbrx_publishes_is_not_taken_for_a_deletion(trainee: Bbrx) -> None:
    """A session row that saw a backup's .incomplete directory while the run wrote it: the
    run publishing it under its final name is no deletion by hand."""
    start(trainee, "jump-box-crash", seed=3)
    target = "sim://dr-crash"
    vm = SimDirector(sim_root(trainee.home, "dr-crash"))
    vm.clear_faults()
    vm.set_fault("blobstore", "backup", "sleep 2")
    backups = trainee.home / "backups"
    ok(director(trainee, target, "pre-backup-check"))
    running = trainee.start("director", "--host", target, "backup", "--artifact-path", str(backups))
    wait_for(lambda: any(backups.glob("*.incomplete")), what="the backup's .incomplete")
    ok(trainee("sim", "vms", "dr-crash"))  # a row that sees it
    running.communicate(timeout=60)
    assert running.returncode == 0
    ok(trainee("train", "hint"))  # the next row: it is gone, published
    report = debrief(trainee)
    assert report["safety"] == [], report
    assert not any(a["step"] == "deleted" for a in report["timeline"])
