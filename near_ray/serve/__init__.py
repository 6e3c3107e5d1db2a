"""The Ray Serve application for a model bundle."""
