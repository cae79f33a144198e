"""The scheduler and samplers against the closed forms of DDPM (Ho et al. 2020) and DDIM."""
import numpy as np
import pytest
import torch

import ddpm
from ddpm import NoiseScheduler, sample
from engine import optim
from extensions import dpm_solver, min_snr
from helpers import ExactGaussianDenoiser, numpy_betas, sample_draws


@pytest.mark.parametrize("schedule", ddpm.SCHEDULES)
@pytest.mark.parametrize("T", [5, 50, 1000])
def test_betas_in_unit_interval_and_match_formula(schedule, T):
    s = NoiseScheduler(T, schedule, 1e-4, 0.02)
    assert s.betas.shape == (T,)
    assert (s.betas > 0).all() and (s.betas < 1).all()
    np.testing.assert_allclose(s.betas.numpy(), numpy_betas(schedule, T, 1e-4, 0.02), rtol=1e-5)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - numpy_betas(schedule, T, 1e-4, 0.02)),
                               rtol=1e-4)


def test_classic_linear_schedule_stops_short_of_noise():
    # the classic 50-step, 1e-4..0.02 schedule ends at alpha_bar_T = 0.60 (issue 4)
    s = NoiseScheduler(50, "linear", 1e-4, 0.02)
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    assert float(s.alphas_cumprod[-1]) == pytest.approx(0.60, abs=0.01)


@pytest.mark.parametrize("schedule", ddpm.SCHEDULES)
@pytest.mark.parametrize("T", [5, 10, 25, 50, 100, 250, 1000])
def test_default_schedules_reach_noise_for_any_T(schedule, T):
    s = NoiseScheduler(T, schedule)
    assert float(s.alphas_cumprod[-1]) < 1e-3
    assert (s.betas > 0).all() and (s.betas < 1).all()


