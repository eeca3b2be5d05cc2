"""Torch distribution classes that torch / pyro do not ship in the form the DSL needs.

Each is a ``pyro.distributions.TorchDistribution`` (so ``.to_event`` / ``.mask`` /
``.expand`` work), with a ``support`` that ``torch.distributions.biject_to`` maps onto
(MH's random walk and the automatic guides unconstrain through it):

* :class:`HalfStudentT` — ``|StudentT(df, 0, scale)|``, support ``[0, inf)``.
* :class:`TruncatedNormal` — ``Normal(loc, scale)`` restricted to ``[low, high]``:
  ``log_prob`` is normalised by the mass ``Phi(beta) - Phi(alpha)`` (computed in log
  space, in float64, mirrored so that it never subtracts two numbers close to 1),
  sampling is by the inverse CDF (on the mirrored side, where the CDF values are small
  and keep their relative precision) and, far in a tail where that CDF underflows, by
  Robert's (1995) exponential rejection sampler, which is exact.  Bounds may be
  ``-inf`` / ``inf``.
* :class:`Multinomial` — counts of ``total_count`` draws over ``K`` categories, with a
  *tensor* ``total_count`` (torch's takes one Python int for the whole batch), sampled
  by sequential binomials; its support is exactly the count vectors summing to
  ``total_count`` (torch's constraint accepts any smaller sum).
* :class:`VonMises` — torch's, with support ``[-pi, pi]`` (torch says "real", which lets
  an MH walk wander over infinitely many periods of a periodic density).
* :class:`LKJCholesky` — torch's, with its onion-method sampler fixed: torch (2.13) draws
  row ``i``'s squared norm from ``Beta(i - 1/2, ...)`` instead of ``Beta(i / 2, ...)``, so
  for ``dim >= 3`` its samples do not follow its own ``log_prob`` (the correlations
  ``R[0][2]``, ``R[1][2]`` of a 3x3 factor have variance 0.188 instead of 1 / (2 eta + 2));
  tests/test_distributions_scipy.py checks the marginals against scipy's Beta.
"""
from __future__ import annotations

import math

import pyro.distributions as pdist
import torch
from torch.distributions import constraints as tc
from torch.distributions.utils import broadcast_all

from ppl.semantics.errors import PPLRuntimeError

from . import rng

__all__ = ["HalfStudentT", "TruncatedNormal", "Multinomial", "VonMises", "LKJCholesky"]


# ------------------------------------------------------------------------ torch's checks


def without_torch_checks(make, *args, **kwargs):
    """``make(*args, **kwargs)`` with torch's default argument validation off, for a
    constructor that builds inner distributions with torch's default checks whatever its
    ``validate_args`` says (StudentT's Chi2, LogNormal's Normal, BetaBinomial's Beta,
    LKJCholesky's Beta): each check reads the parameters into Python, which made every
    program using one untraceable (NUTS then ran it in the interpreter,
    tests/test_potential.py) and costs a check per construction. The DSL checks the
    parameters itself (``DistSpec.make``); the law is torch's."""
    default = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution._validate_args = False
    try:
        return make(*args, **kwargs)
    finally:
        torch.distributions.Distribution._validate_args = default


# ------------------------------------------------------------------------ half Student t


