"""MH with custom proposal kernels written in the DSL (like Gen's ``mh(trace, proposal)``).

A proposal is a function in the model's own source, chosen by name as the MH kernel:
``model.run("mh", data, kernel="walk")``, or ``ppl run ... --method mh --kernel walk``.

    def walk(mu):                    # mu: the current value of the choice 'mu'
        mu ~ normal(mu, 0.3)         # proposes a new value for 'mu'

    def relabel(trace, ys):          # the current trace, and the model's datum ys
        i = sample(uniform_draw(range(len(ys))), "i")   # the proposal's own randomness
        for j in range(len(ys)):
            if j == i:
                z ~ flip(0.9 if trace["z"][j] else 0.1) # address z[j]: proposes z[i]

**Reading the current trace.** Each parameter of the proposal is bound by its name:
``trace`` to the current trace; a parameter of the model's entry function to that
datum; any other name to the current value of the (top-level) choice of that name.
``trace[addr]`` reads a choice by its address (``trace["mu"]``, ``trace["z[3]"]``,
``trace["geom/b"]``; ``trace["z"][i]`` reads ``z[i]``, also for an ``i`` that differs
between chains) and ``addr in trace`` tests whether a chain's trace has the choice.
Under random control flow a choice may exist in some chains only: reading a missing
one is an error, so test ``addr in trace`` first (the chains then split, as on any
random branch).

**Proposing.** The proposal's choices are addressed exactly like the model's (name,
enclosing loop indices, call path: ``semantics/interpreter.py``). A choice at an address
that the current or the proposed trace has proposes the value of that choice of the
model; its ``x ~ d`` statements must name choices of the model (checked before running,
so a typo is an error, never a kernel that silently moves nothing). The proposal's own
randomness (which move, which index) is drawn with ``sample(d, "name")`` at an address
the model does not have: an *auxiliary* choice. The reverse move replays it at the same
value, so let it choose *what* to move (a site, an index, a move type) and let ``~``
statements draw the values: a move whose inverse would need another auxiliary value
(say, a shift by +d undone by -d) is still correct but almost never accepted. A
proposal cannot observe, factor or condition.

**One step**, for every chain at once (one batch; the interpreter splits the chains
wherever the proposal or the model branches on a random value):

1. run the proposal on the current trace x: values u at addresses P, density q(u | x);
2. re-run the model with u's values where P has them, x's values elsewhere, and prior
   draws where neither has one (the *fresh* choices F); choices of x that the run no
   longer reaches are dropped (the *stale* ones, S). This is the proposed trace x';
3. run the proposal on x' *replaying the old values*: x's at addresses of x, u's at the
   auxiliary addresses: values u' at addresses P', density q(u' | x');
4. accept x' with probability min(1, alpha),

       alpha = p(x') / p(x) * q(u' | x') / q(u | x)
               * prod_{s in S, s not in P'} p(x_s) / prod_{f in F} p(x'_f)

   where p is the model's joint density (choices and likelihood factors) and p(x_s),
   p(x'_f) the prior densities of those choices (the fresh/stale terms of the
   single-site kernel in ``inference/mh.py``: a choice that appears or disappears
   without being proposed is accounted for by its prior).

The reverse move must take x' back to x: alpha is 0 (the move is rejected) unless the
reverse run reaches the same auxiliary addresses, an address of both traces is proposed
by both runs or by neither, the forward run proposes no choice of x that x' drops, and
the reverse run none of x' that x lacks. Under these conditions (x, u, fresh values) ->
(x', u', stale values) is an involution that only permutes values (Jacobian 1), so

**Invariant:** the kernel satisfies detailed balance with respect to the posterior,
pi(x) K(x, x') = pi(x') K(x', x), hence leaves it invariant (pi K = pi).
The exact checker (testing/proposal_check.py) builds K exactly for finite programs (every draw of the
proposal, every accept/reject) and checks both.
"""
from __future__ import annotations

import math

import torch

from ..semantics import ir
from ..semantics.errors import PPLError, PPLRuntimeError, did_you_mean
from ..semantics.interpreter import _int_index
from ..semantics import gfi
from ..semantics.gfi import ModelRun, TracedState, combine as _combine, rows_at as _has
from ..semantics.sampling import drive
from ..semantics.values import Batched, Particles, PerParticle, is_batched, materialize, merge_parts, rows
from .randomness import TorchRandomness

