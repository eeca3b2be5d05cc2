"""Importance sampling and SMC with the population sharded over the ranks of a
``torch.distributed`` job (``semantics/distributed.py``: the group, the global weights,
global resampling, moving rows).

Each rank runs its shard (``shard(N, K, rank)``: N // K particles, one more on the first
N % K ranks) of one global population of N particles, in rank order, with its own
stream of random draws (``derive_seed(seed, rank)``).

* ``distributed_importance``: every rank weights its shard; the ranks check together that
  some weight is positive; rank 0 gathers the particles. The global population is
  likelihood weighting's with N particles, so it is proper: E[(1/N) sum_i w_i f(x_i)] =
  Z E_post[f] (rank 0's ``Population``, the single-process result type).
* ``distributed_smc``: SMC's algorithm on the global population. At each checkpoint the
  ranks exchange (max, sum, sum of squares) of their weights (one collective), so the
  adaptive ESS test, the evidence increment and the resampling use the global weights;
  resampling is global (``semantics.distributed``: for the same shared uniforms, the
  ancestors of the single-process scheme on the concatenated population, slot for slot,
  in slot order), so the algorithm is the single-process SMC in law, step for step.
  Moving particles: a rank whose new particles all descend from its own appends the
  ancestors to its lineage, as one process does. Otherwise the particles' *live state*
  moves (``semantics.live_state``): every per-particle value the suspended run holds
  (the variables of the frames on the call stack, closures, the interpreter's pending
  locals, the twist potential) is found by a walk from the suspended generator, the
  ranks agree on its columns (a digest of each rank's walk rides on the status
  collective), and each value gets the rows of its new particles wherever they were
  drawn, in place. A resampling costs O(state) per moved particle, not a replay of the
  prefix: a run is O(T) in its checkpoints (for a state-space model the state is the
  current x). The trace stays where it was recorded: at each resampling the sites so far
  are set aside as rows of that population (``frozen``) with the global ancestors of
  the slots this rank drew, and rank 0 follows each final particle's line back through
  them at the end (``assemble_sites``), as the lineage does in one process. For the
  same seed the population is the one the replay gave, bit for bit.
  Restrictions, checked with errors raised alike on every rank: every checkpoint is
  reached by the whole population (no observe inside a branch only some particles
  take: ranks would disagree on the checkpoints); per-particle Python values move as
  JSON rows (strings, numbers, lists, tuples, language-model tokens and completions:
  ``semantics.live_values``; a language model's per-particle memos are dropped and
  recomputed), but values that are not data (functions, other objects), memoised
  functions with entries, and a state whose structure differs between ranks cannot move
  (the error names the variable); ``proposal``, ``delayed`` and ``enumerate`` are
  single-process only.
* ``distributed_chains``: MCMC chains (``mh``, ``nuts``, ``hmc``) shared by the ranks, each
  rank running the single-process method on its chains; rank 0 gathers them and computes
  R-hat and ESS over all chains.

Failures: a rank that raises tells the others at their next status collective (they stop
with its message); a rank that dies makes the others' next collective fail (connection
closed, or the group's timeout). Never a hang.
"""
from __future__ import annotations

import math

import torch

from ..semantics import live_state, live_values
from ..semantics.distributed import (AT_CHECKPOINT, FINISHED, CollectiveError, ColumnSpec, Group, RankError,
                                     TransferPlan, WeightSummary, agree_on_columns, exchange_rows, local_ancestors,
                                     local_summary, shard, shard_sizes, shared_uniforms, slot_ranges, GLOBAL_SCHEMES)
from ..semantics.errors import PPLError, PPLRuntimeError, ZeroEvidenceError
from ..semantics.sampling import Suspended, Weighting, column, drive
from ..semantics.values import Lineage, Particles, lineage_scope
from .chain_pool import chains_shared_with
from .diagnostics import site_diagnostics
from .population import Chains, Population
from .smc import SMCHandler, StepRecord


# ---------------------------------------------------------------------- gathering results
def merge_sites(per_rank: list[dict], sizes: list[int]) -> dict:
    """The sites of the global population from each rank's (address -> (values,
    present)), in rank order: a site some ranks lack is absent (present False) for their
    particles. Values: tensors concatenated (absent rows zeros), or lists (absent None)."""
    addrs = list(dict.fromkeys(a for sites in per_rank for a in sites))
    out = {}
    for a in addrs:
        values, present = [], []
        for sites, n in zip(per_rank, sizes):
            v, p = sites.get(a, (None, None))
            values.append(v)
            present.append(torch.zeros(n, dtype=torch.bool) if v is None else
                           torch.ones(n, dtype=torch.bool) if p is None else p.cpu().bool())
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if len(tensors) == sum(v is not None for v in values):
            like = tensors[0]
            col = torch.cat([v.cpu() if v is not None else torch.zeros((n, *like.shape[1:]), dtype=like.dtype)
                             for v, n in zip(values, sizes)])
        else:
            col = []
            for v, n in zip(values, sizes):
                col.extend([None] * n if v is None else list(v))
        mask = torch.cat(present)
        out[a] = (col, None if bool(mask.all()) else mask)
    return out


