"""Delayed sampling (Murray, Lundén, Kudlicka, Broman & Schön 2018): the node algebra.

A random choice with a conjugate prior is kept as a *node*: a distribution (its current
marginal given every observation so far) instead of a value. A ``DelayedGraph`` holds
the nodes of one run; every node has one row per particle of the population (float64
tensors ``[N, ...]``), follows the run's resampling like any batched value (it is a
``values._PerParticleValue`` over all N particles), and each operation works on the
rows of the particles that perform it.

Families (the prior of a node) and what is done lazily with it:

* ``normal`` (mean ``m``, variance ``v``): a Gaussian child ``z ~ normal(c * x + d, s)``
  of a node x becomes a node of its own (conditional ``z | x ~ N(c x + d, s^2)``,
  marginal ``N(c m + d, c^2 v + s^2)``), so chains are linear-Gaussian state-space
  models; ``observe y ~ normal(c * x + d, s)`` adds the predictive log density
  ``log N(y; c m + d, c^2 v + s^2)`` and conditions x (a Kalman update). Affine
  functions of nodes are ``Affine`` values; a sum of a node and a *fresh* Gaussian (a
  root node with no pending child: independent of everything else) is itself made a
  child node (``absorb``), which covers ``x = a * x + eps`` with ``eps ~ normal(0, q)``.
* ``beta`` (a, b): observe ``bernoulli``/``flip``/``binomial(n, p)`` (beta-binomial predictive);
* ``gamma`` (shape k, rate r): observe ``poisson`` (negative-binomial predictive);
* ``dirichlet`` (alpha): observe ``categorical`` (predictive alpha_y / sum alpha).

*Realising* a node (its value is needed: a nonlinear operation, control flow, an index,
the return value, an unsupported parameter) first realises its pending (marginalised)
children, so that the node's marginal includes their observations, then draws the value
from that marginal and conditions its parent on it (Birch's graft/prune on the M-path).
Each node has at most one pending child per particle: a second child realises the first.

Invariant: for each particle, the product of the predictive densities added so far times
the law of the values drawn on realisation equals the program's joint density of those
values and the observations, integrated over the nodes still delayed; so a weighting
that adds the predictive densities instead of sampling the nodes stays proper
(E[w f(x)] = Z E_post[f]) and its variance can only drop (Rao-Blackwellisation).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .dist_values import DistValue
from .lazy import Lazy
from .values import Batched, Particles, _PerParticleValue, _positions_of
from ..stdlib import distributions as _dists

F64 = torch.float64

#: (distribution name, parameter names) -> node family, for the priors a node can have
PRIOR_FAMILIES = {("normal", ("loc", "scale")): "normal", ("beta", ("a", "b")): "beta",
                  ("gamma", ("shape", "rate")): "gamma", ("dirichlet", ("alpha",)): "dirichlet"}


class DelayedGraph:
    """The nodes of one run over N particles; ``draw(dist, ctx)`` draws a value per
    particle of ``ctx`` from a ``DistValue`` (the handler's randomness)."""

    def __init__(self, N: int, device, draw: Callable, full_idx: torch.Tensor):
        self.N = N
        self.device = device
        self.draw = draw
        self.full_idx = full_idx
        self.nodes: list[Node] = []

    def node(self, family: str, params: dict, rows: torch.Tensor, addr: str | None = None) -> "Node":
        n = Node(self, family, addr)
        whole = rows is self.full_idx  # (every particle, in order)
        for name, value in params.items():
            if whole:
                n.t[name] = value.to(F64).clone()
            else:
                full = torch.zeros((self.N, *value.shape[1:]), dtype=F64, device=self.device)
                full[rows] = value.to(F64)
                n.t[name] = full
        n.t["exists"][rows] = True
        if family == "dirichlet":
            n.t["value"] = torch.zeros((self.N, params["alpha"].shape[-1]), dtype=F64, device=self.device)
        self.nodes.append(n)
        return n

    def realise_all(self) -> None:
        """Realise every node on every particle that has it (the end of a run), newest first."""
        for n in reversed(self.nodes):
            n.realise(self.full_idx[n.rows()["exists"]])  # (rows(): caught up with resampling)


class Node(_PerParticleValue):
    """One delayed random variable (see the module docstring); ``t`` holds its rows."""

    def __init__(self, graph: DelayedGraph, family: str, addr: str | None):
        _PerParticleValue.__init__(self, graph.full_idx)
        self.graph = graph
        self.family = family
        self.addr = addr
        self.parent: Node | None = None
        self.children: list[Node] = []
        self.alias: list = []  # [(node, coef [N])...], const [N] per row where "aliased": absorbed
        # whether any row may be realised / absorbed / a pending child of the parent (so the
        # common case skips the per-row tests)
        self.any_realised = self.any_aliased = self.any_linked = False
        N, dev = graph.N, graph.device
        self.t = {"exists": torch.zeros(N, dtype=torch.bool, device=dev),
                  "realised": torch.zeros(N, dtype=torch.bool, device=dev),
                  "linked": torch.zeros(N, dtype=torch.bool, device=dev),  # a pending child of parent
                  "value": torch.zeros(N, dtype=F64, device=dev)}

    def _select(self, sel: torch.Tensor) -> None:
        self.t = {k: v.index_select(0, sel) for k, v in self.t.items()}
        self.alias = [(n, c.index_select(0, sel)) for n, c in self.alias]

    def rows(self) -> dict:
        """The row tensors, caught up with the run's resampling."""
        self._fresh()
        return self.t

    def __repr__(self) -> str:
        return f"Node({self.family}, {self.addr})"

    # ------------------------------------------------------------------ structure
    def fresh(self, r: torch.Tensor) -> bool:
        """Whether on rows r this Gaussian node is independent of every other node: a root
        with no pending child, neither realised nor absorbed."""
        t = self.rows()
        if self.family != "normal" or self.parent is not None:
            return False
        if self.any_realised and bool(t["realised"][r].any()) or self.any_aliased and bool(t["aliased"][r].any()):
            return False
        return not any(c.any_linked and bool(c.rows()["linked"][r].any()) for c in self.children)

    def prune(self, r: torch.Tensor) -> None:
        """Realise the pending descendants on rows r, deepest first (so that this marginal
        is up to date); iterative, so a chain of any length needs no deep recursion."""
        pending, stack = [], [(self, r)]
        while stack:
            node, rows_ = stack.pop()
            for c in node.children:
                if not c.any_linked:
                    continue
                lk = c.rows()["linked"][rows_]
                if bool(lk.any()):
                    pending.append((c, rows_[lk]))
                    stack.append((c, rows_[lk]))
        for c, rows_ in reversed(pending):
            c.realise(rows_)

    def marginal(self, r: torch.Tensor) -> dict:
        """The current marginal parameters on rows r (pending children realised first)."""
        self.prune(r)
        t = self.rows()
        names = {"normal": ("m", "v"), "beta": ("a", "b"), "gamma": ("k", "r"), "dirichlet": ("alpha",)}
        return {k: t[k][r] for k in names[self.family]}

    # ------------------------------------------------------------------ realisation
    def realise(self, r: torch.Tensor) -> None:
        """Give rows r a value: from the alias where absorbed, else drawn from the
        marginal (children first), then condition the parent on it."""
        t = self.rows()
        r = r[t["exists"][r] & ~t["realised"][r]] if self.any_realised else r[t["exists"][r]]
        if r.shape[0] == 0:
            return
        al = t["aliased"][r] if self.any_aliased else None
        if al is not None and bool(al.any()):
            self._realise_alias(r[al])
            r = r[~al]
            if r.shape[0] == 0:
                return
        params = self.marginal(r)
        value = self.graph.draw(self._dist(params, r), Particles(r, self.graph.N, self.graph.device))
        t = self.rows()
        t["value"][r] = value.to(F64)
        t["realised"][r] = True
        self.any_realised = True
        self._tell_parent(r)

    def _tell_parent(self, r: torch.Tensor) -> None:
        if self.parent is None or not self.any_linked:
            return
        t = self.rows()
        lk = t["linked"][r]
        if bool(lk.any()):
            rl = r[lk]
            self.parent.condition_on_child(rl, t["ca"][rl], t["cb"][rl], t["cq"][rl], t["value"][rl])
            t = self.rows()
            t["linked"][rl] = False

    def _realise_alias(self, r: torch.Tensor) -> None:
        t = self.rows()
        value = t["alias_const"][r].clone()
        for n, coef in self.alias:
            c = coef[r]
            nz = c != 0
            if bool(nz.any()):
                n.realise(r[nz])
                value = value + torch.where(nz, c * n.rows()["value"][r], torch.zeros_like(c))
        t = self.rows()
        t["value"][r] = value
        t["realised"][r] = True
        self.any_realised = True

    def _dist(self, p: dict, r: torch.Tensor) -> DistValue:
        idx = r
        if self.family == "normal":
            return DistValue(_dists.get("normal"), (Batched(p["m"], idx), Batched(p["v"].sqrt(), idx)))
        if self.family == "beta":
            return DistValue(_dists.get("beta"), (Batched(p["a"], idx), Batched(p["b"], idx)))
        if self.family == "gamma":
            return DistValue(_dists.get("gamma"), (Batched(p["k"], idx), Batched(p["r"], idx)))
        return DistValue(_dists.get("dirichlet"), (Batched(p["alpha"], idx),))

    # ------------------------------------------------------------------ Gaussian algebra
    def condition_on_child(self, r, c, d, q, x) -> None:
        """Condition rows r on a child's value x, where child | self ~ N(c self + d, q)."""
        self.prune(r)
        t = self.rows()
        m, v = t["m"][r], t["v"][r]
        s = c * c * v + q
        t["m"][r] = m + v * c * (x - c * m - d) / s
        t["v"][r] = v * q / s

    def observe_normal(self, r, c, d, s2, y) -> torch.Tensor:
        """``observe y ~ normal(c * self + d, sqrt(s2))`` on rows r: the predictive log
        density (float64 [len(r)]), and the Kalman update of the marginal."""
        p = self.marginal(r)
        t = self.rows()
        if not self.any_realised:  # the common case: every row delayed
            m, v = p["m"], p["v"]
            mean, s = c * m + d, c * c * v + s2
            lp = -0.5 * (math.log(2 * math.pi) + torch.log(s) + (y - mean) ** 2 / s)
            t["m"][r] = m + v * c * (y - mean) / s
            t["v"][r] = v * s2 / s
            return lp
        real = t["realised"][r]
        mean = torch.where(real, c * t["value"][r] + d, c * p["m"] + d)
        var = torch.where(real, s2, c * c * p["v"] + s2)
        lp = -0.5 * (math.log(2 * math.pi) + torch.log(var) + (y - mean) ** 2 / var)
        live = ~real
        if bool(live.any()):
            rl = r[live]
            m, v = p["m"][live], p["v"][live]
            cl, dl, sl = c[live], d[live], s2[live]
            s = cl * cl * v + sl
            t["m"][rl] = m + v * cl * (y[live] - cl * m - dl) / s
            t["v"][rl] = v * sl / s
        return lp

    def child_normal(self, r, c, d, s2, addr=None) -> "Node":
        """A new node z on rows r with z | self ~ N(c self + d, s2); pending where self is
        not realised (its marginal N(c m + d, c^2 v + s2)), a root N(c x + d, s2) where it is."""
        p = self.marginal(r)
        t = self.rows()
        if self.any_realised:
            real = t["realised"][r]
            m = torch.where(real, c * t["value"][r] + d, c * p["m"] + d)
            v = torch.where(real, s2, c * c * p["v"] + s2)
        else:
            real, m, v = None, c * p["m"] + d, c * c * p["v"] + s2
        z = self.graph.node("normal", {"m": m, "v": v, "ca": c, "cb": d, "cq": s2}, r, addr)
        z.rows()["linked"][r] = True if real is None else ~real
        z.any_linked = True
        z.parent = self
        self.children.append(z)
        return z

    # ------------------------------------------------------------------ other families
    def observe_conjugate(self, kind: str, r, y, n=None) -> torch.Tensor:
        """Observe y under ``kind`` (bernoulli, binomial, poisson, categorical) with this
        node as its parameter on rows r: the predictive log density, and the update.
        Where the node is realised, the plain log density of y."""
        p = self.marginal(r)
        t = self.rows()
        lp = self._predictive(kind, p, y, n)
        if not self.any_realised:
            self._update(kind, r, p, y, n)
            return lp
        real = t["realised"][r]
        if bool(real.any()):
            rr = r[real]
            exact = self._likelihood(kind, t["value"][rr], y[real], None if n is None else n[real])
            lp = lp.clone()
            lp[real] = exact
        live = ~real
        if bool(live.any()):
            self._update(kind, r[live], {k: v[live] for k, v in p.items()}, y[live],
                         None if n is None else n[live])
        return lp

    @staticmethod
    def _predictive(kind, p, y, n):
        if kind == "bernoulli":
            a, b = p["a"], p["b"]
            return torch.where(y > 0.5, torch.log(a), torch.log(b)) - torch.log(a + b)
        if kind == "binomial":
            a, b = p["a"], p["b"]
            return (torch.lgamma(n + 1) - torch.lgamma(y + 1) - torch.lgamma(n - y + 1)
                    + _lbeta(a + y, b + n - y) - _lbeta(a, b))
        if kind == "poisson":
            k, r = p["k"], p["r"]
            return (torch.lgamma(k + y) - torch.lgamma(k) - torch.lgamma(y + 1)
                    + k * torch.log(r / (r + 1)) - y * torch.log(r + 1))
        alpha = p["alpha"]
        yi = y.long().unsqueeze(-1)
        return torch.log(alpha.gather(-1, yi).squeeze(-1)) - torch.log(alpha.sum(-1))

    @staticmethod
    def _likelihood(kind, x, y, n):
        if kind == "bernoulli":
            return torch.where(y > 0.5, torch.log(x), torch.log1p(-x))
        if kind == "binomial":
            return (torch.lgamma(n + 1) - torch.lgamma(y + 1) - torch.lgamma(n - y + 1)
                    + y * torch.log(x) + (n - y) * torch.log1p(-x))
        if kind == "poisson":
            return y * torch.log(x) - x - torch.lgamma(y + 1)
        return torch.log(x.gather(-1, y.long().unsqueeze(-1)).squeeze(-1))

    def _update(self, kind, r, p, y, n):
        t = self.rows()
        if kind == "bernoulli":
            t["a"][r] = p["a"] + y
            t["b"][r] = p["b"] + 1 - y
        elif kind == "binomial":
            t["a"][r] = p["a"] + y
            t["b"][r] = p["b"] + n - y
        elif kind == "poisson":
            t["k"][r] = p["k"] + y
            t["r"][r] = p["r"] + 1
        else:
            alpha = p["alpha"].clone()
            alpha.scatter_add_(-1, y.long().unsqueeze(-1), torch.ones_like(alpha[..., :1]))
            t["alpha"][r] = alpha


def _lbeta(a, b):
    return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)


