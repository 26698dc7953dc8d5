"""Components register here by name; a config names them and passes their options.

Four registries make up a model:

- ``mixer``: mixes information across positions (attention, retention, Mamba-2, an
  hourglass stage, multi-channel attention). A mixer module implements
  ``forward(x)`` (parallel, causal), ``init_state(batch, max_len)`` and
  ``step(x, state) -> (y, state)`` that extends the sequence by ``x.shape[1]``
  positions using its cache or recurrent state. A step never changes what a state already
  holds (it writes past the positions held, or replaces tensors), so a copy of the state's
  containers is a snapshot: self-speculative decoding rewinds with it (``layerskip.py``).
- ``ffn``: transforms each position (MLP, KAN, mixture of experts, modulo experts,
  PEER). ``forward(x, tokens)`` receives the input token ids too, so experts
  routed by token id (GERMINATOR) need nothing extra.
- ``linear``: how a weight matrix is stored and produced (dense, BitLinear,
  seed-generated, frozen orthogonal or Gaussian bases + LoRA). Built by ``make_linear``.
- ``norm``: RMSNorm and friends.

Each component declares an ``Options`` dataclass. Config keys are checked against it,
so an unknown key or a wrong type is a one-line error naming the key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable

from seedbed.errors import UserError


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    options: type  # dataclass of the component's options


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self.entries: dict[str, Entry] = {}

    def register(self, name: str) -> Callable[[type], type]:
        def add(cls: type) -> type:
            if name in self.entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            options = getattr(cls, "Options", None)
            if options is None or not dataclasses.is_dataclass(options):
                raise TypeError(f"{cls.__name__} needs an Options dataclass")
            self.entries[name] = Entry(name, cls, options)
            return cls

        return add

    def get(self, name: str, where: str) -> Entry:
        if name not in self.entries:
            known = ", ".join(sorted(self.entries))
            raise UserError(f"{where}: unknown {self.kind} {name!r} (known: {known})")
        return self.entries[name]

    def options(self, spec: dict[str, Any], where: str) -> tuple[Entry, Any]:
        """Split ``{"kind": name, **options}`` into the entry and its checked options."""
        spec = dict(spec)
        if "kind" not in spec:
            raise UserError(f"{where}: missing 'kind' (one of {', '.join(sorted(self.entries))})")
        entry = self.get(spec.pop("kind"), f"{where}.kind")
        return entry, build_dataclass(entry.options, spec, where)

    def names(self) -> list[str]:
        return sorted(self.entries)


def build_dataclass(cls: type, values: dict[str, Any], where: str) -> Any:
    """Construct dataclass ``cls`` from ``values``, checking every key and type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise UserError(
                f"unknown config key {where}.{key} (valid keys: {', '.join(sorted(fields))})"
            )
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(where)
    return obj


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a simple type hint; ints are accepted where floats are."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
            try:
                return coerce(value, option, key)
            except UserError:
                continue
        raise UserError(f"{key}: {value!r} is not a valid {hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [coerce(v, item, key) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def require(condition: bool, message: str) -> None:
    """Raise a UserError unless ``condition``; used by ``Options.check`` methods."""
    if not condition:
        raise UserError(message)


MIXERS = Registry("mixer")
FFNS = Registry("ffn")
LINEARS = Registry("linear")
NORMS = Registry("norm")
