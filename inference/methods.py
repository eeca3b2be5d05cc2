"""The registry of inference methods and their entry points.

``METHODS[name](model, data, *, particles, device, **options)`` runs one method on a model
(anything with the ``semantics.model.ModelLike`` protocol) and returns the raw type of the
inference layer (``inference.population``): a ``Population`` of weighted particles
(importance, prior, smc, resample_move, tempering, smc_steer), ``Chains`` (mh, pmmh), an
``Optimum`` (best_of_n, beam), or the exact paths of ``semantics.exact`` (enumerate). The
Python face turns them into result objects and emits their diagnostic warnings.

Every method takes ``progress`` (``stdlib.progress``): None (the default) shows a progress
bar on stderr when stderr is a terminal and the run has taken 2 s, True always, False
never; the bar never changes a result.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..semantics import enumerate_sites
from ..semantics.errors import PPLRuntimeError
from ..semantics.exact import DEFAULT_MAX_PATHS, DEFAULT_MAX_SECONDS, enumerate_paths
from ..semantics.exact_elimination import STRATEGIES, EliminationResult, enumerate_exact
from ..stdlib import printing
from ..stdlib.progress import ticking
from ..semantics.options import OptionSpec
from .amortized import run_guided_importance, run_guided_smc
from .auto_enumerate import with_enumeration
from .beam import beam_search
from .delayed import delayed_importance, delayed_smc
from .gradient_mcmc import gradient_mcmc
from .infer_discrete import recover_discrete
from .importance import likelihood_weighting
from .mh import mh
from .pmmh import pmmh
from .population import Chains, Optimum, Population
from .resample_move import resample_move
from .resampling import SCHEMES
from .smc import smc
from .steer import best_of_n, smc_steer
from .tempering import tempered_smc


def _option_specs() -> dict[str, OptionSpec]:
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
        "resampling": OptionSpec("choice", choices=SCHEMES.keys()),  # live: later registrations count
        "progress": OptionSpec("flag", nullable=True),
        "traced": OptionSpec("flag", choices=("auto",)),
        "adapt": OptionSpec("flag", nullable=True),  # None: the method's default (mh: tune rw scales unless scale=)
        "block": OptionSpec("flag"),
        "max_moves": positive_int,
        "decorrelation": OptionSpec("number", low=0, high=1, low_open=True, high_open=True),
        "warmup": OptionSpec("int", low=0, nullable=True),
        "target_accept": OptionSpec("number", low=0, high=1, low_open=True, high_open=True),
        "max_tree_depth": OptionSpec("int", low=1, high=30),
        "dense_mass": OptionSpec("flag", choices=("auto",)),
        "num_steps": OptionSpec("int", low=1, nullable=True),
        "step_size": OptionSpec("number", low=0, low_open=True, nullable=True),
        "compile": OptionSpec("flag", choices=("auto",)),
        "delayed": OptionSpec("flag"),  # importance/smc: delayed sampling (inference.delayed)
        "strategy": OptionSpec("choice", choices=STRATEGIES),
        "beam_width": OptionSpec("int", low=1, nullable=True),  # beam: the beams kept (None: particles)
        "expand": OptionSpec("int", low=1, nullable=True),
        "groups": positive_int,
        "diversity": OptionSpec("number", low=0),
        "sample": OptionSpec("flag"),
    }


#: the type and range of every method option that has one, by option name (an option
#: means the same in every method that takes it); ``check_options`` applies it for
#: ``Model.run``, ``ppl.infer``, ``ppl.product(...).run`` and the CLI alike
OPTION_SPECS: dict[str, OptionSpec] = _option_specs()


def check_options(options: dict) -> dict:
    """``options`` with every value checked against ``OPTION_SPECS`` (and normalised:
    integers as int, numbers as float); options without a spec pass unchanged."""
    return {k: OPTION_SPECS[k].check(k, v) if k in OPTION_SPECS else v for k, v in options.items()}


def _program(model, data: dict, device, enumerate: Any = None, enumerating: bool = False, recover: bool = True):
    """What every algorithm runs: (interpreter, entry point, data prepared for ``device``).
    ``enumerating``: the method sums out the choices marked ``@enumerate`` and those named
    in ``enumerate`` (``semantics.enumerate_sites``; ``recover``: and draws them back from
    their conditionals at the end of each run)."""
    interp = model.interpreter()
    if enumerating:
        interp = enumerate_sites.enumerating(interp, model.program, enumerate, recover=recover)
    return interp, model.entry, model.prepare_data(data, device)


def run_importance(model, data: dict, *, particles: int = 1000, device: str = "cpu", proposal: Any = None,
                   progress: bool | None = None, delayed: bool = False, enumerate: Any = None,
                   **_) -> Population:
    """Likelihood weighting; with ``proposal`` (a guide, ``inference.amortized``) the guide
    proposes the choices it knows, weighted by log p - log q (``extra`` holds
    ``ess_fraction`` and ``pareto_k``). ``progress``: a counter of the sites the batch has
    run (without ``proposal``). ``delayed=True``: conjugate choices are marginalised
    (delayed sampling, ``inference.delayed``). ``enumerate``: choices summed out (names or
    address prefixes; with the ones marked ``@enumerate``: ``semantics.enumerate_sites``), or
    "auto": those the dependency analysis finds can be (``inference.auto_enumerate``)."""
    if delayed:
        _check_delayed(model, proposal, enumerate)
        return delayed_importance(*_program(model, data, device), int(particles), device)
    if proposal is not None:
        return run_guided_importance(model, data, proposal, particles=particles, device=device)
    return with_enumeration(model, data, enumerate, int(particles), lambda chosen: likelihood_weighting(
        *_program(model, data, device, chosen, enumerating=True), int(particles), device, progress=progress))


def run_prior(model, data: dict, *, particles: int = 1000, device: str = "cpu", progress: bool | None = None,
              **_) -> Population:
    """Prior draws: likelihood weighting's particles with weights ignored. ``progress``:
    a counter of the sites the batch has run."""
    pop = likelihood_weighting(*_program(model, data, device), int(particles), device, progress=progress, label="prior")
    return Population("prior", pop.sites, torch.zeros_like(pop.log_weights))


def run_smc(model, data: dict, *, particles: int = 1000, device: str = "cpu", resampling: str = "systematic",
            ess_threshold: float = 1.0, proposal: Any = None, progress: bool | None = None, keep: Any = None,
            delayed: bool = False, enumerate: Any = None, **_) -> Population:
    """SMC over the checkpoints (``inference.smc``). ``extra["history"]`` lists, per
    synchronisation checkpoint, the ESS before resampling and whether it resampled. With
    ``proposal`` (a mean-field guide) each choice it knows is proposed by it where the
    program makes it (``inference.amortized``). ``progress``: a counter of
    synchronisation checkpoints with the current ESS. ``keep``: the sites the result
    keeps, a list of addresses and/or "return" (the others are absent; a name that is
    not a site is an error), or "all"; left out, every site while N times the number of
    choices is at most 10^7, and past that (a filter: N = 10^6 over 100 steps) the
    return value and the last address of each choice name (``x[99]`` of ``x[0]`` ...
    ``x[99]``), with the dropped addresses in ``extra["dropped_sites"]``. ``delayed=True``:
    conjugate choices are marginalised (delayed sampling, ``inference.delayed``: a
    linear-Gaussian state-space model is Kalman-filtered, exactly with one particle)."""
    if delayed:
        _check_delayed(model, proposal, enumerate)
        return delayed_smc(*_program(model, data, device), int(particles), device, resampling=resampling,
                           ess_threshold=ess_threshold, progress=progress, keep="auto" if keep is None else keep)
    if proposal is not None:
        return run_guided_smc(model, data, proposal, particles=particles, device=device, resampling=resampling,
                              ess_threshold=ess_threshold, progress=progress, keep="auto" if keep is None else keep)
    return with_enumeration(model, data, enumerate, int(particles), lambda chosen: smc(
        *_program(model, data, device, chosen, enumerating=True), int(particles), device, resampling=resampling,
        ess_threshold=ess_threshold, progress=progress, keep="auto" if keep is None else keep))


def _check_delayed(model, proposal: Any, enumerate: Any) -> None:
    """delayed=True runs alone: not with a guide, nor with enumerated choices."""
    if proposal is not None:
        raise PPLRuntimeError("delayed=True cannot be combined with proposal=",
                              hint="a guide proposes the choices that delayed sampling would marginalise: use one of them")
    if enumerate or enumerate_sites.marks_enumeration(model.program):
        raise PPLRuntimeError("delayed=True cannot be combined with enumerated choices (enumerate= or @enumerate)",
                              hint="use one of them: enumerate the discrete choices, or delay the conjugate ones")


def run_mh(model, data: dict, *, particles: int = 4, samples: int = 1000, burn_in: int = 500, thin: int = 1,
           device: str = "cpu", kernel: str = "prior", scale: float | None = None, adapt: bool | None = None,
           block: bool = False, chains: int | None = None, progress: bool | None = None, traced: bool | str = "auto",
           **_) -> Chains:
    """Single-site trace MH (``inference.mh``) with ``chains`` chains run as one batch
    (``particles`` is accepted as a synonym of ``chains`` for the CLI's ``-n``). With
    the random-walk kernel a static program runs as a traced graph
    (``inference.mh_traced``; ``traced=False`` turns that off); ``extra["traced"]``
    says which ran. With ``kernel="rw"`` and no ``scale`` each site's scale is tuned
    during burn-in (``adapt``: see ``inference.mh.mh``); ``extra["scales"]`` holds them.
    ``block=True`` adds a population-covariance block walk (strongly correlated posteriors)."""
    return mh(*_program(model, data, device), chains=int(chains if chains is not None else particles),
              samples=int(samples), burn_in=int(burn_in), thin=int(thin), device=device, kernel=kernel,
              scale=None if scale is None else float(scale), adapt=_flag(adapt), block=bool(_flag(block)),
              progress=progress,
              traced=_flag(traced))


def run_nuts(model, data: dict, *, particles: int = 4, samples: int = 1000, burn_in: int = 1000,
             warmup: int | None = None, chains: int | None = None, device: str = "cpu", kernel: str = "nuts",
             target_accept: float = 0.8, max_tree_depth: int = 10, dense_mass: bool | str = False,
             num_steps: int | None = None, step_size: float | None = None, traced: bool | str = "auto",
             compile: bool | str = "auto", progress: bool | None = None, enumerate: Any = None, **_) -> Chains:
    """NUTS (``inference.gradient_mcmc``) with ``chains`` chains as one batch (``particles``
    is the CLI's ``-n``), ``samples`` draws each after ``burn_in`` (= ``warmup``)
    iterations of Stan's windowed adaptation. ``dense_mass``: False (diagonal), True, or
    "auto" (dense up to 10 dimensions, from the inverse curvature at each chain's start).
    ``compile``: TorchInductor for the potential
    (default "auto": when a static cost model of the graph's size and the run's length says
    it pays, so that a seeded run's draws never depend on timings or on the compile cache;
    ``gradient_mcmc.compile_decision``). ``enumerate``:
    discrete choices summed out in the potential (names, or "auto" as for importance; with
    those marked ``@enumerate``; they are
    not in the state; each kept draw gets them drawn from their conditional afterwards,
    ``inference.infer_discrete``)."""
    n_chains = int(chains if chains is not None else particles)

    def attempt(chosen):
        program = _program(model, data, device, chosen, enumerating=True, recover=False)
        out = gradient_mcmc(*program, kernel=kernel, chains=n_chains, samples=int(samples),
                            warmup=int(warmup if warmup is not None else burn_in), device=device,
                            target_accept=float(target_accept), max_tree_depth=int(max_tree_depth),
                            dense_mass=_dense_mass(dense_mass), num_steps=None if num_steps is None else int(num_steps),
                            step_size=None if step_size is None else float(step_size), traced=_flag(traced),
                            compile=_flag(compile), progress=progress)
        return recover_discrete(out, *program, device=device)
    return with_enumeration(model, data, enumerate, n_chains * int(samples), attempt)


def run_hmc(model, data: dict, *, particles: int = 4, samples: int = 1000, burn_in: int = 1000,
            warmup: int | None = None, chains: int | None = None, device: str = "cpu", num_steps: int = 10,
            target_accept: float = 0.8, dense_mass: bool = False, step_size: float | None = None,
            traced: bool | str = "auto", compile: bool | str = "auto", progress: bool | None = None,
            enumerate: Any = None, **_) -> Chains:
    """HMC with ``num_steps`` leapfrog steps per transition (default 10); the step size and
    mass matrix are adapted during warm-up as for NUTS (``enumerate`` as for NUTS)."""
    return run_nuts(model, data, kernel="hmc", particles=particles, samples=samples, burn_in=burn_in,
                    warmup=warmup, chains=chains, device=device, num_steps=num_steps, target_accept=target_accept,
                    dense_mass=dense_mass, step_size=step_size, traced=traced, compile=compile,
                    progress=progress, enumerate=enumerate)


def _dense_mass(value):
    """The ``dense_mass`` option: True, False or "auto" (``inference.gradient_mcmc``)."""
    value = _flag(value)
    return "auto" if isinstance(value, str) and value.lower() == "auto" else bool(value)


def _flag(value):
    """An option that is True, False or "auto", also when it comes as text (``-o``)."""
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    return value


def run_resample_move(model, data: dict, *, particles: int = 1000, device: str = "cpu",
                      resampling: str = "systematic", ess_threshold: float = 1.0, moves: int | None = None,
                      kernel: str = "prior", scale: float = 0.5, progress: bool | None = None, adapt: bool = False,
                      max_moves: int = 100, decorrelation: float = 0.1, enumerate: Any = None,
                      **_) -> Population:
    """Resample-move SMC (``inference.resample_move``): SMC with ``moves`` MH steps (default
    1) per particle after each resampling. ``extra["acceptance"]`` lists the MH acceptance
    rate at each rejuvenation. ``progress``: a counter of checkpoints with the ESS.
    ``adapt=True``: moves scaled by the population (``inference.population_moves``),
    repeated until the particles decorrelate (below ``decorrelation``) or ``max_moves``.
    ``enumerate`` as for SMC: the SMC targets and the moves' targets (the program
    truncated after a checkpoint) have those choices summed out."""
    return with_enumeration(model, data, enumerate, int(particles), lambda chosen: resample_move(
        *_program(model, data, device, chosen, enumerating=True), int(particles), device, resampling=resampling,
        ess_threshold=ess_threshold, moves=None if moves is None else int(moves), kernel=kernel,
        scale=float(scale), progress=progress, adapt=_flag(adapt), max_moves=int(max_moves),
        decorrelation=float(decorrelation)))


def run_pmmh(model, data: dict, *, params=None, particles: int = 100, samples: int = 500, burn_in: int = 100,
             chains: int = 2, scale: float = 0.2, kernel: str = "rw", device: str = "cpu",
             resampling: str = "systematic", ess_threshold: float = 1.0, progress: bool | None = None,
             **_) -> Chains:
    """Particle marginal MH (``inference.pmmh``) on the choices named in ``params`` (a list
    of addresses, or a comma-separated string), with ``particles`` SMC particles per
    likelihood estimate, ``chains`` chains run one after the other; ``kernel`` "rw" (a
    random walk of size ``scale``) or "prior" (independent prior draws: discrete params)."""
    if isinstance(params, str):
        params = [p.strip() for p in params.split(",") if p.strip()]
    return pmmh(*_program(model, data, device), list(params or []), particles=int(particles), samples=int(samples),
                burn_in=int(burn_in), chains=int(chains), scale=float(scale), kernel=kernel, device=device,
                resampling=resampling, ess_threshold=ess_threshold, progress=progress)


def run_tempering(model, data: dict, *, particles: int = 1000, device: str = "cpu", target_ess: float = 0.5,
                  moves: int | None = None, kernel: str = "rw", scale: float = 0.5, resampling: str = "systematic",
                  schedule: Any = None, progress: bool | None = None, adapt: bool = False, max_moves: int = 100,
                  decorrelation: float = 0.1, enumerate: Any = None, **_) -> Population:
    """Tempered SMC (``inference.tempering``): an adaptive path prior -> posterior with MH
    moves (or the fixed inverse temperatures ``schedule``, e.g. [0.1, 0.5, 1]; text
    "0.1,0.5,1" from the CLI). ``extra["schedule"]`` is the sequence used,
    ``extra["moves"]`` the MH moves per temperature (default: max(2, number of choices),
    ``tempering.default_moves``), ``extra["ess_history"]`` the ESS of each step's
    incremental weights before resampling. ``progress``: a bar over beta in [0, 1].
    ``adapt=True``: moves scaled by the population (``inference.population_moves``),
    repeated until the particles decorrelate (below ``decorrelation``) or ``max_moves``;
    ``extra["moves"]`` is then the list of moves per step. ``enumerate`` as for SMC: every
    target is prior * (likelihood with those choices summed out)^beta, the moves move the
    other choices, and the summed-out ones are drawn back at the end."""
    return with_enumeration(model, data, enumerate, int(particles), lambda chosen: tempered_smc(
        *_program(model, data, device, chosen, enumerating=True), int(particles), device,
        target_ess=float(target_ess), moves=None if moves is None else int(moves), kernel=kernel,
        scale=float(scale), resampling=resampling, schedule=_betas(schedule), progress=progress,
        adapt=_flag(adapt), max_moves=int(max_moves), decorrelation=float(decorrelation)))


def _betas(schedule):
    if isinstance(schedule, str):
        try:
            return [float(b) for b in schedule.replace(";", ",").split(",") if b.strip()]
        except ValueError:
            raise PPLRuntimeError(f"schedule must be numbers separated by commas, got {schedule!r}") from None
    return schedule


def run_smc_steer(model, data: dict, *, particles: int = 100, expansion: int = 4, device: str = "cpu",
                  ess_threshold: float = 1.0, progress: bool | None = None, **_) -> Population:
    """SMC steering (``inference.steer``): ``particles`` parents, each extended
    ``expansion`` ways between synchronisation checkpoints, and ``particles`` survivors
    selected without replacement at each (or, with ``ess_threshold`` < 1, when the ESS of
    the particles*expansion children is below that fraction). The population holds all
    particles*expansion weighted slots; ``extra["history"]`` is as for ``smc``.
    ``progress``: a counter of checkpoints with the ESS."""
    return smc_steer(*_program(model, data, device), particles, expansion, device, ess_threshold=ess_threshold,
                     progress=progress)


def run_best_of_n(model, data: dict, *, particles: int = 100, device: str = "cpu", progress: bool | None = None,
                  **_) -> Optimum:
    """Best-of-N (``inference.steer.best_of_n``): the highest-scoring of ``particles``
    prior draws, as an ``Optimum`` (one particle; an optimum, not a posterior).
    ``progress``: a counter of the sites the batch has run."""
    return best_of_n(*_program(model, data, device), particles, device, progress=progress)


def run_beam(model, data: dict, *, particles: int = 4, beam_width: int | None = None, expand: int | None = None,
             groups: int = 1, diversity: float = 0.0, sample: bool = False, device: str = "cpu",
             progress: bool | None = None, **_) -> Optimum:
    """Beam search (``inference.beam``): ``beam_width`` beams (``particles``, the CLI's
    ``-n``, when not given), each extended by its ``expand`` most probable values (default
    min(``beam_width``, 16)) at every finite choice (language-model tokens included), the best
    kept by their log joint density; ``groups`` > 1 with ``diversity`` > 0: diverse beam
    search; ``sample=True``: stochastic beam search (each beam's values drawn without
    replacement instead of its most probable). An ``Optimum`` like best-of-N's (the best
    beam; ``extra["beams"]`` all of them, best first, with their scores). ``progress`` is accepted (no bar)."""
    width = int(beam_width if beam_width is not None else particles)
    return beam_search(*_program(model, data, device), width, device, expand=None if expand is None else int(expand),
                       groups=int(groups), diversity=float(diversity), sample=bool(_flag(sample)))


def run_enumerate(model, data: dict, *, max_paths: int = DEFAULT_MAX_PATHS,
                  max_seconds: float | None = DEFAULT_MAX_SECONDS, progress: bool | None = None,
                  strategy: str = "auto", **_) -> list | EliminationResult:
    """Exact enumeration (``semantics.exact``), bounded by ``max_paths`` paths and
    ``max_seconds`` seconds (None: no time bound); ``progress``: a path counter on stderr
    (default: on a terminal, after 2 s). The list of (weight, values) paths, or, for a
    model of static structure with more than a thousand paths, the same measure by
    variable elimination (``semantics.exact_elimination``: an ``EliminationResult``, in
    time linear in a chain's length). ``strategy``: "auto" (that choice), "paths" or
    "elimination" (an error where it does not apply). Under "auto", a bound other than
    the default on ``max_paths`` or ``max_seconds`` asks for bounded path enumeration,
    so paths are enumerated."""
    prepared = model.prepare_data(data, None)
    interp = model.interpreter(exact=True)

    if strategy == "auto" and (max_paths != DEFAULT_MAX_PATHS or max_seconds != DEFAULT_MAX_SECONDS):
        strategy = "paths"
    # the analysis and elimination have no steps to count: a bar with the elapsed time, until
    # paths are enumerated (which count themselves)
    with ticking(progress if strategy != "paths" else False, desc="enumerate (elimination)") as clock:
        def paths() -> list:
            clock.stop()
            with printing.unsilenced():  # print(...) per path (stdlib.printing)
                return enumerate_paths(model.program, model.builtins(), model.entry, prepared, max_paths=max_paths,
                                       interp=interp, max_seconds=max_seconds, progress=progress)
        with printing.silenced():  # elimination's tabulating runs are not executions of the model
            out = enumerate_exact(model, data, prepared, interp, paths, strategy=strategy)
    if isinstance(out, EliminationResult) and printing.active():
        printing.current().write_note("[print] enumerate ran by variable elimination: the model's print output is "
                                      "not shown (strategy='paths' shows it per path)")
    return out


#: ``method=`` name -> entry point (see the module docstring); ``ppl.register_method`` adds
#: a user's algorithm here
METHODS: dict[str, Callable] = {
    "importance": run_importance,
    "enumerate": run_enumerate,
    "prior": run_prior,
    "smc": run_smc,
    "mh": run_mh,
    "nuts": run_nuts,
    "hmc": run_hmc,
    "resample_move": run_resample_move,
    "pmmh": run_pmmh,
    "tempering": run_tempering,
    "smc_steer": run_smc_steer,
    "best_of_n": run_best_of_n,
    "beam": run_beam,
}
