"""A program's log density on unconstrained space, with its gradient: what HMC, NUTS and
MALA move on.

The continuous choices x_1..x_n of a program (each with a support S_k that torch maps
from the real line by ``T_k = biject_to(S_k)``: ``gfi.support_bijection``) are laid out
flat as z = (T_1^-1(x_1), ..., T_n^-1(x_n)) in R^D, one row per chain ([C, D]). The
*potential* of C chains is

    log pi(z) = sum_k [ log p_k(T_k(z_k) | ...) + log |det dT_k/dz_k| ]
                + sum_j log p_j(d_j | ...)            (discrete choices, held fixed)
                + beta * log L(x, d)                  (observe / factor / condition)

Invariant: exp(log pi) is the density of the push-forward of the program's unnormalised
posterior (tempered by ``beta``: prior * L^beta, an impossible likelihood stays
impossible) under x -> T^-1(x), for the discrete choices held at ``given``; so a kernel
that leaves pi invariant on z leaves the posterior invariant on x once z is mapped back
(``constrain``). Log densities are float64; a point of density zero (outside a
``condition``, an invalid parameter, a NaN) has log pi = -inf and gradient 0, never an
error: a kernel rejects it.

Two evaluators compute the same function:

* **traced** (a *static* program: its control flow and shapes do not depend on z; see
  ``inference.mh_traced``): the program's run is recorded once with ``torch.jit.trace``
  as a graph z -> (log prior, log likelihood) and replayed; autograd runs through it.
* **eager**: the interpreter runs the program at every evaluation, autograd through it.

``build_potential`` picks the traced one when the program is static and checks that the
two agree; the eager one otherwise (``Potential.traced`` says which, ``why_not_traced``
why). A continuous choice that some chains make and others do not (random structure)
cannot be moved by these kernels: an error names it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..semantics.errors import PPLError, PPLRuntimeError
from ..semantics.gfi import ModelRun, TracedState, support_bijection
from ..semantics.sampling import _WeightAccumulator, column, drive
from ..semantics.values import Batched, Particles
from ..stdlib.distributions import deferred_checks
from .compiled import native_library, record, replay
from . import graph_store
from .mh_traced import LikelihoodTerms, NotStatic, _taint, factor_rows
from .observe_groups import ObserveGroups

GROUP_OBSERVES = True  # score a loop's repeated observes as one vectorised term (``inference.observe_groups``)

_IDENTITY = torch.distributions.transforms.identity_transform


@dataclass(frozen=True)
class Site:
    """A continuous choice's place in z: columns [start, stop) hold T^-1(x) flattened
    (unconstrained shape ``shape``; the value itself has shape ``value_shape``)."""
    addr: str
    start: int
    stop: int
    shape: tuple
    value_shape: tuple


class RandomStructure(PPLRuntimeError):
    """A continuous choice exists in some chains only, or the choices differ from run to run."""


class _AtPoint(_WeightAccumulator):
    """One run of the program in which continuous choice k takes the value T_k(z_k) and
    discrete choice a the value ``given[a]`` (per chain); sums the log prior (with the log
    |Jacobian|) and the log likelihood separately, with no Python decision on a value of
    z (so the run can be traced). ``strict``: every continuous choice must be reached by
    every chain (kernels moving z need that)."""

    def __init__(self, C: int, device, sites: dict, z: torch.Tensor, given: dict, scoring: bool = True):
        super().__init__(C, device, dtype=torch.float64)
        self.C, self.sites, self.z, self.given = C, sites, z, given
        self.log_prior = torch.zeros(C, dtype=torch.float64, device=device)
        self.log_lik = torch.zeros(C, dtype=torch.float64, device=device)
        self.values: dict = {}
        self.seen: set = set()
        self.full_idx = None
        self.groups = ObserveGroups(C) if GROUP_OBSERVES else None
        self.scoring = scoring  # False: the choices' values and the return value only (no density)

    def _full(self, ctx, what: str, span=None):
        if ctx.idx is not self.full_idx and ctx.M != self.C:
            raise RandomStructure(f"{what} is reached by only some chains: gradient-based kernels need every chain "
                                  "to make the same continuous choices", span,
                                  "use mh, tempering or smc for a program whose continuous choices depend on its "
                                  "random path")

    def sample(self, eff):
        ctx, addr = eff.ctx, eff.addr
        if addr in self.given:
            col = self.given[addr]
            value = Batched(col if ctx.M == self.C else col[ctx.idx], ctx.idx)
            self._prior(ctx, eff.dist.log_prob(value, ctx))
            return value
        site = self.sites.get(addr)
        if site is None or addr in self.seen:
            raise RandomStructure(f"the choice '{addr}' was not made by the first run (or made twice): the program's "
                                  "continuous choices change from run to run", eff.span,
                                  "gradient-based kernels need a fixed set of continuous choices")
        self._full(ctx, f"the choice '{addr}'", eff.span)
        self.seen.add(addr)
        T = support_bijection(eff.dist, ctx)
        if T is None:
            raise RandomStructure(f"the choice '{addr}' is not continuous here", eff.span)
        y = self.z[:, site.start:site.stop].reshape((self.C,) + site.shape)
        x = y if T == _IDENTITY else T(y)
        value = Batched(x, ctx.idx)
        self.values[addr] = x
        if not self.scoring:
            return value
        logdet = None
        if T != _IDENTITY:
            j = T.log_abs_det_jacobian(y, x)
            logdet = j.reshape(self.C, -1).sum(1) if j.dim() > 1 else j.expand(self.C) if j.dim() == 0 else j
        lp = eff.dist.log_prob(value, ctx)
        self._prior(ctx, lp if logdet is None else lp + logdet)
        return value

    def _as_rows(self, lp, ctx):
        if not isinstance(lp, torch.Tensor):
            lp = torch.as_tensor(float(lp), dtype=torch.float64, device=self.log_prior.device)
        if lp.dtype != torch.float64:
            lp = lp.double()
        return lp.expand(ctx.M) if lp.dim() == 0 else lp

    def _prior(self, ctx, lp):
        lp = self._as_rows(lp, ctx)
        self.log_prior = self.log_prior + lp if ctx.M == self.C else self.log_prior.index_add(0, ctx.idx, lp)

    def _likelihood(self, ctx, lp):
        lp = self._as_rows(lp, ctx)
        self.log_lik = self.log_lik + lp if ctx.M == self.C else self.log_lik.index_add(0, ctx.idx, lp)

    add = _likelihood

    def observe(self, eff):
        """A loop's repeated observes are collected and scored as one term at the end
        (``inference.observe_groups``); any other observe is scored now."""
        if not self.scoring:
            return
        if self.groups is None or not self.groups.add(eff, self.full_idx):
            LikelihoodTerms.observe(self, eff)

    def condition(self, eff):
        if self.scoring:
            LikelihoodTerms.condition(self, eff)

    def score_grouped_observes(self, ctx) -> None:
        """Add the collected observes' log densities (call at the end of the run)."""
        if self.groups is not None:
            for lp in self.groups.log_densities():
                self._likelihood(ctx, lp)

    def factor(self, eff):
        if self.scoring:
            self._likelihood(eff.ctx, factor_rows(eff))

    def twist(self, eff):  # the whole program's measure does not depend on twist potentials
        return None


