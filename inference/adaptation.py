"""Stan-style warm-up for the gradient kernels: a step size by dual averaging and an
inverse mass matrix from the chain's own draws, each chain adapting its own (as NumPyro's
vectorised chains do).

Pure tensor arithmetic on C chains at once: nothing here evaluates a potential (the
kernels and the driver live in ``inference/hmc.py``). The pieces follow Stan's
``stepsize_adaptation``, ``windowed_adaptation`` and ``welford_var_estimator`` /
``welford_covar_estimator`` line by line:

* ``DualAveraging``: Nesterov's dual averaging of log(step size) towards a target mean
  acceptance statistic (Hoffman and Gelman 2014, Algorithm 5; gamma=0.05, t0=10,
  kappa=0.75, mu = log(10 eps0)).
* ``Welford``: a running (co)variance per chain, regularised as Stan does:
  (n/(n+5)) var + 1e-3 (5/(n+5)).
* ``warmup_windows``: the iterations at which a slow window ends (init buffer 75, windows
  doubling from 25, term buffer 50; for a warm-up shorter than 150 iterations the
  buffers are 15% / 10% of it and one window fills the rest; under 20 iterations no mass
  matrix is adapted).
* ``WindowedAdaptation``: the three combined, iteration by iteration.

Invariant of the whole: adaptation only happens during warm-up; afterwards the step size
and the mass matrix are fixed, so the kept chain runs an exactly invariant kernel.
"""
from __future__ import annotations

import math

import numpy as np
import torch


class DualAveraging:
    """Dual averaging of the log step size, one per chain ([C] tensors).

    ``update(accept_stat)`` after each warm-up transition returns the step size to use
    next (exp(x)); ``final()`` the step size to keep after warm-up (exp(x_bar)).

    The iterates (mu, s_bar, x, x_bar) are float64 numpy arrays on the host: the same
    IEEE operations in the same order as on tensors (so the same bits), at a fraction of
    the per-operation cost on [C]-sized vectors; exp (and log at a restart) run in torch
    on the step size's device, as before."""

    def __init__(self, step_size: torch.Tensor, target_accept: float = 0.8, *, gamma: float = 0.05,
                 t0: float = 10.0, kappa: float = 0.75):
        self.target = float(target_accept)
        self.gamma, self.t0, self.kappa = float(gamma), float(t0), float(kappa)
        self.restart(step_size)

    def restart(self, step_size: torch.Tensor) -> None:
        """Start again from ``step_size`` [C] (mu = log(10 step_size)), as Stan does after
        each mass matrix update."""
        step_size = step_size.to(torch.float64)
        self.device = step_size.device
        self.mu = _host(torch.log(10 * step_size))
        self.counter = 0
        self.s_bar = np.zeros(self.mu.shape)
        self.x_bar = np.zeros(self.mu.shape)
        self.x = _host(torch.log(step_size))

    def update(self, accept_stat: torch.Tensor) -> torch.Tensor:
        """Learn from one transition's acceptance statistic [C] (NaN counts as 0);
        returns the next step size [C]."""
        stat = _host(accept_stat.to(torch.float64))
        self.counter += 1
        eta = 1.0 / (self.counter + self.t0)
        x_eta = self.counter ** (-self.kappa)
        # torch.nan_to_num(stat, nan=0.0).clamp(max=1.0): +-inf -> +-largest, clamped; NaN -> 0
        stat = np.minimum(np.maximum(stat, -_LARGEST), 1.0)
        stat = np.where(stat == stat, stat, 0.0)
        # (no overflow for the kernels' statistics, which lie in [0, 1]; numpy would warn of one
        # where the tensors overflowed silently)
        self.s_bar = (1 - eta) * self.s_bar + eta * (self.target - stat)
        self.x = self.mu - self.s_bar * (math.sqrt(self.counter) / self.gamma)
        self.x_bar = (1 - x_eta) * self.x_bar + x_eta * self.x
        return self._exp(self.x)

    def current(self) -> torch.Tensor:
        """The step size of the latest iterate, exp(x) [C]."""
        return self._exp(self.x)

    def final(self) -> torch.Tensor:
        """The step size to keep, exp(x_bar) [C] (the current one before any update)."""
        return self._exp(self.x_bar if self.counter else self.x)

    def _exp(self, x: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(x))  # (a 0-d step size's iterates are numpy scalars)
        return (x if self.device.type == "cpu" else x.to(self.device)).exp()


_LARGEST = float(np.finfo(np.float64).max)


def _host(t: torch.Tensor) -> np.ndarray:
    """A float64 tensor's values as a numpy array on the host (shared with a CPU tensor)."""
    if t.requires_grad:
        t = t.detach()
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