class HalfStudentT(pdist.TorchDistribution):
    """``|X|`` for ``X ~ StudentT(df, 0, scale)``: density ``2 t(x)`` on ``x >= 0``."""

    arg_constraints = {"df": tc.positive, "scale": tc.positive}
    support = tc.nonnegative
    has_rsample = True
    draws_with_run_generator = True  # (ppl.stdlib.rng)

    def __init__(self, df, scale, validate_args=None):
        self.df, self.scale = broadcast_all(df, scale)
        super().__init__(self.df.shape, validate_args=validate_args)

    def _base(self):
        return without_torch_checks(torch.distributions.StudentT, self.df, torch.zeros_like(self.scale), self.scale,
                                    validate_args=False)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(HalfStudentT, _instance)
        batch_shape = torch.Size(batch_shape)
        new.df, new.scale = self.df.expand(batch_shape), self.scale.expand(batch_shape)
        super(HalfStudentT, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape=torch.Size()):
        return rng.rsample(self._base(), sample_shape).abs()

    def log_prob(self, value):
        lp = self._base().log_prob(value) + math.log(2.0)
        return torch.where(value >= 0, lp, torch.full_like(lp, -math.inf))

    @property
    def mean(self):
        """2 scale sqrt(df / pi) Gamma((df + 1) / 2) / ((df - 1) Gamma(df / 2)) for df > 1, else inf."""
        df = self.df
        log_m = (math.log(2.0) + torch.log(self.scale) + 0.5 * (torch.log(df) - math.log(math.pi))
                 + torch.lgamma((df + 1) / 2) - torch.lgamma(df / 2) - torch.log((df - 1).clamp(min=1e-30)))
        return torch.where(df > 1, torch.exp(log_m), torch.full_like(df, math.inf))

    @property
    def variance(self):
        """scale^2 df / (df - 2) - mean^2 for df > 2, else inf."""
        df = self.df
        second = self.scale ** 2 * df / (df - 2).clamp(min=1e-30)
        return torch.where(df > 2, second - self.mean ** 2, torch.full_like(df, math.inf))


# ---------------------------------------------------------------------- truncated normal


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate everywhere."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


_TAIL = 30.0  # beyond this many scales into a tail, sample by exponential rejection (the CDF underflows)


def _infinite(bound) -> tuple[bool, bool]:
    """(every entry of ``bound`` infinite, some entry infinite)."""
    inf = torch.isinf(torch.as_tensor(bound))
    return bool(inf.all()), bool(inf.any())


