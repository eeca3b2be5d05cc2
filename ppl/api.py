"""The Python face: compile models, run inference on them.

    import ppl

    coin = ppl.model('''
    def coin(flips):
        p ~ beta(1, 1)
        for f in flips:
            observe f ~ bernoulli(p)
        return p
    ''')
    coin.run("importance", {"flips": [1, 1, 0]}, particles=10_000, seed=0).mean()

    @ppl.infer(method="importance", particles=10_000, seed=0)
    @ppl.model
    def coin(flips):
        '''
        p ~ beta(1, 1)
        for f in flips:
            observe f ~ bernoulli(p)
        return p
        '''
    coin(flips=[1, 1, 0]).summary()

A model file can only compute with the data passed to it: it cannot import, open files,
or reach any Python object but the arguments (Python functions passed as data are
called with tensors, one row per particle).
"""
from __future__ import annotations

import functools
import inspect
import os
import textwrap
from numbers import Number
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .inference.methods import METHODS, check_options
from .registry import check_method_options, run_method
from .semantics.devices import resolve_device  # noqa: F401  (part of the API)

from .semantics import ir
from .stdlib import rng
from .semantics.errors import PPLCheckError, PPLError, PPLRuntimeError, did_you_mean
from .semantics.interpreter import Builtin, Interpreter
from .semantics.pretty import pretty
from .semantics.sampling import Replay, drive
from .semantics.values import Batched, Particles, Vector, as_tensor, is_batched, rows, to_vector


