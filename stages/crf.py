"""Optional dense-CRF refinement of label maps (classify --crf, refine --crf), with the fully connected CRF of
Krähenbühl and Koltun through the ``pydensecrf2`` package (imported as ``pydensecrf``; built from source, so it is
an extra).

The unary term comes from the label map itself: the patch-level classes, interpolated bilinearly as one-hot
maps (the same soft maps whose argmax is classify's default output) and mixed with a uniform floor, so that
with zero iterations the CRF returns exactly the bilinear label map. The pairwise terms are the usual
Gaussian (smoothness) and bilateral (appearance) kernels with the settings unsupervised-segmentation work
uses (STEGO's: position std 1 px at weight 3; position std 67 px and colour std 3 at weight 4).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .errors import AcsegError
from .render import onehot_maps

INSTALL_HINT = (
    "install the optional dense-CRF package: pip install 'pydensecrf2==1.1' (it builds from source: needs a C++ "
    "compiler and Python headers)"
)


@dataclass
class CRFParams:
    iterations: int = 10
    label_confidence: float = 0.7  # weight of the interpolated label map against a uniform floor in the unary
    pos_std: float = 1.0
    pos_weight: float = 3.0
    bi_pos_std: float = 67.0
    bi_rgb_std: float = 3.0
    bi_weight: float = 4.0
    short_side: int = 448  # the CRF runs at most at this short side (its cost grows with the pixels), then
    # its labels are resized to the image with nearest neighbours

    def to_dict(self) -> dict:
        return asdict(self)


def require_crf():
    """The pydensecrf module, or a one-line error that says how to get it."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        raise AcsegError(
            "--crf needs the dense-CRF package pydensecrf2, which is not installed", INSTALL_HINT
        ) from None
    return dcrf


def refine(photo: np.ndarray, patch_map: np.ndarray, params: CRFParams | None = None) -> np.ndarray:
    """photo (H, W, 3) uint8 at the output size, patch_map (h, w) ids -> (H, W) ids refined by the CRF."""
    ids, _, onehot = onehot_maps(patch_map)
    if len(ids) == 1:
        return np.full(photo.shape[:2], ids[0], dtype=patch_map.dtype)
    return ids[refine_probs(photo, onehot[0], params)]


def refine_probs(photo: np.ndarray, probs, params: CRFParams | None = None) -> np.ndarray:
    """photo (H, W, 3) uint8 at the output size, probs (m, h, w) patch-level class probabilities (a tensor or an array)
    -> (H, W) indices 0..m-1 refined by the CRF. The probabilities are interpolated bilinearly (their argmax
    is the plain upsampled map) and mixed with a uniform floor for the unary term."""
    import torch
    import torch.nn.functional as F

    dcrf = require_crf()
    p = params or CRFParams()
    H, W = photo.shape[:2]
    s = min(1.0, p.short_side / min(H, W))
    h, w = (H, W) if s == 1.0 else (max(1, round(H * s)), max(1, round(W * s)))
    m = int(probs.shape[0])
    t = torch.as_tensor(np.asarray(probs, dtype=np.float32))[None]
    soft = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()
    img = photo if (h, w) == (H, W) else np.asarray(Image.fromarray(photo).resize((w, h), Image.BILINEAR))
    img = np.array(img, dtype=np.uint8, order="C")  # a writable C-contiguous copy, as pydensecrf wants
    prob = p.label_confidence * soft + (1.0 - p.label_confidence) / m
    unary = np.ascontiguousarray(-np.log(np.maximum(prob, 1e-12)).reshape(m, -1), dtype=np.float32)
    d = dcrf.DenseCRF2D(w, h, m)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=p.pos_std, compat=p.pos_weight)
    d.addPairwiseBilateral(sxy=p.bi_pos_std, srgb=p.bi_rgb_std, rgbim=img, compat=p.bi_weight)
    q = np.asarray(d.inference(p.iterations)).reshape(m, h, w)
    labels = q.argmax(0)
    if (h, w) != (H, W):
        labels = np.asarray(Image.fromarray(labels.astype(np.int32)).resize((W, H), Image.NEAREST))
    return labels.astype(np.int64)
