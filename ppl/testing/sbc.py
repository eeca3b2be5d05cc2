"""Simulation-based calibration (SBC) for any model and any inference method.

Talts, Betancourt, Simpson, Vehtari & Gelman (2018), "Validating Bayesian inference
algorithms with simulation-based calibration": if theta* ~ prior, y ~ p(y | theta*), and
theta_1..theta_L are *independent* draws from the exact posterior p(theta | y), then the
rank of theta* among the theta_l, ``#{l: theta_l < theta*}``, is uniform on {0, ..., L}
(theta* and the draws are exchangeable given y). An inference algorithm whose draws are
too narrow, too wide or biased makes the ranks U-shaped, hump-shaped or skewed.

    import ppl
    from ppl.testing.sbc import sbc

    m = ppl.model('''
    def model(ys):
        mu ~ normal(0, 1)
        for y in ys:
            observe y ~ normal(mu, 1)
        return mu
    ''')
    res = sbc(m, "importance", {"ys": [0.0] * 5}, simulations=200, draws=19,
              particles=2000, seed=0)
    print(res.summary())   # ranks and a chi-square uniformity p-value per parameter
    res.plot()             # rank histograms with the binomial 99% band

No simulator needs to be written: the model *is* the simulator.

* **The simulation** (``prior_predictive``) runs the model with a handler that draws
  every choice from its prior and, at every ``observe v ~ d``, draws a value from ``d``
  (with the shape of ``v``: the data passed in only give the shapes) instead of scoring
  ``v``; the simulated value is recorded under the observe's address (``obs@line:col``
  plus loop indices and call path, as the interpreter addresses it). ``condition``
  statements are honoured by rejection; ``factor`` statements, and observes of values
  that depend on the model's random choices, are not data and make SBC an error.
* **The inference** runs on ``observing(model, simulated)``: the same model whose
  interpreter (``Model.interpreter()``, through which every method in ``METHODS`` runs
  the program) rewrites each ``ObserveEffect``'s value by its address from the simulated
  table. The log joint of the rewritten model is therefore the log joint of the model
  with the simulated values as data (tests/test_sbc.py checks it exactly). An observe the
  inference reaches but the simulation did not (an observe inside a branch) is an error:
  SBC needs the observed sites to be fixed by the data.
* **The draws**: L draws from the result: resampled by weight from a weighted population
  (``importance``, ``smc``, ``resample_move``, ``tempering``, ``prior``) or from the
  exact posterior (``enumerate``); evenly spaced over all kept draws of an MCMC result
  (``mh``, ``pmmh``: the largest possible thinning; with fewer than L draws it is an
  error). Ties with the truth (discrete parameters, resampled duplicates) are broken
  uniformly at random, which keeps the ranks uniform under a correct posterior.
* **The test**: ranks are binned (``bins`` contiguous groups of rank values; a bin's
  expected probability is its share of the L + 1 values) and compared with uniform by
  Pearson's chi-square test (``scipy.stats.chisquare``).

What SBC cannot see: it checks the posterior *averaged over the prior predictive*, so an
"inference" that returns the prior passes it (its draws are exchangeable with theta*
too); and importance sampling with too few particles, or MCMC with autocorrelated draws,
fails it even where the algorithm is asymptotically right (the draws are not independent
posterior draws). ``SBCResult.ess`` records the effective sample size of every run.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from ..api import Model, resolve_device, seeded
from ..result import as_result
from ..semantics.errors import PPLDiagnosticWarning, PPLError, PPLRuntimeError, did_you_mean
from ..semantics.interpreter import ObserveEffect
from ..semantics.middleware import Rewritten, observed_values
from ..semantics.prior_predictive import PriorPredictive, simulate_observation  # noqa: F401  (re-exported)
from ..semantics.sampling import column, drive
from ..semantics.values import Particles, to_python
from ..stdlib.progress import progress_bar

__all__ = ["Simulation", "prior_predictive", "observing", "ObservationRewriter", "sbc", "SBCResult",
           "posterior_draws"]


# ============================================================================ simulation
@dataclass
class Simulation:
    """One draw from the prior predictive: ``latents`` (choice address -> this draw's
    value: a 0-d or n-d tensor, or a Python object), ``observations`` (observe address ->
    the simulated value, an unbatched tensor), ``ret`` (the return value)."""
    latents: dict
    observations: dict
    ret: Any


def prior_predictive(model: Model, data: Mapping[str, Any] | None = None, *, simulations: int = 1,
                     seed: int | None = None, device: str = "cpu", max_batches: int = 1000) -> list[Simulation]:
    """``simulations`` independent draws (latents, simulated observations, return value)
    from the prior predictive of ``model`` called on ``data`` (the data give the inputs,
    and the shapes of the observed values, which are replaced by simulated ones). Draws
    that fail a ``condition`` are rejected and redrawn."""
    device = resolve_device(device)
    S = int(simulations)
    if S < 1:
        raise PPLError(f"simulations must be a positive integer (got {simulations!r})")
    bound = model.bind((), data)
    prepared = model.prepare_data(bound, device)
    out: list[Simulation] = []
    with seeded(seed, device):
        for _ in range(int(max_batches)):
            ctx = Particles.all(S, device)
            h = PriorPredictive(S, device)
            ret = drive(model.interpreter().run(model.entry, prepared, ctx), h)
            ret = column(ret, ctx)
            latents = h.trace.sites()
            observed = h.observed.sites()
            if not observed:
                raise PPLError(f"SBC: the model '{model.entry}' observes nothing",
                               hint="SBC conditions the model on data simulated at its `observe` statements; "
                                    "a model without observes has no data to simulate (factor and condition "
                                    "are not observations)")
            for s in torch.nonzero(h.ok).flatten().tolist():
                out.append(Simulation(_row(latents, s), _row(observed, s, tensors=True), _item(ret, s)))
                if len(out) == S:
                    return out
    raise PPLError(f"SBC: only {len(out)} of {S} prior draws satisfied the model's conditions "
                   f"in {max_batches} batches", hint="the conditions are (nearly) impossible under the prior")


def _item(col, s):
    return col[s] if isinstance(col, torch.Tensor) else col[s]


def _row(sites: dict, s: int, tensors: bool = False) -> dict:
    out = {}
    for a, (values, present) in sites.items():
        if present is not None and not bool(present[s]):
            continue
        v = values[s]
        if tensors and not isinstance(v, torch.Tensor):
            v = torch.as_tensor(v)
        out[a] = v.detach().cpu() if isinstance(v, torch.Tensor) else v
    return out


# ========================================================================= rewriting
class ObservationRewriter(Rewritten):
    """An interpreter whose runs yield every ``ObserveEffect`` with its value replaced by
    ``observations[addr]`` (an unbatched value: the same for every particle); everything
    else is the wrapped interpreter's (``semantics.middleware``'s ``observed_values``
    rewrite). Attribute reads fall through to it."""

    def __init__(self, inner, observations: Mapping[str, Any], exact: bool = False):
        super().__init__(inner, observed_values(self._value))
        self._observations = dict(observations)
        self._exact = exact
        self._cache: dict = {}

    def _value(self, eff: ObserveEffect):
        key = (eff.addr, str(eff.ctx.device))
        v = self._cache.get(key)
        if v is None:
            if eff.addr not in self._observations:
                known = ", ".join(sorted(self._observations)[:8])
                raise PPLRuntimeError(
                    f"SBC: the observe '{eff.addr}' has no simulated value: the simulation did not reach it",
                    eff.span, "SBC needs the observed sites to be fixed by the data (no observe inside a branch "
                              f"on a random value); the simulated sites are: {known}")
            v = self._observations[eff.addr]
            if self._exact:
                v = to_python(v)
            elif isinstance(v, torch.Tensor):
                v = v.to(eff.ctx.device)
            self._cache[key] = v
        return v


class _Observing(Model):
    """``model`` with its observed values replaced (see ``observing``)."""

    def __init__(self, model: Model, observations: Mapping[str, Any]):  # no re-check: model is checked
        self.__dict__.update(model.__dict__)
        self.observations = dict(observations)

    def interpreter(self, exact: bool = False):
        return ObservationRewriter(Model.interpreter(self, exact), self.observations, exact)

    def with_entry(self, entry: str) -> Model:
        raise PPLError("observing(): the entry of an observing model cannot be changed")

    def __repr__(self) -> str:
        return f"<ppl.Model {self.entry}({', '.join(self.params)}) observing {len(self.observations)} sites>"


def observing(model: Model, observations: Mapping[str, Any]) -> Model:
    """The model whose ``observe`` statements see ``observations[addr]`` (address ->
    value, as recorded by ``prior_predictive``) instead of the value the program
    computes. Every inference method, exact enumeration and ``log_joint`` run it."""
    return _Observing(model, observations)


# ============================================================================== draws
def posterior_draws(result, names: Iterable[str], L: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """L draws of each named scalar site from a result (float64 arrays, aligned: draw l
    of every name comes from the same particle/path/MCMC state). Weighted results are
    resampled by weight (multinomial), exact results sampled by probability, MCMC
    results thinned evenly over all kept draws."""
    from ppl.result import ExactResult, MCMCResult
    names = list(names)
    if isinstance(result, ExactResult):
        paths = [(float(w), vals) for w, vals in result.paths if w > 0]
        p = np.array([w for w, _ in paths], dtype=np.float64)
        idx = rng.choice(len(paths), size=L, p=p / p.sum())
        out = {}
        for n in names:
            vals = []
            for i in idx:
                if n not in paths[i][1]:
                    raise PPLError(f"SBC: '{n}' does not exist on every path of the posterior",
                                   hint="SBC ranks parameters that every execution has")
                vals.append(_scalar(paths[i][1][n], n))
            out[n] = np.asarray(vals, dtype=np.float64)
        return out
    if isinstance(result, MCMCResult):
        n_all = result.n
        if n_all < L:
            raise PPLError(f"SBC: the MCMC run kept {n_all} draws, fewer than the {L} posterior draws asked for",
                           hint="raise `samples` (or lower `draws`): SBC thins the kept draws to L")
        idx = (np.arange(L) * n_all) // L
    else:
        w = result.weights.detach().cpu().double().numpy()
        idx = rng.choice(w.shape[0], size=L, p=w / w.sum())
    out = {}
    for n in names:
        if n not in result.sites:
            raise PPLError(f"SBC: the posterior has no site '{n}'",
                           hint=did_you_mean(n, result.sites) or f"its sites are: {', '.join(result.sites)}")
        site = result.sites[n]
        if site.present is not None and not bool(torch.as_tensor(site.present)[torch.as_tensor(idx)].all()):
            raise PPLError(f"SBC: '{n}' is absent from some posterior draws",
                           hint="SBC ranks parameters that every execution has")
        v = site.value
        if isinstance(v, torch.Tensor):
            if v.dim() != 1:
                raise PPLError(f"SBC: '{n}' is not a scalar (its values have shape {tuple(v.shape[1:])})",
                               hint="rank a scalar: e.g. return one component of it")
            out[n] = v.detach().cpu().double().numpy()[idx]
        else:
            out[n] = np.asarray([_scalar(v[i], n) for i in idx], dtype=np.float64)
    return out


def _scalar(v, name: str) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise PPLError(f"SBC: '{name}' is not a scalar (shape {tuple(v.shape)})",
                           hint="rank a scalar: e.g. return one component of it")
        return float(v.reshape(()))
    try:
        return float(v)
    except (TypeError, ValueError):
        raise PPLError(f"SBC: '{name}' is not a number ({type(v).__name__})",
                       hint="SBC ranks numeric scalar parameters") from None


def _is_scalar_number(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and v.dtype != torch.complex64
    return isinstance(v, (bool, int, float))


def _is_continuous(v) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point()


# ============================================================================== result
@dataclass
class SBCResult:
    """Ranks of the true values among L posterior draws, for S simulations.

    ``ranks[name]``: int array [S], values in 0..L; ``truths[name]``: float array [S];
    ``parameters``; ``simulations`` (S); ``draws`` (L); ``bins``; ``p_values[name]``: Pearson's
    chi-square test of uniform ranks (binned); ``ess``: float array [S], the effective
    sample size of each posterior (Kish's for weighted results, the smallest per-site
    MCMC ESS for MCMC, None entries for exact results); ``method``; ``seed``."""
    method: str
    parameters: list
    simulations: int
    draws: int
    bins: int
    ranks: dict
    truths: dict
    ess: np.ndarray
    seed: Any = None
    p_values: dict = field(default_factory=dict)

    def __post_init__(self):
        self.p_values = {n: self._chisquare(n)[1] for n in self.parameters}

    # ----------------------------------------------------------------------- binning
    def bin_probabilities(self) -> np.ndarray:
        """The probability of each bin under uniform ranks: its share of 0..L."""
        which = (np.arange(self.draws + 1) * self.bins) // (self.draws + 1)
        return np.bincount(which, minlength=self.bins) / (self.draws + 1)

    def counts(self, name: str) -> np.ndarray:
        """How many ranks of ``name`` fall in each bin."""
        self._check(name)
        which = (np.asarray(self.ranks[name]) * self.bins) // (self.draws + 1)
        return np.bincount(which, minlength=self.bins)

    def _chisquare(self, name: str) -> tuple[float, float]:
        from scipy.stats import chisquare
        f_exp = self.bin_probabilities() * self.simulations
        stat, p = chisquare(self.counts(name), f_exp)
        return float(stat), float(p)

    def chisquare(self, name: str) -> tuple[float, float]:
        """(statistic, p-value) of Pearson's test of uniform ranks for ``name``."""
        return self._chisquare(name)

    def _check(self, name: str) -> None:
        if name not in self.ranks:
            raise PPLError(f"SBC result has no parameter '{name}'",
                           hint=did_you_mean(name, self.parameters) or f"its parameters are: {', '.join(self.parameters)}")

    # ----------------------------------------------------------------------- reports
    def summary(self) -> str:
        lines = [f"SBC of '{self.method}': {self.simulations} simulations, {self.draws} posterior draws each "
                 f"(ranks 0..{self.draws}), {self.bins} bins"]
        width = max(len(n) for n in self.parameters) if self.parameters else 4
        for n in self.parameters:
            stat, p = self._chisquare(n)
            r = np.asarray(self.ranks[n]) / self.draws
            lines.append(f"  {n:<{width}}  chi2={stat:8.2f}  p={p:.3g}  mean rank/L={r.mean():.3f} "
                         f"(uniform: 0.5)  sd={r.std():.3f} (uniform: {math.sqrt((self.draws + 2) / (12 * self.draws)):.3f})")
        ess = np.asarray([e for e in self.ess if e is not None], dtype=np.float64)
        if ess.size:
            low = float((ess < self.draws).mean())
            lines.append(f"  posterior ESS: median {np.median(ess):.1f}, min {ess.min():.1f}"
                         + (f"; {low:.0%} of runs have ESS < L = {self.draws}: their draws are not independent, "
                            "which alone makes ranks non-uniform" if low > 0 else ""))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def plot(self, names: str | Iterable[str] | None = None, ax=None):
        """One rank histogram per parameter, with the band that holds each bin's count
        with probability 99% under uniform ranks (binomial quantiles 0.5% and 99.5%).
        Returns the Figure, or None (with a warning) when matplotlib is not installed."""
        chosen = [names] if isinstance(names, str) else list(names) if names is not None else list(self.parameters)
        for n in chosen:
            self._check(n)
        try:
            from ppl.result import _pyplot
            plt = _pyplot()
        except ImportError:
            warnings.warn("SBCResult.plot needs matplotlib, which is not installed (pip install matplotlib); "
                          "nothing was drawn. The rank counts are in .counts(name), the tests in .summary()",
                          stacklevel=2)
            return None
        from scipy.stats import binom
        if ax is not None:
            axes = list(np.ravel(np.asarray(ax, dtype=object)))
            if len(axes) != len(chosen):
                raise PPLError(f"plot got {len(axes)} axes for {len(chosen)} parameters")
            fig = axes[0].figure
        else:
            ncols = min(3, len(chosen))
            nrows = max(1, math.ceil(len(chosen) / ncols))
            fig, grid = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
            axes = list(grid.ravel())
            for extra in axes[len(chosen):]:
                extra.set_visible(False)
        probs = self.bin_probabilities()
        lo = binom.ppf(0.005, self.simulations, probs)
        hi = binom.ppf(0.995, self.simulations, probs)
        x = np.arange(self.bins)
        for name, a in zip(chosen, axes):
            a.fill_between(np.r_[x - 0.5, x[-1] + 0.5], np.r_[lo, lo[-1]], np.r_[hi, hi[-1]], step="post",
                           color="0.85", label="99% band")
            a.step(np.r_[x - 0.5, x[-1] + 0.5], np.r_[probs, probs[-1]] * self.simulations, where="post",
                   color="0.4", lw=1)
            a.bar(x, self.counts(name), width=0.9, color="C0")
            a.set_title(f"{name} (chi-square p = {self.p_values[name]:.3g})")
            a.set_xlabel(f"rank bin (ranks 0..{self.draws})")
            a.set_ylabel("simulations")
        if ax is None:
            fig.tight_layout()
        return fig


