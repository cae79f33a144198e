"""torchrun / DistributedDataParallel on CPU (gloo), and the --precision and --compile switches."""
import copy
import functools
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import ddpm
from engine import compiled_step, ddp
from helpers import ROOT, TINY, outputs, train


def test_two_process_run_writes_one_set_of_outputs(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "ddpm.py"), "--out_dir", str(tmp_path), "--experiment_name", "ddp", *TINY]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done in") == 1  # only rank 0 prints
    config, loss, frames = outputs(tmp_path / "ddp")
    assert config["world_size"] == 2
    # 256 examples, 128 per rank, batch 32 per rank: 4 steps per epoch, 3 epochs
    assert loss.shape == (12,) and np.isfinite(loss).all()
    assert frames.shape == (3, 64, 2)
    assert sorted(os.listdir(tmp_path / "ddp" / "images")) == ["0000.png", "0001.png", "0002.png"]
    # written under DDP, loaded in a single process: no "module." prefix
    model = ddpm.build_model(config)
    model.load_state_dict(torch.load(tmp_path / "ddp" / "model.pth", weights_only=True))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_step_on_rank(rank, world_size, port, batch, out_path):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    model, scheduler, optimizer, (x, noise, t) = batch()
    net = torch.nn.parallel.DistributedDataParallel(model)
    half = len(x) // world_size
    part = slice(rank * half, (rank + 1) * half)
    ddpm.training_step(net, functools.partial(ddpm.diffusion_loss, scheduler=scheduler), optimizer, x[part],
                       noise[part], t[part])
    if rank == 0:
        torch.save(model.state_dict(), out_path)
    # both ranks done before either tears gloo down: a rank that leaves while the other is still
    # saving can kill it ("terminate called without an active exception", once in a full test run)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def make_batch():
    torch.manual_seed(0)
    model = ddpm.MLP(hidden_size=32, hidden_layers=2, embedding_size=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = ddpm.NoiseScheduler(50)
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    t = torch.randint(0, 50, (64,), generator=g)
    return model, scheduler, optimizer, (x, noise, t)


def test_ddp_first_step_equals_one_process_with_the_whole_batch(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_one_step_on_rank, args=(2, free_port(), make_batch, str(out)), nprocs=2, join=True)
    ddp_weights = torch.load(out, weights_only=True)
    model, scheduler, optimizer, (x, noise, t) = make_batch()
    before = copy.deepcopy(model.state_dict())
    ddpm.training_step(model, functools.partial(ddpm.diffusion_loss, scheduler=scheduler), optimizer, x, noise, t)
    for name, value in model.named_parameters():
        torch.testing.assert_close(ddp_weights[name], value, rtol=1e-5, atol=1e-6)
        assert not torch.equal(value, before[name])  # the step moved every weight


def test_bf16_precision_run(tmp_path):
    result = train(tmp_path, "bf16", *TINY, "--precision", "bf16")
    assert result.returncode == 0, result.stderr[-2000:]
    config, loss, _ = outputs(tmp_path / "bf16")
    assert config["precision"] == "bf16" and np.isfinite(loss).all()
    assert loss[-3:].mean() < loss[:3].mean()  # it still learns


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="torch.compile on CPU needs a C compiler")
def test_compiled_step_trains_like_the_eager_one(tmp_path):
    # 240 examples at batch 32: a short last batch (16) too, which compiles a second graph
    flags = [*TINY, "--dataset_size", "240", "--min_snr_gamma", "5", "--hidden_size", "32", "--hidden_layers", "1"]
    for mode in ("on", "off"):
        result = train(tmp_path, mode, *flags, "--compile", mode, timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        said = result.stdout + result.stderr
        # "on" compiled the step; had compiling failed, the eager fallback would make this compare eager with eager
        assert ("compiling the training step" in said) == (mode == "on"), said[-3000:]
        assert "torch.compile failed" not in said, said[-3000:]
    config, loss_compiled, frames = outputs(tmp_path / "on")
    _, loss_eager, _ = outputs(tmp_path / "off")
    assert "compile" not in config  # how to run, not what was trained
    assert loss_compiled.shape == (24,) and frames.shape == (3, 64, 2)
    # the same losses step by step: the same gradients, clipping, AdamW and learning-rate schedule
    np.testing.assert_allclose(loss_compiled, loss_eager, rtol=1e-4)
    weights = {name: torch.load(tmp_path / name / "model.pth", weights_only=True) for name in ("on", "off")}
    for key, value in weights["off"].items():
        torch.testing.assert_close(weights["on"][key], value, rtol=1e-4, atol=1e-5)
    model = ddpm.build_model(config)  # plain weights: no "_orig_mod." prefix
    model.load_state_dict(weights["on"])


def test_compiled_step_falls_back_when_compiling_fails(monkeypatch):
    def broken_compile(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no C++ compiler found\nsecond line")
        return fail
    monkeypatch.setattr(torch, "compile", broken_compile)
    torch.manual_seed(0)
    model = ddpm.MLP(hidden_size=16, hidden_layers=1, embedding_size=8, num_timesteps=10)
    reference = copy.deepcopy(model)
    scheduler = ddpm.NoiseScheduler(10)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, reference)]
    messages = []
    loss = functools.partial(ddpm.diffusion_loss, scheduler=scheduler)
    eager = functools.partial(ddpm.training_step, model, loss, optimizers[0])
    step = compiled_step.compiled_training_step(model, loss, optimizers[0], eager, messages.append)
    x, noise, t = torch.randn(8, 2), torch.randn(8, 2), torch.randint(0, 10, (8,))
    for _ in range(2):
        step(x, noise, t)
        ddpm.training_step(reference, loss, optimizers[1], x, noise, t)
    assert len(messages) == 2 and "compiling" in messages[0]
    assert "no C++ compiler found" in messages[1] and "second line" not in messages[1]
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("n, world_size", [(256, 2), (250, 3), (7, 2), (1000, 4)])
def test_ranks_take_disjoint_shards_that_cover_the_epoch_and_draw_their_own_noise(n, world_size):
    # engine/ddp.Processes as each rank of a torchrun launch builds it (its process group is not needed for
    # these): counted here, the shards of one epoch are disjoint, equally long (every rank takes as many
    # steps) and together hold all but n mod W examples; the order generator is shared, the noise is not
    config = {"device": "cpu", "dataset": "moons"}
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    ranks = [ddp.Processes(rank, world_size, config) for rank in range(world_size)]
    shards = [r.shard(perm).tolist() for r in ranks]
    assert [len(shard) for shard in shards] == [n // world_size] * world_size
    together = [i for shard in shards for i in shard]
    assert len(set(together)) == len(together) == n - n % world_size  # disjoint, and all but n mod W
    assert set(together) <= set(perm.tolist())
    assert all(r.shard_size(n) == n // world_size for r in ranks)
    order = torch.Generator().manual_seed(5)
    draws = [r.noise_generator(5, order) for r in ranks]
    noise = [torch.randn(1000, generator=g) for g in draws]
    for a in range(world_size):
        assert draws[a] is not order  # under torchrun the noise is the rank's own ...
        for b in range(a + 1, world_size):
            assert float(torch.corrcoef(torch.stack([noise[a], noise[b]]))[0, 1]) < 0.15  # ... and independent
    # again with the same seed: the same noise on each rank (a resumed rank continues its own stream)
    again = [torch.randn(1000, generator=r.noise_generator(5, order)) for r in ranks]
    assert all(torch.equal(x, y) for x, y in zip(noise, again))
    alone = ddp.Processes(0, 1, config)  # one process: one generator for the order and the noise, as before
    assert alone.noise_generator(5, order) is order and alone.shard(perm).tolist() == perm.tolist()
