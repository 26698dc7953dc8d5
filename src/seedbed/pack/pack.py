"""``seedbed pack`` and ``seedbed info``: runs into artifacts, artifacts into byte accounts."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from seedbed.config import config_from_dict
from seedbed.data import tokenizer_from_proto
from seedbed.errors import UserError
from seedbed.model import LM, virtual_parameters
from seedbed.pack.artifact import (CODECS, HEADER, QuantRule, build_payload, encode_artifact, group_name, read_artifact,
                                   write_artifact)


@dataclass
class PackResult:
    path: Path
    size: int
    payload_size: int
    codec: str


def pack_model(loaded, out: str | Path, rule: QuantRule, budget: int | None = None) -> PackResult:
    """Write ``loaded`` (a LoadedModel) as an artifact; refuse, writing nothing, if over ``budget``."""
    state = loaded.model.state_dict()
    payload = build_payload(loaded.config.to_dict(), state, loaded.tokenizer.model_proto, rule)
    data = encode_artifact(payload)
    if budget is not None and len(data) > budget:
        groups = defaultdict(int)
        for name, tensor in state.items():
            groups[group_name(name)] += tensor.numel()
        top = sorted(groups.items(), key=lambda g: -g[1])[:3]
        raise UserError(f"artifact would be {len(data):,} bytes, {len(data) - budget:,} over the budget of "
                        f"{budget:,}; largest groups by parameters: "
                        + ", ".join(f"{name} ({n:,})" for name, n in top)
                        + "; try --quant int6 or int4, or a smaller model")
    write_artifact(out, data)
    codec_id = HEADER.unpack_from(data)[2]
    return PackResult(Path(out), len(data), len(payload), CODECS[codec_id][0])


def load_artifact(path: str | Path):
    """An artifact as a LoadedModel, exactly like a run folder."""
    from seedbed.runs import LoadedModel

    artifact = read_artifact(path)
    cfg = config_from_dict(artifact.config)
    model = LM(cfg.model)
    try:
        model.load_state_dict(artifact.tensors, strict=True)
    except RuntimeError:
        raise UserError(f"artifact {path} does not fit its own config (tensors missing or misshapen)") from None
    model.eval()
    return LoadedModel(model, cfg, tokenizer_from_proto(artifact.tokenizer_proto), Path(path))


def describe(path: str | Path) -> str:
    """The byte account of an artifact: every byte of the file, by section, group and kind."""
    artifact = read_artifact(path)
    manifest = artifact.manifest
    entries = manifest["tensors"]
    manifest_bytes = artifact.payload_size - sum(e["length"] for e in entries) - (
        manifest["tokenizer"]["length"] if manifest["tokenizer"] else 0)
    groups: dict[str, list] = defaultdict(lambda: [0, 0, set()])
    kinds: dict[str, list] = defaultdict(lambda: [0, 0])
    for e in entries:
        params = 1
        for d in e["shape"]:
            params *= d
        row = groups[group_name(e["name"])]
        row[0] += params
        row[1] += e["length"]
        row[2].add(e["kind"])
        kinds[e["kind"]][0] += params
        kinds[e["kind"]][1] += e["length"]
    stored = sum(k[0] for k in kinds.values())
    model = LM(config_from_dict(artifact.config).model)
    lines = [f"{path}: {artifact.file_size:,} bytes = {HEADER.size} header + "
             f"{artifact.file_size - HEADER.size:,} {artifact.codec}-compressed payload "
             f"({artifact.payload_size:,} bytes raw, ratio {artifact.payload_size / (artifact.file_size - HEADER.size):.3f})",
             f"parameters: {stored:,} stored, {virtual_parameters(model):,} virtual (run at inference)",
             "", "raw payload by section:",
             f"  {'manifest (config, tensor table)':40s} {manifest_bytes:>12,}",
             f"  {'tokenizer':40s} {manifest['tokenizer']['length'] if manifest['tokenizer'] else 0:>12,}"]
    lines += [f"  {name:40s} {size:>12,}  {params:>11,} params  {','.join(sorted(ks))}"
              for name, (params, size, ks) in groups.items()]
    lines += [f"  {'total':40s} {artifact.payload_size:>12,}", "", "raw payload by storage kind:"]
    lines += [f"  {kind:10s} {size:>12,} bytes  {params:>11,} params  {8 * size / params:.2f} bits/param"
              for kind, (params, size) in sorted(kinds.items())]
    return "\n".join(lines)
