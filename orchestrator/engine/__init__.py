"""The engine: the machines as tables (no I/O), the driver that runs them, progress."""
