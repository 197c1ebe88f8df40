"""Crafted backups: each starts from a good backup of the target and changes one thing (the
metadata's checksums are rewritten to match, so only the attack differs). Each must be
refused before anything is locked, naming what is wrong, and leave nothing on the VM."""

from __future__ import annotations

import copy
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from orchestrator.bbr import artifact
from orchestrator.bbr.tarstream import TarHasher
from orchestrator.errors import ArtifactError
from orchestrator.transport.ssh import SshInstance
from simulator.instance import SimInstance

Member = tuple[tarfile.TarInfo, bytes]
FIXTURES = Path("/work/shared/fixtures/bbr")


def craft(backup: Path, job: str, change: Callable[[list[Member]], list[Member]]) -> None:
    """Rewrite one job's tar with tarfile, and its checksums in metadata to match it."""
    path = backup / f"bosh-0-{job}.tar"
    with tarfile.open(path) as source:
        members = [
            (info, source.extractfile(info).read() if info.isreg() else b"")  # type: ignore[union-attr]
            for info in source
        ]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as out:
        for info, data in change(members):
            info.size = len(data) if info.isreg() else 0
            out.addfile(info, io.BytesIO(data) if info.isreg() else None)
    path.write_bytes(buffer.getvalue())
    hasher = TarHasher(strict=False)
    hasher.feed(buffer.getvalue())
    edit_metadata(backup, lambda doc: _set_checksums(doc, job, hasher.finish()))


def _set_checksums(doc: dict, job: str, sums: dict[str, str]) -> None:
    for entry_ in doc["instances"][0]["artifacts"]:
        if entry_["name"] == job:
            entry_["checksums"] = sums


def edit_metadata(backup: Path, change: Callable[[dict], None]) -> None:
    doc = yaml.safe_load((backup / "metadata").read_text())
    change(doc)
    (backup / "metadata").write_text(yaml.safe_dump(doc, sort_keys=False))


def add(*extra: Member) -> Callable[[list[Member]], list[Member]]:
    return lambda members: [*members, *extra]


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **fields) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def assert_refused(target, result, *phrases: str) -> None:
    assert result.code == 1, result
    for phrase in phrases:
        assert phrase in result.stderr, result
    assert target.scripts_run("pre-restore-lock") == []
    assert target.scripts_run("restore") == []
    assert not target.work_dir().exists()


def restore(target, backup: Path):
    return target.director("restore", "--artifact-path", str(backup))


# --- members that no checksum covers ----------------------------------------------------------


def test_a_setuid_root_binary_is_not_planted(target, backup):
    craft(backup, "director", add(entry("./rootshell", data=b"#!/bin/sh\n", mode=0o4755, uid=0)))
    assert_refused(
        target,
        restore(target, backup),
        "Backup is corrupted: bosh-0-director.tar: member ./rootshell is of mode 4755, "
        "with setuid, setgid or sticky bits",
        "Nothing was locked or restored",
    )


def test_a_file_replaced_by_a_symlink_and_dropped_from_metadata_is_refused(target, backup):
    def swap(members: list[Member]) -> list[Member]:
        return [
            entry("./director.sql", tarfile.SYMTYPE, linkname="/etc/shadow")
            if info.name == "./director.sql"
            else (info, data)
            for info, data in members
        ]

    craft(backup, "director", swap)
    assert "./director.sql" not in (backup / "metadata").read_text()
    assert_refused(
        target,
        restore(target, backup),
        "bosh-0-director.tar: member ./director.sql is a symbolic link (to /etc/shadow)",
    )


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (entry("./null", tarfile.CHRTYPE, devmajor=1, devminor=3), "a character device"),
        (entry("./disk", tarfile.BLKTYPE, devmajor=8), "a block device"),
        (entry("./pipe", tarfile.FIFOTYPE), "a FIFO"),
        (entry("/etc/cron.d/evil", data=b"* * * * * root sh\n"), "an absolute path"),
        (entry("./x/../../../../etc/evil", data=b"x"), "a '..' component"),
        (entry("./shadow", tarfile.LNKTYPE, linkname="/etc/shadow"), "a hard link whose target"),
    ],
    ids=["chardev", "blockdev", "fifo", "absolute", "dotdot", "hardlink-out"],
)
def test_special_members_and_escaping_names_are_refused(target, backup, member, reason):
    craft(backup, "blobstore", add(member))
    assert_refused(target, restore(target, backup), "bosh-0-blobstore.tar: member ", reason)


