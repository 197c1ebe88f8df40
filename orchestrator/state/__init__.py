"""What the audit log says of a target: the lease, recovery after a killed run, reviewers 'views."""
