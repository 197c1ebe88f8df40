"""The BOSH Director as bbrx sees it: the director contract, and the manifest's part in a run."""