class Model:
    """A compiled program with a chosen entry function (by default its last ``def``)."""

    def __init__(self, program: ir.Program, entry: str | None = None, *, source: str = "",
                 filename: str = "<model>", defaults: Mapping[str, Any] | None = None, **options):
        if not program.functions:
            raise PPLCheckError("the model defines no function", hint="write `def model(...):`")
        self.program = program
        self.entry = entry or program.functions[-1].name
        if self.entry not in program.names:
            raise PPLCheckError(f"no function named '{self.entry}' in {filename}",
                                hint=did_you_mean(self.entry, program.names) or
                                f"it defines: {', '.join(program.names)}")
        self.source = source
        self.filename = filename
        self.defaults = dict(defaults or {})
        self.options = options
        from .compiler.check import check
        check(program, _arities(), self.entry)

    # --------------------------------------------------------------------- description
    @property
    def name(self) -> str:
        return self.entry

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.program.function(self.entry).params)

    def pretty(self) -> str:
        """The model as ppl source, printed from its IR."""
        return pretty(self.program)

    def to_pyro(self, device: str = "cpu"):
        """This model as a Pyro model function ``f(*args, **data)`` with the same sites
        and addresses (``ppl.pyro_interop``): Pyro's NUTS, SVI and Predictive run on it."""
        from .pyro_interop import to_pyro
        return to_pyro(self, device)

    def transformed(self, transform: Any) -> "Model":
        """This model with its IR rewritten by ``transform`` (a function program ->
        program, or the name of a pass in ``ppl.compiler.transforms.PASSES``: "optimize",
        "fold_constants", "eliminate_dead_code"). The result is checked like any model;
        ``ppl.testing.validity.check_transformation`` checks that a transform preserves
        the measure."""
        if isinstance(transform, str):
            from .compiler.transforms import PASSES
            if transform not in PASSES:
                raise PPLError(f"unknown transformation '{transform}'",
                               hint=did_you_mean(transform, PASSES) or f"available: {', '.join(PASSES)}")
            transform = PASSES[transform]
        return Model(transform(self.program), self.entry, source=self.source, filename=self.filename,
                     defaults=self.defaults, **self.options)

    def compile_sibling(self, source: str, *, entry: str | None = None, filename: str | None = None) -> "Model":
        """Another model from source text or a ``.ppl`` path (``ppl.model``'s rules): how
        a guide program written in the DSL is compiled for ``inference/``, which never
        imports the compiler (``semantics.model.ModelLike``)."""
        return model(source, entry=entry, filename=filename)

    def with_entry(self, entry: str) -> "Model":
        return Model(self.program, entry, source=self.source, filename=self.filename,
                     defaults=self.defaults, **self.options)

    def __repr__(self) -> str:
        return f"<ppl.Model {self.entry}({', '.join(self.params)}) from {self.filename}>"

    def html(self, data: Mapping[str, Any] | None = None, *, graph: bool = True, **kwdata) -> str:
        """The model as HTML (``ppl.notebook.model_html``): highlighted source, entry and
        parameters, the sites with their distributions and the dependency graph on
        ``data`` (the defaults when none), drawn inline when small."""
        from .notebook import model_html
        return model_html(self, {**(data or {}), **kwdata}, graph=graph)

    def _repr_html_(self) -> str:
        return self.html()

    # ------------------------------------------------------------------------- running
    def builtins(self) -> dict:
        from .stdlib.prelude import builtins
        return builtins()

    def interpreter(self, exact: bool = False) -> Interpreter:
        return Interpreter(self.program, self.builtins(), exact=exact,
                           max_depth=self.options.get("max_depth"),  # None: ppl.set_limits's
                           max_iterations=self.options.get("max_iterations"))

    def bind(self, args: tuple = (), data: Mapping[str, Any] | None = None) -> dict:
        """Entry arguments as a dict: positional args, then keywords, then defaults."""
        params = self.params
        if len(args) > len(params):
            raise PPLRuntimeError(f"{self.entry}() takes {len(params)} arguments but {len(args)} were given")
        out = dict(self.defaults)
        out.update(zip(params, args))
        for k, v in (data or {}).items():
            if k not in params:
                raise PPLRuntimeError(f"{self.entry}() has no parameter '{k}'",
                                      hint=did_you_mean(k, params) or f"its parameters are: {', '.join(params)}")
            out[k] = v
        return out

    def prepare_data(self, data: Mapping[str, Any], device) -> dict:
        """Data as runtime values: numeric lists/arrays become tensors on ``device``
        (exact enumeration, device None, keeps plain Python values)."""
        return {k: _prepare(v, device, k) for k, v in data.items()}

    def run(self, method: str = "importance", data: Mapping[str, Any] | None = None, *,
            particles: int = 1000, seed: int | None = None, device: str = "cpu", **options):
        """Run inference ``method`` on ``entry(**data)``; returns a result object.

        ``seed``: the run draws from generators of its own seeded with it (the same seed,
        the same result, also when other runs go on in other threads at the same time;
        torch's global generator is untouched). ``seed=None``: seeded from torch's global
        generator (``torch.manual_seed`` makes it repeatable). See ``ppl.api.seeded``.

        ``distributed=True`` (importance, smc; under ``torchrun``): the particles are
        sharded over the job's ranks (``ppl.distributed``); rank 0 returns the result,
        the other ranks None."""
        _check_method(method)
        distributed = options.pop("distributed", False)
        options = check_method_options(method, options)  # names, types and ranges
        particles = check_options({"particles": particles})["particles"]
        seed = check_seed(seed)
        device = resolve_device(device)
        data = self.bind((), data)
        check_run_memory(self, method, particles, options)
        if distributed:
            from .distributed import run_distributed
            with out_of_memory_as_error():
                return run_distributed(self, method, data, particles=particles, seed=seed, device=device, **options)
        with seeded(seed, device), out_of_memory_as_error():
            return run_method(method, self, data, particles=particles, device=device, **options)

    def enumerate(self, **data):
        """The exact posterior (finite programs)."""
        return self.run("enumerate", data)

    def importance(self, particles: int = 1000, seed: int | None = None, device: str = "cpu", **data):
        return self.run("importance", data, particles=particles, seed=seed, device=device)

    def prior(self, particles: int = 1000, seed: int | None = None, device: str = "cpu", **data):
        return self.run("prior", data, particles=particles, seed=seed, device=device)

    # ------------------------------------------------------------------ structure (ppl.structure)
    def graph(self, data: Mapping[str, Any] | None = None, *, collapse: bool = False,
              deterministic: bool = False, **kwdata):
        """The dependency graph on ``data``: a ``networkx.DiGraph`` of random choices,
        observations, factors, conditions and the data they read (``ppl.structure``);
        ``collapse=True`` shows each loop's copies as one node with its plate."""
        from .structure import graph
        return graph(self, data, collapse=collapse, deterministic=deterministic, **kwdata)

    def independent(self, a, b, given=(), data: Mapping[str, Any] | None = None, *, observed: bool = True,
                    **kwdata) -> bool:
        """Whether sites ``a`` and ``b`` (addresses or plate names) are independent given
        ``given`` by d-separation (with every observation when ``observed``: the posterior)."""
        from .structure import independent
        return independent(self, a, b, given, data, observed=observed, **kwdata)

    def markov_blanket(self, x, data: Mapping[str, Any] | None = None, *, collapse: bool = False, **kwdata) -> set:
        """The Markov blanket of site ``x``: parents, children, the children's other parents."""
        from .structure import blanket
        return blanket(self, x, data, collapse=collapse, **kwdata)

    def draw(self, data: Mapping[str, Any] | None = None, path=None, *, collapse: bool = True, **kwdata):
        """The dependency graph as a matplotlib Figure (plates as boxes, observations shaded),
        saved to ``path`` when given."""
        from .structure import draw
        return draw(self, data, path, collapse=collapse, **kwdata)

    def predictive(self, result=None, data: Mapping[str, Any] | None = None, *, n: int | None = None,
                   seed: int | None = 0):
        """Replicated observations for predictive checks (``ppl.predictive``): with ``result``
        None, the prior predictive (``n`` draws, default 1000); with a result, the posterior
        predictive (each draw's latent values replayed: every kept MCMC draw, or ``n``
        (default N) particles resampled by weight). Every ``observe v ~ d`` gets fresh values
        from ``d`` in place of ``v``. ``data``: the model's inputs (default: the result's).
        Returns a ``Predictive``: ``pred["y"]`` is an array n x the observed shape,
        ``pred.plot(stat=("mean", "sd"))`` the check's figure, and
        ``result.to_arviz(predictive=pred)`` puts it in ArviZ's predictive groups."""
        from .predictive import predictive
        return predictive(self, result, data, n=n, seed=seed)

    def log_joint(self, trace: Mapping[str, Any], **data) -> torch.Tensor:
        """log p(trace, data) [n]: the sum of the log densities of every choice in
        ``trace`` (address -> value) and of every likelihood factor; -inf where a trace is
        impossible.

        The rule for batches: every tensor with at least one dimension holds one row per
        trace (its leading dimension is the number of traces n, the same for all such
        tensors); Python numbers, bools, lists and 0-d tensors are one value for every
        trace (n = 1 when there is no tensor). So one trace of a vector choice is a list
        (``{"theta": [0.1, 0.2]}``) or a tensor with a leading dimension of 1
        (``{"theta": torch.tensor([[0.1, 0.2]])}``), and n traces of it are a tensor
        [n, 2]. A value whose shape (per row) is not the choice's is a located error, as
        are tensors with different numbers of rows."""
        n, first = 1, None
        for addr, v in trace.items():
            if isinstance(v, torch.Tensor) and v.dim() >= 1:
                if first is not None and v.shape[0] != n:
                    raise PPLRuntimeError(
                        f"log_joint: the trace's tensors have different numbers of rows ('{first}': {n}, "
                        f"'{addr}': {v.shape[0]})",
                        hint="every tensor with a leading dimension holds one row per trace; give a value shared "
                             "by all traces as a number or a list")
                n, first = v.shape[0], addr
        ctx = Particles.all(n)
        h = Replay(dict(trace), n, "cpu", rows=True)
        drive(self.interpreter().run(self.entry, self.prepare_data(self.bind((), data), "cpu"), ctx), h)
        return h.log_weights

    def density(self, data: Mapping[str, Any] | None = None, *, symbolic_data: bool = False, **kwdata):
        """log p(choices, data) as a sympy expression, for a static program (control flow
        decided by data, not by random choices): one symbol per choice (``theta[i]`` for
        loop and vector sites), loops over data unrolled, or, with ``symbolic_data=True``,
        the data as symbols and loops over them as ``Sum(..., (i, 0, N - 1))``.
        ``semantics.symbolic.density`` gives the full result (symbols, a numeric function)."""
        from .semantics import symbolic
        return symbolic.density(self.program, self.entry, self.bind((), {**(data or {}), **kwdata}),
                                symbolic_data).expr

    def latex(self, data: Mapping[str, Any] | None = None, *, symbolic_data: bool | None = None, **kwdata) -> str:
        """The joint density as LaTeX: ``\\log p(\\mu, \\tau, \\theta \\mid y, \\sigma) = ...``
        (data as symbols and loops as sums where the program allows it, else unrolled;
        ``symbolic_data=True``/``False`` insists on one)."""
        from .semantics import symbolic
        return symbolic.latex(self.program, self.entry, self.bind((), {**(data or {}), **kwdata}), symbolic_data)