def test_a_tar_the_metadata_does_not_list_is_refused(target, backup):
    shutil.copy(backup / "bosh-0-director.tar", backup / "bosh-0-extra.tar")
    result = restore(target, backup)
    assert_refused(
        target, result, "Backup is corrupted: bosh-0-extra.tar is in", "does not list it"
    )
    assert target.vm.calls() == []  # refused while validating: not even discovery ran


def test_the_vm_keeps_no_owner_or_setid_bit_even_if_sent_one(target, tmp_path):
    """Defence in depth, below bbrx's own checks: the transports' tar itself."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo("./setuid")
        info.mode, info.uid, info.gid, info.size = 0o6755, 4242, 4242, 3
        archive.addfile(info, io.BytesIO(b"hi\n"))
    data = buffer.getvalue()
    instance = _instance(target)
    try:
        instance.make_artifact_directory("director")
        digest = instance.stream_in("director", iter([data[:700], data[700:]]))
    finally:
        instance.close()
    assert digest == hashlib.sha256(data).hexdigest()
    landed = (target.work_dir() / "director/setuid").stat()
    assert landed.st_mode & 0o7777 == 0o755
    assert (landed.st_uid, landed.st_gid) == (0, 0)  # these tests run as root


def _instance(target):
    if target.transport == "sim":
        return SimInstance(target.vm)
    args = dict(zip(target.extra_args[::2], target.extra_args[1::2], strict=True))
    host, port = target.host.rsplit(":", 1)
    return SshInstance(
        host,
        int(port),
        args["--username"],
        Path(args["--private-key-path"]),
        known_hosts=Path(args["--known-hosts"]),
    )


# --- metadata: bounded, and names that are names ------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"


def test_an_alias_bomb_in_the_artifact_metadata_is_refused(target, backup):
    text = (backup / "metadata").read_text()
    (backup / "metadata").write_text(text + BOMB)
    result = restore(target, backup)
    assert_refused(target, result, "metadata was refused: it uses the YAML anchor &a (line")
    assert target.vm.calls() == []


def test_an_alias_bomb_from_a_metadata_script_is_refused(target, backup):
    target.set_metadata("uaa", BOMB)
    assert_refused(
        target,
        restore(target, backup),
        "metadata script for job uaa printed YAML that bbrx refuses: it uses the YAML anchor &a",
    )


def test_a_metadata_script_printing_more_than_the_cap_is_refused(target, backup):
    target.set_metadata("uaa", "# " + "x" * (1 << 20) + "\nskip_bbr_scripts: false\n")
    assert_refused(target, restore(target, backup), "printed more than 1 MiB: refusing it")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda doc: doc["instances"][0]["artifacts"][0].update(name="../../a"),
            "names the job '../../a', not a plain name",
        ),
        (
            lambda doc: doc["instances"][0].update(name="../bosh"),
            "has the name '../bosh', which is not a plain name",
        ),
        (
            lambda doc: doc["instances"][0].update(index="0/../../x"),
            "has the index '0/../../x', which is not a plain name",
        ),
        (
            lambda doc: doc["instances"][0]["artifacts"].append(
                copy.deepcopy(doc["instances"][0]["artifacts"][0])  # no YAML alias
            ),
            "is listed twice",
        ),
    ],
    ids=["job", "instance", "index", "duplicate"],
)
def test_metadata_names_must_be_plain_and_unique(target, backup, change, message):
    edit_metadata(backup, change)
    result = restore(target, backup)
    assert_refused(target, result, "does not follow bbr's metadata schema", message)
    assert target.vm.calls() == []


def test_an_artifact_path_that_is_a_file_is_named_so(target, backup):
    result = restore(target, backup / "metadata")
    assert_refused(target, result, "is a file, not a backup directory")


def test_unreadable_metadata_is_named_with_the_next_step():
    """As a user who cannot read it (root reads anything): this process's effective uid
    becomes nobody's for the read, and root's again after."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to read as another user")
    directory = Path(tempfile.mkdtemp(prefix="bbrx-unreadable-"))  # /tmp: nobody may enter
    try:
        directory.chmod(0o755)
        (directory / "metadata").write_text("instances: []\n")
        (directory / "metadata").chmod(0o000)
        os.seteuid(65534)
        try:
            with pytest.raises(ArtifactError) as caught:
                artifact.read_manifest(directory)
        finally:
            os.seteuid(0)
    finally:
        shutil.rmtree(directory)
    assert f"cannot read {directory}/metadata: Permission denied" in str(caught.value)
    assert "fix its permissions" in str(caught.value)


