"""Moves on token choices: Metropolis-Hastings for programs with language-model choices.

Single-site MH (``inference.mh``) keeps its traces in tensor columns, so it refuses the
string-valued choices of a language model (``Token``, ``Completion``). This kernel keeps
each chain's trace as a Python dict (address -> value: a token, a completion, or a
tensor row for a numeric choice) and re-executes the program batched over the chains,
like ``semantics.gfi.regenerate``. One step, per chain:

1. pick one of the trace's choices uniformly (probability 1/|x|);
2. propose a new value for it:

   * an ``lm.generate`` choice whose completion took n draws s_1..s_n (its tokens, plus
     the end-of-sequence token when it ended there): pick a cut j uniformly in
     {0, ..., n-1} (probability 1/n), keep s_1..s_j and regenerate the rest from the
     model given the prompt and that prefix, exactly as the choice's own sampler draws
     (its ``temperature``/``top_k``/``top_p``, its ``allowed=`` mask renormalised at every
     step, its ``stop`` strings checked on the whole completion, at most ``max_tokens``
     draws in all): q(x' | x, j) = prod_{k > j} q(s'_k | prompt, s'_<k);
   * any other choice (an ``lm.next_token``, a number): a draw from its prior (an
     independent MH move at that site);

3. re-run the program with every other choice reused where it still exists, choices
   reached for the first time drawn from their priors (fresh), the others dropped
   (stale), and accept with probability min(1, alpha),

       alpha = p(x') / p(x) * |x| / |x'| * (1/n') q(x_suffix | x_prefix)
                                         / ((1/n) q(x'_suffix | x_prefix))
               * prod_stale p / prod_fresh p,

   where p is the target's joint density (choices, the ``allowed=`` mass factors,
   observe/factor/condition) and n' the number of draws of the proposed completion (the
   reverse move picks the same site, with probability 1/|x'|, and the same cut j, with
   probability 1/n': x' has at least j + 1 draws and shares x's first j). For a prior
   proposal the "q" terms are the site's prior densities of the new and old values.

Invariant: each step leaves the target (the ``gfi.ModelRun``'s: the whole program, or
truncated after its k-th checkpoint for resample-move) invariant: pi K = pi, and
detailed balance. The exact checker (testing/validity.py, ``token_kernel_check``) builds
K exactly on the toy language model, enumerating the site, the cut, every suffix and the
accept test; dropping the 1/n' : 1/n term (``cut_odds=False``) or the proposal ratio
(``hastings=False``) is caught there.

Use: ``method="mh"`` with ``kernel="suffix"`` (``token_mh``) and ``method="resample_move"``
with ``kernel="suffix"`` (``rejuvenate``: the population's traces moved at each
resampling, then replayed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from ..semantics import gfi
from ..semantics.errors import PPLRuntimeError
from ..semantics.gfi import ModelRun
from ..semantics.sampling import Suspended, _WeightAccumulator, drive
from ..semantics.values import Batched, Particles, PerParticle, materialize, rows
from ..stdlib.lm.dsl import (Completion, GenerateDist, _draw_rows, _generate_step_mask, _mask_ids, _sample_rows,
                             _step_exact)
from ..stdlib.progress import NO_BAR, progress_bar
from .diagnostics import draw_diagnostics
from .population import Chains
from .randomness import TorchRandomness

#: the kernel names that select these moves (``mh(kernel=...)``, ``resample_move(kernel=...)``)
KERNELS = ("suffix",)

_ABSENT = object()


# ------------------------------------------------------------------------- the state
@dataclass
class TokenTraces:
    """Traces of C chains with values of any kind: per chain a dict address -> value
    (in the order the program made the choices) and address -> log density of that value
    at its site (the draw law: renormalised under ``allowed=``); the log joint [C] under
    the target it was scored for; the return value per chain (None when truncated)."""
    values: list
    site_lp: list
    log_joint: torch.Tensor
    ret: list

    @property
    def chains(self) -> int:
        return len(self.values)

    @property
    def sizes(self) -> torch.Tensor:
        return torch.tensor([len(v) for v in self.values], dtype=torch.long)

    def select(self, accept: list, new: "TokenTraces") -> "TokenTraces":
        """Per chain, ``new``'s trace where ``accept`` holds, else this one's."""
        pick = lambda a, b: [x if ok else y for x, y, ok in zip(a, b, accept)]  # noqa: E731
        mask = torch.tensor(accept, dtype=torch.bool, device=self.log_joint.device)
        return TokenTraces(pick(new.values, self.values), pick(new.site_lp, self.site_lp),
                           torch.where(mask, new.log_joint, self.log_joint), pick(new.ret, self.ret))


def traces_of_columns(sites: dict, C: int) -> list:
    """Per-chain dicts from trace columns (address -> (values [C, ...] or list, present
    mask or None)), in the columns' order."""
    out = [dict() for _ in range(C)]
    for a, (col, present) in sites.items():
        items = list(col.unbind(0)) if isinstance(col, torch.Tensor) else list(col)
        here = [True] * C if present is None else [bool(p) for p in present.tolist()]
        for c in range(C):
            if here[c]:
                out[c][a] = items[c]
    return out


