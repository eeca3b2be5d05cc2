"""Guides written in the DSL: ``ppl.guide(model, data, program=guide_source)``.

A guide program is a function of the same data as the model (it takes any of the model's
parameters, by name) whose choices ``x ~ d`` are made at the model's addresses. Its
learnable parameters are declared inline:

    def guide(ys, sigma):
        m = param("m", 0.0)                 # a real number, initialised at 0
        s = param("s", 1.0, "positive")     # kept positive (stored as its log)
        mu ~ normal(m, s)

``param(name, init, constraint="real")``: ``init`` a number or a list of numbers (a
vector parameter); ``constraint`` one of "real", "positive" (exp of a free parameter),
"unit" (sigmoid: in (0, 1)). The same name always denotes the same parameter. Every
``param`` must be reached by the guide's first run (declare them unconditionally).
Because the guide reads the data, it can be amortized by hand (``mu ~ normal(param("a",
0.0) * mean(ys) + param("b", 0.0), ...)``).

Semantics. One run of the guide for N particles draws its choices (reparameterised when
the distribution allows it: then the ELBO's gradients are pathwise) and sums their log
densities, log q(x); the model then scores the same values (``Replay``), log p(x, y); the
log weight is log p(x, y) - log q(x). Training (``fit``: "elbo", "iwae", "rws") and
importance sampling (``model.run("importance", data, proposal=guide)``) use that weight,
so importance sampling stays proper whatever the parameters are, provided the guide
proposes every choice of the model (a choice it does not propose is an error, as is a
guide that observes, factors or conditions). Not supported: SMC (the guide runs as a
whole before the model), forward_kl (the guide reads data by parameter name, not
simulated observations), and guides whose choices differ between particles.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..semantics.dist_values import ProposedDist
from ..semantics.errors import PPLError, PPLRuntimeError, did_you_mean
from ..semantics.interpreter import Builtin, Interpreter
from ..semantics.model import ModelLike
from ..semantics.sampling import Replay, Trace, _WeightAccumulator, column, drive
from ..semantics.values import Batched, Particles, PerParticle
from ..stdlib import rng
from .amortized import Guide, _weight_extra
from .population import Population

CONSTRAINTS = ("real", "positive", "unit")


class _Params(nn.Module):
    """The guide's parameters (unconstrained), by name."""

    def __init__(self):
        super().__init__()
        self.values = nn.ParameterDict()
        self.constraints: dict[str, str] = {}
        self.frozen = False

    def get(self, name: str, init, constraint: str):
        if not isinstance(name, str) or not name:
            raise PPLRuntimeError(f"param needs a name (a non-empty string), got {name!r}")
        if constraint not in CONSTRAINTS:
            raise PPLRuntimeError(f"param '{name}': unknown constraint {constraint!r}",
                                  hint=did_you_mean(str(constraint), CONSTRAINTS) or
                                  f"choose from: {', '.join(CONSTRAINTS)}")
        key = name.replace(".", "_")
        if key not in self.values:
            if self.frozen:
                raise PPLRuntimeError(f"the parameter '{name}' was not declared in the guide's first run",
                                      hint="declare every param unconditionally (outside branches on random "
                                           "values), so the optimiser knows it from the start")
            try:
                t = torch.as_tensor(init, dtype=torch.get_default_dtype()).clone()
            except (TypeError, ValueError, RuntimeError):
                raise PPLRuntimeError(f"param '{name}': the initial value must be a number or a list of "
                                      f"numbers, got {init!r}") from None
            if constraint == "positive":
                if bool((t <= 0).any()):
                    raise PPLRuntimeError(f"param '{name}': a positive parameter needs a positive initial value")
                t = t.log()
            elif constraint == "unit":
                if bool(((t <= 0) | (t >= 1)).any()):
                    raise PPLRuntimeError(f"param '{name}': a unit parameter needs an initial value in (0, 1)")
                t = torch.logit(t)
            self.values[key] = nn.Parameter(t)
            self.constraints[key] = constraint
        elif self.constraints[key] != constraint:
            raise PPLRuntimeError(f"param '{name}' is declared with two constraints "
                                  f"({self.constraints[key]} and {constraint})")
        u = self.values[key]
        c = self.constraints[key]
        return u.exp() if c == "positive" else torch.sigmoid(u) if c == "unit" else u