# --- what must still restore ----------------------------------------------------------------------


def test_an_artifact_bbr_itself_wrote_restores(target):
    """bbr's own fixture (read where it lies, never copied): job `bosh`, file `./backup`."""
    fixture = FIXTURES / "director-backup-integration"
    if not fixture.is_dir():
        pytest.skip("bbr's fixtures are not on this machine")
    scripts = target.vm.root / "var/vcap/jobs/bosh/bin/bbr"
    scripts.mkdir(parents=True)
    (scripts / "restore").write_text(
        '#!/bin/sh\nset -e\ncd "$BBR_ARTIFACT_DIRECTORY"\ncp backup ../../got\n'
    )
    (scripts / "restore").chmod(0o755)
    result = restore(target, fixture)
    assert result.code == 0, result
    got = (target.vm.root / "var/vcap/store/got").read_bytes()
    expected = yaml.safe_load((fixture / "metadata").read_text())
    assert (
        hashlib.sha256(got).hexdigest()
        == (expected["instances"][0]["artifacts"][0]["checksums"]["./backup"])
    )
    assert not target.work_dir().exists() or target.director("restore-cleanup").code == 0


def _header(name: str, kind: bytes, size: int = 0, **fields) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    for key, value in fields.items():
        setattr(info, key, value)
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def _file(name: str, data: bytes) -> bytes:
    return _header(name, tarfile.REGTYPE, len(data)) + data + bytes(-len(data) % 512)


def append_raw(backup: Path, job: str, tail: bytes, listed: dict[str, bytes]) -> Path:
    """Rewrite one job's tar as its own members, then `tail` (raw blocks: the crafted
    part), then the end-of-archive; metadata also lists `listed` (name -> data)."""
    path = backup / f"bosh-0-{job}.tar"
    with tarfile.open(path) as source:
        source.getmembers()
        end = source.offset  # just past the last member's data
    path.write_bytes(path.read_bytes()[:end] + tail + bytes(1024))

    def add_listed(doc: dict) -> None:
        for art in doc["instances"][0]["artifacts"]:
            if art["name"] == job:
                for name, data in listed.items():
                    art["checksums"][name] = hashlib.sha256(data).hexdigest()

    edit_metadata(backup, add_listed)
    return path


def test_a_directory_with_data_cannot_smuggle_members_past_the_check(target, backup):
    # GNU tar reads no data after a directory header; a hasher that skipped `size` bytes
    # would never see the symlink and the file hidden in them, and tar would plant both.
    hidden = _header("./evil", tarfile.SYMTYPE, linkname="/etc") + _file("./planted", b"x\n")
    path = append_raw(backup, "director", _header("./d", tarfile.DIRTYPE, len(hidden)) + hidden, {})
    listing = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True).stdout
    assert "./evil" in listing and "./planted" in listing  # the attack is real for tar
    assert_refused(
        target,
        restore(target, backup),
        f"member ./d is a directory with {len(hidden)} bytes of data after its header",
    )


def test_a_lone_zero_block_cannot_hide_files_from_the_restore(target, backup):
    # tar stops at a lone zero block and exits 0: ./b would be listed, checked, and never
    # restored, and the restore would look good.
    path = append_raw(backup, "director", bytes(512) + _file("./b", b"b\n"), {"./b": b"b\n"})
    listing = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True).stdout
    assert "./b" not in listing  # what tar would restore
    assert_refused(target, restore(target, backup), "a lone zero block before byte")


def test_a_backup_holding_what_a_restore_refuses_is_not_published(target, tmp_path):
    # A job's backup script that leaves a symlink in its artifact: bbr would back it up and
    # restore it blindly; bbrx says so at backup time, when the job can still be fixed.
    script = target.vm.root / "var/vcap/jobs/director/bin/bbr/backup"
    script.write_text(script.read_text() + 'ln -s /etc/passwd "${art}passwd"\n')
    out = tmp_path / "out"
    out.mkdir()
    result = target.director("backup", "--artifact-path", str(out))
    assert result.code == 1, result
    assert "the backup of job director holds what bbrx will not restore" in result.stderr
    assert "member ./passwd is a symbolic link (to /etc/passwd)" in result.stderr
    assert list(out.iterdir()) == []
    assert target.vm.locked_jobs() == []
