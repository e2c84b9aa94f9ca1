"""Saving and loading MEGNet checkpoints: plain tensors and JSON-like metadata.

A checkpoint is a ``dict`` saved with ``torch.save`` that loads with
``torch.load(path, weights_only=True)``:

    format      "megnet_pt.checkpoint"
    version     1
    name        model name
    config      MEGNetConfig.to_dict()
    elements    the element vocabulary (list of symbols)
    target      {"mean": float, "std": float}: prediction = raw * std + mean
    sources     {file name: sha256} of the files it was converted from
    state_dict  parameters and buffers of ``MEGNet``
    sha256      digest of ``state_dict`` (``tensors_sha256``), checked on load
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

from .elements import ELEMENTS
from .model import MEGNet, MEGNetConfig

FORMAT = "megnet_pt.checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary name, then rename: a kill never leaves half a file under ``path``.

    The temporary name is this process's (and thread's) own, so that two processes saving the same file (the ranks of a
    job converting the published weights on first use) do not take each other's file away.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except RuntimeError as exc:  # torch's writer says "enforce fail at inline_container.cc" for a full disk
        tmp.unlink(missing_ok=True)
        full = shutil.disk_usage(path.parent).free < (64 << 20)
        raise OSError(errno.ENOSPC if full else errno.EIO, f"cannot write ({str(exc).splitlines()[0]})", str(path)) from exc
    except BaseException:  # an OS error, a signal: nothing half-written is left behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def tensors_sha256(obj: Any) -> str:
    """A digest of every tensor in ``obj`` (nested dicts and lists), with its place, dtype and shape.

    Stored beside the weights in every checkpoint written here, so that a
    damaged byte in a file that still unpickles is caught on load.
    """
    digest = hashlib.sha256()

    def walk(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{where}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                walk(value[key], f"{where}/{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{where}/{i}")

    walk(obj, "")
    return digest.hexdigest()


def check_digest(payload: dict[str, Any], key: str, path: str | Path) -> None:
    """Refuse a checkpoint whose ``payload[key]`` does not match its recorded ``sha256`` (files without one pass)."""
    recorded = payload.get("sha256")
    if recorded is not None and recorded != tensors_sha256(payload.get(key)):
        raise CheckpointError(f"{path}: its weights do not match the digest recorded when it was written: the file is "
                              "damaged; delete it and make it again")


def load_plain(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU, with a ``CheckpointError`` naming a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first}); "
                              "it may be truncated or corrupt: delete it and make it again") from exc


def save_checkpoint(model: MEGNet, path: str | Path, name: str, sources: dict[str, str] | None = None) -> Path:
    """Write atomically (temporary name, then rename)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "config": model.config.to_dict(),
        "elements": list(ELEMENTS),
        "target": {"mean": float(model.target_mean), "std": float(model.target_std)},
        "sources": dict(sources or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    payload["sha256"] = tensors_sha256(payload["state_dict"])
    return atomic_save(payload, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate the checkpoint dict (no code is unpickled)."""
    payload = load_plain(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a megnet_pt checkpoint (convert published weights with `python -m megnet_pt.convert`)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} is not supported (expected {VERSION})")
    if list(payload.get("elements", [])) != list(ELEMENTS):
        raise CheckpointError(f"{path}: the checkpoint's element vocabulary differs from megnet_pt's 89-element list")
    check_digest(payload, "state_dict", path)
    return payload


def model_from_state(config: MEGNetConfig, state_dict: dict[str, torch.Tensor], where: str) -> MEGNet:
    """Build a MEGNet and load ``state_dict``, naming every missing, unexpected or mis-shaped key."""
    model = MEGNet(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if wrong:
        problems.append("wrong shapes: " + ", ".join(wrong))
    if problems:
        raise CheckpointError(f"{where}: weights do not fit MEGNet; " + "; ".join(problems))
    model.load_state_dict(state_dict)
    return model.eval()


def load_checkpoint(path: str | Path) -> MEGNet:
    """A ``MEGNet`` in eval mode from a converted checkpoint."""
    payload = read_checkpoint(path)
    try:
        config = MEGNetConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad config in checkpoint ({exc})") from exc
    return model_from_state(config, payload["state_dict"], str(path))
