"""Bernoulli's log-probability written as ``y l + log sigmoid(-l)`` (``stdlib.distributions.
_bernoulli_log_prob``): the same numbers and gradients as torch's
``-binary_cross_entropy_with_logits``, and a recorded graph (what TorchInductor compiles
for NUTS) of ``log_sigmoid`` and its derivative: one exponential and one ``log1p`` a point
once compiled, where torch's cross-entropy and sigmoid take three exponentials and a log."""
import pyro.distributions as pdist
import pytest
import torch
import torch.distributions as td
from torch.fx.experimental.proxy_tensor import make_fx

from ppl.stdlib import distributions as D

LOGITS = torch.tensor([-800.0, -40.0, -3.5, -1e-12, 0.0, 1e-12, 0.7, 2.0, 36.0, 800.0], dtype=torch.float64)


def _ours(**params):
    return D._build(pdist.Bernoulli, **params)


PROBS = torch.tensor([1e-300, 0.01, 0.5, 0.99, 1.0 - 1e-16], dtype=torch.float64)


@pytest.mark.parametrize("params, rtol", [({"logits": LOGITS}, 1e-14), ({"probs": PROBS}, 1e-13)],
                         ids=["logits", "probs"])
def test_log_prob_is_torchs_at_both_values_and_extreme_parameters(params, rtol):
    """Logits from -800 to 800 (and 0, +-1e-12); probabilities (which go through logits as
    torch's do) from 1e-300 to 1 - 1e-16."""
    for y in (0.0, 1.0):
        value = torch.full_like(next(iter(params.values())), y)
        ours = _ours(**params).log_prob(value)
        theirs = td.Bernoulli(**params).log_prob(value)
        assert torch.allclose(ours, theirs, rtol=rtol, atol=1e-15), (y, ours, theirs)


def test_boolean_values_and_broadcasting():
    value = torch.tensor([True, False, True])
    logits = torch.tensor([[0.3], [-2.0]], dtype=torch.float64)  # [2, 1] against [3]
    ours = _ours(logits=logits).log_prob(value)
    theirs = td.Bernoulli(logits=logits).log_prob(value.double())
    assert ours.shape == theirs.shape == (2, 3)
    assert torch.allclose(ours, theirs, rtol=1e-14, atol=0)


def test_gradient_is_value_minus_sigmoid_also_at_zero():
    logits = LOGITS.clone().requires_grad_(True)
    value = (torch.arange(len(LOGITS)) % 2).double()
    (grad,) = torch.autograd.grad(_ours(logits=logits).log_prob(value).sum(), logits)
    expected = value - torch.sigmoid(LOGITS)
    assert torch.allclose(grad, expected, rtol=1e-14, atol=1e-300)
    assert grad[4] == value[4] - 0.5  # l = 0 exactly: sigmoid's 1/2, not a subgradient's 0


def test_outside_the_support_is_minus_infinity_not_an_error():
    lp = _ours(logits=torch.tensor([0.5, 0.5], dtype=torch.float64)).log_prob(torch.tensor([1.0, 2.0]))
    assert torch.isfinite(lp[0]) and lp[1] == float("-inf")


def _recorded_ops(fn, *inputs):
    with D.deferred_checks():  # (as a potential is recorded: no support check read into Python)
        gm = make_fx(fn)(*inputs)
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_a_recorded_value_and_gradient_is_log_sigmoid_and_its_derivative():
    value = (torch.rand(200, generator=torch.Generator().manual_seed(0)) < 0.5).double()

    def value_and_grad(logits, lp):
        logits = logits.detach().requires_grad_(True)
        total = lp(logits).sum()
        return total.detach(), torch.autograd.grad(total, logits)[0]

    aten = torch.ops.aten
    ours = _recorded_ops(lambda l: value_and_grad(l, lambda x: _ours(logits=x).log_prob(value)), LOGITS.repeat(20))
    assert ours.count(aten.log_sigmoid_forward.default) == 1 and ours.count(aten.log_sigmoid_backward.default) == 1
    assert aten.binary_cross_entropy_with_logits.default not in ours and aten.sigmoid.default not in ours
    # torch's own formula, recorded the same way: what this replaces (TorchInductor decomposes
    # the cross-entropy into two exponentials and a logarithm, the sigmoid into a third)
    theirs = _recorded_ops(lambda l: value_and_grad(l, lambda x: td.Bernoulli(logits=x, validate_args=False).log_prob(value)),
                           LOGITS.repeat(20))
    assert aten.binary_cross_entropy_with_logits.default in theirs and aten.sigmoid.default in theirs
