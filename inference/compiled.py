"""A function of tensors recorded once and replayed fast: the graph of a static program's
log density and gradient.

``record(fn, example_inputs)`` traces ``fn`` to a graph of ATen operations
(``make_fx``: Python control flow, the interpreter's bookkeeping and autograd's
backward pass all disappear; only tensor operations remain), then simplifies it:

* **constant folding**: every operation whose inputs are all constants (the data, the
  program's literals: ``log(sigma)``, a prior's ``scale**2``, the parameter checks of
  constant parameters) is computed once, at record time;
* **identities** (``x * 1``, ``x + 0``, ``x ** 1``, a view, expand or copy to the same
  shape and dtype) are dropped, and so is a select (``where``) on a constant mask that is
  all true or all false (a support check of observed data);
* **common subexpressions** are computed once, dead code removed;

and hands it to TorchScript (``torch.jit.trace``), whose interpreter runs a graph with
about a microsecond of overhead per operation instead of Python's tens, or to
TorchInductor (``torch.compile``), which fuses it into native code (measured on eight
schools' value and gradient, one thread: ~30 us per call against ~235 us for TorchScript,
after ~5 s of compilation; compiled graphs are cached on disk across processes).

Invariant: the replayed graph computes the same function as ``fn`` on every input of the
example's shapes and dtypes *for which ``fn`` takes the same path* (the caller checks the
program is static first); the caller compares both on fresh inputs before using it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import warnings
from dataclasses import dataclass

import torch
from torch.fx.experimental.proxy_tensor import make_fx

FOLD_MAX_ELEMENTS = 1_000_000  # constants larger than this are recomputed, not stored


def record(fn, example_inputs: tuple):
    """``fn`` (tensors -> tuple of tensors) as a simplified ATen graph (a GraphModule), to
    hand to ``replay``."""
    # values read into Python are constants here (the caller has checked that no decision
    # depends on an input), so they may be baked into the graph
    with _lazy_code():
        with _one_fake_mode():
            gm = make_fx(fn, _error_on_data_dependent_ops=False)(*example_inputs)
        fold_constants(gm)
        drop_identities(gm)
        drop_constant_selects(gm)
        eliminate_common_subexpressions(gm)
        gm.graph.eliminate_dead_code()
    return torch.fx.GraphModule(gm, gm.graph)  # (its Python code generated once, here)


def _lazy_code():
    """A context in which GraphModules generate their Python code when it is first needed
    instead of at every ``recompile`` (FX's lazy graph modules): ``record``'s passes each
    recompile, and on GARCH's 4,000 operations each code generation took ~0.15 s (the
    recording 2.4 -> 1.7 s CPU; the same code)."""
    try:
        from torch.fx._lazy_graph_module import _use_lazy_graph_module
    except ImportError:  # pragma: no cover - (a torch without it: every recompile generates)
        return contextlib.nullcontext()
    return _use_lazy_graph_module(True)


def _one_fake_mode():
    """A tracing context with one fake-tensor mode for the whole recording. Without it
    ``make_fx`` (real tensors) describes each recorded value's shape with a new
    ``FakeTensorMode``, and each of those captures the Python stack at creation: with the
    interpreter's deep stack that was ~2/3 of the recording's time (GARCH's 150-step loop:
    ~5,000 values, ~3 ms each)."""
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    return tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True)))


def _static_shapes_context():
    """A tracing context whose fake-tensor mode has a (static) shape environment, for
    ``compile_fx`` called on a plain ATen graph: without one Inductor bypasses its on-disk
    FX graph cache ("No shape env") and compiles every graph afresh in every process
    (eight schools: ~2.4 s CPU); with one, a graph compiled before by any process on this
    machine (same operations, constants and input shapes) loads in ~0.3 s."""
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    return tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv())))


def compiled_before(gm: torch.fx.GraphModule, example_inputs: tuple, *, size_asserts: bool = True) -> bool:
    """Whether TorchInductor has compiled this graph (same code, constants, input shapes
    and dtypes, torch version) on this machine before, so that ``replay(..., "inductor")``
    is likely to load it from Inductor's on-disk cache (~0.3 s) instead of compiling it
    (seconds): a marker file written after each successful compilation. A hint for a
    cost estimate only (the cache may have been cleared since): never a correctness
    question, the graph is compiled or loaded either way."""
    try:
        return os.path.exists(_marker_path(gm, example_inputs, size_asserts))
    except Exception:  # noqa: BLE001 - an unreadable cache directory means "not known"
        return False


def _mark_compiled(gm, example_inputs, size_asserts: bool) -> None:
    try:
        path = _marker_path(gm, example_inputs, size_asserts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w"):
            pass
    except Exception:  # noqa: BLE001 - no marker only means a pessimistic estimate next time
        pass


def cache_dir() -> str:
    """TorchInductor's cache directory (``torch._inductor.runtime.cache_dir_utils.cache_dir``,
    the same function), without importing ``torch._inductor`` where it is not imported yet:
    that package imports Dynamo (~1 s CPU), which a run that only loads a library built before
    (``build_native``) or stays on TorchScript does not need. The module has no torch
    dependency of its own (its header says so), so it is loaded from torch's own file."""
    import sys
    if "torch._inductor" in sys.modules:
        from torch._inductor.runtime.cache_dir_utils import cache_dir as inductors
        return inductors()
    module = _CACHE_DIR_UTILS.get("module")
    if module is None:
        import importlib.util
        spec = importlib.util.find_spec("torch")
        path = os.path.join(os.path.dirname(spec.origin), "_inductor", "runtime", "cache_dir_utils.py")
        loader = importlib.util.spec_from_file_location("_ppl_inductor_cache_dir_utils", path)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        _CACHE_DIR_UTILS["module"] = module
    return module.cache_dir()


_CACHE_DIR_UTILS: dict = {}


def _marker_path(gm, example_inputs, size_asserts: bool) -> str:
    digest = hashlib.sha256()
    digest.update(f"{torch.__version__}|{size_asserts}|".encode())
    digest.update(gm.code.encode())
    for name, buffer in sorted(gm.named_buffers()):
        digest.update(f"{name}{tuple(buffer.shape)}{buffer.dtype}".encode())
        digest.update(buffer.detach().cpu().contiguous().numpy().tobytes())
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            digest.update(f"{tuple(x.shape)}{x.dtype}{x.device}|".encode())
        else:
            digest.update(f"{x!r}|".encode())
    return os.path.join(cache_dir(), "ppl_compiled", digest.hexdigest())


