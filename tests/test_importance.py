"""Likelihood weighting against closed-form posteriors, with Monte Carlo error bars.

Every tolerance is ``Z`` standard errors of the estimate (``ppl.testing.montecarlo``):
delta-method SEs of self-normalised means (``sd / sqrt(ESS)`` in the simplest case)
and of the log evidence (``sd(W) / (sqrt(N) mean(W))``), computed from the weights of
the run itself. Seeds are fixed, so each test is deterministic; with ``Z = 4.5`` a
correct implementation passes a given check for all but ~1e-5 of seeds, while a bias
of a few SEs (e.g. a wrong prior, a lost observation, a likelihood scored on the wrong
particles) fails.
"""
import math

import numpy as np
import pytest
import scipy.stats as ss
import torch
from scipy.special import betaln

import ppl
from ppl.testing.montecarlo import as_float64, describe, evidence_se, ratio_se, snis

torch.set_num_threads(1)
Z = 4.5


def check(estimate, truth, se, what=""):
    assert se > 0 and math.isfinite(se), f"{what}: degenerate SE {se}"
    assert abs(estimate - truth) <= Z * se, f"{what}: {describe(estimate, truth, se)}"


def check_log_evidence(r, truth, what="log evidence"):
    log_z, se = evidence_se(r.log_weights)
    assert log_z == pytest.approx(r.log_evidence, abs=1e-9)
    check(log_z, truth, se, what)


# ------------------------------------------------------------------------ Beta-Bernoulli
COIN = """
def coin(flips):
    p ~ beta(A, B)
    for f in flips:
        observe f ~ bernoulli(p)
    return p
"""
FLIPS = [1, 1, 0, 1, 1, 1, 0, 1, 1, 0]


@pytest.mark.parametrize("a, b, seed", [(1, 1, 0), (2, 3, 1), (0.5, 0.5, 2)])
def test_beta_bernoulli(a, b, seed):
    m = ppl.model(COIN.replace("A", str(a)).replace("B", str(b)))
    r = m.run("importance", {"flips": FLIPS}, particles=40_000, seed=seed)
    h, t = sum(FLIPS), len(FLIPS) - sum(FLIPS)
    pa, pb = a + h, b + t
    mean = pa / (pa + pb)
    var = pa * pb / ((pa + pb) ** 2 * (pa + pb + 1))
    est, se = snis(r, centre=mean)
    assert est == pytest.approx(r.mean(), rel=1e-9)
    check(est, mean, se, "posterior mean")
    _, se_var = snis(r, lambda x: (x - mean) ** 2, centre=var)
    check(r.var(), var, se_var, "posterior variance")
    check_log_evidence(r, betaln(pa, pb) - betaln(a, b))
    assert r.ess > 1000


# ---------------------------------------------------------- Normal mean, known variance
def test_normal_mean_known_variance():
    m0, s0, s = 1.0, 2.0, 1.5
    ys = np.array([2.3, 3.1, 1.7, 2.9, 2.2])
    model = ppl.model(f"""
def normal_mean(ys):
    mu ~ normal({m0}, {s0})
    for y in ys:
        observe y ~ normal(mu, {s})
    return mu
""")
    r = model.run("importance", {"ys": ys.tolist()}, particles=60_000, seed=0)
    prec = 1 / s0**2 + len(ys) / s**2
    post_mean = (m0 / s0**2 + ys.sum() / s**2) / prec
    post_sd = math.sqrt(1 / prec)
    est, se = snis(r, centre=post_mean)
    check(est, post_mean, se, "posterior mean")
    est2, se2 = snis(r, lambda x: (x - post_mean) ** 2, centre=post_sd**2)
    check(est2, post_sd**2, se2, "posterior variance")
    cov = s**2 * np.eye(len(ys)) + s0**2 * np.ones((len(ys), len(ys)))
    check_log_evidence(r, ss.multivariate_normal(np.full(len(ys), m0), cov).logpdf(ys))
    # the posterior probability of an interval
    lo = post_mean - 0.5 * post_sd
    p_true = ss.norm.cdf(0.5) - ss.norm.cdf(-0.5)
    est3, se3 = snis(r, lambda x: ((x > lo) & (x < post_mean + 0.5 * post_sd)).double(), centre=p_true)
    check(est3, p_true, se3, "posterior interval probability")