def gather_population(group: Group, label: str, sites: dict, log_weights: torch.Tensor, extra: dict,
                      sizes: list[int]) -> Population | None:
    """Rank 0: the global ``Population`` (every rank's particles in rank order); other
    ranks: None."""
    local = {a: (v.detach().cpu() if isinstance(v, torch.Tensor) else v,
                 None if p is None else p.detach().cpu()) for a, (v, p) in sites.items()}
    got = group.gather_object((local, log_weights.detach().cpu()), what="gather the particles on rank 0")
    if not group.is_root:
        return None
    merged = merge_sites([g[0] for g in got], sizes)
    lw = torch.cat([g[1].double() for g in got])
    return Population(label, merged, lw, {**extra, "ranks": group.size, "shard_sizes": sizes})


def _reported(err: BaseException) -> bool:
    """Errors every rank raises alike (no need to tell the others)."""
    return isinstance(err, (RankError, CollectiveError))


def _check_shards(particles: int, group: Group) -> list[int]:
    if particles < group.size:
        raise PPLError(f"{particles} particles cannot be shared by {group.size} ranks",
                       hint="use at least one particle per rank")
    return shard_sizes(particles, group.size)


# ---------------------------------------------------------------------- importance
def distributed_importance(interp, entry: str, data: dict, particles: int, device, group: Group,
                           label: str = "importance") -> Population | None:
    """Likelihood weighting of ``particles`` particles over the group's ranks (module
    docstring); the ``Population`` on rank 0, None elsewhere."""
    sizes = _check_shards(particles, group)
    n = sizes[group.rank]
    try:
        ctx = Particles.all(n, device)
        h = Weighting(n, device)
        ret = drive(interp.run(entry, data, ctx), h)
        sites = {"return": (column(ret, ctx), None), **h.trace.sites()}
        m, s, q = local_summary(h.log_weights)
        if math.isnan(m):
            raise PPLRuntimeError("a particle's log weight is NaN", hint="check the observations and factors")
        rows = group.status(FINISHED, 0, m, s, q, where="end of the run")
        summary = WeightSummary.combine([r[2:5] for r in rows], particles)
        if not math.isfinite(summary.M):
            raise ZeroEvidenceError(f"every particle has weight zero on every rank (log evidence = -inf)",
                                    hint="the observations/conditions may be impossible under the prior; run "
                                         "in one process to locate the site")
    except BaseException as err:
        if not _reported(err) and not isinstance(err, ZeroEvidenceError):
            group.fail(err, 0)
        raise
    return gather_population(group, label, sites, h.log_weights, {}, sizes)