def replay(gm: torch.fx.GraphModule, example_inputs: tuple, backend: str = "jit", *,
           size_asserts: bool = True, native: bool = False):
    """The recorded graph as a fast function: replayed by TorchScript (``backend="jit"``:
    ready at once) or compiled to fused native code by TorchInductor (``"inductor"``:
    seconds of compilation, then several times faster for a graph of many small
    operations). ``size_asserts=False``: Inductor's code does not check each input's
    sizes and strides on every call (~0.6 us an input); the caller must then pass
    contiguous inputs of the example's shapes. ``native=True`` (Inductor on the CPU): the
    graph compiled by AOTInductor into a library (``build_native``: no Python between the
    kernels), or where that cannot be, as without it."""
    if backend == "inductor":
        if native and NATIVE["on"] and _all_on_cpu(example_inputs):
            try:
                run = build_native(gm, example_inputs)
                _mark_compiled(gm, example_inputs, size_asserts)
                return run
            except Exception:  # noqa: BLE001 - no AOTInductor here: Inductor's Python wrapper below
                pass
        # Inductor straight on the ATen graph: torch.compile would re-trace it with Dynamo
        # and guard every call (~10x the run time of this small graph)
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx
        with inductor_config.patch(size_asserts=size_asserts), _static_shapes_context():
            compiled = compile_fx(gm, list(example_inputs))
        _mark_compiled(gm, example_inputs, size_asserts)

        def run(*args):
            return tuple(compiled(*args))
        return run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(gm, example_inputs, check_trace=False, strict=False)


#: ``replay(..., "inductor", native=True)`` (the potential's graph) on the CPU compiles the graph
#: with AOTInductor into a shared library (``build_native``) instead of Inductor's Python wrapper;
#: ``PPL_COMPILED_NATIVE=0`` turns it off. Measured (one thread, 4 chains, load 7-10): GARCH's
#: potential 350-950 -> 110-150 us a call, eight schools' 29 -> 10 us; a cached library loads in
#: ~1 ms (Inductor's disk cache: 0.3-1.5 s).
NATIVE = {"on": os.environ.get("PPL_COMPILED_NATIVE", "auto") != "0"}
_NATIVE_VERSION = "6"  # part of the library's cache key: bump when ``build_native`` changes what it builds
# (6: the minimal ArrayRef entry point, ``_buffer_options``)
# (3: small linear algebra unrolled, ``_small_linalg_unrolled``)


@dataclass(frozen=True)
class NativeLibrary:
    """What ``build_native``'s function runs, for a caller that runs it from C++ (the compiled
    NUTS transition, ``inference.nuts_native``): ``path``, the AOTInductor shared library
    (``.so``; ``package``: an AOTInductor package, ``.pt2``) computing the graph's outputs from
    (the graph's inputs, contiguous, ..., then ``constants``: its tensors packed one flat
    tensor per dtype)."""
    path: str
    constants: tuple
    package: bool = False


def native_library(fn) -> NativeLibrary | None:
    """The ``NativeLibrary`` behind a function ``replay`` returned, or None where it is not
    a graph compiled by ``build_native`` (TorchScript, Inductor's Python wrapper)."""
    return getattr(fn, "native", None)


def _all_on_cpu(inputs) -> bool:
    return all(not isinstance(x, torch.Tensor) or x.device.type == "cpu" for x in inputs)


def build_native(gm: torch.fx.GraphModule, example_inputs: tuple):
    """The graph compiled by AOTInductor into a shared library and loaded, as a function of
    the graph's inputs returning its outputs (a tuple). Why not Inductor's Python wrapper:
    on a long unrolled graph (GARCH's 150 steps, the GP's 11 x 11 covariance built element
    by element) that wrapper spends far more than the kernels, on a size check per input
    and a Python-made tensor per intermediate buffer (~280 a call on GARCH); here the
    wrapper is C++ and the buffers come from one planned pool. The graph's tensors (data,
    folded constants) become inputs packed into one flat tensor per dtype
    (``lift_constants``, ``pack_constants``): the library depends on their shapes only and
    is cached under Inductor's cache directory by the graph's code and the input shapes
    (``_native_path``), so a later process loads it in about a millisecond (GARCH: the
    packed graph's recording, 2.4 s, is made only to compile it); a graph with ATen
    fallbacks that have no C shim goes into an AOTInductor package instead. Raises where
    AOTInductor cannot build it (the caller falls back)."""
    import shutil

    constants = _tensors_held(gm)
    packed, layout = pack_constants(constants)
    inputs = [*example_inputs, *packed]
    path = _native_path(gm, [*example_inputs, *constants])
    os.makedirs(os.path.dirname(path), exist_ok=True)  # (a fresh cache: a package's build writes there first)
    # a library at ``path`` was built from a graph of this very code (the key), which then had
    # no operation needing a proxy executor: loaded without asking (Inductor's lowering tables
    # cost ~0.8 s CPU to import); likewise a package there was built because it had one
    package = path[:-len(".so")] + ".pt2"
    if not os.path.exists(path) and os.path.exists(package):
        return _packaged(gm, example_inputs, packed, layout, package)
    if not os.path.exists(path):
        gm = _small_linalg_unrolled(gm, example_inputs)
    if not os.path.exists(path) and _needs_proxy_executor(gm):
        return _packaged(gm, example_inputs, packed, layout, package)
    if not os.path.exists(path):
        from torch._inductor import aot_compile

        flat = _packed_graph(gm, example_inputs, packed, layout, for_inductor=FAST_LOWERING["on"])
        build = f"{path}.{os.getpid()}.build"  # (AOTInductor leaves its sources next to the library)
        os.makedirs(build, exist_ok=True)
        try:
            large = _large_graph_options(flat)
            options = {"aot_inductor.output_path": os.path.join(build, "graph.so"), **_buffer_options(gm),
                       **vector_width(), **large}
            with _cpu_wrapper(stack=bool(options.get("aot_inductor.allow_stack_allocation"))), _split_wrapper(), \
                    _fast_lowering(large=bool(large)):
                built = _aot_compile_fast(aot_compile, flat, tuple(inputs), options)
            os.replace(built, path)  # (atomic: another process sees the whole library or none)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    runner = torch._C._aoti.AOTIModelContainerRunnerCpu(path, 1)

    def run(*args):
        return tuple(runner.run([a.contiguous() for a in args] + packed))
    run(*example_inputs)  # (a library that cannot run here raises now, while the caller can fall back)
    run.native = NativeLibrary(path, tuple(packed), package=False)
    return run


def _small_linalg_unrolled(gm: torch.fx.GraphModule, example_inputs: tuple) -> torch.fx.GraphModule:
    """``gm`` with its small static-shape linear algebra (Cholesky, triangular solves, matrix
    products up to ``small_linalg.MAX_N``) unrolled into elementwise operations
    (``inference.small_linalg``), so that it compiles into a plain library with its buffers on
    the stack (the GP's potential: ~150 -> ~25 us a call, 4 chains); ``gm`` itself where
    nothing is rewritten, or where the rewritten graph disagrees with ``gm`` at random points
    near ``example_inputs`` (``small_linalg.check_rewrite``; then it stays a package). A
    function of the graph and the example's shapes alone (the points are seeded), so the
    backend stays a function of the graph; the library's key (``_native_path``) is the
    original graph's."""
    import copy

    from . import small_linalg

    if not any(small_linalg.rewritable(node) for node in gm.graph.nodes):
        return gm
    rewritten = copy.deepcopy(gm)
    try:
        small_linalg.rewrite_small_linalg(rewritten, example_inputs)
        held, before = _tensors_held(rewritten), _tensors_held(gm)  # (the library reads gm's, packed)
        if len(held) != len(before) or not all(torch.equal(a, b) for a, b in zip(held, before)):
            return gm
        small_linalg.check_rewrite(gm, rewritten, small_linalg.check_points(example_inputs))
    except (ValueError, RuntimeError):  # (not rewritten: the graph as it is)
        return gm
    return rewritten