# --------------------------------------------------------------- Bayesian linear regression
def test_bayesian_linear_regression():
    xs = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
    ys = np.array([-1.2, -0.4, 0.3, 0.6, 1.4, 1.9])
    sigma, alpha = 0.8, 1.0
    model = ppl.model(f"""
def regression(xs, ys):
    w0 ~ normal(0, {alpha})
    w1 ~ normal(0, {alpha})
    for i in range(len(xs)):
        observe ys[i] ~ normal(w0 + w1 * xs[i], {sigma})
    return w1
""")
    r = model.run("importance", {"xs": xs.tolist(), "ys": ys.tolist()}, particles=100_000, seed=0)
    X = np.stack([np.ones_like(xs), xs], 1)
    cov = np.linalg.inv(np.eye(2) / alpha**2 + X.T @ X / sigma**2)
    mean = cov @ X.T @ ys / sigma**2
    w = r.weights
    w0, w1 = as_float64(r.samples["w0"]), as_float64(r.samples["w1"])
    for j, x in enumerate([w0, w1]):
        est, se = ratio_se(w, x, centre=mean[j])
        check(est, mean[j], se, f"E[w{j}]")
        est, se = ratio_se(w, (x - mean[j]) ** 2, centre=cov[j, j])
        check(est, cov[j, j], se, f"Var[w{j}]")
    est, se = ratio_se(w, (w0 - mean[0]) * (w1 - mean[1]), centre=cov[0, 1])
    check(est, cov[0, 1], se, "Cov[w0, w1]")
    check_log_evidence(r, ss.multivariate_normal(np.zeros(len(xs)), sigma**2 * np.eye(len(xs))
                                                 + alpha**2 * X @ X.T).logpdf(ys))
    assert r.mean() == pytest.approx(float((w * w1).sum()), rel=1e-9)


# -------------------------------------------------------------- linear-Gaussian state space
SSM = """
def ssm(ys):
    x ~ normal(0, S0)
    for t in range(len(ys)):
        if t > 0:
            x ~ normal(A * x, Q)
        observe ys[t] ~ normal(x, R)
    return x
"""


def kalman(ys, a, q, r, s0):
    """log p(y_1..T) and the filtering mean/sd of the last state, by hand."""
    m, v, ll = 0.0, s0**2, 0.0
    for t, y in enumerate(ys):
        if t > 0:
            m, v = a * m, a * a * v + q * q
        sv = v + r * r
        ll += ss.norm.logpdf(y, m, math.sqrt(sv))
        k = v / sv
        m, v = m + k * (y - m), (1 - k) * v
    return ll, m, math.sqrt(v)


def test_state_space_model_log_evidence_against_kalman_filter():
    # noise levels chosen so that N = 200k prior draws keep an ESS in the thousands, where
    # the delta-method SE of the log evidence is trustworthy
    a, q, rr, s0, T = 0.9, 0.3, 1.5, 1.0, 20
    rng = np.random.default_rng(7)
    x, ys = rng.normal(0, s0), []
    for t in range(T):
        if t > 0:
            x = a * x + rng.normal(0, q)
        ys.append(float(x + rng.normal(0, rr)))
    src = SSM.replace("S0", str(s0)).replace("A", str(a)).replace("Q", str(q)).replace("R", str(rr))
    r = ppl.model(src).run("importance", {"ys": ys}, particles=200_000, seed=0)
    ll, m, sd = kalman(ys, a, q, rr, s0)
    assert r.ess > 1000
    check_log_evidence(r, ll)
    est, se = snis(r, centre=m)
    check(est, m, se, "filtering mean of x_T")
    est, se = snis(r, lambda x: (x - m) ** 2, centre=sd**2)
    check(est, sd**2, se, "filtering variance of x_T")
    assert {"x", "x[1]", "x[19]"} <= set(r.names)