class Welford:
    """Running mean and (co)variance of C chains' draws z [C, D] (float64). On the CPU the
    running sums are numpy arrays (the same IEEE operations in the same order as on
    tensors, so the same bits, at a fraction of the per-operation cost); on another device
    they stay tensors there."""

    def __init__(self, C: int, D: int, *, dense: bool = False, device=None, shrink_towards=None):
        self.C, self.D, self.dense, self.device = C, D, dense, device
        self.on_host = torch.device(device if device is not None else "cpu").type == "cpu"
        self.shrink_towards = shrink_towards  # None: the identity (Stan's)
        self.reset()

    def reset(self) -> None:
        self.n = 0
        shape = (self.C, self.D, self.D) if self.dense else (self.C, self.D)
        if self.on_host:
            self.mean, self.m2 = np.zeros((self.C, self.D)), np.zeros(shape)
        else:
            self.mean = torch.zeros(self.C, self.D, dtype=torch.float64, device=self.device)
            self.m2 = torch.zeros(shape, dtype=torch.float64, device=self.device)

    def update(self, z: torch.Tensor) -> None:
        self.n += 1
        if not self.on_host:
            self._add(z)
            return
        with np.errstate(all="ignore"):  # (overflow to inf, silently, as on tensors)
            self._add(_host(z))

    def _add(self, z) -> None:
        delta = z - self.mean
        self.mean = self.mean + delta / self.n
        after = z - self.mean
        if self.dense:
            self.m2 = self.m2 + delta[..., :, None] * after[..., None, :]
        else:
            self.m2 = self.m2 + delta * after

    def inverse_mass(self) -> torch.Tensor:
        """Stan's regularised estimate: (n/(n+5)) var + 1e-3 (5/(n+5)) (on the diagonal
        for a dense one); var is the unbiased sample (co)variance. Needs n >= 2. With
        ``shrink_towards`` (an initial inverse mass, [C, D, D] or [C, D]) the shrinkage is
        1e-3 (5/(n+5)) times it: Stan's rule in the coordinates that metric whitens (the
        identity assumes every parameter is of unit scale: for sds 72 and 0.036 at
        correlation -0.999995 it would widen the narrow direction ~10^4-fold)."""
        n = float(self.n)
        m2 = torch.from_numpy(self.m2).to(self.device) if self.on_host else self.m2
        var = m2 / max(n - 1.0, 1.0)
        shrink = 1e-3 * 5.0 / (n + 5.0)
        if self.shrink_towards is not None:
            var = 0.5 * (var + var.transpose(-1, -2)) if self.dense else var
            return (n / (n + 5.0)) * var + shrink * self.shrink_towards
        if self.dense:
            var = 0.5 * (var + var.transpose(-1, -2))
            eye = torch.eye(self.D, dtype=torch.float64, device=var.device)
            return (n / (n + 5.0)) * var + shrink * eye
        return (n / (n + 5.0)) * var + shrink


def warmup_buffers(num_warmup: int, init_buffer: int = 75, term_buffer: int = 50,
                   base_window: int = 25) -> tuple[int, int, int] | None:
    """(init buffer, base window, term buffer) as Stan sizes them for ``num_warmup``
    iterations; None when no mass matrix is adapted (fewer than 20 iterations)."""
    if num_warmup < 20:
        return None
    if init_buffer + base_window + term_buffer > num_warmup:
        init_buffer = int(0.15 * num_warmup)
        term_buffer = int(0.1 * num_warmup)
        base_window = num_warmup - (init_buffer + term_buffer)
    return init_buffer, base_window, term_buffer


def warmup_windows(num_warmup: int, init_buffer: int = 75, term_buffer: int = 50,
                   base_window: int = 25) -> list[int]:
    """The (0-based) warm-up iterations at which a slow window ends and the mass matrix is
    updated, following Stan's ``windowed_adaptation::compute_next_window``: windows of
    base_window, 2 base_window, ... after the init buffer, the last one stretched to end
    term_buffer iterations before the end of warm-up. [] under 20 iterations."""
    sizes = warmup_buffers(num_warmup, init_buffer, term_buffer, base_window)
    if sizes is None:
        return []
    init_buffer, window, term_buffer = sizes
    last = num_warmup - term_buffer - 1
    ends = []
    end = init_buffer + window - 1
    while True:
        ends.append(end)
        if end >= last:
            break
        window *= 2
        end = end + window
        if end != last and end + 2 * window >= num_warmup - term_buffer:
            end = last
    return ends


class WindowedAdaptation:
    """Stan's warm-up, per chain: dual averaging at every iteration; the chain's draws in
    each slow window feed a Welford estimate that becomes the inverse mass matrix at the
    window's end, after which the step size is searched again (``restart_step_size``,
    supplied by the kernel's owner) and dual averaging restarts from it.

    ``update(i, z, accept_stat)`` after warm-up iteration i (0-based) with the chain's
    state z [C, D] returns (step size to use next [C], the new inverse mass or None when
    it did not change). After the last iteration, ``final_step_size()`` is the one kept."""

    def __init__(self, num_warmup: int, step_size: torch.Tensor, *, C: int, D: int,
                 target_accept: float = 0.8, dense: bool = False, adapt_mass: bool = True,
                 device=None, shrink_towards=None):
        self.num_warmup = num_warmup
        self.dual = DualAveraging(step_size, target_accept)
        sizes = warmup_buffers(num_warmup) if adapt_mass else None
        self.window_ends = set(warmup_windows(num_warmup)) if sizes else set()
        self.first = sizes[0] if sizes else num_warmup
        self.last = num_warmup - sizes[2] if sizes else num_warmup  # exclusive
        self.welford = Welford(C, D, dense=dense, device=device, shrink_towards=shrink_towards)

    def in_window(self, i: int) -> bool:
        return self.first <= i < self.last

    def update(self, i: int, z: torch.Tensor, accept_stat: torch.Tensor):
        step_size = self.dual.update(accept_stat)
        if self.in_window(i):
            self.welford.update(z)
        return step_size, self.window_end(i)

    def window_end(self, i: int) -> torch.Tensor | None:
        """After iteration i's updates: the new inverse mass where a slow window ends at i
        (the estimate starts again), else None."""
        if i in self.window_ends and self.welford.n >= 2:
            inverse_mass = self.welford.inverse_mass()
            self.welford.reset()
            return inverse_mass
        return None

    def next_stop(self, i: int) -> int:
        """The first iteration from i on after which the caller must act: a window's end, or
        the last warm-up iteration."""
        return min([e for e in self.window_ends if e >= i] + [self.num_warmup - 1])

    def restart_step_size(self, step_size: torch.Tensor) -> None:
        """After a mass matrix update: dual averaging starts again from ``step_size``."""
        self.dual.restart(step_size)

    def final_step_size(self) -> torch.Tensor:
        return self.dual.final()