def _finite_or_neginf(lp: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(lp), torch.full_like(lp, -math.inf), lp)


class Potential:
    """log pi (see the module docstring) of C chains of a program, as a function of z
    [C, D] float64, with its gradient. ``given``: the discrete choices' values per chain
    (address -> [C, ...]); set it (``set_given``) to move the continuous part of a Gibbs
    sweep."""

    def __init__(self, model: ModelRun, C: int, sites: tuple, discrete: tuple, given: dict):
        self.model, self.C, self.sites = model, C, sites
        self.by_addr = {s.addr: s for s in sites}
        self.discrete = discrete
        self.given = given
        self.D = sites[-1].stop if sites else 0
        self.device = model.device
        self.traced = False
        self.why_not_traced: str | None = None
        self.compiled = False
        self.why_not_compiled: str | None = None
        self._recorded = None      # (ATen graph, example inputs) while it may still be compiled
        self._aten = None          # the recorded ATen graph (kept to fuse into a kernel's graph)
        self.build_seconds = 0.0   # CPU seconds spent recording the graph
        self.graph_seconds = 0.0   # seconds spent in the graph's evaluations (``evaluations`` of them)
        self._graph = None
        self._betas: dict = {}  # beta -> its tensor (a graph input)
        self.evaluations = 0

    # ---------------------------------------------------------------- one evaluation
    def _run(self, z: torch.Tensor, given: dict, C: int | None = None, scoring: bool = True):
        """(log prior [C], log likelihood [C], values, return column, parameter checks) by
        running the interpreter once at z; without ``scoring``, the values and the return
        column only (the densities stay 0: no observe, factor or prior is scored)."""
        C = C or self.C
        m = self.model
        ctx = Particles.all(C, m.device)
        h = _AtPoint(C, m.device, self.by_addr, z, given, scoring)
        h.full_idx = ctx.idx
        with deferred_checks() as checks:
            ret = column(drive(m.interp.run(m.entry, m.data, ctx), h), ctx)
            h.score_grouped_observes(ctx)
        missing = [s.addr for s in self.sites if s.addr not in h.seen]
        if missing:
            raise RandomStructure(f"the choice '{missing[0]}' of the first run was not made: the program's continuous "
                                  "choices change from run to run")
        return h.log_prior, h.log_lik, h.values, ret, list(checks)

    def _value_and_grad(self, z: torch.Tensor, beta: torch.Tensor, *given):
        """(log pi [C], its gradient [C, D], parameters valid?) by running the interpreter,
        autograd through it; rows of density zero get -inf and gradient 0. The traced
        graph records exactly this function."""
        def total(z):
            lp, ll, _, _, checks = self._run(z, dict(zip(self.discrete, given)))
            ok = torch.ones((), dtype=torch.bool, device=z.device)
            for c in checks:
                ok = ok & c
            t = _combine(lp, ll, beta)
            return torch.where(torch.isfinite(t), t, torch.zeros_like(t)).sum(), (t, ok)

        g, (t, ok) = torch.func.grad(total, has_aux=True)(z)
        good = torch.isfinite(t) & torch.isfinite(g).all(1)
        t = torch.where(good, t, torch.full_like(t, -math.inf))
        g = torch.where(good.unsqueeze(1), g, torch.zeros_like(g))
        return t, g, ok

    def value_and_grad(self, z: torch.Tensor, beta: float = 1.0):
        """(log pi(z) [C], grad log pi(z) [C, D]), float64; rows of density zero (an
        impossible point, a NaN, an invalid parameter): -inf and 0."""
        self.evaluations += 1
        z = z.detach()
        if isinstance(beta, (int, float)):
            b = self._betas.get(beta)
            if b is None:
                b = self._betas[beta] = torch.tensor(float(beta), dtype=torch.float64, device=z.device)
        else:
            b = torch.as_tensor(beta, dtype=torch.float64, device=z.device)
        given = tuple(self.given[a] for a in self.discrete)
        if self._graph is not None:
            started = time.perf_counter()
            try:
                t, g, ok = self._graph(z, b, *given)
                self.graph_seconds += time.perf_counter() - started
            except RuntimeError:  # a compiled kernel that raises (a Cholesky of a matrix that is not
                return self._rows_through_graph(z, b, given, beta)  # positive definite): chain by chain
            if not bool(ok):  # an invalid parameter in some chain: find which, row by row
                return self._rows_through_graph(z, b, given, beta)
            if not self.discrete:
                self._good = z  # every row valid: a background for _rows_through_graph
            return t, g
        try:
            t, g, ok = self._value_and_grad(z, b, *given)
        except PPLError:  # e.g. a covariance that is not positive definite in some chain
            return self._row_by_row(z, beta)
        if not bool(ok):  # an invalid parameter in some chain: find which, row by row
            return self._row_by_row(z, beta)
        return t, g

    def _rows_through_graph(self, z, b, given, beta):
        """log pi and its gradient chain by chain through the graph (a few ms a chain,
        where the interpreter takes tens): chain c's row of z put into the last batch whose
        rows were all valid (the graph's rows do not interact), so that a raising kernel or
        a failed parameter check belongs to chain c, which then has density zero. When no
        such batch is known (or the program has discrete choices, which change the batch's
        validity), or no chain is valid, the interpreter decides row by row (and raises the
        program's error if every chain fails)."""
        background = getattr(self, "_good", None)
        if background is None or self.discrete:
            return self._row_by_row(z, beta)
        out = torch.full((self.C,), -math.inf, dtype=torch.float64, device=z.device)
        grad = torch.zeros_like(z)
        for c in range(self.C):
            probe = background.clone()
            probe[c] = z[c]
            try:
                t, g, ok = self._graph(probe, b, *given)
            except RuntimeError:
                continue
            if bool(ok):
                out[c], grad[c] = t[c], g[c]
        if not bool(torch.isfinite(out).any()):
            return self._row_by_row(z, beta)
        return out, grad

    def log_density(self, z: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        """log pi(z) [C] (float64; -inf where impossible)."""
        return self.value_and_grad(z, beta)[0]

    def _row_by_row(self, z, beta):
        """log pi and its gradient chain by chain, with the interpreter's own parameter
        checks: a chain whose parameters are invalid there has density zero."""
        out = torch.full((self.C,), -math.inf, dtype=torch.float64, device=z.device)
        grad = torch.zeros_like(z)
        b = torch.as_tensor(beta, dtype=torch.float64, device=z.device)
        one = Potential(self.model, 1, self.sites, self.discrete, {})
        first_error = None
        for c in range(self.C):
            try:
                t, g, _ = one._value_and_grad(z[c:c + 1], b, *(self.given[a][c:c + 1] for a in self.discrete))
            except PPLError as err:
                first_error = first_error or err
                continue
            out[c], grad[c] = t[0], g[0]
        if first_error is not None and self.C > 1 and not bool(torch.isfinite(out).any()):
            raise first_error  # every chain fails: the program's error, not a point outside the support
        return out, grad

    # ------------------------------------------------------------ to and from values
    def constrain(self, z: torch.Tensor, given: dict | None = None) -> tuple[dict, object]:
        """(address -> values [M, ...] of every choice, return column) at M points z [M, D]
        (M may differ from C: e.g. all kept draws at once), in one run of the interpreter."""
        M = z.shape[0]
        given = self.given if given is None else given
        with torch.no_grad():
            _, _, values, ret, _ = self._run(z.detach(), given, M, scoring=False)
        values = dict(values)
        for a in self.discrete:
            values[a] = given[a]
        return values, ret

    def unconstrain(self, values: dict) -> torch.Tensor:
        """z [C, D] for the continuous choices' values (address -> [C, ...])."""
        m = self.model
        z = torch.zeros(self.C, self.D, dtype=torch.float64, device=m.device)
        probe = _SupportProbe.run(m, self.C, values)
        for s in self.sites:
            T = probe.bijections[s.addr]
            z[:, s.start:s.stop] = T.inv(values[s.addr].double()).reshape(self.C, -1)
        return z

    def initial(self, randomness, radius: float = 2.0, tries: int = 100) -> torch.Tensor:
        """Stan's initialisation: z uniform on (-radius, radius)^D per chain, redrawn where
        the density or its gradient is not finite (an error after ``tries`` rounds)."""
        z = (randomness.uniform((self.C, self.D), self.device) * 2 - 1) * radius
        for _ in range(tries):
            lp, g = self.value_and_grad(z)
            bad = ~torch.isfinite(lp)
            if not bool(bad.any()):
                return z
            fresh = (randomness.uniform((self.C, self.D), self.device) * 2 - 1) * radius
            z = torch.where(bad.unsqueeze(1), fresh, z)
        raise PPLRuntimeError(f"no initial point of positive density found for {int(bad.sum())} of {self.C} chains "
                              f"in {tries} tries (uniform on (-{radius:g}, {radius:g}) in unconstrained space)",
                              hint="the data may be impossible under the prior, or a condition very unlikely")

    def compile_now(self) -> bool:
        """Compile the recorded graph with TorchInductor now (``inference.compiled``), if it
        is traced and not compiled yet; whether the potential is compiled afterwards (a
        compiler failure keeps the TorchScript graph and says why in ``why_not_compiled``)."""
        if self.compiled or self._recorded is None:
            return self.compiled
        gm, example = self._recorded
        try:
            fast = replay(gm, example(), "inductor", native=True)
            _agrees(self, fast, example)
        except Exception as e:  # noqa: BLE001 - any compiler failure leaves the TorchScript graph
            self.why_not_compiled = (str(e).splitlines() or [type(e).__name__])[0]
            self._recorded = None
            return False
        self._graph, self.compiled, self._recorded = fast, True, None
        return True

    def set_given(self, given: dict) -> None:
        """Hold the discrete choices at new values (a Gibbs sweep's continuous half)."""
        self.given = given

    # ------------------------------------------------- for kernels that fuse the graph
    def recorded_graph(self):
        """(the recorded ATen graph (z, beta, *given) -> (log pi, gradient, parameters
        valid?), the backend this potential replays it with: "jit" or "inductor"), for a
        kernel that records it into a bigger graph of its own (``inference.hmc``'s NUTS
        leaf); None when the program is not traced."""
        if self._aten is None or self._graph is None:
            return None
        return self._aten, ("inductor" if self.compiled else "jit")

    def native_library(self):
        """The AOTInductor library (``inference.compiled.NativeLibrary``) this potential's
        graph runs in, for a kernel that calls it from C++ (``inference.nuts_loop``); None
        where the graph is not compiled natively (TorchScript, Inductor's Python wrapper)."""
        return native_library(self._graph) if self.compiled else None

    def graph_inputs(self, beta: float = 1.0) -> tuple:
        """The recorded graph's inputs after z: (beta, *the discrete choices' values)."""
        b = self._betas.get(beta)
        if b is None:
            b = self._betas[beta] = torch.tensor(float(beta), dtype=torch.float64, device=self.device)
        return (b, *(self.given[a] for a in self.discrete))

    def count_graph_call(self, seconds: float) -> None:
        """Count one evaluation made inside a kernel's fused graph (``evaluations``,
        ``graph_seconds``: measurements for diagnosis and benchmarks; no decision reads
        them, so that a seeded run does not depend on timings)."""
        self.evaluations += 1
        self.graph_seconds += seconds


def _combine(log_prior, log_lik, beta: torch.Tensor):
    """log prior + beta * log likelihood, NaN -> -inf; an impossible likelihood stays
    impossible at beta = 0."""
    log_lik = torch.where(torch.isneginf(log_lik), log_lik, beta * log_lik)
    return _finite_or_neginf(log_prior + log_lik)


class _SupportProbe(_WeightAccumulator):
    """A run at given values that records each choice's support bijection (and whether the
    choice is continuous: it has one)."""

    @classmethod
    def run(cls, model: ModelRun, C: int, values: dict) -> "_SupportProbe":
        """The probe after one run of ``model`` for C chains at ``values``."""
        probe = cls(C, model.device, values)
        with deferred_checks():
            drive(model.interp.run(model.entry, model.data, Particles.all(C, model.device)), probe)
        return probe

    def __init__(self, C, device, values: dict):
        super().__init__(C, device, dtype=torch.float64)
        self.C, self.values = C, values
        self.bijections: dict = {}
        self.order: list = []
        self.partial: set = set()

    def sample(self, eff):
        ctx, addr = eff.ctx, eff.addr
        if addr not in self.values:
            raise RandomStructure(f"the choice '{addr}' has no value in the initial trace", eff.span)
        if ctx.M != self.C:
            self.partial.add(addr)
        if addr not in self.bijections:
            self.order.append(addr)
            self.bijections[addr] = support_bijection(eff.dist, ctx)
        col = self.values[addr]
        return Batched(col[ctx.idx], ctx.idx)

    def observe(self, eff):
        return None

    def factor(self, eff):
        return None

    def condition(self, eff):
        return None

    def twist(self, eff):
        return None


def _is_continuous(T, value: torch.Tensor) -> bool:
    return T is not None and value.is_floating_point()


def build_potential(model: ModelRun, state: TracedState, *, traced: bool | str = "auto",
                    compile: bool | Callable[[torch.fx.GraphModule], str | None] = False) -> Potential:
    """The potential of ``state.chains`` chains of ``model`` (``state``: a first trace of
    each chain, e.g. ``mh.initial_state``): its continuous choices are laid out in z in
    the order the program makes them; its other choices are held at the state's values.
    ``traced``: "auto" (trace a static program, else eager), True (an error if the program
    cannot be traced), False (eager). ``compile``: compile the traced graph with
    TorchInductor (``inference.compiled``; on failure the TorchScript graph is used and
    ``why_not_compiled`` says why); or a rule on the recorded graph and the potential's
    dimension (``rule(graph, dims=D) -> None`` to compile it, else the reason not to, kept in
    ``why_not_compiled``: e.g.
    ``gradient_mcmc.compile_decision``), applied without making the TorchScript graph
    first where it says compile."""
    C = state.chains
    values = {a: v for a, v in state.values.items()}
    probe = _SupportProbe.run(model, C, values)
    sites, discrete, start = [], [], 0
    for addr in probe.order:
        T, v = probe.bijections[addr], values[addr]
        if not _is_continuous(T, v):
            discrete.append(addr)
            continue
        if addr in probe.partial or not bool(state.present[addr].all()):
            raise RandomStructure(f"the continuous choice '{addr}' is made by only some chains: gradient-based "
                                  "kernels need every chain to make the same continuous choices",
                                  hint="use mh, tempering or smc for a program whose continuous choices depend "
                                       "on its random path")
        y = T.inv(v.double())
        shape = tuple(y.shape[1:])
        n = int(math.prod(shape))
        sites.append(Site(addr, start, start + n, shape, tuple(v.shape[1:])))
        start += n
    if not sites:
        raise PPLRuntimeError("the program has no continuous choice: gradient-based kernels have nothing to move",
                              hint="use enumerate, mh or smc")
    given = {a: values[a] for a in discrete}
    p = Potential(model, C, tuple(sites), tuple(discrete), given)
    if traced:
        started = time.process_time()
        try:
            backend = compile if callable(compile) else "inductor" if compile else "jit"
            p._graph, p.compiled = _trace(p, backend)
            p.traced = True
        except _CompileFailed as e:
            p._graph, p.traced, p.why_not_compiled = e.graph, True, e.why
        except (NotStatic, PPLError, RuntimeError, TypeError, ValueError, IndexError, AttributeError) as e:
            p.why_not_traced = str(e).splitlines()[0] if str(e) else type(e).__name__
            if traced is True:
                raise PPLRuntimeError(f"traced=True: this program cannot be traced ({p.why_not_traced})",
                                      hint="use traced='auto' to fall back to the interpreter") from None
        p.build_seconds = time.process_time() - started
    return p


class _CompileFailed(Exception):
    """TorchInductor could not compile the graph (no C++ compiler, ...): use ``graph``."""

    def __init__(self, graph, why: str):
        super().__init__(why)
        self.graph, self.why = graph, why


def _trace(p: Potential, backend: str | Callable[[torch.fx.GraphModule], str | None] = "jit"):
    """(the recorded graph (z, beta, *given) -> (log pi, gradient, parameters valid?) of a
    static program (``inference.compiled``), whether Inductor compiled it); NotStatic if the
    program is not static or the graph disagrees with the interpreter. ``backend``: "jit",
    "inductor", or a rule on the recorded graph (None: Inductor; else TorchScript, the rule's
    answer kept as ``why_not_compiled``). A graph
    Inductor compiled and that agrees with the interpreter is used without making the
    TorchScript one; if Inductor fails or disagrees, the TorchScript graph is made and
    checked as usual (_CompileFailed carries it).

    A graph recorded before for the same program, data, layout and code
    (``inference.graph_store``: a key of all of them) is loaded instead of recorded again
    (``_trace_stored``), and checked against the interpreter's log density at fresh points
    (no gradient through the interpreter: that is what costs); where it is missing or
    disagrees, the graph is recorded as always and stored."""
    key = graph_store.key(p)
    stored = graph_store.load(key)
    if stored is not None:
        try:
            return _trace_stored(p, stored, backend)
        except (NotStatic, PPLError, RuntimeError, TypeError, ValueError, IndexError, AttributeError):
            p._recorded = p._aten = None  # (recorded afresh below)
    example = _static_examples(p, _valid_points)
    gm = record(p._value_and_grad, example())
    RECORDINGS["count"] += 1
    _errors_as_flag(gm)

    def check(graph):
        _agrees(p, graph, example)
        graph_store.save(key, gm)  # (a graph that agrees with the interpreter: kept for later runs)
    return _replay_checked(p, gm, example, backend, check)


def _static_examples(p: Potential, find_valid):
    """``example(beta=1.0) -> (z, beta, *given)``: fresh points near valid ones
    (``find_valid(p, generator)``), after checking the program is static at them (raises
    NotStatic at a Python decision on z)."""
    given = tuple(p.given[a] for a in p.discrete)
    g = torch.Generator(device="cpu").manual_seed(0)
    valid = find_valid(p, g)

    def example(beta=1.0):
        z = valid + 0.01 * torch.randn(p.C, p.D, generator=g, dtype=torch.float64).to(p.device)
        return (z, torch.tensor(beta, dtype=torch.float64, device=p.device), *given)

    with torch.no_grad():
        p._run(*_taint((example()[0],)), dict(zip(p.discrete, _taint(given))))
    return example


#: how many potential graphs this process recorded through the interpreter (a test's count)
RECORDINGS = {"count": 0}


def _replay_checked(p: Potential, gm, example, backend, check):
    """``_trace``'s end: the recorded graph ``gm`` replayed by the backend chosen (``backend``),
    ``check(replayed)`` raising NotStatic where it disagrees with the interpreter."""
    p._recorded = (gm, example)
    p._aten = gm
    why_not = None
    if callable(backend):
        why_not = backend(gm, dims=p.D)  # (the rule reads the graph and the potential's dimension)
        backend = "jit" if why_not else "inductor"
    why = None
    if backend == "inductor":
        try:
            fast = replay(gm, example(), backend, native=True)
            check(fast)
            return fast, True
        except Exception as e:  # noqa: BLE001 - any compiler failure leaves the TorchScript graph
            why = (str(e).splitlines() or [type(e).__name__])[0]
    graph = replay(gm, example())
    check(graph)
    if why is not None:
        raise _CompileFailed(graph, why)
    p.why_not_compiled = why_not
    return graph, False


def _trace_stored(p: Potential, gm, backend):
    """``_trace`` with the graph ``gm`` loaded from ``inference.graph_store`` instead of
    recorded: the same points to check at (found by the interpreter's log density alone, no
    gradient), the same static check, the same backends; each replayed graph must agree with
    the loaded graph run as it is (values and gradients: the compiler is checked) and the
    loaded graph's log density and validity flag with the interpreter's (the graph is the
    program's). NotStatic where either disagrees (the caller records it afresh)."""
    example = _static_examples(p, _valid_values)
    return _replay_checked(p, gm, example, backend, lambda graph: _agrees_stored(p, gm, graph, example))


def _interpreter_values(p: Potential, z, beta, *given):
    """(log pi [C], parameters valid?) by one run of the interpreter, without the gradient."""
    with torch.no_grad():
        lp, ll, _, _, checks = p._run(z, dict(zip(p.discrete, given)))
    ok = torch.ones((), dtype=torch.bool, device=z.device)
    for c in checks:
        ok = ok & c
    return _combine(lp, ll, beta), ok


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-9) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=rtol, atol=1e-12, equal_nan=True)


