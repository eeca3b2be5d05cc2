"""Inference methods as the Python face runs them: by name, wrapped into result objects.

``inference.METHODS`` maps each ``method=`` name to an algorithm returning the inference
layer's own types (``Population``, ``Chains``, ``Optimum``, exact paths). ``run_method`` is
the one place they become what people read: ``ppl.result.as_result`` wraps the raw value,
the population diagnostics are computed, and the result's warnings are emitted as
``PPLDiagnosticWarning``s. ``Model.run`` (so ``@ppl.infer``, the CLI and SBC) runs every
method through it.

``register_method(name, fn, options=...)`` adds a user's algorithm to the registry: it
then runs through ``Model.run``, ``@ppl.infer`` and the CLI (``ppl run --plugin MODULE
--method NAME``), like a built-in method.
"""
from __future__ import annotations

import contextlib
import inspect
import re
import weakref
from typing import Any, Callable, Mapping

from .guide import load_proposal
from .results.diagnostics import count_distinct, emit, ess_before_last_resampling
from .inference.methods import METHODS, check_options
from .inference.population import Chains, Optimum, Population
from .result import ExactResult, WeightedResult, as_result
from .semantics import invalid_parameters
from .semantics.errors import PPLError, did_you_mean
from .semantics.exact_elimination import EliminationResult
from .semantics.options import OptionSpec
from .stdlib import printing

__all__ = ["register_method", "run_method", "method_options", "check_method_options", "OptionSpec"]

#: the built-in method names (never replaced by ``register_method``)
BUILTIN_METHODS = frozenset(METHODS)

#: method name -> option name -> ``OptionSpec`` (or None: any value), from ``register_method``
_REGISTERED_OPTIONS: dict[str, dict[str, OptionSpec | None]] = {}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def register_method(name: str, fn: Callable, *, options: Mapping[str, OptionSpec | None] | None = None,
                    replace: bool = False) -> Callable:
    """Register ``fn`` as the inference method ``name``; returns ``fn``.

    ``fn(model, data, *, particles, device, **its_options)`` runs on a compiled model (the
    ``semantics.model.ModelLike`` protocol: ``model.interpreter()``, ``model.entry``,
    ``model.prepare_data(data, device)``...) with the entry's arguments ``data``, and
    returns a ``Population`` or ``Chains`` (``ppl.inference``), exact paths, or a result
    object; ``Model.run`` wraps it like any built-in method. The run is seeded by
    ``Model.run`` (draw through ``ppl.stdlib.rng``), on the device it resolved.

    ``options``: option name -> ``OptionSpec`` (type and range, checked before the run:
    ``OptionSpec("int", low=1)``, ``OptionSpec("number", low=0, low_open=True)``,
    ``OptionSpec("choice", choices=("a", "b"))``, ``OptionSpec("flag")``) or None (any
    value). ``fn``'s own keyword parameters are options too (unchecked unless named
    here). ``replace=True`` replaces an earlier registration of ``name`` (never a
    built-in method)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise PPLError(f"a method name must be a word of letters, digits, '_' or '-' (got {name!r})",
                       hint="e.g. register_method('my_is', fn)")
    if name in BUILTIN_METHODS:
        raise PPLError(f"'{name}' is a built-in inference method and cannot be replaced",
                       hint="register your algorithm under a name of its own")
    if name in METHODS and not replace:
        raise PPLError(f"an inference method '{name}' is already registered",
                       hint="pass replace=True to replace it, or choose another name")
    if not callable(fn):
        raise PPLError(f"register_method('{name}', fn): fn must be callable (got {type(fn).__name__})")
    params = _parameters(fn)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    for needed in ("particles", "device"):
        if needed not in params and not takes_any:
            raise PPLError(f"register_method('{name}', fn): fn must take the keyword argument '{needed}'",
                           hint="write fn(model, data, *, particles, device, **options)")
    specs = dict(options or {})
    for key, spec in specs.items():
        if key not in params and not takes_any:
            raise PPLError(f"register_method('{name}', fn): option '{key}' is not a parameter of fn",
                           hint="add it as a keyword parameter, or take **options")
        if spec is not None and not isinstance(spec, OptionSpec):
            raise PPLError(f"register_method('{name}', fn): the spec of option '{key}' must be an OptionSpec "
                           f"or None (got {type(spec).__name__})")
    METHODS[name] = fn
    _REGISTERED_OPTIONS[name] = specs
    return fn


def _parameters(fn: Callable) -> dict[str, inspect.Parameter]:
    """``fn``'s parameters by name (its signature, read once per function object)."""
    try:
        hit = _SIGNATURES.get(fn)
    except TypeError:  # (not hashable or not weakly referable)
        hit = None
    if hit is None:
        try:
            hit = dict(inspect.signature(fn).parameters)
        except (TypeError, ValueError):  # a builtin without a signature: assume it takes anything
            hit = {"options": inspect.Parameter("options", inspect.Parameter.VAR_KEYWORD)}
        try:
            _SIGNATURES[fn] = hit
        except TypeError:  # (not weakly referable: read every time)
            pass
    return dict(hit)