# ------------------------------------------------------------------------ lazy values
class Affine(_PerParticleValue, Lazy):
    """A lazy value of the language (``semantics.lazy``): sum_j coef_j * node_j + const,
    per particle of ``idx`` (float64 rows). A non-Gaussian node appears only alone, with
    coef 1 and const 0. Arithmetic that stays affine (+, - with another such value; +, -,
    *, / with a per-particle number) stays lazy; every other use realises the nodes."""

    force_in_containers = True  # (a built-in that cannot use it inside a list gets its value)

    def __init__(self, terms: list, const: torch.Tensor, idx: torch.Tensor):
        _PerParticleValue.__init__(self, idx)
        self.terms = terms  # [(node, coef [M])]
        self.const = const

    def _select(self, sel):
        self.terms = [(n, c.index_select(0, sel)) for n, c in self.terms]
        self.const = self.const.index_select(0, sel)

    def __repr__(self) -> str:
        return f"Affine({[n for n, _ in self.terms]})"

    def describe(self) -> str:
        return "a random number"

    @staticmethod
    def of(node: Node, ctx: Particles) -> "Affine":
        one = torch.ones(ctx.M, dtype=F64, device=ctx.device)
        return Affine([(node, one)], torch.zeros(ctx.M, dtype=F64, device=ctx.device), ctx.idx)

    def at(self, ctx: Particles) -> tuple[list, torch.Tensor]:
        """(terms, const) on the particles of ctx, absorbed nodes replaced by their aliases."""
        self._fresh()
        pos = None if self._idx is ctx.idx else _positions_of(self._idx, ctx)
        pick = (lambda x: x) if pos is None else (lambda x: x.index_select(0, pos))
        terms, const = [(n, pick(c)) for n, c in self.terms], pick(self.const)
        return _resolve(terms, const, ctx.idx)

    @property
    def gaussian(self) -> bool:
        return all(n.family == "normal" for n, _ in self.terms)

    def force(self, ctx: Particles, use: str = "") -> Batched:
        """Realise the nodes (drawn from their marginals): a concrete value for ctx."""
        return Batched(self.value_rows(ctx).to(torch.get_default_dtype()), ctx.idx)

    def value_rows(self, ctx: Particles) -> torch.Tensor:
        """Realise every node and return the value rows for ctx (float64, [M] or [M, K]
        for a Dirichlet)."""
        terms, const = self.at(ctx)
        r = ctx.idx
        if len(terms) == 1 and terms[0][0].family != "normal":
            n = terms[0][0]
            n.realise(r)
            return n.rows()["value"][r].clone()
        for n, _ in terms:
            n.realise(r)
        value = const.clone()
        for n, c in terms:
            value = value + c * n.rows()["value"][r]
        return value

    def single(self, ctx: Particles) -> tuple[Node | None, torch.Tensor, torch.Tensor]:
        """(node, c, d) with self = c * node + d on ctx: fresh nodes absorbed into one, the
        others realised (node None when nothing stays delayed)."""
        terms, const = self.at(ctx)
        return _single(terms, const, ctx)

    def groups(self, ctx: Particles) -> list:
        """[(positions within ctx, node or None, c, d)]: the particles of ctx split by the
        one node their value depends on (c * node + d there), e.g. after branches that
        assigned different nodes (``merge``); where several nodes meet on one particle,
        ``single``."""
        terms, const = self.at(ctx)
        every = torch.arange(ctx.M, device=ctx.device)
        if len(terms) >= 2:
            nonzero = torch.stack([c != 0 for _, c in terms])
            if bool((nonzero.sum(0) <= 1).all()):
                out = []
                for (node, c), nz in zip(terms, nonzero):
                    pos = every[nz]
                    if pos.shape[0]:
                        out.append((pos, node, c[pos], const[pos]))
                rest = every[~nonzero.any(0)]
                if rest.shape[0]:
                    out.append((rest, None, None, const[rest]))
                return out
        node, c, d = _single(terms, const, ctx)
        return [(every, node, c, d)]

    @classmethod
    def merge(cls, parts, target: Particles) -> Any:
        """The join of branches (later parts win where they overlap): one affine value
        whose terms are zero on the particles of the other branches, so a state assigned
        differently on each branch stays delayed; anything else is realised (``Lazy.merge``)."""
        M = target.M
        const = torch.zeros(M, dtype=F64, device=target.device)
        terms: list = []
        for idx, v in parts:
            sub = Particles(idx, target.N, target.device, target.full)
            if isinstance(v, Affine) and v.gaussian:
                t, c = v.at(sub)
            elif isinstance(v, Lazy):
                return super().merge(parts, target)
            else:
                t, c = [], _constant_rows(v, sub)
                if c is None:
                    return super().merge(parts, target)
            pos = target.positions(idx)
            terms = [(n, co.index_fill(0, pos, 0.0)) for n, co in terms]
            const = const.index_copy(0, pos, c)
            terms = _merge(terms, [(n, torch.zeros(M, dtype=F64, device=target.device).index_copy(0, pos, co))
                                   for n, co in t])
        return Affine([(n, c) for n, c in terms if bool((c != 0).any())], const, target.idx)

    def binop(self, op: str, other: Any, ctx: Particles, swapped: bool = False) -> Any:
        """``self op other`` (``other op self`` when swapped): affine when it stays so,
        else computed on the realised value (``Lazy.binop``)."""
        out = self._affine_binop(op, other, ctx, swapped)
        return out if out is not None else Lazy.binop(self, op, other, ctx, swapped)

    def _affine_binop(self, op: str, other: Any, ctx: Particles, swapped: bool):
        if not self.gaussian or op not in ("+", "-", "*", "/"):
            return None
        if isinstance(other, Affine):
            if swapped or op not in ("+", "-") or not other.gaussian:
                return None
            terms, const = self.at(ctx)
            o_terms, o_const = other.at(ctx)
            sign = -1.0 if op == "-" else 1.0
            return _absorbed(_merge(terms, _scale(o_terms, o_const, sign)[0]), const + sign * o_const, ctx)
        k = _constant_rows(other, ctx)
        if k is None:
            return None
        terms, const = self.at(ctx)
        if op == "+":
            return Affine(terms, const + k, ctx.idx)
        if op == "-" and swapped:  # k - self
            neg_terms, neg_const = _scale(terms, const, -1.0)
            return Affine(neg_terms, neg_const + k, ctx.idx)
        if op == "-":
            return Affine(terms, const - k, ctx.idx)
        if op == "*":
            return Affine(*_scale(terms, const, k), ctx.idx)
        if op == "/" and not swapped:
            return Affine(*_scale(terms, const, 1.0 / k), ctx.idx)
        return None

    def unop(self, op: str, ctx: Particles) -> Any:
        if op in ("-", "+") and self.gaussian:
            terms, const = self.at(ctx)
            return Affine(*_scale(terms, const, -1.0 if op == "-" else 1.0), ctx.idx)
        return Lazy.unop(self, op, ctx)


