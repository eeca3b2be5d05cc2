"""A seeded mutation fuzzer for ppl's front end and runtime.

Every example model (``examples/*.ppl``, with its ``.json`` data) is mutated at random —
tokens and lines deleted, duplicated, swapped; random tokens inserted (keywords,
operators, brackets, prelude names, huge numbers, strings); numbers replaced by edge
values; expressions nested thousands of levels deep — and each mutant goes through the
public API: ``ppl.model`` (parse, lower, check), then a small bounded run of
``importance`` (8 particles) and of ``enumerate`` (few paths, a time cap), with small
loop, recursion, memory and regex bounds.

A case passes when every step succeeds or raises a ``ppl.PPLError`` that points into the
model (``file:line:col``): any other exception is a failure, reported with the program
that raised it, and so is a ``PPLError`` without a source location (the arguments are
valid and the data is the example's, so the error comes from the model's text; only
run-budget errors such as max_paths legitimately have none). Location-less errors are
counted by message either way (``--allow-unlocated``: counted, not failed). ``--cli``
runs each mutant through the command line instead (``ppl run FILE --data FILE.json``,
cycling through the methods in ``CLI_METHODS``) and reads the first error line printed.
Python warnings are ignored (they are not failures).

    python -m ppl.testing.fuzz --cases 10000 [--seed 0] [--show 5] [--cli] [--allow-unlocated]

prints the counts (by outcome and error class, and location-less errors by message) and
every failure, and exits 1 if there was any. ``fuzz(cases, seed)`` returns a ``FuzzReport`` (``tests/test_fuzz.py`` runs a
seeded version).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import ppl
from ppl.semantics import limits as _limits

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

#: bounds on every run (small, so a case takes milliseconds, and never hangs)
RUN_OPTIONS = {"max_iterations": 500, "max_depth": 60}
LIMITS = {"max_memory": "256MB", "regex_timeout": 0.2}
PARTICLES = 8
ENUMERATE = {"max_paths": 30, "max_seconds": 0.3}
CASE_SECONDS = 30  # a case using more CPU time than this is a failure (a hang)
#: wall-clock backstop for a case in this process (CPU time is what counts: on a loaded
#: machine a case can wait for a core much longer than it runs)
CASE_WALL_SECONDS = 4 * CASE_SECONDS

_TOKEN = re.compile(r"""\d+\.\d*(?:[eE][-+]?\d+)?|\d+(?:[eE][-+]?\d+)?|[A-Za-z_]\w*|'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"|\*\*|//|==|!=|<=|>=|[-+*/%<>=~()\[\],:.]""")

INSERTS = (
    "def", "return", "if", "else", "elif", "for", "in", "while", "lambda", "and", "or", "not", "observe",
    "factor", "condition", "pass", "True", "False", "None", "~", "=", "==", "(", ")", "[", "]", ",", ":", ".",
    "+", "-", "*", "/", "//", "%", "**", "<", ">", "x", "y", "z", "i", "flip", "normal", "map", "fold", "filter",
    "range", "len", "sum", "mem", "sample", "twist", "regex_match", "list", "zeros", "exp", "log",
    "0", "1", "-1", "0.5", "1e308", "1e-320", "10 ** 100", "2 ** 64", "9" * 5000, "10 ** 10 ** 8",
    "'a' * 10 ** 10", "[0] * 10 ** 9", "range(10 ** 12)", "'(a|aa)+$'", "'\\xff'", "''", "'abc'", "inf", "nan",
    "\t", "import", "class", "yield", "@", ";", "{", "}",
)
#: expressions that replace a number or a name (mostly keeping the program parseable, so
#: the runtime sees values of every kind where it expected one)
VALUES = ("None", "True", "''", "'s'", "[]", "[1, 2]", "[[1], [0, 1]]", "()", "(1, 2)", "range(3)", "range(-2)",
          "flip(0.5)", "normal(0, 1)", "sample(flip(0.5))", "lambda a: a", "-1", "0", "0.0", "1e308", "-1e308",
          "10 ** 100", "2 ** 64", "inf", "-inf", "inf - inf", "1 / 0", "x", "len", "mem(lambda a: a)", "[None]",
          "zeros(3)", "ones(0)", "'(a|aa)+$'", "[flip(0.5)]", "map(lambda a: a, [1, 2])", "uniform_draw([])",
          "categorical([])", "poisson(-1)", "beta(0, 0)", "normal(0, [])", "dirichlet([1, 1])")
NUMBERS = ("0", "-1", "1e308", "1e-320", "10 ** 100", "2 ** 64", "2 ** 63", "9" * 5000, "10 ** 10 ** 8",
           "0.0", "-0.0", "1e400", "100000000", "3")


@dataclass
class Case:
    index: int
    source: str
    mutations: list
    name: str


