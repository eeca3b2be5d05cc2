"""IR -> IR transformations (``compiler/transforms.py``) and their exact check.

``ppl.testing.validity.check_transformation`` enumerates a finite program before and after
a rewrite and compares the two measures on return values in exact rational arithmetic.
Every pass must pass it on generated finite programs (``finite_programs()``: random
control flow, loops, observes, conditions, factors) and on the finite examples, and its
output must be a valid program that prints and parses back to itself. Plausible wrong
versions of the passes must fail it: folding ``1/3`` to a float (off by 1e-17, which
only exact arithmetic sees), dead-code elimination that drops likelihood statements, and
one that decides liveness from the statements *after* a definition only (wrong in
loops).
"""
from __future__ import annotations

import dataclasses
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

import ppl
from ppl.compiler import parse_program
from ppl.compiler import transforms as T
from ppl.semantics import ir
from ppl.semantics.errors import PPLError
from ppl.semantics.pretty import pretty
from ppl.testing.strategies import finite_programs
from ppl.testing.validity import check_transformation

sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PASSES = [T.fold_constants, T.eliminate_dead_code, T.optimize]


def roundtrips(program: ir.Program) -> bool:
    return parse_program(pretty(program), "<transformed>") == program


@pytest.mark.parametrize("transform", PASSES, ids=lambda f: f.__name__)
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(src=finite_programs())
def test_passes_preserve_the_measure_on_generated_programs(transform, src):
    model = ppl.model(src)
    check = check_transformation(transform, model)
    assert check.ok(), f"{transform.__name__} changed the measure of\n{src}\n{check}"
    assert roundtrips(transform(model.program))


@pytest.mark.parametrize("name", ["dice", "medical", "trick_coin"])
def test_optimize_preserves_the_finite_examples(name):
    import json
    model = ppl.model((EXAMPLES / f"{name}.ppl").read_text(), filename=f"{name}.ppl")
    data = json.loads((EXAMPLES / f"{name}.json").read_text())
    check = check_transformation(T.optimize, model, data)
    assert check.ok(), str(check)
    assert roundtrips(T.optimize(model.program))


def optimized(src: str) -> str:
    return pretty(T.optimize(ppl.model(src).program))


def test_folding_keeps_what_only_the_exact_semantics_can_tell():
    out = optimized("def m():\n    a ~ flip(1/4 + 0.25)\n    b ~ flip(1/3)\n    return a and b\n")
    assert "flip(0.5)" in out          # 1/4 + 1/4 is exactly the decimal 0.5
    assert "flip(1 / 3)" in out        # 0.3333333333333333 is not 1/3
    out = optimized("def m():\n    x ~ flip(0.1 + 0.2)\n    return x\n")
    assert "0.1 + 0.2" in out          # 0.30000000000000004 as a float, 3/10 exactly


def test_folding_keeps_runtime_errors_and_folds_control_flow():
    out = optimized("def m():\n    x ~ flip(0.5)\n    y = 1 // 0\n    return x\n")
    assert "1 // 0" in out  # a partial expression is neither folded nor removed
    with pytest.raises(PPLError, match="division by zero"):
        ppl.model(out).run("enumerate")
    out = optimized("def m():\n    x ~ flip(0.5)\n    if 2 > 3:\n        x = False\n    else:\n"
                    "        observe x ~ bernoulli(0.9)\n    while False:\n        x = True\n    return x\n")
    assert "if" not in out and "while" not in out and "observe x ~ bernoulli(0.9)" in out


def test_dead_code_keeps_likelihoods_and_user_functions():
    src = """
def helper():
    z ~ flip(0.5)
    return z

def m():
    unused ~ flip(0.2)
    also_unused ~ helper()
    t = 3
    observe True ~ bernoulli(0.7)
    factor 0.5
    condition True
    return 1
"""
    out = optimized(src)
    assert "unused ~ flip" not in out and "t = 3" not in out
    assert "also_unused ~ helper()" in out  # not a prelude distribution: kept
    for kept in ("observe True ~ bernoulli(0.7)", "factor 0.5", "condition True"):
        assert kept in out


def test_transformed_model_api():
    m = ppl.model("def m():\n    a ~ flip(1/4 + 1/4)\n    u ~ flip(0.3)\n    return a\n")
    opt = m.transformed("optimize")
    assert opt.run("enumerate").paths != m.run("enumerate").paths  # u is gone from the traces...
    assert dict(opt.run("enumerate").marginal("return")) == dict(m.run("enumerate").marginal("return"))
    with pytest.raises(PPLError, match="unknown transformation"):
        m.transformed("optimise")


