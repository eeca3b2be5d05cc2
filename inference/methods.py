"""The registry of inference methods and their entry points.

Each entry point takes a compiled ``ppl.Model``, the data (entry parameters), and
options, and returns a result object (``ppl.result``):

* ``enumerate``: the exact posterior by path enumeration (``semantics.exact``);
  ``ExactResult`` with exact (Fraction) probabilities and evidence where possible.
* ``importance``: likelihood weighting with N particles in one batch
  (``inference.importance``); ``WeightedResult`` with log-evidence and ESS.
* ``prior``: draws from the prior (every likelihood factor ignored).

Every method takes ``progress`` (``stdlib.progress``): None (the default) shows a progress
bar on stderr when stderr is a terminal and the run has taken 2 s, True always, False
never; the bar never changes a result.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
import functools
from typing import Any, Callable

import torch

from ..semantics.errors import PPLError
from ..semantics.exact import DEFAULT_MAX_PATHS, DEFAULT_MAX_SECONDS, enumerate_paths
from ..semantics.sampling import LikelihoodWeighting, column, drive
from ..semantics.values import Particles
from .diagnostics import count_distinct, emit, ess_before_last_resampling
from .importance import likelihood_weighting
from .smc import smc


@dataclass(frozen=True)
class OptionSpec:
    """What one method option may be: an integer or a number in a range, a name from a
    fixed set, or a flag. ``check`` returns the value (integers as ``int``, numbers as
    ``float``) or raises a ``PPLError`` naming the option, the value and what is allowed."""

    kind: str  # "int" | "number" | "choice" | "flag"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    nullable: bool = False  # None means "the method's default"

    def allowed(self) -> str:
        """The allowed values in words, e.g. "a positive integer (at least 1)"."""
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "flag":
            return "true, false" + (" or 'auto'" if "auto" in self.choices else "")
        if self.kind == "int":
            if self.low == 1 and self.high is None:
                return "a positive integer (at least 1)"
            return "an integer" + self._range()
        if self.low == 0 and self.low_open and self.high is None:
            return "a positive finite number"
        return "a number" + self._range()

    def _range(self) -> str:
        if self.low is not None and self.high is not None:
            return f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f" {'<' if self.high_open else '<='} {self.high:g}"
        return ""

    def check(self, name: str, value: Any) -> Any:
        if value is None and self.nullable:
            return None
        out = self._convert(value)
        if out is _BAD or (self.kind in ("int", "number") and not self._in_range(out)):
            raise PPLError(f"{name} must be {self.allowed()} (got {value!r})")
        return out

    def _convert(self, value: Any) -> Any:
        if self.kind == "choice":
            return value if isinstance(value, str) and value in self.choices else _BAD
        if self.kind == "flag":
            if isinstance(value, bool) or value in self.choices:
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            return _BAD
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return _BAD  # True is not 1 particle, "5" is not a number here
        if self.kind == "int":
            try:
                return int(value) if float(value).is_integer() else _BAD
            except (OverflowError, ValueError):  # inf, nan
                return _BAD
        return float(value)

    def _in_range(self, v) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return not (self.high is not None and (v >= self.high if self.high_open else v > self.high))


_BAD = object()


def _option_specs() -> dict[str, OptionSpec]:
    from .resampling import SCHEMES
    positive_int = OptionSpec("int", low=1)
    return {
        "particles": positive_int,
        "samples": positive_int,
        "burn_in": OptionSpec("int", low=0),
        "thin": positive_int,
        "chains": OptionSpec("int", low=1, nullable=True),
        "moves": OptionSpec("int", low=0, nullable=True),
        "expansion": positive_int,
        "max_paths": positive_int,
        "max_seconds": OptionSpec("number", low=0, low_open=True, nullable=True),
        "ess_threshold": OptionSpec("number", low=0, high=1),
        "target_ess": OptionSpec("number", low=0, high=1, low_open=True, high_open=True),
        "scale": OptionSpec("number", low=0, low_open=True),
        "resampling": OptionSpec("choice", choices=tuple(SCHEMES)),
        "progress": OptionSpec("flag", nullable=True),
        "traced": OptionSpec("flag", choices=("auto",)),
    }


#: the type and range of every method option that has one, by option name (an option
#: means the same in every method that takes it); ``check_options`` applies it for
#: ``Model.run``, ``ppl.infer``, ``ppl.product(...).run`` and the CLI alike
OPTION_SPECS: dict[str, OptionSpec] = _option_specs()


def check_options(options: dict) -> dict:
    """``options`` with every value checked against ``OPTION_SPECS`` (and normalised:
    integers as int, numbers as float); options without a spec pass unchanged."""
    return {k: OPTION_SPECS[k].check(k, v) if k in OPTION_SPECS else v for k, v in options.items()}


def _result_types():
    from ppl.result import ExactResult, Site, WeightedResult
    return ExactResult, Site, WeightedResult


def _sites(raw: dict) -> dict:
    """Sites for a result object, on the CPU (results are summarised for people)."""
    _, Site, _ = _result_types()
    return {name: Site(_cpu(v), _cpu(present)) for name, (v, present) in raw.items()}


def _cpu(v):
    return v.cpu() if isinstance(v, torch.Tensor) else v


def run_importance(model, data: dict, *, particles: int = 1000, device: str = "cpu", proposal: Any = None,
                   progress: bool | None = None, **_) -> Any:
    """Likelihood weighting; with ``proposal`` (a ``ppl.Guide`` or the path of a saved one)
    the guide proposes the choices it knows, weighted by log p - log q
    (``inference.amortized``; ``extra`` holds ``ess_fraction`` and ``pareto_k``).
    ``progress``: a counter of the sites the batch has run (without ``proposal``)."""
    if proposal is not None:
        from .amortized import run_guided_importance
        return run_guided_importance(model, data, proposal, particles=particles, device=device)
    _, _, WeightedResult = _result_types()
    interp = model.interpreter()
    sites, log_weights = likelihood_weighting(interp, model.entry, model.prepare_data(data, device),
                                              int(particles), device, progress=progress)
    return WeightedResult("importance", _sites(sites), log_weights.cpu())


def run_prior(model, data: dict, *, particles: int = 1000, device: str = "cpu", progress: bool | None = None,
              **_) -> Any:
    """Prior draws: likelihood weighting's particles with weights ignored. ``progress``:
    a counter of the sites the batch has run."""
    _, _, WeightedResult = _result_types()
    interp = model.interpreter()
    sites, log_weights = likelihood_weighting(interp, model.entry, model.prepare_data(data, device),
                                              int(particles), device, progress=progress, label="prior")
    return WeightedResult("prior", _sites(sites), torch.zeros_like(log_weights).cpu())


def run_smc(model, data: dict, *, particles: int = 1000, device: str = "cpu", resampling: str = "systematic",
            ess_threshold: float = 1.0, proposal: Any = None, progress: bool | None = None, **_) -> Any:
    """SMC over the checkpoints (``inference.smc``). The result's ``extra["history"]``
    lists, per synchronisation checkpoint, the ESS before resampling and whether it
    resampled; ``ess_history`` is the list of those ESS values. With ``proposal`` (a
    mean-field ``ppl.Guide``) each choice it knows is proposed by it where the program
    makes it (``inference.amortized``). ``progress``: a counter of synchronisation
    checkpoints with the current ESS."""
    if proposal is not None:
        from .amortized import run_guided_smc
        return run_guided_smc(model, data, proposal, particles=particles, device=device, resampling=resampling,
                              ess_threshold=ess_threshold, progress=progress)
    _, _, WeightedResult = _result_types()
    interp = model.interpreter()
    sites, log_weights, h = smc(interp, model.entry, model.prepare_data(data, device), int(particles), device,
                                resampling=resampling, ess_threshold=ess_threshold, progress=progress)
    res = WeightedResult("smc", _sites(sites), log_weights.cpu(),
                         extra={"history": h.history, "resampling": resampling, "ess_threshold": ess_threshold})
    res.ess_history = [r.ess for r in h.history]
    return res


def run_mh(model, data: dict, *, particles: int = 4, samples: int = 1000, burn_in: int = 500, thin: int = 1,
           device: str = "cpu", kernel: str = "prior", scale: float = 0.5, chains: int | None = None,
           progress: bool | None = None, traced: bool | str = "auto", **_) -> Any:
    """Single-site trace MH (``inference.mh``) with ``chains`` chains run as one batch
    (``particles`` is accepted as a synonym of ``chains`` for the CLI's ``-n``). With
    the random-walk kernel a static program runs as a traced graph
    (``inference.mh_traced``; ``traced=False`` turns that off); ``extra["traced"]``
    says which ran."""
    from ppl.result import MCMCResult
    from .diagnostics import chain_diagnostics
    from .mh import mh
    C = int(chains if chains is not None else particles)
    info: dict = {}
    kept, rate = mh(model.interpreter(), model.entry, model.prepare_data(data, device), chains=C,
                    samples=int(samples), burn_in=int(burn_in), thin=int(thin), device=device, kernel=kernel,
                    scale=float(scale), progress=progress, traced=_flag(traced), info=info)
    sites, r_hat, ess = chain_diagnostics(kept)
    _, Site, _ = _result_types()
    sites = {k: Site(_cpu(v), _cpu(p)) for k, (v, p) in sites.items()}
    return MCMCResult("mh", sites, C, len(kept), acceptance_rate=rate, r_hat=r_hat, ess_per_site=ess,
                      extra={"kernel": kernel, "burn_in": burn_in, "thin": thin, "traced": info["traced"],
                             **({"why_not_traced": info["why_not_traced"]} if "why_not_traced" in info else {})})


def _flag(value):
    """An option that is True, False or "auto", also when it comes as text (``-o``)."""
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    return value


def run_resample_move(model, data: dict, *, particles: int = 1000, device: str = "cpu",
                      resampling: str = "systematic", ess_threshold: float = 1.0, moves: int = 1,
                      kernel: str = "prior", scale: float = 0.5, progress: bool | None = None, **_) -> Any:
    """Resample-move SMC (``inference.resample_move``): SMC with ``moves`` MH steps per
    particle after each resampling. ``extra["acceptance"]`` lists the MH acceptance rate
    at each rejuvenation. ``progress``: a counter of checkpoints with the ESS."""
    from .resample_move import resample_move
    _, _, WeightedResult = _result_types()
    sites, log_weights, h, acc = resample_move(
        model.interpreter(), model.entry, model.prepare_data(data, device), int(particles), device,
        resampling=resampling, ess_threshold=ess_threshold, moves=int(moves), kernel=kernel, scale=float(scale),
        progress=progress)
    res = WeightedResult("resample_move", _sites(sites), log_weights.cpu(),
                         extra={"history": h.history, "acceptance": acc, "moves": moves})
    res.ess_history = [r.ess for r in h.history]
    return res


def run_pmmh(model, data: dict, *, params=None, particles: int = 100, samples: int = 500, burn_in: int = 100,
             chains: int = 2, scale: float = 0.2, device: str = "cpu", resampling: str = "systematic",
             ess_threshold: float = 1.0, progress: bool | None = None, **_) -> Any:
    """Particle marginal MH (``inference.pmmh``) on the choices named in ``params`` (a list
    of addresses, or a comma-separated string), with ``particles`` SMC particles per
    likelihood estimate, ``chains`` chains run one after the other."""
    from ppl.result import MCMCResult
    from .diagnostics import draw_diagnostics
    from .pmmh import pmmh
    if isinstance(params, str):
        params = [p.strip() for p in params.split(",") if p.strip()]
    interp = model.interpreter()
    prepared = model.prepare_data(data, device)
    runs, rates = [], []
    for _ in range(int(chains)):
        draws, rate = pmmh(interp, model.entry, prepared, list(params or []), particles=int(particles),
                           samples=int(samples), burn_in=int(burn_in), scale=float(scale), device=device,
                           resampling=resampling, ess_threshold=ess_threshold, progress=progress)
        runs.append(draws)
        rates.append(rate)
    sites, r_hat, ess = draw_diagnostics(runs)
    _, Site, _ = _result_types()
    sites = {k: Site(_cpu(v), p) for k, (v, p) in sites.items()}
    return MCMCResult("pmmh", sites, int(chains), int(samples), acceptance_rate=sum(rates) / len(rates),
                      r_hat=r_hat, ess_per_site=ess, extra={"params": params, "particles": particles})


def run_tempering(model, data: dict, *, particles: int = 1000, device: str = "cpu", target_ess: float = 0.5,
                  moves: int | None = None, kernel: str = "rw", scale: float = 0.5, resampling: str = "systematic",
                  schedule: Any = None, progress: bool | None = None, **_) -> Any:
    """Tempered SMC (``inference.tempering``): an adaptive path prior -> posterior with MH
    moves (or the fixed inverse temperatures ``schedule``, e.g. [0.1, 0.5, 1]; text
    "0.1,0.5,1" from the CLI). ``extra["schedule"]`` is the sequence used,
    ``extra["moves"]`` the MH moves per temperature (default: max(2, number of choices),
    ``tempering.default_moves``), ``extra["ess_history"]`` the ESS of each step's
    incremental weights before resampling. ``progress``: a bar over beta in [0, 1]."""
    from .tempering import tempered_smc
    _, _, WeightedResult = _result_types()
    info: dict = {}
    state, log_z, schedule = tempered_smc(model.interpreter(), model.entry, model.prepare_data(data, device),
                                          int(particles), device, target_ess=float(target_ess),
                                          moves=None if moves is None else int(moves),
                                          kernel=kernel, scale=float(scale), resampling=resampling,
                                          schedule=_betas(schedule), info=info, progress=progress)
    sites = {"return": (state.ret, None)}
    for a, v in state.values.items():
        p = state.present[a]
        sites[a] = (v, None if bool(p.all()) else p)
    lw = torch.full((int(particles),), float(log_z), dtype=torch.float64)
    return WeightedResult("tempering", _sites(sites), lw, extra={"schedule": schedule, "moves": info["moves"],
                                                                 "ess_history": info["ess_history"]})


def _betas(schedule):
    if isinstance(schedule, str):
        from ..semantics.errors import PPLRuntimeError
        try:
            return [float(b) for b in schedule.replace(";", ",").split(",") if b.strip()]
        except ValueError:
            raise PPLRuntimeError(f"schedule must be numbers separated by commas, got {schedule!r}") from None
    return schedule


def run_smc_steer(model, data: dict, *, particles: int = 100, expansion: int = 4, device: str = "cpu",
                  ess_threshold: float = 1.0, progress: bool | None = None, **_) -> Any:
    """SMC steering (``inference.steer``): ``particles`` parents, each extended
    ``expansion`` ways between synchronisation checkpoints, and ``particles`` survivors
    selected without replacement at each (or, with ``ess_threshold`` < 1, when the ESS of
    the particles*expansion children is below that fraction). The result holds all
    particles*expansion weighted slots; ``extra["history"]`` is as for ``smc``.
    ``progress``: a counter of checkpoints with the ESS."""
    from .steer import smc_steer
    _, _, WeightedResult = _result_types()
    sites, log_weights, h = smc_steer(model.interpreter(), model.entry, model.prepare_data(data, device),
                                      particles, expansion, device, ess_threshold=ess_threshold,
                                      progress=progress)
    res = WeightedResult("smc_steer", _sites(sites), log_weights.cpu(),
                         extra={"history": h.history, "parents": h.parents, "expansion": h.expansion,
                                "ess_threshold": ess_threshold})
    res.ess_history = [r.ess for r in h.history]
    return res


def run_best_of_n(model, data: dict, *, particles: int = 100, device: str = "cpu", progress: bool | None = None,
                  **_) -> Any:
    """Best-of-N (``inference.steer.best_of_n``): the highest-scoring of ``particles``
    prior draws, as a ``BestOfNResult`` (one particle; an optimum, not a posterior).
    ``progress``: a counter of the sites the batch has run."""
    from ppl.result import BestOfNResult
    from .resampling import log_mean_exp
    from .steer import best_of_n
    sites, best, score, log_weights = best_of_n(model.interpreter(), model.entry,
                                                model.prepare_data(data, device), particles, device,
                                                progress=progress)
    one = {}
    for name, (v, present) in sites.items():
        v = v[best:best + 1] if isinstance(v, torch.Tensor) else [v[best]]
        one[name] = (v, None if present is None else present[best:best + 1])
    return BestOfNResult("best_of_n", _sites(one), score=score, candidates=int(particles),
                         importance_log_evidence=log_mean_exp(log_weights))


def run_enumerate(model, data: dict, *, max_paths: int = DEFAULT_MAX_PATHS,
                  max_seconds: float | None = DEFAULT_MAX_SECONDS, progress: bool | None = None, **_) -> Any:
    """Exact enumeration (``semantics.exact``), bounded by ``max_paths`` paths and
    ``max_seconds`` seconds (None: no time bound); ``progress``: a path counter on stderr
    (default: on a terminal, after 2 s)."""
    ExactResult, _, _ = _result_types()
    paths = enumerate_paths(model.program, model.builtins(), model.entry, model.prepare_data(data, None),
                            max_paths=max_paths, interp=model.interpreter(exact=True),
                            max_seconds=max_seconds, progress=progress)
    return ExactResult(paths)


def population_diagnostics(res) -> None:
    """For a result whose population was resampled (``extra["history"]`` of SMC
    checkpoints, or tempering's ``extra["ess_history"]``): set ``resampled``,
    ``ess_before_resampling`` (the ESS before the last resampling) and
    ``unique_fraction`` (distinct particles / N, when a choice is continuous)."""
    _, _, WeightedResult = _result_types()
    if not isinstance(res, WeightedResult) or getattr(res, "r_hat", None) is not None:
        return
    history = res.extra.get("history")
    if history is not None and any(getattr(r, "resampled", False) for r in history):
        res.ess_before_resampling = ess_before_last_resampling(history, res.ess)
    elif res.extra.get("ess_history"):  # tempering: resampled at every step
        res.ess_before_resampling = float(res.extra["ess_history"][-1])
    else:
        return
    res.resampled = True
    distinct = count_distinct({k: s.value for k, s in res.sites.items()},
                              {k: s.present for k, s in res.sites.items()})
    res.unique_fraction = None if distinct is None else distinct / res.n


def _diagnosed(run: Callable) -> Callable:
    """``run`` whose result gets its population diagnostics and whose warnings
    (``result.warnings``) are emitted as ``PPLDiagnosticWarning``s."""
    @functools.wraps(run)
    def diagnosed(model, data, *args, **options):
        res = run(model, data, *args, **options)
        population_diagnostics(res)
        emit(getattr(res, "warnings", []), stacklevel=3)
        return res
    return diagnosed


METHODS: dict[str, Callable] = {name: _diagnosed(fn) for name, fn in {
    "importance": run_importance,
    "enumerate": run_enumerate,
    "prior": run_prior,
    "smc": run_smc,
    "mh": run_mh,
    "resample_move": run_resample_move,
    "pmmh": run_pmmh,
    "tempering": run_tempering,
    "smc_steer": run_smc_steer,
    "best_of_n": run_best_of_n,
}.items()}
