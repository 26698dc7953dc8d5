"""``modular:P[:F][:FORM]``: modular addition as text, the task grokking was found on (Power et al. 2022).

The corpus is every equation ``a+b=c`` with a, b in [0, P) and c = (a + b) mod P, one per
line, every line the same length. FORM says how a number is written:

- ``digits`` (the default): zero-padded to the width of P - 1 (``05+13=18\\n`` for P = 97),
  readable, but an answer digit depends on no single input digit, so a small model
  learns it far more slowly than the paper's task;
- ``bytes``: one byte per number, 0x80 + n (P <= 128), so that with byte tokens every
  number is one token, as in the paper (``\\x85+\\x8d=\\x92\\n``). Not UTF-8: byte tokens only.

The P^2 equations are shuffled by a fixed counter-based hash (``seeds.random_bits``: the
same order on every machine and in every version) and cut in that order: the first
fraction F (default 0.5) is train, the rest is halved into val and test (test takes the
odd one). Each split is one document. Val and test hold their equations once, in the
shuffled order; train holds its equations in ``TRAIN_ORDERS`` different fixed orders one
after the other, so that a model trained on windows of one fixed stream cannot learn
which line follows which (see ``TRAIN_ORDERS``): the train split is a set of equations,
as in the paper's random batches.

The answer of an equation is the P-1-wide ``c`` (not the ``=`` before it, nor the newline
after). ``answer_tokens`` marks, for a split's token stream, which tokens spell which
equation's answer, so that an evaluation can count an equation right when every one of
its answer tokens is predicted right (``eval.evaluate_bpb(..., answers=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seedbed.errors import UserError
from seedbed.seeds import random_bits

PREFIX = "modular:"
MAX_MODULUS = 1000  # 10^6 equations, 13 MB of text
# The train text holds its equations in this many orders (fewer where that would pass
# TRAIN_TEXT_BYTES): the trainer draws windows from one fixed stream, and in a single order
# a model can learn which line follows which, a and b included (at P = 23 its train loss
# fell to 0.2 bits per byte, far below the ~1 bit that the answers alone allow).
TRAIN_ORDERS = 16
TRAIN_TEXT_BYTES = 8_000_000
DEFAULT_TRAIN_FRACTION = 0.5
SHUFFLE_SEED = 0x6D6F64756C6172  # b"modular"
FORMS = ("digits", "bytes")
BYTE_FORM_OFFSET = 0x80  # the byte of number n in the bytes form: above ASCII, so never '+', '=' or a newline
USAGE = "write modular:P[:F][:digits|bytes], e.g. modular:97, modular:97:0.3 or modular:97:bytes"


@dataclass(frozen=True)
class Modular:
    modulus: int
    train_fraction: float = DEFAULT_TRAIN_FRACTION
    form: str = "digits"

    @property
    def width(self) -> int:
        """Bytes of every number: the digits of P - 1, or one in the bytes form."""
        return 1 if self.form == "bytes" else len(str(self.modulus - 1))

    def number(self, n: int) -> bytes:
        return bytes([BYTE_FORM_OFFSET + n]) if self.form == "bytes" else f"{n:0{self.width}d}".encode()

    @property
    def line_bytes(self) -> int:
        return 3 * self.width + 3  # a + b = c \n

    @property
    def answer_offset(self) -> int:
        return 2 * self.width + 2  # where c starts within its line

    def split_sizes(self) -> tuple[int, int, int]:
        total = self.modulus**2
        train = round(self.train_fraction * total)
        val = (total - train) // 2
        return train, val, total - train - val


def parse_modular(spec: str) -> Modular | None:
    """The ``modular:P[:F][:FORM]`` spec's numbers; None for any other spec; a UserError for a bad one."""
    if not spec.startswith(PREFIX):
        return None
    parts = spec[len(PREFIX):].split(":")
    form = "digits"
    if len(parts) > 1 and parts[-1] in FORMS:
        form = parts.pop()
    if len(parts) > 2 or not parts[0]:
        raise UserError(f"data {spec!r} is not a modular spec: {USAGE}")
    try:
        modulus = int(parts[0])
    except ValueError:
        raise UserError(f"data {spec!r}: the modulus P must be an integer, got {parts[0]!r}; {USAGE}") from None
    if not 2 <= modulus <= MAX_MODULUS:
        raise UserError(f"data {spec!r}: the modulus P must be in 2..{MAX_MODULUS}, got {modulus}")
    fraction = DEFAULT_TRAIN_FRACTION
    if len(parts) == 2:
        try:
            fraction = float(parts[1])
        except ValueError:
            raise UserError(f"data {spec!r}: the train fraction F must be a number, got {parts[1]!r}; "
                            f"{USAGE}") from None
        if not 0 < fraction < 1:
            raise UserError(f"data {spec!r}: the train fraction F must be in (0, 1), got {fraction:g}")
    if form == "bytes" and modulus > 256 - BYTE_FORM_OFFSET:
        raise UserError(f"data {spec!r}: the bytes form writes a number as one byte from 0x80, so P must be "
                        f"at most {256 - BYTE_FORM_OFFSET}, got {modulus}; use the digits form")
    modular = Modular(modulus, fraction, form)
    if min(modular.split_sizes()) < 1:
        raise UserError(f"data {spec!r}: {modulus}^2 equations leave a split empty at train fraction {fraction:g}; "
                        "use a larger P or a fraction nearer 0.5")
    return modular


