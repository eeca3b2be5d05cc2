"""Guide families over a model's latent addresses (``ppl.guide``; used by ``inference.amortized``).

A *guide* is a distribution q(x | y) over the latent choices x of a model (by address:
``"mu"``, ``"z[3]"``, ``"tok[0]"``) given the observed data y. The guides here are built
automatically from one run of the model (``discover``):

* **Layout.** Each choice the model makes becomes a *site*: its address, the shape of one
  particle's value, and its support. Continuous sites are mapped to an unconstrained
  vector u in R^D by ``torch.distributions.biject_to(support)`` (identity for reals, exp
  for positive values, a sigmoid for (0, 1) and intervals, stick-breaking for the
  simplex); q's density on x includes the log-det of that map:
  log q(x) = log q_u(u) - log |det dT/du|.
  Finite discrete sites (``flip``, ``bernoulli``, ``categorical``, ``binomial``,
  ``beta_binomial``, language-model tokens ``lm.next_token``) get categorical factors
  (one per element of the value) with logits.
* **Families** of q_u on the continuous part: ``"normal"`` (mean-field: independent
  normals), ``"lowrank"`` (a multivariate normal with covariance W W^T + diag(d), W of
  ``rank`` columns), ``"flow"`` (a standard normal pushed through a rational-quadratic
  spline and, in two or more dimensions, an affine autoregressive layer, then an affine
  map loc + scale * z; pyro.distributions.transforms).
* **Discrete factors** are independent (``autoregressive=False``) or, by default,
  autoregressive: the logits of a site add a learned linear function of the one-hot
  values of the discrete sites before it (in the order the model first reaches them), so
  a chain of choices (tokens of a text) can be fitted exactly.
* **Amortization.** Without an encoder the parameters are free (one guide per data set,
  like Pyro's ``AutoNormal``). With an encoder they are a function of the data: the
  encoder reads the *feature vector* of a data set, the values of the model's ``observe``
  statements in the order the model reaches them, flattened (``Layout.features``; the
  same map for real data and for data simulated from the model, so a guide trained on
  simulations applies to real data). ``encoder="auto"`` is an MLP on the standardised
  features plus a linear map of them (so linear-Gaussian posteriors are exactly
  representable); an ``nn.Module`` of the user maps the raw features [B, F] to an embedding
  [B, H], and a linear head maps that to the parameters.

Inputs that are not observed (covariates such as ``xs`` in a regression, sizes) are not
features: they are part of the model's structure and are taken from the data the guide
was built with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.distributions import biject_to, constraints

from ..semantics.dist_values import ProposedDist
from ..semantics.errors import PPLError, did_you_mean
from ..semantics.sampling import LikelihoodWeighting, drive
from ..semantics.values import Particles, PerParticle, as_tensor, is_batched, rows
from ..stdlib import rng

FAMILIES = ("normal", "lowrank", "flow")


# ================================================================================ layout
@dataclass
class SiteInfo:
    """One latent site of the guide."""
    addr: str
    kind: str                 # "continuous" | "discrete" | "token"
    shape: tuple              # the shape of one particle's value
    dist: str                 # the distribution's name (for messages)
    # continuous
    support: Any = None
    ushape: tuple = ()        # the unconstrained shape
    dim: int = 0              # numel of the unconstrained value
    offset: int = 0           # position in u
    # discrete / token
    K: int = 0                # categories per element
    low: int = 0              # value of category 0
    numel: int = 0            # elements of the value
    loffset: int = 0          # position in the logits (and the one-hot vector)
    dtype: str = ""           # "bool" | "long" | "token"
    texts: tuple = ()         # token texts (tokens only)

    @property
    def transform(self):
        return biject_to(self.support)

    @property
    def width(self) -> int:   # logits of a discrete site
        return self.numel * self.K



class Layout:
    """The sites of a guide (in the order the model first reaches them) and the feature
    map of the data (``observed``: observe address -> value shape, in order)."""

    def __init__(self, sites: Sequence[SiteInfo], observed: Sequence[tuple[str, tuple]]):
        self.sites = list(sites)
        self.by_addr = {s.addr: s for s in self.sites}
        self.continuous = [s for s in self.sites if s.kind == "continuous"]
        self.discrete = [s for s in self.sites if s.kind != "continuous"]
        off = 0
        for s in self.continuous:
            s.offset = off
            off += s.dim
        self.D = off
        off = 0
        for s in self.discrete:
            s.loffset = off
            off += s.width
        self.L = off
        self.observed = [(a, tuple(sh)) for a, sh in observed]
        self.F = sum(math.prod(sh) for _, sh in self.observed)

    def features(self, observations: dict, n: int | None = None) -> torch.Tensor:
        """The feature matrix [S, F] of S data sets: ``observations`` maps each observe
        address to its values, [S, *shape] (or one data set's [*shape] with n=None)."""
        cols = []
        for a, sh in self.observed:
            if a not in observations:
                raise PPLError(f"the data set has no value for the observation '{a}' the guide was built with",
                               hint="an amortized guide reads the same observe sites for every data set: "
                                    "use data of the same shape as the data the guide was trained on")
            v = torch.as_tensor(observations[a])
            if n is None:
                v = v.unsqueeze(0)
            if tuple(v.shape[1:]) != sh:
                raise PPLError(f"the observation '{a}' has shape {tuple(v.shape[1:])}, but the guide was built "
                               f"for shape {sh}",
                               hint="an amortized guide's encoder reads a fixed number of observed values: "
                                    "use data of the same size as the training data, or train a guide for it")
            cols.append(v.reshape(v.shape[0], -1).to(torch.get_default_dtype()))
        if not cols:
            return torch.zeros((1 if n is None else n, 0))
        return torch.cat(cols, 1)


# ============================================================================= discovery
class _Discover(LikelihoodWeighting):
    """Prior draws; records each choice's distribution and value, and each observed value."""

    def __init__(self, N, device):
        super().__init__(N, device)
        self.found: dict[str, tuple] = {}
        self.observed: dict[str, Any] = {}

    def sample(self, eff):
        value = super().sample(eff)
        if eff.addr not in self.found:
            self.found[eff.addr] = (eff.dist, value, eff.ctx, eff.span)
        return value

    def observe(self, eff):
        super().observe(eff)
        if eff.addr not in self.observed:
            self.observed[eff.addr] = eff.value if not _depends(eff.value) else _DEPENDS


_DEPENDS = object()


def _depends(v) -> bool:
    return is_batched(v) or isinstance(v, PerParticle) or \
        (isinstance(v, (list, tuple)) and any(_depends(x) for x in v))


def discover(model, data: dict, *, sites: Sequence[str] | None = None, particles: int = 256,
             device: str = "cpu", need_features: bool = False):
    """Run ``model(**data)`` once from the prior (``particles`` particles, seeded so the
    caller's random state is untouched) and build the guide's ``Layout``. ``sites``
    restricts the guide to those addresses (the others stay drawn from their priors).
    Also returns the unconstrained prior draws per continuous site (for initialisation)."""
    prepared = model.prepare_data(model.bind((), data), device)
    h = _Discover(particles, device)
    with rng.run(0), torch.no_grad():
        drive(model.interpreter().run(model.entry, prepared, Particles.all(particles, device)), h)
    if sites is not None:
        sites = list(sites)
        for a in sites:
            if a not in h.found:
                raise PPLError(f"the model makes no choice at the address '{a}'",
                               hint=did_you_mean(a, list(h.found)) or f"its choices are: {', '.join(h.found)}")
    infos, init = [], {}
    for addr, (dist, value, ctx, span) in h.found.items():
        if sites is not None and addr not in sites:
            continue
        info, u0 = _site_info(addr, dist, value, ctx, span, explicit=sites is not None)
        if info is not None:
            infos.append(info)
            if u0 is not None:
                init[addr] = u0
    observed = []
    for a, v in h.observed.items():
        if v is _DEPENDS:
            if need_features:
                raise PPLError(f"the observation '{a}' depends on the model's random choices, so it is not data "
                               "an encoder can read", hint="use encoder=None (a guide for one data set)")
            continue
        try:
            t = as_tensor(v, "cpu")
        except PPLError:
            if need_features:
                raise PPLError(f"the observation '{a}' is not numeric ({type(v).__name__}): the default feature "
                               "map reads numbers", hint="use encoder=None (a guide for one data set)") from None
            continue
        observed.append((a, tuple(t.shape)))
    if not infos:
        raise PPLError(f"the model '{model.entry}' makes no choice a guide can propose",
                       hint="a guide proposes the model's latent choices (x ~ d); this model has none to guide")
    return Layout(infos, observed), init


def _site_info(addr, dist, value, ctx, span, explicit: bool):
    """(SiteInfo, unconstrained prior draws) for one choice, or (None, None) for a site
    left to its prior (a point mass)."""
    target = dist.target if isinstance(dist, ProposedDist) else dist
    spec = target.spec
    if getattr(spec, "index_valued", False):
        from ..stdlib.lm.dsl import TokenDist
        if isinstance(target, TokenDist):
            lmv = target.lmv
            texts = tuple(lmv.lm.token_text(i) for i in range(lmv.V))
            return SiteInfo(addr, "token", (), "next_token", K=lmv.V, numel=1, dtype="token", texts=texts), None
        raise PPLError(f"a guide cannot propose the choice '{addr}' ({target.describe()})", span,
                       "guides propose numbers, booleans and language-model tokens: write a generation as a "
                       "loop of lm.next_token, use categorical over indices instead of uniform_draw, or leave "
                       "the site to its prior with sites=[...]")
    if spec.name == "delta":
        return None, None  # a point mass: proposing it from its prior is exact
    d = target.torch_dist(ctx)
    v = rows(value, ctx)
    shape = tuple(v.shape[1:])
    support = d.support
    if support.is_discrete:
        lo, hi, ok = _finite_bounds(support)
        if not ok:
            raise PPLError(f"a guide cannot propose the choice '{addr}': {spec.name} has infinite support", span,
                           "guides propose finite discrete choices (flip, categorical, binomial); bound it "
                           "(categorical over a finite range) or leave it to its prior with sites=[...]")
        n = math.prod(shape)
        return SiteInfo(addr, "discrete", shape, spec.name, K=hi - lo + 1, low=lo, numel=n,
                        dtype="bool" if spec.value_dtype == "bool" else "long"), None
    support = _static_support(support, addr, spec.name, span)
    t = biject_to(support)
    ushape = tuple(t.inverse_shape(torch.Size(shape)))
    u0 = t.inv(v.detach().to(torch.get_default_dtype())).reshape(v.shape[0], -1)
    return SiteInfo(addr, "continuous", shape, spec.name, support=support, ushape=ushape,
                    dim=math.prod(ushape)), u0


def _finite_bounds(support):
    if support is constraints.boolean or isinstance(support, type(constraints.boolean)):
        return 0, 1, True
    lo, hi = getattr(support, "lower_bound", None), getattr(support, "upper_bound", None)
    if lo is None or hi is None:
        return 0, 0, False
    lo_t, hi_t = torch.as_tensor(lo), torch.as_tensor(hi)
    if lo_t.numel() > 1 and not bool((lo_t == lo_t.flatten()[0]).all()):
        return 0, 0, False
    if hi_t.numel() > 1 and not bool((hi_t == hi_t.flatten()[0]).all()):
        return 0, 0, False
    return int(lo_t.flatten()[0]), int(hi_t.flatten()[0]), True


def _static_support(support, addr, name, span):
    """The support with its bounds as Python numbers; an error when they differ between
    particles (the support depends on other choices)."""
    bounds = {}
    for key in ("lower_bound", "upper_bound"):
        b = getattr(support, key, None)
        if isinstance(b, torch.Tensor) and b.numel() > 0:
            flat = b.flatten()
            if not bool((flat == flat[0]).all()):
                raise PPLError(f"the support of '{addr}' ({name}) depends on other choices", span,
                               "automatic guides need fixed supports: reparameterise (e.g. x = low + (high - "
                               "low) * u with u ~ uniform(0, 1)), or leave the site to its prior with sites=[...]")
            bounds[key] = float(flat[0])
    if not bounds:
        return support
    if type(support).__name__ in ("_Interval", "_HalfOpenInterval"):
        return constraints.interval(bounds["lower_bound"], bounds["upper_bound"])
    if type(support).__name__ in ("_GreaterThan", "_GreaterThanEq"):
        return constraints.greater_than(bounds["lower_bound"])
    if type(support).__name__ == "_LessThan":
        return constraints.less_than(bounds["upper_bound"])
    return support


# ================================================================================ the net
def _inv_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class MLP(nn.Module):
    """The default encoder: standardised features -> ``hidden`` tanh layers."""

    def __init__(self, F: int, hidden: Sequence[int]):
        super().__init__()
        layers, d = [], F
        for h in hidden:
            layers += [nn.Linear(d, h), nn.Tanh()]
            d = h
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x):
        return self.net(x)


