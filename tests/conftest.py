import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ACSEG_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.delenv("ACSEG_DEBUG", raising=False)