@dataclass
class Failure:
    case: Case
    stage: str
    error: str
    traceback: str


@dataclass
class FuzzReport:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)   # "ok" / "PPLSyntaxError" / ... / "failure"
    failures: list = field(default_factory=list)
    seconds: float = 0.0
    unlocated: Counter = field(default_factory=Counter)  # message pattern -> count of PPLErrors with no span

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self, show: int | None = None) -> str:
        lines = [f"{self.cases} cases in {self.seconds:.1f} s: {len(self.failures)} failures"]
        lines += [f"  {k}: {v}" for k, v in self.outcomes.most_common()]
        if self.unlocated:
            lines.append(f"{sum(self.unlocated.values())} model errors without a location:")
            lines += [f"  {v:5d}  {k}" for k, v in self.unlocated.most_common()]
        for f in self.failures[:show]:
            lines += [f"--- failure in case {f.case.index} ({f.case.name}; {', '.join(f.case.mutations)}) "
                      f"at {f.stage}: {f.error}", f.case.source.rstrip(), f.traceback.rstrip()]
        return "\n".join(lines)


# ------------------------------------------------------------------------------- corpus
def load_corpus(folder: Path = EXAMPLES) -> list[tuple[str, str, dict]]:
    """(name, source without comment lines, data) for every ``.ppl`` in ``folder``."""
    out = []
    for path in sorted(Path(folder).glob("*.ppl")):
        text = "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")) + "\n"
        data_path = path.with_suffix(".json")
        data = json.loads(data_path.read_text()) if data_path.exists() else {}
        out.append((path.stem, text, data))
    if not out:
        raise FileNotFoundError(f"no .ppl files in {folder}")
    return out


# ----------------------------------------------------------------------------- mutation
def _tokens(line: str) -> list[tuple[int, int]]:
    return [m.span() for m in _TOKEN.finditer(line)]


def _pick_token(rng: random.Random, lines: list[str], operand: bool = False):
    """(line index, start, end) of a random token (``operand``: a number or a name that
    is not a keyword), or None."""
    def ok(line, a, b):
        return not operand or line[a].isdigit() or (line[a].isalpha() or line[a] == "_") and \
            line[a:b] not in _KEYWORDS
    spans = [(i, a, b) for i, l in enumerate(lines) for a, b in _tokens(l) if ok(l, a, b)]
    return rng.choice(spans) if spans else None


_KEYWORDS = frozenset("def return if elif else for in while lambda and or not observe factor condition pass "
                      "True False None".split())


def mutate(rng: random.Random, source: str) -> tuple[str, list[str]]:
    """One to three random mutations of ``source``; returns (text, their names)."""
    lines = source.splitlines()
    names = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        kind = rng.choice(MUTATIONS)
        if _apply(kind, rng, lines):
            names.append(kind)
    return "\n".join(lines) + "\n", names


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _apply(kind: str, rng: random.Random, lines: list[str]) -> bool:
    if not lines:
        return False
    if kind in ("delete line", "duplicate line", "swap lines"):
        i = rng.randrange(len(lines))
        # mostly a line of the same indentation, so the result often still parses
        same = [j for j, l in enumerate(lines) if _indent(l) == _indent(lines[i])]
        j = rng.choice(same) if same and rng.random() < 0.8 else rng.randrange(len(lines))
        if kind == "delete line":
            del lines[i]
        elif kind == "duplicate line":
            lines.insert(i, lines[i])
        else:
            lines[i], lines[j] = lines[j], lines[i]
        return True
    t = _pick_token(rng, lines, operand=kind in ("replace value", "deep nesting"))
    if t is None:
        return False
    i, a, b = t
    line, tok = lines[i], lines[i][a:b]
    if kind == "delete token":
        lines[i] = line[:a] + line[b:]
    elif kind == "duplicate token":
        lines[i] = line[:b] + " " + tok + line[b:]
    elif kind == "swap tokens":
        u = _pick_token(rng, lines)
        if u is None or u[0] == i:
            return False
        j, c, d = u
        other = lines[j][c:d]
        lines[i] = line[:a] + other + line[b:]
        lines[j] = lines[j][:c] + tok + lines[j][d:]
    elif kind == "insert token":
        lines[i] = line[:a] + rng.choice(INSERTS) + " " + line[a:]
    elif kind == "edge number":
        nums = [(c, d) for c, d in _tokens(line) if line[c].isdigit()]
        if not nums:
            return False
        c, d = rng.choice(nums)
        lines[i] = line[:c] + rng.choice(NUMBERS) + line[d:]
    elif kind == "deep nesting":
        n = rng.choice((50, 300, 2000, 10000))
        op = rng.choice((" ** ", " + ", " if True else ", "("))
        deep = "(" * n + tok + ")" * n if op == "(" else op.join([tok] * n)
        lines[i] = line[:a] + deep + line[b:]
    elif kind == "replace value":
        lines[i] = line[:a] + rng.choice(VALUES) + line[b:]
    elif kind == "replace name":
        names = [line[c:d] for c, d in _tokens(line) if line[c].isalpha()] + list(INSERTS[:60])
        lines[i] = line[:a] + rng.choice(names) + line[b:]
    return True


