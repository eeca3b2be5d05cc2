"""Populations sharded over processes (``torch.distributed``): the collectives and the
global resampling that the distributed methods (``inference/distributed.py``) are made of.

A population of N particles is split over K ranks in rank order: rank r holds the
particles ``[start_r, start_r + n_r)`` of the global population (``shard``: n_r = N // K,
plus one for the first N % K ranks). Everything below is defined so that the K shards,
concatenated in rank order, behave *as the single-process population would*:

* **Weights** (``WeightSummary``): each rank sends (max log weight m_r, s_r = sum exp(lw -
  m_r), q_r = sum exp(lw - m_r)^2) in float64; every rank combines them in rank order into
  the global max M, sum S, sum of squares Q, so the global ESS (S^2 / Q), the log mean
  weight (M + log(S / N)) and each rank's share of the total (its cdf bounds) are the same
  numbers on every rank. One collective per checkpoint (``Group.status``), which also
  carries each rank's phase and checkpoint count, so ranks that disagree (one finished,
  one failed, one at another checkpoint) stop together with an error instead of hanging.
* **Resampling** (``global_ancestors``): the single-process schemes ``systematic``,
  ``stratified`` and ``multinomial`` of ``semantics/resampling.py`` are all "sorted
  uniforms v_0 <= ... <= v_{N-1} in [0, 1), scaled by the total weight, each one taking
  the particle whose cdf interval [cdf_{i-1}, cdf_i) holds it" (systematic: v_k = (k +
  U) / N, one U; stratified: v_k = (k + U_k) / N; multinomial: N sorted iid uniforms).
  Every rank draws the *same* uniforms from a generator seeded alike on all ranks
  (``shared_uniforms``), and takes the slots k whose v_k falls into its own part
  [B_r, B_{r+1}) of the global cdf, searching its local cdf (B_r + cumsum of its
  weights). So, for the same uniforms, the global ancestor vector (the slots of all ranks
  in order) is the one the single-process scheme gives on the concatenated population:
  the same ancestors slot for slot, hence the same offspring counts, and the same law
  (exactly, in real arithmetic; in floating point a uniform within ~1e-16 (relative)
  of a cdf boundary can fall on the other side, as it can between two single-process
  summation orders). The new population is in slot order, as in one process, so the
  *next* resampling (systematic's law depends on the order) has the single-process law
  too. A particle of weight zero gets no slot; a rounding overshoot goes to the last
  particle of positive weight, as ``_search`` clamps.
* **Moving particles** (``TransferPlan``): slot k belongs to the rank whose shard holds
  k; rank r sends the rows of the slots it drew that other ranks hold, and nothing else
  moves (a rank whose slots all come from its own particles exchanges nothing). The
  plan is computed alike on every rank from the gathered totals and the shared
  uniforms: no extra collective. Rows travel as one byte buffer per (source,
  destination) pair (``exchange_rows``: point-to-point ``isend``/``irecv``).

Timeouts: every collective runs under the process group's timeout (``PPL_DISTRIBUTED_
TIMEOUT`` seconds, default 300), so a dead rank makes the others fail, never hang.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import zlib
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import PPLError, PPLRuntimeError

#: phases a rank reports in ``Group.status``
AT_CHECKPOINT, FINISHED, FAILED = 1.0, 2.0, 3.0
_PHASE_NAMES = {AT_CHECKPOINT: "at a checkpoint", FINISHED: "finished", FAILED: "failed"}

DEFAULT_TIMEOUT = 300.0  # seconds


def available() -> bool:
    """Whether ``torch.distributed`` with the gloo backend is there."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch built without it
        return False
    return dist.is_available() and dist.is_gloo_available()


def shard(N: int, K: int, rank: int) -> tuple[int, int]:
    """(start, size) of rank ``rank``'s particles among N over K ranks, in rank order:
    N // K each, one more for the first N % K ranks."""
    base, extra = divmod(N, K)
    size = base + (1 if rank < extra else 0)
    start = rank * base + min(rank, extra)
    return start, size


