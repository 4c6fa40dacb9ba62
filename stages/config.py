"""Configuration of the ACG and of its training: plain dataclasses, importable without torch."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass
class ACGConfig:
    dim: int = 384
    num_prototypes: int = 5
    depth: int = 6
    num_heads: int = 0  # 0: one head per 128 feature dims (3 for ViT-S, 6 for ViT-B); fit-acg records the number
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    center: bool = True  # subtract the training set's mean token before the graph, the ACG and the assignment
    whiten: bool = True  # also whiten the centred tokens (regularised ZCA, training-set covariance; implies centring)

    @property
    def heads(self) -> int:
        if self.num_heads > 0:
            return self.num_heads
        # 3 heads for ViT-S: the same CamVid quality as 6 (14.0 vs 14.1 mIoU) at a lower cost (benchmarks/RESULTS.md)
        return max(1, self.dim // 128) if self.dim % 128 == 0 else 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ACGConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class TrainConfig:
    steps: int = 2500
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 100
    seed: int = 0
    max_tokens: int = 2048  # random token subsample per image above this (bounds the O(N^2) graph)
    keep_diagonal: bool = True
    delta: str = "plain"
    tau: float = 0.1
    proto_init: str = "kmeans"  # "kmeans": prototypes seeded from k-means of a token sample; "random"
    log_every: int = 10
    checkpoint_every: int = 250
