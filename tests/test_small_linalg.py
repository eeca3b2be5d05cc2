"""inference/small_linalg.py: small static-shape linear algebra (Cholesky, triangular solves,
matrix products) unrolled into elementwise ATen operations, so that Inductor generates the
whole potential graph (the GP's 11 x 11 covariance) and AOTInductor builds a plain library.

Each unrolled algorithm is compared with ATen's on random inputs (values, LAPACK's `info` on
failing factorisations, every flag combination of the triangular solve, broadcast batch
dimensions); the rewrite of a recorded log density and gradient is compared with the original
graph at random points; a deliberately wrong unrolling is caught by the rewrite's check and
the graph is then left as it was."""
import copy
import itertools

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from ppl.inference import compiled, small_linalg
from ppl.inference.small_linalg import (MAX_N, check_points, check_rewrite, cholesky_lower, matmul_small,
                                        rewrite_small_linalg, solve_triangular)

aten = torch.ops.aten
LINALG = (aten.linalg_cholesky_ex.default, aten.linalg_solve_triangular.default, aten.bmm.default, aten.mm.default)


def _spd(batch, n, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, n, n, generator=g, dtype=dtype)
    return a @ a.transpose(-2, -1) + n * torch.eye(n, dtype=dtype)


def _close(a, b, rtol):
    scale = b.abs().max().clamp_min(1e-300)
    return bool(((a - b).abs() <= rtol * scale).all())


@pytest.mark.parametrize("n", [1, 2, 5, 11, MAX_N])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cholesky_matches_lapack_on_positive_definite_matrices(n, dtype):
    A = _spd((4,), n, dtype, seed=n)
    L, info = cholesky_lower(A)
    L0, info0 = torch.linalg.cholesky_ex(A)
    assert info.dtype == info0.dtype == torch.int32 and torch.equal(info, info0)
    assert _close(L, L0, 1e-12 if dtype == torch.float64 else 1e-5)
    assert torch.equal(L, L.tril())  # (zeros above the diagonal, as LAPACK's)


def test_cholesky_info_is_lapacks_first_failing_minor():
    n = 6
    A = _spd((5,), n).clone()
    A[1, 3, 3] = -50.0    # fourth pivot negative
    A[2, 0, 0] = 0.0      # first pivot zero
    A[3, 5, 5] = float("nan")
    A[4, 2, 1] = A[4, 1, 2] = 1e6  # a leading 3 x 3 minor not positive definite
    L, info = cholesky_lower(A)
    _, info0 = torch.linalg.cholesky_ex(A)
    assert info.tolist() == info0.tolist() == [0, 4, 1, 6, 3]
    assert torch.isfinite(L[0]).all()
    for chain in (1, 2, 3, 4):  # a failed factor holds non-finite values (the caller reads info)
        assert not torch.isfinite(L[chain]).all()


def test_cholesky_reads_only_the_lower_triangle():
    A = _spd((3,), 5)
    garbage = A + torch.triu(torch.full_like(A, 7.0), 1)
    assert torch.equal(cholesky_lower(garbage)[0], cholesky_lower(A)[0])


@pytest.mark.parametrize("upper,left,unit", list(itertools.product([False, True], repeat=3)))
def test_solve_triangular_every_flag(upper, left, unit):
    g = torch.Generator().manual_seed(3)
    n, k = 7, 3
    A = torch.randn(4, n, n, generator=g, dtype=torch.float64) + 4 * torch.eye(n, dtype=torch.float64)
    A = A + 50 * torch.triu(torch.ones(n, n, dtype=torch.float64), 1) * (not upper)  # the other triangle: ignored
    B = torch.randn(4, n, k, generator=g, dtype=torch.float64) if left else \
        torch.randn(4, k, n, generator=g, dtype=torch.float64)
    X = solve_triangular(A, B, upper=upper, left=left, unitriangular=unit)
    X0 = torch.linalg.solve_triangular(A, B, upper=upper, left=left, unitriangular=unit)
    assert X.shape == X0.shape and _close(X, X0, 1e-12)


