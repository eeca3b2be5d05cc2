"""ppl.result.as_result: the one place inference's raw results (inference.population's
Population / Chains / Optimum, semantics.exact's paths) become the result objects people
read. Synthetic inputs with known answers; exact paths from a real enumeration."""
from __future__ import annotations

import math
from fractions import Fraction as F

import pytest
import torch

import ppl
from ppl.inference.population import Chains, Optimum, Population
from ppl.inference.smc import StepRecord
from ppl.result import BestOfNResult, ExactResult, MCMCResult, Site, WeightedResult, as_result
from ppl.semantics.exact import enumerate_paths


def lw_of(ws):
    return torch.log(torch.tensor(ws, dtype=torch.float64))


def test_population_becomes_weighted_result_on_cpu():
    present = torch.tensor([True, False, True, True])
    pop = Population("importance",
                     {"return": (torch.tensor([1.0, 2.0, 3.0, 4.0]), None),
                      "x": (torch.tensor([5.0, 0.0, 7.0, 8.0]), present),
                      "s": (["a", "b", "a", "b"], None)},
                     lw_of([1.0, 2.0, 3.0, 4.0]), extra={"note": 1})
    r = as_result(pop)
    assert type(r) is WeightedResult and r.method == "importance" and r.n == 4
    assert r.names == ["return", "x", "s"]
    assert all(isinstance(s, Site) for s in r.sites.values())
    assert r.sites["x"].present.tolist() == [True, False, True, True]
    assert r.sites["return"].present is None
    assert r.sites["return"].value.device.type == "cpu" and r.log_weights.device.type == "cpu"
    assert r.mean() == pytest.approx(3.0)  # weights .1 .2 .3 .4
    assert r.mean("x") == pytest.approx((0.1 * 5 + 0.3 * 7 + 0.4 * 8) / 0.8)
    assert r.marginal("s") == pytest.approx({"a": 0.4, "b": 0.6})
    assert r.log_evidence == pytest.approx(pop.log_evidence) == pytest.approx(math.log(10 / 4))
    assert r.extra == {"note": 1}
    assert not hasattr(r, "ess_history")  # no checkpoints recorded


def test_population_history_gives_ess_history():
    history = [StepRecord("a", 3.5, True, -1.0), StepRecord("b", 2.25, False, -2.0)]
    pop = Population("smc", {"return": (torch.tensor([0.0, 1.0]), None)}, torch.zeros(2, dtype=torch.float64),
                     extra={"history": history})
    r = as_result(pop)
    assert r.ess_history == [3.5, 2.25]
    assert r.extra["history"] is history


def test_chains_become_mcmc_result():
    chains = Chains("mh", {"return": (torch.arange(6.0), None)}, chains=2, draws=3, acceptance_rate=0.25,
                    r_hat={"return": 1.5}, ess={"return": 4.0}, extra={"kernel": "prior"})
    r = as_result(chains)
    assert type(r) is MCMCResult
    assert (r.chains, r.draws, r.n) == (2, 3, 6)
    assert r.acceptance_rate == 0.25 and r.r_hat == {"return": 1.5} and r.ess_per_site == {"return": 4.0}
    assert r.ess == 4.0 and r.log_evidence is None
    assert r.mean() == pytest.approx(2.5)  # equally weighted draws 0..5
    assert r.extra == {"kernel": "prior"}
    assert any("R-hat is 1.500" in w for w in r.warnings)


def test_optimum_becomes_best_of_n_result():
    opt = Optimum("best_of_n", {"return": (torch.tensor([7.0]), None)}, score=-1.5, candidates=10,
                  importance_log_evidence=-3.0)
    r = as_result(opt)
    assert type(r) is BestOfNResult
    assert r.score == -1.5 and r.candidates == 10 and r.log_evidence is None
    assert r.extra["importance_log_evidence"] == -3.0
    assert r.mean() == 7.0


def test_exact_paths_become_exact_result():
    m = ppl.model("def model():\n    a ~ flip(0.5)\n    b ~ flip(0.5)\n    condition(a or b)\n    return a\n")
    paths = enumerate_paths(m.program, m.builtins(), m.entry, {}, interp=m.interpreter(exact=True))
    r = as_result(paths)
    assert type(r) is ExactResult
    assert r.evidence == F(3, 4)
    assert r.marginal() == {False: F(1, 3), True: F(2, 3)}


def test_a_result_passes_through_unchanged():
    r = WeightedResult("importance", {"return": Site(torch.tensor([1.0, 2.0]))}, torch.zeros(2))
    assert as_result(r) is r
    assert as_result(as_result(r)) is r
    e = ExactResult([(F(1), {"return": 1})])
    assert as_result(e) is e


def test_anything_else_is_a_type_error():
    with pytest.raises(TypeError, match="cannot make a result of a dict"):
        as_result({"return": 1})


def test_ppl_result_still_offers_every_name_after_the_split():
    """ppl/result.py was split into ppl.results.{values,stats,text,export,plots}: the names
    other modules import from ppl.result are still there, and are the parts' own objects."""
    import ppl.result as result
    from ppl.results import plots, values
    for name in ("Site", "WeightedResult", "ExactResult", "MCMCResult", "BestOfNResult", "as_result",
                 "INTEGRAL_MAX_LEVELS", "FLOAT_MAX_LEVELS", "_to_key", "_pyplot"):
        assert hasattr(result, name), name
    assert result._to_key is values._to_key and result._pyplot is plots._pyplot
    assert (result.INTEGRAL_MAX_LEVELS, result.FLOAT_MAX_LEVELS) == (1000, 20)


def test_parts_do_not_import_the_result_classes():
    """The parts have one job each and never reach back into ppl.result (no cycle)."""
    import ast
    import pathlib
    import ppl.results
    for path in pathlib.Path(ppl.results.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {"ppl.result", "ppl.api", "ppl", "..result", "..api", ".."} & imported, path.name
