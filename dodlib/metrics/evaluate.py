"""Glue: streams of uint8 image batches → reference statistics and metric dicts.

Memory: feature moments are accumulated per batch (O(D²)). Precision/recall need the generated
features themselves; they are kept as float32 (50K × 2048 ≈ 400 MB) — or a seeded subsample of
``max_gen`` — plus the Inception probabilities for IS (50K × 1008 float32 ≈ 200 MB). Reference
features for P/R are a seeded reservoir sample of at most ``max_ref`` rows (default 10K, as ADM).
"""

from __future__ import annotations

import logging
import time
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from ..progress import progress as _reporter

from .detectors import Detector
from .inception_score import InceptionScoreAccumulator
from .measures import measure_keys
from .prdc import precision_recall
from .stats import StreamingMoments, atomic_savez, frechet_distance

log = logging.getLogger(__name__)

DEFAULT_MAX_REF = 10_000


class Reservoir:
    """Seeded uniform sample of at most ``max_n`` rows from a stream (all rows if ``max_n`` is None).

    Algorithm R: row i (0-based, global) replaces a random slot with probability max_n/(i+1).
    Deterministic for a given seed and row order, independent of how rows are batched.
    """

    def __init__(self, max_n: int | None, seed: int = 0):
        self.max_n = max_n
        self.rng = np.random.default_rng(seed)
        self.seen = 0
        self._parts: list[np.ndarray] = []
        self._buf: np.ndarray | None = None

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float32)
        n = len(rows)
        if self.max_n is None:
            self._parts.append(rows)
            self.seen += n
            return
        if self._buf is None:
            self._buf = np.empty((self.max_n, rows.shape[1]), np.float32)
        take = max(0, min(n, self.max_n - self.seen))  # fill phase
        self._buf[self.seen : self.seen + take] = rows[:take]
        rest = np.arange(take, n)
        if len(rest):
            # One draw per later row, j ~ U{0..i}; replace if it lands in the reservoir.
            slots = self.rng.integers(0, self.seen + rest + 1)
            for r, j in zip(rest[slots < self.max_n], slots[slots < self.max_n]):
                self._buf[j] = rows[r]  # in order, so a later row wins a shared slot as in Algorithm R
        self.seen += n

    def array(self) -> np.ndarray | None:
        if self.max_n is None:
            return np.concatenate(self._parts) if self._parts else None
        return None if self._buf is None else self._buf[: min(self.seen, self.max_n)].copy()


def _progress(it, desc, progress, total=None):
    if total is None and hasattr(it, "__len__"):
        total = len(it)
    return _reporter(it, desc=desc, total=total, enabled=progress, unit="batch")


# ---- reference --------------------------------------------------------------------------------

