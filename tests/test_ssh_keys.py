"""The private key is read before anything connects, as bbr does: a file that is not a key
is named as such, not reported as an unreachable host."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import Bbrx


def test_a_file_that_is_not_a_private_key_is_refused_before_connecting(bbrx: Bbrx, tmp_path: Path):
    key = tmp_path / "id_bbr"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot really a key\n")
    key.chmod(0o600)
    # Port 1 on loopback: nothing listens, so any attempt to connect would say so.
    result = bbrx(
        "director", "--host", "127.0.0.1:1", "--username", "bbr",
        "--private-key-path", str(key), "backup",
    )  # fmt: skip
    assert result.code == 1, result
    assert f"Error: private key {key} cannot be read as a private key" in result.stderr
    assert "cannot reach" not in result.stderr


def test_a_passphrase_protected_key_is_warned_about_and_tried(bbrx: Bbrx, tmp_path: Path):
    key = tmp_path / "id_bbr"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(key)], check=True
    )
    result = bbrx(
        "director", "--host", "127.0.0.1:1", "--username", "bbr",
        "--private-key-path", str(key), "pre-backup-check",
    )  # fmt: skip
    assert result.code == 1, result
    assert "is protected by a passphrase" in result.stderr
    assert "cannot reach 127.0.0.1:1" in result.stderr  # it went on and tried
