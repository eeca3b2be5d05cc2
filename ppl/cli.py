"""The command line: ``python -m ppl`` (or the ``ppl`` script).

    ppl run MODEL.ppl [--data DATA.json] [--entry NAME] [--method METHOD]
                      [-n N] [--seed S] [--device cpu|cuda|auto] [--json] [--plot OUT.png]
                      [--samples S] [--burn-in B] [--thin T] [--kernel prior|rw|NAME] [--scale X]
                      [-o KEY=VALUE ...] [--limit KEY=VALUE ...] [--progress] [--plugin MODULE ...]
    ppl check MODEL.ppl [--entry NAME]
    ppl playground [--port P] [--host 127.0.0.1] [--no-browser] [--time-limit S]
                   [--max-particles N] [--max-samples N] [--workers N]

``--limit`` changes a bound of ``ppl.semantics.limits`` (max_memory, max_int_bits,
regex_timeout, max_iterations, max_depth); ``--progress`` shows the method's progress bar
on stderr at once (without it, a bar appears on a terminal once a run has taken 2 s).
Ctrl-C prints ``interrupted (Ctrl-C)`` and exits with 130; a closed
stdout (``--json | head``) ends quietly with 141.

``run`` compiles the model, binds the entry function's parameters from the data file
(a JSON object: parameter name -> value; parameters it leaves out take their
defaults), runs inference and prints ``result.summary()``, or with ``--json`` exactly
one JSON object on stdout: ``result.to_json()`` plus ``model``, ``entry``,
``particles`` (null for exact methods) and ``seed``; its ``warnings`` list holds the
result's diagnostic warnings (high R-hat, Pareto k, low ESS, a collapsed population),
which are also printed to stderr as ``warning: ...`` lines (in both modes). The default is importance sampling
with 1000 particles and seed 0, so a run is reproducible unless asked otherwise.
``--method`` accepts every name in ``ppl.inference.METHODS``. For ``--method mh``,
``-n`` is the number of chains, and ``--samples``, ``--burn-in``, ``--thin``,
``--kernel`` and ``--scale`` set the MH options (``Model.run``'s keywords of the same
names; omitted ones keep the method's defaults). For ``--method nuts``/``hmc``, ``-n``
is the number of chains (one batch) and ``--burn-in`` the warm-up (Stan's windowed
adaptation); ``-o target_accept=0.95``, ``-o max_tree_depth=12``, ``-o dense_mass=true``,
``-o compile=true`` set the sampler. ``--kernel NAME`` runs MH with the
proposal function NAME of the model (``ppl.inference.mh_proposals``).

``--plugin MODULE`` (repeatable; also the environment variable ``PPL_PLUGINS=mod1,mod2``)
imports the Python module MODULE before anything else, so that the inference methods it
registers with ``ppl.register_method`` can be named with ``--method`` (a model file never
runs Python code: only modules named here are imported). A plugin that cannot be
imported is a user error (exit 1).

``check`` parses and statically checks the model and prints
``ok: MODEL.ppl (functions: a, b; entry: b(x, y=1))``.

``playground`` serves a local page (``ppl.playground``) to edit and run models in a
browser, with the examples gallery; runs are bounded by a time limit and caps.

Exit codes: 0 success; 1 a user error (any ``PPLError``: syntax, check, runtime, zero
evidence, a bad or missing file, an unknown entry or method), printed to stderr as
``file:line:col: kind: message`` with the source line and a hint, never a traceback;
2 a command-line usage error or an internal error (``internal error: ...``; set
``PPL_DEBUG=1`` for the traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import sys
import traceback
import warnings
from typing import Any, Sequence

from .semantics.errors import PPLDiagnosticWarning, PPLError, did_you_mean
from .semantics.source import SourceFile, Span
from .stdlib import printing

DEFAULT_METHOD = "importance"
DEFAULT_PARTICLES = 1000
DEFAULT_SEED = 0
DEVICES = ("cpu", "cuda", "auto")


def _methods() -> dict:
    from .inference import METHODS
    return METHODS


# ------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser (method names are read from the registry at call time)."""
    methods = list(_methods())
    parser = argparse.ArgumentParser(
        prog="ppl", description="Run and check ppl probabilistic programs.",
        epilog="Set PPL_DEBUG=1 to see Python tracebacks of internal errors.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"ppl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="run inference on a model and print the posterior",
                         description="Run inference on a model and print the posterior.")
    run.add_argument("model", metavar="MODEL.ppl", help="the model file")
    run.add_argument("--data", metavar="DATA.json",
                     help="a JSON object binding the entry function's parameters by name")
    run.add_argument("--entry", metavar="NAME", help="the function to run (default: the last def)")
    run.add_argument("--method", default=DEFAULT_METHOD, metavar="{" + ",".join(methods) + "}",
                     help=f"inference method (default: {DEFAULT_METHOD})")
    run.add_argument("-n", "--particles", type=int, default=DEFAULT_PARTICLES, metavar="N",
                     help=f"number of particles for sampling methods (default: {DEFAULT_PARTICLES})")
    run.add_argument("--seed", type=int, default=DEFAULT_SEED, metavar="S",
                     help=f"random seed (default: {DEFAULT_SEED})")
    run.add_argument("--device", choices=DEVICES, default="cpu",
                     help="where particles run (default: cpu; auto picks a GPU when there is one)")
    run.add_argument("--json", action="store_true",
                     help="print one JSON object instead of the summary table")
    run.add_argument("--plot", metavar="OUT.png", help="also save a plot of the posterior")
    mcmc = run.add_argument_group("MCMC options (--method mh, nuts, hmc, pmmh; -n is the number of chains)")
    mcmc.add_argument("--samples", type=int, metavar="S", help="draws kept per chain (default: 1000)")
    mcmc.add_argument("--burn-in", type=int, metavar="B",
                      help="steps discarded first (default: 500; nuts/hmc: the warm-up that adapts the step size and "
                           "mass matrix, default 1000)")
    mcmc.add_argument("--thin", type=int, metavar="T", help="keep every T-th step (default: 1)")
    mcmc.add_argument("--kernel", metavar="{prior,rw,NAME}",
                      help="proposal: prior (default), rw (random walk in unconstrained space), or the name "
                           "of a proposal function defined in the model")
    mcmc.add_argument("--scale", type=float, metavar="X",
                      help="random-walk step size, fixed for every site (default with --kernel rw: tuned per "
                      "site during a burn-in of at least 20 steps, from 0.5; -o adapt=true|false)")
    run.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                     help="any other option of the method, e.g. -o resampling=stratified -o ess_threshold=0.5, "
                          "-o moves=2 (resample_move), -o params=q,r (pmmh), -o target_ess=0.3 (tempering); "
                          "VALUE is read as JSON when it parses, else as a string")
    run.add_argument("--limit", action="append", default=[], metavar="KEY=VALUE",
                     help="change a bound: max_memory (e.g. 8GB), max_int_bits, regex_timeout (seconds), "
                          "max_iterations, max_depth (see README, Limits and errors)")
    run.add_argument("--progress", action="store_true",
                     help="show a progress bar on stderr at once (every method; without it, one appears "
                          "on a terminal after 2 s)")
    run.add_argument("--distributed", action="store_true",
                     help="shard the particles (importance, smc) or the chains (mh, nuts, hmc) over the ranks of a "
                          "torchrun job: "
                          "`torchrun --nproc_per_node=K -m ppl run MODEL.ppl --distributed ...`; rank 0 prints "
                          "the result, the other ranks nothing (README, Running on several processes)")
    run.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                     help="import the Python module MODULE first (repeatable; also PPL_PLUGINS=mod1,mod2): the "
                          "inference methods it registers with ppl.register_method can be named with --method")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="parse and statically check a model",
                           description="Parse and statically check a model.")
    check.add_argument("model", metavar="MODEL.ppl", help="the model file")
    check.add_argument("--entry", metavar="NAME", help="the entry function (default: the last def)")
    check.set_defaults(func=cmd_check)

    play = sub.add_parser("playground", help="serve a local page to write and run models in a browser",
                          description="Serve the playground: an editor, a data box, a method picker and the "
                                      "examples gallery, on a local page (nothing from the internet).")
    play.add_argument("--port", type=int, default=8765, help="the port (default: 8765; 0 picks a free one)")
    play.add_argument("--host", default="127.0.0.1",
                      help="the address to listen on (default: 127.0.0.1, this machine only)")
    play.add_argument("--no-browser", action="store_true", help="do not open a browser")
    play.add_argument("--time-limit", type=float, default=60.0, metavar="SECONDS",
                      help="the longest a run may take before it is stopped (default: 60)")
    play.add_argument("--max-particles", type=int, default=100_000, metavar="N",
                      help="the most particles (or chains) a run may ask for (default: 100000)")
    play.add_argument("--max-samples", type=int, default=10_000, metavar="N",
                      help="the most MCMC samples or burn-in steps per chain (default: 10000)")
    play.add_argument("--workers", type=int, default=1, metavar="N",
                      help="runs at the same time (default: 1; one run per model in any case)")
    play.set_defaults(func=cmd_playground)
    return parser