# ================================================================================= sbc
def sbc(model: Model, method: str | Callable = "importance", data: Mapping[str, Any] | None = None, *,
        simulations: int = 100, draws: int = 99, parameters: str | Iterable[str] | None = None,
        particles: int = 1000, bins: int | None = None, seed: int | None = 0, device: str = "cpu",
        progress: bool | None = None, distributed: bool = False, **options) -> SBCResult | None:
    """Simulation-based calibration of ``method`` on ``model`` (see the module docstring).

    model, data: the model and its inputs (observed values are only placeholders for
        their shapes: they are replaced by simulated data).
    method: a name in ``ppl.inference.METHODS``, or a function with the same signature
        ``fn(model, data, *, particles, device, **options) -> result`` (an algorithm of
        your own); ``particles`` and ``options`` are passed to it (for ``mh``, give
        ``chains``/``samples``; its draws are thinned to ``draws``).
    simulations: S, the number of (truth, data, posterior) triples.
    draws: L, posterior draws per simulation; ranks take the L + 1 values 0..L.
    parameters: the addresses to rank ("return" for the return value); default: every scalar
        real-valued choice present in every simulation, and the return value if it is a
        numeric scalar that is not one of those choices.
    bins: rank bins for the chi-square test and the plot; default min(20, L + 1, S // 5)
        (at least 2), so that every bin expects 5 or more simulations.
    seed: makes the whole run reproducible (the simulations, each inference run, the
        resampling of the draws and the tie-breaking); None for fresh randomness.
    progress: a bar of simulations on stderr (``ppl.stdlib.progress``): None on a terminal
        after 2 s, True always, False never (the inference runs show none of their own).
    distributed: under ``torchrun`` (every rank calls ``sbc`` with the same arguments),
        the simulations are shared by the ranks (``semantics.distributed_map``); rank 0
        returns the ``SBCResult``, the other ranks None. Each simulation is seeded from its
        index alone (its inference run, its draws and its tie-breaking), so the result is
        exactly the single-process one with the same seed, whatever the number of ranks
        (with ``seed=None`` rank 0 draws the seed and ``SBCResult.seed`` records it).
    """
    if not isinstance(model, Model):
        raise PPLError("sbc() takes a compiled model (ppl.model(...))")
    S, L = int(simulations), int(draws)
    if S < 2:
        raise PPLError(f"simulations must be at least 2 (got {simulations!r})")
    if L < 1:
        raise PPLError(f"draws must be at least 1 (got {draws!r})")
    if callable(method):
        fn, method_name = method, getattr(method, "__name__", "custom")
    else:
        from ..inference import METHODS
        if method not in METHODS:
            raise PPLError(f"unknown inference method '{method}'",
                           hint=did_you_mean(method, METHODS) or f"available: {', '.join(sorted(METHODS))}")
        fn, method_name = None, method
    if distributed:
        from ..semantics.distributed import process_group
        from ..semantics.distributed_map import agreed_seed, map_indices
        with process_group() as group:
            seed = agreed_seed(seed, group)
            return _sbc(model, fn, method_name, data, S, L, parameters, particles, bins, seed, device,
                        progress if group.is_root else False, options,
                        lambda one: map_indices(S, one, group, what="the SBC simulations"))
    return _sbc(model, fn, method_name, data, S, L, parameters, particles, bins, seed, device, progress, options,
                lambda one: [one(s) for s in range(S)])