#: AOTInductor options that make a build cheaper without changing what the library computes
#: (the kernels' code and flags are otherwise the same: -O3, -ffp-contract=off, no unsafe math;
#: outputs bit-identical on the 7 bench models' graphs, ``bench/cold_build.py --compare``): the
#: vector ISA is not checked by compiling and loading a test library per ISA (``cpp.vec_isa_ok``:
#: the ISAs the CPU reports are taken as they are; the check cost ~8.5 s of gcc once per cache
#: directory and ~1.3 s of dlopen probes in every process that compiles; where the compiler then
#: fails, ``_aot_compile_fast`` builds again with the check), and no line tables or frame pointers
#: (the C++ wrapper, ~6.5 s of gcc whatever the graph, ~0.4 s less; the library 1.6 MB -> 0.4 MB).
#: Not the wrapper at -O0 (``compile_wrapper_opt_level``): ~1 s less gcc, but with buffers on the
#: stack the wrapper's code is in every call: eight schools 4.2 -> 8.7 us, GARCH 26 -> 50 us.
#: Part of the library's cache key.
FAST_BUILD = {"cpp.vec_isa_ok": True, "aot_inductor.enable_line_tables": False,
              "aot_inductor.enable_frame_pointer": False}


def vector_width() -> dict:
    """256-bit vectors where the CPU has AVX2 or AVX-512 (``cpp.simdlen``): a potential's
    tensors are small (a few chains x tens to hundreds of values), and with AVX-512's 16-wide
    ``VectorizedN<double, 2>`` the kernels spill and run masked partial loads. Measured on the
    library (4 chains, 1000 + 1000 NUTS, sampling phase): logistic regression 71 -> 62 ms,
    eight schools 51 -> 38, GARCH 285 -> 231, the mixture 69 -> 54. It changes the kernels'
    summation order (other last bits), so it is part of the library's cache key."""
    capability = torch.backends.cpu.get_cpu_capability()
    return {"cpp.simdlen": 256} if capability in ("AVX2", "AVX512") else {}


@contextlib.contextmanager
def _cpu_wrapper(stack: bool):
    """Inductor's C++ wrapper class for the CPU set to the one this build needs for the
    block: ``CppWrapperCpuArrayRef`` (which can keep buffers on the stack) where ``stack``,
    else ``CppWrapperCpu``. Inductor registers the class once per process, at its first
    compile, from the options of that compile: a library built after one without stack
    buffers (a package, an Inductor Python-wrapper compile) silently kept its buffers in
    tensors, ~7x slower a call (GP: 168 against 25 us), and was cached so."""
    from torch._inductor.codegen import common
    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
    from torch._inductor.codegen.cpp_wrapper_cpu_array_ref import CppWrapperCpuArrayRef

    common.init_backend_registration()
    registered = common.device_codegens["cpu"]
    wanted = CppWrapperCpuArrayRef if stack else CppWrapperCpu
    common.device_codegens["cpu"] = dataclasses.replace(registered, cpp_wrapper_codegen=wanted)
    try:
        yield
    finally:
        common.device_codegens["cpu"] = registered


#: Where AOTInductor's wrapper.cpp ends its fixed part (the runtime's C interface, the same text
#: for every graph) and starts the graph's own code.
_INTERFACE_MARK, _INTERFACE_END = "// Definition of AOTI runtime interface functions", '} // extern "C"\n'
_MODEL_BASE = "AOTInductorModelBase<AOTInductorModel>"
#: The wrapper's header with buffers on the stack (AOTInductor precompiles it: ~9 s of gcc per
#: machine, 271 MB), and it without ``array_ref_impl.h``, which brings ATen's tensor headers
#: (``aoti_torch/utils.h``) for a few helpers of the minimal array-ref interface: where the
#: graph's code uses them, they are written in it again (``_ARRAY_REF_HELPERS``) over the C shim
#: alone, as that header has them.
_ARRAY_REF = "torch/csrc/inductor/aoti_include/array_ref.h"
_ARRAY_REF_H = f"#include <{_ARRAY_REF}>"
_ARRAY_REF_HELPERS = r"""
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
namespace torch::aot_inductor {
template <typename T>
void convert_output_to_handle(const ArrayRefTensor<T>& output, AtenTensorHandle& handle) {
  handle = output.expensiveCopyToTensor();
}
template <typename... Ts, std::size_t... Is>
void convert_outputs_to_handles_helper(const std::tuple<ArrayRefTensor<Ts>...>& outputs,
                                       AtenTensorHandle* handles, std::index_sequence<Is...>) {
  (convert_output_to_handle(std::get<Is>(outputs), handles[Is]), ...);
}
template <typename... Ts>
void convert_outputs_to_handles(const std::tuple<ArrayRefTensor<Ts>...>& outputs, AtenTensorHandle* handles) {
  convert_outputs_to_handles_helper(outputs, handles, std::make_index_sequence<sizeof...(Ts)>());
}
template <typename T>
void convert_handle_to_arrayref_tensor(AtenTensorHandle handle, ArrayRefTensor<T>& input) {
  void* data;
  int64_t dim, numel;
  int64_t *sizes, *strides;
  int32_t device_type, device_index;
  AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_get_data_ptr(handle, &data));
  AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_get_dim(handle, &dim));
  AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_get_numel(handle, &numel));
  AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_get_sizes(handle, &sizes));
  AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_get_strides(handle, &strides));
  AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(handle, &device_type));
  AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_index(handle, &device_index));
  input = ArrayRefTensor<T>(MiniArrayRef<T>(reinterpret_cast<T*>(data), numel), MiniArrayRef<const int64_t>(sizes, dim),
                            MiniArrayRef<const int64_t>(strides, dim), device_type, device_index);
}
template <typename... Ts, std::size_t... Is>
void convert_handles_to_inputs_helper(AtenTensorHandle* handles, std::tuple<ArrayRefTensor<Ts>...>& inputs,
                                      std::index_sequence<Is...>) {
  (convert_handle_to_arrayref_tensor(handles[Is], std::get<Is>(inputs)), ...);
}
template <typename... Ts>
void convert_handles_to_inputs(AtenTensorHandle* handles, std::tuple<ArrayRefTensor<Ts>...>& inputs) {
  convert_handles_to_inputs_helper(handles, inputs, std::make_index_sequence<sizeof...(Ts)>());
}
template <typename T>
void assert_numel(const ArrayRefTensor<T>& tensor, uint64_t numel) {
  if (tensor.numel() != numel)
    throw std::runtime_error("incorrect numel for input tensor. expected " + std::to_string(numel) + ", got " +
                             std::to_string(tensor.numel()));
}
}  // namespace torch::aot_inductor
"""
_ARRAY_REF_LIGHT = "".join(f"#include <torch/csrc/inductor/{h}.h>\n" for h in (
    "aoti_include/common", "aoti_runtime/arrayref_tensor", "aoti_runtime/arrayref_tensor_conversion",
    "aoti_runtime/scalar_to_tensor", "aoti_runtime/thread_local", "cpp_wrapper/device_internal/cpu"))
