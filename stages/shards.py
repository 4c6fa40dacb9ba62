"""Shards: one input list split over many processes (``merge`` joins their stores into one).

``extract --shard i/N`` plans the batches of the *whole* input list (grid-grouped batches ordered by their
first image, as an unsharded run does) and processes the contiguous batch range ``[i*B/N, (i+1)*B/N)``.
Every image is therefore computed in exactly the batch an unsharded run would put it in, which is what
makes a merged store bit for bit equal to the unsharded one (batch composition changes floating-point
results on most kernels). Each shard store records the plan: the names of all inputs, each input's batch
(``shard_plan/names``, ``shard_plan/batch``; -1 = unreadable header) and its own range (``shard`` attribute),
so ``merge`` can tell which images are missing or present twice, by name.

Later stages keep the ``shard`` attribute and plan of their input, so concepts computed shard by shard
merge the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from .errors import AcsegError, UsageError
from .store import Store, decode_names

PLAN_NAMES = "shard_plan/names"
PLAN_BATCH = "shard_plan/batch"
SHARD_ATTR = "shard"


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` (0-based i, as Slurm's array ids) -> (i, N)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise UsageError(f"--shard {text!r} is not of the form i/N", "write e.g. --shard 0/4 (shards 0..N-1)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise UsageError(
            f"--shard {text}: the index must be in 0..N-1 and N >= 1", "write e.g. --shard 3/4 for the last of 4"
        )
    return i, n


def shard_range(n_batches: int, index: int, count: int) -> tuple[int, int]:
    """The contiguous batch range of shard ``index`` of ``count``: sizes differ by at most one batch."""
    return index * n_batches // count, (index + 1) * n_batches // count


def plan_datasets(names: list[str], batch_of: np.ndarray) -> dict[str, np.ndarray]:
    return {PLAN_NAMES: np.array(names, dtype=object), PLAN_BATCH: np.asarray(batch_of, np.int32)}


def copy_plan(store: Store) -> dict[str, np.ndarray]:
    """The plan datasets of a store (empty when it is not a shard), to pass on to a child store."""
    if not has_plan(store):
        return {}
    return plan_datasets(decode_names(store.read(PLAN_NAMES)), store.read(PLAN_BATCH))


def has_plan(store: Store) -> bool:
    return store.has(PLAN_NAMES) and store.has(PLAN_BATCH)


@dataclass
class ShardInfo:
    path: str
    index: int
    count: int
    b0: int
    b1: int
    n_batches: int
    header_skipped: int


def shard_info(store: Store) -> ShardInfo | None:
    raw = store.attr(SHARD_ATTR)
    if raw is None:
        return None
    try:
        s = json.loads(raw)
        b0, b1 = (int(x) for x in s["batches"])
        info = ShardInfo(
            str(store.path),
            int(s["index"]),
            int(s["count"]),
            b0,
            b1,
            int(s["n_batches"]),
            int(s.get("header_skipped", 0)),
        )
    except (TypeError, ValueError, KeyError):
        raise AcsegError(f"{store.path}: its shard attribute is damaged", "re-run the stage that made it") from None
    return info