class TruncatedNormal(pdist.TorchDistribution):
    """``Normal(loc, scale)`` conditioned on ``low <= x <= high`` (bounds may be infinite)."""

    draws_with_run_generator = True  # (ppl.stdlib.rng)

    arg_constraints = {"loc": tc.real, "scale": tc.positive}
    has_rsample = False

    def __init__(self, loc, scale, low, high, validate_args=None):
        # which bounds are infinite, read from the bounds as given: after broadcasting they
        # carry loc's dependence on the chains' values (a traced program's loc is random,
        # its bounds are usually constants), and the support is a Python decision
        self._infinite = (_infinite(low), _infinite(high))
        self.loc, self.scale, self.low, self.high = broadcast_all(loc, scale, low, high)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(TruncatedNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        for k in ("loc", "scale", "low", "high"):
            setattr(new, k, getattr(self, k).expand(batch_shape))
        new._infinite = self._infinite
        super(TruncatedNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def support(self):
        """``interval(low, high)``, or the half-line / real line when bounds are infinite.
        Bounds finite for some batch entries and infinite for others have no single torch
        constraint: a ``PPLRuntimeError``."""
        (low_all, low_any), (high_all, high_any) = self._infinite
        if low_all and high_all:
            return tc.real
        if high_all and not low_any:
            return tc.greater_than_eq(self.low)
        if low_all and not high_any:
            return tc.less_than(self.high)
        if not low_any and not high_any:
            return tc.interval(self.low, self.high)
        raise PPLRuntimeError(
            "truncated_normal: a bound ('low' or 'high') is infinite for some particles and finite for others",
            hint="keep each bound either finite for every particle or infinite for every particle "
                 "(e.g. a large finite number instead of inf)")

    # standardised bounds, mirrored so that the interval does not lie right of 0
    def _std(self):
        """(a, b, flip) in float64: a <= b <= ... the standardised interval, mirrored
        (flip = True) where it starts right of 0, so that Phi(a), Phi(b) stay accurate."""
        loc, scale = self.loc.double(), self.scale.double()
        alpha, beta = (self.low.double() - loc) / scale, (self.high.double() - loc) / scale
        flip = alpha > 0
        a = torch.where(flip, -beta, alpha)
        b = torch.where(flip, -alpha, beta)
        return a, b, flip

    def _log_mass(self, a, b):
        """log(Phi(b) - Phi(a)), float64."""
        lb, la = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
        return lb + _log1mexp(la - lb)

    def log_prob(self, value):
        a, b, _ = self._std()
        z = (value.double() - self.loc.double()) / self.scale.double()
        lp = -0.5 * z ** 2 - 0.5 * math.log(2 * math.pi) - torch.log(self.scale.double()) - self._log_mass(a, b)
        inside = (value >= self.low) & (value <= self.high)
        lp = torch.where(inside, lp, torch.full_like(lp, -math.inf))
        return lp.to(self.loc.dtype)

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            a, b, flip = (t.expand(shape) for t in self._std())
            z = self._sample_standard(a, b)
            z = torch.where(flip, -z, z)
            x = self.loc.double() + self.scale.double() * z
            x = torch.maximum(torch.minimum(x, self.high.double()), self.low.double())  # rounding only
            return x.to(self.loc.dtype)

    @staticmethod
    def _sample_standard(a, b):
        """Standard normal draws restricted to [a, b], with a <= 0 or [a, b] far right
        (a > _TAIL only after the mirroring when the interval lies far left)."""
        pa, pb = torch.special.ndtr(a), torch.special.ndtr(b)
        u = rng.rand(a.shape, dtype=torch.float64, device=a.device)
        z = torch.special.ndtri(pa + u * (pb - pa))
        far = b < -_TAIL  # far in the left tail: Phi underflows; sample -z from the right tail
        if bool(far.any()):
            z = torch.where(far, -TruncatedNormal._right_tail(-b, -a), z)
        return z

    @staticmethod
    def _right_tail(a, b):
        """Exact draws of N(0, 1) restricted to [a, b] for a > 0 large (Robert 1995): a
        shifted exponential of rate a, truncated at b, accepted with prob exp(-(x - a)^2 / 2)."""
        out = torch.empty_like(a)
        todo = torch.ones_like(a, dtype=torch.bool)
        width = b - a
        while bool(todo.any()):
            u = rng.rand(a.shape, dtype=torch.float64, device=a.device)
            # inverse CDF of Exp(a) truncated to [0, width]
            e = -torch.log1p(u * torch.expm1(-a * width)) / a
            x = a + e
            accept = rng.rand(a.shape, dtype=torch.float64, device=a.device) < torch.exp(-0.5 * e ** 2)
            take = todo & accept
            out = torch.where(take, x, out)
            todo = todo & ~accept
        return out

    @property
    def mean(self):
        a, b, flip = self._std()
        lz = self._log_mass(a, b)
        d = _phi_ratio(a, lz) - _phi_ratio(b, lz)  # (phi(a) - phi(b)) / Z
        d = torch.where(flip, -d, d)
        return (self.loc.double() + self.scale.double() * d).to(self.loc.dtype)

    @property
    def variance(self):
        a, b, _ = self._std()
        lz = self._log_mass(a, b)
        d = _phi_ratio(a, lz) - _phi_ratio(b, lz)
        e = _xphi_ratio(a, lz) - _xphi_ratio(b, lz)
        return (self.scale.double() ** 2 * (1 + e - d ** 2)).to(self.loc.dtype)


def _phi_ratio(x, log_z):
    """phi(x) / Z (0 at infinite x)."""
    r = torch.exp(-0.5 * x ** 2 - 0.5 * math.log(2 * math.pi) - log_z)
    return torch.where(torch.isinf(x), torch.zeros_like(r), r)


def _xphi_ratio(x, log_z):
    """x phi(x) / Z (0 at infinite x)."""
    xs = torch.where(torch.isinf(x), torch.zeros_like(x), x)
    return xs * _phi_ratio(x, log_z)


# --------------------------------------------------------------------------- multinomial


class _MultinomialSupport(tc.Constraint):
    """Integer count vectors >= 0 that sum to ``total_count`` exactly."""

    is_discrete = True
    event_dim = 1

    def __init__(self, total_count):
        self.lower_bound = torch.zeros_like(total_count)
        self.upper_bound = total_count
        super().__init__()

    def check(self, value):
        ok = (value >= 0) & (value == torch.floor(value))
        return ok.all(-1) & (value.sum(-1) == self.upper_bound)


class Multinomial(pdist.TorchDistribution):
    """Counts of ``total_count`` independent draws over ``K`` categories with
    probabilities ``probs`` (normalised); ``total_count`` may differ across the batch."""

    draws_with_run_generator = True  # (ppl.stdlib.rng)

    arg_constraints = {"total_count": tc.nonnegative_integer, "probs": tc.simplex}

    def __init__(self, total_count, probs, validate_args=None):
        probs = probs / probs.sum(-1, keepdim=True)
        batch_shape = torch.broadcast_shapes(total_count.shape, probs.shape[:-1])
        self.total_count = total_count.expand(batch_shape)
        self.probs = probs.expand(batch_shape + probs.shape[-1:])
        super().__init__(batch_shape, probs.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(Multinomial, _instance)
        batch_shape = torch.Size(batch_shape)
        new.total_count = self.total_count.expand(batch_shape)
        new.probs = self.probs.expand(batch_shape + self.event_shape)
        super(Multinomial, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def support(self):
        return _MultinomialSupport(self.total_count)

    @property
    def mean(self):
        return self.total_count.unsqueeze(-1) * self.probs

    @property
    def variance(self):
        return self.total_count.unsqueeze(-1) * self.probs * (1 - self.probs)

    def sample(self, sample_shape=torch.Size()):
        """Sequential binomials: x_k ~ Binomial(n - x_1 - ... - x_{k-1}, p_k / (p_k + ... + p_K))."""
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            probs = self.probs.expand(shape)
            remaining = self.total_count.expand(shape[:-1]).clone()
            rest = probs.flip(-1).cumsum(-1).flip(-1)  # p_k + ... + p_K
            out = torch.zeros(shape, dtype=probs.dtype, device=probs.device)
            K = shape[-1]
            for k in range(K - 1):
                q = (probs[..., k] / rest[..., k].clamp(min=1e-300)).clamp(0, 1)
                q = torch.where(rest[..., k] > 0, q, torch.zeros_like(q))
                x = rng.sample(torch.distributions.Binomial(remaining, probs=q, validate_args=False))
                out[..., k] = x
                remaining = remaining - x
            out[..., K - 1] = remaining
            return out

    def log_prob(self, value):
        logp = torch.xlogy(value, self.probs).sum(-1)
        return torch.lgamma(value.sum(-1) + 1) - torch.lgamma(value + 1).sum(-1) + logp


# ------------------------------------------------------------------------------ von Mises


class VonMises(pdist.VonMises):
    """torch's von Mises (samples in [-pi, pi)), with that interval as its support."""

    support = tc.interval(-math.pi, math.pi)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(VonMises, _instance)
        return super().expand(batch_shape, _instance=new)


# ---------------------------------------------------------------------------- LKJ Cholesky


class LKJCholesky(pdist.LKJCholesky):
    """torch's LKJ distribution over Cholesky factors of correlation matrices, sampling
    by the onion method (Lewandowski, Kurowicka and Joe 2009, sec. 3.2) with the right
    Beta parameters: row ``i`` (0-based, i >= 1) has squared off-diagonal norm
    ``y ~ Beta(i / 2, eta + (dim - 2) / 2 - (i - 1) / 2)``. ``log_prob`` is torch's."""

    def __init__(self, dim, concentration=1.0, validate_args=None):
        super().__init__(dim, concentration, validate_args=validate_args)
        offset = torch.arange(self.dim - 1, dtype=self.concentration.dtype, device=self.concentration.device)
        offset = torch.cat([offset.new_zeros((1,)), offset])  # row i: i - 1 (row 0 is unused)
        marginal_conc = self.concentration + 0.5 * (self.dim - 2)
        self._beta = torch.distributions.Beta(0.5 * offset + 0.5, marginal_conc.unsqueeze(-1) - 0.5 * offset,
                                              validate_args=False)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(LKJCholesky, _instance)
        return super().expand(batch_shape, _instance=new)
