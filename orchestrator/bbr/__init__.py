"""bbr's formats: job metadata and lock order, the artifact, tar streams, YAML as bbrx reads it."""