# ----------------------------------------------------------------------------- building
def model(source: Any = None, *, entry: str | None = None, filename: str | None = None, **options):
    """Compile a model: from a source string, a ``.ppl`` path, or (as a decorator) a
    Python function whose docstring is the body and whose signature gives the inputs.

    Options: ``max_depth`` (recursion bound, default 200), ``max_iterations`` (loop
    bound, default 100000)."""
    if source is None:
        return lambda fn: model(fn, entry=entry, filename=filename, **options)
    if callable(source) and not isinstance(source, str):
        return _from_function(source, **options)
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source
                                           and (source.endswith(".ppl") or os.path.exists(source))):
        path = os.fspath(source)
        return compile_source(read_text_file(path), filename or path, entry=entry, **options)
    if isinstance(source, str):
        return compile_source(source, filename or "<model>", entry=entry, **options)
    raise TypeError("ppl.model expects source text, a path, or a function")


def compile_source(text: str, filename: str = "<model>", *, entry: str | None = None,
                   line_offset: int = 0, defaults=None, **options) -> Model:
    from .compiler import parse_program
    program = parse_program(text, filename, line_offset)
    return Model(program, entry, source=text, filename=filename, defaults=defaults, **options)


def _from_function(fn: Callable, **options) -> Model:
    doc = fn.__doc__
    if not doc or not doc.strip():
        raise PPLError(f"@ppl.model: '{fn.__name__}' has no docstring",
                       hint="write the model body in the function's docstring")
    sig = inspect.signature(fn)
    defaults, names = {}, []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise PPLError(f"@ppl.model: '{fn.__name__}' cannot take *args or **kwargs")
        names.append(p.name)
        if p.default is not p.empty:
            defaults[p.name] = p.default
    lines = doc.split("\n")
    body = lines[1:] if not lines[0].strip() else lines
    indents = [len(l) - len(l.lstrip()) for l in body if l.strip()]
    if not indents or min(indents) == 0:
        body = ["    " + l for l in textwrap.dedent("\n".join(body)).split("\n")]
    text = f"def {fn.__name__}({', '.join(names)}):\n" + "\n".join(body) + "\n"
    filename, offset = "<model>", 0
    try:
        src_lines, start = inspect.getsourcelines(fn)
        filename = inspect.getsourcefile(fn) or filename
        for i, l in enumerate(src_lines):
            if '"""' in l or "'''" in l:
                # synthesized line 2 is the docstring's first body line
                first_body = start + i + (1 if not lines[0].strip() else 0)
                offset = first_body - 2
                break
    except (OSError, TypeError):
        pass
    m = compile_source(text, filename, line_offset=offset, defaults=defaults, **options)
    functools.update_wrapper(m, fn, assigned=("__doc__", "__module__"), updated=())
    return m


