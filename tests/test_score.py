"""score: hand-computed cases, protocol properties, presets, real pairs and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import DATA, cli
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from stages.datasets import COCOSTUFF_FINE_TO_COARSE, DATASETS, get_dataset
from stages.errors import AcsegError
from stages.score import (
    confusion,
    match_hungarian,
    match_majority,
    matched_confusion,
    metrics,
    score,
)


def write(folder: Path, name: str, arr, mode=None):
    folder.mkdir(parents=True, exist_ok=True)
    a = np.asarray(arr)
    im = (
        Image.fromarray(a.astype(np.uint16 if a.max() > 255 else np.uint8))
        if mode is None
        else Image.fromarray(a.astype(np.uint8), mode)
    )
    im.save(folder / f"{name}.png")


def test_hand_computed_hungarian_case(tmp_path):
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 2]])
    pred = np.array([[5, 5, 3, 3], [5, 3, 3, 3]])
    write(tmp_path / "gt", "a", gt)
    write(tmp_path / "pr", "a", pred)
    res = score(str(tmp_path / "pr"), str(tmp_path / "gt"))
    # confusion: pred 5 -> {0: 3}, pred 3 -> {0: 1, 1: 3, 2: 1}; matching 5->0, 3->1; class 2 unmatched
    assert res["matching"] == {"3": 1, "5": 0}
    # IoU0 = 3/(4+3-3) = .75 ; IoU1 = 3/(3+5-3) = .6 ; IoU2 = 0/(1+0-0) = 0
    assert res["per_class_iou"] == pytest.approx([0.75, 0.6, 0.0])
    assert res["miou"] == pytest.approx(0.45)
    assert res["pixel_accuracy"] == pytest.approx(6 / 8)
    assert res["n_pixels"] == 8 and res["n_images"] == 1


def test_majority_and_unmatched_pixels():
    conf = np.array([[4, 0], [3, 1], [0, 5]])  # three clusters, two classes
    assert match_majority(conf) == {0: 0, 1: 0, 2: 1}
    h = match_hungarian(conf)
    assert h == {0: 0, 2: 1}
    m, u = matched_confusion(conf, h, 2)
    assert u.tolist() == [3, 1] and m.tolist() == [[4, 0], [0, 5]]
    res_h = metrics(m, u)
    res_m = metrics(*matched_confusion(conf, match_majority(conf), 2))
    assert res_h["pixel_accuracy"] == pytest.approx(9 / 13)
    assert res_m["pixel_accuracy"] == pytest.approx(12 / 13)


def test_ignored_pixels_never_count():
    gt = np.array([0, 1, -1, -1])
    pred = np.array([0, 1, 1, 0])
    c = confusion(pred, gt, 2, 2)
    assert c.sum() == 2 and c.tolist() == [[1, 0], [0, 1]]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6), st.integers(2, 8))
def test_properties(seed, k, n_pred):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, k, 300)
    pred = rng.integers(0, n_pred, 300)
    conf = confusion(pred, gt, n_pred, k)
    base = metrics(*matched_confusion(conf, match_hungarian(conf), k))
    perm = rng.permutation(n_pred)
    conf_p = confusion(perm[pred], gt, n_pred, k)
    again = metrics(*matched_confusion(conf_p, match_hungarian(conf_p), k))
    assert again["miou"] == pytest.approx(base["miou"]) and again["pixel_accuracy"] == pytest.approx(
        base["pixel_accuracy"]
    )
    perfect = confusion(gt, gt, k, k)
    assert metrics(*matched_confusion(perfect, match_hungarian(perfect), k))["miou"] == pytest.approx(1.0)
    if n_pred > k:
        maj = metrics(*matched_confusion(conf, match_majority(conf), k))
        assert maj["pixel_accuracy"] >= base["pixel_accuracy"] - 1e-12


def test_presets_map_known_ids():
    assert get_dataset("voc").lut()[255] == -1 and get_dataset("voc").lut()[15] == 15
    cs = get_dataset("cityscapes27").lut()
    assert cs[7] == 0 and cs[33] == 26 and cs[6] == -1 and cs[255] == -1 and cs[40] == -2
    coco = get_dataset("cocostuff27").lut()
    assert coco[0] == 9 and coco[2] == 11 and coco[156] == 23 and coco[255] == -1  # person, car, sky-other
    assert len(COCOSTUFF_FINE_TO_COARSE) == 182 and set(COCOSTUFF_FINE_TO_COARSE) == set(range(27))
    ade = get_dataset("ade20k").lut()
    assert ade[0] == -1 and ade[1] == 0 and ade[150] == 149
    cv = get_dataset("camvid11").lut()
    assert cv[11] == -1 and cv[10] == 10 and cv[12] == -2
    assert {d: p.n_classes for d, p in DATASETS.items()} == {
        "voc": 21,
        "cocostuff27": 27,
        "cityscapes27": 27,
        "camvid11": 11,
        "ade20k": 150,
    }


def test_cli_json_suffixes_missing_files_and_per_image(tmp_path):
    gt, pr = tmp_path / "gt", tmp_path / "pr"
    write(gt, "a_gtFine_labelIds", [[7, 7], [8, 8]])
    write(gt, "b_gtFine_labelIds", [[8, 8], [7, 0]])
    write(pr, "a", [[1, 1], [2, 2]])
    r = cli(["score", pr, gt, "--gt-suffix", "_gtFine_labelIds", "-d", "cityscapes27", "-q"])
    assert r.exit_code == 1 and "lack a prediction" in r.stderr and "b" in r.stderr
    r = cli(["score", pr, gt, "--gt-suffix", "_gtFine_labelIds", "-d", "cityscapes27", "--allow-missing", "-q"])
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["miou"] == 1.0 and res["n_images"] == 1 and res["missing_predictions"] == 1
    write(pr, "b", [[2, 2], [1, 1]])
    r = cli(
        [
            "score",
            pr,
            gt,
            "--gt-suffix",
            "_gtFine_labelIds",
            "-d",
            "cityscapes27",
            "--protocol",
            "per-image",
            "--no-confusion",
        ]
    )
    assert r.exit_code == 0
    res = json.loads(r.stdout)
    assert res["protocol"] == "per-image" and "confusion" not in res and res["pixel_accuracy"] == 1.0
    assert "not comparable" in r.stderr
    r = cli(["score", "-", gt, "--gt-suffix", "_gtFine_labelIds", "-d", "cityscapes27", "-q"], input=f"{pr}\n")
    assert r.exit_code == 0 and json.loads(r.stdout)["n_images"] == 2


@pytest.mark.parametrize("case", ["rgb", "size", "empty", "preset", "unreadable", "beyond"])
def test_bad_input_is_one_line_and_exit_1(tmp_path, case):
    gt, pr = tmp_path / "gt", tmp_path / "pr"
    write(gt, "a", [[0, 1], [1, 11]])
    args = ["-d", "camvid11"]
    if case == "rgb":
        write(pr, "a", np.zeros((2, 2, 3)), mode="RGB")
    elif case == "size":
        write(pr, "a", np.zeros((3, 2)))
    elif case == "empty":
        pr.mkdir()
    elif case == "preset":
        write(pr, "a", np.zeros((2, 2)))
        args = ["-d", "nope"]
    elif case == "unreadable":
        pr.mkdir()
        (pr / "a.png").write_bytes(b"\x89PNG broken")
    elif case == "beyond":
        write(pr, "a", np.zeros((2, 2)))
        write(gt, "a", [[0, 1], [1, 40]])
    r = cli(["score", pr, gt, *args, "-q"])
    assert r.exit_code == (2 if case == "preset" else 1), r.stdout  # an unknown preset is a usage error
    assert r.stdout == "" and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1
    if case == "size":
        r = cli(["score", pr, gt, *args, "-q", "--resize-pred", "nearest"])
        assert r.exit_code == 0


def test_confusion_png(tmp_path):
    write(tmp_path / "gt", "a", [[0, 1], [1, 2]])
    write(tmp_path / "pr", "a", [[0, 1], [1, 1]])
    r = cli(["score", tmp_path / "pr", tmp_path / "gt", "--confusion-png", tmp_path / "c.png", "-q"])
    assert r.exit_code == 0
    assert Image.open(tmp_path / "c.png").size[0] > 100


camvid = DATA / "camvid_segnet"


@pytest.mark.skipif(not camvid.is_dir(), reason="shared CamVid data absent")
def test_real_camvid_pairs(tmp_path):
    """Ground truth against itself is perfect; a constant prediction scores the largest class's share."""
    gt = camvid / "testannot"
    res = score(str(gt), str(gt), dataset="camvid11", workers=2)
    assert res["miou"] == 1.0 and res["n_images"] == 117
    names = sorted(p.stem for p in gt.glob("*.png"))[:5]
    for n in names:
        write(tmp_path / "const", n, np.zeros((360, 480)))
    res = score(str(tmp_path / "const"), str(gt), dataset="camvid11", allow_missing=True)
    shares = np.array(res["class_pixel_share"])
    assert res["pixel_accuracy"] == pytest.approx(shares.max())


voc = DATA / "voc2012_fixture"


@pytest.mark.skipif(not voc.is_dir(), reason="shared VOC fixture absent")
def test_real_voc_palette_labels():
    res = score(str(voc / "SegmentationClass"), str(voc / "SegmentationClass"), dataset="voc")
    assert res["miou"] == 1.0
    present = [i for i, v in enumerate(res["per_class_iou"]) if v is not None]
    assert present == [0, 1, 15]


def test_unknown_protocol(tmp_path):
    with pytest.raises(AcsegError):
        score(str(tmp_path), str(tmp_path), protocol="best")
