"""``Model.log_joint``'s rule for batches (issue 11, left item 5): every tensor with a
leading dimension holds one row per trace, also when there is one row; numbers, lists and
0-d tensors are one value for every trace. A batch of one row of a vector choice used to
be read as one value of shape [1, k] (``beta[1]`` then failed with a shape error, or a
covariance came out [11, 1]); a 1-D tensor for a vector choice used to be read as k traces
of a number (silently scored against the vector's density). Both are now exact answers
or located errors."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as ss
import torch

import ppl

REGRESSION = """
def regression(xs, ys):
    beta ~ normal(zeros(2), 1)
    s ~ exponential(1)
    for i in range(len(xs)):
        observe ys[i] ~ normal(beta[0] + beta[1] * xs[i], s)
    return beta[1]
"""
XS, YS = [0.0, 1.0, 2.0], [0.3, 1.1, 2.4]


def truth(beta, s):
    """log p(beta, s, ys) by scipy."""
    lp = ss.norm.logpdf(beta, 0, 1).sum() + ss.expon.logpdf(s)
    return lp + sum(ss.norm.logpdf(y, beta[0] + beta[1] * x, s) for x, y in zip(XS, YS))


@pytest.fixture(scope="module")
def model():
    return ppl.model(REGRESSION)


def test_a_batch_of_one_row_of_a_vector_choice_is_one_trace(model):
    beta, s = [0.2, 0.9], 0.7
    lj = model.log_joint({"beta": torch.tensor([beta], dtype=torch.float64),
                          "s": torch.tensor([s], dtype=torch.float64)}, xs=XS, ys=YS)
    assert lj.shape == (1,)
    assert float(lj[0]) == pytest.approx(truth(np.array(beta), s), rel=1e-6)


def test_one_trace_as_lists_and_numbers_and_n_rows_agree(model):
    rows = torch.tensor([[0.2, 0.9], [-0.5, 1.5], [1.0, 0.0]], dtype=torch.float64)
    ss_ = torch.tensor([0.7, 1.3, 0.4], dtype=torch.float64)
    batch = model.log_joint({"beta": rows, "s": ss_}, xs=XS, ys=YS)
    assert batch.shape == (3,)
    for i in range(3):
        one = model.log_joint({"beta": rows[i].tolist(), "s": float(ss_[i])}, xs=XS, ys=YS)
        assert one.shape == (1,)
        assert float(one[0]) == pytest.approx(float(batch[i]), rel=1e-6)  # lists are read as float32
        assert float(batch[i]) == pytest.approx(truth(rows[i].numpy(), float(ss_[i])), rel=1e-6)
    # a shared value (a list) next to a batch of rows of the other choice
    shared = model.log_joint({"beta": [0.2, 0.9], "s": ss_}, xs=XS, ys=YS)
    assert shared.tolist() == pytest.approx([truth(np.array([0.2, 0.9]), float(s)) for s in ss_], rel=1e-6)


def test_a_flat_tensor_for_a_vector_choice_is_a_located_error(model):
    """[2] would be two traces whose beta is a number: not the choice's shape."""
    with pytest.raises(ppl.PPLError) as e:
        model.log_joint({"beta": torch.tensor([0.2, 0.9]), "s": 0.7}, xs=XS, ys=YS)
    msg = str(e.value)
    assert ":3:5:" in msg and "'beta'" in msg and "takes shape [2]" in msg and "[1, 2]" in msg, msg


def test_tensors_with_different_numbers_of_rows_are_an_error(model):
    with pytest.raises(ppl.PPLError) as e:
        model.log_joint({"beta": torch.zeros(3, 2), "s": torch.ones(2)}, xs=XS, ys=YS)
    assert "different numbers of rows" in str(e.value) and "'beta': 3" in str(e.value)


def test_a_shared_value_of_the_wrong_shape_is_an_error(model):
    with pytest.raises(ppl.PPLError) as e:
        model.log_joint({"beta": [0.2, 0.9, 1.0], "s": 0.7}, xs=XS, ys=YS)
    assert "'beta'" in str(e.value) and "shape [3]" in str(e.value)


def test_scalar_choices_keep_their_old_reading():
    """A 1-D tensor of a number choice is a batch (as before), a number one trace."""
    m = ppl.model("def m(y):\n    mu ~ normal(0, 1)\n    observe y ~ normal(mu, 1)\n    return mu\n")
    lj = m.log_joint({"mu": torch.tensor([0.0, 1.0])}, y=0.5)
    at_one = ss.norm.logpdf(1.0) + ss.norm.logpdf(0.5)
    assert lj.tolist() == pytest.approx([ss.norm.logpdf(0) + ss.norm.logpdf(0.5), at_one])
    assert m.log_joint({"mu": 1.0}, y=0.5).tolist() == pytest.approx([at_one])
    assert m.log_joint({"mu": torch.tensor([1.0])}, y=0.5).tolist() == pytest.approx([at_one])
