"""Readers for image collections and the field's benchmarks, and the synthetic fine-grained benchmark."""
