"""The potential's graph compiled by AOTInductor into a library (``compiled.build_native``,
issue 11: GARCH's and the GP's potentials spent most of each call in Inductor's Python
wrapper -- a size check per input, a Python-made tensor per intermediate buffer).

The library must compute what the graph computes, with the graph's tensors (data, folded
constants) passed in packed; be found again by a later build of the same graph (no second
compilation); and a graph whose operations the bare library cannot run (a Cholesky
factorisation has no C shim: AOTInductor needs a proxy executor) goes into an AOTInductor
package, which carries one.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch._inductor

from ppl.inference import compiled

pytestmark = pytest.mark.skipif(not compiled.NATIVE["on"], reason="PPL_COMPILED_NATIVE=0")


def _graph():
    data = torch.linspace(-1.0, 1.0, 7, dtype=torch.float64)

    def f(z, beta):
        lp = -0.5 * ((data.unsqueeze(0) - z[:, :1]) / z[:, 1:].exp()).pow(2).sum(1) - 7 * z[:, 1]
        return beta * lp, torch.stack([z[:, 0] * 2.5, z[:, 1].sin()], 1), (lp > -1e300).all()
    example = (torch.randn(4, 2, dtype=torch.float64), torch.tensor(0.75, dtype=torch.float64))
    return compiled.record(f, example), example


def test_the_library_computes_what_the_graph_computes_and_is_built_once(monkeypatch):
    gm, example = _graph()
    assert any(n.op == "get_attr" for n in gm.graph.nodes)  # the data is a tensor of the graph
    run = compiled.build_native(gm, example)
    z = torch.randn(4, 2, dtype=torch.float64)
    beta = torch.tensor(0.3, dtype=torch.float64)
    for got, want in zip(run(z, beta), gm(z, beta)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    # the same graph recorded again (as a later process would) loads the library: no compile
    gm2, _ = _graph()

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again")
    monkeypatch.setattr(torch._inductor, "aot_compile", no_compile)
    again = compiled.build_native(gm2, example)
    assert torch.equal(again(z, beta)[0], run(z, beta)[0])


def test_constants_are_packed_one_flat_input_per_dtype_and_unpacked_as_views():
    constants = [torch.arange(3.0, dtype=torch.float64), torch.tensor(2, dtype=torch.int64),
                 torch.ones(2, 2, dtype=torch.float64)]
    flats, layout = compiled.pack_constants(constants)
    assert len(flats) == 2
    for original, view in zip(constants, compiled.unpack_constants(flats, layout)):
        assert torch.equal(original, view)


def test_a_cholesky_goes_into_a_package_that_computes_what_the_graph_computes():
    def f(z):
        cov = torch.eye(3, dtype=torch.float64) * z.exp().unsqueeze(-1).unsqueeze(-1) + 0.1
        return torch.linalg.cholesky(cov).diagonal(dim1=-2, dim2=-1).log().sum(-1),
    example = (torch.randn(4, dtype=torch.float64),)
    gm = compiled.record(f, example)
    assert "cholesky" in (compiled._needs_proxy_executor(gm) or "")  # a bare library could not run it
    run = compiled.build_native(gm, example)
    z = torch.randn(4, dtype=torch.float64)
    assert torch.allclose(run(z)[0], gm(z)[0], rtol=1e-12, atol=1e-14)


def test_the_library_lives_under_inductors_cache_directory_and_takes_the_tensors_as_inputs():
    gm, example = _graph()
    constants = compiled._tensors_held(gm)
    packed, layout = compiled.pack_constants(constants)
    flat = compiled._packed_graph(gm, example, packed, layout)
    path = compiled._native_path(gm, [*example, *constants])
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    assert path.startswith(os.path.join(cache_dir(), "ppl_native"))
    assert not any(n.op == "get_attr" for n in flat.graph.nodes)  # every tensor an input
    z, beta = example
    for got, want in zip(flat(z, beta, *packed), gm(z, beta)):
        assert torch.equal(got, want)


def test_intermediate_buffers_live_on_the_stack_where_every_operation_is_generated_code(monkeypatch):
    """``_buffer_options``: a graph of generated code only keeps its buffers on the C stack
    (GARCH's call 125 -> ~20 us: the per-buffer tensor objects were most of it); a graph
    with an ATen call (a matrix product, a Cholesky factorisation) keeps the planned pool.
    The kernels are the same, so the two libraries' outputs are bit-identical."""
    gm, example = _graph()
    assert compiled._buffer_options(gm) == {"memory_planning": False, "aot_inductor.allow_stack_allocation": True,
                                            "aot_inductor.use_minimal_arrayref_interface": True}

    def with_matmul(z):
        return (z @ z.transpose(0, 1)).sum(),
    def with_cholesky(z):
        return torch.linalg.cholesky(torch.eye(2, dtype=torch.float64) * z.exp().unsqueeze(-1)).sum(),
    one = (torch.randn(3, 2, dtype=torch.float64),)
    assert compiled._buffer_options(compiled.record(with_matmul, one)) == {"memory_planning": True}
    scalar = (torch.tensor(0.5, dtype=torch.float64),)
    assert compiled._buffer_options(compiled.record(with_cholesky, scalar)) == {"memory_planning": True}

    on_stack = compiled.build_native(gm, example)
    native_path = compiled._native_path
    monkeypatch.setattr(compiled, "_native_path", lambda *a: native_path(*a)[:-len(".so")] + ".pool.so")
    monkeypatch.setattr(compiled, "_buffer_options", lambda graph: {"memory_planning": True})
    pooled = compiled.build_native(gm, example)
    assert compiled.native_library(pooled).path != compiled.native_library(on_stack).path
    for seed in range(3):
        z = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        beta = torch.tensor(0.1 + seed, dtype=torch.float64)
        for a, b in zip(on_stack(z, beta), pooled(z, beta)):
            assert torch.equal(a, b)


def test_the_usual_entry_point_of_an_arrayref_library_returns_fresh_tensors():
    """A stack-buffer library also has the minimal ArrayRef entry point (``_buffer_options``),
    whose outputs are arrays the library reuses; its usual entry point (the one Python calls)
    still returns tensors of their own: a later call does not change an earlier call's outputs."""
    import ctypes
    gm, example = _graph()
    run = compiled.build_native(gm, example)
    assert hasattr(ctypes.CDLL(compiled.native_library(run).path), "AOTInductorModelRunMinimalArrayrefInterfaceV2")
    z = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first = run(z, example[1])
    kept = [t.clone() for t in first]
    run(z + 1.0, example[1] * 2)
    for a, b in zip(first, kept):
        assert torch.equal(a, b)
    for got, want in zip(first, gm(z, example[1])):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_a_package_is_built_in_a_fresh_cache_directory(monkeypatch, tmp_path):
    """The first build on a fresh machine that needs a package (a Cholesky) wrote it into
    ``ppl_native/``, which nothing had made yet: the build failed, the potential fell back
    to Inductor's Python wrapper, and NUTS chose another transition than on every later
    run -- other draws for the same seed (a negative-binomial regression's)."""
    monkeypatch.setattr(compiled, "cache_dir", lambda: str(tmp_path / "fresh"))

    class Built(Exception):
        pass

    def package(program, package_path, inductor_configs):
        assert os.path.isdir(os.path.dirname(package_path))
        raise Built
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", package)

    def f(z):
        return torch.linalg.cholesky(torch.eye(2, dtype=torch.float64) * z.exp().unsqueeze(-1)).sum(),
    example = (torch.tensor(0.5, dtype=torch.float64),)
    with pytest.raises(Built):
        compiled.build_native(compiled.record(f, example), example)


def test_a_stack_buffer_build_gets_the_wrapper_that_keeps_buffers_on_the_stack(monkeypatch, tmp_path):
    """Inductor registers its CPU C++ wrapper class once per process, from the options of
    its first compile: after a build without stack buffers, every later library of the
    process kept its buffers in tensors (GP: 168 against 25 us a call), and was cached so.
    ``build_native`` sets the class each build needs, and puts the registered one back."""
    import dataclasses
    from torch._inductor.codegen import common
    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
    from torch._inductor.codegen.cpp_wrapper_cpu_array_ref import CppWrapperCpuArrayRef

    monkeypatch.setattr(compiled, "cache_dir", lambda: str(tmp_path / "fresh"))
    common.init_backend_registration()
    monkeypatch.setitem(common.device_codegens, "cpu",  # (as after a first compile without stack buffers)
                        dataclasses.replace(common.device_codegens["cpu"], cpp_wrapper_codegen=CppWrapperCpu))
    seen = []

    class Built(Exception):
        pass

    def build(aot_compile, flat, inputs, options):
        seen.append(common.device_codegens["cpu"].cpp_wrapper_codegen)
        raise Built
    monkeypatch.setattr(compiled, "_aot_compile_fast", build)
    gm, example = _graph()
    with pytest.raises(Built):
        compiled.build_native(gm, example)
    assert seen == [CppWrapperCpuArrayRef]
    assert common.device_codegens["cpu"].cpp_wrapper_codegen is CppWrapperCpu


def test_libraries_use_256_bit_vectors_where_the_cpu_has_avx_and_the_width_keys_the_library(monkeypatch):
    """``compiled.vector_width``: ``cpp.simdlen`` 256 on AVX2/AVX-512 (the potentials' small
    tensors ran slower with AVX-512's 16-wide double vectors), none elsewhere; as it changes the
    kernels' summation order, a library built for one width is not loaded for another."""
    from torch.fx.experimental.proxy_tensor import make_fx
    gm = make_fx(lambda z: (z.exp().sum(1),))(torch.zeros(4, 3, dtype=torch.float64))
    inputs = [torch.zeros(4, 3, dtype=torch.float64)]
    paths = {}
    for capability, width in (("AVX512", {"cpp.simdlen": 256}), ("AVX2", {"cpp.simdlen": 256}), ("DEFAULT", {})):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert compiled.vector_width() == width
        paths[capability] = compiled._native_path(gm, inputs)
    assert paths["AVX512"] == paths["AVX2"] != paths["DEFAULT"]