@pytest.mark.parametrize("a_batch,b_batch", [((4,), ()), ((), (3,)), ((2, 1), (5,))])
def test_solve_triangular_broadcasts_batch_dimensions(a_batch, b_batch):
    g = torch.Generator().manual_seed(4)
    n = 5
    A = torch.randn(*a_batch, n, n, generator=g, dtype=torch.float64) + 4 * torch.eye(n, dtype=torch.float64)
    B = torch.randn(*b_batch, n, 2, generator=g, dtype=torch.float64)
    X = solve_triangular(A, B, upper=False)
    X0 = torch.linalg.solve_triangular(A, B, upper=False)
    assert X.shape == X0.shape and _close(X, X0, 1e-12)


def test_matmul_small_is_bmm_and_mm():
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(4, 3, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, 2, generator=g, dtype=torch.float64)
    assert _close(matmul_small(A, B), torch.bmm(A, B), 1e-14)
    assert _close(matmul_small(A[0], B[0]), torch.mm(A[0], B[0]), 1e-14)


# -- the rewrite of a recorded graph -----------------------------------------------------------

def _mvn_graph(n=6, chains=4):
    """A GP-like potential (the bench GP's is 11 x 11) recorded as the compiler records one: (z [C, 2]) -> (log density
    [C], its gradient [C, 2], all Cholesky factorisations succeeded), with the covariance
    alpha^2 exp(-d^2 / 2 rho^2) + 0.1 I factored by ``linalg_cholesky_ex``."""
    xs = torch.linspace(0, 10, n, dtype=torch.float64)
    ys = torch.sin(xs)
    d2 = (xs[:, None] - xs[None, :]) ** 2

    def logp(z):
        rho, alpha = z[..., 0].exp(), z[..., 1].exp()
        K = alpha[..., None, None] ** 2 * torch.exp(-d2 / (2 * rho[..., None, None] ** 2)) + 0.1 * torch.eye(n, dtype=z.dtype)
        L, info = torch.linalg.cholesky_ex(K)
        w = torch.linalg.solve_triangular(L, ys.expand(z.shape[0], n).unsqueeze(-1), upper=False)
        return -0.5 * w.square().sum((-2, -1)) - L.diagonal(dim1=-2, dim2=-1).log().sum(-1), info

    def value_and_grad(z):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            lp, info = logp(z)
            (g,) = torch.autograd.grad(lp.sum(), z)
        return lp.detach(), g, (info == 0).all()

    z0 = torch.tensor([[0.1, -0.2]] * chains, dtype=torch.float64)
    return compiled.record(value_and_grad, (z0,)), (z0,)


def _linalg_ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target in LINALG]


def test_rewritten_potential_graph_has_no_linalg_calls_and_agrees_at_random_points():
    gm, example = _mvn_graph()
    assert aten.linalg_cholesky_ex.default in _linalg_ops(gm)
    original = copy.deepcopy(gm)  # (to compare with)
    assert rewrite_small_linalg(gm, example) >= 4  # the Cholesky, the solves and the products of its gradient
    assert _linalg_ops(gm) == []
    g = torch.Generator().manual_seed(7)
    for scale in (0.0, 0.1, 0.5, 1.0):
        z = example[0] + scale * torch.randn(example[0].shape, generator=g, dtype=torch.float64)
        want, got = original(z), gm(z)
        assert torch.equal(want[2], got[2])
        for a, b in zip(want[:2], got[:2]):  # (relative to the largest: a gradient's entry near 0 cancels)
            assert torch.isfinite(a).all() and _close(b, a, 1e-12), (scale, (a - b).abs().max())
    check_rewrite(original, gm, check_points(example))  # (the check the compiler runs passes)


def test_unrolled_graph_compiles_with_stack_buffers():
    """What the rewrite is for: no extern kernel remains, so ``build_native`` asks AOTInductor
    for stack-allocated buffers and needs no package (checked without compiling)."""
    gm, example = _mvn_graph()
    assert compiled._buffer_options(gm) == {"memory_planning": True}
    unrolled = compiled._small_linalg_unrolled(gm, example)
    assert unrolled is not gm and _linalg_ops(unrolled) == [] and _linalg_ops(gm) != []
    assert compiled._buffer_options(unrolled) == {"memory_planning": False, "aot_inductor.allow_stack_allocation": True,
                                                  "aot_inductor.use_minimal_arrayref_interface": True}
    assert compiled._needs_proxy_executor(unrolled) is None


