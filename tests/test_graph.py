"""The dependency analysis, the dependency graph and d-separation (issue 12, item 1).

* Textbook cases: a chain, a fork and a v-structure give the textbook (in)dependences,
  and the exact joint (enumeration, Fractions) agrees.
* Random finite programs (``ppl.testing.strategies.finite_programs``):
  (a) every site of every execution path is one of the analysis' sites (by statement and
      loop indices), and a site it calls static is on every path;
  (b) parents are a superset of the true dependencies: on all paths (enumerated without
      pruning), a site's behaviour (its distribution's support table, an observation's
      distribution and value, a factor's value, a condition's truth, or its absence) is
      a function of its parents' values;
  (c) whenever d-separation says "a independent of b given Z" (observations included),
      the exact posterior factorises: P(a, b, z) P(z) = P(a, z) P(b, z) for all values.
* The trace fallback is marked; unknown names are located errors; the drawing example
  writes its PNG files.
"""
import itertools
import pathlib
import runpy
import sys
from collections import defaultdict
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, Phase, given, settings

import ppl
from ppl.semantics.dependencies import analyse
from ppl.semantics.exact import _PathHandler, exact_data
from ppl.semantics.graph import _INDEX
from ppl.semantics.graph import build_graph, d_separated
from ppl.semantics.sampling import drive
from ppl.semantics.values import Particles, truthy
from ppl.testing.strategies import finite_programs

sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
ROOT = pathlib.Path(__file__).resolve().parent.parent

CHAIN = """
def chain():
    a ~ flip(0.5)
    b ~ flip(0.9 if a else 0.2)
    c ~ flip(0.7 if b else 0.1)
    return c
"""
FORK = """
def fork():
    b ~ flip(0.3)
    a ~ flip(0.9 if b else 0.2)
    c ~ flip(0.7 if b else 0.1)
    return c
"""
V_STRUCTURE = """
def v():
    a ~ flip(0.5)
    c ~ flip(0.4)
    b ~ flip(0.9 if a and c else 0.2)
    return b
"""
V_OBSERVED = """
def v():
    a ~ flip(0.5)
    c ~ flip(0.4)
    observe 1 ~ bernoulli(0.9 if a or c else 0.2)
    return a
"""


# --------------------------------------------------------------------------- helpers
def _posterior_factorises(m, a: str, b: str, zs=()) -> bool:
    """Whether the exact posterior (of a model, or its enumerated paths) satisfies
    a _||_ b | zs (absent choices are None)."""
    joint = defaultdict(Fraction)
    for w, vals in (m.enumerate().paths if isinstance(m, ppl.Model) else m):
        joint[(vals.get(a), vals.get(b), tuple(vals.get(z) for z in zs))] += Fraction(w)
    pz, paz, pbz = defaultdict(Fraction), defaultdict(Fraction), defaultdict(Fraction)
    for (va, vb, vz), w in joint.items():
        pz[vz] += w
        paz[(va, vz)] += w
        pbz[(vb, vz)] += w
    avals = {k[0] for k in paz}
    bvals = {k[0] for k in pbz}
    return all(joint.get((va, vb, vz), 0) * pz[vz] == paz.get((va, vz), 0) * pbz.get((vb, vz), 0)
               for vz in pz for va in avals for vb in bvals)


class _AllPaths(_PathHandler):
    """The exact semantics' handler for one path (choices by index prefix), except that
    nothing is pruned (a zero weight stays on the path), recording each site's behaviour
    under the analysis' name of its statement (see ``_analysis_address``)."""

    def __init__(self, prefix, names):
        super().__init__(prefix)
        self.names, self.choices, self.behaviour = names, {}, {}

    def _mul(self, p, span=None):
        self.weight = self.weight * p

    def _name(self, eff) -> str:
        key = (eff.span.line, eff.span.col, tuple(int(i[1:-1]) for i in _INDEX.findall(eff.addr)))
        return self.names.get(key, "unknown:" + eff.addr)

    def sample(self, eff):
        value = super().sample(eff)
        support = [(v, p) for v, p in eff.dist.exact_support() if p != 0]
        self.choices[self._name(eff)] = value
        self.behaviour[self._name(eff)] = ("choice", repr(support))
        return value

    def observe(self, eff):
        self.behaviour[self._name(eff)] = ("observe", repr(eff.dist.exact_support()), repr(eff.value))
        return super().observe(eff)

    def factor(self, eff):
        self.behaviour[self._name(eff)] = ("factor", repr(eff.value))
        return super().factor(eff)

    def condition(self, eff):
        self.behaviour[self._name(eff)] = ("condition", bool(truthy(eff.value)))
        return super().condition(eff)