# ---------------------------------------------------------------------- SMC
class DistributedSMCHandler(SMCHandler):
    """SMC's handler on one rank's shard: the checkpoint rule uses the global weights
    (one status collective per checkpoint) and resamples globally. Where particles move
    between ranks, the run's live state moves with them (``semantics.live_state``); the
    trace so far stays where it was made, in ``frozen`` (one set of rows per
    resampling), with ``ancestry`` (the global ancestors of the slots this rank drew),
    and rank 0 follows every final particle's line back through them at the end
    (``assemble_sites``)."""

    def __init__(self, N: int, device, lineage, *, group: Group, total: int, shared: torch.Generator,
                 resampling: str = "systematic", ess_threshold: float = 1.0):
        if resampling not in GLOBAL_SCHEMES:
            raise PPLRuntimeError(f"resampling '{resampling}' has no distributed form yet",
                                  hint=f"with distributed=True choose from: {', '.join(GLOBAL_SCHEMES)}")
        super().__init__(N, device, lineage, resampling=resampling, ess_threshold=ess_threshold)
        self.group, self.total, self.shared = group, total, shared
        self.start = shard(total, group.size, group.rank)[0]
        self.checkpoints = 0
        self.rows_moved = 0  # rows that crossed ranks, over the run (the plan is the same on every rank)
        self.run = None  # the suspended run (its generator), whose live state moves
        self.data: dict = {}  # the run's data: the same on every rank, never compared
        self.frozen: list[dict] = []  # per resampling: the sites recorded before it (rows of that population)
        self.ancestry: list[tuple] = []  # per resampling: (first slot drawn here, their global ancestors)
        self.state_moves = 0  # resamplings whose live state moved between ranks

    def _local_stats(self, eff) -> tuple[float, float, float]:
        """(m, s, q) of this shard, after the pending NaN test of an observe
        (``SMCHandler.observe``); a NaN weight is an error at ``eff``."""
        m = float(self.log_weights.max())
        if math.isnan(m) and self._unchecked is not None:
            before, lp = self._unchecked
            self._unchecked = None
            self.log_weights = before
            nan = isinstance(lp, torch.Tensor) and bool(torch.isnan(lp).any())
            self.add(eff.ctx, self._nan_observation(lp, eff) if nan else lp)
        m, s, q = local_summary(self.log_weights)
        if math.isnan(m):
            raise PPLRuntimeError("a particle's log weight is NaN at this checkpoint", eff.span)
        return m, s, q

    def _checkpoint(self, eff):
        if eff.ctx.idx.shape[0] != self.N:
            raise PPLRuntimeError("distributed SMC needs every observe/factor/condition to be reached by all "
                                  "particles together", eff.span,
                                  "this checkpoint is inside a branch taken by only some particles: run it in "
                                  "one process")
        self.checkpoints += 1
        m, s, q = self._local_stats(eff)
        # resampling for sure (threshold 1): the live state's digest rides on the status collective
        digest = self._walk_ahead(eff) if self.ess_threshold >= 1.0 and self.group.size > 1 and \
            self.moves_live_state else 0.0
        rows = self.group.status(AT_CHECKPOINT, self.checkpoints, m, s, q, where=eff.addr, extra=digest)
        summary = WeightSummary.combine([r[2:5] for r in rows], self.total)
        if not math.isfinite(summary.M):
            raise ZeroEvidenceError("every particle has weight zero at this checkpoint (on every rank)", eff.span,
                                    "the observation/condition may be impossible, or too unlikely for "
                                    f"{self.total} particles")
        ess = summary.ess
        resample = ess < self.ess_threshold * self.total or self.ess_threshold >= 1.0
        lme = summary.log_mean
        if resample:
            self.log_z += lme
            lme = 0.0
        self.history.append(StepRecord(eff.addr, ess, resample, self.log_z + lme))
        if resample:
            self._resample_globally(summary, eff, [r[6] for r in rows])
        self._walked = None

    _walked = None  # (walk, problem) of the live state, found before the status collective
    moves_live_state = True  # (resample-move moves the traces and replays instead)

    def _walk_ahead(self, eff) -> float:
        """Set the trace aside and walk the live state before the status collective, so
        that the ranks compare their states' digests on the way (-1: this rank's state
        cannot move)."""
        self._freeze_trace()
        found, problem = self._walk(eff)
        self._walked = (found, problem)
        return float(found.digest()) if found is not None else -1.0

    def _walk(self, eff):
        roots = [("run", self.run), ("effect", eff), ("twist", self._twist)]
        try:
            return live_state.walk(roots, self.lineage, self.data), None
        except live_state.CannotMove as err:
            return None, err

    def _draw_slots(self, summary: WeightSummary):
        """Global resampling's draw (``semantics.distributed``): (the plan of rows to move,
        this rank's ancestors, its first global slot); the weights are reset to equal and
        the moved rows counted."""
        v = shared_uniforms(self.resampling, self.total, self.shared)
        ranges = slot_ranges(summary, v)
        plan = TransferPlan.make(ranges, self.total)
        drawn = local_ancestors(self.log_weights, summary, self.group.rank, v, *ranges[self.group.rank])
        self.rows_moved += plan.rows_moved()
        self.log_weights = torch.zeros_like(self.log_weights)
        return plan, drawn, ranges[self.group.rank][0]

    def _resample_globally(self, summary: WeightSummary, eff, digests: list) -> None:
        """Draw this rank's slots (``semantics.distributed``); set the trace so far aside
        (``frozen``, ``ancestry``); then either append the ancestors to the lineage (no
        particle crosses a rank boundary) or move the live state's rows."""
        plan, drawn, first = self._draw_slots(summary)
        if self._walked is None:
            self._freeze_trace()
        self.ancestry.append((first, drawn + self.start))
        if not plan.moves:
            self.lineage.resample(drawn.to(self.log_weights.device))
            return
        self._move_live_state(plan, drawn, eff, digests)
        self.state_moves += 1

    def _freeze_trace(self) -> None:
        """The sites recorded since the last resampling, as rows of the population now
        (before this resampling): they stay here; rank 0 resolves them at the end."""
        self.frozen.append(self.trace.sites())
        self.trace.parts.clear()

    def _move_live_state(self, plan: TransferPlan, drawn: torch.Tensor, eff, digests: list) -> None:
        """Every per-particle value the suspended run holds gets the rows of its new
        particles, wherever they were drawn (``semantics.live_state``: walk, agree on
        the columns with the other ranks, exchange the rows, install them)."""
        group = self.group
        if self._walked is not None:
            (found, problem), self._walked = self._walked, None
        else:
            (found, problem), digests = self._walk(eff), None
        agreed = live_state.agree(_gather_views(group, found, problem, digests))
        device = self.log_weights.device
        try:
            cols, problem = live_state.columns(found, agreed, self.N, device), None
        except live_state.CannotMove as err:  # (a Python value that is not data: every rank raises it)
            cols, problem = None, err
        cols = _widened(group, cols, live_state.python_paths(agreed), problem)
        specs = [ColumnSpec(name, col.dtype, tuple(col.shape[1:])) for name, col in _column_order(agreed, cols)]
        moved = exchange_rows(group, plan, cols, specs, drawn)
        live_state.install(found, agreed, {k: c.to(device) for k, c in moved.items()}, self.lineage)


def _widened(group: Group, cols: dict | None, python: list, problem=None) -> dict:
    """Python objects' rows (JSON, ``semantics.live_values``) widened to the widest row of
    each such column over the ranks (one all_gather; none without such columns). A rank
    whose objects could not be written (``problem``: only Python columns can fail) makes
    every rank raise its error."""
    if not python:
        if problem is not None:
            raise problem
        return cols
    mine = torch.tensor([-1 if problem is not None else cols[p].shape[1] for p in python], dtype=torch.int64)
    widths = torch.stack(group.all_gather(mine, what="row widths of per-particle Python values"))
    if bool((widths < 0).any()):
        _gather_views(group, None, problem, [-1] * group.size)  # (raises the first failing rank's error)
    widths = widths.amax(0)
    return {**cols, **{p: live_values.pad(cols[p], int(w)) for p, w in zip(python, widths)}}


def _column_order(agreed: list, cols: dict) -> list:
    """(name, this rank's rows) of the moved columns, in the agreed order."""
    out = []
    for col in agreed:
        if col.alias:
            continue
        out.append((col.path, cols[col.path]))
        if col.presence:
            out.append((col.path + " present", cols[col.path + " present"]))
    return out


