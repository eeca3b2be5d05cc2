"""Tests of ppl.result: WeightedResult and ExactResult built from synthetic data with
known answers (weights chosen so that every statistic is exactly computable)."""
from __future__ import annotations

import json
import math
from fractions import Fraction as F

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ppl.result import ExactResult, Site, WeightedResult  # noqa: E402
from ppl.semantics.errors import PPLError, ZeroEvidenceError  # noqa: E402

STAT_KEYS = {"mean", "sd", "q05", "q50", "q95"}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def lw_of(ws):
    """Log weights (float64) proportional to ws."""
    return torch.log(torch.tensor(ws, dtype=torch.float64))


@pytest.fixture
def weighted():
    # normalised weights .1 .2 .3 .4 (times 10 so that log evidence = log(10/4) ... see test)
    return WeightedResult(
        "importance",
        {
            "return": Site(torch.tensor([1.0, 2.0, 3.0, 4.0])),
            "b": Site(torch.tensor([True, False, True, True])),
            "k": Site(torch.tensor([0, 1, 1, 2])),
            "s": Site(["heads", "tails", "heads", "tails"]),
            "v": Site(torch.tensor([[0.5, 10.0], [1.5, 20.0], [2.5, 30.0], [3.5, 40.0]])),
            "t": Site([(1, 2), (1, 2), (3, 4), (1, 2)]),
            "y": Site(torch.tensor([10.5, float("nan"), 20.5, float("nan")]),
                      present=torch.tensor([True, False, True, False])),
            "g/inner": Site(torch.tensor([0.25, 0.5, 0.75, 1.25])),
        },
        lw_of([1.0, 2.0, 3.0, 4.0]),
        extra={"note": "synthetic"},
    )


# ------------------------------------------------------------------ WeightedResult basics