def columns_of_traces(values: list, device="cpu") -> dict:
    """Trace columns (address -> tensor [C, ...] or a list) from per-chain dicts, for
    ``semantics.sampling.fixed`` (a chain without the address gets a placeholder)."""
    addrs = list(dict.fromkeys(a for v in values for a in v))
    cols = {}
    for a in addrs:
        filler = next(v[a] for v in values if a in v)
        items = [v.get(a, filler) for v in values]
        if all(isinstance(x, torch.Tensor) for x in items):
            cols[a] = torch.stack(items).to(device)
        else:
            cols[a] = items
    return cols


# ------------------------------------------------------------- the suffix proposal
class _SuffixRow:
    """One chain's suffix proposal: continue ``prefix`` (token ids, after the prompt)."""
    __slots__ = ("prompt", "prefix", "allowed")

    def __init__(self, prompt: tuple, prefix: tuple, allowed):
        self.prompt, self.prefix, self.allowed = prompt, prefix, allowed


def _per_prefix(mask) -> bool:
    """Whether an ``allowed=`` mask is a constraint whose allowed tokens depend on the
    completion so far (``stdlib.lm.constraints``: it answers ``generate_rows``/``generate_ids``)."""
    return hasattr(mask, "generate_rows")


def _allowed_after(allowed, ids: list, opts):
    """The allowed ids after the generated ``ids``: a fixed set, None, or a per-prefix constraint's."""
    return allowed.generate_ids(tuple(ids), opts) if _per_prefix(allowed) else allowed


class _SuffixSpec:
    """What the randomness interface reads: the exact law of one row's completion."""
    index_valued = True
    value_dtype = "str"
    name = "suffix"

    def __init__(self, gen: GenerateDist):
        self.gen = gen

    def exact_support(self, row: _SuffixRow):
        """[(completion, probability)] of the regenerated completion, in exact arithmetic
        (the draw law: renormalised under the mask), by walking every continuation."""
        gen = self.gen
        lmv, opts = gen.lmv, gen.opts
        out = []

        def walk(ids: list, prob):
            if len(ids) == opts.max_tokens:
                out.append((lmv.completion(ids), prob))
                return
            here = _allowed_after(row.allowed, ids, opts)
            for t, p in _step_exact(lmv, row.prompt + tuple(ids), opts, here, False):
                if t == lmv.eos_id:
                    out.append((lmv.completion(ids), prob * p))
                elif gen._stopped(ids + [t]):
                    out.append((lmv.completion(ids + [t]), prob * p))
                else:
                    walk(ids + [t], prob * p)

        walk(list(row.prefix), 1)
        return out


