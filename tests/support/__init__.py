"""What several test modules share: Serve deployments, refine artifacts for training, bundles."""
