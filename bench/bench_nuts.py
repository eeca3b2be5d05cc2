"""NUTS: ppl ``nuts`` and ``tempering`` vs Pyro NUTS and NumPyro NUTS, min bulk-ESS per second.

How to run (from the repository root; ``bench`` extra: ``pip install numpyro jax jaxlib``)::

    .venv/bin/python bench/run.py --only bench_nuts --clock cpu           # the full benchmark
    .venv/bin/python bench/run.py --only bench_nuts --clock cpu --quick   # a smoke run (~1-2 min)
    .venv/bin/python bench/bench_nuts.py --help                           # standalone, more options:
    .venv/bin/python bench/bench_nuts.py --clock cpu --models eight_schools --repeats 3 \\
        --chains 4 --warmup 1000 --samples 1000 --pyro-repeats 1 --pyro-timeout 900 \\
        --json bench/results/bench_nuts.json
    .venv/bin/python bench/bench_nuts.py --overview bench/results/bench_nuts*.json  # saved runs, one table,
                                          # errors recomputed against bench/references.json as it is now

Every contender runs with one thread whatever ``run.py --threads`` says; ``run.py``'s
``--repeats`` is capped at 5 here. The JSON (default ``bench/results/bench_nuts.json``,
written after every model) holds the protocol, every repeat's raw figures (with the
posterior mean and sd of every column, so errors can be rescored), the medians, the
ratios and verdicts, and the load averages.

What is measured, per model family (``bench/nuts_models.py``: each ppl example with its
NumPyro and Pyro twins, same sites and parameterisation; reference posteriors in
``bench/references.json``, errors "n/a" where it has none), side by side in one run:

* contenders: ppl ``nuts`` (all chains as one batch), ppl ``tempering`` (adaptive tempered
  SMC), Pyro NUTS (its default ``MCMC``/``NUTS``; the chains one after the other in the
  one process: Pyro's own multi-chain mode forks one process per chain, i.e. one core per
  chain, which would not be single-threaded), NumPyro NUTS with
  ``chain_method="vectorized"`` (all chains as one batch, as ppl).
* the same protocol for every MCMC contender: ``--chains`` chains x ``--warmup`` warm-up
  x ``--samples`` kept draws (default 4 x 1000 x 1000, Stan's defaults; ``--quick``:
  2 x 150 x 150 on eight schools only); tempering gets chains x samples particles (the
  same number of output draws).
* every contender runs in a fresh Python process per repeat (as a user runs it), with
  one thread: ``OMP/MKL/OPENBLAS_NUM_THREADS=1``, ``torch.set_num_threads(1)``, and for
  JAX ``XLA_FLAGS=--xla_force_host_platform_device_count=1
  --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``,
  ``JAX_PLATFORMS=cpu``, set before anything is imported. The timed span starts after
  the imports and the model's construction and covers the inference call alone
  (``Model.run`` / ``MCMC.run``): first-call costs (ppl's tracing, JAX's compilation)
  fall inside it. Import times are reported apart (not counted).
* time: ``--clock cpu`` (the process's CPU time: on this shared 2-core machine the wall
  clock counts the time a process waits for a core) or ``wall``.
* min bulk ESS: ``inference.diagnostics.mcmc_ess`` on the [chains, draws] array of every
  scalar column of the latent sites (``NutsModel.columns``: vector sites split into their
  components; the return value left out), the minimum over columns; computed in the
  parent process the same way for every MCMC contender. Tempering
  returns a weighted population, not chains: its "ESS" is min over columns of
  min(Kish ESS 1 / sum w^2, the number of distinct values of the site) -- an upper bound
  of its effective sample size, marked with a dagger in the table, not a bulk ESS.
* ESS/s with warm-up included (the whole inference call) and excluded (the sampling
  phase alone: ppl nuts' ``extra["phase_seconds"]``, Pyro's time after its last warm-up
  iteration via ``hook_fn``, NumPyro's ``MCMC.run`` after ``MCMC.warmup`` in the same
  fresh process). NumPyro is reported twice: "compile counted" (the times as measured:
  warm-up included = one ``MCMC.run`` in a fresh process, as a user runs it; warm-up
  excluded = the ``MCMC.run`` after ``MCMC.warmup``, which compiles the sampling loop
  again) and "compile excluded" (the same runs less the JAX compilation inside them,
  measured with ``jax.monitoring`` listeners on the three compile events -- tracing,
  lowering, backend compilation -- taking the union of the nested spans; with ``--clock
  cpu`` the CPU time between the outermost span's start and end). The compile time is
  printed apart.
* accuracy: per contender, max over the reference's columns (latent and return) of
  |posterior mean - reference mean| / reference sd and of |posterior sd - reference sd| /
  reference sd (median over repeats). Tempering's target (issue 11: every mean within
  0.1 posterior sd) is printed with PASS/FAIL.
* "lf/draw": leapfrog steps per draw in the sampling phase (ppl nuts, NumPyro), to tell a
  slower gradient from a longer trajectory.
* ratios of ppl nuts' ESS/s (medians over repeats, measured in the same run) to Pyro NUTS,
  NumPyro compile counted and NumPyro compile excluded, against the targets of issue 11:
  >= 10x Pyro, >= 1x NumPyro compile counted, >= 1/3x NumPyro compile excluded; PASS/FAIL
  is printed for warm-up included (the headline: the time a user waits) and excluded.
* compilation cache: ppl compiles the potential's graph with TorchInductor, whose on-disk
  cache keeps a compiled graph for later processes (``inference.compiled``); by default it
  is shared, so a model compiled by an earlier run or repeat is loaded (~0.3-1.5 s), not
  compiled (2-40 s). ``--cold-compile-cache`` gives each ppl process an empty cache (the
  first run of a model on a machine). NumPyro's JAX cache is off (its default): every
  NumPyro process compiles.
* repeats: medians of ``--repeats`` (capped at 5 in ``run``); the contenders' order
  alternates each round; Pyro, much slower, runs ``--pyro-repeats`` times (default 1),
  each process stopped after ``--pyro-timeout`` seconds (wall clock; reported as timed
  out, no figure). ``/proc/loadavg`` is recorded before every process.

A contender that is not available (ppl ``nuts`` before it is registered, NumPyro not
installed), fails, or times out is printed as such with the reason; no number is made up
for it, and a ratio without both figures is "n/a".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "bench_nuts.json")

#: one thread for every contender, set in each child's environment before any import
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_cpu_multi_thread_eigen=false "
                 "intra_op_parallelism_threads=1",
    "JAX_PLATFORMS": "cpu",
}

#: the JAX events whose (nested) spans make up compilation
JAX_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                      "/jax/core/compile/jaxpr_to_mlir_module_duration",
                      "/jax/core/compile/backend_compile_duration")

CONTENDERS = ("ppl nuts", "ppl tempering", "pyro nuts", "numpyro nuts")
#: issue 11: tempered SMC gives every posterior mean within 0.1 posterior sd
TEMPERING_MEAN_ERR = 0.1
#: --cold-compile-cache: each ppl process gets an empty TorchInductor cache directory (as
#: the first run of a model on a machine); otherwise Inductor's on-disk cache is shared by
#: every run, and a graph compiled by an earlier run or repeat is loaded, not compiled
FRESH_COMPILE_CACHE = {"on": False}
TARGETS = {"pyro nuts": 10.0, "numpyro (compile counted)": 1.0, "numpyro (compile excluded)": 1.0 / 3.0}


@dataclass
class Protocol:
    """The same chains x warm-up x kept draws for every MCMC contender; tempering gets
    chains * samples particles."""

    chains: int = 4
    warmup: int = 1000
    samples: int = 1000


QUICK = Protocol(chains=2, warmup=150, samples=150)


# ----------------------------------------------------------------------------- models
REFERENCES = os.path.join(HERE, "references.json")


@dataclass
class BenchModel:
    """One model family (``nuts_models.NutsModel``: the ppl program, its NumPyro and Pyro
    twins, their common site names) with its reference posterior: column -> (mean, sd),
    None when ``bench/references.json`` has none for it."""

    spec: Any
    reference: dict | None
    reference_method: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def latent(self) -> list[str]:
        """The scalar columns of the latent sites (min ESS is taken over these; the
        return value, a function of them, is left out)."""
        return [c for c in self.spec.column_names() if not (c == "return" or c.startswith("return["))]


def load_references(path: str = REFERENCES) -> dict:
    """model -> (column -> (mean, sd), how it was computed); {} when the file is missing."""
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        raw = json.load(fh)
    return {name: ({c: (v["mean"], v["sd"]) for c, v in entry["columns"].items()}, str(entry.get("method", "")))
            for name, entry in raw.items() if isinstance(entry, dict) and "columns" in entry}


def load_models() -> list[BenchModel]:
    """The model families of ``bench/nuts_models.py`` with their references."""
    from nuts_models import MODELS  # bench/ is on sys.path
    refs = load_references()
    out = []
    for name, spec in MODELS.items():
        ref, how = refs.get(name, (None, "no reference in bench/references.json"))
        out.append(BenchModel(spec, ref, how))
    return out


def model_by_name(name: str) -> BenchModel:
    for m in load_models():
        if m.name == name:
            return m
    raise KeyError(f"no benchmark model named {name!r}")


# ----------------------------------------------------------------------------- metrics
def min_bulk_ess(draws: dict, columns) -> tuple[float, str]:
    """min over ``columns`` of ``inference.diagnostics.mcmc_ess`` of draws[column]
    [chains, draws]: (the ESS, the column that has it)."""
    import torch
    from ppl.inference.diagnostics import mcmc_ess
    columns = list(columns)
    stacked = torch.stack([torch.as_tensor(draws[c], dtype=torch.float64) for c in columns])  # [K, C, S]
    ess = mcmc_ess(stacked)
    k = int(torch.argmin(ess))
    return float(ess[k]), columns[k]


def posterior_errors(means: dict, sds: dict, reference: dict | None) -> dict:
    """max over the reference's columns of |mean - ref mean| / ref sd and |sd - ref sd| /
    ref sd, with the worst columns (None without a reference)."""
    if not reference:
        return {"mean_err": None, "mean_err_site": None, "sd_err": None, "sd_err_site": None}
    mean_err = {c: abs(means[c] - m) / sd for c, (m, sd) in reference.items()}
    sd_err = {c: abs(sds[c] - sd) / sd for c, (m, sd) in reference.items()}
    worst_m = max(mean_err, key=mean_err.get)
    worst_s = max(sd_err, key=sd_err.get)
    return {"mean_err": mean_err[worst_m], "mean_err_site": worst_m,
            "sd_err": sd_err[worst_s], "sd_err_site": worst_s}


def chain_moments(draws: dict, columns) -> tuple[dict, dict]:
    """Posterior means and sds of equally weighted draws [C, S] (all chains pooled)."""
    means = {c: float(draws[c].mean()) for c in columns}
    sds = {c: float(draws[c].std()) for c in columns}
    return means, sds


# ----------------------------------------------------------------------------- children
# Each contender runs in a child: `python bench_nuts.py --child SPEC OUT.npz`; it prints
# one JSON line (times) and writes its draws [C, S] per scalar site to OUT.npz.

def _clock(name: str) -> Callable[[], float]:
    return time.process_time if name == "cpu" else time.perf_counter


class CompileTimer:
    """JAX compile time inside a run: ``jax.monitoring`` tells when each compile event
    starts (a scalar event with the start time) and ends (a time span); nested spans are
    merged by counting depth, and the chosen clock is read at the outermost start and end."""

    def __init__(self, clock: Callable[[], float]):
        self.clock, self.depth, self.started, self.total, self.spans = clock, 0, 0.0, 0.0, []

    def on_start(self, event, value, **_):
        if event in JAX_COMPILE_EVENTS:
            if self.depth == 0:
                self.started = self.clock()
            self.depth += 1

    def on_end(self, event, start, end, **_):
        if event in JAX_COMPILE_EVENTS:
            self.spans.append((start, end))
            self.depth -= 1
            if self.depth == 0:
                self.total += self.clock() - self.started

    def install(self):
        import jax.monitoring as mon
        mon.register_scalar_listener(self.on_start)
        mon.register_event_time_span_listener(self.on_end)

    def take(self) -> float:
        """The compile time since the last take (and reset)."""
        t, self.total, self.spans = self.total, 0.0, []
        return t


def child_numpyro(model: BenchModel, proto: Protocol, seed: int, clock: Callable[[], float]) -> tuple[dict, dict]:
    t0 = clock()
    import jax
    import numpy as np
    from numpyro.infer import MCMC, NUTS
    t_import = clock() - t0
    timer = CompileTimer(clock)
    timer.install()
    spec = model.spec
    data = spec.numpyro_data()

    def mcmc():
        return MCMC(NUTS(spec.numpyro_model), num_warmup=proto.warmup, num_samples=proto.samples,
                    num_chains=proto.chains, chain_method="vectorized", progress_bar=False)

    def draws(m):
        out = {k: np.asarray(v) for k, v in m.get_samples(group_by_chain=True).items()}  # waits for the result
        return spec.columns({k: out[k] for k in spec.sites})

    # (a) as a user runs it: one MCMC.run
    m = mcmc()
    t0 = clock()
    m.run(jax.random.PRNGKey(seed), **data)
    user = draws(m)
    t_user = clock() - t0
    c_user = timer.take()
    # (b) warm-up and sampling apart, to time the sampling phase
    m = mcmc()
    t0 = clock()
    m.warmup(jax.random.PRNGKey(seed + 10_000), **data, collect_warmup=False)
    jax.block_until_ready(m.post_warmup_state)
    t_warm = clock() - t0
    c_warm = timer.take()
    t0 = clock()
    m.run(m.post_warmup_state.rng_key, **data, extra_fields=("num_steps",))
    split = draws(m)
    t_sample = clock() - t0
    c_sample = timer.take()
    steps = float(np.mean(np.asarray(m.get_extra_fields()["num_steps"])))
    times = {"import": t_import, "total": t_user, "compile_total": c_user, "warmup_b": t_warm,
             "compile_warmup_b": c_warm, "sampling": t_sample, "compile_sampling": c_sample,
             "leapfrog_per_draw": steps}
    out = {"a/" + k: v for k, v in user.items()}
    out.update({"b/" + k: v for k, v in split.items()})
    return times, out


def child_pyro(model: BenchModel, proto: Protocol, seed: int, clock: Callable[[], float]) -> tuple[dict, dict]:
    t0 = clock()
    import numpy as np
    import pyro
    import torch
    from pyro.infer import MCMC, NUTS
    torch.set_num_threads(1)
    t_import = clock() - t0
    spec = model.spec
    data = spec.pyro_data()
    warmup_done: list[float] = []

    def hook(kernel, samples, stage, i):
        if stage.startswith("Warmup") and i == proto.warmup - 1:
            warmup_done.append(clock())

    chains = []
    total = sampling = 0.0
    for c in range(proto.chains):  # one after the other: Pyro's multi-chain mode forks a process per chain
        pyro.set_rng_seed(seed * 1000 + c)
        pyro.clear_param_store()
        m = MCMC(NUTS(spec.pyro_model), num_samples=proto.samples, warmup_steps=proto.warmup, num_chains=1,
                 disable_progbar=True, hook_fn=hook)
        warmup_done.clear()
        t0 = clock()
        m.run(**data)
        t1 = clock()
        total += t1 - t0
        sampling += t1 - (warmup_done[0] if warmup_done else t0)
        chains.append({k: v.detach().double().numpy() for k, v in m.get_samples(group_by_chain=True).items()})
    samples = {k: np.concatenate([ch[k] for ch in chains], 0) for k in spec.sites}
    return {"import": t_import, "total": total, "sampling": sampling}, spec.columns(samples)


def _ppl_model(model: BenchModel):
    import ppl
    return ppl.model(str(model.spec.ppl_file))


def child_ppl_nuts(model: BenchModel, proto: Protocol, seed: int, clock: Callable[[], float]) -> tuple[dict, dict]:
    t0 = clock()
    import torch
    import ppl  # noqa: F401
    from nuts_models import ppl_draws
    torch.set_num_threads(1)
    t_import = clock() - t0
    m = _ppl_model(model)
    data = model.spec.data()
    t0 = clock()
    res = m.run("nuts", data, particles=proto.chains, samples=proto.samples, burn_in=proto.warmup, seed=seed)
    total = clock() - t0
    extra = res.extra or {}
    phases = extra.get("phase_seconds")
    key = "cpu" if clock is time.process_time else "wall"
    sampling = float(phases["sampling"][key]) if phases else None
    info = {"import": t_import, "total": total, "sampling": sampling,
            "divergences": _total(extra.get("divergences")), "warnings": [str(w) for w in res.warnings],
            "traced": extra.get("traced"), "why_not_traced": extra.get("why_not_traced"),
            "leapfrog_per_draw": (extra["leapfrog_steps"] / (proto.chains * proto.samples)
                                  if "leapfrog_steps" in extra else None),
            "tree_depth_mean": extra.get("tree_depth_mean"), "step_size": extra.get("step_size")}
    return info, model.spec.columns(ppl_draws(res))


def _total(v):
    """The sum of a per-chain count (a number, list or tensor), None when absent."""
    if v is None:
        return None
    import numpy as np
    return float(np.sum(np.asarray(v.tolist() if hasattr(v, "tolist") else v, dtype=np.float64)))


def child_ppl_tempering(model: BenchModel, proto: Protocol, seed: int,
                        clock: Callable[[], float]) -> tuple[dict, dict]:
    t0 = clock()
    import numpy as np
    import torch
    import ppl  # noqa: F401
    torch.set_num_threads(1)
    t_import = clock() - t0
    m = _ppl_model(model)
    data = model.spec.data()
    t0 = clock()
    res = m.run("tempering", data, particles=proto.chains * proto.samples, seed=seed, adapt=True)
    total = clock() - t0
    w = res.weights.double().numpy()
    sites = {k: torch.as_tensor(res.samples[k]).double().numpy()[None] for k in model.spec.sites}  # [1, N, ...]
    out = {k: v[0] for k, v in model.spec.columns(sites).items()}
    distinct = {c: int(len(np.unique(out[c]))) for c in model.latent}
    out["__weights__"] = w
    return {"import": t_import, "total": total, "sampling": total, "kish_ess": float(1.0 / (w * w).sum()),
            "distinct": distinct, "warnings": [str(x) for x in res.warnings]}, out


CHILDREN = {"ppl nuts": child_ppl_nuts, "ppl tempering": child_ppl_tempering, "pyro nuts": child_pyro,
            "numpyro nuts": child_numpyro}


def child_main(spec_json: str, out_path: str) -> int:
    import numpy as np
    spec = json.loads(spec_json)
    clock = _clock(spec["clock"])
    model = model_by_name(spec["model"])
    proto = Protocol(**spec["protocol"])
    info, draws = CHILDREN[spec["contender"]](model, proto, int(spec["seed"]), clock)
    np.savez(out_path, **draws)
    print("RESULT " + json.dumps(info))
    return 0


def availability() -> dict:
    """contender -> None when it can run, else why not (checked in this process)."""
    out = {}
    try:
        from ppl.inference.methods import METHODS
        out["ppl nuts"] = None if "nuts" in METHODS else 'not available: method "nuts" is not registered yet'
        out["ppl tempering"] = None if "tempering" in METHODS else "not available: no tempering"
    except ImportError as err:
        out["ppl nuts"] = out["ppl tempering"] = f"not available: {err}"
    import importlib.util
    out["pyro nuts"] = None if importlib.util.find_spec("pyro") else "not available: pyro not installed"
    out["numpyro nuts"] = None if importlib.util.find_spec("numpyro") and importlib.util.find_spec("jax") else \
        "not available: numpyro/jax not installed (pip install numpyro jax jaxlib)"
    return out


def loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []


def run_child(contender: str, model: str, proto: Protocol, seed: int, clock: str, timeout: float) -> dict:
    """One fresh process; returns its figures and draws (or {"error": ...})."""
    import numpy as np
    env = dict(os.environ, **SINGLE_THREAD_ENV)
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    spec = {"contender": contender, "model": model, "protocol": vars(proto), "seed": seed, "clock": clock}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "draws.npz")
        if FRESH_COMPILE_CACHE["on"] and contender.startswith("ppl"):
            env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
        load = loadavg()
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec), out],
                                  env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s", "load": load}
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "load": load}
        info = json.loads(lines[-1][len("RESULT "):])
        with np.load(out) as z:
            draws = {k: z[k] for k in z.files}
    info["load"] = load
    info["draws"] = draws
    return info


# ----------------------------------------------------------------------------- one repeat's figures
def mcmc_figures(draws: dict, model: BenchModel, total: float, sampling: float | None) -> dict:
    """One MCMC repeat: min bulk ESS over the latent columns, ESS/s, errors."""
    ess, column = min_bulk_ess(draws, model.latent)
    means, sds = chain_moments(draws, [c for c in draws if not c.startswith("__")])
    return {"min_ess": ess, "min_ess_site": column, "seconds": total, "sampling_seconds": sampling,
            "rate_incl": ess / total, "rate_excl": (ess / sampling) if sampling else None,
            **posterior_errors(means, sds, model.reference), "means": means, "sds": sds}


def tempering_figures(info: dict, model: BenchModel) -> dict:
    """One tempering repeat: its population's "ESS" (see the module docstring), errors of
    the weighted moments."""
    import numpy as np
    draws = info["draws"]
    w = draws["__weights__"]
    columns = [c for c in draws if not c.startswith("__")]
    means = {c: float(np.sum(w * draws[c])) for c in columns}
    sds = {c: float(math.sqrt(max(np.sum(w * (draws[c] - means[c]) ** 2), 0.0))) for c in columns}
    per_column = {c: min(info["kish_ess"], info["distinct"][c]) for c in model.latent}
    column = min(per_column, key=per_column.get)
    ess = float(per_column[column])
    return {"min_ess": ess, "min_ess_site": column, "ess_kind": "min(Kish ESS, distinct values): an upper bound",
            "seconds": info["total"], "sampling_seconds": info["total"], "rate_incl": ess / info["total"],
            "rate_excl": ess / info["total"], "warnings": info.get("warnings", []),
            **posterior_errors(means, sds, model.reference), "means": means, "sds": sds}


def numpyro_figures(info: dict, model: BenchModel) -> dict:
    """Two rows: compile counted and compile excluded (see the module docstring)."""
    d = info["draws"]
    a = {k[2:]: v for k, v in d.items() if k.startswith("a/")}
    b = {k[2:]: v for k, v in d.items() if k.startswith("b/")}
    counted = mcmc_figures(a, model, info["total"], None)
    split = mcmc_figures(b, model, info["sampling"], info["sampling"])
    counted["rate_excl"] = split["rate_excl"]
    counted["sampling_seconds"] = info["sampling"]
    excluded = dict(counted)
    excluded["seconds"] = info["total"] - info["compile_total"]
    excluded["sampling_seconds"] = info["sampling"] - info["compile_sampling"]
    excluded["rate_incl"] = counted["min_ess"] / excluded["seconds"]
    excluded["rate_excl"] = split["min_ess"] / excluded["sampling_seconds"]
    for row in (counted, excluded):
        row["leapfrog_per_draw"] = info.get("leapfrog_per_draw")
        row["compile_seconds"] = info["compile_total"]
        row["compile_sampling_seconds"] = info["compile_sampling"]
        row["split_min_ess"] = split["min_ess"]
    return {"numpyro (compile counted)": counted, "numpyro (compile excluded)": excluded}


def figures(contender: str, info: dict, model: BenchModel) -> dict:
    """Row name -> figures of one repeat."""
    if contender == "numpyro nuts":
        return numpyro_figures(info, model)
    if contender == "ppl tempering":
        return {contender: tempering_figures(info, model)}
    row = mcmc_figures(info["draws"], model, info["total"], info.get("sampling"))
    for k in ("divergences", "warnings", "traced", "why_not_traced", "leapfrog_per_draw", "tree_depth_mean",
              "step_size"):
        if k in info:
            row[k] = info[k]
    return {contender: row}


# ----------------------------------------------------------------------------- the benchmark
ROWS = ["ppl nuts", "ppl tempering", "pyro nuts", "numpyro (compile counted)", "numpyro (compile excluded)"]
ROW_OF = {"ppl nuts": ["ppl nuts"], "ppl tempering": ["ppl tempering"], "pyro nuts": ["pyro nuts"],
          "numpyro nuts": ["numpyro (compile counted)", "numpyro (compile excluded)"]}


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def bench_model(model: BenchModel, proto: Protocol, repeats: int, pyro_repeats: int, clock: str,
                available: dict, timeout: float, pyro_timeout: float | None = None, log=print) -> dict:
    """Every available contender on one model, repeats interleaved; the medians."""
    order = [c for c in CONTENDERS if available.get(c) is None]
    per_row: dict[str, list[dict]] = {r: [] for r in ROWS}
    errors: dict[str, list[str]] = {}
    extras: dict[str, list[dict]] = {}
    for r in range(repeats):
        for contender in (order if r % 2 == 0 else order[::-1]):
            if contender == "pyro nuts" and r >= pyro_repeats:
                continue
            limit = pyro_timeout if contender == "pyro nuts" and pyro_timeout else timeout
            info = run_child(contender, model.name, proto, seed=r + 1, clock=clock, timeout=limit)
            if "error" in info:
                errors.setdefault(contender, []).append(info["error"])
                log(f"    [{model.name}] {contender} repeat {r + 1}: ERROR {info['error']}")
                continue
            rows = figures(contender, info, model)
            for name, row in rows.items():
                row["load"] = info["load"]
                row["import_seconds"] = info.get("import")
                per_row[name].append(row)
            extras.setdefault(contender, []).append({"load": info["load"]})
            log(f"    [{model.name}] {contender} repeat {r + 1}: "
                + ", ".join(f"{n}: min ESS {row['min_ess']:.0f} in {row['seconds']:.2f} s" for n, row in rows.items()))
    summary = {}
    for name, runs in per_row.items():
        if not runs:
            continue
        summary[name] = {
            "repeats": len(runs),
            **{k: _median([x.get(k) for x in runs]) for k in
               ("min_ess", "seconds", "sampling_seconds", "rate_incl", "rate_excl", "mean_err", "sd_err",
                "compile_seconds", "import_seconds", "leapfrog_per_draw")},
            "mean_err_site": runs[-1]["mean_err_site"], "sd_err_site": runs[-1]["sd_err_site"],
            "min_ess_site": runs[-1]["min_ess_site"], "runs": runs,
        }
        if name == "ppl nuts":
            summary[name]["divergences"] = [x.get("divergences") for x in runs]
            summary[name]["traced"] = [x.get("traced") for x in runs]
            summary[name]["why_not_traced"] = runs[-1].get("why_not_traced")
        if name in ("ppl nuts", "ppl tempering"):
            summary[name]["warnings"] = runs[-1].get("warnings", [])
    return {"summary": summary, "errors": errors, "ratios": ratios(summary, available)}


def ratios(summary: dict, available: dict) -> dict:
    """ppl nuts' ESS/s over each peer's (warm-up included and excluded) with the targets."""
    out = {}
    nuts = summary.get("ppl nuts")
    for peer, target in TARGETS.items():
        peer_row = summary.get(peer)
        entry = {"target": target}
        for kind in ("rate_incl", "rate_excl"):
            if nuts is None or peer_row is None or not nuts.get(kind) or not peer_row.get(kind):
                why = (available.get("ppl nuts") or "ppl nuts has no result") if nuts is None else (
                    f"no figure for {peer}" if peer_row is None else "no warm-up-excluded time")
                entry[kind] = {"ratio": None, "verdict": f"n/a ({why})"}
                continue
            ratio = nuts[kind] / peer_row[kind]
            entry[kind] = {"ratio": ratio, "verdict": "PASS" if ratio >= target else "FAIL"}
        out[peer] = entry
    return out


def _fmt(x, spec=".1f", none="n/a"):
    return none if x is None else format(x, spec)


def print_model(model: BenchModel, result: dict, available: dict, proto: Protocol, clock: str) -> None:
    print(f"\n{model.name}: {proto.chains} chains x {proto.warmup} warm-up x {proto.samples} draws "
          f"(tempering: {proto.chains * proto.samples} particles), clock {clock}, medians over repeats; "
          f"reference: {model.reference_method}")
    print(f"  {'contender':<27} {'n':>2} {'min ESS':>8} {'s total':>8} {'s sampl.':>8} {'ESS/s incl':>10} "
          f"{'ESS/s excl':>10} {'mean err':>8} {'sd err':>7} {'lf/draw':>7}  notes")
    summary = result["summary"]
    for row in ROWS:
        contender = next(c for c, rows in ROW_OF.items() if row in rows)
        s = summary.get(row)
        if s is None:
            why = available.get(contender) or "; ".join(result["errors"].get(contender, ["no result"]))
            print(f"  {row:<27} {why}")
            continue
        dagger = "\u2020" if row == "ppl tempering" else " "
        note = []
        if s.get("compile_seconds") is not None:
            note.append(f"JAX compile {s['compile_seconds']:.2f} s")
        if row == "ppl nuts" and s.get("divergences") and any(d for d in s["divergences"] if d):
            note.append(f"divergences {s['divergences']}")
        if row == "ppl nuts" and not all(s.get("traced") or [True]):
            note.append(f"not traced: {s.get('why_not_traced')}")
        if s.get("warnings"):
            note.append(f"{len(s['warnings'])} warning(s) (in the JSON)")
        print(f"  {row:<27} {s['repeats']:>2} {s['min_ess']:>7.0f}{dagger} {s['seconds']:>8.2f} "
              f"{_fmt(s['sampling_seconds'], '.2f'):>8} {s['rate_incl']:>10.1f} {_fmt(s['rate_excl']):>10} "
              f"{_fmt(s['mean_err'], '.3f'):>8} {_fmt(s['sd_err'], '.3f'):>7} "
              f"{_fmt(s.get('leapfrog_per_draw'), '.1f', ''):>7}  {'; '.join(note)}")
    for peer, entry in result["ratios"].items():
        parts = []
        for kind, label in (("rate_incl", "warm-up incl."), ("rate_excl", "warm-up excl.")):
            e = entry[kind]
            parts.append(f"{label} {_fmt(e['ratio'], '.2f')}x {e['verdict']}" if e["ratio"] is not None
                         else f"{label} {e['verdict']}")
        print(f"  ppl nuts / {peer:<26} (target >= {entry['target']:.2g}x): " + ", ".join(parts))
    temp = summary.get("ppl tempering")
    if temp and temp.get("mean_err") is not None:
        verdict = "PASS" if temp["mean_err"] <= TEMPERING_MEAN_ERR else "FAIL"
        print(f"  ppl tempering: max |mean error| {temp['mean_err']:.3f} sd at {temp['mean_err_site']} "
              f"(target <= {TEMPERING_MEAN_ERR} sd): {verdict}")


SHORT = {"ppl nuts": "nuts", "ppl tempering": "temper.", "pyro nuts": "pyro", "numpyro (compile counted)": "np+comp",
         "numpyro (compile excluded)": "np-comp"}


def print_overview(report: dict) -> None:
    """One line per model: ESS/s (warm-up included) of every row, ppl nuts' ratios and
    the max mean errors; then how many models meet each target."""
    models = report["models"]
    if not models:
        return
    print("\nOverview: min bulk-ESS/s, warm-up included (excluded in brackets); ppl nuts' ratios (warm-up "
          "included); max |mean error| in reference sds. np+comp / np-comp: NumPyro with its JAX compilation "
          "counted / excluded; temper.: ESS an upper bound (min(Kish, distinct))")
    head = "".join(f"{SHORT[r]:>17}" for r in ROWS)
    print(f"  {'model':<20}{head}   {'/pyro':>6} {'/np+comp':>8} {'/np-comp':>8}   mean err (" +
          ", ".join(SHORT[r] for r in ROWS[:4]) + ")")
    met = {peer: [0, 0] for peer in TARGETS}
    for name, result in models.items():
        cells = []
        for r in ROWS:
            s = result["summary"].get(r)
            cells.append(f"{s['rate_incl']:>8.1f} ({_fmt(s['rate_excl'], '.0f'):>6})" if s else f"{'-':>17}")
        ratio_cells = []
        for peer in TARGETS:
            e = result["ratios"][peer]["rate_incl"]
            ratio_cells.append(_fmt(e["ratio"], ".2f", "-"))
            if e["ratio"] is not None:
                met[peer][1] += 1
                met[peer][0] += e["verdict"] == "PASS"
        errs = [_fmt((result["summary"].get(r) or {}).get("mean_err"), ".2f", "-") for r in ROWS[:4]]
        print(f"  {name:<20}{''.join(f'{c:>17}' for c in cells)}   {ratio_cells[0]:>6} {ratio_cells[1]:>8} "
              f"{ratio_cells[2]:>8}   {', '.join(errs)}")
    print("  targets (warm-up included): " + "; ".join(
        f"ppl nuts / {peer} >= {TARGETS[peer]:.2g}x on {k} of {n} models" for peer, (k, n) in met.items()))


def run(repeats: int = 5, quick: bool = False, *, clock: str | None = None, models: list[str] | None = None,
        protocol: Protocol | None = None, pyro_repeats: int = 1, json_path: str | None = RESULTS,
        contenders: list[str] | None = None, timeout: float = 3600.0, pyro_timeout: float | None = None,
        cold_compile_cache: bool = False) -> dict:
    """The benchmark (``bench/run.py`` calls this with its --repeats/--quick; the clock is
    the one ``common`` was set to). ``cold_compile_cache``: see ``FRESH_COMPILE_CACHE``."""
    FRESH_COMPILE_CACHE["on"] = bool(cold_compile_cache)
    if clock is None:
        import common
        clock = "cpu" if common.clock is time.process_time else "wall"
    repeats = max(1, min(repeats, 5))
    proto = protocol or (QUICK if quick else Protocol())
    if quick:
        repeats = min(repeats, 1)
    all_models = load_models()
    unknown = sorted(set(models or []) - {m.name for m in all_models})
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; the models are: {', '.join(m.name for m in all_models)}")
    chosen = [m for m in all_models if (m.name in models if models is not None
                                        else (not quick or m.name == "eight_schools"))]
    available = availability()
    for c in CONTENDERS:
        if contenders is not None and c not in contenders:
            available[c] = "not selected (--contenders)"
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"\nNUTS benchmark (bench/nuts_models.py); protocol {vars(proto)}, repeats {repeats} (pyro {min(pyro_repeats, repeats)}), "
          f"clock {clock}, one thread per contender, Inductor cache "
          f"{'fresh per ppl process' if cold_compile_cache else 'shared (on disk)'}, load average {loadavg()}")
    for c in CONTENDERS:
        if available.get(c):
            print(f"  {c}: {available[c]}")
    report = {"started": started, "protocol": vars(proto), "repeats": repeats, "timeout_s": timeout,
              "inductor_cache": "fresh per ppl process" if cold_compile_cache else "shared (on disk)",
              "pyro_timeout_s": pyro_timeout or timeout,
              "pyro_repeats": min(pyro_repeats, repeats), "clock": clock, "targets": TARGETS,
              "availability": available, "load_start": loadavg(), "models": {}}
    for model in chosen:
        result = bench_model(model, proto, repeats, pyro_repeats, clock, available, timeout, pyro_timeout)
        print_model(model, result, available, proto, clock)
        report["models"][model.name] = result
        _write(report, json_path)  # after every model: an interrupted run keeps what it measured
    print_overview(report)
    report["load_end"] = loadavg()
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"\n  load average at the end: {report['load_end']}")
    if _write(report, json_path):
        print(f"  results written to {json_path}")
    return report


def _write(report: dict, json_path: str | None) -> bool:
    if not json_path:
        return False
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as fh:
        json.dump(report, fh, indent=1, default=_json_default)
    return True


def _json_default(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def rescore(saved: dict, path: str = REFERENCES) -> dict:
    """Saved results with their errors recomputed against ``references.json`` as it is
    now (each run keeps its posterior means and sds of every column)."""
    refs = load_references(path)
    for name, result in saved["models"].items():
        ref = refs.get(name, (None, ""))[0]
        for row in result["summary"].values():
            for run in row["runs"]:
                if "means" in run:
                    run.update(posterior_errors(run["means"], run["sds"], ref))
            row["mean_err"] = _median([r.get("mean_err") for r in row["runs"]])
            row["sd_err"] = _median([r.get("sd_err") for r in row["runs"]])
    return saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 x 150 x 150, eight schools, 1 repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pyro-repeats", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    ap.add_argument("--chains", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--samples", type=int)
    ap.add_argument("--models", help="comma-separated model names (default: all)")
    ap.add_argument("--contenders", help=f"comma-separated, of: {', '.join(CONTENDERS)}")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per contender process")
    ap.add_argument("--pyro-timeout", type=float, help="seconds per Pyro process (default: --timeout)")
    ap.add_argument("--overview", nargs="+", metavar="JSON", help="print the overview of saved results and stop")
    ap.add_argument("--json", default=RESULTS, help="where to write the results ('' for nowhere)")
    ap.add_argument("--cold-compile-cache", action="store_true",
                    help="each ppl process starts with an empty TorchInductor cache (a first run on this machine)")
    ap.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(*args.child)
    if args.overview:
        merged = {"models": {}}
        for path in args.overview:
            with open(path) as fh:
                saved = rescore(json.load(fh))
            print(f"{path}: protocol {saved['protocol']}, repeats {saved['repeats']}, clock {saved['clock']}, "
                  f"{saved['started']} .. {saved.get('finished', 'unfinished')}, load {saved['load_start']} .. "
                  f"{saved.get('load_end')}")
            merged["models"].update(saved["models"])
        print_overview(merged)
        return 0
    base = QUICK if args.quick else Protocol()
    proto = Protocol(chains=args.chains or base.chains, warmup=args.warmup if args.warmup is not None else base.warmup,
                     samples=args.samples or base.samples)
    run(args.repeats, args.quick, clock=args.clock, protocol=proto, pyro_repeats=args.pyro_repeats,
        models=args.models.split(",") if args.models else None, json_path=args.json or None,
        contenders=[c.strip() for c in args.contenders.split(",")] if args.contenders else None,
        timeout=args.timeout, pyro_timeout=args.pyro_timeout, cold_compile_cache=args.cold_compile_cache)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    for _k, _v in SINGLE_THREAD_ENV.items():
        os.environ.setdefault(_k, _v)
    sys.exit(main())