def test_weighted_attributes(weighted):
    r = weighted
    assert r.method == "importance"
    assert r.n == 4
    assert torch.allclose(r.weights, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    assert float(r.weights.sum()) == pytest.approx(1.0)
    assert r.log_evidence == pytest.approx(math.log(10 / 4))
    assert r.ess == pytest.approx(1 / 0.3)
    assert r.names == ["return", "b", "k", "s", "v", "t", "y", "g/inner"]
    assert r.samples["s"] == ["heads", "tails", "heads", "tails"]
    assert r.samples["return"] is r.sites["return"].value
    assert r.extra == {"note": "synthetic"}


def test_weighted_scalar_stats(weighted):
    r = weighted
    assert isinstance(r.mean(), float)
    assert r.mean() == pytest.approx(3.0)
    assert r.var() == pytest.approx(1.0)  # E[x^2] = 10, mean^2 = 9
    assert r.sd() == pytest.approx(1.0)
    # cumulative weights .1 .3 .6 1.0: smallest value whose cumulative weight >= q
    assert r.quantile(0.0) == 1.0
    assert r.quantile(0.1) == 1.0
    assert r.quantile(0.1001) == 2.0
    assert r.quantile(0.3) == 2.0
    assert r.quantile(0.5) == 3.0
    assert r.quantile(0.6) == 3.0
    assert r.quantile(0.61) == 4.0
    assert r.quantile(1.0) == 4.0
    assert r.quantile([0.05, 0.5, 0.95]) == [1.0, 3.0, 4.0]
    assert r.quantile(torch.tensor([0.5, 0.95])) == [3.0, 4.0]


def test_weighted_bool_and_int_sites(weighted):
    r = weighted
    assert r.mean("b") == pytest.approx(0.8)  # booleans count as 0/1
    assert r.var("b") == pytest.approx(0.16)
    assert r.quantile(0.1, "b") == 0 and r.quantile(0.5, "b") == 1
    assert r.is_discrete("b")
    m = r.marginal("b")
    assert set(m) == {True, False}
    assert m[True] == pytest.approx(0.8) and m[False] == pytest.approx(0.2)
    assert r.probs("b") == m
    # integer site: weights .1 / .5 / .4
    assert r.mean("k") == pytest.approx(0.5 + 0.8)
    mk = r.marginal("k")
    assert list(mk) == [0, 1, 2] and all(type(k) is int for k in mk)
    assert [mk[0], mk[1], mk[2]] == pytest.approx([0.1, 0.5, 0.4])
    assert r.quantile(0.5, "k") == 1 and isinstance(r.quantile(0.5, "k"), int)


def test_weighted_string_site(weighted):
    r = weighted
    assert r.is_discrete("s")
    m = r.marginal("s")
    assert m == pytest.approx({"heads": 0.4, "tails": 0.6})
    for stat in (r.mean, r.var, r.sd):
        with pytest.raises(PPLError, match="non-numeric"):
            stat("s")
    with pytest.raises(PPLError):
        r.quantile(0.5, "s")


def test_weighted_vector_site(weighted):
    r = weighted
    mean = r.mean("v")
    assert isinstance(mean, torch.Tensor) and mean.shape == (2,)
    assert torch.allclose(mean, torch.tensor([2.5, 30.0], dtype=torch.float64))
    assert torch.allclose(r.var("v"), torch.tensor([1.0, 100.0], dtype=torch.float64))
    assert torch.allclose(r.sd("v"), torch.tensor([1.0, 10.0], dtype=torch.float64))
    assert torch.equal(r.quantile(0.5, "v"), torch.tensor([2.5, 30.0]))
    assert torch.equal(r.quantile(0.05, "v"), torch.tensor([0.5, 10.0]))
    # few distinct float values, each shared by fewer than 2 particles: continuous
    assert not r.is_discrete("v")
    with pytest.raises(PPLError, match="continuous"):
        r.marginal("v")


def test_weighted_tuple_list_site(weighted):
    r = weighted
    m = r.marginal("t")
    assert m == pytest.approx({(1, 2): 0.7, (3, 4): 0.3})
    assert all(isinstance(k, tuple) for k in m)
    assert torch.allclose(r.mean("t"), torch.tensor([1.6, 2.6], dtype=torch.float64))
    assert torch.equal(r.quantile(0.5, "t"), torch.tensor([1, 2]))


def test_weighted_present_mask_is_conditional(weighted):
    r = weighted
    # present in particles 0 and 2 (weights .1, .3) -> renormalised .25, .75
    assert r.presence("y") == pytest.approx(0.4)
    assert r.presence("return") == 1.0
    assert r.mean("y") == pytest.approx(0.25 * 10.5 + 0.75 * 20.5)
    assert r.var("y") == pytest.approx(0.25 * 0.75 * 100)
    assert r.quantile(0.25, "y") == 10.5 and r.quantile(0.26, "y") == 20.5
    assert not math.isnan(r.sd("y"))


def test_present_mask_on_list_site_and_nowhere():
    r = WeightedResult(
        "importance",
        {"return": Site(torch.zeros(3)),
         "c": Site(["a", None, "b"], present=torch.tensor([True, False, True])),
         "z": Site(torch.tensor([1.5, 2.5, 3.5]), present=torch.tensor([False, True, False]))},
        torch.tensor([0.0, float("-inf"), math.log(3.0)], dtype=torch.float64),
    )
    assert r.marginal("c") == pytest.approx({"a": 0.25, "b": 0.75})
    assert r.presence("c") == pytest.approx(1.0)
    # "z" exists only in a zero-weight particle: undefined statistics, empty table
    assert r.presence("z") == 0.0
    assert math.isnan(r.mean("z")) and math.isnan(r.quantile(0.5, "z"))
    json.dumps(r.to_json())
    assert r.to_json()["posterior"]["z"]["mean"] is None
    assert "z" in r.summary()


def test_zero_weight_particles_are_ignored():
    r = WeightedResult("importance", {"return": Site(torch.tensor([-100.0, 1.0, 2.0]))},
                       torch.tensor([float("-inf"), 0.0, 0.0], dtype=torch.float64))
    assert r.quantile(0.0) == 1.0
    assert r.mean() == pytest.approx(1.5)
    assert r.log_evidence == pytest.approx(math.log(2 / 3))


def test_weighted_quantile_matches_reference():
    """Vectorised quantiles agree with a direct inverse-CDF over sorted values, ties included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 7, (200, 3), generator=g).double()
    lw = torch.randn(200, generator=g, dtype=torch.float64)
    r = WeightedResult("importance", {"return": Site(x)}, lw)
    w = r.weights.numpy()
    for q in [0.0, 0.05, 0.3, 0.5, 0.77, 0.95, 1.0]:
        got = r.quantile(q)
        for j in range(3):
            order = np.argsort(x[:, j].numpy(), kind="stable")
            cw = np.cumsum(w[order])
            ref = x[:, j].numpy()[order][min(np.searchsorted(cw, q - 1e-12), 199)]
            assert got[j].item() == ref
        assert np.allclose(r.mean().numpy(), (w[:, None] * x.numpy()).sum(0))


def test_continuous_and_discrete_float_detection():
    g = torch.Generator().manual_seed(1)
    n = 500
    r = WeightedResult(
        "importance",
        {"return": Site(torch.randn(n, generator=g)),
         "coin": Site(torch.bernoulli(torch.full((n,), 0.3), generator=g)),  # 0./1. floats
         "half": Site(torch.tensor([0.5, 1.5] * (n // 2))),
         "few": Site(torch.randn(3, generator=g).repeat(n // 3 + 1)[:n])},
        torch.zeros(n, dtype=torch.float64),
    )
    assert not r.is_discrete()
    with pytest.raises(PPLError, match="continuous") as err:
        r.marginal()
    assert err.value.hint
    assert r.is_discrete("coin") and set(r.marginal("coin")) <= {0.0, 1.0}
    assert r.marginal("half") == pytest.approx({0.5: 0.5, 1.5: 0.5})
    assert r.is_discrete("few")
    # a tiny population of continuous draws is not a table
    small = WeightedResult("importance", {"return": Site(torch.tensor([0.1, 0.7, 0.3]))}, torch.zeros(3))
    assert not small.is_discrete()


def test_weighted_to_json(weighted):
    j = weighted.to_json()
    text = json.dumps(j)
    assert json.loads(text) == j
    assert {"method", "log_evidence", "ess", "n", "posterior"} <= set(j)
    assert j["method"] == "importance" and j["n"] == 4
    assert j["ess"] == pytest.approx(1 / 0.3)
    post = j["posterior"]
    # "return" and the top-level sites only
    assert list(post) == ["return", "b", "k", "s", "v", "t", "y"]
    for entry in post.values():
        assert STAT_KEYS <= set(entry)
    assert post["return"]["mean"] == pytest.approx(3.0)
    assert post["return"]["q50"] == 3.0
    assert post["b"]["probs"] == pytest.approx({"true": 0.8, "false": 0.2})
    assert post["k"]["probs"] == pytest.approx({"0": 0.1, "1": 0.5, "2": 0.4})
    assert post["s"]["probs"] == pytest.approx({"heads": 0.4, "tails": 0.6})
    assert all(post["s"][k] is None for k in STAT_KEYS)
    assert post["t"]["probs"] == pytest.approx({"[1, 2]": 0.7, "[3, 4]": 0.3})
    assert post["v"]["mean"] == pytest.approx([2.5, 30.0]) and "probs" not in post["v"]
    assert post["y"]["exists"] == pytest.approx(0.4)
    assert "exists" not in post["return"]


def test_weighted_summary_and_repr(weighted):
    s = weighted.summary()
    lines = s.splitlines()
    assert "importance" in lines[0] and "N=4" in lines[0] and "ESS=3.3" in lines[0]
    for col in ("name", "mean", "sd", "5%", "50%", "95%"):
        assert col in lines[1]
    for name in ("return", "b", "k", "s", "v[0]", "v[1]", "t[0]", "y"):
        assert any(line.split()[0] == name for line in lines[2:] if line.strip())
    assert "g/inner" not in s  # not top-level
    assert "tails: 0.6, heads: 0.4" in s  # most probable first
    assert "exists" in s
    assert "g/inner" in weighted.summary(["g/inner"])
    assert weighted.summary("b").count("\n") == 2
    assert repr(weighted) == s
    assert weighted._repr_html_().startswith("<pre>")


def test_weighted_plot(weighted):
    fig = weighted.plot()
    assert isinstance(fig, Figure)
    titles = [a.get_title() for a in fig.axes if a.get_visible()]
    # default: "return" plus top-level scalar sites, at most 6 (vector "v", "t" skipped)
    assert [t.split()[0] for t in titles] == ["return", "b", "k", "s", "y"]
    fig2 = weighted.plot(["v", "g/inner"], bins=10)
    assert isinstance(fig2, Figure)
    fig3, ax = plt.subplots()
    assert weighted.plot("return", ax=ax) is fig3
    with pytest.raises(PPLError):
        weighted.plot(["return", "b"], ax=ax)


def test_unknown_site_name(weighted):
    with pytest.raises(PPLError, match="no site named 'retrun'") as err:
        weighted.mean("retrun")
    assert "return" in err.value.hint
    with pytest.raises(PPLError):
        weighted.quantile(1.5)


def test_weighted_zero_evidence():
    with pytest.raises(ZeroEvidenceError) as err:
        WeightedResult("importance", {"return": Site(torch.zeros(3))},
                       torch.full((3,), float("-inf")))
    assert str(err.value.message) == "every particle has weight zero (log evidence = -inf)"
    assert "increase particles" in err.value.hint
    assert isinstance(err.value, PPLError)


def test_weighted_bad_input():
    with pytest.raises(PPLError, match="NaN"):
        WeightedResult("importance", {}, torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError):
        WeightedResult("importance", {"return": Site(torch.zeros(2))}, torch.zeros(3))
    with pytest.raises(ValueError):
        WeightedResult("importance", {"return": Site(torch.zeros(3), present=torch.ones(2, dtype=torch.bool))},
                       torch.zeros(3))


def test_weighted_large_population_is_fast():
    n = 200_000
    g = torch.Generator().manual_seed(2)
    r = WeightedResult("smc", {"return": Site(torch.randn(n, generator=g)),
                               "v": Site(torch.randn(n, 4, generator=g)),
                               "k": Site(torch.randint(0, 5, (n, 2), generator=g))},
                       torch.randn(n, generator=g, dtype=torch.float64))
    j = r.to_json()
    assert abs(j["posterior"]["return"]["mean"]) < 0.05
    assert len(j["posterior"]["k"]["probs"]) == 25
    assert "[0, 0]" in j["posterior"]["k"]["probs"]
    assert "v[3]" in r.summary()


# ------------------------------------------------------------------ ExactResult


@pytest.fixture
def exact():
    # evidence 1/2; return: 0 w.p. 1/4, 1 w.p. 1/2 (two paths), 2 w.p. 1/4
    return ExactResult([
        (F(1, 8), {"return": 0, "coin": "h", "flag": True}),
        (F(1, 8), {"return": 1, "coin": "t", "flag": False, "extra": 3}),
        (F(1, 8), {"return": 1, "coin": "t", "flag": True, "extra": 5}),
        (F(1, 8), {"return": 2, "coin": "h", "flag": True}),
        (F(0), {"return": 99, "coin": "never", "ghost": 1}),
    ])


def test_exact_evidence_and_probs(exact):
    e = exact
    assert e.method == "enumerate"
    assert e.evidence == F(1, 2) and isinstance(e.evidence, F)
    assert e.log_evidence == pytest.approx(math.log(0.5))
    assert e.ess is None
    assert e.n == 4
    assert e.names == ["return", "coin", "flag", "extra"]  # "ghost" is on a zero-weight path
    p = e.probs()
    assert p == {0: F(1, 4), 1: F(1, 2), 2: F(1, 4)}
    assert all(isinstance(v, F) for v in p.values())
    assert 99 not in p
    assert e.marginal() == p
    assert e.marginal("coin") == {"h": F(1, 2), "t": F(1, 2)}
    assert e.marginal("flag") == {False: F(1, 4), True: F(3, 4)}


def test_exact_stats_are_fractions(exact):
    e = exact
    assert e.mean() == F(1) and isinstance(e.mean(), F)
    assert e.var() == F(1, 2) and isinstance(e.var(), F)
    assert e.sd() == pytest.approx(math.sqrt(0.5))
    assert e.mean("flag") == F(3, 4)
    assert e.quantile(0.25) == 0
    assert e.quantile(0.2500001) == 1
    assert e.quantile(0.75) == 1
    assert e.quantile(F(3, 4)) == 1
    assert e.quantile(0.76) == 2
    assert e.quantile([0, 0.5, 1]) == [0, 1, 2]
    with pytest.raises(PPLError):
        e.mean("coin")


def test_exact_three_point_mean_and_exact_sd():
    e = ExactResult([(F(1, 6), {"return": F(1, 3)}), (F(1, 3), {"return": 2}), (F(1, 2), {"return": 5})])
    assert e.mean() == F(1, 18) + F(2, 3) + F(5, 2)
    assert isinstance(e.mean(), F)
    sym = ExactResult([(F(1), {"return": 0}), (F(1), {"return": 2})])
    assert sym.var() == 1 and sym.sd() == F(1) and isinstance(sym.sd(), F)


def test_exact_absent_site_is_conditional(exact):
    e = exact
    assert e.presence("extra") == F(1, 2)
    assert e.mean("extra") == F(4)
    assert e.marginal("extra") == {3: F(1, 2), 5: F(1, 2)}
    assert e.presence("return") == 1


def test_exact_float_weights():
    e = ExactResult([(0.25, {"return": True}), (0.5, {"return": False}), (F(1, 4), {"return": True})])
    assert isinstance(e.evidence, float) and e.evidence == pytest.approx(1.0)
    assert e.probs() == pytest.approx({True: 0.5, False: 0.5})
    assert e.mean() == pytest.approx(0.5)


def test_exact_tuple_and_string_values():
    e = ExactResult([(F(1), {"return": (1, 2), "w": "a"}), (F(3), {"return": (3, 2), "w": "b"})])
    assert e.mean() == (F(5, 2), F(2))
    assert e.quantile(0.5) == (3, 2)
    assert e.probs() == {(1, 2): F(1, 4), (3, 2): F(3, 4)}
    assert e.to_json()["posterior"]["return"]["probs"] == {"[1, 2]": 0.25, "[3, 2]": 0.75}
    assert e.to_json()["posterior"]["w"]["probs"] == {"a": 0.25, "b": 0.75}


def test_exact_to_json(exact):
    j = exact.to_json()
    assert json.loads(json.dumps(j)) == j
    assert j["method"] == "enumerate" and j["ess"] is None and j["n"] == 4
    assert j["evidence"] == "1/2"
    assert j["log_evidence"] == pytest.approx(math.log(0.5))
    post = j["posterior"]
    assert list(post) == ["return", "coin", "flag", "extra"]
    for entry in post.values():
        assert STAT_KEYS <= set(entry) and "probs" in entry
    assert post["return"]["mean"] == 1.0 and post["return"]["q50"] == 1
    assert post["return"]["probs"] == {"0": 0.25, "1": 0.5, "2": 0.25}
    assert post["flag"]["probs"] == {"false": 0.25, "true": 0.75}
    assert post["extra"]["exists"] == 0.5
    assert post["coin"]["mean"] is None


def test_exact_summary_and_plot(exact):
    s = exact.summary()
    assert "enumerate" in s.splitlines()[0] and "evidence=1/2" in s.splitlines()[0]
    for name in ("return", "coin", "flag", "extra"):
        assert name in s
    assert "1: 1/2" in s
    assert isinstance(exact.plot(), Figure)
    assert isinstance(exact.plot(["coin", "flag"]), Figure)


def test_exact_zero_evidence():
    with pytest.raises(ZeroEvidenceError) as err:
        ExactResult([(F(0), {"return": 1}), (0.0, {"return": 2})])
    assert err.value.message == "every path has weight zero: the conditions/observations are impossible"
    assert err.value.hint
    with pytest.raises(ZeroEvidenceError):
        ExactResult([])
    with pytest.raises(ValueError):
        ExactResult([(F(-1), {"return": 1})])


def test_weighted_and_exact_agree():
    """The same distribution as particles and as paths gives the same statistics."""
    vals, ws = [3, 1, 4, 1, 5], [F(1, 10), F(2, 10), F(3, 10), F(1, 10), F(3, 10)]
    e = ExactResult([(w, {"return": v}) for v, w in zip(vals, ws)])
    r = WeightedResult("importance", {"return": Site(torch.tensor(vals))}, lw_of([float(w) for w in ws]))
    assert r.mean() == pytest.approx(float(e.mean()))
    assert r.var() == pytest.approx(float(e.var()))
    for q in (0.05, 0.2, 0.31, 0.5, 0.6, 0.95):
        assert r.quantile(q) == e.quantile(q)
    assert r.marginal() == pytest.approx({k: float(p) for k, p in e.marginal().items()})
    assert r.to_json()["posterior"]["return"]["probs"] == pytest.approx(e.to_json()["posterior"]["return"]["probs"])