def test_add_noise_is_eq4():
    s = NoiseScheduler(50, "linear", 1e-4, 0.02)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 50))
    x0, eps = torch.randn(64, 3, 5), torch.randn(64, 3, 5)
    t = torch.randint(0, 50, (64,))
    expected = (np.sqrt(abar[t.numpy()])[:, None, None] * x0.numpy()
                + np.sqrt(1 - abar[t.numpy()])[:, None, None] * eps.numpy())
    np.testing.assert_allclose(s.add_noise(x0, eps, t).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_posterior_is_eq7():
    T = 50
    s = NoiseScheduler(T, "quadratic", 1e-4, 0.02)
    betas = numpy_betas("quadratic", T, 1e-4, 0.02)
    x0, xt = torch.randn(T, 2), torch.randn(T, 2)
    t = torch.arange(T)
    mean, var = s.q_posterior(x0, xt, t)
    for i in range(T):
        abar = np.prod(1 - betas[:i + 1])
        abar_prev = np.prod(1 - betas[:i])  # 1 for i = 0
        mu = (np.sqrt(abar_prev) * betas[i] / (1 - abar) * x0[i].numpy()
              + np.sqrt(1 - betas[i]) * (1 - abar_prev) / (1 - abar) * xt[i].numpy())
        np.testing.assert_allclose(mean[i].numpy(), mu, rtol=1e-4, atol=1e-6)
        assert float(var[i]) == pytest.approx((1 - abar_prev) / (1 - abar) * betas[i], rel=1e-4, abs=1e-9)
    assert float(var[0]) == 0.0  # the last reverse step adds no noise


@pytest.mark.parametrize("prediction", ddpm.PREDICTIONS)
def test_reconstruct_and_prediction_targets_invert_add_noise(prediction):
    s = NoiseScheduler(50, "cosine", prediction=prediction, clip_sample=None)
    x0, eps = torch.randn(200, 2), torch.randn(200, 2)
    t = torch.arange(200) % 50
    xt = s.add_noise(x0, eps, t)
    target = s.training_target(x0, eps, t)  # what a perfect network outputs
    x0_hat, eps_hat = s.predict_x0_and_eps(target, xt, t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("prediction", ddpm.PREDICTIONS)
def test_clip_sample_bounds_x0_and_keeps_eps_consistent_with_x_t(prediction):
    # a network output far off at high noise implies an x0 far outside the data: with clip_sample c
    # the x0 used by the samplers is clamp(x0, -c, c), and eps is the one that, with it, gives back x_t
    s = NoiseScheduler(200, prediction=prediction, clip_sample=5.0)
    free = NoiseScheduler(200, prediction=prediction, clip_sample=None)
    x_t, output = torch.randn(500, 2), 30 * torch.randn(500, 2)
    t = torch.randint(150, 200, (500,))
    x0_free, _ = free.predict_x0_and_eps(output, x_t, t)
    x0, eps = s.predict_x0_and_eps(output, x_t, t)
    assert x0_free.abs().max() > 50  # the unclipped prediction does fly off
    torch.testing.assert_close(x0, x0_free.clamp(-5, 5))
    torch.testing.assert_close(s.add_noise(x0, eps, t), x_t, rtol=1e-4, atol=1e-4)  # eq. 4 holds


def test_clip_sample_from_the_config():
    config = vars(ddpm.build_parser().parse_args([]))
    assert ddpm.DDPM(config).clip_sample == 5.0
    config["clip_sample"] = 0.0
    assert ddpm.DDPM(config).clip_sample is None
    del config["clip_sample"]  # an experiment written before the flag: no clamp for 2D, as it was trained
    assert ddpm.DDPM(config).clip_sample is None
    # the constructor reads 0 as the command line does: no clamp (not a clamp to [0, 0])
    x_t, output, t = torch.randn(50, 2), 30 * torch.randn(50, 2), torch.full((50,), 190)
    x0, _ = NoiseScheduler(200, clip_sample=0).predict_x0_and_eps(output, x_t, t)
    abar = float(np.cumprod(1 - numpy_betas("quadratic", 200, 1e-4, 0.02 * 1000 / 200))[190])
    torch.testing.assert_close(x0, (x_t - (1 - abar) ** 0.5 * output) / abar**0.5, rtol=1e-4, atol=1e-4)


def test_ddim_with_eta_1_is_the_ddpm_step():
    s = NoiseScheduler(50, "linear")
    xt, out, z = torch.randn(100, 2), torch.randn(100, 2), torch.randn(100, 2)
    for t in range(50):
        x0, eps = s.predict_x0_and_eps(out, xt, torch.full((100,), t))
        ddpm_x = s.step(x0, t, xt, z)
        ddim_x = s.ddim_step(x0, eps, t, t - 1, xt, 1.0, z)
        torch.testing.assert_close(ddim_x, ddpm_x, rtol=1e-4, atol=1e-5)


def test_ddim_step_is_eq12_with_the_sigma_of_eq16():
    # Song et al. 2021, eq. 12: x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z, and eq. 16:
    # sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s); s = -1 stands for abar = 1
    T = 50
    s = NoiseScheduler(T, "linear", 1e-4, 0.05)
    abar = np.cumprod(1 - numpy_betas("linear", T, 1e-4, 0.05))
    g = torch.Generator().manual_seed(0)
    x_t, x0, eps, z = (torch.randn(100, 2, generator=g) for _ in range(4))
    for t, prev in ((49, 30), (30, 29), (10, 0), (3, -1)):
        ab, ab_prev = abar[t], (abar[prev] if prev >= 0 else 1.0)
        for eta in (0.0, 0.5, 1.0):
            sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab)) * np.sqrt(1 - ab / ab_prev)
            by_hand = (np.sqrt(ab_prev) * x0.double() + np.sqrt(1 - ab_prev - sigma**2) * eps.double()
                       + sigma * z.double())
            torch.testing.assert_close(s.ddim_step(x0, eps, t, prev, x_t, eta, z).double(), by_hand,
                                       rtol=1e-5, atol=1e-5)
            if prev >= 0 and eta > 0:  # the noise term is far above the tolerance: it is really checked
                assert float((sigma * z).abs().max()) > 1e-2
    # eta = 0: the noise does not enter at all
    assert torch.equal(s.ddim_step(x0, eps, 30, 25, x_t, 0.0, z), s.ddim_step(x0, eps, 30, 25, x_t, 0.0, 5 * z + 1))


