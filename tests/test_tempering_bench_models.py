"""Issue 11's tempering target on the benchmark's own protocol: tempered SMC with adaptive
moves (``adapt=True``), chains x draws = 4,000 particles, the bench's first seed
(``bench/bench_nuts.py``'s ``child_ppl_tempering``), gets every posterior mean within 0.1
posterior sd of the reference (``bench/references.json``: the closed form for the
calendar-year regression, quadrature for eight schools, a long NumPyro run for AR(2)).

These three failed in the bench report of an earlier commit (calendar 3.08 sd, AR 0.24,
eight schools 0.101); at 4,000 particles the Monte Carlo error of a weighted mean is about
0.02 sd (measured over seeds 1-2: 0.002-0.02), so 0.1 sd is 5 of its standard errors and a
bias of the size reported would fail."""
import json
from pathlib import Path

import pytest
import torch

import ppl

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
REFERENCES = json.loads((ROOT / "bench" / "references.json").read_text())
TARGET = 0.1  # issue 11: every mean within 0.1 posterior sd
PARTICLES = 4000  # the bench's 4 chains x 1000 draws


def _columns(samples: dict) -> dict:
    out = {}
    for name, value in samples.items():
        x = torch.as_tensor(value).double()
        x = x.reshape(x.shape[0], -1)
        for j in range(x.shape[1]):
            out[name if x.shape[1] == 1 else f"{name}[{j}]"] = x[:, j]
    return out


@pytest.mark.parametrize("name", ["calendar_regression", "ar", "eight_schools"])
def test_adaptive_tempering_is_within_a_tenth_of_a_posterior_sd(name):
    model = ppl.model(str(ROOT / "examples" / f"{name}.ppl"))
    data = json.loads((ROOT / "examples" / f"{name}.json").read_text())
    res = model.run("tempering", data, particles=PARTICLES, seed=1, adapt=True)
    w = res.weights.double()
    w = w / w.sum()
    columns = _columns(res.samples)
    reference = REFERENCES[name]["columns"]
    errors = {}
    for column, ref in reference.items():
        mean = float((w * columns[column]).sum())
        errors[column] = abs(mean - ref["mean"]) / ref["sd"]
    worst = max(errors, key=errors.get)
    assert errors[worst] < TARGET, (worst, errors[worst])
