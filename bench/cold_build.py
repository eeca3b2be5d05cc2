"""Where a cold AOTInductor build of a NUTS potential spends its CPU (``compiled.build_native``
on a fresh ``TORCHINDUCTOR_CACHE_DIR``): Inductor's Python (lowering, code generation), each
compiler command (header preprocessing for the precompiled-header key, the precompiled
headers themselves, wrapper.cpp, kernel.cpp, the link) with its children's CPU, loading.

    .venv/bin/python bench/cold_build.py eight_schools logistic_regression garch
    .venv/bin/python bench/cold_build.py garch --options '{"aot_inductor.compile_wrapper_opt_level": "O0"}'

Each model runs in a fresh process with a fresh cache directory (Inductor's and so the graph
store's); the precompiled headers live in Inductor's *default* cache directory
(``/tmp/torchinductor_$USER/precompiled_headers``), shared by every process on the machine,
so they are warm unless ``--cold-headers`` points that directory somewhere fresh too (by
``TMPDIR``); so is the wrapper's runtime part (``compiled._split_wrapper``: an object made once
per machine in ``ppl_wrapper_runtime/`` beside them; ``PPL_SPLIT_WRAPPER=0`` compiles the
wrapper whole, with its precompiled header), and so are the ISA checks' answers
(``compiled._fast_lowering``: ``ppl_isa_checks/`` beside them; ``PPL_FAST_LOWERING=0`` builds as
before it, a fresh cache directory then paying the checks). ``--options`` adds AOTInductor options to ``build_native``'s (monkeypatched
into ``aot_compile``: the library's cache key is not touched, as the cache is fresh anyway).
``--outputs DIR`` saves the library's outputs at fixed random inputs (values, gradients,
flags) for a bit-for-bit comparison of two builds (``--compare A B``).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _what(cmd: str) -> str:
    """A short name for a compiler command."""
    words = cmd.split()
    if words[:2] == ["ld", "-r"]:
        return "join wrapper objects (ld -r)"
    if "-E" in words:
        return "preprocess header (PCH key)"
    if "c++-header" in words or any(w.endswith(".h") for w in words[1:2]):
        return "precompile header (per machine)"
    source = next((w for w in words if w.endswith(".cpp")), "")
    if source.endswith(".runtime.wrapper.cpp"):
        return "compile wrapper runtime (per machine)"
    if source.endswith(".model.wrapper.cpp"):
        return "compile wrapper.cpp (graph's part)"
    if source.endswith("wrapper.cpp"):
        return "compile wrapper.cpp"
    if source.endswith("kernel.cpp"):
        return "compile kernel.cpp"
    if "-shared" in words and "ppl_native" not in cmd:
        return "ISA check (per cache dir; per machine with _fast_lowering)"
    if "-shared" in words:
        return "link"
    return "other: " + " ".join(words[:2])[-40:]


def child(name: str, options: dict, outputs: str | None, keep: str | None, fast: bool = True) -> dict:
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "bench"))
    import ppl
    from ppl.inference import compiled
    if not fast:
        compiled.FAST_BUILD = {}
    from ppl.inference.mh import initial_state
    from ppl.inference.potential import build_potential
    from ppl.inference.randomness import TorchRandomness
    from ppl.semantics.gfi import ModelRun
    from nuts_models import MODELS

    spec = MODELS[name]
    m = ppl.model(str(spec.ppl_file))
    interp, data = m.interpreter(), m.prepare_data(m.bind((), spec.data()), "cpu")
    with ppl.api.seeded(0, "cpu"):
        state = initial_state(interp, m.entry, data, 4, "cpu", TorchRandomness())
    p = build_potential(ModelRun(interp, m.entry, data, "cpu"), state, traced=True, compile=False)
    gm, example = p._recorded
    ex = example()
    report: dict = {"model": name, "ops": len(gm.graph.nodes), "options": options, "steps": [],
                    "fast_build": dict(compiled.FAST_BUILD)}

    c0, t0 = _children(), time.process_time()
    import torch._inductor  # noqa: F401
    from torch._inductor import aot_compile, codecache, cpp_builder  # noqa: F401
    report["import_inductor"] = time.process_time() - t0

    steps = report["steps"]
    original_run = cpp_builder._run_compile_cmd

    def timed_run(cmd_line, cwd):
        c, w = _children(), time.perf_counter()
        try:
            return original_run(cmd_line, cwd)
        finally:
            steps.append({"what": _what(cmd_line), "cpu": _children() - c, "wall": time.perf_counter() - w,
                          "cmd": cmd_line})
            if keep:
                os.makedirs(keep, exist_ok=True)
                for part in cmd_line.split():
                    if part.endswith(".cpp") and os.path.exists(part):
                        with open(part) as src, open(os.path.join(keep, pathlib.Path(part).name), "w") as dst:
                            dst.write(src.read())
                with open(os.path.join(keep, "commands.txt"), "a") as fh:
                    fh.write(cmd_line + "\n")
    cpp_builder._run_compile_cmd = timed_run

    original_pack = compiled._packed_graph
    phases = {}

    def timed_pack(*a, **k):
        t = time.process_time()
        try:
            return original_pack(*a, **k)
        finally:
            phases["record packed graph"] = time.process_time() - t
    compiled._packed_graph = timed_pack

    original_compile = codecache.AotCodeCompiler.compile.__func__

    def timed_compile(cls, *a, **k):
        t, c = time.process_time(), _children()
        phases["lowering + codegen"] = t - phases["aot_compile start"]
        try:
            return original_compile(cls, *a, **k)
        finally:
            phases["AotCodeCompiler python"] = time.process_time() - t
            phases["AotCodeCompiler children"] = _children() - c
    codecache.AotCodeCompiler.compile = classmethod(timed_compile)

    import torch._inductor as inductor
    original_aot = inductor.aot_compile

    def aot_with_options(gm_, args, options=None):
        phases["aot_compile start"] = time.process_time()
        if os.environ.get("COLD_BUILD_PROFILE"):
            import cProfile
            prof = cProfile.Profile()
            try:
                return prof.runcall(original_aot, gm_, args, options={**(options or {}), **report["options"]})
            finally:
                prof.dump_stats(os.environ["COLD_BUILD_PROFILE"])
        return original_aot(gm_, args, options={**(options or {}), **report["options"]})
    inductor.aot_compile = aot_with_options

    c1, t1, w1 = _children(), time.process_time(), time.perf_counter()
    run = compiled.build_native(gm, ex)
    report["build_process"] = time.process_time() - t1
    report["build_children"] = _children() - c1
    report["build_wall"] = time.perf_counter() - w1
    # (the packed graph is recorded before ``aot_compile`` starts: not part of this phase)
    phases.pop("aot_compile start")
    report["phases"] = phases
    report["total_with_import"] = report["build_process"] + report["build_children"] + report["import_inductor"] \
        + (c1 - c0)
    report["library_bytes"] = os.path.getsize(compiled.native_library(run).path)
    report["call_us"] = _call_us(run, ex)
    if outputs:
        _save_outputs(run, ex, outputs, name)
    return report


def _call_us(run, ex) -> float:
    """The library's CPU per call (us), median of 7 blocks of 500 calls."""
    import statistics
    for _ in range(200):
        run(*ex)
    blocks = []
    for _ in range(7):
        t = time.process_time()
        for _ in range(500):
            run(*ex)
        blocks.append((time.process_time() - t) / 500 * 1e6)
    return statistics.median(blocks)


