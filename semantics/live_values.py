"""Per-particle Python values (strings, tokens, contexts, ragged lists) as bytes, so that
distributed SMC can move them between ranks (``semantics.live_state``).

The format is JSON, never pickle: a rank rebuilds only data from the bytes it receives,
it never runs code from them. A value is written as

* ``None``, a ``bool``, an ``int``, a ``float`` (also inf/nan) or a ``str``: itself;
* ``["L", x...]`` a list, ``["T", x...]`` a tuple, ``["V", x...]`` a ``Vector``,
  ``["F", num, den]`` a ``Fraction``, ``["D", [key, x]...]`` a dict with text keys,
  ``["X", dtype, shape, numbers]`` a small CPU tensor (numbers round-trip exactly);
* ``["K", model, id, text]`` a language model's ``Token`` and ``["C", model, text,
  [ids]]`` a ``Completion``, ``model`` the key of the language model (``Models``): the
  receiving rank rebuilds them with its own model object (the same model by contract).

Rows are fixed-width byte rows: a 4-byte little-endian length, then the UTF-8 JSON,
zero-padded to the width the ranks agree on (``pad``). Anything else is ``NotData``
(the caller refuses it, naming the variable)."""
from __future__ import annotations

import json
from fractions import Fraction

import torch

from ..stdlib.lm.dsl import Completion, LMValue, Token
from .values import Vector

_LEN = 4  # bytes of the length prefix
_TENSOR_DTYPES = (torch.bool, torch.int32, torch.int64, torch.float32, torch.float64)  # (exact through JSON)


class NotData(Exception):
    """A per-particle value this format cannot write (its type in the message)."""


class Models:
    """The language models the run knows on one rank, each under a key every rank gives
    it alike: ``data:NAME`` (a model given as data), ``toy_lm()``, or the path where the
    state holds it."""

    def __init__(self):
        self.by_name: dict[str, LMValue] = {}
        self.by_model: dict[int, str] = {}

    def add(self, lmv: LMValue, key: str) -> None:
        self.by_name.setdefault(key, lmv)
        self.by_model.setdefault(id(lmv.lm), key)  # (the first key a model is known by)

    def name_of(self, lm) -> str:
        name = self.by_model.get(id(lm))
        if name is None:
            raise NotData("a token of a language model this run does not hold")
        return name

    def model(self, name: str) -> LMValue:
        lmv = self.by_name.get(name)
        if lmv is None:
            raise NotData(f"a token of the language model '{name}', which this rank does not hold")
        return lmv


def to_json(x, models: Models):
    """One value in the tagged JSON form (module docstring), or ``NotData``."""
    t = type(x)
    if x is None or t in (bool, int, str):
        return x
    if t is float:
        return x
    if t is Token:
        return ["K", models.name_of(x.lm), x.id, str(x)]
    if t is Completion:
        return ["C", models.name_of(x.lm), str(x), list(x.ids)]
    if t is list:
        return ["L", *(to_json(v, models) for v in x)]
    if t is tuple:
        return ["T", *(to_json(v, models) for v in x)]
    if t is Vector:
        return ["V", *(to_json(v, models) for v in x)]
    if t is Fraction:
        return ["F", x.numerator, x.denominator]
    if t is dict and all(type(k) is str for k in x):
        return ["D", *([k, to_json(v, models)] for k, v in x.items())]
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and not x.requires_grad and x.numel() <= 4096 \
            and x.dtype in _TENSOR_DTYPES:
        return ["X", str(x.dtype).split(".")[-1], list(x.shape), x.reshape(-1).tolist()]
    raise NotData(f"a value of type {t.__name__}")


def from_json(j, models: Models):
    """The value ``to_json`` wrote (built from data only; a malformed row is ``NotData``)."""
    if j is None or type(j) in (bool, int, float, str):
        return j
    if type(j) is not list or not j:
        raise NotData("a malformed row")
    tag, rest = j[0], j[1:]
    if tag == "L":
        return [from_json(v, models) for v in rest]
    if tag == "T":
        return tuple(from_json(v, models) for v in rest)
    if tag == "V":
        return Vector(from_json(v, models) for v in rest)
    if tag == "F":
        return Fraction(int(rest[0]), int(rest[1]))
    if tag == "D":
        return {str(k): from_json(v, models) for k, v in rest}
    if tag == "K":
        lmv = models.model(rest[0])
        tok = lmv.token(int(rest[1]))
        if str(tok) != rest[2]:
            raise NotData(f"a token whose text differs between ranks ({rest[2]!r}, {str(tok)!r})")
        return tok
    if tag == "C":
        return models.model(rest[0]).completion(tuple(int(i) for i in rest[2]))
    if tag == "X":
        dtype = getattr(torch, str(rest[0]), None)
        if dtype not in _TENSOR_DTYPES:
            raise NotData("a malformed tensor row")
        return torch.tensor(rest[2], dtype=dtype).reshape(rest[1])
    raise NotData("a malformed row")


def encode(items: list, models: Models) -> torch.Tensor:
    """Rows [len(items), 4 + width] of uint8 (length prefix, JSON, zeros)."""
    blobs = [json.dumps(to_json(x, models), separators=(",", ":"), allow_nan=True).encode() for x in items]
    width = max(map(len, blobs), default=0)
    out = torch.zeros((len(blobs), _LEN + width), dtype=torch.uint8)
    if blobs:
        flat = bytearray()
        for b in blobs:
            flat += len(b).to_bytes(_LEN, "little") + b + bytes(width - len(b))
        out.copy_(torch.frombuffer(flat, dtype=torch.uint8).reshape(len(blobs), _LEN + width))
    return out


def encode_one(x, n: int, models: Models) -> torch.Tensor:
    """``n`` rows of the same value (an unbatched value where other ranks have rows)."""
    row = encode([x], models)
    return row.expand(n, row.shape[1]).clone()


def pad(rows: torch.Tensor, width: int) -> torch.Tensor:
    """Rows widened to ``width`` bytes (the widest row over the ranks)."""
    if rows.shape[1] == width:
        return rows
    out = torch.zeros((rows.shape[0], width), dtype=torch.uint8)
    out[:, :rows.shape[1]] = rows
    return out


def decode(rows: torch.Tensor, models: Models) -> list:
    """The values of rows [n, width] (``encode``)."""
    raw = rows.detach().cpu().contiguous().numpy().tobytes()
    width = rows.shape[1] if rows.dim() == 2 else 0
    out = []
    for k in range(rows.shape[0]):
        row = raw[k * width:(k + 1) * width]
        size = int.from_bytes(row[:_LEN], "little")
        if size > width - _LEN:
            raise NotData("a malformed row")
        out.append(from_json(json.loads(row[_LEN:_LEN + size].decode()), models))
    return out


__all__ = ["NotData", "Models", "to_json", "from_json", "encode", "encode_one", "pad", "decode"]
