"""Distributions as runtime values.

``normal(mu, 1)`` in a model evaluates to a ``DistValue``: a distribution spec from
``ppl.stdlib.distributions`` and its (possibly batched) arguments. The three things
the semantics needs from it are here:

* ``sample(ctx)``: one draw per particle, and its log density;
* ``log_prob(value, ctx)``: the log density of a value, per particle, -inf outside the
  support (a value outside the support is weight zero, not an error);
* ``exact_support()`` / ``exact_prob(value)``: the finite support with exact masses, for
  the enumeration semantics (arguments are then plain Python values).

Shapes follow the per-particle reading: a batched argument is [M, *s] where s is the
shape one particle sees; the torch distribution is built with the particle dimension
leading and extra singleton dims where one particle's shapes would broadcast.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch

from ..stdlib import rng
from .errors import PPLRuntimeError
from ..stdlib.distributions import deferred_checks
from .values import (Batched, Particles, RaggedListError, PerParticle, batch_rows, is_batched,
                     materialize, pack, rows, to_python, as_tensor, DistributionValue, deep_batched)


def empty_parameter_error(spec, name: str, shape: list) -> PPLRuntimeError:
    """The error for a parameter with no elements (``normal(0, [])``, ``flip([])``): no
    distribution at all, not one of no observations (both semantics raise it)."""
    return PPLRuntimeError(f"{spec.name}: parameter '{name}' is empty (shape {shape})",
                           hint=f"{spec.name}({', '.join(spec.params)}) needs numbers (or non-empty "
                                "lists of numbers) as parameters")


def broadcast_value_error(spec, value_shape: list, scored_shape: list) -> PPLRuntimeError:
    """The error for an observed value that would be broadcast up to the distribution's
    shape, i.e. scored ``prod(scored_shape)`` times (both semantics raise it)."""
    return PPLRuntimeError(
        f"{spec.name}: the value has shape {value_shape} but the distribution's parameters have "
        f"shape {scored_shape}: the value would be scored {math.prod(scored_shape)} times",
        hint="observe a value of the parameters' shape, or pick one parameter per value (e.g. sigma[i] "
             "in a loop over range(len(ys)))")


class DistValue(DistributionValue):
    """A distribution with its arguments, as a value of the language."""

    __slots__ = ("spec", "args", "defaulted")

    def __init__(self, spec, args: tuple, defaulted: frozenset = frozenset()):
        self.spec = spec
        self.args = args
        self.defaulted = defaulted  # positions filled from the spec's defaults

    def describe(self) -> str:
        return f"{self.spec.name} distribution"

    # ------------------------------------------------------------------ batched semantics
    def _params(self, ctx: Particles, value_rank: int = 0):
        """Torch parameters aligned for ``ctx``, and whether any is batched.

        value_rank: the per-particle batch rank a value needs (for log_prob of an
        observed vector under a scalar distribution)."""
        spec = self.spec
        raw = []  # (parameter, batched, its per-particle batch rank)
        on_cpu = str(ctx.device) == "cpu"
        any_batched, rank = False, value_rank
        for i, (a, ev) in enumerate(zip(self.args, spec.param_event_dims)):
            if on_cpu and (type(a) is float or type(a) is int):  # the common constant: no tensor
                raw.append((a, False, -ev))
                rank = max(rank, -ev)
                continue
            if type(a) is Batched:  # (what batch_rows does with it)
                batched, t = True, rows(a, ctx)
            else:
                batched = deep_batched(a)  # a nested list of per-particle numbers is one batched tensor
                t = batch_rows(a, ctx) if batched else as_tensor(a, ctx.device)
            if ev == 0 and t.numel() == 0:  # normal(0, []): no distribution at all, not an empty one
                raise empty_parameter_error(spec, spec.params[i], list(t.shape))
            if t.dtype in (torch.bool, torch.long, torch.int32):
                t = t.to(torch.get_default_dtype())
            r = t.dim() - batched - ev
            raw.append((t, batched, r))
            any_batched = any_batched or batched
            rank = max(rank, r)
        params = [t.reshape(t.shape[0], *([1] * (rank - r)), *t.shape[1:]) if b and r < rank else t
                  for t, b, r in raw]
        return params, any_batched

    def _make(self, params):
        try:
            return self.spec.make(*params)
        except PPLRuntimeError:
            raise
        except (ValueError, RuntimeError) as e:
            raise PPLRuntimeError(f"{self.spec.name}: {str(e).splitlines()[0]}") from None

    def sample(self, ctx: Particles, generator: torch.Generator | None = None):
        """One draw per particle of ctx (a batched value), with ``generator`` (default:
        the current run's, ``ppl.stdlib.rng``)."""
        if getattr(self.spec, "index_valued", False):
            return self._sample_items(ctx, generator)[0]
        params, batched = self._params(ctx)
        d = self._make(params)
        s = rng.sample(d, () if batched else (ctx.M,), generator)
        return Batched(self.spec.to_value(s), ctx.idx)

    def torch_dist(self, ctx: Particles):
        """The torch distribution for the particles of ctx (batch shape [M, ...] when an
        argument is batched, else the unbatched shape)."""
        params, _ = self._params(ctx)
        return self._make(params)

    def placeholder(self, ctx: Particles):
        """A value of this distribution's shape and dtype for each particle of ctx (zeros),
        made without checking the parameters or drawing: for particles of weight zero,
        whose parameters may be invalid and whose values are never used. None when the
        shape cannot be known without valid parameters."""
        if getattr(self.spec, "index_valued", False):
            return None
        try:
            params, batched = self._params(ctx)
            with deferred_checks():  # collects the parameter checks instead of raising
                d = self._make(params)
        except (PPLRuntimeError, ValueError, RuntimeError):
            return None
        shape = (*d.batch_shape, *d.event_shape)
        if not batched:
            shape = (ctx.M, *shape)
        return Batched(self.spec.to_value(torch.zeros(shape, device=ctx.device)), ctx.idx)

    def invalid_particles(self, ctx: Particles) -> torch.Tensor | None:
        """Per particle of ctx, whether its own parameters are invalid (a bool tensor
        [M]), or None when they are invalid alike for every particle (a parameter that is
        not per-particle: a constant or data) or cannot be checked particle by particle."""
        if getattr(self.spec, "index_valued", False):
            return None
        try:
            params, batched = self._params(ctx)
        except (PPLRuntimeError, ValueError, RuntimeError):
            return None
        if not batched:
            return None
        flags = [type(a) is Batched or deep_batched(a) for a in self.args]
        return self.spec.invalid_rows(params, flags, ctx.M)

    def sample_with_log_prob(self, ctx: Particles):
        """One draw per particle of ctx, and its log density (a tensor [M])."""
        value = self.sample(ctx)
        return value, self.log_prob(value, ctx)

    def log_prob(self, value: Any, ctx: Particles) -> torch.Tensor:
        """log density of ``value`` per particle of ctx: a tensor [M] (or a scalar
        tensor when neither the value nor the distribution depends on the particle)."""
        if getattr(self.spec, "index_valued", False):
            return self._log_prob_items(value, ctx)
        vb = deep_batched(value)
        if isinstance(value, PerParticle):
            v = batch_rows(value, ctx)
        elif vb:
            v = batch_rows(value, ctx)
        else:
            try:
                v = as_tensor(value, ctx.device)
            except RaggedListError:
                return self._log_prob_ragged(value, ctx)
        value_shape = tuple(v.shape[int(vb):max(int(vb), v.dim() - self.spec.value_event_dim)])
        vrank = v.dim() - vb - self.spec.value_event_dim
        params, batched = self._params(ctx, vrank)
        if vb:
            prank = max(0, max((_dim(p) - batched - ev for p, ev in zip(params, self.spec.param_event_dims)), default=0))
            if vrank < prank:
                v = v.reshape(v.shape[0], *([1] * (prank - vrank)), *v.shape[1:])
        d = self._make(params)
        tv = self.spec.from_value(v)
        try:  # the spec's distributions score values outside the support as -inf
            lp = d.log_prob(tv)
        except (ValueError, RuntimeError, IndexError) as e:
            raise PPLRuntimeError(
                f"{self.spec.name}: cannot score this value ({str(e).splitlines()[0]})",
                hint="check the shape of the observed value against the distribution's",
            ) from None
        self._check_not_broadcast(value_shape, tuple(lp.shape[1:] if vb or batched else lp.shape))
        # sums over the observed elements are taken in float64 (log densities accumulate
        # in float64: a float32 sum of 1e6 terms is off by nats)
        if vb or batched:
            return lp.reshape(lp.shape[0], -1).sum(1, dtype=torch.float64) if lp.dim() > 1 else lp
        return lp.sum(dtype=torch.float64) if lp.dim() > 0 else lp

    def _check_not_broadcast(self, value_shape: tuple, scored_shape: tuple) -> None:
        """A value is scored once per element of the distribution, never broadcast up to
        it: ``observe y ~ normal(mu, sigma)`` with a scalar y and sigma = [2, 3, 4] would
        count y three times (a silently wrong likelihood). (Not while torch.jit traces a
        static program: its sizes are tensors then, and its eager run checked them.)"""
        if scored_shape != value_shape and not torch.jit.is_tracing() and \
                math.prod(scored_shape) > math.prod(value_shape):
            raise broadcast_value_error(self.spec, list(value_shape), list(scored_shape))

    def _log_prob_ragged(self, value, ctx: Particles) -> torch.Tensor:
        """A ragged list observed under a distribution of scalars (``observe xs ~
        bernoulli(p)`` with xs = [[1], [0, 1]]): independent observations of its items,
        as in the exact semantics: the sum of their log densities."""
        if self.spec.value_event_dim != 0 or any(self._param_size(a, ev, ctx) > 1
                                                 for a, ev in zip(self.args, self.spec.param_event_dims)):
            as_tensor(value, ctx.device)  # raises the ragged-list error
        return sum(torch.as_tensor(self.log_prob(x, ctx), dtype=torch.float64) for x in value)

    @staticmethod
    def _param_size(a, event_dim: int, ctx: Particles) -> int:
        """How many distributions one particle's parameter ``a`` describes."""
        if type(a) in (bool, int, float) or isinstance(a, Fraction):
            return 1
        batched = deep_batched(a)  # as in _params
        shape = batch_rows(a, ctx).shape[1:] if batched else as_tensor(a, ctx.device).shape
        return math.prod(shape[:max(0, len(shape) - event_dim)])

    # uniform_draw: values are items of a list; torch samples their indices
    def _items(self):
        items = self.args[0]
        if is_batched(items):
            raise PPLRuntimeError("uniform_draw needs a list that is the same for every particle")
        return list(items) if isinstance(items, (list, tuple)) else list(items.unbind(0)) if isinstance(items, torch.Tensor) else list(items)

    def _item_lists(self, ctx: Particles) -> list:
        """uniform_draw's items when they are a list per particle (``hyps[h]``: lists of
        different lengths, or rows of a batched tensor): the list of each particle of ctx."""
        out = []
        for x in materialize(self.args[0], ctx):
            if isinstance(x, torch.Tensor) and x.dim() >= 1:
                x = list(x.unbind(0))
            if not isinstance(x, (list, tuple, range, str)):
                raise PPLRuntimeError(f"uniform_draw needs a list of items (got {type(x).__name__})")
            if len(x) == 0:
                raise PPLRuntimeError("uniform_draw of an empty list")
            out.append(list(x))
        return out

    def _sample_item_lists(self, ctx: Particles, generator):
        """A draw per particle from its own list (``_item_lists``), and its log probability."""
        lists = self._item_lists(ctx)
        n = torch.tensor([float(len(x)) for x in lists], dtype=torch.float64, device=ctx.device)
        u = torch.rand(ctx.M, dtype=torch.float64, device=ctx.device, generator=generator or rng.generator(ctx.device))
        k = torch.minimum((u * n).floor(), n - 1).long().tolist()
        lp = (-torch.log(n)).to(torch.get_default_dtype())
        return pack([x[j] for x, j in zip(lists, k)], ctx), lp

    def _sample_items(self, ctx: Particles, generator: torch.Generator | None = None):
        if is_batched(self.args[0]):
            return self._sample_item_lists(ctx, generator)
        items = self._items()
        if not items:
            raise PPLRuntimeError("uniform_draw of an empty list")
        k = torch.randint(len(items), (ctx.M,), device=ctx.device, generator=generator or rng.generator(ctx.device))
        lp = torch.full((ctx.M,), -float(torch.log(torch.tensor(float(len(items))))), device=ctx.device)
        if any(is_batched(x) for x in items):  # items that differ between particles
            cols = [materialize(x, ctx) for x in items]
            return pack([cols[j][i] for i, j in enumerate(k.tolist())], ctx), lp
        if all(isinstance(x, (int, float, bool, torch.Tensor)) for x in items):
            table = as_tensor(items, ctx.device)
            return Batched(table[k], ctx.idx), lp
        return PerParticle([items[i] for i in k.tolist()], ctx.idx), lp

    def _log_prob_items(self, value: Any, ctx: Particles) -> torch.Tensor:
        lp = self._log_prob_number_items(value, ctx)
        if lp is not None:
            return lp
        vals = materialize(value, ctx)
        if is_batched(self.args[0]):  # a list per particle
            per = [[to_python(x) for x in its] for its in self._item_lists(ctx)]
            probs = [sum(1 for x in its if x == to_python(v)) / len(its) for its, v in zip(per, vals)]
            return torch.log(torch.tensor(probs, device=ctx.device, dtype=torch.get_default_dtype()))
        items = self._items()
        if any(is_batched(x) for x in items):  # one list of items per particle
            cols = [materialize(x, ctx) for x in items]
            per = [[to_python(c[i]) for c in cols] for i in range(ctx.M)]
        else:
            per = [[to_python(x) for x in items]] * ctx.M
        probs = [sum(1 for x in its if x == to_python(v)) / len(its) for its, v in zip(per, vals)]
        return torch.log(torch.tensor(probs, device=ctx.device, dtype=torch.get_default_dtype()))

    #: ``_log_prob_number_items`` compares every particle with at most this many items at once
    NUMBER_ITEMS_MAX = 4096

    def _log_prob_number_items(self, value: Any, ctx: Particles) -> torch.Tensor | None:
        """``_log_prob_items`` as tensor operations (the same numbers: the count of equal
        items / their number, in float64, then the default dtype) when the items are one list
        of Python numbers and the value one number per particle (``tau ~
        uniform_draw(range(1, n))``): no Python read of the value, so a program scoring it
        can be traced (``inference.potential``); None otherwise."""
        items = self.args[0]
        if type(value) is not Batched or value.t.dim() != 1 or value.t.dtype == torch.bool:
            return None
        if not isinstance(items, (range, list, tuple)) or not 0 < len(items) <= self.NUMBER_ITEMS_MAX:
            return None
        if not all(type(x) in (int, float) for x in items):
            return None
        v = rows(value, ctx)
        if all(type(x) is int for x in items) and not v.is_floating_point() and not v.is_complex():
            table = torch.tensor(list(items), device=ctx.device)  # int64, as Python compares them
        elif all(type(x) is float or abs(x) <= 2 ** 53 for x in items):  # Python's == of numbers is exact in float64 here
            table, v = torch.tensor(list(items), dtype=torch.float64, device=ctx.device), v.double()
        else:
            return None
        count = (v.unsqueeze(1) == table.unsqueeze(0)).sum(1)
        return torch.log((count.double() / len(items)).to(torch.get_default_dtype()))

    # -------------------------------------------------------------------- exact semantics
    def python_args(self) -> list:
        for a in self.args:
            if is_batched(a):
                raise PPLRuntimeError("exact enumeration received a batched argument (internal error)")
        # a default like flip's p=0.5 is a literal of the language: exact reads it as 1/2;
        # a range (uniform_draw(range(3))) is the list it stands for
        return [Fraction(repr(a)) if i in self.defaulted and isinstance(a, float) else
                list(a) if isinstance(a, range) else to_python(a)
                for i, a in enumerate(self.args)]

    def exact_support(self):
        return self.spec.exact_support(*self.python_args())

    def exact_prob(self, value: Any):
        return self.spec.exact_prob(to_python(value), *self.python_args())


def _dim(t) -> int:
    return t.dim() if isinstance(t, torch.Tensor) else 0


class ProposedDist(DistributionValue):
    """``propose(target, proposal)``: the choice's distribution is ``target``; importance
    sampling and SMC draw it from ``proposal`` instead and multiply the weight by
    target(x) / proposal(x), which keeps their weighting proper for the same measure.
    Every other semantics (exact enumeration, the log joint, MH) sees only ``target``."""

    __slots__ = ("target", "proposal")

    def __init__(self, target: DistValue, proposal: DistValue):
        self.target, self.proposal = target, proposal

    @property
    def spec(self):
        return self.target.spec

    @property
    def args(self):
        return self.target.args

    def describe(self) -> str:
        return f"{self.target.spec.name} distribution (proposing from {self.proposal.spec.name})"

    def sample(self, ctx):
        return self.target.sample(ctx)

    def log_prob(self, value, ctx):
        return self.target.log_prob(value, ctx)

    def torch_dist(self, ctx):
        return self.target.torch_dist(ctx)

    def placeholder(self, ctx):
        return self.target.placeholder(ctx)

    def exact_support(self):
        return self.target.exact_support()

    def exact_prob(self, value):
        return self.target.exact_prob(value)

    def propose(self, ctx, draw):
        """(value drawn from the proposal by ``draw(dist, ctx)``, log weight correction)."""
        value = draw(self.proposal, ctx)
        log_target = torch.as_tensor(self.target.log_prob(value, ctx)).to(torch.float64)
        return value, log_target - torch.as_tensor(self.proposal.log_prob(value, ctx)).to(torch.float64)
