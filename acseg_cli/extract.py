"""acseg extract: images -> feature store."""

from __future__ import annotations

import sys
from typing import Annotated, List, Optional

import typer

from stages.config import EXTRACT_PRECISIONS
from stages.presets import DEFAULT_BACKBONE, DEFAULT_FEATURE, FEATURE_KINDS, PRESETS

from .backbones import print_backbones
from .options import (
    Device,
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
    setup_logging,
    stage,
    value_of,
)

Backbone = choices("Backbone", PRESETS)
Feature = choices("Feature", FEATURE_KINDS)
Precision = choices("Precision", EXTRACT_PRECISIONS)


@stage
def command(
    inputs: Annotated[
        Optional[List[str]],
        typer.Argument(
            help="Image files, folders (searched recursively) or .txt lists of image paths; '-' reads a list from "
            "stdin.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Feature store to write (.h5).")] = None,
    backbone: Annotated[
        Backbone, typer.Option("--backbone", "-b", help="Backbone preset (see --list-backbones).")
    ] = Backbone(DEFAULT_BACKBONE),
    weights: Annotated[
        Optional[str], typer.Option("--weights", help="Local weights file (.pth/.safetensors) for the backbone.")
    ] = None,
    random_weights: Annotated[
        bool, typer.Option("--random-weights", help="Random backbone weights (tests only).")
    ] = False,
    short_side: Annotated[
        Optional[int],
        typer.Option(
            "--short-side", help="Resize the short side to this (default: the backbone's, e.g. 448 for patch 14)."
        ),
    ] = None,
    feature: Annotated[
        Feature,
        typer.Option(
            "--feature",
            help="Pixel features: 'keys' (the block's attention keys, heads side by side) or 'tokens' (the block's "
            "output after the final norm).",
        ),
    ] = Feature(DEFAULT_FEATURE),
    layer: Annotated[
        int, typer.Option("--layer", help="Block whose keys or output are the features (0-based; -1 = last).")
    ] = -1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 8,
    workers: Annotated[int, typer.Option("--workers", help="Decoding worker processes (0 = in the main process).")] = 1,
    device: Device = None,
    precision: Annotated[
        Precision,
        typer.Option(
            "--precision",
            help="What the backbone computes in: auto (bf16 autocast on a GPU, fp32 on a CPU), fp32, or bf16 "
            "(autocast; on a CPU fast only with native bf16, AVX512-BF16 or AMX).",
        ),
    ] = Precision("auto"),
    shard: Annotated[
        Optional[str],
        typer.Option(
            "--shard",
            help="Process only shard i of N (0-based, e.g. 3/16) of the input list; join the shard stores with 'acseg "
            "merge'.",
        ),
    ] = None,
    max_aspect: Annotated[
        float,
        typer.Option(
            "--max-aspect",
            help="Skip images whose long side exceeds this many times the short side (their patch count, and memory, "
            "grow with it).",
        ),
    ] = 8.0,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail on the first unreadable image instead of skipping it.")
    ] = False,
    list_backbones: Annotated[
        bool, typer.Option("--list-backbones", help="List the backbone presets and exit.")
    ] = False,
    overwrite: Overwrite = False,
    resume: Resume = False,
    as_json: JsonOut = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
):
    """Extract frozen ViT patch features (and CLS attention) from images into an HDF5 feature store."""
    setup_logging(verbose, quiet)
    if list_backbones:
        print_backbones()
        return
    if not inputs:
        fail("no input: pass image files or folders (or '-' with a list on stdin)", 2)
    if not output:
        fail("no output: pass -o FEATS.h5", 2)
    list_text = None
    if "-" in inputs:
        if sys.stdin is None or sys.stdin.isatty():
            fail("no input: '-' needs a list of image paths on stdin", 2)
        list_text = sys.stdin.read()
        inputs = [i for i in inputs if i != "-"]
    from stages.extract import extract as run_extract

    from .process import bound_heap

    bound_heap()

    with Progress("extract") as bar:
        res = run_extract(
            inputs,
            output,
            backbone=value_of(backbone),
            weights=weights,
            random_weights=random_weights,
            short_side=short_side,
            feature=value_of(feature),
            layer=layer,
            batch_size=batch_size,
            workers=workers,
            device=device,
            strict=strict,
            overwrite=overwrite,
            resume=resume,
            list_text=list_text,
            shard=shard,
            max_aspect=max_aspect,
            precision=value_of(precision),
            progress=bar,
        )
    msg = f"extracted {res.n_images} images"
    if res.n_skipped:
        msg += f", skipped {res.n_skipped} unusable (listed above and in the store's 'skipped' attribute)"
    info(msg)
    emit(
        res.path,
        as_json,
        kind="features",
        n_images=res.n_images,
        n_skipped=res.n_skipped,
        resumed_from=res.resumed_from,
    )