class SuffixProposal:
    """The suffix regeneration of an ``lm.generate`` choice for some chains, as a
    distribution the randomness interface draws from (``sample(ctx)``; ``spec`` and
    ``args`` for the exact checker): per row, the completion ``prefix + new suffix``."""

    def __init__(self, gen: GenerateDist, ctx: Particles, prefixes: list):
        self.gen = gen
        prompts = gen.lmv.contexts(gen.context, ctx, "prompt")
        mask = gen._mask_rows(ctx)
        if mask is None or _per_prefix(mask):
            allowed = [mask] * ctx.M
        else:
            allowed = [_mask_ids(mask if mask.dim() == 1 else mask[r]) for r in range(ctx.M)]
        self.rows = [_SuffixRow(tuple(p), tuple(x), a) for p, x, a in zip(prompts, prefixes, allowed)]
        self.mask = mask
        self.spec = _SuffixSpec(gen)
        self.args = (PerParticle(self.rows, ctx.idx),)

    def sample(self, ctx: Particles) -> PerParticle:
        """Per row, continue its prefix token by token (one backend call per step)."""
        lmv, gen = self.gen.lmv, self.gen
        M = ctx.M
        ids = [list(r.prefix) for r in self.rows]
        done = [len(x) >= gen.opts.max_tokens for x in ids]
        while not all(done):
            act = [r for r in range(M) if not done[r]]
            m = self._step_mask([ids[r] for r in act], act, ctx.device)
            draw, _ = _draw_rows(lmv, [self.rows[r].prompt + tuple(ids[r]) for r in act], gen.opts, m, ctx.device)
            for r, t in zip(act, _sample_rows(draw).tolist()):
                if t == lmv.eos_id:
                    done[r] = True
                    continue
                ids[r].append(t)
                done[r] = len(ids[r]) >= gen.opts.max_tokens or gen._stopped(ids[r])
        return PerParticle([lmv.completion(x) for x in ids], ctx.idx)

    def _step_mask(self, gens: list, act: list, device):
        """The allowed= mask of one step for the rows ``act`` (their generated ids so far
        ``gens``): as the choice's own sampler computes it."""
        return _generate_step_mask(self.mask, gens, act, self.gen.opts, device)

    def log_q(self, steps: list, cuts: list, device) -> torch.Tensor:
        """Per row, log q of the draws ``steps[r][cuts[r]:]`` given the row's prefix
        (the completion's draws, end-of-sequence token included): [M] float64."""
        out = torch.zeros(len(steps), dtype=torch.float64, device=device)
        longest = max((len(s) for s in steps), default=0)
        for k in range(longest):
            act = [r for r in range(len(steps)) if cuts[r] <= k < len(steps[r])]
            if not act:
                continue
            m = self._step_mask([steps[r][:k] for r in act], act, device)
            draw, _ = _draw_rows(self.gen.lmv, [self.rows[r].prompt + tuple(steps[r][:k]) for r in act],
                                 self.gen.opts, m, device)
            tok = torch.tensor([steps[r][k] for r in act], dtype=torch.long, device=device)
            out[torch.tensor(act, dtype=torch.long, device=device)] += \
                draw.gather(1, tok[:, None]).squeeze(1).double()
        return out


