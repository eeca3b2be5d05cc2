"""Regenerate the simulated data sets of the examples (run once; the .json files are
committed, so the examples and their tests never depend on this script).

    python examples/make_data.py

Each data set is drawn with numpy's default_rng and a fixed seed, rounded to 4 decimals.
"""
import json
import pathlib

import numpy as np

HERE = pathlib.Path(__file__).parent


def r4(xs):
    return [round(float(x), 4) for x in xs]


def write(name, data):
    text = json.dumps(data, indent=None)
    (HERE / f"{name}.json").write_text(text + "\n")
    print(f"wrote {name}.json")


def gaussian_mean():
    rng = np.random.default_rng(2024)
    write("gaussian_mean", {"ys": r4(rng.normal(3.1, 2.0, size=20)), "sigma": 2.0})


def linear_regression():
    rng = np.random.default_rng(2)
    xs = np.round(rng.uniform(-2, 2, size=20), 4)
    ys = 0.5 + 1.5 * xs + rng.normal(0, 1.0, size=20)
    write("linear_regression", {"xs": r4(xs), "ys": r4(ys), "sigma": 1.0})


def state_space():
    rng = np.random.default_rng(12)
    a, q, r, x0_sd, T = 0.9, 0.3, 1.5, 1.0, 25
    x = rng.normal(0, x0_sd)
    ys = []
    for _ in range(T):
        x = a * x + rng.normal(0, q)
        ys.append(rng.normal(x, r))
    write("state_space", {"ys": r4(ys), "a": a, "q": q, "r": r, "x0_sd": x0_sd})


def lgssm():
    rng = np.random.default_rng(100)
    a, q, r, x0_sd, T = 0.95, 0.5, 1.0, 2.0, 100
    x = rng.normal(0, x0_sd)
    ys = []
    for _ in range(T):
        x = rng.normal(a * x, q)
        ys.append(rng.normal(x, r))
    write("lgssm", {"ys": r4(ys), "a": a, "q": q, "r": r, "x0_sd": x0_sd})


def mixture():
    # two components, means -2 (weight w) and 2, sd 1; z = True picks the first
    rng = np.random.default_rng(3)
    n, w, sigma = 6, 0.4, 1.0
    z = rng.random(n) < w
    ys = np.where(z, rng.normal(-2.0, sigma, n), rng.normal(2.0, sigma, n))
    write("mixture", {"ys": r4(ys), "w": w, "sigma": sigma})


if __name__ == "__main__":
    gaussian_mean()
    linear_regression()
    state_space()
    lgssm()
    mixture()