def _gather_views(group: Group, found, problem, digests: list | None = None) -> list:
    """Every rank's view of its live state: when every rank's digest (``digests``, from
    the status collective, or one all_gather here) is the same (the usual case), this
    rank's view for all; else the views themselves; a rank whose walk failed makes
    every rank raise its error."""
    view = None if found is None else found.view()
    code = -1 if found is None else found.digest()
    if digests is None:
        digests = group.all_gather(torch.tensor([code], dtype=torch.int64), what="live state digests")
    if code != -1 and all(int(c) == code for c in digests):
        return [view] * group.size
    views = group.all_gather_object(view if problem is None else ("cannot move", problem.message, problem.hint),
                                    what="live states")
    for v in views:
        if isinstance(v, tuple) and v and v[0] == "cannot move":
            raise live_state.CannotMove(v[1], hint=v[2])
    return views


def assemble_sites(parts: list, sizes: list[int]) -> dict:
    """Rank 0: the sites of the final global population from every rank's (frozen sites
    per resampling, final sites, ancestry): the global ancestors of resampling g are the
    ranks' drawn slots in slot order; a site recorded before resampling g is read
    through the ancestors of resamplings g, g+1, ... (composed backwards once, as the
    lineage does in one process)."""
    G = len(parts[0][0])
    ancestors = []
    for g in range(G):
        pieces = sorted((p[2][g] for p in parts), key=lambda piece: piece[0])
        ancestors.append(torch.cat([a for _, a in pieces]).long())
    lines: list = [None] * G  # lines[g]: each final particle's ancestor before resampling g
    acc = None
    for g in range(G - 1, -1, -1):
        acc = ancestors[g] if acc is None else ancestors[g].index_select(0, acc)
        lines[g] = acc
    final = merge_sites([p[1] for p in parts], sizes)
    out = {"return": final.pop("return")} if "return" in final else {}
    for g in range(G):
        for a, (col, present) in merge_sites([p[0][g] for p in parts], sizes).items():
            _add_site(out, a, _select_rows(col, lines[g]), None if present is None else present[lines[g]])
    for a, (col, present) in final.items():
        _add_site(out, a, col, present)
    return out


def _select_rows(col, sel: torch.Tensor):
    if isinstance(col, torch.Tensor):
        return col.index_select(0, sel)
    return [col[i] for i in sel.tolist()]


def _add_site(out: dict, addr: str, col, present) -> None:
    """``out[addr]``; an address recorded in two periods (by different particles) is
    one column, each particle's value where it has one."""
    if addr not in out:
        out[addr] = (col, present)
        return
    old, was = out[addr]
    n = len(col)
    was = torch.ones(n, dtype=torch.bool) if was is None else was
    now = torch.ones(n, dtype=torch.bool) if present is None else present
    if isinstance(old, torch.Tensor) and isinstance(col, torch.Tensor):
        merged = torch.where(now.reshape(-1, *([1] * (col.dim() - 1))), col.to(old.dtype), old)
    else:
        merged = [c if p else o for o, c, p in zip(list(old), list(col), now.tolist())]
    both = was | now
    out[addr] = (merged, None if bool(both.all()) else both)


def distributed_smc(interp, entry: str, data: dict, particles: int, device, group: Group,
                    shared: torch.Generator, *, resampling: str = "systematic", ess_threshold: float = 1.0,
                    label: str = "smc") -> Population | None:
    """SMC of ``particles`` particles over the group's ranks (module docstring);
    ``shared``: the resampling uniforms' generator, seeded alike on every rank. The
    ``Population`` (the single-process result type, ``extra["history"]`` included) on
    rank 0, None elsewhere."""
    sizes = _check_shards(particles, group)
    n = sizes[group.rank]
    h = None
    try:
        h = DistributedSMCHandler(n, device, None, group=group, total=particles, shared=shared,
                                  resampling=resampling, ess_threshold=ess_threshold)
        ctx = Particles.all(n, device)
        with lineage_scope(Lineage(ctx.idx)) as h.lineage:
            h.run = interp.run(entry, data, ctx)
            h.data = data
            ret = drive(h.run, h)
            final = {"return": (column(ret, ctx), None), **h.trace.sites()}
        h.run = None
        group.status(FINISHED, h.checkpoints, where="end of the run")
    except BaseException as err:
        if not _reported(err) and not isinstance(err, ZeroEvidenceError):
            group.fail(err, h.checkpoints if h is not None else 0)
        raise
    lw = h.log_weights + h.log_z
    extra = {"history": h.history, "resampling": resampling, "ess_threshold": ess_threshold,
             "rows_moved": h.rows_moved, "state_moves": h.state_moves}
    got = group.gather_object((_cpu_sites(h.frozen), _cpu_sites([final])[0], h.ancestry, lw.detach().cpu()),
                              what="gather the particles on rank 0")
    if not group.is_root:
        return None
    got = [(_from_numpy(frozen), _from_numpy([final])[0], ancestry, w) for frozen, final, ancestry, w in got]
    sites = assemble_sites(got, sizes)
    lw = torch.cat([g[3].double() for g in got])
    return Population(label, sites, lw, {**extra, "ranks": group.size, "shard_sizes": sizes})


def _cpu_sites(per_period: list[dict]) -> list[dict]:
    """Sites as numpy arrays for the gather (a numpy array pickles ~10x faster than a
    tensor: many small columns)."""
    return [{a: (_to_numpy(v), None if p is None else _to_numpy(p)) for a, (v, p) in sites.items()}
            for sites in per_period]