# ------------------------------------------------------------------ the re-execution
class TokenReExecution(gfi.ReExecution):
    """One run of the program for C chains (``gfi.ReExecution``'s targets: truncation,
    tempering, twists), whose choices may be tokens and completions: per choice the old
    value unless the chain re-proposes this address (``moving[c]``: the suffix move at a
    ``generate`` choice, else a prior draw), else a fresh prior draw."""

    def __init__(self, C, device, old: TokenTraces | None, moving: list, randomness, stop_after=None, beta=1.0,
                 cut_odds: bool = True):
        super().__init__(C, device, None, {}, randomness, "prior", 0.5, stop_after, beta)
        self.old_traces = old
        self.moving = moving
        self.cut_odds = cut_odds
        self.new_values = [dict() for _ in range(C)]
        self.new_lp = [dict() for _ in range(C)]

    def state(self) -> TokenTraces:
        return TokenTraces(self.new_values, self.new_lp, self.log_weights, self.ret_rows)

    ret_rows: list = None

    def sample(self, eff):
        ctx, dist, addr = eff.ctx, eff.dist, eff.addr
        chains = ctx.idx.tolist()
        M = ctx.M
        old = [self.old_traces.values[c].get(addr, _ABSENT) if self.old_traces is not None else _ABSENT
               for c in chains]
        moved = [self.moving[c] == addr and o is not _ABSENT for c, o in zip(chains, old)]
        suffix = [m and isinstance(dist, GenerateDist) for m in moved]
        prior_draw = [o is _ABSENT or (m and not s) for o, m, s in zip(old, moved, suffix)]
        items = list(old)
        fwd = torch.zeros(M, dtype=torch.float64, device=ctx.idx.device)
        rev = torch.zeros_like(fwd)
        if any(prior_draw):
            for r, v in zip(_where(prior_draw), self._draw(dist, ctx, prior_draw, eff)):
                items[r] = v
        if any(suffix):
            for r, v in zip(_where(suffix), self._suffix_move(dist, ctx, suffix, old, fwd, rev)):
                items[r] = v
        reproposed = [m and not s for m, s in zip(moved, suffix)]
        if any(reproposed):  # the reverse term of a prior proposal: the old value's density
            sub = ctx.subset(_mask(reproposed, ctx))
            old_lp = _lp_rows(dist.log_prob(_pack([old[r] for r in _where(reproposed)], sub, dist), sub), sub)
            rev[_mask(reproposed, ctx)] += old_lp
        value = _pack(items, ctx, dist)
        lp = _lp_rows(dist.log_prob(value, ctx), ctx)
        if any(reproposed):
            fwd[_mask(reproposed, ctx)] += lp[_mask(reproposed, ctx)]
        _WeightAccumulator.add(self, ctx, lp)  # a prior term: never tempered
        fresh = _mask([o is _ABSENT for o in old], ctx)
        self.fresh_lp.index_add_(0, ctx.idx, torch.where(fresh, lp, torch.zeros_like(lp)))
        self.fwd_q.index_add_(0, ctx.idx, fwd)
        self.rev_q.index_add_(0, ctx.idx, rev)
        stored = rows(value, ctx)
        stored = list(stored.unbind(0)) if isinstance(stored, torch.Tensor) else list(stored)
        for r, c in enumerate(chains):
            self.new_values[c][addr] = stored[r]
            self.new_lp[c][addr] = float(lp[r])
        return value

    def _draw(self, dist, ctx, which: list, eff) -> list:
        """Prior draws for the rows ``which`` of ctx (as per-row items)."""
        if self.randomness is None:
            raise PPLRuntimeError(f"the given choices have no value for the choice '{eff.addr}'", eff.span)
        sub = ctx.subset(_mask(which, ctx))
        return _items(self.randomness.sample(dist, sub), sub)

    def _suffix_move(self, gen: GenerateDist, ctx, which: list, old: list, fwd, rev) -> list:
        """The suffix proposal for the rows ``which``: the new completions; adds the
        forward and reverse proposal terms (cut odds included) to ``fwd``/``rev``."""
        sub = ctx.subset(_mask(which, ctx))
        where = _where(which)
        old_steps = []
        for r in where:
            ids = gen._value_ids(old[r])
            s = None if ids is None else gen._steps(tuple(ids))
            old_steps.append(s if s else [])  # (a completion of density zero: cut at 0, always rejected)
        cuts = self.randomness.choose(torch.tensor([max(1, len(s)) for s in old_steps], dtype=torch.long)).tolist()
        proposal = SuffixProposal(gen, sub, [s[:j] for s, j in zip(old_steps, cuts)])
        new = _items(self.randomness.sample(proposal, sub), sub)
        new_steps = [gen._steps(tuple(gen._value_ids(v))) or [] for v in new]
        f = proposal.log_q(new_steps, cuts, fwd.device)
        b = proposal.log_q(old_steps, cuts, fwd.device)
        if any(not s for s in old_steps):
            b = torch.where(torch.tensor([bool(s) for s in old_steps], device=b.device), b,
                            torch.full_like(b, -math.inf))
        if self.cut_odds:
            f = f - torch.log(torch.tensor([float(max(1, len(s))) for s in old_steps], dtype=torch.float64))
            b = b - torch.log(torch.tensor([float(max(1, len(s))) for s in new_steps], dtype=torch.float64))
        pos = _mask(which, ctx)
        fwd[pos] += f.to(fwd.device)
        rev[pos] += b.to(rev.device)
        return new


