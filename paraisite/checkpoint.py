"""ParAIsite checkpoints: a trained model of one split, loadable with ``weights_only=True``.

    format        "paraisite.checkpoint"
    version       1
    init          rw | fe | fe+af | rw+af
    dataset       the training dataset
    split         split index k (its seed)
    epoch         epochs trained when saved
    selection     "best" (lowest validation loss) or "final"
    transform     {"mean", "std"} of the target transform
    megnet_config MEGNetConfig.to_dict()
    state_dict    ParAIsite parameters and buffers
    sha256        digest of state_dict, checked on load (megnet_pt.checkpoint.tensors_sha256)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from megnet_pt import MEGNet, MEGNetConfig
from megnet_pt.checkpoint import CheckpointError, atomic_save, check_digest, load_plain, tensors_sha256

from .model import ParAIsite
from .transform import TargetTransform

FORMAT = "paraisite.checkpoint"
VERSION = 1


def save_model(model: ParAIsite, transform: TargetTransform, path: str | Path, **meta: Any) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save({"format": FORMAT, "version": VERSION, **meta, "transform": transform.to_dict(),
                 "megnet_config": model.megnet.config.to_dict(), "state_dict": state,
                 "sha256": tensors_sha256(state)}, path)


def read_model_checkpoint(path: str | Path) -> dict[str, Any]:
    payload = load_plain(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a ParAIsite checkpoint (format {FORMAT} v{VERSION})")
    check_digest(payload, "state_dict", path)
    return payload


def load_model_file(path: str | Path) -> tuple[ParAIsite, TargetTransform, dict[str, Any]]:
    """Model (eval mode), its target transform and the checkpoint's metadata."""
    payload = read_model_checkpoint(path)
    model = ParAIsite(MEGNet(MEGNetConfig.from_dict(payload["megnet_config"])))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the ParAIsite model ({str(exc).splitlines()[0]})") from exc
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "sha256")}
    return model.eval(), TargetTransform(**payload["transform"]), meta