def hand_x0_and_eps(prediction, output, x, abar):
    """x_0 and eps implied by the network output at x_t, eq. 4 solved by hand (v: Salimans & Ho 2022)."""
    a, sig = np.sqrt(abar), np.sqrt(1 - abar)
    if prediction == "epsilon":
        return (x - sig * output) / a, output
    if prediction == "x0":
        return output, (x - a * output) / sig
    return a * x - sig * output, sig * x + a * output


STEP_SAMPLERS = [("ddpm", None, None), ("ddim", 0.0, 10), ("ddim", 1.0, 10), ("ddim", 0.5, 7),
                 ("dpmpp_2m", None, 10), ("dpmpp_2m_sde", None, 10), ("dpmpp_2m_sde", 1.0, 10)]


@pytest.mark.parametrize("prediction", ddpm.PREDICTIONS)
@pytest.mark.parametrize("sampler, eta, steps", STEP_SAMPLERS, ids=lambda v: str(v))
def test_every_step_of_sample_is_its_update_written_out_by_hand(sampler, eta, steps, prediction):
    """Each step of sample(trajectory=True) against its update computed here in float64, from the
    trajectory's own x_t, the network's output and the very noise sample() drew:
      ddpm          the posterior of eq. 7: mean coef1 x0 + coef2 x_t, variance beta_tilde_t (Algorithm 2)
      ddim          eq. 12 with the sigma of eq. 16 (eta 0: no noise)
      dpmpp_2m      DDIM's step on D = (1 + 1/(2r)) x0 - x0' / (2r), r = h' / h in lambda = log(alpha / sigma)
                    (Lu et al. 2022, Algorithm 2); eta > 0 (_sde) adds the noise of eq. 16 on that D
    A sampler that ignored eta, the posterior variance, or evaluated the network at another t fails here."""
    T = 100
    s = NoiseScheduler(T, "linear", 1e-4, 0.05, prediction=prediction, clip_sample=None)
    betas = numpy_betas("linear", T, 1e-4, 0.05)
    abar = np.cumprod(1 - betas)
    lam = 0.5 * np.log(abar / (1 - abar))
    eta_used = {"ddpm": 1.0, "ddim": 0.0, "dpmpp_2m": 0.0, "dpmpp_2m_sde": 0.8}[sampler] if eta is None else eta
    if sampler == "dpmpp_2m":
        eta_used = 0.0

    def model(x, t):  # any fixed network that depends on x and t
        return torch.tanh(x + 0.3) * (0.5 + t.float() / T)

    shape = (300, 2)
    trajectory = sample(model, s, shape, sampler=sampler, num_inference_steps=steps, eta=eta,
                        generator=torch.Generator().manual_seed(7), trajectory=True).double()
    timesteps = s.inference_timesteps(steps, ddpm.DEFAULT_SPACING[sampler])
    x_T, zs = sample_draws(shape, 7, timesteps, sampler)
    assert trajectory.shape == (len(timesteps) + 1, *shape)
    torch.testing.assert_close(trajectory[0], x_T)
    last = None
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x, z = trajectory[i], zs[i]
        ab, ab_prev = abar[t], (abar[prev] if prev >= 0 else 1.0)
        x0, eps = hand_x0_and_eps(prediction, model(x.float(), torch.tensor([t])).double(), x, ab)
        if sampler == "ddpm":
            assert prev == t - 1
            ab_prev = abar[t - 1] if t > 0 else 1.0
            mean = (np.sqrt(ab_prev) * betas[t] / (1 - ab) * x0
                    + np.sqrt(1 - betas[t]) * (1 - ab_prev) / (1 - ab) * x)
            expected = mean + np.sqrt((1 - ab_prev) / (1 - ab) * betas[t]) * z
        else:
            if sampler.startswith("dpmpp"):
                D = x0
                if last is not None and prev >= 0:
                    r = (lam[t] - lam[last[0]]) / (lam[prev] - lam[t])
                    D = (1 + 1 / (2 * r)) * x0 - last[1] / (2 * r)
                last = (t, x0)
                eps_D = (x - np.sqrt(ab) * D) / np.sqrt(1 - ab)
            else:
                D, eps_D = x0, eps
            sigma = eta_used * np.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
            expected = np.sqrt(ab_prev) * D + np.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps_D + sigma * z
        torch.testing.assert_close(trajectory[i + 1], expected, rtol=1e-4, atol=2e-4,
                                   msg=lambda m: f"step {i} (t = {t} -> {prev}): {m}")
    if eta_used > 0:  # the noise really is part of what was checked
        assert float(zs[len(timesteps) // 2].abs().max()) > 1


# (sampler keywords, None for a stochastic sampler, else the largest |x_0 - the exact ODE solution| its steps allow)
SAMPLERS = [(dict(sampler="ddpm"), None), (dict(sampler="ddim", eta=0.0), 0.01), (dict(sampler="ddim", eta=1.0), None),
            (dict(sampler="ddim", eta=0.0, num_inference_steps=250), 0.03),  # first order: 4x the steps' error
            (dict(sampler="dpmpp_2m", num_inference_steps=50), 0.01),
            (dict(sampler="dpmpp_2m_sde", num_inference_steps=100), None),  # its default eta, 0.8
            (dict(sampler="dpmpp_2m_sde", eta=1.0, num_inference_steps=100), None)]


@pytest.mark.parametrize("schedule", ddpm.SCHEDULES)
@pytest.mark.parametrize("prediction", ddpm.PREDICTIONS)
@pytest.mark.parametrize("shape", [(8000, 2), (1000, 1, 4, 4)], ids=["points", "images"])
def test_analytic_gaussian_is_reproduced_by_every_sampler(schedule, prediction, shape):
    """Data N(mu, std^2 I) and its exact denoiser: the only errors left are the sampler's. The n values of a
    draw are independent, so the tolerances are in standard errors (se). A stochastic sampler (eta > 0)
    forgets x_T: its samples have the data's mean and variance within 4 se and no correlation with x_T.
    A deterministic one (eta = 0) is a map of x_T: each sample is where the probability-flow ODE takes its
    x_T (exact_ode_solution, in closed form), within the sampler's discretisation error. (Moments alone
    could not tell the two kinds apart: DDIM at eta 1 and at eta 0 both draw N(mu, std^2).)"""
    mu, std = 1.5, 0.5
    s = NoiseScheduler(1000, schedule, prediction=prediction)
    model = ExactGaussianDenoiser(s, mu, std)
    n = int(np.prod(shape))
    for kwargs, ode_tolerance in SAMPLERS:
        x = sample(model, s, shape, generator=torch.Generator().manual_seed(0), **kwargs).double()
        x_T, _ = sample_draws(shape, 0, [], kwargs["sampler"])  # the first draw of sample()
        assert x.shape == shape
        corr = float(torch.corrcoef(torch.stack([x_T.flatten(), x.flatten()]))[0, 1])
        if ode_tolerance is None:
            assert float(x.mean()) == pytest.approx(mu, abs=4 * std / n**0.5), kwargs
            assert float(x.var()) == pytest.approx(std**2, abs=4 * std**2 * (2 / n) ** 0.5), kwargs
            assert abs(corr) < 0.1, (kwargs, corr)  # measured: |corr| <= 0.06 (eta 0.8)
        else:
            assert corr > 0.999, (kwargs, corr)
            error = (x - exact_ode_solution(s, x_T, mu, std)).abs().max()
            assert float(error) < ode_tolerance, (kwargs, float(error))
        # the coordinates of a sample are independent Gaussians: no correlation between neighbours
        flat = x.reshape(shape[0], -1)
        pairs = torch.stack([flat[:, 0::2].flatten(), flat[:, 1::2].flatten()])
        assert abs(float(torch.corrcoef(pairs)[0, 1])) < 4 / (n / 2) ** 0.5, kwargs


def test_wrong_sampler_gets_wrong_answer():
    # the analytic check has teeth: a sampler that ignores the posterior variance misses
    s = NoiseScheduler(1000, "linear")
    model = ExactGaussianDenoiser(s, 1.5, 0.5)
    x = sample(model, s, (20000, 2), sampler="ddim", eta=0.0, num_inference_steps=5,
               generator=torch.Generator().manual_seed(0))
    assert abs(float(x.var()) - 0.25) > 0.05 * 0.25


def test_cosine_learning_rate_schedule_decays_to_zero():
    config = {"learning_rate": 2e-3, "lr_schedule": "cosine"}
    assert optim.learning_rate_at(0, 100, config) == pytest.approx(2e-3)
    assert optim.learning_rate_at(50, 100, config) == pytest.approx(1e-3)   # half way: half the rate
    assert optim.learning_rate_at(100, 100, config) == pytest.approx(0, abs=1e-12)
    assert optim.learning_rate_at(70, 100, {**config, "lr_schedule": "constant"}) == 2e-3


def test_ema_warm_up_is_a_power_average_that_stays_below_0999_in_an_image_run():
    """The decay (1 + s) / (10 + s) weights the weights of step s by about s^8 (docs/mnist.md): for
    weights w_s = s the recurrence (10 + s) e_{s+1} = (1 + s) e_s + 9 s has the solution 0.9 s - 1,
    the mean of s under the density s^8 on [0, N] less one step. A default image run (5,670 steps)
    never reaches the 0.999 cap."""
    N = 5670
    ema = 0.0
    for step in range(N):  # the update of ddpm.train: ema += (1 - decay) (w - ema)
        ema += (1 - optim.ema_decay_at(step, 0.999)) * (step - ema)
    assert ema == pytest.approx(0.9 * N - 1, abs=1e-6)
    assert optim.ema_decay_at(N - 1, 0.999) < 0.999
    assert optim.ema_decay_at(9000, 0.999) == 0.999  # capped from step 8,990 on


def ddpm_times(T, low_noise_fraction, n, generator):
    config = {"dataset": "dino", "num_timesteps": T, "beta_schedule": "quadratic", "low_noise_fraction": low_noise_fraction}
    return ddpm.DDPM(config).sample_timesteps(n, generator)


def test_low_noise_fraction_draws_the_documented_timestep_mix():
    T, n = 50, 200_000
    g = torch.Generator().manual_seed(0)
    uniform = ddpm_times(T, 0.0, n, g)
    assert uniform.min() == 0 and uniform.max() == T - 1
    assert float(uniform.float().mean()) == pytest.approx((T - 1) / 2, abs=0.1)
    # half from the lowest 10 steps, half uniform over 50: P(t < 10) = 0.5 + 0.5 * 10/50 = 0.6
    mixed = ddpm_times(T, 0.5, n, g)
    assert float((mixed < 10).float().mean()) == pytest.approx(0.6, abs=0.005)
    assert float((mixed == 3).float().mean()) == pytest.approx(0.5 / 10 + 0.5 / 50, abs=0.002)
    assert int(ddpm_times(T, 1.0, n, g).max()) == 9


def test_random_direction_embedding_has_the_sinusoidal_frequencies_along_random_directions():
    from positional_embeddings import RandomDirectionEmbedding, SinusoidalEmbedding
    emb, axis = RandomDirectionEmbedding(256, scale=100.0), SinusoidalEmbedding(256, scale=100.0)
    # 128 frequencies from 100 down to 100/10000, geometric: 100 * 10000^(-k/127)
    expected = 100.0 * 10000.0 ** (-torch.arange(128, dtype=torch.float64) / 127)
    assert torch.allclose(emb.B.norm(dim=1).double(), expected, rtol=1e-5)
    assert torch.allclose(axis.frequencies.double() * 100.0, expected, rtol=1e-5)
    directions = emb.B / emb.B.norm(dim=1, keepdim=True)
    assert directions[:, 0].abs().max() < 1 and directions[:, 0].abs().min() < 0.9  # not all on an axis
    p = torch.randn(5, 2)
    angles = p @ emb.B.T
    assert torch.allclose(emb(p), torch.cat([angles.sin(), angles.cos()], dim=1))
    # saved with the model: a rebuilt MLP with the loaded state_dict gives the same output
    model = ddpm.MLP(input_embedding="fourier", input_scale=100.0)
    assert "input_embedding.B" in model.state_dict()
    other = ddpm.MLP(input_embedding="fourier", input_scale=100.0)
    other.load_state_dict(model.state_dict())
    t = torch.zeros(5, dtype=torch.long)
    assert torch.equal(model(p, t), other(p, t))


@pytest.mark.parametrize("prediction", ddpm.PREDICTIONS)
def test_min_snr_weight_is_min_snr_gamma_times_the_x0_error(prediction):
    # Hang et al. 2023: loss = min(SNR_t, gamma) ||x0_hat - x0||^2, whatever the network predicts
    s = NoiseScheduler(100, "cosine", prediction=prediction, clip_sample=None)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, 2, 3, generator=g), torch.randn(64, 2, 3, generator=g)
    t = torch.arange(64) * 99 // 63  # 0 .. 99, low noise to pure noise
    x_t = s.add_noise(x0, noise, t)
    output = s.training_target(x0, noise, t) + 0.1 * torch.randn(64, 2, 3, generator=g)  # an imperfect network
    x0_hat, _ = s.predict_x0_and_eps(output, x_t, t)
    alpha_bar = s.alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected = snr.clamp(max=5) * (x0_hat - x0).double().square().flatten(1).mean(1)
    weighted = min_snr.weight(s, t, 5.0) * (output - s.training_target(x0, noise, t)).square().flatten(1).mean(1)
    np.testing.assert_allclose(weighted.numpy(), expected.numpy(), rtol=2e-3)
    if prediction == "epsilon":  # gamma above every SNR: the simple loss of eq. 14
        torch.testing.assert_close(min_snr.weight(s, t, 1e12), torch.ones(64))


@pytest.mark.parametrize("input_embedding", ["sinusoidal", "fourier"])
def test_mlp_with_a_shared_timestep_equals_the_concatenated_first_layer(input_embedding):
    # sampling passes t as [1]: the MLP splits its first layer W [point; time] + b into
    # W_point point + (W_time time + b); it must be the same function as t given per point
    torch.manual_seed(0)
    model = ddpm.MLP(input_embedding=input_embedding, input_scale=25.0)
    x = torch.randn(64, 2)
    for t in (0, 17, 49):
        shared = model(x, torch.tensor([t]))
        first = model.joint_mlp[0]
        features = torch.cat([model.input_embedding(x), model.time_embedding(torch.full((64,), t))], dim=1)
        by_hand = model.joint_mlp[1:](features @ first.weight.T + first.bias)
        assert shared.shape == (64, 2)
        assert torch.allclose(shared, by_hand, atol=1e-5)
        assert torch.allclose(model(x, torch.full((64,), t)), by_hand, atol=1e-5)
    assert not torch.allclose(model(x, torch.tensor([0])), model(x, torch.tensor([49])), atol=1e-3)


def exact_ode_solution(s, x_T, mu, std):
    """Where the probability-flow ODE takes x_T (at t = T-1) for data N(mu, std^2), then x_0 as the
    exact denoiser predicts it at t = 0, in closed form: the ODE keeps the standardised value
    z = (x_t - alpha_t mu) / sqrt(alpha_t^2 std^2 + sigma_t^2) of every point."""
    a_T, s_T = s.sqrt_alphas_cumprod[-1].double(), s.sqrt_one_minus_alphas_cumprod[-1].double()
    a_0, s_0 = s.sqrt_alphas_cumprod[0].double(), s.sqrt_one_minus_alphas_cumprod[0].double()
    z = (x_T.double() - a_T * mu) / (a_T**2 * std**2 + s_T**2).sqrt()
    x_0 = a_0 * mu + z * (a_0**2 * std**2 + s_0**2).sqrt()
    return mu + a_0 * std**2 * (x_0 - a_0 * mu) / (a_0**2 * std**2 + s_0**2)


def ode_errors(sampler, steps):
    s = NoiseScheduler(1000, "linear")
    mu, std = 1.5, 0.5
    model = ExactGaussianDenoiser(s, mu, std)
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))  # what sample() draws first
    exact = exact_ode_solution(s, x_T, mu, std)
    return [float((sample(model, s, (2000, 2), sampler=sampler, num_inference_steps=n, eta=0.0,
                          timestep_spacing="logsnr", generator=torch.Generator().manual_seed(0)).double()
                   - exact).abs().max()) for n in steps]


