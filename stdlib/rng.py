"""Random number generators owned by a run, and sampling that draws from them.

Every inference run (``Model.run(..., seed=s)``) owns its generators: one
``torch.Generator`` per device, seeded with ``s``. While the run executes, its
generators are the *current source* of the thread that runs it (a thread-local), and
every random draw ppl makes -- distributions' samples, resampling, MH proposals and
accept tests, language-model tokens -- reads its generator from there
(:func:`generator`). So two threads running ``seed=1`` and ``seed=2`` on one model get
exactly what they get when run one after the other, and torch's global generator is
neither read nor changed by a seeded run.

* ``seed=None``: the run's generators are seeded with a number drawn from torch's
  global generator (so ``torch.manual_seed`` still makes an unseeded run repeatable);
  a run started inside another run (``seed=None``) shares the outer run's generators.
* Outside any run, :func:`generator` is ``None``: torch's global generator, as before.

torch.distributions' ``.sample()`` takes no generator, so :func:`sample` and
:func:`rsample` draw each family with torch's own primitives given the generator
(``torch.normal``, ``torch.poisson``, ``torch._standard_gamma``, ...), in the same
order and form as the family's own ``sample`` -- the draws equal ``dist.sample()`` made
after ``torch.manual_seed`` with the same seed, bit for bit. A distribution class with
no such path (or one whose subclass overrides its sampler) falls back to
:func:`drawing_from`: under one process-wide lock the generator's state is swapped into
torch's global generator for that one call and swapped back out, which is reproducible
too, but serialised (and a draw from torch's global generator that *your own code*
makes in another thread at that moment would interleave with it).
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable

import torch
import torch.distributions as td
from torch.distributions.multivariate_normal import _batch_mv

__all__ = ["RunGenerators", "FixedGenerator", "run", "using", "current", "generator", "sample", "rsample",
           "drawing_from", "randn_like"]

class _Thread(threading.local):
    source = None  # the thread's current source (None: torch's global generator)


_local = _Thread()
_GLOBAL_LOCK = threading.RLock()  # held while torch's global generator holds a run's state


# ------------------------------------------------------------------------ generators
def _device_key(device) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


class RunGenerators:
    """A run's generators: one per device it draws on, each seeded with the run's seed
    (made when first asked for)."""

    __slots__ = ("seed", "_by_device")

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._by_device: dict = {}

    def get(self, device="cpu") -> torch.Generator:
        g = self._by_device.get(device)
        if g is None:
            key = _device_key(device)
            g = self._by_device.get(key)
            if g is None:
                g = torch.Generator(device=key)
                g.manual_seed(self.seed)
                self._by_device[key] = g
            self._by_device[device] = g
        return g


class FixedGenerator:
    """One given generator for every draw (it must be on the device the draws are)."""

    __slots__ = ("gen",)

    def __init__(self, gen: torch.Generator):
        self.gen = gen

    def get(self, device="cpu") -> torch.Generator:
        return self.gen


def current():
    """The current source of the thread (``RunGenerators`` / ``FixedGenerator``), or None."""
    return _local.source


def generator(device="cpu") -> torch.Generator | None:
    """The generator a draw on ``device`` uses now: the current run's, or None (torch's
    global generator) outside a run."""
    source = _local.source
    return None if source is None else source.get(device)


@contextlib.contextmanager
def using(source):
    """Make ``source`` (a ``RunGenerators``, ``FixedGenerator``, ``torch.Generator`` or
    None for torch's global generator) the thread's current source inside the block."""
    if isinstance(source, torch.Generator):
        source = FixedGenerator(source)
    saved = _local.source
    _local.source = source
    try:
        yield source
    finally:
        _local.source = saved


def seed_from_global() -> int:
    """A seed drawn from torch's global generator (for runs given no seed)."""
    with _GLOBAL_LOCK:  # not in the middle of a swapped-in draw of another thread
        return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))


class run:
    """A run's randomness: its own generators seeded with ``seed`` inside the block (a
    context manager; ``as`` gives the source). ``seed=None``: inside another run, that
    run's generators; else seeded from torch's global generator. (A class, not a
    generator: it wraps every ``Model.run``.)"""

    __slots__ = ("seed", "_saved")

    def __init__(self, seed: int | None):
        self.seed, self._saved = seed, _OUTER

    def __enter__(self):
        seed = self.seed
        if seed is None:
            source = current()
            if source is not None:
                return source  # (the outer run's: nothing to restore)
            seed = seed_from_global()
        source = RunGenerators(int(seed))
        self._saved = _local.source  # (= ``using(source)``)
        _local.source = source
        return source

    def __exit__(self, *exc) -> bool:
        if self._saved is not _OUTER:
            _local.source, self._saved = self._saved, _OUTER
        return False


