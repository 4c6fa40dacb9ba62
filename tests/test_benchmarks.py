"""Every benchmark script runs, end to end, on a tiny store: they are not timed here (numbers on 12 random
photos mean nothing), only kept from rotting when the library moves."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, TEST_BACKBONE, cli, cli_env, make_images
from PIL import Image

pytestmark = pytest.mark.slow  # real processes
BENCH = ROOT / "benchmarks"


def run(script, *args, timeout=600):
    r = subprocess.run(
        [sys.executable, str(BENCH / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=ROOT,
        timeout=timeout,
    )
    assert r.returncode == 0, f"{script} {args}: {r.stderr[-3000:]}"
    return r.stdout


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """12 random photos with CamVid-like label maps (ids 0..10, 11 void), their features from the random test
    backbone, and a 2-step ACG fitted on them."""
    d = tmp_path_factory.mktemp("bench")
    make_images(d / "images", n=12, size=(64, 80))
    (d / "gt").mkdir()
    rng = np.random.default_rng(0)
    for p in sorted((d / "images").glob("*.png")):
        w, h = Image.open(p).size
        Image.fromarray(rng.integers(0, 12, (h, w)).astype(np.uint8)).save(d / "gt" / p.name)
    assert cli(["extract", d / "images", "-o", d / "f.h5", "--short-side", "64", *TEST_BACKBONE]).exit_code == 0
    r = cli(["fit-acg", d / "f.h5", "-o", d / "acg.pt", "--steps", "2", "--depth", "1", "--batch-size", "4", "-q"])
    assert r.exit_code == 0, r.stderr
    return d


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_every_script_states_its_usage(script):
    assert "usage" in run(script, "--help").lower()


def test_quality_runs_every_variant(tiny):
    out = run(
        "quality.py",
        "--train",
        tiny / "f.h5",
        "--test",
        tiny / "f.h5",
        "--gt",
        tiny / "gt",
        "--out",
        tiny / "q",
        "--seeds",
        "1",
        "--variants",
        "a,aw,b,bw,c",
        "--acg",
        tiny / "acg.pt",
        "--halves",
    )
    rows = json_lines(out)
    assert [r["variant"].split(":")[0] for r in rows] == ["a", "aw", "b", "bw", "c"]
    assert all(0 <= r["miou_mean"] <= 100 and "miou_even" in r for r in rows)


def test_refine_runs_every_variant(tiny):
    c = tiny / "c.h5"
    assert cli(["conceptualize", tiny / "f.h5", "--acg", tiny / "acg.pt", "-o", c, "-q"]).exit_code == 0
    args = ["--train-features", tiny / "f.h5", "--train", c, "--test-features", tiny / "f.h5", "--test", c]
    out = run(
        "refine.py",
        *args,
        "--gt",
        tiny / "gt",
        "-K",
        "11",
        "--ignore",
        "11",
        "--acg",
        tiny / "acg.pt",
        "--seeds",
        "1",
        "--extra",
        "--pamr-variants",
        "--out",
        tiny / "r",
    )
    rows = json_lines(out)
    assert [r["variant"] for r in rows] == [
        "kmeans",
        "kmeans-prep",
        "classify-1",
        "classify",
        "refine",
        "refine pamr=0",
        "refine keep=0",
        "refine keep=0.5",
        "refine mlp",
        "refine pamr=10 224 px",
        "refine pamr=3",
        "refine pamr=3 to 16",
        "classify kmeans",
        "refine kmeans",
        "classify exclusivity=0",
    ]
    assert all(len(r["miou_all_even_odd"]) == 3 and 0 <= min(r["miou_all_even_odd"]) for r in rows)


def test_speed_fit_and_conceptualize(tiny):
    rows = json_lines(run("speed.py", "fit", "--steps", "1", "--tokens", "32", "--batch-size", "2"))
    assert rows and rows[0]["steps_per_s_graphs_rebuilt"] > 0 and rows[0]["steps_per_s_graphs_kept"] > 0
    rows = json_lines(run("speed.py", "loss", "--tokens", "50", "--batch-size", "2", "--repeats", "1"))
    assert [r["delta"] for r in rows] == ["plain", "tanh"] and all(r["max_abs_dq"] < 1e-6 for r in rows)
    rows = json_lines(
        run("speed.py", "conceptualize", "--features", tiny / "f.h5", "--acg", tiny / "acg.pt", "--repeats", "1")
    )
    assert rows


def test_speed_extract_against_the_bare_forward_and_the_gemm_rate(tiny):
    rows = json_lines(
        run("speed.py", "extract", "--images", tiny / "images", "--n", "4", "--backbone", "test-vit",
            "--random-weights", "--short-side", "64", "--batch-size", "2")
    )  # fmt: skip
    last = rows[-1]
    assert last["gflop_per_image"] > 0 and last["gemm_peak_gflop_s"] > 0 and last["ratio_bare_vs_gemm_peak"] > 0


def test_ab_compares_a_tree_with_itself(tiny):
    rows = json_lines(
        run(
            "ab.py", "--old", ROOT, "--new", ROOT, "--features", tiny / "f.h5", "--acg", tiny / "acg.pt", "--pairs", "1"
        )
    )
    assert len(rows) >= 2


def test_ab_fit_times_the_command_and_compares_the_loss_curves(tiny):
    rows = json_lines(
        run("ab.py", "--old", ROOT, "--new", ROOT, "--features", tiny / "f.h5", "--method", "fit", "--pairs", "1",
            "--steps", "12", "--batch-size", "2", "--max-tokens", "0")
    )  # fmt: skip
    assert [r.get("side") for r in rows[:2]] == ["old", "new"] and rows[0]["median"] > 0
    assert rows[-1]["max_abs_loss_difference"] == 0  # one tree, one seed: the same curve


def test_plan_prints_its_table():
    assert "|" in run("plan.py")


def test_killpoints_once_per_stage(tiny):
    rows = json_lines(run("killpoints.py", "--n", "1", "--images", tiny / "images"))
    assert {r["stage"] for r in rows} == {"extract", "fit-acg", "conceptualize", "classify"}


def test_merge_bound_finds_the_merge_of_highest_miou():
    """The bound's local search beats majority where majority starves a class: cluster 2 is mostly class 0,
    but giving it to class 1 raises class 1's IoU by more than class 0 loses."""
    sys.path.insert(0, str(BENCH))
    try:
        from merge_bound import best_mapping, miou_of_mapping
    finally:
        sys.path.remove(str(BENCH))
    conf = np.array([[100.0, 0.0], [50.0, 0.0], [6.0, 4.0]])  # clusters x classes, pixel counts
    assert miou_of_mapping(conf, np.array([0, 0, 0])) == pytest.approx((156 / 160 + 0.0) / 2)
    mapping, best = best_mapping(conf)
    assert mapping.tolist() == [0, 0, 1]
    assert best == pytest.approx((150 / 156 + 4 / 10) / 2)  # class 0: 150 of 156; class 1: 4 of 10


def test_merge_bound_runs_and_agrees_with_score(tiny):
    c = tiny / "c.h5"
    if not c.exists():
        assert cli(["conceptualize", tiny / "f.h5", "--acg", tiny / "acg.pt", "-o", c, "-q"]).exit_code == 0
    out = run(
        "merge_bound.py",
        *("--train", c, "--test", c, "--gt", tiny / "gt", "-K", "11", "--ignore", "11"),
        *("--factors", "1,2", "--out", tiny / "mb"),
    )
    rows = json_lines(out)
    assert rows[0]["variant"] == "classify (every default)"
    assert [r["factor"] for r in rows[1:]] == [1, 2]
    for r in rows[1:]:
        assert r["majority"] == pytest.approx(r["majority (score)"], abs=0.01)  # its own mIoU = score's
        assert r["best merge"] >= r["majority"] - 1e-9
