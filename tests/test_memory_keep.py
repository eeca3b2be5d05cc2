"""SMC memory that does not grow with the path length (issue 10, item 7).

* ``keep=[...]`` keeps only the sites named (``"return"`` for the return value); the
  kept sites are exactly what a full run gives with the same seed.
* The lineage frees the ancestor arrays that no live value needs (compaction), so a
  filter that keeps only current values holds a bounded number of them, however long
  its path; values still follow resampling exactly (the other SMC tests check that too).
* ``keep`` left out (the ``smc`` method; ``keep="auto"`` of ``inference.smc.smc``):
  every site for small runs; past ``trace.KEEP_ALL_LIMIT`` recorded values, the return
  value and the last address of each choice name, and the result lists what it dropped
  (``extra["dropped_sites"]``).
* A name in ``keep`` that is not a site is an error with a did-you-mean.
"""
import pytest
import torch

import ppl
from ppl.inference.smc import smc
from ppl.semantics import trace as trace_module
from ppl.semantics.errors import PPLError, PPLRuntimeError
from ppl.semantics.values import Lineage
from ppl.stdlib import rng

torch.set_num_threads(1)

SSM = """
def ssm(ys):
    x ~ normal(0, 1)
    for t in range(len(ys)):
        x ~ normal(0.9 * x, 1)
        observe ys[t] ~ normal(x, 1)
    return x
"""


def _ys(T: int) -> torch.Tensor:
    return torch.sin(torch.arange(T, dtype=torch.float32) / 5)


def _run(T: int, N: int, seed: int = 0, **options):
    model = ppl.model(SSM)
    data = model.prepare_data(model.bind((), {"ys": _ys(T)}), "cpu")
    with rng.run(seed):
        return smc(model.interpreter(), "ssm", data, N, "cpu", **options)


def test_keep_return_gives_the_full_runs_return_value_and_weights():
    full, lw_full, _ = _run(30, 200, keep="all")
    kept, lw_kept, _ = _run(30, 200, keep=["return"])
    assert set(full) == {"return", "x", *(f"x[{t}]" for t in range(30))}
    assert list(kept) == ["return"]
    assert torch.equal(kept["return"][0], full["return"][0])
    assert torch.equal(lw_kept, lw_full)


def test_keep_named_sites_are_the_full_runs_values():
    full, _, _ = _run(20, 100, keep="all")
    kept, _, _ = _run(20, 100, keep=["x[3]", "x"])
    assert set(kept) == {"x[3]", "x"}  # no "return": it was not asked for
    for name in kept:
        assert torch.equal(kept[name][0], full[name][0])


def test_model_run_keep_return_same_posterior_as_a_full_run():
    model = ppl.model(SSM)
    data = {"ys": _ys(15)}
    full = model.run("smc", data, particles=300, seed=3)
    kept = model.run("smc", data, particles=300, seed=3, keep=["return"])
    assert set(kept.samples) == {"return"}
    assert torch.equal(kept.samples["return"], full.samples["return"])
    assert torch.equal(kept.weights, full.weights)
    assert kept.mean() == full.mean() and kept.log_evidence == full.log_evidence
    assert "dropped_sites" not in kept.extra  # asked for: nothing dropped behind the user's back


def _retained_during(monkeypatch, T: int, **options) -> tuple[list[int], list[int]]:
    """Run the SSM with T steps, N = 10^4; per resampling: (ancestor arrays held,
    bytes they hold)."""
    counts, sizes = [], []
    resample = Lineage.resample

    def recording(self, ancestors):
        resample(self, ancestors)
        held = [a for a in self.ancestors if a is not None]
        counts.append(len(held))
        sizes.append(sum(a.numel() * a.element_size() for a in held))

    monkeypatch.setattr(Lineage, "resample", recording)
    sites, _, h = _run(T, 10_000, **options)
    assert len(counts) == T  # one resampling per observation
    return counts, sizes, h


def test_memory_of_keep_return_does_not_grow_with_the_path(monkeypatch):
    counts, sizes, h = _retained_during(monkeypatch, 200, keep=["return"])
    assert max(counts) <= 2 and counts[-1] == h.lineage.retained == 1
    assert max(sizes) <= 2 * 10_000 * 8
    assert h.trace.parts == {}  # the trace holds no value
    # the same bound at a quarter of the length: nothing grows with T
    short, _, _ = _retained_during(monkeypatch, 50, keep=["return"])
    assert max(short) == max(counts)


def test_a_full_run_keeps_every_ancestor_array_its_values_need(monkeypatch):
    counts, _, h = _retained_during(monkeypatch, 40, keep="all")
    assert counts == list(range(1, 41))  # x (epoch 0) is alive: every array is needed


def test_keep_left_out_keeps_everything_in_small_runs():
    sites, _, h = _run(10, 50, keep="auto")
    assert set(sites) == {"return", "x", *(f"x[{t}]" for t in range(10))}
    assert h.trace.dropped == []
    res = ppl.model(SSM).run("smc", {"ys": _ys(10)}, particles=50, seed=0)
    assert set(res.samples) == set(sites) and "dropped_sites" not in res.extra