# ---------------------------------------------------------------------------- inference
class InferenceFunction:
    """A model turned into a function from data to a posterior (``@ppl.infer``)."""

    def __init__(self, model: Model, method: str, options: dict):
        self.model = model
        self.method = method
        self.options = options
        functools.update_wrapper(self, model, assigned=("__doc__",), updated=())

    def __call__(self, *args, **data):
        return self.model.run(self.method, self.model.bind(args, data), **self.options)

    def __repr__(self) -> str:
        return f"<ppl.infer {self.method} {self.model!r}>"


def infer(model_: Any = None, *, method: str = "importance", particles: int = 1000,
          seed: int | None = None, device: str = "cpu", **options):
    """Turn a model into a function from data to a result.

    ``@ppl.infer(method="importance", particles=10_000, seed=0)`` above ``@ppl.model``,
    or ``ppl.infer(model, method="enumerate")``."""
    _check_method(method)
    opts = dict(particles=particles, seed=seed, device=device, **options)

    def wrap(m):
        if not isinstance(m, Model):
            m = model(m)
        return InferenceFunction(m, method, opts)

    return wrap if model_ is None else wrap(model_)


# -------------------------------------------------------------------------------- utils
def read_text_file(path: str, what: str = "model file") -> str:
    """The text of a UTF-8 file; a missing, unreadable or non-UTF-8 file is a ``PPLError``
    (for bad bytes: the byte offset, and the line and column, with the line shown)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise PPLError(f"cannot read {what} '{path}': not found",
                       hint="pass the path of a .ppl file, e.g. `ppl run model.ppl`"
                       if what == "model file" else None) from None
    except OSError as e:
        raise PPLError(f"cannot read {what} '{path}': {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        from .semantics.source import SourceFile, Span
        before = raw[:e.start].decode("utf-8", errors="replace")
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        shown = SourceFile(path, raw.decode("utf-8", errors="replace"))
        raise PPLError(f"{what} '{path}' is not valid UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset "
                       f"{e.start} ({e.reason})", Span(line, col, line, col, shown),
                       "save the file as UTF-8") from None


def check_seed(seed: Any) -> int | None:
    """A seed: None, or a whole number that torch's generators take (-2**63 <= seed < 2**64)."""
    if seed is None:
        return None
    ok = isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) or \
        isinstance(seed, float) and seed.is_integer()
    if not ok or not -2 ** 63 <= int(seed) < 2 ** 64:
        shown = seed if not isinstance(seed, int) or int(seed).bit_length() < 100 else f"an integer of {int(seed).bit_length()} bits"
        raise PPLError(f"seed must be a whole number from -2**63 to 2**64 - 1 (got {shown!r})")
    return int(seed)


