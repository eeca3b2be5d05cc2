"""Beam search over a program's discrete choices: an optimiser baseline, like best-of-N.

What it maximises. A beam is a partial run of the program; its *score* is the log of the
program's unnormalised density of that run so far:

    score = sum over its expanded choices of log p(value | the run so far)
          + sum of its likelihood terms (observe log densities, factors, conditions: 0 or
            -inf), including the log mass of an ``allowed=`` constraint,

i.e. the log joint density of the trace (for a language model: the log probability of
the text under the decoding options and masks, plus every reward/factor checkpointed
along the way). Every choice with a finite support is *expanded*: a ``lm.next_token``
token (ranked by the model's next-token probabilities after temperature/top-k/top-p and
the mask) and any finite distribution (flip, categorical, ...). A choice without a finite
support (a continuous one) is drawn from its prior, as best-of-N draws it, and adds
nothing to the score (the score is then the log joint of the discrete choices and the
likelihood given those draws). ``lm.generate`` is one choice over whole completions: beam
search needs the tokens one by one, so it is an error (write a loop of ``next_token``).

The algorithm. B = ``beam_width`` beams, each extended by its E = ``expand`` (default
min(B, 16)) most probable values at each expanded choice, in a population of B * E slots laid out
as E copies of B parents (slot k*B + r is copy k of parent r: its k-th value). At the
next expanded choice (and at the end) the B highest-scoring distinct extensions are kept
(ties to the lower slot), each becoming the parent of the next E. Likelihood terms
between two expanded choices count before the selection, so a condition or reward on a
token prunes it. The end of the run selects once more, the same way; the kept beams
are ranked by score, and the result is the best one
(an ``Optimum``, like best-of-N's) and ``extra["beams"]`` lists the final beams, best
first, with their scores. With B at least the number of the program's paths and E at
least the number of values any choice can take, nothing is pruned and the beams are
exactly the top paths of exact enumeration; B = 1 is greedy
decoding (the most probable value at each choice, given the likelihood terms so far).

Diverse beam search (Vijayakumar et al. 2018): ``groups`` = G splits the B beams into G
groups of B / G; at each selection the groups choose in turn, group g among its own
extensions with the score minus ``diversity`` times the number of beams of groups before
it, at this step, whose last value is the same (Hamming diversity). Every group starts
from the empty run, so with diversity 0 they coincide; the reported scores are never
penalised.

Stochastic beam search (``sample=True``): each beam is extended by E distinct values
drawn from its choice's distribution without replacement (Gumbel-top-k: the values
ordered by log p + Gumbel noise) instead of its E most probable; the selection is
unchanged. With E at least the support size it is the deterministic search; with B = E = 1
it is ancestral sampling (the program's prior draw of those choices; a condition then
rules the one beam out rather than steering it).

Every expanded choice must be reached by all beams together (not inside a branch taken by
some of them only): otherwise an error names the choice.
"""
from __future__ import annotations

import math

import torch

from ..semantics.errors import PPLRuntimeError, InfiniteSupportError
from ..semantics.sampling import Weighting, column, drive
from ..semantics.trace import Trace
from ..semantics.values import Batched, Lineage, Particles, PerParticle, is_batched, lineage_scope, materialize, \
    rows, to_python
from ..stdlib.lm.dsl import GenerateDist, TokenDist
from .population import Optimum
from .randomness import TorchRandomness

_DTYPES = {"bool": torch.bool, "long": torch.long}

#: the values each beam is extended by when ``expand`` is not given: min(beam_width, this)
DEFAULT_EXPAND = 16


def _positive_int(value, what: str) -> int:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and float(value).is_integer() and value >= 1
    if not ok:
        raise PPLRuntimeError(f"{what} must be a positive integer (got {value!r})")
    return int(value)


