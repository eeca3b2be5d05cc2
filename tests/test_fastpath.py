"""The per-step fast paths of SMC compute exactly what the general paths compute.

* ``stdlib.distributions._build`` constructs Normal/Cauchy/Laplace/Gamma directly
  (``_direct_builder``): the object must be the one the class's own constructor makes
  (same class, same attributes, the same tensors: shapes, strides, storage).
* ``semantics.resampling._sorted_search`` (numpy's searchsorted on the CPU) returns
  torch.searchsorted's indices, ties and ends included.
"""
import pytest
import torch

import ppl.stdlib.distributions as D
from ppl.semantics.resampling import _sorted_search

SHAPES = [((5,), ()), ((), (3,)), ((4, 1), (3,)), ((2, 3), (2, 3))]


def _same_object(a, b):
    assert type(a) is type(b)
    assert a.__dict__.keys() == b.__dict__.keys()
    for key, x in a.__dict__.items():
        y = b.__dict__[key]
        if isinstance(x, torch.Tensor):
            assert (x.shape, x.stride(), x.dtype, x.data_ptr()) == (y.shape, y.stride(), y.dtype, y.data_ptr()), key
        else:
            assert x == y, key


@pytest.mark.parametrize("cls", sorted(D._DIRECT, key=lambda c: c.__name__), ids=lambda c: c.__name__)
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_direct_builder_is_the_constructor(cls, shapes, dtype):
    p = torch.rand(shapes[0], dtype=dtype) + 0.5
    q = torch.rand(shapes[1], dtype=dtype) + 0.5
    fast, slow = D._build(cls, p, q), D._SAFE[cls](p, q, validate_args=False)
    _same_object(fast, slow)
    x = torch.rand(fast.batch_shape, dtype=dtype) + 0.1
    assert torch.equal(fast.log_prob(x), slow.log_prob(x))


def test_direct_builders_cover_the_common_families():
    names = {c.__name__ for c in D._DIRECT}
    assert {"Normal", "Gamma"} <= names  # (dropped only if pyro gives them an __init__ of its own)


def test_direct_builder_shape_error_is_torchs():
    with pytest.raises(RuntimeError) as fast:
        D._build(D.pdist.Normal, torch.zeros(3), torch.ones(4))
    with pytest.raises(RuntimeError) as slow:
        D._SAFE[D.pdist.Normal](torch.zeros(3), torch.ones(4), validate_args=False)
    assert str(fast.value) == str(slow.value)


def test_sorted_search_is_torch_searchsorted():
    g = torch.Generator().manual_seed(0)
    for n in [1, 2, 7, 1000]:
        w = torch.rand(n, dtype=torch.float64, generator=g)
        w[torch.rand(n, generator=g) < 0.3] = 0.0  # zero weights: repeated cdf values (ties)
        cdf = torch.cumsum(w, 0)
        v = torch.cat([torch.sort(torch.rand(n, dtype=torch.float64, generator=g) * cdf[-1]).values, cdf[:3], cdf[-1:]])
        v = torch.sort(v).values
        got = _sorted_search(cdf, v)
        assert got.dtype == torch.int64
        assert torch.equal(got, torch.searchsorted(cdf, v, right=True))