def test_dpm_solver_2m_is_second_order_and_ddim_first_order():
    # The exact denoiser of Gaussian data: the only error left is the discretisation of the ODE.
    # Doubling the steps divides DPM-Solver++(2M)'s error by ~4 (second order), DDIM's by ~2.
    steps = (20, 40, 80)
    dpm, ddim = ode_errors("dpmpp_2m", steps), ode_errors("ddim", steps)
    dpm_ratios = [dpm[i] / dpm[i + 1] for i in range(2)]
    ddim_ratios = [ddim[i] / ddim[i + 1] for i in range(2)]
    assert all(r > 3 for r in dpm_ratios), (dpm, dpm_ratios)
    assert all(r < 2.5 for r in ddim_ratios), (ddim, ddim_ratios)  # the same check fails for DDIM
    assert dpm[-1] < 0.05 * ddim[-1]  # and at 80 steps it is far closer
    assert dpm[-1] < 0.005


def test_dpm_solver_first_step_is_ddim():
    # DPM-Solver-1 is DDIM: without history the 2M step equals DDIM eta = 0, and the SDE form
    # with eta = 1 equals DDIM eta = 1, i.e. the DDPM posterior draw for prev_t = t - 1
    s = NoiseScheduler(200, prediction="v", clip_sample=5.0)
    x_t, output, noise = torch.randn(100, 2), torch.randn(100, 2), torch.randn(100, 2)
    for t, prev_t in ((199, 150), (80, 79), (5, 0)):
        x0, eps = s.predict_x0_and_eps(output, x_t, torch.full((100,), t))
        torch.testing.assert_close(dpm_solver.step(s, x0, t, prev_t, x_t)[0],
                                   s.ddim_step(x0, eps, t, prev_t, x_t, 0.0, noise), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dpm_solver.step(s, x0, t, prev_t, x_t, eta=1.0, noise=noise)[0],
                                   s.ddim_step(x0, eps, t, prev_t, x_t, 1.0, noise), rtol=1e-4, atol=1e-5)
    x0, _ = s.predict_x0_and_eps(output, x_t, torch.full((100,), 80))
    torch.testing.assert_close(dpm_solver.step(s, x0, 80, 79, x_t, eta=1.0, noise=noise)[0],
                               s.step(x0, 80, x_t, noise), rtol=1e-4, atol=1e-5)
    assert torch.equal(dpm_solver.step(s, x0, 80, -1, x_t)[0], x0)  # the last step returns x0


