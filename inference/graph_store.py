"""The potential's recorded graph kept on disk as data, so that a later process running the
same program on the same data loads it instead of recording it again through the
interpreter (eight schools: ~1.4 s CPU of a run's setup, most of it the first
``torch.func.grad``'s import of Dynamo; GARCH: ~4.5 s, the recording of ~4,000 operations).

    key(potential)  -> a sha256 of everything the recorded graph is a function of, or None
                       (something in the program or its data cannot be described: no store)
    load(key)       -> the GraphModule stored under the key, or None
    save(key, gm)   -> stored (only if it reads back as the very same graph)

**What the key covers** (any change of one of these changes the key): the stored format's
version; torch's, Python's and numpy's versions; the bytes of every source file of the
package (``*.py``, ``*.lark``, ``*.ppl`` under compiler/, semantics/, inference/, stdlib/
and the face: the interpreter, the distributions, the recording passes); a description of
ppl's code *as it runs in this process* (every function and class attribute of every
imported ppl module by its qualified name, module and line, every scalar constant by value:
a test's ``monkeypatch.setattr`` of a ppl function or flag changes it); ``PPL_*``
environment variables; the program (its IR's ``repr``: every literal, name and operator, no
source positions), its entry, the interpreter's options and its built-in functions (each
by its qualified name; a built-in whose code is not ppl's own -- a user's Python function --
makes the program not storable); the data, every value by its bytes (tensors: dtype, shape
and contents; numbers by ``repr``; an object of another kind makes the program not
storable); the device, the number of chains, the layout of z (sites, shapes) and the
discrete choices' shapes and dtypes (graph inputs).

**What is stored**: data only, never code. One ``torch.save`` file per key under
TorchInductor's cache directory (``ppl_graphs/<key>.pt``), read back with
``torch.load(weights_only=True)`` (no unpickling of arbitrary objects): the graph's nodes, as
one JSON text, each (op, name, target, args, kwargs) with each target an ATen operator's qualified name (or
``operator.getitem``) resolved through ``torch.ops`` -- anything else is refused -- and the
graph's tensors. The GraphModule is rebuilt from those (FX generates its Python code
itself, as for any recorded graph). ``save`` writes only a graph whose rebuilt ``code`` and
tensors equal the original's bit for bit, so a loaded graph is the recorded graph; the
caller (``potential._trace``) still checks it against the interpreter at fresh points
before using it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import operator
import os
import sys
import types

import torch

FORMAT = "ppl-graph-2"  # bump when what is stored, or what the key covers, changes (2: nodes as JSON text)
PACKAGES = ("compiler", "semantics", "inference", "stdlib", "ppl")  # the package's source folders
ENABLED = {"on": os.environ.get("PPL_GRAPH_STORE", "1") != "0"}  # PPL_GRAPH_STORE=0: always record
_SOURCE: dict = {}


class NotStorable(Exception):
    """The program or its data holds something the key cannot describe."""


# ------------------------------------------------------------------------------- the key
def key(potential) -> str | None:
    """The store's key for ``potential``'s recorded graph (see the module docstring), or
    None where the store is off or the program cannot be described."""
    if not ENABLED["on"]:
        return None
    try:
        return _key(potential)
    except NotStorable:
        return None


def _key(p) -> str:
    import numpy
    model = p.model
    digest = hashlib.sha256()

    def put(*parts):
        for part in parts:
            digest.update(str(part).encode())
            digest.update(b"\x00")

    put(FORMAT, torch.__version__, sys.version, numpy.__version__, source_fingerprint(), running_code())
    put(*sorted((k, v) for k, v in os.environ.items() if k.startswith("PPL_")))
    interp = model.interp
    put(repr(interp.program), model.entry, model.device, model.stop_after, model.beta)
    put(*_interpreter_options(interp))
    put(*_builtins(interp))
    _describe(model.data, put)
    put(p.C, p.D, *((s.addr, s.start, s.stop, s.shape, s.value_shape) for s in p.sites))
    for a in p.discrete:
        v = p.given[a]
        put(a, tuple(v.shape), v.dtype, v.device)
    return digest.hexdigest()


def source_fingerprint() -> str:
    """sha256 of every source file of the package (once per process)."""
    if "digest" not in _SOURCE:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        digest = hashlib.sha256()
        folders = [os.path.join(root, name) for name in PACKAGES if os.path.isdir(os.path.join(root, name))]
        files = [os.path.join(root, f) for f in sorted(os.listdir(root)) if f.endswith(".py")]
        for folder in folders:
            for here, dirs, names in os.walk(folder):
                dirs.sort()
                files += [os.path.join(here, n) for n in sorted(names) if n.endswith((".py", ".lark", ".ppl"))]
        for path in files:
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
        _SOURCE["digest"] = digest.hexdigest()
    return _SOURCE["digest"]


def _package_name() -> str:
    return __name__.rsplit(".", 2)[0]  # "ppl" (this module is <package>.inference.graph_store)


#: modules of the recording path whose scalar settings (flags, thresholds) the key reads; all of
#: them are imported by ``import ppl``, so the key does not depend on which other modules a
#: process happened to import
SETTINGS_MODULES = ("inference.potential", "inference.compiled", "inference.mh_traced", "inference.observe_groups",
                    "semantics.interpreter", "semantics.sampling", "semantics.values", "semantics.branchless",
                    "semantics.dist_values", "semantics.gfi", "stdlib.distributions", "stdlib.dist_classes",
                    "stdlib.prelude")


def running_code() -> str:
    """sha256 of what a process changed in ppl's code at run time: every function or method of
    an imported ppl module (or of a class defined there) whose code lies outside the package
    and the installed libraries (a test's ``monkeypatch.setattr`` of ``Interpreter._select_plan``,
    a script's replacement of ``support_bijection``), and the scalar settings of the recording
    path's modules (``SETTINGS_MODULES``: ``potential.GROUP_OBSERVES``, ...)."""
    package = _package_name()
    outside = _outside_code()
    digest = hashlib.sha256()
    for name in sorted(n for n in list(sys.modules) if n == package or n.startswith(package + ".")):
        module = sys.modules.get(name)
        for attr, value in sorted(vars(module).items(), key=lambda kv: kv[0]) if module is not None else ():
            if outside(value):
                digest.update(f"{name}.{attr}={_what(value)};".encode())
            if isinstance(value, type) and value.__module__ == name:
                for cattr, cvalue in sorted(vars(value).items(), key=lambda kv: kv[0]):
                    if outside(cvalue):
                        digest.update(f"{name}.{attr}.{cattr}={_what(cvalue)};".encode())
    for short in SETTINGS_MODULES:
        module = sys.modules.get(f"{package}.{short}")
        digest.update(f"[{short}]".encode())
        for attr, value in sorted(vars(module).items(), key=lambda kv: kv[0]) if module is not None else ():
            if isinstance(value, (bool, int, float, str)) and not attr.startswith("__"):
                digest.update(f"{attr}={value!r};".encode())
            elif isinstance(value, type) and value.__module__ == module.__name__:
                for cattr, cvalue in sorted(vars(value).items(), key=lambda kv: kv[0]):
                    if isinstance(cvalue, (bool, int, float, str)) and not cattr.startswith("__"):
                        digest.update(f"{attr}.{cattr}={cvalue!r};".encode())
    return digest.hexdigest()


def _outside_code():
    """A test: is this attribute a function that is not ppl's (by its module) and whose code
    lies outside ppl's package folders and the installed libraries (Python's, the
    environment's)?"""
    import sysconfig
    package = _package_name()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    inside = [os.path.join(root, name) + os.sep for name in PACKAGES]
    inside += [os.path.join(p, "") for k, p in sysconfig.get_paths().items()
               if k in ("stdlib", "platstdlib", "purelib", "platlib")]

    def outside(value) -> bool:
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            return any(outside(f) for f in (value.fget, value.fset, value.fdel) if f is not None)
        if not isinstance(value, types.FunctionType):
            return False
        module = value.__module__ or ""
        if module == package or module.startswith(package + "."):
            return False  # (ppl's own, also methods a dataclass generated: their file is "<string>")
        path = os.path.abspath(value.__code__.co_filename)
        return not (any(path.startswith(p) for p in inside) or os.path.dirname(path) == root and path.endswith(".py"))
    return outside


def _what(value) -> str:
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if isinstance(value, property):
        return "property(" + ",".join(_what(f) for f in (value.fget, value.fset, value.fdel)) + ")"
    if isinstance(value, (bool, int, float, str, bytes, type(None))):
        return repr(value)
    if isinstance(value, types.FunctionType):
        code = value.__code__
        return f"fn {value.__module__}.{value.__qualname__}@{code.co_filename}:{code.co_firstlineno}"
    if isinstance(value, (type, types.BuiltinFunctionType, types.ModuleType)):
        return f"{type(value).__name__} {getattr(value, '__module__', '')}.{getattr(value, '__qualname__', value.__name__)}"
    return type(value).__name__  # (other objects: their kind; their values are not described)


def _interpreter_options(interp) -> list:
    return [(k, v) for k, v in sorted(vars(interp).items()) if isinstance(v, (bool, int, float, str, type(None)))]


#: modules whose code a built-in may run and still be described by name (their versions are in
#: the key, or they are the standard library's)
_KNOWN = ("torch", "math", "builtins", "operator", "numpy", "_operator", "functools", "cmath", "re", "regex",
          "fractions")


def _known_module(module) -> bool:
    module = module or ""
    package = _package_name()
    return module == package or module.startswith(package + ".") or module.split(".")[0] in _KNOWN


def _builtins(interp) -> list:
    """Each built-in function the interpreter offers, described with what its code closes
    over (``_stable``); one whose code is not ppl's own, torch's or the standard library's
    (a user's Python function) cannot be described (NotStorable)."""
    inputs = getattr(interp, "_purity_inputs", None)
    table = inputs[0] if isinstance(inputs, tuple) and inputs and isinstance(inputs[0], dict) else None
    if table is None:
        raise NotStorable("no built-in table")
    return [(name, _stable(table[name], 0, set())) for name in sorted(table)]


def _stable(x, depth: int, seen: set) -> str:
    """A description of ``x`` that is the same in every process running the same code on the
    same values (no ids, no addresses); NotStorable where there is none."""
    if x is None or isinstance(x, (bool, int, str, bytes)):
        return repr(x)
    if isinstance(x, float):
        return x.hex() if math.isfinite(x) else repr(x)
    if isinstance(x, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(x)
    if depth > 16:
        raise NotStorable("too deep")
    if id(x) in seen:
        return "<seen>"
    seen = seen | {id(x)}
    if isinstance(x, torch.Tensor):
        parts: list = []
        _describe(x, lambda *a: parts.extend(map(str, a)))
        return "tensor(" + ",".join(parts) + ")"
    if isinstance(x, (tuple, list)):
        return type(x).__name__ + "(" + ",".join(_stable(v, depth + 1, seen) for v in x) + ")"
    if isinstance(x, (set, frozenset)):
        return type(x).__name__ + "(" + ",".join(sorted(_stable(v, depth + 1, seen) for v in x)) + ")"
    if isinstance(x, dict):
        return "dict(" + ",".join(sorted(f"{_stable(k, depth + 1, seen)}:{_stable(v, depth + 1, seen)}"
                                         for k, v in x.items())) + ")"
    if isinstance(x, (staticmethod, classmethod)):
        return _stable(x.__func__, depth + 1, seen)
    if isinstance(x, functools.partial):
        return "partial(" + ",".join(_stable(v, depth + 1, seen) for v in (x.func, x.args, x.keywords)) + ")"
    if isinstance(x, types.MethodType):
        return "method(" + _stable(x.__func__, depth + 1, seen) + "," + _stable(x.__self__, depth + 1, seen) + ")"
    if isinstance(x, types.FunctionType):
        if not _known_module(x.__module__):
            raise NotStorable(f"function {x.__qualname__} of {x.__module__}")
        cells = [c.cell_contents for c in (x.__closure__ or ()) if _filled(c)]
        return _what(x) + "[" + _stable(tuple(cells), depth + 1, seen) + _stable(x.__defaults__, depth + 1, seen) + \
            _stable(x.__kwdefaults__, depth + 1, seen) + "]"
    if isinstance(x, type) or callable(x) and not hasattr(x, "__dict__") and not hasattr(type(x), "__slots__"):
        module = getattr(x, "__module__", None) or getattr(type(x), "__module__", None)
        name = getattr(x, "__qualname__", None) or getattr(x, "__name__", None)
        if name is None or not _known_module(module):
            raise NotStorable(f"callable {x!r}")
        return f"{type(x).__name__} {module}.{name}"
    kind = type(x)
    if not _known_module(kind.__module__):
        raise NotStorable(f"object of {kind.__module__}.{kind.__qualname__}")
    fields = dict(vars(x)) if hasattr(x, "__dict__") else {}
    for klass in kind.__mro__:
        for slot in getattr(klass, "__slots__", ()):
            if isinstance(slot, str) and hasattr(x, slot):
                fields[slot] = getattr(x, slot)
    return f"{kind.__module__}.{kind.__qualname__}" + _stable(fields, depth + 1, seen)


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # (an empty cell)
        return False
    return True


def _describe(value, put) -> None:
    """Feed ``value`` (the program's data) to ``put`` by its bytes; NotStorable for a kind
    the key cannot describe."""
    if value is None or isinstance(value, (bool, int, str)):
        put(type(value).__name__, repr(value))
    elif isinstance(value, float):
        put("float", value.hex() if math.isfinite(value) else repr(value))
    elif isinstance(value, torch.Tensor):
        if value.is_sparse or value.requires_grad or type(value) is not torch.Tensor:
            raise NotStorable("tensor kind")
        put("tensor", value.dtype, tuple(value.shape), value.device, hashlib.sha256(_bytes(value)).hexdigest())
    elif isinstance(value, (list, tuple)):
        put(type(value).__name__, len(value))
        for v in value:
            _describe(v, put)
    elif isinstance(value, dict):
        put("dict", len(value))
        for k in sorted(value, key=repr):
            if not isinstance(k, (str, int)):
                raise NotStorable("dict key")
            put(repr(k))
            _describe(value[k], put)
    else:
        import numpy
        if isinstance(value, numpy.ndarray) and value.dtype.kind in "biuf":
            put("ndarray", value.dtype.str, value.shape, hashlib.sha256(numpy.ascontiguousarray(value).tobytes())
                .hexdigest())
        elif isinstance(value, numpy.generic) and value.dtype.kind in "biuf":
            put("npscalar", value.dtype.str, repr(value.item()))
        else:
            raise NotStorable(type(value).__name__)


# ------------------------------------------------------------------ the stored graph (data)
def _path(key: str) -> str:
    from .compiled import cache_dir
    return os.path.join(cache_dir(), "ppl_graphs", key + ".pt")


def _encode(x):
    if isinstance(x, torch.fx.Node):
        return {"node": x.name}
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    if isinstance(x, list):
        return [_encode(v) for v in x]
    if isinstance(x, tuple):
        return {"tuple": [_encode(v) for v in x]}
    if isinstance(x, dict):
        return {"dict": [[k, _encode(v)] for k, v in x.items()]}
    for kind in (torch.dtype, torch.layout, torch.memory_format):
        if isinstance(x, kind):
            return {kind.__name__: str(x).replace("torch.", "")}
    if isinstance(x, torch.device):
        return {"device": str(x)}
    raise NotStorable(f"argument {type(x).__name__}")


def _decode(x, nodes: dict):
    if isinstance(x, list):
        return [_decode(v, nodes) for v in x]
    if not isinstance(x, dict):
        return x
    (kind, v), = x.items()
    if kind == "node":
        return nodes[v]
    if kind == "tuple":
        return tuple(_decode(i, nodes) for i in v)
    if kind == "dict":
        return {k: _decode(i, nodes) for k, i in v}
    if kind == "device":
        return torch.device(v)
    value = getattr(torch, v)
    if type(value).__name__ != kind:
        raise NotStorable(f"{kind} {v}")
    return value


def _target_name(target) -> str:
    if target is operator.getitem:
        return "operator.getitem"
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}::{target._opname}.{target._overloadname}"
    raise NotStorable(f"target {target!r}")


def _target(name: str):
    if name == "operator.getitem":
        return operator.getitem
    namespace, rest = name.split("::", 1)
    op, overload = rest.rsplit(".", 1)
    target = getattr(getattr(getattr(torch.ops, namespace), op), overload)
    if not isinstance(target, torch._ops.OpOverload):
        raise NotStorable(name)
    return target


def encode(gm: torch.fx.GraphModule) -> dict:
    """The graph as data: nodes and tensors (NotStorable for anything else)."""
    nodes, tensors = [], {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            target = n.target
        elif n.op == "get_attr":
            target = n.target
            value = getattr(gm, target, None)
            if "." in target or not isinstance(value, torch.Tensor) or type(value) is not torch.Tensor:
                raise NotStorable(f"attribute {target}")
            tensors[target] = value.detach().clone()
        elif n.op == "call_function":
            target = _target_name(n.target)
        else:
            raise NotStorable(n.op)
        nodes.append([n.op, n.name, target, _encode(n.args), _encode(n.kwargs)])
    return {"format": FORMAT, "nodes": nodes, "tensors": tensors}


def decode(data: dict) -> torch.fx.GraphModule:
    """The GraphModule ``encode`` described."""
    if data.get("format") != FORMAT:
        raise NotStorable("format")
    root = torch.nn.Module()
    for name, value in data["tensors"].items():
        root.register_buffer(name, value)
    graph = torch.fx.Graph()
    made: dict = {}
    for op, name, target, args, kwargs in data["nodes"]:
        if op == "call_function":
            target = _target(target)
        elif op not in ("placeholder", "get_attr", "output"):
            raise NotStorable(op)
        node = graph.create_node(op, target, _decode(args, made), _decode(kwargs, made), name=name)
        if node.name != name:
            raise NotStorable(f"node name {name}")
        made[name] = node
    return torch.fx.GraphModule(root, graph)


def _same(a: torch.fx.GraphModule, b: torch.fx.GraphModule) -> bool:
    if a.code != b.code:
        return False
    ta, tb = _held(a), _held(b)
    return ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and ta[k].stride() == tb[k].stride()
        and _bytes(ta[k]) == _bytes(tb[k]) for k in ta)


def _bytes(t: torch.Tensor) -> bytes:
    """A tensor's values as bytes (bit for bit: -0.0 and NaN payloads included)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _held(gm: torch.fx.GraphModule) -> dict:
    """The tensors the graph reads (its ``get_attr`` targets), by name."""
    return {n.target: getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}


def load(key: str | None) -> torch.fx.GraphModule | None:
    """The graph stored under ``key``, or None (none stored, unreadable, or refused)."""
    if key is None:
        return None
    try:
        path = _path(key)
        if not os.path.exists(path):
            return None
        return decode(_from_file(torch.load(path, weights_only=True)))
    except Exception:  # noqa: BLE001 - an unreadable entry is a miss: the graph is recorded again
        return None


def _to_file(data: dict) -> dict:
    """``encode``'s data as written: the nodes as one JSON text (numbers, strings, lists, and
    dicts of them; floats by their exact ``repr``, infinities and NaN as JSON's extensions),
    which reads back ~20x faster than the same lists unpickled one object at a time (GARCH's
    4,040 nodes: ~0.1 s of every run that loads its graph)."""
    return {**data, "nodes": json.dumps(data["nodes"], allow_nan=True)}


def _from_file(stored: dict) -> dict:
    if not isinstance(stored.get("nodes"), str):
        raise NotStorable("nodes")
    return {**stored, "nodes": json.loads(stored["nodes"])}


def save(key: str | None, gm: torch.fx.GraphModule) -> bool:
    """Store ``gm`` under ``key`` if it reads back as the same graph (code and tensors bit for
    bit); whether it was stored."""
    if key is None:
        return False
    try:
        data = _to_file(encode(gm))
        if not _same(decode(_from_file(data)), gm):
            return False
        path = _path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}.partial"
        torch.save(data, partial)
        os.replace(partial, path)  # (atomic: another process reads the whole entry or none)
        return True
    except Exception:  # noqa: BLE001 - a graph that cannot be stored is recorded again next time
        return False
