"""Readers for image collections in the field's native dataset layouts (CUB, Cars, Dogs, Flowers, Pets, folders)."""
