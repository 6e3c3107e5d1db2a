"""CLIP model, NeaR loss, the Ray Train loop and bundle export."""
