"""Inception Score from classifier logits: IS = exp(E_x KL(p(y|x) || p(y))).

Computed over ``splits`` contiguous, near-equal parts of the sample sequence (mean ± std over
splits), as in the original implementation; ADM's evaluator uses parts of 5,000 samples, which at
50K samples is the default ``splits=10``.

Per split, E_x KL = mean_x Σ_y p log p − Σ_y p̄ log p̄ (p̄ = the split's marginal), so only the
probabilities are needed. The accumulator keeps them as float32: 50K × 1008 Inception classes is
~200 MB; for a data-set feature net with ~10 classes it is negligible.

Note on Inception: the original IS (and ADM, StyleGAN) use the softmax of pool3 @ W *without* the
output bias; ``InceptionDetector`` returns exactly those logits.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import log_softmax, xlogy


def _probs(logits) -> np.ndarray:
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().numpy()
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape [N, C], got {logits.shape}")
    return np.exp(log_softmax(logits, axis=1))


def inception_score_from_probs(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    probs = np.asarray(probs, dtype=np.float64)
    n = probs.shape[0]
    if n < splits:
        raise ValueError(f"need at least {splits} samples for {splits} splits, have {n}")
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0)
        # xlogy(0, 0) = 0, so classes with underflowed probability contribute nothing (no NaN).
        kl = xlogy(part, part).sum(axis=1).mean() - xlogy(marginal, marginal).sum()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """IS (mean, std over splits) from logits [N, C]."""
    return inception_score_from_probs(_probs(logits), splits)


class InceptionScoreAccumulator:
    """Feed logits batch by batch; ``compute()`` gives (mean, std) over splits."""

    def __init__(self, splits: int = 10):
        self.splits = splits
        self._parts: list[np.ndarray] = []
        self.count = 0

    def update(self, logits) -> None:
        p = _probs(logits).astype(np.float32)
        self._parts.append(p)
        self.count += p.shape[0]

    def compute(self) -> tuple[float, float]:
        if not self._parts:
            raise ValueError("no logits accumulated")
        return inception_score_from_probs(np.concatenate(self._parts), self.splits)
