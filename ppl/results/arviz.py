"""A result as an ``arviz.InferenceData`` (``result.to_arviz()``), and ArviZ's plots of it.

Groups:

* ``posterior``: one variable per site ("return" and each choice), dims (chain, draw, ...).
  MCMC results (mh, nuts, hmc, pmmh) keep their chains and every kept draw. A weighted
  population (importance, smc, tempering, ...) becomes one chain of draws *resampled*
  multinomially by the weights with ``numpy.random.default_rng(seed)`` (``draws`` of them,
  default N; a population of equal weights is taken as it is); an exact result gives
  ``draws`` paths drawn by probability. Loop choices ``z[0]``, ``z[1]``, ... of one shape
  are also one variable ``z`` (an extra dim); vector sites get extra dims
  (``theta_dim_0``). A site absent from a draw (random control flow) is NaN there;
  non-numeric sites are left out (``posterior.attrs["left_out"]``).
* ``sample_stats``: ``lp`` (the log joint of each draw, by re-scoring its trace with the
  model) and, for NUTS/HMC, per draw ``diverging``, ``acceptance_rate`` (the tree's mean
  Metropolis acceptance), ``tree_depth``, ``n_steps``, ``energy``, ``step_size``; attrs:
  the overall acceptance rate (MH, PMMH), the log evidence and ESS (weighted results).
* ``log_likelihood``: per observed variable, the log density of every observed element
  for every draw (pointwise: a vector observe of 8 values is 8 observations), by
  re-scoring each draw's trace with the model (``semantics.predictive``). Their sum over
  the elements plus the choices' log priors, factors and conditions is ``lp``. So
  ``az.loo``, ``az.waic`` and ``az.compare`` work (with several observed variables, name
  one: ``az.loo(idata, var_name="y")``). Factor and condition statements are not
  observations and have no pointwise term.
* ``observed_data``: the observed values, one variable per observe statement (a loop of
  scalar observes is one vector), named after the observed variable (``observe y ~ ...``:
  "y"; ``observe ys[i] ~ ...``: "ys"), else after the statement's address ("obs@12:5").
* ``posterior_predictive`` / ``prior_predictive``: replicated observations from
  ``Model.predictive`` (``to_arviz(predictive=...)``), in the same variables.

The model and data come from the result (``Model.run`` records them) or are passed.
ArviZ is imported here, on first use (it is heavy).
"""
from __future__ import annotations

import re
import warnings
from typing import Any

import numpy as np
import torch

from ppl.semantics.errors import PPLDiagnosticWarning, PPLError
from ppl.semantics.predictive import MissingChoiceError, PointwiseLikelihood
from ppl.semantics.sampling import drive
from ppl.semantics.values import Particles

from .draws import Draws, data_array, observation_variables, posterior_draws, result_kind, stack

#: per-draw NUTS/HMC statistics (``inference.gradient_mcmc``: extra["draw_stats"]) -> ArviZ names
_DRAW_STATS = {"diverging": "diverging", "accept_stat": "acceptance_rate", "tree_depth": "tree_depth",
               "n_steps": "n_steps", "energy": "energy", "step_size": "step_size"}
_LOOP_ADDRESS = re.compile(r"^(?P<base>[^\[\]]+)\[(?P<i>\d+)\]$")


def _arviz():
    try:
        import arviz
    except ImportError:  # pragma: no cover - arviz is a dependency
        raise PPLError("to_arviz needs the arviz package", hint="pip install arviz") from None
    return arviz


def source_of(result, model=None, data=None):
    """(model, data) for re-scoring the result's draws: the arguments, else what
    ``Model.run`` recorded on the result; (None, None) when neither is known."""
    model = model if model is not None else getattr(result, "model", None)
    if data is None:
        data = getattr(result, "data", None)
    return model, (dict(data) if data is not None else {})


