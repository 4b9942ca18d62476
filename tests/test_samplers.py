"""Tests of the samplers (dodlib.samplers) and classifier-free guidance (dodlib.guidance).

The samplers are driven by the exact marginal velocity field of Gaussian data, so the
distribution they must produce is known: N(MU, SIGMA).
"""

import math

import pytest
import torch

import dodlib.samplers as samplers_mod
from dodlib.guidance import guidance_scale, guided_velocity, make_guided_velocity_fn
from dodlib.samplers import SamplerSpec, euler, euler_maruyama, heun, run_sampler

F64 = torch.float64
D = 4
MU = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
SIGMA = torch.tensor(
    [[2.0, 0.8, 0.3, 0.0], [0.8, 1.0, -0.4, 0.2], [0.3, -0.4, 1.5, 0.5], [0.0, 0.2, 0.5, 0.6]], dtype=F64
)
EYE = torch.eye(D, dtype=F64)
N = 20_000

# Sampling error, stated: for n iid samples of N(MU, SIGMA) the sample mean's coordinate i has
# std sqrt(SIGMA_ii / n) and the sample covariance's entry (i, j) has std
# sqrt((SIGMA_ii SIGMA_jj + SIGMA_ij^2) / n). Tolerances are 5 of these stds (elementwise)
# plus a discretisation allowance per sampler, measured on whitened noise (see the
# convergence test): Euler's max covariance error is ~4.8/num_steps, Heun's ~1.3/num_steps^2.
MEAN_SD = (SIGMA.diagonal() / N).sqrt()
COV_SD = ((SIGMA.diagonal()[:, None] * SIGMA.diagonal()[None, :] + SIGMA**2) / N).sqrt()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These are thousands of tiny ops; on a shared 2-core box, intra-op threads only add contention.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact E[x1 - x0 | x_t = x] for x1 ~ N(MU, SIGMA), x0 ~ N(0, I) (derivation in test_transport)."""
    assert t.shape == (x.shape[0],) and bool((t == t[0]).all())  # samplers pass one t per sample
    t = float(t[0])
    m = torch.linalg.solve(t * t * SIGMA + (1 - t) ** 2 * EYE, t * SIGMA - (1 - t) * EYE)
    return MU + (x - t * MU) @ m.T


def normal(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D, dtype=F64, generator=torch.Generator().manual_seed(seed))


def whitened_noise(n: int, seed: int) -> torch.Tensor:
    """Noise with sample mean exactly 0 and sample covariance exactly I.

    The samplers map noise affinely here, so with whitened input the output's sample
    covariance is exactly the sampler's discretised covariance: no sampling error left.
    """
    z = normal(n, seed)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(torch.cov(z.T))
    return z @ torch.linalg.inv(chol).T


def noise_fn_for(n: int, seed: int):
    return lambda i: normal(n, seed * 100_003 + i)


def cov_error(x: torch.Tensor) -> float:
    return (torch.cov(x.T) - SIGMA).abs().max().item()


def assert_matches_target(x: torch.Tensor, cov_allowance: float, mean_allowance: float = 0.0) -> None:
    mean_err = (x.mean(0) - MU).abs()
    cov_err = (torch.cov(x.T) - SIGMA).abs()
    assert (mean_err <= 5 * MEAN_SD + mean_allowance).all(), mean_err
    assert (cov_err <= 5 * COV_SD + cov_allowance).all(), cov_err


# --------------------------------------------------------------------------- accuracy


def test_euler_matches_gaussian_target():
    x, nfe = euler(gaussian_velocity, normal(N, 0), 100)
    assert nfe == 100
    # The mean path t*MU is integrated exactly by any Runge-Kutta method (v is affine, E[v] = MU).
    assert_matches_target(x, cov_allowance=6.0 / 100)


def test_heun_matches_gaussian_target():
    x, nfe = heun(gaussian_velocity, normal(N, 1), 50)
    assert nfe == 100
    assert_matches_target(x, cov_allowance=2.0 / 50**2)


@pytest.mark.parametrize("diffusion_scale", [0.5, 1.0, 2.0])
def test_euler_maruyama_matches_gaussian_target(diffusion_scale):
    x, nfe = euler_maruyama(gaussian_velocity, normal(N, 2), 100, noise_fn_for(N, 3), diffusion_scale)
    assert nfe == 101
    # EM is weakly first order; with 100 steps its discretisation error is already below the
    # 5-sd sampling tolerance (measured over seeds and scales 0.5-2), 0.03 is a margin on top.
    # A wrong SDE (no score term, or half of it) is off by > 0.8: see the negative control.
    assert_matches_target(x, cov_allowance=0.03)


@pytest.mark.parametrize("method", ["euler", "heun", "euler_maruyama"])
def test_starting_from_a_noised_sample_reaches_the_target(method):
    """t_start (regeneration of fine-tuning pairs): x at t0 = t0 x1 + (1 - t0) noise with x1 drawn
    from the target is a sample of p_t0, so integrating on [t0, 1] must still give N(MU, SIGMA)."""
    t0 = 0.6
    chol = torch.linalg.cholesky(SIGMA)
    x1 = MU + normal(N, 10) @ chol.T
    x_t0 = t0 * x1 + (1 - t0) * normal(N, 11)
    spec = SamplerSpec(method=method, num_steps=40)
    x, nfe = run_sampler(spec, gaussian_velocity, x_t0, noise_fn_for(N, 12), t_start=t0)
    assert nfe == spec.nfe
    assert_matches_target(x, cov_allowance=0.05)
    # and it is a regeneration, not a fresh sample: it stays correlated with the x1 it came from
    corr = torch.corrcoef(torch.stack([x[:, 0], x1[:, 0]]))[0, 1]
    assert corr > 0.3


def test_time_grid_from_t_start():
    grid = samplers_mod.time_grid(4, 1.0, 0.5)
    assert grid == [0.5, 0.625, 0.75, 0.875, 1.0]
    with pytest.raises(ValueError, match="t_start"):
        samplers_mod.time_grid(4, 0.9, 0.95)


@pytest.mark.parametrize("last_step", ["euler", None])
def test_euler_maruyama_other_last_steps(last_step):
    x, nfe = euler_maruyama(gaussian_velocity, normal(N, 4), 100, noise_fn_for(N, 5), last_step=last_step)
    assert nfe == (101 if last_step else 100)
    assert_matches_target(x, cov_allowance=0.03)


@pytest.mark.parametrize(
    "wrong_drift",
    [
        lambda v, x, t, s: v,  # noise without the score correction
        lambda v, x, t, s: v + 0.5 * s * (t * v - x),  # w/2 * score, i.e. confusing w with g^2
    ],
)
def test_euler_maruyama_negative_control(monkeypatch, wrong_drift):
    # The accuracy test above has power: an SDE whose drift does not match its noise fails it.
    monkeypatch.setattr(samplers_mod, "sde_drift", wrong_drift)
    x, _ = euler_maruyama(gaussian_velocity, whitened_noise(5000, 6), 50, noise_fn_for(5000, 7))
    assert cov_error(x) > 0.5  # measured 2.3 (no score) and 0.86 (half score); correct SDE ~ 0.05


def test_convergence_order():
    z = whitened_noise(N, 8)
    e_euler = {n: cov_error(euler(gaussian_velocity, z, n)[0]) for n in (10, 20, 40)}
    e_heun = {n: cov_error(heun(gaussian_velocity, z, n)[0]) for n in (10, 20, 40)}
    for n in (10, 20, 40):
        assert e_heun[n] < e_euler[n] / 10  # Heun is much better at equal steps
    # Euler is first order: doubling the steps halves the error; Heun is second order.
    for n in (10, 20):
        assert 1.7 < e_euler[n] / e_euler[2 * n] < 2.3
        assert 3.3 < e_heun[n] / e_heun[2 * n] < 4.7
    # and the stated allowances hold
    assert e_euler[10] < 6.0 / 10 and e_heun[10] < 2.0 / 10**2


# --------------------------------------------------------------------------- NFE, grids, determinism


class CountingVelocity:
    def __init__(self):
        self.calls, self.times = 0, []

    def __call__(self, x, t):
        self.calls += 1
        self.times.append(float(t[0]))
        return -x


@pytest.mark.parametrize(
    "spec, expected_nfe",
    [
        (SamplerSpec("euler", 7), 7),
        (SamplerSpec("heun", 7), 14),
        (SamplerSpec("euler_maruyama", 7), 8),
        (SamplerSpec("euler_maruyama", 7, last_step=None), 7),
        (SamplerSpec("euler", 1), 1),
        (SamplerSpec("euler_maruyama", 1), 2),
    ],
)
def test_nfe_counts(spec, expected_nfe):
    counter = CountingVelocity()
    x0 = torch.randn(3, 2)
    x, nfe = run_sampler(spec, counter, x0, noise_fn=lambda i: torch.zeros(3, 2))
    assert nfe == counter.calls == spec.nfe == expected_nfe
    assert x.shape == x0.shape


def test_time_grids():
    c = CountingVelocity()
    euler(c, torch.zeros(1, 1), 4)
    assert c.times == pytest.approx([0.0, 0.25, 0.5, 0.75])
    c = CountingVelocity()
    heun(c, torch.zeros(1, 1), 2)
    assert c.times == pytest.approx([0.0, 0.5, 0.5, 1.0])
    c = CountingVelocity()
    euler_maruyama(c, torch.zeros(1, 1), 4, lambda i: torch.zeros(1, 1), last_step_size=0.2)
    assert c.times == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])  # 4 stochastic steps on [0, 0.8], mean step at 0.8


def test_samplers_exact_on_constant_velocity():
    # dx/dt = c from t=0 to 1 gives x0 + c for every sampler, any step count.
    x0 = torch.randn(2, 3, dtype=F64)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    vel = lambda x, t: c.expand_as(x)  # noqa: E731
    for x, _ in (euler(vel, x0, 3), heun(vel, x0, 3)):
        assert torch.allclose(x, x0 + c)
    x, _ = euler_maruyama(vel, x0, 5, lambda i: torch.zeros_like(x0), diffusion_scale=0.0)
    assert torch.allclose(x, x0 + c)


def test_euler_maruyama_is_deterministic_given_noise_fn():
    x0 = normal(64, 9)
    a, _ = euler_maruyama(gaussian_velocity, x0, 20, noise_fn_for(64, 10))
    b, _ = euler_maruyama(gaussian_velocity, x0, 20, noise_fn_for(64, 10))
    c, _ = euler_maruyama(gaussian_velocity, x0, 20, noise_fn_for(64, 11))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_euler_maruyama_batch_size_independent_with_per_sample_noise():
    # noise drawn per sample (as the caller does from per-sample seeds): a sub-batch gives the
    # same samples as the full batch.
    seeds = list(range(8))

    def per_sample_noise(idx):
        return lambda i: torch.stack(
            [torch.randn(D, dtype=F64, generator=torch.Generator().manual_seed(s * 1000 + i)) for s in idx]
        )

    x0 = normal(8, 12)
    full, _ = euler_maruyama(gaussian_velocity, x0, 10, per_sample_noise(seeds))
    part, _ = euler_maruyama(gaussian_velocity, x0[2:5], 10, per_sample_noise(seeds[2:5]))
    assert torch.allclose(full[2:5], part, rtol=0, atol=1e-12)


def test_euler_maruyama_rejects_bad_noise_shape():
    with pytest.raises(ValueError, match="noise_fn"):
        euler_maruyama(gaussian_velocity, normal(4, 0), 3, lambda i: torch.zeros(3, D, dtype=F64))


# --------------------------------------------------------------------------- SamplerSpec / run_sampler


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"method": "dopri5", "num_steps": 10}, "method"),
        ({"method": "euler", "num_steps": 0}, "num_steps"),
        ({"method": "heun", "num_steps": -3}, "num_steps"),
        ({"method": "euler_maruyama", "num_steps": 10, "last_step_size": 1.5}, "last_step_size"),
        ({"method": "euler_maruyama", "num_steps": 10, "diffusion_scale": -1.0}, "diffusion_scale"),
        ({"method": "euler_maruyama", "num_steps": 10, "last_step": "tweedie"}, "last_step"),
    ],
)
def test_sampler_spec_rejects_bad_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        run_sampler(SamplerSpec(**kwargs), gaussian_velocity, normal(2, 0))


def test_run_sampler_rejects_mutated_spec_and_missing_noise():
    spec = SamplerSpec("euler", 4)
    object.__setattr__(spec, "method", "rk45")
    with pytest.raises(ValueError, match="method"):
        run_sampler(spec, gaussian_velocity, normal(2, 0))
    with pytest.raises(ValueError, match="noise_fn"):
        run_sampler(SamplerSpec("euler_maruyama", 4), gaussian_velocity, normal(2, 0))


def test_run_sampler_dispatches():
    x0 = normal(16, 13)
    assert torch.equal(run_sampler(SamplerSpec("euler", 5), gaussian_velocity, x0)[0], euler(gaussian_velocity, x0, 5)[0])
    assert torch.equal(run_sampler(SamplerSpec("heun", 5), gaussian_velocity, x0)[0], heun(gaussian_velocity, x0, 5)[0])
    spec = SamplerSpec("euler_maruyama", 5, diffusion_scale=0.7, last_step_size=0.1)
    a, _ = run_sampler(spec, gaussian_velocity, x0, noise_fn_for(16, 14))
    b, _ = euler_maruyama(gaussian_velocity, x0, 5, noise_fn_for(16, 14), 0.7, "mean", 0.1)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- guidance


class ToyModel:
    """Deterministic conditional 'velocity model' whose output depends on x, t, y and a prior."""

    def __init__(self):
        self.calls, self.batch_sizes = 0, []

    def __call__(self, x, t, y=None, prior_emb=None, prior_keep=None):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        assert t.shape == (x.shape[0],)
        out = x * (1 + t.reshape(-1, 1, 1, 1)) + y.reshape(-1, 1, 1, 1).to(x.dtype)
        if prior_emb is not None:
            out = out + prior_keep.reshape(-1, 1, 1, 1).to(x.dtype) * prior_emb
        return out


def toy_inputs(b=3, c=4):
    g = torch.Generator().manual_seed(15)
    x = torch.randn(b, c, 2, 2, dtype=F64, generator=g)
    t = torch.full((b,), 0.3, dtype=F64)
    prior = torch.randn(b, c, 2, 2, dtype=F64, generator=g)
    cond = {"y": torch.tensor([1, 2, 3]), "prior_emb": prior, "prior_keep": torch.ones(b)}
    uncond = {"y": torch.full((b,), 1000), "prior_emb": prior, "prior_keep": torch.ones(b)}
    return x, t, cond, uncond


def test_cfg_scale_one_is_conditional_and_skips_uncond():
    x, t, cond, uncond = toy_inputs()
    m = ToyModel()
    v = guided_velocity(m, x, t, cond, uncond, 1.0)
    assert torch.equal(v, ToyModel()(x, t, **cond))
    assert m.calls == 1 and m.batch_sizes == [3]  # no unconditional rows were computed
    v = guided_velocity(m, x, t, cond, uncond, torch.ones(3))
    assert torch.equal(v, ToyModel()(x, t, **cond))


@pytest.mark.parametrize("scale", [0.0, 1.5, 5.5])
def test_cfg_formula_all_channels_one_batched_call(scale):
    x, t, cond, uncond = toy_inputs()
    m = ToyModel()
    v = guided_velocity(m, x, t, cond, uncond, scale)
    assert m.calls == 1 and m.batch_sizes == [6]  # one forward on [cond; uncond]
    vc, vu = ToyModel()(x, t, **cond), ToyModel()(x, t, **uncond)
    assert torch.allclose(v, vu + scale * (vc - vu))


def test_cfg_per_sample_scale_and_none_kwargs():
    x, t, cond, uncond = toy_inputs()
    cond = {**cond, "prior_emb": None, "prior_keep": None}
    uncond = {**uncond, "prior_emb": None, "prior_keep": None}
    s = torch.tensor([1.0, 2.0, 4.0], dtype=F64)
    v = guided_velocity(ToyModel(), x, t, cond, uncond, s)
    vc, vu = ToyModel()(x, t, **cond), ToyModel()(x, t, **uncond)
    assert torch.allclose(v, vu + s.reshape(-1, 1, 1, 1) * (vc - vu))


def test_cfg_drops_prior_in_uncond_branch():
    x, t, cond, uncond = toy_inputs()
    uncond = {**uncond, "prior_keep": torch.zeros(3)}  # uncond = "class_prior" dropped
    v = guided_velocity(ToyModel(), x, t, cond, uncond, 3.0)
    vc, vu = ToyModel()(x, t, **cond), ToyModel()(x, t, **uncond)
    assert not torch.allclose(vc - vu, torch.full_like(vc, float(vc[0, 0, 0, 0] - vu[0, 0, 0, 0])))
    assert torch.allclose(v, vu + 3.0 * (vc - vu))


def test_cfg_first3_leaves_other_channels_conditional():
    x, t, cond, uncond = toy_inputs(c=4)
    v = guided_velocity(ToyModel(), x, t, cond, uncond, 4.0, channels="first3")
    vc, vu = ToyModel()(x, t, **cond), ToyModel()(x, t, **uncond)
    assert torch.allclose(v[:, :3], vu[:, :3] + 4.0 * (vc[:, :3] - vu[:, :3]))
    assert torch.equal(v[:, 3:], vc[:, 3:])


def test_cfg_rejects_mismatched_kwargs():
    x, t, cond, uncond = toy_inputs()
    with pytest.raises(ValueError, match="prior_emb"):
        guided_velocity(ToyModel(), x, t, cond, {**uncond, "prior_emb": None}, 2.0)
    with pytest.raises(ValueError):
        guided_velocity(ToyModel(), x, t, cond, {"y": uncond["y"]}, 2.0)
    with pytest.raises(ValueError, match="channels"):
        guided_velocity(ToyModel(), x, t, cond, uncond, 2.0, channels="last")


def test_schedule_values():
    assert guidance_scale(0.3, 4.0, "constant") == 4.0
    # interval: scale inside [lo, hi] (closed), 1 outside
    iv = (0.2, 0.7)
    assert [guidance_scale(t, 4.0, "interval", iv) for t in (0.0, 0.19, 0.2, 0.5, 0.7, 0.71, 1.0)] == [
        1.0, 1.0, 4.0, 4.0, 4.0, 1.0, 1.0,
    ]
    # power-cosine: s(t) = 1 + (scale - 1) (1 - cos(pi t^power)) / 2
    assert guidance_scale(0.0, 5.0, "power_cosine", power=2.0) == pytest.approx(1.0)
    assert guidance_scale(1.0, 5.0, "power_cosine", power=2.0) == pytest.approx(5.0)
    assert guidance_scale(0.5, 5.0, "power_cosine", power=1.0) == pytest.approx(3.0)
    assert guidance_scale(0.5, 5.0, "power_cosine", power=2.0) == pytest.approx(
        1 + 4.0 * (1 - math.cos(math.pi * 0.25)) / 2
    )
    # tensor input gives the same numbers elementwise
    t = torch.tensor([0.0, 0.19, 0.5, 0.71, 1.0])
    assert torch.allclose(guidance_scale(t, 4.0, "interval", iv), torch.tensor([1.0, 1.0, 4.0, 1.0, 1.0]))
    assert torch.allclose(guidance_scale(t, 4.0, "constant"), torch.full((5,), 4.0))
    pc = guidance_scale(t, 5.0, "power_cosine", power=3.0)
    assert torch.allclose(pc, torch.tensor([guidance_scale(float(u), 5.0, "power_cosine", power=3.0) for u in t]))
    assert (pc[1:] >= pc[:-1]).all()  # monotone ramp from noise to data
    with pytest.raises(ValueError, match="schedule"):
        guidance_scale(0.5, 2.0, "linear")


def test_guided_velocity_fn_skips_uncond_outside_interval():
    x, t, cond, uncond = toy_inputs()
    m = ToyModel()
    vel = make_guided_velocity_fn(m, cond, uncond, 3.0, schedule="interval", interval=(0.5, 1.0))
    _, nfe = euler(vel, x, 4)  # t = 0, .25 outside; .5, .75 inside
    assert nfe == 4 and m.batch_sizes == [3, 3, 6, 6]
    v = vel(x, torch.full((3,), 0.75, dtype=F64))
    vc, vu = ToyModel()(x, t * 0 + 0.75, **cond), ToyModel()(x, t * 0 + 0.75, **uncond)
    assert torch.allclose(v, vu + 3.0 * (vc - vu))
