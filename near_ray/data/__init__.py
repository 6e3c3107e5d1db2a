"""A run's image collections: the domains' listings and manifests (``collections``), and readers for the
field's native dataset layouts (``readers``: CUB, Cars, Dogs, Flowers, Pets, folders)."""