def _to_numpy(v):
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) and v.dtype != torch.bfloat16 else v


def _from_numpy(per_period: list[dict]) -> list[dict]:
    return [{a: (_as_tensor(v), None if p is None else _as_tensor(p)) for a, (v, p) in sites.items()}
            for sites in per_period]


def _as_tensor(v):
    import numpy as np
    return torch.from_numpy(v) if isinstance(v, np.ndarray) else v


# ---------------------------------------------------------------------- resample-move
class _DistributedResampleMove(DistributedSMCHandler):
    """Resample-move's handler on one rank's shard: global resampling whose rows are the
    traces so far (the MH moves work on traces), then the run suspends (``Suspended``)
    for the moves and the replay, as ``resample_move`` does in one process."""

    moves_live_state = False
    incoming = None  # the new population's traces (address -> values; "present ADDR" -> mask)

    def _checkpoint(self, eff):
        super()._checkpoint(eff)
        if self.history[-1].resampled:
            raise Suspended(eff)

    def _resample_globally(self, summary: WeightSummary, eff, digests: list) -> None:
        group = self.group
        plan, drawn, _ = self._draw_slots(summary)
        columns = {}
        for a, (col, present) in self.trace.sites().items():
            columns[a] = col
            columns["present " + a] = torch.ones(self.N, dtype=torch.bool) if present is None else present
        if plan.moves:
            specs = agree_on_columns(group, columns)
            moved = exchange_rows(group, plan, columns, specs, drawn)
        else:
            sel = drawn.to(self.log_weights.device)
            moved = {a: (_select_rows(col, sel)) for a, col in columns.items()}
        self.incoming = {a: (c.to(self.log_weights.device) if isinstance(c, torch.Tensor) else c)
                         for a, c in moved.items()}


def distributed_resample_move(interp, entry: str, data: dict, particles: int, device, group: Group,
                              shared: torch.Generator, *, resampling: str = "systematic",
                              ess_threshold: float = 1.0, moves: int | None = None, kernel: str = "prior",
                              scale: float = 0.5, adapt: bool = False, max_moves: int = 100,
                              decorrelation: float = 0.1) -> Population | None:
    """Resample-move SMC (``inference.resample_move``, single-site moves) over the ranks:
    SMC's global resampling (rows: the traces so far, moved where particles cross ranks),
    then on each rank the MH moves of its particles at the k-th target (each particle's
    kernel is the single-process one, so the algorithm is the single-process one in
    law) and its shard rebuilt by replaying the moved traces (O(k) per rejuvenation, as
    in one process). ``adapt=True``: the population walk (``population_moves``) with the
    statistics of every rank's particles (``RankPool``). Rank 0 gets the population
    (acceptance: the mean over all particles), None elsewhere."""
    from ..semantics import gfi
    from . import mh as mh_mod
    from . import token_moves
    from .rejuvenation import MoveKernel
    from .resample_move import drive_rebuilding
    if kernel in token_moves.KERNELS:
        raise PPLRuntimeError(f"resample_move with kernel '{kernel}' (moves on language-model choices) has no "
                              "distributed form yet", hint="run it in one process")
    move = MoveKernel("resample_move", adapt=adapt, kernel=kernel,
                      moves=1 if moves is None and not adapt else moves, scale=scale, max_moves=max_moves,
                      decorrelation=decorrelation)
    pool = RankPool(group, particles)
    if not move.active:  # (no moves: SMC)
        return distributed_smc(interp, entry, data, particles, device, group, shared, resampling=resampling,
                               ess_threshold=ess_threshold, label="resample_move")
    sizes = _check_shards(particles, group)
    n = sizes[group.rank]
    h = None
    randomness = mh_mod.TorchMHRandomness()
    try:
        h = _DistributedResampleMove(n, device, None, group=group, total=particles, shared=shared,
                                     resampling=resampling, ess_threshold=ess_threshold)

        def rejuvenated():  # the new population's traces, moved at the k-th target
            model = gfi.ModelRun(interp, entry, data, device, stop_after=h.checkpoints)
            incoming, h.incoming = h.incoming, None
            values = {a: c for a, c in incoming.items() if not a.startswith("present ")}
            for a, c in values.items():
                if not isinstance(c, torch.Tensor):
                    raise PPLRuntimeError(f"resample-move supports numeric choices only ('{a}' is not)")
            present = {a: incoming["present " + a].bool() for a in values}
            state = gfi.TracedState(values, present, {}, torch.zeros(n, dtype=torch.float64, device=device), None)
            label = f"resample_move (checkpoint {h.checkpoints})"
            if adapt:  # (the population walk, its statistics over every rank)
                return _adaptive_moves(move, model, state, randomness, pool, None, label).values
            state = move.begin(model, state, randomness, scored=False)
            return move(model, state, randomness, label=label).values

        sites = drive_rebuilding(interp, entry, data, h, n, device, rejuvenated)
        group.status(FINISHED, h.checkpoints, where="end of the run")
    except BaseException as err:
        if not _reported(err) and not isinstance(err, ZeroEvidenceError):
            group.fail(err, h.checkpoints if h is not None else 0)
        raise
    lw = h.log_weights + h.log_z
    if adapt:  # (acceptances and the rest already over every rank: RankPool)
        extra = {"history": h.history, "acceptance": move.acceptance, **move.extra(), "rows_moved": h.rows_moved}
        return gather_population(group, "resample_move", sites, lw, extra, sizes)
    rates = group.all_gather_object(move.acceptance, what="acceptance rates")
    acceptance = [None if any(r[i] is None for r in rates) else sum(r[i] * m for r, m in zip(rates, sizes)) / particles
                  for i in range(len(rates[0]))]
    extra = {"history": h.history, "acceptance": acceptance, "moves": move.moves, "rows_moved": h.rows_moved}
    return gather_population(group, "resample_move", sites, lw, extra, sizes)


