"""Streaming feature statistics and the Fréchet distance.

Feature moments are accumulated batch by batch in float64, so evaluating 50K samples never needs
all features in memory at once, and the result does not depend on the batch size (up to float64
rounding).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from scipy import linalg

from ..io import atomic_path

log = logging.getLogger(__name__)


def atomic_savez(path: str | Path, **arrays) -> None:
    """Write an .npz atomically (dodlib.io.atomic_path: a killed job never leaves a file that looks
    complete, and the file gets the ordinary, group-readable mode)."""
    with atomic_path(path) as tmp:
        # Writing through a file object stops numpy from appending ".npz" to the temp name.
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _as_2d_float64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected features of shape [N, D], got {x.shape}")
    return x


class StreamingMoments:
    """Running mean and covariance of feature vectors.

    Keeps count, sum and sum of outer products in float64. The data are shifted by a fixed vector
    (the first batch's mean) before accumulating: sum(x x^T) - n mu mu^T cancels badly when the
    mean is large relative to the spread, and the shift removes most of that without a second pass.

    ``cov`` is the unbiased sample covariance (ddof=1), as ``np.cov(rowvar=False)`` used by
    clean-fid, ADM's evaluator and pytorch-fid.
    """

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None
        # Set when loaded from a file that holds only mu/sigma (e.g. an ADM reference batch).
        self._frozen: tuple[np.ndarray, np.ndarray] | None = None

    # ---- accumulation -------------------------------------------------------------------
    def update(self, features) -> "StreamingMoments":
        if self._frozen is not None:
            raise RuntimeError("these moments were loaded from mu/sigma only and cannot be updated")
        x = _as_2d_float64(features)
        if x.shape[0] == 0:
            return self
        if self.dim is None:
            self.dim = x.shape[1]
        if x.shape[1] != self.dim:
            raise ValueError(f"feature dim {x.shape[1]} != accumulated dim {self.dim}")
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros(self.dim)
            self._outer = np.zeros((self.dim, self.dim))
        xc = x - self._shift
        self._sum += xc.sum(axis=0)
        self._outer += xc.T @ xc
        self.count += x.shape[0]
        return self

    def merge(self, other: "StreamingMoments") -> "StreamingMoments":
        """Add another accumulator's data (e.g. from another GPU/shard)."""
        if other.count == 0:
            return self
        if other._frozen is not None or self._frozen is not None:
            raise RuntimeError("cannot merge moments loaded from mu/sigma only")
        if self.count == 0:
            self.dim, self.count = other.dim, other.count
            self._shift, self._sum, self._outer = other._shift.copy(), other._sum.copy(), other._outer.copy()
            return self
        if other.dim != self.dim:
            raise ValueError(f"feature dim {other.dim} != {self.dim}")
        # Re-express the other's sums around our shift: x - a = (x - b) + (b - a).
        d = other._shift - self._shift
        self._outer += other._outer + np.outer(other._sum, d) + np.outer(d, other._sum) + other.count * np.outer(d, d)
        self._sum += other._sum + other.count * d
        self.count += other.count
        return self

    # ---- results ------------------------------------------------------------------------
    @property
    def mean(self) -> np.ndarray:
        if self._frozen is not None:
            return self._frozen[0]
        if self.count == 0:
            raise ValueError("no features accumulated")
        return self._shift + self._sum / self.count

    @property
    def cov(self) -> np.ndarray:
        if self._frozen is not None:
            return self._frozen[1]
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.count}")
        m = self._sum / self.count
        cov = (self._outer - self.count * np.outer(m, m)) / (self.count - 1)
        return (cov + cov.T) / 2  # exact symmetry for sqrtm

    # ---- persistence --------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Save as .npz with ``mu``, ``sigma``, ``count`` (+ raw accumulators for merging)."""
        arrays = {"mu": self.mean, "sigma": self.cov, "count": np.int64(self.count)}
        if self._frozen is None:
            arrays.update(shift=self._shift, sum=self._sum, outer=self._outer)
        atomic_savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "StreamingMoments":
        """Load our own .npz, or any .npz with ``mu``/``sigma`` (ADM reference batches, clean-fid stats).

        Files with only mu/sigma give frozen moments: ``mean``/``cov`` work, ``update`` does not.
        """
        with np.load(path, allow_pickle=False) as z:
            return cls.from_arrays(z)

    @classmethod
    def from_arrays(cls, z) -> "StreamingMoments":
        if "mu" not in z or "sigma" not in z:
            raise KeyError(f"statistics need 'mu' and 'sigma' arrays, found {list(z.keys())}")
        mu = np.asarray(z["mu"], dtype=np.float64)
        sigma = np.asarray(z["sigma"], dtype=np.float64)
        m = cls(dim=mu.shape[0])
        m.count = int(z["count"]) if "count" in z else -1  # -1: unknown (ADM files carry no count)
        if all(k in z for k in ("shift", "sum", "outer")) and m.count > 0:
            m._shift = np.asarray(z["shift"], np.float64)
            m._sum = np.asarray(z["sum"], np.float64)
            m._outer = np.asarray(z["outer"], np.float64)
        else:
            m._frozen = (mu, sigma)
        return m


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # No `disp` argument: deprecated since SciPy 1.16. The singular-matrix warning is handled by
    # the caller's finiteness check, so keep it out of the logs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d² = |mu1 - mu2|² + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}).
    Same numerics as the reference FID code: if the matrix square root is not finite (singular
    product, e.g. fewer samples than dimensions) retry with ``eps`` added to both diagonals; drop
    an imaginary part that is only rounding noise.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances differ in shape: {sigma1.shape} vs {sigma2.shape}")

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        log.warning("Fréchet distance: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: large imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