class BeamHandler(Weighting):
    """The beam search of the module docstring as a run-kit handler: every expanded
    choice first selects the B parents (the run's lineage resampled), then gives copy k
    of each parent its k-th most probable value; likelihood terms accumulate."""

    def __init__(self, width: int, expand: int, groups: int, diversity: float, device, lineage: Lineage,
                 randomness=None, sample: bool = False):
        self.B, self.E, self.G = width, expand, groups
        self.sampled = sample
        self.M = width * expand
        super().__init__(self.M, device, torch.float64)
        self.diversity = float(diversity)
        self.lineage = lineage
        self.randomness = randomness or TorchRandomness()
        self.per_group = width // groups
        lw = torch.full((self.M,), -math.inf, dtype=torch.float64, device=device)
        lw[torch.arange(groups, device=device) * self.per_group] = 0.0  # one live beam per group
        self.log_weights = lw
        self.paths = [()] * self.M        # per slot: the keys of its expanded values so far
        self.candidates = 0               # extensions scored (live children)
        self.expansions = 0

    # ---------------------------------------------------------------- the choices
    def sample(self, eff):
        ctx, dist = eff.ctx, eff.dist
        if isinstance(dist, GenerateDist):
            raise PPLRuntimeError("beam search expands a completion token by token: lm.generate is one choice",
                                  eff.span, "write the generation as a loop: tok ~ lm.next_token(toks)")
        token = isinstance(dist, TokenDist)
        ranked = None if token else self._ranked(dist, ctx)
        if not token and ranked is None:  # no finite support: a prior draw, outside the score
            value = self.draw(dist, ctx, self.randomness.sample)
            self.trace.record(eff.addr, ctx, value)
            return value
        if ctx.M != self.M:
            raise PPLRuntimeError("beam search needs every choice it expands to be reached by all beams together",
                                  eff.span, "this choice is inside a branch taken by only some beams")
        anc = self._select()
        # the parents' rows: a next-token choice's computed now (its context has caught up
        # with the selection), another's reindexed
        if token:
            value, lp, keys = self._expand_tokens(dist, ctx)
        else:
            value, lp, keys = self._expand(dist, ctx, [ranked[a] for a in anc])
        self.add(ctx, lp)
        self.paths = [p + (k,) for p, k in zip(self.paths, keys)]
        live = int(torch.isfinite(self.log_weights).sum())
        self.candidates += live
        self.expansions += 1
        self.trace.record(eff.addr, ctx, value)
        return value

    def _ranked(self, dist, ctx):
        """Per row of ctx, the choice's values by decreasing probability (ties in the
        support's order): a list of ([values], [log p]); None without a finite support."""
        spec = getattr(dist, "spec", None)
        if spec is None or not hasattr(spec, "exact_support"):
            return None
        try:
            if not any(is_batched(a) for a in dist.args):
                support = dist.exact_support()
                return [_by_probability(support)] * ctx.M
            cols = [materialize(a, ctx) if is_batched(a) else None for a in dist.args]
            out = []
            for i in range(ctx.M):
                args = [to_python(c[i]) if c is not None else to_python(a) for c, a in zip(cols, dist.args)]
                out.append(_by_probability(spec.exact_support(*args)))
            return out
        except InfiniteSupportError:
            return None

    def _expand(self, dist, ctx, ranked):
        """Copy k of each parent takes its k-th value (log density -inf when it has
        fewer): (the choice's value, log densities [M], the values' keys)."""
        items, lps, orders = [], [], {}
        for slot, (values, logps) in enumerate(ranked):
            r, k = slot % self.B, slot // self.B
            if r not in orders:  # one order per parent, shared by its copies
                orders[r] = self._order(logps)
            order = orders[r]
            items.append(values[order[min(k, len(order) - 1)]])
            lps.append(logps[order[k]] if k < len(order) else -math.inf)
        value = _pack(items, ctx, dist)
        lp = torch.as_tensor(dist.log_prob(value, ctx), dtype=torch.float64).expand(ctx.M).clone()
        dead = torch.tensor([math.isinf(x) and x < 0 for x in lps], device=lp.device)
        lp = torch.where(dead, torch.full_like(lp, -math.inf), lp)
        return value, lp, [_key(x) for x in items]

    def _order(self, logps: list) -> list:
        """The order in which a parent's copies take its values: most probable first, or
        (``sample``) a draw without replacement (Gumbel-top-k)."""
        if not self.sampled:
            return list(range(len(logps)))
        u = self.randomness.uniform((len(logps),), "cpu").clamp(min=1e-300)
        keys = torch.tensor(logps, dtype=torch.float64) - torch.log(-torch.log(u))
        return torch.sort(keys, descending=True, stable=True).indices.tolist()

    def _expand_tokens(self, dist: TokenDist, ctx):
        """``_expand`` for a next-token choice: the next-token rows of the B parents only
        (slot r < B is copy 0 of parent r), their E most probable tokens (ties to the lower
        id) handed out to the copies."""
        B, E = self.B, self.E
        parents = ctx.subset(torch.arange(self.M, device=ctx.device) < B)
        draw, logz = dist._rows(parents)
        draw = draw.double()
        if self.sampled:  # Gumbel-top-k: E distinct tokens drawn without replacement
            gumbel = -torch.log(-torch.log(self.randomness.uniform(draw.shape, draw.device).clamp(min=1e-300)))
            ids = torch.sort(draw + gumbel, dim=-1, descending=True, stable=True).indices
            vals = draw.gather(1, ids)
        else:
            vals, ids = torch.sort(draw, dim=-1, descending=True, stable=True)
        width = min(E, vals.shape[1])
        vals, ids = vals[:, :width], ids[:, :width]
        if width < E:  # fewer tokens than copies: the rest are dead
            vals = torch.cat([vals, torch.full((B, E - width), -math.inf, dtype=vals.dtype, device=vals.device)], 1)
            ids = torch.cat([ids, ids[:, :1].expand(B, E - width)], 1)
        lp = vals.t().reshape(self.M)  # slot k*B + r: parent r's k-th
        tok = torch.where(torch.isfinite(lp), ids.t().reshape(self.M), ids[:, 0].repeat(E))
        value = PerParticle([dist.lmv.token(i) for i in tok.tolist()], ctx.idx)
        # remembered for the allowed= mass factor the interpreter adds next (log Z per parent)
        dist._remember(value, lp.to(draw.dtype), logz.repeat(E), ctx)
        return value, lp, tok.tolist()

    # ---------------------------------------------------------------- the selection
    def _choose(self) -> list:
        """Per group, its best distinct slots (at most B / G), by score minus the
        diversity penalty for last values that groups before it chose at this step."""
        lw = self.log_weights.tolist()
        chosen: list = []
        last_counts: dict = {}
        for g in range(self.G):
            pool = [s for s in range(self.M) if (s % self.B) // self.per_group == g and lw[s] > -math.inf]
            pool.sort(key=lambda s: (-(lw[s] - self.diversity * last_counts.get(self._last(s), 0)), s))
            picked, seen = [], set()
            for s in pool:
                if self.paths[s] in seen:
                    continue
                seen.add(self.paths[s])
                picked.append(s)
                if len(picked) == self.per_group:
                    break
            for s in picked:
                last_counts[self._last(s)] = last_counts.get(self._last(s), 0) + 1
            chosen.append(picked)
        return chosen

    def _select(self) -> list:
        """Keep the chosen slots (``_choose``), each copied into its E slots: the run's
        lineage is resampled by those ancestors (returned, a list of M slots)."""
        chosen = self._choose()
        parents, alive = [], []
        for picked in chosen:
            filler = picked[0] if picked else next((s for grp in chosen for s in grp), 0)
            parents += picked + [filler] * (self.per_group - len(picked))
            alive += [True] * len(picked) + [False] * (self.per_group - len(picked))
        anc = torch.tensor(parents * self.E, dtype=torch.long, device=self.log_weights.device)
        self.lineage.resample(anc)
        new = self.log_weights[anc]
        dead = torch.tensor([not a for a in alive] * self.E, dtype=torch.bool, device=new.device)
        self.log_weights = torch.where(dead, torch.full_like(new, -math.inf), new)
        self.paths = [self.paths[a] for a in anc.tolist()]
        return anc.tolist()

    def _last(self, s: int):
        return self.paths[s][-1] if self.paths[s] else None

    def final(self) -> list:
        """The final beams: [(slot, score)], best first: the end of the run selects as
        an expanded choice does (per group, with the penalty), without duplicates."""
        lw = self.log_weights.tolist()
        out, seen = [], set()
        for s in sorted((s for grp in self._choose() for s in grp), key=lambda s: (-lw[s], s)):
            if self.paths[s] not in seen:
                seen.add(self.paths[s])
                out.append((s, lw[s]))
        return out


def _by_probability(support) -> tuple:
    """A finite support as (values, log probabilities), most probable first (stable)."""
    pairs = [(v, float(p)) for v, p in support if p > 0]
    pairs.sort(key=lambda vp: -vp[1])
    return [v for v, _ in pairs], [math.log(p) for _, p in pairs]


def _key(v):
    v = to_python(v) if isinstance(v, torch.Tensor) else v
    return tuple(_key(x) for x in v) if isinstance(v, list) else v


def _pack(items: list, ctx: Particles, dist):
    """Per-slot values as the choice's value (numbers as a tensor of the distribution's dtype)."""
    if all(isinstance(x, (bool, int, float)) or hasattr(x, "numerator") for x in items) \
            and not any(isinstance(x, str) for x in items):
        dtype = _DTYPES.get(getattr(dist.spec, "value_dtype", None), torch.get_default_dtype())
        conv = (lambda x: float(x)) if dtype.is_floating_point else (lambda x: bool(x) if dtype == torch.bool
                                                                       else int(x))
        return Batched(torch.tensor([conv(x) for x in items], dtype=dtype, device=ctx.device), ctx.idx)
    if all(isinstance(x, (list, tuple)) and not isinstance(x, str) for x in items):
        try:
            return Batched(torch.tensor([list(x) for x in items], device=ctx.device), ctx.idx)
        except (TypeError, ValueError):
            pass
    return PerParticle(list(items), ctx.idx)


def beam_search(interp, entry: str, data: dict, width: int, device="cpu", *, expand: int | None = None,
                groups: int = 1, diversity: float = 0.0, sample: bool = False, randomness=None) -> Optimum:
    """Beam search (see the module docstring): an ``Optimum`` holding the best beam (its
    sites; ``score`` its log joint density), ``candidates`` the number of extensions
    scored, and in ``extra``: "beams" (the final beams, best first: {"score", "return"}),
    "beam_width", "expand", "groups", "diversity", "expansions" (expanded choices per
    beam)."""
    B = _positive_int(width, "beam_width")
    E = min(B, DEFAULT_EXPAND) if expand is None else _positive_int(expand, "expand")
    G = _positive_int(groups, "groups")
    if B % G:
        raise PPLRuntimeError(f"beam_width ({B}) must be a multiple of groups ({G})",
                              hint=f"e.g. beam_width={G * max(1, B // G)}")
    if not (isinstance(diversity, (int, float)) and math.isfinite(diversity) and diversity >= 0):
        raise PPLRuntimeError(f"diversity must be a number >= 0 (got {diversity!r})")
    M = B * E
    ctx = Particles.all(M, device)
    with lineage_scope(Lineage(ctx.idx)) as lineage:
        h = BeamHandler(B, E, G, diversity, device, lineage, randomness, bool(sample))
        h.trace = Trace(M, device)
        ret = drive(interp.run(entry, data, ctx), h)
        sites = {"return": (column(ret, ctx), None), **h.trace.sites()}
        beams = h.final()
    if not beams:
        raise PPLRuntimeError("beam search found no run of positive probability",
                              hint="every beam was ruled out by a condition or a zero likelihood; "
                                   "try a wider beam (beam_width=) or more values per beam (expand=)")
    returns = sites["return"][0]
    ret_list = returns.tolist() if isinstance(returns, torch.Tensor) else list(returns)
    best = beams[0][0]
    one = {name: (v[best:best + 1] if isinstance(v, torch.Tensor) else [v[best]],
                  None if present is None else present[best:best + 1]) for name, (v, present) in sites.items()}
    extra = {"beams": [{"score": s, "return": _plain(ret_list[slot])} for slot, s in beams], "beam_width": B,
             "expand": E, "groups": G, "diversity": float(diversity), "sample": bool(sample),
             "expansions": h.expansions}
    return Optimum("beam", one, beams[0][1], h.candidates, None, extra)


def _plain(v):
    """A return value as plain Python (tokens and completions as their text)."""
    v = to_python(v)
    if isinstance(v, str):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
