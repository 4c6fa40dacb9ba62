"""Configuration: the ACG's and its training's (plain dataclasses), and the values each option that is a choice
takes. Importable without torch, so the command line lists the choices at once."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from . import validate

# The values of the options that are choices (the command line offers exactly these)
METHODS = ("acg", "kmeans")  # conceptualize --method
PRECISIONS = ("auto", "fp32", "bf16")  # conceptualize --precision
EXTRACT_PRECISIONS = PRECISIONS  # extract --precision: the same choices
DELTAS = ("plain", "tanh")  # fit-acg --delta
PROTO_INITS = ("kmeans", "random")  # TrainConfig.proto_init
WEIGHTINGS = ("none", "pixels", "sqrt-pixels")  # classify --weighting
UPSAMPLES = ("bilinear", "nearest")  # classify --upsample
HEAD_KINDS = ("linear", "mlp")  # refine --head-kind
BACKGROUND_SPLITS = ("on", "off")  # classify --background-split
CLUSTERINGS = ("kmeans", "spectral")  # classify --cluster
PROTOCOLS = ("hungarian", "majority", "per-image")  # score --protocol
RESIZES = ("nearest",)  # score --resize-pred


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

    def validate(self) -> "ACGConfig":
        """Refuse values the ACG cannot be built or used with (a usage error naming the fit-acg option)."""
        from . import validate as v

        v.integer(
            "--prototypes",
            self.num_prototypes,
            min=1,
            max=255,
            hint="pass 1..255 (a concept map holds one byte per token)",
        )
        v.integer("--depth", self.depth, min=1)
        v.integer("--heads", self.num_heads, min=0, hint="pass 0 (one per 128 feature dims) or a positive number")
        v.number("--mlp-ratio", self.mlp_ratio, above=0, max=64)
        v.number("--dropout", self.dropout, min=0, below=1)
        return self

    @property
    def heads(self) -> int:
        if self.num_heads > 0:
            return self.num_heads
        # 3 heads for ViT-S: the same CamVid quality as 6 at a lower cost (docs/benchmarks.md)
        return max(1, self.dim // 128) if self.dim % 128 == 0 else 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ACGConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class TrainConfig:
    """How fit-acg trains. ``steps=None`` (the default, ``--steps auto``) trains until the modularity stops
    rising: warm-up, then the peak rate until the mean modularity of the last ``converge_window`` steps rose by
    less than the fraction ``converge_tol`` over the window before, then a linear cool-down to zero over
    ``cooldown_fraction`` of the steps done; at most ``max_steps`` in all. An integer ``steps`` is a fixed
    schedule: warm-up, then cosine decay to zero at that step."""

    steps: int | None = None
    max_steps: int = 2500  # the paper's schedule length: the cap of --steps auto
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int | None = None  # None: 5% of the steps (at most 100); with steps=None, 20 steps
    seed: int = 0
    max_tokens: int = 768  # random token subsample per image above this (bounds the O(N^2) graph)
    keep_diagonal: bool = True
    delta: str = "plain"
    tau: float = 0.1
    proto_init: str = "kmeans"  # "kmeans": prototypes seeded from k-means of a token sample; "random"
    log_every: int = 10
    checkpoint_every: int = 250
    converge_window: int = 50
    converge_tol: float = 0.01
    cooldown_fraction: float = 0.2

    def validate(self) -> "TrainConfig":
        """Refuse values a fit cannot run with (a usage error naming the fit-acg option)."""
        from . import validate as v

        if self.steps is not None:
            v.integer("--steps", self.steps, min=1)
        v.integer("--max-steps", self.max_steps, min=1)
        v.integer("--batch-size", self.batch_size, min=1)
        v.number("--lr", self.lr, above=0, max=10)
        v.number("--weight-decay", self.weight_decay, min=0)
        if self.warmup is not None:
            v.integer("--warmup", self.warmup, min=0)
        v.seed("--seed", self.seed)
        v.integer("--max-tokens", self.max_tokens, min=0, hint="pass 0 (every token) or a positive number")
        v.choice("--delta", self.delta, DELTAS)
        v.number("--tau", self.tau, above=0)
        v.choice("proto_init", self.proto_init, PROTO_INITS)
        v.integer("log_every", self.log_every, min=1)
        v.integer(
            "--checkpoint-every", self.checkpoint_every, min=0, hint="pass 0 (no resume states) or a positive number"
        )
        v.integer("converge_window", self.converge_window, min=1)
        v.number("converge_tol", self.converge_tol, min=0)
        v.number("cooldown_fraction", self.cooldown_fraction, min=0, max=1)
        return self

    @property
    def auto(self) -> bool:
        return self.steps is None

    @property
    def warmup_steps(self) -> int:
        """The linear warm-up's length: as given, else 5% of the schedule (at most 100 steps)."""
        if self.warmup is not None:
            return max(0, int(self.warmup))
        horizon = self.steps if self.steps is not None else 400  # --steps auto: a 400-step schedule's, 20 steps
        return max(1, min(100, round(0.05 * horizon)))

    @property
    def step_limit(self) -> int:
        return self.max_steps if self.steps is None else self.steps

    def describe(self) -> str:
        """The schedule in words, for logs and the implicit fit's announcement."""
        if self.auto:
            return f"until converged, at most {self.max_steps} steps"
        return f"{self.steps} steps"


@dataclass
class HeadConfig:
    """refine's head and its fit (stages/refine.py)."""

    kind: str = "linear"  # linear | mlp
    hidden: int = 256  # the MLP's hidden width
    steps: int = 200  # optimiser steps (each a batch of tokens from all images)
    batch_size: int = 1024  # as good as 8,192 on every half of CamVid and the horses, at an eighth of the work
    lr: float = 1e-2
    weight_decay: float = 1e-4
    max_tokens: int = 1_000_000  # tokens sampled for the fit (all of them when fewer)
    seed: int = 0

    def check(self) -> None:
        validate.choice("--head-kind", self.kind, HEAD_KINDS)
        validate.integer("--hidden", self.hidden, min=1, max=65536)
        validate.integer("--steps", self.steps, min=1, max=10_000_000)
        validate.integer("--batch-size", self.batch_size, min=1, max=1 << 24)
        validate.number("--lr", self.lr, above=0.0, max=10.0)
        validate.number("--weight-decay", self.weight_decay, min=0.0, max=10.0)
        validate.integer("--max-tokens", self.max_tokens, min=1)
        validate.seed("--seed", self.seed)


@dataclass
class PAMRParams:
    """refine's pixel-adaptive refinement on the photo (stages/pamr.py)."""

    iterations: int = 5
    short_side: int = 160  # the working copy's short side (never larger than the photo)
    sigma: float = 0.05  # colour differences are divided by sigma x the local colour spread
    dilations: tuple[int, ...] = field(default=(1, 2, 4, 8, 12, 24))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dilations"] = list(self.dilations)
        return d