_OUTER = object()  # ``run._saved`` when the block did not change the thread's source


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        torch.cuda.init()
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    raise RuntimeError(f"no global generator known for device {device}")


@contextlib.contextmanager
def drawing_from(gen: torch.Generator | None):
    """Inside the block torch's global generator (of ``gen``'s device) continues
    ``gen``'s stream, and ``gen`` continues from where the block left it; the global
    generator is restored afterwards. Serialised by a process-wide lock: for code
    that cannot take a generator (a ``.sample()`` with no generator-aware path, torch
    module initialisation). No-op for ``gen`` None. Inside the block ppl's own draws
    go to the global generator too (the thread has no current source), so that none
    draws from ``gen`` behind the swapped-in copy of its state."""
    if gen is None:
        yield
        return
    default = _default_generator(gen.device)
    with _GLOBAL_LOCK, using(None):
        saved = default.get_state()
        default.set_state(gen.get_state())
        try:
            yield
        finally:
            gen.set_state(default.get_state())
            default.set_state(saved)


@contextlib.contextmanager
def global_from_run(device="cpu"):
    """``drawing_from`` the current run's generator for ``device`` (no-op outside a run)."""
    with drawing_from(generator(device)):
        yield


# -------------------------------------------------------------------------- sampling
_Sampler = Callable[[td.Distribution, torch.Size, Callable], torch.Tensor]
_SAMPLERS: dict[type, _Sampler] = {}
_RSAMPLERS: dict[type, _Sampler] = {}
_RESOLVED: dict[tuple, _Sampler | None] = {}


def _no_generator(device) -> None:
    """The source outside a run: torch's global generator (``generator=None``)."""
    return None


def _normal(d, shape, gen):
    shape = d._extended_shape(shape)
    return torch.normal(d.loc.expand(shape), d.scale.expand(shape), generator=gen(d.loc.device))


def _standard_normal(shape, like, gen):
    return torch.empty(shape, dtype=like.dtype, device=like.device).normal_(generator=gen(like.device))


def _normal_r(d, shape, gen):
    shape = d._extended_shape(shape)
    return d.loc + _standard_normal(shape, d.loc, gen) * d.scale


def _uniform(d, shape, gen):
    shape = d._extended_shape(shape)
    rand = torch.rand(shape, dtype=d.low.dtype, device=d.low.device, generator=gen(d.low.device))
    return d.low + rand * (d.high - d.low)


def _cauchy(d, shape, gen):
    shape = d._extended_shape(shape)
    return d.loc + d.loc.new(shape).cauchy_(generator=gen(d.loc.device)) * d.scale


def _laplace(d, shape, gen):
    shape = d._extended_shape(shape)
    finfo = torch.finfo(d.loc.dtype)
    u = d.loc.new(shape).uniform_(finfo.eps - 1, 1, generator=gen(d.loc.device))
    return d.loc - d.scale * u.sign() * torch.log1p(-u.abs())


def _gamma(d, shape, gen):
    shape = d._extended_shape(shape)
    conc = d.concentration.expand(shape)
    value = torch._standard_gamma(conc, generator=gen(conc.device)) / d.rate.expand(shape)
    value.detach().clamp_(min=torch.finfo(value.dtype).tiny)  # not recorded by autograd
    return value


def _dirichlet(d, shape, gen):
    conc = d.concentration.expand(d._extended_shape(shape))
    return torch._sample_dirichlet(conc, generator=gen(conc.device))


def _beta(d, shape, gen):
    return _dirichlet(d._dirichlet, shape, gen).select(-1, 0)


def _exponential(d, shape, gen):
    shape = d._extended_shape(shape)
    return d.rate.new(shape).exponential_(generator=gen(d.rate.device)) / d.rate


def _student_t(d, shape, gen):
    full = d._extended_shape(shape)
    x = _standard_normal(full, d.df, gen)
    z = _gamma(d._chi2, torch.Size(shape), gen)
    return d.loc + d.scale * (x * torch.rsqrt(z / d.df))


def _mv_normal(d, shape, gen):
    eps = _standard_normal(d._extended_shape(shape), d.loc, gen)
    return d.loc + _batch_mv(d._unbroadcasted_scale_tril, eps)


