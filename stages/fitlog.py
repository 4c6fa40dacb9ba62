"""fit-acg's side files: the JSON-lines log of its steps and the loss curve (drawn with Pillow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .output import atomic_open, write_atomic


def write_log(path: Path, history: list[dict]) -> None:
    """One JSON object per logged step; the last one also has ``stop_reason``."""
    with atomic_open(path) as fh:
        for r in history:
            fh.write(json.dumps(r) + "\n")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def plot_loss(history: list[dict], path: Path, size=(720, 400), title: str = "") -> None:
    """The training loss (the negative soft modularity) against the step, with labelled axes and ticks,
    drawn with Pillow; the learning rate as a thin grey line on the same plot, scaled to its height."""
    from PIL import Image, ImageDraw

    from .render import label_font

    W, H = size
    left, right, top, bottom = 85, 20, 30, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = label_font(12)
    d.text((left, 8), title or "fit-acg training loss", fill="black", font=font)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    d.text(((left + W - right) // 2 - 15, H - 18), "step", fill="black", font=font)
    ylabel = Image.new("RGB", (120, 14), "white")
    ImageDraw.Draw(ylabel).text((0, 0), "loss (-modularity)", fill="black", font=font)
    img.paste(ylabel.rotate(90, expand=True), (2, (top + H - bottom) // 2 - 60))
    if len(history) >= 2:
        steps = np.array([r["step"] for r in history], float)
        loss = np.array([r["loss"] for r in history], float)
        lo, hi = float(loss.min()), float(loss.max())
        if not hi > lo:
            lo, hi = lo - 1e-3, hi + 1e-3
        margin = 0.05 * (hi - lo)
        lo, hi = lo - margin, hi + margin
        s0, s1 = float(steps[0]), max(float(steps[-1]), float(steps[0]) + 1)
        px = lambda v: left + (v - s0) / (s1 - s0) * (W - right - left)  # noqa: E731
        py = lambda v: top + (hi - v) / (hi - lo) * (H - bottom - top)  # noqa: E731
        for t in nice_ticks(s0, s1, 6):
            x = px(t)
            d.line([(x, H - bottom), (x, H - bottom + 4)], fill="black")
            d.text((x - 12, H - bottom + 6), f"{t:g}", fill="black", font=font)
        for t in nice_ticks(lo, hi, 5):
            y = py(t)
            d.line([(left - 4, y), (left, y)], fill="black")
            d.line([(left + 1, y), (W - right - 1, y)], fill=(235, 235, 235))
            label = f"{t:.3g}"
            d.text((left - 7 - d.textlength(label, font=font), y - 7), label, fill="black", font=font)
        lr = np.array([r.get("lr", 0.0) for r in history], float)
        if lr.max() > 0:
            ly = top + (1 - lr / lr.max()) * (H - bottom - top)
            d.line(list(zip(px(steps).tolist(), ly.tolist())), fill=(160, 160, 160), width=1)
            d.text((W - right - 170, 8), "grey: learning rate (scaled)", fill=(120, 120, 120), font=font)
        d.line(list(zip(px(steps).tolist(), py(loss).tolist())), fill=(200, 30, 30), width=2)
    write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))