def test_dpm_solver_2m_step_is_lu_et_al_in_their_own_variables():
    """Lu et al. 2022 (DPM-Solver++, Algorithm 2, and its SDE form), in alpha_t = sqrt(abar_t),
    sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t), h = lambda_s - lambda_t for a step t -> s
    whose step before came from t' (h' = lambda_t - lambda_t', r = h' / h):
      D   = (1 + 1 / (2r)) x0_t - 1 / (2r) x0_t'
      ODE (eta 0): x_s = (sigma_s / sigma_t) x_t - alpha_s (e^-h - 1) D
      SDE (eta 1): x_s = (sigma_s / sigma_t) e^-h x_t + alpha_s (1 - e^-2h) D + sigma_s sqrt(1 - e^-2h) z
    computed here in float64 from the betas alone, never through the code's DDIM step."""
    T = 200
    s = NoiseScheduler(T, "quadratic", 1e-4, 0.1, prediction="v", clip_sample=None)
    abar = np.cumprod(1 - numpy_betas("quadratic", T, 1e-4, 0.1))
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    lam = np.log(alpha / sigma)
    g = torch.Generator().manual_seed(0)
    x_t, x0, last_x0, z = (torch.randn(100, 2, generator=g) for _ in range(4))
    X, X0, L, Z = (v.double() for v in (x_t, x0, last_x0, z))
    for last_t, t, prev_t in ((120, 80, 60), (199, 150, 100), (30, 20, 5), (21, 20, 19)):
        h, r = lam[prev_t] - lam[t], (lam[t] - lam[last_t]) / (lam[prev_t] - lam[t])
        D = (1 + 1 / (2 * r)) * X0 - L / (2 * r)
        ode = sigma[prev_t] / sigma[t] * X - alpha[prev_t] * np.expm1(-h) * D
        sde = (sigma[prev_t] / sigma[t] * np.exp(-h) * X - alpha[prev_t] * np.expm1(-2 * h) * D
               + sigma[prev_t] * np.sqrt(-np.expm1(-2 * h)) * Z)
        got_ode, (kept_t, kept_x0) = dpm_solver.step(s, x0, t, prev_t, x_t, last=(last_t, last_x0))
        got_sde, _ = dpm_solver.step(s, x0, t, prev_t, x_t, last=(last_t, last_x0), eta=1.0, noise=z)
        torch.testing.assert_close(got_ode.double(), ode, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_sde.double(), sde, rtol=1e-4, atol=1e-4)
        assert kept_t == t and torch.equal(kept_x0, x0)  # the history is the network's own x0, not D
        # the extrapolation matters: the first-order step (D = x0) lands elsewhere
        first_order = sigma[prev_t] / sigma[t] * X - alpha[prev_t] * np.expm1(-h) * X0
        assert float((ode - first_order).abs().max()) > 1e-2


