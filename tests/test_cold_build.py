"""A cold AOTInductor build of the potential made cheaper without changing a bit of what the
library computes (issue 11, "the cold first run": ``compiled.FAST_BUILD``; where the time goes:
``bench/cold_build.py``).

The options skip the vector-ISA check (a test library compiled and loaded per ISA: ~8.5 s of
gcc per cache directory, ~1.3 s of dlopen probes per process) and compile the C++ wrapper at
-O0 without line tables or frame pointers. The kernels are compiled as before, so the outputs
must be bit-identical; the options are part of the library's cache key, so a library built
without them is never loaded as one built with them (or the reverse); and where gcc fails
without the ISA check, the build is made again with it."""
from __future__ import annotations

import pytest
import torch
import torch._inductor

from ppl.inference import compiled

pytestmark = pytest.mark.skipif(not compiled.NATIVE["on"], reason="PPL_COMPILED_NATIVE=0")


def _graph():
    data = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)

    def f(z, beta):
        lp = -0.5 * ((data.unsqueeze(0) - z[:, :1]) / z[:, 1:].exp()).pow(2).sum(1) - 5 * z[:, 1]
        return beta * lp, torch.stack([z[:, 0].exp() * 1.5, z[:, 1].tanh()], 1), (lp > -1e300).all()
    example = (torch.randn(3, 2, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))
    return compiled.record(f, example), example


def test_the_build_options_are_part_of_the_librarys_cache_key(monkeypatch):
    gm, example = _graph()
    inputs = [*example, *compiled._tensors_held(gm)]
    fast = compiled._native_path(gm, inputs)
    assert compiled._native_path(gm, inputs) == fast  # (a key, the same every time)
    monkeypatch.setattr(compiled, "FAST_BUILD", {})
    assert compiled._native_path(gm, inputs) != fast
    monkeypatch.setattr(compiled, "FAST_BUILD", {**compiled.FAST_BUILD, "aot_inductor.enable_line_tables": True})
    assert compiled._native_path(gm, inputs) != fast


def test_where_gcc_fails_without_the_isa_check_the_build_is_made_again_with_it():
    from torch._inductor.exc import CppCompileError
    calls = []

    def aot_compile(flat, inputs, options):
        calls.append(options)
        if len(calls) == 1:
            raise CppCompileError(["g++"], "error: unrecognized command-line option '-mamx-tile'")
        return "/built/graph.so"
    assert compiled._aot_compile_fast(aot_compile, None, (), {"memory_planning": True}) == "/built/graph.so"
    first, second = calls
    assert first == {"memory_planning": True, **compiled.FAST_BUILD} and first["cpp.vec_isa_ok"] is True
    assert second["cpp.vec_isa_ok"] is None and second["memory_planning"] is True
    assert {k: v for k, v in second.items() if k != "cpp.vec_isa_ok"} == \
        {k: v for k, v in first.items() if k != "cpp.vec_isa_ok"}


def test_the_fast_build_computes_bit_for_bit_what_the_full_build_computes(monkeypatch):
    """Two libraries of one graph, with and without ``FAST_BUILD`` (each under its own key):
    values, gradients and validity flags equal bit for bit at random points, near and far.
    (The 7 bench models' potentials were checked the same way at 64 batches each:
    ``bench/cold_build.py --compare``.)"""
    gm, example = _graph()
    fast = compiled.build_native(gm, example)
    monkeypatch.setattr(compiled, "FAST_BUILD", {})
    full = compiled.build_native(gm, example)
    assert compiled.native_library(full).path != compiled.native_library(fast).path
    g = torch.Generator().manual_seed(7)
    for scale in (0.1, 1.0, 10.0):
        z = scale * torch.randn(3, 2, dtype=torch.float64, generator=g)
        beta = torch.rand((), dtype=torch.float64, generator=g)
        for a, b in zip(fast(z, beta), full(z, beta)):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_the_wrapper_compiled_in_two_parts_computes_bit_for_bit_what_the_whole_one_computes(monkeypatch, tmp_path):
    """``compiled._split_wrapper``: AOTInductor's wrapper.cpp compiled as the runtime's fixed
    part (an object made once per machine, next to the precompiled headers) and the graph's
    own part (~1.5 s of gcc instead of ~5 s for the whole, with array_ref.h's light part precompiled). Both kinds of wrapper (buffers
    on the stack, with the minimal array-ref entry points and their helpers written into the
    graph's part; a planned pool) are split, the runtime's object is reused by a second graph,
    and the libraries compute bit for bit what the wrapper compiled whole computes."""
    monkeypatch.setattr(compiled, "cache_dir", lambda: str(tmp_path / "fresh"))
    monkeypatch.setitem(compiled.SPLIT_WRAPPER, "on", True)
    gm, example = _graph()
    native_path, buffer_options = compiled._native_path, compiled._buffer_options
    built = {}
    for kind, buffers in (("stack", None), ("pool", {"memory_planning": True})):
        if buffers:
            monkeypatch.setattr(compiled, "_buffer_options", lambda graph: buffers)
        for split in (True, False):
            monkeypatch.setitem(compiled.SPLIT_WRAPPER, "on", split)
            monkeypatch.setitem(compiled.SPLIT_WRAPPER, "last", None)
            monkeypatch.setattr(compiled, "_native_path",
                                lambda *a, tag=f"{kind}.{split}": native_path(*a)[:-len(".so")] + f".{tag}.so")
            built[kind, split] = compiled.build_native(gm, example)
            assert compiled.SPLIT_WRAPPER["last"] == ("split" if split else None)
            if kind == "stack":
                import ctypes
                library = ctypes.CDLL(compiled.native_library(built[kind, split]).path)
                assert hasattr(library, "AOTInductorModelRunMinimalArrayrefInterfaceV2")
    # another graph: its wrapper's runtime part is the object already made
    from torch._inductor import cpp_builder
    commands = []
    original = cpp_builder._run_compile_cmd
    monkeypatch.setattr(cpp_builder, "_run_compile_cmd", lambda cmd, cwd: (commands.append(cmd), original(cmd, cwd)))
    monkeypatch.setitem(compiled.SPLIT_WRAPPER, "on", True)
    monkeypatch.setattr(compiled, "_buffer_options", buffer_options)  # (buffers on the stack)
    other = (torch.randn(5, 2, dtype=torch.float64), example[1])
    compiled.build_native(compiled.record(lambda z, beta: (beta * z.exp().sum(),), other), other)
    assert compiled.SPLIT_WRAPPER["last"] == "split"
    assert not any(".runtime.wrapper.cpp" in c for c in commands)
    model_part, = [c for c in commands if ".model.wrapper.cpp" in c]  # (its light headers were enough)
    words = model_part.split()
    with open(words[words.index("-include") + 1]) as fh:  # (the light headers precompiled, not array_ref.h)
        assert "array_ref_light.h" in fh.read()
    g = torch.Generator().manual_seed(11)
    for scale in (0.1, 1.0, 10.0):
        z = scale * torch.randn(3, 2, dtype=torch.float64, generator=g)
        beta = torch.rand((), dtype=torch.float64, generator=g)
        want = built["stack", False](z, beta)
        for run in built.values():
            for a, b in zip(run(z, beta), want):
                assert a.dtype == b.dtype and torch.equal(a, b)
