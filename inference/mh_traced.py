"""Random-walk MH with one traced torch graph per step, for programs whose control flow
does not depend on their random choices.

Single-site MH (``inference.mh``) re-runs the interpreter at every step: for a small
model that is hundreds of microseconds of Python per step, whatever the number of
chains. When every run of a program makes the same choices in the same order and
takes the same branches (a *static* program: its control flow may depend on the data,
but not on its random choices), one step is always the same sequence of tensor
operations. ``TracedRandomWalk`` records that sequence once with ``torch.jit.trace``
and replays it at every step.

Invariant: ``TracedRandomWalk.step`` *is* the kernel of ``mh.mh_step(kernel="rw")``: the
same draws from the same randomness in the same order, the same proposal (the walk of
``mh.unconstrained_walk``), the same acceptance ratio. The traced graph runs the same
handler code as the interpreter would, so it leaves the same posterior invariant; the
tests run both kernels from one seed and compare the chains draw by draw.

When is the trace valid? The tracer records tensor operations and forgets Python
control flow. Every decision the interpreter makes from a random value goes through a
read of a tensor into Python (``bool(mask.all())`` when an ``if`` splits particles,
``int(n)`` for a random loop bound, ``.tolist()``...) or through a shape that depends on
values (boolean masks). Before tracing, ``TracedRandomWalk.build`` runs one step eagerly
with its inputs wrapped as ``_Tainted`` tensors, which propagate to every value computed
from them and raise at any such read: the program is static exactly when that run
finishes. (The tracer's own warnings cannot tell: they also fire at reads of shapes and
of constants, which are the same at every step.) ``build`` returns None, and ``mh``
falls back to the interpreter, when the program is not static, when a choice is not
real-valued with a bijection to the real line, when the first run's trace is not the
same for every chain, or when the traced graph and the interpreter disagree on fresh
inputs. A trace is built for one number of chains and one data set.
"""
from __future__ import annotations

import math
import warnings
import torch

from ..semantics.errors import PPLError, PPLRuntimeError
from ..semantics.gfi import TracedState, scale_at, unconstrained_walk
from ..semantics.interpreter import Interpreter
from ..semantics.sampling import _WeightAccumulator, column, drive
from ..semantics.values import Batched, Particles, PerParticle, rows, to_bool_rows
from ..stdlib.distributions import deferred_checks
from .mh import MoveStats, mh_step
from .randomness import TorchRandomness


class NotStatic(Exception):
    """The program cannot be traced as one fixed sequence of tensor operations."""


class _Tainted(torch.Tensor):
    """A tensor that depends on the chains' current values or on the step's draws: every
    result computed from it is one too (``__torch_function__``), and reading it into
    Python (``bool``, ``int``, ``float``, ``item``, ``tolist``...), which is how a Python
    decision would depend on it, raises ``NotStatic``; so do operations whose result
    *shape* depends on it (boolean-mask indexing, ``nonzero``...) and in-place writes of
    it into an untainted tensor (which would hide the dependence)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func in _READS:
            raise NotStatic(f"a Python decision depends on a random value ({name})")
        if func in _SHAPE_FROM_VALUES:
            raise NotStatic(f"a shape depends on a random value ({name})")
        if func is torch.Tensor.__getitem__ and _tainted_mask(args[1] if len(args) > 1 else None):
            raise NotStatic("a boolean mask from a random value selects elements")
        if (name.endswith("_") and not name.startswith("_")) or func is torch.Tensor.__setitem__:
            if args and not isinstance(args[0], _Tainted):
                raise NotStatic(f"an in-place write of a random value ({name})")
        return super().__torch_function__(func, types, args, kwargs)


_T = torch.Tensor
_READS = {_T.__bool__, _T.__int__, _T.__float__, _T.__index__, _T.__complex__, _T.item, _T.tolist, _T.numpy,
          _T.__iter__, _T.__array__}
_SHAPE_FROM_VALUES = {torch.nonzero, _T.nonzero, torch.masked_select, _T.masked_select, torch.unique, _T.unique,
                      torch.argwhere, torch.bincount, _T.bincount, torch.repeat_interleave,
                      _T.repeat_interleave, torch.unique_consecutive}


def _tainted_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, _Tainted) and i.dtype == torch.bool for i in items)


def _taint(args):
    """The step's inputs as ``_Tainted`` tensors (nested tuples kept)."""
    if isinstance(args, tuple):
        return tuple(_taint(a) for a in args)
    return args.as_subclass(_Tainted) if isinstance(args, torch.Tensor) else args


