"""Tests for dodlib.metrics: statistics, FD, P/R, IS, detectors and the evaluate glue (CPU, fast)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dodlib.metrics import (
    INCEPTION_PARAMS_KEY,
    INCEPTION_URL,
    FeatureNetDetector,
    InceptionDetector,
    InceptionScoreAccumulator,
    Reservoir,
    StreamingMoments,
    compute_reference,
    evaluate_images,
    frechet_distance,
    inception_score,
    knn_radii,
    legacy_tf_resize,
    load_feature_net,
    load_reference,
    precision_recall,
    save_feature_net,
    save_reference,
    train_feature_net,
)


def _random_cov(rng, d, n=None):
    a = rng.normal(size=(n or 2 * d, d))
    return np.cov(a, rowvar=False)


def _batches(images, size):
    return [images[i : i + size] for i in range(0, len(images), size)]


# ---- Fréchet distance & moments -------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # clean-fid passes SciPy's deprecated `disp`
def test_frechet_matches_cleanfid():
    from cleanfid.fid import frechet_distance as cf_fd

    rng = np.random.default_rng(0)
    # d >= 2: SciPy 1.17's sqrtm(disp=False) returns no error estimate for 1x1 input, which breaks
    # clean-fid's own function there (ours is checked at d=1 below).
    for d in (2, 5, 32):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(cf_fd(mu1, s1, mu2, s2), rel=1e-6, abs=1e-8)


def test_frechet_closed_form_diagonal():
    rng = np.random.default_rng(1)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-9)
    assert frechet_distance(1.0, 4.0, 3.0, 9.0) == pytest.approx(4 + 1)  # scalars: (1-3)² + (2-3)²


def test_frechet_singular_covariance_is_finite():
    rng = np.random.default_rng(2)
    d = 20
    s1, s2 = _random_cov(rng, d, n=5), _random_cov(rng, d, n=5)  # rank 4 < d
    fd = frechet_distance(np.zeros(d), s1, np.zeros(d), s2)
    assert np.isfinite(fd) and fd > 0


def test_streaming_moments_match_numpy_and_merge(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(503, 7)) * rng.uniform(0.5, 2, 7) + 1e4  # large offset: tests the shift
    ref_mu, ref_cov = x.mean(0), np.cov(x, rowvar=False)
    for bs in (1, 64, 503):
        m = StreamingMoments()
        for b in _batches(x, bs):
            m.update(b)
        assert m.count == 503
        np.testing.assert_allclose(m.mean, ref_mu, rtol=1e-12)
        np.testing.assert_allclose(m.cov, ref_cov, rtol=1e-8, atol=1e-10)

    a, b = StreamingMoments().update(x[:200]), StreamingMoments().update(torch.from_numpy(x[200:]))
    a.merge(b)
    np.testing.assert_allclose(a.cov, ref_cov, rtol=1e-8, atol=1e-10)

    a.save(tmp_path / "m.npz")
    z = np.load(tmp_path / "m.npz")
    assert {"mu", "sigma", "count"} <= set(z.files) and int(z["count"]) == 503
    loaded = StreamingMoments.load(tmp_path / "m.npz")
    loaded.update(x[:10])  # raw accumulators saved: can keep accumulating
    assert loaded.count == 513


def test_moments_load_adm_style_npz(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.normal(size=6), _random_cov(rng, 6)
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    m = StreamingMoments.load(tmp_path / "adm.npz")
    np.testing.assert_array_equal(m.mean, mu)
    np.testing.assert_array_equal(m.cov, sigma)
    with pytest.raises(RuntimeError):
        m.update(np.zeros((2, 6)))


# ---- precision / recall -------------------------------------------------------------------------

def test_pr_identical_and_disjoint():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(300, 16)).astype(np.float32)
    assert precision_recall(real, real.copy()) == {"precision": 1.0, "recall": 1.0}
    far = real + 1000.0
    assert precision_recall(real, far) == {"precision": 0.0, "recall": 0.0}


def test_pr_half_the_modes():
    rng = np.random.default_rng(6)
    centres = rng.normal(size=(10, 8)) * 50  # 10 well-separated modes
    real = np.concatenate([c + rng.normal(size=(60, 8)) for c in centres])
    # Generated = the first five modes' real points, slightly jittered: realistic but covers half.
    gen = real[: 5 * 60] + rng.normal(size=(5 * 60, 8)) * 0.01
    pr = precision_recall(real, gen, k=3)
    assert pr["precision"] > 0.95
    assert abs(pr["recall"] - 0.5) < 0.05
    # Chunked distances give identical results to one big block.
    assert precision_recall(real, gen, k=3, max_chunk_bytes=4 * 600 * 7) == pr


def test_knn_radii_and_subsampling():
    x = np.arange(10, dtype=np.float32)[:, None]  # 1-d points 0..9
    r = knn_radii(x, k=3).numpy()
    assert r[0] == 3 and r[5] == 2  # point 5: neighbours at 4, 6, 3/7 → 2
    rng = np.random.default_rng(7)
    real, gen = rng.normal(size=(400, 4)), rng.normal(size=(100, 4))
    a = precision_recall(real, gen, max_ref=150, seed=1)
    assert a == precision_recall(real, gen, max_ref=150, seed=1)  # seeded subsample


def test_reservoir_is_independent_of_batching():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(1000, 3)).astype(np.float32)
    outs = []
    for bs in (1, 7, 1000):
        r = Reservoir(100, seed=3)
        for b in _batches(x, bs):
            r.add(b)
        outs.append(r.array())
    assert outs[0].shape == (100, 3)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    assert Reservoir(None).array() is None


# ---- Inception score ----------------------------------------------------------------------------

def test_inception_score_bounds():
    mean, std = inception_score(np.zeros((200, 10)))
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)

    c = 8
    logits = np.full((c * 10 * 4, c), -60.0)
    logits[np.arange(len(logits)), np.arange(len(logits)) % c] = 60.0  # confident, classes even in every split
    mean, _ = inception_score(logits, splits=10)
    assert mean == pytest.approx(c, rel=1e-6)

    rng = np.random.default_rng(9)
    logits = rng.normal(size=(500, 12)) * 3
    acc = InceptionScoreAccumulator(splits=10)
    for b in _batches(logits, 37):
        acc.update(torch.from_numpy(b))
    np.testing.assert_allclose(acc.compute(), inception_score(logits), rtol=1e-5)


# ---- Inception detector (stand-in net, real code path) ------------------------------------------

class TinyInception(nn.Module):
    """Stand-in with the FID Inception contract: float [B,3,299,299] in [0,255] → (features, logits)."""

    def __init__(self, dim=32, classes=20):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # fixed weights without touching the global RNG
            torch.manual_seed(0)
            self.conv1 = nn.Conv2d(3, 16, 8, stride=8)
            self.conv2 = nn.Conv2d(16, dim, 4, stride=4)
            self.fc = nn.Linear(dim, classes)
        self.seen_shapes = []

    def forward(self, x):
        self.seen_shapes.append(tuple(x.shape[-2:]))
        h = F.relu(self.conv1((x - 128) / 128))
        f = F.relu(self.conv2(h)).mean((2, 3))
        return f, self.fc(f)


def _random_images(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_inception_standin_full_evaluate_path(tmp_path):
    net = TinyInception()
    det = InceptionDetector.from_module(net, batch_size=16)
    assert (det.name, det.metric_prefix, det.feature_dim, det.num_logits) == ("inception", "FID", 32, 20)

    real = _random_images(96, 24, seed=0)
    gen = _random_images(80, 24, seed=1)
    ref = compute_reference(_batches(real, 40), det, max_ref=64, progress=False)
    assert ref["count"] == 96 and ref["features"].shape == (64, 32)
    assert all(s == (299, 299) for s in net.seen_shapes)  # resized before the network

    save_reference(tmp_path / "ref.npz", ref)
    ref2 = load_reference(tmp_path / "ref.npz", det)
    np.testing.assert_array_equal(ref2["features"], ref["features"])
    np.testing.assert_allclose(ref2["sigma"], ref["sigma"])

    out = evaluate_images(iter(_batches(gen, 33)), det, ref2, progress=False)
    assert out["detector"] == "inception" and out["num_samples"] == 80
    assert out["FID"] > 0 and np.isfinite(out["FID"])
    assert out["IS"] >= 1.0 and "IS_std" in out
    assert 0 <= out["precision"] <= 1 and 0 <= out["recall"] <= 1
    assert "class_accuracy" not in out  # ImageNet classes are not the data set's labels

    # Same images as the reference → distance ~0 and full precision/recall.
    ref_all = compute_reference(_batches(real, 40), det, max_ref=None, progress=False)
    same = evaluate_images(_batches(real, 17), det, ref_all, progress=False)
    assert abs(same["FID"]) < 1e-6 and same["precision"] == 1.0 and same["recall"] == 1.0


def test_inception_detector_batch_invariance_and_uint8_contract():
    det = InceptionDetector.from_module(TinyInception(), batch_size=8)
    imgs = _random_images(20, 16, seed=2)
    f1, l1 = det.features_and_logits(imgs)
    det.batch_size = 20
    f2, l2 = det.features_and_logits(torch.from_numpy(imgs))
    np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        det.features_and_logits(imgs.astype(np.float32))


def test_legacy_tf_resize_matches_affine_grid_sample():
    # The TorchScript FID Inception resizes with affine_grid + grid_sample (border, no align_corners)
    # shifted so output pixel i samples input i*in/out — TF1 resize_bilinear.
    for h, w in [(37, 53), (64, 64), (320, 400)]:
        x = torch.randint(0, 256, (2, 3, h, w)).float()
        theta = torch.eye(2, 3)
        theta[0, 2] += 1 / w - 1 / 299
        theta[1, 2] += 1 / h - 1 / 299
        grid = F.affine_grid(theta[None].repeat(2, 1, 1), [2, 3, 299, 299], align_corners=False)
        ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        assert (legacy_tf_resize(x) - ref).abs().max() < 0.05  # float32 coordinate rounding only
    y = torch.rand(1, 3, 299, 299)
    assert torch.equal(legacy_tf_resize(y), y)
    # TF1 convention: output pixel 0 is input pixel 0 exactly (no half-pixel shift).
    z = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert legacy_tf_resize(z, 8)[0, 0, 0, 0] == 0 and legacy_tf_resize(z, 8)[0, 0, 0, 1] == 0.5


class FakeTorchScriptInception(nn.Module):
    """Same interface as NVIDIA's ``inception-2015-12-05.pt`` TorchScript (what clean-fid loads):
    ``layers`` (normalised 299² input → [B, 2048, 1, 1]), ``output`` (Linear 2048 → 1008), and
    ``forward(img, return_features)`` that resizes internally (TF1 bilinear via affine grid)."""

    def __init__(self, tf1_resize: bool = True):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.ReLU(), nn.Conv2d(8, 2048, 1), nn.AdaptiveAvgPool2d(1))
        self.output = nn.Linear(2048, 1008)
        self.tf1_resize = tf1_resize

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        b, c, h, w = img.shape
        x = img.to(torch.float32)
        if self.tf1_resize:
            theta = torch.eye(2, 3, device=x.device)
            theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
            theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
            grid = F.affine_grid(theta.unsqueeze(0).repeat(b, 1, 1), [b, c, 299, 299], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        else:  # some other resize: the detector must notice and defer to it
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=True)
        features = self.layers((x - 128) / 128).reshape(-1, 2048)
        if return_features:
            return features
        return torch.softmax(self.output(features), 1)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # building the stand-in file only
@pytest.mark.parametrize("tf1_resize", [True, False])
def test_inception_torchscript_loading(tmp_path, caplog, tf1_resize):
    torch.manual_seed(0)
    fake = FakeTorchScriptInception(tf1_resize).eval()
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(fake), str(path))
    with caplog.at_level(logging.WARNING):
        det = InceptionDetector(tmp_path)  # a directory holding the file works too
    assert (det.feature_dim, det.num_logits) == (2048, 1008)
    assert det._resize_outside == tf1_resize
    assert ("internal resize" in caplog.text) != tf1_resize

    imgs = _random_images(3, 40, seed=4)
    feats, logits = det.features_and_logits(imgs)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        ref_feats = fake(x, return_features=True)
        ref_logits = ref_feats @ fake.output.weight.T  # IS logits: no output bias
    np.testing.assert_allclose(feats, ref_feats.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=1e-3, atol=1e-4)


def test_missing_inception_weights_message(tmp_path):
    missing = tmp_path / "weights" / "inception-2015-12-05.pt"
    with pytest.raises(FileNotFoundError) as e:
        InceptionDetector(missing)
    msg = str(e.value)
    assert INCEPTION_PARAMS_KEY in msg and "eval.inception_weights" in msg
    assert INCEPTION_URL in msg and ("wget" in msg or "curl" in msg)
    assert str(missing) in msg
    with pytest.raises(FileNotFoundError):
        InceptionDetector(tmp_path)  # a directory without the file


# ---- data-set feature net -----------------------------------------------------------------------

def _toy_dataset(n, seed, size=16):
    """4 classes: red square, green square, blue horizontal stripes, yellow vertical stripes (+ noise)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, size=n)
    imgs = rng.normal(40, 25, size=(n, size, size, 3))
    for i, c in enumerate(y):
        if c < 2:
            s = rng.integers(4, 9)
            r0, c0 = rng.integers(0, size - s, 2)
            imgs[i, r0 : r0 + s, c0 : c0 + s, c] += 180
        else:
            stripes = (np.arange(size) // 2 % 2 == rng.integers(0, 2)).astype(float) * 180
            col = np.array([0, 0, 1.0]) if c == 2 else np.array([1.0, 1, 0])
            pat = stripes[:, None] if c == 2 else stripes[None, :]
            imgs[i] += pat[..., None] * col
    return np.clip(imgs, 0, 255).astype(np.uint8), y


def test_feature_net_trains_saves_and_evaluates(tmp_path):
    x_tr, y_tr = _toy_dataset(480, seed=0)
    x_te, y_te = _toy_dataset(160, seed=1)
    model, train_log = train_feature_net(
        x_tr, y_tr, 4, epochs=3, batch_size=32, seed=0, dataset="toy", progress=False
    )
    assert len(train_log) == 3 and "val_acc" in train_log[-1]
    det = FeatureNetDetector(model)
    assert (det.name, det.metric_prefix) == ("features_toy", "FD_toy")
    feats, logits = det.features_and_logits(x_te)
    assert feats.shape == (160, 128) and logits.shape == (160, 4)
    assert (logits.argmax(1) == y_te).mean() > 0.9

    path = tmp_path / "fnet" / "feature_net.safetensors"
    save_feature_net(model, path, extra={"val_acc": train_log[-1]["val_acc"]})
    assert path.with_suffix(".json").is_file()
    det2 = FeatureNetDetector.load(path)
    f2, l2 = det2.features_and_logits(x_te)
    np.testing.assert_array_equal(feats, f2)
    np.testing.assert_array_equal(logits, l2)
    assert load_feature_net(path).config == model.config

    # Evaluate held-out real images as "samples": small distance, high class accuracy; labels may be
    # one flat array or one array per batch.
    ref = compute_reference(_batches(x_tr, 100), det2, progress=False)
    out = evaluate_images(_batches(x_te, 50), det2, ref, labels=y_te, num_classes=4, progress=False)
    assert "FD_toy" in out and "FID" not in out
    assert out["class_accuracy"] > 0.9 and out["precision"] > 0.5 and out["recall"] > 0.5
    out2 = evaluate_images(_batches(x_te, 50), det2, ref, labels=iter(_batches(y_te, 50)), num_classes=4, progress=False)
    assert out2 == out
    # A collapsed generator (one class only) is far away and has low recall.
    collapsed = x_te[y_te == 0]
    bad = evaluate_images(_batches(collapsed, 50), det2, ref, labels=np.zeros(len(collapsed), int), progress=False)
    assert bad["FD_toy"] > 5 * out["FD_toy"] and bad["recall"] < 0.5
    with pytest.raises(ValueError):
        evaluate_images(_batches(x_te, 50), det2, ref, labels=y_te, num_classes=10, progress=False)


def test_adm_reference_batch(tmp_path, caplog):
    det = InceptionDetector.from_module(TinyInception(), batch_size=16)
    imgs = _random_images(40, 20, seed=3)
    real = compute_reference(_batches(imgs, 40), det, progress=False)
    # ADM reference batches: mu/sigma from TF Inception + the images in arr_0 (no features).
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=imgs, mu=real["mu"], sigma=real["sigma"])

    ref = load_reference(tmp_path / "VIRTUAL_ref.npz", det, batch_size=7, progress=False)
    assert ref["detector"] == "inception" and ref["count"] == -1
    np.testing.assert_allclose(ref["features"], real["features"], rtol=1e-5, atol=1e-6)

    with caplog.at_level(logging.WARNING):
        bare = load_reference(tmp_path / "VIRTUAL_ref.npz", None)
    assert bare["features"] is None and "precision/recall" in caplog.text
    out = evaluate_images(_batches(imgs[:30], 10), det, bare, progress=False)
    assert out["precision"] is None and out["recall"] is None and np.isfinite(out["FID"])

    other = FeatureNetDetector(train_feature_net(*_toy_dataset(40, 0), 4, epochs=1, progress=False)[0])
    with pytest.raises(ValueError, match="detector"):
        load_reference(tmp_path / "VIRTUAL_ref.npz", other)