def _save_outputs(run, ex, outputs: str, name: str) -> None:
    """The library's outputs at 64 batches of random points (near the example and far from it)."""
    import torch
    g = torch.Generator().manual_seed(1234)
    z0 = ex[0]
    results = []
    for k in range(64):
        scale = [0.01, 0.3, 1.0, 3.0][k % 4]
        z = z0 + scale * torch.randn(z0.shape, generator=g, dtype=z0.dtype)
        results.append([o.clone() for o in run(z, *ex[1:])])
    os.makedirs(outputs, exist_ok=True)
    torch.save(results, os.path.join(outputs, f"{name}.pt"))


def compare(a: str, b: str) -> None:
    import torch
    for path in sorted(pathlib.Path(a).glob("*.pt")):
        if not (pathlib.Path(b) / path.name).exists():
            continue
        left, right = torch.load(path), torch.load(pathlib.Path(b) / path.name)
        same = all(torch.equal(x, y) or (x.dtype.is_floating_point and bool(((x == y) | (x.isnan() & y.isnan())).all()))
                   for lo, ro in zip(left, right) for x, y in zip(lo, ro))
        print(f"{path.stem}: {'bit-identical' if same else 'DIFFERENT'} ({len(left)} batches)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*")
    ap.add_argument("--options", default="{}")
    ap.add_argument("--outputs")
    ap.add_argument("--keep")
    ap.add_argument("--cold-headers", action="store_true")
    ap.add_argument("--no-fast", action="store_true", help="without compiled.FAST_BUILD (the build before it)")
    ap.add_argument("--json")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--compare", nargs=2)
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.child:
        if args.keep:
            os.environ["COLD_BUILD_KEEP"] = args.keep
        print(json.dumps(child(args.models[0], json.loads(args.options), args.outputs, args.keep, not args.no_fast)))
        return
    reports = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as fresh:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(fresh, "inductor"), "OMP_NUM_THREADS": "1"}
            if args.cold_headers:
                env["TMPDIR"] = fresh
            cmd = [sys.executable, __file__, name, "--child", "--options", args.options] + \
                (["--no-fast"] if args.no_fast else [])
            if args.outputs:
                cmd += ["--outputs", args.outputs]
            if args.keep:
                cmd += ["--keep", os.path.join(args.keep, name)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                print(out.stderr[-3000:])
                continue
            report = json.loads(out.stdout.strip().splitlines()[-1])
            report["load"] = os.getloadavg()[0]
            reports.append(report)
            _print(report)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(reports, indent=1))


def _print(r: dict) -> None:
    print(f"== {r['model']} ({r['ops']} ops) options={r['options']} fast_build={bool(r['fast_build'])} "
          f"load={r['load']:.1f}")
    print(f"   import inductor {r['import_inductor']:.2f}  build: process {r['build_process']:.2f} + children "
          f"{r['build_children']:.2f} (wall {r['build_wall']:.2f})  total {r['total_with_import']:.2f} s CPU; "
          f"library {r['library_bytes'] / 1e3:.0f} kB; call {r.get('call_us', 0):.1f} us")
    for k, v in r["phases"].items():
        print(f"   {k:28s} {v:6.2f}")
    totals: dict = {}
    for s in r["steps"]:
        totals[s["what"]] = totals.get(s["what"], 0.0) + s["cpu"]
    for what, cpu in totals.items():
        print(f"   gcc {what:28s} cpu {cpu:6.2f}")
    rest = r["build_children"] - sum(totals.values())
    print(f"   other children (ISA dlopen probes, openssl) cpu {rest:6.2f}")


if __name__ == "__main__":
    main()
