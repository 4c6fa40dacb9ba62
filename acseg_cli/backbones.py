"""acseg backbones: the backbone presets and where their weights come from."""

from __future__ import annotations

import json
import sys

from stages.presets import list_backbones

from .options import JsonOut, stage


def print_backbones(as_json: bool = False) -> None:
    rows = list_backbones()
    if as_json:
        for r in rows:
            sys.stdout.write(json.dumps(r, sort_keys=True) + "\n")
        return
    for r in rows:
        mark = " (default)" if r["default"] else ""
        sys.stdout.write(
            f"{r['name']:<20} patch {r['patch']:<3} short side {r['short_side']:<4} {r['timm_name']:<40} "
            f"{r['source']}{mark}\n"
        )


@stage
def command(as_json: JsonOut = False):
    """List the backbone presets, their timm models, default resolution and weight sources."""
    print_backbones(as_json)
