"""``seedbed pack`` and ``seedbed info``: runs into artifacts, artifacts into byte accounts."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from seedbed.cachemix import TextCache
from seedbed.config import config_from_dict
from seedbed.data import tokenizer_from_proto
from seedbed.errors import UserError
from seedbed.loaded import LoadedModel
from seedbed.compose import build_composed, composition_entry, effective_parameters_of
from seedbed.model import LM, virtual_parameters
from seedbed.pack.artifact import (CODECS, HEADER, QuantRule, build_payload, encode_artifact, group_name, read_artifact,
                                   write_artifact)
from seedbed.pack.kinds import get_kind


@dataclass
class PackResult:
    path: Path
    size: int
    payload_size: int
    codec: str


def declared_storage_kinds(model: nn.Module) -> dict[str, str]:
    """Tensor name -> storage kind, from every module with a ``storage_kinds`` class attribute."""
    declared = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for tensor_name, kind in getattr(module, "storage_kinds", {}).items():
            get_kind(kind)
            declared[f"{prefix}.{tensor_name}" if prefix else tensor_name] = kind
    return declared


def pack_model(loaded, out: str | Path, rule: QuantRule, budget: int | None = None) -> PackResult:
    """Write ``loaded`` (a LoadedModel) as an artifact; refuse, writing nothing, if over ``budget``.

    Modules' declared storage kinds come after ``rule``'s explicit patterns, before its default.
    """
    rule = replace(rule, declared={**declared_storage_kinds(loaded.model), **rule.declared})
    state = loaded.model.state_dict()
    cache = loaded.cache.to_bytes() if loaded.cache is not None else None
    composition = composition_entry(loaded.model)
    payload = build_payload(loaded.config.to_dict(), state, loaded.tokenizer.model_proto, rule,
                            extra=None if composition is None else {"composition": composition}, cache=cache)
    data = encode_artifact(payload)
    if budget is not None and len(data) > budget:
        groups = defaultdict(int)
        for name, tensor in state.items():
            groups[group_name(name)] += tensor.numel()
        top = sorted(groups.items(), key=lambda g: -g[1])[:3]
        raise UserError(f"artifact would be {len(data):,} bytes, {len(data) - budget:,} over the budget of "
                        f"{budget:,}; largest groups by parameters: "
                        + ", ".join(f"{name} ({n:,})" for name, n in top)
                        + (f"; its n-gram cache is {len(cache):,} bytes (cache.orders={loaded.cache.ngram.max_order}: "
                           "fewer orders make it smaller)" if cache is not None else "")
                        + "; try --quant int6 or int4, or a smaller model")
    write_artifact(out, data)
    codec_id = HEADER.unpack_from(data)[2]
    return PackResult(Path(out), len(data), len(payload), CODECS[codec_id][0])


def load_artifact(path: str | Path):
    """An artifact as a LoadedModel, exactly like a run folder."""
    artifact = read_artifact(path)
    cfg = config_from_dict(artifact.config)
    model = model_of(artifact, path)
    try:
        model.load_state_dict(artifact.tensors, strict=True)
    except RuntimeError:
        raise UserError(f"artifact {path} does not fit its own config (tensors missing or misshapen)") from None
    model.eval()
    cache = None if artifact.cache is None else TextCache.from_bytes(artifact.cache, f"the n-gram cache in {path}")
    return LoadedModel(model, cfg, tokenizer_from_proto(artifact.tokenizer_proto), Path(path), cache=cache)


def model_of(artifact, path) -> nn.Module:
    """The untrained module an artifact's tensors fill: its config's LM, or its composed model."""
    composition = artifact.manifest.get("composition")
    if composition is None:
        return LM(config_from_dict(artifact.config).model)
    return build_composed(composition, f"artifact {path}")


def describe(path: str | Path) -> str:
    """The byte account of an artifact: every byte of the file, by section, group and kind."""
    artifact = read_artifact(path)
    manifest = artifact.manifest
    entries = manifest["tensors"]
    cache_bytes = len(artifact.cache) if artifact.cache is not None else 0
    manifest_bytes = artifact.payload_size - sum(e["length"] for e in entries) - cache_bytes - (
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
    model = model_of(artifact, path)
    lines = [f"{path}: {artifact.file_size:,} bytes = {HEADER.size} header + "
             f"{artifact.file_size - HEADER.size:,} {artifact.codec}-compressed payload "
             f"({artifact.payload_size:,} bytes raw, ratio {artifact.payload_size / (artifact.file_size - HEADER.size):.3f})",
             f"parameters: {stored:,} stored, {virtual_parameters(model):,} virtual (generated weights at full size), "
             f"{effective_parameters_of(model):,} effective (shared parts once per use: run per token)",
             "", "raw payload by section:",
             f"  {'manifest (config, tensor table)':40s} {manifest_bytes:>12,}",
             f"  {'tokenizer':40s} {manifest['tokenizer']['length'] if manifest['tokenizer'] else 0:>12,}"]
    lines += [f"  {name:40s} {size:>12,}  {params:>11,} params  {','.join(sorted(ks))}"
              for name, (params, size, ks) in groups.items()]
    if artifact.cache is not None:
        ngram = TextCache.from_bytes(artifact.cache, f"the n-gram cache in {path}").ngram
        pairs = sum(len(table.tokens) for table in ngram.orders)
        lines.append(f"  {'n-gram cache (counts LZMA, gate)':40s} {cache_bytes:>12,}  orders 1..{ngram.max_order}, "
                     f"{pairs:,} (context, token) counts, {ngram.smoothing}")
    lines += [f"  {'total':40s} {artifact.payload_size:>12,}", "", "raw payload by storage kind:"]
    lines += [f"  {kind:10s} {size:>12,} bytes  {params:>11,} params  {8 * size / params:.2f} bits/param"
              for kind, (params, size) in sorted(kinds.items())]
    if "composition" in manifest:
        lines += ["", f"raw payload by part ({manifest['composition']['kind']}):"]
        lines += [f"  {part:40s} {size:>12,}  {params:>11,} params" for part, (params, size) in composed_parts(entries).items()]
    return "\n".join(lines)


def composed_parts(entries: list[dict]) -> dict[str, tuple[int, int]]:
    """Part -> (parameters, bytes) of a composed artifact's tensors: c-BTM's experts (``members.3``)
    and router; PHATGOOSE's base and its LoRA modules with their gates; CALM's anchor, augmenting
    model and bridges."""
    parts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in entries:
        names = e["name"].split(".")
        if names[0] == "members":
            part = ".".join(names[:2])
        elif names[0] in ("anchor", "augmenting", "bridges"):
            part = names[0]
        elif names[-1] in ("lora_a", "lora_b", "gates"):
            part = "LoRA modules and gates"
        else:
            part = names[0] if names[0] == "router" else "base"
        parts[part][0] += math.prod(e["shape"])
        parts[part][1] += e["length"]
    return {part: (params, size) for part, (params, size) in parts.items()}
