"""acseg merge: shard stores -> one store."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from .options import (
    JsonOut,
    Overwrite,
    Quiet,
    Verbose,
    emit,
    fail,
    info,
    setup_logging,
    stage,
)


@stage
def command(
    shards: Annotated[
        Optional[List[str]],
        typer.Argument(
            help="The shard stores of one split (features from 'extract --shard i/N', or the concepts made from them).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Merged store to write (.h5).")] = None,
    overwrite: Overwrite = False,
    as_json: JsonOut = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
):
    """Join the shard stores of one split into one store, after checking that they share backbone and
    settings and cover every input exactly once (a merged feature store equals an unsharded run, bit for bit)."""
    setup_logging(verbose, quiet)
    if not shards:
        fail("no input: pass the shard stores to merge", 2)
    if not output:
        fail("no output: pass -o MERGED.h5", 2)
    from stages.merge import merge

    res = merge(shards, output, overwrite=overwrite)
    info(f"merged {res.n_shards} shards: {res.n_images} images ({res.kind})")
    emit(res.path, as_json, kind=res.kind, n_images=res.n_images, n_shards=res.n_shards)
