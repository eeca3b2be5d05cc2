"""The live state of a run suspended at a synchronisation checkpoint, found and moved as
rows (distributed SMC: ``inference/distributed.py``).

A run's state at a checkpoint is every per-particle value it still holds: the variables
of the frames on the call stack and of closures' frames, the interpreter's own locals
in the suspended generators (a list being built, the arguments of a call, a loop's
lengths), the effect being answered and the twist potential. One process resamples them
all lazily (``values.Lineage``). Between ranks the rows that arrive must be appended to
*each* such value, so this module finds them:

* ``walk(roots, lineage, data_ids)`` visits the state from the suspended generator in a
  fixed order and names every place by a path (``run/call_closure.fr.vars[x]``), with a
  descriptor the ranks compare: a batched value's dtype and row shape (and whether it
  covers every particle), an unbatched value itself (a digest), or a container's kind
  and size. The walk also checks that it found *every* live batched value of the run
  (the lineage counts them): a value it cannot see could not follow the move.
* ``agree(group_views)`` compares the ranks' walks (the same function of the gathered
  walks on every rank, so every rank decides alike): which paths become columns to
  move, and which differ in a way no move can mend (an error naming the variable).
  Ranks may differ in representation only where one process would have one value: an
  unbatched value on one rank and a batched one on another (or unbatched values that
  differ), in a variable or a list of the program, becomes batched rows on every rank;
  a variable some ranks lack (assigned in a branch their particles did not take) is
  absent for their particles (a presence column).
* ``columns(walk, agreed)`` gives this rank's rows of each column; ``install(walk,
  agreed, moved, lineage)`` puts the new rows in place: batched values are given their
  new rows in place (every holder sees them), replaced values are written into their
  frame or list, and the lineage starts a new epoch whose ancestor array is invalid
  (a value that the walk missed would fail loudly when read, never read wrong rows).

Per-particle Python objects (``PerParticle``: strings, tokens, ragged lists) are columns
of JSON rows (``PYTHON``; ``semantics.live_values``: data only, never pickle), rebuilt
on the receiving rank; an unbatched object on one rank where another has rows becomes
rows on every rank. Language models (``LMValue``) are static (backend, tables and prefix
caches are the same function on every rank: a backend's answer is the same with or
without its cache, ``stdlib.lm.base``); their per-particle memos (the contexts an
``LMValue`` remembers, an LM distribution's last draw) are dropped at a move and
recomputed from the moved values.

A memoised function's table moves entry by entry (each entry's coverage and value, as
any state) when every rank's table holds the same keys.

What cannot move is refused with a ``PPLRuntimeError`` naming it: per-particle objects
that are not data (functions, other objects), memo tables whose keys differ between
ranks, delayed
or enumerated values, and places whose structure differs between ranks (a list of
another length, the run at another statement).
"""
from __future__ import annotations

import gc
import hashlib
import pickle
import types
import zlib
from dataclasses import dataclass, field, fields, is_dataclass
from fractions import Fraction
from typing import Any

import torch

from ..stdlib.lm import dsl as lm_dsl
from . import live_values
from .errors import PPLRuntimeError
from .interpreter import Builtin, Closure, Frame, Interpreter, MemFn, _Renamed
from .values import Batched, DistributionValue, Lineage, Particles, PerParticle, _PerParticleValue

_ATOMS = (type(None), bool, int, float, str, Fraction, complex, range)
_HINT = "run this model in one process (distributed=False), or with method='importance' (no particle moves)"


class CannotMove(PPLRuntimeError):
    """A part of the run's state that cannot move between ranks."""


def _refuse(path: str, what: str) -> CannotMove:
    return CannotMove(f"distributed SMC cannot move {what} between ranks (at {describe_path(path)})", hint=_HINT)


def describe_path(path: str) -> str:
    """A path as the user knows it: the program variable it ends in, if any."""
    if ".vars[" in path:
        name = path.rsplit(".vars[", 1)[1].split("]", 1)[0]
        return f"the variable '{name}'"
    return f"the interpreter's state '{path}'"