def _analysis_names(deps) -> dict:
    """(line, col, loop indices) of each site's statement -> the analysis' address. In a
    program without helper functions a statement runs at most once per loop index on a
    path, so this names a path's sites by statement. (The interpreter's own addresses
    may differ between paths: where a branch on a random value runs for one side only,
    as in exact enumeration, the '#k' counters of the side not taken are not advanced,
    so a later ``v ~ ...`` is ``v#1`` on one path and ``v#2`` on another.)"""
    names = {}
    for s in deps.sites:
        for span in s.spans:  # (the two branches of an `if` may share an address)
            key = (span.line, span.col, tuple(p.index for p in s.loops))
            assert key not in names, f"two sites of one statement: {names.get(key)}, {s.address}"
            names[key] = s.address
    return names


def _all_paths(m: ppl.Model, deps, limit: int = 3000) -> list:
    """Every prior path of a finite program (zero weights kept), named by the analysis."""
    interp, names = m.interpreter(exact=True), _analysis_names(deps)
    out, stack = [], [[]]
    while stack:
        h = _AllPaths(stack.pop(), names)
        drive(interp.run(m.entry, exact_data({}), Particles.all(1)), h)
        out.append(h)
        for j in range(len(h.prefix), len(h.taken)):
            for alt in range(h.sizes[j] - 1, 0, -1):
                stack.append(h.taken[:j] + [alt])
        assert len(out) <= limit
    return out


# ------------------------------------------------------------------------ textbook cases
@pytest.mark.parametrize("src, a, b, z, separated, separated_given", [
    (CHAIN, "a", "c", "b", False, True),
    (FORK, "a", "c", "b", False, True),
    (V_STRUCTURE, "a", "c", "b", True, False),
])
def test_textbook_structures(src, a, b, z, separated, separated_given):
    m = ppl.model(src)
    assert m.independent(a, b) is separated
    assert m.independent(a, b, given=[z]) is separated_given
    # the exact joint agrees (a guarantee where separated; a real dependence here otherwise)
    assert _posterior_factorises(m, a, b) is separated
    assert _posterior_factorises(m, a, b, [z]) is separated_given


def test_observation_makes_a_v_structure_dependent_in_the_posterior_only():
    m = ppl.model(V_OBSERVED)
    assert m.independent("a", "c", observed=False)
    assert not m.independent("a", "c")
    assert not _posterior_factorises(m, "a", "c")
    assert sorted(m.graph().predecessors("obs@5:5")) == ["a", "c"]


def test_chain_graph_parents_and_markov_blanket():
    m = ppl.model(CHAIN)
    g = m.graph()
    assert set(g.edges()) == {("a", "b"), ("b", "c")}
    assert g.nodes["b"]["distribution"] == "flip" and not g.nodes["b"]["observed"]
    assert m.markov_blanket("b") == {"a", "c"}
    assert m.markov_blanket("a") == {"b"}


