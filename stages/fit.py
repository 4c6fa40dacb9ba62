"""Stage ``fit-acg``: train the Adaptive Concept Generator on a feature store with the modularity loss.

The training loop. Its parts live beside it: batches (``batches``), the learning-rate schedule
(``schedule``), the start from the data (``initialize``), torchrun (``distributed``), checkpoints
(``checkpoint``), the log and loss curve (``fitlog``); the model (``acg``) and the loss (``modularity``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .acg import AdaptiveConceptGenerator
from .batches import ResidentTokens, batch_indices, preload_budget, read_batch, token_subsample
from .checkpoint import load_resume_state, resume_path, save_checkpoint
from .config import ACGConfig, TrainConfig
from .distributed import setup_distributed
from .errors import AcsegError, UsageError
from .features import FeatureStore
from .fitlog import plot_loss, write_log
from .graphs import GraphBatch, GraphCache, graph_budget, graph_modularity, kernel_available
from .humanize import duration
from .initialize import init_prototypes, mean_token, whitening
from .modularity import assignment, hard_assignment, modularity_loss
from .output import acquire_output_lock, check_apart, check_output, release_output_lock
from .schedule import Schedule
from .validate import device as validate_device

log = logging.getLogger("acseg.fit")


@dataclass
class FitResult:
    path: str
    steps: int
    final_loss: float
    final_modularity: float
    log_path: str
    plot_path: str
    resumed_from: int = 0
    history: list = field(default_factory=list)
    stop_reason: str = ""


def side_paths(out: Path) -> tuple[Path, Path]:
    """The log and loss curve written beside a checkpoint: ``acg.pt`` -> ``acg.log.jsonl``, ``acg.loss.png``;
    a name without ``.pt`` keeps its whole name (``acg.v1`` -> ``acg.v1.log.jsonl``), so two outputs never
    share them."""
    base = out.name[:-3] if out.name.endswith(".pt") and len(out.name) > 3 else out.name
    return out.with_name(base + ".log.jsonl"), out.with_name(base + ".loss.png")


def adamw(params, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where torch has it for the device (CPU since torch 2.4): the same
    update, without some 1,300 small operations per step (2.1 -> 2.9 steps/s at batch 16 on 2 cores, the loss
    curve unchanged to 6 decimals)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


def step_graphs(graphs: GraphCache, train: TrainConfig, step: int, rank: int, world: int, x, mask, image_tokens):
    """The graphs of this rank's images at ``step`` (the images and token samples of ``read_batch``), from the
    cache where they are kept, else from the batch's prepared tokens ``x``."""
    idx = batch_indices(len(graphs.sizes), train.batch_size, train.seed, step)[rank::world]
    batch = GraphBatch(graphs)
    lengths = mask.sum(1).tolist()
    for b, i in enumerate(idx):
        n = int(graphs.sizes[i])
        off = graphs.graph_offset(int(i), lambda i=int(i): image_tokens(i))
        if off >= 0:
            batch.add_cached(off, n, token_subsample(n, train, step, i))
        else:
            batch.add_uncached(x[b, : lengths[b]].detach())
    return batch


