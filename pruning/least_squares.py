"""Least-squares refit of pruned weights and their output error, batched over problems.

One problem is an output channel: its weights ``w`` (``n`` inputs) and the Gram matrix ``G = A'A``
of the layer's inputs (``n x n``, symmetric positive semidefinite, float64, possibly singular).
Any replacement ``x`` of ``w`` changes the channel's output by ``A (w - x)``, with squared norm

    e(x) = (w - x)' G (w - x).

For a support ``S`` (the inputs kept), the best ``x`` with ``x_i = 0`` outside ``S`` solves the
normal equations ``G_SS x_S = (G w)_S``; the error of the support is

    e(S) = min_{x: supp(x) in S} e(x) = r - (G w)_S' x_S,   r = w' G w.

When ``G_SS`` is singular the minimum-norm solution ``x_S = G_SS^+ (G w)_S`` is used (every
solution has the same error, because ``(G w)_S`` lies in the range of ``G_SS`` for ``G = A'A``).

All functions take ``G`` of shape ``(n, n)`` (shared) or ``(B, n, n)``, weights ``(n,)`` or
``(B, n)`` and compute in float64.
"""
from __future__ import annotations

import torch

__all__ = ["as_problems", "masked_pinv", "masked_solve", "reconstruction_error", "refit", "support_error"]

_EPS = torch.finfo(torch.float64).eps
# Cholesky pivots below this fraction of the largest diagonal entry (times n) count as singular.
_PIVOT_RTOL = 1e3 * _EPS


def as_problems(gram, weights) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(G, W, batched)``: ``G`` as ``(B, n, n)`` and ``W`` as ``(B, n)`` float64 tensors.

    ``gram`` may be ``(n, n)`` (shared by all problems, expanded without a copy) or ``(B, n, n)``;
    ``weights`` ``(n,)`` or ``(B, n)``; numpy arrays or tensors. ``batched`` is False when
    ``weights`` was a single vector (the callers then return unbatched results).

    Raises:
        ValueError: shapes that do not fit together.
    """
    G = torch.as_tensor(gram).to(torch.float64)
    W = torch.as_tensor(weights).to(device=G.device, dtype=torch.float64)
    batched = W.dim() == 2
    if W.dim() == 1:
        W = W[None]
    if W.dim() != 2:
        raise ValueError(f"weights must have shape (n,) or (batch, n), got {tuple(W.shape)}")
    n = W.shape[1]
    if G.dim() == 2:
        G = G.expand(W.shape[0], -1, -1)
    if G.dim() != 3 or G.shape[1:] != (n, n) or G.shape[0] != W.shape[0]:
        raise ValueError(f"gram of shape {tuple(torch.as_tensor(gram).shape)} does not fit weights of shape "
                         f"{tuple(torch.as_tensor(weights).shape)}: expected ({n}, {n}) or ({W.shape[0]}, {n}, {n})")
    return G, W, batched


def _as_support(support, like: torch.Tensor) -> torch.Tensor:
    S = torch.as_tensor(support, device=like.device)
    if S.dtype != torch.bool:
        raise ValueError(f"support must be a boolean mask, got dtype {S.dtype}")
    if S.dim() == 1:
        S = S[None]
    return S.expand_as(like)


def masked_solve(G: torch.Tensor, rhs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``y`` with ``y_M = G_MM^+ rhs_M`` and ``y = 0`` outside the mask ``M``, for every problem.

    Cholesky of ``G_MM`` (embedded in an identity); problems whose Cholesky fails or has a pivot
    below ``1e3 n eps max_i G_ii`` (numerically singular) are solved with the pseudo-inverse from an
    eigendecomposition, discarding eigenvalues below ``n eps lambda_max`` (the minimum-norm solution).
    """
    n = G.shape[-1]
    zero = torch.zeros((), dtype=G.dtype, device=G.device)
    pair = mask[:, :, None] & mask[:, None, :]
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    diagonal = torch.where(mask, torch.diagonal(G, dim1=-2, dim2=-1), zero)
    scale = diagonal.amax(-1).clamp_min(torch.finfo(G.dtype).tiny)
    # G_MM embedded in scale * I: the unit block neither limits the pivots nor the eigenvalue cutoff.
    K = torch.where(pair, G, zero) + torch.diag_embed((~mask).to(G.dtype) * scale[:, None])
    b = torch.where(mask, rhs, zero)
    factor, info = torch.linalg.cholesky_ex(K)
    pivots = torch.diagonal(factor, dim1=-2, dim2=-1) ** 2
    bad = (info != 0) | ~torch.isfinite(pivots).all(-1) | (pivots.amin(-1) <= _PIVOT_RTOL * n * scale)
    y = torch.cholesky_solve(b[..., None], torch.where(bad[:, None, None], eye, factor))[..., 0]
    if bad.any():
        idx = torch.nonzero(bad).flatten()
        values, vectors = torch.linalg.eigh(K[idx])
        cutoff = n * _EPS * values.abs().amax(-1, keepdim=True)
        inverse = torch.where(values > cutoff, 1.0 / values.clamp_min(torch.finfo(G.dtype).tiny), 0.0)
        coefficients = (vectors.transpose(-2, -1) @ b[idx][..., None])[..., 0] * inverse
        y[idx] = (vectors @ coefficients[..., None])[..., 0]
    return torch.where(mask, y, zero)


