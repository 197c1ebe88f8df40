"""Training on the simulator: scenarios (YAML, `scenario`), a trainee's session (`session`)
and its debrief, computed from the audit log alone (`debrief`).

A session is a simulated director set up as a scenario says, with its faults armed; the
trainee works with the ordinary `bbrx director`, `sim`, `status` and `audit` commands.
Every run on the session's director, and every `sim` action on it, is recorded in the audit
log (mode sim) with `detail.training_session` naming the session: the debrief reads those
rows and nothing else.
"""
