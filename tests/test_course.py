"""The course (course/*.ipynb, issue 13 item 3): every notebook runs top to bottom, and every
exercise's solution (course/solutions.py) gives the exact answer worked out by hand.

The notebooks are executed with nbclient in a fresh kernel (the venv's python3), one test
each, with a per-notebook timeout; any error in a cell fails the test. Skipped when the
`notebook` extra (nbclient, nbformat, ipykernel) is not installed, except under CI
(.ci/run sets PPL_COURSE_REQUIRED=1: then a missing package is a failure).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import pathlib
import sys
from fractions import Fraction as F

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COURSE = ROOT / "course"
sys.path.insert(0, str(ROOT))

from course import solutions as sol  # noqa: E402

NOTEBOOKS = sorted(COURSE.glob("[0-9][0-9]_*.ipynb"))
#: seconds a notebook may take (wall clock, including the kernel's start) before the test fails
TIMEOUT = 240


def need(module: str):
    """Import a package of the `notebook` extra: skip without it, fail under CI."""
    if os.environ.get("PPL_COURSE_REQUIRED"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def test_course_has_eight_units_in_order():
    names = [p.stem for p in NOTEBOOKS]
    assert len(names) >= 8
    assert [n[:2] for n in names] == [f"{i:02d}" for i in range(1, len(names) + 1)]
    readme = (COURSE / "README.md").read_text()
    assert all(p.name in readme for p in NOTEBOOKS)


def test_notebooks_are_built_from_build_py():
    """The committed .ipynb files are exactly what course/build.py writes (no outputs)."""
    nbformat = need("nbformat")
    sys.path.insert(0, str(COURSE))
    try:
        import build
    finally:
        sys.path.remove(str(COURSE))
    for name, cells in build.UNITS.items():
        committed = nbformat.read(COURSE / f"{name}.ipynb", as_version=4)
        assert [c.source for c in committed.cells] == [build.cell(c).source for c in cells], name
        assert all(not c.get("outputs") for c in committed.cells if c.cell_type == "code"), name


KERNEL = "ppl-course-test"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernelspec of this interpreter (the one with ppl installed), under a name of its own,
    so that a system-wide "python3" kernel of another Python is never picked."""
    need("ipykernel")
    home = tmp_path_factory.mktemp("jupyter")
    spec = home / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ppl (course test)", "language": "python"}))
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "MPLBACKEND")}
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(home)] + ([saved["JUPYTER_PATH"]] if saved["JUPYTER_PATH"] else []))
    os.environ["MPLBACKEND"] = "Agg"
    yield KERNEL
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel):
    nbformat = need("nbformat")
    nbclient = need("nbclient")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT, kernel_name=kernel,
                                     resources={"metadata": {"path": str(COURSE)}})
    client.execute()        # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


# ------------------------------------------------------------------ exercise answers
def test_unit01():
    assert sol.unit01_heads() == {0: F(1, 8), 1: F(3, 8), 2: F(3, 8), 3: F(1, 8)}
    mean, se = sol.unit01_sampled_mean()
    assert abs(mean - 3.0) < 4 * se          # sd(binomial(10, 0.3)) / sqrt(4000) = 0.023


def test_unit02():
    assert sol.unit02_dice() == F(1, 6)
    assert sol.unit02_test() == (F(1, 12), F(27, 250))


def test_unit03():
    assert sol.unit03_independence() == (True, False)
    assert sol.unit03_explaining_away() == (F(475, 1366), F(1, 10))


def test_unit04():
    assert sol.unit04_exact_coin() == F(9, 14)
    mean, mcse = sol.unit04_nuts_coin()
    assert abs(mean - 9 / 14) < 4 * mcse


def test_unit05():
    assert sol.unit05_cluster() == pytest.approx(sol.unit05_cluster_closed_form(), rel=1e-12)
    assert sol.unit05_cluster_closed_form() == pytest.approx(0.3 * math.exp(-1) / (0.3 * math.exp(-1) + 0.7 * math.e))
    # nothing left to sample: exact up to float32 densities, whatever the particle count
    assert sol.unit05_evidence_summed_out() == pytest.approx(sol.unit05_evidence_closed_form(), rel=1e-5)


def test_unit06():
    assert sol.unit06_ess([0.0, 0.0, 0.0, 0.0]) == pytest.approx(4.0)
    assert sol.unit06_ess([0.0, math.log(3.0)]) == pytest.approx(16 / 10)
    r = sol.unit06_coin_evidence_is()
    assert sol.unit06_ess(r.log_weights.tolist()) == pytest.approx(r.ess, rel=1e-9)
    exact = sol.unit06_coin_evidence_exact()
    assert exact == pytest.approx(math.log(math.gamma(9) * math.gamma(5) / math.gamma(14) * 6), rel=1e-12)
    # the relative sd of Z_hat is about sqrt(N / ESS - 1 / N) / sqrt(N) (delta method): 4 of them in log space
    assert abs(r.log_evidence - exact) < 4 * math.sqrt(1 / r.ess)


def test_unit07():
    assert sol.unit07_two_apples() == {1: F(3, 4), 2: F(1, 4)}


def test_unit08():
    assert sol.unit08_first_word() == F(4, 5)