def test_hmm_addresses_plates_and_blanket():
    import json
    m = ppl.model(str(ROOT / "examples/twisted_hmm.ppl"))
    data = json.loads((ROOT / "examples/twisted_hmm.json").read_text())
    deps = analyse(m, data)
    n = len(data["ys"])
    assert deps.is_static and not deps.from_traces
    assert deps.choices == ("z",) + tuple(f"z[{t}]" for t in range(n))
    assert deps.parents("z[4]") == {"z[3]"} and deps.parents("z[0]") == {"z"}
    obs = deps.site("obs@31:9[2]")
    assert obs.kind == "observe" and obs.parents == {"z[2]"} and obs.data == {"ys"}
    assert [(p.name, p.index, p.size) for p in obs.loops] == [("t", 2, n)]
    # the same addresses as the interpreter's trace
    r = m.prior(particles=4, seed=0, **data)
    assert set(deps.choices) == {k for k in r.sites if k != "return"}
    assert m.markov_blanket("z[3]", data=data) == {"z[2]", "z[4]", "obs@31:9[3]"}
    assert m.independent("z[0]", "z[5]", given=["z[3]"], data=data)
    assert not m.independent("z[0]", "z[5]", data=data)
    g = m.graph(data, collapse=True)
    assert set(g.nodes) == {"z", "z[t]", "obs@31:9[t]", "data:ys"}
    assert g.nodes["z[t]"]["recurrent"] and g.nodes["z[t]"]["plate"] == (("t", n),)
    assert g.nodes["obs@31:9[t]"]["observed"]


def test_plate_names_stand_for_every_copy():
    m = ppl.model("""
def m(n):
    mu ~ normal(0, 1)
    for i in range(n):
        x ~ normal(mu, 1)
        observe 0.5 ~ normal(x, 1)
    return mu
""")
    assert m.independent("x[i]", "x[i]", data={"n": 3}) is False
    assert m.independent("x[0]", "x[2]", given=["mu"], data={"n": 3}, observed=False)
    assert m.independent("x[0]", "x[2]", given=["mu"], data={"n": 3})  # each observation has one parent x
    assert not m.independent("x[0]", "x[2]", data={"n": 3}, observed=False)
    assert not m.independent("x[0]", "x[2]", data={"n": 3})
    assert m.markov_blanket("mu", data={"n": 3}) == {"x[0]", "x[1]", "x[2]"}
    assert m.markov_blanket("mu", data={"n": 3}, collapse=True) == {"x[i]"}
    assert m.independent("x[0]", "x[1]", given="mu", n=2)  # data as keywords, one name as a string
    assert set(m.graph(n=2)) == {"mu", "x[0]", "x[1]", "obs@6:9[0]", "obs@6:9[1]"}


def test_data_flow_through_lists_and_helpers():
    m = ppl.model("""
def helper(v):
    w ~ flip(0.3 if v else 0.6)
    return w
def m(k):
    a ~ flip(0.5)
    b ~ flip(0.5)
    xs = [a, b]
    c = helper(xs[k])
    d = helper(xs[1 - k])
    return c
""")
    deps = analyse(m, {"k": 0})
    assert deps.addresses == ("a", "b", "helper/w", "helper#1/w")
    assert deps.parents("helper/w") == {"a"} and deps.parents("helper#1/w") == {"b"}
    assert deps.site("helper/w").data == {"k"}
    assert m.independent("helper/w", "b", data={"k": 0}) and not m.independent("helper/w", "a", data={"k": 0})


def test_control_dependence_and_early_return():
    m = ppl.model("""
def m():
    a ~ flip(0.5)
    b ~ flip(0.5)
    if a:
        return 0
    c ~ flip(0.3)
    if b:
        d ~ flip(0.2)
    return 1
""")
    deps = analyse(m)
    assert deps.parents("c") == {"a"} and not deps.site("c").static
    assert deps.parents("d") == {"a", "b"}
    assert deps.site("a").static and deps.site("b").static
    assert not deps.is_static


def test_trace_fallback_is_marked():
    m = ppl.model("""
def geometric(p):
    b ~ flip(p)
    return 0 if b else 1 + geometric(p)
def main():
    return geometric(0.5)
""")
    deps = analyse(m)
    assert deps.from_traces and not deps.is_static
    assert "recursion" in deps.reason
    assert deps.sites[0].address == "geometric/b" and deps.sites[0].from_traces
    assert deps.parents("geometric/geometric/b") == {"geometric/b"}
    assert m.graph().graph["from_traces"]


