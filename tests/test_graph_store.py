"""The potential's recorded graph kept on disk (``inference.graph_store``): a later build of the
same program on the same data loads it instead of recording it through the interpreter
(issue 11: the fixed setup of a NUTS run), without changing a seeded draw; anything the graph
is a function of changes the key; a stored graph that disagrees with the interpreter is
recorded afresh; what is stored is data (ATen operator names and tensors), never code.

Counts, not timings: ``potential.RECORDINGS`` counts the graphs recorded through the
interpreter; a subprocess checks that a run that loads its graph never imports Dynamo or
Inductor (~1 s CPU each, most of the setup of a short run)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ppl
from ppl.inference import graph_store
from ppl.inference import potential as potential_module
from ppl.inference.mh import initial_state
from ppl.inference.randomness import TorchRandomness
from ppl.semantics.gfi import ModelRun

torch.set_num_threads(1)

SOURCE = """
def model(ys, scale):
    mu ~ normal(0, scale)
    sigma ~ half_normal(2)
    for y in ys:
        observe y ~ normal(mu, sigma)
    return mu
"""
DATA = {"ys": [0.3, 1.2, -0.4, 0.8, 2.1], "scale": 10.0}
RUN = dict(particles=2, samples=15, burn_in=15, seed=3, compile=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory (the store lives under Inductor's) and the store on."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setitem(graph_store.ENABLED, "on", True)
    return tmp_path / "inductor" / "ppl_graphs"


def _potential(source=SOURCE, data=DATA, chains=2, traced=True):
    m = ppl.model(source)
    interp, data = m.interpreter(), m.bind((), data)
    with ppl.api.seeded(0, "cpu"):
        state = initial_state(interp, m.entry, data, chains, "cpu", TorchRandomness())
    return potential_module.build_potential(ModelRun(interp, m.entry, data, "cpu"), state, traced=traced)


def _untraced(source=SOURCE, data=DATA, chains=2):
    """A potential that is not traced (what the key reads: the program, data, layout)."""
    return _potential(source, data, chains, traced=False)


def _recordings():
    return potential_module.RECORDINGS["count"]


def test_a_second_build_loads_the_graph_instead_of_recording_it(cache):
    before = _recordings()
    first = _potential()
    assert first.traced and _recordings() == before + 1 and len(list(cache.iterdir())) == 1
    second = _potential()
    assert second.traced and _recordings() == before + 1  # loaded, not recorded
    assert second._aten.code == first._aten.code
    z = torch.tensor([[0.4, -0.3], [1.1, 0.2]], dtype=torch.float64)
    for a, b in zip(first.value_and_grad(z), second.value_and_grad(z)):
        assert torch.equal(a, b)


def test_seeded_nuts_draws_are_the_same_recorded_or_loaded(cache, monkeypatch):
    m = ppl.model(SOURCE)
    before = _recordings()
    recorded = m.run("nuts", DATA, **RUN)
    loaded = m.run("nuts", DATA, **RUN)
    assert _recordings() == before + 1
    monkeypatch.setitem(graph_store.ENABLED, "on", False)
    unstored = m.run("nuts", DATA, **RUN)
    assert _recordings() == before + 2
    for site in ("mu", "sigma", "return"):
        assert torch.equal(torch.as_tensor(recorded.samples[site]), torch.as_tensor(loaded.samples[site]))
        assert torch.equal(torch.as_tensor(recorded.samples[site]), torch.as_tensor(unstored.samples[site]))


def test_the_key_changes_with_the_data_the_program_and_the_code(cache, monkeypatch):
    p = _untraced()
    base = graph_store.key(p)
    assert base is not None and graph_store.key(_untraced()) == base  # a rebuilt program: the same key
    assert graph_store.key(_untraced(data={**DATA, "scale": 10.000000001})) != base  # a constant in the graph
    assert graph_store.key(_untraced(data={**DATA, "ys": [0.3, 1.2, -0.4, 0.8, 2.2]})) != base
    assert graph_store.key(_untraced(SOURCE.replace("half_normal(2)", "half_normal(3)"))) != base
    assert graph_store.key(_untraced(chains=3)) != base
    monkeypatch.setattr(potential_module, "GROUP_OBSERVES", False)  # a flag that changes the graph
    assert graph_store.key(p) != base
    monkeypatch.setattr(potential_module, "GROUP_OBSERVES", True)
    assert graph_store.key(p) == base
    bijection = potential_module.support_bijection
    monkeypatch.setattr(potential_module, "support_bijection", lambda *a: bijection(*a))  # a function replaced
    assert graph_store.key(p) != base
    monkeypatch.setitem(graph_store.ENABLED, "on", False)
    assert graph_store.key(p) is None


def test_a_python_function_in_the_data_is_not_stored(cache):
    source = "def model(f, ys):\n    mu ~ normal(0, 1)\n    observe ys ~ normal(f(mu), 1)\n    return mu\n"
    p = _potential(source, {"f": ppl.python_function(lambda x: 2 * x), "ys": [0.5, 1.0]})
    assert p.traced and graph_store.key(p) is None
    assert not cache.exists() or not list(cache.iterdir())


def test_a_stored_graph_that_disagrees_with_the_interpreter_is_recorded_again(cache):
    other = _potential(data={**DATA, "ys": [5.0, 6.0, 7.0, 8.0, 9.0]})  # same shapes, other data
    p = _potential()
    key = graph_store.key(p)
    assert graph_store.save(key, other._aten)  # a wrong graph under p's key (a stale entry)
    before = _recordings()
    again = _potential()
    assert _recordings() == before + 1  # the wrong graph was refused and the program recorded
    z = torch.tensor([[0.4, -0.3], [1.1, 0.2]], dtype=torch.float64)
    assert torch.equal(again.value_and_grad(z)[0], p.value_and_grad(z)[0])
    assert not torch.allclose(again.value_and_grad(z)[0], other.value_and_grad(z)[0])
    assert graph_store.load(key).code == p._aten.code  # and stored in its place


def test_what_is_stored_is_data_and_other_targets_are_refused(cache):
    p = _potential()
    key = graph_store.key(p)
    stored = torch.load(cache / f"{key}.pt", weights_only=True)  # (no code can run while reading it)
    assert isinstance(stored["nodes"], str)  # (the nodes as one JSON text)
    data = graph_store._from_file(stored)
    targets = {t for op, _, t, _, _ in data["nodes"] if op == "call_function"}
    assert targets and all(t.startswith("aten::") or t == "operator.getitem" for t in targets)
    assert all(isinstance(v, torch.Tensor) for v in data["tensors"].values())
    forged = dict(data, nodes=[list(n) for n in data["nodes"]])
    call = next(n for n in forged["nodes"] if n[0] == "call_function")
    call[2] = "builtins.eval"
    with pytest.raises(Exception):
        graph_store.decode(forged)
    torch.save(graph_store._to_file(forged), cache / f"{key}.pt")
    assert graph_store.load(key) is None
    before = _recordings()
    assert _potential().traced and _recordings() == before + 1


LOADS_ONLY = textwrap.dedent("""
    import sys
    import ppl
    m = ppl.model({source!r})
    r = m.run("nuts", {data!r}, particles=2, samples=15, burn_in=15, seed=3, compile=False)
    from ppl.inference import potential
    print(potential.RECORDINGS["count"], "torch._dynamo" in sys.modules, "torch._inductor" in sys.modules)
""")


def test_a_run_that_loads_its_graph_imports_neither_dynamo_nor_inductor(cache):
    ppl.model(SOURCE).run("nuts", DATA, **RUN)  # stores the graph (this process)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", LOADS_ONLY.format(source=SOURCE, data=DATA)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["0", "False", "False"], out.stdout
