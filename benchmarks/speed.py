"""Speed and memory of each stage against a baseline measured in the same run, on this machine.

  python benchmarks/speed.py extract --images DIR [--n 48] [--short-side 448]
  python benchmarks/speed.py extract-memory --images DIR          (peak RSS for 50 vs 500 images)
  python benchmarks/speed.py score --pred DIR --gt DIR             (+ synthetic 2,000 pairs for memory)
  python benchmarks/speed.py fit [--tokens 768]                    (steps/s, peak memory at batch 32)
  python benchmarks/speed.py loss [--tokens 1344]                  (the loss against its full-square form)
  python benchmarks/speed.py conceptualize --features F.h5 --acg A.pt
  python benchmarks/speed.py store-memory --features F.h5 --acg A.pt [--times 10]   (peak RSS, store vs 10x)

Each prints one JSON object per measurement and the ratios the issues ask for.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def out(**kw):
    print(json.dumps(kw), flush=True)


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak resident memory of a command, measured by GNU time (os.wait4 would also count the forked
    copy of this process before exec)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    if p.returncode != 0:
        raise SystemExit(f"{cmd} failed: {p.stderr[-500:]}")
    return int(p.stderr.strip().splitlines()[-1]) / 1024


def bench_extract(a):
    import torch

    from stages.backbones import create_backbone, get_preset
    from stages.extract import extract, plan_batches
    from stages.images import discover, load_rgb, resize_normalise, target_grid

    items = discover([a.images])[: a.n]
    pre = get_preset(a.backbone)
    bb = create_backbone(a.backbone, random_weights=a.random_weights)
    grids = [target_grid(*load_rgb(it.path).size[::-1], a.short_side, pre.patch) for it in items]
    # bare forward on pre-decoded tensors, batches of equal grids
    tensors = [
        torch.from_numpy(resize_normalise(load_rgb(it.path), g, pre.patch, pre.mean, pre.std))
        for it, g in zip(items, grids)
    ]
    batches = [torch.stack([tensors[i] for i in b]) for b in plan_batches(grids, a.batch_size)]  # as extract
    with torch.inference_mode():
        bb(batches[0][:1])
        t = time.perf_counter()
        for x in batches:
            bb(x)
        bare = len(items) / (time.perf_counter() - t)
    out(stage="extract", what="bare forward on pre-decoded tensors", img_per_s=round(bare, 3), n=len(items))
    with tempfile.TemporaryDirectory() as d:
        lst = Path(d) / "list.txt"
        lst.write_text("\n".join(it.path for it in items))
        t = time.perf_counter()
        extract(
            [str(lst)],
            str(Path(d) / "f.h5"),
            backbone=a.backbone,
            random_weights=a.random_weights,
            short_side=a.short_side,
            batch_size=a.batch_size,
            workers=a.workers,
        )
        e2e = len(items) / (time.perf_counter() - t)
    out(stage="extract", what="acseg extract end to end (incl. model load)", img_per_s=round(e2e, 3), n=len(items))
    with torch.inference_mode():
        t = time.perf_counter()
        for it, g in zip(items, grids):
            x = torch.from_numpy(resize_normalise(load_rgb(it.path), g, pre.patch, pre.mean, pre.std))[None]
            bb(x)
        loop = len(items) / (time.perf_counter() - t)
    out(stage="extract", what="batch-1 loop: decode, resize, forward", img_per_s=round(loop, 3), n=len(items))
    out(stage="extract", ratio_end_to_end_vs_bare=round(e2e / bare, 3), ratio_end_to_end_vs_batch1=round(e2e / loop, 3))
    # the machine's limit: FLOPs of one forward (counted on the code path extract runs) against the measured
    # rate of a large float32 matrix product, in the same run
    from torch.utils.flop_counter import FlopCounterMode

    def sdpa_flops(q, k, v, *args, out_shape=None, **kw):  # torch's counter has no formula for the CPU kernel
        b, h, n, e = q
        return 4 * b * h * n * k[-2] * e

    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping={cpu_sdpa: sdpa_flops}) as fc:
        bb(batches[0][:1])
    flops = fc.get_total_flops()
    peak = gemm_peak_gflops()
    out(
        stage="extract",
        gflop_per_image=float(f"{flops / 1e9:.4g}"),
        gemm_peak_gflop_s=round(peak, 1),
        bare_gflop_s=float(f"{flops * bare / 1e9:.4g}"),
        ratio_bare_vs_gemm_peak=round(flops * bare / 1e9 / peak, 3),
        ratio_end_to_end_vs_gemm_peak=round(flops * e2e / 1e9 / peak, 3),
    )


def gemm_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a float32 n x n matrix product on this machine (best of ``repeats``)."""
    import torch

    x, y = torch.randn(n, n), torch.randn(n, n)
    torch.mm(x, y)
    best = min(_timed(lambda: torch.mm(x, y)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def bench_extract_memory(a):
    from stages.images import discover

    items = discover([a.images])
    res = {}
    with tempfile.TemporaryDirectory() as d:
        for n in (50, 500):
            sub = Path(d) / f"imgs{n}"
            sub.mkdir()
            for i in range(n):
                it = items[i % len(items)]
                os.symlink(it.path, sub / f"{i:04d}_{Path(it.path).name}")
            cmd = [
                sys.executable,
                "-m",
                "acseg_cli",
                "extract",
                str(sub),
                "-o",
                str(Path(d) / f"f{n}.h5"),
                "--short-side",
                str(a.short_side),
                "-q",
            ]
            t = time.perf_counter()
            res[n] = peak_rss_mb(cmd)
            out(
                stage="extract",
                what=f"peak RSS, {n} images, short side {a.short_side}",
                peak_rss_mb=round(res[n]),
                seconds=round(time.perf_counter() - t, 1),
            )
    out(stage="extract", ratio_peak_memory_500_vs_50=round(res[500] / res[50], 3))


def _naive_score(pairs, ignore=11, k=11):
    from PIL import Image

    preds, gts = [], []
    for p, g in pairs:
        preds.append(np.asarray(Image.open(p)).ravel())
        gts.append(np.asarray(Image.open(g)).ravel())
    pred, gt = np.concatenate(preds).astype(np.int64), np.concatenate(gts).astype(np.int64)
    valid = gt != ignore
    pred, gt = pred[valid], gt[valid]
    ids = np.unique(pred)
    inter = np.array([[np.sum((pred == i) & (gt == c)) for c in range(k)] for i in ids])
    return inter


def bench_score(a):
    from PIL import Image

    from stages.score import pair_files, read_label_map, score

    pairs, _ = pair_files(a.pred, a.gt)

    def best(f, n=5):  # best of n: this VM's timings vary by 2x from run to run
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return min(ts)

    dec = best(lambda: [(read_label_map(p, "p"), read_label_map(g, "g")) for _, p, g in pairs])
    sc1 = best(lambda: score(a.pred, a.gt, dataset=a.dataset, workers=1))
    sc2 = best(lambda: score(a.pred, a.gt, dataset=a.dataset, workers=2))
    naive = best(lambda: _naive_score([(p, g) for _, p, g in pairs]), n=1)
    out(
        stage="score",
        n_pairs=len(pairs),
        decode_only_s=round(dec, 3),
        score_1_worker_s=round(sc1, 3),
        score_2_workers_s=round(sc2, 3),
        naive_flatten_s=round(naive, 3),
        ratio_score_1_worker_vs_decode=round(sc1 / dec, 3),
        ratio_score_2_workers_vs_decode=round(sc2 / dec, 3),
        ratio_naive_vs_score=round(naive / sc1, 2),
        timing="best of 5",
    )
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        for n in (100, 2000):
            pd, gd = Path(d) / f"p{n}", Path(d) / f"g{n}"
            pd.mkdir()
            gd.mkdir()
            for i in range(n):
                Image.fromarray(rng.integers(0, 12, (120, 160), dtype=np.uint8)).save(pd / f"{i:05d}.png")
                Image.fromarray(rng.integers(0, 12, (120, 160), dtype=np.uint8)).save(gd / f"{i:05d}.png")
            cmd = [
                sys.executable,
                "-m",
                "acseg_cli",
                "score",
                str(pd),
                str(gd),
                "-d",
                "camvid11",
                "-q",
                "--no-confusion",
            ]
            t = time.perf_counter()
            rss = peak_rss_mb(cmd)
            out(
                stage="score",
                what=f"synthetic {n} pairs 160x120",
                peak_rss_mb=round(rss),
                seconds=round(time.perf_counter() - t, 2),
            )


def bench_fit(a):
    """A fit-acg step on synthetic tokens (one batch of --batch-size images, every step the same), with each
    step's graphs rebuilt (``soft_modularity``, as on a GPU) and kept (``graphs``, the CPU's path), alternated
    in one process, under the fit-acg command's malloc settings; steps/s and their ratio. The whole command:
    ``ab.py --method fit``."""
    import numpy as np
    import torch

    from acseg_cli.process import keep_heap

    keep_heap()

    from stages.acg import create_acg
    from stages.graphs import GraphBatch, GraphCache, graph_modularity, kernel_available
    from stages.modularity import assignment, modularity_loss

    torch.manual_seed(0)
    x = torch.randn(a.batch_size, a.tokens, 384)
    mask = torch.ones(a.batch_size, a.tokens, dtype=torch.bool)
    m = create_acg(dim=384)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    cache = GraphCache(np.full(a.batch_size, a.tokens), 1 << 34) if kernel_available() else None

    def step(kept):
        xc = m.prepare(x)
        s = assignment(xc, m(xc, mask))
        if kept:
            batch = GraphBatch(cache)
            for b in range(a.batch_size):
                batch.add_cached(cache.graph_offset(b, lambda b=b: xc[b].detach()), a.tokens, None)
            loss = -graph_modularity(batch, s, mask).mean()
        else:
            loss, _ = modularity_loss(xc, s, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()

    sides = ("rebuilt", "kept") if cache is not None else ("rebuilt",)
    times = {side: [] for side in sides}
    for side in sides:
        step(side == "kept")  # warm-up (and the graphs, and numba's compilation)
    for _ in range(a.steps):
        for side in sides:
            t = time.perf_counter()
            step(side == "kept")
            times[side].append(time.perf_counter() - t)
    sps = {side: 1 / float(np.median(v)) for side, v in times.items()}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out(
        stage="fit-acg",
        batch=a.batch_size,
        tokens=a.tokens,
        **{f"steps_per_s_graphs_{side}": round(v, 3) for side, v in sps.items()},
        **({"ratio_kept_vs_rebuilt": round(sps["kept"] / sps["rebuilt"], 2)} if cache is not None else {}),
        peak_rss_mb=round(rss),
        note="median step; process peak RSS, includes torch and the batch",
    )


def _full_square_soft_modularity(wn, sbar, tau, block):
    """The soft modularity and its gradient over the whole N x N square, row block by row block: acseg's loss
    before it took the upper triangle (kept here as the baseline of ``speed.py loss``)."""
    import torch

    B, N, K = sbar.shape
    q, grad = sbar.new_zeros(B), sbar.new_zeros(B, N, K)
    st = sbar.transpose(1, 2)
    for r0 in range(0, N, block):
        r1 = min(N, r0 + block)
        m, arg = (sbar[:, r0:r1, None, :] * sbar[:, None, :, :]).max(-1)
        w = wn[:, r0:r1]
        if tau is None:
            f, g = m, w
        else:
            d = torch.tanh(m / tau)
            f, g = d, w * (1 - d * d) / tau
        q += (w * f).sum((1, 2))
        grad[:, r0:r1].scatter_add_(2, arg, g * torch.gather(st, 1, arg))
    return q, grad.mul_(2)


def bench_loss(a):
    """The modularity loss with its gradient (the graph given), acseg's against the full-square computation,
    alternated in one process; the median of --repeats each. Batch --batch-size, --tokens per image, k = 5."""
    import torch

    from stages.modularity import _SoftModularity, modularity_matrix

    class Ctx:  # what autograd hands the forward: a gradient is wanted for the assignment
        needs_input_grad = (False, True)

        def save_for_backward(self, g):
            self.grad = g

    torch.manual_seed(0)
    x, s = torch.randn(a.batch_size, a.tokens, 384), torch.rand(a.batch_size, a.tokens, 5)
    wn = modularity_matrix(x)
    block = max(1, min(a.tokens, (2 << 20) // (a.batch_size * a.tokens * 5)))
    for tau in (None, 0.1):
        times = {"acseg": [], "full_square": []}
        for _ in range(a.repeats):
            ctx = Ctx()
            t = time.perf_counter()
            q = _SoftModularity.forward(ctx, wn, s, tau, block)
            times["acseg"].append(time.perf_counter() - t)
            t = time.perf_counter()
            q_ref, g_ref = _full_square_soft_modularity(wn, s, tau, block)
            times["full_square"].append(time.perf_counter() - t)
        med = {k: float(np.median(v)) for k, v in times.items()}
        out(
            stage="loss",
            delta="plain" if tau is None else "tanh",
            batch=a.batch_size,
            tokens=a.tokens,
            acseg_ms=round(1e3 * med["acseg"], 1),
            full_square_ms=round(1e3 * med["full_square"], 1),
            ratio_speed=round(med["full_square"] / med["acseg"], 2),
            max_abs_dq=float((q - q_ref).abs().max()),
            max_abs_dgrad=float((ctx.grad - g_ref).abs().max()),
        )


def bench_fit_store(a):
    """The whole fit loop on a real store, batches gathered from the tokens held in memory (``--preload``)
    against batches read from the file (``--stream``), alternated. Steps per second over the logged steps
    after the first (the fit's own clock: setup, the mean, the whitening and the saving are left out)."""
    import tempfile

    import torch

    from stages.config import ACGConfig, TrainConfig
    from stages.fit import fit_acg

    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, max_tokens=a.tokens, log_every=max(1, a.steps // 10))
    rates = {"preload": [], "stream": []}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(a.repeats):
            for name in rates:
                r = fit_acg(
                    a.features,
                    str(Path(d) / f"{name}.pt"),
                    acg=ACGConfig(),
                    train=cfg,
                    device=dev,
                    overwrite=True,
                    preload=name == "preload",
                )
                h = r.history
                rates[name].append((h[-1]["step"] - h[1]["step"]) / (h[-1]["seconds"] - h[1]["seconds"]))
    med = {k: float(np.median(v)) for k, v in rates.items()}
    out(
        stage="fit-acg (whole loop)",
        device=dev if dev == "cpu" else torch.cuda.get_device_name(),
        batch=a.batch_size,
        max_tokens=a.tokens,
        steps=a.steps,
        threads=torch.get_num_threads(),
        runs={k: [round(x, 3) for x in v] for k, v in rates.items()},
        median_steps_per_s={k: round(v, 3) for k, v in med.items()},
        ratio_preload_vs_stream_median=round(med["preload"] / med["stream"], 3),
    )


def bench_conceptualize(a):
    import torch
    from sklearn.cluster import KMeans

    import stages.conceptualize as cmod
    from stages.conceptualize import conceptualize
    from stages.features import FeatureStore
    from stages.modularity import nearest_direction
    from stages.precision import DTYPE_NAMES, inference_dtype

    with FeatureStore(a.features) as st:
        toks = st.read_range(0, st.n_images)
        ntok = int(np.mean([len(t) for t in toks]))

    def sklearn_rate():
        t = time.perf_counter()
        for x in toks:
            xn = x / np.linalg.norm(x, axis=1, keepdims=True)
            KMeans(5, n_init=1, random_state=0).fit(xn)
        return len(toks) / (time.perf_counter() - t)

    def sklearn_per_image(x, mask, k, *, seed=0, **_):
        """``batched_kmeans``'s contract, each image by scikit-learn's KMeans(k, n_init=1) on its valid tokens."""
        cents, labs = torch.zeros(x.shape[0], k, x.shape[2]), torch.zeros(x.shape[:2], dtype=torch.long)
        x, mask = x.cpu(), mask.cpu()  # scikit-learn runs on the CPU wherever the stage runs
        for b in range(x.shape[0]):
            xb = x[b][mask[b]].numpy()
            km = KMeans(k, n_init=1, random_state=seed + b).fit(xb)
            cents[b], labs[b, : len(xb)] = torch.from_numpy(km.cluster_centers_), torch.from_numpy(km.labels_)
        return cents, labs

    # the ACG's per-image work in memory, as the stage does it (a reused float32 batch centred in place, the
    # reused bf16 copy, the forward, the assignment), against scikit-learn in memory: like for like
    from stages.checkpoint import load_checkpoint

    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")  # where the stage runs by default
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    model = load_checkpoint(a.acg).model.eval().to(dev).cast_(inference_dtype("auto", dev))
    xs = torch.from_numpy(np.stack([t for t in toks if len(t) == len(toks[0])])).to(dev)
    buf = torch.empty((a.batch_size,) + xs.shape[1:], device=dev)
    low = (
        torch.empty(buf.shape, dtype=model.prototypes.dtype, device=dev)
        if model.prototypes.dtype != torch.float32 and dev == "cpu"
        else None
    )

    def acg_memory_rate():
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, len(xs), a.batch_size):
                n = min(a.batch_size, len(xs) - s)
                xb = buf[:n].copy_(xs[s : s + n])
                xc, _, directions = model.infer(xb, inplace=True, low=None if low is None else low[:n])
                nearest_direction(xc, directions)
        sync()
        return len(xs) / (time.perf_counter() - t)

    rates = {"acg": [], "acg_fp32": [], "sklearn": [], "sklearn_stage": [], "acseg_kmeans_stage": [], "acg_memory": []}
    with tempfile.TemporaryDirectory() as d:
        conceptualize(a.features, str(Path(d) / "warm.h5"), acg=a.acg, device=dev)  # warm caches, page in the store

        def acg_rate(prec):
            t = time.perf_counter()
            r = conceptualize(
                a.features,
                str(Path(d) / f"c_{prec}.h5"),
                acg=a.acg,
                batch_size=a.batch_size,
                precision=prec,
                overwrite=True,
                device=dev,
            )
            return r.n_images / (time.perf_counter() - t)

        def kmeans_stage_rate(per_image=None):
            """The whole stage with per-image k-means: acseg's own, or scikit-learn's in its place (the same
            reading, summaries and writing as the ACG's runs: like for like)."""
            saved = cmod.batched_kmeans
            cmod.batched_kmeans = per_image or saved
            try:
                t = time.perf_counter()
                r = conceptualize(a.features, str(Path(d) / "k.h5"), method="kmeans", k=5, overwrite=True, device=dev)
                return r.n_images / (time.perf_counter() - t)
            finally:
                cmod.batched_kmeans = saved

        # interleaved, the same number of runs each: this VM's speed drifts by 20-50% within minutes
        for _ in range(a.repeats):
            rates["acg"].append(acg_rate("auto"))
            rates["acg_fp32"].append(acg_rate("fp32"))
            rates["sklearn"].append(sklearn_rate())
            rates["sklearn_stage"].append(kmeans_stage_rate(sklearn_per_image))
            rates["acseg_kmeans_stage"].append(kmeans_stage_rate())
            rates["acg_memory"].append(acg_memory_rate())
    med = {k: float(np.median(v)) for k, v in rates.items()}
    best = {k: max(v) for k, v in rates.items()}
    out(
        stage="conceptualize",
        n_images=len(toks),
        tokens_per_image=ntok,
        threads=torch.get_num_threads(),
        device=dev if dev == "cpu" else torch.cuda.get_device_name(),
        auto_precision=DTYPE_NAMES[inference_dtype("auto", dev)],
        runs={k: [round(x) for x in v] for k, v in rates.items()},
        median_img_per_s={k: round(v, 1) for k, v in med.items()},
        best_img_per_s={k: round(v, 1) for k, v in best.items()},
        ratio_acg_vs_sklearn_kmeans_median=round(med["acg"] / med["sklearn"], 2),
        ratio_acg_stage_vs_sklearn_stage_median=round(med["acg"] / med["sklearn_stage"], 2),
        ratio_acg_stage_vs_acseg_kmeans_stage_median=round(med["acg"] / med["acseg_kmeans_stage"], 2),
        ratio_acg_memory_vs_sklearn_memory_median=round(med["acg_memory"] / med["sklearn"], 2),
        ratio_acg_vs_sklearn_kmeans_best=round(best["acg"] / best["sklearn"], 2),
        ratio_acg_fp32_vs_sklearn_kmeans_median=round(med["acg_fp32"] / med["sklearn"], 2),
    )


def bench_store_memory(a):
    """Peak RSS of `acseg conceptualize` and `acseg fit-acg --stream` on a store and on the same images
    ``--times`` over (a larger store written here from the first): memory must not grow with the store."""
    from stages.features import FeatureStore, features_schema
    from stages.store import StoreWriter

    res = {}
    with tempfile.TemporaryDirectory() as d, FeatureStore(a.features) as st:
        big = Path(d) / f"x{a.times}.h5"
        attrs = {k: st.attr_json(k) for k in ("params", "backbone", "parent")}
        with StoreWriter(big, features_schema(st.dim), attrs) as w:
            for r in range(a.times):
                for s in range(0, st.n_images, 64):
                    e = min(st.n_images, s + 64)
                    w.append(
                        {
                            "grid": st.grid[s:e],
                            "image_size": st.image_size[s:e],
                            "sources": st.sources[s:e],
                            "names": [f"copy{r}/{n}" for n in st.names[s:e]],
                        },
                        {
                            "tokens": [t.astype(np.float16) for t in st.read_range(s, e)],
                            "cls_attn": st.read_range(s, e, "cls_attn"),
                        },
                    )
        for name, path in (("store", a.features), (f"{a.times}x", str(big))):
            n = st.n_images * (1 if name == "store" else a.times)
            cmds = {
                "conceptualize": [
                    "conceptualize",
                    path,
                    "--acg",
                    a.acg,
                    "-o",
                    str(Path(d) / "c.h5"),
                    "--overwrite",
                    "-q",
                ],
                "fit-acg --stream": [
                    "fit-acg",
                    path,
                    "-o",
                    str(Path(d) / "a.pt"),
                    "--steps",
                    str(a.steps),
                    "--stream",
                    "--overwrite",
                    "-q",
                ],
            }
            for stage, args in cmds.items():
                res[stage, name] = peak_rss_mb([sys.executable, "-m", "acseg_cli", *args])
                out(
                    stage=stage,
                    images=n,
                    store_mb=round(os.path.getsize(path) / 2**20),
                    peak_rss_mb=round(res[stage, name]),
                )
    for stage in ("conceptualize", "fit-acg --stream"):
        out(
            stage=stage,
            **{f"ratio_peak_memory_{a.times}x_vs_1x": round(res[stage, f"{a.times}x"] / res[stage, "store"], 3)},
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "what",
        choices=["extract", "extract-memory", "score", "fit", "fit-store", "loss", "conceptualize", "store-memory"],
    )
    ap.add_argument("--images")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--backbone", default="focus-vits14")
    ap.add_argument("--random-weights", action="store_true", help="extract: random backbone weights (smoke tests)")
    ap.add_argument("--short-side", type=int, default=448)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--pred")
    ap.add_argument("--gt")
    ap.add_argument("--dataset", default="camvid11")
    ap.add_argument("--tokens", type=int, default=768)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--features")
    ap.add_argument("--acg")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--times", type=int, default=10, help="store-memory: the larger store holds the images this many times"
    )
    ap.add_argument("--device", help="conceptualize: where the ACG runs (default: cuda when available, else cpu)")
    a = ap.parse_args()
    if a.what in ("fit", "fit-store", "loss") and a.batch_size == 8:
        a.batch_size = 32
    if a.what == "conceptualize" and a.batch_size == 8:
        a.batch_size = 64
    {
        "extract": bench_extract,
        "extract-memory": bench_extract_memory,
        "score": bench_score,
        "fit": bench_fit,
        "fit-store": bench_fit_store,
        "loss": bench_loss,
        "conceptualize": bench_conceptualize,
        "store-memory": bench_store_memory,
    }[a.what](a)


if __name__ == "__main__":
    main()