def test_while_on_random_values_falls_back_to_traces():
    m = ppl.model("""
def m():
    n = 0
    go ~ flip(0.5)
    while go:
        n = n + 1
        go ~ flip(0.5)
    return n
""")
    deps = analyse(m)
    assert deps.from_traces and "while" in deps.reason
    assert "go" in deps and "go[0]" in deps and "go[1]" in deps
    assert deps.parents("go[1]") >= {"go", "go[0]"}


def test_unknown_name_is_an_error_with_the_names_as_hint():
    m = ppl.model(CHAIN)
    with pytest.raises(ppl.PPLError) as err:
        m.independent("a", "q")
    assert "no site named 'q'" in str(err.value)
    assert "a, b, c" in str(err.value.hint)
    with pytest.raises(ppl.PPLError, match="did you mean 'c'"):
        m.markov_blanket("cc")


# -------------------------------------------------------------------- random programs
@settings(SETTINGS, max_examples=45)
@given(finite_programs(factors=True))
def test_sites_and_parents_cover_every_path(src):
    m = ppl.model(src)
    deps = analyse(m)
    assert not deps.from_traces, deps.reason
    paths = _all_paths(m, deps)
    for h in paths:
        assert not [a for a in h.behaviour if a.startswith("unknown:")], f"{list(h.behaviour)}\n{src}"
    for s in deps.sites:
        if s.static:
            assert all(s.address in h.behaviour for h in paths), f"{s.address} is not on every path\n{src}"
        seen = {}
        for h in paths:
            key = tuple(h.choices.get(p) for p in sorted(s.parents))
            what = h.behaviour.get(s.address, "absent")
            assert seen.setdefault(key, what) == what, \
                f"{s.address} changes with a choice outside its parents {sorted(s.parents)}\n{src}"


@settings(SETTINGS, max_examples=35)
@given(finite_programs(factors=False))
def test_d_separation_implies_exact_independence(src):
    m = ppl.model(src)
    deps = analyse(m)
    g = build_graph(deps)
    choices = [n for n, k in g.nodes(data="kind") if k == "choice"]
    posterior = [(h.weight, h.choices) for h in _all_paths(m, deps)]
    assert sum(w for w, _ in posterior) == m.enumerate().evidence  # the same measure as the exact semantics
    for a, b in itertools.combinations(choices, 2):
        for zs in [()] + [(z,) for z in choices if z not in (a, b)]:
            if d_separated(g, {a}, {b}, set(zs)):
                assert _posterior_factorises(posterior, a, b, zs), f"{a} _||_ {b} | {zs} is wrong\n{src}"


# ------------------------------------------------------------------------------ drawing
def test_draw_graphs_example_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    ns = runpy.run_path(str(ROOT / "examples/draw_graphs.py"))
    written = ns["main"](tmp_path)
    assert {p.name for p in written} == {"eight_schools.png", "twisted_hmm.png", "hmm_unrolled.png"}
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_an_error_on_a_branch_never_taken_falls_back_to_traces():
    m = ppl.model("""
def m(xs):
    k ~ categorical([1, 1])
    if k > 5:
        y ~ normal(xs[10], 1)
    return k
""")
    deps = analyse(m, {"xs": [1.0, 2.0]})
    assert deps.from_traces and "fails in the analysis" in deps.reason
    assert deps.addresses == ("k",)


def test_a_data_error_is_the_models_located_error():
    m = ppl.model("""
def m(xs):
    k ~ flip(0.5)
    y ~ normal(xs[10], 1)
    return k
""")
    with pytest.raises(ppl.PPLError) as err:
        analyse(m, {"xs": [1.0, 2.0]})
    assert err.value.span is not None and err.value.span.line == 4


def test_draw_without_matplotlib_is_an_error_that_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ppl.PPLError, match="needs matplotlib") as err:
        ppl.model(CHAIN).draw()
    assert "pip install matplotlib" in err.value.hint


EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.ppl"))
FROM_TRACES = {"dice": "while", "geometric": "recursion",
               "rsa": "memoised call"}  # rsa: S1(state) is memoised on a random state


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_is_analysed_with_the_interpreters_addresses(name):
    import json
    m = ppl.model(str(ROOT / f"examples/{name}.ppl"))
    path = ROOT / f"examples/{name}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data = {k: v for k, v in data.items() if k in m.params}
    deps = analyse(m, data)
    assert deps.from_traces == (name in FROM_TRACES), deps.reason
    if deps.from_traces:
        assert FROM_TRACES[name] in deps.reason
        return
    r = m.prior(particles=64, seed=0, **data)
    sampled = {k for k in r.sites if k != "return"}
    assert sampled <= set(deps.choices)
    assert {s.address for s in deps.sites if s.kind == "choice" and s.static} <= sampled


def test_deterministic_values_are_nodes_of_their_own():
    m = ppl.model("""
def m():
    x ~ normal(0, 1)
    x = x + 1
    observe 0.0 ~ normal(x, 1)
    return x
""")
    g = m.graph(deterministic=True)
    assert g.nodes["value:x"]["kind"] == "deterministic" and g.nodes["x"]["kind"] == "choice"
    assert ("x", "value:x") in g.edges and ("x", "obs@5:5") in g.edges


def test_eight_schools_vectorised_sites_have_shapes():
    import json
    m = ppl.model(str(ROOT / "examples/eight_schools.ppl"))
    data = json.loads((ROOT / "examples/eight_schools.json").read_text())
    g = m.graph(data)
    assert g.nodes["theta_tilde"]["shape"] == (8,) and g.nodes["mu"]["shape"] == ()
    assert set(g.predecessors("obs@48:5")) == {"mu", "tau", "theta_tilde", "data:y", "data:sigma"}
    assert m.independent("mu", "tau", data=data, observed=False) and not m.independent("mu", "tau", data=data)


# ------------------------------------------------------- memoised calls made on every path
_MEMO_HEAD = """
def m():
    f = mem(lambda i: sample(flip(0.5)))
    g = mem(lambda i: f(i) or f(i + 1))
    a ~ flip(0.5)
"""


def _early(body: str) -> str:
    """The model with ``body`` in a helper function ``h`` it returns the result of."""
    return _MEMO_HEAD + "    def h():\n" + "\n".join("        " + line for line in body.splitlines()) + \
        "\n    return h()\n"


@pytest.mark.parametrize("body, static, conditional", [
    # both branches of an `if` statement / an `x if c else y` call f(1): on every path
    ("    if a:\n        x = f(1)\n    else:\n        x = not f(1)\n    return x", ["f(1)/sample"], []),
    ("    return f(1) if a else f(1) and a", ["f(1)/sample"], []),
    # first called under a branch, then unconditionally
    ("    x = f(1) if a else False\n    return f(1) or x", ["f(1)/sample"], []),
    # one branch only; the right operand of `and`
    ("    return f(1) if a else False", [], ["f(1)/sample"]),
    ("    return a and f(1)", [], ["f(1)/sample"]),
    # g(1) on both branches calls f(1) on every path (the second call of g is memoised);
    # f(2) is called by g only where f(1) is false
    ("    return g(1) if a else not g(1)", ["f(1)/sample"], ["f(2)/sample"]),
])
def test_memoised_sites_are_static_where_the_call_is_made_on_every_path(body, static, conditional):
    m = ppl.model(_MEMO_HEAD + body + "\n")
    deps = analyse(m)
    assert not deps.from_traces, deps.reason
    r = m.run("enumerate", strategy="paths")  # no conditions: presence 1 <=> on every path
    for addr in static:
        assert deps.site(addr).static and r.presence(addr) == 1
    for addr in conditional:
        assert not deps.site(addr).static and r.presence(addr) < 1
    for s in deps.sites:  # the analysis never calls a site static that is missing on a path
        assert not s.static or r.presence(s.address) == 1, s.address


def test_a_memoised_call_after_an_early_return_on_some_paths_is_conditional():
    m = ppl.model(_early("if a:\n    return True\nreturn f(1)"))
    deps = analyse(m)
    assert not deps.site("f(1)/sample").static
    assert m.run("enumerate", strategy="paths").presence("f(1)/sample") == Fraction(1, 2)
    m = ppl.model(_early("if a:\n    x = f(1)\n    return x\nreturn not f(1)"))  # called before both returns
    assert analyse(m).site("f(1)/sample").static
