"""MH with custom proposal kernels written in the DSL (``inference/mh_proposals.py``).

Exact checks (finite programs): ``ppl.testing.proposal_check.proposal_kernel_check``
builds the transition matrix K of one MH step with a proposal function by enumerating
every draw of the step (the proposal's own draws, auxiliary ones included, prior draws
of fresh choices, accept/reject) from every trace, and pi by enumerating the program;
pi K = pi, detailed balance and row sums must hold to float64 rounding (1e-12). The
proposals cover: a fixed trace shape with a trace-dependent, asymmetric proposal; a
proposal that changes the choice deciding the model's control flow (choices appear and
disappear: fresh/stale terms); a proposal branching on its own draw, proposing a choice
the old trace lacks (a birth by the proposal); auxiliary randomness (which move, which
index) with ``"c" in trace`` and ``trace["z"][i]`` for an ``i`` that differs between
chains; a loop whose length the proposal changes; a data-driven independence proposal
and a noisy swap, both asymmetric. Every asymmetric one must *fail* without the
Hastings terms (so the check can see a missing q ratio), as must two classic bugs:
dropping the reverse density q(x | x'), and scoring the reverse move at the new values
instead of the old. Two chains run as one batch must be exactly two independent chains
(K2 = K (x) K), also when they take different branches.

Statistical checks: the Normal mean with known noise (a random walk with the current
value as a named parameter, and a data-driven independence proposal) against the closed
form, and the mixture example (a proposal moving the means or re-drawing every
assignment from its conditional, run from the command line with ``--kernel``) against
a grid, each within Z = 4.5 Monte Carlo standard errors, MCSE = sd / sqrt(ESS) with ESS
from ``pyro.ops.stats``; fixed seeds. Plus the errors: a bad kernel name, a proposal
that samples no choice of the model, and the rest, each a ``PPLError`` with a hint.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ppl
from ppl import cli
from ppl.inference.mh_proposals import ProposalKernel
from ppl.semantics.errors import PPLError
from ppl.testing.montecarlo import describe, mcmc_chains, mcmc_ess
from ppl.testing.proposal_check import batched_kernel_check, proposal_kernel_check

# short chains (checked for correctness, not efficiency) trip the diagnostic warnings; their own
# tests are in tests/test_diagnostics.py
pytestmark = pytest.mark.filterwarnings("ignore::ppl.PPLDiagnosticWarning")

torch.set_num_threads(1)
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
Z = 4.5
EXACT = 1e-12

# =========================================================================== finite models
FIXED_SHAPE = """
def model():
    a ~ flip(0.3)
    b ~ categorical([1, 2, 3])
    c ~ binomial(2, 0.6 if a else 0.2)
    observe (b + c) % 3 ~ categorical([3, 1, 2])
    return a
"""
BRANCHES = """
def model():
    a ~ flip(0.4)
    if a:
        b ~ categorical([1, 2, 3])
        observe b ~ categorical([3, 2, 1])
    else:
        c ~ binomial(2, 0.3)
        d ~ flip(0.5)
        observe c > 0 ~ bernoulli(0.8)
    return a
"""
LOOP = """
def model():
    k ~ binomial(2, 0.5)
    s = 0
    for i in range(k + 1):
        x ~ flip(0.3)
        s = s + (1 if x else 0)
    observe s ~ binomial(3, 0.4)
    return s
"""
FLIPS = """
def model():
    k ~ uniform_draw([1, 3])
    n = 0
    for i in range(3):
        z ~ flip(k / 4)
        n = n + (1 if z else 0)
    observe n ~ categorical([1, 2, 4, 1])
    return n
"""
COUNTS = """
def model(obs):
    k ~ categorical([1, 1, 1, 1])
    for o in obs:
        observe o ~ binomial(3, (k + 1) / 5)
    return k
"""
PAIR = """
def model():
    a ~ categorical([1, 2, 3])
    b ~ categorical([3, 1, 1])
    observe (2 * a + b) % 3 ~ categorical([1, 3, 2])
    return a
"""

# name -> (proposal source, model source, data, whether moves change the trace's shape)
CASES = {
    # fixed shape; every proposed value depends on the current one (asymmetric), and c
    # moves only when an auxiliary coin says so
    "sticky": ("""