# ------------------------------------------------------------------- geometric recursion
GEOMETRIC = """
def geo(p):
    b ~ flip(p)
    return 0 if b else 1 + geo(p)
"""


def test_geometric_by_recursion():
    p = 0.3
    r = ppl.model(GEOMETRIC).run("importance", {"p": p}, particles=50_000, seed=0)
    assert r.ess == pytest.approx(50_000)
    mean, var = (1 - p) / p, (1 - p) / p**2
    est, se = snis(r, centre=mean)
    check(est, mean, se, "mean")
    est, se = snis(r, lambda x: (x - mean) ** 2, centre=var)
    check(est, var, se, "variance")
    for k in range(4):
        pk = (1 - p) ** k * p
        est, se = snis(r, lambda x: (x == k).double(), centre=pk)
        check(est, pk, se, f"P({k})")
    # level j of the recursion exists exactly when the first j flips failed
    for name, j in [("geo/b", 1), ("geo/geo/b", 2)]:
        present = r.sites[name].present
        assert present is not None
        est, se = ratio_se(r.weights, present.double(), centre=(1 - p) ** j)
        check(est, (1 - p) ** j, se, f"presence of {name}")
        assert torch.equal(present, as_float64(r.samples["return"]) >= j)


def test_geometric_conditioned_is_memoryless():
    p = 0.4
    r = ppl.model("""
def geo(p):
    b ~ flip(p)
    return 0 if b else 1 + geo(p)

def model(p):
    n = geo(p)
    condition n >= 2
    return n
""").run("importance", {"p": p}, particles=50_000, seed=1)
    est, se = snis(r, centre=2 + (1 - p) / p)
    check(est, 2 + (1 - p) / p, se, "E[n | n >= 2]")
    check_log_evidence(r, 2 * math.log(1 - p))


# ---------------------------------------------------------------- random control flow
MIXTURE = """
def mix(ys):
    z ~ flip(0.3)
    if z:
        a ~ normal(-2, 1)
        m = a
    else:
        b ~ normal(2, 1.5)
        m = b
    for y in ys:
        observe y ~ normal(m, 1)
    return m
"""


def test_mixture_with_branch_dependent_addresses():
    ys = np.array([0.5, -0.3, 1.1])
    r = ppl.model(MIXTURE).run("importance", {"ys": ys.tolist()}, particles=80_000, seed=0)
    n = len(ys)

    def branch(m0, s0):
        cov = np.eye(n) + s0**2 * np.ones((n, n))
        lz = ss.multivariate_normal(np.full(n, m0), cov).logpdf(ys)
        prec = 1 / s0**2 + n
        return lz, (m0 / s0**2 + ys.sum()) / prec, 1 / prec

    lz_a, mean_a, var_a = branch(-2.0, 1.0)
    lz_b, mean_b, var_b = branch(2.0, 1.5)
    za, zb = 0.3 * math.exp(lz_a), 0.7 * math.exp(lz_b)
    p_z = za / (za + zb)

    z = r.samples["z"]
    assert r.sites["z"].present is None
    # each branch samples its own address, exactly on the particles that took it
    assert torch.equal(r.sites["a"].present, z)
    assert torch.equal(r.sites["b"].present, ~z)
    est, se = snis(r, lambda x: x, name="z", centre=p_z)
    check(est, p_z, se, "P(z | y)")
    assert r.presence("a") == pytest.approx(est, abs=1e-12)
    # conditional means: statistics of a partial site are conditional on its existence
    est, se = snis(r, name="a", centre=mean_a)
    assert est == pytest.approx(r.mean("a"), abs=1e-9)
    check(est, mean_a, se, "E[a | z, y]")
    est, se = snis(r, name="b", centre=mean_b)
    check(est, mean_b, se, "E[b | not z, y]")
    est, se = snis(r, lambda x: (x - mean_b) ** 2, name="b", centre=var_b)
    check(est, var_b, se, "Var[b | not z, y]")
    m_true = p_z * mean_a + (1 - p_z) * mean_b
    est, se = snis(r, centre=m_true)
    check(est, m_true, se, "E[m | y]")
    check_log_evidence(r, math.log(za + zb))
    # the returned value is the branch's own draw on every particle
    ret = r.samples["return"]
    assert torch.equal(ret[z], r.samples["a"][z]) and torch.equal(ret[~z], r.samples["b"][~z])


