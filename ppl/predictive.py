"""Prior and posterior predictive checks: ``Model.predictive(result or None, data=..., n=...)``.

Every ``observe v ~ d`` of the model gets a replicated value: a fresh draw from ``d``
shaped like ``v``, given the draw's latent values, with the observed value replaced (the
rest of the program still reads the data as it is).

* **Prior predictive** (``result`` None): the latent values are drawn from their priors
  (the handler of ``semantics/prior_predictive.py``, as SBC uses it); draws that fail a
  ``condition`` are rejected and redrawn; a model with ``factor`` is an error (a factor
  reweights the prior, which a simulation cannot honour).
* **Posterior predictive** (a result): the latent values of each posterior draw are
  replayed (``semantics.predictive.PosteriorPredictive``): every kept draw of an MCMC
  result (``n`` given: n of them, evenly spaced), or ``n`` (default N) particles resampled
  by weight with ``numpy.random.default_rng(seed)`` (``ppl.results.draws``). A ``factor``
  only reweights the latent values, which are given: ignored.

The result, ``Predictive``, holds one array per observed variable (``pred["y"]``: n x the
observed shape; ``pred["obs@12:5[3]"]`` one address), named as in ``to_arviz``'s
``observed_data``; ``plot(stat=...)`` draws the observed statistic against its replicated
distribution, ``p_value`` gives P(T(y_rep) >= T(y)), and ``result.to_arviz(predictive=pred)``
puts them in ``prior_predictive``/``posterior_predictive``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from .semantics.errors import PPLError, did_you_mean
from .semantics.predictive import PosteriorPredictive, ReplicatingPrior
from .semantics.sampling import drive
from .semantics.values import Particles

from .results.draws import data_array, observation_variables, posterior_draws, stack

#: the statistics ``Predictive.plot`` and ``p_value`` know by name (over all elements of a draw)
STATISTICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda x: x.mean(axis=1),
    "sd": lambda x: x.std(axis=1),
    "min": lambda x: x.min(axis=1),
    "max": lambda x: x.max(axis=1),
    "median": lambda x: np.median(x, axis=1),
}


class Predictive:
    """Replicated observations (module docstring).

    ``kind``: "prior" or "posterior"; ``names``: the observed variables; ``samples``:
    variable -> array [n, *shape]; ``observed``: variable -> the observed array (None where
    the observed value is not numeric data); ``addresses``: variable -> its observe
    addresses; ``by_address``: address -> array [n, *shape]; ``n``; ``chains``, ``draws``:
    the layout of the draws (an MCMC result's chains, else one chain of n); ``latents``
    (posterior): site -> the latent values each replication was drawn given (row i of
    ``latents[s]`` goes with row i of ``samples[v]``)."""

    def __init__(self, kind: str, samples: dict, observed: dict, addresses: dict, by_address: dict,
                 chains: int, draws: int, how: str):
        self.kind = kind
        self.samples = samples
        self.observed = observed
        self.addresses = addresses
        self.by_address = by_address
        self.names = list(samples)
        self.chains, self.draws = chains, draws
        self.n = chains * draws
        self.how = how
        self.latents: dict = {}  # posterior: site -> the values replayed, one row per draw (aligned with samples)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.samples:
            return self.samples[name]
        if name in self.by_address:
            return self.by_address[name]
        raise PPLError(f"no observed variable or observe address {name!r} in this predictive",
                       hint=did_you_mean(name, [*self.samples, *self.by_address]) or
                       f"the observed variables are: {', '.join(self.names)}")

    def __contains__(self, name: str) -> bool:
        return name in self.samples or name in self.by_address

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.samples.items())
        return f"<ppl.Predictive {self.kind}, n={self.n} ({self.how}); {shapes}>"

    def arviz_array(self, name: str) -> np.ndarray:
        """The variable's draws as [chains, draws, *shape] (ArviZ's layout)."""
        a = self.samples[name]
        return a.reshape(self.chains, self.draws, *a.shape[1:])

    def statistic(self, stat: str | Callable, name: str) -> tuple[np.ndarray, float | None]:
        """(T of each replicated draw [n], T of the observed value or None): ``stat`` a name
        in ``STATISTICS`` or a function of an array [n, k] (one row per draw) giving [n]."""
        fn = _statistic(stat)
        reps = np.asarray(self[name], dtype=np.float64)
        t_rep = np.asarray(fn(reps.reshape(reps.shape[0], -1)), dtype=np.float64)
        obs = self.observed.get(name)
        t_obs = None if obs is None else float(np.asarray(fn(np.asarray(obs, np.float64).reshape(1, -1))).ravel()[0])
        return t_rep, t_obs

    def p_value(self, stat: str | Callable = "mean", name: str | None = None) -> float:
        """The predictive p-value P(T(y_rep) >= T(y)) over the replicated draws (near 0 or 1:
        the model does not reproduce that aspect of the data)."""
        t_rep, t_obs = self.statistic(stat, name or self.names[0])
        if t_obs is None:
            raise PPLError(f"the observed value of {name!r} is not numeric data: no p-value")
        return float(np.mean(t_rep >= t_obs))

    def plot(self, stat: str | Callable | Iterable = ("mean", "sd"), names: str | Iterable[str] | None = None,
             bins: int = 40, path: str | None = None):
        """A matplotlib Figure: for each observed variable (rows) and statistic (columns), the
        histogram of T(y_rep) over the replicated draws, T(y) of the observed data as a
        vertical line, and the p-value P(T(y_rep) >= T(y)) in the title. Saved to ``path``
        when given."""
        from .results.plots import _pyplot
        stats = [stat] if isinstance(stat, str) or callable(stat) else list(stat)
        chosen = self.names if names is None else ([names] if isinstance(names, str) else list(names))
        for name in chosen:
            self[name]  # unknown names fail before anything is drawn
        plt = _pyplot()
        fig, axes = plt.subplots(len(chosen), len(stats), figsize=(4.2 * len(stats), 3.2 * len(chosen)),
                                 squeeze=False)
        for i, name in enumerate(chosen):
            for j, s in enumerate(stats):
                _plot_statistic(axes[i][j], self, s, name, bins)
        fig.suptitle(f"{self.kind} predictive check ({self.n} replications)")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig


def _statistic(stat) -> Callable:
    if callable(stat):
        return stat
    if stat not in STATISTICS:
        raise PPLError(f"unknown statistic {stat!r}",
                       hint=did_you_mean(str(stat), STATISTICS) or
                       f"use one of {', '.join(STATISTICS)} or a function of an array [draws, k]")
    return STATISTICS[stat]


def _plot_statistic(ax, pred: Predictive, stat, name: str, bins: int) -> None:
    t_rep, t_obs = pred.statistic(stat, name)
    label = stat if isinstance(stat, str) else getattr(stat, "__name__", "T")
    ax.hist(t_rep, bins=bins, density=True, color="#8fb3d9", edgecolor="white",
            label=f"T(y_rep), {pred.kind} predictive")
    title = f"{label}({name})"
    if t_obs is not None:
        ax.axvline(t_obs, color="black", linewidth=2, label=f"T(y) = {t_obs:.3g}")
        title += f"   p = {float(np.mean(t_rep >= t_obs)):.2f}"
    ax.set_title(title)
    ax.set_xlabel(label)
    ax.legend(fontsize="small", loc="best", framealpha=0.7)


# ------------------------------------------------------------------------------ drawing
def predictive(model, result=None, data: Mapping[str, Any] | None = None, *, n: int | None = None,
               seed: int | None = 0, max_batches: int = 100) -> Predictive:
    """``Model.predictive`` (module docstring)."""
    from .api import check_seed, seeded
    seed = check_seed(seed)
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
        raise PPLError(f"n must be a positive whole number (got {n!r})")
    if data is None:
        data = getattr(result, "data", None) or {}
    prepared = model.prepare_data(model.bind((), data), "cpu")
    with seeded(seed):
        if result is None:
            return _prior(model, prepared, int(n or 1000), max_batches)
        return _posterior(model, prepared, result, n, seed)


def _prior(model, prepared: dict, n: int, max_batches: int) -> Predictive:
    kept: list[dict] = []
    got = 0
    for _ in range(max_batches):
        h = ReplicatingPrior(n, "cpu", factor_message="a prior predictive cannot simulate a model with `factor` "
                                                     "statements",
                            factor_hint="a factor reweights the prior, so prior draws would not come from the "
                                        "model; write it as `observe value ~ distribution` if it is a likelihood")
        drive(model.interpreter().run(model.entry, prepared, Particles.all(n, "cpu")), h)
        ok = h.ok.cpu()
        sites = h.observed.sites()
        kept.append({a: (v[ok] if isinstance(v, torch.Tensor) else [x for x, k in zip(v, ok.tolist()) if k], p)
                     for a, (v, p) in sites.items()})
        got += int(ok.sum())
        if got >= n:
            break
    else:
        raise PPLError(f"prior predictive: only {got} of {n} prior draws satisfied the model's conditions "
                       f"in {max_batches} batches", hint="the conditions are (nearly) impossible under the prior")
    sites = {a: (_concatenate([k[a][0] for k in kept])[:n],
                 None if all(k[a][1] is None for k in kept) else "partial") for a in kept[0]}
    return _assemble("prior", model, sites, h.data_values, 1, n, "prior draws")


def _concatenate(parts: list):
    """Batches of one site's simulated values joined (tensors, or lists of objects)."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    return [x for p in parts for x in (p.tolist() if isinstance(p, torch.Tensor) else p)]


