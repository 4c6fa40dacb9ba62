"""Label maps and pictures: smooth upsampling, PNG writing, palettes and overlays for people."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .errors import AcsegError
from .images import ImageError, load_rgb
from .output import write_atomic

if TYPE_CHECKING:
    import torch


def palette(n: int) -> np.ndarray:
    """n distinct colours (the PASCAL VOC bit-interleaving scheme), (n, 3) uint8."""
    out = np.zeros((max(n, 1), 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def onehot_maps(patch_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(h, w) ids -> (the ids present, sorted; each patch's index into them, (h, w); their (1, m, h, w) float
    one-hot maps, ready to interpolate)."""
    import torch
    import torch.nn.functional as F

    ids, inv = np.unique(patch_map, return_inverse=True)
    inv = inv.reshape(patch_map.shape)
    return ids, inv, F.one_hot(torch.from_numpy(inv.astype(np.int64)), len(ids)).permute(2, 0, 1).float()[None]


def argmax_channels(t: torch.Tensor) -> torch.Tensor:
    """``t.argmax(0)`` for a (m, H, W) tensor, the first maximum on ties as there. Taken over the last axis of a
    channels-last copy: PyTorch's CPU argmax over the first axis strides through memory and is about ten
    times slower than the copy and this."""
    return t.permute(1, 2, 0).contiguous().argmax(-1)