#: ``_agrees_stored``'s tolerance between the interpreter's log density without the gradient
#: transform and the stored graph's: without ``torch.func.grad`` some terms run through other
#: kernels (logistic regression's 200 Bernoulli terms: the fused binary_cross_entropy_with_logits
#: instead of its decomposition, ~1e-9 relative); a graph of another program, data or code
#: differs by orders of magnitude more
STORED_VALUE_RTOL = 1e-7


def _agrees_stored(p: Potential, gm, graph, example) -> None:
    """NotStatic unless, at fresh points and betas, the stored graph ``gm`` (run as it is)
    gives the interpreter's log density (``STORED_VALUE_RTOL``) and validity flag, and
    ``graph`` (its replay) gives ``gm``'s outputs, gradient included."""
    for args in (example(), example(0.5), example(0.0)):
        value, ok = _interpreter_values(p, *args)
        reference = gm(*args)
        if not _close(value, reference[0], STORED_VALUE_RTOL) or bool(ok) != bool(reference[2]):
            raise NotStatic("the stored graph disagrees with the interpreter")
        if not all(_close(r, t) for r, t in zip(reference, graph(*args))):
            raise NotStatic("the replayed graph disagrees with the stored graph")


def _valid_values(p: Potential, g: torch.Generator, tries: int = 20) -> torch.Tensor:
    """``_valid_points`` by the interpreter's log density alone (no gradient): the same draws
    from ``g``."""
    def uniform():
        return torch.rand(p.C, p.D, generator=g, dtype=torch.float64).to(p.device) * 4 - 2

    one = torch.tensor(1.0, dtype=torch.float64, device=p.device)
    given = tuple(p.given[a] for a in p.discrete)
    z = uniform()
    for _ in range(tries):
        bad = ~torch.isfinite(_interpreter_values(p, z, one, *given)[0])
        if not bool(bad.any()):
            break
        z = torch.where(bad.unsqueeze(1), uniform(), z)
    return z