BUILTIN_KERNELS = ("prior", "rw")


# ---------------------------------------------------------------------- the trace value
class TraceView:
    """Every chain's trace (a ``TracedState``) as a value of the language: ``trace[addr]``,
    ``trace["z"][i]`` and ``addr in trace`` (see the module docstring)."""

    def __init__(self, state: TracedState, prefix: str | None = None, which: str = "current"):
        self.state, self.prefix, self.which = state, prefix, which

    def describe(self) -> str:
        return "trace" if self.prefix is None else f"trace['{self.prefix}']"

    def _address(self, key) -> str:
        if self.prefix is not None:
            return f"{self.prefix}[{_int_index(key)}]"
        if not isinstance(key, str):
            raise PPLRuntimeError("index the trace by an address, e.g. trace[\"mu\"] or trace[\"z[3]\"]")
        return key

    def ppl_index(self, key, ctx: Particles):
        if not is_batched(key):
            return self.lookup(self._address(key), ctx)
        keys = [self._address(k) for k in materialize(key, ctx)]  # a different address per chain
        groups: dict = {}
        for pos, a in enumerate(keys):
            groups.setdefault(a, []).append(pos)
        parts = []
        for a, positions in groups.items():
            mask = torch.zeros(ctx.M, dtype=torch.bool, device=ctx.device)
            mask[torch.tensor(positions, device=ctx.device)] = True
            sub = ctx.subset(mask) if len(positions) < ctx.M else ctx
            v = self.lookup(a, sub)
            if not isinstance(v, Batched):
                raise PPLRuntimeError(f"trace: '{a}' is not a choice (only its indexed elements are)")
            parts.append((sub.idx, v))
        return merge_parts(parts, ctx)

    def lookup(self, addr: str, ctx: Particles):
        """The value of choice ``addr`` for the chains of ctx (all must have it), or the
        view of the choices ``addr[i]...`` when ``addr`` is their common prefix."""
        st = self.state
        if addr in st.values:
            if not bool(st.present[addr][ctx.idx].all()):
                raise PPLRuntimeError(
                    f"the {self.which} trace of some chains has no choice '{addr}'",
                    hint=f"random control flow: test `\"{addr}\" in trace` before reading it")
            return Batched(st.values[addr][ctx.idx], ctx.idx)
        if any(a.startswith(addr + "[") for a in st.values):
            return TraceView(st, addr, self.which)
        raise PPLRuntimeError(f"no chain's {self.which} trace has a choice '{addr}'",
                              hint=did_you_mean(addr, st.values) or f"its addresses: {', '.join(list(st.values)[:12])}")

    def ppl_contains(self, key, ctx: Particles):
        st = self.state
        if not is_batched(key):
            addr = self._address(key)
            return Batched(st.present[addr][ctx.idx].clone(), ctx.idx) if addr in st.values else False
        out = [addr in st.values and bool(st.present[addr][c]) for addr, c in
               zip((self._address(k) for k in materialize(key, ctx)), ctx.idx.tolist())]
        return Batched(torch.tensor(out, dtype=torch.bool, device=ctx.device), ctx.idx)


# ------------------------------------------------------------------- the proposal run
class _ProposalRun:
    """Runs the proposal: draws its choices (forward), or scores the old values given by
    ``replay(eff) -> (rows, ok)`` (reverse; rows that cannot be replayed are ``invalid``)."""

    def __init__(self, C, device, name, randomness, replay=None):
        self.name, self.randomness, self.replay = name, randomness, replay
        self.values: dict = {}
        self.present: dict = {}
        self.log_q = torch.zeros(C, dtype=torch.float64, device=device)
        self.invalid = torch.zeros(C, dtype=torch.bool, device=device)
        self.C = C

    def sample(self, eff):
        ctx, idx = eff.ctx, eff.ctx.idx
        if self.replay is None:
            draw = self.randomness.sample(eff.dist, ctx)
            if isinstance(draw, PerParticle):
                raise PPLRuntimeError("MH supports numeric random choices only (this one is not)", eff.span)
            r = rows(draw, ctx)
        else:
            r, ok = self.replay(eff)
            self.invalid[idx] |= ~ok
        value = Batched(r, idx)
        lp = eff.dist.log_prob(value, ctx).double().expand(ctx.M)
        self.log_q.index_add_(0, idx, lp)
        if eff.addr not in self.values:
            self.values[eff.addr] = torch.zeros((self.C, *r.shape[1:]), dtype=r.dtype, device=r.device)
            self.present[eff.addr] = torch.zeros(self.C, dtype=torch.bool, device=r.device)
        self.values[eff.addr][idx] = r.to(self.values[eff.addr].dtype)
        self.present[eff.addr][idx] = True
        return value

    def observe(self, eff):
        raise PPLRuntimeError(f"the MH proposal '{self.name}' cannot observe, factor or condition", eff.span,
                              "a proposal only proposes values: likelihood terms belong in the model")

    factor = condition = observe