def _sbc(model, fn, method_name, data, S, L, parameters, particles, bins, seed, device, progress, options,
         over_simulations) -> SBCResult | None:
    """``sbc``'s run: the simulations (every rank draws all S: one batched prior run),
    then ``over_simulations(one)``, the list of ``one(s)`` for s = 0..S-1 (None on the
    ranks other than 0 of a distributed run), then the ranks' statistics. Simulation s
    uses the s-th seed of ``run_seeds`` for its inference run and its own generator,
    spawned from ``rng_seed`` by index, for its draws and ties."""
    device = resolve_device(device)
    bound = model.bind((), data)
    ss = np.random.SeedSequence(seed)
    sim_seed, run_seeds, rng_seed = ss.spawn(3)
    sims = prior_predictive(model, bound, simulations=S, seed=int(sim_seed.generate_state(1)[0]), device=device)
    names = _choose_params(parameters, sims)
    seeds = run_seeds.generate_state(S, dtype=np.uint32)
    rng_seeds = rng_seed.spawn(S)
    if bins is None:
        bins = max(2, min(20, L + 1, S // 5))
    bins = int(bins)
    if not 1 <= bins <= L + 1:
        raise PPLError(f"bins must be between 1 and draws + 1 = {L + 1} (got {bins})")
    if fn is None:
        options.setdefault("progress", False)  # one bar, the simulations', not one per inference run

    with progress_bar(progress, desc=f"SBC {method_name}", unit=" sims", total=S) as bar:
        def one(s: int) -> tuple[dict, dict, float | None]:
            ranks, truths, ess = _simulate_and_rank(model, fn, method_name, bound, sims[s], names, L, particles,
                                                    int(seeds[s]), np.random.default_rng(rng_seeds[s]), device,
                                                    options)
            bar.update(1)
            return ranks, truths, ess

        rows = over_simulations(one)
    if rows is None:
        return None
    ranks = {n: np.asarray([r[n] for r, _, _ in rows], dtype=np.int64) for n in names}
    truths = {n: np.asarray([t[n] for _, t, _ in rows], dtype=np.float64) for n in names}
    ess = np.asarray([e for _, _, e in rows], dtype=object)
    return SBCResult(method_name, names, S, L, bins, ranks, truths, ess, seed)


def _simulate_and_rank(model, fn, method_name, bound, sim, names, L, particles, run_seed, rng, device,
                       options) -> tuple[dict, dict, float | None]:
    """One simulation: the inference run on its simulated data (seed ``run_seed``), L
    posterior draws and the rank of each parameter's true value among them (ties broken
    by ``rng``); returns (ranks, truths, ESS)."""
    m = observing(model, sim.observations)
    with warnings.catch_warnings():  # SBC judges the runs itself: no diagnostic warning per simulation
        warnings.simplefilter("ignore", PPLDiagnosticWarning)
        if fn is None:
            result = m.run(method_name, bound, particles=particles, seed=run_seed, device=device, **options)
        else:
            with seeded(run_seed, device):
                result = as_result(fn(m, m.bind((), bound), particles=particles, device=device, **options))
    got = posterior_draws(result, names, L, rng)
    ranks, truths = {}, {}
    for n in names:
        tv = sim.ret if n == "return" else sim.latents[n]
        # compare in the truth's precision: a float32 draw of 0.8 must tie with an
        # exact posterior's 0.8 (and float64 draws with a float32 truth)
        prec = np.float32 if isinstance(tv, torch.Tensor) and tv.dtype == torch.float32 else np.float64
        t = prec(_scalar(tv, n))
        x = got[n].astype(prec)
        below = int((x < t).sum())
        ties = int((x == t).sum())
        ranks[n] = below + (int(rng.integers(0, ties + 1)) if ties else 0)
        truths[n] = float(t)
    return ranks, truths, _ess(result, names)


def _ess(result, names) -> float | None:
    from ppl.result import ExactResult, MCMCResult
    if isinstance(result, ExactResult):
        return None
    if isinstance(result, MCMCResult):
        vals = [result.ess_per_site[n] for n in names if n in result.ess_per_site]
        return float(min(vals)) if vals else float(result.ess)
    return float(result.ess)


def _choose_params(params, sims: list[Simulation]) -> list[str]:
    available = list(dict.fromkeys(a for sim in sims for a in sim.latents))
    if params is not None:
        chosen = [params] if isinstance(params, str) else list(params)
        if not chosen:
            raise PPLError("SBC: parameters is empty", hint="name at least one choice address, or 'return'")
        for n in chosen:
            if n == "return":
                if not all(_is_scalar_number(sim.ret) for sim in sims):
                    raise PPLError("SBC: the return value is not a numeric scalar",
                                   hint="return a number, or name the choices to rank")
                continue
            if n not in available:
                raise PPLError(f"SBC: the model has no choice '{n}'",
                               hint=did_you_mean(n, available + ["return"]) or
                               f"its choices are: {', '.join(available) or '(none)'}; or use 'return'")
            missing = sum(1 for sim in sims if n not in sim.latents)
            if missing:
                raise PPLError(f"SBC: the choice '{n}' is absent from {missing} of {len(sims)} simulations",
                               hint="SBC ranks parameters that every execution has")
            if not all(_is_scalar_number(sim.latents[n]) for sim in sims):
                raise PPLError(f"SBC: the choice '{n}' is not a numeric scalar",
                               hint="rank a scalar: e.g. return one component of it and use 'return'")
        return list(dict.fromkeys(chosen))
    chosen = [a for a in available
              if all(a in sim.latents and _is_continuous(sim.latents[a]) for sim in sims)]
    if all(_is_scalar_number(sim.ret) for sim in sims):
        same = any(all(float(sim.ret) == float(sim.latents[a]) for sim in sims) for a in chosen)
        if not same:
            chosen.append("return")
    if not chosen:
        raise PPLError("SBC: the model has no scalar real-valued choice present in every simulation, "
                       "and its return value is not a numeric scalar",
                       hint="name the parameters to rank with parameters=[...]")
    return chosen
