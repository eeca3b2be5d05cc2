"""The parser: source text -> IR with spans, and readable syntax errors."""
import pytest

from ppl.compiler import parse_program
from ppl.semantics import ir
from ppl.semantics.errors import PPLSyntaxError

SOURCE = '''\
def geometric(p):
    b ~ bernoulli(p)
    return 0 if b else 1 + geometric(p)

# a comment line between functions
def hmm(ys, a=0.9, q=1.0, r=1.0, c=[1, 2]):
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

def misc(xs, lm, ctx):
    def helper(u, v=1e-3):
        return u ** -v
    a, b = xs[1:], xs[:2]
    head, = xs[:1]
    for i, y in enumerate(xs):
        pass
    while a and b:
        a = a[1:-1]
    if a == 1:
        s = 'single'
    elif a != 2:
        s = "double\\n"
    elif a in xs:
        s = (a,)
    else:
        s = ()
    tok ~ lm.next_token(ctx)
    scaled = normal(0, 1, scale=2)
    log(helper(2))
    return -x ** 2, (a if b else c)
'''


@pytest.fixture(scope="module")
def program():
    return parse_program(SOURCE, filename="models.ppl")


def call(name, *args, **kwargs):
    return ir.Call(ir.Var(name), tuple(args),
                   tuple(ir.Keyword(k, v) for k, v in kwargs.items()))


V, C = ir.Var, ir.Const


def test_top_level_functions(program):
    assert program.names == ("geometric", "hmm", "misc")
    hmm = program.function("hmm")
    assert [p.name for p in hmm.params] == ["ys", "a", "q", "r", "c"]
    assert hmm.params[0].default is None
    assert hmm.params[1].default == C(0.9)
    assert isinstance(hmm.params[1].default.value, float)
    assert hmm.params[4].default == ir.ListExpr((C(1), C(2)))


def test_recursion_and_conditional_expression(program):
    sample, ret = program.function("geometric").body
    assert sample == ir.Sample("b", call("bernoulli", V("p")))
    assert ret == ir.Return(ir.IfExp(V("b"), C(0), ir.BinOp("+", C(1), call("geometric", V("p")))))
    assert type(ret.value.then.value) is int


def test_hmm_body(program):
    body = program.function("hmm").body
    assert body[0] == ir.Sample("x", call("normal", C(0), C(1)))
    loop = body[1]
    assert loop == ir.For("t", call("range", call("len", V("ys"))), (
        ir.Sample("x", call("normal", ir.BinOp("*", V("a"), V("x")), V("q"))),
        ir.Observe(ir.Index(V("ys"), V("t")), call("normal", V("x"), V("r"))),
    ))
    # unary minus binds looser than ** but tighter than *
    assert body[2] == ir.Factor(ir.BinOp(
        "*", ir.UnaryOp("-", C(0.5)), ir.BinOp("**", V("x"), C(2))))
    assert body[3] == ir.Condition(ir.BoolOp(
        "and", ir.BinOp(">", V("x"), ir.UnaryOp("-", C(10))),
        ir.UnaryOp("not", ir.BinOp(">", V("x"), C(10)))))
    assert body[4] == ir.Assign("f", ir.Lambda(("z",), ir.BinOp("*", V("z"), C(2))))
    assert body[5] == ir.Assign("zs", call("map", V("f"), ir.ListExpr((C(1), C(2), C(3)))))
    lam = ir.Lambda(("acc", "z"), ir.BinOp("+", V("acc"), V("z")))
    assert body[6] == ir.Assign("total", call("fold", lam, C(0), V("zs")))
    assert body[7] == ir.Return(V("x"))


def test_misc_statements(program):
    body = program.function("misc").body
    helper = body[0]
    assert isinstance(helper, ir.FunctionDef) and helper.name == "helper"
    assert helper.params[1].default == C(1e-3)
    assert helper.body == (ir.Return(ir.BinOp("**", V("u"), ir.UnaryOp("-", V("v")))),)
    assert body[1] == ir.Assign(("a", "b"), ir.TupleExpr((
        ir.Index(V("xs"), ir.Slice(C(1), None)), ir.Index(V("xs"), ir.Slice(None, C(2))))))
    assert body[2] == ir.Assign(("head",), ir.Index(V("xs"), ir.Slice(None, C(1))))
    assert body[3] == ir.For(("i", "y"), call("enumerate", V("xs")), (ir.Pass(),))
    assert body[4] == ir.While(ir.BoolOp("and", V("a"), V("b")), (
        ir.Assign("a", ir.Index(V("a"), ir.Slice(C(1), ir.UnaryOp("-", C(1))))),))


