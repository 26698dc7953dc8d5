"""Checkpoints: one safetensors file holding tensors plus JSON metadata, checksummed.

No pickle: tensors go through safetensors, everything else through JSON. The file is
replaced atomically, and a SHA-256 over the metadata and every tensor's bytes detects
corruption on load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from seedbed.errors import UserError
from seedbed.fileio import atomic_write_bytes

FORMAT = "seedbed-checkpoint-1"
CHECKPOINT_NAME = "checkpoint.safetensors"


def digest(meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    meta_json = json.dumps({"format": FORMAT, **meta}, sort_keys=True)
    data = save(tensors, metadata={"seedbed": meta_json, "sha256": digest(meta_json, tensors)})
    atomic_write_bytes(path, data)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        meta_json = header["seedbed"]
        meta = json.loads(meta_json)
    except Exception as err:  # any parse failure means the file is not a usable checkpoint
        raise UserError(f"checkpoint {path} is corrupted or not a seedbed checkpoint ({type(err).__name__})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if digest(meta_json, tensors) != header.get("sha256"):
        raise UserError(f"checkpoint {path} is corrupted (checksum mismatch)")
    return tensors, meta


def optimizer_tensors(optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list]:
    """Flatten optimizer states into named tensors plus JSON-able param groups."""
    tensors, groups = {}, []
    for i, opt in enumerate(optimizers):
        state = opt.state_dict()
        for index, param_state in state["state"].items():
            for key, value in param_state.items():
                value = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"optimizer.{i}.{index}.{key}"] = value
        groups.append(state["param_groups"])
    return tensors, groups


def restore_optimizers(optimizers: list[torch.optim.Optimizer], tensors: dict[str, torch.Tensor], groups: list) -> None:
    """Load the optimizers' state (moments, momentum buffers, step counts); their hyperparameters
    (learning rates, betas, weight decay) stay those the optimizers were built with, so a
    resumed run obeys its current config."""
    if len(groups) != len(optimizers):
        raise UserError("checkpoint optimizer layout does not match the model's (was the config changed?)")
    for i, opt in enumerate(optimizers):
        state: dict[int, dict[str, torch.Tensor]] = {}
        prefix = f"optimizer.{i}."
        for name, value in tensors.items():
            if name.startswith(prefix):
                index, key = name[len(prefix):].split(".", 1)
                state.setdefault(int(index), {})[key] = value
        configured = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
        opt.load_state_dict({"state": state, "param_groups": groups[i]})
        for group, settings in zip(opt.param_groups, configured):
            group.update(settings)
