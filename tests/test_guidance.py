"""extensions/guidance.py: classifier-free guidance, autoguidance, the guidance interval, x_0-only guidance."""
import pytest
import torch

from ddpm import NoiseScheduler, sample
from extensions import guidance
from extensions.guidance import Guidance, model_prediction
from helpers import ExactGaussianDenoiser


def test_autoguidance_extrapolates_away_from_the_guide():
    # model: the exact denoiser of N(1, 0.5^2); guide: that of a worse model, N(0.5, 1). The guided
    # prediction is weak + w (strong - weak), so w = 1 is the model alone and w > 1 moves the samples'
    # mean beyond the model's, away from the guide's, and narrows them (the guide's extra spread is
    # subtracted): monotonically in w.
    s = NoiseScheduler(1000, "cosine", prediction="v")
    model, guide = ExactGaussianDenoiser(s, 1.0, 0.5), ExactGaussianDenoiser(s, 0.5, 1.0)
    x, t = torch.randn(7, 2), torch.tensor([300])
    for w in (0.0, 1.0, 2.5):
        guided, own = model_prediction(model, x, t, None, w, guide)
        assert torch.allclose(guided, guide(x, t) + w * (model(x, t) - guide(x, t)))
        assert torch.equal(own, model(x, t))
    means, variances = [], []
    for w in (1.0, 1.5, 2.0):
        x = sample(model, s, (20000, 2), sampler="ddpm", guidance=Guidance(w, guide),
                   generator=torch.Generator().manual_seed(0))
        means.append(float(x.mean()))
        variances.append(float(x.var()))
    assert means[0] == pytest.approx(1.0, abs=0.02) and variances[0] == pytest.approx(0.25, rel=0.05)
    assert means[0] + 0.03 < means[1] < means[2] - 0.03
    assert variances[0] * 0.9 > variances[1] > variances[2] * 1.05


def test_guidance_interval_guides_exactly_the_steps_inside_it():
    # guidance interval (lo, hi): the guide is evaluated at the steps with lo <= t <= hi and nowhere
    # else; the whole range is plain guidance, a range no step visits is the unguided sampler.
    s = NoiseScheduler(1000, "cosine", prediction="v")
    model, exact_guide = ExactGaussianDenoiser(s, 1.0, 0.5), ExactGaussianDenoiser(s, 0.5, 1.0)
    seen = []

    def guide(x, t):
        seen.append(int(t[0]))
        return exact_guide(x, t)

    def draw(interval, w=2.0):
        return sample(model, s, (4000, 2), sampler="ddim", num_inference_steps=20, eta=1.0,
                      guidance=Guidance(w, guide, interval), generator=torch.Generator().manual_seed(0))

    steps = s.inference_timesteps(20, "uniform")
    partly = draw((150, 800))
    assert seen == [t for t in steps if 150 <= t <= 800] and 0 < len(seen) < len(steps)
    seen.clear()
    assert torch.equal(draw((0, 999)), draw(None)) and seen == steps + steps
    seen.clear()
    gap = (steps[3] + 1, steps[2] - 1)  # between two visited timesteps
    assert torch.equal(draw(gap), draw(None, w=1.0)) and seen == []
    # guided in part: narrower than the model's samples, wider than guided everywhere
    assert float(draw(None, w=1.0).var()) > float(partly.var()) > float(draw(None).var())


def test_guide_x0_only_takes_x0_from_the_guided_prediction_and_the_direction_from_the_models_own():
    # through sample(): the sixth of 10 deterministic DDIM steps written out by hand (Song et al. 2021,
    # eq. 12, v-prediction): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, with x0 from the
    # guided v and eps from the model's own v
    s = NoiseScheduler(1000, "cosine", prediction="v", clip_sample=None)
    model, guide = ExactGaussianDenoiser(s, 0.5, 0.3), ExactGaussianDenoiser(s, 0.2, 0.6)

    def draw(w, x0_only, sampler="ddim"):
        return sample(model, s, (500, 2), sampler=sampler, num_inference_steps=10 if sampler == "ddim" else None,
                      eta=0.0, guidance=Guidance(w, guide, x0_only=x0_only), trajectory=True,
                      generator=torch.Generator().manual_seed(3))

    trajectory, plain = draw(2.0, True), draw(2.0, False)
    (t, prev_t), tb = s.inference_timesteps(10, "uniform")[5:7], torch.full((500,), 0)
    abar, abar_prev = s.alphas_cumprod[t], s.alphas_cumprod[prev_t]

    def ddim_by_hand(x, v_for_x0, v_for_eps):
        x0 = abar.sqrt() * x - (1 - abar).sqrt() * v_for_x0            # x_0 of one v ...
        eps = (1 - abar).sqrt() * x + abar.sqrt() * v_for_eps           # ... eps of the other
        return abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps

    def outputs(x):  # (guided v, the model's own v)
        strong, weak = model(x, tb + t), guide(x, tb + t)
        return weak + 2.0 * (strong - weak), strong

    guided, own = outputs(trajectory[5])
    by_hand = ddim_by_hand(trajectory[5], guided, own)
    torch.testing.assert_close(trajectory[6], by_hand)
    guided_plain, _ = outputs(plain[5])
    torch.testing.assert_close(plain[6], ddim_by_hand(plain[5], guided_plain, guided_plain))
    plain_step = ddim_by_hand(trajectory[5], guided, guided)
    assert (by_hand - plain_step).abs().max() > 1e-2  # a check that can tell the two steps apart
    assert not torch.allclose(trajectory[-1], plain[-1], atol=1e-2)  # plain guidance moves eps too
    assert torch.equal(draw(1.0, True), draw(1.0, False))  # unguided: nothing to split
    # the ancestral step uses x0 alone: nothing changes there
    assert torch.equal(draw(2.0, True, "ddpm")[-1], draw(2.0, False, "ddpm")[-1])


def test_classifier_free_guidance_returns_the_labelled_prediction_as_the_models_own():
    class Conditional(torch.nn.Module):  # output: x times (label + 1); the null label is 10
        null_label = 10

        def forward(self, x, t, labels):
            return x * (labels + 1).reshape(-1, 1).to(x.dtype)

    x, labels = torch.randn(6, 2), torch.tensor([0, 1, 2, 3, 4, 5])
    guided, own = model_prediction(Conditional(), x, torch.tensor([7]), labels, 3.0)
    torch.testing.assert_close(own, x * (labels + 1).reshape(-1, 1).float())
    torch.testing.assert_close(guided, 11 * x + 3.0 * (own - 11 * x))


def test_interval_error_names_the_flag_and_the_bounds():
    assert guidance.interval_error(None, 1000) is None and guidance.interval_error((0, 999), 1000) is None
    for bad in ((5, 2), (0, 1000), (-1, 3)):
        message = guidance.interval_error(bad, 1000)
        assert "--guidance_interval" in message and "T = 1000" in message