@dataclass
class Place:
    """One place of the state: the object there, where it can be replaced (``holder``
    [``key``], a dict or list of the program; None for a fixed place), and what the
    ranks compare (``desc``)."""

    value: Any
    holder: Any
    key: Any
    desc: tuple
    variable: bool = False  # a frame's variable (absent on ranks whose particles never assigned it)
    parent: str = ""  # the path of the frame whose ``vars`` hold it (variables)


@dataclass
class Walk:
    """The state found on one rank: path -> ``Place``, in visiting order."""

    places: dict = field(default_factory=dict)
    frames: dict = field(default_factory=dict)  # path -> Frame (where absent variables are put back)
    batched: list = field(default_factory=list)  # the distinct per-particle values found (Batched, PerParticle)
    models: live_values.Models = field(default_factory=live_values.Models)  # language models, by name
    caches: list = field(default_factory=list)  # LM values and distributions whose per-particle memos a move drops
    cached: list = field(default_factory=list)  # the per-particle values those memos hold (dropped, not moved)

    _view = None
    _digest = None

    def view(self) -> list:
        """What the ranks compare: [(path, desc, replaceable, variable, parent)]."""
        if self._view is None:
            self._view = [(p, pl.desc, pl.holder is not None, pl.variable, pl.parent) for p, pl in self.places.items()]
        return self._view

    def digest(self) -> int:
        if self._digest is None:
            self._digest = digest(self.view())
        return self._digest


def digest(view: list) -> int:
    """A 48-bit digest of a view (exact in a float64: it can ride on the status row)."""
    return int.from_bytes(hashlib.blake2b(pickle.dumps(view), digest_size=6).digest(), "little")


def _digest(t: torch.Tensor) -> int:
    t = t.detach().cpu().contiguous()
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().tobytes()) if t.numel() else 0


