"""The layer stack: which block runs at each depth, and which parameters depths share.

``ModelConfig.layer_plan()`` names the block at every depth (the default block, a repeated
pattern, per-depth overrides) and each depth becomes a ``Layer``. With x_0 the token
embeddings and h the residual stream, a layer computes

    h <- h + e_u                                  depth_embedding: a learned vector per use
    u  = norm(h)                                  input = "hidden"
    u  = W_in [norm(h); norm_0(x_0)]              input = "hidden+embedding" (Zamba: 2d -> d)
    h <- h + g_u * mixer(u)                       use_scale: learned gains g_u, f_u per use (else 1)
    h <- h + f_u * ffn(norm(h), tokens)

where either part may be absent (kind "none": Mamba's blocks have no feed-forward).

Sharing. A block whose ``share`` is not "none" builds the shared parts (the feed-forward,
the mixer, or both with the input projection) once, in ``SharedParts`` under
``LM.shared[name]``; every layer using that block calls the same modules. The parameters
are stored, counted and packed once, and their gradient is the sum over the uses. Norms,
gains and depth embeddings always belong to the use (d parameters each). With
``lora_rank`` r every linear inside the shared parts carries one rank-r adapter per use,
``W x + B_u A_u x`` (``layers.PerUseLoRA``); the layer selects its use before each call,
also when activation checkpointing re-runs it in backward.

State. A layer's decode state is its mixer's (a KV cache, a recurrent state, or None
without a mixer): a shared attention block used at two depths holds two caches, one per
use, and the shared parameters nothing extra.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from seedbed.config import BlockConfig, ModelConfig, denseformer_options
from seedbed.model.denseformer import DepthWeightedAverage
from seedbed.model.depths import DepthRouter, depth_routing_options, gather_picked
from seedbed.model.layers import BuildContext, PerUseLoRA
from seedbed.model.layerskip import skip_rows
from seedbed.perf import Flops
from seedbed.registry import FFNS, MIXERS, require


def build_part(registry, spec: dict, ctx: BuildContext, where: str) -> nn.Module | None:
    if spec.get("kind") == "none":
        return None
    entry, options = registry.options(spec, where)
    return entry.cls(options, dataclasses.replace(ctx, where=where))


class SharedParts(nn.Module):
    """The parts of one block that all its uses share, built once; ``parts`` names them."""

    def __init__(self, spec: BlockConfig, ctx: BuildContext, where: str):
        super().__init__()
        self.parts = {"ffn": {"ffn"}, "mixer": {"mixer"}, "block": {"mixer", "ffn", "input_proj"}}[spec.share]
        if "mixer" in self.parts:
            self.mixer = build_part(MIXERS, spec.mixer, ctx, f"{where}.mixer")
        if "ffn" in self.parts:
            self.ffn = build_part(FFNS, spec.ffn, ctx, f"{where}.ffn")
        if "input_proj" in self.parts and spec.input == "hidden+embedding":
            self.input_proj = ctx.linear(2 * ctx.d_model, ctx.d_model)
        # Plain lists, not submodules: the adapters and loss-setting modules are already registered
        # where they sit. A module that sets an auxiliary loss per call (an MoE's balance loss, an
        # hourglass's latent loss) sums it over the uses of one forward here (``moe.record_aux_loss``).
        self.adapters = [m for m in self.modules() if isinstance(m, PerUseLoRA)]
        self.summing = [m for m in self.modules() if hasattr(m, "sums_over_calls")]
        for module in self.summing:
            module.sums_over_calls = True

    def begin_forward(self) -> None:
        """Start a new sum of the shared parts' auxiliary losses over this forward's uses."""
        for module in self.summing:
            module.aux_loss = None

    def select(self, use: int) -> None:
        for adapter in self.adapters:
            adapter.use = use

    def adapter_numel(self) -> int:
        return sum(a.lora_a.numel() + a.lora_b.numel() for a in self.adapters)


class Layer(nn.Module):
    """One depth of the stack: its own norms (and gains, depth embedding), its own or shared parts."""

    def __init__(self, spec: BlockConfig, ctx: BuildContext, where: str, shared: SharedParts | None = None,
                 use: int = 0, local_group: int = 0):
        super().__init__()
        d_model, self.use, self.local_group = ctx.d_model, use, local_group
        taken = shared.parts if shared is not None else set()
        # Shared parts are attributes, not submodules: their parameters are registered once,
        # under LM.shared, whatever the number of uses.
        object.__setattr__(self, "shared", shared)
        for name, registry in (("mixer", MIXERS), ("ffn", FFNS)):
            if name in taken:
                object.__setattr__(self, name, getattr(shared, name))
            else:
                setattr(self, name, build_part(registry, getattr(spec, name), ctx, f"{where}.{name}"))
        # A mixer that is a whole block of its own (multi-channel attention: per-channel attention,
        # residual and MLP) reads the raw residual stream and normalises inside itself.
        self.reads_residual = getattr(self.mixer, "reads_residual", False)
        require(not (self.reads_residual and spec.input != "hidden"),
                f"{where}.input: the {spec.mixer['kind']} mixer reads the residual stream itself; "
                f"it cannot take input = {spec.input!r}")
        self.mixer_norm = ctx.norm(d_model) if self.mixer is not None and not self.reads_residual else None
        self.ffn_norm = ctx.norm(d_model) if self.ffn is not None else None
        if spec.input == "hidden+embedding" and self.mixer is not None:
            self.embedding_norm = ctx.norm(d_model)
            if "input_proj" in taken:
                object.__setattr__(self, "input_proj", shared.input_proj)
            else:
                self.input_proj = ctx.linear(2 * d_model, d_model)
        else:
            self.input_proj = None
        self.depth_embedding = nn.Parameter(torch.zeros(d_model)) if spec.depth_embedding else None
        self.mixer_gain = nn.Parameter(torch.ones(d_model)) if spec.use_scale and self.mixer is not None else None
        self.ffn_gain = nn.Parameter(torch.ones(d_model)) if spec.use_scale and self.ffn is not None else None
        routing = depth_routing_options(spec.mixture_of_depths, f"{where}.mixture_of_depths")
        require(not (routing.capacity and local_group),
                f"{where}.mixture_of_depths: a local block runs over whole groups; it cannot skip tokens")
        self.depth_router = DepthRouter(routing, d_model) if routing.capacity else None

    def mixer_input(self, h: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        if self.reads_residual:
            return h
        u = self.mixer_norm(h)
        if self.input_proj is None:
            return u
        return self.input_proj(torch.cat([u, self.embedding_norm(embedded)], dim=-1))

    def forward(self, h: torch.Tensor, embedded: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.run(h, embedded, tokens, None)[0]

    def step(self, h: torch.Tensor, embedded: torch.Tensor, tokens: torch.Tensor, state) -> tuple[torch.Tensor, object]:
        return self.run(h, embedded, tokens, state, stepping=True)

    def run(self, h: torch.Tensor, embedded: torch.Tensor, tokens: torch.Tensor, state,
            stepping: bool = False) -> tuple[torch.Tensor, object]:
        if self.local_group:
            # Each group's latents alone, as a batch of short sequences: no state crosses groups,
            # and a decoding step always brings whole groups.
            batch, length, d_model = h.shape
            grouped = (batch * length // self.local_group, self.local_group, d_model)
            out = self.run_global(h.reshape(grouped), embedded.reshape(grouped), None, None)[0]
            return out.reshape(batch, length, d_model), state
        return self.run_global(h, embedded, tokens, state, stepping)

    def run_global(self, h: torch.Tensor, embedded: torch.Tensor, tokens: torch.Tensor | None, state,
                   stepping: bool = False) -> tuple[torch.Tensor, object]:
        if self.depth_router is None:
            return self.run_block(h, embedded, tokens, state, stepping)
        picked, weight = self.depth_router(h)
        if not stepping:
            return self.run_picked(h, embedded, tokens, picked, weight, None, False)[0], state
        # One state per row: each row's state holds only the tokens that row picked.
        rows = [self.run_picked(h[b:b + 1], embedded[b:b + 1], None if tokens is None else tokens[b:b + 1],
                                picked[b:b + 1], weight[b:b + 1], state[b], True) for b in range(h.shape[0])]
        return torch.cat([row[0] for row in rows]), [row[1] for row in rows]

    def run_picked(self, h: torch.Tensor, embedded: torch.Tensor, tokens: torch.Tensor | None,
                   picked: torch.Tensor, weight: torch.Tensor, state, stepping: bool) -> tuple[torch.Tensor, object]:
        """Mixture of depths: the block over each row's picked tokens as one sub-sequence (rows padded
        at the end, where a causal block cannot see the padding), its change added back scaled by the
        router weight; unpicked tokens pass unchanged."""
        order, real = gather_picked(picked)
        if order.shape[1] == 0:
            return h, state
        index = order[..., None].expand(-1, -1, h.shape[-1])
        sub = h.gather(1, index)
        out, state = self.run_block(sub, embedded.gather(1, index), None if tokens is None else tokens.gather(1, order),
                                    state, stepping)
        change = (out - sub) * (weight.gather(1, order) * real)[..., None]
        return h.scatter_add(1, index, change), state

    def run_block(self, h: torch.Tensor, embedded: torch.Tensor, tokens: torch.Tensor | None, state,
                  stepping: bool = False) -> tuple[torch.Tensor, object]:
        if self.shared is not None:
            self.shared.select(self.use)
        if self.depth_embedding is not None:
            h = h + self.depth_embedding.to(h.dtype)
        if self.mixer is not None:
            u = self.mixer_input(h, embedded)
            if stepping:
                y, state = self.mixer.step(u, state)
            else:
                y = self.mixer(u)
            h = h + (y if self.mixer_gain is None else y * self.mixer_gain.to(y.dtype))
        if self.ffn is not None:
            y = self.ffn(self.ffn_norm(h), tokens)
            h = h + (y if self.ffn_gain is None else y * self.ffn_gain.to(y.dtype))
        return h, state

    def init_state(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        if self.mixer is None or self.local_group:
            return None if self.depth_router is None else [None] * batch
        if self.depth_router is not None:
            return [self.mixer.init_state(1, max_len, device, dtype) for _ in range(batch)]
        return self.mixer.init_state(batch, max_len, device, dtype)

    def rewind(self, before, kept: int) -> tuple[bool, object]:
        """(True, the state after ``kept`` more positions than ``before``) where that needs no
        re-run (no mixer, or an attention cache: only its length moves), else (False, None)."""
        if self.depth_router is not None or self.local_group:
            return False, None
        if self.mixer is None:
            return True, None
        forget = getattr(self.mixer, "rewind", None)
        return (True, forget(before, kept)) if forget is not None else (False, None)

    def flops(self, batch: int, context: int) -> Flops:
        if self.local_group:
            batch, context = batch * context // self.local_group, self.local_group
        total = Flops()
        if self.depth_router is not None:
            # The router on every token; the block on its capacity (training's top-k count per row).
            total = self.depth_router.flops(batch * context)
            context = math.ceil(self.depth_router.capacity * context)
        for part in (self.mixer, self.ffn):
            if part is not None:
                total = total + part.flops(batch, context)
        if self.input_proj is not None:
            total = total + self.input_proj.flops(batch * context)
        return total


def build_stack(cfg: ModelConfig, plan: list[str] | None = None, max_seq_len: int = 0, path: tuple[str, ...] = (),
                group: int = 0) -> tuple[nn.ModuleDict, nn.ModuleList]:
    """The shared parts (by block name) and one Layer per depth of ``plan`` (``cfg.layer_plan()``
    for the model's own stack). An hourglass builds its inner plan here too: ``path`` names the
    blocks it sits in (a block may not contain itself), ``group`` is its latents per group (local
    blocks run over one group at a time) and its layers see no token ids."""
    plan = cfg.layer_plan() if plan is None else plan
    uses = Counter(plan)
    specs = {name: cfg.block(name) for name in uses}
    for name, spec in specs.items():
        require(name not in path, f"model.blocks.{name}: an hourglass cannot contain itself "
                                  f"({' -> '.join(path + (name,))})")
        require(spec.scope == "global" or group,
                f"model.blocks.{name}.scope = 'local' runs over the latents of one group: "
                f"name it only in an hourglass's inner plan")

    def context(name: str, depth: int, shared: bool = False) -> BuildContext:
        spec = specs[name]
        return BuildContext(cfg.d_model, len(plan), depth, max_seq_len or cfg.max_seq_len, spec.linear, spec.norm,
                            lora_uses=uses[name] if shared else 0, lora_rank=spec.lora_rank if shared else 0,
                            model=cfg, path=path + (name,))

    def where(name: str) -> str:
        return "model" if name == "default" and name not in cfg.blocks else f"model.blocks.{name}"

    shared = nn.ModuleDict({
        name: SharedParts(specs[name], context(name, plan.index(name), shared=True), where(name))
        for name in sorted(uses) if specs[name].share != "none"})
    layers, seen = [], Counter()
    for depth, name in enumerate(plan):
        layer = Layer(specs[name], context(name, depth), where(name), shared[name] if name in shared else None,
                      use=seen[name], local_group=group if specs[name].scope == "local" else 0)
        require(not (path and getattr(layer.ffn, "needs_tokens", False)),
                f"{where(name)}.ffn: {specs[name].ffn['kind']} routes by token id, and an hourglass's "
                f"latents have none")
        layers.append(layer)
        seen[name] += 1
    return shared, nn.ModuleList(layers)


def build_denseformer(n_layers: int, values: dict, where: str) -> DepthWeightedAverage | None:
    options = denseformer_options(values, where)
    return DepthWeightedAverage(n_layers, options) if options.dilation else None


def run_stack(layers: nn.ModuleList, denseformer: DepthWeightedAverage | None, h: torch.Tensor,
              embedded: torch.Tensor, tokens: torch.Tensor | None, states: list | None = None,
              checkpointing: bool = False, dropout: list[float] | None = None,
              exits: list | None = None) -> tuple[torch.Tensor, list | None]:
    """h through every layer, in parallel (``states`` None) or extending each layer's decode state,
    replacing h after each depth by its Denseformer average when there is one. In training,
    ``dropout`` gives each depth's LayerSkip layer-dropout rate, and ``exits`` collects h after
    every depth but the last (model/layerskip.py)."""
    history = [h] if denseformer is not None else None
    new_states = None if states is None else []
    for depth, layer in enumerate(layers):
        if states is not None:
            h, state = layer.step(h, embedded, tokens, states[depth])
            new_states.append(state)
        elif dropout and dropout[depth] > 0:
            h = skip_rows(layer, h, embedded, tokens, dropout[depth])
        elif checkpointing:
            # Backward re-runs the layer, regenerating its weights instead of keeping them.
            h = checkpoint(layer, h, embedded, tokens, use_reentrant=False)
        else:
            h = layer(h, embedded, tokens)
        if history is not None:
            history.append(h)
            h = denseformer(depth + 1, history)
        if exits is not None and depth < len(layers) - 1:
            exits.append(h)
    return h, new_states