def _sites_in_text(program: ir.Program) -> int:
    """The number of sample/observe/factor/condition statements in ``program`` (counted
    once per program object: the IR is immutable)."""
    hit = _SITE_COUNTS.get(id(program))
    if hit is None or hit[0] is not program:
        n = sum(1 for node in ir.walk(program) if isinstance(node, (ir.Sample, ir.Observe, ir.Factor, ir.Condition)))
        if len(_SITE_COUNTS) >= 64:
            del _SITE_COUNTS[next(iter(_SITE_COUNTS))]  # the oldest
        hit = _SITE_COUNTS[id(program)] = (program, n)  # (holding the program keeps its id unique)
    return hit[1]


#: id(program) -> (program, its number of sites in the text)
_SITE_COUNTS: dict = {}


def check_run_memory(model: "Model", method: str, particles: int, options: dict) -> None:
    """Refuse a run whose particle tensors alone would exceed the memory budget: about
    particles x (sites + 4) x 8 bytes for a population (weights, indices, one value per
    site), chains x kept draws x (sites + 1) x 8 for MCMC. Sites are counted in the
    program text (a loop counts once, so this is a lower bound)."""
    from .semantics.limits import check_memory
    sites = _sites_in_text(model.program)
    if method in ("mh", "pmmh", "nuts", "hmc"):
        chains = options.get("chains") or (2 if method == "pmmh" else particles)
        samples = options.get("samples", 500 if method == "pmmh" else 1000)
        inner = particles if method == "pmmh" else 1
        check_memory(max(chains * samples * (sites + 1), chains * inner * (sites + 4)) * 8,
                     f"{method} with {chains:,} chains of {samples:,} draws",
                     "use fewer chains or draws, or raise the budget with ppl.set_limits(max_memory=...), "
                     "PPL_MAX_MEMORY or --limit max_memory=...")
        return
    width = particles * options.get("expansion", 1)
    check_memory(width * (sites + 4) * 8, f"{method} with {width:,} particles",
                 "use fewer particles, or raise the budget with ppl.set_limits(max_memory=...), PPL_MAX_MEMORY "
                 "or --limit max_memory=...")


