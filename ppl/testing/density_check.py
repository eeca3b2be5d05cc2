"""Checking transformations of continuous programs by their joint densities.

``check_transformation`` (``ppl.testing.validity``) compares a finite program's measure on
return values before and after a rewrite exactly; a continuous program cannot be
enumerated. Here the two programs' *joint densities* are compared instead, through the
change of variables the transformation declares (``semantics.choice_map.ChoiceMap``):

* identity: log p_new(z) = log p_old(z);
* reparameterisation z -> T(z): log p_old(T(z)) + log |det dT/dz_new| = log p_new(z);
* marginalisation of choices u: log p_new(z) = log sum_u p_old(z, u) (finite discrete u
  summed by sympy; up to three continuous numbers u integrated by adaptive quadrature at
  each trace, on the real line or the choice's fixed interval).

Equal joint densities (with the Jacobian) imply the same measure on everything the
programs compute from their choices, return values included; unequal ones are caught even
when the wrong program is self-consistent (a non-centring that uses the mean as the scale
passes simulation-based calibration, which simulates from the wrong program too).

Where both programs are static (``semantics.symbolic``), the densities are sympy
expressions: the map is substituted, the Jacobian determinant computed by sympy, and the
difference simplified (``DensityCheck.proved`` says whether sympy reduced it to 0) and
evaluated at random traces drawn from the new program's prior. Otherwise the programs are
run: each prior trace z of the new program is mapped through T (its Jacobian evaluated
from the declared map, symbolically differentiated) and scored by both programs'
``log_joint``. Either way every trace must agree to ``tol`` (1e-9, relative to the size of
the log density), in float64.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sympy as sp
import torch

from ..compiler import parse_program
from ..inference.randomness import TorchRandomness
from ..semantics import gfi, ir, symbolic
from ..semantics.symbolic import _flat
from ..semantics.choice_map import ChoiceMap
from ..semantics.errors import PPLError
from ..stdlib import rng
from .validity import _float64


@dataclass
class DensityCheck:
    """The two joint densities compared at ``len(errors)`` traces of the new program."""
    kind: str                     # the ChoiceMap's kind
    method: str                   # "symbolic" or "traces"
    errors: list                  # per trace: |lhs - rhs| relative to max(1, |rhs|)
    values: list = field(default_factory=list)   # per trace: (lhs, rhs)
    proved: bool | None = None    # symbolic: sympy simplified the difference to 0
    difference: Any = None        # symbolic: the (simplified) difference lhs - rhs
    reason: str = ""              # why the traces were used instead of sympy

    @property
    def max_error(self) -> float:
        return max(self.errors, default=0.0)

    def ok(self, tol: float = 1e-9) -> bool:
        return bool(self.errors) and self.max_error <= tol

    def __str__(self) -> str:
        head = (f"joint densities ({self.kind}, {self.method}"
                f"{'; sympy proves them equal' if self.proved else ''}): max relative difference "
                f"{self.max_error:.3g} over {len(self.errors)} traces")
        old = {"identity": "log p_old(z)", "reparameterisation": "log p_old(T(z)) + log|J|",
               "marginalisation": "log sum_u p_old(z, u)"}[self.kind]
        rows = [f"  {old} = {a:.12g}   log p_new(z) = {b:.12g}" for a, b in self.values[:5]]
        tail = [f"  difference: {self.difference}"] if self.difference is not None and not self.proved else []
        return "\n".join([head] + rows + tail + ([f"  ({self.reason})"] if self.reason else []))


def check_density_transformation(old, new, data: dict | None, choice_map: ChoiceMap, *, traces: int = 20,
                                 seed: int = 0) -> DensityCheck:
    """Compare ``old`` and ``new`` (models) through ``choice_map`` (module docstring)."""
    data = old.bind((), data or {})
    with _float64():
        points = prior_traces(new, data, traces, seed)
        try:
            before = symbolic.density(old.program, old.entry, data)
            after = symbolic.density(new.program, new.entry, data)
        except PPLError as e:
            if choice_map.kind == "marginalisation":
                raise PPLError("checking a marginalisation needs static programs (symbolic densities): "
                               + e.message, e.span, e.hint) from None
            check = _by_traces(old, new, data, choice_map, points)
            check.reason = f"not static: {e.message}"
            return check
        return _symbolically(old, new, before, after, choice_map, points)


# ------------------------------------------------------------------ the symbolic path
def _symbolically(old, new, before, after, cmap: ChoiceMap, points) -> DensityCheck:
    lhs = _shared(before, after, cmap)
    if cmap.kind == "reparameterisation":
        env = {**after.env, **_choice_env(after.choices)}
        mapped = _mapped(new.program, cmap, env)
        lhs = lhs.xreplace({s: v for address, value in mapped.items()
                            for s, v in zip(_flat(before.choices[address]), _flat(value))})
        lhs = lhs + _log_abs_det(mapped, [s for a in cmap.new for s in _flat(after.choices[a])])
    elif cmap.kind == "marginalisation":
        lhs, integrated = _summed(before, cmap, lhs)
        if integrated:
            return _integrated(after, lhs, integrated, points)
    missing = {str(s) for s in lhs.free_symbols} - {str(s) for s in after.expr.free_symbols} - \
        {str(s) for s in after.symbols()}
    if missing:
        raise PPLError(f"the declared {cmap.kind} leaves the old program's {', '.join(sorted(missing))} unmapped",
                       hint="declare every old choice the new program replaces")
    difference = lhs - after.expr
    proved = _is_zero(difference)
    f_lhs, f_rhs = _numeric(after, lhs), _numeric(after, after.expr)
    values = [(f_lhs(p), f_rhs(p)) for p in points]
    return DensityCheck(cmap.kind, "symbolic", [_relative(a, b) for a, b in values], values, proved,
                        0 if proved else difference)


def _shared(before, after, cmap: ChoiceMap) -> sp.Expr:
    """The old density with the choices both programs have written in the new program's
    symbols (a family with other assumptions gives another symbol for one address)."""
    replaced = set(cmap.old_from_new) | set(cmap.summed_out)
    subs = {}
    for address, sym in before.choices.items():
        if address in replaced:
            continue
        if address not in after.choices:
            raise PPLError(f"the old program's choice '{address}' is not in the new program",
                           hint=f"declare how the transformation maps it ({cmap.kind} declared)")
        subs.update(zip(_flat(sym), _flat(after.choices[address])))
    extra = set(after.choices) - set(before.choices) - set(cmap.new)
    if extra:
        raise PPLError(f"the new program's choices {', '.join(sorted(extra))} are not in the old program",
                       hint="a reparameterisation lists its new choices in `new`")
    return before.expr.xreplace(subs)


def _mapped(program, cmap: ChoiceMap, env: dict) -> dict:
    """old address -> its value (sympy) under the declared map, evaluated in env."""
    out = {}
    for address, text in cmap.old_from_new.items():
        out[address] = symbolic.evaluate(program, _parse_expression(text), env)
    return out


def _log_abs_det(mapped: dict, new_symbols: list) -> sp.Expr:
    components = [c for value in mapped.values() for c in _flat(value)]
    if len(components) != len(new_symbols):
        raise PPLError(f"the reparameterisation maps {len(new_symbols)} new numbers to {len(components)} old ones",
                       hint="a change of variables needs as many new numbers as it replaces")
    if not components:
        return sp.Integer(0)
    jacobian = sp.Matrix(components).jacobian(new_symbols)
    return sp.log(sp.Abs(jacobian.det()))


def _summed(before, cmap: ChoiceMap, lhs: sp.Expr):
    """(log of the old density summed over the finite supports of the discrete
    summed-out choices, [(symbol, (low, high))] of the continuous ones, left to integrate)."""
    symbols, supports, integrated = [], [], []
    for address in cmap.summed_out:
        if address not in before.choices:
            raise PPLError(f"cannot sum out '{address}': the old program has no such choice",
                           hint=f"its choices are: {', '.join(before.choices)}")
        name, values, interval = before.support[address]
        if values is not None:
            symbols.append(before.choices[address])
            supports.append(values)
        elif interval is not None or name in _REAL_LINE:
            low, high = interval or (-math.inf, math.inf)
            integrated += [(s, (low, high)) for s in _flat(before.choices[address])]
        else:
            raise PPLError(f"cannot integrate out '{address}' ({name}): its support is not a known interval",
                           hint="marginalisation is checked for finite discrete choices and continuous ones on "
                                "the real line or a fixed interval")
    if len(integrated) > 3:
        raise PPLError(f"cannot integrate out {len(integrated)} numbers by quadrature (at most 3)")
    terms = [sp.exp(lhs.xreplace(dict(zip(symbols, map(sp.Integer, combo)))))
             for combo in itertools.product(*supports)]
    return sp.log(sp.Add(*terms)), integrated


_REAL_LINE = ("normal", "cauchy", "student_t", "laplace")


def _integrated(after, lhs: sp.Expr, integrated: list, points) -> DensityCheck:
    """A marginalisation of continuous choices u: log p_new(z) against
    log of the integral of p_old(z, u) du, by adaptive quadrature at each trace z (the
    integrand scaled by p_new(z), so that it is of order one where the two agree)."""
    from scipy import integrate

    syms = after.symbols()
    us = [u for u, _ in integrated]
    dummies = [sp.Dummy() for _ in syms + us]
    g = sp.lambdify(dummies, lhs.xreplace(dict(zip(syms + us, dummies))),
                    modules=[{"softplus": symbolic._np_softplus}, "scipy", "numpy"], docstring_limit=0)
    f_rhs = _numeric(after, after.expr)
    values = []
    for point in points:
        rhs = f_rhs(point)
        subs = after.values_of(point)
        args = [float(subs[s]) for s in syms]
        with np.errstate(all="ignore"):
            mass, _ = integrate.nquad(lambda *u: math.exp(min(700.0, float(g(*args, *u)) - rhs)),
                                      [r for _, r in integrated], opts={"epsabs": 0.0, "epsrel": 1e-12, "limit": 200})
        values.append((rhs + math.log(mass) if mass > 0 else -math.inf, rhs))
    return DensityCheck("marginalisation", "symbolic+quadrature", [_relative(a, b) for a, b in values], values)


def _is_zero(difference: sp.Expr) -> bool:
    """Whether sympy can show the difference is 0 (expanding logs of products first)."""
    try:
        return sp.expand(sp.expand_log(sp.expand(difference), force=True)) == 0  # (simplify: too slow)
    except Exception:  # noqa: BLE001 -- sympy failing to simplify proves nothing either way
        return False


def _numeric(density, expr: sp.Expr):
    """expr as a function of a trace of the program ``density`` was made from."""
    if expr.has(sp.zoo, sp.nan):  # e.g. log|det J| of a map with a zero Jacobian: no change of variables
        return lambda point: math.nan
    syms = density.symbols()
    dummies = [sp.Dummy() for _ in syms]
    f = sp.lambdify(dummies, expr.xreplace(dict(zip(syms, dummies))),
                    modules=[{"softplus": symbolic._np_softplus}, "scipy", "numpy"], docstring_limit=0)

    def at(point: dict) -> float:
        subs = density.values_of(point)
        with np.errstate(all="ignore"):
            return float(f(*[float(subs[s]) for s in syms]))
    return at


# ------------------------------------------------------------------- the traces path
def _by_traces(old, new, data, cmap: ChoiceMap, points) -> DensityCheck:
    values = []
    for z in points:
        rhs = _log_joint(new, z, data)
        if cmap.kind == "identity":
            values.append((_log_joint(old, z, data), rhs))
            continue
        env, symbols = _trace_env(z, data)
        mapped = _mapped(new.program, cmap, env)
        subs = {s: v for s, v in symbols.items()}
        old_trace = {a: v for a, v in z.items() if a not in cmap.new}
        for address, value in mapped.items():
            numbers = [float(sp.sympify(c).xreplace(subs)) for c in _flat(value)]
            old_trace[address] = numbers if isinstance(value, (list, tuple)) else numbers[0]
        new_symbols = [s for a in cmap.new for s in _flat(_symbol_of(a, z[a]))]
        log_det = _log_abs_det(mapped, new_symbols)
        values.append((_log_joint(old, old_trace, data) + _number(log_det.xreplace(subs)), rhs))
    return DensityCheck(cmap.kind, "traces", [_relative(a, b) for a, b in values], values)


def _trace_env(z: dict, data: dict):
    """The names a declared map may read on the traces path (choices and data) and the
    numbers of the choices' symbols."""
    env = {k: symbolic._as_value(v.tolist() if hasattr(v, "tolist") else v) for k, v in data.items()}
    numbers = {}
    for address, value in z.items():
        sym = _symbol_of(address, value)
        for s, x in zip(_flat(sym), _flat(value)):
            numbers[s] = sp.Float(float(x))
        if address.isidentifier():
            env[address] = symbolic.Vec(sym) if isinstance(sym, list) else sym
    return env, numbers