def sticky(trace):
    a ~ flip(0.8 if trace["a"] else 0.3)
    b ~ categorical([4, 1, 1] if trace["b"] == 0 else [1, 2, 2])
    if sample(flip(0.5), "move_c"):
        c ~ binomial(2, 0.7)
""", FIXED_SHAPE, None, False),
    # the proposal changes the choice that decides the control flow: b or (c, d) appear
    # and disappear (fresh from the prior, stale dropped); the current value of a comes
    # in as the parameter named a
    "toggle": ("""
def toggle(a):
    a ~ flip(0.7 if a else 0.2)
""", BRANCHES, None, True),
    # the proposal branches on its own draw: it proposes b when it proposes a = True,
    # also when the current trace has no b (a birth by the proposal, not by the prior)
    "own_branch": ("""
def own_branch(trace):
    a ~ flip(0.5)
    if a:
        b ~ categorical([1, 1, 2])
""", BRANCHES, None, True),
    # auxiliary randomness picks the move; `"c" in trace` splits the chains
    "aux_move": ("""
def aux_move(trace):
    if sample(flip(0.3), "u"):
        a ~ flip(0.5)
    elif "c" in trace:
        c ~ binomial(2, 0.5)
    else:
        b ~ categorical([1, 3, 1])
""", BRANCHES, None, True),
    # the proposal changes the loop length and proposes every x[i] of the new loop
    "grow": ("""
def grow(k):
    k ~ binomial(2, 0.6 if k == 0 else 0.3)
    for i in range(k + 1):
        x ~ flip(0.6)
""", LOOP, None, True),
    # an auxiliary index i, different in every chain: z[i] is read as trace["z"][i]
    # and proposed at address z[j] for j == i
    "flip_one": ("""
def flip_one(trace):
    if sample(flip(0.3), "move_k"):
        k ~ uniform_draw([1, 3])
    else:
        i = sample(uniform_draw([0, 1, 2]), "i")
        for j in range(3):
            if j == i:
                z ~ flip(0.3 if trace["z"][i] else 0.6)
""", FLIPS, None, False),
    # data-driven independence proposal: q(x') does not depend on x, and q(x') != q(x)
    "from_data": ("""
def from_data(obs):
    k ~ binomial(3, mean(obs) / 3)
""", COUNTS, {"obs": [2, 3, 1]}, False),
    # a noisy swap: a is proposed near the current b and b near the current a (with
    # lopsided off-peak weights: a symmetric peak would make the swap symmetric)
    "swap": ("""
def peak(v):
    return [4 if v == 0 else 1, 4 if v == 1 else 2, 4 if v == 2 else 3]

def swap(trace):
    a ~ categorical(peak(trace["b"]))
    b ~ categorical(peak(trace["a"]))
