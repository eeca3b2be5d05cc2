"""A cold AOTInductor build of a large unrolled graph made cheaper in Inductor's Python
(``compiled._fast_lowering``, ``compiled._recorded_for_inductor``, ``LARGE_GRAPH_OPTIONS``): the
packed graph recorded once, functionalized with Inductor's decompositions, and handed to Inductor
as it is (no second and third recording by ``aot_export_module``); the vector-stride analysis
cached without bound; the dtype-propagation handler initialised once; the ISA checks recorded per
machine; fusion's pairwise search bounded on graphs of more than ``LARGE_GRAPH`` operations.

The library must compute bit for bit what the usual build's computes (the 7 bench models'
potentials were checked at 64 batches each: ``bench/cold_build.py --compare``), Inductor's
functions must be its own again after the build, and a graph that is not a plain functional
graph of distinct outputs goes through Inductor's own recording."""
from __future__ import annotations

import pytest
import torch
import torch._inductor

from ppl.inference import compiled

pytestmark = pytest.mark.skipif(not compiled.NATIVE["on"], reason="PPL_COMPILED_NATIVE=0")


def _graph(steps: int = 12):
    """A GARCH-like recursion (a volatility carried from step to step) and its gradient: a
    long unrolled graph of small tensors, with a validity flag."""
    data = torch.linspace(-1.0, 1.0, steps, dtype=torch.float64)

    def f(z, beta):
        zz = z.detach().requires_grad_(True)
        mu, a0, a1 = zz[:, 0], zz[:, 1].exp(), torch.sigmoid(zz[:, 2])
        sigma = torch.ones_like(mu)
        lp = torch.zeros_like(mu)
        for t in range(1, steps):
            sigma = (a0 + a1 * (data[t - 1] - mu) ** 2 + 0.5 * sigma ** 2).sqrt()
            lp = lp - ((data[t] - mu) / sigma) ** 2 / 2 - sigma.log()
        lp = beta * lp
        grad, = torch.autograd.grad(lp.sum(), zz)
        return lp.detach(), grad, (lp > -1e300).all()
    example = (torch.randn(4, 3, dtype=torch.float64), torch.tensor(0.75, dtype=torch.float64))
    with torch.enable_grad():
        return compiled.record(f, example), example


def _build(monkeypatch, gm, example, tag: str, fast: bool):
    """``build_native`` with ``FAST_LOWERING`` on or off, under its own library path; the
    function, the options ``aot_compile`` got and how often Inductor recorded the graph."""
    from torch._inductor import compile_fx
    monkeypatch.setitem(compiled.FAST_LOWERING, "on", fast)
    native_path = compiled._native_path
    monkeypatch.setattr(compiled, "_native_path", lambda *a: native_path(*a)[:-len(".so")] + f".{tag}.so")
    seen = {"options": None, "recorded": 0, "propagated": 0}
    aot_compile, export, propagate = torch._inductor.aot_compile, compile_fx.aot_export_module, \
        compile_fx.fake_tensor_prop

    def spy_compile(flat, inputs, options=None):
        seen["options"] = dict(options or {})
        return aot_compile(flat, inputs, options=options)

    def spy_export(*args, **kwargs):
        seen["recorded"] += 1
        return export(*args, **kwargs)

    def spy_propagate(*args, **kwargs):
        seen["propagated"] += 1
        return propagate(*args, **kwargs)
    monkeypatch.setattr(torch._inductor, "aot_compile", spy_compile)
    monkeypatch.setattr(compile_fx, "aot_export_module", spy_export)
    monkeypatch.setattr(compile_fx, "fake_tensor_prop", spy_propagate)
    try:
        return compiled.build_native(gm, example), seen
    finally:
        monkeypatch.setattr(torch._inductor, "aot_compile", aot_compile)
        monkeypatch.setattr(compile_fx, "aot_export_module", export)
        monkeypatch.setattr(compile_fx, "fake_tensor_prop", propagate)
        monkeypatch.setattr(compiled, "_native_path", native_path)