def upsample_labels(patch_map: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """(h, w) ids -> (H, W) ids. 'bilinear' interpolates one-hot maps and takes the argmax (smooth
    boundaries); 'nearest' repeats patches (blocky)."""
    import torch
    import torch.nn.functional as F

    H, W = int(size[0]), int(size[1])
    ids, inv, onehot = onehot_maps(patch_map)
    if mode == "nearest" or len(ids) == 1:
        t = torch.from_numpy(inv.astype(np.float32))[None, None]
        out = F.interpolate(t, size=(H, W), mode="nearest")[0, 0].numpy().astype(np.int64)
        return ids[out]
    return ids[upsample_argmax(onehot[0], (H, W))]


def upsample_argmax(soft: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(m, h, w) scores (one-hot maps, probabilities) -> (H, W) indices 0..m-1: bilinear interpolation, then
    the argmax; large images row by row in chunks (the same arithmetic as PyTorch's)."""
    import torch
    import torch.nn.functional as F

    H, W = int(size[0]), int(size[1])
    m, h = int(soft.shape[0]), int(soft.shape[1])
    soft = soft.float()[None]
    if m * H * W * 4 <= (256 << 20):
        return argmax_channels(F.interpolate(soft, size=(H, W), mode="bilinear", align_corners=False)[0]).numpy()
    # Large images: interpolate along columns once, then rows in chunks.
    cols = F.interpolate(soft, size=(h, W), mode="bilinear", align_corners=False)[0]  # (m, h, W)
    out = np.empty((H, W), np.int64)
    step = max(1, (64 << 20) // (4 * m * W))
    for r0 in range(0, H, step):
        ys = ((torch.arange(r0, min(H, r0 + step), dtype=torch.float32) + 0.5) * (h / H) - 0.5).clamp(0, h - 1)
        y0 = ys.floor().long()
        y1 = (y0 + 1).clamp(max=h - 1)
        wy = (ys - y0.float())[:, None]
        out[r0 : r0 + len(ys)] = argmax_channels(cols[:, y0] * (1 - wy) + cols[:, y1] * wy).numpy()
    return out


def save_label_png(path: str | os.PathLike, labels: np.ndarray, pal: np.ndarray | None = None) -> None:
    """8-bit PNG when ids fit (palette mode if a palette is given), 16-bit otherwise; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if labels.max(initial=0) < 256:
        im = Image.fromarray(labels.astype(np.uint8), "L")
        if pal is not None:
            im = im.convert("P")
            flat = np.zeros((256, 3), np.uint8)
            flat[: min(256, len(pal))] = pal[:256]
            im.putpalette(flat.ravel().tolist())
    else:
        im = Image.fromarray(labels.astype(np.uint16))
    write_atomic(path, lambda tmp: im.save(tmp, format="PNG"))


def boundaries(labels: np.ndarray) -> np.ndarray:
    b = np.zeros(labels.shape, bool)
    b[:-1] |= labels[:-1] != labels[1:]
    b[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return b


def colorize(labels: np.ndarray, pal: np.ndarray) -> np.ndarray:
    return pal[np.asarray(labels) % len(pal)]


def overlay(photo: np.ndarray | None, labels: np.ndarray, pal: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The photo with coloured regions and white boundaries (or the colours alone without a photo)."""
    col = colorize(labels, pal).astype(np.float32)
    out = col if photo is None else (1 - alpha) * photo.astype(np.float32) + alpha * col
    out[boundaries(labels)] = 255
    return out.clip(0, 255).astype(np.uint8)


def load_photo(source: str, size: tuple[int, int], draft: bool = False) -> np.ndarray | None:
    """The original photo resized to (H, W), or None when it cannot be read any more. ``draft``: a JPEG may be
    decoded at a reduced scale first (``load_rgb``'s ``at_least``), for small sizes."""
    try:
        img = load_rgb(source, at_least=max(size) if draft else None)
    except (ImageError, OSError):
        return None
    return np.asarray(img.resize((size[1], size[0]), Image.BILINEAR))


def read_photo(
    source: str, size: tuple[int, int], needs: str = "--crf", instead: str = "drop --crf", draft: bool = False
) -> np.ndarray:
    """The photo a step that looks at it (``needs``) works on, at ``size``, or a one-line error that says how to
    go without it (``instead``); ``draft`` as in ``load_photo``."""
    photo = load_photo(source, size, draft)
    if photo is None:
        raise AcsegError(
            f"{needs} cannot read the photo {source}",
            f"restore it at the path the features were extracted from, or {instead}",
        )
    return photo


def display_size(size: tuple[int, int], max_side: int = 640) -> tuple[int, int]:
    H, W = int(size[0]), int(size[1])
    s = min(1.0, max_side / max(H, W))
    return max(1, round(H * s)), max(1, round(W * s))


def save_rgb(path: str | os.PathLike, arr: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def label_font(size: int = 12):
    """Pillow's default font at ``size`` (a scalable one since Pillow 10.1), for captions, legends and axes."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def compose_panels(
    panels: list[np.ndarray], captions: list[str], legend: list[tuple[str, tuple[int, int, int]]] | None = None
) -> np.ndarray:
    """Panels of one height side by side, each under its caption, and below them a legend: one colour swatch
    and name per entry of ``legend`` (name, RGB), wrapped to the width."""
    from PIL import ImageDraw

    font = label_font(12)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cap_h, pad = 18, 4
    H = max(p.shape[0] for p in panels)
    W = sum(p.shape[1] for p in panels)
    rows, x, row = [], 0, []
    for name, rgb in legend or []:
        w = 14 + 6 + int(measure.textlength(name, font=font)) + 12
        if row and x + w > W:
            rows.append(row)
            row, x = [], 0
        row.append((x, name, rgb))
        x += w
    if row:
        rows.append(row)
    canvas = Image.new("RGB", (W, cap_h + H + len(rows) * 18 + (pad if rows else 0)), "white")
    d = ImageDraw.Draw(canvas)
    x = 0
    for p, cap in zip(panels, captions):
        canvas.paste(Image.fromarray(p), (x, cap_h))
        d.text((x + pad, 3), cap, fill="black", font=font)
        x += p.shape[1]
    for r, row in enumerate(rows):
        y = cap_h + H + pad + r * 18
        for x0, name, rgb in row:
            d.rectangle([x0 + pad, y + 2, x0 + pad + 12, y + 14], fill=tuple(int(c) for c in rgb), outline="black")
            d.text((x0 + pad + 18, y + 2), name, fill="black", font=font)
    return np.asarray(canvas)
