"""The operations: backup, restore, the cleanups and their shared steps, against the contracts."""