# --------------------------------------------------------------------------- the kernel
class ProposalKernel:
    """The MH kernel of the proposal function ``name`` of the model ``entry`` (checked
    when built: every problem is a ``PPLError`` with a hint). ``step`` is one MH step
    for all chains; ``hastings=False`` drops the q and fresh/stale terms (a broken
    kernel, for the checker's tests)."""

    def __init__(self, interp, entry: str, name: str, *, hastings: bool = True):
        program = interp.program
        if name not in program.names:
            funcs = [f for f in program.names if f != entry]
            raise PPLError(f"unknown MH kernel '{name}'",
                           hint=did_you_mean(name, [*BUILTIN_KERNELS, *funcs]) or
                           "a kernel is 'prior', 'rw', or the name of a proposal function of the model"
                           + (f" (its functions: {', '.join(funcs)})" if funcs else " (it defines none)"))
        if name == entry:
            raise PPLError(f"the MH kernel '{name}' is the model itself", program.function(name).span,
                           "the entry is the last def unless entry= says otherwise: put the model last, "
                           "or name the model with entry=")
        self.interp, self.entry, self.name, self.hastings = interp, entry, name, hastings
        f = program.function(name)
        choices = _choice_names(program, entry)
        for g in _reachable(program, name):
            for node in ir.walk(program.function(g)):
                if isinstance(node, ir.Sample) and node.target not in choices:
                    raise PPLError(
                        f"the proposal '{name}' samples '{node.target}', which is no choice of the model '{entry}'",
                        node.span, did_you_mean(node.target, choices) or
                        "a proposal's `x ~ d` proposes the model's choice x; draw its own randomness with "
                        "sample(d, \"name\")")
        data_params = {p.name for p in program.function(entry).params}
        self.plan = []  # (parameter, how it is bound)
        for p in f.params:
            if p.name == "trace":
                self.plan.append((p, "trace"))
            elif p.name in data_params:
                self.plan.append((p, "data"))
            elif p.name in choices:
                self.plan.append((p, "choice"))
            elif p.default is None:
                raise PPLError(
                    f"the proposal '{name}' has a parameter '{p.name}' that is neither `trace`, a parameter of "
                    f"'{entry}', nor a choice of the model", p.span if p.span.line > 0 else f.span,
                    did_you_mean(p.name, [*choices, *data_params, "trace"]) or
                    "its parameters are bound by name: trace, the model's data, or the current value of a choice")

    # -- the three runs -----------------------------------------------------------------
    def _kwargs(self, data: dict, state: TracedState, which: str) -> dict:
        kw = {}
        trace = TraceView(state, which=which)
        ctx = Particles.all(state.log_joint.shape[0], state.log_joint.device)
        for p, how in self.plan:
            if how == "trace":
                kw[p.name] = trace
            elif how == "data":
                if p.name in data:
                    kw[p.name] = data[p.name]
                elif p.default is None:
                    raise PPLError(f"the proposal '{self.name}' needs the datum '{p.name}', which the data leave "
                                   f"to its default in '{self.entry}'", p.span,
                                   "give the proposal's parameter the same default, or pass the datum")
            else:
                try:
                    kw[p.name] = trace.lookup(p.name, ctx)
                except PPLRuntimeError as err:
                    raise PPLRuntimeError(f"the proposal '{self.name}' reads the choice '{p.name}': {err.message}",
                                          p.span, "with random control flow, take `trace` as a parameter and "
                                          f"test `\"{p.name}\" in trace` first") from None
        return kw

    def _propose(self, data, state, C, device, randomness, replay=None, which="current") -> _ProposalRun:
        h = _ProposalRun(C, device, self.name, randomness, replay)
        drive(self.interp.run(self.name, self._kwargs(data, state, which), Particles.all(C, device)), h)
        return h

    def reverse_values(self, old: TracedState, fwd: _ProposalRun, new: TracedState):
        """The values the reverse run scores: x's at addresses of the old trace x, the
        forward run's at its auxiliary addresses (in neither trace); anything else
        cannot be replayed (the move is rejected; a placeholder keeps the run going)."""
        def replay(eff):
            idx = eff.ctx.idx
            has_x, x_rows = _has(old, eff.addr, idx)
            has_f, f_rows = _has(fwd, eff.addr, idx)
            has_n, n_rows = _has(new, eff.addr, idx)
            aux = has_f & ~has_x & ~has_n
            ok = has_x | aux
            lost = ~ok & ~has_n
            placeholder = rows(eff.dist.sample(eff.ctx), eff.ctx) if bool(lost.any()) else None
            return _combine([(has_x, x_rows), (aux, f_rows), (~ok & has_n, n_rows), (lost, placeholder)]), ok
        return replay

    def step(self, data: dict, state: TracedState, device="cpu", randomness=None):
        """One MH step for every chain: returns (new state, accepted mask). The proposal
        runs on x (u, q(u|x)); ``update`` puts u into the model (x', with the fresh/stale
        prior terms); the proposal replays x's values on x' (q(u'|x')); ``metropolis``."""
        randomness = randomness or TorchRandomness()
        C = state.log_joint.shape[0]
        fwd = self._propose(data, state, C, device, randomness)
        new, log_w = gfi.update(ModelRun(self.interp, self.entry, data, device), state, fwd, randomness)
        rev = self._propose(data, new, C, device, randomness, self.reverse_values(state, fwd, new), "proposed")
        if not self.hastings:
            return gfi.metropolis(state, new, new.log_joint - state.log_joint, randomness)
        # a stale choice that the reverse run proposes is scored by q(u'|x'), not by its prior
        log_alpha = log_w - gfi.stale_lp(state, new) + gfi.stale_lp(state, new, without=rev) \
            + rev.log_q - fwd.log_q
        invalid = _irreversible(state, new, fwd, rev)
        return gfi.metropolis(state, new, log_alpha.masked_fill(invalid, -math.inf), randomness)