class _RunGuide(_WeightAccumulator):
    """Runs a guide program: draws (or replays ``given``) its choices; ``log_weights``
    accumulates log q, ``logq_discrete`` the part of the discrete choices."""

    def __init__(self, N, device, reparam: bool, given: Mapping | None = None):
        super().__init__(N, device)
        self.trace = Trace(N, device)
        self.reparam = reparam
        self.given = given
        self.logq_discrete = torch.zeros(N)
        self.has_discrete = False

    def sample(self, eff):
        d = eff.dist.target if isinstance(eff.dist, ProposedDist) else eff.dist
        ctx = eff.ctx
        discrete = getattr(d.spec, "index_valued", False) or d.spec.value_dtype in ("bool", "long")
        if self.given is not None:
            if eff.addr not in self.given:
                raise PPLRuntimeError(f"no value for the guide's choice '{eff.addr}'", eff.span)
            value = _as_value(self.given[eff.addr], ctx, self.log_weights.shape[0])
        elif self.reparam and not discrete:
            params, batched = d._params(ctx)
            td = d._make(params)
            if td.has_rsample:
                s = rng.rsample(td) if batched else rng.rsample(td, (ctx.M,))
                value = Batched(d.spec.to_value(s), ctx.idx)
            else:
                value = d.sample(ctx)
                discrete = True  # no pathwise gradient: a score-function term
        else:
            value = d.sample(ctx)
        lq = d.log_prob(value, ctx)
        self.add(ctx, lq)
        if discrete:
            self.has_discrete = True
            lqv = lq if isinstance(lq, torch.Tensor) and lq.dim() == 1 else torch.as_tensor(lq).expand(ctx.M)
            self.logq_discrete = self.logq_discrete.index_add(0, ctx.idx, lqv.to(self.logq_discrete.dtype))
        self.trace.record(eff.addr, ctx, value)
        return value

    def _no(self, eff, what):
        raise PPLError(f"a guide program cannot {what}", eff.span,
                       "a guide only proposes the model's choices (x ~ d); the model does the weighting")

    def observe(self, eff):
        self._no(eff, "observe data")

    def factor(self, eff):
        self._no(eff, "have a factor")

    def condition(self, eff):
        self._no(eff, "have a condition")

    def twist(self, eff):
        return None


def _as_value(v, ctx, N):
    if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == N and N > 1:
        return Batched(v[ctx.idx], ctx.idx)
    if isinstance(v, (list, tuple)) and len(v) == N and N > 1:
        return PerParticle([v[i] for i in ctx.idx.tolist()], ctx.idx)
    return v


class _Replay(Replay):
    """``Replay`` that also replays per-particle lists (tokens, strings) and names the
    guide in its error."""

    def sample(self, eff):
        if eff.addr not in self.given:
            raise PPLRuntimeError(f"the guide program does not propose the model's choice '{eff.addr}'", eff.span,
                                  "a guide program must make every choice the model makes, at the same address")
        v = self.given[eff.addr]
        if isinstance(v, list):
            d = eff.dist.target if isinstance(eff.dist, ProposedDist) else eff.dist
            value = _as_value(v, eff.ctx, self.log_weights.shape[0])
            self.add(eff.ctx, d.log_prob(value, eff.ctx))
            self.trace.record(eff.addr, eff.ctx, value)
            return value
        return super().sample(eff)


