"""ParAIsite: lattice thermal conductivity from a crystal structure, by transfer learning from MEGNet.

    model.py, transform.py, checkpoint.py   the model (MEGNet + MLP head), its target transform, its files
    data/         datasets and their sources: labels and graphs, the nine splits, where inputs live, fetching
    training/     the loop and its steppers (one split, or several stacked and padded), the job of tasks that
                  train.py runs over processes, the run folder, the progress clock
    evaluation/   metrics, the paper's MAPE scale, results tables and plots
    screening/    the ensemble of a run, its fused inference pass, scan.py's output files and summary

Data flows one way: structures -> graphs (megnet_pt.cache) -> batches -> model -> predictions -> metrics/reports.

``load_ltc_model().predict([structure])`` is the shipped ensemble (weights/) from Python.
"""
from .screening.predictor import load_ltc_model

__all__ = ["load_ltc_model"]
