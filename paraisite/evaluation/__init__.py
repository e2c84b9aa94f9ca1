"""Scoring: losses and metrics in W/m/K (metrics.py), the scale of the paper's numbers (paper_scale.py), and the
reports of a run beside the paper's tables (report.py)."""
