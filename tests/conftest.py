"""Tests read the shared inputs through PARAISITE_HOME (default: ../shared beside the project)."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# made absolute: several tests change the working folder, and PARAISITE_HOME=../shared must still point there
SHARED = Path(os.environ.get("PARAISITE_HOME") or ROOT.parent / "shared").expanduser().resolve()
os.environ["PARAISITE_HOME"] = str(SHARED)


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"shared inputs not found at {SHARED} (set PARAISITE_HOME)")
    return SHARED
