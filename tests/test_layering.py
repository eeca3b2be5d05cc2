"""Layers point one way (issue 10, item 3): ``inference/`` never imports the Python face
(``ppl.api``, ``ppl.result``, ``ppl.testing``, the CLI) or the compiler, not even inside a
function, and every entry of ``inference.METHODS`` returns the inference layer's own type
(``Population``, ``Chains``, ``Optimum`` or exact paths), which the face wraps."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ppl
from ppl.inference import METHODS, Chains, Optimum, Population
from ppl.stdlib import rng

ROOT = Path(__file__).resolve().parent.parent
INFERENCE = sorted((ROOT / "inference").glob("*.py"))
#: what inference/ may import from ppl: the layers below it, and itself
ALLOWED = ("ppl.inference", "ppl.semantics", "ppl.stdlib")


def _imports(path: Path, package: str = "inference"):
    """(line, absolute module name) of every import in the file, at any depth
    (``package``: the folder's name under ``ppl``, to resolve relative imports)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.lineno, node.module or ""
            else:  # inference/x.py: "." is ppl.inference, ".." is ppl
                base = ["ppl", package][:3 - node.level] if node.level <= 2 else []
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from .. import x: each name is a module
                    for alias in node.names:
                        yield node.lineno, f"{mod}.{alias.name}"
                else:
                    yield node.lineno, mod


def test_inference_imports_nothing_above_it():
    bad = []
    for path in INFERENCE:
        for line, mod in _imports(path):
            if (mod == "ppl" or mod.startswith("ppl.")) and not mod.startswith(ALLOWED):
                bad.append(f"{path.name}:{line}: {mod}")
    assert not bad, "inference/ imports the layer above it:\n" + "\n".join(bad)


#: for each lower layer, what it may import from ppl (compiler -> semantics <- inference <- ppl)
LOWER_LAYERS = {
    "semantics": ("ppl.semantics", "ppl.stdlib"),
    "compiler": ("ppl.compiler", "ppl.semantics", "ppl.stdlib"),
}


@pytest.mark.parametrize("package", sorted(LOWER_LAYERS))
def test_the_lower_layers_import_nothing_above_them(package):
    """semantics/ never imports the compiler, inference or the face; the compiler never
    imports inference or the face (not even inside a function)."""
    bad = [f"{path.name}:{line}: {mod}" for path in sorted((ROOT / package).glob("*.py"))
           for line, mod in _imports(path, package)
           if (mod == "ppl" or mod.startswith("ppl.")) and not mod.startswith(LOWER_LAYERS[package])]
    assert not bad, f"{package}/ imports a layer above it:\n" + "\n".join(bad)


def test_the_issue_grep_finds_nothing():
    """The issue's own check, text included (docstrings name the face by path instead)."""
    pattern = re.compile(r"ppl.result|ppl.api|ppl.testing|from \.\.api")
    hits = [f"{p.name}:{i}: {line.strip()}" for p in INFERENCE
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)


def test_import_ppl_inference_in_a_fresh_interpreter():
    p = subprocess.run([sys.executable, "-c", "import ppl.inference; print(sorted(ppl.inference.METHODS))"],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=120)
    assert p.returncode == 0, p.stderr
    assert "'smc'" in p.stdout


COIN = """
def coin(flips):
    p ~ beta(2, 2)
    b ~ flip(0.5)
    for f in flips:
        observe f ~ bernoulli(p)
    return p
"""
FINITE = """
def finite(x):
    a ~ flip(0.3)
    observe x ~ normal(1.0 if a else 0.0, 1.0)
    return a
"""
RAW = {
    "importance": ({}, Population), "prior": ({}, Population), "smc": ({}, Population),
    "resample_move": ({}, Population), "tempering": ({"schedule": [0.5, 1.0]}, Population),
    "smc_steer": ({"expansion": 2}, Population), "best_of_n": ({}, Optimum), "beam": ({"beam_width": 4}, Optimum),
    "mh": ({"samples": 10, "burn_in": 2}, Chains),
    "pmmh": ({"params": "p", "samples": 5, "burn_in": 1}, Chains),
    "nuts": ({"samples": 10, "burn_in": 5}, Chains), "hmc": ({"samples": 10, "burn_in": 5}, Chains),
}


@pytest.mark.parametrize("method", sorted(RAW))
def test_every_method_returns_the_raw_inference_type(method):
    options, kind = RAW[method]
    m = ppl.model(COIN)
    with rng.run(0):
        raw = METHODS[method](m, {"flips": [1, 0, 1]}, particles=16, device="cpu", **options)
    assert type(raw) is kind
    wrapped = ppl.as_result(raw)
    assert wrapped.method == method and ppl.as_result(wrapped) is wrapped


def test_enumerate_returns_exact_paths():
    m = ppl.model(FINITE)
    paths = METHODS["enumerate"](m, {"x": 1.0})
    assert isinstance(paths, list) and len(paths) == 2
    assert sum(w for w, v in paths if v["return"]) / sum(w for w, _ in paths) == \
        pytest.approx(m.run("enumerate", {"x": 1.0}).mean(), rel=1e-15)


def test_every_builtin_method_is_covered():
    from ppl.registry import BUILTIN_METHODS
    assert BUILTIN_METHODS == set(RAW) | {"enumerate"}


FACTOR = """
def f(ys):
    mu ~ normal(0, 1)
    factor -mu * mu
    for y in ys:
        observe y ~ normal(mu, 1)
    return mu
"""


def test_one_prior_predictive_handler_for_sbc_and_amortized_training():
    """The prior-predictive simulator lives below inference/ (semantics/prior_predictive.py)
    and serves SBC and forward-KL training, each refusing a `factor` in its own words, at
    the factor."""
    from ppl.testing.sbc import prior_predictive
    m = ppl.model(FACTOR)
    with pytest.raises(ppl.PPLError, match="SBC cannot simulate data from a model with `factor`") as e:
        prior_predictive(m, {"ys": [0.0]}, simulations=2, seed=0)
    assert "<model>:4:5" in str(e.value)
    g = ppl.guide(m, {"ys": [0.0, 1.0]}, encoder="auto")
    with pytest.raises(ppl.PPLError, match="cannot simulate data sets from a model with `factor`") as e:
        g.fit(objective="forward_kl", steps=1, seed=0, progress=False)
    assert "<model>:4:5" in str(e.value) and "forward_kl" in str(e.value)
