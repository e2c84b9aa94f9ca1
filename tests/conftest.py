"""Tests read the shared inputs through PARAISITE_HOME (default: ../shared beside the project)."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PARAISITE_HOME", str(ROOT.parent / "shared"))
SHARED = Path(os.environ["PARAISITE_HOME"])


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"shared inputs not found at {SHARED} (set PARAISITE_HOME)")
    return SHARED
