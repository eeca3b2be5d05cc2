"""Which discrete choices a sampling method sums out by itself: ``enumerate="auto"``.

``select(model, data, batch)`` chooses, from the dependency analysis
(``semantics.dependencies``) and what the enumeration (``semantics.enumerate_sites``)
supports, the choices to sum out:

* a choice site that exists on every path (``Site.static``; not under a branch on a random
  value), not marked ``@enumerate`` already (those are summed out anyway);
* of a distribution with a finite support whose values are booleans or integers
  (``flip``, ``bernoulli``, ``categorical``, ``binomial``, ``beta_binomial``,
  ``uniform_draw``), one value per draw (not a vector);
* whose value no unsupported use depends on. The analysis is run with a recorder of uses
  (``_UseAnalysis``): a choice is left sampled when an ``if``/``while`` condition, a loop's
  iterable, an ``and``/``or`` operand, an ``x if c else y`` condition with impure branches,
  an ``in`` test, an attribute, an unpacking or a built-in call's argument (other than a
  distribution's parameter) depends on it, when it indexes a list of other chosen values,
  or when a value or site depends on so many chosen choices that its table (at least 2 per
  choice and ``batch`` rows of 8 bytes) exceeds the memory budget (``limits``).

The choice is the sound one whatever the analysis misses: the enumeration refuses, with a
located error, every use it cannot carry (it never computes a wrong answer), and the
errors name the choices they are about (``enumerate_sites.blame``). ``AutoSelection.
after_failure(err)`` then leaves those choices (and the others made by the same statement)
sampled, and the method runs again (``inference.auto_enumerate``); an error it cannot
attribute leaves every chosen choice sampled. Where the analysis falls back to executed
traces (``Dependencies.from_traces``: no uses recorded), every finite choice that every
traced particle reached is tried that way.

The chosen addresses are exact (``enumerate_sites.ExactAddresses``), so ``z`` does not
select ``f/z`` too. The result says what was summed out (``extra["enumerated"]``) and why
the other finite choices were left sampled (``extra["enumerate_sampled"]``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from . import ir, limits
from .dependencies import EMPTY, _Analysis, _from_traces, _Undecidable, _with_shapes
from .enumerate_sites import ExactAddresses
from .errors import PPLError
from .interpreter import Builtin

__all__ = ["AUTO", "is_auto", "select", "AutoSelection", "summary_line"]

AUTO = "auto"
#: at most this many runs of the method (each failed run leaves >= 1 statement sampled;
#: the last run has every chosen choice sampled)
MAX_ATTEMPTS = 6
_FINITE_KINDS = ("boolean", "finite")
#: built-ins whose arguments the analysis follows into model code (``map(f, zs)``) or
#: that only read a list's length
_TRANSPARENT = frozenset({"sample", "map", "fold", "filter", "mem"})


def is_auto(option) -> bool:
    """Whether a method's ``enumerate=`` option asks for the automatic choice."""
    return isinstance(option, str) and option.strip().lower() == AUTO


# ----------------------------------------------------------------------------- the choice
@dataclass(frozen=True)
class AutoSelection:
    """The choices to sum out (``chosen``), why each other finite-support choice is left
    sampled (``left``: address -> reason), the statement of each address (``group``:
    address -> the addresses of the same statement) and how many runs were tried."""

    chosen: ExactAddresses
    left: dict = field(default_factory=dict)
    group: dict = field(default_factory=dict)
    attempts: int = 1
    from_traces: bool = False

    def without(self, addresses, why: str) -> "AutoSelection":
        """The selection with ``addresses`` (and their statements' other addresses) sampled."""
        drop = set()
        for a in addresses:
            drop |= self.group.get(a, {a})
        drop &= self.chosen
        left = dict(self.left)
        left.update({a: why for a in sorted(drop)})
        return replace(self, chosen=ExactAddresses(self.chosen - drop), left=left)

    def after_failure(self, err: PPLError) -> "AutoSelection | None":
        """The selection for the next run after ``err``, or None when ``err`` is not caused by
        a chosen choice (it is the model's, or an explicitly enumerated choice's: raise it)."""
        if not self.chosen:
            return None
        where = f", line {err.span.line}" if err.span is not None and getattr(err.span, "line", 0) else ""
        why = f"{err.message}{where}"
        culprits = _culprits(err, self.chosen)
        if culprits is None:  # not attributable: every chosen choice sampled, once more
            nxt = self.without(self.chosen, f"a run with it summed out failed: {why}")
        elif not culprits & self.chosen:
            return None
        else:
            nxt = self.without(culprits & self.chosen, f"summing it out failed: {why}")
        if nxt.attempts + 1 >= MAX_ATTEMPTS:
            nxt = nxt.without(nxt.chosen, f"too many failed runs ({MAX_ATTEMPTS - 1}): left sampled")
        return replace(nxt, attempts=nxt.attempts + 1)

    def extras(self) -> dict:
        """What a result's ``extra`` records of the choice."""
        return {"enumerated": sorted(self.chosen, key=_natural), "enumerate_sampled": dict(self.left),
                "enumerate_attempts": self.attempts}