def test_discrete_mixture_in_loop_with_branching_observations():
    # z_t switch between two observation models; exact answer by enumeration of z
    ys = [1, 0, 1, 1]
    r = ppl.model("""
def hmm_free(ys):
    p ~ beta(2, 2)
    for t in range(len(ys)):
        z ~ flip(0.5)
        if z:
            observe ys[t] ~ bernoulli(p)
        else:
            observe ys[t] ~ bernoulli(0.9)
    return p
""").run("importance", {"ys": ys}, particles=60_000, seed=3)
    # per step, the likelihood is 0.5 p^y (1-p)^(1-y) + 0.5 * 0.9^y 0.1^(1-y); integrate over
    # p ~ beta(2, 2) by expanding the product into beta integrals
    from itertools import product
    z_total, m_total = 0.0, 0.0
    for zs in product([0, 1], repeat=len(ys)):
        h = sum(y for y, z in zip(ys, zs) if z)
        t = sum(1 - y for y, z in zip(ys, zs) if z)
        c = 0.5 ** len(ys) * math.prod(0.9 if y else 0.1 for y, z in zip(ys, zs) if not z)
        zb = c * math.exp(betaln(2 + h, 2 + t) - betaln(2, 2))
        z_total += zb
        m_total += zb * (2 + h) / (4 + h + t)
    post_mean = m_total / z_total
    est, se = snis(r, centre=post_mean)
    check(est, post_mean, se, "E[p | y]")
    check_log_evidence(r, math.log(z_total))


# ------------------------------------------------------------------------------- seeds
def test_seeds_reproduce_exactly_and_differ_between_seeds():
    m = ppl.model(MIXTURE)
    data = {"ys": [0.5, -0.3]}
    r1 = m.run("importance", data, particles=2000, seed=11)
    r2 = m.run("importance", data, particles=2000, seed=11)
    r3 = m.run("importance", data, particles=2000, seed=12)
    assert torch.equal(r1.log_weights, r2.log_weights)
    for name in ("z", "a", "b", "return"):
        assert torch.equal(r1.samples[name], r2.samples[name])
        p1, p2 = r1.sites[name].present, r2.sites[name].present
        assert (p1 is None and p2 is None) or torch.equal(p1, p2)
    assert r1.log_evidence == r2.log_evidence
    assert not torch.equal(r1.samples["return"], r3.samples["return"])
    assert r1.log_evidence != r3.log_evidence


def test_seeded_run_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    ppl.model(MIXTURE).run("importance", {"ys": [0.1]}, particles=100, seed=5)
    assert torch.equal(torch.rand(3), before)