def _where(flags: list) -> list:
    return [i for i, f in enumerate(flags) if f]


def _mask(flags: list, ctx: Particles) -> torch.Tensor:
    return torch.tensor(flags, dtype=torch.bool, device=ctx.idx.device)


def _items(value, ctx: Particles) -> list:
    """A draw for ctx as per-row items (tensor rows, or Python values)."""
    if isinstance(value, Batched):
        t = rows(value, ctx)
        return list(t.unbind(0))
    if isinstance(value, PerParticle):
        return list(rows(value, ctx))
    if isinstance(value, (bool, int, float, torch.Tensor)):
        return [torch.as_tensor(value)] * ctx.M
    return [value] * ctx.M


_DTYPES = {"bool": torch.bool, "long": torch.long}


def _pack(items: list, ctx: Particles, dist):
    """Per-row items as the value of a choice: a ``Batched`` tensor for numbers (Python
    numbers from an exact trace take the distribution's dtype), else ``PerParticle``."""
    if all(isinstance(x, (torch.Tensor, bool, int, float, Fraction)) for x in items):
        dtype = _DTYPES.get(getattr(dist.spec, "value_dtype", None), torch.get_default_dtype())
        t = torch.stack([x if isinstance(x, torch.Tensor) else torch.tensor(float(x) if dtype.is_floating_point
                                                                             else int(x), dtype=dtype)
                         for x in items])
        return Batched(t.to(ctx.device), ctx.idx)
    return PerParticle(list(items), ctx.idx)


def _lp_rows(lp, ctx: Particles) -> torch.Tensor:
    lp = torch.as_tensor(lp, dtype=torch.float64)
    return lp.expand(ctx.M).clone() if lp.dim() == 0 else lp.double()


# ------------------------------------------------------------------------ the kernel
def execute(model: ModelRun, C: int, old: TokenTraces | None, moving: list, randomness,
            cut_odds: bool = True) -> TokenReExecution:
    """One run of the program for C chains with a ``TokenReExecution`` handler."""
    ctx = Particles.all(C, model.device)
    h = TokenReExecution(C, model.device, old, moving, randomness, model.stop_after, model.beta, cut_odds)
    try:
        ret = drive(model.interp.run(model.entry, model.data, ctx), h)
        h.ret_rows = materialize(ret, ctx)
    except Suspended:  # the end of the truncated program
        h.ret_rows = [None] * C
    return h


def assess_traces(model: ModelRun, values: list) -> TokenTraces:
    """The given complete traces (per chain: address -> value) scored under the target."""
    old = TokenTraces(values, [dict() for _ in values], torch.zeros(len(values), dtype=torch.float64), [None] * len(values))
    return execute(model, len(values), old, [None] * len(values), None).state()


def simulate_traces(model: ModelRun, C: int, randomness) -> TokenTraces:
    """C traces drawn from the prior."""
    return execute(model, C, None, [None] * C, randomness).state()