MUTATIONS = ("delete token", "duplicate token", "swap tokens", "insert token", "delete line", "duplicate line",
             "swap lines", "edge number", "deep nesting", "replace name") + ("replace value",) * 6 + \
    ("edge number",) * 2 + ("duplicate line", "swap lines", "replace name")


def cases(n: int, seed: int = 0, corpus=None):
    """``n`` mutated programs (``Case``), deterministic given ``seed``."""
    corpus = corpus or load_corpus()
    rng = random.Random(seed)
    for k in range(n):
        name, text, data = corpus[k % len(corpus)]
        src, names = mutate(rng, text)
        yield Case(k, src, names, name), data


# ------------------------------------------------------------------------------ running
class _Hang(BaseException):  # not an Exception: the CLI must not report it as an internal error
    pass


def _on_alarm(signum, frame):
    raise _Hang()


#: errors about a run's budget (the options max_paths, max_seconds), not about a place in
#: the model: they legitimately have no source location
RUN_BUDGET_ERRORS = ("exact enumeration exceeded", "exact enumeration stopped after")


def is_located(error: ppl.PPLError) -> bool:
    """Whether ``error`` points into the model's text (file:line:col)."""
    span = error.span
    return span is not None and span.line > 0 and span.source is not None


def needs_location(error: ppl.PPLError) -> bool:
    """Whether ``error``, raised by a mutant run with valid arguments and the example's
    own data, must point into the model's text: every error but a run-budget one."""
    return not str(error.message).startswith(RUN_BUDGET_ERRORS)


def message_pattern(error: ppl.PPLError) -> str:
    """``error``'s class and message with numbers and quoted names blanked, so that
    errors of one kind count together."""
    text = str(error.message).splitlines()[0] if str(error.message) else ""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'_'", text)
    text = re.sub(r"-?\d+(\.\d*)?(e[-+]?\d+)?", "N", text)
    return f"{type(error).__name__}: {text[:100]}"


def run_case(case: Case, data: dict, require_location: bool = False) -> tuple[str, Failure | None, str | None]:
    """Compile and run one mutant: (outcome, failure or None, the message pattern of a
    ``PPLError`` that has no source location, or None). Every argument the fuzzer passes
    is valid and the data comes with the example, so any error comes from the model's
    text and must carry a location; with ``require_location`` one without is a failure."""
    stage = "compile"
    try:
        m = ppl.model(case.source, filename=f"{case.name}.ppl", **RUN_OPTIONS)
        given = {k: v for k, v in data.items() if k in m.params}
        stage = "importance"
        m.run("importance", given, particles=PARTICLES, seed=case.index)
        stage = "enumerate"
        m.run("enumerate", given, **ENUMERATE)
        return "ok", None, None
    except ppl.PPLError as e:
        if is_located(e) or not needs_location(e):
            return type(e).__name__, None, None
        pattern = message_pattern(e)
        failure = Failure(case, stage, f"no source location: {type(e).__name__}: {e.message}",
                          traceback.format_exc(limit=-8)) if require_location else None
        return type(e).__name__, failure, pattern
    except _Hang:
        return "failure", Failure(case, stage, f"no answer within {CASE_SECONDS} s of CPU time "
                                               f"(or {CASE_WALL_SECONDS} s of wall clock)", ""), None
    except RecursionError as e:  # (a subclass of RuntimeError: report it as itself)
        return "failure", Failure(case, stage, f"RecursionError: {e}", traceback.format_exc(limit=-8)), None
    except Exception as e:  # noqa: BLE001 - exactly what the fuzzer looks for
        return "failure", Failure(case, stage, f"{type(e).__name__}: {e}", traceback.format_exc(limit=-8)), None


#: the command lines a CLI case runs (cycled through by case index), small and bounded
CLI_METHODS = (
    ["--method", "importance", "-n", str(PARTICLES)],
    ["--method", "smc", "-n", str(PARTICLES)],
    ["--method", "mh", "--samples", "20", "--burn-in", "5", "-o", "chains=2"],
    ["--method", "enumerate"] + [a for k, v in ENUMERATE.items() for a in ("-o", f"{k}={v}")],
    ["--method", "tempering", "-n", str(PARTICLES)],
    ["--method", "resample_move", "-n", str(PARTICLES)],
)
_LOCATION = re.compile(r"^\S+:\d+:\d+: ")