class _Walker:
    def __init__(self, lineage: Lineage, data: dict):
        self.lineage = lineage
        self.data = data
        self.data_ids = {id(v) for v in data.values()} | \
            {id(x) for v in data.values() if isinstance(v, (list, tuple)) for x in v}
        self.walk = Walk()
        self.seen: dict[int, str] = {}
        self.batched_ids: set[int] = set()
        for name in sorted(data):  # language models given as data (not walked: the same on every rank)
            if isinstance(data[name], lm_dsl.LMValue):
                self.lm_value(data[name], f"data:{name}")
        default = lm_dsl._DEFAULTS.get("lm")  # toy_lm(), wherever a program calls it
        if default is not None:
            self.lm_value(default, "toy_lm()")

    def lm_value(self, lmv, key: str) -> None:
        """A language model the run uses: static (its backend, token tables and prefix
        caches are the same function on every rank), except the contexts it remembers
        for the particles (``_ctx_memo``), which a move drops (recomputed exactly from
        the context lists, which move)."""
        if any(c is lmv for c in self.walk.caches):
            return
        self.walk.models.add(lmv, key)
        self.walk.caches.append(lmv)
        self.memo(lmv._ctx_memo)

    def memo(self, obj, depth: int = 0) -> None:
        """The per-particle values of this run inside a memo (tuples, lists, dicts)."""
        if isinstance(obj, _PerParticleValue):
            if obj._lin is self.lineage and id(obj) not in self.batched_ids:
                self.batched_ids.add(id(obj))
                self.walk.cached.append(obj)
        elif depth < 4 and isinstance(obj, (tuple, list)):
            for x in obj:
                self.memo(x, depth + 1)
        elif depth < 4 and isinstance(obj, dict):
            for x in obj.values():
                self.memo(x, depth + 1)

    def place(self, path, value, holder, key, desc, **kw):
        self.walk.places[path] = Place(value, holder, key, desc, **kw)

    def visit(self, obj: Any, path: str, holder=None, key=None, program: bool = False, variable=False,
              parent="") -> None:
        kw = {"variable": variable, "parent": parent}
        if isinstance(obj, _ATOMS):
            self.place(path, obj, holder if program else None, key, ("atom", type(obj).__name__, repr(obj)), **kw)
            return
        if isinstance(obj, torch.Tensor):
            digest = "data" if id(obj) in self.data_ids else _digest(obj)
            self.place(path, obj, holder if program else None, key,
                       ("tensor", str(obj.dtype), tuple(obj.shape), digest), **kw)
            return
        if isinstance(obj, (set, frozenset)) and all(isinstance(x, _ATOMS) for x in obj):
            self.place(path, obj, None, key, ("atom", "set", repr(sorted(map(repr, obj)))), **kw)
            return
        first = self.seen.get(id(obj))
        if first is not None:
            self.place(path, obj, holder if program else None, key, ("ref", first), **kw)
            return
        self.seen[id(obj)] = path
        if isinstance(obj, _PerParticleValue):
            self.per_particle(obj, path, holder if program else None, key, **kw)
        elif isinstance(obj, Frame):
            self.frame(obj, path, **kw)
        elif isinstance(obj, types.GeneratorType):
            self.generator(obj, path, **kw)
        elif isinstance(obj, list):
            self.place(path, obj, holder if program else None, key, ("list", len(obj)), **kw)
            for i, x in enumerate(obj):
                self.visit(x, f"{path}[{i}]", obj, i, program)
        elif isinstance(obj, tuple):
            self.place(path, obj, holder if program else None, key, (type(obj).__name__, len(obj)), **kw)
            for i, x in enumerate(obj):
                self.visit(x, f"{path}[{i}]", None, None, program)
        elif isinstance(obj, dict):
            keys = list(obj)
            if not all(isinstance(k, str) for k in keys):
                raise _refuse(path, "a table with non-text keys")
            self.place(path, obj, None, None, ("dict", tuple(sorted(keys))), **kw)
            for k in sorted(keys):
                self.visit(obj[k], f"{path}[{k}]", obj, k, program)
        elif isinstance(obj, Particles):
            if obj.idx is not obj.full.idx or obj.idx is not self.lineage.full_idx:
                raise _refuse(path, "a run inside a branch only some particles take")
            self.place(path, obj, None, None, ("particles",), **kw)
        elif isinstance(obj, Closure):
            self.place(path, obj, None, None, ("closure", obj.name, _span(obj.span)), **kw)
            self.visit(obj.env, f"{path}.env")
        elif isinstance(obj, MemFn):
            self.mem(obj, path, **kw)
        elif isinstance(obj, lm_dsl.LMValue):
            self.place(path, obj, None, None, ("lm", obj.name, obj.V), **kw)
            self.lm_value(obj, path)
        elif isinstance(obj, lm_dsl._LMDist):  # (its memos of the last draw: dropped by a move)
            self.place(path, obj, None, None, ("dist", type(obj).__name__), **kw)
            self.walk.caches.append(obj)
            self.memo((obj._cache, obj._last))
            for s in ("lmv", "context", "opts", "mask"):
                self.visit(getattr(obj, s), f"{path}.{s}")
        elif isinstance(obj, DistributionValue):
            names = [s for c in type(obj).__mro__ for s in getattr(c, "__slots__", ())]
            self.place(path, obj, None, None, ("dist", type(obj).__name__), **kw)
            for s in names:
                if hasattr(obj, s):
                    self.visit(getattr(obj, s), f"{path}.{s}")
        elif isinstance(obj, _Renamed):
            self.place(path, obj, None, None, ("renamed", obj.label), **kw)
            self.visit(obj.frame, f"{path}.frame")
        elif isinstance(obj, types.FunctionType):
            self.place(path, obj, None, None, ("function", obj.__qualname__), **kw)
            for i, cell in enumerate(obj.__closure__ or ()):
                try:
                    content = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                self.visit(content, f"{path}.cell{i}")
        elif isinstance(obj, types.MethodType):
            self.place(path, obj, None, None, ("method", obj.__func__.__qualname__), **kw)
            self.visit(obj.__self__, f"{path}.self")
        elif isinstance(obj, (Interpreter, Builtin, types.ModuleType, type, types.BuiltinFunctionType,
                              torch.nn.Module)) or _is_static(obj):  # (a network's weights: never per particle)
            self.place(path, obj, None, None, ("static", type(obj).__name__, getattr(obj, "name", "")), **kw)
        elif is_dataclass(obj) and not isinstance(obj, type):  # effects
            self.place(path, obj, None, None, ("record", type(obj).__name__), **kw)
            for f in fields(obj):
                self.visit(getattr(obj, f.name), f"{path}.{f.name}")
        elif _attributes(obj) is not None:  # another object: its attributes, in a fixed order
            self.place(path, obj, None, None, ("object", type(obj).__qualname__), **kw)
            for name, value in _attributes(obj):
                self.visit(value, f"{path}.{name}")
        else:
            raise _refuse(path, f"a value of type {type(obj).__name__}")

    def mem(self, obj: MemFn, path: str, **kw) -> None:
        """A memoised function: its table's entries by key (the argument values, written
        by ``repr``: the same on every rank), each (coverage, value) walked as state, so
        the rows of the particles that computed an entry move with them. Ranks whose
        tables hold different keys cannot be reconciled (a part only some ranks have)."""
        keys = sorted(obj.table, key=repr)
        if len(set(map(repr, keys))) != len(keys):
            raise _refuse(path, f"the memoised function '{obj.name}' (keys that print alike)")
        self.place(path, obj, None, None, ("mem", obj.name, tuple(map(repr, keys))), **kw)
        self.visit(obj.fn, f"{path}.fn")
        for k in keys:
            self.visit(obj.table[k], f"{path}.table[{k!r}]")

    def per_particle(self, obj, path, holder, key, **kw):
        if type(obj) is PerParticle:  # Python objects: moved as JSON rows (``live_values``)
            if obj._lin is not self.lineage:
                raise _refuse(path, "a per-particle value made outside the run")
            obj._fresh()
            self.place(path, obj, holder, key, ("pyrows", obj._idx is self.lineage.full_idx), **kw)
            self.found(obj)
            return
        if type(obj) is not Batched:
            raise _refuse(path, f"a {type(obj).__name__} value (delayed or enumerated)")
        if obj._lin is not self.lineage:
            raise _refuse(path, "a batched value made outside the run")
        t = obj.t  # (caught up with the lineage)
        full = obj._idx is self.lineage.full_idx
        self.place(path, obj, holder, key, ("batched", str(t.dtype), tuple(t.shape[1:]), full), **kw)
        self.found(obj)

    def found(self, obj) -> None:
        if id(obj) not in self.batched_ids:
            self.batched_ids.add(id(obj))
            self.walk.batched.append(obj)

    def frame(self, fr: Frame, path, **kw):
        if fr.parent is None:  # the builtins: never per particle
            self.place(path, fr, None, None, ("builtins",), **kw)
            return
        self.walk.frames[path] = fr
        self.place(path, fr, None, None, ("frame", fr.path, fr.depth, tuple(fr.loops)), **kw)
        for name in sorted(fr.vars):
            value = fr.vars[name]
            if fr.depth == 1 and name in self.data and value is self.data[name]:  # the entry's data
                self.place(f"{path}.vars[{name}]", value, None, None, ("data", name))
                continue
            self.visit(value, f"{path}.vars[{name}]", fr.vars, name, program=True, variable=True, parent=path)
        if fr.particles is not None:
            self.visit(fr.particles, f"{path}.particles")
        self.visit(fr.returns, f"{path}.returns")
        self.visit(fr.parent, f"{path}.parent")

    def generator(self, gen, path, **kw):
        frame = gen.gi_frame
        if frame is None:
            self.place(path, gen, None, None, ("generator done",), **kw)
            return
        code = gen.gi_code
        self.place(path, gen, None, None, ("generator", code.co_qualname, frame.f_lasti), **kw)
        live = _LIVE_LOCALS.get(code.co_qualname)
        for name, value in frame.f_locals.items():
            if live is None or name in live:
                self.visit(value, f"{path}/{code.co_name}.{name}")
        if gen.gi_yieldfrom is not None:
            self.visit(gen.gi_yieldfrom, f"{path}/from")


