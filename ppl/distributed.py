"""``Model.run(method, distributed=True)`` and ``ppl run --distributed``: a run whose
population is sharded over the ranks of a ``torchrun`` job (``inference/distributed.py``).

Every rank calls ``Model.run`` with the same arguments; rank 0 gets the result (the type
and JSON of a single-process run), the other ranks None. ``importance``/``smc``/
``resample_move`` (single-site moves)/``tempering`` shard the particles;
``mh``/``nuts``/``hmc`` share the chains (each rank runs the method on its own chains;
R-hat and ESS over all chains on rank 0). Seeds: rank 0's seed (or, with
``seed=None``, a seed it draws from torch's global generator) is broadcast; rank r's
particles draw from ``derive_seed(seed, r)`` and the resampling uniforms, shared by all
ranks, from ``derive_seed(seed, -1)``.
"""
from __future__ import annotations

import torch

from .inference.distributed import (distributed_chains, distributed_importance, distributed_resample_move,
                                    distributed_smc, distributed_tempering)
from .inference.methods import METHODS, _betas, _flag, _program
from .registry import population_diagnostics
from .result import WeightedResult, as_result
from .semantics.distributed import derive_seed, process_group
from .results.diagnostics import emit
from .semantics.errors import PPLError
from .stdlib import rng

#: the methods that run sharded, and the options each accepts with distributed=True
DISTRIBUTED_METHODS = {"importance": frozenset({"progress"}),
                       "smc": frozenset({"resampling", "ess_threshold", "progress"}),
                       "resample_move": frozenset({"resampling", "ess_threshold", "moves", "kernel", "scale",
                                                   "progress", "adapt", "max_moves", "decorrelation"}),
                       "tempering": frozenset({"target_ess", "moves", "kernel", "scale", "resampling", "schedule",
                                               "progress", "adapt", "max_moves", "decorrelation"})}
#: Markov chain methods: each rank runs the method itself on its chains (every option passes)
CHAIN_METHODS = frozenset({"mh", "nuts", "hmc"})


def _check(model, method: str, options: dict) -> None:
    """The method and options have a distributed form (else an error: never a run that
    silently differs from the single-process one)."""
    if method in CHAIN_METHODS:
        return
    if method not in DISTRIBUTED_METHODS:
        raise PPLError(f"method '{method}' has no distributed form yet",
                       hint="with distributed=True use one of: "
                            f"{', '.join([*DISTRIBUTED_METHODS, *sorted(CHAIN_METHODS)])}")
    unsupported = [k for k, v in options.items() if k not in DISTRIBUTED_METHODS[method] and v is not None
                   and _flag(v) is not False]
    if unsupported:
        raise PPLError(f"option{'s' if len(unsupported) > 1 else ''} {', '.join(unsupported)} of '{method}' "
                       "cannot be used with distributed=True yet",
                       hint="run in one process for these options")
    from .semantics.enumerate_sites import marks_enumeration
    if marks_enumeration(model.program):
        raise PPLError("choices marked @enumerate cannot be summed out with distributed=True yet",
                       hint="drop @enumerate (the choices are then sampled), or run in one process")


def run_distributed(model, method: str, data: dict, *, particles: int, seed: int | None, device,
                    timeout: float | None = None, **options):
    """The result on rank 0, None on the other ranks (see the module docstring)."""
    _check(model, method, options)
    with process_group(timeout) as group:
        base = seed if group.is_root and seed is not None else \
            (int(torch.randint(0, 2 ** 62, (), generator=torch.default_generator)) if group.is_root else None)
        base = group.broadcast_int(base, what="seed")
        shared = torch.Generator().manual_seed(derive_seed(base, -1))
        with rng.run(derive_seed(base, group.rank)):
            if method in CHAIN_METHODS:
                total = int(options.pop("chains", None) or particles)
                raw = distributed_chains(
                    lambda c: METHODS[method](model, data, particles=c, chains=c, device=device, **options),
                    total, group, components=method != "mh")
            elif method == "tempering":
                raw = distributed_tempering(
                    *_program(model, data, device), int(particles), device, group, shared,
                    target_ess=float(options.get("target_ess") or 0.5),
                    moves=None if options.get("moves") is None else int(options["moves"]),
                    kernel=options.get("kernel") or "rw",
                    scale=0.5 if options.get("scale") is None else float(options["scale"]),
                    resampling=options.get("resampling") or "systematic", schedule=_betas(options.get("schedule")),
                    adapt=_flag(options.get("adapt")) is True,
                    max_moves=100 if options.get("max_moves") is None else int(options["max_moves"]),
                    decorrelation=0.1 if options.get("decorrelation") is None else float(options["decorrelation"]))
            elif method == "resample_move":
                raw = distributed_resample_move(
                    *_program(model, data, device), int(particles), device, group, shared,
                    resampling=options.get("resampling") or "systematic",
                    ess_threshold=1.0 if options.get("ess_threshold") is None else float(options["ess_threshold"]),
                    moves=None if options.get("moves") is None else int(options["moves"]),
                    kernel=options.get("kernel") or "prior",
                    scale=0.5 if options.get("scale") is None else float(options["scale"]),
                    adapt=_flag(options.get("adapt")) is True,
                    max_moves=100 if options.get("max_moves") is None else int(options["max_moves"]),
                    decorrelation=0.1 if options.get("decorrelation") is None else float(options["decorrelation"]))
            elif method == "importance":
                raw = distributed_importance(*_program(model, data, device), int(particles), device, group)
            else:
                raw = distributed_smc(*_program(model, data, device), int(particles), device, group, shared,
                                      resampling=options.get("resampling") or "systematic",
                                      ess_threshold=1.0 if options.get("ess_threshold") is None
                                      else float(options["ess_threshold"]))
    if raw is None:
        return None
    res = as_result(raw)
    if isinstance(res, WeightedResult):  # (as run_method: to_arviz and Model.predictive re-run the model)
        res.model, res.data = model, dict(data)
    population_diagnostics(res)
    emit(getattr(res, "warnings", []), stacklevel=4)
    return res