class GuideNet(nn.Module):
    """The parameters of a guide: free, or the output of an encoder of the features.

    ``head(features)`` gives, per row, the parameter vector [loc (D), raw scale (D),
    (cov factor (D * rank) | flow context), discrete logits (L)]. ``family`` and a text
    ``encoder`` come checked (``amortized.Guide``)."""

    def __init__(self, layout: Layout, family: str = "normal", encoder: Any = None, *, rank: int = 2,
                 hidden: Sequence[int] = (64, 64), flow_bins: int = 8, autoregressive: bool = True,
                 init: dict | None = None, init_scale: float | None = None):
        super().__init__()
        self.layout = layout
        self.family = family
        D, L = layout.D, layout.L
        self.rank = int(rank) if family == "lowrank" else 0
        if family == "lowrank" and self.rank < 1:
            raise PPLError(f"rank must be a positive integer (got {rank!r})")
        self.P = 2 * D + D * self.rank + L
        self.amortized = encoder is not None
        self.custom_encoder = self.amortized and not isinstance(encoder, str)
        F = layout.F
        self.register_buffer("feat_loc", torch.zeros(F))
        self.register_buffer("feat_scale", torch.ones(F))
        bias = torch.zeros(self.P)
        init = init or {}
        scale0 = torch.ones(D)
        for s in layout.continuous:
            u0 = init.get(s.addr)
            sl = slice(s.offset, s.offset + s.dim)
            if u0 is not None and u0.shape[0] > 1:
                u0 = u0[torch.isfinite(u0).all(1)]
            if u0 is not None and u0.shape[0] > 1:
                bias[sl] = u0.mean(0)
                scale0[sl] = u0.std(0).clamp(1e-2, 10.0)
        if init_scale is not None:
            scale0 = torch.full((D,), float(init_scale))
        bias[D:2 * D] = torch.tensor([_inv_softplus(float(x)) for x in scale0])
        if not self.amortized:
            self.free = nn.Parameter(bias)
            ctx_dim = 0
        else:
            if isinstance(encoder, str):
                if F == 0:
                    raise PPLError("an amortized guide needs observed data, but the model observes nothing",
                                   hint="use encoder=None: a guide for the one target the model defines")
                self.encoder = MLP(F, hidden)
                H = self.encoder.out_dim
                # a linear path from the standardised features to the parameters, beside
                # the MLP: linear-Gaussian posteriors (conjugate models) are then exactly
                # representable, and the MLP only fits what is not linear
                self.skip = nn.Linear(F, self.P, bias=False)
                nn.init.zeros_(self.skip.weight)
            else:
                if not isinstance(encoder, nn.Module):
                    raise PPLError(f"encoder must be None, 'auto' or a torch nn.Module (got {type(encoder).__name__})")
                self.encoder = encoder
                try:
                    with torch.no_grad():
                        out = encoder(torch.zeros(2, F))
                except Exception as e:  # the user's module
                    raise PPLError(f"the encoder failed on a batch of features of shape [2, {F}]: "
                                   f"{type(e).__name__}: {e}",
                                   hint=f"the encoder maps features [B, F={F}] (the observed values in "
                                        "the order the model observes them) to an embedding [B, H]") from None
                if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
                    raise PPLError("the encoder must return a tensor [B, H]",
                                   hint=f"it returned {getattr(out, 'shape', type(out).__name__)} for input [2, {F}]")
                H = out.shape[1]
            self.head = nn.Linear(H, self.P)
            with torch.no_grad():
                self.head.weight.mul_(0.01)
                self.head.bias.copy_(bias)
            ctx_dim = H
        self.ctx_dim = ctx_dim
        self.flows = nn.ModuleList()
        if family == "flow" and D > 0:
            import pyro.distributions.transforms as T
            if ctx_dim:
                self.flows.append(T.conditional_spline(D, ctx_dim, count_bins=flow_bins, bound=4.0))
                if D >= 2:
                    self.flows.append(T.conditional_affine_autoregressive(D, ctx_dim, hidden_dims=[max(16, 4 * D)]))
            else:
                self.flows.append(T.spline(D, count_bins=flow_bins, bound=4.0))
                if D >= 2:
                    self.flows.append(T.affine_autoregressive(D, hidden_dims=[max(16, 4 * D)]))
        self.autoregressive = bool(autoregressive) and len(layout.discrete) > 1
        if self.autoregressive:
            self.ar = nn.Parameter(torch.zeros(L, L))
            mask = torch.zeros(L, L)
            for s in layout.discrete:
                mask[s.loffset:s.loffset + s.width, :s.loffset] = 1.0
            self.register_buffer("ar_mask", mask)

    # ------------------------------------------------------------------ parameters
    def head_out(self, features: torch.Tensor | None, n: int = 1):
        """(params [B, P], context [B, H] or None) for features [B, F] (or n copies of the
        free parameters)."""
        if not self.amortized:
            return self.free.unsqueeze(0).expand(n, self.P), None
        if features is None:
            raise PPLError("this guide is amortized: it needs the data to propose", hint="pass the data set")
        x = features.to(self.feat_loc.device, self.feat_loc.dtype)
        if not self.custom_encoder:
            x = (x - self.feat_loc) / self.feat_scale
        h = self.encoder(x)
        out = self.head(h)
        if not self.custom_encoder:
            out = out + self.skip(x)
        return out, (h if self.family == "flow" else None)

    def split(self, params):
        D, r = self.layout.D, self.rank
        loc = params[:, :D]
        scale = nn.functional.softplus(params[:, D:2 * D]) + 1e-4
        k = 2 * D
        W = None
        if r:
            W = params[:, k:k + D * r].reshape(-1, D, r)
            k += D * r
        return loc, scale, W, params[:, k:]

    # --------------------------------------------------------- continuous: q_u on R^D
    def _flows(self, context):
        return [f.condition(context) if context is not None else f for f in self.flows]

    def sample_u(self, params, context, reparam: bool = True):
        """u [B, D] ~ q_u and log q_u(u) [B]."""
        loc, scale, W, _ = self.split(params)
        if self.family == "lowrank":
            d = torch.distributions.LowRankMultivariateNormal(loc, W, scale * scale)
            u = rng.rsample(d) if reparam else rng.sample(d)
            return u, d.log_prob(u)
        z = rng.randn_like(loc)
        if self.family == "normal":
            u = loc + scale * z
            if not reparam:
                u = u.detach()
            return u, self.log_prob_u(params, context, u)
        # flow: standard normal -> flows -> affine
        if not reparam:
            with torch.no_grad():
                u, _ = self._flow_forward(z, loc, scale, context)
            return u, self.log_prob_u(params, context, u)
        return self._flow_forward(z, loc, scale, context)

    def _flow_forward(self, z, loc, scale, context):
        lq = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        for t in self._flows(context):
            y = t(z)
            lq = lq - _sum_ldj(t.log_abs_det_jacobian(z, y))
            z = y
        u = loc + scale * z
        return u, lq - torch.log(scale).sum(-1)

    def log_prob_u(self, params, context, u):
        loc, scale, W, _ = self.split(params)
        if self.family == "normal":
            return torch.distributions.Normal(loc, scale).log_prob(u).sum(-1)
        if self.family == "lowrank":
            return torch.distributions.LowRankMultivariateNormal(loc, W, scale * scale).log_prob(u)
        z = (u - loc) / scale
        lq = -torch.log(scale).sum(-1)
        for t in reversed(self._flows(context)):
            x = t.inv(z)
            lq = lq - _sum_ldj(t.log_abs_det_jacobian(x, z))
            z = x
        return lq + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)

    def site_normal(self, params, site: SiteInfo):
        """Mean-field only: the normal of one site's unconstrained values [B, dim]."""
        loc, scale, _, _ = self.split(params)
        sl = slice(site.offset, site.offset + site.dim)
        return torch.distributions.Normal(loc[:, sl], scale[:, sl])

    # ------------------------------------------------------------------- discrete
    def site_logits(self, params, site: SiteInfo, onehot: torch.Tensor | None):
        """Logits [B, numel, K] of a discrete site, given the one-hot values [B, L] of the
        discrete sites drawn before it (zeros elsewhere)."""
        _, _, _, logits = self.split(params)
        sl = slice(site.loffset, site.loffset + site.width)
        lg = logits[:, sl]
        if self.autoregressive and onehot is not None and site.loffset > 0:
            w = (self.ar * self.ar_mask)[sl, :site.loffset]
            lg = lg + onehot[:, :site.loffset].to(w.dtype) @ w.T
        return lg.reshape(lg.shape[0], site.numel, site.K)

    # -------------------------------------------------------- joint log q of values
    def log_prob(self, values: dict, features: torch.Tensor | None, n: int | None = None) -> torch.Tensor:
        """log q(values | features) [B]: ``values`` maps every site's address to its
        values [B, *shape] (tokens: lists of texts/Tokens or ids)."""
        lay = self.layout
        B = n if n is not None else (features.shape[0] if features is not None else _rows_of(values))
        params, context = self.head_out(features, B)
        if params.shape[0] != B:
            params = params.expand(B, -1)
            context = None if context is None else context.expand(B, -1)
        lq = torch.zeros(B, dtype=params.dtype, device=params.device)
        if lay.D:
            us, ldj = [], torch.zeros(B, dtype=params.dtype, device=params.device)
            for s in lay.continuous:
                x = _value_of(values, s).to(params.device, params.dtype).reshape(B, *s.shape)
                t = s.transform
                u = t.inv(x)
                ldj = ldj + _sum_ldj(t.log_abs_det_jacobian(u, x), B)
                us.append(u.reshape(B, -1))
            lq = lq + self.log_prob_u(params, context, torch.cat(us, 1)) - ldj
        if lay.L:
            onehot = torch.zeros(B, lay.L, dtype=params.dtype, device=params.device)
            ks = {}
            for s in lay.discrete:
                k = discrete_index(s, _value_of(values, s), B).to(params.device)
                ks[s.addr] = k
                onehot[:, s.loffset:s.loffset + s.width] = nn.functional.one_hot(k, s.K).reshape(B, -1).to(onehot.dtype)
            for s in lay.discrete:
                lg = self.site_logits(params, s, onehot)
                lq = lq + torch.log_softmax(lg, -1).gather(-1, ks[s.addr].unsqueeze(-1)).reshape(B, -1).sum(1)
        return lq


