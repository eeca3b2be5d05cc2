"""Sequential Monte Carlo over a program's checkpoints.

The population runs as one batch; every ``observe``/``factor``/``condition`` is a
*checkpoint*. At a checkpoint reached by the whole population at once (a synchronisation
point: no particle is inside a branch the others skipped), the weights are checked and,
when the ESS falls below ``ess_threshold * N`` (or always, for threshold 1), the
population is resampled. Checkpoints inside branches taken by only some particles just
accumulate weight until the next synchronisation point; this is the "align by
checkpoint" of DESIGN.md in the form that keeps the control state of all particles
identical whenever they are resampled. Resampling rewrites nothing eagerly: it appends
the ancestor indices to the run's ``Lineage`` and every batched value catches up when
next read (see ``semantics.values``).

As a composition of the run kit (``semantics.sampling``): ``SMCHandler``
(``semantics.resampling_rule``, re-exported here) is a ``Weighting`` whose chooser is
``prior(randomness)`` and whose checkpoint rule is resampling at synchronisation points;
``smc`` drives it inside the run's ``lineage_scope``. Variants replace one piece: the
selection (``_resample``: ``inference.steer``), the chooser (a guide:
``inference.amortized``), or the rule.

Invariant: the final weighted population is proper for the program's unnormalised
measure: E[Z_hat * sum_i w_i f(x_i)] = Z * E_post[f], with Z_hat = prod over resampling
steps of the mean weight, times the final mean weight (so exp(log_evidence) is unbiased).
The exact checker (testing/validity.py) verifies this by enumerating every draw
of the algorithm on small programs.
"""
from __future__ import annotations

from ..semantics.interpreter import Interpreter
from ..semantics.resampling_rule import SMCHandler, StepRecord  # noqa: F401  (the rule; re-exported)
from ..semantics.sampling import column, drive
from ..semantics.trace import Trace
from ..semantics.values import Lineage, Particles, lineage_scope
from ..stdlib.progress import NO_BAR, progress_bar
from .population import Population


def smc(interp: Interpreter, entry: str, data: dict, particles: int, device="cpu", *,
        resampling: str = "systematic", ess_threshold: float = 1.0, randomness=None,
        handler_cls=None, progress: bool | None = None, label: str = "smc", keep=None):
    """Run SMC: a ``Population`` (it unpacks to (sites, log_weights, handler)) whose log
    weights include the evidence accumulated at resampling steps, so that log-mean-exp of
    them is the log-evidence estimate and their normalisation the final particle weights.
    ``progress`` (``stdlib.progress``): a counter of synchronisation checkpoints named
    ``label``, with the ESS at the last one (their number is not known in advance).
    ``keep``: the sites to keep (``semantics.trace``): a list of addresses and/or
    "return"; None or "all": every site; "auto" (the ``smc`` method's default): every
    site for small runs, the return value and the last address of each choice name
    past ``trace.KEEP_ALL_LIMIT`` recorded values (``h.trace.dropped`` lists the rest)."""
    ctx = Particles.all(particles, device)
    with lineage_scope(Lineage(ctx.idx)) as lineage:
        h = (handler_cls or SMCHandler)(particles, device, lineage, resampling=resampling,
                                        ess_threshold=ess_threshold, randomness=randomness)
        h.trace = Trace(particles, device, keep=keep)
        with progress_bar(progress, desc=label, unit=" checkpoints") as h.bar:
            ret = drive(interp.run(entry, data, ctx), h)
        h.bar = NO_BAR
        sites = {**({"return": (column(ret, ctx), None)} if h.trace.keeps("return") else {}), **h.trace.sites()}
    lw = h.log_weights + h.log_z
    extra = {"history": h.history, "resampling": resampling, "ess_threshold": ess_threshold,
             **({"dropped_sites": h.trace.dropped} if h.trace.dropped else {})}
    return Population(label, sites, lw, extra, legacy=(sites, lw, h))