def _constant_rows(v: Any, ctx: Particles) -> torch.Tensor | None:
    """A per-particle scalar as float64 rows [M] (None if it is not one)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return torch.full((ctx.M,), float(v), dtype=F64, device=ctx.device)
    if isinstance(v, Batched):
        t = v.t if v.idx is ctx.idx else v.t.index_select(0, _positions_of(v.idx, ctx))
        if t.dim() == 1 and t.is_floating_point() or t.dim() == 1 and t.dtype == torch.long:
            return t.to(F64)
        return None
    if isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype != torch.bool:
        return v.to(F64).expand(ctx.M).clone()
    return None


def _scale(terms, const, k):
    return [(n, c * k) for n, c in terms], const * k


def _merge(a: list, b: list) -> list:
    out: list = list(a)
    for n, c in b:
        for i, (m, cm) in enumerate(out):
            if m is n:
                out[i] = (m, cm + c)
                break
        else:
            out.append((n, c))
    return out


def _resolve(terms: list, const: torch.Tensor, r: torch.Tensor) -> tuple[list, torch.Tensor]:
    """Replace absorbed (aliased) nodes by their aliases, row by row; drop realised nodes
    into the constant."""
    out: list = []
    for n, c in terms:
        if n.family != "normal":  # alone, coef 1 (see Affine)
            out.append((n, c))
            continue
        if not (n.any_realised or n.any_aliased):  # the common case: nothing to replace
            out = _merge(out, [(n, c)])
            continue
        t = n.rows()
        real = t["realised"][r]
        al = t["aliased"][r] & ~real if n.any_aliased else torch.zeros_like(real)
        if bool(real.any()):
            const = const + torch.where(real, c * t["value"][r], torch.zeros_like(c))
            c = torch.where(real, torch.zeros_like(c), c)
        if bool(al.any()):
            zero = torch.zeros_like(c)
            const = const + torch.where(al, c * t["alias_const"][r], zero)
            sub, sub_const = _resolve([(m, torch.where(al, c * mc[r], zero)) for m, mc in n.alias], zero.clone(), r)
            const = const + sub_const
            c = torch.where(al, zero, c)
            out = _merge(out, sub)
        if bool((c != 0).any()):
            out = _merge(out, [(n, c)])
    return [(n, c) for n, c in out if bool((c != 0).any())], const


def _absorbed(terms: list, const: torch.Tensor, ctx: Particles) -> Affine:
    """An affine value; when it has several nodes and all but one are fresh, the fresh
    ones are absorbed into a child node of the remaining one (so ``a * x + eps`` is one
    node)."""
    if len(terms) >= 2:
        r = ctx.idx
        stale = [i for i, (n, _) in enumerate(terms) if not n.fresh(r)]
        if len(stale) <= 1:
            keep = stale[0] if stale else 0
            node, c = terms[keep]
            for i, (e, ce) in enumerate(terms):
                if i != keep and bool((ce != 0).all()):
                    node, c, const = _absorb(node, c, e, ce, const, r)
            terms = [(node, c)] + [(e, ce) for i, (e, ce) in enumerate(terms) if i != keep and not bool((ce != 0).all())]
    return Affine(terms, const, ctx.idx)


def _absorb(x: Node, c1, e: Node, c2, d, r):
    """c1 x + c2 e + d with e fresh: a new node z = that sum, z | x ~ N(c1 x + d + c2 m_e,
    c2^2 v_e), and e becomes (z - c1 x - d) / c2. Returns (z, 1, 0)."""
    pe = e.marginal(r)
    z = x.child_normal(r, c1, d + c2 * pe["m"], c2 * c2 * pe["v"])
    te = e.rows()
    N = x.graph.N
    full = lambda rowvals: torch.zeros(N, dtype=F64, device=r.device).index_copy(0, r, rowvals)  # noqa: E731
    e.alias.append((z, full(1.0 / c2)))
    e.alias.append((x, full(-c1 / c2)))
    if not e.any_aliased:
        te["aliased"] = torch.zeros(N, dtype=torch.bool, device=r.device)
        te["alias_const"] = torch.zeros(N, dtype=F64, device=r.device)
        e.any_aliased = True
    te["alias_const"][r] = -d / c2
    te["aliased"][r] = True
    one = torch.ones_like(c1)
    return z, one, torch.zeros_like(d)


def _single(terms: list, const: torch.Tensor, ctx: Particles):
    """(node, c, d) with sum(terms) + const = c * node + d on ctx: the fresh nodes
    absorbed, any other extra node realised (``Affine.single``)."""
    if not terms:
        return None, None, const
    if len(terms) >= 2:
        a = _absorbed(terms, const, ctx)
        terms, const = a.terms, a.const
    r = ctx.idx
    for n, c in terms[1:]:  # not absorbable: realise
        n.realise(r)
        const = const + c * n.rows()["value"][r]
    node, c = terms[0]
    return node, c, const
