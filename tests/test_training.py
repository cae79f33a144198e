"""Algorithm 1 as train() runs it: the loss of eq. 14 and its Min-SNR weights, the EMA of the weights, the
label dropout of classifier-free training, each against a formula written out here or a count."""
import os

import numpy as np
import pytest
import torch

import ddpm
from extensions import guidance
from helpers import TINY, numpy_betas, write_fake_mnist


def squared_errors(net, x_t, t, target):
    """Each example's mean squared error [B] of net(x_t, t) against target, in float64."""
    return (net(x_t.float(), t).double() - target).square().flatten(1).mean(1)


@pytest.mark.parametrize("gamma", [0.0, 5.0], ids=["simple", "min_snr_5"])
@pytest.mark.parametrize("prediction", ddpm.PREDICTIONS)
def test_diffusion_loss_is_eq14_and_min_snr_by_hand(prediction, gamma):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (eq. 4); the target eps, x0 or v = sqrt(abar_t) eps -
    sqrt(1 - abar_t) x0; the loss the mean squared error (eq. 14), or with Min-SNR-gamma (Hang et al. 2023)
    each example's error weighted by min(SNR, gamma) / SNR (eps), min(SNR, gamma) / (SNR + 1) (v),
    min(SNR, gamma) (x0), SNR = abar_t / (1 - abar_t), then the mean over the batch."""
    T, B = 100, 64
    s = ddpm.NoiseScheduler(T, "cosine", prediction=prediction)
    abar = torch.from_numpy(np.cumprod(1 - numpy_betas("cosine", T, None, None)))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(B, 3, 2, generator=g), torch.randn(B, 3, 2, generator=g)
    t = torch.arange(B) * (T - 1) // (B - 1)  # every noise level, from t = 0 to T - 1

    def net(x, t):  # a network that depends on x_t and t
        return 0.5 * torch.tanh(x) + t.float().reshape(-1, 1, 1) / T

    ab = abar[t].reshape(-1, 1, 1)
    x_t = ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double()
    target = {"epsilon": eps.double(), "x0": x0.double(),
              "v": ab.sqrt() * eps.double() - (1 - ab).sqrt() * x0.double()}[prediction]
    errors = squared_errors(net, x_t, t, target)
    if gamma:
        snr = abar[t] / (1 - abar[t])
        clipped = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
        weight = {"epsilon": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[prediction]
        expected = (weight * errors).mean()
        assert float(weight.max() / weight.min()) > 10  # the weights really differ between examples
    else:
        expected = errors.mean()
    loss = ddpm.diffusion_loss(net, x0, eps, t, scheduler=s, min_snr_gamma=gamma)
    assert loss.shape == () and float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_ema_inside_train_is_the_running_average_of_every_step(tmp_path, monkeypatch):
    """ema <- ema + (1 - d_s) (w_{s+1} - ema) after each optimizer step s, from the initial weights, with the
    warm-up decay d_s = min(decay, (1 + s) / (10 + s)): replayed here from the weights of every step of a real
    run (96 steps, decay 0.9: the warm-up reaches the cap at step 71), against its model_ema.pth."""
    weights = []  # the initial weights, then those after each step, as ddpm.train's steps leave them
    real_step = ddpm.training_step

    def recording_step(net, *args):
        if not weights:
            weights.append({k: p.detach().double().clone() for k, p in net.named_parameters()})
        loss = real_step(net, *args)
        weights.append({k: p.detach().double().clone() for k, p in net.named_parameters()})
        return loss

    monkeypatch.setattr(ddpm, "training_step", recording_step)
    ddpm.main(["--out_dir", str(tmp_path), "--experiment_name", "ema", *TINY, "--train_batch_size", "8",
               "--lr_schedule", "constant", "--ema_decay", "0.9", "--compile", "off", "--frame_worker", "off", "--save_images_step", "3"])
    steps = 3 * 256 // 8
    assert len(weights) == steps + 1
    ema = dict(weights[0])
    for s in range(steps):
        d = min(0.9, (1 + s) / (10 + s))
        ema = {k: e + (1 - d) * (weights[s + 1][k] - e) for k, e in ema.items()}
    saved = torch.load(tmp_path / "ema" / "model_ema.pth", weights_only=True)
    raw = torch.load(tmp_path / "ema" / "model.pth", weights_only=True)
    for k, e in ema.items():
        torch.testing.assert_close(saved[k].double(), e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
        torch.testing.assert_close(raw[k].double(), weights[-1][k])  # the raw weights: the last step's
    # the check has teeth: the EMA is neither the last weights, nor the first, nor a 0.9-EMA without warm-up
    plain = dict(weights[0])
    for s in range(steps):
        plain = {k: e + 0.1 * (weights[s + 1][k] - e) for k, e in plain.items()}
    for other in (weights[-1], weights[0], plain):  # measured: 0.018, 0.08, 2.8e-4; the tolerance above ~1e-5
        assert max(float((saved[k].double() - other[k]).abs().max()) for k in ema) > 1e-4


def test_classifier_free_training_replaces_one_label_in_ten_by_the_null_label():
    # extensions/guidance.drop_labels, counted: each label of the batch independently becomes the null
    # label with probability 0.1 (Ho & Salimans 2022, p_uncond = 0.1); the rest are the batch's own labels
    class Conditional:
        null_label = 10

    n = 200_000
    labels = torch.arange(n) % 10
    g = torch.Generator().manual_seed(0)
    index = torch.randperm(n, generator=g)[: n // 2]
    y = guidance.drop_labels(labels, index, Conditional(), g)
    dropped = y == 10
    assert torch.equal(y[~dropped], labels[index][~dropped])
    m = len(index)
    assert abs(float(dropped.float().mean()) - 0.1) < 4 * (0.1 * 0.9 / m) ** 0.5
    for c in range(10):  # the same share in every class
        in_class = labels[index] == c
        share = float(dropped[in_class].float().mean())
        assert abs(share - 0.1) < 4 * (0.1 * 0.9 / int(in_class.sum())) ** 0.5, (c, share)
    both = float((dropped[1:] & dropped[:-1]).float().mean())  # independent between neighbours: 0.1 * 0.1
    assert abs(both - 0.01) < 4 * (0.01 * 0.99 / m) ** 0.5
    other = guidance.drop_labels(labels, index, Conditional(), torch.Generator().manual_seed(1))
    assert not torch.equal(other == 10, dropped)  # drawn from the generator, not fixed
    assert guidance.drop_labels(None, index, Conditional(), g) is None  # unconditional runs: no labels


def test_train_hands_the_optimizer_step_the_labels_with_one_in_ten_dropped(tmp_path, monkeypatch):
    # a class-conditional image run (2 epochs of 200 fake digits, batches of 8): every label the optimizer step
    # sees is the null label or one of the epoch's own, each epoch's kept labels a part of its 200, ~10% dropped
    from images import data as image_data
    data_dir = write_fake_mnist(tmp_path)
    batches = []

    def recording_step(net, loss_function, optimizer, x_start, noise, t, labels=None):
        batches.append(labels.clone())
        return torch.tensor(1.0)  # the labels are all this test needs: no gradient step

    monkeypatch.setattr(ddpm, "training_step", recording_step)
    ddpm.main(["--dataset", "mnist", "--data_dir", data_dir, "--out_dir", str(tmp_path), "--experiment_name", "cfg",
               "--dataset_size", "200", "--num_epochs", "2", "--train_batch_size", "8", "--unet_channels", "8",
               "--num_timesteps", "20", "--num_inference_steps", "2", "--eval_batch_size", "16",
               "--save_images_step", "2", "--class_conditional", "--quiet", "--frame_worker", "off"])
    own = np.bincount(image_data.read_idx(os.path.join(data_dir, "train-labels-idx1-ubyte.gz")), minlength=10)
    assert len(batches) == 2 * 200 // 8
    for epoch in (batches[:25], batches[25:]):
        y = torch.cat(epoch).numpy()
        assert len(y) == 200 and ((0 <= y) & (y <= 10)).all()
        kept = np.bincount(y[y != 10], minlength=10)
        assert (kept <= own).all(), (kept, own)  # each example once an epoch, its own label or none
    y = torch.cat(batches)
    share = float((y == 10).float().mean())
    assert abs(share - 0.1) < 4 * (0.1 * 0.9 / len(y)) ** 0.5, share