def _symbol_of(address: str, value):
    if isinstance(value, (list, tuple)):
        base = sp.IndexedBase(address)
        return [base[j] for j in range(len(value))]
    return sp.Symbol(address, real=True)


def _log_joint(model, trace: dict, data: dict) -> float:
    """log p(trace, data) by running the model (two copies of the trace: a batch of one
    would read a vector choice as a batch)."""
    columns = {a: torch.tensor([v, v], dtype=torch.float64) if not isinstance(v, bool) else torch.tensor([v, v])
               for a, v in trace.items()}
    return float(model.log_joint(columns, **data)[0])


# ------------------------------------------------------------------------- pieces
def prior_traces(model, data: dict, n: int, seed: int = 0) -> list[dict]:
    """``n`` traces (address -> number or list) drawn from the model's prior."""
    with rng.run(seed):
        interp = model.interpreter()
        prepared = model.prepare_data(model.bind((), data), "cpu")
        state = gfi.simulate(gfi.ModelRun(interp, model.entry, prepared), n, TorchRandomness())
    out = []
    for c in range(n):
        out.append({a: state.values[a][c].tolist() for a in state.values if bool(state.present[a][c])})
    return out


def _parse_expression(text: str) -> ir.Expr:
    program = parse_program(f"def __choice_map__():\n    return {text}\n", "<choice map>")
    return program.functions[0].body[0].value


def _choice_env(choices: dict) -> dict:
    return {a: (symbolic.Vec(s) if isinstance(s, list) else s) for a, s in choices.items() if a.isidentifier()}


def _number(x: sp.Expr) -> float:
    """A float; nan for sympy's complex infinity (log 0 of a zero Jacobian) and the like."""
    try:
        return float(x)
    except TypeError:
        return math.nan


def _relative(a: float, b: float) -> float:
    if a == b:  # both -inf (an impossible trace in both) included
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(1.0, abs(b))

