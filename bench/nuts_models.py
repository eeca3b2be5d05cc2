"""The continuous model families of the NUTS benchmark, each as a ppl example and its
twins in NumPyro and Pyro: the SAME model, the SAME parameterisation (same priors, same
constrained sites, same non-centring) and the SAME site names, so that every contender
samples the same posterior over the same coordinates and min-ESS/s compares like with
like.

    from nuts_models import MODELS          # (bench/ on sys.path, as bench/run.py puts it)
    spec = MODELS["eight_schools"]
    data = spec.data()                     # the JSON data (lists, numbers)
    mcmc = MCMC(NUTS(spec.numpyro_model), ...); mcmc.run(key, **spec.numpyro_data())
    cols = spec.columns(mcmc.get_samples(group_by_chain=True))   # 'mu', 'theta_tilde[0]', ..., 'return[0]', ...

* ``numpyro_model(**numpyro_data())`` / ``pyro_model(**pyro_data())``: the twins. Their
  latent sites are exactly ``spec.sites`` (name -> per-draw shape); observations and
  factors are named ``obs*`` / ``factor*`` and are not latent. The return value of the
  ppl program is NOT a site of the twins: ``spec.returned(draws)`` computes it (numpy)
  from the latent sites, the same for every contender.
* ``spec.columns(draws)``: draws = site -> array [..., *shape] (numpy, jax or torch; any
  leading dims, e.g. [chains, draws]) -> a dict of scalar columns named as ppl's summary
  names them (``tau``, ``theta_tilde[3]``, ``return`` or ``return[3]``), each [...].
* ``ppl_draws(result)``: a ppl ``MCMCResult`` -> site -> array [chains, draws, *shape]
  (its values are chain-major), the input ``columns`` takes.
* ``bench/references.json`` (``bench/make_references.py``) holds the reference posterior
  of every column: mean, sd and their Monte Carlo standard errors (0 for a closed form or
  quadrature, whose numerical error is below 1e-6 of a posterior sd).

NumPyro and JAX are imported only when a NumPyro model or its data is used, so that the
caller can set ``JAX_PLATFORMS``/``XLA_FLAGS`` first and the module imports without them
(the ``bench`` extra: ``pip install -e .[bench]``).
"""
from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