def _errors_as_flag(gm: torch.fx.GraphModule) -> int:
    """Turn each of the graph's linear-algebra error checks (``aten._linalg_check_errors``,
    which raises when a Cholesky factorisation fails: a covariance that is not positive
    definite in some chain) into a term of its validity flag, the third output; the number
    turned. ``Potential.value_and_grad`` treats a graph that raises and one whose flag is
    false alike (each chain's row is then evaluated on its own, ``_rows_through_graph``),
    so the potential computes the same; but a check that raises is a side effect, which
    TorchInductor keeps in a ``with_effects`` wrapper that its on-disk cache refuses ("Can't
    cache HigherOrderOperator"): the GP's graph was compiled afresh by every process
    (~18 s CPU)."""
    graph = gm.graph
    checks = [n for n in graph.nodes
              if n.op == "call_function" and n.target is torch.ops.aten._linalg_check_errors.default]
    output = next((n for n in graph.nodes if n.op == "output"), None)
    if not checks or output is None:
        return 0
    outs = output.args[0]
    if not isinstance(outs, (tuple, list)) or len(outs) < 3 or not isinstance(outs[2], torch.fx.Node) or \
            any(n.users for n in checks):
        return 0
    ok = outs[2]
    with graph.inserting_before(output):
        for node in checks:
            fine = graph.call_function(torch.ops.aten.eq.Scalar, (node.args[0], 0))
            fine = graph.call_function(torch.ops.aten.all.default, (fine,))
            ok = graph.call_function(torch.ops.aten.bitwise_and.Tensor, (ok, fine))
    for node in checks:
        graph.erase_node(node)
    output.args = ((*outs[:2], ok, *outs[3:]),)
    gm.recompile()
    return len(checks)


