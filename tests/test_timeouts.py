"""Per-phase script timeouts: bbr waits forever on a hung script, with the director locked.

A hung script in every phase, killed at its timeout, is in the fault matrix
(test_fault_matrix.py); here is what a timeout of 0 means."""

from __future__ import annotations


def test_zero_means_no_limit(target, tmp_path):
    target.vm.set_fault("director", "backup", "sleep 2")
    result = target.director("--backup-timeout", "0", "backup", "--artifact-path", str(tmp_path))
    assert result.code == 0, result