#: method function -> its parameters (``_parameters``)
_SIGNATURES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def method_options(method: str) -> list[str]:
    """The option names ``method`` takes: its keyword parameters after (model, data), other
    than ``particles`` and ``device``, and those registered with it."""
    params = list(_parameters(METHODS[method]).values())[2:]
    named = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
             and p.name not in ("particles", "device")]
    return named + [k for k in _REGISTERED_OPTIONS.get(method, {}) if k not in named]


def check_method_options(method: str, options: dict) -> dict:
    """``options`` checked for ``method``: an unknown option is an error, and each value is
    checked against the method's registered spec, else ``OPTION_SPECS``."""
    known = method_options(method) if options else ()  # (no options: nothing to look up)
    for key in options:
        if key not in known:
            raise PPLError(f"method '{method}' has no option '{key}'",
                           hint=did_you_mean(key, known) or
                           (f"its options are: {', '.join(known)}" if known else "it takes no options"))
    own = _REGISTERED_OPTIONS.get(method, {})
    checked = check_options({k: v for k, v in options.items() if own.get(k) is None})
    checked.update({k: own[k].check(k, v) for k, v in options.items() if own.get(k) is not None})
    return checked


def run_method(method: str, model, data: dict, **options) -> Any:
    """``METHODS[method](model, data, **options)`` as a result object: wrapped by
    ``as_result``, with its population diagnostics, and its warnings emitted (at the
    caller of ``Model.run``). ``options`` are already checked."""
    if options.get("proposal") is not None:  # the path of a saved guide: loaded here, in the face
        options["proposal"] = load_proposal(options["proposal"], model, data)
    output = printing.run_output(unit="chain" if method in _CHAIN_METHODS else "particle") if _prints(model) \
        else contextlib.nullcontext()  # (= run_output(False): a model that never prints opens no log)
    with output, invalid_parameters.recording() as notes:  # (print(...) in the model: stdlib.printing)
        raw = METHODS[method](model, data, **options)
    if not isinstance(raw, (Population, Chains, Optimum, list, tuple, WeightedResult, ExactResult,
                            EliminationResult)):
        raise PPLError(f"the inference method '{method}' returned a {type(raw).__name__}",
                       hint="a method returns a ppl.inference Population or Chains, exact paths, or a result")
    res = as_result(raw)
    if isinstance(res, (WeightedResult, ExactResult)) and getattr(res, "model", None) is None:
        res.model, res.data = model, dict(data)  # (to_arviz and Model.predictive re-run the model on its draws)
    if notes and hasattr(res, "warnings"):  # a parameter invalid at some particles (weight zero there)
        res.run_warnings = invalid_parameters.warnings(notes)
    population_diagnostics(res)
    emit(getattr(res, "warnings", []), stacklevel=3)
    return res


#: methods whose batch rows are Markov chains (print(...) labels them "chain")
_CHAIN_METHODS = frozenset({"mh", "nuts", "hmc"})


def _prints(model) -> bool:
    """Whether the model's source may call ``print`` (a cheap test on the text: a run of
    a model that never prints opens no output log)."""
    source = getattr(model, "source", None)
    if not source:
        program = getattr(model, "program", None)
        return program is None or "print" in repr(program)
    return "print" in source


def population_diagnostics(res) -> None:
    """For a result whose population was resampled (``extra["history"]`` of SMC
    checkpoints, or tempering's ``extra["ess_history"]``): set ``resampled``,
    ``ess_before_resampling`` (the ESS before the last resampling) and
    ``unique_fraction`` (distinct particles / N, when a choice is continuous)."""
    if not isinstance(res, WeightedResult) or getattr(res, "r_hat", None) is not None:
        return
    history = res.extra.get("history")
    if history is not None and any(getattr(r, "resampled", False) for r in history):
        res.ess_before_resampling = ess_before_last_resampling(history, res.ess)
    elif res.extra.get("ess_history"):  # tempering: resampled at every step
        res.ess_before_resampling = float(res.extra["ess_history"][-1])
    else:
        return
    res.resampled = True
    distinct = count_distinct({k: s.value for k, s in res.sites.items()},
                              {k: s.present for k, s in res.sites.items()})
    res.unique_fraction = None if distinct is None else distinct / res.n