# ---------------------------------------------------------------------------- log_joint
def test_log_joint_matches_scipy_on_hand_made_traces():
    m = ppl.model(COIN.replace("A", "2").replace("B", "3"))
    flips = [1, 0, 1, 1]

    def truth(p):
        return ss.beta.logpdf(p, 2, 3) + sum(ss.bernoulli.logpmf(f, p) for f in flips)

    lj = m.log_joint({"p": 0.3}, flips=flips)
    assert float(lj.reshape(-1)[0]) == pytest.approx(truth(0.3), rel=1e-5)
    ps = torch.tensor([0.2, 0.5, 0.9])
    lj = m.log_joint({"p": ps}, flips=flips)
    assert lj.shape == (3,)
    np.testing.assert_allclose(lj.double().numpy(), [truth(float(p)) for p in ps], rtol=1e-5)
    # outside the support: -inf, not an error
    m2 = ppl.model("""
def m(y):
    s ~ exponential(1)
    observe y ~ normal(0, abs(s) + 1)
    return s
""")
    lj = m2.log_joint({"s": torch.tensor([-0.5, 0.5])}, y=0.2)
    assert float(lj[0]) == -math.inf
    assert float(lj[1]) == pytest.approx(ss.expon.logpdf(0.5) + ss.norm.logpdf(0.2, 0, 1.5), rel=1e-5)


def test_log_joint_follows_each_traces_own_branch():
    m = ppl.model(MIXTURE)
    ys = [0.5, -0.3]
    z = torch.tensor([True, False, True])
    a = torch.tensor([-1.5, 0.0, -2.5])
    b = torch.tensor([0.0, 2.5, 0.0])
    lj = m.log_joint({"z": z, "a": a, "b": b}, ys=ys)
    want = []
    for zi, ai, bi in zip(z.tolist(), a.tolist(), b.tolist()):
        lp = ss.bernoulli.logpmf(zi, 0.3)
        mm = ai if zi else bi
        lp += ss.norm.logpdf(ai, -2, 1) if zi else ss.norm.logpdf(bi, 2, 1.5)
        lp += sum(ss.norm.logpdf(y, mm, 1) for y in ys)
        want.append(lp)
    np.testing.assert_allclose(lj.double().numpy(), want, rtol=1e-5)
    with pytest.raises(ppl.PPLError):
        m.log_joint({"z": torch.tensor([True]), "b": torch.tensor([1.0])}, ys=ys)


def test_log_joint_of_importance_trace_is_prior_plus_log_weight():
    m = ppl.model(COIN.replace("A", "2").replace("B", "3"))
    flips = [1, 1, 0]
    r = m.run("importance", {"flips": flips}, particles=500, seed=0)
    p = r.samples["p"]
    lj = m.log_joint({"p": p}, flips=flips).double()
    prior = torch.tensor(ss.beta.logpdf(p.double().numpy(), 2, 3))
    np.testing.assert_allclose((lj - prior).numpy(), r.log_weights.double().numpy(), atol=2e-4)


# -------------------------------------------------------------------------------- prior
@pytest.mark.filterwarnings("ignore::ppl.PPLDiagnosticWarning")  # 30 heads under a Beta(2, 3) prior: Pareto k ~0.8
def test_prior_method_gives_prior_moments():
    m = ppl.model(COIN.replace("A", "2").replace("B", "3"))
    r = m.run("prior", {"flips": [1] * 30}, particles=40_000, seed=0)
    assert r.log_evidence == 0.0 and r.ess == pytest.approx(40_000)
    est, se = snis(r, centre=0.4)
    check(est, 0.4, se, "prior mean")
    est, se = snis(r, lambda x: (x - 0.4) ** 2, centre=0.04)
    check(est, 0.04, se, "prior variance")
    # the same data do move the importance posterior (so the prior run really ignored them)
    post = m.run("importance", {"flips": [1] * 30}, particles=40_000, seed=0)
    est, se = snis(post, centre=32 / 35)
    check(est, 32 / 35, se, "posterior mean")


def test_prior_of_random_control_flow():
    r = ppl.model(MIXTURE).run("prior", {"ys": [5.0, 5.0]}, particles=40_000, seed=0)
    est, se = snis(r, name="z", centre=0.3)
    check(est, 0.3, se, "P(z)")
    est, se = snis(r, centre=0.3 * -2 + 0.7 * 2)
    check(est, 0.3 * -2 + 0.7 * 2, se, "E[m]")
    est, se = snis(r, name="b", centre=2.0)
    check(est, 2.0, se, "E[b | b exists]")