class LikelihoodTerms:
    """``observe`` and ``condition`` for a handler that sums every likelihood term through
    ``self._likelihood(ctx, lp)`` with no Python decision on a value (so that its run can
    be traced)."""

    def observe(self, eff):
        self._likelihood(eff.ctx, eff.dist.log_prob(eff.value, eff.ctx))

    def condition(self, eff):
        c = to_bool_rows(eff.value, eff.ctx)
        if isinstance(c, bool):
            self._likelihood(eff.ctx, 0.0 if c else -math.inf)
        else:
            self._likelihood(eff.ctx, torch.where(c, 0.0, -math.inf))


def factor_rows(eff, error=PPLRuntimeError) -> torch.Tensor:
    """A ``factor``'s value as one number per particle of its context (a tensor), or
    ``error`` when it is not a number or not one per particle."""
    v = eff.value
    if isinstance(v, Batched):
        lp = rows(v, eff.ctx)
        if lp.dim() != 1:
            raise error("factor needs one number per particle", eff.span)
        return lp
    if isinstance(v, PerParticle):
        raise error("factor needs a number", eff.span)
    return torch.as_tensor(float(v))


class _WalkAtEverySite(_WeightAccumulator):
    """One run of a static program in which the choice at site k becomes
    ``where(chosen[k], walk(old[k], noise[k]), old[k])``: a whole MH proposal plus the
    scoring of the proposed trace, with no draws (the noise comes in as data) and no
    Python decision that depends on a value."""

    def __init__(self, C: int, device, addrs: tuple, old: tuple, noise: tuple, chosen, scales):
        super().__init__(C, device, dtype=torch.float64)
        self.C = C
        # chosen: bool [n, C] (row k: the chains that move site k); scales: float64 [n, C]
        self.addrs, self.old, self.noise, self.chosen, self.scales = addrs, old, noise, chosen, scales
        self.index = {a: k for k, a in enumerate(addrs)}
        self.seen = [False] * len(addrs)
        self.values, self.site_lp = [None] * len(addrs), [None] * len(addrs)
        self.log_lik = torch.zeros(C, dtype=torch.float64, device=device)
        self.rev_q = torch.zeros(C, dtype=torch.float64, device=device)
        self.fwd_q = torch.zeros(C, dtype=torch.float64, device=device)
        self.factor_nan = torch.zeros(C, dtype=torch.bool, device=device)
        self.full_idx = None

    def _full(self, ctx):
        if ctx.idx is not self.full_idx:
            raise NotStatic("a choice or factor reached by only some chains")

    def _site(self, eff) -> int:
        """The position of this choice in the state; each choice of the first run once."""
        self._full(eff.ctx)
        k = self.index.get(eff.addr)
        if k is None or self.seen[k]:
            raise NotStatic(f"the choices differ from the first run's at '{eff.addr}'")
        self.seen[k] = True
        return k

    def sample(self, eff):
        ctx = eff.ctx
        k = self._site(eff)
        noise = self.noise[k]
        out = unconstrained_walk(eff.dist, ctx, self.old[k], self.chosen[k], lambda shape, device: noise,
                                 self.scales[k])
        if out is None:
            raise NotStatic(f"the choice '{eff.addr}' has no bijection to the real line")
        x2, rev, fwd = out
        if rev is not None:
            self.rev_q = self.rev_q + rev
            self.fwd_q = self.fwd_q + fwd
        c = self.chosen[k]
        value_rows = torch.where(c if x2.dim() == 1 else c.reshape((self.C,) + (1,) * (x2.dim() - 1)), x2, self.old[k])
        value = Batched(value_rows, ctx.idx)
        lp = eff.dist.log_prob(value, ctx)
        if lp.dtype != torch.float64:
            lp = lp.double()
        lp = lp.expand(self.C) if lp.dim() == 0 else lp
        self.log_weights = self.log_weights + lp
        self.values[k] = value_rows
        self.site_lp[k] = lp
        return value

    def _likelihood(self, ctx, lp):
        self._full(ctx)
        if not (isinstance(lp, torch.Tensor) and lp.dtype == torch.float64):
            lp = torch.as_tensor(lp, dtype=torch.float64, device=self.log_weights.device)
        self.log_lik = self.log_lik + lp
        self.log_weights = self.log_weights + lp

    add = _likelihood  # twist() adds through here too

    observe, condition = LikelihoodTerms.observe, LikelihoodTerms.condition

    def factor(self, eff):
        lp = factor_rows(eff, lambda message, span: NotStatic(message))  # (the interpreter gives the error)
        # NaN is reported after the step (the interpreter raises on it)
        if lp.dtype != torch.float64:
            lp = lp.double()
        self.factor_nan = self.factor_nan | torch.isnan(lp)
        self._likelihood(eff.ctx, lp)


