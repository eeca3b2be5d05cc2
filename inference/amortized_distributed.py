"""Amortized training on simulations shared by the ranks of a ``torchrun`` job
(``Guide.fit(..., objective="forward_kl", distributed=True)``; issue 15, item 3).

Data parallel: every rank holds the same network (built from the same seed), simulates
its share B_r of each step's B data sets from its own stream (``derive_seed(seed,
rank)``), and computes its share's loss, the mean over its B_r simulations. The ranks
then combine the gradients as sum_r (B_r / B) grad_r, summed in rank order on every rank
(one ``all_gather`` of the flattened gradients per step), so every rank takes the same
Adam step and the networks stay identical, number for number. The feature normalisation
is set from the first batch of all B simulations (gathered), as one process sets it from
its first batch of B.

Equal to one process in law, not in numbers: each step's gradient is the mean over B
independent prior-predictive simulations either way (a single process draws them from one
stream). A loss that is not finite on any rank stops every rank with that rank's step.
"""
from __future__ import annotations

import contextlib

import torch

from ..semantics.distributed import derive_seed, process_group, shard
from ..semantics.distributed_map import agreed_seed
from ..semantics.errors import PPLError, PPLRuntimeError


class DataParallel:
    """One rank's side of the data-parallel training (module docstring)."""

    def __init__(self, group, batch: int):
        self.group = group
        self.batch = int(batch)
        self.local = shard(self.batch, group.size, group.rank)[1]
        if self.local == 0:
            raise PPLError(f"batch_size={self.batch} cannot be shared by {group.size} ranks",
                           hint="give batch_size >= the number of ranks")

    def pooled_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Every rank's first-batch features, concatenated in rank order."""
        parts = self.group.all_gather_object(feats.detach().cpu(), what="gather the first batch's features")
        return torch.cat(parts).to(feats.device)

    def backward(self, loss: torch.Tensor, value: float, params, what: str) -> float:
        """``loss.backward()`` then every parameter's gradient replaced by the ranks'
        weighted sum; returns the combined reported value. Raises on every rank when
        some rank's loss is not finite."""
        params = list(params)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
        used = [p.grad is not None for p in params]  # (the same on every rank: one network, one loss)
        w = self.local / self.batch
        grads = [(p.grad if p.grad is not None and finite else torch.zeros_like(p)).reshape(-1).double() * w
                 for p in params]
        flat = torch.cat(grads + [torch.tensor([value * w if finite else 0.0, 0.0 if finite else 1.0],
                                               dtype=torch.float64)])
        parts = self.group.all_gather(flat, what="combine the gradients")
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        bad = [r for r, part in enumerate(parts) if float(part[-1]) > 0]
        if bad:
            raise PPLRuntimeError(f"{what} is not finite on rank {bad[0]} of {self.group.size}",
                                  hint="every particle may violate a condition, or the learning rate is too high: "
                                       "lower lr, or check the model")
        at = 0
        for p, u in zip(params, used):
            n = p.numel()
            if u:  # (a parameter the loss does not use keeps no gradient: Adam leaves it alone)
                p.grad = total[at:at + n].reshape(p.shape).to(p.dtype)
            at += n
        return float(total[-2])


@contextlib.contextmanager
def data_parallel(objective: str, datasets, seed: int | None, batch: int):
    """(the rank's ``DataParallel``, the job's seed, this rank's simulation seed, root?)
    inside the job's process group; refuses what has no data-parallel form yet."""
    if objective != "forward_kl" or datasets is not None:
        raise PPLError("distributed=True trains an amortized guide with objective='forward_kl' on simulations only",
                       hint="drop datasets=, use objective='forward_kl', or train in one process")
    with process_group() as group:
        base = agreed_seed(seed, group)
        yield DataParallel(group, batch), base, derive_seed(base, group.rank), group.is_root
