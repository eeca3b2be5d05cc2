"""A Python number as the operand of a tensor operation, without torch's per-call wrapping.

``torch.mul(0.9, t)`` wraps the number into a tensor on every call (~6 us on the CPU, as
much as the operation on a thousand numbers); a 0-d tensor of t's dtype gives the same
result bit for bit on the CPU in float32/float64 (torch casts a Python number to the
operation's dtype before computing; checked for +, -, *, / on either side, 0-d and
batched, infinities, NaN and signed zeros: tests/test_smcfast.py). A per-step cost of
SMC (bench/smc_step_cost.py)."""
from __future__ import annotations

import torch

_CACHE: dict = {}
_FLOATS = (torch.float32, torch.float64)


def number_operand(c: float, like: torch.Tensor):
    """The float c as the other operand of a ``torch.add/sub/mul/true_divide`` (or the
    operators ``+ - *``, and ``/`` with c as the divisor) with the tensor ``like``: a
    cached 0-d tensor of like's dtype on the CPU in float32/float64, else c itself: for
    0.0, -0.0 and NaN (keys that compare equal to another's, or to nothing), and for a
    tensor subclass (a fake tensor being recorded, a parameter: nothing cached meets it)."""
    if type(like) is not torch.Tensor or like.device.type != "cpu" or like.dtype not in _FLOATS \
            or not c or c != c:
        return c
    key = (c, like.dtype, torch.is_inference_mode_enabled())  # (an inference tensor must not leak out)
    t = _CACHE.get(key)
    if t is None:
        if len(_CACHE) >= 256:
            _CACHE.clear()
        t = _CACHE[key] = torch.tensor(c, dtype=like.dtype)
    return t