def test_the_interpreter_entry_point_keeps_every_site_by_default(monkeypatch):
    """``inference.smc.smc`` (used by pmmh, smc_steer, guided SMC) keeps what it kept."""
    monkeypatch.setattr(trace_module, "KEEP_ALL_LIMIT", 10)
    sites, _, h = _run(10, 50)
    assert len(sites) == 12 and h.trace.dropped == []


def test_keep_left_out_past_the_limit_keeps_the_return_and_last_value(monkeypatch):
    full, lw_full, _ = _run(30, 100, keep="all")
    monkeypatch.setattr(trace_module, "KEEP_ALL_LIMIT", 100 * 10)  # past x, x[0..8]
    sites, lw, h = _run(30, 100, keep="auto")
    assert set(sites) == {"return", "x[29]"}
    assert h.trace.dropped == ["x", *(f"x[{t}]" for t in range(29))]
    assert torch.equal(sites["x[29]"][0], full["x[29]"][0])
    assert torch.equal(sites["return"][0], full["return"][0]) and torch.equal(lw, lw_full)
    assert h.lineage.retained == 1  # the dropped values freed their ancestor arrays


def test_model_run_records_the_sites_the_default_rule_dropped(monkeypatch):
    monkeypatch.setattr(trace_module, "KEEP_ALL_LIMIT", 50 * 5)
    res = ppl.model(SSM).run("smc", {"ys": _ys(12)}, particles=50, seed=0)
    assert set(res.samples) == {"return", "x[11]"}
    assert res.extra["dropped_sites"] == ["x", *(f"x[{t}]" for t in range(11))]
    # never silent: the summary says sites were left out, and asking for one says how to keep it
    assert "12 earlier sites of this long run were not kept" in res.summary()
    with pytest.raises(ppl.PPLError) as e:
        res.mean("x[3]")
    assert "was not kept" in str(e.value) and "keep=['x[3]'" in str(e.value)


def test_choice_names_strip_loop_indices_and_call_counters():
    assert trace_module.choice_name("x[3]") == "x"
    assert trace_module.choice_name("f#2/g/x[3][1]") == "f/g/x"
    assert trace_module.choice_name("strength(alice)/sample") == "strength(alice)/sample"


def test_an_unknown_name_in_keep_is_an_error_with_a_did_you_mean():
    with pytest.raises(PPLRuntimeError) as e:
        _run(5, 20, keep=["return", "x[7]"])
    assert "x[7]" in e.value.message and "not a site" in e.value.message
    assert "did you mean 'x[" in e.value.hint
    with pytest.raises(PPLRuntimeError) as e:
        _run(5, 20, keep=["retrun"])
    assert e.value.hint == "did you mean 'return'?"


def test_keep_must_be_names():
    with pytest.raises(PPLError, match="keep must be a list of site names"):
        _run(5, 20, keep=[3])


PINNED = """
def pinned(ys):
    c ~ flip(0.5)
    if c:
        z ~ normal(0, 1)
        w = "low"
    else:
        z ~ normal(3, 1)
        w = "none"
    x ~ normal(0, 1)
    for t in range(len(ys)):
        x ~ normal(0.9 * x, 1)
        observe ys[t] ~ normal(x + z, 1)
    return [z, x, w]
"""


def test_a_value_made_before_the_path_still_follows_resampling_exactly(monkeypatch):
    """z (drawn by two particle subsets) and w (one Python object per particle) live in
    the frame from epoch 0 to the end: compaction must keep every ancestor array they
    need, and keep=["return"] answers exactly what the full run does."""
    model = ppl.model(PINNED)
    data = model.prepare_data(model.bind((), {"ys": _ys(25)}), "cpu")
    counts = []
    resample = Lineage.resample

    def recording(self, ancestors):
        resample(self, ancestors)
        counts.append(self.retained)

    monkeypatch.setattr(Lineage, "resample", recording)
    runs = {}
    for keep in ("all", ["return"]):
        counts.clear()
        with rng.run(5):
            runs[str(keep)] = smc(model.interpreter(), "pinned", data, 300, "cpu", keep=keep)
        assert counts == list(range(1, 26))  # z and w pin epoch 0 in both runs
    full, kept = runs["all"], runs["['return']"]
    assert list(kept[0]) == ["return"]
    assert kept[0]["return"][0] == full[0]["return"][0]
    assert torch.equal(kept[1], full[1])
    # and the full run's own z agrees with its return value, particle by particle
    z = full[0]["z"][0]
    assert [r[0] for r in full[0]["return"][0]] == z.tolist()


def test_the_did_you_mean_also_knows_the_last_addresses_of_a_long_path(monkeypatch):
    monkeypatch.setattr(trace_module, "_SEEN_LIMIT", 3)  # remembers x, x[0], x[1] and the last x[...]
    with pytest.raises(PPLRuntimeError) as e:
        _run(30, 10, keep=["x[290]"])  # x[0] or x[1] would be a worse guess
    assert e.value.hint == "did you mean 'x[29]'?"
