"""refine's pixel-adaptive refinement (PAMR): boundaries onto photo edges, exact class pruning, photos."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_crf import two_colour_photo

from stages.config import PAMRParams
from stages.errors import AcsegError
from stages.pamr import affinities, propagate, refine_probs, work_size
from stages.render import read_photo, upsample_argmax


def patch_probs(pmap, n_classes, confidence=0.9):
    onehot = torch.nn.functional.one_hot(torch.as_tensor(pmap), n_classes).permute(2, 0, 1).float()
    return confidence * onehot + (1 - confidence) / n_classes


def test_pamr_moves_a_patch_boundary_onto_the_photo_edge():
    # patches of 16 px: the label edge lies at x = 48, the colour edge at x = 40
    probs = patch_probs(np.repeat([[0, 0, 0, 1, 1, 1]], 4, axis=0), 2)
    photo = two_colour_photo()
    truth = np.where(np.arange(96) < 40, 0, 1)[None].repeat(64, 0)
    plain = upsample_argmax(probs, (64, 96))
    refined = refine_probs(photo, probs, (64, 96), PAMRParams())
    wrong_plain, wrong_pamr = int((plain != truth).sum()), int((refined != truth).sum())
    assert wrong_plain == 8 * 64
    assert wrong_pamr < wrong_plain / 4, (wrong_plain, wrong_pamr)


def test_pamr_on_a_flat_photo_or_without_iterations_is_the_bilinear_map():
    rng = np.random.default_rng(1)
    probs = torch.softmax(torch.as_tensor(rng.normal(size=(4, 6, 8)), dtype=torch.float32) * 3, 0)
    photo = rng.integers(0, 255, size=(90, 120, 3)).astype(np.uint8)
    plain = upsample_argmax(probs, (90, 120))
    assert np.array_equal(refine_probs(photo, probs, (90, 120), PAMRParams(iterations=0)), plain)
    # one class everywhere: that class, whatever the photo
    one = patch_probs(np.full((6, 8), 2), 4)
    assert (refine_probs(photo, one, (90, 120), PAMRParams()) == 2).all()


def test_dropping_classes_that_cannot_win_changes_no_label():
    rng = np.random.default_rng(2)
    K, h, w = 7, 5, 7
    logits = torch.as_tensor(rng.normal(size=(K, h, w)), dtype=torch.float32) * 2
    logits[[1, 4]] -= 6  # two classes that stay far below 1 / K everywhere
    probs = torch.softmax(logits, 0)
    photo = rng.integers(0, 255, size=(70, 98, 3)).astype(np.uint8)
    p = PAMRParams(short_side=35)
    small = np.asarray(Image.fromarray(photo).resize((49, 35), Image.BILINEAR))
    assert work_size((70, 98), p.short_side) == (35, 49)
    got = refine_probs(small, probs, (70, 98), p)
    soft = torch.nn.functional.interpolate(probs[None], size=(35, 49), mode="bilinear", align_corners=False)[0]
    img = torch.from_numpy(small.copy()).permute(2, 0, 1).float() / 255
    full = propagate(soft, affinities(img, p), p)  # every class kept
    assert np.array_equal(got, upsample_argmax(full, (70, 98)))
    assert not np.isin([1, 4], got).any()


def test_affinities_are_weights_and_tiny_photos_work():
    p = PAMRParams()
    img = torch.rand(3, 3, 5)  # smaller than the largest dilation
    aff = affinities(img, p)
    assert aff.shape == (48, 3, 5) and torch.allclose(aff.sum(0), torch.ones(3, 5))
    probs = patch_probs(np.array([[0, 1]]), 2)
    out = refine_probs((np.random.default_rng(0).random((3, 5, 3)) * 255).astype(np.uint8), probs, (3, 5), p)
    assert out.shape == (3, 5) and set(np.unique(out)) <= {0, 1}


def test_work_size_keeps_the_aspect_and_never_enlarges():
    assert work_size((720, 960), 160) == (160, 213)
    assert work_size((100, 50), 160) == (100, 50)
    h, w = work_size((200, 200_000), 160)  # a very long photo: the working copy stays bounded
    assert h * w <= (1 << 18) * 1.01 and h < 160


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_photos_are_read_small_and_unreadable_ones_refused(tmp_path, fmt):
    photo = two_colour_photo(h=480, w=640, edge=320)
    path = tmp_path / f"p.{fmt.lower()}"
    Image.fromarray(photo).save(path, format=fmt)
    small = read_photo(str(path), (120, 160), "refine's PAMR", "pass --pamr 0", draft=True)
    assert small.shape == (120, 160, 3) and small.dtype == np.uint8
    assert abs(int(small[60, 20, 0]) - 200) < 20 and abs(int(small[60, 150, 2]) - 200) < 20
    (tmp_path / "bad.jpg").write_bytes(b"not a photo")
    with pytest.raises(AcsegError, match="--pamr 0"):
        read_photo(str(tmp_path / "bad.jpg"), (120, 160), "refine's PAMR", "pass --pamr 0", draft=True)
