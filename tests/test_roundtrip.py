"""pretty() and the parser are inverses, and no input makes the parser crash."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppl.compiler import parse_program
from ppl.semantics import ir
from ppl.semantics.errors import PPLSyntaxError
from ppl.semantics.pretty import pretty
from ppl.testing.strategies import ir_expressions, ir_programs

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
V, C = ir.Var, ir.Const


def reparse_expr(e: ir.Expr) -> ir.Expr:
    return parse_program(f"def f():\n    return {pretty(e)}\n").functions[0].body[0].value


@pytest.mark.parametrize("e, text", [
    (ir.BinOp("-", V("a"), ir.BinOp("-", V("b"), V("c"))), "a - (b - c)"),
    (ir.BinOp("-", ir.BinOp("-", V("a"), V("b")), V("c")), "a - b - c"),
    (ir.BinOp("*", ir.BinOp("+", V("a"), V("b")), V("c")), "(a + b) * c"),
    (ir.BinOp("**", ir.UnaryOp("-", V("x")), C(2)), "(-x) ** 2"),
    (ir.UnaryOp("-", ir.BinOp("**", V("x"), C(2))), "-x ** 2"),
    (ir.BinOp("**", V("a"), ir.BinOp("**", V("b"), V("c"))), "a ** b ** c"),
    (ir.BinOp("**", ir.BinOp("**", V("a"), V("b")), V("c")), "(a ** b) ** c"),
    (ir.BinOp("**", V("a"), ir.UnaryOp("-", V("b"))), "a ** -b"),
    (ir.BinOp("<", ir.BinOp("<", V("a"), V("b")), V("c")), "(a < b) < c"),
    (ir.UnaryOp("not", ir.BinOp("==", V("a"), V("b"))), "not a == b"),
    (ir.BoolOp("and", ir.BoolOp("or", V("a"), V("b")), V("c")), "(a or b) and c"),
    (ir.BoolOp("or", V("a"), ir.BoolOp("or", V("b"), V("c"))), "a or (b or c)"),
    (ir.BinOp("+", ir.IfExp(V("c"), V("a"), V("b")), C(1)), "(a if c else b) + 1"),
    (ir.IfExp(V("c"), V("a"), ir.IfExp(V("d"), V("b"), V("e"))), "a if c else b if d else e"),
    (ir.IfExp(V("c"), ir.IfExp(V("d"), V("a"), V("b")), V("e")), "(a if d else b) if c else e"),
    (ir.Call(ir.Lambda(("x",), V("x")), (C(1),)), "(lambda x: x)(1)"),
    (ir.Call(ir.Attr(V("lm"), "next"), (V("c"),), (ir.Keyword("k", C(2)),)), "lm.next(c, k=2)"),
    (ir.Attr(C(1), "real"), "(1).real"),
    (ir.Index(V("xs"), ir.Slice(None, C(2))), "xs[:2]"),
    (ir.Index(V("xs"), ir.Slice(None, None)), "xs[:]"),
    (ir.TupleExpr((V("a"),)), "(a,)"),
    (ir.TupleExpr(()), "()"),
    (C(0.1), "0.1"),
    (C(1e-300), "1e-300"),
    (C("it's\n"), '"it\'s\\n"'),
])
def test_minimal_parentheses(e, text):
    assert pretty(e) == text
    assert reparse_expr(e) == e


def test_program_layout_and_elif():
    inner = ir.If(V("b"), (ir.Pass(),), (ir.Return(C(2)),))
    f = ir.FunctionDef("f", (ir.Param("a"), ir.Param("b", C(1.0))), (
        ir.If(V("a"), (ir.Return(C(1)),), (inner,)),
        ir.For(("i", "x"), V("xs"), (ir.Sample("y", ir.Call(V("normal"), (V("x"), C(1)))),)),
    ))
    p = ir.Program((f, ir.FunctionDef("g", (), (ir.Pass(),))))
    assert pretty(p) == (
        "def f(a, b=1.0):\n"
        "    if a:\n"
        "        return 1\n"
        "    elif b:\n"
        "        pass\n"
        "    else:\n"
        "        return 2\n"
        "    for i, x in xs:\n"
        "        y ~ normal(x, 1)\n"
        "\n"
        "def g():\n"
        "    pass\n"
    )
    assert parse_program(pretty(p)) == p


def test_example_program_roundtrips():
    src = (
        "def geometric(p):\n"
        "    b ~ bernoulli(p)\n"
        "    return 0 if b else 1 + geometric(p)\n"
        "\n"
        "def hmm(ys, a=0.9, q=1.0, r=1.0):\n"
        "    x ~ normal(0, 1)\n"
        "    for t in range(len(ys)):\n"
        "        x ~ normal(a * x, q)\n"
        "        observe ys[t] ~ normal(x, r)\n"
        "    factor -0.5 * x ** 2\n"
        "    condition x > -10 and not x > 10\n"
        "    f = lambda z: z * 2\n"
        "    zs = map(f, [1, 2, 3])\n"
        "    total = fold(lambda acc, z: acc + z, 0, zs)\n"
        "    return x\n"
    )
    assert pretty(parse_program(src)) == src


@SETTINGS
@given(ir_programs())
def test_parse_inverts_pretty(program):
    assert parse_program(pretty(program)) == program


@SETTINGS
@given(ir_expressions(12))
def test_parse_inverts_pretty_on_expressions(e):
    assert reparse_expr(e) == e


# ---------------------------------------------------------------------------------- fuzzing
FRAGMENTS = ["def ", "f", "(", ")", "[", "]", ":", ",", "=", "==", "~", "+", "-", "*", "**",
             "/", ".", "'", '"', "#", "\n", "    ", "\t", " ", "x", "1", "2.5", "1e", "if ",
             "elif ", "else", "for ", " in ", "while ", "return", "observe ", "factor ",
             "condition ", "lambda ", "not ", " and ", "pass", "import", "@", "\\", "{", ";",
             "\r", "\x00", "é", "__", "True"]


def assert_parses_or_syntax_error(text):
    try:
        parse_program(text, filename="fuzz.ppl")
    except PPLSyntaxError as err:
        assert err.span is not None and err.span.source is not None
        assert str(err).startswith("fuzz.ppl:")


@SETTINGS
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))
def test_fuzz_token_soup(text):
    assert_parses_or_syntax_error(text)


@SETTINGS
@given(st.text(max_size=60))
def test_fuzz_arbitrary_text(text):
    assert_parses_or_syntax_error(text)
    assert_parses_or_syntax_error("def f():\n    " + text)


@SETTINGS
@given(ir_programs(), st.data())
def test_fuzz_mutated_programs(program, data):
    text = pretty(program)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 4)))
        text = text[:i] + data.draw(st.sampled_from(FRAGMENTS + [""])) + text[j:]
    assert_parses_or_syntax_error(text)
