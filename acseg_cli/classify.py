"""acseg classify: concepts -> classes -> label-map PNGs."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from stages.config import BACKGROUND_SPLITS, CLUSTERINGS, UPSAMPLES, WEIGHTINGS

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
    resolve_inputs,
    setup_logging,
    stage,
    value_of,
)

BackgroundSplit = choices("BackgroundSplit", BACKGROUND_SPLITS)
Weighting = choices("Weighting", WEIGHTINGS)
Upsample = choices("Upsample", UPSAMPLES)
Clustering = choices("Clustering", CLUSTERINGS)


@stage
def command(
    concepts: Annotated[
        Optional[List[str]],
        typer.Argument(
            help="Concepts store(s): one, or the parts (shards) of one dataset, clustered together; omitted or '-' "
            "reads the paths from stdin.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Optional[str], typer.Option("--output", "-o", help="Output folder for the label maps and classes.h5.")
    ] = None,
    n_classes: Annotated[
        Optional[int], typer.Option("--n-classes", "-K", help="Number of classes (including background when split).")
    ] = None,
    background_split: Annotated[
        BackgroundSplit,
        typer.Option(
            "--background-split",
            help="'on': split off a background class (class 0) per image, the concepts of low CLS-attention density "
            "(the paper's step); 'off': every concept goes to the clustering. Off by default: on ACSeg's concepts it "
            "lost on street scenes and on figure/ground photos alike.",
        ),
    ] = BackgroundSplit("off"),
    no_background_split: Annotated[
        bool, typer.Option("--no-background-split", hidden=True, help="The same as --background-split off.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Clustering seed.")] = 0,
    n_init: Annotated[
        int, typer.Option("--n-init", help="Restarts of the k-means (in the embedding with spectral).")
    ] = 10,
    weighting: Annotated[
        Weighting,
        typer.Option(
            "--weighting",
            help="Weight of each concept in the clusters' centroids (and in the k-means with --cluster kmeans): "
            "'pixels' (its pixel count, so the classes fit the pixels the score counts), 'sqrt-pixels' or 'none' "
            "(every concept alike).",
        ),
    ] = Weighting("pixels"),
    over_cluster: Annotated[
        int,
        typer.Option(
            "--over-cluster",
            help="Cluster the concepts into this many times -K clusters, then merge similar clusters that seldom "
            "meet in one image until -K remain (1: -K clusters, no merge).",
        ),
    ] = 2,
    exclusivity: Annotated[
        float,
        typer.Option(
            "--exclusivity",
            help="In the merge, how much two clusters' meeting in the same images counts against merging them "
            "(0: by feature similarity alone).",
        ),
    ] = 0.5,
    cluster: Annotated[
        Clustering,
        typer.Option(
            "--cluster",
            help="How the concepts are over-clustered before the merge: 'spectral' (k-means in the spectral "
            "embedding of their nearest-neighbour graph: steadier, and better on street scenes) or 'kmeans' "
            "(weighted k-means on their features, the default before).",
        ),
    ] = Clustering("spectral"),
    neighbours: Annotated[
        str,
        typer.Option(
            "--neighbours",
            help="With --cluster spectral: the neighbour counts of the graph, separated by commas; several: the mean "
            "of their graphs.",
        ),
    ] = "5,10,20",
    upsample: Annotated[
        Upsample, typer.Option("--upsample", help="'bilinear' (smooth) or 'nearest' (blocky).")
    ] = Upsample("bilinear"),
    centroids: Annotated[
        Optional[str],
        typer.Option("--centroids", help="Apply the classes fitted earlier (a classes.h5) instead of clustering."),
    ] = None,
    match_gt: MatchGt = None,
    dataset: GtPreset = None,
    ignore_index: IgnoreIndex = None,
    preview: Preview = None,
    crf: Annotated[
        bool,
        typer.Option(
            "--crf",
            help="Refine each label map with a dense CRF on its photo (needs the optional package pydensecrf2 and the "
            "original photos; replaces --upsample).",
        ),
    ] = False,
    crf_iterations: CrfIterations = 10,
    overwrite: Overwrite = False,
    as_json: JsonOut = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
):
    """Cluster all concepts of a dataset into classes and write one label-map PNG per image."""
    setup_logging(verbose, quiet)
    concepts = resolve_inputs(concepts)
    if not output:
        fail("no output: pass -o OUTDIR", 2)
    from stages.classify import classify
    from stages.crf import CRFParams

    if crf_iterations < 0:
        fail("--crf-iterations must be >= 0; pass 0 (the bilinear map unchanged) or more", 2)

    with Progress("classify") as bar:
        res = classify(
            concepts,
            output,
            n_classes=n_classes,
            background_split="off" if no_background_split else background_split.value,
            seed=seed,
            n_init=n_init,
            weighting=value_of(weighting),
            over_cluster=over_cluster,
            exclusivity=exclusivity,
            cluster=value_of(cluster),
            neighbours=neighbours,
            upsample=value_of(upsample),
            centroids=centroids,
            match_gt=match_gt,
            dataset=value_of(dataset),
            ignore_index=tuple(ignore_index or ()),
            preview=preview,
            crf=crf,
            crf_params=CRFParams(iterations=crf_iterations),
            overwrite=overwrite,
            progress=bar,
        )
    msg = f"{res.n_images} label maps with {res.n_classes} classes in {res.path}"
    if res.score:
        msg += f"; matched to ground truth: mIoU {100 * res.score['miou']:.1f}"
    info(msg)
    emit(
        res.path,
        as_json,
        kind="labelmaps",
        n_images=res.n_images,
        n_classes=res.n_classes,
        classes=res.classes_file,
        miou=res.score["miou"] if res.score else None,
    )