# ------------------------------------------------------------------- lazy imports
def _numpyro():
    """(numpyro, numpyro.distributions, jax.numpy), imported on first use."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    return numpyro, dist, jnp


def _pyro():
    """(pyro, pyro.distributions, torch)."""
    import pyro
    import pyro.distributions as dist
    import torch
    return pyro, dist, torch


# ------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class NutsModel:
    """One model family: its ppl program and data, its two twins, its sites."""
    name: str
    ppl_file: pathlib.Path
    data_file: pathlib.Path
    numpyro_model: Callable[..., Any]
    pyro_model: Callable[..., Any]
    sites: dict[str, tuple[int, ...]]          # latent site -> per-draw shape (same in all three)
    returned: Callable[[dict], np.ndarray]     # the ppl program's return value from the sites (numpy)
    closed_form: bool = False                  # the reference is exact (closed form or quadrature)
    notes: str = ""

    def data(self) -> dict:
        """The data as ppl reads it (the JSON file)."""
        return json.loads(self.data_file.read_text())

    def numpyro_data(self, dtype=None) -> dict:
        """The data with its lists as jax arrays (float32 unless ``dtype`` or jax's x64 mode say otherwise)."""
        _, _, jnp = _numpyro()
        return {k: (jnp.asarray(v, dtype=dtype or jnp.result_type(float)) if isinstance(v, list) else v)
                for k, v in self.data().items()}

    def pyro_data(self, dtype=None) -> dict:
        """The data with its lists as torch tensors (torch's default dtype unless ``dtype`` is given)."""
        _, _, torch = _pyro()
        return {k: (torch.as_tensor(v, dtype=dtype or torch.get_default_dtype()) if isinstance(v, list) else v)
                for k, v in self.data().items()}

    def columns(self, draws: dict) -> dict[str, np.ndarray]:
        """Scalar columns named as ppl's summary names them, from site -> [..., *shape]."""
        arrays = {name: _as_numpy(draws[name]) for name in self.sites}
        returned = np.asarray(self.returned(arrays), dtype=np.float64)
        out = _flatten("return", returned, _per_draw_shape(self, arrays, returned))
        for name, shape in self.sites.items():
            out.update(_flatten(name, arrays[name], shape))
        return out

    def column_names(self) -> list[str]:
        """The names of ``columns`` (and of the references' entries)."""
        fake = {name: np.ones((1,) + shape) for name, shape in self.sites.items()}
        return list(self.columns(fake))


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _per_draw_shape(spec: NutsModel, arrays: dict, value: np.ndarray) -> tuple[int, ...]:
    """The per-draw shape of ``value``, which has the leading dims of the sites' arrays."""
    name, shape = next(iter(spec.sites.items()))
    lead = arrays[name].ndim - len(shape)
    return tuple(value.shape[lead:])


def _flatten(name: str, values: np.ndarray, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    values = np.asarray(values, dtype=np.float64)
    if not shape:
        return {name: values}
    lead = values.shape[:values.ndim - len(shape)]
    flat = values.reshape(lead + (-1,))
    return {f"{name}[{', '.join(map(str, idx))}]": flat[..., k]
            for k, idx in enumerate(np.ndindex(*shape))}


def ppl_draws(result) -> dict[str, np.ndarray]:
    """A ppl MCMCResult's latent sites as site -> [chains, draws, *shape] (chain-major)."""
    out = {}
    for name, tensor in result.samples.items():
        if name != "return":
            t = _as_numpy(tensor)
            out[name] = t.reshape((result.chains, result.draws) + t.shape[1:])
    return out


# ------------------------------------------------------------------- eight schools
def eight_schools_numpyro(y, sigma):
    numpyro, dist, jnp = _numpyro()
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    theta_tilde = numpyro.sample("theta_tilde", dist.Normal(jnp.zeros(y.shape[0]), 1.0).to_event(1))
    theta = mu + tau * theta_tilde
    numpyro.sample("obs", dist.Normal(theta, sigma).to_event(1), obs=y)


def eight_schools_pyro(y, sigma):
    pyro, dist, torch = _pyro()
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    theta_tilde = pyro.sample("theta_tilde", dist.Normal(torch.zeros(y.shape[0]), 1.0).to_event(1))
    theta = mu + tau * theta_tilde
    pyro.sample("obs", dist.Normal(theta, sigma).to_event(1), obs=y)


def eight_schools_return(s):
    return s["mu"][..., None] + s["tau"][..., None] * s["theta_tilde"]


# ------------------------------------------------------------------- calendar-year regression
def calendar_regression_numpyro(years, ys, sigma):
    numpyro, dist, _ = _numpyro()
    intercept = numpyro.sample("intercept", dist.Normal(0.0, 1000.0))
    slope = numpyro.sample("slope", dist.Normal(0.0, 10.0))
    numpyro.sample("obs", dist.Normal(intercept + slope * years, sigma).to_event(1), obs=ys)


def calendar_regression_pyro(years, ys, sigma):
    pyro, dist, _ = _pyro()
    intercept = pyro.sample("intercept", dist.Normal(0.0, 1000.0))
    slope = pyro.sample("slope", dist.Normal(0.0, 10.0))
    pyro.sample("obs", dist.Normal(intercept + slope * years, sigma).to_event(1), obs=ys)


def calendar_regression_return(s):
    return s["intercept"] + s["slope"] * 2021.0


# ------------------------------------------------------------------- AR(K)
def ar_numpyro(ys, K):
    numpyro, dist, jnp = _numpyro()
    T = ys.shape[0]
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 2.0))
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(K), 1.0).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    mean = alpha
    for k in range(K):
        mean = mean + beta[k] * ys[K - 1 - k:T - 1 - k]
    numpyro.sample("obs", dist.Normal(mean, sigma).to_event(1), obs=ys[K:])