def test_elif_chain_nests_in_orelse(program):
    chain = program.function("misc").body[5]
    assert chain.cond == ir.BinOp("==", V("a"), C(1))
    assert chain.then == (ir.Assign("s", C("single")),)
    (second,) = chain.orelse
    assert second.cond == ir.BinOp("!=", V("a"), C(2))
    assert second.then == (ir.Assign("s", C("double\n")),)
    (third,) = second.orelse
    assert third.cond == ir.BinOp("in", V("a"), V("xs"))
    assert third.then == (ir.Assign("s", ir.TupleExpr((V("a"),))),)
    assert third.orelse == (ir.Assign("s", ir.TupleExpr(())),)


def test_calls_attributes_and_tuples(program):
    body = program.function("misc").body
    assert body[6] == ir.Sample("tok", ir.Call(ir.Attr(V("lm"), "next_token"), (V("ctx"),)))
    assert body[7] == ir.Assign("scaled", call("normal", C(0), C(1), scale=C(2)))
    assert body[8] == ir.ExprStmt(call("log", call("helper", C(2))))
    assert body[9] == ir.Return(ir.TupleExpr((
        ir.UnaryOp("-", ir.BinOp("**", V("x"), C(2))), ir.IfExp(V("b"), V("a"), V("c")))))


def test_spans_point_at_the_source(program):
    geometric, hmm, misc = program.functions
    assert (geometric.span.line, geometric.span.col) == (1, 1)
    assert (geometric.span.end_line, geometric.span.end_col) == (3, 39)  # ends at its last statement
    sample = geometric.body[0]
    assert (sample.span.line, sample.span.col, sample.span.end_col) == (2, 5, 20)
    assert (sample.dist.span.line, sample.dist.span.col) == (2, 9)
    observe = hmm.body[1].body[1]
    assert (observe.span.line, observe.span.col) == (10, 9)
    assert (observe.value.span.col, observe.value.span.end_col) == (17, 21)  # ys[t]
    assert (hmm.body[1].span.line, hmm.body[1].span.end_line) == (8, 10)
    assert observe.span.source.name == "models.ppl"
    assert observe.span.location() == "models.ppl:10:9"
    elif_if = misc.body[5].orelse[0]
    assert (elif_if.span.line, elif_if.span.col) == (29, 5)  # the elif line


def test_line_offset_shifts_reported_lines():
    p = parse_program("def f():\n    return x\n", filename="m.py", line_offset=10)
    ret = p.functions[0].body[0]
    assert ret.span.line == 2 and ret.span.location() == "m.py:12:5"


def test_literals():
    p = parse_program("def f():\n    return [1, 2.5, 1e-3, .5, 3., True, False, None, 'a\\'b', \"c\"]\n")
    items = p.functions[0].body[0].value.items
    assert [i.value for i in items] == [1, 2.5, 1e-3, 0.5, 3.0, True, False, None, "a'b", "c"]
    assert [type(i.value) for i in items[:5]] == [int, float, float, float, float]


def test_one_line_suites_and_brackets_spanning_lines():
    p = parse_program("def f(x):\n    if x: return (1 +\n        2)\n    return [\n  3,\n]\n")
    then = p.functions[0].body[0].then
    assert then == (ir.Return(ir.BinOp("+", C(1), C(2))),)
    assert p.functions[0].body[1] == ir.Return(ir.ListExpr((C(3),)))


def test_empty_program():
    assert parse_program("") == ir.Program(())
    assert parse_program("# nothing here\n\n") == ir.Program(())


# ---------------------------------------------------------------------------------- errors
def syntax_error(src) -> PPLSyntaxError:
    with pytest.raises(PPLSyntaxError) as info:
        parse_program(src, filename="bad.ppl")
    return info.value