def test_a_wrong_unrolling_is_caught_and_the_graph_left_as_it_was(monkeypatch):
    """A solve that ignores ``upper`` (forward substitution always: the gradient's
    back-substitution with L^T goes wrong) passes shapes and dtypes, and fails the check."""
    gm, example = _mvn_graph()
    right = small_linalg.solve_triangular

    def ignores_upper(A, B, *, upper, left=True, unitriangular=False):
        return right(A, B, upper=False, left=left, unitriangular=unitriangular)
    monkeypatch.setattr(small_linalg, "solve_triangular", ignores_upper)
    broken = copy.deepcopy(gm)
    rewrite_small_linalg(broken, example)
    with pytest.raises(ValueError, match="changed output 1"):
        check_rewrite(gm, broken, check_points(example))
    assert compiled._small_linalg_unrolled(gm, example) is gm  # declined: compiled as it is


def test_a_wrong_info_is_caught(monkeypatch):
    """A Cholesky that reports success whatever its pivots changes the graph's validity flag."""
    gm, example = _mvn_graph(n=4)
    right = small_linalg.cholesky_lower
    monkeypatch.setattr(small_linalg, "cholesky_lower", lambda A: (right(A)[0], torch.zeros_like(right(A)[1])))
    broken = copy.deepcopy(gm)
    rewrite_small_linalg(broken, example)
    bad = (torch.tensor([[0.1, -0.2], [0.1, -0.2], [0.1, -0.2], [0.0, 400.0]], dtype=torch.float64),)
    assert not bool(gm(*bad)[2])  # (a covariance LAPACK cannot factor: alpha^2 = e^800 overflows)
    with pytest.raises(ValueError, match="not floating"):
        check_rewrite(gm, broken, [bad])


def test_unsupported_cases_are_left_alone():
    """An upper Cholesky, a matrix bigger than MAX_N, an integer product and a product of a
    big batch stay ATen calls."""
    big = MAX_N + 1

    def f(a, b, i, m):
        return (torch.linalg.cholesky_ex(a, upper=True)[0], torch.linalg.cholesky_ex(b)[0],
                torch.bmm(i, i), torch.bmm(m, m))
    args = (_spd((2,), 3), _spd((2,), big), torch.ones(2, 3, 3, dtype=torch.int64),
            torch.ones(1000, 16, 16, dtype=torch.float64))
    gm = make_fx(f)(*args)
    before = _linalg_ops(gm)
    assert rewrite_small_linalg(gm, args) == 0
    assert _linalg_ops(gm) == before


def test_check_needs_a_point_where_the_flags_hold():
    gm, example = _mvn_graph(n=4)
    bad = (torch.tensor([[0.0, 400.0]] * 4, dtype=torch.float64),)
    assert not bool(gm(*bad)[2])
    with pytest.raises(ValueError, match="no check point"):
        check_rewrite(gm, gm, [bad])


@pytest.mark.skipif(not compiled.NATIVE["on"], reason="PPL_COMPILED_NATIVE=0")
def test_build_native_makes_a_cholesky_graph_a_plain_library_that_computes_what_the_graph_computes():
    """End to end (one AOTInductor build, cached on disk afterwards): the GP-like potential,
    whose Cholesky and triangular solves needed an AOTInductor package, is now a plain library,
    and agrees with the recorded graph -- values, gradients and the validity flag, also where a
    chain's covariance cannot be factored -- at random points."""
    gm, example = _mvn_graph(n=4)
    run = compiled.build_native(gm, example)
    assert run.native is not None and not run.native.package and run.native.path.endswith(".so")
    g = torch.Generator().manual_seed(11)
    for scale in (0.0, 0.3, 1.0):
        z = example[0] + scale * torch.randn(example[0].shape, generator=g, dtype=torch.float64)
        want, got = gm(z), run(z)
        assert torch.equal(want[2], got[2]) and bool(want[2])
        for a, b in zip(want[:2], got[:2]):
            assert _close(b, a, 1e-12)
    bad = torch.tensor([[0.1, -0.2], [0.0, 400.0], [0.1, -0.2], [0.1, -0.2]], dtype=torch.float64)
    assert not bool(gm(bad)[2]) and not bool(run(bad)[2])  # (the flag still reads the factorisation's info)
