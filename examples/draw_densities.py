"""Write the joint densities of two example models as LaTeX and as PNG files.

    python examples/draw_densities.py [FOLDER]        (default: examples/out)

Writes ``eight_schools_density.png`` (examples/eight_schools.ppl: the data as symbols,
the schools as sums over i = 0..N-1) and ``twisted_hmm_density.png`` (the HMM of
examples/twisted_hmm.ppl on its first three observations, unrolled: its loop carries the
state z), one term of ``Model.latex`` per line, rendered by matplotlib's mathtext; prints
the LaTeX too.
"""
from __future__ import annotations

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")  # write files, never open a window

import matplotlib.pyplot as plt  # noqa: E402
import sympy as sp  # noqa: E402

import ppl  # noqa: E402
from ppl.semantics import symbolic  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent


def _load(name: str):
    return ppl.model(str(HERE / f"{name}.ppl")), json.loads((HERE / f"{name}.json").read_text())


def density_lines(model, data, symbolic_data: bool) -> list[str]:
    """``\\log p(...) =`` and then one term of the density per line (mathtext)."""
    d = symbolic.density(model.program, model.entry, data, symbolic_data)
    head = model.latex(data, symbolic_data=symbolic_data).split(" = ")[0] + " ="
    terms = sp.Add.make_args(d.expr)
    constant = sp.Add(*[t for t in terms if not t.free_symbols])  # normalising constants: one line
    terms = sorted((t for t in terms if t.free_symbols), key=lambda t: (not t.has(sp.Sum), sp.default_sort_key(t)))
    if constant != 0:
        terms.append(constant)
    return [head] + [_signed(t, first=k == 0) for k, t in enumerate(terms)]


def _signed(term, first: bool) -> str:
    if isinstance(term, sp.Add):  # (the constants' line: a sum, kept whole in parentheses)
        return ("" if first else "+ ") + r"\left(" + sp.latex(term) + r"\right)"
    if term.could_extract_minus_sign():
        return "- " + sp.latex(-term)
    return ("" if first else "+ ") + sp.latex(term)


def draw(lines: list[str], path: pathlib.Path) -> None:
    fig = plt.figure(figsize=(11, 0.55 * len(lines) + 0.3))
    for k, line in enumerate(lines):
        fig.text(0.01 if k == 0 else 0.04, 1 - (k + 0.8) / (len(lines) + 0.3), f"${line}$", fontsize=12)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(folder: str | pathlib.Path = HERE / "out") -> list[pathlib.Path]:
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    schools, schools_data = _load("eight_schools")
    hmm, hmm_data = _load("twisted_hmm")
    written = []
    for model, data, name, symbolic_data in ((schools, schools_data, "eight_schools", True),
                                             (hmm, {"ys": hmm_data["ys"][:3], "use_twist": False}, "twisted_hmm",
                                              False)):
        lines = density_lines(model, data, symbolic_data)
        path = folder / f"{name}_density.png"
        draw(lines, path)
        print(model.latex(data, symbolic_data=symbolic_data))
        written.append(path)
    for path in written:
        print("wrote", path)
    return written


if __name__ == "__main__":
    main(*sys.argv[1:2])