def _culprits(err: PPLError, chosen) -> "set | None":
    """The chosen choices an enumeration error is about (None: it names none)."""
    named = getattr(err, "enumerated", None)
    if named is not None:
        return set(named)
    m = re.search(r"drop @enumerate on (\S+)", err.hint or "")
    if m is None:
        return None
    name = m.group(1)
    hit = {a for a in chosen if a == name or _base(a) == name}
    return hit or None


def _base(addr: str) -> str:
    return addr.split("/")[-1].split("[")[0]


def _natural(addr: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", addr)]


def select(model, data, batch: int = 1) -> AutoSelection:
    """The choices of ``model`` on ``data`` to sum out (module docstring); ``batch``: the
    number of rows (particles, chains x draws) the enumeration's tables will have."""
    from ..stdlib.distributions import DISTRIBUTIONS
    interp = model.interpreter()
    try:
        args = model.prepare_data(model.bind((), dict(data or {})), "cpu")
        an = _UseAnalysis(interp, args)
        try:
            an.run(model.entry, args)
            sites, traced = _with_shapes(interp, model.entry, args, tuple(an.sites.values())), False
        except _Undecidable as why:
            sites, traced = _from_traces(interp, model.entry, args, why.why).sites, True
    except PPLError as err:  # (the method's run will say what is wrong, located)
        return AutoSelection(ExactAddresses(), {"*": f"the dependency analysis failed: {err.message}"})
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as err:  # (an analysis limitation)
        return AutoSelection(ExactAddresses(), {"*": f"the dependency analysis failed: {type(err).__name__}: {err}"})
    marked = _marked_spans(model.program)
    left: dict = {}
    cands: dict = {}
    group: dict = {}
    for s in sites:
        spec = DISTRIBUTIONS.get(s.distribution) if s.kind == "choice" and s.distribution else None
        if spec is None or not _finite(spec) or _key(s.span) in marked:
            continue
        if not s.static:
            left[s.address] = "not on every path" if not s.from_traces else "not reached by every traced run"
        elif s.shape not in ((), None):
            left[s.address] = f"a vector of {s.shape} values"
        else:
            cands[s.address] = s
        group.setdefault(_key(s.span), set()).add(s.address)
    groups = {a: frozenset(group[_key(s.span)]) for a, s in cands.items()}
    sel = AutoSelection(ExactAddresses(cands), left, groups, from_traces=traced)
    if traced:
        return sel
    for deps, what in an.uses:
        hit = deps & sel.chosen
        if hit:
            sel = sel.without(hit, f"its value is needed {what}")
    for container, index, line in an.index_pairs:
        if container & sel.chosen and index & sel.chosen:
            sel = sel.without(index & sel.chosen, f"it indexes a list of summed-out choices, line {line}")
    budget = limits.current().max_memory
    for deps in [s.parents for s in sites] + list(an.joint):
        hit = deps & sel.chosen
        if hit and 8 * batch * 2.0 ** len(hit) > budget:
            sel = sel.without(hit, f"a table over {len(hit)} summed-out choices would exceed the memory budget")
    return sel


def _finite(spec) -> bool:
    return spec.discrete and spec.support_kind in _FINITE_KINDS and spec.value_event_dim == 0 and \
        spec.value_dtype in ("bool", "long")


def _key(span):
    return None if span is None else (span.line, span.col)


def _marked_spans(program) -> set:
    """The statements ``z ~ d @enumerate`` (summed out by the method whatever is chosen)."""
    return {_key(n.span) for n in ir.walk(program) if isinstance(n, ir.Sample) and n.enumerate}


# --------------------------------------------------------------------- the use analysis
class _UseAnalysis(_Analysis):
    """The dependency analysis, recording the uses the enumeration cannot carry lazily:
    ``uses`` [(choices the used value depends on, what the use is)], ``index_pairs``
    [(a container's choices, its index's choices, line)] and ``joint`` (the choices each
    computed number depends on: an enumerated value's table is over those summed out; a
    list keeps one table per element, so its union is no table)."""

    def __init__(self, interp, data_names):
        super().__init__(interp, data_names)
        self.uses: list = []
        self.index_pairs: list = []
        self._roles: dict = {}   # id(expression) -> what its value is used for
        self._parts: dict = {}   # id(expression) -> (id(index expression), "container" | "index")
        self._seen: dict = {}    # (id(index expression), part) -> choices
        self.joint: set = set()

    def _note(self, e: ir.Expr, what: str) -> None:
        line = getattr(e.span, "line", 0)
        self._roles[id(e)] = f"{what}, line {line}" if line else what

    def exec_stmt(self, s, fr) -> bool:
        t = type(s)
        if t is ir.If or t is ir.While:
            self._note(s.cond, "as a condition")
        elif t is ir.For:
            self._note(s.iterable, "as a loop's iterable")
        return super().exec_stmt(s, fr)

    def eval(self, e, fr):
        t = type(e)
        if t is ir.BoolOp:
            self._note(e.left, f"as an operand of `{e.op}`")
        elif t is ir.IfExp and not (self.interp.pure(e.then) and self.interp.pure(e.orelse)):
            self._note(e.cond, "as the condition of an `x if c else y` with calls in its branches")
        elif t is ir.BinOp and e.op in ("in", "not in"):
            self._note(e.left, f"in an `{e.op}` test")
            self._note(e.right, f"in an `{e.op}` test")
        elif t is ir.Attr:
            self._note(e.value, f"for its attribute .{e.name}")
        elif t is ir.Index and not isinstance(e.index, ir.Slice):
            self._parts[id(e.value)] = (id(e), "container")
            self._parts[id(e.index)] = (id(e), "index")
        v = super().eval(e, fr)
        role = self._roles.get(id(e))
        if role is not None:
            self.uses.append((v.all_deps(), role))
        part = self._parts.get(id(e))
        if part is not None:
            self._seen[part] = v.all_deps()
        if t is ir.Index:
            c, i = self._seen.pop((id(e), "container"), EMPTY), self._seen.pop((id(e), "index"), EMPTY)
            if c and i:
                self.index_pairs.append((c, i, getattr(e.span, "line", 0)))
        if t in _COMPUTED and v.items is None and len(v.deps) > 1:
            self.joint.add(v.deps)
        return v

    def call(self, f, args, kwargs, span, fr):
        if isinstance(f, Builtin) and f.name not in _TRANSPARENT and not _is_distribution(f.name) and \
                not (f.name == "len" and args and args[0].items is not None):
            deps = EMPTY.union(*(a.all_deps() for a in (*args, *kwargs.values())))
            if deps:
                line = getattr(span, "line", 0)
                self.uses.append((deps, f"as an argument of {f.name}()" + (f", line {line}" if line else "")))
        return super().call(f, args, kwargs, span, fr)

    def bind(self, fr, target, v, span) -> None:
        if not isinstance(target, str) and v.items is None and not v.known:
            line = getattr(span, "line", 0)
            self.uses.append((v.all_deps(), "unpacked" + (f", line {line}" if line else "")))
        super().bind(fr, target, v, span)


#: expressions whose value is one table over the enumerated choices it depends on
_COMPUTED = (ir.BinOp, ir.UnaryOp, ir.IfExp, ir.Index, ir.BoolOp)


def _is_distribution(name: str) -> bool:
    from ..stdlib.distributions import DISTRIBUTIONS
    return name in DISTRIBUTIONS


# -------------------------------------------------------------------------- for people
def summary_line(extra: dict) -> "str | None":
    """One line for a result's header: what ``enumerate="auto"`` summed out and what it
    left sampled (None when the option was not used)."""
    if "enumerated" not in extra:
        return None
    chosen = extra["enumerated"]
    line = f"enumerate=auto: summed out {_compact(chosen) if chosen else 'nothing'}"
    left = extra.get("enumerate_sampled") or {}
    if left:
        reasons: dict = {}
        for a, why in left.items():
            reasons.setdefault(why, []).append(a)
        parts = [f"{_compact(addrs)} ({why})" for why, addrs in list(reasons.items())[:3]]
        more = f"; {len(reasons) - 3} more reasons" if len(reasons) > 3 else ""
        line += "; left sampled: " + "; ".join(parts) + more
    return line


def _compact(addresses) -> str:
    """``z[0], ..., z[5]`` as ``z[0..5]``; other addresses as they are."""
    by_stem: dict = {}
    for a in sorted(addresses, key=_natural):
        m = re.fullmatch(r"(.*)\[(\d+)\]", a)
        stem, i = (m.group(1), int(m.group(2))) if m else (a, None)
        by_stem.setdefault(stem, []).append((i, a))
    out = []
    for stem, items in by_stem.items():
        idx = [i for i, _ in items]
        if len(items) > 2 and None not in idx and idx == list(range(idx[0], idx[0] + len(idx))):
            out.append(f"{stem}[{idx[0]}..{idx[-1]}]")
        else:
            out.extend(a for _, a in items)
    shown = []
    for a in out[:8]:
        if shown and sum(len(x) + 2 for x in shown) + len(a) > 80:
            break
        shown.append(a)
    text = ", ".join(shown)
    return text + (f", ... ({len(out)} in all)" if len(shown) < len(out) else "")
