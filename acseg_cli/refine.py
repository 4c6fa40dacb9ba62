"""acseg refine: classify's label maps -> a head on the frozen features -> refined label-map PNGs."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from stages.config import HEAD_KINDS, HeadConfig, PAMRParams

from .options import (
    CrfIterations,
    GtPreset,
    IgnoreIndex,
    JsonOut,
    MatchGt,
    Overwrite,
    Preview,
    Progress,
    Quiet,
    Verbose,
    choices,
    emit,
    fail,
    info,
    resolve_input,
    setup_logging,
    stage,
    value_of,
)

HeadKind = choices("HeadKind", HEAD_KINDS)
D = HeadConfig()
P = PAMRParams()


@stage
def command(
    labels: Annotated[
        Optional[str],
        typer.Argument(
            help="The folder classify (or refine) wrote, or its classes.h5; omitted or '-' reads the path from stdin.",
            show_default=False,
        ),
    ] = None,
    features: Annotated[
        Optional[str],
        typer.Option("--features", "-f", help="The feature store the labelled concepts were made from."),
    ] = None,
    output: Annotated[
        Optional[str], typer.Option("--output", "-o", help="Output folder for the label maps, refined.h5, head.npz.")
    ] = None,
    head: Annotated[
        Optional[str],
        typer.Option("--head", help="Apply this fitted head (the head.npz refine wrote) instead of fitting one."),
    ] = None,
    keep: Annotated[
        float,
        typer.Option(
            "--keep", help="Weight of classify's label against the head's probabilities, 0..1 (0: the head alone)."
        ),
    ] = 0.3,
    head_kind: Annotated[
        HeadKind, typer.Option("--head-kind", help="'linear' or 'mlp' (one hidden layer).")
    ] = HeadKind(D.kind),
    hidden: Annotated[int, typer.Option("--hidden", help="Hidden width of the mlp head.")] = D.hidden,
    steps: Annotated[int, typer.Option("--steps", help="Optimiser steps of the fit.")] = D.steps,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Tokens per step.")] = D.batch_size,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (10% warm-up, then cosine decay).")] = D.lr,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="Tokens sampled from all images for the fit.")
    ] = D.max_tokens,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampling and the fit.")] = D.seed,
    match_gt: MatchGt = None,
    dataset: GtPreset = None,
    ignore_index: IgnoreIndex = None,
    preview: Preview = None,
    crf: Annotated[
        bool,
        typer.Option(
            "--crf",
            help="Refine each map with a dense CRF on its photo instead of --pamr, the blended probabilities as its "
            "unary term (needs the optional package pydensecrf2 and the original photos; about a second per photo).",
        ),
    ] = False,
    crf_iterations: CrfIterations = 10,
    pamr: Annotated[
        int,
        typer.Option(
            "--pamr",
            help="Iterations of pixel-adaptive refinement on each photo, which moves the class boundaries onto its "
            "edges (reads the original photos; 0: plain bilinear upsampling, no photos needed).",
        ),
    ] = P.iterations,
    overwrite: Overwrite = False,
    as_json: JsonOut = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
):
    """Train a light head on the frozen features against classify's label maps and relabel every patch."""
    setup_logging(verbose, quiet)
    if not output:
        fail("no output: pass -o OUTDIR", 2)
    if not features:
        fail("no features: pass --features FEATS.h5 (the store the labelled concepts came from)", 2)
    cfg = HeadConfig(
        kind=value_of(head_kind),
        hidden=hidden,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=D.weight_decay,
        max_tokens=max_tokens,
        seed=seed,
    )
    from stages.crf import CRFParams
    from stages.refine import refine

    from .process import keep_heap

    cfg.check()
    labels = resolve_input(labels)
    keep_heap()
    with Progress("refine") as bar:
        res = refine(
            labels,
            features,
            output,
            head=head,
            config=cfg,
            keep=keep,
            match_gt=match_gt,
            dataset=value_of(dataset),
            ignore_index=tuple(ignore_index or ()),
            preview=preview,
            crf=crf,
            crf_params=CRFParams(iterations=crf_iterations),
            pamr=PAMRParams(iterations=pamr),
            overwrite=overwrite,
            progress=bar,
        )
    how = "fitted" if res.fitted else "applied"
    info(
        f"{res.n_images} label maps with {res.n_classes} classes in {res.path}; head {how} ({res.head_file}); "
        f"{100 * res.changed:.1f}% of patches relabelled"
        + (f"; matched to ground truth: mIoU {100 * res.score['miou']:.1f}" if res.score else "")
    )
    emit(
        res.path,
        as_json,
        kind="labelmaps",
        n_images=res.n_images,
        n_classes=res.n_classes,
        head=res.head_file,
        miou=res.score["miou"] if res.score else None,
    )
