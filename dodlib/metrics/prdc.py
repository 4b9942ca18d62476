"""Improved precision and recall (Kynkäänniemi et al., 2019), k = 3 by default.

Each set's manifold is the union of balls around its points, with radius = distance to the
point's k-th nearest neighbour within its own set.
- precision: fraction of generated points inside the real manifold (are samples realistic?)
- recall:    fraction of real points inside the generated manifold (is the data covered?)

Pairwise distances are computed in row chunks with ``torch.cdist`` so that no N×M matrix is ever
materialised: at 50K generated × 10K reference × 2048-d features the peak is one chunk of the
distance matrix (bounded by ``max_chunk_bytes``) rather than 50K × 10K floats.
"""

from __future__ import annotations

import numpy as np
import torch


def _to_tensor(x, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        t = torch.from_numpy(np.ascontiguousarray(x))
    # float32 is what the reference implementations use; distances of 2048-d features are fine in it.
    return t.to(device=device, dtype=torch.float32)


def _row_chunk(n_cols: int, max_chunk_bytes: int) -> int:
    return max(1, int(max_chunk_bytes // (4 * max(n_cols, 1))))


def knn_radii(features, k: int = 3, *, device="cpu", max_chunk_bytes: int = 256 * 2**20) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (self excluded)."""
    x = _to_tensor(features, device)
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} points to estimate k-NN radii, have {n}")
    radii = torch.empty(n, device=x.device)
    step = _row_chunk(n, max_chunk_bytes)
    for start in range(0, n, step):
        d = torch.cdist(x[start : start + step], x)
        # The point itself is at distance 0 and is the first of the k+1 smallest.
        radii[start : start + step] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, max_chunk_bytes: int) -> float:
    """Fraction of query points within radii[j] of some support point j."""
    inside = 0
    step = _row_chunk(support.shape[0], max_chunk_bytes)
    for start in range(0, queries.shape[0], step):
        d = torch.cdist(queries[start : start + step], support)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / queries.shape[0]


def subsample(features, max_n: int | None, seed: int = 0):
    """Seeded subset of at most ``max_n`` rows (order preserved); returns input if already small."""
    n = len(features)
    if max_n is None or n <= max_n:
        return features
    idx = np.sort(np.random.default_rng(seed).choice(n, size=max_n, replace=False))
    return features[idx]


def precision_recall(
    real_features,
    gen_features,
    *,
    k: int = 3,
    max_ref: int | None = None,
    seed: int = 0,
    device="cpu",
    max_chunk_bytes: int = 256 * 2**20,
) -> dict[str, float]:
    """Improved precision and recall of ``gen_features`` against ``real_features`` ([N, D] arrays).

    ``max_ref`` subsamples the real features (seeded) — ADM's evaluator uses 10K reference images
    against 50K samples.
    """
    real = _to_tensor(subsample(real_features, max_ref, seed), device)
    gen = _to_tensor(gen_features, device)
    if real.shape[1] != gen.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape[1]} vs generated {gen.shape[1]}")
    real_radii = knn_radii(real, k, device=device, max_chunk_bytes=max_chunk_bytes)
    gen_radii = knn_radii(gen, k, device=device, max_chunk_bytes=max_chunk_bytes)
    return {
        "precision": _coverage(gen, real, real_radii, max_chunk_bytes),
        "recall": _coverage(real, gen, gen_radii, max_chunk_bytes),
    }
