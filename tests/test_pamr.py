"""refine's pixel-adaptive refinement (PAMR): boundaries onto photo edges, exact class pruning, photos."""

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_crf import two_colour_photo

from stages.config import PAMRParams
from stages.errors import AcsegError
from stages.pamr import _kernel, _offsets, affinities, propagate, refine_probs, threads, work_size
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
    got = refine_probs(small, probs, (70, 98), p, compiled=False)
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


needs_kernel = pytest.mark.skipif(_kernel() is None, reason="numba is not installed")


def noisy_photo(h, w, seed):
    """Two colour regions with a soft edge, noise and a flat block: every term of the affinities matters."""
    rng = np.random.default_rng(seed)
    photo = two_colour_photo(h=h, w=w, edge=w // 3).astype(np.float64)
    photo += rng.normal(0, 12, size=photo.shape)
    photo[h // 2 :, w // 2 :] = 90  # no spread at all here
    return photo.clip(0, 255).astype(np.uint8)


@needs_kernel
@pytest.mark.parametrize(
    "h, w, params",
    [
        (64, 96, PAMRParams()),
        (3, 5, PAMRParams()),  # smaller than the largest dilation
        (41, 37, PAMRParams(iterations=3, sigma=0.1, dilations=(1, 3, 7))),
    ],
)
def test_the_compiled_loops_compute_the_reference(h, w, params):
    img = torch.from_numpy(noisy_photo(h, w, h)).permute(2, 0, 1).float().div(255).contiguous()
    offs, pad = np.array(_offsets(params), np.int64), max(params.dilations)
    want = affinities(img, params)
    got = _kernel().affinities(img.numpy(), offs, params.sigma, pad)
    assert got.shape == tuple(want.shape) and got.dtype == np.float32
    assert np.abs(got - want.numpy()).max() < 2e-5
    probs = torch.softmax(torch.randn(5, h, w, generator=torch.Generator().manual_seed(w)) * 3, 0)
    before = probs.clone()
    ref = propagate(probs, want, params).numpy()
    out = _kernel().propagate(probs.numpy(), got, offs, pad, params.iterations)
    assert np.abs(out - ref).max() < 2e-5
    assert torch.equal(probs, before)  # the input is left as it was


@needs_kernel
def test_refine_probs_gives_the_same_labels_compiled_or_not():
    rng = np.random.default_rng(5)
    probs = torch.softmax(torch.as_tensor(rng.normal(size=(6, 9, 12)), dtype=torch.float32) * 2, 0)
    photo = noisy_photo(120, 160, 3)
    a = refine_probs(photo, probs, (240, 320), PAMRParams())
    b = refine_probs(photo, probs, (240, 320), PAMRParams(), compiled=False)
    assert (a != b).mean() < 1e-3 and len(np.unique(a)) > 1
    # on torch's thread count (OMP_NUM_THREADS bounds both), with the same labels
    import numba

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert np.array_equal(refine_probs(photo, probs, (240, 320), PAMRParams()), a)
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("shape, size", [((10, 40, 53), (90, 120)), ((3, 7, 5), (30, 41)), ((4, 50, 60), (20, 25))])
def test_the_compiled_upsampling_labels_as_render_does(shape, size):
    probs = torch.softmax(torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])) * 2, 0)
    got = _kernel().upsample_argmax(probs.numpy(), *size)
    assert got.dtype == np.int64 and np.array_equal(got, upsample_argmax(probs, size))


@needs_kernel
@pytest.mark.parametrize("shape, size", [((5, 48, 64), (108, 144)), ((3, 20, 30), (20, 30)), ((4, 40, 40), (17, 95))])
def test_the_compiled_upsampling_of_regions_labels_as_render_does(shape, size):
    # smooth fields: large regions where the four source pixels agree (the shortcut) and edges between them
    m, h, w = shape
    yy, xx = torch.meshgrid(torch.linspace(0, 3, h), torch.linspace(0, 4, w), indexing="ij")
    phase = torch.arange(m, dtype=torch.float32)[:, None, None]
    probs = torch.softmax(4 * torch.sin(yy + 1.7 * phase) * torch.cos(xx - phase), 0)
    probs[:, : h // 4, : w // 4] = probs[:, : h // 4, : w // 4].mean(0, keepdim=True)  # exact ties: the first wins
    got = _kernel().upsample_argmax(probs.numpy(), *size)
    want = upsample_argmax(probs, size)
    assert len(np.unique(want)) >= 3 and np.array_equal(got, want)


@needs_kernel
@pytest.mark.parametrize("shape, size", [((11, 32, 43), (160, 213)), ((3, 7, 5), (30, 41)), ((4, 50, 60), (20, 25))])
def test_the_compiled_resize_is_torch_bilinear(shape, size):
    probs = torch.softmax(torch.randn(*shape, generator=torch.Generator().manual_seed(shape[2])) * 2, 0)
    want = torch.nn.functional.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]
    got = _kernel().resize(probs.numpy(), *size)
    assert got.shape == (shape[0], *size) and got.dtype == np.float32
    assert np.abs(got - want.numpy()).max() < 1e-6


def test_the_loops_thread_count_without_torch(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch")  # as in a refine process, which never imports it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads() == len(os.sched_getaffinity(0))


@needs_kernel
def test_the_compiled_exp_is_within_float_rounding():
    t = np.concatenate([-np.geomspace(1e-9, 86.0, 5000), [0.0, -0.34657, -0.34658, -0.6931472, -87.0, -100.0, -1e30]])
    t = t.astype(np.float32)
    got = t.copy()
    _kernel()._exp(got, np.empty(len(t), np.int32))
    want = np.exp(t.astype(np.float64))
    normal = want > 1.2e-38
    assert np.all(np.abs(got[normal] - want[normal]) <= 3e-7 * want[normal])
    assert np.all((got[~normal] > 0) & (got[~normal] < 2e-38))  # below -87: exp(-87)
