"""Tests of the linear interpolant, the velocity loss and the SDE terms (dodlib.transport)."""

import math

import pytest
import torch

from dodlib.transport import (
    interpolate,
    sample_t,
    score_to_velocity,
    velocity_loss,
    velocity_to_score,
    velocity_to_x0,
    velocity_to_x1,
)
from dodlib.samplers import sde_diffusion, sde_drift  # the SDE lives with its sampler

F64 = torch.float64

# Gaussian data N(MU, SIGMA), non-diagonal; with x0 ~ N(0, I) independent, the linear
# interpolant has x_t ~ N(t mu, C(t)), C(t) = t^2 Sigma + (1-t)^2 I, and since (v, x_t) are
# jointly Gaussian, E[v | x_t] = mu + Cov(v, x_t) C(t)^-1 (x_t - t mu) with
# Cov(v, x_t) = Cov(x1 - x0, t x1 + (1-t) x0) = t Sigma - (1-t) I.
MU = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
SIGMA = torch.tensor(
    [[2.0, 0.8, 0.3, 0.0], [0.8, 1.0, -0.4, 0.2], [0.3, -0.4, 1.5, 0.5], [0.0, 0.2, 0.5, 0.6]], dtype=F64
)
EYE = torch.eye(4, dtype=F64)


def marginal_cov(t: float) -> torch.Tensor:
    return t * t * SIGMA + (1 - t) ** 2 * EYE


def gaussian_velocity_matrix(t: float) -> torch.Tensor:
    # Sigma and I commute, so Cov(v,x_t) C^-1 is symmetric and equals C^-1 Cov(v,x_t).
    return torch.linalg.solve(marginal_cov(t), t * SIGMA - (1 - t) * EYE)


def gaussian_velocity(x: torch.Tensor, t) -> torch.Tensor:
    t = float(t[0]) if torch.is_tensor(t) else float(t)
    return MU + (x - t * MU) @ gaussian_velocity_matrix(t).T


def test_interpolant_endpoints_and_target():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    xt, v = interpolate(x0, x1, torch.zeros(5))
    assert torch.equal(xt, x0)
    assert torch.equal(v, x1 - x0)
    xt, _ = interpolate(x0, x1, torch.ones(5))
    assert torch.equal(xt, x1)
    # per-sample t broadcasts over non-batch dims
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    xt, _ = interpolate(x0, x1, t)
    for i in range(5):
        assert torch.allclose(xt[i], t[i] * x1[i] + (1 - t[i]) * x0[i])


def test_interpolant_time_derivative_is_target():
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(4, 6, dtype=F64, generator=g), torch.randn(4, 6, dtype=F64, generator=g)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=F64)
    h = 1e-6
    (xp, v), (xm, _) = interpolate(x0, x1, t + h), interpolate(x0, x1, t - h)
    assert torch.allclose((xp - xm) / (2 * h), v, atol=1e-8)


def test_interpolate_rejects_bad_t_shape():
    with pytest.raises(ValueError):
        interpolate(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(3))


def test_conversions_invert_the_path():
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(6, 5, dtype=F64, generator=g), torch.randn(6, 5, dtype=F64, generator=g)
    t = torch.rand(6, dtype=F64, generator=g) * 0.98 + 0.01
    xt, v = interpolate(x0, x1, t)
    assert torch.allclose(velocity_to_x1(v, xt, t), x1)
    assert torch.allclose(velocity_to_x0(v, xt, t), x0)
    s = velocity_to_score(v, xt, t)
    assert torch.allclose(s, -x0 / (1 - t[:, None]))
    assert torch.allclose(score_to_velocity(s, xt, t), v)


def test_gaussian_closed_form_velocity_matches_regression():
    # Double-check the closed form: least-squares regression of v on [x_t, 1] from samples
    # recovers E[v | x_t] (linear because everything is jointly Gaussian).
    g = torch.Generator().manual_seed(3)
    n, t = 200_000, 0.4
    chol = torch.linalg.cholesky(SIGMA)
    x1 = MU + torch.randn(n, 4, dtype=F64, generator=g) @ chol.T
    x0 = torch.randn(n, 4, dtype=F64, generator=g)
    xt, v = interpolate(x0, x1, t)
    design = torch.cat([xt - t * MU, torch.ones(n, 1, dtype=F64)], dim=1)
    coef = torch.linalg.lstsq(design, v).solution  # [5, 4]
    # sampling error of the coefficients is ~ 1/sqrt(n) ~ 2e-3 times O(1) scales
    assert torch.allclose(coef[:4].T, gaussian_velocity_matrix(t), atol=0.02)
    assert torch.allclose(coef[4], MU, atol=0.02)


@pytest.mark.parametrize("t", [0.05, 0.3, 0.5, 0.8, 0.95])
def test_score_of_gaussian_velocity_is_gaussian_score(t):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 4, dtype=F64, generator=g) * 2 + t * MU
    v = gaussian_velocity(x, t)
    expected = -(x - t * MU) @ torch.linalg.inv(marginal_cov(t)).T
    assert torch.allclose(velocity_to_score(v, x, t), expected, atol=1e-10)