#: the locals a suspended generator of the interpreter still reads after its suspension
#: (the others, e.g. a call's arguments once bound in its frame, are dead: never compared)
_LIVE_LOCALS = {"Interpreter.run": (), "Interpreter.call_closure": ("fr", "ctx", "live")}


def _attributes(obj) -> list | None:
    """An object's attributes (instance dict and slots), sorted by name; None for an
    object without them (a C-level object the walk cannot see into)."""
    names = set(getattr(obj, "__dict__", {}) or ())
    for cls in type(obj).__mro__:
        names.update(s for s in getattr(cls, "__slots__", ()) if isinstance(s, str) and not s.startswith("__"))
    if not names and not hasattr(obj, "__dict__"):
        return None
    return [(n, getattr(obj, n)) for n in sorted(names) if hasattr(obj, n)]


def _span(span) -> tuple:
    return (getattr(span, "line", None), getattr(span, "col", None))


def _is_static(obj) -> bool:
    """Program text and other things that are the same on every rank (spans, specs)."""
    mod = type(obj).__module__ or ""
    return mod.endswith(("semantics.ir", "semantics.source", "semantics.errors", "stdlib.distributions"))


def walk(roots: list[tuple[str, Any]], lineage: Lineage, data: dict) -> Walk:
    """The state reachable from ``roots`` ((name, object): the suspended run, the effect
    being answered, the twist potential), every batched value of ``lineage`` among it
    (else ``CannotMove``). ``data``: the run's data, the same on every rank by contract
    (the entry's parameters and data tensors are not compared)."""
    w = _Walker(lineage, data)
    for name, obj in roots:
        w.visit(obj, name)
    _check_all_found(w.walk, lineage)
    return w.walk