@pytest.mark.parametrize("schedule", ddpm.SCHEDULES)
@pytest.mark.parametrize("spacing", ddpm.SPACINGS)
def test_timestep_spacings_visit_n_distinct_descending_timesteps(schedule, spacing):
    for T in (10, 200, 1000):
        s = NoiseScheduler(T, schedule)
        for n in sorted({1, 2, 3, 10, 20, 50, T - 1, T} & set(range(1, T + 1))):
            ts = s.inference_timesteps(n, spacing)
            assert len(ts) == n and ts[0] == T - 1, (T, n, ts)
            assert all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] >= 0, (T, n, ts)
            if n > 1:
                assert ts[-1] == 0, (T, n, ts)


def test_spacings_put_their_steps_where_they_say():
    s = NoiseScheduler(200)
    assert s.inference_timesteps(10, "uniform") == [199, 177, 155, 133, 111, 88, 66, 44, 22, 0]
    assert s.inference_timesteps(5, "quadratic") == [199, round(199 * 0.75**2), round(199 * 0.25), round(199 / 16), 0]
    # logsnr: equal steps in lambda_t wherever rounding to integer timesteps leaves room
    lam = s.log_snr[s.inference_timesteps(10, "logsnr")]
    gaps = (lam[1:] - lam[:-1]).numpy()
    target = float(s.log_snr[0] - s.log_snr[-1]) / 9
    assert np.allclose(gaps[:6], target, rtol=0.15), gaps
    # karras: more steps at low noise than logsnr's last step, fewer at high noise
    assert s.inference_timesteps(10, "karras")[1] > s.inference_timesteps(10, "logsnr")[1]
