"""The single exception type of the audit package."""


class AuditError(Exception):
    """Any failure of the audit log: unreadable file, not an audit db, unknown run, bad input.

    Messages name the file and say what to do, because they end up in front of operators
    and compliance reviewers rather than developers.
    """