class out_of_memory_as_error:
    """An allocation that fails during a run (``MemoryError``, torch's "can't allocate",
    CUDA out of memory) becomes a ``PPLError`` naming the memory budget (a context
    manager; a class rather than a generator: it wraps every run)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is None:
            return False
        from .semantics.limits import MEMORY_HINT
        if issubclass(kind, MemoryError):
            raise PPLError("out of memory", hint=MEMORY_HINT) from None
        if issubclass(kind, RuntimeError):
            text = str(error)
            if "allocate" in text or "out of memory" in text.lower():
                raise PPLError(f"out of memory: {text.splitlines()[0]}", hint=MEMORY_HINT) from None
        return False


def seeded(seed: int | None, device: str = "cpu"):
    """Run the block as one run with generators of its own (``ppl.stdlib.rng``): one
    ``torch.Generator`` per device, seeded with ``seed``, from which every draw ppl makes
    in this thread comes. Thread-safe: concurrent runs do not share generators, and torch's
    global generator is neither read nor changed by a seeded run. ``seed`` None: inside
    another run, that run's generators; else generators seeded from torch's global
    generator (so ``torch.manual_seed`` still makes the run repeatable). ``device`` is
    kept for callers; each device's generator is made when first used. (A context
    manager: ``rng.run``'s.)"""
    return rng.run(seed)


def _check_method(method: str) -> None:
    """An unknown method name is an error with a "did you mean"."""
    if method not in METHODS:
        raise PPLError(f"unknown inference method '{method}'",
                       hint=did_you_mean(method, METHODS) or f"available: {', '.join(sorted(METHODS))}")


def _arities() -> dict:
    from .stdlib.prelude import arities
    return arities()


def _prepare(v: Any, device, name: str) -> Any:
    """One datum as a runtime value (see ``Model.prepare_data``)."""
    if isinstance(v, np.ndarray) and v.dtype.kind not in "biuf":
        if v.dtype.kind == "c":
            raise PPLError(f"data '{name}' is an array of complex numbers", hint="pass real numbers")
        v = v.tolist()  # an object/string array: its elements, as a (nested) list
    if device is None:  # exact semantics: plain Python; numeric data a Vector where sampling has a tensor
        if isinstance(v, (torch.Tensor, np.ndarray)):
            return to_vector(v.tolist())
        if _data_tensor(v, "cpu", name) is not None:
            return to_vector([_prepare(x, None, name) for x in v])
        if isinstance(v, (list, tuple)):
            return type(v)(_prepare(x, None, name) for x in v)
        return _check_datum(v, name)
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(v)
        if v.is_floating_point():
            v = v.to(torch.get_default_dtype())
    if isinstance(v, torch.Tensor):
        return v.to(device)
    t = _data_tensor(v, device, name)
    if t is not None:
        return t
    if isinstance(v, (list, tuple)):
        return type(v)(_prepare(x, device, name) for x in v)
    return _check_datum(v, name)


def _data_tensor(v: Any, device, name: str = "") -> torch.Tensor | None:
    """A non-empty rectangular (nested) list of numbers as the tensor it is under sampling;
    None for anything else (ragged, strings, empty: those stay lists). The exact semantics
    makes a Vector of exactly these (numeric data is a vector in every semantics). Other
    numbers (Fractions) are floats in the tensor; an integer beyond 64 bits is an error
    (the list would otherwise silently stay a list, with list arithmetic)."""
    if isinstance(v, (list, tuple)) and v and _numeric_nested(v):
        try:
            t = torch.tensor(_plain_numbers(v), device=device)
        except (ValueError, TypeError, RuntimeError, OverflowError):
            if _has_huge_int(v):
                raise PPLError(f"data '{name}' holds an integer that does not fit in 64 bits, so it cannot be a "
                               "vector", hint="pass such numbers as floats") from None
            return None
        return t.to(torch.get_default_dtype()) if t.is_floating_point() else t
    return None


def _plain_numbers(v: Any) -> Any:
    """Numbers torch reads: a Fraction (or another Number) as its float."""
    if isinstance(v, (list, tuple)):
        return [_plain_numbers(x) for x in v]
    return v if isinstance(v, (bool, int, float, np.generic)) else float(v)