def masked_pinv(G: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``G_MM^+`` embedded in an ``n x n`` zero matrix, for every problem (``G`` ``(B, n, n)``, ``mask`` ``(B, n)``).

    The inverse from a Cholesky factor, or (numerically singular ``G_MM``, as in :func:`masked_solve`)
    the pseudo-inverse from an eigendecomposition.
    """
    n = G.shape[-1]
    zero = torch.zeros((), dtype=G.dtype, device=G.device)
    pair = mask[:, :, None] & mask[:, None, :]
    diagonal = torch.where(mask, torch.diagonal(G, dim1=-2, dim2=-1), zero)
    scale = diagonal.amax(-1).clamp_min(torch.finfo(G.dtype).tiny)
    K = torch.where(pair, G, zero) + torch.diag_embed((~mask).to(G.dtype) * scale[:, None])
    factor, info = torch.linalg.cholesky_ex(K)
    pivots = torch.diagonal(factor, dim1=-2, dim2=-1) ** 2
    bad = (info != 0) | ~torch.isfinite(pivots).all(-1) | (pivots.amin(-1) <= _PIVOT_RTOL * n * scale)
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    inverse = torch.cholesky_inverse(torch.where(bad[:, None, None], eye, factor))
    if bad.any():
        idx = torch.nonzero(bad).flatten()
        values, vectors = torch.linalg.eigh(K[idx])
        cutoff = n * _EPS * values.abs().amax(-1, keepdim=True)
        scaled = torch.where(values > cutoff, 1.0 / values.clamp_min(torch.finfo(G.dtype).tiny), 0.0)
        inverse[idx] = (vectors * scaled[:, None, :]) @ vectors.transpose(-2, -1)
    return torch.where(pair, inverse, zero)


def reconstruction_error(gram, weights, pruned) -> torch.Tensor:
    """``e(x) = (w - x)' G (w - x)`` for every problem, float64 ``(B,)`` (a scalar tensor for one problem)."""
    G, W, batched = as_problems(gram, weights)
    X = torch.as_tensor(pruned).to(device=W.device, dtype=torch.float64).reshape(W.shape)
    delta = W - X
    error = torch.einsum("bi,bij,bj->b", delta, G, delta)
    return error if batched else error[0]


def refit(gram, weights, support) -> torch.Tensor:
    """The least-squares weights on ``support``: ``x_S = G_SS^+ (G w)_S``, zero elsewhere.

    Args:
        gram: ``(n, n)`` or ``(B, n, n)`` Gram matrices.
        weights: ``(n,)`` or ``(B, n)`` original weights ``w``.
        support: boolean mask shaped like ``weights`` (or ``(n,)``, shared): the kept inputs.

    Returns:
        ``x`` shaped like ``weights``, float64: the minimiser of ``e(x)`` over ``supp(x) in S``
        (minimum-norm when ``G_SS`` is singular).
    """
    G, W, batched = as_problems(gram, weights)
    S = _as_support(support, W)
    x = masked_solve(G, torch.einsum("bij,bj->bi", G, W), S)
    return x if batched else x[0]


def support_error(gram, weights, support) -> torch.Tensor:
    """``e(S)``: the error ``(w - x)' G (w - x)`` of the refit ``x`` on ``support`` (float64, ``(B,)``)."""
    G, W, batched = as_problems(gram, weights)
    x = refit(G, W, _as_support(support, W))
    error = reconstruction_error(G, W, x)
    return error if batched else error[0]