def _live_count(lineage: Lineage) -> int:
    return sum(lineage._live[lineage._base:])


def _check_all_found(found: Walk, lineage: Lineage) -> None:
    """The lineage counts its live batched values: the walk must have seen them all (a
    value held elsewhere would not follow the move). Garbage in reference cycles is
    collected before the verdict."""
    seen = len(found.batched) + len(found.cached)
    if _live_count(lineage) > seen:
        gc.collect()
    if _live_count(lineage) > seen:
        raise CannotMove(f"distributed SMC cannot move this run's state between ranks: "
                         f"{_live_count(lineage) - seen} per-particle value(s) are held where the "
                         "run's state is not visible (internal)", hint=_HINT)


# ---------------------------------------------------------------------- agreeing
@dataclass(frozen=True)
class Column:
    """A place whose rows move: ``dtype`` and ``shape`` of a row, ``presence`` whether a
    presence column goes with it (a value some particles lack), ``replace`` whether the
    place is written anew (a converted or re-shared value) rather than updated in place;
    ``alias``: no rows of its own, the place takes the new value written at that path."""

    path: str
    dtype: str = ""
    shape: tuple = ()
    presence: bool = False
    replace: bool = False
    alias: str = ""


def _resolve(view: dict, path: str):
    """A place's descriptor through references (None: not there)."""
    desc = view[path][0] if path in view else None
    for _ in range(64):
        if desc is None or desc[0] != "ref":
            return desc
        desc = view[desc[1]][0] if desc[1] in view else None
    return None


def _atom_tensor(desc: tuple) -> torch.Tensor | None:
    """The value of an unbatched number as a tensor (None if not a number)."""
    if desc[0] == "atom" and desc[1] in ("bool", "int", "float"):
        return torch.as_tensor({"bool": lambda s: s == "True", "int": int, "float": float}[desc[1]](desc[2]))
    return None


def agree(views: list[list]) -> list[Column]:
    """The columns to move, from every rank's ``Walk.view()`` (the same result on every
    rank), or ``CannotMove`` naming the first place the ranks cannot reconcile."""
    if all(v is views[0] for v in views):  # the usual case: every rank's state alike
        return [_column(p, d) for p, d, *_ in views[0] if d[0] in ("batched", "pyrows")]
    per_rank = [{p: (d, r, v, par) for p, d, r, v, par in view} for view in views]
    paths = list(dict.fromkeys(p for view in views for p, *_ in view))
    columns: list[Column] = []
    replaced: set[str] = set()
    for path in paths:
        entries = [v.get(path) for v in per_rank]
        descs = [e[0] if e is not None else None for e in entries]
        if descs[0] is not None and all(d == descs[0] for d in descs):
            d = descs[0]
            if d[0] in ("batched", "pyrows"):
                columns.append(_column(path, d))
            elif d[0] == "ref" and d[1] in replaced:  # a second name of a value written anew
                if not all(e[1] for e in entries):
                    raise _refuse(path, "a value that differs between ranks")
                columns.append(Column(path, alias=d[1]))
                replaced.add(path)
            continue
        col = _mend(path, entries, [_resolve(v, path) for v in per_rank])
        if col.replace:
            replaced.add(path)
        columns.append(col)
    return columns