def fit_acg(
    features: str,
    output: str,
    *,
    acg: ACGConfig | None = None,
    train: TrainConfig | None = None,
    device: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    preload: bool | None = None,
    announce: int = logging.INFO,
    graph_memory: int | None = None,
) -> FitResult:
    """Train an ACG on the store ``features``; write the checkpoint, a JSON-lines log and a loss plot.

    ``announce``: the logging level of the line that estimates the fit's time after its first steps.
    ``preload``: hold every token on the device and gather each batch there (True), or read each batch from
    the file (False); None chooses by ``preload_budget``. The two give the same batches.
    ``graph_memory``: on the CPU (with numba), bytes of the images' token graphs kept between steps
    (``graphs.GraphCache``; None: ``graph_budget()`` when the tokens are held in memory, else 0); the others
    are built at their steps. The loss curve is that of ``soft_modularity`` (the GPU's path, and the CPU's
    without numba) to float32 rounding."""
    train = (train or TrainConfig()).validate()
    (acg or ACGConfig()).validate()
    device = validate_device(device)
    out = Path(output).absolute()
    check_output(out, overwrite)
    check_apart(out, [features])
    store = FeatureStore(features)
    cfg = acg or ACGConfig()
    cfg = ACGConfig(**{**asdict(cfg), "dim": store.dim})
    cfg = ACGConfig(**{**asdict(cfg), "num_heads": cfg.heads})  # the checkpoint records the number, not "auto"
    if cfg.dim % cfg.heads:
        raise UsageError(f"feature dim {cfg.dim} is not divisible by --heads {cfg.heads}", "choose another --heads")
    prov = {**store.provenance(), "store": store.identity}
    dist, device = setup_distributed(device)
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    if min(train.batch_size, store.n_images) < world:
        raise UsageError(
            f"a batch of {min(train.batch_size, store.n_images)} images cannot be shared by {world} processes",
            "raise --batch-size or start fewer processes",
        )
    log_path, plot_path = side_paths(out)
    for side in (log_path, plot_path):
        check_output(side, overwrite)
        check_apart(side, [features])
    if dist and rank == 0:
        log.info(
            "fit-acg on %d processes (%s): global batch %d",
            world,
            "nccl" if device.startswith("cuda") else "gloo",
            min(train.batch_size, store.n_images),
        )

    lock_fd = acquire_output_lock(out) if rank == 0 else None  # rank 0 alone writes
    try:
        torch.manual_seed(train.seed)
        core = AdaptiveConceptGenerator(cfg)
        if cfg.center or cfg.whiten:
            core.feature_center.copy_(torch.from_numpy(mean_token(store, dist=dist)))
        if cfg.whiten:
            core.feature_whiten.copy_(torch.from_numpy(whitening(store, core.feature_center.numpy(), train.seed)))
        if train.proto_init == "kmeans":
            init_prototypes(core, store, train.seed)
        core = core.to(device)
        model = core
        if dist:
            from torch.nn.parallel import DistributedDataParallel

            # static graph: the key biases get no gradient by design (constant over keys, they drop out of the
            # exact low-rank attention), every step the same
            model = DistributedDataParallel(
                core, device_ids=[dist.local_rank] if device.startswith("cuda") else None, static_graph=True
            )
        opt = adamw(core.parameters(), train)
        start = 0
        history: list[dict] = []
        sched = Schedule(train)
        rp = resume_path(out)
        if resume and os.path.lexists(rp):
            state, why = load_resume_state(rp, train, cfg, prov, world, opt)
            if state is not None:
                core.load_state_dict(state.model.state_dict())
                start = int(state.raw["step"])
                history = json.loads(state.raw.get("history", "[]"))
                sched.load_state(json.loads(state.raw.get("schedule", "{}")))
                torch.set_rng_state(state.raw["torch_rng"])
                log.info("resuming %s at step %d", out.name, start)
            else:
                log.warning("the resume state %s %s; starting afresh", rp.name, why)
        model.train()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if dist else 1  # torchrun's ranks on this machine
        if preload is None:
            preload = ResidentTokens.nbytes(store) <= preload_budget(device, local)
        if preload:
            resident = ResidentTokens(store, device)
            read = lambda step: resident.batch(train, step, rank, world)  # noqa: E731
        else:
            read = lambda step: read_batch(store, train, step, rank, world)  # noqa: E731
        log.debug("fit-acg: batches %s", "gathered from the tokens in memory" if preload else "read from the file")
        graphs = None
        if device == "cpu" and kernel_available():
            sizes = np.diff(np.asarray(store.offsets, np.int64))
            if graph_memory is None:  # kept with the tokens; a streamed fit's memory stays flat with the store
                graph_memory = graph_budget(local) if preload else 0
            graphs = GraphCache(sizes, graph_memory)

            def image_tokens(i: int) -> torch.Tensor:  # all of image i's tokens, prepared as the batches are
                t = resident.image(i) if preload else torch.from_numpy(np.asarray(store.read_many([i])[0], np.float32))
                with torch.no_grad():
                    return core.prepare(t)

        # the next batch is read while a step runs on an accelerator; on the CPU, where both would share the
        # cores (and the GIL), in line: 2.9 against 2.1 steps/s on 2 cores, 3.5 against 3.0 from the file
        prefetch = ThreadPoolExecutor(1) if device != "cpu" else None
        limit = train.step_limit
        nxt = prefetch.submit(read, start) if prefetch and start < limit else None
        t0 = time.monotonic()
        last = {"loss": float("nan"), "modularity": float("nan")}
        n_global = min(train.batch_size, store.n_images)
        step, stop, t_first = start - 1, start >= limit, t0
        if rank == 0:
            log.info("fit-acg: %s of %d images, warm-up %d", train.describe(), n_global, train.warmup_steps)
        while not stop:
            step += 1
            if prefetch:
                x, mask = nxt.result()
                # prefetched speculatively: under --steps auto the fit may stop before step + 1 is needed
                nxt = prefetch.submit(read, step + 1) if step + 1 < limit else None
            else:
                x, mask = read(step)
            x, mask = core.prepare(x.to(device)), mask.to(device)
            lr = sched.lr(step)
            for g in opt.param_groups:
                g["lr"] = lr
            concepts = model(x, mask)
            s = assignment(x, concepts)
            kw = dict(keep_diagonal=train.keep_diagonal, delta=train.delta, tau=train.tau)
            if graphs is not None:
                batch = step_graphs(graphs, train, step, rank, world, x, mask, image_tokens)
                q = graph_modularity(batch, s, mask, **kw)
                loss, q = -q.mean(), q.detach()
            else:
                loss, q = modularity_loss(x, s, mask, **kw)
            if dist:  # this rank's images' share of the global mean (DDP averages gradients over the W ranks)
                loss = loss * (len(q) * world / n_global)
            if not torch.isfinite(loss):
                raise AcsegError(f"the loss became {loss.item()} at step {step}", "lower --lr or check the features")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            q_sum = float(q.sum().item())
            if dist:
                q_sum = float(dist.sum(np.array([q_sum]))[0])
            last = {"loss": -q_sum / n_global, "modularity": q_sum / n_global}
            stop = sched.observe(step, last["modularity"]) or step + 1 >= limit
            logging_step = step % train.log_every == 0 or stop
            if logging_step:
                with torch.no_grad():
                    _, active = hard_assignment(s, mask)
                active_sum = float(active.sum(1).float().sum().item())
                if dist:
                    active_sum = float(dist.sum(np.array([active_sum]))[0])
                rec = {
                    "step": step,
                    **last,
                    "active_concepts": active_sum / n_global,
                    "lr": lr,
                    "seconds": round(time.monotonic() - t0, 3),
                }
                if stop:  # the last line of the log says where and why the fit stopped
                    rec["stop_reason"] = sched.reason or f"stopped at step {step + 1}"
                history.append(rec)
            if rank == 0 and step == start + 2 and not stop:  # the first step pays for start-up; time two more
                per_step = (time.monotonic() - t_first) / 2
                left = (limit - step - 1) * per_step
                msg = (
                    f"fit-acg: about {per_step:.2f} s per step here, so {duration(left)} for the remaining "
                    f"{limit - step - 1} steps"
                    if not train.auto
                    else f"fit-acg: about {per_step:.2f} s per step here; until converged, typically a few hundred "
                    f"steps ({duration(300 * per_step)} for 300), at most {duration(left)} (the cap of {limit})"
                )
                log.log(announce, msg)
            if step == start:
                t_first = time.monotonic()
            if progress and rank == 0:
                phase = (
                    "" if not train.auto else " (until converged)" if sched.decay_from is None else " (cooling down)"
                )
                total = limit if sched.decay_from is None else min(limit, sched.decay_from + sched.decay_len)
                progress(step + 1, total, f"loss {last['loss']:.4f} Q {last['modularity']:.4f}{phase}")
            if rank == 0 and train.checkpoint_every and (step + 1) % train.checkpoint_every == 0 and not stop:
                save_checkpoint(
                    rp,
                    core,
                    prov,
                    {"config": asdict(train)},
                    extra={
                        "optimizer": opt.state_dict(),
                        "step": step + 1,
                        "history": json.dumps(history),
                        "torch_rng": torch.get_rng_state(),
                        "world": world,
                        "schedule": json.dumps(sched.state()),
                    },
                )
        if prefetch:
            prefetch.shutdown()
        if graphs is not None:
            log.debug(
                "fit-acg: %d graphs kept (%.0f MB), %d computed at their steps for want of room",
                int((graphs.offset >= 0).sum()),
                graphs.used * 4 / 2**20,
                graphs.refused,
            )
        core.eval()
        steps_done = step + 1
        reason = sched.reason or f"stopped at step {steps_done}"
        if rank == 0:
            log.info("fit-acg stopped after %d steps: %s", steps_done, reason)
            save_checkpoint(
                out,
                core,
                prov,
                {
                    "config": asdict(train),
                    "final": last,
                    "steps": steps_done,
                    "stop_reason": reason,
                    "processes": world,
                },
            )
            try:
                write_log(log_path, history)
                plot_loss(history, plot_path, title=f"fit-acg {out.name}: {steps_done} steps, loss {last['loss']:.4f}")
            except OSError as e:
                raise AcsegError(
                    f"{out.name} is written, but writing its log or loss curve failed ({e.strerror or e})",
                    "check free disk space; the checkpoint itself is complete",
                ) from None
            if rp.exists():
                rp.unlink()
        if dist:
            dist.barrier()
    finally:
        if lock_fd is not None:
            release_output_lock(out, lock_fd)
        store.close()
        if dist:
            import torch.distributed as td

            td.destroy_process_group()
    return FitResult(
        str(out), steps_done, last["loss"], last["modularity"], str(log_path), str(plot_path), start, history, reason
    )
