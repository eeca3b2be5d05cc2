"""The validity checker: exact checks that inference transformations are correct.

An inference algorithm in ppl takes its randomness from an object with ``sample(dist,
ctx)`` and ``resample(log_weights, scheme, n)`` (``ppl.inference.randomness``). Here that
object is replaced by ``EnumeratingRandomness``, which makes every draw a branch point:
each possible outcome is followed in turn, with its exact probability. Running the
algorithm once per branch therefore lists *every* outcome of the algorithm with its
probability, and expectations over the algorithm's own randomness become finite sums.

With that, on small finite programs (2-3 particles):

* ``check_proper``: a weighted sampler is proper for the program's unnormalised measure
  gamma (total mass Z): for every f, E[Z_hat * sum_i w_i f(x_i)] = Z * E_post[f] =
  integral f dgamma. Checked for every f at once (all indicator functions of the return
  value), to float64 precision (it is a finite sum, not a Monte Carlo estimate).
* ``resampling_distribution``: the exact law of a resampling scheme's ancestor vector,
  used to check unbiasedness (E[count_i] = n w_i); ``without_replacement_distribution``
  the same for ``smc_steer``'s selection without replacement (E[new_i 1{kept}] = w_i).
* ``mh_kernel_check``: the exact transition matrix K of an MH kernel over the program's
  finite trace space: pi K = pi and detailed balance.
* ``check_transformation``: an IR -> IR rewrite (``ppl.compiler.transforms``) preserves
  the program's measure on return values, compared in exact rational arithmetic.

Users who write their own transformation pass it as ``algorithm(randomness) -> (values,
log_weights)`` and call ``check_proper``; a broken one (weights not reset after
resampling, a missing correction) fails with the size of the discrepancy.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from fractions import Fraction
from typing import Any, Callable

import scipy.stats
import torch

from ..inference import mh as mh_mod, pmmh as pmmh_mod
from ..inference.population import Population
from ..inference.resample_move import resample_move
from ..inference.smc import smc
from ..inference.steer import smc_steer
from ..inference.tempering import tempered_smc
from ..semantics import gfi
from ..semantics.choice_map import ChoiceMap
from ..semantics.errors import InfiniteSupportError, ZeroEvidenceError
from ..semantics.resampling import RESAMPLING, is_weighted
from ..stdlib import rng
from ..semantics.values import Batched, Particles, PerParticle, materialize, pack, rows, to_python


class EnumeratingRandomness:
    """A randomness source that follows one branch of every draw: the branch is chosen by
    a prefix of outcome indices (0 beyond the prefix), and the branching factors met are
    recorded so that a driver can enumerate all branches (``enumerate_outcomes``)."""

    def __init__(self, prefix: list[int]):
        self.prefix = prefix
        self.taken: list[int] = []
        self.sizes: list[int] = []
        self.prob = 1.0

    def _choose(self, outcomes: list):
        outcomes = [(v, p) for v, p in outcomes if p > 0]
        k = len(self.taken)
        i = self.prefix[k] if k < len(self.prefix) else 0
        self.taken.append(i)
        self.sizes.append(len(outcomes))
        value, p = outcomes[i]
        self.prob *= float(p)
        return value

    # -- the randomness interface ---------------------------------------------------
    def sample(self, dist, ctx: Particles):
        """All joint outcomes of one draw per particle (finite supports only)."""
        per_particle = []
        for i in range(ctx.M):
            args = [_row(a, ctx, i) for a in dist.args]
            per_particle.append(dist.spec.exact_support(*args))
        joint = []
        for combo in itertools.product(*per_particle):
            prob = 1.0
            for _, p in combo:
                prob *= float(p)
            joint.append(([v for v, _ in combo], prob))
        values = list(self._choose(joint))
        if getattr(dist.spec, "index_valued", False):  # uniform_draw: the items themselves
            if all(isinstance(v, (bool, int, float)) for v in values):
                return Batched(torch.tensor(values, device=ctx.device), ctx.idx)
            return PerParticle(values, ctx.idx)
        dtype = {"bool": torch.bool, "long": torch.long}.get(dist.spec.value_dtype, torch.get_default_dtype())
        return Batched(torch.tensor(values, dtype=dtype, device=ctx.device), ctx.idx)

    def resample(self, log_weights: torch.Tensor, scheme: str, n: int):
        """Every outcome of a registered scheme's exact law (ancestors; for a weighted
        scheme, ancestors and new log weights)."""
        w = torch.softmax(log_weights.double(), 0).tolist()
        outcome = self._choose(list(resampling_distribution(w, scheme, n).items()))
        dev = log_weights.device
        if is_weighted(scheme):
            return (torch.tensor(outcome[0], dtype=torch.long, device=dev),
                    torch.tensor(outcome[1], dtype=torch.float64, device=dev))
        return torch.tensor(outcome, dtype=torch.long, device=dev)

    def select_without_replacement(self, log_weights: torch.Tensor, n: int):
        """Every outcome of ``smc_steer``'s selection (``without_replacement_distribution``)."""
        w = torch.softmax(log_weights.double(), 0).tolist()
        (idx, lw) = self._choose(list(without_replacement_distribution(w, n).items()))
        dev = log_weights.device
        return torch.tensor(idx, dtype=torch.long, device=dev), torch.tensor(lw, dtype=torch.float64, device=dev)

    def choose(self, sizes: torch.Tensor) -> torch.Tensor:
        """Joint outcomes over chains of a uniform index in [0, size_c)."""
        ranges = [range(int(n)) for n in sizes.tolist()]
        p = 1.0
        for n in sizes.tolist():
            p /= int(n)
        pick = self._choose([(combo, p) for combo in itertools.product(*ranges)])
        return torch.tensor(list(pick), dtype=torch.long, device=sizes.device)

    def accept(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """Joint outcomes over chains of accept/reject with probability min(1, alpha)."""
        probs = [1.0 if a >= 0 else math.exp(a) for a in log_alpha.tolist()]
        outcomes = []
        for combo in itertools.product((True, False), repeat=len(probs)):
            q = 1.0
            for acc, p in zip(combo, probs):
                q *= p if acc else 1.0 - p
            outcomes.append((combo, q))
        return torch.tensor(list(self._choose(outcomes)), dtype=torch.bool, device=log_alpha.device)

    def normal(self, shape, device):
        raise ValueError("a random-walk proposal has no finite enumeration: check kernel='prior'")


@contextlib.contextmanager
def _float64():
    """Run the block with float64 as torch's default dtype (the checks are finite sums,
    exact to ~1e-15 in float64), restoring the previous default on exit."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _row(a: Any, ctx: Particles, i: int):
    if isinstance(a, (Batched, PerParticle)):
        return to_python(materialize(a, ctx)[i])
    if isinstance(a, (list, tuple)) and any(isinstance(x, (Batched, PerParticle)) for x in a):
        return [_row(x, ctx, i) for x in a]
    return to_python(a)


def enumerate_outcomes(run: Callable[[EnumeratingRandomness], Any], max_outcomes: int = 200_000,
                       randomness_cls=None):
    """Run ``run(randomness)`` once per outcome of all its draws: [(probability, output)]."""
    randomness_cls = randomness_cls or EnumeratingRandomness
    out = []
    stack: list[list[int]] = [[]]
    while stack:
        prefix = stack.pop()
        rnd = randomness_cls(prefix)
        result = run(rnd)
        out.append((rnd.prob, result))
        if len(out) > max_outcomes:
            raise RuntimeError(f"more than {max_outcomes} outcomes: use a smaller program or fewer particles")
        for j in range(len(prefix), len(rnd.taken)):
            for alt in range(rnd.sizes[j] - 1, 0, -1):
                stack.append(rnd.taken[:j] + [alt])
    return out


# -------------------------------------------------------------------- resampling laws
def resampling_distribution(w: list[float], scheme: str, n: int) -> dict[tuple, float]:
    """The exact law of a registered scheme's output (``semantics.resampling.Scheme.law``):
    the (sorted, where the scheme sorts) ancestor vector, or (ancestors, log weights)."""
    if scheme not in RESAMPLING:
        raise ValueError(f"unknown resampling scheme '{scheme}' (registered: {', '.join(RESAMPLING)})")
    return RESAMPLING[scheme].law(w, n)


@dataclass
class DrawCheck:
    """A registered scheme's torch draws against its registered law (``check_resampling_draws``)."""
    law: dict          # ancestors -> probability (a weighted scheme's outcomes keyed by their ancestors)
    seen: dict         # ancestors -> times drawn
    unexpected: list   # ancestor vectors drawn that the law gives probability 0
    weight_error: float  # weighted schemes: max |log weight drawn - the law's| for the same ancestors
    p_value: float     # chi-square goodness of fit (outcomes expected fewer than 5 times pooled)

    def ok(self, alpha: float = 1e-4) -> bool:
        return not self.unexpected and self.weight_error <= 1e-9 and self.p_value >= alpha


def check_resampling_draws(scheme: str, weights: list[float], n: int, draws: int = 2000,
                           seed: int = 0) -> DrawCheck:
    """Does the scheme's ``draw`` follow its registered ``law``? ``draws`` draws from
    normalised ``weights`` (seeded): no outcome outside the law, a weighted scheme's log
    weights equal to the law's, and the frequencies by a chi-square test. (``check_proper``
    checks the law; this ties the draw to it.)"""
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    weighted = is_weighted(scheme)
    law_weights = {}
    law: dict = defaultdict(float)
    for outcome, p in resampling_distribution(w.tolist(), scheme, n).items():
        anc = outcome[0] if weighted else outcome
        law[anc] += p
        law_weights[anc] = outcome[1] if weighted else None
    seen: dict = defaultdict(int)
    unexpected, weight_error = [], 0.0
    with rng.run(seed):
        for _ in range(draws):
            out = RESAMPLING[scheme].draw(w, n)
            anc, lw = (out[0], out[1]) if weighted else (out, None)
            key = tuple(anc.tolist())
            seen[key] += 1
            if key not in law:
                unexpected.append(key)
            elif weighted:
                weight_error = max([weight_error] + [abs(a - b) for a, b in zip(lw.tolist(), law_weights[key])])
    return DrawCheck(dict(law), dict(seen), unexpected, weight_error, _chi_square(law, seen, draws))


def _chi_square(law: dict, seen: dict, draws: int) -> float:
    observed, expected, pooled_o, pooled_e = [], [], 0, 0.0
    for key, p in law.items():
        if p * draws < 5:
            pooled_o, pooled_e = pooled_o + seen.get(key, 0), pooled_e + p * draws
        else:
            observed.append(seen.get(key, 0))
            expected.append(p * draws)
    if pooled_e > 0:
        observed.append(pooled_o)
        expected.append(pooled_e)
    if len(observed) < 2:
        return 1.0
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return float(scipy.stats.chi2.sf(stat, len(observed) - 1))


def without_replacement_distribution(w: list[float], n: int) -> dict[tuple, float]:
    """The exact law of ``resampling.without_replacement(w, n)`` (Fearnhead & Clifford's
    selection of n of the len(w) particles), computed here independently in plain Python:
    (indices, log weights) -> probability. With p = w / sum(w) and c solving
    sum_i min(1, p_i / c) = n, the particles with p_i >= c are kept with log weight
    log(n p_i); the others with probability p_i / c, by one systematic sweep (a uniform U
    and points U, U + 1, ... over their cumulative sum, in index order), with log weight
    log(n c). The outcome is piecewise constant in U (``without_replacement_pieces``)."""
    out: dict = defaultdict(float)
    for lo, hi, outcome in without_replacement_pieces(w, n):
        out[outcome] += hi - lo
    return dict(out)


def without_replacement_pieces(w: list[float], n: int) -> list[tuple[float, float, tuple]]:
    """[(lo, hi, (indices, log weights))]: the selection's outcome for U in [lo, hi)."""
    total = math.fsum(w)
    p = [x / total for x in w]
    M = len(p)
    positive = [i for i in range(M) if p[i] > 0]
    if len(positive) <= n:
        idx = sorted(positive + [i for i in range(M) if p[i] <= 0][: n - len(positive)])
        return [(0.0, 1.0, (tuple(idx), tuple(math.log(n * p[i]) if p[i] > 0 else -math.inf for i in idx)))]
    order = sorted(range(M), key=lambda i: -p[i])  # stable: ties by index
    for a in range(n):
        c = math.fsum(p[i] for i in order[a:]) / (n - a)
        if p[order[a]] < c:
            break
    keep, rest, R = set(order[:a]), sorted(order[a:]), n - a
    cum, acc = [], []
    for i in rest:
        acc.append(p[i] / c)
        cum.append(math.fsum(acc))
    cum = [min(float(R), x * R / cum[-1]) for x in cum]
    cum[-1] = float(R)
    cuts = sorted({0.0, 1.0} | {x - math.floor(x) for x in cum})
    out = []
    for lo, hi in zip(cuts, cuts[1:]):
        if hi <= lo:
            continue
        u = (lo + hi) / 2
        prev, chosen = 0.0, []
        for i, x in zip(rest, cum):
            if math.ceil(x - u) - math.ceil(prev - u) > 0:  # a point U + k in [prev, x)
                chosen.append(i)
            prev = x
        idx = sorted(keep | set(chosen))
        out.append((lo, hi, (tuple(idx), tuple(math.log(n * (p[i] if i in keep else c)) for i in idx))))
    return out


# ------------------------------------------------------------------------- properness
@dataclass
class ProperCheck:
    """The two sides of E[Z_hat * sum_i w_i 1{x_i = v}] = gamma({v}), for every v."""
    expected: dict  # value -> exact unnormalised posterior mass
    observed: dict  # value -> the algorithm's expectation
    outcomes: int

    @property
    def max_error(self) -> float:
        keys = set(self.expected) | set(self.observed)
        return max(abs(float(self.expected.get(k, 0)) - self.observed.get(k, 0.0)) for k in keys)

    def ok(self, tol: float = 1e-9) -> bool:
        scale = max(1.0, max(abs(float(v)) for v in self.expected.values()))
        return self.max_error <= tol * scale

    def __str__(self) -> str:
        rows = [f"  {k!r:>12}: exact {float(self.expected.get(k, 0)):.12g}   algorithm {self.observed.get(k, 0.0):.12g}"
                for k in sorted(set(self.expected) | set(self.observed), key=repr)]
        return f"properness over {self.outcomes} outcomes (max error {self.max_error:.3g}):\n" + "\n".join(rows)


def exact_measure(model, data: dict | None = None) -> dict:
    """The program's unnormalised measure on return values: value -> mass."""
    res = model.run("enumerate", data or {})
    out: dict = defaultdict(Fraction)
    for w, vals in res.paths:
        out[vals["return"]] += w
    return dict(out)


@dataclass
class TransformCheck:
    """The measures on return values of a program before and after a transformation,
    from exact enumeration."""
    before: dict
    after: dict

    @property
    def exact(self) -> bool:
        """Whether both measures are rational (then ``ok`` compares them exactly)."""
        return all(isinstance(v, (int, Fraction)) for v in (*self.before.values(), *self.after.values()))

    @property
    def max_error(self) -> float:
        keys = set(self.before) | set(self.after)
        return max(abs(float(self.before.get(k, 0) - self.after.get(k, 0))) for k in keys)

    def ok(self, tol: float = 1e-12) -> bool:
        """Equal measures: exactly when both are rational, else within ``tol`` relative
        to the largest mass (float weights come from ``factor``'s exp)."""
        if self.exact:
            keys = set(self.before) | set(self.after)
            return all(self.before.get(k, 0) == self.after.get(k, 0) for k in keys)
        scale = max(1.0, max(abs(float(v)) for v in (*self.before.values(), *self.after.values())))
        return self.max_error <= tol * scale

    def __str__(self) -> str:
        rows = [f"  {k!r:>12}: before {self.before.get(k, 0)!s:>24}   after {self.after.get(k, 0)!s:>24}"
                for k in sorted(set(self.before) | set(self.after), key=repr)]
        kind = "exact" if self.exact else "float"
        return f"measure on return values ({kind}; max difference {self.max_error:.3g}):\n" + "\n".join(rows)


def check_transformation(transform: Callable, model, data: dict | None = None, *, choice_map=None,
                         traces: int = 20, seed: int = 0):
    """Exact check that ``transform`` (IR program -> IR program) preserves the measure:
    enumerate ``model`` and ``model.transformed(transform)`` and compare their measures on
    return values (``TransformCheck.ok``: exactly, in rationals, when both are
    rational). A transformation that changes the evidence or any posterior probability of
    the return value fails, by the size of the change.

    A continuous program (``InfiniteSupportError`` when enumerated) is checked by its joint
    density instead (``ppl.testing.density_check``; a ``DensityCheck`` with the same
    ``ok``/``max_error``/``str``): through ``choice_map`` (a ``ChoiceMap``), else the
    transform's own ``choice_map`` attribute (a ``ChoiceMap``, or a function of the
    program giving one), else the identity; symbolically where both programs are static,
    else at ``traces`` prior traces of the new program (``seed``)."""
    new = model.transformed(transform)
    try:
        before = exact_measure(model, data)
    except InfiniteSupportError:
        from .density_check import check_density_transformation
        return check_density_transformation(model, new, data, _declared_map(transform, model, choice_map),
                                            traces=traces, seed=seed)
    return TransformCheck(before, exact_measure(new, data))


def _declared_map(transform, model, choice_map) -> ChoiceMap:
    declared = choice_map if choice_map is not None else getattr(transform, "choice_map", None)
    if declared is None:
        return ChoiceMap.identity()
    return declared if isinstance(declared, ChoiceMap) else declared(model.program)


def check_proper(model, algorithm: Callable, data: dict | None = None) -> ProperCheck:
    """Check a weighted sampler exactly. ``algorithm(model, data, randomness)`` returns a
    ``Population`` (``checkable`` makes one from a library algorithm), or the pair (return
    values per particle: list, log_weights: tensor [N]); either way the log weights
    already include the evidence estimate (log_mean_exp(log_weights) = log Z_hat)."""
    expected = exact_measure(model, data)
    observed: dict = defaultdict(float)

    def run(rnd):
        return algorithm(model, data or {}, rnd)

    with _float64():  # a finite sum: make it exact to ~1e-15
        outcomes = enumerate_outcomes(run, randomness_cls=getattr(algorithm, "randomness_cls", None))
    for prob, out in outcomes:
        values, lw = (_return_keys(out), out.log_weights) if isinstance(out, Population) else out
        lw = lw.double()
        n = lw.shape[0]
        z_w = torch.exp(lw) / n  # Z_hat * w_i = exp(lw_i) / N
        for v, zw in zip(values, z_w.tolist()):
            observed[v] += prob * zw
    return ProperCheck(expected, dict(observed), len(outcomes))


# ------------------------------------------------------------ the library's algorithms
def checkable(run: Callable, size: int, randomness_cls=None):
    """An algorithm as ``check_proper`` wants it, from ``run(interp, entry, data,
    randomness)`` -> a ``Population`` of ``size`` particles. An outcome in which every
    particle died at a checkpoint (``ZeroEvidenceError``) has Z_hat = 0 and adds nothing to
    E[Z_hat * sum_i w_i f(x_i)]."""
    def algorithm(model, data, rnd):
        interp, prepared = _compiled(model, data)
        try:
            return run(interp, model.entry, prepared, rnd)
        except ZeroEvidenceError:
            return [None] * size, torch.full((size,), -math.inf, dtype=torch.float64)

    algorithm.randomness_cls = randomness_cls
    return algorithm


def importance_algorithm(particles: int):
    """Likelihood weighting, as ``check_proper`` wants it."""
    return smc_algorithm(particles, ess_threshold=0.0)


def smc_algorithm(particles: int, resampling: str = "systematic", ess_threshold: float = 1.0, handler=None):
    """SMC with the given scheme (any registered one), as ``check_proper`` wants it
    (``handler`` substitutes a handler class, to check a modified algorithm)."""
    def run(interp, entry, data, rnd):
        return smc(interp, entry, data, particles, "cpu", resampling=resampling, ess_threshold=ess_threshold,
                   randomness=rnd, handler_cls=handler)
    return checkable(run, particles)


def enumerating_algorithm(particles: int, names=None, resampling: str = "systematic", ess_threshold: float = 1.0,
                          run_cls=None):
    """SMC (importance sampling with ``ess_threshold=0``) with the choices marked ``@enumerate``
    and those ``names`` selects summed out (``semantics.enumerate_sites``), as ``check_proper``
    wants it: the invariant is that the weighting is proper for the marginalised program, and,
    with the choices drawn back from their conditionals at the end, for the original one.
    ``run_cls`` substitutes the run class (to check a broken variant)."""
    from ppl.semantics.enumerate_sites import Enumerating, site_selector

    def run(interp, entry, data, rnd):
        return smc(Enumerating(interp, site_selector(names), run_cls=run_cls), entry, data, particles, "cpu",
                   resampling=resampling, ess_threshold=ess_threshold, randomness=rnd)
    return checkable(run, particles)


def steer_algorithm(particles: int, expansion: int, ess_threshold: float = 1.0, handler=None, wrap=None):
    """``smc_steer`` with ``particles`` parents extended ``expansion`` ways, as
    ``check_proper`` wants it: its particles*expansion slots (prior draws per slot and
    the selection without replacement enumerated). ``handler`` substitutes a subclass of
    ``SteerHandler`` and ``wrap(randomness)`` another randomness source, to check a
    modified algorithm."""
    def run(interp, entry, data, rnd):
        return smc_steer(interp, entry, data, particles, expansion, "cpu", ess_threshold=ess_threshold,
                         randomness=wrap(rnd) if wrap else rnd, handler_cls=handler)
    return checkable(run, particles * expansion)


_COMPILED: dict = {}


def _compiled(model, data):
    """The interpreter and prepared data of (model, data), built once per check."""
    key = (id(model), repr(sorted(data.items())))
    hit = _COMPILED.get(key)
    if hit is None or hit[0] is not model:
        _COMPILED.clear()
        hit = (model, model.interpreter(), model.prepare_data(model.bind((), data), "cpu"))
        _COMPILED[key] = hit
    return hit[1], hit[2]


def _return_keys(population: Population) -> list:
    """The population's return values, one hashable key per particle."""
    values, _ = population.sites["return"]
    values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    return [_key(v) for v in values]


def _key(v):
    if isinstance(v, list):
        return tuple(_key(x) for x in v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


# ------------------------------------------------------------------ MH: exact kernels
#: the MCMC draws are part of the one randomness interface (kept for older imports)
EnumeratingMHRandomness = EnumeratingRandomness


def _trace_key(state) -> tuple:
    return tuple(sorted((a, _key(state.values[a][0].tolist())) for a in state.values if bool(state.present[a][0])))


@dataclass
class KernelCheck:
    """pi K versus pi (and detailed balance) over a finite trace space."""
    pi: dict           # trace key -> posterior probability
    K: dict            # (key, key') -> transition probability
    pi_K: dict         # key' -> sum_x pi(x) K(x, x')

    @property
    def invariance_error(self) -> float:
        return max(abs(self.pi_K.get(k, 0.0) - p) for k, p in self.pi.items())

    @property
    def balance_error(self) -> float:
        return max((abs(self.pi[x] * k - self.pi[y] * self.K.get((y, x), 0.0)) for (x, y), k in self.K.items()),
                   default=0.0)

    @property
    def row_sum_error(self) -> float:
        sums: dict = defaultdict(float)
        for (x, _), k in self.K.items():
            sums[x] += k
        return max(abs(s - 1.0) for s in sums.values())

    def ok(self, tol: float = 1e-9) -> bool:
        return self.invariance_error <= tol and self.row_sum_error <= tol


def mh_kernel_check(model, data: dict | None = None, *, hastings: bool = True, step=None) -> KernelCheck:
    """Build the exact transition matrix of single-site MH (prior proposals) over the
    program's finite trace space, from the exact posterior: pi K = pi must hold.
    ``step(interp, entry, data, state, randomness)`` substitutes a modified kernel."""
    with _float64():
        data = data or {}
        pi, traces = _exact_trace_posterior(model, data, _values_key)
        interp = model.interpreter()
        prepared = model.prepare_data(model.bind((), data), "cpu")
        K: dict = defaultdict(float)
        for key, trace in traces.items():
            state = _state_of(interp, model.entry, prepared, trace)

            def run(rnd, state=state):
                if step is not None:
                    return step(interp, model.entry, prepared, state, rnd)
                new, _ = mh_mod.mh_step(interp, model.entry, prepared, state, "cpu", randomness=rnd,
                                        hastings=hastings)
                return new

            for prob, new in enumerate_outcomes(run, randomness_cls=EnumeratingMHRandomness):
                K[(key, _trace_key(new))] += prob
    return _kernel_check(pi, K)


def _values_key(values: dict) -> tuple:
    """A trace's values as a hashable key (``_key`` of each)."""
    return tuple(sorted((a, _key(v)) for a, v in values.items()))


def _exact_trace_posterior(model, data: dict, key) -> tuple[dict, dict]:
    """The exact posterior over the program's traces (its enumerated paths less the
    return value): ({key(trace): probability}, {key(trace): trace})."""
    exact = model.run("enumerate", data)
    z = float(exact.evidence)
    pi: dict = defaultdict(float)
    traces = {}
    for w, vals in exact.paths:
        trace = {a: v for a, v in vals.items() if a != "return"}
        k = key(trace)
        pi[k] += float(w) / z
        traces[k] = trace
    return pi, traces


def _kernel_check(pi: dict, K: dict) -> KernelCheck:
    """The ``KernelCheck`` of the posterior ``pi`` and the transition matrix ``K``."""
    pi_K: dict = defaultdict(float)
    for (x, y), k in K.items():
        pi_K[y] += pi.get(x, 0.0) * k
    return KernelCheck(dict(pi), dict(K), dict(pi_K))


def _state_of(interp, entry, data, trace: dict):
    """The traced state (one chain) of a given complete trace."""
    choices = gfi.Choices.of({a: torch.tensor([v]) for a, v in trace.items()})
    return gfi.generate(gfi.ModelRun(interp, entry, data), choices)[0]


def resample_move_algorithm(particles: int, moves: int = 1, resampling: str = "systematic"):
    """Resample-move SMC as ``check_proper`` wants it (its SMC and MH draws enumerated)."""
    def run(interp, entry, data, rnd):
        return resample_move(interp, entry, data, particles, "cpu", resampling=resampling, moves=moves,
                             randomness=rnd)
    return checkable(run, particles)


def tempering_algorithm(particles: int, schedule: list, moves: int = 1, resampling: str = "systematic",
                        kernel: str = "prior"):
    """Tempered SMC with a fixed schedule as ``check_proper`` wants it: the final
    population, each particle weighted by the evidence estimate (its prior draws,
    resampling and MH moves enumerated)."""
    def run(interp, entry, data, rnd):
        return tempered_smc(interp, entry, data, particles, "cpu", moves=moves, kernel=kernel, resampling=resampling,
                            schedule=schedule, randomness=rnd)
    return checkable(run, particles)


# ------------------------------------------------------------------- PMMH: exact kernel
@dataclass
class PMMHCheck(KernelCheck):
    """PMMH's exact kernel on the extended space (theta, trajectory x, Z_hat): ``pi`` its
    target p(theta) P_theta(x, Z_hat) Z_hat / Z, ``posterior`` the exact posterior over
    traces and ``marginal`` pi's marginal on them (they must agree: Z_hat unbiased, the
    trajectory pick proper)."""
    posterior: dict = None
    marginal: dict = None

    @property
    def marginal_error(self) -> float:
        keys = set(self.posterior) | set(self.marginal)
        return max(abs(self.posterior.get(k, 0.0) - self.marginal.get(k, 0.0)) for k in keys)

    def ok(self, tol: float = 1e-12) -> bool:
        return super().ok(tol) and self.marginal_error <= tol

    def __str__(self) -> str:
        return (f"PMMH over {len(self.pi)} states (theta, trajectory, Z_hat): |pi K - pi| "
                f"{self.invariance_error:.3g}, rows {self.row_sum_error:.3g}, marginal of pi vs the exact "
                f"posterior {self.marginal_error:.3g}")


def pmmh_kernel_check(model, params: list, data: dict | None = None, *, particles: int = 2,
                      resampling: str = "systematic", ess_threshold: float = 1.0, kernel: str = "prior",
                      step=None, estimate=None) -> PMMHCheck:
    """Build PMMH's transition kernel exactly on a small finite program, by enumerating
    every draw of a step (the proposal theta', SMC's prior draws and resampling given
    theta', the trajectory pick, the accept test), from every state of the extended space
    (theta, trajectory, Z_hat) that the target charges. The target pi is the law of PMMH's
    own initial draw (theta ~ p(theta), then SMC given theta) reweighted by Z_hat / Z.
    Checks pi K = pi, the rows of K, and that pi's marginal on the trajectory is the exact
    posterior (``PMMHCheck.ok``). ``step(estimate, state, randomness) -> (state, accepted)``
    and ``estimate(theta, randomness) -> PMMHState`` substitute modified pieces
    (``inference.pmmh.pmmh_step`` / ``smc_estimate``)."""
    with _float64():
        data = data or {}
        exact = model.run("enumerate", data)
        z = float(exact.evidence)
        posterior: dict = defaultdict(float)
        for w, vals in exact.paths:
            posterior[_plain_key(vals)] += float(w) / z
        interp, prepared = _compiled(model, data)
        estimate = estimate or partial(pmmh_mod.smc_estimate, interp, model.entry, prepared, particles=particles,
                                       resampling=resampling, ess_threshold=ess_threshold)
        step = step or partial(pmmh_mod.pmmh_step, kernel=kernel)
        pi, states = defaultdict(float), {}
        for prob, state in enumerate_outcomes(lambda rnd: _estimated(estimate, params, rnd)):
            if state is not None and math.isfinite(state.log_z):
                pi[_pmmh_key(state)] += prob * math.exp(state.log_z) / z
                states[_pmmh_key(state)] = state
        K: dict = defaultdict(float)
        for key, state in states.items():
            for prob, (new, _) in enumerate_outcomes(lambda rnd, state=state: step(estimate, state, rnd)):
                K[(key, _pmmh_key(new))] += prob
    pi_K: dict = defaultdict(float)
    marginal: dict = defaultdict(float)
    for (x, y), k in K.items():
        pi_K[y] += pi.get(x, 0.0) * k
    for (trajectory, _), p in pi.items():
        marginal[trajectory] += p
    return PMMHCheck(dict(pi), dict(K), dict(pi_K), dict(posterior), dict(marginal))


def _estimated(estimate, params, rnd):
    """PMMH's initial draw, None where every particle died (Z_hat = 0)."""
    try:
        return estimate({a: None for a in params}, rnd)
    except ZeroEvidenceError:
        return None


def _plain_key(values: dict) -> tuple:
    """A trace (address -> value, "return" included) as a hashable key, numbers as floats
    (exact Fractions and sampled tensors alike)."""
    def plain(v):
        v = to_python(v) if isinstance(v, torch.Tensor) else v
        if isinstance(v, (list, tuple)):
            return tuple(plain(x) for x in v)
        return float(v) if isinstance(v, (int, float, Fraction)) else v
    return tuple(sorted((a, plain(v)) for a, v in values.items()))


def _pmmh_key(state) -> tuple:
    return _plain_key(state.pick), state.log_z


# ------------------------------------------------------- MH on token choices: exact kernel
def _token_trace_key(values: dict) -> tuple:
    """A trace with token/completion values as a hashable key (texts as they are)."""
    return tuple(sorted((a, _key(v.tolist() if isinstance(v, torch.Tensor) else v)) for a, v in values.items()))


def token_kernel_check(model, data: dict | None = None, *, hastings: bool = True, cut_odds: bool = True,
                       step=None) -> KernelCheck:
    """``mh_kernel_check`` for the suffix kernel of ``inference.token_moves`` (MH on
    language-model choices): its exact transition matrix over the program's finite trace
    space, every site pick, cut, regenerated suffix and accept test enumerated. ``hastings``
    / ``cut_odds`` False check the broken kernels; ``step(run_model, state, randomness) ->
    state`` substitutes another kernel on ``token_moves.TokenTraces``."""
    from ..inference import token_moves
    with _float64():
        data = data or {}
        pi, traces = _exact_trace_posterior(model, data, _token_trace_key)
        interp, prepared = _compiled(model, data)
        target = gfi.ModelRun(interp, model.entry, prepared)
        K: dict = defaultdict(float)
        for key, trace in traces.items():
            state = token_moves.assess_traces(target, [trace])

            def run(rnd, state=state):
                if step is not None:
                    return step(target, state, rnd)
                return token_moves.suffix_move(target, state, rnd, hastings=hastings, cut_odds=cut_odds)[0]

            for prob, new in enumerate_outcomes(run):
                K[(key, _token_trace_key(new.values[0]))] += prob
    return _kernel_check(pi, K)