def _column(path: str, desc: tuple) -> Column:
    """The column of a per-particle place alike on every rank."""
    if desc[0] == "pyrows":
        return Column(path, PYTHON, (), presence=not desc[1])
    return Column(path, desc[1], desc[2], presence=not desc[3])


#: the dtype of a column of Python objects (JSON rows: ``semantics.live_values``)
PYTHON = "python"


def _mend(path: str, entries: list, resolved: list) -> Column:
    """A place where the ranks differ: a column that gives every rank batched rows, or
    ``CannotMove``."""
    present = [e for e in entries if e is not None]
    missing = len(present) < len(entries)
    if any(d is not None and d[0] == "mem" for d in resolved):
        name = next(d[1] for d in resolved if d is not None and d[0] == "mem")
        raise _refuse(path, f"the memoised function '{name}' (its table holds other arguments on each rank)")
    if missing and not all(e[2] for e in present):  # only a variable may be absent
        raise _refuse(path, "a part of the state only some ranks have")
    if any(d is not None and (d[0] == "pyrows" or d[0] == "atom" and _atom_tensor(d) is None) for d in resolved):
        return _mend_python(path, entries, present, missing, resolved)
    dtypes, shapes, presence, batched = [], set(), missing, True
    for d in resolved:
        if d is None:
            continue
        if d[0] == "batched":
            dtypes.append(getattr(torch, d[1].split(".")[-1]))
            shapes.add(d[2])
            presence = presence or not d[3]
            continue
        batched = False
        if d[0] == "tensor":
            dtypes.append(getattr(torch, d[1].split(".")[-1]))
            shapes.add(d[2])
            continue
        t = _atom_tensor(d)
        if t is None:
            raise _refuse(path, "a value that differs between ranks and is no number")
        dtypes.append(t.dtype)
        shapes.add(tuple(t.shape))
    if len(shapes) != 1:
        raise _refuse(path, "values of different shapes on different ranks")
    dtype = dtypes[0]
    for d in dtypes[1:]:
        dtype = torch.promote_types(dtype, d)
    in_place = batched and not missing and all(e[0][0] == "batched" for e in entries)
    if not in_place and not all(e[1] for e in present):  # (a place the walk cannot write)
        raise _refuse(path, "a value that differs between ranks")
    return Column(path, str(dtype), shapes.pop(), presence, not in_place)


def _mend_python(path: str, entries: list, present: list, missing: bool, resolved: list) -> Column:
    """Python objects per particle on some rank, an unbatched value (or nothing) on
    others: Python rows on every rank, written anew."""
    if not all(d is None or d[0] in ("pyrows", "atom") for d in resolved):
        raise _refuse(path, "a value that is Python objects on one rank and numbers on another")
    in_place = not missing and all(e[0][0] == "pyrows" for e in entries)
    if not in_place and not all(e[1] for e in present):
        raise _refuse(path, "a value that differs between ranks")
    presence = missing or any(d is not None and d[0] == "pyrows" and not d[1] for d in resolved)
    return Column(path, PYTHON, (), presence, not in_place)


# ---------------------------------------------------------------------- the rows
def columns(found: Walk, agreed: list[Column], n: int, device) -> dict[str, torch.Tensor]:
    """This rank's rows of every agreed column (value rows [n, ...] under the path; a
    presence column [n] bool under ``path + " present"``)."""
    out = {}
    for col in agreed:
        if col.alias:
            continue
        place = found.places.get(col.path)
        value = None if place is None else place.value
        if col.dtype == PYTHON:
            out.update(_python_rows(found, col, value, n, device))
            continue
        dtype = getattr(torch, col.dtype.split(".")[-1])
        if isinstance(value, Batched) and not col.presence and value._t.dtype == dtype:
            out[col.path] = value._t  # (every particle: the rows as they are)
            continue
        rows = torch.zeros((n, *col.shape), dtype=dtype, device=device)
        present = torch.zeros(n, dtype=torch.bool, device=device)
        if isinstance(value, Batched):
            idx = value._idx
            rows[idx] = value._t.to(dtype)
            present[idx] = True
        elif value is not None:
            rows[:] = torch.as_tensor(value, dtype=dtype, device=device)
            present[:] = True
        out[col.path] = rows
        if col.presence:
            out[col.path + " present"] = present
    return out