def _lowrank_mv_normal(d, shape, gen):
    shape = d._extended_shape(shape)
    W_shape = shape[:-1] + d.cov_factor.shape[-1:]
    eps_W = _standard_normal(W_shape, d.loc, gen)
    eps_D = _standard_normal(shape, d.loc, gen)
    return d.loc + _batch_mv(d._unbroadcasted_cov_factor, eps_W) + d._unbroadcasted_cov_diag.sqrt() * eps_D


def _bernoulli(d, shape, gen):
    p = d.probs.expand(d._extended_shape(shape))
    return torch.bernoulli(p, generator=gen(p.device))


def _binomial(d, shape, gen):
    if getattr(d, "approx_sample_thresh", math.inf) < math.inf:
        return None  # pyro's approximate path: the fallback draws it
    shape = d._extended_shape(shape)
    p = d.probs.expand(shape)
    return torch.binomial(d.total_count.expand(shape), p, generator=gen(p.device))


def _beta_binomial(d, shape, gen):
    probs = _beta(d._beta, torch.Size(shape), gen)
    total, probs = torch.broadcast_tensors(d.total_count, probs)
    return torch.binomial(total.type_as(probs), probs, generator=gen(probs.device))


def _categorical(d, shape, gen):
    shape = torch.Size(shape)
    probs_2d = d.probs.reshape(-1, d._num_events)
    draws = torch.multinomial(probs_2d, shape.numel(), True, generator=gen(probs_2d.device)).T
    return draws.reshape(d._extended_shape(shape))


def _poisson(d, shape, gen):
    rate = d.rate.expand(d._extended_shape(shape))
    return torch.poisson(rate, generator=gen(rate.device))


def _geometric(d, shape, gen):
    shape = d._extended_shape(shape)
    tiny = torch.finfo(d.probs.dtype).tiny
    u = d.probs.new(shape).uniform_(tiny, 1, generator=gen(d.probs.device))
    return (u.log() / (-d.probs).log1p()).floor()


def _negative_binomial(d, shape, gen):
    rate = _gamma(d._gamma, torch.Size(shape), gen)
    return torch.poisson(rate, generator=gen(rate.device))


def _transformed(method):
    def draw(d, shape, gen):
        x = _draw(d.base_dist, torch.Size(shape), gen, method)
        if x is None:
            return None
        for t in d.transforms:
            x = t(x)
        return x
    return draw


def _independent(method):
    def draw(d, shape, gen):
        return _draw(d.base_dist, torch.Size(shape), gen, method)
    return draw


def _deterministic(d, shape, gen):
    return d.sample(shape)


def _register():
    import pyro.distributions as pdist
    S, R = _SAMPLERS, _RSAMPLERS
    # the class whose own sample/rsample each function reproduces
    S[td.Normal], R[td.Normal] = _normal, _normal_r
    for cls, fn in [(td.Uniform, _uniform), (td.Cauchy, _cauchy), (td.Laplace, _laplace), (td.Gamma, _gamma),
                    (td.Exponential, _exponential), (td.StudentT, _student_t), (td.MultivariateNormal, _mv_normal),
                    (td.LowRankMultivariateNormal, _lowrank_mv_normal)]:
        S[cls] = R[cls] = fn  # their sample is rsample without gradients
    S[td.Dirichlet], S[td.Beta] = _dirichlet, _beta  # (their rsample's gradient is torch's autograd Function)
    for cls, fn in [(td.Bernoulli, _bernoulli), (td.Binomial, _binomial), (pdist.Binomial, _binomial),
                    (pdist.BetaBinomial, _beta_binomial), (td.Categorical, _categorical), (td.Poisson, _poisson),
                    (td.Geometric, _geometric), (td.NegativeBinomial, _negative_binomial),
                    (pdist.Delta, _deterministic)]:
        S[cls] = fn
    S[td.TransformedDistribution], R[td.TransformedDistribution] = _transformed("sample"), _transformed("rsample")
    S[td.Independent], R[td.Independent] = _independent("sample"), _independent("rsample")


class _Source:
    """A source from a function device -> generator."""

    __slots__ = ("get",)

    def __init__(self, get: Callable):
        self.get = get


def _run_aware(method: str) -> _Sampler:
    """For a class whose own sampler draws through this module (``rng.generator``,
    ``rng.sample``): its method, with ``gen`` as the thread's source meanwhile."""
    def draw(d, shape, gen):
        with using(_Source(gen)):
            return getattr(d, method)(shape)
    return draw


