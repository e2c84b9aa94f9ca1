"""The inputs: LTC datasets as graphs (datasets.py), where they come from (sources.py, fetch.py: ``python -m
paraisite.data fetch``), the paper's nine 80/20 splits (splits.py), where inputs live (paths.py), and a reader of
upstream's old pickles (upstream_pickle.py)."""
