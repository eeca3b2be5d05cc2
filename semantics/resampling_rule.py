"""The run kit's SMC checkpoint rule: resampling at synchronisation points.

``SMCHandler`` is a ``Weighting`` (``semantics.sampling``) whose chooser is
``prior(randomness)`` and whose checkpoint rule is: at a checkpoint the whole population
reaches at once (a synchronisation point), check the weights and, when the ESS falls below
``ess_threshold * N`` (or always, for threshold 1), keep the mean weight in ``log_z`` and
resample by appending the ancestor indices to the run's ``Lineage`` (a resampling scheme
of ``semantics.resampling``). Checkpoints inside branches taken by only some particles just
accumulate weight. Each synchronisation point leaves a ``StepRecord`` in ``history``.

``inference.smc`` composes it into SMC (``smc``: drive it inside the run's
``lineage_scope``) and re-exports both names; variants replace one piece: the selection
(``_resample``: ``inference.steer``), the chooser (a guide: ``inference.amortized``), or
the rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..stdlib.progress import NO_BAR
from .errors import PPLRuntimeError, ZeroEvidenceError
from .randomness import TorchRandomness
from .resampling import SCHEMES, log_mean_exp, normalised_draw
from .sampling import Weighting, prior
from .values import Batched, Lineage, rows


@dataclass
class StepRecord:
    """What happened at one synchronisation checkpoint."""
    address: str
    ess: float
    resampled: bool
    log_evidence: float  # running estimate after this step


class SMCHandler(Weighting):
    """Prior draws through ``randomness`` (the kit's ``prior`` chooser), and at each
    checkpoint the resampling rule ``_checkpoint``."""

    def __init__(self, N: int, device, lineage: Lineage, *, resampling: str = "systematic",
                 ess_threshold: float = 1.0, randomness=None):
        if resampling not in SCHEMES:
            raise PPLRuntimeError(f"unknown resampling scheme '{resampling}'",
                                  hint=f"choose from: {', '.join(SCHEMES)}")
        self.randomness = randomness or TorchRandomness()
        super().__init__(N, device, torch.float64, choose=prior(self.randomness))
        self.N = N
        self.lineage = lineage
        self.resampling = resampling
        self.ess_threshold = float(ess_threshold)
        self.log_z = 0.0  # log of the product of mean weights at resampling steps
        self.history: list[StepRecord] = []
        self.bar = NO_BAR  # a progress counter of synchronisation checkpoints (``smc(progress=...)``)

    _unchecked = None  # (log weights before, log density) of an observe whose NaN test is pending

    def observe(self, eff):
        """``Weighting.observe``; at a synchronisation point its NaN test waits for the
        checkpoint's one sync (a NaN log density makes the maximum weight NaN)."""
        if eff.ctx.idx.shape[0] != self.N:  # (= eff.ctx.M, without a property call)
            return Weighting.observe(self, eff)
        lp = self.log_prob(eff.dist, eff.value, eff.ctx, eff)
        self._unchecked = (self.log_weights, lp)
        try:
            self.add(eff.ctx, lp)
            self._checkpoint(eff)
        finally:
            self._unchecked = None

    _unchecked_factor = None  # the log weights before a factor whose NaN/+inf tests are pending

    def factor(self, eff):
        """``Weighting.factor``; at a synchronisation point its NaN and +inf tests wait for
        the checkpoint's one sync: either in the factor makes the maximum weight NaN or
        +inf, and then the factor is weighed again from the weights before it, through
        ``Weighting``'s tests (the same weights, or the same error). (Not for a subclass
        with its own checkpoint rule, which would not know of the pending tests.)"""
        v = eff.value
        if type(v) is not Batched or eff.ctx.idx.shape[0] != self.N or \
                type(self)._checkpoint is not SMCHandler._checkpoint:
            return Weighting.factor(self, eff)
        lp = rows(v, eff.ctx)
        if lp.dim() != 1:
            return Weighting.factor(self, eff)  # (its error)
        self._unchecked_factor = self.log_weights
        try:
            self.add(eff.ctx, lp)  # (= lp.to(float64) first: the add's own promotion is exact)
            self._checkpoint(eff)
        finally:
            self._unchecked_factor = None

    def _weighed(self):
        """(log weights, exp(lw - max), their sum, and as floats: the max, the ESS and
        log_mean_exp(lw)): one exp serves the ESS, the evidence and the normalised weights.
        The three numbers come back in one sync (three reads on the CPU) and the scalar
        arithmetic is done on Python floats (float64, as the tensors were): a torch op on
        a 0-d tensor costs a few us, one with a Python number (``s ** 2``, ``s / n``)
        about 9 us on CPU."""
        lw = self.log_weights
        m = lw.max()
        w = torch.exp(lw - m)
        s = w.sum()
        w2 = torch.dot(w, w)  # = (w * w).sum(), one op
        if lw.device.type == "cpu":  # a CPU tensor's item() is a plain read: three cost less than a stack
            m_f, s_f, w2_f = m.item(), s.item(), w2.item()
        else:  # one transfer from the device
            m_f, s_f, w2_f = torch.stack([m, s, w2]).tolist()
        # not finite (every weight zero, or a NaN): m_f says so, and the caller stops there
        ess = s_f * s_f / w2_f if w2_f > 0 else math.nan
        lme = m_f + math.log(s_f / lw.shape[0]) if s_f > 0 else math.nan
        return lw, w, s, m_f, ess, lme

    def _checkpoint(self, eff):
        """The resampling rule: at a synchronisation point, when the ESS is below the
        threshold, keep the mean weight in ``log_z`` and resample (or select, for a
        weighted resampler) by appending the ancestors to the run's lineage."""
        if eff.ctx.idx.shape[0] != self.N:  # (= eff.ctx.M, without a property call)
            return  # only some particles are here: not a synchronisation point
        lw, w, s, m_f, ess, lme = self._weighed()
        if math.isnan(m_f) and self._unchecked is not None:  # the observe's NaN test, now
            before, lp = self._unchecked
            self._unchecked = None
            self.log_weights = before
            nan = isinstance(lp, torch.Tensor) and bool(torch.isnan(lp).any())
            self.add(eff.ctx, self._nan_observation(lp, eff) if nan else lp)
            lw, w, s, m_f, ess, lme = self._weighed()
        elif not math.isfinite(m_f) and self._unchecked_factor is not None:  # the factor's tests, now
            self.log_weights = self._unchecked_factor
            self._unchecked_factor = None
            self.add(eff.ctx, self._factor_log_weight(eff))
            lw, w, s, m_f, ess, lme = self._weighed()
        if not math.isfinite(m_f):  # same test as torch.isfinite(m)
            raise ZeroEvidenceError("every particle has weight zero at this checkpoint", eff.span,
                                    "the observation/condition may be impossible, or too unlikely for "
                                    f"{self.N} particles")
        resample = ess < self.ess_threshold * self.N or self.ess_threshold >= 1.0
        if resample:
            self.log_z += lme
            ancestors = self._resample(lw, w, s)
            new_lw = None
            if isinstance(ancestors, tuple):  # a weighted resampler: (ancestors, new log weights)
                ancestors, new_lw = ancestors
            self.lineage.resample(ancestors)
            self.log_weights = self._zero_weights(lw) if new_lw is None else new_lw.to(lw.dtype)
            lme = 0.0 if new_lw is None else log_mean_exp(self.log_weights)
        self.history.append(StepRecord(eff.addr, ess, resample, self.log_z + lme))
        if self.bar is not NO_BAR:
            self.bar.set_postfix_str(f"ESS {ess:.0f}/{self.N}", refresh=False)
            self.bar.update(1)

    _zeros = None  # this run's all-zero log weights (one tensor, reused: see _zero_weights)

    def _zero_weights(self, lw):
        """All-zero log weights like ``lw``: one tensor per handler, made once and handed out
        after every resampling (no update writes into the log weights: each makes a new
        tensor), instead of a ``zeros_like`` per step."""
        z = self._zeros
        if z is None or z.shape != lw.shape or z.dtype != lw.dtype or z.device != lw.device:
            z = self._zeros = torch.zeros_like(lw)
        return z

    def _resample(self, lw, w, s):
        """The ancestor indices (N of them) for log weights ``lw`` (``w = exp(lw - max)``,
        ``s = w.sum()``), or a pair (ancestors, new log weights) from a *weighted*
        resampler, whose contract is E[(1/n) sum_k exp(lw'_k) f(x_{a_k})] = sum_i
        (w_i / s) f(x_i): the new weights multiply the evidence accumulated so far (an
        unweighted scheme's are all 0). Subclasses override this to select differently
        (``inference.steer``)."""
        if type(self.randomness) is TorchRandomness:
            # what TorchRandomness.resample computes, without normalising again
            if self.randomness.generator is None:  # the run's generators: nothing to switch to
                return normalised_draw(SCHEMES[self.resampling], w, s, self.N)
            with self.randomness.drawing():
                return normalised_draw(SCHEMES[self.resampling], w, s, self.N)
        return self.randomness.resample(lw, self.resampling, self.N)
