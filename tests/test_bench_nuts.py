"""Smoke tests of the NUTS benchmark's harness (bench/bench_nuts.py): its figures are
computed as its docstring says, a missing contender is reported as missing (never a
number), and its children read the models of bench/nuts_models.py. No NumPyro/Pyro run
here (each costs seconds of JAX compilation): the run itself is `bench/run.py --only
bench_nuts --quick`."""
from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import bench_nuts  # noqa: E402
from bench_nuts import BenchModel, CompileTimer, Protocol  # noqa: E402


class FakeSpec:
    """A one-site model: column "x" only (no return column)."""

    name = "fake"
    sites = {"x": ()}

    def column_names(self):
        return ["x", "return"]


def fake_model(reference=None):
    return BenchModel(FakeSpec(), reference, "test")


def test_min_bulk_ess_matches_pyro_on_each_column():
    from pyro.ops.stats import effective_sample_size
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 300, generator=g, dtype=torch.float64)
    b = torch.cumsum(torch.randn(4, 300, generator=g, dtype=torch.float64), 1) * 0.1 + a  # autocorrelated
    ess, column = bench_nuts.min_bulk_ess({"a": a.numpy(), "b": b.numpy()}, ["a", "b"])
    expected = float(effective_sample_size(b, chain_dim=0, sample_dim=1))
    assert column == "b"
    assert ess == pytest.approx(expected, rel=1e-9)


def test_posterior_errors_in_reference_sds():
    ref = {"x": (1.0, 2.0), "y": (0.0, 0.5)}
    out = bench_nuts.posterior_errors({"x": 2.0, "y": 0.1}, {"x": 2.0, "y": 1.0}, ref)
    assert out["mean_err"] == pytest.approx(0.5) and out["mean_err_site"] == "x"
    assert out["sd_err"] == pytest.approx(1.0) and out["sd_err_site"] == "y"
    assert bench_nuts.posterior_errors({}, {}, None)["mean_err"] is None


def test_compile_timer_counts_nested_spans_once():
    ticks = iter([10.0, 13.0, 20.0, 21.0])
    t = CompileTimer(lambda: next(ticks))
    ev = bench_nuts.JAX_COMPILE_EVENTS
    t.on_start(ev[0], 0.0)          # outer span starts at 10
    t.on_start(ev[2], 0.0)          # nested: no clock read
    t.on_end(ev[2], 0.0, 1.0)
    t.on_end(ev[0], 0.0, 2.0)       # outer ends at 13: 3 s
    t.on_start("/jax/other", 0.0)   # not a compile event: ignored
    t.on_start(ev[1], 0.0)          # 20 .. 21: 1 s
    t.on_end(ev[1], 0.0, 1.0)
    assert t.take() == pytest.approx(4.0)
    assert t.take() == 0.0


def test_ratios_pass_fail_and_missing_contender():
    summary = {"ppl nuts": {"rate_incl": 100.0, "rate_excl": None},
               "pyro nuts": {"rate_incl": 5.0, "rate_excl": 10.0},
               "numpyro (compile counted)": {"rate_incl": 200.0, "rate_excl": 50.0}}
    r = bench_nuts.ratios(summary, {})
    assert r["pyro nuts"]["rate_incl"] == {"ratio": 20.0, "verdict": "PASS"}
    assert r["numpyro (compile counted)"]["rate_incl"] == {"ratio": 0.5, "verdict": "FAIL"}
    assert r["pyro nuts"]["rate_excl"]["ratio"] is None  # ppl nuts gave no sampling time: no number
    assert r["numpyro (compile excluded)"]["rate_incl"]["ratio"] is None
    missing = bench_nuts.ratios({"pyro nuts": {"rate_incl": 5.0}}, {"ppl nuts": "not available: x"})
    assert missing["pyro nuts"]["rate_incl"] == {"ratio": None, "verdict": "n/a (not available: x)"}
    failed = bench_nuts.ratios({"pyro nuts": {"rate_incl": 5.0}}, {"ppl nuts": None})  # ran, but no result
    assert failed["pyro nuts"]["rate_incl"] == {"ratio": None, "verdict": "n/a (ppl nuts has no result)"}


def test_unavailable_contender_is_printed_as_such(capsys):
    result = {"summary": {}, "errors": {}, "ratios": bench_nuts.ratios({}, {"ppl nuts": "not available: why"})}
    bench_nuts.print_model(fake_model(), result, {"ppl nuts": "not available: why"}, Protocol(2, 10, 10), "cpu")
    out = capsys.readouterr().out
    assert "ppl nuts                    not available: why" in out
    assert "PASS" not in out and "FAIL" not in out


def test_numpyro_rows_subtract_compile_time():
    g = np.random.default_rng(0)
    a, b = g.normal(size=(2, 100)), g.normal(size=(2, 100))
    info = {"total": 10.0, "compile_total": 8.0, "sampling": 5.0, "compile_sampling": 4.0,
            "draws": {"a/x": a, "a/return": a, "b/x": b, "b/return": b}}
    rows = bench_nuts.numpyro_figures(info, fake_model())
    counted, excluded = rows["numpyro (compile counted)"], rows["numpyro (compile excluded)"]
    ess_a, _ = bench_nuts.min_bulk_ess({"x": a}, ["x"])
    ess_b, _ = bench_nuts.min_bulk_ess({"x": b}, ["x"])
    assert counted["rate_incl"] == pytest.approx(ess_a / 10.0)
    assert counted["rate_excl"] == pytest.approx(ess_b / 5.0)
    assert excluded["rate_incl"] == pytest.approx(ess_a / 2.0)
    assert excluded["rate_excl"] == pytest.approx(ess_b / 1.0)


def test_tempering_child_and_its_ess_bound():
    """The tempering child runs on a real model of bench/nuts_models.py in-process; its
    "ESS" is min(Kish ESS, distinct values) of the latent columns, at most the particles."""
    model = bench_nuts.model_by_name("eight_schools")
    info, draws = bench_nuts.child_ppl_tempering(model, Protocol(chains=2, warmup=0, samples=50), 1,
                                                 time.process_time)
    info["draws"] = draws
    row = bench_nuts.tempering_figures(info, model)
    assert set(model.latent) <= set(draws)
    assert row["min_ess"] == min(min(info["kish_ess"], info["distinct"][c]) for c in model.latent)
    assert 1 <= row["min_ess"] <= 100
    assert math.isfinite(row["rate_incl"]) and row["rate_incl"] == row["rate_excl"]
