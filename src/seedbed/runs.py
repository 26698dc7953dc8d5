"""Loading a trained run or an artifact for evaluation and generation: ``seedbed.load(path)``."""

from __future__ import annotations

import json
from pathlib import Path

from seedbed.cachemix import CACHE_FILE, TextCache
from seedbed.config import config_from_dict, read_config_file
from seedbed.data import tokenizer_from_proto
from seedbed.errors import UserError
from seedbed.loaded import LoadedModel
from seedbed.model import LM
from seedbed.pack.pack import load_artifact
from seedbed.train.checkpoint import CHECKPOINT_NAME, load_checkpoint


def load(path: str | Path) -> LoadedModel:
    """Load a run folder (config, tokenizer, latest checkpoint) or a packed artifact onto the CPU."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.is_file():
        return load_artifact(path)
    if not (path / "config.toml").is_file() or not (path / CHECKPOINT_NAME).is_file():
        raise UserError(f"{path} is not a finished run folder (needs config.toml and {CHECKPOINT_NAME})")
    cfg = config_from_dict(read_config_file(path / "config.toml"))
    tensors, meta = load_checkpoint(path / CHECKPOINT_NAME)
    model = LM(cfg.model)
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint in {path} does not fit its config.toml")
    model.eval()
    proto_path = path / "tokenizer.model"
    tokenizer = tokenizer_from_proto(proto_path.read_bytes() if proto_path.is_file() else None)
    cache_path = path / CACHE_FILE
    cache = TextCache.from_bytes(cache_path.read_bytes(), str(cache_path)) if cache_path.is_file() else None
    return LoadedModel(model, cfg, tokenizer, path, recorded_val_bpb(path, cfg, meta["step"]), cache)


def recorded_val_bpb(path: Path, cfg, step: int) -> float | None:
    """The final val bpb the trainer logged for the checkpoint's step, if it scored the whole
    split at the default stride (what ``evaluate_split`` would recompute), else None."""
    if cfg.train.eval_stride not in (0, max(1, cfg.model.max_seq_len // 2)):
        return None
    try:
        lines = (path / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if "val_bpb" in record and record.get("step") == step and isinstance(record["val_bpb"], float):
            return record["val_bpb"]
    return None
