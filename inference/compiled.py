"""A function of tensors recorded once and replayed fast: the graph of a static program's
log density and gradient.

``record(fn, example_inputs)`` traces ``fn`` to a graph of ATen operations
(``make_fx``: Python control flow, the interpreter's bookkeeping and autograd's
backward pass all disappear; only tensor operations remain), then simplifies it:

* **constant folding**: every operation whose inputs are all constants (the data, the
  program's literals: ``log(sigma)``, a prior's ``scale**2``, the parameter checks of
  constant parameters) is computed once, at record time;
* **identities** (``x * 1``, ``x + 0``, ``x ** 1``, a view, expand or copy to the same
  shape and dtype) are dropped;
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

import hashlib
import os
import warnings

import torch
from torch.fx.experimental.proxy_tensor import make_fx

FOLD_MAX_ELEMENTS = 1_000_000  # constants larger than this are recomputed, not stored


def record(fn, example_inputs: tuple):
    """``fn`` (tensors -> tuple of tensors) as a simplified ATen graph (a GraphModule), to
    hand to ``replay``."""
    # values read into Python are constants here (the caller has checked that no decision
    # depends on an input), so they may be baked into the graph
    with _one_fake_mode():
        gm = make_fx(fn, _error_on_data_dependent_ops=False)(*example_inputs)
    fold_constants(gm)
    drop_identities(gm)
    eliminate_common_subexpressions(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


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


def _marker_path(gm, example_inputs, size_asserts: bool) -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir
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
           size_asserts: bool = True):
    """The recorded graph as a fast function: replayed by TorchScript (``backend="jit"``:
    ready at once) or compiled to fused native code by TorchInductor (``"inductor"``:
    seconds of compilation, then several times faster for a graph of many small
    operations). ``size_asserts=False``: Inductor's code does not check each input's
    sizes and strides on every call (~0.6 us an input); the caller must then pass
    contiguous inputs of the example's shapes."""
    if backend == "inductor":
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


def _mutating(node) -> bool:
    target = getattr(node.target, "__name__", str(node.target))
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    return target.endswith("_")


def fold_constants(gm: torch.fx.GraphModule) -> int:
    """Replace every operation whose inputs are all constants by its value (computed
    now); the number of operations folded. Operations that mutate, and the inputs of
    such operations, are never folded (a stored constant must stay unchanged)."""
    graph = gm.graph
    mutated = set()
    for node in graph.nodes:
        if node.op == "call_function" and _mutating(node):
            mutated.update(a for a in node.all_input_nodes)
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
    mutated = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and _mutating(node):
            mutated.update(node.all_input_nodes)
            mutated.add(node)
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


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def eliminate_common_subexpressions(gm: torch.fx.GraphModule) -> int:
    """Compute each pure operation on the same inputs once; the number removed."""
    mutated = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and _mutating(node):
            mutated.update(node.all_input_nodes)
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