def _posterior(model, prepared: dict, result, n: int | None, seed: int) -> Predictive:
    d = posterior_draws(result, n, 0 if seed is None else seed)
    h = PosteriorPredictive({k: v for k, v in d.columns.items() if k != "return"}, d.M, "cpu")
    drive(model.interpreter().run(model.entry, prepared, Particles.all(d.M, "cpu")), h)
    pred = _assemble("posterior", model, h.observed.sites(), h.data_values, d.chains, d.draws, d.how)
    pred.latents = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in d.columns.items()}
    return pred


def _assemble(kind: str, model, sites: dict, data_values: dict, chains: int, draws: int, how: str) -> Predictive:
    """Group the simulated observe sites into variables (``ppl.results.draws``)."""
    if not sites:
        raise PPLError(f"the model '{model.entry}' observes nothing: there is nothing to replicate",
                       hint="a predictive check replicates the values of `observe` statements (factor and "
                            "condition are not observations)")
    M = chains * draws
    observed_values = {a: data_array(v) for a, v in data_values.items()}
    by_address, samples, observed, addresses = {}, {}, {}, {}
    for var, addrs in observation_variables(model.program, list(sites)).items():
        partial = [a for a in addrs if sites[a][1] is not None]
        if partial:
            raise PPLError(f"the observation '{partial[0]}' is made by only some draws (random control flow): "
                           "its replicated values do not form one array",
                           hint="a predictive check needs every draw to observe the same data")
        arrays = []
        for a in addrs:
            v = sites[a][0]
            if not isinstance(v, torch.Tensor):
                raise PPLError(f"the observation '{a}' is not numeric: it cannot be replicated as an array")
            by_address[a] = v.detach().cpu().numpy()
            arrays.append(by_address[a])
        samples[var] = stack(arrays, M)
        obs = [observed_values.get(a) for a in addrs]
        observed[var] = None if any(o is None for o in obs) else stack([o[None] for o in obs], 1)[0]
        addresses[var] = addrs
    return Predictive(kind, samples, observed, addresses, by_address, chains, draws, how)