#: The runtime's macro around its C entry points (``interface.cpp``, in the fixed part), for the
#: graph's part where its minimal array-ref entry points use it (errors: an error code, the
#: message on stderr).
_ERROR_CODE_MACRO = r"""
#ifndef CONVERT_EXCEPTION_TO_ERROR_CODE
#include <iostream>
#define CONVERT_EXCEPTION_TO_ERROR_CODE(...)                 \
  try {                                                      \
    __VA_ARGS__                                              \
  } catch (const std::exception& e) {                        \
    std::cerr << "Error: " << e.what() << '\n';              \
    return AOTI_RUNTIME_FAILURE;                             \
  } catch (...) {                                            \
    std::cerr << "Unknown exception occurred.\n";            \
    return AOTI_RUNTIME_FAILURE;                             \
  }                                                          \
  return AOTI_RUNTIME_SUCCESS;
#endif
"""


#: ``_split_wrapper`` on (``PPL_SPLIT_WRAPPER=0``: the wrapper compiled whole, as AOTInductor does).
#: ``last``: how the last wrapper was compiled ("split", or "compiled whole: " and why).
SPLIT_WRAPPER = {"on": os.environ.get("PPL_SPLIT_WRAPPER", "1") != "0", "last": None}


@contextlib.contextmanager
def _split_wrapper():
    """AOTInductor's C++ wrapper (``wrapper.cpp``) compiled in two parts: the runtime's fixed
    part (its C interface and model container, and the model's base class
    ``AOTInductorModelBase<AOTInductorModel>`` instantiated explicitly) into an object compiled
    once per machine (``ppl_wrapper_runtime/`` beside Inductor's ``precompiled_headers/``), and
    the graph's own code (the model's constructor, input checks, ``run_impl``) with the base
    class declared ``extern template``; joined (``ld -r``) into the object the link expects.
    Both include ``array_ref.h``'s headers but ``array_ref_impl.h`` (``_ARRAY_REF_LIGHT``: it
    brings ATen's tensor headers for a few helpers of the minimal array-ref interface, which
    a graph's part that uses them gets written over the C shim, ``_ARRAY_REF_HELPERS``; where
    the light headers still lack something, the part is compiled again with the full ones),
    which Inductor precompiles instead of ``array_ref.h`` (~4 s of gcc per machine instead of ~9 s).
    Why: gcc spent ~5 s on wrapper.cpp whatever the graph, not parsing (the precompiled
    header was used: ``-H``) but instantiating the headers' templates (~1.4 s for any file
    including them, ~0.8 s without ATen's) and generating ~375 functions of which ~30 are the
    graph's (std::regex for a device string, the container's maps...). Measured (gcc on the
    wrapper): 5-5.9 s -> 1.3-1.4 s; eight schools' cold build 10.8 -> 6.8 s CPU (logistic
    regression 10.5 -> 6.8), a machine's first build (headers and runtime object cold too)
    22.0 -> 18.4 s. The same source is compiled with the same flags, so the library computes
    the same (its kernels are not touched; outputs bit-identical on the 7 bench models,
    ``bench/cold_build.py --compare``); gcc inlines a little differently across the two parts
    (an output tensor's ``realloc`` is a call), a call takes the same time (eight schools
    2.76 / 2.73 us, logistic regression 9.01 / 8.95 us). Where the wrapper is not as expected
    or a part fails to compile, the wrapper is compiled whole (``SPLIT_WRAPPER["last"]`` says
    why). Not part of the library's cache key: either way the library computes the same."""
    from torch._inductor import cpp_builder
    original = cpp_builder._run_compile_cmd
    if not SPLIT_WRAPPER["on"]:
        yield
        return

    def precompile_header(header: str, *args, **kwargs):
        if header == _ARRAY_REF:  # (the wrapper's: its light part precompiled instead)
            header = _light_header()
        return precompile(header, *args, **kwargs)

    def run(cmd_line: str, cwd: str) -> None:
        try:
            split = _split_wrapper_compile(cmd_line, cwd, original)
        except Exception as e:  # (any surprise: the wrapper compiled whole)
            split = f"compiled whole: {type(e).__name__}: {str(e)[:2000]}"
        if split is not True:
            original(cmd_line, cwd)
        if split is not None:
            SPLIT_WRAPPER["last"] = "split" if split is True else split
    from torch._inductor import codecache
    precompile = codecache._precompile_header
    cpp_builder._run_compile_cmd, codecache._precompile_header = run, precompile_header
    try:
        yield
    finally:
        cpp_builder._run_compile_cmd, codecache._precompile_header = original, precompile


def _light_header() -> str:
    """The file ``_ARRAY_REF_LIGHT`` (``ppl_wrapper_runtime/array_ref_light.h``), for Inductor
    to precompile (``#include </its/path>``: keyed by its preprocessed text, the flags and the
    compiler, as Inductor's own headers)."""
    from torch._inductor import codecache
    path = os.path.join(os.path.dirname(codecache._HEADER_DIR), "ppl_wrapper_runtime", "array_ref_light.h")
    text = "#pragma once\n" + _ARRAY_REF_LIGHT
    if not os.path.exists(path) or open(path).read() != text:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.{os.getpid()}", "w") as fh:
            fh.write(text)
        os.replace(f"{path}.{os.getpid()}", path)
    return path


