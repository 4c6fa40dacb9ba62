"""What tests share besides fixtures: paths, small photos, and running the command line in-process or as a
real process."""

import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ACSEG_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TEST_BACKBONE = ["--backbone", "test-vit", "--random-weights", "-q"]


def make_images(folder: Path, n: int = 6, size=(80, 96), seed: int = 0) -> list[Path]:
    """Small random photos (some sizes differ, so batches group by grid)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = size if i % 3 else (size[1], size[0])
        a = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        p = folder / f"img_{i:02d}.png"
        Image.fromarray(a).save(p)
        out.append(p)
    return out


def cli(args, input=None):
    """Run acseg in this process (typer's test runner): exit_code, stdout, stderr."""
    from typer.testing import CliRunner

    from acseg_cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def cli_env() -> dict:
    """The environment of a real acseg process started by a test: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env