def suffix_move(model: ModelRun, state: TokenTraces, randomness, *, hastings: bool = True,
                cut_odds: bool = True) -> tuple[TokenTraces, torch.Tensor]:
    """One MH step for every chain (see the module docstring): (new state, accepted
    mask). ``hastings=False`` keeps only p(x')/p(x) and ``cut_odds=False`` drops the
    1/n : 1/n' odds of the cut (broken kernels, for the checker's tests)."""
    sizes = state.sizes
    if int(sizes.max()) == 0:
        return state, torch.zeros(state.chains, dtype=torch.bool)
    pick = randomness.choose(sizes.clamp(min=1)).tolist()
    moving = [list(v)[p] if v else None for v, p in zip(state.values, pick)]
    run = execute(model, state.chains, state, moving, randomness, cut_odds)
    new = run.state()
    stale = torch.zeros_like(state.log_joint)
    for c in range(state.chains):
        stale[c] = sum(lp for a, lp in state.site_lp[c].items() if a not in new.values[c])
    if hastings:
        log_alpha = (new.log_joint - state.log_joint + run.rev_q - run.fwd_q + stale - run.fresh_lp
                     + torch.log(sizes.double()) - torch.log(new.sizes.double()))
    else:
        log_alpha = new.log_joint - state.log_joint
    log_alpha = torch.where(torch.isnan(log_alpha), torch.full_like(log_alpha, -math.inf), log_alpha)
    accept = randomness.accept(log_alpha) & torch.isfinite(new.log_joint)
    return state.select(accept.tolist(), new), accept


def initial_traces(model: ModelRun, chains: int, randomness, tries: int = 100) -> TokenTraces:
    """Each chain's first trace from the prior, redrawn while its density is zero."""
    state = simulate_traces(model, chains, randomness)
    for _ in range(tries):
        bad = ~torch.isfinite(state.log_joint)
        if not bool(bad.any()):
            return state
        state = state.select(bad.tolist(), simulate_traces(model, chains, randomness))
    if not bool(torch.isfinite(state.log_joint).any()):
        raise PPLRuntimeError(f"MH: no chain found a trace of positive probability in {tries} prior draws",
                              hint="the condition may be impossible, or too unlikely to meet by drawing from the prior")
    return state


def token_mh(interp, entry: str, data: dict, *, chains: int = 4, samples: int = 1000, burn_in: int = 500,
             thin: int = 1, device="cpu", progress: bool | None = None, randomness=None) -> Chains:
    """MH with the suffix moves (``mh(kernel="suffix")``): ``Chains`` of the kept draws;
    a string-valued site's values are a list (chain-major). ``extra``: "kernel",
    "burn_in", "thin"."""
    randomness = randomness or TorchRandomness()
    model = ModelRun(interp, entry, data, device)
    state = initial_traces(model, chains, randomness)
    kept = [[] for _ in range(chains)]
    accepted = 0.0
    total = burn_in + samples * thin
    with progress_bar(progress, desc="MH", unit=" steps", total=total) as bar:
        for i in range(total):
            state, acc = suffix_move(model, state, randomness)
            if i >= burn_in:
                accepted += float(acc.double().mean())
                if (i - burn_in) % thin == 0:
                    for c in range(chains):
                        kept[c].append({**state.values[c], "return": state.ret[c]})
            bar.update(1)
            if bar is not NO_BAR and i >= burn_in and ((i - burn_in) % 25 == 0 or i == total - 1):
                bar.set_postfix_str(f"acceptance {accepted / (i - burn_in + 1):.2f}", refresh=False)
    sites, r_hat, ess = draw_diagnostics(kept)
    sites = {"return": sites.pop("return"), **sites}
    rate = accepted / max(1, total - burn_in)
    return Chains("mh", sites, chains, samples, rate, r_hat, ess, {"kernel": "suffix", "burn_in": burn_in,
                                                                   "thin": thin, "traced": False})


def rejuvenate(model: ModelRun, sites: dict, N: int, moves: int, randomness) -> tuple[dict, float]:
    """Resample-move's rejuvenation with the suffix moves: the population's traces so far
    (trace columns), ``moves`` steps each on ``model``'s (truncated) target: (the moved
    trace columns, the mean acceptance rate)."""
    state = assess_traces(model, traces_of_columns(sites, N))
    accepted = 0.0
    for _ in range(moves):
        state, acc = suffix_move(model, state, randomness)
        accepted += float(acc.double().mean())
    return columns_of_traces(state.values, model.device), accepted / max(1, moves)