class ProgramGuide(Guide):
    """A guide written in the DSL (see ``inference.program_guide``)."""

    def __init__(self, model, data, program):
        """``program``: the compiled guide program (``ModelLike``; the Python face compiles
        source text before it comes here)."""
        if not isinstance(program, ModelLike):
            raise PPLError(f"program must be a ppl.Model or source text (got {type(program).__name__})")
        extra = [p for p in _params(program) if p not in _params(model)]
        if extra:
            raise PPLError(f"the guide program takes '{extra[0]}', which is not an input of the model",
                           hint=f"a guide reads the model's data by name: {', '.join(_params(model))}")
        Guide.__init__(self, model, None)
        self.family = "program"
        self.program = program
        if data is not None:
            self._build(data)

    def describe(self) -> str:
        return f"guide(program {self.program.entry})"

    def __repr__(self) -> str:
        return f"<ppl.Guide program {self.program.entry} for {self.model.entry}>"

    @property
    def amortized(self) -> bool:
        return False

    @property
    def sites(self) -> list[str]:
        self._ready()
        return list(self._sites)

    # -------------------------------------------------------------- running
    def _gdata(self, data, device="cpu"):
        bound = self.model.bind((), data)
        return self.program.prepare_data({k: v for k, v in bound.items() if k in _params(self.program)}, device)

    def _interp(self):
        b = self.program.builtins()
        b["param"] = Builtin("param", lambda ctx, name, init, constraint="real":
                             self.net.get(name, init, constraint), (2, 3), pure=False)
        options = getattr(self.program, "options", {})  # the guide program's compile options
        return Interpreter(self.program.program, b, max_depth=options.get("max_depth", 200),
                           max_iterations=options.get("max_iterations", 100_000))

    def _run(self, data, N, reparam, device="cpu", given=None):
        h = _RunGuide(N, device, reparam, given)
        drive(self._interp().run(self.program.entry, self._gdata(data, device), Particles.all(N, device)), h)
        return h

    def _build(self, data, seed_init=None):
        self.net = _Params()
        self.template = dict(self.model.bind((), data))
        with rng.run(0), torch.no_grad():
            h = self._run(self.template, 4, False)
        self.net.frozen = True
        sites = h.trace.sites()
        if not sites:
            raise PPLError(f"the guide program '{self.program.entry}' makes no choice",
                           hint="a guide proposes the model's choices: write x ~ d at their addresses")
        self._sites = list(sites)
        self.layout = None

    def _score(self, data, N, reparam, device="cpu", interp=None, prepared=None):
        """(log w, log q, log q of discrete choices or None, model handler, return value)."""
        hq = self._run(data, N, reparam, device)
        values = {}
        for a, (v, present) in hq.trace.sites().items():
            if present is not None and not bool(present.all()):
                raise PPLRuntimeError(f"the guide program makes the choice '{a}' in some particles only",
                                      hint="guide programs must make the same choices in every run")
            values[a] = v
        hp = _Replay(values, N, device)
        prepared = prepared if prepared is not None else self.model.prepare_data(self.model.bind((), data), device)
        ctx = Particles.all(N, device)
        ret = drive((interp or self.model.interpreter()).run(self.model.entry, prepared, ctx), hp)
        lq = hq.log_weights
        return hp.log_weights - lq, lq, (hq.logq_discrete if hq.has_discrete else None), hp, column(ret, ctx)

    def _weights(self, interp, prepared, n, K, feats, reparam):
        lw, lq, lqd, _, _ = self._score(self.template, K, reparam, interp=interp, prepared=prepared)
        return lw.view(1, K), lq.view(1, K), None if lqd is None else lqd.view(1, K)

    def fit(self, data=None, objective=None, **kw):
        obj = objective or "elbo"
        if obj in ("forward_kl", "kl", "fkl"):
            raise PPLError("forward_kl is not available for guide programs",
                           hint="a guide program reads the data by parameter name, not simulated "
                                "observations: use objective='elbo', 'iwae' or 'rws'")
        if kw.get("datasets") is not None:
            raise PPLError("guide programs train on one data set", hint="drop datasets=")
        if data is not None:
            self.template = dict(self.model.bind((), data))
        return Guide.fit(self, data, obj, **kw)

    def importance(self, data, N, device="cpu") -> Population:
        """Importance sampling of the model with this guide as the proposal."""
        with torch.no_grad():
            lw, _, _, hp, ret = self._score(data, N, False, device)
        lw = lw.detach()
        return Population("importance", {"return": (ret, None), **hp.trace.sites()}, lw,
                          _weight_extra(self, lw, N))

    def posterior(self, data=None, particles=1000, seed=None) -> Population:
        data = self.template if data is None else data
        with rng.run(seed):
            r = self.importance(data, int(particles))
        return Population("guide", r.sites, torch.zeros(r.n, dtype=torch.float64), {"proposal": self.describe()})

    def log_prob(self, values, data=None):
        data = self.template if data is None else data
        B = None
        vals = {}
        for a in self.sites:
            if a not in values:
                raise PPLError(f"no value for the guide's site '{a}'", hint=f"the sites are: {', '.join(self.sites)}")
            v = values[a]
            v = list(v) if isinstance(v, (list, tuple)) and v and isinstance(v[0], str) else torch.as_tensor(v)
            vals[a] = v
            B = len(v) if B is None else B
        with torch.no_grad():
            return self._run(data, B, False, given=vals).log_weights

    def proposal_run(self, *a, **k):
        raise PPLError("SMC cannot use a guide program as its proposal",
                       hint="a guide program runs as a whole before the model; use method 'importance', "
                            "or an automatic guide (ppl.guide(model, data, family='normal')) for SMC")


def _params(model) -> list[str]:
    """The names of the entry function's parameters of ``model``."""
    return [p.name for p in model.program.function(model.entry).params]
