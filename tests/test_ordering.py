"""Lock ordering from jobs' metadata: parsing as strictly as bbr, Kahn levels, cycles."""

import pytest

from orchestrator.bbr.ordering import JobMetadata, lock_levels, parse_metadata
from orchestrator.errors import CyclicLockOrderError, MetadataError


def meta(*before: str) -> JobMetadata:
    pairs = tuple((name, "bosh") for name in before)
    return JobMetadata(backup_locked_before=pairs, restore_locked_before=pairs)


def test_parses_bbr_metadata():
    parsed = parse_metadata(
        "uaa",
        """
backup_should_be_locked_before:
- job_name: director
  release: bosh
restore_should_be_locked_before:
- job_name: credhub
  release: credhub
skip_bbr_scripts: false
""",
    )
    assert parsed.backup_locked_before == (("director", "bosh"),)
    assert parsed.restore_locked_before == (("credhub", "credhub"),)
    assert parsed.skip_bbr_scripts is False


def test_empty_metadata_means_no_constraints():
    assert parse_metadata("x", "") == JobMetadata()
    assert parse_metadata("x", "---\n") == JobMetadata()


def test_invalid_yaml_names_the_job():
    with pytest.raises(MetadataError) as caught:
        parse_metadata("blobstore", "backup_should_be_locked_before: [oops\n")
    assert "metadata script for job blobstore printed invalid YAML" in caught.value.message
    assert caught.value.job == "blobstore"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("- a\n- b\n", "printed a list, not a mapping"),
        ("backup_should_be_locked_before: director\n", "must be a list"),
        (
            "backup_should_be_locked_before:\n- job_name: director\n",
            "needs both job_name and release",
        ),
        ("skip_bbr_scripts: maybe\n", "skip_bbr_scripts must be true or false"),
    ],
)
def test_schema_errors_are_named(text, fragment):
    with pytest.raises(MetadataError, match=fragment):
        parse_metadata("uaa", text)


def test_discontinued_keys_are_reported():
    parsed = parse_metadata("director", "backup_name: old\n")
    assert parsed.discontinued_keys == ("backup_name",)


def test_levels_follow_the_graph():
    metadata = {
        "uaa": meta("director"),
        "bbr-credhubdb": meta("director"),
        "director": meta("blobstore"),
        "blobstore": meta(),
    }
    levels = lock_levels(metadata, metadata, "backup")
    assert levels == [["bbr-credhubdb", "uaa"], ["director"], ["blobstore"]]


def test_constraints_on_absent_jobs_are_ignored():
    metadata = {"uaa": meta("credhub"), "director": meta()}
    assert lock_levels(["uaa", "director"], metadata, "backup") == [["director", "uaa"]]


def test_restore_uses_its_own_order():
    metadata = {
        "a": JobMetadata(backup_locked_before=(("b", "r"),), restore_locked_before=()),
        "b": JobMetadata(backup_locked_before=(), restore_locked_before=(("a", "r"),)),
    }
    assert lock_levels(["a", "b"], metadata, "backup") == [["a"], ["b"]]
    assert lock_levels(["a", "b"], metadata, "restore") == [["b"], ["a"]]


def test_cycle_is_refused_and_named():
    metadata = {"a": meta("b"), "b": meta("c"), "c": meta("a"), "d": meta("a")}
    with pytest.raises(CyclicLockOrderError) as caught:
        lock_levels(metadata, metadata, "backup")
    assert caught.value.message.startswith("job locking dependency graph is cyclic: ")
    cycle = caught.value.cycle
    assert cycle[0] == cycle[-1]
    assert set(cycle) == {"a", "b", "c"}


def test_self_cycle_is_refused():
    with pytest.raises(CyclicLockOrderError):
        lock_levels(["a"], {"a": meta("a")}, "backup")


# --- deployment mode: one graph over every instance's jobs, matched by name and release ---


def _cf() -> tuple[dict[str, tuple[str, str | None]], dict[str, JobMetadata]]:
    nodes: dict[str, tuple[str, str | None]] = {
        "cloud_controller_ng on api/0": ("cloud_controller_ng", "capi"),
        "cloud_controller_ng on api/1": ("cloud_controller_ng", "capi"),
        "bbr-cloudcontrollerdb on database/0": ("bbr-cloudcontrollerdb", "cf-backup-and-restore"),
        "bbr-uaadb on database/0": ("bbr-uaadb", "cf-backup-and-restore"),
        "addon on api/0": ("addon", None),
    }
    before = (("bbr-cloudcontrollerdb", "cf-backup-and-restore"), ("addon", "x"))
    metadata = {
        label: JobMetadata(backup_locked_before=before, restore_locked_before=before)
        for label in nodes
        if label.startswith("cloud_controller_ng")
    }
    return nodes, metadata


def test_a_constraint_spans_instance_groups_and_matches_every_instance_of_the_job():
    nodes, metadata = _cf()
    levels = lock_levels(nodes, metadata, "backup", identities=nodes, match_release=True)
    assert levels == [
        [
            "addon on api/0",
            "bbr-uaadb on database/0",
            "cloud_controller_ng on api/0",
            "cloud_controller_ng on api/1",
        ],
        ["bbr-cloudcontrollerdb on database/0"],
    ]


def test_in_deployment_mode_a_constraint_must_name_the_release_too():
    nodes, metadata = _cf()
    # The add-on's release is unknown (not in the manifest): no constraint matches it.
    nodes["bbr-cloudcontrollerdb on database/0"] = ("bbr-cloudcontrollerdb", "other")
    assert lock_levels(nodes, metadata, "backup", identities=nodes, match_release=True) == [
        sorted(nodes)
    ]
    # Director mode drops releases, as bbr does.
    assert len(lock_levels(nodes, metadata, "backup", identities=nodes)) == 2


def test_a_job_locked_before_itself_on_another_instance_is_a_cycle():
    nodes = {"redis-server on redis/0": ("redis-server", "redis")}
    nodes["redis-server on redis/1"] = ("redis-server", "redis")
    before = (("redis-server", "redis"),)
    metadata = {n: JobMetadata(backup_locked_before=before) for n in nodes}
    with pytest.raises(CyclicLockOrderError):
        lock_levels(nodes, metadata, "backup", identities=nodes, match_release=True)