def test_a_large_graph_is_lowered_as_recorded_and_computes_bit_for_bit_what_the_usual_build_computes(
        monkeypatch, tmp_path):
    monkeypatch.setattr(compiled, "cache_dir", lambda: str(tmp_path / "fresh"))
    gm, example = _graph()
    monkeypatch.setattr(compiled, "LARGE_GRAPH", len(gm.graph.nodes) // 2)  # (a "large" graph, built quickly)
    monkeypatch.setattr(compiled, "LARGE_GRAPH_KERNEL_ARGS", 8)  # (its kernels in several functions)
    fast, seen_fast = _build(monkeypatch, gm, example, "fast", True)
    usual, seen_usual = _build(monkeypatch, gm, example, "usual", False)
    assert compiled.native_library(fast).path != compiled.native_library(usual).path
    # handed to Inductor as recorded (no aot_export_module, no second propagation of its values),
    # with fusion's search bounded
    assert seen_fast["recorded"] == 0 and seen_usual["recorded"] == 1
    assert seen_fast["propagated"] == 0 and seen_usual["propagated"] == 1
    for key, value in compiled.LARGE_GRAPH_OPTIONS.items():
        assert seen_fast["options"][key] == value and key not in seen_usual["options"]
    g = torch.Generator().manual_seed(3)
    for scale in (0.01, 0.3, 1.0, 3.0):
        z = example[0] + scale * torch.randn(4, 3, dtype=torch.float64, generator=g)
        beta = torch.rand((), dtype=torch.float64, generator=g)
        want = gm(z, beta)
        for a, b, c in zip(fast(z, beta), usual(z, beta), want):
            assert a.dtype == b.dtype == c.dtype and torch.equal(a, b)
            if a.dtype.is_floating_point:
                assert torch.allclose(a, c, rtol=1e-12, atol=1e-12)
            else:
                assert torch.equal(a, c)


def test_a_small_graph_gets_no_large_graph_options():
    gm, example = _graph(3)
    packed, layout = compiled.pack_constants(compiled._tensors_held(gm))
    flat = compiled._packed_graph(gm, example, packed, layout, for_inductor=True)
    assert getattr(flat, compiled._FOR_INDUCTOR)
    assert len(flat.graph.nodes) < compiled.LARGE_GRAPH and compiled._large_graph_options(flat) == {}
    assert not any(n.op == "call_function" and compiled._mutating(n) for n in flat.graph.nodes)
    z, beta = example
    for a, b in zip(flat(z, beta, *packed), gm(z, beta)):
        assert torch.equal(a, b) if not a.dtype.is_floating_point else torch.allclose(a, b, rtol=1e-13, atol=0)


def test_a_graph_that_returns_an_input_or_a_view_goes_through_inductors_own_recording():
    example = (torch.randn(4, 3, dtype=torch.float64),)
    for fn in (lambda z: (z, z.exp()), lambda z: (z.exp().t(),)):
        gm = compiled.record(fn, example)
        flat = compiled._packed_graph(gm, example, [], [], for_inductor=True)
        assert not getattr(flat, compiled._FOR_INDUCTOR, False)
        for a, b in zip(flat(*example), gm(*example)):
            assert torch.equal(a, b)


def test_inductors_functions_are_its_own_again_after_the_block():
    from torch._inductor import compile_fx, cpu_vec_isa, sizevars
    from torch._inductor.codegen import cpp
    from torch._inductor.dtype_propagation import DtypePropagationOpsHandler
    before = (compile_fx.aot_export_module, compile_fx.fake_tensor_prop, sizevars.simplify_index_in_vec_range, sizevars.stride_at_vec_range,
              cpp.stride_at_vec_range, DtypePropagationOpsHandler.__init__, cpu_vec_isa.VecISA.check_build)
    kernel_args = cpp.CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM
    for limit in (None, 40):
        compiled_limit, compiled.LARGE_GRAPH_KERNEL_ARGS = compiled.LARGE_GRAPH_KERNEL_ARGS, limit
        try:
            with compiled._fast_lowering(large=True):
                assert cpp.CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM == min(kernel_args, limit or kernel_args)
        finally:
            compiled.LARGE_GRAPH_KERNEL_ARGS = compiled_limit
        assert cpp.CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM == kernel_args
    with compiled._fast_lowering():
        assert cpp.CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM == kernel_args
        assert compile_fx.aot_export_module is not before[0] and cpp.stride_at_vec_range is not before[4]
        handler = DtypePropagationOpsHandler()
        assert DtypePropagationOpsHandler() is handler and handler.__dict__.get("_ppl_initialised")
    after = (compile_fx.aot_export_module, compile_fx.fake_tensor_prop, sizevars.simplify_index_in_vec_range, sizevars.stride_at_vec_range,
             cpp.stride_at_vec_range, DtypePropagationOpsHandler.__init__, cpu_vec_isa.VecISA.check_build)
    assert all(a is b for a, b in zip(before, after))


def test_the_isa_checks_are_recorded_per_machine(monkeypatch, tmp_path):
    """An ISA check (a test library compiled and loaded) that passed is made once, a later
    build on the machine reads its answer; one that failed (perhaps a probe timed out) is
    made again."""
    from torch._inductor import codecache, cpu_vec_isa
    monkeypatch.setattr(codecache, "_HEADER_DIR", str(tmp_path / "precompiled_headers"))
    calls = []

    def check_build(self, code):
        calls.append(code)
        return "ok" in code
    monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build", check_build)
    isa = cpu_vec_isa.VecAVX2()
    for _ in range(2):
        with compiled._fast_lowering():
            assert isa.check_build("// ok") is True
            assert isa.check_build("// fails") is False
    assert calls == ["// ok", "// fails", "// fails"]
    assert len(list((tmp_path / "ppl_isa_checks").iterdir())) == 1


def test_the_stride_of_a_linear_index_is_its_coefficient_as_inductor_computes_it():
    import sympy
    from torch._inductor.sizevars import stride_at_vec_range
    from torch._inductor.utils import sympy_index_symbol
    from torch.utils._sympy.functions import FloorDiv, ModularIndexing
    x0, x1 = sympy_index_symbol("x0"), sympy_index_symbol("x1")
    linear = [4 * x0 + 12, 148 * x0, x0, 3 * x1 + 2, sympy.Integer(5), 121 * x0 + 11 * x1 + 3, -x0 + 7]
    other = [x0 * x1 + x0, FloorDiv(x0, 4) + x1, ModularIndexing(x0, 1, 8), x0 ** 2]
    for index in linear + other:
        for var in (x0, x1):
            fast, want = compiled._linear_stride(index, var), stride_at_vec_range(index, var, 8)
            if index in linear:
                assert fast == want and type(fast) is type(want)
            else:
                assert fast is None or (fast == want and type(fast) is type(want))  # (None: Inductor's own)
    assert compiled._linear_stride(x0 * x1 + x0, x0) is None and compiled._linear_stride(x0 ** 2, x0) is None