def _agrees(p: Potential, graph, example) -> None:
    """NotStatic unless ``graph`` and the interpreter agree at fresh points and betas."""
    for args in (example(), example(0.5), example(0.0)):
        eager, traced = p._value_and_grad(*args), graph(*args)
        for e, t in zip(eager, traced):
            if e.shape != t.shape or not torch.allclose(e.double(), t.double(), rtol=1e-9, atol=1e-12,
                                                        equal_nan=True):
                raise NotStatic("the traced graph disagrees with the interpreter")


def _valid_points(p: Potential, g: torch.Generator, tries: int = 20) -> torch.Tensor:
    """Points z [C, D] of positive density where possible (uniform on (-2, 2), redrawn by
    rows), to record the graph at: a run at an invalid point may raise on the way (a
    covariance that is not positive definite) and record nothing."""
    def uniform():
        return torch.rand(p.C, p.D, generator=g, dtype=torch.float64).to(p.device) * 4 - 2

    z = uniform()
    for _ in range(tries):
        with torch.no_grad():
            try:
                lp = p._value_and_grad(z, torch.tensor(1.0, dtype=torch.float64, device=p.device),
                                       *(p.given[a] for a in p.discrete))[0]
            except PPLError:
                lp = p._row_by_row(z, 1.0)[0]
        bad = ~torch.isfinite(lp)
        if not bool(bad.any()):
            break
        z = torch.where(bad.unsqueeze(1), uniform(), z)
    return z