def _linear_part(fn, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For an affine field f(x) = a + B (x - t mu): returns (f(t mu), B)."""
    base = (t * MU)[None]
    pts = torch.cat([base, base + EYE], dim=0)
    out = fn(pts)
    return out[0], (out[1:] - out[0]).T


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("t", [0.02, 0.25, 0.5, 0.75, 0.97])
def test_sde_preserves_gaussian_marginals(t, scale):
    # For the linear SDE dx = (a + B(x - t mu)) dt + sqrt(2w) dW with Gaussian state, the mean
    # obeys dm/dt = a and the covariance dC/dt = B C + C B^T + 2w I (Lyapunov). The exact
    # marginals have m = t mu, C(t) = t^2 Sigma + (1-t)^2 I; the SDE must reproduce both,
    # for every diffusion scale (scale 0 is the probability-flow ODE).
    a, B = _linear_part(lambda x: sde_drift(gaussian_velocity(x, t), x, t, scale), t)
    assert torch.allclose(a, MU, atol=1e-12)
    C = marginal_cov(t)
    dC_exact = 2 * t * SIGMA - 2 * (1 - t) * EYE
    dC_sde = B @ C + C @ B.T + 2 * sde_diffusion(t, scale) * EYE
    assert torch.allclose(dC_sde, dC_exact, atol=1e-10)


def test_sde_drift_equals_velocity_plus_w_score_and_is_finite_at_one():
    g = torch.Generator().manual_seed(5)
    x, v = torch.randn(3, 4, dtype=F64, generator=g), torch.randn(3, 4, dtype=F64, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    w = sde_diffusion(t, 1.5)[:, None]
    assert torch.allclose(sde_drift(v, x, t, 1.5), v + w * velocity_to_score(v, x, t))
    assert torch.isfinite(sde_drift(v, x, 1.0, 1.0)).all()
    assert sde_diffusion(1.0, 1.0) == 0


def test_velocity_loss_zero_for_exact_model_and_positive_otherwise():
    g = torch.Generator().manual_seed(6)
    x1 = torch.randn(8, 4, 8, 8, dtype=F64, generator=g)
    y = torch.arange(8)

    # An oracle that knows the data x1 by closure: from x_t and t it recovers x0 and v = x1 - x0.
    def oracle(xt, t, y=None):
        assert y is not None  # model kwargs are forwarded
        tb = t.reshape(-1, 1, 1, 1)
        x0 = (xt - tb * x1) / (1 - tb)
        return x1 - x0

    loss, aux = velocity_loss(oracle, x1, generator=g, y=y)
    assert loss.shape == (8,) and aux["t"].shape == (8,)
    assert loss.max().item() < 1e-12

    loss, _ = velocity_loss(lambda xt, t, y=None: torch.zeros_like(xt), x1, generator=g, y=y)
    assert (loss > 0).all()
    # zero prediction: loss = mean over dims of (x1 - x0)^2, about 2 per element on average
    assert 1.5 < loss.mean().item() < 2.5


def test_velocity_loss_given_noise_and_t_is_deterministic_and_exact():
    x1 = torch.ones(2, 3)
    noise = torch.zeros(2, 3)
    t = torch.tensor([0.5, 0.5])
    loss, aux = velocity_loss(lambda xt, t: xt, x1, noise=noise, t=t)  # predicts x_t = 0.5, target 1
    assert torch.allclose(loss, torch.full((2,), 0.25))
    assert torch.equal(aux["t"], t)


def test_velocity_loss_reproducible_with_generator():
    x1 = torch.randn(4, 2, 3)
    model = lambda xt, t: xt * 0.3  # noqa: E731
    a, _ = velocity_loss(model, x1, generator=torch.Generator().manual_seed(7), t_kind="logit_normal")
    b, _ = velocity_loss(model, x1, generator=torch.Generator().manual_seed(7), t_kind="logit_normal")
    assert torch.equal(a, b)


def test_velocity_loss_rejects_wrong_output_shape():
    with pytest.raises(ValueError):
        velocity_loss(lambda xt, t: xt[:, :1], torch.zeros(2, 3))


def test_sample_t_uniform_and_logit_normal():
    g = torch.Generator().manual_seed(8)
    u = sample_t(100_000, g, "uniform")
    assert u.shape == (100_000,) and u.min() >= 1e-5 and u.max() <= 1 - 1e-5
    assert abs(u.mean().item() - 0.5) < 0.005  # std of the mean ~ 0.29/316 ~ 1e-3

    ln = sample_t(100_000, g, "logit_normal", mean=0.0, std=1.0)
    assert (ln > 0).all() and (ln < 1).all()
    assert abs(ln.median().item() - 0.5) < 0.01  # median = sigmoid(0); its std ~ 1e-3 here
    # logit of t is N(mean, std^2): check the spread too
    z = torch.logit(ln.double())
    assert abs(z.std().item() - 1.0) < 0.02

    shifted = sample_t(100_000, g, "logit_normal", mean=1.0, std=0.5)
    assert abs(shifted.median().item() - 1 / (1 + math.exp(-1.0))) < 0.01

    with pytest.raises(ValueError):
        sample_t(4, g, "cosine")


def test_sample_t_clamps_to_eps():
    g = torch.Generator().manual_seed(9)
    t = sample_t(10_000, g, "logit_normal", std=20.0, eps=1e-3)  # huge std pushes mass to the ends
    assert t.min().item() == pytest.approx(1e-3) and t.max().item() == pytest.approx(1 - 1e-3)