def shuffled_pairs(modular: Modular) -> np.ndarray:
    """All (a, b), (P^2, 2), in the fixed hash order."""
    p = modular.modulus
    keys = random_bits(SHUFFLE_SEED, p * p).numpy()
    order = np.argsort(keys, kind="stable")
    return np.stack([order // p, order % p], axis=1)


def equations(pairs: np.ndarray, modular: Modular) -> bytes:
    """The text of the equations for these (a, b), one line each."""
    p, number = modular.modulus, modular.number
    return b"".join(number(a) + b"+" + number(b) + b"=" + number((a + b) % p) + b"\n" for a, b in pairs.tolist())


def train_orders(modular: Modular) -> int:
    train, _, _ = modular.split_sizes()
    return max(1, min(TRAIN_ORDERS, TRAIN_TEXT_BYTES // (train * modular.line_bytes)))


def split_texts(modular: Modular) -> tuple[bytes, bytes, bytes]:
    """The (train, val, test) texts; train holds its equations ``train_orders`` times, first in
    the shuffled order, then each time reordered by another fixed hash."""
    pairs = shuffled_pairs(modular)
    train, val, _ = modular.split_sizes()
    orders = [np.arange(train)] + [np.argsort(random_bits(SHUFFLE_SEED + k, train).numpy(), kind="stable")
                                   for k in range(1, train_orders(modular))]
    return (b"".join(equations(pairs[:train][order], modular) for order in orders),
            equations(pairs[train:train + val], modular), equations(pairs[train + val:], modular))


def answer_bytes(n_bytes: int, modular: Modular) -> np.ndarray:
    """Per byte of a split's text: the index of the equation whose answer it is, -1 elsewhere."""
    lines, rest = divmod(n_bytes, modular.line_bytes)
    if rest:
        raise ValueError(f"{n_bytes} bytes are not whole lines of {modular.line_bytes}")
    marks = np.full((lines, modular.line_bytes), -1, dtype=np.int64)
    start = modular.answer_offset
    marks[:, start:start + modular.width] = np.arange(lines)[:, None]
    return marks.reshape(-1)


def answer_tokens(token_lengths: np.ndarray, modular: Modular) -> np.ndarray:
    """Per token of a split (given each token's length in bytes): the equation whose answer it
    spells, -1 elsewhere. With byte tokens that is exact; a subword token that holds any
    answer byte counts as that answer's token (so with ``=1`` or ``8\\n`` pieces, predicting
    the answer also means predicting the ``=`` or the newline beside it)."""
    lengths = np.asarray(token_lengths, dtype=np.int64)
    marks = answer_bytes(int(lengths.sum()), modular)
    if not len(lengths):
        return np.zeros(0, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    nonempty = lengths > 0
    tokens = np.full(len(lengths), -1, dtype=np.int64)
    if nonempty.any():
        tokens[nonempty] = np.maximum.reduceat(marks, starts[nonempty])
    return tokens


def describe(modular: Modular) -> str:
    train, val, test = modular.split_sizes()
    orders = train_orders(modular)
    return (f"{modular.modulus**2:,} equations a+b=c mod {modular.modulus} ({modular.form}, {modular.line_bytes} "
            f"bytes each; "
            f"train {train:,}{f' in {orders} orders' if orders > 1 else ''} / val {val:,} / test {test:,})")