def _split_wrapper_compile(cmd_line: str, cwd: str, compile_cmd) -> bool | str | None:
    """``_split_wrapper``'s compile of one command: True where it compiled it split, None where
    it is not a wrapper.cpp's compile, why not where it is one it cannot split (nothing done)."""
    import shlex

    words = shlex.split(cmd_line)
    sources = [w for w in words if w.endswith(".wrapper.cpp")]
    if "-c" not in words or "-o" not in words or len(sources) != 1:
        return None
    source, target = sources[0], words[words.index("-o") + 1]
    with open(source) as fh:
        text = fh.read()
    head, end, model = text.partition(_INTERFACE_END)
    if not end or _INTERFACE_MARK not in head or _MODEL_BASE in model:
        return "compiled whole: not the expected wrapper.cpp"
    preamble = head[:head.index(_INTERFACE_MARK)]
    runtime_src = f"{head}{end}\nnamespace torch::aot_inductor {{ template class {_MODEL_BASE}; }}\n"
    model_src = (f"{preamble}#include <torch/csrc/inductor/aoti_runtime/interface.h>\n"
                 f"{_ERROR_CODE_MACRO if 'CONVERT_EXCEPTION_TO_ERROR_CODE' in model else ''}"
                 f"namespace torch::aot_inductor {{ extern template class {_MODEL_BASE}; }}\n{model}")

    def command(src: str, out: str) -> str:
        return shlex.join([src if w == source else out if w == target else w for w in words])

    def compile_light_first(src: str, path: str, out: str) -> None:
        """``src`` compiled with ``_ARRAY_REF_LIGHT`` for ``array_ref.h``; where that lacks
        what it uses, as it is."""
        helpers = _ARRAY_REF_HELPERS if "convert_handles_to_inputs" in src else ""  # (a minimal array-ref library)
        light = src.replace(_ARRAY_REF_H, _ARRAY_REF_LIGHT + helpers)
        for i, text in enumerate(dict.fromkeys((light, src))):
            with open(path, "w") as fh:
                fh.write(text)
            try:
                return compile_cmd(command(path, out), cwd)
            except Exception:
                if i or light == src:
                    raise
    # the runtime's object: keyed by its source and the command (which names the precompiled
    # header, itself keyed by the headers' preprocessed text, the flags and the compiler)
    key = hashlib.sha256(f"{torch.__version__}|{torch.version.git_version}|{runtime_src}".encode())
    key.update(shlex.join([w for w in words if w not in (source, target)]).encode())
    if not any(w == "-include" for w in words):
        from torch._inductor.cpp_builder import get_compiler_version_info
        key.update(get_compiler_version_info(words[0]).encode())
    from torch._inductor import codecache
    store = os.path.join(os.path.dirname(codecache._HEADER_DIR), "ppl_wrapper_runtime")
    runtime_o = os.path.join(store, key.hexdigest()[:40] + ".o")
    stem = source[:-len(".wrapper.cpp")]
    if not os.path.exists(runtime_o):
        os.makedirs(store, exist_ok=True)
        partial = f"{runtime_o}.{os.getpid()}"
        try:
            compile_light_first(runtime_src, f"{stem}.runtime.wrapper.cpp", partial)
            os.replace(partial, runtime_o)  # (atomic: another process sees the whole object or none)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    compile_light_first(model_src, f"{stem}.model.wrapper.cpp", f"{stem}.model.o")
    compile_cmd(shlex.join(["ld", "-r", runtime_o, f"{stem}.model.o", "-o", target]), cwd)
    return True


def _aot_compile_fast(aot_compile, flat, inputs: tuple, options: dict) -> str:
    """``aot_compile`` with ``FAST_BUILD`` added; where the C++ compiler fails with it (an ISA
    the CPU has and the compiler cannot target, which the skipped check would have caught),
    again with the ISA check."""
    from torch._inductor.exc import CppCompileError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return aot_compile(flat, inputs, options={**options, **FAST_BUILD})
        except CppCompileError:
            checked = {k: v for k, v in FAST_BUILD.items() if k != "cpp.vec_isa_ok"}
            return aot_compile(flat, inputs, options={**options, **checked, "cpp.vec_isa_ok": None})


