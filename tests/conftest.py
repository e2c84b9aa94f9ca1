"""Tests read the shared inputs through PARAISITE_HOME (default: ../shared beside the project).

megnet_pt's own tests find the published weights there too: MEGNET_PT_HOME has the same weights/ layout.
"""
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# made absolute: several tests change the working folder, and PARAISITE_HOME=../shared must still point there
SHARED = Path(os.environ.get("PARAISITE_HOME") or ROOT.parent / "shared").expanduser().resolve()
os.environ["PARAISITE_HOME"] = str(SHARED)
os.environ.setdefault("MEGNET_PT_HOME", str(SHARED))


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"shared inputs not found at {SHARED} (set PARAISITE_HOME)")
    return SHARED


@contextlib.contextmanager
def working_folder(folder: Path, threads: int | None = None) -> Iterator[Path]:
    """``folder`` as the working folder (graph caches and converted weights land there), torch limited to ``threads``."""
    import torch

    old, old_threads = os.getcwd(), torch.get_num_threads()
    os.chdir(folder)
    if threads:
        torch.set_num_threads(threads)
    try:
        yield folder
    finally:
        torch.set_num_threads(old_threads)
        os.chdir(old)


@pytest.fixture(scope="session")
def graph_caches(tmp_path_factory) -> Path:
    """One ./data folder for the working folders of the training tests: the graph caches are built once."""
    return tmp_path_factory.mktemp("graph_caches")
