"""ACG checkpoints: writing and reading them, what a fit may resume from, and whether a checkpoint fits a store.

A checkpoint is a torch file of tensors and plain values, loaded with ``weights_only=True`` so that loading
never runs code; its weights' hash is recorded in it (``digests.weights_sha256``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .acg import AdaptiveConceptGenerator
from .config import ACGConfig, TrainConfig
from .digests import weights_sha256
from .errors import AcsegError
from .output import is_regular, write_atomic

CHECKPOINT_FORMAT = "acseg-acg-1"


def save_checkpoint(
    path: str | os.PathLike, model: AdaptiveConceptGenerator, provenance: dict, train: dict, extra: dict | None = None
) -> None:
    """Atomic write of weights + config + provenance (+ resume state in ``extra``). The weights' hash is
    recorded in the file, so that readers name the model without hashing 58 MB on every load."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    obj = {
        "format": CHECKPOINT_FORMAT,
        "config": model.cfg.to_json(),
        "provenance": json.dumps(provenance, sort_keys=True),
        "train": json.dumps(train, sort_keys=True),
        "state_dict": state,
        "weights_sha256": weights_sha256(state),
    }
    if extra:
        obj.update(extra)
    try:
        write_atomic(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as e:  # torch reports a short write as RuntimeError ("unexpected pos")
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the file could not be written whole"
        raise AcsegError(
            f"writing {path.name} failed ({reason})",
            "check free disk space and permissions; the previous file, if any, is untouched",
        ) from None


def _load_raw(path: str | os.PathLike, mmap: bool = False) -> dict:
    p = Path(path)
    if not p.is_file():
        raise AcsegError(f"checkpoint {path} does not exist", "check the path, or run 'acseg fit-acg' first")
    try:
        # weights_only refuses anything that would run code; mmap maps the tensors instead of copying them
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        kind = (
            "is not a loadable acseg checkpoint"
            if "pickle" in type(e).__name__.lower() or "Unpickl" in str(e)
            else "cannot be read"
        )
        raise AcsegError(
            f"checkpoint {path} {kind} ({type(e).__name__}); nothing in it was executed",
            "pass a checkpoint written by 'acseg fit-acg'",
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise AcsegError(f"{path} is not an acseg ACG checkpoint", "pass a checkpoint written by 'acseg fit-acg'")
    return obj


@dataclass
class LoadedACG:
    model: AdaptiveConceptGenerator
    provenance: dict
    train: dict
    raw: dict

    @property
    def weights_sha256(self) -> str:
        """The weights' hash recorded when the checkpoint was written (``weights_sha256``), or, for a
        checkpoint written before acseg recorded it, computed from the loaded weights."""
        rec = self.raw.get("weights_sha256")
        if isinstance(rec, str) and len(rec) == 64 and all(c in "0123456789abcdef" for c in rec):
            return rec
        return weights_sha256(self.raw["state_dict"])


def _json_object(obj: dict, key: str, default: str | None = None) -> dict:
    """A JSON-object field of a checkpoint, refused in one line when it is missing or of another type."""
    raw = obj.get(key, default)
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise AcsegError(
            f"the checkpoint's {key!r} is not a JSON object", "pass a checkpoint written by 'acseg fit-acg'"
        )
    return value


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> LoadedACG:
    """``mmap``: map the weights from the file (for inference; copy-on-write, so the file is never changed)."""
    obj = _load_raw(path, mmap)
    try:
        cfg = ACGConfig.from_dict(_json_object(obj, "config"))
        if cfg.num_heads == 0:  # written before checkpoints recorded the number, when "auto" meant one per 64 dims
            cfg.num_heads = max(1, cfg.dim // 64) if cfg.dim % 64 == 0 else 1
        prov = _json_object(obj, "provenance")
        train = _json_object(obj, "train", "{}")
        sd = obj.get("state_dict")
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise AcsegError(
                f"checkpoint {path} holds no weights table", "pass a checkpoint written by 'acseg fit-acg'"
            )
        for k, v in sd.items():
            if v.dtype != torch.float32:
                raise AcsegError(
                    f"checkpoint {path} holds {k} as {str(v.dtype).replace('torch.', '')}, not float32",
                    "pass a checkpoint written by 'acseg fit-acg'",
                )
            if not bool(torch.isfinite(v).all()):
                raise AcsegError(
                    f"checkpoint {path} holds NaN or infinite values in {k} (a fit that diverged?)",
                    "re-run 'acseg fit-acg', e.g. with a lower --lr",
                )
        with torch.device("meta"):  # no random initialisation of weights about to be replaced
            model = AdaptiveConceptGenerator(cfg)
        model.load_state_dict(obj["state_dict"], strict=True, assign=True)
    except AcsegError:
        raise
    except Exception as e:
        raise AcsegError(
            f"checkpoint {path} does not match the ACG architecture ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120]})",
            "re-run 'acseg fit-acg' with this acseg version",
        ) from None
    return LoadedACG(model.eval(), prov, train, obj)


def check_compatible(ckpt_prov: dict, store_prov: dict, ckpt_name: str, store_name: str) -> None:
    """A model trained on one backbone/feature kind/dim must not be applied to another."""
    for key in ("backbone", "weights_sha256", "dim", "feature", "layer"):
        a, b = ckpt_prov.get(key), store_prov.get(key)
        if a != b:
            raise AcsegError(
                f"{ckpt_name} was trained on {key}={a} but {store_name} has {key}={b}",
                "use a checkpoint fitted on features of the same backbone and settings, or re-run fit-acg",
            )


def resume_path(out: Path) -> Path:
    """Where a fit writing ``out`` keeps its resume state (``--checkpoint-every``)."""
    return out.with_name(f".{out.name}.resume")


def load_resume_state(
    rp: Path, train: TrainConfig, cfg: ACGConfig, prov: dict, world: int, opt
) -> tuple[LoadedACG | None, str]:
    """The resume state ``rp`` if it can continue this fit, with its optimizer state loaded into ``opt`` (the
    last step, so nothing is changed when it cannot): (state, "") or (None, why not). Its tensors are mapped,
    not read, so a state that claims a huge tensor costs nothing before it is refused."""
    if not is_regular(rp):
        return None, "is not a regular file"
    try:
        state = load_checkpoint(rp, mmap=True)
    except AcsegError:
        return None, "cannot be read"
    raw = state.raw
    if not (
        state.train.get("config") == asdict(train)
        and state.model.cfg == cfg
        and state.provenance.get("store", {}).get("content_sha256") == prov["store"]["content_sha256"]
        and raw.get("world", 1) == world
    ):
        return None, "was made with other settings"
    if not (
        isinstance(raw.get("optimizer"), dict)
        and isinstance(raw.get("step"), int)
        and isinstance(raw.get("torch_rng"), torch.Tensor)
        and raw["torch_rng"].dtype == torch.uint8
        and isinstance(raw.get("history", "[]"), str)
        and isinstance(raw.get("schedule", "{}"), str)
    ):
        return None, "lacks part of the optimizer, step or random state"
    try:
        json.loads(raw.get("history", "[]"))
        json.loads(raw.get("schedule", "{}"))
        opt.load_state_dict(raw["optimizer"])  # checks the groups and sizes before it changes anything
    except Exception:
        return None, "holds an optimizer or history that does not fit"
    return state, ""
