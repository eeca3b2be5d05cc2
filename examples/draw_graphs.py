"""Draw the dependency graphs of two example models to PNG files.

    python examples/draw_graphs.py [FOLDER]        (default: examples/out)

Writes ``eight_schools.png`` (eight schools, examples/eight_schools.ppl with its data)
and ``twisted_hmm.png`` (the two-state HMM, examples/twisted_hmm.ppl), each with its
loops drawn as plates (``hmm_unrolled.png``: the HMM with every time step), and prints
what the graphs say: which sites are independent, given what, and Markov blankets.
"""
from __future__ import annotations

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")  # write files, never open a window

import ppl  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent


def _load(name: str):
    return ppl.model(str(HERE / f"{name}.ppl")), json.loads((HERE / f"{name}.json").read_text())


def main(folder: str | pathlib.Path = HERE / "out") -> list[pathlib.Path]:
    """Write the PNG files into ``folder``; returns their paths."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    schools, schools_data = _load("eight_schools")
    hmm, hmm_data = _load("twisted_hmm")
    written = []
    for model, data, name, collapse in ((schools, schools_data, "eight_schools", True),
                                        (hmm, hmm_data, "twisted_hmm", True),
                                        (hmm, {"ys": hmm_data["ys"][:4]}, "hmm_unrolled", False)):
        path = folder / f"{name}.png"
        fig = model.draw(data, path, collapse=collapse)
        matplotlib.pyplot.close(fig)
        written.append(path)
    print("eight schools: mu and tau independent a priori:",
          schools.independent("mu", "tau", data=schools_data, observed=False),
          "| given the data:", schools.independent("mu", "tau", data=schools_data))
    print("HMM: z[0] and z[5] independent given z[3]:",
          hmm.independent("z[0]", "z[5]", given=["z[3]"], data=hmm_data))
    print("HMM: Markov blanket of z[3]:", sorted(hmm.markov_blanket("z[3]", data=hmm_data)))
    for path in written:
        print("wrote", path)
    return written


if __name__ == "__main__":
    main(*sys.argv[1:2])
