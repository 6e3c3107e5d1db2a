"""near_ray: vocabulary-free fine-grained visual recognition (NeaR) at cluster scale on Ray."""

__version__ = "0.1.0"