def _packaged(gm, example_inputs: tuple, packed: list, layout: list, path: str):
    """``build_native`` for a graph whose library needs a proxy executor (ATen fallbacks
    without a C shim: the GP's Cholesky and triangular solves): the packed graph exported
    (``torch.export``) and compiled into an AOTInductor package, which carries it (GP:
    450-570 -> ~170 us a call)."""
    import torch._inductor

    if not os.path.exists(path):
        flat = _packed_graph(gm, example_inputs, packed, layout)
        inputs = (*example_inputs, *packed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(flat, inputs, strict=False)
            partial = f"{path}.{os.getpid()}.pt2"
            with _cpu_wrapper(stack=False), _split_wrapper():
                torch._inductor.aoti_compile_and_package(program, package_path=partial,
                                                         inductor_configs={"memory_planning": True, **FAST_BUILD,
                                                                           **vector_width()})
        os.replace(partial, path)
    compiled = torch._inductor.aoti_load_package(path)

    def run(*args):
        return tuple(compiled(*[a.contiguous() for a in args], *packed))
    run(*example_inputs)  # (raises now where it cannot run, while the caller can fall back)
    run.native = NativeLibrary(path, tuple(packed), package=True)
    return run


_EXTERN_KERNELS = ("mm", "bmm", "addmm", "baddbmm", "addbmm", "_int_mm", "convolution")  # (ATen calls, not generated code)


def _buffer_options(gm: torch.fx.GraphModule) -> dict:
    """How AOTInductor's C++ wrapper keeps the graph's intermediate buffers. By default it
    makes a tensor object (a TensorImpl, a reference count, sizes and strides) per buffer
    and call, here from one planned pool: on a long unrolled graph of small tensors that is
    most of the call (GARCH's 150 steps: ~300 buffers of 4 numbers, 125 us a call of which
    the kernel is ~12). Where every operation of the graph becomes generated code (no ATen
    call: ``_EXTERN_KERNELS``, fallbacks such as a Cholesky factorisation), the buffers
    can be plain arrays on the C stack instead (``allow_stack_allocation``; Inductor then
    needs ``memory_planning`` off and keeps buffers on the heap when they exceed 100 KB in
    all): GARCH's call takes ~20 us. The kernels are the same, so the outputs are
    bit-identical either way (``tests/test_compiled_native.py``). Such a library also gets
    AOTInductor's "minimal ArrayRef" entry point (``use_minimal_arrayref_interface``): a call
    with plain array descriptors whose outputs land in arrays of the library's own, which
    NUTS's C++ loops call instead of the container's ``run`` (no tensor made per input and
    output: logistic regression's call ~8 -> ~6.5 us; ``inference.nuts_native``); the usual
    entry point stays, with the same kernels and outputs."""
    from torch._inductor.lowering import fallbacks
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        packet = getattr(node.target, "overloadpacket", None)
        if node.target in fallbacks or getattr(packet, "__name__", None) in _EXTERN_KERNELS:
            return {"memory_planning": True}
    return {"memory_planning": False, "aot_inductor.allow_stack_allocation": True,
            "aot_inductor.use_minimal_arrayref_interface": True}


def _needs_proxy_executor(gm: torch.fx.GraphModule) -> str | None:
    """Why AOTInductor's library could not run this graph on its own, or None: an operation
    Inductor leaves to ATen (a Cholesky factorisation, a triangular solve) that has no C
    shim is called through a "proxy executor" that a bare library does not have (an
    AOTInductor package does: ``_packaged``)."""
    from torch._inductor.lowering import fallbacks
    from torchgen.aoti.fallback_ops import inductor_fallback_ops
    for node in gm.graph.nodes:
        op = node.target
        if node.op == "call_function" and op in fallbacks and str(op) not in inductor_fallback_ops:
            return f"{op} has no C shim for AOTInductor"
    return None


def _tensors_held(gm: torch.fx.GraphModule) -> list:
    """The tensors the graph reads (``get_attr``), in the order ``lift_constants`` makes
    them inputs."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                out.append(value)
    return out


def _packed_graph(gm: torch.fx.GraphModule, example_inputs: tuple, packed: list, layout: list,
                  for_inductor: bool = False):
    """``gm`` recorded again with its tensors as inputs, packed (``pack_constants``).
    ``for_inductor``: recorded as Inductor's AOT compile would record it again
    (``_fast_lowering``), functionalized with Inductor's decompositions, and marked so."""
    import copy

    lifted = copy.deepcopy(gm)
    lift_constants(lifted)
    n = len(example_inputs)

    def program(*args):
        return lifted(*args[:n], *unpack_constants(args[n:], layout))
    if for_inductor:
        try:
            return _recorded_for_inductor(program, (*example_inputs, *packed))
        except Exception:  # noqa: BLE001 - recorded as before; Inductor records it again itself
            pass
    with _static_shapes_context():
        return make_fx(program)(*example_inputs, *packed)


# ------------------------------------------------------------------ a cheaper cold build of large graphs
#: ``_fast_lowering`` and the functionalized recording (``_packed_graph(..., for_inductor=True)``) on
#: (``PPL_FAST_LOWERING=0``: off, as before). Where Inductor's Python spent its time on GARCH's
#: unrolled graph (4236 operations of 4 numbers each, one thread, ~22 s before; cProfile):
#: ``aot_export_module`` recording the graph twice more (metadata, then the functionalized graph:
#: ~5 s), fusion's pairwise search (~4 s), the C++ code generation (~6 s; of which the vector-stride
#: analysis, ``stride_at_vec_range``, ~1.5 s: a sympy ``simplify`` per index behind a 128-entry
#: cache, and ``DtypePropagationOpsHandler()`` re-running its ``__init__`` -- ~100 ``setattr``s
#: and a set difference -- on every generated operation, ~1.4 s), lowering (~3 s).
FAST_LOWERING = {"on": os.environ.get("PPL_FAST_LOWERING", "1") != "0"}
#: Graphs with more operations than this get ``LARGE_GRAPH_OPTIONS``.
LARGE_GRAPH = 1500
#: Fusion's pairwise search bounded (Inductor: 64 candidate pairs per buffer group; GARCH: fusion
#: ~4.0 -> ~1.3 s), and no pattern matching in the joint- and post-grad passes (patterns for
#: matrix products, attention, pointless conversions: none in an unrolled graph of elementwise
#: operations; GARCH's passes 1.5 -> 0.9 s, the GP's 1.65 -> 1.2). The same outputs bit for bit
#: on GARCH and the GP (4160 operations), the library's call as fast (14-15 us).
LARGE_GRAPH_OPTIONS = {"max_fusion_buffer_group_pairwise_attempts": 8, "pattern_matcher": False}
#: Where set (off: None), Inductor's C++ backend starts a new kernel function for such graphs once
#: the one it fills has this many arguments (``CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM``, 500:
#: GARCH's ~140 loop nests are one function of ~10,000 lines, which gcc compiles superlinearly):
#: the same loops in the same order, in several functions, outputs bit-identical. gcc on
#: kernel.cpp at 40: GARCH 3.7 -> 2.4 s, the GP 7.3 -> 5.0 s (at 200: 2.75 and 5.6 s). Off because
#: the call is not always as fast (one thread, 15 alternating blocks of 500 calls, medians): at 40
#: or 64 GARCH the same (15.1 / 15.2 us) but the GP +0.15-0.2 us (~1%); at 200 the GP the same
#: but GARCH +0.45 us (~3%) -- some buffers a function kept to itself become the wrapper's.
LARGE_GRAPH_KERNEL_ARGS = None
_FOR_INDUCTOR = "_ppl_recorded_for_inductor"


def _large_graph_options(flat: torch.fx.GraphModule) -> dict:
    return dict(LARGE_GRAPH_OPTIONS) if FAST_LOWERING["on"] and len(flat.graph.nodes) > LARGE_GRAPH else {}


def _recorded_for_inductor(program, inputs: tuple) -> torch.fx.GraphModule:
    """``program`` recorded as ``aot_export_module`` records it for Inductor's AOT compile
    (functionalized, Inductor's decompositions applied), in the one recording that
    ``_packed_graph`` makes anyway, and marked so that ``_fast_lowering`` hands it to Inductor as
    it is; raises where the recording is not a plain functional graph of distinct outputs."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.func import functionalize

    with _static_shapes_context():
        flat = make_fx(functionalize(program, remove="mutations"), decomposition_table=select_decomp_table())(*inputs)
    for node in list(flat.graph.nodes):  # (values unchanged; an output detached is the value itself)
        if node.op == "call_function" and node.target in (_aten.detach.default, _aten.alias.default):
            node.replace_all_uses_with(node.args[0])
            flat.graph.erase_node(node)
    flat.graph.eliminate_dead_code()
    flat.recompile()
    outputs = flat.graph.output_node().args[0]
    if not isinstance(outputs, (tuple, list)) or len(set(outputs)) != len(outputs):
        raise ValueError("outputs not a tuple of distinct values")
    for node in flat.graph.nodes:
        if node.op == "call_function" and (_mutating(node) or not isinstance(node.target, torch._ops.OpOverload)):
            raise ValueError(f"not a plain functional graph: {node.target}")
    for out in outputs:
        if not isinstance(out, torch.fx.Node) or out.op != "call_function" or out.target.is_view or \
                not isinstance(out.meta.get("val"), torch.Tensor):
            raise ValueError("an output is an input, a view or not a tensor")
    setattr(flat, _FOR_INDUCTOR, True)
    return flat


@contextlib.contextmanager
def _fast_lowering(large: bool = False):
    """Inductor's Python made cheaper for the block, computing the same library (outputs
    bit-identical on the bench models, ``bench/cold_build.py --compare``):

    * a graph ``_recorded_for_inductor`` is handed to Inductor as it is, instead of being
      recorded twice more by ``aot_export_module`` (GARCH ~5 s; the functionalized recording
      costs ~0.3 s more than the plain one it replaces), and its values (``meta["val"]``, fake
      tensors of the recording's mode) are not propagated again afterwards
      (``fake_tensor_prop``: GARCH, the GP ~1 s), where every operation has one (``_values_in``);
    * ``stride_at_vec_range`` (the vector-stride analysis of each index: two sympy
      ``simplify``s, ~2 ms) is computed directly where the index is linear in the loop variable
      with integer coefficients (``_linear_stride``: the coefficient, which is what those come
      to; GARCH's 652 indices and the GP's 933 all were, the same answers as Inductor's), and it
      and ``simplify_index_in_vec_range`` are cached without bound for the block (Inductor: 128
      entries, which a large graph's indices cycle through). GARCH's C++ code generation
      6.0 -> 2.9 s, the GP's 8.7 -> 2.3 s;
    * ``DtypePropagationOpsHandler`` (a singleton) runs its ``__init__`` once, not at each
      generated operation (its rules are those of the first run: Inductor's tables, unchanged
      during a build);
    * the ISA checks Inductor makes by compiling and loading a test library per ISA
      extension (AVX-512 VNNI, BF16, AMX: six of them even where ``cpp.vec_isa_ok`` is set,
      ~1.6 s of gcc per cache directory and a Python process per probe) that passed are
      answered from a record per machine beside Inductor's precompiled headers
      (``ppl_isa_checks/``), keyed as Inductor keys them (the code, the flags, the compiler's
      version, torch's); one that failed is made again;
    * ``large`` (a graph over ``LARGE_GRAPH`` operations) and ``LARGE_GRAPH_KERNEL_ARGS`` set:
      kernel functions of at most that many arguments.

    Where ``FAST_LOWERING`` is off: nothing."""
    if not FAST_LOWERING["on"]:
        yield
        return
    import functools

    from torch._inductor import compile_fx, cpu_vec_isa, sizevars
    from torch._inductor.codegen import cpp
    from torch._inductor.dtype_propagation import DtypePropagationOpsHandler

    saved = [(compile_fx, "aot_export_module"), (compile_fx, "fake_tensor_prop"), (sizevars, "simplify_index_in_vec_range"),
             (sizevars, "stride_at_vec_range"), (cpp, "stride_at_vec_range"),
             (DtypePropagationOpsHandler, "__init__"), (cpu_vec_isa.VecISA, "check_build"),
             (cpp.CppScheduling, "MAX_FUSED_KERNEL_ARGS_NUM")]
    saved = [(owner, name, owner.__dict__[name]) for owner, name in saved]
    export, init, check_build = compile_fx.aot_export_module, DtypePropagationOpsHandler.__init__, \
        cpu_vec_isa.VecISA.check_build
    propagate = compile_fx.fake_tensor_prop

    recorded = {}

    def aot_export_module(mod, args, *, trace_joint, **kwargs):
        if trace_joint or not getattr(mod, _FOR_INDUCTOR, False):
            return export(mod, args, trace_joint=trace_joint, **kwargs)
        from torch._export.utils import _detect_fake_mode_from_gm
        recorded["mode"] = _detect_fake_mode_from_gm(mod)
        return mod, _plain_signature(mod, args)

    def fake_tensor_prop(gm, example_inputs, force_allow_non_fake_inputs=False):
        mode = recorded.get("mode")
        if mode is not None and not force_allow_non_fake_inputs and _values_in(gm, mode):
            return mode
        return propagate(gm, example_inputs, force_allow_non_fake_inputs)

    def init_once(self):
        if not self.__dict__.get("_ppl_initialised"):
            init(self)
            self._ppl_initialised = True

    def check_build_per_machine(self, code):
        from torch._inductor import codecache
        key = hashlib.sha256(f"{code}|{cpu_vec_isa._get_isa_dry_compile_fingerprint(self.build_arch_flags())}|"
                             f"{torch.version.git_version}".encode()).hexdigest()[:40]
        record = os.path.join(os.path.dirname(codecache._HEADER_DIR), "ppl_isa_checks", f"{key}.passed")
        if os.path.exists(record):
            return True
        ok = check_build(self, code)
        if ok:  # (a failure, perhaps a probe timed out under load, is not kept: checked again next time)
            try:
                os.makedirs(os.path.dirname(record), exist_ok=True)
                with open(record, "w"):
                    pass
            except OSError:
                pass
        return ok

    simplify_index = functools.lru_cache(maxsize=None)(sizevars.simplify_index_in_vec_range.__wrapped__)
    slow_stride = sizevars.stride_at_vec_range.__wrapped__

    @functools.lru_cache(maxsize=None)
    def stride(index, var, vec_length=None):
        known = _linear_stride(index, var)
        return known if known is not None else slow_stride(index, var, vec_length)
    compile_fx.aot_export_module, compile_fx.fake_tensor_prop = aot_export_module, fake_tensor_prop
    sizevars.simplify_index_in_vec_range = simplify_index
    sizevars.stride_at_vec_range = cpp.stride_at_vec_range = stride
    DtypePropagationOpsHandler.__init__ = init_once
    cpu_vec_isa.VecISA.check_build = check_build_per_machine
    if large and LARGE_GRAPH_KERNEL_ARGS:
        cpp.CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM = min(LARGE_GRAPH_KERNEL_ARGS, cpp.CppScheduling.MAX_FUSED_KERNEL_ARGS_NUM)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _linear_stride(index, var):
    """``stride_at_vec_range(index, var, n)`` where ``index`` is a polynomial with integer
    coefficients that is linear in ``var`` (no ``FloorDiv``, ``ModularIndexing`` or other
    function: what a static-shape graph's loads and stores mostly are, ``148*x0 + 3``): the
    coefficient of ``var``, which is what Inductor's sympy ``simplify``s of the index and of
    its difference at ``var + 1`` come to (``simplify_index_in_vec_range`` only rewrites
    ``FloorDiv`` and ``ModularIndexing`` of ``var``); None where that is not so (the caller
    asks Inductor)."""
    import sympy
    try:
        if not isinstance(index, sympy.Expr) or index.atoms(sympy.Function) or \
                not index.is_polynomial(*index.free_symbols):
            return None
        if not index.has(var):
            return sympy.S.Zero
        step = sympy.expand(index.xreplace({var: var + 1}) - index)
    except Exception:  # noqa: BLE001 - not an index this knows: Inductor's own analysis
        return None
    return step if step.is_Integer else None


def _values_in(gm: torch.fx.GraphModule, mode) -> bool:
    """Whether every placeholder and operation of ``gm`` has its value (``meta["val"]``) as a
    fake tensor of ``mode``, or a tuple of them."""
    from torch._subclasses.fake_tensor import FakeTensor
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "call_function"):
            continue
        value = node.meta.get("val")
        values = value if isinstance(value, (tuple, list)) else (value,)
        if not values or not all(isinstance(v, FakeTensor) and v.fake_mode is mode for v in values):
            return False
    return True


def _plain_signature(gm: torch.fx.GraphModule, args):
    """``aot_export_module``'s signature of a graph ``_recorded_for_inductor``: every input a
    user input, every output a user output, nothing mutated."""
    import torch.utils._pytree as pytree
    from torch._functorch._aot_autograd.schemas import GraphSignature

    outputs = list(gm.graph.output_node().args[0])
    return GraphSignature(
        parameters=[], buffers=[], user_inputs=[n.name for n in gm.graph.find_nodes(op="placeholder")],
        user_outputs=[n.name for n in outputs], inputs_to_parameters={}, inputs_to_buffers={},
        buffers_to_mutate={}, parameters_to_mutate={}, user_inputs_to_mutate={},
        in_spec=pytree.tree_flatten((tuple(args), {}))[1], out_spec=pytree.tree_flatten(tuple(outputs))[1],
        backward_signature=None, input_tokens=[], output_tokens=[])


def _native_path(gm: torch.fx.GraphModule, inputs: list) -> str:
    """The library's place: keyed by the recorded graph's code (its tensors' names, not their
    values: those are inputs) and the shapes of its inputs and tensors, so that a later
    build of the same graph finds it without recording the packed graph again."""
    digest = hashlib.sha256()
    digest.update(f"{torch.__version__}|{_NATIVE_VERSION}|{sorted(FAST_BUILD.items())}|{vector_width()}|".encode())
    digest.update(gm.code.encode())  # (not print_readable: its comments hold the interpreter's source lines)
    for x in inputs:
        digest.update(f"{tuple(x.shape)}{x.dtype}{x.device}|".encode())
    return os.path.join(cache_dir(), "ppl_native", digest.hexdigest() + ".so")


def lift_constants(gm: torch.fx.GraphModule) -> list:
    """Make every tensor the graph holds (``get_attr``: data, folded constants) an input
    after the others, in place; those tensors in their input order."""
    constants = []
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        value = _attr(gm, node.target)
        if not isinstance(value, torch.Tensor):
            continue
        with gm.graph.inserting_after(last):
            last = gm.graph.placeholder(f"constant_{len(constants)}")
        last.meta = dict(node.meta)
        node.replace_all_uses_with(last)
        gm.graph.erase_node(node)
        constants.append(value)
    gm.graph.lint()
    gm.recompile()
    return constants


def pack_constants(constants: list) -> tuple[list, list]:
    """(one flat tensor per dtype holding ``constants``, each constant's (flat index,
    offset, shape)): a compiled program takes a few inputs instead of one per constant."""
    dtypes = sorted({c.dtype for c in constants}, key=str)
    parts: dict = {dt: [] for dt in dtypes}
    layout = []
    for c in constants:
        group = parts[c.dtype]
        layout.append((dtypes.index(c.dtype), sum(t.numel() for t in group), tuple(c.shape)))
        group.append(c.detach().reshape(-1))
    return [torch.cat(parts[dt]).contiguous() for dt in dtypes], layout


def unpack_constants(flats, layout: list) -> list:
    """The constants of ``pack_constants``, as views of its flat tensors."""
    out = []
    for group, offset, shape in layout:
        numel = math.prod(shape)
        out.append(flats[group][offset:offset + numel].view(shape))
    return out


def _mutating(node) -> bool:
    target = getattr(node.target, "__name__", str(node.target))
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    return target.endswith("_")


def _mutated(gm: torch.fx.GraphModule, with_mutators: bool = False) -> set:
    """The nodes some operation of the graph mutates (and, ``with_mutators``, those operations)."""
    mutated = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and _mutating(node):
            mutated.update(node.all_input_nodes)
            if with_mutators:
                mutated.add(node)
    return mutated


def fold_constants(gm: torch.fx.GraphModule) -> int:
    """Replace every operation whose inputs are all constants by its value (computed
    now); the number of operations folded. Operations that mutate, and the inputs of
    such operations, are never folded (a stored constant must stay unchanged)."""
    graph = gm.graph
    mutated = _mutated(gm)
    env: dict = {}
    folded = 0
    for node in list(graph.nodes):
        if node.op == "get_attr":
            env[node] = _attr(gm, node.target)
            continue
        if node.op != "call_function" or _mutating(node) or node in mutated:
            continue
        inputs = node.all_input_nodes
        if not all(i in env for i in inputs):
            continue
        args = torch.fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
        value = node.target(*args, **kwargs)
        if not isinstance(value, torch.Tensor) or value.numel() > FOLD_MAX_ELEMENTS:
            continue
        env[node] = value
        if node.users and not all(u in env for u in node.users):
            name = f"_folded_{folded}"
            gm.register_buffer(name, value.clone())
            with graph.inserting_before(node):
                const = graph.get_attr(name)
            node.replace_all_uses_with(const)
            env[const] = value
        folded += 1
    graph.eliminate_dead_code()
    gm.recompile()
    return folded


_aten = torch.ops.aten
_UNIT = {_aten.mul.Tensor: 1, _aten.mul.Scalar: 1, _aten.div.Tensor: 1, _aten.div.Scalar: 1,
         _aten.add.Tensor: 0, _aten.add.Scalar: 0, _aten.sub.Tensor: 0, _aten.sub.Scalar: 0,
         _aten.pow.Tensor_Scalar: 1}
_SAME = (_aten.view.default, _aten.expand.default, _aten.alias.default, _aten._to_copy.default,
         _aten.reshape.default, _aten.clone.default)


def drop_identities(gm: torch.fx.GraphModule) -> int:
    """Replace each operation that returns its input unchanged (same values, shape and
    dtype: ``x * 1``, ``x + 0``, ``x ** 1``, a view/expand/copy to the same shape and
    dtype) by that input; the number dropped. Nothing that is mutated, or whose input is,
    is touched (an alias must not change what a copy protected)."""
    mutated = _mutated(gm, with_mutators=True)
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node in mutated or not node.args:
            continue
        x = node.args[0]
        if not isinstance(x, torch.fx.Node) or x in mutated:
            continue
        out, inp = node.meta.get("val"), x.meta.get("val")
        if not (isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor)):
            continue
        if out.shape != inp.shape or out.dtype != inp.dtype or out.device != inp.device:
            continue
        if node.target in _UNIT:
            if len(node.args) != 2 or isinstance(node.args[1], torch.fx.Node) or node.kwargs.get("alpha", 1) != 1:
                continue
            if not (isinstance(node.args[1], (int, float)) and node.args[1] == _UNIT[node.target]):
                continue
        elif node.target not in _SAME:
            continue
        node.replace_all_uses_with(x)
        gm.graph.erase_node(node)
        dropped += 1
    gm.recompile()
    return dropped


def drop_constant_selects(gm: torch.fx.GraphModule) -> int:
    """Replace each ``where(mask, a, b)`` whose mask is a constant that is all true by
    ``a``, and one whose mask is all false by ``b`` (expanded to the select's shape where it
    broadcasts); the number replaced. The values are the ones ``where`` would pick, bit for
    bit. Typical source: a distribution's support check of observed data, folded to a
    constant mask (logistic regression's 200 labels, each 0 or 1), that guards every term of
    the log density and of its gradient; compiled, each such mask is a load and a blend per
    element in the fused kernel (logistic's library call: ~1.7 us of ~8.5). Nothing mutated,
    or whose branch is, is touched."""
    mutated = _mutated(gm, with_mutators=True)
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _aten.where.self or node in mutated:
            continue
        mask, a, b = node.args[:3]
        if not (isinstance(mask, torch.fx.Node) and mask.op == "get_attr"):
            continue
        value = _attr(gm, mask.target)
        if not isinstance(value, torch.Tensor) or value.dtype != torch.bool or value.numel() == 0:
            continue
        keep = a if bool(value.all()) else b if not bool(value.any()) else None
        out = node.meta.get("val")
        kept = keep.meta.get("val") if isinstance(keep, torch.fx.Node) else None
        if keep in mutated or not isinstance(out, torch.Tensor) or not isinstance(kept, torch.Tensor) or \
                kept.dtype != out.dtype or kept.device != out.device:
            continue
        if kept.shape != out.shape:
            with gm.graph.inserting_before(node):
                keep = gm.graph.call_function(_aten.expand.default, (keep, list(out.shape)))
            keep.meta["val"] = out
        node.replace_all_uses_with(keep)
        gm.graph.erase_node(node)
        replaced += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return replaced


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def eliminate_common_subexpressions(gm: torch.fx.GraphModule) -> int:
    """Compute each pure operation on the same inputs once; the number removed."""
    mutated = _mutated(gm)
    seen: dict = {}
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or _mutating(node) or node in mutated:
            continue
        try:
            key = (node.target, _hashable(node.args), _hashable(node.kwargs))
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
            removed += 1
        else:
            seen[key] = node
    gm.recompile()
    return removed


def _hashable(x):
    if isinstance(x, (list, tuple)):
        return tuple(_hashable(i) for i in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in x.items()))
    if isinstance(x, torch.fx.Node):
        return ("node", x.name)
    if isinstance(x, (torch.device, torch.dtype, torch.memory_format, torch.layout)):
        return str(x)
    hash(x)
    return x
