"""Static checks: unknown names, arity, Python internals, duplicates."""
import pytest

from ppl.compiler import parse_program
from ppl.compiler.check import check
from ppl.semantics import ir
from ppl.semantics.errors import PPLCheckError

GLOBALS = {
    "normal": (2, 2), "bernoulli": (1, 1), "range": (1, 3), "len": (1, 1),
    "map": (2, 2), "fold": (3, 3), "sum": (1, None), "print_all": (0, None), "log": None,
}

GOOD = '''\
def geometric(p):
    b ~ bernoulli(p)
    return 0 if b else 1 + geometric(p)

def hmm(ys, a=0.9, q=1.0, r=1.0):
    x ~ normal(0, 1)          # initial state
    for t in range(len(ys)):
        x ~ normal(a * x, q)
        observe ys[t] ~ normal(x, r)
    factor -0.5 * x ** 2
    condition x > -10 and not (x > 10)
    f = lambda z: z * 2
    zs = map(f, [1, 2, 3])
    total = fold(lambda acc, z: acc + z, 0, zs)
    return x

def closures(xs, lm):
    def add(u, v=1):
        return u + v + offset
    offset = 2
    for i, y in xs:
        w = add(i, v=y)
    if xs:
        late = 1
    tok ~ lm.next_token(xs)
    normal = lambda a: a
    return normal(1), hmm(xs, r=2.0), geometric(p=0.5), sum(1, 2, 3), late, w, tok
'''


def check_src(src, globals=GLOBALS):
    check(parse_program(src, filename="m.ppl"), globals)


def check_error(src, globals=GLOBALS) -> PPLCheckError:
    with pytest.raises(PPLCheckError) as info:
        check_src(src, globals)
    return info.value


def test_correct_program_passes():
    check_src(GOOD)


def test_unknown_name_with_suggestion():
    err = check_error("def m():\n    x ~ nromal(0, 1)\n")
    assert err.message == "unknown name 'nromal'"
    assert err.hint == "did you mean 'normal'?"
    assert (err.span.line, err.span.col, err.span.end_col) == (2, 9, 14)
    assert str(err).startswith("m.ppl:2:9: error: unknown name 'nromal'")
    assert "^^^^^^" in str(err)


def test_unknown_name_suggests_locals_and_params():
    err = check_error("def m(sigma):\n    mean = 1\n    return normal(maen, sigam)\n")
    assert err.hint == "did you mean 'mean'?"


def test_scopes_do_not_leak():
    err = check_error("def f():\n    def g():\n        inner = 1\n        return inner\n    return inner\n")
    assert err.message == "unknown name 'inner'" and err.span.line == 5
    err = check_error("def f():\n    g = lambda z: z\n    return z\n")
    assert err.message == "unknown name 'z'"
    err = check_error("def f(a=b):\n    b = 1\n")  # defaults see the enclosing scope only
    assert err.message == "unknown name 'b'"


@pytest.mark.parametrize("src, message", [
    ("def m():\n    x ~ normal(0, 1, 2)\n", "normal() takes 2 arguments but 3 were given"),
    ("def m():\n    x ~ normal(0)\n", "normal() takes 2 arguments but 1 was given"),
    ("def m():\n    x ~ normal(0, 1, scale=2)\n", "normal() takes 2 arguments but 3 were given"),
    ("def m():\n    return range()\n", "range() takes 1 to 3 arguments but 0 were given"),
    ("def m():\n    return sum()\n", "sum() takes at least 1 argument but 0 were given"),
    ("def g(a, b=1):\n    return a\n\ndef m():\n    return g(1, 2, 3)\n",
     "g() takes 1 to 2 arguments but 3 were given"),
    ("def g(a, b):\n    return a\n\ndef m():\n    return g(1)\n",
     "g() takes 2 arguments but 1 was given"),
    ("def g():\n    return 1\n\ndef m():\n    return g(1)\n",
     "g() takes no arguments but 1 was given"),
    ("def g(a, b):\n    return a\n\ndef m():\n    return g(1, a=2)\n",
     "g() got multiple values for 'a'"),
    ("def g(a, b):\n    return a\n\ndef m():\n    return g(b=2)\n",
     "g() is missing the argument 'a'"),
])
def test_arity(src, message):
    err = check_error(src)
    assert err.message == message
    assert err.span.line == src.count("\n")  # the call (or its bad keyword) on the last line


def test_unknown_keyword_for_top_level_function():
    err = check_error("def hmm(ys, scale=1.0):\n    return ys\n\ndef m():\n    return hmm(1, scael=2)\n")
    assert err.message == "hmm() has no parameter 'scael'"
    assert err.hint == "did you mean 'scale'?"
    assert (err.span.line, err.span.col) == (5, 19)


def test_shadowed_callee_is_not_arity_checked():
    check_src("def m():\n    normal = lambda a, b, c: a\n    return normal(1, 2, 3)\n")


def test_python_internals_are_rejected():
    err = check_error("def m(x):\n    return x._secret\n")
    assert "attribute '_secret'" in err.message and "Python internals" in err.hint
    err = check_error("def m(x):\n    return x.__class__\n")
    assert "Python internals" in err.hint
    for src in ("def m():\n    return __import__\n", "def m():\n    __x = 1\n",
                "def m(__a):\n    pass\n", "def __m():\n    pass\n",
                "def m():\n    return f(__k=1)\n"):
        err = check_error(src, {**GLOBALS, "__import__": None, "f": None})
        assert "Python internals" in err.hint, src


def test_duplicates():
    err = check_error("def m(a, b, a):\n    pass\n")
    assert err.message == "duplicate parameter 'a'" and (err.span.line, err.span.col) == (1, 13)
    err = check_error("def m():\n    return lambda x, x: x\n")
    assert err.message == "duplicate parameter 'x'"
    err = check_error("def m():\n    pass\n\ndef m(x):\n    pass\n")
    assert err.message == "function 'm' is defined twice" and err.span.line == 4
    assert err.hint


def test_return_outside_def():
    bogus = ir.Program((ir.Return(ir.Const(1)),))  # the parser never builds this
    with pytest.raises(PPLCheckError, match="inside a function"):
        check(bogus, GLOBALS)
