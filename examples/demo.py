"""A tour of ppl in one script: four models, four ways of running them, each answer
checked against the exact one.

    python examples/demo.py

1. the coin, written in Python with ``@ppl.infer`` over ``@ppl.model`` (the docstring
   is the model) -- compared with its closed-form Beta posterior;
2. medical diagnosis, the same decorator style with exact enumeration -- compared with
   Bayes' rule done by hand, in fractions;
3. the state-space model loaded from ``examples/state_space.ppl`` with ``ppl.model`` --
   compared with a Kalman filter;
4. the dice model from ``examples/dice.ppl``, enumerated exactly and sampled.

It prints each summary and comparison and saves a figure of the posteriors to
``examples/out/demo.png``. Runs in a few seconds on a laptop CPU.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from fractions import Fraction

import matplotlib

matplotlib.use("Agg")  # write a file, never open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing: `python examples/demo.py`

import ppl  # noqa: E402


def load_json(stem: str) -> dict:
    return json.loads((HERE / f"{stem}.json").read_text())


def banner(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def compare(label: str, estimate: float, exact: float, se: float | None = None) -> None:
    line = f"  {label:<32} ppl {float(estimate):>10.4f}   exact {float(exact):>10.4f}"
    if se is not None:
        line += f"   (diff {abs(float(estimate) - float(exact)) / se:.1f} MC standard errors)"
    print(line)


# ------------------------------------------------------------------------------ 1. coin
@ppl.infer(method="importance", particles=100_000, seed=0)
@ppl.model
def coin(flips):
    """
    p ~ beta(2, 2)
    for f in flips:
        observe f ~ bernoulli(p)
    return p
    """


def demo_coin():
    banner("1. coin: Beta(2, 2) prior, 20 flips  (@ppl.infer over @ppl.model, importance sampling)")
    flips = load_json("coin")["flips"]
    r = coin(flips=flips)
    print(r.summary())
    heads = sum(flips)
    a, b = 2 + heads, 2 + len(flips) - heads
    post = stats.beta(a, b)
    print(f"closed form: posterior Beta({a}, {b})")
    compare("E[p]", r.mean("p"), post.mean(), post.std() / math.sqrt(r.ess))
    compare("sd[p]", r.sd("p"), post.std())
    logz = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b) - (2 * math.lgamma(2) - math.lgamma(4))
    compare("log evidence", r.log_evidence, logz, math.sqrt((r.n / r.ess - 1) / r.n))
    return r, post


# --------------------------------------------------------------------------- 2. medical
@ppl.infer(method="enumerate")
@ppl.model
def diagnose(test1, test2):
    """
    disease ~ flip(0.01)
    observe test1 ~ flip(0.9 if disease else 0.08)
    observe test2 ~ flip(0.8 if disease else 0.05)
    return disease
    """


def demo_medical():
    banner("2. medical diagnosis: two positive tests  (@ppl.infer(method=\"enumerate\"): exact)")
    r = diagnose(test1=True, test2=True)
    print(r.summary())
    num = Fraction(1, 100) * Fraction(9, 10) * Fraction(8, 10)
    exact = num / (num + Fraction(99, 100) * Fraction(8, 100) * Fraction(5, 100))
    print(f"Bayes' rule by hand: P(disease | +, +) = {exact}")
    print(f"  ppl: {r.marginal()[True]}   equal: {r.marginal()[True] == exact}")
    print(f"  if test 2 had been negative: P(disease | +, -) = {diagnose(True, False).marginal()[True]}")
    return r


# ----------------------------------------------------------------------- 3. state space
def kalman(ys, a, q, r, x0_sd):
    mean, var, ll = 0.0, x0_sd**2, 0.0
    for y in ys:
        mean, var = a * mean, a * a * var + q * q
        s = var + r * r
        ll += -0.5 * (math.log(2 * math.pi * s) + (y - mean) ** 2 / s)
        gain = var / s
        mean, var = mean + gain * (y - mean), (1 - gain) * var
    return mean, math.sqrt(var), ll


def demo_state_space():
    banner("3. state-space model, T = 25  (ppl.model(\"examples/state_space.ppl\"), importance)")
    model = ppl.model(str(HERE / "state_space.ppl"))
    print(model)
    data = load_json("state_space")
    r = model.run("importance", data, particles=100_000, seed=0)
    print(r.summary(["return", "x0"]))
    mean, sd, ll = kalman(**data)
    print("Kalman filter: the exact posterior of the final state")
    compare("E[x_T | ys]", r.mean(), mean, sd / math.sqrt(r.ess))
    compare("sd[x_T | ys]", r.sd(), sd)
    compare("log evidence", r.log_evidence, ll, math.sqrt((r.n / r.ess - 1) / r.n))
    # delayed sampling (automatic conjugacy): x stays a Gaussian until it must be sampled, so
    # SMC with ONE particle is the Kalman filter itself
    one = model.run("smc", data, particles=1, delayed=True, seed=0)
    marginal = one.delayed_summary()
    print("smc with one particle and delayed=True (the Kalman filter, computed by the program):")
    compare("E[x_T | ys]", marginal["return_mean"], mean)
    compare("sd[x_T | ys]", marginal["return_sd"], sd)
    compare("log evidence", one.log_evidence, ll)
    return r, (mean, sd)


# ------------------------------------------------------------------------------ 4. dice
def dice_exact(target: int):
    """P(rolls = k | the total hits target exactly), by dynamic programming."""
    reach, hit = {0: Fraction(1)}, {}
    k = 0
    while reach:
        k += 1
        nxt = {}
        for t, p in reach.items():
            for face in range(1, 7):
                u = t + face
                if u < target:
                    nxt[u] = nxt.get(u, 0) + p / 6
                elif u == target:
                    hit[k] = hit.get(k, 0) + p / 6
        reach = nxt
    z = sum(hit.values())
    return {k: v / z for k, v in hit.items()}, z


def demo_dice():
    banner("4. dice: roll until the total reaches 10 (a random-length loop and list)")
    model = ppl.model(str(HERE / "dice.ppl"))
    data = load_json("dice")
    exact = model.run("enumerate", data)
    print(exact.summary(["return", "roll[0]", "roll[2]"]))
    sampled = model.run("importance", data, particles=20_000, seed=0)
    print(sampled.summary(["return"]))
    table, z = dice_exact(data["target"])
    print("dynamic programming over (rolls, total):")
    print(f"  enumeration equals it exactly: {exact.marginal() == table} (evidence {exact.evidence == z})")
    for k in sorted(table)[:4]:
        p = float(table[k])
        compare(f"P(rolls = {k} | hit 10)", sampled.marginal().get(k, 0.0), p, math.sqrt(p * (1 - p) / sampled.ess))
    return exact, sampled


# ------------------------------------------------------------------------------ figure
def figure(coin_r, beta_post, med_r, ssm_r, ssm_exact, dice_exact_r, path: pathlib.Path):
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    coin_r.plot("p", ax=axes[0, 0])
    xs = np.linspace(0.0, 1.0, 300)
    axes[0, 0].plot(xs, beta_post.pdf(xs), "k--", label="exact Beta(17, 7)")
    axes[0, 0].legend(fontsize="small")
    axes[0, 0].set_title("coin: p | 15 heads in 20")
    med_r.plot("disease", ax=axes[0, 1])
    axes[0, 1].set_title("medical: disease | two positive tests (exact)")
    ssm_r.plot("return", ax=axes[1, 0])
    mean, sd = ssm_exact
    xs = np.linspace(mean - 4 * sd, mean + 4 * sd, 300)
    axes[1, 0].plot(xs, stats.norm(mean, sd).pdf(xs), "k--", label="Kalman filter")
    axes[1, 0].legend(fontsize="small")
    axes[1, 0].set_title("state space: final state x_T | y_1..25")
    dice_exact_r.plot("return", ax=axes[1, 1])
    axes[1, 1].set_title("dice: number of rolls | total hits 10 (exact)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    t0 = time.time()
    coin_r, beta_post = demo_coin()
    med_r = demo_medical()
    ssm_r, ssm_exact = demo_state_space()
    dice_e, _ = demo_dice()
    out = HERE / "out" / "demo.png"
    figure(coin_r, beta_post, med_r, ssm_r, ssm_exact, dice_e, out)
    print(f"\nsaved {out.relative_to(HERE.parent)}  ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