def run_cli_case(case: Case, data: dict, folder: Path, require_location: bool = False):
    """Run one mutant through the command line (``ppl run FILE --data FILE.json ...``,
    the method chosen by the case's index) and read what it prints: (outcome, failure
    or None, the pattern of an error printed without ``file:line:col``, or None). Exit
    status 2 (an internal error) is a failure; so, with ``require_location``, is an
    error line without a location (except a run-budget one)."""
    import contextlib
    import io

    from ppl import cli

    model_path = Path(folder) / f"{case.name}.ppl"
    model_path.write_text(case.source)
    argv = ["run", str(model_path), "--seed", str(case.index), "--limit", "max_iterations=500",
            "--limit", "max_depth=60"] + CLI_METHODS[case.index % len(CLI_METHODS)]
    if data:
        data_path = Path(folder) / f"{case.name}.json"
        data_path.write_text(json.dumps(data))
        argv += ["--data", str(data_path)]
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = cli.main(argv)
    except _Hang:
        return "failure", Failure(case, "cli", f"no answer in {CASE_SECONDS} s", ""), None
    first = next((l for l in err.getvalue().splitlines() if not l.startswith("warning: ")), "")
    if code == 0:
        return "ok", None, None
    if code != 1:
        return "failure", Failure(case, "cli", f"exit status {code}: {first}", err.getvalue()), None
    if _LOCATION.match(first) or first.split("error: ", 1)[-1].startswith(RUN_BUDGET_ERRORS):
        return "located error", None, None
    pattern = "cli: " + re.sub(r"-?\d+(\.\d*)?(e[-+]?\d+)?", "N", re.sub(r"'[^']*'", "'_'", first))[:100]
    failure = Failure(case, "cli", f"no source location: {first}", err.getvalue()) if require_location else None
    return "unlocated error", failure, pattern


def fuzz(n: int, seed: int = 0, corpus=None, progress: bool = False,
         require_location: bool = True, cli: bool = False) -> FuzzReport:
    """Run ``n`` seeded cases; see the module docstring. ``require_location``: a
    ``PPLError`` without a source location is a failure (it is always counted in
    ``FuzzReport.unlocated``). ``cli``: run each case through the command line instead
    (``run_cli_case``)."""
    import tempfile
    report = FuzzReport()
    start = time.monotonic()
    use_alarm = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGALRM, _on_alarm) if use_alarm else None
    # in-process cases are bounded by CPU time (SIGPROF) with a wall-clock backstop; a CLI case
    # runs in a child process whose CPU time this process does not see: wall clock only
    use_cpu_timer = use_alarm and not cli and hasattr(signal, "SIGPROF")
    old_prof = signal.signal(signal.SIGPROF, _on_alarm) if use_cpu_timer else None
    try:
        with _limits.limits(**LIMITS), warnings.catch_warnings(), tempfile.TemporaryDirectory() as folder:
            warnings.simplefilter("ignore")
            for case, data in cases(n, seed, corpus):
                if use_cpu_timer:
                    signal.setitimer(signal.ITIMER_PROF, CASE_SECONDS)
                    signal.alarm(CASE_WALL_SECONDS)
                elif use_alarm:
                    signal.alarm(CASE_SECONDS)
                try:
                    outcome, failure, unlocated = run_cli_case(case, data, Path(folder), require_location) \
                        if cli else run_case(case, data, require_location)
                finally:
                    if use_cpu_timer:
                        signal.setitimer(signal.ITIMER_PROF, 0)
                    if use_alarm:
                        signal.alarm(0)
                report.cases += 1
                report.outcomes[outcome] += 1
                if failure is not None:
                    report.failures.append(failure)
                if unlocated is not None:
                    report.unlocated[unlocated] += 1
                if progress and report.cases % 500 == 0:
                    print(f"{report.cases} cases, {len(report.failures)} failures, "
                          f"{time.monotonic() - start:.0f} s", file=sys.stderr)
    finally:
        if use_cpu_timer:
            signal.signal(signal.SIGPROF, old_prof)
        if use_alarm:
            signal.signal(signal.SIGALRM, old_handler)
    report.seconds = time.monotonic() - start
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppl.testing.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="number of mutated programs (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--corpus", default=str(EXAMPLES), help="folder of .ppl files (and .json data)")
    parser.add_argument("--show", type=int, default=None, help="print at most this many failures")
    parser.add_argument("--allow-unlocated", action="store_true",
                        help="count errors without a source location but do not fail on them")
    parser.add_argument("--cli", action="store_true",
                        help="run each mutant through the command line (ppl run FILE --data ...), "
                             "cycling through importance, smc, mh, enumerate, tempering and resample_move")
    args = parser.parse_args(argv)
    report = fuzz(args.cases, args.seed, load_corpus(Path(args.corpus)), progress=True,
                  require_location=not args.allow_unlocated, cli=args.cli)
    print(report.summary(args.show))
    return 0 if report.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
