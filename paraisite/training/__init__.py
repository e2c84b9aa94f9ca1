"""Training: the one loop (loop.py) and how a step is computed (steps.py: one split; stacked.py and padding.py:
several splits as one model), the job train.py runs as a list of tasks shared by processes (job.py,
processes.py), the run folder (rundir.py) and the progress clock (clock.py)."""