# ------------------------------------------------------------------ broken passes are caught
def naive_fold(program: ir.Program) -> ir.Program:
    """Folds divisions of literals in floating point: 1/3 -> 0.3333333333333333."""
    def expr(e):
        e = T._map_exprs(e, expr)
        if isinstance(e, ir.BinOp) and e.op == "/" and T._is_num(e.left) and T._is_num(e.right) and e.right.value:
            return ir.Const(e.left.value / e.right.value, span=e.span)
        return e

    def block(stmts):
        return tuple(dataclasses.replace(T._map_exprs(s, expr), **{
            k: block(getattr(s, k)) for k in ("then", "orelse", "body") if hasattr(s, k)}) for s in stmts)
    return T._map_program(program, block)


def test_naive_float_folding_is_caught_only_by_exact_arithmetic():
    model = ppl.model("def m():\n    a ~ flip(1/3)\n    return a\n")
    check = check_transformation(naive_fold, model)
    assert check.exact and not check.ok()
    assert 0 < check.max_error < 1e-15  # invisible to a float comparison
    assert check.before[True] == Fraction(1, 3)


def drops_likelihoods(program: ir.Program) -> ir.Program:
    """Dead-code elimination that also removes conditions and observes of unread values."""
    def block(stmts):
        out = []
        for s in stmts:
            if isinstance(s, (ir.Condition, ir.Observe)):
                continue
            for k in ("then", "orelse", "body"):
                if hasattr(s, k):
                    s = dataclasses.replace(s, **{k: block(getattr(s, k)) or (ir.Pass(),)})
            out.append(s)
        return tuple(out)
    return T._map_program(T.eliminate_dead_code(program), block)


def liveness_from_later_statements(program: ir.Program) -> ir.Program:
    """Removes an assignment when no *later* statement of its block reads the name:
    wrong in a loop, where the next iteration reads it from an earlier line."""
    def block(stmts):
        out = []
        for i, s in enumerate(stmts):
            later = {n.name for t in stmts[i + 1:] for n in ir.walk(t) if isinstance(n, ir.Var)}
            if isinstance(s, ir.Assign) and isinstance(s.target, str) and s.target not in later:
                continue
            for k in ("then", "orelse", "body"):
                if hasattr(s, k) and not isinstance(s, ir.FunctionDef):
                    s = dataclasses.replace(s, **{k: block(getattr(s, k)) or (ir.Pass(),)})
            out.append(s)
        return tuple(out)
    return T._map_program(program, block)


def test_dropping_likelihoods_is_caught():
    model = ppl.model("def m():\n    a ~ flip(0.5)\n    b ~ flip(0.5)\n    condition a or b\n    return a\n")
    check = check_transformation(drops_likelihoods, model)
    assert not check.ok()
    assert check.before == {True: Fraction(1, 2), False: Fraction(1, 4)}
    assert check.after == {True: Fraction(1, 2), False: Fraction(1, 2)}


def test_loop_liveness_bug_is_caught():
    src = """
def m():
    s = 0
    prev = 0
    for i in range(3):
        x ~ flip(0.5)
        s = s + prev
        prev = 1 if x else 0
    return s
"""
    model = ppl.model(src)
    assert check_transformation(T.eliminate_dead_code, model).ok()
    check = check_transformation(liveness_from_later_statements, model)
    assert not check.ok(), "prev is read by the next iteration: removing it changes the measure"


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(src=finite_programs())
def test_checker_catches_the_likelihood_bug_on_generated_programs(src):
    """Whenever the broken pass actually removes a condition or observe that matters, the
    checker sees it; it never flags the correct pass."""
    model = ppl.model(src)
    assert check_transformation(T.eliminate_dead_code, model).ok()
    broken = check_transformation(drops_likelihoods, model)
    before, after = model.run("enumerate").evidence, ppl.model(pretty(drops_likelihoods(model.program))).run(
        "enumerate").evidence
    exact = isinstance(before, Fraction) and isinstance(after, Fraction)
    matters = before != after if exact else abs(float(before) - float(after)) > 1e-9 * max(1.0, float(before))
    if matters:
        assert not broken.ok()
