"""acseg fit-acg: train the Adaptive Concept Generator on a feature store."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from stages.config import DELTAS, ACGConfig, TrainConfig

from .options import (
    Device,
    InputArg,
    JsonOut,
    Overwrite,
    Progress,
    Quiet,
    Resume,
    Verbose,
    choices,
    emit,
    fail,
    info,
    resolve_input,
    setup_logging,
    stage,
    steps_option,
    value_of,
    warmup_option,
)

_T, _A = TrainConfig(), ACGConfig()
Delta = choices("Delta", DELTAS)


@stage
def command(
    features: InputArg = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Checkpoint to write (e.g. acg.pt).")] = None,
    prototypes: Annotated[
        int, typer.Option("--prototypes", "-k", help="Number of learnable prototypes k (max concepts per image).")
    ] = _A.num_prototypes,
    depth: Annotated[int, typer.Option("--depth", help="Decoder layers.")] = _A.depth,
    heads: Annotated[
        int, typer.Option("--heads", help="Attention heads (0: one per 128 feature dims, 3 for ViT-S).")
    ] = _A.num_heads,
    mlp_ratio: Annotated[float, typer.Option("--mlp-ratio", help="FFN width / feature dim.")] = _A.mlp_ratio,
    dropout: Annotated[float, typer.Option("--dropout")] = _A.dropout,
    center: Annotated[
        bool, typer.Option("--center/--no-center", help="Subtract the mean token before the graph and the assignment.")
    ] = _A.center,
    whiten: Annotated[
        bool,
        typer.Option(
            "--whiten/--no-whiten",
            help="Also whiten the centred tokens (regularised ZCA from the training covariance; --no-whiten: centring "
            "only).",
        ),
    ] = _A.whiten,
    steps: Annotated[
        Optional[str],
        typer.Option(
            "--steps",
            parser=steps_option,
            metavar="auto|N",
            help="'auto': train until the modularity stops rising (then a short cool-down), at most --max-steps; N: a "
            "fixed schedule of N steps (warm-up, cosine decay).",
        ),
    ] = "auto",
    max_steps: Annotated[
        int, typer.Option("--max-steps", min=1, help="Cap of --steps auto (the paper's schedule length).")
    ] = _T.max_steps,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.")] = _T.batch_size,
    lr: Annotated[float, typer.Option("--lr", help="AdamW peak learning rate.")] = _T.lr,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = _T.weight_decay,
    warmup: Annotated[
        Optional[str],
        typer.Option(
            "--warmup",
            parser=warmup_option,
            metavar="auto|N",
            help="Linear warm-up steps; 'auto': 5% of a fixed schedule (at most 100), 20 with --steps auto.",
        ),
    ] = "auto",
    seed: Annotated[int, typer.Option("--seed")] = _T.seed,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="Random token subsample per image above this many tokens (0 = never).")
    ] = _T.max_tokens,
    zero_diagonal: Annotated[
        bool, typer.Option("--zero-diagonal", help="Zero the graph's self-loops (default: keep them).")
    ] = False,
    delta: Annotated[
        Delta, typer.Option("--delta", help="'plain' product or 'tanh' of the soft same-concept intensity.")
    ] = Delta(_T.delta),
    tau: Annotated[float, typer.Option("--tau", help="Temperature of the tanh delta.")] = _T.tau,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Steps between resume checkpoints (0 = none).")
    ] = _T.checkpoint_every,
    preload: Annotated[
        Optional[bool],
        typer.Option(
            "--preload/--stream",
            help="Hold every token on the device and gather each batch there, or read each batch from the file "
            "(default: preload when the tokens take at most a quarter of the GPU's free memory, or 1 GiB on the "
            "CPU; both give the same batches).",
        ),
    ] = None,
    device: Device = None,
    overwrite: Overwrite = False,
    resume: Resume = False,
    as_json: JsonOut = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
):
    """Train the Adaptive Concept Generator with the modularity loss (only the ACG learns; the ViT is frozen)."""
    rank = int(os.environ.get("RANK", "0") or 0)  # under torchrun, rank 0 alone reports
    setup_logging(verbose, quiet or rank != 0)
    features = resolve_input(features)
    if not output:
        fail("no output: pass -o ACG.pt", 2)
    acg = ACGConfig(
        num_prototypes=prototypes,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        dropout=dropout,
        center=center,
        whiten=whiten,
    )
    train = TrainConfig(
        steps=steps,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        seed=seed,
        max_tokens=max_tokens,
        keep_diagonal=not zero_diagonal,
        delta=value_of(delta),
        tau=tau,
        checkpoint_every=checkpoint_every,
    )
    from stages.fit import fit_acg

    from .process import keep_heap

    if preload is not False:  # --stream asks for memory flat with the store: glibc then returns what is freed
        keep_heap()
    with Progress("fit-acg", unit="steps", total_is_bound=train.auto) as bar:
        res = fit_acg(
            features,
            output,
            acg=acg,
            train=train,
            device=device,
            overwrite=overwrite,
            resume=resume,
            progress=bar,
            preload=preload,
        )
    if rank != 0:
        return
    info(
        f"trained {res.steps} steps ({res.stop_reason}): loss {res.final_loss:.4f}, modularity "
        f"{res.final_modularity:.4f}; log {res.log_path}, curve {res.plot_path}"
    )
    emit(
        res.path,
        as_json,
        kind="acg",
        steps=res.steps,
        stop_reason=res.stop_reason,
        loss=res.final_loss,
        modularity=res.final_modularity,
        log=res.log_path,
        plot=res.plot_path,
    )