class TracedRandomWalk:
    """The ``rw`` MH kernel of a static program as a traced graph (see the module doc)."""

    def __init__(self, fn, addrs: tuple, walk_shapes: tuple, C: int, device, scale, program: tuple):
        self.fn = fn
        self.addrs = addrs
        self.walk_shapes = walk_shapes
        # the unconstrained dimension of each site (what adaptation targets depend on)
        self.walks = {a: math.prod(shape[1:]) for a, shape in zip(addrs, walk_shapes)}
        self.C = C
        self.device = device
        self.scale = scale  # the default scale(s) of ``step``: a number or address -> scale
        self.zero_noise = tuple(torch.zeros(s, dtype=torch.float64, device=device) for s in walk_shapes)
        self.program = program  # (interpreter, entry, data): to redo a failing step

    @classmethod
    def build(cls, interp: Interpreter, entry: str, data: dict, state: TracedState, scale=0.5,
              device="cpu", why: list | None = None) -> "TracedRandomWalk | None":
        """The traced kernel for chains in ``state`` (a first run of the program), or None
        when the program is not static (then use ``mh.mh_step``); the reason is appended
        to ``why``. Never raises for a program the interpreter can run. ``scale`` (a
        number or address -> scale) is only the default of ``step``: the graph takes the
        per-site scales as an input, so adapted scales need no new trace."""
        try:
            return cls._build(interp, entry, data, state, scale, device)
        except (NotStatic, PPLError, RuntimeError, TypeError, ValueError, IndexError, AttributeError) as e:
            if why is not None:
                why.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None

    @classmethod
    def _build(cls, interp, entry, data, state, scale, device):
        C = state.log_joint.shape[0]
        addrs = tuple(state.values)
        if not addrs or not isinstance(state.ret, torch.Tensor) or state.log_lik is None:
            raise NotStatic("no choices, or a non-numeric return value")
        for a in addrs:
            if not bool(state.present[a].all()) or not state.values[a].is_floating_point():
                raise NotStatic(f"'{a}' is not a real-valued choice of every chain")
        n = len(addrs)

        def step(old, old_lp, old_joint, old_lik, old_ret, noise, chosen, u, scales):
            """Propose, score, accept: the body of ``mh_step`` for a static program
            (``chosen`` bool [n, C]: which chains move which site; ``scales`` [n, C]: each
            site's scale in each chain)."""
            ctx = Particles.all(C, device)
            h = _WalkAtEverySite(C, device, addrs, old, noise, chosen, scales)
            h.full_idx = ctx.idx
            with deferred_checks() as checks:
                ret = column(drive(interp.run(entry, data, ctx), h), ctx)
            # a NaN factor or a failed parameter check: the interpreter redoes the step
            bad = h.factor_nan.any()
            for ok in checks:
                bad = bad | ~ok
            if not all(h.seen):
                raise NotStatic("the run made fewer choices than the first one")
            if not isinstance(ret, torch.Tensor):
                raise NotStatic("a non-numeric return value")
            log_alpha = h.log_weights - old_joint + h.rev_q - h.fwd_q
            log_alpha = torch.where(torch.isnan(log_alpha), torch.full_like(log_alpha, -math.inf), log_alpha)
            accept = (torch.log(u) < log_alpha) & torch.isfinite(h.log_weights)

            masks = {}

            def pick(new, old):
                if new.dtype != old.dtype:
                    new = new.to(old.dtype)
                if new.dim() not in masks:
                    masks[new.dim()] = accept if new.dim() == 1 else accept.reshape((C,) + (1,) * (new.dim() - 1))
                return torch.where(masks[new.dim()], new, old)

            return (accept, bad, pick(h.log_weights, old_joint), pick(h.log_lik, old_lik),
                    pick(ret, old_ret), *(pick(v, o) for v, o in zip(h.values, old)),
                    *(pick(lp, o) for lp, o in zip(h.site_lp, old_lp)))

        old = tuple(state.values[a] for a in addrs)
        old_lp = tuple(state.site_lp[a].double() for a in addrs)
        current = (old, old_lp, state.log_joint.double(), state.log_lik.double(), state.ret)
        # the shapes of the walks (unconstrained space), from a run with no move
        ctx = Particles.all(C, device)
        h = _ShapeProbe(C, device, addrs, old)
        h.full_idx = ctx.idx
        drive(interp.run(entry, data, ctx), h)
        if not all(h.seen):
            raise NotStatic("the run made fewer choices than the first one")
        shapes = tuple(h.shapes)

        def example(seed, shift):
            g = torch.Generator(device="cpu").manual_seed(seed)
            noise = tuple(torch.randn(s, generator=g, dtype=torch.float64).to(device) for s in shapes)
            pick = ((torch.arange(C) + shift) % n).to(device)
            u = torch.rand(C, generator=g, dtype=torch.float64).to(device)
            scales = (0.5 + torch.rand(n, C, generator=g, dtype=torch.float64)).to(device)
            return (*current, noise, _chosen(pick, n), u, scales)

        # static? one eager run in which every value derived from the inputs is tainted
        step(*_taint(example(0, 0)))
        with warnings.catch_warnings():
            # the tracer warns at every Python read of a tensor, shapes and constants
            # included: the tainted run above has found the ones that matter
            warnings.simplefilter("ignore")
            fn = torch.jit.trace(step, example(0, 0), check_trace=False, strict=False)
        # the trace must agree with the interpreter on the input it was made with and on
        # others
        for args in (example(0, 0), example(1, 1), example(2, n - 1)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                eager, traced = step(*args), fn(*args)
            for e, t in zip(eager, traced):
                if e.shape != t.shape or e.dtype != t.dtype or not torch.allclose(
                        e.double(), t.double(), rtol=1e-12, atol=0, equal_nan=True):
                    raise NotStatic("the traced graph disagrees with the interpreter")
        return cls(fn, addrs, shapes, C, device, scale, (interp, entry, data))

    def step(self, state: TracedState, randomness=None, scales=None) -> tuple[TracedState, torch.Tensor]:
        """One MH step for every chain (``mh.mh_step`` with kernel "rw"): the same draws
        in the same order (site, walk noise where a chain moves that site, accept).
        ``scales``: a number or address -> scale (default: the one given to ``build``)."""
        new, accept, _ = self.step_with_stats(state, randomness, scales)
        return new, accept

    def step_with_stats(self, state: TracedState, randomness=None, scales=None):
        """``step`` that also returns the step's ``mh.MoveStats`` (which chains moved
        which site, the sites' unconstrained dimensions): (state, accepted, stats)."""
        randomness = randomness or TorchRandomness()
        scales = self.scale if scales is None else scales
        n = len(self.addrs)
        # TorchRandomness.choose for n sites in every chain, in fewer operations
        pick = torch.clamp_max((randomness.uniform((self.C,), self.device) * float(n)).long(), n - 1)
        moved = torch.bincount(pick, minlength=n).tolist()
        noise = tuple(randomness.normal(shape, self.device) if moved[k] else self.zero_noise[k]
                      for k, shape in enumerate(self.walk_shapes))
        u = randomness.uniform((self.C,), self.device)
        addrs = self.addrs
        chosen = _chosen(pick, n)
        stats = MoveStats(dict(zip(addrs, chosen)), self.walks)
        scale_matrix = torch.stack([torch.as_tensor(scale_at(scales, a), dtype=torch.float64, device=self.device)
                                    .expand(self.C) for a in addrs])
        out = self.fn(tuple(state.values[a] for a in addrs), tuple(state.site_lp[a] for a in addrs),
                      state.log_joint, state.log_lik, state.ret, noise, chosen, u, scale_matrix)
        accept, bad, log_joint, log_lik, ret = out[:5]
        if bool(bad):
            new, accept = self._redo(state, pick, noise, u, scales)
            return new, accept, stats
        return TracedState(dict(zip(addrs, out[5:5 + n])), state.present, dict(zip(addrs, out[5 + n:])), log_joint,
                           ret, log_lik), accept, stats

    def _redo(self, state, pick, noise, u, scales):
        """A factor was NaN or a parameter invalid somewhere in the step: redo it with the
        interpreter and the same draws. That raises the error at its source, unless every
        failure was in a chain of weight zero (a proposal outside the support, rejected
        anyway: ``semantics.sampling``), when it gives the step's result."""
        interp, entry, data = self.program
        chosen = tuple(pick == k for k in range(len(self.addrs)))
        replay = _ReplayDraws(iter(n for n, c in zip(noise, chosen) if bool(c.any())), pick, u)
        return mh_step(interp, entry, data, state, self.device, randomness=replay, kernel="rw", scale=scales)


def _chosen(pick: torch.Tensor, n: int) -> torch.Tensor:
    """bool [n, C]: row k marks the chains whose ``pick`` is site k."""
    return pick.unsqueeze(0) == torch.arange(n, device=pick.device).unsqueeze(1)


class _ReplayDraws(TorchRandomness):
    """Gives back the draws of a traced step (to redo it with the interpreter): the
    chosen sites, the walk noise, the accept uniforms."""

    def __init__(self, normals, pick, u):
        self.normals, self.pick, self.u = normals, pick, u

    def choose(self, sizes):
        return self.pick

    def normal(self, shape, device):
        return next(self.normals)

    def uniform(self, shape, device):
        return self.u


class _ShapeProbe(_WalkAtEverySite):
    """A run that records the shape of each site's walk (the noise it asks for)."""

    def __init__(self, C, device, addrs, old):
        super().__init__(C, device, addrs, old, (), (), ())
        self.shapes = [None] * len(addrs)

    def sample(self, eff):
        k = self._site(eff)
        none = torch.zeros(self.C, dtype=torch.bool, device=self.old[k].device)

        def normal(shape, device):
            self.shapes[k] = tuple(shape)
            return torch.zeros(shape, dtype=torch.float64, device=device)

        if unconstrained_walk(eff.dist, eff.ctx, self.old[k], none, normal, 1.0) is None:
            raise NotStatic(f"the choice '{eff.addr}' has no bijection to the real line")
        return Batched(self.old[k], eff.ctx.idx)