# ---------------------------------------------------------------------- chains across ranks
#: NUTS/HMC extras that are counts (summed over ranks), per-chain lists (concatenated) and
#: per-chain means (averaged with the chains as weights)
_SUMMED = ("divergences", "warmup_divergences", "leapfrog_steps")
_PER_CHAIN = ("divergences_per_chain", "step_size", "bfmi")
_CHAIN_MEAN = ("tree_depth_mean", "hit_max_tree_depth")


def merge_chains(parts: list, components: bool) -> Chains:
    """The ``Chains`` of every rank as one: chains in rank order (each rank's draws are
    chain-major, so the concatenation is too), the acceptance rate averaged over the
    chains, split R-hat and ESS computed again over *all* chains
    (``diagnostics.site_diagnostics``), NUTS's counts summed and per-chain statistics
    concatenated. Other extras are rank 0's (MH's adapted scales are pooled over every
    rank's chains when frozen: ``chain_pool``), with ``chains_per_rank``."""
    S = parts[0].draws
    if any(p.draws != S for p in parts):
        raise PPLRuntimeError(f"the ranks kept different numbers of draws ({[p.draws for p in parts]})")
    sizes = [p.chains for p in parts]
    C = sum(sizes)
    sites = merge_sites([p.sites for p in parts], [c * S for c in sizes])
    rate = sum(p.acceptance_rate * p.chains for p in parts) / C
    r_hat, ess = site_diagnostics(sites, C, S, components=components)
    extra = dict(parts[0].extra)
    for key in _SUMMED:
        if key in extra:
            extra[key] = sum(p.extra[key] for p in parts)
    for key in _PER_CHAIN:
        if key in extra:
            extra[key] = [x for p in parts for x in p.extra[key]]
    for key in _CHAIN_MEAN:
        if key in extra:
            extra[key] = sum(p.extra[key] * p.chains for p in parts) / C
    if "draw_stats" in extra:  # per draw, [chains, S] each
        extra["draw_stats"] = {k: torch.cat([p.extra["draw_stats"][k] for p in parts]) for k in extra["draw_stats"]}
    extra.update(ranks=len(parts), chains_per_rank=sizes)
    return Chains(parts[0].method, sites, C, S, rate, r_hat, ess, extra)


def _to_cpu(chains: Chains) -> Chains:
    sites = {a: (v.detach().cpu() if isinstance(v, torch.Tensor) else v, None if p is None else p.detach().cpu())
             for a, (v, p) in chains.sites.items()}
    return Chains(chains.method, sites, chains.chains, chains.draws, chains.acceptance_rate, chains.r_hat,
                  chains.ess, chains.extra)


def distributed_chains(run, chains: int, group: Group, *, components: bool) -> Chains | None:
    """Markov chains across ranks: rank r runs ``run(c_r)`` (the single-process method
    with its share c_r of the ``chains``, ``shard``), independent of the others (its own
    random stream); rank 0 gathers them (``merge_chains``; diagnostics over all chains).
    Each chain is exactly a chain of the single-process method (same kernel, same
    adaptation within the chain's own rank). None on the other ranks."""
    sizes = _check_shards(chains, group)
    try:
        with chains_shared_with(group):  # (what the method pools over chains, it pools over every rank's)
            local = run(sizes[group.rank])
        group.status(FINISHED, 0, where="end of the chains")
    except BaseException as err:
        if not _reported(err):
            group.fail(err, 0)
        raise
    got = group.gather_object(_to_cpu(local), what="gather the chains on rank 0")
    return merge_chains(got, components) if group.is_root else None


# ---------------------------------------------------------------------- tempering
def global_next_beta(group: Group, beta: float, log_lik: torch.Tensor, target: float, N: int,
                     step: int, tol: float = 1e-6) -> float:
    """``tempering.next_beta`` with the ESS of the incremental weights over all ranks
    (one status collective per trial beta; every rank takes the same bisection path, as
    the ESS is the same float on every rank)."""
    def ess_fraction(b: float) -> float:
        rows = group.status(AT_CHECKPOINT, step, *local_summary((b - beta) * log_lik), where="tempering: next beta")
        s = WeightSummary.combine([r[2:5] for r in rows], N)
        return s.ess / N if s.S > 0 else 0.0
    if ess_fraction(1.0) >= target:
        return 1.0
    lo, hi = beta, 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if ess_fraction(mid) >= target:
            lo = mid
        else:
            hi = mid
    return max(lo, beta + tol)


def _state_columns(state) -> dict:
    """A ``TracedState``'s per-chain rows as named columns (what a resampling moves)."""
    cols = {"log_joint": state.log_joint, "return": state.ret}
    if state.log_lik is not None:
        cols["log_lik"] = state.log_lik
    for a in state.values:
        cols[f"value {a}"] = state.values[a]
        cols[f"present {a}"] = state.present[a]
        if a in state.site_lp:
            cols[f"log prior {a}"] = state.site_lp[a]
    return cols