@pytest.mark.parametrize("src, where, message, hint", [
    ("def f(x)\n    return x\n", "bad.ppl:1:9", "expected ':'", "end the 'def' line with ':'"),
    ("def f(x):\n    if x > 0\n        return x\n", "bad.ppl:2:13", "expected ':'", "'if' line"),
    ("def f():\nreturn 1\n", "bad.ppl:2:1", "expected an indented block", "indent the body of 'def'"),
    ("def f():\n    x = 1\n  y = 2\n", "bad.ppl:3:3", "unindent", "same amount"),
    ("def f():\n    x = 1\n        y = 2\n", "bad.ppl:3:9", "unexpected indent", "indented more"),
    ("def f():\n\treturn 1\n", "bad.ppl:2:2", "tab", "spaces"),
    ("def f():\n    x = (1 + 2\n    return x\n", "bad.ppl:3:5", "unexpected 'return'", "never closed"),
    ("def f():\n    return f(1))\n", "bad.ppl:2:16", "unexpected ')'", "no matching"),
    ("import os\n", "bad.ppl:1:1", "'import' is not supported", "cannot import Python modules"),
    ("def f():\n    from os import path\n", "bad.ppl:2:5", "'from'", "cannot import"),
    ("def f():\n    x = 1 2\n", "bad.ppl:2:11", "unexpected number 2", "missing"),
    ("def f():\n    x = 1 $\n", "bad.ppl:2:11", "unexpected character '$'", None),
    ("x = 1\n", "bad.ppl:1:1", "inside a function", "put statements inside a def"),
    ("return 1\n", "bad.ppl:1:1", "'return' outside a function", "inside a def"),
    ("def f(x):\n    if x = 1:\n        pass\n", "bad.ppl:2:10", "unexpected '='", "'=='"),
    ("def f(a, b, c):\n    return a < b < c\n", "bad.ppl:2:18", "unexpected '<'", "chained"),
    ("def f(x):\n    x += 1\n", "bad.ppl:2:8", "unexpected '='", "x = x + "),
    ("def f():\n    y = \n", "bad.ppl:2:9", "expected an expression", None),
    ("def f(x):\n    if x:\n        pass\n    else if x:\n        pass\n", "bad.ppl:4:10",
     "unexpected 'if'", "elif"),
    ("def f():\n    observe 1\n", "bad.ppl:2:14", "unexpected end of line", "observe <value> ~"),
    ("def f(xs):\n    xs[0] ~ normal(0, 1)\n", "bad.ppl:2:5", "left side of '~'", "observe"),
    ("def f(xs):\n    xs[0] = 1\n", "bad.ppl:2:5", "cannot assign", "immutable"),
    ("def f():\n    g(a=1, 2)\n", "bad.ppl:2:12", "positional argument follows keyword", None),
    ("def f(a=1, b):\n    pass\n", "bad.ppl:1:12", "without a default", "last"),
    ("def f():\n    x = {}\n", "bad.ppl:2:9", "unexpected character '{'", "dicts"),
    ("def f():\n    x = 'abc\n", "bad.ppl:2:9", "unexpected character", "never closed"),
    ("@decorate\ndef f():\n    pass\n", "bad.ppl:1:1", "'@'", "decorators"),
    ("class A:\n    pass\n", "bad.ppl:1:1", "'class'", "no classes"),
    ("def f(:\n", "bad.ppl:1:7", "expected an expression", None),
    ("def f():\n    return (1,\n", "bad.ppl:2:15", "end of input", "never closed"),
])
def test_syntax_errors(src, where, message, hint):
    err = syntax_error(src)
    text = str(err)
    assert text.startswith(where + ": syntax error: "), text
    assert message in err.message, text
    if hint is not None:
        assert err.hint and hint in err.hint, text


def test_syntax_error_shows_line_and_caret():
    err = syntax_error("def f(x):\n    return normal(x, 1))\n")
    lines = str(err).splitlines()
    assert lines[0] == "bad.ppl:2:24: syntax error: unexpected ')'"
    assert lines[1] == "    2 |     return normal(x, 1))"
    assert lines[2] == " " * 8 + " " * 23 + "^"
    assert lines[3].startswith("hint: ")


def test_syntax_error_line_offset():
    with pytest.raises(PPLSyntaxError) as info:
        parse_program("def f():\n    x = = 1\n", filename="m.py", line_offset=40)
    assert str(info.value).startswith("m.py:42:9:")
    assert "   42 |     x = = 1" in str(info.value)


def test_keywords_are_not_names():
    for word in ("observe", "lambda", "None", "in"):
        syntax_error(f"def f():\n    {word} = 1\n")
    syntax_error("def if():\n    pass\n")