def _irreversible(x, new, fwd, rev) -> torch.Tensor:
    """Per chain: the reverse move cannot take x' back to x (see the module docstring)."""
    invalid = rev.invalid.clone()
    none = torch.zeros_like(invalid)
    for a in dict.fromkeys([*x.values, *new.values, *fwd.values, *rev.values]):
        px, pn = x.present.get(a, none), new.present.get(a, none)
        pf, pr = fwd.present.get(a, none), rev.present.get(a, none)
        invalid |= (px == pn) & (pf != pr)   # kept or absent in both: proposed both ways or neither
        invalid |= pf & px & ~pn              # the forward run proposed a choice x' drops
    return invalid


# ------------------------------------------------------------------- static name sets
def _reachable(program: ir.Program, start: str) -> list[str]:
    """The top-level functions ``start`` may call (itself included), by the names it uses."""
    names = set(program.names)
    seen, todo = [start], [start]
    while todo:
        for node in ir.walk(program.function(todo.pop())):
            if isinstance(node, ir.Var) and node.name in names and node.name not in seen:
                seen.append(node.name)
                todo.append(node.name)
    return seen


def _choice_names(program: ir.Program, entry: str) -> set[str]:
    """The names the model's choices may have: ``x ~ d`` targets and ``sample(d, name)``
    names in the functions the entry may call."""
    out = set()
    for g in _reachable(program, entry):
        for node in ir.walk(program.function(g)):
            if isinstance(node, ir.Sample):
                out.add(node.target)
            elif isinstance(node, ir.Call) and isinstance(node.func, ir.Var) and node.func.name == "sample":
                name = node.args[1] if len(node.args) > 1 else \
                    next((k.value for k in node.kwargs if k.name == "name"), ir.Const("sample"))
                if isinstance(name, ir.Const) and isinstance(name.value, str):
                    out.add(name.value)
    return out