def shard_sizes(N: int, K: int) -> list[int]:
    return [shard(N, K, r)[1] for r in range(K)]


# ---------------------------------------------------------------------- the process group
class CollectiveError(PPLError):
    """A collective failed: another rank failed, died, or did not answer in time."""


class RankError(PPLError):
    """Raised alike on every rank by the status collective: a rank failed (its message
    is in this one), or the ranks are at different points of the program."""


class Group:
    """The ranks of one job (``process_group``): ``rank``, ``size``, and the collectives
    the distributed methods use, each under the group's timeout and each turning a
    failure into a ``CollectiveError``."""

    def __init__(self, rank: int, size: int, timeout: float, device="cpu"):
        self.rank = rank
        self.size = size
        self.timeout = timeout
        self.device = torch.device("cpu")  # gloo: collectives on CPU tensors

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # -- raw collectives (float64 / int64 CPU tensors)
    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PPLError:
            raise
        except Exception as err:  # gloo: RuntimeError (timeout, connection closed by peer, ...)
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CollectiveError(
                f"rank {self.rank}: the collective '{what}' failed ({first})",
                hint="another rank failed, was killed or did not reach the same point within the timeout "
                     f"({self.timeout:g} s; PPL_DISTRIBUTED_TIMEOUT sets it); see that rank's output") from None

    def all_gather(self, t: torch.Tensor, what: str = "all_gather") -> list[torch.Tensor]:
        import torch.distributed as dist
        out = [torch.empty_like(t) for _ in range(self.size)]
        self._call(what, dist.all_gather, out, t.contiguous())
        return out

    def all_gather_object(self, obj, what: str = "all_gather_object") -> list:
        import torch.distributed as dist
        out = [None] * self.size
        self._call(what, dist.all_gather_object, out, obj)
        return out

    def gather_object(self, obj, what: str = "gather_object") -> list | None:
        """``obj`` of every rank, in rank order, on rank 0 (None elsewhere)."""
        import torch.distributed as dist
        out = [None] * self.size if self.is_root else None
        self._call(what, dist.gather_object, obj, out, dst=0)
        return out

    def broadcast_int(self, value: int | None, what: str = "broadcast") -> int:
        import torch.distributed as dist
        t = torch.tensor([0 if value is None else int(value)], dtype=torch.int64)
        self._call(what, dist.broadcast, t, src=0)
        return int(t.item())

    # -- the status collective: one per checkpoint, and at the end
    def status(self, phase: float, count: int, m: float = -math.inf, s: float = 0.0, q: float = 0.0,
               where: str = "", extra: float = 0.0) -> list[tuple]:
        """Every rank's (phase, count, m, s, q, code of ``where``, ``extra``), in rank
        order (``extra``: a number the caller shares on the way, e.g. a digest). Raises
        (on every rank alike) when a rank failed (its message is gathered and re-raised on
        the others) or when the ranks are not all at the same point: phase, count and
        ``where`` (a checkpoint's address, with its call path and loop indices)."""
        code = float(zlib.crc32(where.encode()))  # (exact in a float64)
        row = torch.tensor([phase, float(count), m, s, q, code, float(extra)], dtype=torch.float64)
        rows = [tuple(r.tolist()) for r in self.all_gather(row, what=f"status ({where or 'checkpoint'})")]
        failed = [r for r, x in enumerate(rows) if x[0] == FAILED]
        if failed:
            messages = self.all_gather_object(None if phase != FAILED else self._message, what="error message")
            if phase == FAILED:
                return rows  # the failing rank raises its own error
            r = failed[0]
            raise RankError(f"rank {r} of {self.size} failed, so this rank stops too: {messages[r]}",
                           hint="the error above is that rank's; run with one process to see it located")
        if len({(x[0], x[1], x[5]) for x in rows}) > 1:
            places = self.all_gather_object(where, what="where the ranks are")
            states = "; ".join(f"rank {r}: {_PHASE_NAMES.get(x[0], '?')} (checkpoint {int(x[1])}"
                               f"{', ' + places[r] if places[r] else ''})" for r, x in enumerate(rows))
            raise RankError(
                f"the ranks reached different points of the program ({states})",
                hint="distributed SMC needs every particle to reach the same checkpoints in the same order "
                     "(no observe/factor/condition inside a branch or a loop whose length depends on a random "
                     "choice); run it in one process")
        return rows

    _message = ""

    def fail(self, err: BaseException, count: int) -> None:
        """Tell the other ranks (at their next status collective) that this one failed
        with ``err``, so that they stop with its message at once. Best effort: a rank
        already gone or a timeout is ignored here (the caller raises ``err``)."""
        message = getattr(err, "message", None) or str(err)
        self._message = message.splitlines()[0] if message else type(err).__name__
        with contextlib.suppress(PPLError):
            self.status(FAILED, count)