# ------------------------------------------------------------------------------ loading
def load_model(path: str, entry: str | None = None):
    """Read and compile a model file; every failure is a ``PPLError``."""
    from .api import compile_source, read_text_file
    return compile_source(read_text_file(path, "model file"), path, entry=entry)


def load_data(path: str | None) -> dict:
    """The data file as a dict (empty without a file); bad files raise ``PPLError``
    pointing at the offending line and column."""
    if path is None:
        return {}
    from .api import read_text_file
    return parse_data(read_text_file(path, "data file"), path)


def parse_data(text: str, path: str) -> dict:
    """Data as JSON text (a data file's, named ``path`` in errors; the playground's data
    box) -> a dict; every failure is a ``PPLError`` located in the text."""
    _check_json_numbers(text, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        span = Span(e.lineno, e.colno, e.lineno, e.colno, SourceFile(path, text))
        raise PPLError(f"invalid JSON in data file: {e.msg} (line {e.lineno}, column {e.colno})", span,
                       "the data file must be one JSON object, e.g. {\"flips\": [1, 0, 1]}") from None
    except RecursionError:
        raise PPLError(f"invalid JSON in data file '{path}': nested too deeply") from None
    if not isinstance(data, dict):
        raise PPLError(f"data file '{path}' must contain a JSON object, not a JSON {_json_type(data)}",
                       hint="bind parameters by name, e.g. {\"flips\": [1, 0, 1]}")
    return data


def _check_json_numbers(text: str, path: str) -> None:
    """An integer in the data with more digits than the integer limit allows is an error
    at its place in the file (Python itself refuses more than 4300 digits)."""
    from .semantics.limits import current
    digits = min(4300, int(current().max_int_bits * 0.30103) + 1)  # log10(2) digits per bit
    m = re.search(r"(?<![\w.])-?\d{%d,}" % (digits + 1), text)
    if m is not None:
        raise PPLError(f"a number in the data file has {len(m.group().lstrip('-')):,} digits, more than the "
                       f"integer limit allows ({digits:,} digits)",
                       _text_span(text, path, m.start(), m.start()),
                       "write it as a float (1e5000 is inf), or raise --limit max_int_bits=...")


def _key_span(path: str | None, key: str) -> Span | None:
    """The place of ``"key":`` in the data file (its first occurrence), or None."""
    if path is None:
        return None
    from .api import read_text_file
    try:
        text = read_text_file(path, "data file")
    except PPLError:
        return None
    m = re.search(re.escape(json.dumps(key)) + r"\s*:", text)
    if m is None:
        return None
    return _text_span(text, path, m.start(), m.start() + len(json.dumps(key)) - 1)


def _text_span(text: str, path: str, first: int, last: int) -> Span:
    """The span of characters ``first``..``last`` (offsets in ``text``, on one line)."""
    line = text.count("\n", 0, first) + 1
    col = first - (text.rfind("\n", 0, first) + 1) + 1
    return Span(line, col, line, col + last - first, SourceFile(path, text))


def _in_data_file(err: PPLError, data: dict, path: str | None) -> PPLError:
    """A location-less error about a datum (``data 'key' ...``) that came from the data
    file, located at the key in that file."""
    m = re.match(r"data '([^']*)'", err.message)
    if err.span is None and m is not None and m.group(1) in data:
        err.span = _key_span(path, m.group(1))
    return err


def _json_type(v: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def signature(model) -> str:
    """``name(a, b=1)`` for the model's entry function."""
    from .semantics.pretty import pretty
    f = model.program.function(model.entry)
    return f"{f.name}({', '.join(pretty(p) for p in f.params)})"


def _check_data(model, data: dict, data_path: str | None) -> None:
    """Unknown names and missing required parameters, phrased for the command line."""
    f = model.program.function(model.entry)
    params = [p.name for p in f.params]
    for k in data:
        if k not in params:
            raise PPLError(
                f"the data binds '{k}', but {signature(model)} has no such parameter", _key_span(data_path, k),
                hint=did_you_mean(k, params) or
                (f"its parameters are: {', '.join(params)}" if params else f"{model.entry}() takes no parameters"))
    missing = [p.name for p in f.params if p.default is None and p.name not in data]
    if missing:
        names = ", ".join(f"'{m}'" for m in missing)
        where = f"add it to {data_path}" if data_path else "pass a data file with --data DATA.json"
        first = next(p for p in f.params if p.name == missing[0])
        span = first.span if first.span.line > 0 and first.span.source is not None else f.span
        raise PPLError(f"no data for the required parameter{'s' if len(missing) > 1 else ''} {names} "
                       f"of {signature(model)}", span,
                       f"{where}, e.g. {{{', '.join(f'{json.dumps(m)}: ...' for m in missing)}}}")


# ----------------------------------------------------------------------------- commands
def cmd_check(args) -> int:
    model = load_model(args.model, args.entry)
    names = ", ".join(f.name for f in model.program.functions)
    print(f"ok: {args.model} (functions: {names}; entry: {signature(model)})")
    return 0


def cmd_run(args) -> int:
    methods = _methods()
    if args.method not in methods:
        raise PPLError(f"unknown inference method '{args.method}'",
                       hint=did_you_mean(args.method, methods) or f"available: {', '.join(methods)}")
    if args.particles < 1:
        raise PPLError(f"--particles must be at least 1 (got {args.particles})")
    _apply_limits(args.limit)
    options = _method_options(args)
    model = load_model(args.model, args.entry)
    data = load_data(args.data)
    _check_data(model, data, args.data)
    with warnings.catch_warnings():  # shown once, below, as "warning: ..." lines on stderr
        warnings.simplefilter("ignore", PPLDiagnosticWarning)
        try:
            # --json: stdout holds the one JSON object, so print(...) in the model writes to stderr
            with printing.redirected(sys.stderr) if args.json else contextlib.nullcontext():
                if getattr(args, "distributed", False):
                    options["distributed"] = True
                result = model.run(args.method, data, particles=args.particles, seed=args.seed,
                                   device=args.device, **options)
        except PPLError as err:
            raise _in_data_file(err, data, args.data) from None
    if result is None:  # --distributed: a rank other than 0 prints nothing
        return 0
    for message in result.warnings:
        print(f"warning: {message}", file=sys.stderr)

    from .result import WeightedResult
    if args.plot:
        save_plot(result, args.plot)
    if args.json:
        out = result.to_json()
        out["model"] = args.model
        out["entry"] = model.entry
        out["particles"] = result.n if isinstance(result, WeightedResult) else None
        out["seed"] = args.seed
        print(json.dumps(out, allow_nan=False))
    else:
        print(result.summary(show_warnings=False))
    return 0


def cmd_playground(args) -> int:
    from .playground import Limits, main as serve_playground
    for flag, v in (("--time-limit", args.time_limit), ("--max-particles", args.max_particles),
                    ("--max-samples", args.max_samples), ("--workers", args.workers)):
        if not v > 0 or v == float("inf"):
            raise PPLError(f"{flag} must be a positive number (got {v})")
    limits = Limits(time_limit=args.time_limit, max_particles=args.max_particles, max_samples=args.max_samples,
                    workers=args.workers)
    return serve_playground(args.host, args.port, open_browser=not args.no_browser, limits=limits)


#: Model.run's own arguments, which have flags of their own
_RUN_ARGUMENTS = {"particles": "-n / --particles", "seed": "--seed", "device": "--device"}


def _apply_limits(items: Sequence[str]) -> None:
    """``--limit KEY=VALUE``: set process-wide limits (``ppl.semantics.limits``)."""
    from .semantics.limits import set_limits
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise PPLError(f"--limit expects KEY=VALUE (got {item!r})", hint="e.g. --limit max_memory=8GB")
        set_limits(**{key.strip().replace("-", "_"): raw.strip()})


def _method_options(args) -> dict:
    """The method options given on the command line (only those given), checked."""
    options = {}
    for item in args.option:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise PPLError(f"--option expects KEY=VALUE (got {item!r})", hint="e.g. -o resampling=stratified")
        if key in _RUN_ARGUMENTS:
            raise PPLError(f"{key} is not a method option: use {_RUN_ARGUMENTS[key]}",
                           hint=f"e.g. `ppl run model.ppl {_RUN_ARGUMENTS[key].split(' / ')[0]} ...`")
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    if args.progress or args.json:  # --json: no bar unless --progress asks for one
        from inspect import signature
        if "progress" in signature(_methods()[args.method]).parameters:
            options.setdefault("progress", bool(args.progress))
    for flag, name, least in (("--samples", "samples", 1), ("--burn-in", "burn_in", 0), ("--thin", "thin", 1)):
        v = getattr(args, name)
        if v is not None:
            if v < least:
                raise PPLError(f"{flag} must be at least {least} (got {v})")
            options[name] = v
    if args.kernel is not None:
        options["kernel"] = args.kernel
    if args.scale is not None:
        if not args.scale > 0 or args.scale == float("inf"):
            raise PPLError(f"--scale must be a positive number (got {args.scale})")
        options["scale"] = args.scale
    return options


def save_plot(result, path: str) -> None:
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")  # a file is written; never open a window
    fig = result.plot()
    try:
        fig.savefig(path)
    except (OSError, ValueError) as e:
        raise PPLError(f"cannot write the plot to '{path}': {getattr(e, 'strerror', None) or e}",
                       hint="give a writable path ending in .png, .pdf or .svg") from None
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


# --------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 user error, 2 usage or
    internal error)."""
    try:
        load_plugins(sys.argv[1:] if argv is None else list(argv))
    except PPLError as err:
        print(str(err), file=sys.stderr)
        return 1
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return args.func(args)
    except PPLError as err:
        print(str(err), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`ppl run ... --json | head`): stop quietly
        _silence_stdout()
        return 141
    except Exception as e:  # a bug in ppl, not in the model
        print(f"internal error: {type(e).__name__}: {e}", file=sys.stderr)
        if os.environ.get("PPL_DEBUG") == "1":
            traceback.print_exc(file=sys.stderr)
        else:
            print("(this is a bug in ppl; set PPL_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2


def load_plugins(argv: Sequence[str]) -> list[str]:
    """Import the modules named by ``PPL_PLUGINS`` (comma-separated) and by every
    ``--plugin MODULE`` in ``argv`` (before the parser is built, so that the methods they
    register are known to it); returns their names. Failures are ``PPLError``s."""
    names = [n.strip() for n in os.environ.get("PPL_PLUGINS", "").split(",") if n.strip()]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugin", action="append", default=[])
    names += pre.parse_known_args(argv)[0].plugin
    for name in names:
        _import_plugin(name)
    return names


def _import_plugin(name: str) -> None:
    hint = "a plugin is a Python module on sys.path (e.g. via PYTHONPATH) that calls ppl.register_method"
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):  # the plugin is missing
            raise PPLError(f"cannot import the plugin '{name}': no module named '{e.name}'", hint=hint) from None
        raise PPLError(f"the plugin '{name}' failed to import: {e}", hint=hint) from None
    except PPLError:
        raise
    except Exception as e:  # the plugin's own code failed: the user's error, not ppl's
        raise PPLError(f"the plugin '{name}' failed to import: {type(e).__name__}: {e}", hint=hint) from None


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