def _state_from_columns(cols: dict, like):
    from ..semantics.gfi import TracedState
    addrs = [k[len("value "):] for k in cols if k.startswith("value ")]
    return TracedState({a: cols[f"value {a}"] for a in addrs}, {a: cols[f"present {a}"].bool() for a in addrs},
                       {a: cols[f"log prior {a}"] for a in addrs if f"log prior {a}" in cols},
                       cols["log_joint"], cols["return"], cols.get("log_lik"), like.beta, like.stop_after)


class RankPool:
    """``population_moves``' statistics over every rank's particles (the methods of its
    single-process pool, ``ONE_PROCESS``, with collectives in rank order), so that the
    adaptive moves shape, scale and stop their walk by the whole population, and every
    rank takes the same decisions."""

    def __init__(self, group: Group, total: int):
        self.group, self.total = group, total

    def _gathered(self, t: torch.Tensor, what: str) -> list[torch.Tensor]:
        return self.group.all_gather(t.detach().double().cpu().contiguous(), what=what)

    def _sum(self, t: torch.Tensor, what: str) -> torch.Tensor:
        parts = self._gathered(t, what)
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out

    def particles(self, n: int) -> int:
        return self.total

    def mean(self, x: torch.Tensor) -> float:
        s = self._sum(torch.tensor([float(x.double().sum()), float(x.numel())]), "population mean")
        return float(s[0] / s[1])

    def any(self, flag: bool) -> bool:
        return bool(self._sum(torch.tensor([float(flag)]), "population any")[0] > 0)

    def block(self, addresses: tuple) -> tuple:
        every = self.group.all_gather_object(tuple(addresses), what="the block of the walk")
        return tuple(a for a in every[0] if all(a in other for other in every[1:]))

    def max_correlation(self, start: torch.Tensor, now: torch.Tensor) -> float:
        """``population_moves.max_correlation`` over every rank's particles: means, then
        the centred sums and maxima (two collectives)."""
        good = torch.isfinite(start).all(1) & torch.isfinite(now).all(1)
        a, b = start[good].double(), now[good].double()
        F = a.shape[1]
        first = self._sum(torch.cat([torch.tensor([float(a.shape[0])], dtype=torch.float64), a.sum(0), b.sum(0)]),
                          "correlation means")
        n = float(first[0])
        if n < 3 or F == 0:
            return 0.0
        a, b = a - first[1:1 + F] / n, b - first[1 + F:] / n
        sums = self._sum(torch.cat([a.pow(2).sum(0), b.pow(2).sum(0), (a * b).sum(0)]), "correlation sums")
        peaks = self._gathered(torch.cat([a.abs().amax(0) if a.shape[0] else torch.zeros(F, dtype=torch.float64),
                                          b.abs().amax(0) if b.shape[0] else torch.zeros(F, dtype=torch.float64)]),
                               "correlation maxima")
        peak = torch.stack(peaks).amax(0)
        sa, sb, sab = sums[:F].sqrt(), sums[F:2 * F].sqrt(), sums[2 * F:]
        tiny = 1e-12 * torch.maximum(peak[:F], peak[F:]).clamp(min=1e-300)
        varies = (sa > tiny * math.sqrt(n)) & (sb > tiny * math.sqrt(n))
        if not bool(varies.any()):
            return 0.0
        return float((sab[varies] / (sa[varies] * sb[varies])).max())

    def covariance(self, flat: torch.Tensor, log_weights: torch.Tensor | None) -> torch.Tensor:
        """``population_moves.population_covariance`` over every rank's particles."""
        C, D = flat.shape
        lw = torch.zeros(C, dtype=torch.float64) if log_weights is None else log_weights.double().cpu()
        x = flat.double().cpu()
        good = torch.isfinite(x).all(1) & torch.isfinite(lw)
        x, lw = x[good], lw[good]
        top = torch.stack(self._gathered(torch.tensor([float(lw.max()) if lw.numel() else -math.inf]), "max weight"))
        M = float(top.max())
        if not math.isfinite(M):
            return torch.eye(D, dtype=torch.float64, device=flat.device)
        w = torch.exp(lw - M)
        first = self._sum(torch.cat([w.sum().reshape(1), (w[:, None] * x).sum(0)]), "weighted mean")
        mean = first[1:] / first[0]
        dx = x - mean
        cov = self._sum(((w[:, None] * dx).T @ dx).reshape(-1), "weighted covariance").reshape(D, D) / first[0]
        return cov.to(flat.device)


