"""acseg score: mIoU and pixel accuracy with the field's matching protocols."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from stages.config import PROTOCOLS, RESIZES
from stages.datasets import DATASETS
from stages.score import confusion_png
from stages.score import score as run_score

from .options import (
    Progress,
    Quiet,
    Verbose,
    choices,
    err_console,
    resolve_input,
    setup_logging,
    stage,
    value_of,
)


def print_table(res: dict) -> None:
    from rich.table import Table

    t = Table(title=f"{res['protocol']} matching, {res['n_images']} images", title_justify="left")
    t.add_column("class")
    t.add_column("IoU", justify="right")
    t.add_column("pixels", justify="right")
    for name, iou, share in zip(res["class_names"], res["per_class_iou"], res["class_pixel_share"]):
        t.add_row(name, "-" if iou is None else f"{100 * iou:.1f}", f"{100 * share:.1f}%")
    t.add_section()
    t.add_row("mIoU", f"{100 * res['miou']:.1f}", "")
    t.add_row("pixel accuracy", f"{100 * res['pixel_accuracy']:.1f}", "")
    err_console.print(t)
    if res.get("unmatched_pixels"):
        err_console.print(
            f"{len(res['unmatched_ids'])} prediction ids were left unmatched; their {res['unmatched_pixels']} pixels "
            f"count as errors (see --protocol majority)"
        )


Dataset = choices("Dataset", DATASETS)
Protocol = choices("Protocol", PROTOCOLS)
Resize = choices("Resize", RESIZES)


@stage
def command(
    pred: Annotated[
        Optional[str],
        typer.Argument(help="Folder of predicted label-map PNGs; '-' reads its path from stdin.", show_default=False),
    ] = None,
    gt: Annotated[
        Optional[str], typer.Argument(help="Folder of ground-truth label-map PNGs.", show_default=False)
    ] = None,
    dataset: Annotated[
        Optional[Dataset],
        typer.Option("--dataset", "-d", help="Label preset of the ground truth (none: its ids are the classes)."),
    ] = None,
    ignore_index: Annotated[
        Optional[List[int]], typer.Option("--ignore-index", help="Ground-truth id to ignore (repeatable).")
    ] = None,
    protocol: Annotated[
        Protocol, typer.Option("--protocol", help="hungarian (one-to-one), majority (many-to-one) or per-image.")
    ] = Protocol("hungarian"),
    pred_suffix: Annotated[
        str, typer.Option("--pred-suffix", help="Suffix of prediction stems to strip before pairing.")
    ] = "",
    gt_suffix: Annotated[
        str, typer.Option("--gt-suffix", help="Suffix of ground-truth stems to strip (e.g. _gtFine_labelIds).")
    ] = "",
    allow_missing: Annotated[
        bool, typer.Option("--allow-missing", help="Score the pairs that exist instead of failing.")
    ] = False,
    resize_pred: Annotated[
        Optional[Resize],
        typer.Option("--resize-pred", help="'nearest' resizes predictions to the ground truth's size."),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", help="PNG decoding processes (0: one per core, at most 4).")] = 0,
    no_confusion: Annotated[
        bool, typer.Option("--no-confusion", help="Leave the confusion matrices out of the JSON.")
    ] = False,
    confusion_png_path: Annotated[
        Optional[str], typer.Option("--confusion-png", help="Draw the matched confusion matrix here.")
    ] = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
):
    """Score label maps against ground truth: one JSON object on stdout, a table on stderr."""
    setup_logging(verbose, quiet)
    if gt is None:
        from .options import fail

        fail("missing GT: pass PRED GT (PRED may be '-' to read its path from stdin)", 2)
    pred = resolve_input(pred)
    if confusion_png_path:  # checked before the scoring: a link, device or input is never replaced
        from stages.output import check_apart, check_output

        check_output(Path(confusion_png_path).absolute(), True, option="--confusion-png")
        check_apart(Path(confusion_png_path), [pred, gt], option="--confusion-png")
    with Progress("score") as bar:
        res = run_score(
            pred,
            gt,
            dataset=value_of(dataset),
            ignore_index=tuple(ignore_index or ()),
            protocol=value_of(protocol),
            pred_suffix=pred_suffix,
            gt_suffix=gt_suffix,
            allow_missing=allow_missing,
            resize_pred=value_of(resize_pred),
            workers=workers,
            include_confusion=True,
            progress=bar,
        )
    if confusion_png_path:
        confusion_png(res, confusion_png_path)
    if not quiet:
        print_table(res)
    if no_confusion:
        res.pop("confusion", None)
        res.pop("matched_confusion", None)
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
