"""Pixel-adaptive refinement of class probabilities on the photo (refine's default last step, docs/method.md,
section 7).

The head labels 14-pixel patches; bilinear upsampling puts the boundaries between patch centres, not on the
photo's edges. PAMR (Araslanov and Roth, "Single-stage semantic segmentation from image labels", CVPR 2020)
moves them there: each pixel's probabilities become, 5 times over by default, a weighted mean of its neighbours' at
dilations 1 to 24, with weights from colour similarity (a softmax over the neighbours of minus the colour
difference, scaled by the local colour spread), on a small copy of the photo (short side 160 by default).
Compiled loops (numba, ``_pamr_kernel``) do the arithmetic of the torch functions here (the interpolation, the
affinities, the propagation, the upsampling and argmax), which stay as the reference and the fallback; the
compiled path needs no torch, whose import costs 2 s of a command. A photo costs 14-22 ms on 2 cores (reading it
apart; CamVid at 160 x 213) where the dense CRF costs about a second.

Every step is a convex combination, so a class whose probability stays below 1 / K everywhere can never win a
pixel: such classes are dropped first, which leaves the labels unchanged and saves their arithmetic.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import numpy as np

from .config import PAMRParams
from .render import upsample_argmax

if TYPE_CHECKING:
    import torch

NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
MAX_WORK_PIXELS = 1 << 18  # the working copy of a very long photo is made smaller still (memory: 600 B a pixel)
_KERNEL = None


def _kernel():
    """The compiled loops, or None without numba (compiled on first use, about 15 s once on 2 cores; numba
    caches the machine code on disk)."""
    global _KERNEL
    if _KERNEL is None:
        try:
            from . import _pamr_kernel as kernel
        except ImportError:
            kernel = False
        _KERNEL = kernel
    return _KERNEL or None


def work_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """The working copy's (h, w) for an output of ``size`` (H, W): short side ``short_side`` at most, aspect kept."""
    H, W = int(size[0]), int(size[1])
    s = min(1.0, short_side / min(H, W), (MAX_WORK_PIXELS / (H * W)) ** 0.5)
    return max(1, round(H * s)), max(1, round(W * s))


def _offsets(params: PAMRParams) -> list[tuple[int, int]]:
    """The (dy, dx) of each pixel's neighbours: the 8 directions at every dilation."""
    return [(dy * d, dx * d) for d in params.dilations for dy, dx in NEIGHBOURS]


def affinities(img: torch.Tensor, params: PAMRParams) -> torch.Tensor:
    """img (3, h, w) float -> (n, h, w) weights of each pixel's n = 8 x len(dilations) neighbours, summing to 1."""
    import torch
    import torch.nn.functional as F

    c, h, w = img.shape
    pad = max(params.dilations)
    ip = F.pad(img[None], (pad, pad, pad, pad), mode="replicate")[0]
    offs = _offsets(params)
    # differences to the pixel itself, (n, 3, h, w)
    diff = torch.stack([ip[:, pad + oy : pad + oy + h, pad + ox : pad + ox + w] for oy, ox in offs]).sub_(img)
    # the colour spread over the pixel and its n neighbours, per channel: the unbiased std, as PAMR's, from the
    # sums of the differences (shifted by the pixel itself, so no cancellation; torch's std over the first axis
    # is ten times slower on a CPU)
    n = len(offs) + 1
    s1 = diff.sum(0)
    var = (diff * diff).sum(0).sub_(s1 * s1 / n).div_(n - 1).clamp_(min=0.0)
    scale = var.sqrt_().mul_(params.sigma).add_(1e-8)
    diff.abs_().div_(scale)
    aff = sum(diff[:, k] for k in range(c)).mul_(-1.0 / c)
    return torch.softmax(aff, 0)


def propagate(probs: torch.Tensor, aff: torch.Tensor, params: PAMRParams) -> torch.Tensor:
    """probs (m, h, w) -> the same after ``params.iterations`` steps of the weighted neighbour mean."""
    import torch
    import torch.nn.functional as F

    _, h, w = probs.shape
    pad = max(params.dilations)
    offs = _offsets(params)
    m = probs.contiguous()
    for _ in range(params.iterations):
        mp = F.pad(m[None], (pad, pad, pad, pad), mode="replicate")[0]
        out = torch.zeros_like(m)
        for k, (oy, ox) in enumerate(offs):
            out.addcmul_(mp[:, pad + oy : pad + oy + h, pad + ox : pad + ox + w], aff[k])
        m = out
    return m


def threads() -> int:
    """The threads the compiled loops may use: torch's count when the process has torch (so that
    ``OMP_NUM_THREADS`` and ``torch.set_num_threads`` bound both), else ``OMP_NUM_THREADS`` when set, else the
    cores this process may run on."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return max(1, torch.get_num_threads())
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0])
    except ValueError:
        n = 0
    return n if n > 0 else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def refine_probs(
    photo: np.ndarray | None, probs, size: tuple[int, int], params: PAMRParams, compiled: bool = True
) -> np.ndarray:
    """photo (h, w, 3) uint8, the working copy (``work_size``; unused with 0 iterations); probs (K, gh, gw)
    patch-level class probabilities summing to 1 (an array or a tensor) -> (H, W) class indices 0..K-1 at the
    output ``size``. ``compiled``: the compiled loops when numba is there (no torch needed), else the torch
    functions."""
    kernel = _kernel() if compiled else None
    if kernel is None:
        return _refine_reference(photo, probs, size, params)
    H, W = int(size[0]), int(size[1])
    p = np.ascontiguousarray(np.asarray(probs, dtype=np.float32))
    kernel.set_threads(threads())
    if params.iterations == 0:
        return kernel.upsample_argmax(p, H, W)
    K = p.shape[0]
    h, w = photo.shape[:2]
    soft = kernel.resize(p, h, w)
    live = np.flatnonzero(soft.max(axis=(1, 2)) >= 1.0 / K - 1e-6)  # the others never win a pixel
    if len(live) == 1:
        return np.full((H, W), int(live[0]), dtype=np.int64)
    img = np.ascontiguousarray(np.asarray(photo, dtype=np.uint8).transpose(2, 0, 1), dtype=np.float32)
    img /= np.float32(255.0)
    offs, pad = np.array(_offsets(params), np.int64), max(params.dilations)
    if len(live) < K:
        soft = np.ascontiguousarray(soft[live])
    return live[kernel.refine(img, soft, offs, params.sigma, pad, params.iterations, (H, W), threads())]


def _refine_reference(photo: np.ndarray | None, probs, size: tuple[int, int], params: PAMRParams) -> np.ndarray:
    """``refine_probs`` through the torch functions above."""
    import torch
    import torch.nn.functional as F

    probs = torch.as_tensor(np.asarray(probs, dtype=np.float32))
    if params.iterations == 0:
        return upsample_argmax(probs, size)
    K = int(probs.shape[0])
    h, w = photo.shape[:2]
    soft = F.interpolate(probs[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    live = torch.nonzero(soft.amax(dim=(1, 2)) >= 1.0 / K - 1e-6)[:, 0]
    if len(live) == 1:
        return np.full((int(size[0]), int(size[1])), int(live[0]), dtype=np.int64)
    img = torch.from_numpy(np.array(photo, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    out = propagate(soft[live], affinities(img, params), params)
    return live.numpy()[upsample_argmax(out, size)]
