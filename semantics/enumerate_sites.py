"""Discrete choices summed out inside sampling methods (``z ~ categorical(w) @enumerate``).

Transformation and invariant. A choice selected for enumeration (marked ``@enumerate``, or
named in a method's ``enumerate=[...]``) is not drawn: the middleware ``Enumerating`` answers
its ``SampleEffect`` with an ``EnumValue``, all of z's K values at once along a new
*enumeration dimension*, and records z's log prior as a factor table. Arithmetic,
comparisons, ``a if z else b``, indexing by z and distribution parameters carry the
enumeration dimensions they depend on (``semantics.lazy`` hooks). An observe, factor or
condition whose log density has enumeration dimensions adds a table [N, K_a, K_b, ...] to the
run's factor graph, and reaches the handler as a ``FactorEffect`` of the per-particle change
of log Z = log sum_z prod(factors) (variable elimination per connected component, order from
``semantics.elimination``): the handler's weight after every checkpoint is the weight of the
program with z marginalised, so importance sampling and SMC stay proper for the same
measure on the remaining choices (incremental weights log Z_t - log Z_{t-1}), and NUTS's
potential is the marginal density, differentiable in the continuous choices.

At the end of a run (``recover=True``) each enumerated choice is drawn, in order, from its
conditional given the continuous values and the choices drawn before it (as Pyro's
``infer_discrete``): the handler sees a ``SampleEffect`` of the choice with that conditional
as its distribution, so it enters the trace; drawing z ~ p(z | rest) from the factor graph
and continuing with z fixed leaves the joint weight proper (w Z' / (Z p(z|...)) = w). The
same happens earlier when a choice whose distribution depends on an enumerated value is not
enumerated itself (its parents are drawn first). An enumerated value used where a concrete
one is needed (``if z:``, a built-in function of z, a loop over it) is a located error
telling the user to drop ``@enumerate`` there.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from . import limits
from .dist_values import DistValue
from .errors import PPLError, PPLRuntimeError
from .interpreter import ConditionEffect, FactorEffect, ObserveEffect, SampleEffect
from .lazy import Lazy, has_lazy, live_run
from .values import (Batched, Particles, _PerParticleValue, _positions_of, _torch_binop, as_tensor,
                     batch_rows, deep_batched, is_batched, matmul_tensors, rows)

_DROP_HINT = "drop @enumerate on {name} (or leave it out of enumerate=[...]) to draw it instead"


def blame(err: PPLError, choices: Iterable[str]) -> PPLError:
    """Note on ``err`` the enumerated choices (addresses) it is about, as
    ``err.enumerated`` (kept if already set): ``enumerate="auto"`` leaves them sampled
    and runs again (``semantics.enumerate_auto``)."""
    if getattr(err, "enumerated", None) is None:
        err.enumerated = tuple(choices)
    return err


class ExactAddresses(frozenset):
    """``enumerate=`` as a set of exact addresses (what ``enumerate="auto"`` chose), not
    names: ``z`` selects the site ``z`` only, not ``z[3]`` nor ``f/z``."""


class EnumVar:
    """One enumerated choice: its address, support size K, values [K] (bool or long:
    value k is the support's k-th element) and, once drawn, its index per particle."""

    __slots__ = ("id", "addr", "K", "values", "span", "present", "forced", "live", "bucket")

    def __init__(self, vid: int, addr: str, K: int, values: torch.Tensor, span, present: Batched):
        self.id, self.addr, self.K, self.values, self.span = vid, addr, K, values, span
        self.present = present  # bool [N] (all particles; follows resampling): where the choice was made
        self.forced: Batched | None = None  # long [N]: the drawn index (0 where absent)
        self.live = 0  # how many EnumValues over this choice exist (0: no new factor can involve it)
        self.bucket: tuple | None = None  # once summed out early: (dims, log table) of its factors

    def __repr__(self) -> str:
        return f"EnumVar({self.addr}, K={self.K})"

    @property
    def name(self) -> str:
        return self.addr.split("/")[-1].split("[")[0]


class EnumValue(Lazy, _PerParticleValue):
    """A value over the enumerated choices ``dims``: row k of ``table`` [M, K_d..., *s]
    belongs to global particle idx[k]; axis 1+j runs over dims[j]'s values."""

    __slots__ = ("_t", "dims")

    def __init__(self, table: torch.Tensor, dims: tuple, idx: torch.Tensor):
        _PerParticleValue.__init__(self, idx)
        self._t, self.dims = table, dims
        for d in dims:
            d.live += 1

    def __del__(self):
        for d in getattr(self, "dims", ()):
            d.live -= 1
        _PerParticleValue.__del__(self)

    def _select(self, sel):
        self._t = self._t.index_select(0, sel)

    def describe(self) -> str:
        return f"enumerated value (of {', '.join(d.addr for d in self.dims) or 'no choice'})"

    def force(self, ctx, use: str):
        t, dims = self.table(ctx)
        if not dims:
            return Batched(t, ctx.idx)
        names = ", ".join(d.addr for d in dims)
        raise blame(PPLRuntimeError(f"the enumerated choice {names} is used {use}, which needs its value",
                                    hint=_DROP_HINT.format(name=dims[0].name) +
                                    "; enumerated choices can be computed with (+, ==, a if z else b, xs[z]) "
                                    "and be a distribution's parameter"), [d.addr for d in dims])

    def table(self, ctx) -> tuple[torch.Tensor, tuple]:
        """(rows for ctx [M, K..., *s], the dims still enumerated): drawn choices are read
        at their drawn index."""
        self._fresh()
        t = self._t if self._idx is ctx.idx else self._t.index_select(0, _positions_of(self._idx, ctx))
        dims = self.dims
        if any(d.forced is not None for d in dims):
            keep = []
            for d in dims:
                if d.forced is None:
                    keep.append(d)
                    continue
                ax = 1 + len(keep)
                k = rows(d.forced, ctx)
                k = k.reshape(k.shape[0], *([1] * (t.dim() - 1)))
                t = torch.take_along_dim(t, k.expand(*t.shape[:ax], 1, *t.shape[ax + 1:]), dim=ax).squeeze(ax)
            dims = tuple(keep)
        return t, dims

    @classmethod
    def merge(cls, parts, target):
        """One value over ``target`` from values on parts of it (a write on a branch):
        every part over the union of the enumerated choices; rows keep their own values."""
        subs = [(Particles(idx, target.N, target.device, target.full), v) for idx, v in parts]
        ops = [_operand(v, sub) for sub, v in subs]
        dims: list = []
        for _, ds, _, _ in ops:
            dims.extend(d for d in ds if d not in dims)
        r = max(op[2] for op in ops)
        shapes = {tuple(t.shape[1 + len(ds):]) if b else tuple(t.shape) for t, ds, _, b in ops}
        if len(shapes) != 1:
            raise PPLRuntimeError("the branches of an `if` give an enumerated variable values of different shapes")
        s = shapes.pop()
        full = (*[d.K for d in dims], *([1] * (r - len(s))), *s)
        pieces = [_expand(t, ds, dims, rs, r, b) for t, ds, rs, b in ops]
        dtype = pieces[0].dtype
        for p in pieces[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        out = torch.empty((target.M, *full), dtype=dtype, device=target.device)
        for (sub, _), p in zip(subs, pieces):
            out[target.positions(sub.idx)] = p.to(dtype).expand(sub.M, *full)
        return _make(out, tuple(dims), target)

    # -- the operations the enumeration supports lazily
    def binop(self, op, other, ctx, swapped):
        if op == "in":
            return super().binop(op, other, ctx, swapped)
        (a, b), dims = _lift_all([self, other], ctx, align=op != "@")
        if swapped:
            a, b = b, a
        if op == "@":  # each value's own shape; the particle and enumeration dims lead
            return _make(matmul_tensors(a, b, (1 + len(dims), 1 + len(dims))), dims, ctx)
        return _make(_torch_binop(op, a, b, lead=(True, True)), dims, ctx)

    def unop(self, op, ctx):
        t, dims = self.table(ctx)
        if op == "not":
            return _make(~_truth(t), dims, ctx)
        if t.dtype == torch.bool:
            t = t.long()
        return _make(-t if op == "-" else t, dims, ctx)

    def where(self, then, orelse, ctx):
        (c, a, b), dims = _lift_all([self, then, orelse], ctx)
        a, b = _promote2(a, b)
        return _make(torch.where(_truth(c), a, b), dims, ctx)

    def index_of(self, container, ctx):
        k, dims = self.table(ctx)
        if k.is_floating_point():
            k = k.long()
        if k.dtype == torch.bool:
            k = k.long()
        M, nd = k.shape[0], len(dims)
        if k.dim() != 1 + nd:
            raise PPLRuntimeError(f"an index must be an integer, got a vector ({self.describe()})")
        if isinstance(container, EnumValue) or has_lazy(container):
            raise blame(PPLRuntimeError("indexing an enumerated value by an enumerated value is not supported",
                                        hint=_DROP_HINT.format(name=dims[0].name if dims else "z")),
                        [d.addr for d in dims])
        if isinstance(container, (list, tuple)) and deep_batched(container) or isinstance(container, Batched):
            table = batch_rows(list(container) if isinstance(container, (list, tuple)) else container, ctx)
            n = table.shape[1]
            _check_range(k, n)
            rowsel = torch.arange(M, device=k.device).reshape(M, *([1] * nd))
            return _make(table[rowsel, k % n], dims, ctx)
        table = as_tensor(list(container) if isinstance(container, (list, tuple, range)) else container, ctx.device)
        if table.dim() == 0:
            raise PPLRuntimeError("cannot index a number")
        n = table.shape[0]
        _check_range(k, n)
        return _make(table[k % n], dims, ctx)

    def getitem(self, index, ctx):
        t, dims = self.table(ctx)
        if is_batched(index) or isinstance(index, Lazy) or not isinstance(index, (int, bool)) and \
                not (isinstance(index, torch.Tensor) and index.dim() == 0):
            return super().getitem(index, ctx)
        ax = 1 + len(dims)
        if t.dim() <= ax:
            raise PPLRuntimeError("cannot index a number")
        i = int(index)
        n = t.shape[ax]
        if not -n <= i < n:
            raise PPLRuntimeError(f"index {i} out of range for length {n}")
        return _make(t.select(ax, i), dims, ctx)


def _check_range(k: torch.Tensor, n: int) -> None:
    if bool(((k < -n) | (k >= n)).any()):
        bad = int(k[(k < -n) | (k >= n)][0])
        raise PPLRuntimeError(f"index {bad} out of range for length {n}")


def _truth(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.bool else t != 0


def _promote2(a, b):
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def _make(t: torch.Tensor, dims: tuple, ctx):
    return EnumValue(t, dims, ctx.idx) if dims else Batched(t, ctx.idx)


def _operand(v, ctx):
    """(tensor, dims, per-particle rank, batched) of an operand."""
    if isinstance(v, EnumValue):
        t, dims = v.table(ctx)
        return t, dims, t.dim() - 1 - len(dims), True
    if isinstance(v, Lazy):
        raise PPLRuntimeError(f"an enumerated value cannot be combined with a {v.describe()}")
    if isinstance(v, Batched) or isinstance(v, (list, tuple)) and deep_batched(v):
        t = batch_rows(v, ctx)
        return t, (), t.dim() - 1, True
    try:
        t = as_tensor(v, ctx.device)
    except PPLError:
        raise PPLRuntimeError(f"an enumerated value cannot be combined with this value ({type(v).__name__})")
    return t, (), t.dim(), False


def _lift_all(vals: list, ctx, align: bool = True) -> tuple[list, tuple]:
    """The operands as tensors [M or 1, K_d (or 1) for d in dims, *s] with their
    per-particle shapes right-aligned (``align``: padded with 1s to one rank, as
    elementwise operations need; else each keeps its own shape), and the union ``dims``."""
    ops = [_operand(v, ctx) for v in vals]
    dims: list = []
    for _, ds, _, _ in ops:
        dims.extend(d for d in ds if d not in dims)
    r = max(op[2] for op in ops)
    if len(dims) > 1:  # the result's table has one axis per enumerated choice: refuse one too large
        try:
            limits.check_memory(8 * ctx.M * math.prod(d.K for d in dims),
                                f"a value over {len(dims)} enumerated choices ({', '.join(d.addr for d in dims[:4])}"
                                f"{', ...' if len(dims) > 4 else ''})",
                                "enumerate fewer choices (drop @enumerate on some), or combine them less")
        except PPLError as err:
            raise blame(err, [d.addr for d in dims])
    return [_expand(t, ds, dims, rs, r if align else rs, b) for t, ds, rs, b in ops], tuple(dims)


def _expand(t: torch.Tensor, ds: tuple, dims: list, rs: int, r: int, batched: bool) -> torch.Tensor:
    if not batched:
        return t.reshape(1, *([1] * len(dims)), *([1] * (r - rs)), *t.shape)
    n = len(ds)
    s = t.shape[1 + n:]
    missing = [d for d in dims if d not in ds]
    t = t.reshape(t.shape[0], *t.shape[1:1 + n], *([1] * len(missing)), *([1] * (r - rs)), *s)
    order = list(ds) + missing
    if order != list(dims):
        perm = [0] + [1 + order.index(d) for d in dims] + list(range(1 + len(dims), t.dim()))
        t = t.permute(perm)
    return t


# ------------------------------------------------------------------------- the factor graph
class FactorGraph:
    """The factors of one run over all N particles: (dims, log table [N, K_d...] float64
    as a Batched following resampling), grouped in connected components, each with the
    log Z reported to the handler so far (``reported``)."""

    def __init__(self, full: Particles):
        self.full = full
        self.vars: list[EnumVar] = []
        self.comp_of: dict[EnumVar, int] = {}
        self.comps: dict[int, list] = {}  # component id -> [(dims, Batched table)]
        self.reported: dict[int, Batched] = {}  # component id -> log Z [N] already in the weights
        self.members: dict[int, list] = {}  # component id -> its choices not summed out yet
        self.eliminated: list[EnumVar] = []  # choices summed out early, in order
        self._next = 0

    # -- building
    def new_var(self, addr, K, values, span, ctx) -> EnumVar:
        present = torch.zeros(self.full.N, dtype=torch.bool, device=self.full.device)
        present[ctx.idx] = True
        v = EnumVar(len(self.vars), addr, K, values, span, Batched(present, self.full.idx))
        self.vars.append(v)
        cid = self._next
        self._next += 1
        self.comp_of[v] = cid
        self.comps[cid] = []
        self.members[cid] = [v]
        self.reported[cid] = Batched(torch.zeros(self.full.N, dtype=torch.float64, device=self.full.device),
                                     self.full.idx)
        return v

    def full_rows(self, t: torch.Tensor, dims: tuple, ctx, pad_prior_of: EnumVar | None = None) -> torch.Tensor:
        """A table for the particles of ctx as a table for all N (0 elsewhere; a choice's
        prior is a point mass on its first value elsewhere)."""
        if ctx.M == self.full.N and ctx.is_full:
            return t
        out = torch.zeros((self.full.N, *t.shape[1:]), dtype=t.dtype, device=t.device)
        if pad_prior_of is not None:
            ax = 1 + dims.index(pad_prior_of)
            out.narrow(ax, 1, t.shape[ax] - 1).fill_(-math.inf)
        out[ctx.full.positions(ctx.idx)] = t
        return out

    def add(self, dims: tuple, table: torch.Tensor) -> torch.Tensor:
        """Add a factor (table [N, K_d...] over all particles); the change of log Z [N]."""
        cids = sorted({self.comp_of[d] for d in dims})
        cid = cids[0]
        old = sum(self.reported[c].t for c in cids)
        for c in cids[1:]:
            self.comps[cid].extend(self.comps.pop(c))
            del self.reported[c]
            for v in self.members.pop(c):
                self.comp_of[v] = cid
                self.members[cid].append(v)
        self._insert(cid, dims, table)
        new = self.log_z(cid)
        self.reported[cid] = Batched(new, self.full.idx)
        self.sum_out_dead(cid)
        return new - old

    def sum_out_dead(self, cid) -> None:
        """Sum out, once and for all, the component's choices that no value refers to any
        more (no later factor can involve them): their factors become one message on
        their neighbours (log Z is unchanged), and their table is kept (``bucket``) to draw
        them back at the end, given their neighbours (forward filtering, backward
        sampling). A chain then costs time linear in its length."""
        for v in [v for v in self.members[cid] if v.live == 0 and v.forced is None]:
            factors = self.comps[cid]
            touching = [f for f in factors if v in f[0]]
            self.members[cid].remove(v)
            if not touching:
                continue
            (tabs, dims) = _lift_all([EnumValue(ft.t, fd, self.full.idx) for fd, ft in touching], self.full)
            total = sum(tabs[1:], tabs[0])
            total = total.expand(self.full.N, *[d.K for d in dims])
            v.bucket = (dims, Batched(total, self.full.idx))
            message = torch.logsumexp(total, dim=1 + dims.index(v))
            self.comps[cid] = [f for f in factors if v not in f[0]] + \
                [(tuple(d for d in dims if d is not v), Batched(message, self.full.idx))]
            self.eliminated.append(v)

    def _insert(self, cid, dims, table):
        factors = self.comps[cid]
        for j, (fd, ft) in enumerate(factors):
            if fd == dims:  # (the common case: another factor on the same choices)
                factors[j] = (fd, Batched(ft.t + table, self.full.idx))
                return
            if set(dims) <= set(fd):  # merge into a factor that covers it (keeps tables few)
                (a, b), _ = _lift_all([EnumValue(ft.t, fd, self.full.idx), EnumValue(table, dims, self.full.idx)],
                                      self.full)
                factors[j] = (fd, Batched((a + b).reshape(ft.t.shape), self.full.idx))
                return
        factors.append((dims, Batched(table, self.full.idx)))

    # -- elimination
    def _tables(self, cid) -> list:
        """The component's factors with drawn choices sliced out: [(dims, tensor)]."""
        out = []
        for fd, ft in self.comps[cid]:
            t, dims = EnumValue(ft.t, fd, self.full.idx).table(self.full)
            out.append((dims, t))
        return out

    def log_z(self, cid, keep: EnumVar | None = None) -> torch.Tensor:
        """log sum over the component's free choices of the product of its factors: [N]
        (or [N, K] over ``keep``), by variable elimination."""
        factors = self._tables(cid)
        N = self.full.N
        if len(factors) == 1:  # (the common case: one table; no elimination order needed)
            dims, t = factors[0]
            if keep is None:
                return t.reshape(N, -1).logsumexp(1) if dims else t.reshape(N)
            if dims == (keep,):
                return t
        free = []
        for dims, _ in factors:
            free.extend(d for d in dims if d not in free)
        order = _order([dims for dims, _ in factors], keep)
        for v in order:
            if v is keep:
                continue
            touching = [f for f in factors if v in f[0]]
            factors = [f for f in factors if v not in f[0]]
            scope = {d for dd, _ in touching for d in dd}
            try:
                limits.check_memory(8 * N * math.prod(d.K for d in scope),
                                    f"eliminating {v.addr} joins a table over {len(scope)} enumerated choices, which",
                                    "enumerate fewer choices (drop @enumerate on some), or ones that interact less")
            except PPLError as err:
                raise blame(err, [d.addr for d in scope])
            (tabs, dims) = _lift_all([EnumValue(t, d, self.full.idx) for d, t in touching], self.full)
            total = sum(tabs[1:], tabs[0])
            ax = 1 + dims.index(v)
            factors.append((tuple(d for d in dims if d is not v), torch.logsumexp(total, dim=ax)))
        out = torch.zeros((N, keep.K) if keep is not None else (N,), dtype=torch.float64, device=self.full.device)
        for dims, t in factors:
            if keep is not None and dims:
                out = out + t.reshape(N, keep.K)
            else:
                out = out + (t.reshape(N, 1) if keep is not None else t.reshape(N))
        return out

    def conditional(self, v: EnumVar) -> torch.Tensor:
        """log p(v | the factors so far, the drawn choices) [N, K], normalised (a choice
        summed out early: given its drawn neighbours, from its bucket)."""
        if v.bucket is not None:
            bdims, bt = v.bucket
            m, dims = EnumValue(bt.t, bdims, self.full.idx).table(self.full)
            for d in reversed(dims):  # (neighbours not drawn: none when drawn in reverse order)
                if d is not v:
                    m = torch.logsumexp(m, dim=1 + dims.index(d))
            m = m.reshape(self.full.N, v.K)
        else:
            m = self.log_z(self.comp_of[v], keep=v)
        return m - torch.logsumexp(m, dim=1, keepdim=True)

    def recovery_order(self) -> list:
        """The order to draw every choice back: those still in the graph, then those
        summed out early, last summed out first."""
        return [v for v in self.vars if v.bucket is None] + self.eliminated[::-1]

    def set_drawn(self, v: EnumVar, k_full: torch.Tensor) -> None:
        """v takes index k (long [N]); the component's log Z baseline becomes the
        conditioned one (the draw was from the conditional: no change of weight)."""
        v.forced = Batched(k_full, self.full.idx)
        if v.bucket is None:  # (one summed out early is in no factor any more)
            cid = self.comp_of[v]
            self.reported[cid] = Batched(self.log_z(cid), self.full.idx)


def _order(scopes: list, keep) -> list:
    """An elimination order of the variables of ``scopes`` (``keep`` last)."""
    variables = []
    for s in scopes:
        variables.extend(d for d in s if d not in variables)
    if len(variables) <= 2:
        return [v for v in variables if v is not keep] + ([keep] if keep in variables else [])
    try:
        from .elimination import elimination_order
        return elimination_order([tuple(s) for s in scopes], last=(keep,) if keep is not None else ())
    except ImportError:  # pragma: no cover - the shared module is absent
        return [v for v in variables if v is not keep] + ([keep] if keep in variables else [])


# ------------------------------------------------------------------------------ the middleware
def site_selector(names: Iterable[str] | None) -> Callable[[str], bool]:
    """``enumerate=[...]`` as a test of an address: a name (``z`` selects ``z``, ``z[3]``,
    ``f/z[0]``) or an address prefix (``f/`` , ``z[3]``); ``ExactAddresses``: those addresses only."""
    if isinstance(names, ExactAddresses):
        return names.__contains__
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names or []) if n and n.strip()]
    if not names:
        return lambda addr: False

    def selected(addr: str) -> bool:
        base = addr.split("/")[-1].split("[")[0]
        return any(base == n or addr == n or addr.startswith(n) and (n.endswith("/") or addr[len(n)] in "[/")
                   for n in names)
    return selected


class Enumerating:
    """An interpreter whose runs sum the selected choices out (module docstring); every
    other attribute is the wrapped interpreter's. ``select(addr)``: also enumerate this
    choice (besides ``@enumerate`` ones); ``recover``: draw the enumerated choices from
    their conditional at the end of the run (they enter the trace and the return value)."""

    def __init__(self, inner, select: Callable[[str], bool] = lambda addr: False, recover: bool = True,
                 run_cls: type | None = None):
        self._inner = inner
        self._select = select
        self.recover = recover
        self._run_cls = run_cls or EnumRun  # (a test substitutes a broken one)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def with_recovery(self, recover: bool = True) -> "Enumerating":
        """The same enumeration, drawing the summed-out choices back at the end or not."""
        return Enumerating(self._inner, self._select, recover=recover, run_cls=self._run_cls)

    def without_recovery(self) -> "Enumerating":
        return self.with_recovery(False)

    def run(self, entry: str, data: dict, ctx) -> Any:
        return self._run_cls(self, ctx).run(self._inner.run(entry, data, ctx))


class EnumRun:
    """One run of ``Enumerating``."""

    def __init__(self, owner: Enumerating, ctx):
        self.owner = owner
        self.graph = FactorGraph(ctx.full)
        self._last_support = None

    def run(self, gen):
        with live_run():
            try:
                try:
                    eff = next(gen)
                    while True:
                        try:
                            reply = yield from self.handle(eff)
                        except GeneratorExit:
                            raise
                        except BaseException as err:  # noqa: BLE001 - the program's frames see it
                            eff = gen.throw(err)
                            continue
                        eff = gen.send(reply)
                except StopIteration as stop:
                    ret = stop.value
            finally:
                gen.close()
            if self.owner.recover:
                for v in self.graph.recovery_order():
                    if v.forced is None:
                        yield from self.draw(v)
            ret = _resolve(ret, self.graph.full, self.owner.recover)
            if not self.owner.recover and has_lazy(ret):
                return None  # (the value depends on choices that were summed out and not drawn back)
            return ret

    # -- effects
    def handle(self, eff):
        try:
            return (yield from self._handle(eff))
        except PPLError as err:
            raise err.with_span(eff.span)

    def _handle(self, eff):
        t = type(eff)
        if t is SampleEffect:
            if eff.enumerate or self.owner._select(eff.addr):
                return (yield from self.enumerate_site(eff))
            if isinstance(eff.dist, DistValue) and has_lazy(eff.dist.args):
                yield from self.draw_parents(eff.dist.args, eff)
                eff = SampleEffect(eff.addr, _concrete_dist(eff.dist, eff.ctx), eff.ctx, eff.span)
            return (yield eff)
        if t is ObserveEffect and (has_lazy(eff.value) or isinstance(eff.dist, DistValue) and has_lazy(eff.dist.args)):
            lp, dims = lazy_log_prob(eff.dist, eff.value, eff.ctx)
            return (yield from self.factor(eff, lp, dims))
        if t is FactorEffect and isinstance(eff.value, Lazy):
            lp, dims = _lift_all([eff.value], eff.ctx)
            return (yield from self.factor(eff, lp[0].to(torch.float64).reshape(lp[0].shape[:1 + len(dims)]), dims))
        if t is ConditionEffect and isinstance(eff.value, Lazy):
            (c,), dims = _lift_all([eff.value], eff.ctx)
            c = _truth(c).reshape(c.shape[:1 + len(dims)])
            lp = torch.zeros(c.shape, dtype=torch.float64, device=c.device).masked_fill(~c, -math.inf)
            return (yield from self.factor(eff, lp, dims))
        return (yield eff)

    def factor(self, eff, lp: torch.Tensor, dims: tuple):
        """Add a factor table for eff's particles; the handler sees the change of log Z."""
        if not dims:
            return (yield FactorEffect(eff.addr, Batched(lp.to(torch.float64), eff.ctx.idx), eff.ctx, eff.span))
        lp = lp.to(torch.float64).expand(eff.ctx.M, *[d.K for d in dims])
        delta = self.graph.add(dims, self.graph.full_rows(lp, dims, eff.ctx))
        mine = delta[_positions_of(self.graph.full.idx, eff.ctx)]
        yield FactorEffect(eff.addr, Batched(mine, eff.ctx.idx), eff.ctx, eff.span)
        return None

    def enumerate_site(self, eff):
        """Answer an enumerated choice with its EnumValue (no effect reaches the handler)."""
        d, ctx = eff.dist, eff.ctx
        if not isinstance(d, DistValue) or not d.spec.discrete:
            raise blame(PPLRuntimeError(f"only a discrete choice of finite support can be enumerated ({eff.addr} is "
                                        f"{getattr(d, 'describe', lambda: 'not one')()})", eff.span,
                                        _DROP_HINT.format(name=eff.addr)), [eff.addr])
        try:
            values, logp, dims = self.support_table(d, ctx, eff)
        except PPLError as err:
            raise blame(err, [eff.addr])
        K = values.shape[0]
        v = self.graph.new_var(eff.addr, K, values, eff.span, ctx)
        value = EnumValue(values.reshape(1, K).expand(ctx.M, K), (v,), ctx.idx)  # (its value is its own index)
        self.add_prior(v, dims + (v,), logp, ctx)
        return value
        yield  # pragma: no cover  (a generator like the other handlers)

    def support_table(self, d: DistValue, ctx, eff):
        """``_support_table``, remembered for the last distribution (a choice in a loop,
        ``z ~ flip(w)``, has the same one at every iteration while the particles stay)."""
        key = (d.spec, ctx.idx, ctx.generation)
        last = self._last_support
        if last is not None and all(a is b for a, b in zip(last[0][:2], key[:2])) and last[0][2] == key[2] and \
                len(last[1]) == len(d.args) and \
                all(a is b for a, b in zip(last[1], d.args)) and all(
                    type(a) in (int, float, bool, Batched) for a in d.args):
            return last[2]
        out = _support_table(d, ctx, eff)
        if all(type(a) in (int, float, bool, Batched) for a in d.args):  # (never an enumerated value: kept alive)
            self._last_support = (key, d.args, out)
        return out

    def add_prior(self, v: EnumVar, dims: tuple, logp: torch.Tensor, ctx) -> None:
        """v's log prior table (over its parents and v) joins the factor graph (it sums to
        one over v: no change of log Z)."""
        self.graph.add(dims, self.graph.full_rows(logp, dims, ctx, pad_prior_of=v))

    def draw_parents(self, args, eff):
        """Draw the enumerated choices ``args`` depend on (a choice that is not enumerated
        has a distribution that depends on them)."""
        for a in _lazies(args):
            for v in a.dims:
                if v.forced is None:
                    yield from self.draw(v)

    def draw(self, v: EnumVar):
        """Draw v from its conditional, as a choice the handler sees (it enters the trace)."""
        g = self.graph
        logp = g.conditional(v)
        present = v.present.t
        sub = g.full.subset(present) if not bool(present.all()) else g.full
        if sub is None:
            v.forced = Batched(torch.zeros(g.full.N, dtype=torch.long, device=g.full.device), g.full.idx)
            return
        p = logp.exp() if sub is g.full else logp.exp()[present]
        p = p / p.sum(1, keepdim=True)
        dist = _posterior_dist(v, p, sub)
        value = yield SampleEffect(v.addr, dist, sub, v.span)
        k = batch_rows(value, sub).long().reshape(sub.M)
        k_full = torch.zeros(g.full.N, dtype=torch.long, device=g.full.device)
        k_full[present] = k
        g.set_drawn(v, k_full)


def _lazies(v):
    if isinstance(v, EnumValue):
        yield v
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _lazies(x)


def _concrete_dist(d: DistValue, ctx) -> DistValue:
    return DistValue(d.spec, tuple(_resolve(a, ctx, True) for a in d.args), d.defaulted)


def _resolve(v, ctx, strict: bool):
    """A value with its enumerated parts read at the drawn indices."""
    if isinstance(v, EnumValue):
        t, dims = v.table(ctx)
        if dims:
            if strict:
                raise PPLRuntimeError(f"internal error: {v.describe()} was not drawn")
            return v
        return Batched(t, ctx.idx)
    if isinstance(v, list):
        return [_resolve(x, ctx, strict) for x in v]
    if isinstance(v, tuple):
        return tuple(_resolve(x, ctx, strict) for x in v)
    return v


_SPECS: dict = {}


def _spec(name: str):
    if not _SPECS:
        from ..stdlib.distributions import DISTRIBUTIONS
        _SPECS.update(DISTRIBUTIONS)
    return _SPECS[name]


def _posterior_dist(v: EnumVar, p: torch.Tensor, ctx) -> DistValue:
    """The conditional of v as a distribution of v's values (flip for bools, else a
    categorical over indices, which are v's values)."""
    if v.values.dtype == torch.bool:
        return DistValue(_spec("flip"), (Batched(p[:, 1], ctx.idx),))
    return DistValue(_spec("categorical"), (Batched(p, ctx.idx),))


def _flatten_args(args, ctx, extra: list = ()):
    """The lazy and batched arguments as Batched over a fake population of M * prod(K)
    rows (particle-major), so the distribution code scores all assignments at once."""
    lazies = [a for a in list(args) + list(extra) if isinstance(a, EnumValue)]
    if any(has_lazy(a) and not isinstance(a, EnumValue) for a in list(args) + list(extra)):
        raise PPLRuntimeError("a list holding enumerated values cannot be a distribution's parameter",
                              hint="index the list by the enumerated value instead: ps[z]")
    dims: list = []
    for a in lazies:
        dims.extend(d for d in a.table(ctx)[1] if d not in dims)
    dims = tuple(dims)
    P = math.prod(d.K for d in dims)
    fake = Particles.all(ctx.M * P, ctx.device)
    Ks = [d.K for d in dims]

    def flat(a):
        if isinstance(a, EnumValue):
            t, ds = a.table(ctx)
            t = _expand(t, ds, list(dims), t.dim() - 1 - len(ds), t.dim() - 1 - len(ds), True)
            t = t.expand(ctx.M, *Ks, *t.shape[1 + len(dims):])
            return Batched(t.reshape(ctx.M * P, *t.shape[1 + len(dims):]), fake.idx)
        if isinstance(a, Batched) or deep_batched(a):
            t = batch_rows(a, ctx)
            t = t.reshape(ctx.M, *([1] * len(dims)), *t.shape[1:]).expand(ctx.M, *Ks, *t.shape[1:])
            return Batched(t.reshape(ctx.M * P, *t.shape[1 + len(dims):]), fake.idx)
        return a
    return [flat(a) for a in args], [flat(a) for a in extra], dims, fake


def lazy_log_prob(d: DistValue, value, ctx) -> tuple[torch.Tensor, tuple]:
    """The log density of value under d for every assignment of the enumerated choices
    they depend on: ([M, K_d...] float64, dims)."""
    args, (val,), dims, fake = _flatten_args(d.args, ctx, [value])
    lp = DistValue(d.spec, tuple(args), d.defaulted).log_prob(val, fake)
    lp = torch.as_tensor(lp, dtype=torch.float64)
    if lp.dim() == 0:
        lp = lp.expand(fake.M)
    return lp.reshape(ctx.M, *[v.K for v in dims]), dims


def _support_table(d: DistValue, ctx, eff):
    """(values [K], log prior [M, K_parents..., K] float64, parent dims) of an enumerated
    choice's distribution."""
    if getattr(d.spec, "index_valued", False):  # uniform_draw(items)
        items = d.args[0]
        if is_batched(items) or has_lazy(items):
            raise PPLRuntimeError("an enumerated uniform_draw needs the same items for every particle", eff.span,
                                  _DROP_HINT.format(name=eff.addr))
        values = as_tensor(list(items), ctx.device)
        K = values.shape[0]
        _check_table(ctx.M * K, eff)
        if values.dim() != 1 or values.is_floating_point() or not torch.equal(values.long(), torch.arange(K, device=ctx.device)):
            raise PPLRuntimeError("an enumerated uniform_draw needs the items 0, 1, ..., K-1 (a range(K))", eff.span,
                                  "write uniform_draw(range(K)) and index your items by the choice: items[z]")
        return values.long(), torch.full((ctx.M, K), -math.log(K), dtype=torch.float64, device=ctx.device), ()
    args, _, dims, fake = _flatten_args(d.args, ctx)
    try:
        td = DistValue(d.spec, tuple(args), d.defaulted).torch_dist(fake)
    except PPLError as err:
        raise err.with_span(eff.span)
    if not td.has_enumerate_support or td.event_shape != () or td.batch_shape not in ((), (fake.M,)):
        raise PPLRuntimeError(f"{d.spec.name}: only a single discrete value of finite support can be enumerated",
                              eff.span, _DROP_HINT.format(name=eff.addr))
    try:
        support = td.enumerate_support(expand=False).reshape(-1)
    except (NotImplementedError, ValueError, RuntimeError):
        raise PPLRuntimeError(f"{d.spec.name}: its support differs between particles and cannot be enumerated",
                              eff.span, _DROP_HINT.format(name=eff.addr)) from None
    K = support.shape[0]
    _check_table(fake.M * K, eff)
    lp = td.log_prob(support.reshape(K, *([1] * len(td.batch_shape)))).to(torch.float64)  # [K, (M*P)]
    lp = lp.reshape(K, -1).expand(K, fake.M).transpose(0, 1)
    values = d.spec.to_value(support)
    if values.dtype != torch.bool and not torch.equal(values.long(), torch.arange(K, device=values.device)):
        raise PPLRuntimeError(f"{d.spec.name}: an enumerated choice needs the values 0, 1, ..., K-1", eff.span,
                              _DROP_HINT.format(name=eff.addr))
    if values.dtype != torch.bool:
        values = values.long()
    return values, lp.reshape(ctx.M, *[v.K for v in dims], K), dims


def _check_table(entries: int, eff) -> None:
    """Refuse an enumerated choice's prior table too large for the memory budget."""
    limits.check_memory(8 * entries, f"the table of the enumerated choice {eff.addr} ({entries:,} entries)",
                        _DROP_HINT.format(name=eff.addr))


def marks_enumeration(program) -> bool:
    """Whether a program has a choice marked ``@enumerate``."""
    from . import ir

    def block(stmts) -> bool:
        for s in stmts:
            if isinstance(s, ir.Sample) and s.enumerate:
                return True
            for name in ("body", "then", "orelse"):
                sub = getattr(s, name, None)
                if isinstance(sub, tuple) and block(sub):
                    return True
        return False
    return any(block(f.body) for f in program.functions)


def enumerating(interp, program, names=None, recover: bool = True):
    """``interp`` wrapped to sum out the choices marked ``@enumerate`` and those ``names``
    selects (``site_selector``); ``interp`` itself when there are none."""
    if not names and not marks_enumeration(program):
        return interp
    return Enumerating(interp, site_selector(names), recover=recover)