def _resolve(cls: type, method: str) -> _Sampler | None:
    """The generator-aware sampler for ``cls``: its own method if the class declares
    ``draws_with_run_generator = True`` (its sampler asks this module for generators);
    else the registered class that defines the ``method`` (and ``rsample``, which
    ``sample`` may call) that ``cls`` uses; None when a subclass overrides them (the
    fallback then draws)."""
    key = (cls, method)
    if key in _RESOLVED:
        return _RESOLVED[key]
    aware = next((base for base in cls.__mro__ if "draws_with_run_generator" in base.__dict__), None)
    if aware is not None and aware.__dict__["draws_with_run_generator"] and _same_samplers(cls, aware):
        _RESOLVED[key] = _run_aware(method)
        return _RESOLVED[key]
    if not _SAMPLERS:
        _register()
    table = _SAMPLERS if method == "sample" else _RSAMPLERS
    found = None
    for base in cls.__mro__:
        fn = table.get(base)
        if fn is not None:
            found = fn if _same_samplers(cls, base) else None
            break
    _RESOLVED[key] = found
    return found


def _same_samplers(cls: type, base: type) -> bool:
    """``cls`` samples with ``base``'s own methods (no subclass overrides them)."""
    return all(getattr(cls, m, None) is getattr(base, m, None) for m in ("sample", "rsample"))


def _draw(d, shape: torch.Size, gen, method: str):
    fn = _RESOLVED.get((type(d), method), _resolve)  # (resolved once per class)
    if fn is _resolve:
        fn = _resolve(type(d), method)
    return None if fn is None else fn(d, shape, gen)


def _fallback(d, shape, gen, method: str):
    device = _device_of(d)
    with drawing_from(gen(device)):
        return getattr(d, method)(shape)


def _device_of(d) -> torch.device:
    for name in ("loc", "probs", "logits", "rate", "concentration", "low", "v", "base_dist"):
        try:
            x = getattr(d, name)
        except (AttributeError, NotImplementedError):
            continue
        if isinstance(x, torch.Tensor):
            return x.device
        if isinstance(x, td.Distribution):
            return _device_of(x)
    try:
        return d.mean.device
    except (AttributeError, NotImplementedError, RuntimeError):
        return torch.device("cpu")


def _gen_of(generator) -> Callable | None:
    if generator is not None:
        return lambda device: generator
    source = _local.source
    return None if source is None else source.get


def sample(dist: td.Distribution, sample_shape=torch.Size(), generator: torch.Generator | None = None):
    """``dist.sample(sample_shape)`` drawn with ``generator`` (default: the current
    run's; outside a run, torch's global generator)."""
    gen = _gen_of(generator)
    fn = _RESOLVED.get((type(dist), "sample"), _resolve)
    if fn is _resolve:
        fn = _resolve(type(dist), "sample")
    if fn is _normal and not (dist.loc.requires_grad or dist.scale.requires_grad):
        # the most common draw, on parameters without gradients: the torch.normal call of
        # Normal.sample (same draws, from the same generator), without its no_grad context
        # (~10 Python calls per draw: SMC's fixed cost per step, bench/smc_step_cost.py)
        return _normal(dist, torch.Size(sample_shape), gen or _no_generator)
    if gen is None:
        return dist.sample(sample_shape)
    with torch.no_grad():
        out = _draw(dist, torch.Size(sample_shape), gen, "sample")
        return out if out is not None else _fallback(dist, sample_shape, gen, "sample")


def rsample(dist: td.Distribution, sample_shape=torch.Size(), generator: torch.Generator | None = None):
    """``dist.rsample(sample_shape)`` (reparameterised: gradients flow to the
    parameters) drawn with ``generator`` (default: the current run's)."""
    gen = _gen_of(generator)
    if gen is None:
        return dist.rsample(sample_shape)
    out = _draw(dist, torch.Size(sample_shape), gen, "rsample")
    return out if out is not None else _fallback(dist, sample_shape, gen, "rsample")


def randn_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.randn_like(x)`` from the current run's generator."""
    return torch.empty_like(x).normal_(generator=generator(x.device))


def rand(shape, *, dtype=None, device="cpu") -> torch.Tensor:
    """``torch.rand`` from the current run's generator."""
    return torch.rand(shape, dtype=dtype, device=device, generator=generator(device))


def randint(high: int, shape, *, device="cpu") -> torch.Tensor:
    """``torch.randint(high, shape)`` from the current run's generator."""
    return torch.randint(high, shape, device=device, generator=generator(device))


def multinomial(probs: torch.Tensor, n: int, replacement: bool = False) -> torch.Tensor:
    """``torch.multinomial`` from the current run's generator."""
    return torch.multinomial(probs, n, replacement, generator=generator(probs.device))