# ------------------------------------------------------------------------------ re-scoring
def rescore(model, data: dict, d: Draws):
    """Replay every draw's trace in ``model(**data)``: (lp [M] float64, pointwise address ->
    ([M, K] float64, present [M] or None), observed address -> value)."""
    columns = {k: v for k, v in d.columns.items() if k != "return"}
    prepared = model.prepare_data(model.bind((), data), "cpu")
    h = PointwiseLikelihood(columns, d.M, "cpu")
    drive(model.interpreter().run(model.entry, prepared, Particles.all(d.M, "cpu")), h)
    return h.log_weights, h.pointwise.sites(), h.observed


def log_likelihood_and_observed(model, pointwise: dict, observed: dict, d: Draws) -> tuple[dict, dict]:
    """({variable: [chains, draws, *shape]}, {variable: observed array}) from re-scoring."""
    groups = observation_variables(model.program, list(pointwise))
    loglik, obs = {}, {}
    for var, addrs in groups.items():
        partial = [a for a in addrs if pointwise[a][1] is not None]
        if partial:
            warnings.warn(PPLDiagnosticWarning(
                f"to_arviz: the observation '{partial[0]}' is made by only some draws (random control flow), "
                f"so '{var}' has no pointwise log-likelihood: left out of log_likelihood"), stacklevel=4)
            continue
        values = [data_array(observed.get(a)) for a in addrs]
        arrays = [pointwise[a][0].numpy() for a in addrs]
        if all(v is not None and v.size == a.shape[1] for v, a in zip(values, arrays)):
            arrays = [a.reshape(d.M, *v.shape) for v, a in zip(values, arrays)]
        else:
            arrays = [a[:, 0] if a.shape[1] == 1 else a for a in arrays]
        ll = stack(arrays, d.M)
        loglik[var] = ll.reshape(d.chains, d.draws, *ll.shape[1:])
        if all(v is not None for v in values):
            o = stack([v[None] for v in values], 1)
            obs[var] = o[0]
    return loglik, obs


# ------------------------------------------------------------------------------ posterior
def posterior_variables(d: Draws) -> tuple[dict, list[str]]:
    """({name: [chains, draws, ...] array}, names left out): numeric sites as float/int
    arrays (NaN where a site is absent), loop choices ``z[i]`` also stacked as ``z``."""
    out, left_out = {}, []
    for name, col in d.columns.items():
        if not isinstance(col, torch.Tensor):
            left_out.append(name)
            continue
        a = col.detach().cpu().numpy()
        mask = d.present.get(name)
        if mask is not None:
            a = a.astype(np.float64)
            a[~mask.numpy()] = np.nan
        out[name] = a.reshape(d.chains, d.draws, *a.shape[1:])
    for base, items in _loop_sites(out).items():
        out[base] = np.stack([out[n] for n in items], axis=2)
    return out, left_out


def _loop_sites(arrays: dict) -> dict[str, list[str]]:
    """base -> [base[0], base[1], ...] for loop choices with every index from 0 and one
    shape, where ``base`` is not a site of its own."""
    found: dict[str, dict[int, str]] = {}
    for name in arrays:
        m = _LOOP_ADDRESS.match(name)
        if m:
            found.setdefault(m["base"], {})[int(m["i"])] = name
    out = {}
    for base, by_index in found.items():
        items = [by_index.get(i) for i in range(len(by_index))]
        if base in arrays or None in items or len({arrays[n].shape for n in items}) != 1:
            continue
        out[base] = items
    return out


def sample_stats(result, d: Draws, lp) -> tuple[dict, dict]:
    """({stat: [chains, draws] array}, attrs) (module docstring)."""
    stats, attrs = {}, {"draws": d.how}
    if lp is not None:
        stats["lp"] = lp.numpy().reshape(d.chains, d.draws)
    if result_kind(result) == "chains":
        attrs["acceptance_rate"] = float(result.acceptance_rate)
        per_draw = result.extra.get("draw_stats") or {}
        if d.chains == result.chains and d.draws == result.draws:
            for key, name in _DRAW_STATS.items():
                if key in per_draw:
                    stats[name] = np.asarray(torch.as_tensor(per_draw[key]).cpu()).reshape(d.chains, d.draws)
        for key in ("divergences", "warmup_divergences", "max_tree_depth"):
            if key in result.extra:
                attrs[key] = result.extra[key]
    else:
        for key in ("log_evidence", "ess"):
            v = getattr(result, key, None)
            if v is not None:
                attrs[key] = float(v)
    return stats, attrs


