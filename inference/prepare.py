"""What a machine's first NUTS run would otherwise build before sampling, built ahead (by
``scripts/setup.sh``): NUTS's C++ loops (``nuts_native``: ~25 s of the C++ compiler) and
AOTInductor's per-machine parts of every potential's library -- its precompiled headers,
the wrapper's runtime object (``compiled._split_wrapper``) and the ISA checks -- by building
one tiny potential's library (~10 s). Each is built once per machine (and torch version)
and found again by later processes; a model's own library is still built by its first run.

    python -m ppl.inference.prepare      # idempotent: a second run returns at once
"""
from __future__ import annotations

import os
import sys
import time

import torch


def _tiny_potential():
    """A 2-parameter potential's graph (value, gradient, validity flag), as
    ``inference.potential`` records one, with its example inputs."""
    from . import compiled
    data = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)

    def graph(z, beta):
        lp = -0.5 * ((data - z[:, :1]) / z[:, 1:].exp()).square().sum(1) - 5 * z[:, 1]
        grad = torch.stack([((data - z[:, :1]) / z[:, 1:].exp().square()).sum(1),
                            ((data - z[:, :1]).square() / z[:, 1:].exp().square()).sum(1) - 5], 1)
        return beta * lp, beta * grad, torch.isfinite(lp).all()
    example = (torch.zeros(2, 2, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    return compiled.record(graph, example), example


def _stamp() -> str:
    """The file saying this machine was prepared for this torch and these builds (keyed by
    what the artifacts depend on), so that a later setup does not record the tiny potential
    again to find its library."""
    import hashlib

    from . import compiled, nuts_native
    key = hashlib.sha256(repr((torch.__version__, compiled._NATIVE_VERSION, sorted(compiled.FAST_BUILD.items()),
                               compiled.vector_width(), compiled.NATIVE["on"], compiled.SPLIT_WRAPPER["on"],
                               nuts_native._name())).encode()).hexdigest()[:32]
    return os.path.join(compiled.cache_dir(), "ppl_prepared", key)


def prepare_machine(verbose: bool = True) -> dict:
    """Build NUTS's per-machine artifacts where they are missing; returns what was done, with
    the seconds (wall) each took ({} where everything was there). Raises where the C++ compiler
    fails (the caller decides whether that matters: NUTS then runs its eager transition)."""
    from . import compiled, nuts_native
    stamp = _stamp()
    if os.path.exists(stamp) and nuts_native.built():
        return {}
    done = {}
    if not nuts_native.built():
        started = time.perf_counter()
        if verbose:
            print("[prepare] building NUTS's C++ loops (once per machine)", flush=True)
        nuts_native.load()
        done["nuts_native"] = time.perf_counter() - started
    if compiled.NATIVE["on"]:
        started = time.perf_counter()
        if verbose:
            print("[prepare] building AOTInductor's precompiled headers and wrapper runtime (once per machine)",
                  flush=True)
        compiled.build_native(*_tiny_potential())  # (loaded where a previous prepare built it)
        done["aot_inductor"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(stamp), exist_ok=True)
    with open(stamp, "w") as fh:
        fh.write("prepared\n")
    return done


def main() -> int:
    torch.set_num_threads(1)
    try:
        done = prepare_machine()
    except Exception as e:  # noqa: BLE001 - a machine without a working C++ compiler still runs ppl
        print(f"[prepare] not built ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): NUTS will "
              "run its transitions eagerly", file=sys.stderr)
        return 0
    if done:
        print("[prepare] done: " + ", ".join(f"{k} {v:.1f} s" for k, v in done.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
