"""Screening: the models of a run as one ensemble (ensemble.py) and its fused inference pass (fused.py), the scan of a
graph cache (scan.py), its part files and output CSV (files.py), and its summary (summary.py)."""