def compute_reference(
    batches: Iterable,
    detector: Detector,
    *,
    max_ref: int | None = DEFAULT_MAX_REF,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Feature statistics of real images: mu/sigma over all images + a seeded feature subsample for P/R."""
    moments, reservoir = StreamingMoments(), Reservoir(max_ref, seed)
    t0 = time.perf_counter()
    for batch in _progress(batches, f"reference [{detector.name}]", progress):
        feats, _ = detector.features_and_logits(batch)
        moments.update(feats)
        reservoir.add(feats)
    log.info("reference: %d images in %.1fs (%.0f img/s)", moments.count, *_rate(moments.count, t0))
    return {
        "detector": detector.name,
        "metric_prefix": detector.metric_prefix,
        "feature_dim": detector.feature_dim,
        "mu": moments.mean,
        "sigma": moments.cov,
        "count": moments.count,
        "features": reservoir.array(),
    }


def _rate(n, t0):
    dt = time.perf_counter() - t0
    return dt, n / dt if dt > 0 else float("nan")


def save_reference(path: str | Path, reference: dict) -> None:
    """One .npz: mu, sigma, count, features (possibly 0 rows), detector, metric_prefix. Atomic."""
    feats = reference.get("features")
    if feats is None:
        feats = np.zeros((0, len(reference["mu"])), np.float32)
    atomic_savez(
        path,
        mu=np.asarray(reference["mu"], np.float64),
        sigma=np.asarray(reference["sigma"], np.float64),
        count=np.int64(reference.get("count", -1)),
        features=np.asarray(feats, np.float32),
        detector=np.array(reference["detector"]),
        metric_prefix=np.array(reference.get("metric_prefix", "")),
    )


def _iter_npz_rows(path: Path, key: str, rows: int) -> Iterator[np.ndarray]:
    """Stream an array stored in an .npz in chunks of rows, without loading it whole.

    ADM reference batches hold 10K 256² images (~2 GB) in ``arr_0``.
    """
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        fmt = np.lib.format
        major, _ = fmt.read_magic(f)
        read_header = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}:{key}: unsupported array layout")
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], rows):
            n = min(rows, shape[0] - start)
            buf = f.read(n * row_bytes)
            yield np.frombuffer(buf, dtype=dtype).reshape((n, *shape[1:]))


def load_reference(
    path: str | Path,
    detector: Detector | None = None,
    *,
    max_ref: int | None = DEFAULT_MAX_REF,
    seed: int = 0,
    batch_size: int = 250,
    progress: bool = True,
) -> dict:
    """Load a reference saved by ``save_reference``, or an ADM reference batch (.npz).

    ADM batches carry Inception ``mu``/``sigma`` (used as they are) and the reference images in
    ``arr_0``; their features for precision/recall are computed with ``detector`` if one is given.
    Without images or a detector the reference has no features and P/R are skipped (warning).
    """
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        ref = {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64)}
        if "detector" in keys:  # our own format
            ref.update(
                detector=str(z["detector"]),
                metric_prefix=str(z["metric_prefix"]),
                count=int(z["count"]),
                features=z["features"] if len(z["features"]) else None,
            )
        else:  # ADM reference batch: statistics of TF Inception pool3
            ref.update(detector="inception", metric_prefix="FID", count=int(z["count"]) if "count" in keys else -1, features=None)
    ref["feature_dim"] = int(ref["mu"].shape[0])

    if detector is not None and (detector.name != ref["detector"] or detector.feature_dim != ref["feature_dim"]):
        raise ValueError(
            f"reference {path} was computed with '{ref['detector']}' ({ref['feature_dim']}-d), "
            f"not with detector '{detector.name}' ({detector.feature_dim}-d)"
        )
    if ref["features"] is None and "arr_0" in keys:
        if detector is None:
            log.warning("%s: reference images present but no detector given; precision/recall will be skipped", path)
        else:
            reservoir = Reservoir(max_ref, seed)
            for imgs in _progress(_iter_npz_rows(path, "arr_0", batch_size), f"reference features [{detector.name}]", progress):
                reservoir.add(detector.features_and_logits(imgs)[0])
            ref["features"] = reservoir.array()
    elif ref["features"] is None:
        log.warning("%s: reference has no features or images; precision/recall will be skipped", path)
    return ref


# ---- evaluation -------------------------------------------------------------------------------

def _label_batches(labels) -> Iterator | None:
    """Labels as one flat array (sliced to follow the batches) or as an iterable of per-batch arrays."""
    if labels is None:
        return None
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    if isinstance(labels, (list, tuple)) and labels and np.ndim(labels[0]) == 0:
        labels = np.asarray(labels)
    if isinstance(labels, np.ndarray) and labels.ndim == 1:
        return _FlatLabels(labels)
    return iter(labels)


class _FlatLabels:
    def __init__(self, labels: np.ndarray):
        self.labels, self.offset = labels, 0

    def take(self, n: int) -> np.ndarray:
        out = self.labels[self.offset : self.offset + n]
        if len(out) != n:
            raise ValueError(f"labels run out at sample {self.offset + len(out)}")
        self.offset += n
        return out


def evaluate_images(
    batches: Iterable,
    detector: Detector,
    reference: dict,
    *,
    labels=None,
    num_classes: int | None = None,
    k: int = 3,
    is_splits: int = 10,
    max_gen: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Metrics of generated uint8 image batches against a reference (``compute_reference``/``load_reference``).

    Returns {"detector", "num_samples", "<metric_prefix>" (Fréchet distance), "IS", "IS_std",
    "precision", "recall", ["class_accuracy"]}. ``class_accuracy`` (argmax of the detector's logits
    vs the conditioning ``labels``) only for detectors whose logits are the data set's classes.
    P/R are None when the reference has no features.
    """
    if reference["detector"] != detector.name:
        raise ValueError(f"reference is for detector '{reference['detector']}', evaluating with '{detector.name}'")
    if detector.logits_are_labels and num_classes is not None and detector.num_logits != num_classes:
        raise ValueError(f"detector has {detector.num_logits} classes, data set has {num_classes}")

    ref_feats = reference.get("features")
    want_pr = ref_feats is not None and len(ref_feats) > k
    if not want_pr:
        log.warning("precision/recall skipped: the reference has %s features, they need more than k=%d",
                    0 if ref_feats is None else len(ref_feats), k)
    label_src = _label_batches(labels) if detector.logits_are_labels else None

    moments, gen = StreamingMoments(), Reservoir(max_gen, seed) if want_pr else None
    is_acc = InceptionScoreAccumulator(is_splits) if detector.num_logits else None
    correct = 0
    t0 = time.perf_counter()
    for batch in _progress(batches, f"evaluate [{detector.name}]", progress):
        feats, logits = detector.features_and_logits(batch)
        if not (torch.isfinite(feats).all() if torch.is_tensor(feats) else np.isfinite(feats).all()):
            raise ValueError(f"evaluate [{detector.name}]: non-finite detector features in the batch after "
                             f"{moments.count} samples (NaN images?); refusing to report metrics of them")
        moments.update(feats)
        if gen is not None:
            gen.add(feats)
        if is_acc is not None and logits is not None:
            is_acc.update(logits)
        if label_src is not None:
            y = label_src.take(len(feats)) if isinstance(label_src, _FlatLabels) else next(label_src)
            y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y).reshape(-1)
            if len(y) != len(feats):
                raise ValueError(f"label batch of {len(y)} for an image batch of {len(feats)}")
            correct += int((logits.argmax(axis=1) == y).sum())
    n = moments.count
    log.info("evaluate: %d samples in %.1fs (%.0f img/s)", n, *_rate(n, t0))

    out: dict = {"detector": detector.name, "num_samples": n}
    out[detector.metric_prefix] = frechet_distance(moments.mean, moments.cov, reference["mu"], reference["sigma"])
    if is_acc is not None:
        if is_acc.count >= is_splits:
            out["IS"], out["IS_std"] = is_acc.compute()
        else:
            log.warning("only %d samples: IS needs at least %d (one per split); skipped", is_acc.count, is_splits)
    out["precision"] = out["recall"] = None
    if want_pr and n > k:
        out.update(precision_recall(ref_feats, gen.array(), k=k, device=detector.device))
    elif want_pr:
        log.warning("only %d samples: precision/recall need more than k=%d; skipped", n, k)
    if label_src is not None:
        out["class_accuracy"] = correct / n
    undeclared = set(out) - {"detector", "num_samples", detector.metric_prefix, *measure_keys("detector")}
    if undeclared:  # the report would silently drop them: declare them in dodlib/metrics/measures.py
        raise RuntimeError(f"evaluate_images: measures {sorted(undeclared)} are not in metrics/measures.py")
    out["reference_count"] = int(reference.get("count", -1))
    out["num_ref_features"] = 0 if ref_feats is None else int(len(ref_feats))
    return out