# --------------------------------------------------------------------------------- export
def to_arviz(result, *, model=None, data=None, draws: int | None = None, seed: int = 0,
             log_likelihood: bool | None = None, predictive=None):
    """The result as ``arviz.InferenceData`` (module docstring; ``_ResultBase.to_arviz``)."""
    az = _arviz()
    d = posterior_draws(result, draws, seed)
    posterior, left_out = posterior_variables(d)
    model, data = source_of(result, model, data)
    if log_likelihood and model is None:
        raise PPLError("to_arviz(log_likelihood=True) needs the model and its data",
                       hint="pass model= and data= (results from Model.run know them)")
    if d.dropped and log_likelihood is not False:
        message = (f"to_arviz: the run did not keep {len(d.dropped)} sites (e.g. '{d.dropped[0]}'), so its draws "
                   "cannot be re-scored for the log-likelihood")
        if log_likelihood:
            raise PPLError(message, hint="run with keep='all' (or pass log_likelihood=False)")
        warnings.warn(PPLDiagnosticWarning(message + ": log_likelihood, lp and observed_data left out; run with "
                                           "keep='all' for them"), stacklevel=3)
        log_likelihood = False
    lp = loglik = observed = None
    if model is not None and log_likelihood is not False:
        try:
            lp, pointwise, observed_values = rescore(model, data, d)
        except MissingChoiceError as err:
            if log_likelihood:
                raise
            warnings.warn(PPLDiagnosticWarning(f"to_arviz: {err.message}; "
                                               "log_likelihood, lp and observed_data left out (run with keep='all' "
                                               "for them)"), stacklevel=3)
        else:
            loglik, observed = log_likelihood_and_observed(model, pointwise, observed_values, d)
    stats, attrs = sample_stats(result, d, lp)
    groups: dict[str, Any] = {"posterior": posterior, "sample_stats": stats or None,
                              "log_likelihood": loglik or None, "observed_data": observed or None}
    for p in _as_list(predictive):
        group = "prior_predictive" if p.kind == "prior" else "posterior_predictive"
        if group in groups and groups[group] is not None:
            raise PPLError(f"to_arviz: two {p.kind} predictives given", hint="pass one of each kind at most")
        groups[group] = {k: p.arviz_array(k) for k in p.names}
        if observed is None and p.observed:
            groups["observed_data"] = {k: v for k, v in p.observed.items() if v is not None} or None
    idata = az.from_dict(**{k: v for k, v in groups.items() if v is not None})
    idata.posterior.attrs.update({"method": result.method, "draws": d.how, **({"left_out": left_out} if left_out else {})})
    if "sample_stats" in idata.groups():
        idata.sample_stats.attrs.update({k: v for k, v in attrs.items() if v is not None})
    return idata


def _as_list(predictive) -> list:
    if predictive is None:
        return []
    return list(predictive) if isinstance(predictive, (list, tuple)) else [predictive]


# ---------------------------------------------------------------------------------- plots
def plot(result, kind: str, **kwargs):
    """``az.plot_<kind>(result.to_arviz(), **kwargs)`` for kind trace, rank or pair; returns
    the matplotlib Figure."""
    from .plots import _pyplot
    _pyplot()  # (the Agg backend without a display)
    az = _arviz()
    idata = to_arviz(result, log_likelihood=False)
    var_names = kwargs.pop("var_names", None)
    if var_names is None:
        var_names = [n for n in result._top_level() if n in idata.posterior.data_vars]
    if kind == "pair":
        kwargs.setdefault("divergences", "diverging" in getattr(idata, "sample_stats", {}))
    axes = getattr(az, f"plot_{kind}")(idata, var_names=var_names, **kwargs)
    fig = np.ravel(np.asarray(axes, dtype=object))[0].figure
    if fig.get_layout_engine() is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fig.tight_layout()  # (ArviZ's trace plot otherwise sets titles over the panels above)
    return fig
