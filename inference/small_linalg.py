"""Small, static-shape linear algebra in a recorded ATen graph rewritten into elementwise
ATen operations, so that TorchInductor generates the whole graph's code.

A potential's graph (``inference.compiled.record``) that factors a covariance (the GP's
11 x 11 ``mv_normal``) holds a Cholesky factorisation, triangular solves and batched matrix
products. Inductor leaves those to ATen ("extern" kernels): in an AOTInductor library the
Cholesky and the triangular solves have no C shim and need an AOTInductor *package* with a
proxy executor (``compiled._packaged``), every extern kernel call costs a dispatch, and a
graph with any extern kernel gets no stack-allocated buffers. For a small matrix (n <= 16)
the textbook algorithms unrolled over the matrix's rows and columns are a few hundred
elementwise operations on the batch (chain) dimension, which Inductor fuses into its own
loops: the graph then compiles into a plain library.

``rewrite_small_linalg(gm, example_inputs)`` replaces, in place, each

* ``aten.linalg_cholesky_ex(A, upper=False, check_errors=False)`` (``cholesky_lower``:
  Cholesky-Banachiewicz, column by column; ``info`` as LAPACK's ``potrf`` gives it: the
  1-based order of the first leading minor whose pivot is not positive (or is NaN), else
  0; after it the factor holds NaN or infinities, where LAPACK leaves it partly
  unfactored: the caller reads ``info``, as the potential's validity flag does),
* ``aten.linalg_solve_triangular(A, B, upper=..., left=..., unitriangular=...)`` (every
  combination of the flags; ``solve_triangular``: forward or back substitution row by
  row, broadcasting the batch dimensions as ATen does),
* ``aten.bmm(A, B)`` and ``aten.mm(A, B)`` (``matmul_small``: a broadcast product summed;
  at most ``MAX_PRODUCT_ELEMENTS`` terms),

whose matrices have static shapes with every matrix dimension at most ``MAX_N`` and a
floating dtype. Nothing else is touched (an ``upper=True`` Cholesky, ``check_errors=True``,
complex or integer tensors, bigger matrices stay ATen calls). The replacement computes the
same function up to rounding (the order of the sums differs from LAPACK's and BLAS's):
``check_rewrite`` compares the rewritten graph with the original at random points before
it is used. Seeded NUTS runs of a model whose graph is rewritten therefore differ from
runs without the rewrite in the last bits, and so after some iterations in their draws:
the same law, other numbers (as between TorchScript and Inductor).
"""
from __future__ import annotations

import math

import torch
from torch.fx.experimental.proxy_tensor import make_fx

#: the largest matrix dimension rewritten: the unrolled code grows as n^3 operations
MAX_N = 16
#: the most elements of a matrix product's broadcast terms ([*, n, k, m]: ``matmul_small``),
#: which the graph run eagerly (the rewrite's check) holds at once
MAX_PRODUCT_ELEMENTS = 1 << 16

_aten = torch.ops.aten
_FLOATS = (torch.float32, torch.float64)


# -- the elementwise algorithms (plain torch functions, traced by make_fx) ----------------

def cholesky_lower(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, info) of ``torch.linalg.cholesky_ex(A)`` for A [*, n, n] (its lower triangle
    read), computed column by column with elementwise operations on the batch."""
    n = A.shape[-1]
    columns = []  # column j of L from row j down: [*, n - j]
    info = torch.zeros(A.shape[:-2], dtype=torch.int32, device=A.device)
    failed = []
    for j in range(n):
        s = A[..., j:, j]
        for k in range(j):
            lk = columns[k][..., j - k:]  # L[j:, k]
            s = s - lk * lk[..., :1]      # (L[j, k] is lk's first element)
        pivot = s[..., 0]
        failed.append(~(pivot > 0))  # (LAPACK's test: not positive, or NaN)
        diag = pivot.sqrt()
        columns.append(torch.cat((diag.unsqueeze(-1), s[..., 1:] / diag.unsqueeze(-1)), -1))
    for j in reversed(range(n)):  # the first failing column wins
        info = torch.where(failed[j], torch.full_like(info, j + 1), info)
    zeros = torch.zeros_like(A[..., 0, :1])
    full = [torch.cat([zeros] * j + [columns[j]], -1) if j else columns[j] for j in range(n)]
    return torch.stack(full, -1), info


def solve_triangular(A: torch.Tensor, B: torch.Tensor, *, upper: bool, left: bool = True,
                     unitriangular: bool = False) -> torch.Tensor:
    """``torch.linalg.solve_triangular(A, B, upper=, left=, unitriangular=)`` for A
    [*, n, n] and B [*, n, k] (``left``) or [*, k, n], by substitution row by row, reading
    only A's triangle (and not its diagonal where ``unitriangular``)."""
    if not left:  # X A = B  <=>  A^T X^T = B^T
        return solve_triangular(A.transpose(-2, -1), B.transpose(-2, -1), upper=not upper,
                                unitriangular=unitriangular).transpose(-2, -1)
    n = A.shape[-1]
    rows: list = [None] * n  # row i of X: [*, k]
    order = reversed(range(n)) if upper else range(n)
    for i in order:
        x = B[..., i, :]
        known = range(i + 1, n) if upper else range(i)
        for j in known:
            x = x - A[..., i, j].unsqueeze(-1) * rows[j]
        if not unitriangular:
            x = x / A[..., i, i].unsqueeze(-1)
        rows[i] = x
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    return torch.stack([r.expand(*batch, r.shape[-1]) for r in rows], -2)


