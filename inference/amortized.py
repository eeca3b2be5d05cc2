"""Amortized inference: guides trained once, used as proposals for IS and SMC.

    m.run("importance", data, particles=1000, proposal=guide)   # guide = ppl.guide(m, data).fit(...)
    m.run("smc", data, particles=1000, proposal=guide)          # per-site proposals

A composition of the run kit: ``GuideRun`` is q for one run of N particles, and
``guided(handler, run)`` makes it the chooser of a kit handler, so guided importance
sampling is ``guided(LikelihoodWeighting(...))`` and guided SMC ``guided(SMCHandler(...))``;
training (``Guide.fit``) runs B data sets x K particles through the same handler, the
data sets put in by the kit's ``observed_values`` rewrite, simulated ones drawn by
``semantics.prior_predictive``. The Python face (``ppl/guide.py``) adds what is for
people: ``ppl.guide``, results of ``posterior()``, the loss plot, and guide files.

**Invariant.** With a guide as the proposal, every choice the guide knows is drawn from
q and the particle's log weight gets log p(choice) - log q(choice), every other choice is
drawn from its prior as usual (weight unchanged), and every likelihood, factor and
condition is weighted as usual: log w = log p(x, y) - log q(x | y). So the weighting is
proper for the model's unnormalised measure (E[w f(x)] = Z E_post[f]) whatever the guide
is, as long as q covers the posterior: a poor guide costs effective sample size (see
``ess`` and ``pareto_k``: above 0.7 the estimates are unreliable), never consistency.
In SMC (``model.run("smc", ..., proposal=guide)``) the mean-field guide proposes each
site where the program reaches it, in program order (discrete factors conditioned on
the earlier discrete values, which follow the resampling), with the same weight
correction at that site; guides that draw the continuous latents jointly (``lowrank``,
``flow``) are importance-sampling proposals only.

Guide families, the feature map of the data and the encoders are described in
``inference.guides``; the objectives (what each estimates) in ``inference.objectives``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..semantics.dist_values import ProposedDist
from ..semantics.errors import PPLError, PPLRuntimeError, did_you_mean
from ..semantics.middleware import Rewritten, observed_values as observed_values_rewrite
from ..semantics.model import ModelLike
from ..semantics.prior_predictive import PriorPredictive
from ..semantics.sampling import LikelihoodWeighting, column, drive
from ..semantics.values import Batched, Particles, PerParticle, as_tensor, rows
from ..stdlib import rng
from ..stdlib.progress import progress_bar
from . import objectives as O
from .guides import _DEPENDS, FAMILIES, GuideNet, Layout, _depends, _finite_bounds, _sum_ldj, discover
from .population import Population
from .resampling import ess as resampling_ess
from .smc import SMCHandler, smc

__all__ = ["Guide", "GuideRun", "pareto_k"]


# ======================================================================= one proposal run
class GuideRun:
    """The guide as the proposal of one interpreter run over N particles.

    ``features``: [1, F] (one data set for every particle), [N, F] (a data set per
    particle, in training) or None (a guide without encoder). ``reparam``: draw
    continuous values differentiably (ELBO/IWAE) or not (RWS). ``track``: accumulate
    log q per particle (``logq``, and ``logq_discrete`` for the score-function terms)."""

    def __init__(self, net: GuideNet, N: int, features: torch.Tensor | None, device="cpu", *,
                 reparam: bool = True, track: bool = False, sequential: bool = False):
        self.net = net
        self.layout = net.layout
        self.N = N
        rows_ = 1 if features is None else features.shape[0]
        self.params, self.context = net.head_out(features, rows_)
        dev = self.params.device
        if str(dev) != str(torch.device(device)):
            raise PPLError(f"the guide is on {dev} but the run is on {device}",
                           hint="move the guide with guide.to(device) or run on its device")
        self.reparam = reparam
        self.track = track
        self.logq = torch.zeros(N, dtype=self.params.dtype, device=dev)
        self.logq_discrete = torch.zeros(N, dtype=self.params.dtype, device=dev)
        self.joint = None
        self.visited: dict[str, torch.Tensor] = {}
        self._onehot = None
        self.joint_family = net.family != "normal" and self.layout.D > 0
        if sequential and self.joint_family:
            raise PPLError(f"SMC needs per-site proposals, but a '{net.family}' guide draws the continuous "
                           "latents jointly",
                           hint="use a family='normal' guide (mean-field) as the SMC proposal, or this guide "
                                "with method 'importance'")

    def _rows(self, t, idx):
        if t is None:
            return None
        return t.expand(idx.shape[0], *t.shape[1:]) if t.shape[0] == 1 else t.index_select(0, idx)

    def _acc(self, name, ctx, lq):
        cur = getattr(self, name)
        if ctx.M == self.N and ctx.is_full:
            setattr(self, name, cur + lq)
        else:
            setattr(self, name, cur.index_add(0, ctx.idx, lq))

    def propose(self, eff, handler):
        """(value, log q of it per particle of eff.ctx) for a choice the guide knows, or
        None (the handler then draws it from its prior)."""
        site = self.layout.by_addr.get(eff.addr)
        if site is None:
            return None
        ctx = eff.ctx
        target = eff.dist.target if isinstance(eff.dist, ProposedDist) else eff.dist
        if site.kind == "continuous":
            return self._continuous(site, target, ctx, handler)
        return self._discrete(site, target, ctx)

    def _continuous(self, site, target, ctx, handler):
        idx, M = ctx.idx, ctx.M
        params, batched = target._params(ctx)
        d = target._make(params)
        shape = tuple(d.batch_shape[1:] if batched else d.batch_shape) + tuple(d.event_shape)
        if shape != tuple(site.shape):
            raise PPLRuntimeError(f"the guide proposes values of shape {tuple(site.shape)} at '{site.addr}', but here "
                                  f"the choice has shape {shape}",
                                  hint="a guide is built for the shapes of the data it was built with: build it "
                                       "(ppl.guide(model, data)) with data of this shape")
        if not self.joint_family:
            q = self.net.site_normal(self._rows(self.params, idx), site)
            u = rng.rsample(q) if self.reparam else rng.sample(q)
            lq = q.log_prob(u).sum(-1)
            u = u.reshape(M, *site.ushape)
            t = site.transform
            x = t(u)
            lq = lq - _sum_ldj(t.log_abs_det_jacobian(u, x), M)
        else:
            if self.joint is None:
                self._draw_joint(ctx, handler)
            x = self.joint[site.addr].index_select(0, idx)
            lq = torch.zeros(M, dtype=x.dtype, device=x.device)
            seen = self.visited.setdefault(site.addr, torch.zeros(self.N, dtype=torch.bool, device=x.device))
            seen[idx] = True
        if self.track and not self.joint_family:
            self._acc("logq", ctx, lq)
        return Batched(target.spec.to_value(x), idx), lq

    def _draw_joint(self, ctx, handler):
        N, lay, net = self.N, self.layout, self.net
        full = Particles(ctx.full.idx, ctx.N, ctx.device, ctx.full)
        params = self.params.expand(N, -1) if self.params.shape[0] == 1 else self.params
        context = None if self.context is None else (
            self.context.expand(N, -1) if self.context.shape[0] == 1 else self.context)
        u, lq = net.sample_u(params, context, self.reparam)
        self.joint = {}
        for s in lay.continuous:
            us = u[:, s.offset:s.offset + s.dim].reshape(N, *s.ushape)
            t = s.transform
            x = t(us)
            lq = lq - _sum_ldj(t.log_abs_det_jacobian(us, x), N)
            self.joint[s.addr] = x
        handler.add(full, -lq)
        if self.track:
            self._acc("logq", full, lq)

    def _discrete(self, site, target, ctx):
        idx, M = ctx.idx, ctx.M
        self._check_support(site, target, ctx)
        onehot = rows(self._onehot, ctx) if self._onehot is not None else None
        lg = self.net.site_logits(self._rows(self.params, idx), site, onehot)
        cat = torch.distributions.Categorical(logits=lg)
        k = rng.sample(cat)  # [M, numel]
        lq = cat.log_prob(k).sum(-1)
        if site.kind == "token":
            lmv = target.lmv
            value = PerParticle([lmv.token(i) for i in k[:, 0].tolist()], idx)
        else:
            value = Batched(target.spec.to_value((k + site.low).reshape(M, *site.shape)), idx)
        if self.net.autoregressive:
            full = Particles(ctx.full.idx, ctx.N, ctx.device, ctx.full)
            cur = rows(self._onehot, full).clone() if self._onehot is not None else \
                torch.zeros(ctx.N, self.layout.L, dtype=lg.dtype, device=lg.device)
            cur[idx, site.loffset:site.loffset + site.width] = \
                nn.functional.one_hot(k, site.K).reshape(M, -1).to(cur.dtype)
            self._onehot = Batched(cur, full.idx)
        if self.track:
            self._acc("logq", ctx, lq)
            self._acc("logq_discrete", ctx, lq)
        return value, lq

    def _check_support(self, site, target, ctx):
        if site.kind == "token":
            V = getattr(getattr(target, "lmv", None), "V", None)
            if V != site.K:
                raise PPLRuntimeError(f"the guide proposes tokens of a vocabulary of {site.K} at '{site.addr}', "
                                      f"but the model's language model has {V}",
                                      hint="use the guide with the language model it was trained with")
            return
        lo, hi, ok = _finite_bounds(target.torch_dist(ctx).support)
        if not ok or lo != site.low or hi - lo + 1 != site.K:
            raise PPLRuntimeError(f"the guide proposes {site.K} values ({site.low}..{site.low + site.K - 1}) at "
                                  f"'{site.addr}', but here the choice has {'values ' + str(lo) + '..' + str(hi) if ok else 'another support'}",
                                  hint="a guide covers the supports of the data it was built with: build it "
                                       "(ppl.guide(model, data)) with data of this shape")

    def finish(self):
        if self.joint_family and self.joint is not None:
            for s in self.layout.continuous:
                seen = self.visited.get(s.addr)
                if seen is None or not bool(seen.all()):
                    raise PPLRuntimeError(
                        f"the '{self.net.family}' guide draws all continuous latents jointly, but the choice "
                        f"'{s.addr}' was not made by every particle",
                        hint="joint guides need the same continuous choices in every run; use family='normal' "
                             "(mean-field, proposes each choice where the program makes it)")
        elif self.joint_family and self.joint is None and self.layout.D:
            raise PPLRuntimeError("the guide's continuous choices were not made by this run of the model",
                                  hint="use the guide with the model and data shape it was built for")


def guided(handler, run: GuideRun):
    """``handler`` (a kit ``Weighting``: likelihood weighting, an ``SMCHandler``...) with the
    guide as its chooser: a choice the guide knows is drawn from q and weighted by
    log p - log q (in float64); any other by the handler's own chooser. The guide's run is
    checked when the handler finishes. Returns the handler."""
    otherwise, finish_handler = handler.choose, handler.finish

    def choose(h, eff):
        proposed = run.propose(eff, h)
        if proposed is None:
            return otherwise(h, eff)
        value, lq = proposed
        target = eff.dist.target if isinstance(eff.dist, ProposedDist) else eff.dist
        h.add(eff.ctx, target.log_prob(value, eff.ctx).to(torch.float64) - lq.to(torch.float64))
        return value

    def finish():
        finish_handler()
        run.finish()
    handler.choose, handler.finish = choose, finish
    return handler


# =================================================================== data for training
def _observed_rows(inner, observations: Mapping[str, torch.Tensor]) -> Rewritten:
    """``inner`` whose ``observe`` statements see per-particle values
    ``observations[addr]`` [N, ...] (row i for particle i): B data sets in one run."""
    def rows_of(eff):
        t = observations.get(eff.addr)
        if t is None:
            raise PPLRuntimeError(f"no data for the observation '{eff.addr}'", eff.span,
                                  "the training data sets must observe the same sites")
        return Batched(t.index_select(0, eff.ctx.idx), eff.ctx.idx)
    return Rewritten(inner, observed_values_rewrite(rows_of))


def _simulate_handler(N, device) -> PriorPredictive:
    return PriorPredictive(N, device, factor_message="cannot simulate data sets from a model with `factor` statements",
                           factor_hint="forward_kl (and amortized training on simulated data) draws latents and data "
                                       "from the model; a factor reweights the prior, so its draws would not come "
                                       "from the model: use objective='rws' or 'elbo' on the data set, with "
                                       "encoder=None")


class _Simulator:
    """Prior-predictive simulations (latents, observations) drawn in large batched chunks
    and handed out without reuse."""

    def __init__(self, model, data, layout: Layout, device, chunk: int):
        self.model, self.layout, self.device, self.chunk = model, layout, device, int(chunk)
        self.prepared = model.prepare_data(model.bind((), data), device)
        self.buf = None
        self.pos = 0

    def _fill(self):
        S = self.chunk
        h = _simulate_handler(S, self.device)
        with torch.no_grad():
            drive(self.model.interpreter().run(self.model.entry, self.prepared, Particles.all(S, self.device)), h)
        keep = torch.nonzero(h.ok).flatten()
        if keep.numel() == 0:
            raise PPLError("no prior-predictive simulation satisfied the model's conditions",
                           hint="the conditions are (nearly) impossible under the prior")
        lat = h.trace.sites()
        obs = h.observed.sites()
        latents, observations = {}, {}
        for s in self.layout.sites:
            if s.addr not in lat:
                raise PPLError(f"the simulations did not make the choice '{s.addr}'",
                               hint="training on simulations needs a model with the same latent choices in "
                                    "every run (a static model)")
            v, present = lat[s.addr]
            if present is not None and not bool(present[keep].all()):
                raise PPLError(f"the choice '{s.addr}' is made only in some simulations",
                               hint="forward_kl needs a model with the same latent choices in every run (a "
                                    "static model); use objective='elbo' or 'rws'")
            latents[s.addr] = v.index_select(0, keep) if isinstance(v, torch.Tensor) else \
                [v[i] for i in keep.tolist()]
        for a, _ in self.layout.observed:
            if a not in obs:
                raise PPLError(f"the simulations did not reach the observation '{a}'",
                               hint="an amortized guide needs observations fixed by the data shape")
            v, present = obs[a]
            if present is not None and not bool(present[keep].all()):
                raise PPLError(f"the observation '{a}' is reached only in some simulations",
                               hint="an amortized guide needs observations fixed by the data shape "
                                    "(no observe inside a branch on a random value)")
            observations[a] = v.index_select(0, keep)
        self.buf = (latents, observations, keep.numel())
        self.pos = 0

    def next(self, B: int):
        if self.buf is None or self.pos + B > self.buf[2]:
            self._fill()
            if B > self.buf[2]:
                B = self.buf[2]
        lat, obs, _ = self.buf
        sl = slice(self.pos, self.pos + B)
        self.pos += B
        return ({a: (v[sl] if isinstance(v, torch.Tensor) else v[sl]) for a, v in lat.items()},
                {a: v[sl] for a, v in obs.items()}, B)


class _RecordObserved:
    """Handler for one particle: prior draws, observed values recorded, no weights."""

    def __init__(self):
        self.observed: dict = {}

    def sample(self, eff):
        d = eff.dist.target if isinstance(eff.dist, ProposedDist) else eff.dist
        return d.sample(eff.ctx)

    def observe(self, eff):
        if eff.addr not in self.observed:
            self.observed[eff.addr] = _DEPENDS if _depends(eff.value) else eff.value

    def factor(self, eff):
        return None

    condition = twist = factor


def observed_values(model, data: Mapping[str, Any], device="cpu", interp=None) -> dict:
    """observe address -> the observed value (a tensor) of ``model(**data)``."""
    h = _RecordObserved()
    with rng.run(0), torch.no_grad():
        drive((interp or model.interpreter()).run(model.entry, model.prepare_data(model.bind((), data), device),
                                                  Particles.all(1, device)), h)
    out = {}
    for a, v in h.observed.items():
        if v is _DEPENDS:
            continue
        try:
            out[a] = as_tensor(v, device)
        except PPLError:
            continue
    return out


# ============================================================================ diagnostics
def pareto_k(log_weights: torch.Tensor) -> float:
    """The Pareto k-hat of importance weights (PSIS, Vehtari et al.; as in Pyro's
    ``psis_diagnostic``): a generalized Pareto distribution fitted
    (``pyro.ops.stats.fit_generalized_pareto``) to the largest min(N/5, 3 sqrt(N))
    weights. k < 0.5: the weights have finite variance; 0.5-0.7: usable; > 0.7: the
    estimates are unreliable. NaN with fewer than 10 tail weights or a tail of equal
    weights (bounded weights: nothing to fit)."""
    from pyro.ops.stats import fit_generalized_pareto
    lw = torch.as_tensor(log_weights).detach().double().cpu()
    lw = lw[torch.isfinite(lw)]
    n = lw.shape[0]
    if n == 0:
        return float("nan")
    lw = torch.sort(lw - lw.max())[0]
    cut = -int(math.ceil(min(0.2 * n, 3.0 * math.sqrt(n)))) - 1
    if -cut > n:
        return float("nan")
    lw_cut = max(math.log(1.0e-15), float(lw[cut]))
    tail = lw[lw > lw_cut]
    if tail.shape[0] < 10:
        return float("nan")
    excess = tail.exp() - math.exp(lw_cut)
    if float(excess.max() - excess.min()) <= 1e-12 * float(excess.max()):
        # a tail of equal weights (e.g. a few discrete paths): the weights are bounded,
        # there is no Pareto tail to fit (Pyro's fit divides by zero here)
        return float("nan")
    k, _ = fit_generalized_pareto(excess)
    return float(k)


# ================================================================================= Guide
class Guide:
    """A guide q(latents | data) for a model (see the module docstring).

    ``ppl.guide(model, data, family="normal" | "lowrank" | "flow", encoder=None | "auto" |
    nn.Module)``. ``data`` is a data set of the shape the guide will see (an amortized
    guide simulates its training data sets from the model called on it, and reads the
    observed values of any data set of that shape); without it the guide is built at the
    first ``fit``. Options: ``rank`` (lowrank), ``hidden`` (the auto encoder's layer
    widths), ``flow_bins`` (spline bins), ``autoregressive`` (discrete factors conditioned
    on the earlier discrete values), ``sites`` (the addresses to guide; others stay drawn
    from their priors), ``init_scale`` (the initial scale of the continuous factors, in
    unconstrained space; by default q starts at the mean and sd of the prior's
    unconstrained draws, so that an untrained guide is a broad proposal)."""

    def __init__(self, model, data: Mapping[str, Any] | None = None, *, family: str = "normal",
                 encoder: Any = None, rank: int = 2, hidden: Sequence[int] = (64, 64), flow_bins: int = 8,
                 autoregressive: bool = True, sites: Sequence[str] | None = None, init_scale: float | None = None):
        if not isinstance(model, ModelLike):
            raise PPLError(f"ppl.guide needs a ppl.Model (got {type(model).__name__})",
                           hint="compile it first: ppl.model(source)")
        if family not in FAMILIES:
            raise PPLError(f"unknown guide family '{family}'",
                           hint=did_you_mean(family, FAMILIES) or f"choose from: {', '.join(FAMILIES)}")
        if isinstance(encoder, str) and encoder != "auto":
            raise PPLError(f"unknown encoder '{encoder}'",
                           hint="encoder=None (no amortization), 'auto' (an MLP of the observed data) or a "
                                "torch nn.Module mapping features [B, F] to an embedding [B, H]")
        self.model = model
        self.family = family
        self.encoder = encoder
        self.options = {"rank": int(rank), "hidden": [int(h) for h in hidden], "flow_bins": int(flow_bins),
                        "autoregressive": bool(autoregressive),
                        "init_scale": None if init_scale is None else float(init_scale)}
        self.site_list = list(sites) if sites is not None else None
        self.net: GuideNet | None = None
        self.layout: Layout | None = None
        self.template: dict | None = None
        self.history: list[float] = []
        self.objectives: list[str] = []
        self.features_set = False
        if data is not None:
            self._build(data)

    # --------------------------------------------------------------------- building
    @property
    def amortized(self) -> bool:
        return self.encoder is not None

    def _build(self, data, seed_init: int | None = None):
        data = self.model.bind((), data)
        self.layout, init = discover(self.model, data, sites=self.site_list, need_features=self.amortized)
        self.template = dict(data)
        # torch's module initialisation draws from its global generator: the run's stands in
        with rng.run(0 if seed_init is None else seed_init), rng.global_from_run():
            self.net = GuideNet(self.layout, self.family, self.encoder, rank=self.options["rank"],
                                hidden=self.options["hidden"], flow_bins=self.options["flow_bins"],
                                autoregressive=self.options["autoregressive"], init=init,
                                init_scale=self.options["init_scale"])

    def _ready(self, data=None):
        if self.net is None:
            if data is None:
                raise PPLError("this guide has not been built yet: it needs a data set to learn the model's choices",
                               hint="pass data: ppl.guide(model, data) or guide.fit(data, ...)")
            self._build(data)

    @property
    def sites(self) -> list[str]:
        """The addresses the guide proposes."""
        self._ready()
        return [s.addr for s in self.layout.sites]

    def describe(self) -> str:
        kind = "amortized" if self.amortized else "fixed"
        return f"guide({self.family}, {kind})"

    # --------------------------------------------------------------------- features
    def features(self, data: Mapping[str, Any] | None = None) -> torch.Tensor | None:
        """The encoder's input for one data set, [1, F] (None for a guide without encoder)."""
        self._ready(data)
        if not self.amortized:
            return None
        data = self.template if data is None else self.model.bind((), data)
        if getattr(self, "_interp", None) is None:
            self._interp = self.model.interpreter()
        return self.layout.features(observed_values(self.model, data, interp=self._interp))

    def _set_normalisation(self, feats: torch.Tensor, share=None):
        if self.features_set or not self.amortized or feats.shape[1] == 0:
            return
        if share is not None:  # (distributed: from every rank's first batch)
            feats = share.pooled_features(feats)
        with torch.no_grad():
            self.net.feat_loc.copy_(feats.mean(0))
            sd = feats.std(0) if feats.shape[0] > 1 else torch.ones(feats.shape[1])
            self.net.feat_scale.copy_(torch.where(sd > 1e-6, sd, torch.ones_like(sd)))
        self.features_set = True

    # --------------------------------------------------------------------- training
    def fit(self, data: Mapping[str, Any] | None = None, objective: str | None = None, *, steps: int = 1000,
            batch_size: int | None = None, particles: int | None = None, lr: float | None = None,
            lr_end: float | None = None, seed: int | None = None, progress: bool | None = True,
            datasets: Sequence[Mapping[str, Any]] | None = None, chunk: int = 16384, clip: float = 100.0,
            distributed: bool = False) -> "Guide":
        """Train the guide; returns it. ``objective``: ``"forward_kl"`` (default for an
        amortized guide), ``"elbo"`` (default otherwise), ``"iwae"``, ``"rws"``/``"brain"``
        (``inference.objectives`` says what each estimates). An amortized guide trains on
        data sets simulated from the prior predictive of ``model(**data)`` (``chunk`` of
        them per batched simulation, none reused), or on minibatches of ``datasets``;
        ``batch_size`` data sets per step (default 256 for forward_kl, 32 otherwise), each
        with ``particles`` draws from the guide (ELBO 8, IWAE/RWS 16). A guide without
        encoder trains on ``data`` with ``particles`` draws per step (default 64).
        Adam with learning rate ``lr`` decaying exponentially to ``lr_end`` (defaults
        3e-3 -> 3e-4 amortized, 5e-2 -> 5e-3 otherwise); gradient norms clipped at
        ``clip``. ``self.history`` receives the reported value of every step (a loss:
        lower is better; see ``inference.objectives``), shown by ``plot_loss()``.
        ``progress``: a bar of steps with the loss on stderr (``stdlib.progress``: True,
        the default here, at once; None on a terminal after 2 s; False never).
        ``distributed``: under ``torchrun`` (every rank calls ``fit`` alike), forward_kl on
        simulations shared by the ranks, data parallel (``inference.amortized_distributed``):
        every rank ends with the same trained guide."""
        if data is None and self.net is None and datasets:
            data = datasets[0]
        if data is None and self.net is None:
            raise PPLError("guide.fit needs a data set", hint="guide.fit(data, objective=...)")
        obj = objective or ("forward_kl" if self.amortized else "elbo")
        obj = O.ALIASES.get(obj, obj)
        if obj not in O.OBJECTIVES:
            raise PPLError(f"unknown objective '{objective}'",
                           hint=did_you_mean(str(objective), list(O.OBJECTIVES) + list(O.ALIASES))
                           or f"choose from: {', '.join(O.OBJECTIVES)}")
        if obj == "forward_kl" and not self.amortized:
            raise PPLError("forward_kl trains q(latents | data) on simulated data sets, but this guide has no "
                           "encoder: it can only learn the prior",
                           hint="use encoder='auto' (an amortized guide), or objective='elbo' / 'rws' for one "
                                "data set")
        try:
            steps = int(steps)
            assert steps >= 1
        except (TypeError, ValueError, AssertionError):
            raise PPLError(f"steps must be a positive integer (got {steps!r})") from None
        if distributed:
            from .amortized_distributed import data_parallel
            with data_parallel(obj, datasets, seed, 256 if batch_size is None else batch_size) as (share, base, mine,
                                                                                                  root):
                with rng.run(base):
                    self._ready(data)
                    template = self.model.bind((), data) if data is not None else self.template
                with rng.run(mine):  # (this rank's simulations)
                    self._fit(template, obj, steps, batch_size, particles, lr, lr_end, progress if root else False,
                              datasets, chunk, clip, share)
            return self
        with rng.run(seed):
            self._ready(data)
            if data is not None:
                data = self.model.bind((), data)
            template = data if data is not None else self.template
            self._fit(template, obj, steps, batch_size, particles, lr, lr_end, progress, datasets, chunk, clip)
        return self

    def _fit(self, template, obj, steps, batch_size, particles, lr, lr_end, progress, datasets, chunk, clip,
             share=None):
        net, lay = self.net, self.layout
        amort = self.amortized
        if batch_size is None:
            batch_size = 256 if obj == "forward_kl" else 32
        if particles is None:
            particles = {"elbo": 8, "iwae": 16, "rws": 16}.get(obj, 1) if amort else 64
        B = int(batch_size) if amort else 1
        K = int(particles)
        if obj == "iwae" and K < 2 and (lay is None or lay.L):
            raise PPLError("the IWAE objective with discrete choices needs particles >= 2 (VIMCO baseline)")
        if lr is None:
            lr = 3e-3 if amort else 5e-2
        if lr_end is None:
            lr_end = lr / 10
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        gamma = (lr_end / lr) ** (1.0 / max(1, steps))
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
        sim = None
        pool = None
        if amort:
            if datasets is not None:
                obs = [observed_values(self.model, self.model.bind((), d)) for d in datasets]
                table = {a: torch.stack([o[a] if a in o else _missing(a) for o in obs]) for a, _ in lay.observed}
                pool = (table, len(obs))
                if obj == "forward_kl":
                    raise PPLError("forward_kl trains on simulated data sets (their latents are known); "
                                   "`datasets` has no latents", hint="drop datasets=, or use objective='elbo'/'rws'")
            else:
                sim = _Simulator(self.model, template, lay, "cpu", max(chunk, B))
        prepared = self.model.prepare_data(template, "cpu")
        interp0 = self.model.interpreter()
        running = [None]
        every = max(1, steps // 100)
        net.train()
        with progress_bar(progress, desc=f"fit {obj}", unit=" steps", total=steps) as bar:
            for step in range(steps):
                if obj == "forward_kl":
                    lat, obs, n = sim.next(B if share is None else share.local)
                    feats = lay.features(obs, n)
                    self._set_normalisation(feats, share)
                    loss, value = O.forward_kl(net.log_prob(lat, feats, n))
                else:
                    if amort:
                        if pool is not None:
                            pick = rng.randint(pool[1], (B,))
                            obs = {a: v.index_select(0, pick) for a, v in pool[0].items()}
                            n = B
                        else:
                            _, obs, n = sim.next(B)
                        feats = lay.features(obs, n)
                        self._set_normalisation(feats)
                        feats = feats.repeat_interleave(K, 0)
                        obs = {a: v.repeat_interleave(K, 0) for a, v in obs.items()}
                        interp = _observed_rows(interp0, obs)
                    else:
                        n, feats, interp = 1, None, interp0
                    lw, logq, logq_d = self._weights(interp, prepared, n, K, feats, reparam=obj != "rws")
                    if obj == "elbo":
                        loss, value = O.elbo(lw, logq_d, running)
                    elif obj == "iwae":
                        loss, value = O.iwae(lw, logq_d)
                    else:
                        loss, value = O.rws(lw, logq)
                if share is None and not torch.isfinite(loss):
                    raise PPLRuntimeError(f"the {obj} loss is {float(loss)} at step {step}",
                                          hint="every particle may violate a condition, or the learning rate is "
                                               "too high: lower lr, or check the model")
                opt.zero_grad()
                if share is None:
                    loss.backward()
                else:  # (the ranks' gradients combined: every rank takes the same step)
                    value = share.backward(loss, value, net.parameters(), f"the {obj} loss at step {step}")
                if clip:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
                opt.step()
                sched.step()
                self.history.append(value)
                bar.update(1)
                if step % every == 0:
                    bar.set_postfix_str(f"loss={value:.4g}", refresh=False)
        net.eval()
        self.objectives.append(obj)

    def _weights(self, interp, prepared, n: int, K: int, feats, reparam: bool):
        """One training run of n data sets x K particles: (log weights, log q, log q of
        the discrete choices or None), each [n, K]."""
        N = n * K
        run = GuideRun(self.net, N, feats, "cpu", reparam=reparam, track=True)
        h = guided(LikelihoodWeighting(N, "cpu"), run)
        drive(interp.run(self.model.entry, prepared, Particles.all(N)), h)
        return (h.log_weights.view(n, K), run.logq.view(n, K),
                run.logq_discrete.view(n, K) if self.layout.L else None)

    # --------------------------------------------------------------------- using
    def proposal_run(self, data, N: int, device="cpu", sequential: bool = False) -> GuideRun:
        """A ``GuideRun`` proposing for ``model(**data)`` with N particles (no gradients)."""
        self._ready(data)
        feats = self.features(data) if self.amortized else None
        return GuideRun(self.net, N, feats, device, reparam=False, sequential=sequential)

def _missing(a):
    raise PPLError(f"a data set in `datasets` does not observe '{a}'",
                   hint="every data set must have the shape of the data the guide was built with")


# ================================================================== inference entry points
def _as_guide(proposal, model) -> Guide:
    """``proposal`` checked: a guide for ``model`` (the face loads a saved one from its path)."""
    if not isinstance(proposal, Guide):
        raise PPLError(f"proposal must be a ppl.Guide or the path of a saved one (got {type(proposal).__name__})",
                       hint="train one with ppl.guide(model, data).fit(...)")
    if proposal.model.program != model.program or proposal.model.entry != model.entry:
        raise PPLError("the guide was built for another model",
                       hint=f"it proposes for {proposal.model!r}; build a guide for {model!r}")
    return proposal


def _weight_extra(g: Guide, lw: torch.Tensor, N: int) -> dict:
    lw64 = lw.detach().double().cpu()
    ess = resampling_ess(lw64)  # stable for log weights of any size
    return {"proposal": g.describe(), "ess_fraction": ess / N, "pareto_k": pareto_k(lw64)}


def run_guided_importance(model, data: dict, proposal, *, particles: int, device="cpu") -> Population:
    """Importance sampling with ``proposal`` (a Guide) for ``model(**data)``."""
    g = _as_guide(proposal, model)
    N = int(particles)
    if g.family == "program":
        return g.importance(data, N, device)
    with torch.no_grad():
        run = g.proposal_run(data, N, device)
        h = guided(LikelihoodWeighting(N, device), run)
        ctx = Particles.all(N, device)
        ret = drive(model.interpreter().run(model.entry, model.prepare_data(data, device), ctx), h)
        sites = {"return": (column(ret, ctx), None)}
        sites.update(h.trace.sites())
    lw = h.log_weights.detach()
    return Population("importance", sites, lw, _weight_extra(g, lw, N))


def run_guided_smc(model, data: dict, proposal, *, particles: int, device="cpu", resampling="systematic",
                   ess_threshold: float = 1.0, progress: bool | None = None, keep=None) -> Population:
    """SMC with ``proposal`` (a mean-field Guide) proposing each choice in program order;
    ``progress`` and ``keep`` as for ``smc``."""
    g = _as_guide(proposal, model)
    N = int(particles)
    with torch.no_grad():
        run = g.proposal_run(data, N, device, sequential=True)
        pop = smc(model.interpreter(), model.entry, model.prepare_data(data, device), N, device,
                  resampling=resampling, ess_threshold=ess_threshold, keep=keep,
                  handler_cls=lambda *a, **k: guided(SMCHandler(*a, **k), run), progress=progress)
    return Population("smc", pop.sites, pop.log_weights.detach(), {**pop.extra, "proposal": g.describe()})