def _python_rows(found: Walk, col: Column, value, n: int, device) -> dict:
    """A Python column's rows: each particle's object as a JSON row (uint8 [n, width];
    ``python_paths``/``live_values.pad`` widen them to the ranks' common width)."""
    present = torch.zeros(n, dtype=torch.bool)
    try:
        if isinstance(value, PerParticle):
            items, idx = value.items, value._idx
            encoded = live_values.encode(items, found.models)
            rows = torch.zeros((n, encoded.shape[1]), dtype=torch.uint8)
            rows[idx.cpu()] = encoded
            present[idx.cpu()] = True
        elif value is not None:
            rows = live_values.encode_one(value, n, found.models)
            present[:] = True
        else:
            rows = torch.zeros((n, live_values._LEN), dtype=torch.uint8)
    except live_values.NotData as err:
        raise _refuse(col.path, f"per-particle Python values that are not data ({err})") from None
    out = {col.path: rows}
    if col.presence:
        out[col.path + " present"] = present.to(device)
    return out


def python_paths(agreed: list[Column]) -> list[str]:
    """The agreed columns of Python rows (their widths differ between ranks: the caller
    widens every rank's rows to the widest, one collective)."""
    return [c.path for c in agreed if c.dtype == PYTHON and not c.alias]


def install(found: Walk, agreed: list[Column], moved: dict[str, torch.Tensor], lineage: Lineage) -> None:
    """Put the moved rows in place (module docstring); every batched value of the run
    found by the walk is then at the lineage's new epoch."""
    full = lineage.full_idx
    updated: dict[int, Batched] = {}
    written: dict[str, Any] = {}
    for col in agreed:
        place = found.places.get(col.path)
        if col.alias:
            value = written.get(col.alias)
            _write(place.holder, place.key, value, full)
            written[col.path] = value
            continue
        rows = moved[col.path]
        present = moved.get(col.path + " present")
        if present is not None and bool(present.all()):
            present = None
        idx = full if present is None else torch.nonzero(present).reshape(-1).to(full.device)
        payload = rows if present is None else rows.index_select(0, idx.to(rows.device))
        if col.dtype == PYTHON:
            payload = _decoded(found, col, payload)
        if not col.replace:
            place.value._relocate(payload, idx)
            updated[id(place.value)] = place.value
            continue
        # written anew into its frame or list (or put back where this rank lacked it)
        holder, key = (place.holder, place.key) if place is not None else _absent_holder(found, col.path)
        made = PerParticle if col.dtype == PYTHON else Batched
        value = made(payload, idx) if idx.shape[0] or not isinstance(holder, dict) else None
        written[col.path] = value
        _write(holder, key, value, full)
        if value is not None:
            updated[id(value)] = value
    _drop_memos(found)
    lineage.renew(list(updated.values()))


def _decoded(found: Walk, col: Column, rows: torch.Tensor) -> list:
    try:
        return live_values.decode(rows, found.models)
    except (live_values.NotData, ValueError) as err:
        raise _refuse(col.path, f"per-particle Python values that did not arrive intact ({err})") from None


def _drop_memos(found: Walk) -> None:
    """Forget the per-particle memos of the language models and their distributions
    (caches keyed by the particles as they were: recomputed exactly after the move)."""
    for obj in found.caches:
        if isinstance(obj, lm_dsl.LMValue):
            obj._ctx_memo = None
        else:
            obj._cache = obj._last = None
    found.cached.clear()


def _write(holder, key, value, full) -> None:
    """``holder[key] = value``; None: a variable no particle of this rank has (removed)."""
    if value is None:
        holder.pop(key, None)
    else:
        holder[key] = value


def _absent_holder(found: Walk, path: str):
    """(frame vars, name) for a variable this rank's frame lacks."""
    parent, name = path.rsplit(".vars[", 1)
    return found.frames[parent].vars, name[:-1]
