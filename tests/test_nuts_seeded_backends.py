"""A seeded NUTS run's draws depend only on the seed, the model, the data and the options
(issue 11, "reproducible seeds everywhere"): under ``compile="auto"`` which backend runs --
TorchScript or TorchInductor for the potential, the whole transition compiled or not -- is
decided from the graph and the run's options alone (``gradient_mcmc.compile_decision``,
``hmc._fuse_now``). It used to depend also on what Inductor's disk cache held (a graph or a
transition compiled before was used at once) and on timings (graph seconds measured over the
first iterations): the same seeded run gave other draws on a second run, or under load.

The backends are not bit-identical, so each test runs a stand-in "Inductor" that perturbs
the gradient in its last bits (a switch of backend changes the draws) and counts the builds
of the compiled transition (stubbed: a real one takes a minute of gcc). The old rules'
thresholds are lowered too (``raising=False``: they no longer exist) so that these short
runs cross them: the tests fail on a rule that reads them."""
import time

import pytest
import torch

import ppl
from ppl.inference import compiled, gradient_mcmc, hmc, nuts_loop
from ppl.inference import potential as potential_module

torch.set_num_threads(1)

SOURCE = """
def model(ys):
    mu ~ normal(0, 10)
    sigma ~ half_normal(2)
    observe ys ~ normal(mu, sigma)
    return mu
"""
DATA = {"ys": [0.3, 1.2, -0.4, 0.8, 2.1]}
RUN = dict(particles=2, samples=20, burn_in=20, seed=5)


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """A fresh cache; Inductor replaced by a perturbed TorchScript replay; the compiled
    transition's builds counted (none is built); the old tiers' thresholds lowered below
    this run's 40 iterations. Returns (Inductor compiles, transition builds, potentials)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    compiles, builds, potentials = [], [], []

    def replay(gm, example_inputs, backend="jit", **kwargs):
        if backend != "inductor":
            return compiled.replay(gm, example_inputs, backend, **kwargs)
        compiles.append(gm)
        graph = compiled.replay(gm, example_inputs, "jit")

        def perturbed(*args):
            logp, grad, ok = graph(*args)
            return logp, grad * (1 + 2.0 ** -40), ok
        return perturbed

    def build_potential(*args, **kwargs):
        potentials.append(build(*args, **kwargs))
        return potentials[-1]
    build = gradient_mcmc.build_potential
    monkeypatch.setattr(potential_module, "replay", replay)
    monkeypatch.setattr(gradient_mcmc, "build_potential", build_potential)
    monkeypatch.setattr(hmc, "_build_transition", lambda *a: builds.append(1))  # (None: the eager kernel)
    monkeypatch.setattr(hmc, "_fused_leaf", lambda *a: None)
    for module, name in ((gradient_mcmc, "CACHED_COMPILE_MIN_ITERATIONS"), (gradient_mcmc, "COMPILE_CHECK"),
                         (hmc, "LOOP_CACHED_MIN_ITERATIONS")):
        monkeypatch.setattr(module, name, 20, raising=False)
    return compiles, builds, potentials


def _draws(**options):
    res = ppl.compile_source(SOURCE).run("nuts", DATA, **RUN, **options)
    return torch.as_tensor(res.samples["mu"]), res.extra["compiled"]


def _same(a, b):
    assert a[1] == b[1], "another backend"
    assert torch.equal(a[0], b[0]), "other draws"


def _draws_as_if_compiled_before_or_not(monkeypatch) -> list:
    """``_draws()`` twice: with every ``compiled_before`` answering False (a cold cache), then
    True (the machine compiled the graph and the transition before)."""
    runs = []
    for before in (False, True):
        for module in (compiled, nuts_loop, potential_module):
            monkeypatch.setattr(module, "compiled_before", lambda *a, before=before, **k: before, raising=False)
        runs.append(_draws())
    return runs


@pytest.mark.parametrize("pays", [False, True])
def test_the_same_draws_whether_or_not_the_machine_compiled_the_graph_before(stand_ins, monkeypatch, pays):
    compiles, builds, _ = stand_ins
    if pays:  # the cost model says compile (every variant must then compile, at the start)
        monkeypatch.setattr(gradient_mcmc, "SAVED_PER_OP_ITERATION", 1.0)
    runs = _draws_as_if_compiled_before_or_not(monkeypatch)
    _same(*runs)
    assert runs[0][1] is pays and len(compiles) == 2 * pays and not builds


def test_the_same_draws_on_a_fast_or_a_slow_machine(stand_ins, monkeypatch):
    """The wall clock runs 10^6 times slower, then 10^6 times faster: graph seconds measured
    over the first iterations would say "compile" in one case and not in the other."""
    compiles, builds, _ = stand_ins
    runs, real = [], time.perf_counter
    for factor in (1e6, 1e-6):
        with monkeypatch.context() as clock:
            clock.setattr(time, "perf_counter", lambda f=factor: real() * f)
            runs.append(_draws())
    _same(*runs)
    assert not runs[0][1] and not compiles and not builds


def test_the_same_draws_twice_in_one_process_with_the_cache_filled_in_between(stand_ins):
    compiles, builds, potentials = stand_ins
    first = _draws()
    gm, example = potentials[-1]._recorded
    compiled._mark_compiled(gm, example(), True)  # the graph is now "compiled on this machine"
    assert compiled.compiled_before(gm, example())
    second = _draws()
    _same(first, second)
    assert not first[1] and not compiles and not builds


@pytest.mark.parametrize("pays", [False, True])
def test_the_compiled_transition_is_built_or_not_whatever_the_cache_holds(stand_ins, monkeypatch, pays):
    """``hmc._fuse_now``'s cost model (build cost vs transitions x saving) decides from the
    graph and the run alone: with a build priced so that it pays (or not) on this run of 40
    transitions, it is attempted once per run (or never) whether or not the machine compiled
    the graph or the transition before."""
    compiles, builds, _ = stand_ins
    monkeypatch.setattr(gradient_mcmc, "SAVED_PER_OP_ITERATION", 1.0)  # (the potential on "Inductor")
    monkeypatch.setattr(hmc, "LOOP_BUILD_FIXED", 0.0 if pays else 1e9)
    monkeypatch.setattr(hmc, "LOOP_BUILD_PER_OP", 0.0)
    runs = _draws_as_if_compiled_before_or_not(monkeypatch)
    _same(*runs)
    assert len(builds) == 2 * pays


# -- the compiled transition around the potential's own library (a build of a check only) --------

#: Stan's protocol, bench_nuts' default: 4 chains x 1000 warm-up x 1000 draws
DEFAULT_PROTOCOL = dict(particles=4, samples=1000, burn_in=1000, seed=5)


def test_a_natively_compiled_potential_makes_the_compiled_transition_pay_from_a_few_hundred_transitions():
    """``hmc._fuse_now``: built from scratch (the potential's graph compiled again, seconds of
    gcc) the compiled transition pays only past thousands of transitions; around the
    potential's own AOTInductor library (``native``) its build is a check, so Stan's 2,000
    transitions build it ("loop": the compiled transition only, no fused leaf) -- for eight
    schools' graph (164 operations) as for the small and the large graphs -- while a short run
    stays eager. Static: the same answer whatever the cache holds."""
    for ops in (40, 164, 2000):
        assert hmc._fuse_now(2000, ops, 4) is False  # (from scratch: not for Stan's protocol)
        assert hmc._fuse_now(2000, ops, 4, native=True) == "loop"
        assert hmc._fuse_now(2000, ops, 1, native=True) == "loop"
        assert hmc._fuse_now(40, ops, 2, native=True) is False  # (a test's short run: eager)
        assert hmc._fuse_now(10 ** 6, ops, 4, native=True) is True  # (pays even from scratch)
    assert hmc._fuse_now(10 ** 6, 0, 4, native=True) is False  # (no graph: nothing to build)
    even = hmc.loop_build_cost(164, native=True) / hmc.loop_saving(164, 4)
    assert 20 < even < 500  # (a few hundred transitions)


def _default_protocol_run(monkeypatch):
    """(draws of mu, the compiled transitions built: [(native?, the library's path)], the number
    of transitions they made) of the small model under the default protocol, compiled."""
    builds, calls = [], []
    build = nuts_loop.CompiledTransition.build.__func__

    def counted_build(cls, *args, native=None, **kwargs):
        built = build(cls, *args, native=native, **kwargs)
        builds.append((native is not None, None if native is None else native.path))
        return built
    call = nuts_loop.CompiledTransition.__call__

    def counted_call(self, *args, **kwargs):
        calls.append(1)
        return call(self, *args, **kwargs)
    many = nuts_loop.CompiledTransition.run_many

    def counted_many(self, *args):  # (the sampling phase: runs of transitions in C++)
        out = many(self, *args)
        calls.extend([1] * out[0])
        return out
    warm = nuts_loop.CompiledTransition.warm_up

    def counted_warm(self, *args):  # (the warm-up: runs of iterations in C++)
        out = warm(self, *args)
        calls.extend([1] * out[0])
        return out
    with monkeypatch.context() as m:
        m.setattr(nuts_loop.CompiledTransition, "build", classmethod(counted_build))
        m.setattr(nuts_loop.CompiledTransition, "__call__", counted_call)
        m.setattr(nuts_loop.CompiledTransition, "run_many", counted_many)
        m.setattr(nuts_loop.CompiledTransition, "warm_up", counted_warm)
        res = ppl.compile_source(SOURCE).run("nuts", DATA, compile=True, **DEFAULT_PROTOCOL)
    assert res.extra["compiled"]
    return torch.as_tensor(res.samples["mu"]), builds, len(calls)


def test_the_default_protocol_runs_the_compiled_transition_with_the_same_draws_cache_cold_or_warm(
        tmp_path, monkeypatch):
    """The small model under Stan's protocol, its potential compiled: the compiled transition is
    built around the potential's own library (no second compile) and makes every transition;
    the draws are bit-identical whether the library was loaded from the cache (the machine's
    cache, where the first run on a machine builds it) or compiled in this run (a fresh
    TorchInductor cache; its compile replaced by a copy of that library, so that the test takes
    seconds, not a minute of gcc)."""
    import shutil

    import torch._inductor
    warm, builds, calls = _default_protocol_run(monkeypatch)  # (the machine's cache: built once)
    assert [native for native, _ in builds] == [True] and calls == 2000
    library = builds[0][1]
    compiles = []

    def copy_of_the_library(gm, inputs, options=None):
        compiles.append(1)
        shutil.copyfile(library, options["aot_inductor.output_path"])
        return options["aot_inductor.output_path"]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(torch._inductor, "aot_compile", copy_of_the_library)
    cold, cold_builds, cold_calls = _default_protocol_run(monkeypatch)
    assert compiles == [1] and [native for native, _ in cold_builds] == [True] and cold_calls == 2000
    assert cold_builds[0][1].startswith(str(tmp_path))  # (the library the cold run compiled)
    assert torch.equal(cold, warm)


def test_compile_auto_counts_the_compiled_transition_a_native_potential_lets_nuts_run(monkeypatch):
    """``compile_decision`` for NUTS: a natively compiled potential also makes the compiled
    transition nearly free, so its saving per iteration (``hmc.loop_saving``) counts too --
    calendar regression's graph (118 operations) is compiled for Stan's 2,000 iterations with
    4 chains (it was not: 2,000 x 118 x 19 us < its compile cost), not for HMC, not where
    AOTInductor is off, never for a short run. Static: graph size, run length, chains."""
    from types import SimpleNamespace
    graph = SimpleNamespace(graph=SimpleNamespace(nodes=range(118)))
    assert gradient_mcmc.compile_decision(2000)(graph) is not None  # (the potential's saving alone)
    assert gradient_mcmc.compile_decision(2000, nuts_chains=4)(graph) is None
    assert gradient_mcmc.compile_decision(40, nuts_chains=4)(graph) is not None
    monkeypatch.setitem(compiled.NATIVE, "on", False)
    assert gradient_mcmc.compile_decision(2000, nuts_chains=4)(graph) is not None


def test_compile_auto_counts_the_deeper_trees_nuts_makes_in_more_dimensions():
    """NUTS's evaluations per iteration grow with the potential's dimension
    (``gradient_mcmc.nuts_evaluations_per_iteration``: ~6 sqrt(D) for 4 chains). A 60-step
    stochastic-volatility model (2,687 operations, 63 dimensions, ~45 evaluations an
    iteration) at 100 + 100 iterations ran 50 s on TorchScript: the rule counted its
    iterations as a median model's (~13 evaluations) and declined a ~25 s compile. Now that
    graph compiles there; the same graph in 3 dimensions does not, nor at 40 iterations.
    Static: graph size, dimension, run length, chains."""
    from types import SimpleNamespace
    graph = SimpleNamespace(graph=SimpleNamespace(nodes=range(2687)))
    assert gradient_mcmc.compile_decision(200, nuts_chains=4)(graph, dims=63) is None
    why = gradient_mcmc.compile_decision(200, nuts_chains=4)(graph, dims=3)
    assert why is not None and "cost ~25 s and save ~9 s" in why and "200 iterations" in why
    assert gradient_mcmc.compile_decision(40, nuts_chains=4)(graph, dims=63) is not None
    evaluations = gradient_mcmc.nuts_evaluations_per_iteration
    assert evaluations(63, 4) == pytest.approx(6 * 63 ** 0.5)
    assert evaluations(63, 16) > evaluations(63, 4) > evaluations(63, 1) > evaluations(3, 1)


def test_the_compile_rule_is_given_the_potentials_dimension():
    """``build_potential`` hands a compile rule the potential's dimension with the graph
    (what NUTS's evaluation estimate reads): mu and sigma, 2 dimensions."""
    from ppl.inference.mh import initial_state
    from ppl.inference.randomness import TorchRandomness
    from ppl.semantics.gfi import ModelRun
    m = ppl.compile_source(SOURCE)
    interp, data = m.interpreter(), m.prepare_data(m.bind((), DATA), "cpu")
    with ppl.api.seeded(0, "cpu"):
        state = initial_state(interp, m.entry, data, 2, "cpu", TorchRandomness())
    seen = []

    def rule(graph, dims):
        seen.append((len(graph.graph.nodes) > 0, dims))
        return "not compiled (test)"
    p = potential_module.build_potential(ModelRun(interp, m.entry, data, "cpu"), state, compile=rule)
    assert seen == [(True, 2)] and p.traced and not p.compiled and p.why_not_compiled == "not compiled (test)"
