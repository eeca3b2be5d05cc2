"""Regenerate the data sets of the continuous-model examples (run once; the .json files
are committed, so the examples, their tests and the benchmark never depend on this
script).

    python examples/make_continuous_data.py

Each simulated data set is drawn with numpy's default_rng and a fixed seed, rounded to 4
decimals; eight schools is the classic data (Rubin 1981; Gelman et al., BDA3 section 5.5).
The models and their true parameters are stated in each example's header.
"""
import json
import pathlib

import numpy as np

HERE = pathlib.Path(__file__).parent


def r4(xs):
    return [round(float(x), 4) for x in xs]


def write(name, data):
    (HERE / f"{name}.json").write_text(json.dumps(data, indent=None) + "\n")
    print(f"wrote {name}.json")


def eight_schools():
    write("eight_schools", {"y": [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0],
                            "sigma": [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]})


def calendar_regression():
    # one measurement a year, 2000..2020: y = 3 + 0.25 (year - 2000) + N(0, 1)
    rng = np.random.default_rng(11)
    years = np.arange(2000, 2021)
    ys = 3.0 + 0.25 * (years - 2000) + rng.normal(0, 1.0, size=years.size)
    write("calendar_regression", {"years": [float(x) for x in years], "ys": r4(ys), "sigma": 1.0})


def ar():
    # AR(2): y_t = 0.5 + 0.6 y_{t-1} - 0.3 y_{t-2} + N(0, 0.8), 100 points after 50 of burn-in
    rng = np.random.default_rng(12)
    alpha, beta, sigma, burn, n = 0.5, (0.6, -0.3), 0.8, 50, 100
    y = [0.0, 0.0]
    for _ in range(burn + n):
        y.append(alpha + beta[0] * y[-1] + beta[1] * y[-2] + rng.normal(0, sigma))
    write("ar", {"ys": r4(y[-n:]), "K": 2})


def garch():
    # GARCH(1,1): r_t ~ N(mu, sigma_t), sigma_t^2 = a0 + a1 (r_{t-1} - mu)^2 + b1 sigma_{t-1}^2
    rng = np.random.default_rng(13)
    mu, a0, a1, b1, sigma1, n = 0.1, 0.2, 0.25, 0.6, 1.0, 150
    rs, sigma = [], sigma1
    for t in range(n):
        if t > 0:
            sigma = np.sqrt(a0 + a1 * (rs[-1] - mu) ** 2 + b1 * sigma ** 2)
        rs.append(rng.normal(mu, sigma))
    write("garch", {"rs": r4(rs), "sigma1": sigma1})


def gp_regression():
    # 11 points on [0, 10]: y = sin(x) + N(0, 0.3)
    rng = np.random.default_rng(14)
    xs = np.linspace(0.0, 10.0, 11)
    ys = np.sin(xs) + rng.normal(0, 0.3, size=xs.size)
    write("gp_regression", {"xs": r4(xs), "ys": r4(ys)})


def logistic_regression():
    # 200 points, two standard-normal predictors: P(y) = sigmoid(-0.5 + 1.2 x1 - 0.8 x2)
    rng = np.random.default_rng(15)
    n = 200
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    p = 1 / (1 + np.exp(-(-0.5 + 1.2 * x1 - 0.8 * x2)))
    ys = (rng.random(n) < p).astype(int)
    write("logistic_regression", {"x1": r4(x1), "x2": r4(x2), "ys": [int(v) for v in ys]})


def mixture_marginal():
    # 100 points: weight 0.3 on N(-1.5, 1), 0.7 on N(2, 1)
    rng = np.random.default_rng(16)
    n = 100
    first = rng.random(n) < 0.3
    ys = np.where(first, rng.normal(-1.5, 1.0, n), rng.normal(2.0, 1.0, n))
    write("mixture_marginal", {"ys": r4(ys)})


if __name__ == "__main__":
    eight_schools()
    calendar_regression()
    ar()
    garch()
    gp_regression()
    logistic_regression()
    mixture_marginal()
