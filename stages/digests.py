"""Content hashes: of files, and of weights (a state dict) as acseg records them in its artifacts."""

from __future__ import annotations

import hashlib
import os

import numpy as np

# How a state dict is hashed. Both schemes are recorded in files already written, so neither can change:
#   "acg"      per tensor in name order: "name|dtype|shape|" then its bytes as stored (ACG checkpoints)
#   "backbone" per tensor in name order: its name, then its values as float32 bytes (a backbone's weights, in
#              every feature store and in the provenance of every checkpoint fitted on one)
WEIGHT_SCHEMES = ("acg", "backbone")


def weights_sha256(state_dict: dict, scheme: str = "acg") -> str:
    """sha256 of a state dict's tensors under ``scheme`` (``WEIGHT_SCHEMES``)."""
    if scheme not in WEIGHT_SCHEMES:
        raise ValueError(f"unknown weights hash scheme {scheme!r}")
    import torch

    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = state_dict[k].detach()
        if scheme == "acg":
            v = v.cpu().contiguous()
            h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
            h.update(v.view(-1).view(torch.uint8).numpy() if v.numel() else b"")
        else:
            h.update(k.encode())
            h.update(v.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """sha256 of named numpy arrays, in name order: "name|dtype|shape|" then their C-order bytes (numpy's dtype
    names, so not the "acg" scheme's torch names: a refine head's weights, written without torch)."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        v = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.tobytes())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, bufsize: int = 1 << 22) -> str:
    """sha256 of a file, read into one reused buffer rather than a fresh bytes object per read."""
    h = hashlib.sha256()
    buf = bytearray(bufsize)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
