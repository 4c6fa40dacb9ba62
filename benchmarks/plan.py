"""A plan on paper for COCO-Stuff train (118,287 images, typically 640x480): store size per backbone preset,
forward FLOPs per image, measured decode+resize rate per CPU core here, and what those give for extraction.

  python benchmarks/plan.py [--cpu-img-s 1.147] [--gpu-tflops 990 --mfu 0.3] [--fit-steps-s 0.98]

The GPU lines are estimates from FLOPs (no GPU was available where this was written); the CPU rate is the
one measured by `benchmarks/speed.py extract` (pass yours). Prints a Markdown table and JSON lines.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.images import resize_normalise, target_grid  # noqa: E402
from stages.presets import PRESETS  # noqa: E402

N_IMAGES = 118_287
SIZE = (480, 640)  # height, width of a typical COCO image
ARCH = {"vit_small": (384, 12), "vit_base": (768, 12), "test_vit": (64, 2)}


def arch_of(timm_name: str) -> tuple[int, int]:
    for k, v in ARCH.items():
        if timm_name.startswith(k):
            return v
    raise KeyError(timm_name)


def vit_gflops(tokens: int, dim: int, depth: int) -> float:
    """Multiply-adds x 2 of a ViT forward: per block 24 N d^2 (qkv, proj, 4x MLP) + 4 N^2 d (attention)."""
    return depth * (24 * tokens * dim**2 + 4 * tokens**2 * dim) / 1e9


def decode_rate(seconds: float = 3.0) -> float:
    """Images per second on one core: decode a 640x480 JPEG, resize to 448x602-ish, normalise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    a = (rng.random((480, 640, 3)) * 255).astype(np.uint8)
    a = np.clip(a.astype(np.float32) * 0.3 + np.linspace(0, 180, 640)[None, :, None], 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    grid = target_grid(480, 640, 448, 14)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        im = Image.open(io.BytesIO(data)).convert("RGB")
        resize_normalise(im, grid, 14, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-img-s", type=float, default=1.147, help="measured extract img/s (focus-vits14, 448) here")
    ap.add_argument("--gpu-tflops", type=float, default=990.0, help="dense bf16 peak of the GPU (H100 SXM: 990)")
    ap.add_argument("--mfu", type=float, default=0.3, help="assumed fraction of the peak a small ViT reaches")
    ap.add_argument("--workers", type=int, default=8, help="decode worker cores per GPU")
    args = ap.parse_args()

    dec = decode_rate()
    print(json.dumps({"decode_resize_img_s_per_core": round(dec, 1)}))
    rows = []
    for name, p in PRESETS.items():
        if name == "test-vit":
            continue
        dim, depth = arch_of(p.timm_name)
        gh, gw = target_grid(*SIZE, p.short_side, p.patch)
        tokens = gh * gw
        per_image = tokens * (dim * 2 + 4)  # fp16 tokens + fp32 CLS attention
        gflops = vit_gflops(tokens + 1 + (4 if "reg" in name else 0), dim, depth)
        gpu_img_s = args.gpu_tflops * 1e12 * args.mfu / (gflops * 1e9)
        rows.append(
            {
                "preset": name,
                "grid": f"{gh}x{gw}",
                "tokens": tokens,
                "mb_per_image": per_image / 1e6,
                "store_gb": per_image * N_IMAGES / 1e9,
                "gflops": gflops,
                "gpu_compute_min": N_IMAGES / gpu_img_s / 60,
            }
        )
    print(
        "| preset | short side | grid (640x480) | tokens | MB / image | store for 118,287 images | GFLOP / image | GPU "
        "compute, all images (estimate) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = PRESETS[r["preset"]]
        print(
            f"| {r['preset']} | {p.short_side} | {r['grid']} | {r['tokens']:,} | {r['mb_per_image']:.2f} | "
            f"{r['store_gb']:.0f} GB | {r['gflops']:.0f} | {r['gpu_compute_min']:.1f} min |"
        )
    for r in rows:
        print(json.dumps(r))
    fv = next(r for r in rows if r["preset"] == "focus-vits14")
    print(
        json.dumps(
            {
                "cpu_hours_focus_vits14_here": round(N_IMAGES / args.cpu_img_s / 3600, 1),
                "decode_bound_img_s_per_gpu": round(dec * args.workers),
                "decode_bound_gpu_hours_focus_vits14": round(N_IMAGES / (dec * args.workers) / 3600, 2),
                "write_mb_s_at_decode_bound": round(dec * args.workers * fv["mb_per_image"], 0),
            }
        )
    )


if __name__ == "__main__":
    main()
