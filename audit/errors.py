"""The single exception type of the audit package."""

from __future__ import annotations


class AuditError(Exception):
    """Any failure of the audit log: unreadable file, not an audit db, unknown run, bad input.

    Messages name the file and say what to do, because they end up in front of operators
    and compliance reviewers rather than developers. ``hint`` (what to do) is printed on
    its own line after the message.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def with_hint(self, hint: str) -> AuditError:
        self.hint = hint
        return self

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"
