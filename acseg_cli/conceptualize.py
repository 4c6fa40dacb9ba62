"""acseg conceptualize: feature store -> per-image concepts."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from stages.config import METHODS, PRECISIONS, TrainConfig

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
    info,
    resolve_input,
    setup_logging,
    stage,
    steps_option,
    value_of,
)

Method = choices("Method", METHODS)
Precision = choices("Precision", PRECISIONS)


@stage
def command(
    features: InputArg = None,
    output: Annotated[
        Optional[str],
        typer.Option("--output", "-o", help="Concepts store to write (default: FEATS stem + .concepts.h5 beside it)."),
    ] = None,
    acg: Annotated[
        Optional[str],
        typer.Option("--acg", help="ACG checkpoint from fit-acg (default: fit one with default settings first)."),
    ] = None,
    method: Annotated[
        Method, typer.Option("--method", help="'acg' (ACSeg) or 'kmeans' (per-image k-means baseline).")
    ] = Method("acg"),
    k: Annotated[
        int,
        typer.Option(
            "-k", "--concepts", help="Concepts per image for --method kmeans (the ACG's k comes from its checkpoint)."
        ),
    ] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the k-means baseline.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch.")] = 64,
    fit_steps: Annotated[
        Optional[str],
        typer.Option(
            "--fit-steps",
            parser=steps_option,
            metavar="auto|N",
            help="Training steps when an ACG is fitted here (no --acg): 'auto' (until converged) or N. A cached ACG "
            "beside the output is reused only when it was fitted on these features with these settings.",
        ),
    ] = "auto",
    precision: Annotated[
        Precision,
        typer.Option(
            "--precision",
            help="ACG arithmetic: 'fp32', 'bf16', or 'auto' = bf16 where the hardware multiplies it natively (CUDA, "
            "AVX512-BF16/AMX CPUs), else fp32. Tokens are centred and assigned in fp32 either way.",
        ),
    ] = Precision("auto"),
    preview: Annotated[
        Optional[str], typer.Option("--preview", help="Write each photo with its concepts overlaid into this folder.")
    ] = None,
    device: Device = None,
    overwrite: Overwrite = False,
    resume: Resume = False,
    as_json: JsonOut = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
):
    """Turn a feature store into per-image concepts; their number adapts to each image (1..k)."""
    setup_logging(verbose, quiet)
    features = resolve_input(features)
    from stages.conceptualize import conceptualize

    with (
        Progress("fit-acg", unit="steps", total_is_bound=fit_steps is None) as fit_bar,
        Progress("conceptualize") as bar,
    ):
        res = conceptualize(
            features,
            output,
            acg=acg,
            method=value_of(method),
            k=k,
            seed=seed,
            batch_size=batch_size,
            device=device,
            precision=value_of(precision),
            overwrite=overwrite,
            resume=resume,
            preview=preview,
            progress=bar,
            fit_train=TrainConfig(steps=fit_steps),
            fit_progress=fit_bar,
        )
    info(
        f"{res.n_images} images, {res.mean_concepts:.2f} concepts per image on average"
        + (
            f"; ACG fitted in {res.fit_steps} steps ({res.fit_stop_reason}) and saved as {res.acg_path}"
            if res.fitted
            else ""
        )
    )
    emit(res.path, as_json, kind="concepts", n_images=res.n_images, mean_concepts=res.mean_concepts, acg=res.acg_path)