""", PAIR, None, False),
}


def case_model(name):
    prop, model, data, _ = CASES[name]
    return ppl.model(prop + model, entry="model"), data


def kernel_report(kc) -> str:
    return (f"invariance {kc.invariance_error:.3g}, detailed balance {kc.balance_error:.3g}, "
            f"row sums {kc.row_sum_error:.3g} over {len(kc.pi)} traces")


def shape(key) -> tuple:
    return tuple(a for a, _ in key)


def assert_exact_kernel(kc, what=""):
    assert kc.invariance_error <= EXACT, f"{what}: pi K != pi: {kernel_report(kc)}"
    assert kc.row_sum_error <= EXACT, f"{what}: rows of K do not sum to 1: {kernel_report(kc)}"
    assert kc.balance_error <= EXACT, f"{what}: detailed balance fails: {kernel_report(kc)}"
    assert len(kc.pi) >= 2 and abs(sum(kc.pi.values()) - 1) <= EXACT
    assert any(x != y and k > 0 for (x, y), k in kc.K.items()), f"{what}: the kernel never moves"


# =========================================================================== exact checks
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_exact(name):
    m, data = case_model(name)
    kc = proposal_kernel_check(m, name, data)
    assert_exact_kernel(kc, name)
    moves_shape = any(k > 1e-9 and shape(x) != shape(y) for (x, y), k in kc.K.items())
    assert moves_shape == CASES[name][3], f"{name}: the kernel should {'' if CASES[name][3] else 'not '}change shapes"


# ------------------------------------------------------------------ broken kernels fail
class _ForgetsReverseDensity(ProposalKernel):
    """Drops q(x | x'): the reverse run's log density is taken as 0."""

    def _propose(self, data, state, C, device, randomness, replay=None, which="current"):
        h = super()._propose(data, state, C, device, randomness, replay, which)
        if replay is not None:
            h.log_q.zero_()
        return h


class _ScoresNewValues(ProposalKernel):
    """Scores the reverse move at the proposed values x' instead of the old x."""

    def reverse_values(self, old, fwd, new):
        return super().reverse_values(new, fwd, new)


BROKEN = {"no_hastings": dict(hastings=False), "no_reverse_q": dict(kernel_cls=_ForgetsReverseDensity),
          "reverse_at_new_values": dict(kernel_cls=_ScoresNewValues)}


@pytest.mark.parametrize("broken", list(BROKEN))
@pytest.mark.parametrize("name", ["toggle", "own_branch", "flip_one", "from_data", "swap"])
def test_broken_kernels_are_caught(name, broken):
    """The same proposals pass ``test_kernel_exact``."""
    m, data = case_model(name)
    kc = proposal_kernel_check(m, name, data, **BROKEN[broken])
    assert kc.row_sum_error <= EXACT  # still a Markov kernel ...
    assert kc.invariance_error > 1e-3, f"{name}/{broken}: {kernel_report(kc)}"  # ... with the wrong law
    assert kc.balance_error > 1e-4 and not kc.ok()


def test_symmetric_proposal_needs_no_q_ratio():
    """Control for the test above: for a symmetric proposal on a fixed shape the q terms
    cancel, so dropping them changes nothing; the asymmetric cases are what make the
    broken-kernel tests bite."""
    m = ppl.model("def uniform_b(trace):\n    b ~ categorical([1, 1, 1])\n" + FIXED_SHAPE, entry="model")
    assert_exact_kernel(proposal_kernel_check(m, "uniform_b", hastings=False), "symmetric, no Hastings terms")


def test_proposal_of_a_dropped_choice_is_rejected_not_wrong():
    """The proposal always proposes b, also when its proposed a = False makes the model
    drop b (or the old trace has no b): the reverse move could not take x' back to x, so
    those moves are rejected. The kernel stays exact; it just never changes a."""
    m = ppl.model("""
def sloppy(trace):
    a ~ flip(0.5)
    b ~ categorical([1, 1, 1])
""" + BRANCHES, entry="model")
    kc = proposal_kernel_check(m, "sloppy")
    assert_exact_kernel(kc, "sloppy")
    assert not any(k > 0 and dict(x)["a"] != dict(y)["a"] for (x, y), k in kc.K.items())


@pytest.mark.parametrize("name, max_pairs", [("aux_move", 6), ("flip_one", 6)])
def test_chains_in_one_batch_are_independent_chains(name, max_pairs):
    """Two chains as one batch, from traces whose proposals and model runs take different
    branches: the exact two-chain kernel is K (x) K to float64 rounding."""
    m, data = case_model(name)
    assert batched_kernel_check(m, name, data, max_pairs=max_pairs) <= EXACT


# ====================================================================== statistical checks


def check_mean(est, ess, mean, sd, what=""):
    assert ess > 100, f"{what}: ESS {ess:.0f} is too small to trust the check"
    mcse = sd / math.sqrt(ess)
    assert abs(est - mean) <= Z * mcse, f"{what} mean: {describe(est, mean, mcse)} (ESS {ess:.0f})"


def check_var(r, name, mean, sd, what=""):
    g = (mcmc_chains(r, name) - mean) ** 2
    ess = mcmc_ess(g)
    se = float(g.std()) / math.sqrt(ess)
    est = float(g.mean())
    assert abs(est - sd ** 2) <= Z * se, f"{what} variance: {describe(est, sd ** 2, se)} (ESS {ess:.0f})"


NORMAL_MEAN = """
def walk(mu):
    mu ~ normal(mu, 0.5)

def centred(ys):
    mu ~ normal(mean(ys), 1.0)

def normal_mean(ys):
    mu ~ normal(1.0, 2.0)
    for y in ys:
        observe y ~ normal(mu, 1.5)
    return mu
"""


@pytest.mark.parametrize("kernel, seed", [("walk", 0), ("centred", 1)])
def test_normal_mean(kernel, seed):
    """mu ~ N(1, 2), y_i ~ N(mu, 1.5): the posterior is normal, in closed form. ``walk``
    is a symmetric random walk from the current value; ``centred`` an independence
    proposal at the data's mean (not symmetric: it needs q(x) / q(x'))."""
    ys = np.array([2.3, 3.1, 1.7, 2.9, 2.2])
    r = ppl.model(NORMAL_MEAN).run("mh", {"ys": ys.tolist()}, particles=16, samples=400, burn_in=100,
                                   kernel=kernel, seed=seed)
    prec = 1 / 2.0 ** 2 + len(ys) / 1.5 ** 2
    mean, sd = (1.0 / 2.0 ** 2 + ys.sum() / 1.5 ** 2) / prec, math.sqrt(1 / prec)
    assert r.extra["kernel"] == kernel and r.extra["traced"] is False
    assert 0.2 < r.acceptance_rate < 1 and r.r_hat["mu"] < 1.05
    est = r.mean("mu")
    assert est == pytest.approx(float(mcmc_chains(r, "mu").mean()), rel=1e-9)
    check_mean(est, r.ess_per_site["mu"], mean, sd, kernel)
    check_var(r, "mu", mean, sd, kernel)


def test_seeded_runs_repeat():
    m, data = ppl.model(NORMAL_MEAN), {"ys": [2.3, 3.1]}
    a, b, c = (m.run("mh", data, particles=3, samples=20, burn_in=5, kernel="walk", seed=s) for s in (7, 7, 8))
    assert torch.equal(mcmc_chains(a, "mu"), mcmc_chains(b, "mu")) and not torch.equal(mcmc_chains(a, "mu"),
                                                                                   mcmc_chains(c, "mu"))


# ------------------------------------------------ the mixture example, from the command line
MIXTURE_MOVE = """
# One MH step either walks both means, or re-draws every assignment z[i] from its
# conditional given the current means (a Gibbs block: always accepted).
def move(trace, ys, w, sigma):
    if sample(flip(0.5), "which"):
        mu1 ~ normal(trace["mu1"], 0.8)
        mu2 ~ normal(trace["mu2"], 0.8)
    else:
        for i in range(len(ys)):
            l1 = w * exp(-0.5 * ((ys[i] - trace["mu1"]) / sigma) ** 2)
            l2 = (1 - w) * exp(-0.5 * ((ys[i] - trace["mu2"]) / sigma) ** 2)
            z ~ flip(l1 / (l1 + l2))

"""


def run_cli(argv) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(list(argv))
    assert rc == 0, f"ppl {' '.join(argv)} exited with {rc}"
    return json.loads(out.getvalue())


def test_mixture_with_a_custom_kernel_from_the_cli(tmp_path):
    """The mixture example with its proposal prepended (the model stays the last def,
    the entry): ``--kernel move`` against the grid posterior of test_mh."""
    from test_mh import mixture_grid
    path = tmp_path / "mixture_move.ppl"
    path.write_text(MIXTURE_MOVE + (EXAMPLES / "mixture.ppl").read_text())
    d = json.loads((EXAMPLES / "mixture.json").read_text())
    truth = mixture_grid(d["ys"], d["w"], d["sigma"])
    out = run_cli(["run", str(path), "--data", str(EXAMPLES / "mixture.json"), "--method", "mh", "-n", "32",
                   "--kernel", "move", "--samples", "300", "--burn-in", "100", "--seed", "0", "--json"])
    assert out["entry"] == "mixture" and out["method"] == "mh"
    assert 0 < out["acceptance_rate"] < 1
    for k in ("mu1", "mu2", "return"):
        e, sd = truth[k]
        assert out["r_hat"][k] < 1.1, f"{k}: split R-hat {out['r_hat'][k]:.3f}"
        check_mean(out["posterior"][k]["mean"], out["ess_per_site"][k], e, sd, f"E[{k}]")
    assert out["posterior"]["mu1"]["q95"] < out["posterior"]["mu2"]["q05"]
    for i in (4, 2):
        p, ess = truth["pz"][i], out["ess_per_site"][f"z[{i}]"]
        est, se = out["posterior"][f"z[{i}]"]["mean"], math.sqrt(p * (1 - p) / ess)
        assert abs(est - p) <= Z * se, f"P(z[{i}]): {describe(est, p, se)} (ESS {ess:.0f})"


# ================================================================================ errors
def mh_error(src, kernel, data=None, **options) -> PPLError:
    with pytest.raises(PPLError) as e:
        ppl.model(src).run("mh", data or {}, particles=2, samples=3, burn_in=0, kernel=kernel, seed=0, **options)
    return e.value


@pytest.mark.parametrize("src, kernel, data, message, hint", [
    (NORMAL_MEAN, "wlak", {"ys": [1.0]}, "unknown MH kernel 'wlak'", "did you mean 'walk'?"),
    (NORMAL_MEAN, "hmc", {"ys": [1.0]}, "unknown MH kernel 'hmc'", "functions: walk, centred"),
    (NORMAL_MEAN, "normal_mean", {"ys": [1.0]}, "the MH kernel 'normal_mean' is the model itself", "entry="),
    ("def typo(trace):\n    mu_ ~ normal(0, 1)\n" + NORMAL_MEAN, "typo", {"ys": [1.0]},
     "the proposal 'typo' samples 'mu_', which is no choice of the model 'normal_mean'", "did you mean 'mu'?"),
    ("def odd(sigma):\n    mu ~ normal(0, sigma)\n" + NORMAL_MEAN, "odd", {"ys": [1.0]},
     "the proposal 'odd' has a parameter 'sigma' that is neither `trace`", "bound by name"),
    ("def obs(mu):\n    mu ~ normal(mu, 1)\n    observe 1.0 ~ normal(mu, 1)\n" + NORMAL_MEAN, "obs", {"ys": [1.0]},
     "the MH proposal 'obs' cannot observe, factor or condition", "likelihood terms belong in the model"),
    ("def peek(trace):\n    mu ~ normal(trace[\"m\"], 1)\n" + NORMAL_MEAN, "peek", {"ys": [1.0]},
     "no chain's current trace has a choice 'm'", "did you mean 'mu'?"),
    ("def reads_b(b):\n    b ~ categorical([1, 1, 1])\n" + BRANCHES, "reads_b", None,
     "the proposal 'reads_b' reads the choice 'b'", "test `\"b\" in trace` first"),
])
def test_errors(src, kernel, data, message, hint):
    err = mh_error(src, kernel, data)
    assert message in err.message and hint in (err.hint or ""), str(err)
    assert "Traceback" not in str(err)


def test_error_points_at_the_proposal():
    err = mh_error("def typo(trace):\n    mu_ ~ normal(0, 1)\n" + NORMAL_MEAN, "typo", {"ys": [1.0]})
    assert err.span is not None and err.span.line == 2
    assert "mu_ ~ normal(0, 1)" in str(err)


def test_custom_kernels_are_not_traced():
    err = mh_error(NORMAL_MEAN, "walk", {"ys": [1.0]}, traced=True)
    assert "traced=True needs kernel='rw'" in err.message


def test_cli_bad_kernel_names(capsys, tmp_path):
    path = tmp_path / "nm.ppl"
    path.write_text(NORMAL_MEAN)
    data = tmp_path / "nm.json"
    data.write_text(json.dumps({"ys": [2.3, 3.1]}))
    base = ["run", str(path), "--data", str(data), "--method", "mh", "-n", "2", "--samples", "5", "--burn-in", "0"]
    assert cli.main(base + ["--kernel", "wlak"]) == 1
    err = capsys.readouterr().err
    assert "unknown MH kernel 'wlak'" in err and "did you mean 'walk'?" in err and "Traceback" not in err
    assert cli.main(base + ["--kernel", "normal_mean"]) == 1
    assert "is the model itself" in capsys.readouterr().err
    out = run_cli(base + ["--kernel", "walk", "--seed", "3", "--json"])
    assert out["method"] == "mh" and (out["chains"], out["draws"]) == (2, 5)
    r = ppl.model(NORMAL_MEAN).run("mh", {"ys": [2.3, 3.1]}, particles=2, samples=5, burn_in=0, kernel="walk",
                                   seed=3)
    assert out["posterior"]["mu"]["mean"] == pytest.approx(r.mean("mu"), rel=1e-12)