def _rows_of(values: dict) -> int:
    for v in values.values():
        return v.shape[0] if isinstance(v, torch.Tensor) else len(v)
    return 1


def _value_of(values: dict, s: SiteInfo):
    if s.addr not in values:
        raise PPLError(f"no value for the guide's site '{s.addr}'",
                       hint="the guide scores values of all its sites; a site the model did not reach cannot "
                            "be scored (forward KL needs a model with the same latent sites in every run)")
    return values[s.addr]


def _sum_ldj(ldj, B: int | None = None):
    if ldj.dim() == 0:
        return ldj
    if B is None:
        B = ldj.shape[0]
    return ldj.reshape(B, -1).sum(1)


def discrete_index(s: SiteInfo, v, B: int) -> torch.Tensor:
    """The category indices [B, numel] of values of a discrete or token site."""
    if s.kind == "token":
        ids = []
        for x in (v.tolist() if isinstance(v, torch.Tensor) else list(v)):
            if isinstance(x, (list, tuple)) and len(x) == 1:
                x = x[0]
            tid = getattr(x, "id", None)
            if tid is None:
                if isinstance(x, int) and not isinstance(x, bool):
                    tid = x
                else:
                    try:
                        tid = s.texts.index(str(x))
                    except ValueError:
                        raise PPLError(f"'{x}' is not a token of the language model at '{s.addr}'") from None
            ids.append(int(tid))
        return torch.tensor(ids, dtype=torch.long).reshape(B, 1)
    t = torch.as_tensor(v)
    k = t.long() - s.low
    return k.reshape(B, -1)