def derive_seed(base: int, *key: int) -> int:
    """A seed for one stream of a distributed run (a rank's particles: ``key`` = (rank,);
    the resampling uniforms every rank shares: ``key`` = (-1,)) from the job's seed,
    the same on every rank: numpy's ``SeedSequence`` (independent streams)."""
    import numpy as np
    words = np.random.SeedSequence([int(base) & (2**63 - 1), *[k + 2 for k in key]]).generate_state(2, np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1


def _timeout_seconds(timeout: float | None) -> float:
    if timeout is not None:
        return float(timeout)
    raw = os.environ.get("PPL_DISTRIBUTED_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or not math.isfinite(value):
        raise PPLError(f"PPL_DISTRIBUTED_TIMEOUT must be a positive number of seconds (got {raw!r})")
    return value


_REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def process_group(timeout: float | None = None, backend: str | None = None):
    """The job's ``Group``: joins the process group that ``torchrun`` describes in the
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; LOCAL_RANK), or uses the
    one already initialised (left as it is on exit). ``backend``: gloo (the default,
    CPU collectives). ``timeout`` (seconds; default ``PPL_DISTRIBUTED_TIMEOUT`` or 300)
    bounds every collective: a rank that died or failed makes the others fail."""
    if not available():
        raise PPLError("distributed runs need torch.distributed with the gloo backend, which this torch lacks")
    import torch.distributed as dist
    seconds = _timeout_seconds(timeout)
    if dist.is_initialized():
        yield Group(dist.get_rank(), dist.get_world_size(), seconds)
        return
    missing = [k for k in _REQUIRED_ENV if k not in os.environ]
    if missing:
        raise PPLError(f"distributed=True needs the environment torchrun sets ({', '.join(missing)} missing)",
                       hint="launch with `torchrun --nproc_per_node=K -m ppl run MODEL.ppl --distributed ...` "
                            "(see README, Running on several processes)")
    try:
        dist.init_process_group(backend or "gloo", timeout=datetime.timedelta(seconds=seconds))
    except Exception as err:
        raise PPLError(f"could not join the process group ({str(err).splitlines()[0] if str(err) else err})",
                       hint="check MASTER_ADDR/MASTER_PORT and that every rank was started") from None
    try:
        yield Group(dist.get_rank(), dist.get_world_size(), seconds)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ------------------------------------------------------------------------ global weights
@dataclass(frozen=True)
class WeightSummary:
    """The global weights from every rank's (m_r, s_r, q_r), combined in rank order:
    ``M`` the max log weight, ``S`` = sum exp(lw - M), ``Q`` = sum exp(lw - M)^2,
    ``totals`` each rank's share of S (its particles' summed weight, relative to M)."""

    M: float
    S: float
    Q: float
    totals: tuple
    N: int

    @staticmethod
    def combine(parts: Sequence[tuple], N: int) -> "WeightSummary":
        """``parts``: per rank (m_r, s_r, q_r); a rank with no particle or no positive
        weight has m_r = -inf."""
        ms = [p[0] for p in parts]
        M = max(ms) if ms else -math.inf
        if not math.isfinite(M):
            return WeightSummary(M, 0.0, 0.0, tuple(0.0 for _ in parts), N)
        totals, S, Q = [], 0.0, 0.0
        for m, s, q in parts:
            f = math.exp(m - M) if math.isfinite(m) else 0.0
            totals.append(s * f)
            S += s * f
            Q += q * f * f
        return WeightSummary(M, S, Q, tuple(totals), N)

    @property
    def ess(self) -> float:
        return self.S * self.S / self.Q if self.Q > 0 else math.nan

    @property
    def log_mean(self) -> float:
        """log of the mean weight over all N particles (the evidence increment)."""
        return self.M + math.log(self.S / self.N) if self.S > 0 else -math.inf

    @property
    def log_total(self) -> float:
        return self.M + math.log(self.S) if self.S > 0 else -math.inf

    def bounds(self) -> list[float]:
        """B_0 = 0 <= B_1 <= ... <= B_K = S: where each rank's part of the global cdf
        begins (cumulative totals in rank order, the same floats on every rank)."""
        out, acc = [0.0], 0.0
        for t in self.totals:
            acc += t
            out.append(acc)
        return out


def local_summary(log_weights: torch.Tensor) -> tuple[float, float, float]:
    """(m, s, q) of one rank's log weights (float64): the max, sum exp(lw - m),
    sum exp(lw - m)^2; (-inf, 0, 0) when empty or every weight is zero (a NaN max is
    returned as is, for the caller to reject)."""
    lw = log_weights.detach().double()
    if lw.numel() == 0:
        return -math.inf, 0.0, 0.0
    m = float(lw.max())
    if not math.isfinite(m):
        return (m, 0.0, 0.0) if math.isnan(m) else (-math.inf, 0.0, 0.0)
    w = torch.exp(lw - m)
    return m, float(w.sum()), float(torch.dot(w, w))


# ------------------------------------------------------------------- global resampling
#: the schemes with a global form (sorted shared uniforms)
GLOBAL_SCHEMES = ("systematic", "stratified", "multinomial")


def shared_uniforms(scheme: str, N: int, generator: torch.Generator) -> torch.Tensor:
    """The scheme's sorted uniforms in [0, 1) (float64 [N]), drawn from ``generator``,
    which every rank seeds alike: systematic (k + U) / N, stratified (k + U_k) / N,
    multinomial N sorted iid uniforms."""
    grid = torch.arange(N, dtype=torch.float64)
    if scheme == "systematic":
        return (grid + torch.rand((), dtype=torch.float64, generator=generator)) / N
    if scheme == "stratified":
        return (grid + torch.rand(N, dtype=torch.float64, generator=generator)) / N
    if scheme == "multinomial":
        return torch.sort(torch.rand(N, dtype=torch.float64, generator=generator)).values
    raise PPLError(f"resampling '{scheme}' has no distributed form yet",
                   hint=f"choose from: {', '.join(GLOBAL_SCHEMES)}")


def slot_ranges(summary: WeightSummary, v: torch.Tensor) -> list[tuple[int, int]]:
    """Per rank, the slots [lo, hi) whose scaled uniforms v_k * S fall into its part
    [B_r, B_{r+1}) of the global cdf (contiguous, as v is sorted; empty for a rank of
    total weight zero). The last rank of positive weight takes every slot from its lo
    on (a rounding overshoot v_k * S >= S goes to the last particle of positive weight)."""
    B = summary.bounds()
    scaled = v * summary.S
    K = len(summary.totals)
    last = max((r for r, t in enumerate(summary.totals) if t > 0), default=K - 1)
    out = []
    for r in range(K):
        if r > last or summary.totals[r] <= 0:
            out.append((0, 0))
            continue
        lo = int(torch.searchsorted(scaled, torch.tensor([B[r]], dtype=torch.float64), right=False))
        hi = len(v) if r == last else \
            int(torch.searchsorted(scaled, torch.tensor([B[r + 1]], dtype=torch.float64), right=False))
        out.append((lo, max(lo, hi)))
    return out


def local_ancestors(log_weights: torch.Tensor, summary: WeightSummary, rank: int, v: torch.Tensor,
                    lo: int, hi: int) -> torch.Tensor:
    """The local indices of this rank's particles drawn for the slots [lo, hi): the
    first i with B_r + cumsum(w)_i > v_k * S, clamped to the last local particle of
    positive weight (``resampling._search``'s rule)."""
    if hi <= lo:
        return torch.zeros(0, dtype=torch.long)
    lw = log_weights.detach().double().cpu()
    w = torch.exp(lw - summary.M)  # relative to the global max, as one process computes them
    cdf = summary.bounds()[rank] + torch.cumsum(w, 0)
    idx = torch.searchsorted(cdf, v[lo:hi] * summary.S, right=True)
    positive = torch.nonzero(w > 0)
    last = int(positive.max()) if positive.numel() else w.shape[0] - 1
    return idx.clamp_(max=last)


@dataclass(frozen=True)
class TransferPlan:
    """Who sends which slots to whom after a global resampling: ``ranges[r]`` the slots
    rank r drew (from its own particles), ``shards[d]`` the slots rank d holds next.
    ``rows(r, d)``: the positions, within r's drawn slots, of those d holds."""

    ranges: tuple
    shards: tuple

    @staticmethod
    def make(ranges: Sequence[tuple[int, int]], N: int) -> "TransferPlan":
        K = len(ranges)
        shards = tuple((s, s + n) for s, n in (shard(N, K, d) for d in range(K)))
        return TransferPlan(tuple(ranges), shards)

    def overlap(self, r: int, d: int) -> tuple[int, int]:
        lo = max(self.ranges[r][0], self.shards[d][0])
        hi = min(self.ranges[r][1], self.shards[d][1])
        return (lo, hi) if hi > lo else (lo, lo)

    def count(self, r: int, d: int) -> int:
        lo, hi = self.overlap(r, d)
        return hi - lo

    def rows(self, r: int, d: int) -> slice:
        lo, hi = self.overlap(r, d)
        return slice(lo - self.ranges[r][0], hi - self.ranges[r][0])

    def self_contained(self, d: int) -> bool:
        """Whether every slot rank d holds was drawn from its own particles."""
        return all(self.count(r, d) == 0 for r in range(len(self.ranges)) if r != d)

    @property
    def moves(self) -> bool:
        K = len(self.ranges)
        return any(self.count(r, d) for r in range(K) for d in range(K) if r != d)

    def rows_moved(self) -> int:
        K = len(self.ranges)
        return sum(self.count(r, d) for r in range(K) for d in range(K) if r != d)


def global_ancestors(parts: Sequence[tuple], log_weights_of_rank, v: torch.Tensor, N: int) -> torch.Tensor:
    """The whole ancestor vector (global indices, slot order) that the ranks together
    draw for uniforms ``v``: ``parts`` every rank's ``local_summary``, and
    ``log_weights_of_rank(r)`` its log weights. (What the ranks compute, in one process,
    for tests and for the cost model: each rank computes only its own slots.)"""
    summary = WeightSummary.combine(parts, N)
    ranges = slot_ranges(summary, v)
    out = []
    start = 0
    for r, (lo, hi) in enumerate(ranges):
        lw = log_weights_of_rank(r)
        out.append(local_ancestors(lw, summary, r, v, lo, hi) + start)
        start += lw.shape[0]
    return torch.cat(out)


# ---------------------------------------------------------------------- moving rows
@dataclass(frozen=True)
class ColumnSpec:
    """One column of the particle state moved between ranks: its name, dtype and the
    shape of one particle's row (the same on every rank)."""

    name: str
    dtype: torch.dtype
    shape: tuple

    @property
    def row_bytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def agree_on_columns(group: Group, local: dict[str, torch.Tensor | list]) -> list[ColumnSpec]:
    """The union of every rank's columns (name -> tensor [n_r, ...]), in order of first
    appearance over the ranks; the same list on every rank. A column that holds Python
    objects (a list: strings, tokens), or whose dtype or row shape differs between ranks,
    is an error on every rank alike, naming it."""
    mine = [(name, None if isinstance(col, list) or not isinstance(col, torch.Tensor) else
             (str(col.dtype), tuple(col.shape[1:]))) for name, col in local.items()]
    everyone = group.all_gather_object(mine, what="column names")
    specs: dict[str, tuple] = {}
    bad: list[str] = []
    for rank_cols in everyone:
        for name, desc in rank_cols:
            if desc is None:
                bad.append(name)
                continue
            if name in specs and specs[name] != desc:
                bad.append(name)
            specs.setdefault(name, desc)
    if bad:
        names = ", ".join(f"'{b}'" for b in dict.fromkeys(bad))
        raise PPLRuntimeError(
            f"distributed SMC cannot move the choices {names} between ranks: their values are Python objects "
            "(strings, tokens, ragged lists) or differ in type or shape between ranks",
            hint="run this model in one process, or with method='importance' (no particle moves)")
    return [ColumnSpec(n, getattr(torch, d.split(".")[-1]), s) for n, (d, s) in specs.items()]


def _rows_of(col: torch.Tensor | None, spec: ColumnSpec, sel: torch.Tensor) -> torch.Tensor:
    if col is None:  # this rank never drew the choice: zeros (its particles do not make it)
        return torch.zeros((sel.shape[0], *spec.shape), dtype=spec.dtype)
    return col.detach().cpu().index_select(0, sel)


def _pack(chunks: list[torch.Tensor]) -> torch.Tensor:
    if not chunks:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.cat([c.contiguous().view(torch.uint8).reshape(-1) if c.numel() else
                      torch.zeros(0, dtype=torch.uint8) for c in chunks])


def _unpack(buf: torch.Tensor, specs: list[ColumnSpec], n: int) -> list[torch.Tensor]:
    out, at = [], 0
    for spec in specs:
        size = n * spec.row_bytes
        piece = buf[at:at + size]
        at += size
        # (a copy: a view of another dtype needs its storage offset aligned to the element size)
        out.append(piece.clone().view(spec.dtype).reshape(n, *spec.shape) if n else
                   torch.zeros((0, *spec.shape), dtype=spec.dtype))
    return out


def exchange_rows(group: Group, plan: TransferPlan, columns: dict[str, torch.Tensor],
                  specs: list[ColumnSpec], drawn: torch.Tensor) -> dict[str, torch.Tensor]:
    """Move the resampled rows: ``drawn`` are this rank's local ancestors for its slots
    (``plan.ranges[rank]``), ``columns`` its state (name -> tensor [n_r, ...]). Each
    (source, destination) pair with rows to move sends one byte buffer (``isend``/
    ``irecv``); rows that stay are taken locally. Returns this rank's new columns
    (name -> tensor [its shard size, ...], in slot order)."""
    import torch.distributed as dist
    me, K = group.rank, group.size
    row_bytes = sum(s.row_bytes for s in specs)
    pending, inbox = [], {}
    for d in range(K):
        if d != me and plan.count(me, d):
            sel = drawn[plan.rows(me, d)]
            buf = _pack([_rows_of(columns.get(s.name), s, sel) for s in specs])
            pending.append(group._call("send rows", dist.isend, buf, dst=d))
    for r in range(K):
        if r != me and plan.count(r, me):
            buf = torch.empty(plan.count(r, me) * row_bytes, dtype=torch.uint8)
            pending.append(group._call("receive rows", dist.irecv, buf, src=r))
            inbox[r] = buf
    for work in pending:
        group._call("move rows", work.wait)
    pieces: list[list[torch.Tensor]] = [[] for _ in specs]
    for r in range(K):
        n = plan.count(r, me)
        if not n:
            continue
        if r == me:
            sel = drawn[plan.rows(me, me)]
            got = [_rows_of(columns.get(s.name), s, sel) for s in specs]
        else:
            got = _unpack(inbox[r], specs, n)
        for i, g in enumerate(got):
            pieces[i].append(g)
    return {s.name: (torch.cat(pieces[i]) if pieces[i] else torch.zeros((0, *s.shape), dtype=s.dtype))
            for i, s in enumerate(specs)}