def _has_huge_int(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return any(_has_huge_int(x) for x in v)
    return type(v) is int and not -2 ** 63 <= v < 2 ** 63


def _numeric_nested(v) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_numeric_nested(x) for x in v)
    return isinstance(v, Number) and not isinstance(v, complex)


def _check_datum(v: Any, name: str) -> Any:
    if type(v) is int:
        from .semantics.limits import check_int
        return check_int(v, f"the integer in data '{name}'")
    if isinstance(v, np.generic) and not isinstance(v, (np.complexfloating, np.object_)):
        return v.item()
    if isinstance(v, complex) or isinstance(v, np.complexfloating):
        raise PPLError(f"data '{name}' is a complex number", hint="pass real numbers")
    if v is None or isinstance(v, (bool, int, float, str)) or isinstance(v, Number):
        return v
    if isinstance(v, (Builtin,)) or hasattr(v, "ppl_attribute"):
        return v
    from .stdlib.lm.dsl import wrap  # language and reward models (stdlib.lm.base)
    lm = wrap(v, name)
    if lm is not None:
        return lm
    if callable(v) and (inspect.isfunction(v) or inspect.isbuiltin(v) or isinstance(v, functools.partial)):
        return python_function(v, name)
    raise PPLError(f"data '{name}' has a type a model cannot use: {type(v).__name__}",
                   hint="pass numbers, strings, lists, tensors/arrays, functions, or language/reward models")


def python_function(fn: Callable, name: str = "") -> Builtin:
    """A Python function usable from a model. Batched arguments arrive as tensors with
    one row per particle, and a tensor result with that many rows is per-particle."""
    def call(ctx, *args, **kwargs):
        batched = any(is_batched(a) for a in args)
        raw = [rows(a, ctx) if isinstance(a, Batched) else _vectors_as_tensors(a, ctx) for a in args]
        try:
            out = fn(*raw, **kwargs)
        except PPLError:
            raise
        except Exception as e:  # the user's own Python code failed
            raise PPLRuntimeError(f"the Python function '{name or fn.__name__}' raised "
                                  f"{type(e).__name__}: {e}") from e
        out = _function_result(out, name or getattr(fn, "__name__", "function"))
        if batched and isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == ctx.M:
            return Batched(out, ctx.idx)
        return out
    return Builtin(name or getattr(fn, "__name__", "function"), call, (0, None), pure=False)


def _vectors_as_tensors(v: Any, ctx) -> Any:
    """An exact ``Vector`` (numeric data under enumeration) reaches Python code as the
    tensor it is under sampling, so the function computes the same thing."""
    if isinstance(v, Vector):
        return as_tensor(v, ctx.device)
    if isinstance(v, (list, tuple)):
        return type(v)(_vectors_as_tensors(x, ctx) for x in v)
    return v


def _function_result(out: Any, name: str) -> Any:
    """What a Python function passed as data may hand back to a model: numbers, bools,
    strings, None, numeric tensors and arrays (an array becomes a tensor), and lists and
    tuples of those. Anything else (a module, a class, a function, an arbitrary object)
    would give the model a way into Python: a ``PPLRuntimeError``, located at the call."""
    if out is None or isinstance(out, (bool, int, float, str)):
        return out
    if isinstance(out, np.generic) and isinstance(out.item(), (bool, int, float)):
        return out.item()
    if isinstance(out, np.ndarray) and out.dtype.kind in "biuf":
        t = torch.from_numpy(np.ascontiguousarray(out))
        return t.to(torch.get_default_dtype()) if t.is_floating_point() else t
    if isinstance(out, torch.Tensor) and not out.is_complex():
        return out
    if isinstance(out, (list, tuple)):
        return type(out)(_function_result(x, name) for x in out)
    kind = ("a module" if inspect.ismodule(out) else "a class" if inspect.isclass(out) else
            "a function" if callable(out) else "an array of Python objects" if isinstance(out, np.ndarray) else
            f"an object of type '{type(out).__name__}'")
    raise PPLRuntimeError(f"the Python function '{name}' returned {kind}, which a model cannot use as a value",
                          hint="return numbers, booleans, strings, None, tensors/arrays, or lists/tuples of those")
