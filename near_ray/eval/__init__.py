"""Metrics (cACC, sACC, NMI, ARI), baselines and reports."""