def distributed_tempering(interp, entry: str, data: dict, particles: int, device, group: Group,
                          shared: torch.Generator, *, target_ess: float = 0.5, moves: int | None = None,
                          kernel: str = "rw", scale: float = 0.5, resampling: str = "systematic",
                          max_steps: int = 1000, schedule: list | None = None, adapt: bool = False,
                          max_moves: int = 100, decorrelation: float = 0.1) -> Population | None:
    """Tempered SMC (``inference.tempering``) over the ranks: the next beta by bisection
    on the *global* ESS of the incremental weights, the evidence from the global mean
    weight, global resampling (``semantics.distributed``) whose moved rows are the
    traces' columns (values, presence, log densities: a ``TracedState`` is its rows, no
    replay needed), then the moves on each rank's particles: single-site MH (each
    particle's kernel is the single-process one), or with ``adapt=True`` (kernel "rw")
    the population walk whose covariance, scale and stopping rule use the statistics of
    every rank's particles (``RankPool``), so the algorithm is the single-process one in
    law. Default ``moves``: ``default_moves`` of the mean trace size over all ranks (not
    with ``adapt``). Rank 0 gets the population."""
    from ..semantics.gfi import ModelRun, reindex, simulate, update
    from . import population_moves as pm
    from .randomness import TorchRandomness
    from .rejuvenation import MoveKernel
    from .tempering import _checked, default_moves
    sizes = _check_shards(particles, group)
    n = sizes[group.rank]
    steps = 0
    try:
        if resampling not in GLOBAL_SCHEMES:
            raise PPLRuntimeError(f"resampling '{resampling}' has no distributed form yet",
                                  hint=f"with distributed=True choose from: {', '.join(GLOBAL_SCHEMES)}")
        schedule = _checked(target_ess, schedule)
        fixed = iter(schedule) if schedule is not None else None
        randomness = TorchRandomness()
        model = ModelRun(interp, entry, data, device)
        state = simulate(model.at(beta=0.0), n, randomness)
        rows = group.status(AT_CHECKPOINT, 0, *local_summary(state.log_lik), where="tempering: prior draws")
        if not math.isfinite(WeightSummary.combine([r[2:5] for r in rows], particles).M):
            raise ZeroEvidenceError("tempering: every prior draw has zero likelihood (on every rank)",
                                    hint="the data or conditions may be impossible under the prior; run in one "
                                         "process to locate the site")
        if adapt and kernel != "rw":
            raise PPLRuntimeError(f"tempering with adapt=True and kernel '{kernel}' has no distributed form yet",
                                  hint="with distributed=True and adapt=True use kernel='rw'")
        if moves is None and not adapt:
            total = group.all_gather(torch.tensor([float(state.sizes.sum())], dtype=torch.float64), what="sizes")
            moves = default_moves(sum(float(t) for t in total) / particles)
        move = MoveKernel("tempering", adapt=adapt, kernel=kernel, moves=moves, scale=scale, max_moves=max_moves,
                          decorrelation=decorrelation)
        pool = RankPool(group, particles)
        if adapt:
            state, move.coords = pm.coordinates(model.at(beta=0.0), state, randomness, pool)
        log_z, betas, ess_history, rows_moved = 0.0, [0.0], [], 0
        for _ in range(max_steps):
            beta = state.beta
            if beta >= 1.0:
                break
            steps += 1
            b = next(fixed) if fixed is not None else \
                global_next_beta(group, beta, state.log_lik, target_ess, particles, steps)
            state, inc = update(model.at(beta=b), state)
            rows = group.status(AT_CHECKPOINT, steps, *local_summary(inc), where=f"tempering step {steps}")
            summary = WeightSummary.combine([r[2:5] for r in rows], particles)
            if not math.isfinite(summary.M):
                raise ZeroEvidenceError("tempering: every particle has zero weight (on every rank)")
            log_z += summary.log_mean
            ess_history.append(summary.ess)
            covariance = None
            if adapt and move.coords.flat().shape[1]:  # (the walk's shape: the weighted population before)
                covariance = pool.covariance(move.coords.flat(), inc)
            v = shared_uniforms(resampling, particles, shared)
            ranges = slot_ranges(summary, v)
            plan = TransferPlan.make(ranges, particles)
            drawn = local_ancestors(inc, summary, group.rank, v, *ranges[group.rank])
            rows_moved += plan.rows_moved()  # (the plan is the same on every rank)
            if plan.moves:
                columns = _state_columns(state)
                specs = agree_on_columns(group, columns)
                state = _state_from_columns(
                    {k: c.to(device) for k, c in exchange_rows(group, plan, columns, specs, drawn).items()}, state)
            else:
                state = reindex(state, drawn.to(device))
            betas.append(b)
            if adapt:
                state = _adaptive_moves(move, model.at(beta=b), state, randomness, pool, covariance,
                                        f"tempering (step {len(betas) - 1}, beta={b:.3g})")
            else:
                state = move(model.at(beta=b), state, randomness)
        else:
            raise PPLRuntimeError(f"tempering did not reach beta = 1 in {max_steps} steps")
        group.status(FINISHED, steps, where="end of the run")
    except BaseException as err:
        if not _reported(err) and not isinstance(err, ZeroEvidenceError):
            group.fail(err, steps)
        raise
    sites = {"return": (state.ret, None)}
    for a, val in state.values.items():
        sites[a] = (val, None if bool(state.present[a].all()) else state.present[a])
    lw = torch.full((n,), float(log_z), dtype=torch.float64)
    extra = {"schedule": betas, "moves": moves, "ess_history": ess_history, "rows_moved": rows_moved}
    if adapt:
        extra.update(move.extra())
    return gather_population(group, "tempering", sites, lw, extra, sizes)


def _adaptive_moves(move, model, state, randomness, pool: RankPool, covariance, label: str):
    """``population_moves.move_population`` on the resampled population (its coordinates
    computed again here, as its rows may have come from other ranks), with the pool's
    statistics; the report kept in ``move`` as ``MoveKernel`` does."""
    from . import population_moves as pm
    state, coords = pm.coordinates(model, state, randomness, pool)
    state, move.coords, report = pm.move_population(model, state, coords, randomness, move.tuning,
                                                    covariance=covariance, moves=move.moves,
                                                    max_moves=move.max_moves, decorrelation=move.decorrelation,
                                                    label=label, pool=pool)
    move.reports.append(report)
    move.acceptance.append(report.block_acceptance if report.block_acceptance is not None
                           else report.site_acceptance)
    return state
