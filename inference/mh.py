"""Single-site trace Metropolis-Hastings, with many chains as one batch.

A state is a trace: address -> value, per chain. One step (``mh_step``), per chain:
pick one of the trace's choices uniformly, propose a new value for it (from its prior,
or by a symmetric random walk for real-valued choices), and re-run the program with
every other choice reused where it still exists; choices the new run reaches for the
first time are drawn from their priors ("fresh"), choices of the old trace it no longer
reaches are dropped ("stale"). The proposal is accepted with probability min(1, alpha),

    alpha = p(x') / p(x) * |x| / |x'| * [q_s(x_s) prod_stale p(x_stale)]
                                      / [q_s(x'_s) prod_fresh p(x'_fresh)]

(Wingate, Stuhlmueller & Goodman 2011), where p is the joint density of choices and
likelihood factors and q_s the proposal at the chosen site (its prior, or a symmetric
walk for which the q terms cancel). The |x|/|x'| and fresh/stale terms are the Hastings
correction for traces that change shape under random control flow.

As a composition of the trace interface (``semantics.gfi``): ``single_site_move`` picks
the site (``randomness.choose``), ``gfi.regenerate``s it (the re-run, with the q and
fresh/stale terms), adds log |x|/|x'| and calls ``gfi.metropolis``. The target is the
``ModelRun``'s: the whole program, or truncated (``stop_after``, resample-move) or
tempered (``beta``, tempering). A proposal outside the support has joint density zero
and is rejected (chains of weight zero never raise: ``semantics.sampling``).

Invariant: the kernel leaves the posterior invariant (pi K = pi), and satisfies detailed
balance. The exact checker (testing/validity.py, ``mh_kernel_check``) builds K exactly
for finite programs, enumerating every site choice, proposal and accept/reject outcome.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from ..semantics import gfi
from ..semantics.errors import PPLRuntimeError
from ..semantics.gfi import ModelRun, TracedState
from ..semantics.interpreter import Interpreter
from ..stdlib.progress import NO_BAR, progress_bar
from .diagnostics import chain_diagnostics
from .importance import impossible_site
from .mh_adapt import (DEFAULT_SCALE, MIN_ADAPT_BURN_IN, AcceptanceBySite, PopulationBlock,
                       ScaleAdaptation)
from .population import Chains
from .randomness import TorchRandomness
from . import token_moves

#: the traced state of ``semantics.gfi`` under its old name
MHState = TracedState


#: the randomness of MH under its old name (``TorchRandomness`` draws MCMC's choose/normal/accept)
TorchMHRandomness = TorchRandomness


def initial_state(interp: Interpreter, entry: str, data: dict, chains: int, device="cpu", randomness=None,
                  tries: int = 100) -> TracedState:
    """Draw each chain's first trace from the prior, redrawing chains whose joint density
    is zero (so that every chain starts inside the support of the posterior)."""
    randomness = randomness or TorchRandomness()
    model = ModelRun(interp, entry, data, device)
    state = gfi.simulate(model, chains, randomness)
    for _ in range(tries):
        bad = ~torch.isfinite(state.log_joint)
        if not bool(bad.any()):
            return state
        state = gfi.select(bad, gfi.simulate(model, chains, randomness), state)
    if not bool(torch.isfinite(state.log_joint).any()):
        site = _blame(interp, entry, data, chains, device)
        raise PPLRuntimeError(f"MH: no chain found a trace of positive probability in {tries} prior draws"
                              + (f" ({site.message})" if site is not None else ""),
                              site.span if site is not None else None,
                              "the data may be impossible under the prior")
    return state


def _blame(interp, entry, data, chains, device, tries: int = 10):
    """The ``ZeroEvidenceError`` naming the site where ``chains`` fresh prior draws all
    died (tried ``tries`` times, then with 100 draws), or None if some draw survived
    every time (the error then has no location)."""
    for n in [chains] * tries + [max(chains, 100)]:
        site = impossible_site(interp, entry, data, n, device)
        if site is not None:
            return site
    return None


def single_site_selection(state: TracedState, pick: torch.Tensor) -> gfi.Selection:
    """Per chain, the ``pick``-th address its trace has (in trace order)."""
    chosen = {}
    rank = torch.zeros(pick.shape[0], dtype=torch.long, device=pick.device)
    for a, m in state.present.items():
        chosen[a] = m & (rank == pick)
        rank = rank + m.long()
    return chosen


def single_site_move(model: ModelRun, state: TracedState, randomness, *, kernel: str = "prior",
                     scale: float | Mapping[str, float] = 0.5, hastings: bool = True):
    """One single-site MH step for every chain: pick a site uniformly, ``regenerate`` it,
    accept with the regenerate term times |x| / |x'| (the odds of picking that site).
    ``scale``: the random walk's, one number or address -> scale (``gfi.scale_at``).
    ``hastings=False`` keeps only p(x')/p(x) (a broken kernel, for the checker's tests)."""
    new, accepted, _ = site_move(model, state, randomness, kernel=kernel, scale=scale, hastings=hastings)
    return new, accepted


class MoveStats(NamedTuple):
    """What adaptation needs to know of one single-site step besides the accepted mask:
    per address the chains that moved it (``selection``) and the unconstrained dimension
    of the sites moved by a walk (``walks``)."""
    selection: dict
    walks: dict


def site_move(model: ModelRun, state: TracedState, randomness, *, kernel: str = "prior",
              scale: float | Mapping[str, float] = 0.5, hastings: bool = True):
    """``single_site_move`` that also returns its ``MoveStats``: (state, accepted, stats)."""
    sizes = state.sizes
    selection = single_site_selection(state, randomness.choose(sizes))
    walks: dict = {}
    new, log_w = gfi.regenerate(model, state, selection, randomness, proposal=kernel, scale=scale, walks=walks)
    if hastings:
        log_alpha = log_w + torch.log(sizes.double()) - torch.log(new.sizes.double())
    else:
        log_alpha = new.log_joint - state.log_joint
    out, accepted = gfi.metropolis(state, new, log_alpha, randomness)
    return out, accepted, MoveStats(selection, walks)


def mh_step(interp: Interpreter, entry: str, data: dict, state: TracedState, device="cpu", *, randomness=None,
            kernel: str = "prior", scale: float | Mapping[str, float] = 0.5, hastings: bool = True,
            stop_after: int | None = None, beta: float = 1.0):
    """``single_site_move`` on the program's target (``ModelRun``): returns (new state,
    accepted mask). With ``stop_after`` = k the target is the program truncated after its
    k-th checkpoint (SMC's k-th target); ``beta`` tempers the likelihood. ``scale``: one
    number, or per-site scales (address -> scale)."""
    return single_site_move(ModelRun(interp, entry, data, device, stop_after, beta), state,
                            randomness or TorchRandomness(), kernel=kernel, scale=scale, hastings=hastings)


def mh(interp: Interpreter, entry: str, data: dict, *, chains: int = 4, samples: int = 1000, burn_in: int = 500,
       thin: int = 1, device="cpu", kernel: str = "prior", scale: float | None = None, adapt: bool | None = None,
       block: bool = False, progress: bool | None = None, traced: bool | str = "auto", info: dict | None = None):
    """Run ``chains`` chains: ``Chains`` of the kept draws (it unpacks to (kept states,
    acceptance rate)); ``extra``: "kernel", "burn_in", "thin", "traced" (which ran) and,
    when tracing failed, "why_not_traced"; with ``kernel="rw"`` also "adapted" (whether
    the scales were tuned), "scales" (address -> the walk's scale the kept draws used)
    and "site_acceptance" (address -> acceptance rate of the kept steps at that site).

    ``kernel`` is "prior", "rw", "suffix" (programs with language-model choices: an
    ``lm.generate`` completion's suffix regenerated from a random cut, other choices
    from their priors, ``inference.token_moves``), or the name of a proposal function of
    the model (``inference.mh_proposals``: custom kernels written in the DSL).

    Random-walk scales (``inference.mh_adapt``), as a Stan or PyMC user expects them:
    with ``kernel="rw"`` and no ``scale`` given, each site's scale is tuned during
    burn-in (pooled over the chains) toward an acceptance of 0.44 (0.234 for a
    vector-valued site), starting from 0.5, when ``burn_in`` is at least 20
    (``MIN_ADAPT_BURN_IN``; a shorter burn-in keeps the fixed 0.5). The tuning stops at
    the end of burn-in: the kept draws come from the MH kernel with those fixed per-site
    scales, exactly invariant. A ``scale`` given explicitly is a fixed scale for every
    site (no tuning), unless ``adapt=True``: then it is the starting scale.
    ``adapt=True`` always tunes (it needs ``kernel="rw"`` and ``burn_in`` > 0);
    ``adapt=False`` never does (scale 0.5 when not given).

    ``block=True`` (with adaptation) follows every single-site step by a block random
    walk of all the continuous choices shaped by the chains' population covariance,
    tuned during burn-in and frozen after it (``mh_adapt.PopulationBlock``; during
    burn-in, chains left far out in a tail restart from good ones): for strongly
    correlated posteriors, e.g. a regression on calendar years, which single-site moves
    cannot cross. ``extra["block_acceptance"]``: its acceptance over the kept steps. It
    runs the interpreter (two runs more per step) and needs a static program (the same
    continuous choices in every run; otherwise an error).

    With ``kernel="rw"`` and ``traced="auto"`` (the default) a static program (see
    ``inference.mh_traced``) runs the same kernel as a traced torch graph; ``traced=False``
    always re-runs the interpreter; ``traced=True`` requires the traced kernel. ``info``,
    if given, receives "traced" and "why_not_traced" too."""
    if kernel in token_moves.KERNELS:  # moves on language-model choices (``inference.token_moves``)
        _token_kernel_options(kernel, scale, adapt, block, traced)
        return token_moves.token_mh(interp, entry, data, chains=chains, samples=samples, burn_in=burn_in, thin=thin,
                                    device=device, progress=progress)
    custom = None
    if kernel not in ("prior", "rw"):  # the name of a proposal function (``inference.mh_proposals``)
        from .mh_proposals import ProposalKernel
        custom = ProposalKernel(interp, entry, kernel)
    if traced not in (True, False, "auto"):
        raise PPLRuntimeError(f"traced must be True, False or 'auto', not {traced!r}")
    adaptation = _adaptation(kernel, scale, adapt, burn_in, chains, device)
    if block and adaptation is None:
        raise PPLRuntimeError("block=True tunes a block walk during burn-in: it needs kernel='rw' with adaptation",
                              hint=f"kernel='rw', burn_in >= {MIN_ADAPT_BURN_IN}, and no scale= (or adapt=True)")
    population_block = PopulationBlock(ModelRun(interp, entry, data, device)) if block else None
    scales = adaptation.scales if adaptation is not None else (DEFAULT_SCALE if scale is None else float(scale))
    state = initial_state(interp, entry, data, chains, device)
    fast, why = None, []
    if kernel == "rw" and traced:
        from .mh_traced import TracedRandomWalk
        fast = TracedRandomWalk.build(interp, entry, data, state, scales, device, why)
        if fast is None and traced is True:
            raise PPLRuntimeError(f"traced=True: this program cannot be traced ({why[0] if why else 'unknown'})",
                                  hint="use traced='auto' to fall back to the interpreter")
    if kernel != "rw" and traced is True:
        raise PPLRuntimeError("traced=True needs kernel='rw'")
    if block and fast is None:
        _require_static(interp, entry, data, state, device)
    how = {"traced": fast is not None, **({"why_not_traced": why[0]} if why else {})}
    if info is not None:
        info.update(how)
    model = ModelRun(interp, entry, data, device)
    kept: list[TracedState] = []
    accepted = 0.0
    by_site = AcceptanceBySite()
    walked: dict = {}
    total = burn_in + samples * thin
    with progress_bar(progress, desc="MH", unit=" steps", total=total) as bar:
        for i in range(total):
            if i == burn_in and adaptation is not None:
                scales = adaptation.freeze()  # from here on the kernel is fixed: exactly invariant
                if population_block is not None:
                    population_block.freeze(state)
            stats = None
            if fast is not None:
                state, acc, stats = fast.step_with_stats(state, scales=scales)
            elif custom is not None:
                state, acc = custom.step(data, state, device)
            else:
                state, acc, stats = site_move(model, state, TorchRandomness(), kernel=kernel, scale=scales)
            if stats is not None:
                walked.update(stats.walks)
            if i < burn_in and adaptation is not None:
                adaptation.update(stats.selection, acc, stats.walks)
            if population_block is not None:
                state = population_block.move(state, TorchRandomness(), adapting=i < burn_in)
                if i + 1 in (burn_in // 4, burn_in // 2):  # burn-in: stragglers restart from good chains
                    state, ancestors = population_block.replace_outliers(state, TorchRandomness())
                    adaptation.reindex(ancestors)
            if i >= burn_in:
                accepted += float(acc.double().mean())
                if stats is not None:
                    by_site.add(stats.selection, acc)
                if (i - burn_in) % thin == 0:
                    kept.append(state)
            bar.update(1)
            if bar is not NO_BAR and i >= burn_in and ((i - burn_in) % 25 == 0 or i == total - 1):
                bar.set_postfix_str(f"acceptance {accepted / (i - burn_in + 1):.2f}", refresh=False)
    rate = accepted / max(1, total - burn_in)
    sites, r_hat, ess = chain_diagnostics(kept)
    extra = {"kernel": kernel, "burn_in": burn_in, "thin": thin, **how}
    if kernel == "rw":
        extra.update(adapted=adaptation is not None, scales={a: float(gfi.scale_at(scales, a)) for a in walked},
                     site_acceptance=by_site.rates())
    if population_block is not None:
        extra["block_acceptance"] = population_block.acceptance()
    return Chains("mh", sites, chains, len(kept), rate, r_hat, ess, extra, legacy=(kept, rate))


def _token_kernel_options(kernel: str, scale, adapt, block: bool, traced) -> None:
    """The options the suffix kernel (``inference.token_moves``) has no use for are errors."""
    for name, given in (("scale", scale is not None), ("adapt", bool(adapt)), ("block", bool(block)),
                        ("traced", traced is True)):
        if given:
            raise PPLRuntimeError(f"kernel='{kernel}' regenerates token suffixes and prior draws: it takes no {name}=",
                                  hint=f"leave {name} out, or use kernel='rw' for continuous choices")


def _require_static(interp: Interpreter, entry: str, data: dict, state: TracedState, device) -> None:
    """``block=True`` needs every chain to have the same continuous choices in every run
    (a static program, ``inference.mh_traced``): the frozen block walk is then one fixed
    MH kernel per chain. Raises otherwise."""
    from .mh_traced import TracedRandomWalk
    why: list = []
    if TracedRandomWalk.build(interp, entry, data, state, DEFAULT_SCALE, device, why) is None:
        raise PPLRuntimeError(f"block=True needs a program whose continuous choices are the same in every run "
                              f"({why[0] if why else 'this one is not'})",
                              hint="leave block out: the per-site scales are adapted without it")


def _adaptation(kernel: str, scale: float | None, adapt: bool | None, burn_in: int, chains: int,
                device) -> ScaleAdaptation | None:
    """The per-site scale adaptation ``mh`` runs during burn-in, or None (fixed scale):
    see ``mh``'s docstring for the rule."""
    if adapt is None:
        adapt = kernel == "rw" and scale is None and burn_in >= MIN_ADAPT_BURN_IN
    elif adapt and kernel != "rw":
        raise PPLRuntimeError(f"adapt=True tunes the random walk's scales: it needs kernel='rw', not {kernel!r}",
                              hint="use kernel='rw', or leave adapt out")
    elif adapt and burn_in < 1:
        raise PPLRuntimeError("adapt=True tunes the scales during burn-in: give burn_in > 0",
                              hint=f"at least {MIN_ADAPT_BURN_IN} burn-in steps, or adapt=False")
    if not adapt:
        return None
    return ScaleAdaptation(chains, DEFAULT_SCALE if scale is None else float(scale), device)
