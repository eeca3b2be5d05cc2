"""Posterior predictive check of the eight schools model (examples/eight_schools.ppl).

NUTS draws the posterior; ``Model.predictive`` replays each draw's mu, tau and theta_tilde
and draws fresh school effects y_rep[j] ~ normal(theta[j], sigma[j]); the figure compares
the observed mean and sd of the eight estimates with their replicated distributions (a
p-value near 0 or 1 would say the model misses that aspect of the data). Then the same
draws go to ArviZ: ``az.plot_ppc`` of the replicated data, the trace plot (divergences
marked) and the LOO cross-validation.

Run:
    python examples/ppc_eight_schools.py    # writes docs/ppc_eight_schools.png,
                                            # docs/ppc_eight_schools_arviz.png, docs/trace_eight_schools.png
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # (run from a checkout)

import ppl  # noqa: E402


def check(out_dir: Path, samples: int = 1000, burn_in: int = 1000, seed: int = 0):
    """Run NUTS, the posterior predictive and the plots; returns (result, predictive, the
    predictive-check Figure, the InferenceData). Writes the two PNGs into ``out_dir``."""
    from ppl.results.plots import _pyplot
    model = ppl.model(str(HERE / "eight_schools.ppl"))
    data = json.loads((HERE / "eight_schools.json").read_text())
    result = model.run("nuts", data, particles=4, samples=samples, burn_in=burn_in, seed=seed)
    replicated = model.predictive(result, n=None, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = replicated.plot(stat=("mean", "sd", "max"), path=str(out_dir / "ppc_eight_schools.png"))
    idata = result.to_arviz(predictive=replicated)
    import arviz as az
    plt = _pyplot()
    axes = az.plot_ppc(idata, num_pp_samples=100, random_seed=seed)
    axes_fig = (axes.ravel()[0] if hasattr(axes, "ravel") else axes).figure
    axes_fig.savefig(out_dir / "ppc_eight_schools_arviz.png", dpi=100)
    plt.close(axes_fig)
    trace = result.plot_trace(var_names=["mu", "tau", "theta_tilde"])
    trace.savefig(out_dir / "trace_eight_schools.png", dpi=80)
    plt.close(trace)
    return result, replicated, fig, idata


if __name__ == "__main__":
    warnings.simplefilter("ignore", ppl.PPLDiagnosticWarning)
    result, replicated, fig, idata = check(HERE.parent / "docs")
    import arviz as az
    print(result.summary(["mu", "tau"]))
    for stat in ("mean", "sd", "max"):
        print(f"posterior predictive p-value of the {stat}: {replicated.p_value(stat, 'y'):.2f}")
    print(az.loo(idata))