def matmul_small(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ B`` for ``aten.mm``/``aten.bmm`` operands, as a broadcast product summed over
    the inner dimension."""
    return (A.unsqueeze(-1) * B.unsqueeze(-3)).sum(-2)


# -- which nodes are rewritten --------------------------------------------------------------

def _meta(node):
    return node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None


def _small_float_matrix(node, max_n: int) -> bool:
    tm = _meta(node)
    return (tm is not None and tm.dtype in _FLOATS and len(tm.shape) >= 2
            and 0 < tm.shape[-1] <= max_n and 0 < tm.shape[-2] <= max_n)


def _replacement(node, max_n: int):
    """The function replacing ``node`` (called with its tensor arguments), or None where it
    is not one this pass rewrites."""
    target, args, kwargs = node.target, node.args, node.kwargs
    if target is _aten.linalg_cholesky_ex.default:
        if len(args) != 1 or set(kwargs) - {"upper", "check_errors"}:
            return None
        if kwargs.get("upper", False) or kwargs.get("check_errors", False) or not _small_float_matrix(args[0], max_n):
            return None
        return cholesky_lower
    if target is _aten.linalg_solve_triangular.default:
        if len(args) != 2 or "upper" not in kwargs or set(kwargs) - {"upper", "left", "unitriangular"}:
            return None
        if not all(_small_float_matrix(a, max_n) for a in args):
            return None
        if _meta(args[0]).dtype != _meta(args[1]).dtype:
            return None
        flags = dict(upper=bool(kwargs["upper"]), left=bool(kwargs.get("left", True)),
                     unitriangular=bool(kwargs.get("unitriangular", False)))
        return lambda A, B: solve_triangular(A, B, **flags)
    if target in (_aten.bmm.default, _aten.mm.default):
        if len(args) != 2 or kwargs or not all(_small_float_matrix(a, max_n) for a in args):
            return None
        a, b = _meta(args[0]), _meta(args[1])
        if a.dtype != b.dtype or math.prod(a.shape) * b.shape[-1] > MAX_PRODUCT_ELEMENTS:
            return None
        return matmul_small
    return None


def rewritable(node) -> bool:
    """Whether ``node`` is an operation this pass may rewrite (by its operator alone; the
    shapes and flags are looked at by ``rewrite_small_linalg``)."""
    return node.op == "call_function" and node.target in _TARGETS


_TARGETS = (_aten.linalg_cholesky_ex.default, _aten.linalg_solve_triangular.default, _aten.bmm.default,
            _aten.mm.default)


def _example(node) -> torch.Tensor:
    tm = _meta(node)
    return torch.zeros(tuple(tm.shape), dtype=tm.dtype)


def rewrite_small_linalg(gm: torch.fx.GraphModule, example_inputs: tuple, max_n: int = MAX_N) -> int:
    """Replace in ``gm`` (in place) each small static-shape linear-algebra operation listed
    in the module docstring by its elementwise unrolling; the number replaced. The graph's
    tensors (``get_attr``) and inputs stay as they are."""
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(*example_inputs)
    graph = gm.graph
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        fn = _replacement(node, max_n)
        if fn is None:
            continue
        tensors = list(node.args)
        sub = make_fx(fn)(*[_example(a) for a in tensors])
        with graph.inserting_before(node):
            result = _inline(graph, sub.graph, tensors)
        if isinstance(result, (tuple, list)):  # (L, info): the getitems of the node read them
            for user in list(node.users):
                if user.op == "call_function" and user.target.__name__ == "getitem":
                    user.replace_all_uses_with(result[user.args[1]])
                    graph.erase_node(user)
            if node.users:
                raise ValueError(f"{node.target}'s results used other than by index")
        else:
            node.replace_all_uses_with(result)
        graph.erase_node(node)
        replaced += 1
    if replaced:
        graph.lint()
        gm.recompile()
    return replaced


def _inline(graph: torch.fx.Graph, sub: torch.fx.Graph, inputs: list):
    """Copy ``sub``'s operations into ``graph`` at its insertion point, its placeholders
    bound to ``inputs`` (``Graph.graph_copy``); what ``sub`` returns, as nodes of ``graph``."""
    if any(n.op == "get_attr" for n in sub.nodes):
        raise ValueError("the unrolled algorithm made a tensor constant")
    placeholders = [n for n in sub.nodes if n.op == "placeholder"]
    return graph.graph_copy(sub, dict(zip(placeholders, inputs)))


# -- the check -------------------------------------------------------------------------------

def check_points(example_inputs: tuple, n: int = 8, seed: int = 0) -> list[tuple]:
    """``n`` inputs near ``example_inputs``, seeded: every floating tensor moved by relative
    noise of scale 0 (the example itself), 1e-3, 1e-2, ... up to 1; other inputs as given."""
    g = torch.Generator().manual_seed(seed)
    points = []
    for i in range(n):
        scale = 0.0 if i == 0 else 10.0 ** (-3 + 3 * (i - 1) / max(n - 2, 1))
        points.append(tuple(
            x + scale * (1 + x.abs()) * torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
            if isinstance(x, torch.Tensor) and x.dtype.is_floating_point and x.ndim else x
            for x in example_inputs))
    return points


def check_rewrite(original, rewritten, points, rtol: float | None = None) -> None:
    """Raise ValueError unless ``rewritten`` computes ``original``'s outputs at each of
    ``points`` (tuples of inputs): boolean and integer outputs exactly; floating outputs
    within ``rtol`` (default 5e4 machine epsilons: 1.1e-11 in float64) of each output's
    largest magnitude, non-finite where and as they are, at the points where every boolean
    output is all true (a graph's validity flags: where a flag is false, e.g. a Cholesky
    factorisation failed, the values are not read, and there the rewritten graph gives
    NaN where LAPACK gives a partial factor). At least one point must be so compared."""
    compared = 0
    for args in points:
        want, got = _tuple(original(*args)), _tuple(rewritten(*args))
        if len(want) != len(got):
            raise ValueError("the small linear algebra rewrite changed the number of outputs")
        exact = [i for i, a in enumerate(want) if not (isinstance(a, torch.Tensor) and a.dtype.is_floating_point)]
        for i in exact:
            if not _same(want[i], got[i], 0.0):
                raise ValueError(f"the small linear algebra rewrite changed output {i} (not floating)")
        if not all(bool(want[i].all()) for i in exact
                   if isinstance(want[i], torch.Tensor) and want[i].dtype == torch.bool):
            continue
        compared += 1
        for i, (a, b) in enumerate(zip(want, got)):
            if i not in exact and not _same(a, b, rtol if rtol is not None else 5e4 * torch.finfo(a.dtype).eps):
                raise ValueError(f"the small linear algebra rewrite changed output {i}: "
                                 f"max |difference| {_difference(a, b)}")
    if not compared:
        raise ValueError("no check point where the graph's flags are all true")


def _tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _same(a, b, rtol: float) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return a == b
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.dtype.is_floating_point:
        return bool(torch.equal(a, b))
    finite = torch.isfinite(a)
    if not torch.equal(finite, torch.isfinite(b)):
        return False
    if not torch.equal(a[~finite].nan_to_num(0.0, 1.0, -1.0), b[~finite].nan_to_num(0.0, 1.0, -1.0)):
        return False
    if not bool(finite.any()):
        return True
    scale = float(a[finite].abs().max())
    return bool(((a[finite] - b[finite]).abs() <= rtol * scale).all())


def _difference(a, b):
    try:
        return float((a.double() - b.double()).abs().nan_to_num(float("inf")).max())
    except Exception:  # noqa: BLE001 - only a message
        return "n/a"