def ar_pyro(ys, K):
    pyro, dist, torch = _pyro()
    T = ys.shape[0]
    alpha = pyro.sample("alpha", dist.Normal(0.0, 2.0))
    beta = pyro.sample("beta", dist.Normal(torch.zeros(K), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    mean = alpha
    for k in range(K):
        mean = mean + beta[k] * ys[K - 1 - k:T - 1 - k]
    pyro.sample("obs", dist.Normal(mean, sigma).to_event(1), obs=ys[K:])


def _ar_data_tail():
    """The last K observations of ar.json, newest first (for the forecast)."""
    d = json.loads((EXAMPLES / "ar.json").read_text())
    return np.asarray(d["ys"][::-1][:d["K"]], dtype=np.float64)


def ar_return(s):
    tail = _ar_data_tail()
    return s["alpha"] + (s["beta"] * tail).sum(axis=-1)


# ------------------------------------------------------------------- GARCH(1,1)
def garch_numpyro(rs, sigma1):
    numpyro, dist, jnp = _numpyro()
    import jax
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    alpha0 = numpyro.sample("alpha0", dist.HalfNormal(1.0))
    alpha1 = numpyro.sample("alpha1", dist.Uniform(0.0, 1.0))
    beta1 = numpyro.sample("beta1", dist.Uniform(0.0, 1.0 - alpha1))

    def step(sigma, r_prev):
        nxt = jnp.sqrt(alpha0 + alpha1 * (r_prev - mu) ** 2 + beta1 * sigma ** 2)
        return nxt, nxt

    _, rest = jax.lax.scan(step, jnp.asarray(sigma1, dtype=rs.dtype), rs[:-1])
    sigmas = jnp.concatenate([jnp.full((1,), sigma1, dtype=rs.dtype), rest])
    numpyro.sample("obs", dist.Normal(mu, sigmas).to_event(1), obs=rs)


def garch_pyro(rs, sigma1):
    pyro, dist, torch = _pyro()
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    alpha0 = pyro.sample("alpha0", dist.HalfNormal(1.0))
    alpha1 = pyro.sample("alpha1", dist.Uniform(0.0, 1.0))
    beta1 = pyro.sample("beta1", dist.Uniform(0.0, 1.0 - alpha1))
    sigma = torch.as_tensor(sigma1, dtype=rs.dtype)
    sigmas = [sigma]
    for t in range(1, rs.shape[0]):
        sigma = torch.sqrt(alpha0 + alpha1 * (rs[t - 1] - mu) ** 2 + beta1 * sigma ** 2)
        sigmas.append(sigma)
    pyro.sample("obs", dist.Normal(mu, torch.stack(sigmas, dim=-1)).to_event(1), obs=rs)


def _garch_data():
    d = json.loads((EXAMPLES / "garch.json").read_text())
    return np.asarray(d["rs"], dtype=np.float64), float(d["sigma1"])


def garch_return(s):
    """sigma_{T+1}, the next period's volatility (the recursion run over the data)."""
    rs, sigma1 = _garch_data()
    mu, a0, a1, b1 = s["mu"], s["alpha0"], s["alpha1"], s["beta1"]
    sigma = np.full(np.shape(mu), sigma1)
    for t in range(1, rs.size + 1):
        sigma = np.sqrt(a0 + a1 * (rs[t - 1] - mu) ** 2 + b1 * sigma ** 2)
    return sigma


# ------------------------------------------------------------------- GP regression
def gp_regression_numpyro(xs, ys):
    numpyro, dist, jnp = _numpyro()
    n = xs.shape[0]
    rho = numpyro.sample("rho", dist.InverseGamma(5.0, 5.0))
    alpha = numpyro.sample("alpha", dist.HalfNormal(2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    d2 = (xs[:, None] - xs[None, :]) ** 2
    cov = alpha ** 2 * jnp.exp(-d2 / (2 * rho ** 2)) + sigma ** 2 * jnp.eye(n)
    numpyro.sample("obs", dist.MultivariateNormal(jnp.zeros(n), covariance_matrix=cov), obs=ys)


def gp_regression_pyro(xs, ys):
    pyro, dist, torch = _pyro()
    n = xs.shape[0]
    rho = pyro.sample("rho", dist.InverseGamma(5.0, 5.0))
    alpha = pyro.sample("alpha", dist.HalfNormal(2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    d2 = (xs[:, None] - xs[None, :]) ** 2
    cov = alpha ** 2 * torch.exp(-d2 / (2 * rho ** 2)) + sigma ** 2 * torch.eye(n, dtype=xs.dtype)
    pyro.sample("obs", dist.MultivariateNormal(torch.zeros(n, dtype=xs.dtype), covariance_matrix=cov), obs=ys)


def gp_regression_return(s):
    return s["alpha"] ** 2 / (s["alpha"] ** 2 + s["sigma"] ** 2)


# ------------------------------------------------------------------- logistic regression
def logistic_regression_numpyro(x1, x2, ys):
    numpyro, dist, jnp = _numpyro()
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 2.5))
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(2), 2.5).to_event(1))
    logits = alpha + beta[0] * x1 + beta[1] * x2
    numpyro.sample("obs", dist.Bernoulli(logits=logits).to_event(1), obs=ys)


def logistic_regression_pyro(x1, x2, ys):
    pyro, dist, torch = _pyro()
    alpha = pyro.sample("alpha", dist.Normal(0.0, 2.5))
    beta = pyro.sample("beta", dist.Normal(torch.zeros(2), 2.5).to_event(1))
    logits = alpha + beta[0] * x1 + beta[1] * x2
    pyro.sample("obs", dist.Bernoulli(logits=logits).to_event(1), obs=ys)


def logistic_regression_return(s):
    """P(y = 1) at x1 = x2 = 1."""
    z = s["alpha"] + s["beta"][..., 0] + s["beta"][..., 1]
    return 1.0 / (1.0 + np.exp(-z))


# ------------------------------------------------------------------- 2-component mixture (marginal)
def mixture_marginal_numpyro(ys):
    numpyro, dist, jnp = _numpyro()
    w = numpyro.sample("w", dist.Beta(2.0, 2.0))
    mu1 = numpyro.sample("mu1", dist.Normal(0.0, 5.0))
    mu2 = numpyro.sample("mu2", dist.Normal(0.0, 5.0))
    numpyro.factor("factor_order", jnp.where(mu1 < mu2, 0.0, -jnp.inf))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    log_first = jnp.log(w) - 0.5 * ((ys - mu1) / sigma) ** 2
    log_second = jnp.log1p(-w) - 0.5 * ((ys - mu2) / sigma) ** 2
    numpyro.factor("factor_mix", jnp.sum(jnp.logaddexp(log_first, log_second) - jnp.log(sigma)
                                         - 0.5 * math.log(2 * math.pi)))


def mixture_marginal_pyro(ys):
    pyro, dist, torch = _pyro()
    w = pyro.sample("w", dist.Beta(2.0, 2.0))
    mu1 = pyro.sample("mu1", dist.Normal(0.0, 5.0))
    mu2 = pyro.sample("mu2", dist.Normal(0.0, 5.0))
    order = torch.where(mu1 < mu2, torch.zeros(()), torch.full((), -math.inf))
    pyro.factor("factor_order", order)
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    log_first = torch.log(w) - 0.5 * ((ys - mu1) / sigma) ** 2
    log_second = torch.log1p(-w) - 0.5 * ((ys - mu2) / sigma) ** 2
    pyro.factor("factor_mix", (torch.logaddexp(log_first, log_second) - torch.log(sigma)
                               - 0.5 * math.log(2 * math.pi)).sum(-1))


def mixture_marginal_return(s):
    return s["mu2"] - s["mu1"]


# ------------------------------------------------------------------- the table
def _entry(name, sites, *, closed_form=False, notes=""):
    g = globals()
    return NutsModel(name=name, ppl_file=EXAMPLES / f"{name}.ppl", data_file=EXAMPLES / f"{name}.json",
                     numpyro_model=g[f"{name}_numpyro"], pyro_model=g[f"{name}_pyro"], sites=sites,
                     returned=g[f"{name}_return"], closed_form=closed_form, notes=notes)


MODELS: dict[str, NutsModel] = {m.name: m for m in [
    _entry("eight_schools", {"mu": (), "tau": (), "theta_tilde": (8,)}, closed_form=True,
           notes="non-centred; reference by quadrature over tau (Gaussian given tau)"),
    _entry("calendar_regression", {"intercept": (), "slope": ()}, closed_form=True,
           notes="predictor = calendar year: corr(intercept, slope) ~ -1; closed form"),
    _entry("ar", {"alpha": (), "beta": (2,), "sigma": ()}, closed_form=True,
           notes="AR(2), 100 points; reference by quadrature over sigma (Gaussian given sigma)"),
    _entry("garch", {"mu": (), "alpha0": (), "alpha1": (), "beta1": ()},
           notes="GARCH(1,1), 150 points; beta1 ~ uniform(0, 1 - alpha1)"),
    _entry("gp_regression", {"rho": (), "alpha": (), "sigma": ()},
           notes="11x11 squared-exponential covariance from per-draw rho, alpha, sigma"),
    _entry("logistic_regression", {"alpha": (), "beta": (2,)}, notes="200 points, 3 coefficients"),
    _entry("mixture_marginal", {"w": (), "mu1": (), "mu2": (), "sigma": ()},
           notes="assignments summed out in a factor; ordered means by a condition"),
]}
