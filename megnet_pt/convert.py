"""Convert the published MEGNet weights (matgl's ``state.pt`` + ``model.json``) to a megnet_pt checkpoint.

    python -m megnet_pt.convert <dir with state.pt and model.json> -o weights/<name>.pt

``state.pt`` is read with ``torch.load(weights_only=True)``: plain tensors
only, no code is unpickled. Every key and shape is checked; the checkpoint
records the config, the target normaliser and the sha256 of both sources.

Key mapping (published -> megnet_pt), after dropping the ``model.`` prefix:

    bond_expansion.rbf.centers           -> distance_expansion.centers
    embedding.layer_node_embedding.*     -> node_embedding.*
    embedding.layer_state_embedding.*    -> state_embedding.*   (models with ntypes_state: the band-gap one)
    blocks.b.{edge,node,state}_func.*    -> blocks.b.{edge,node,state}_dense.*
    blocks.b.conv.{edge,node,state}_func -> blocks.b.conv.{edge,node,state}_mlp
    {node,edge}_s2s.*                    -> {node,edge}_set2set.*
    output_proj.*                        -> output_mlp.*
    {edge,node,state}_encoder.*          -> unchanged
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from .interrupt import os_error
from .checkpoint import CheckpointError, model_from_state, save_checkpoint
from .download import sha256_file
from .model import MEGNet, MEGNetConfig

_RENAMES = [
    (r"^bond_expansion\.rbf\.centers$", "distance_expansion.centers"),
    (r"^embedding\.layer_node_embedding\.", "node_embedding."),
    (r"^embedding\.layer_state_embedding\.", "state_embedding."),
    (r"^blocks\.(\d+)\.conv\.(edge|node|state)_func\.", r"blocks.\1.conv.\2_mlp."),
    (r"^blocks\.(\d+)\.(edge|node|state)_func\.", r"blocks.\1.\2_dense."),
    (r"^(node|edge)_s2s\.", r"\1_set2set."),
    (r"^output_proj\.", "output_mlp."),
]


def rename_key(key: str) -> str:
    key = key.removeprefix("model.")
    for pattern, repl in _RENAMES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


# What each published model predicts, and the names of its integer states (model.json names neither).
PUBLISHED_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "MEGNet-MP-2018.6.1-Eform": ("eform_ev_per_atom", ()),
    "MEGNet-MP-2019.4.1-BandGap-mfi": ("band_gap_ev", ("pbe", "gllb-sc", "hse", "scan")),
}


def config_from_model_json(meta: dict, where: str, name: str = "") -> tuple[MEGNetConfig, float, float]:
    """MEGNetConfig and the target normaliser (mean, std) from matgl's model.json (``name``: the model's, for
    what it predicts)."""
    try:
        kwargs = meta["kwargs"]
        args = kwargs["model"]["init_args"]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: model.json has no kwargs.model.init_args ({exc})") from exc
    unsupported = {
        "activation_type": ("softplus2",),
        "nlayers_set2set": (1,),
        "include_state": (True,),
        "is_classification": (False,),
        "dropout": (None, 0, 0.0),
    }
    for key, allowed in unsupported.items():
        if key in args and args[key] not in allowed:
            raise CheckpointError(f"{where}: model.json {key}={args[key]!r} is not supported (expected one of {allowed})")
    config = MEGNetConfig(
        dim_node_embedding=int(args["dim_node_embedding"]),
        num_gaussians=int(args["dim_edge_embedding"]),
        gaussian_gamma=float(args.get("gauss_width", 0.5)),
        dim_state=int(args["dim_state_embedding"]),
        num_state_types=int(args["ntypes_state"]) if args.get("ntypes_state") else None,
        num_blocks=int(args["nblocks"]),
        hidden_encoder=tuple(args["hidden_layer_sizes_input"]),
        hidden_dense=tuple(args["hidden_layer_sizes_input"]),
        hidden_conv=tuple(args["hidden_layer_sizes_conv"]),
        hidden_output=tuple(args["hidden_layer_sizes_output"]),
        set2set_steps=int(args["niters_set2set"]),
        cutoff=float(args["cutoff"]),
    )
    if config.num_state_types is not None and config.num_state_types < 1:
        raise CheckpointError(f"{where}: model.json ntypes_state={args['ntypes_state']!r} is not a number of states")
    target, states = PUBLISHED_TARGETS.get(name, ("prediction", ()))
    config.target_name = target
    config.state_names = states or tuple(str(k) for k in range(config.num_state_types or 0))
    mean, std = 0.0, 1.0
    transformer = kwargs.get("target_transformer")
    if transformer:
        m = re.search(r"Mean\s*[=:]\s*([-+0-9.eE]+).*Std\s*[=:]\s*([-+0-9.eE]+)", str(transformer))
        if not m:
            raise CheckpointError(f"{where}: cannot read the target normaliser from {transformer!r}")
        mean, std = float(m.group(1)), float(m.group(2))
    return config, mean, std


def convert_published(folder: str | Path) -> tuple[MEGNet, dict[str, str]]:
    """Load ``folder/state.pt`` + ``folder/model.json`` into a ``MEGNet``; returns the model and source hashes."""
    folder = Path(folder)
    state_path, json_path = folder / "state.pt", folder / "model.json"
    for p in (state_path, json_path):
        if not p.is_file():
            raise CheckpointError(f"{folder}: {p.name} not found (a published model folder holds state.pt and model.json)")
    try:
        meta = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{json_path}: not valid JSON ({exc})") from exc
    config, mean, std = config_from_model_json(meta, str(json_path), folder.resolve().name)
    try:
        published = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{state_path}: cannot be read as plain tensors ({type(exc).__name__}); it may be corrupt or hold pickled code") from exc
    if not isinstance(published, dict) or not all(isinstance(v, torch.Tensor) for v in published.values()):
        raise CheckpointError(f"{state_path}: expected a dict of tensors")
    state = {rename_key(k): v.float() for k, v in published.items()}
    state["target_mean"] = torch.tensor(mean)
    state["target_std"] = torch.tensor(std)
    model = model_from_state(config, state, str(state_path))
    centers = model.distance_expansion.centers
    config.gaussian_start, config.gaussian_stop = float(centers[0]), float(centers[-1])
    sources = {"state.pt": sha256_file(state_path), "model.json": sha256_file(json_path)}
    return model, sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megnet_pt.convert",
        description="Convert published MEGNet weights (a folder with matgl's state.pt and model.json) "
        "into a megnet_pt checkpoint that loads with torch.load(weights_only=True).",
    )
    parser.add_argument("folder", help="folder holding state.pt and model.json (e.g. $MEGNET_PT_HOME/weights/MEGNet-MP-2018.6.1-Eform)")
    parser.add_argument("-o", "--output", help="checkpoint to write (default: weights/<folder name>.pt)")
    parser.add_argument("--name", help="model name stored in the checkpoint (default: the folder name)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    name = args.name or folder.resolve().name
    out = Path(args.output) if args.output else Path("weights") / f"{name}.pt"
    inputs = [folder / "state.pt", folder / "model.json"]
    if any(out.resolve() == p.resolve() for p in inputs if p.exists()):
        print(f"error: -o {out} is one of the files it converts from; name another file (default: weights/{name}.pt)",
              file=sys.stderr)
        return 2
    try:
        model, sources = convert_published(folder)
        save_checkpoint(model, out, name, sources)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {os_error(exc, f'writing the checkpoint {out}')}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {name}, {n} parameters, cutoff {model.config.cutoff} Å, "
          f"target mean {float(model.target_mean):.8f} std {float(model.target_std):.8f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
