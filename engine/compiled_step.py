"""The training step of ddpm.py compiled into one graph, for the 2D MLP on a CPU (--compile).

The MLP's step is mostly the overhead of ~100 small ops and of the autograd engine, not
arithmetic. Here torch.func takes the gradient while torch.compile traces, so the forward pass,
the backward pass, gradient clipping and AdamW become a few fused loops around the matrix
products (docs/speed.md has what it bought). AdamW is written out as torch.optim.AdamW computes
it, on that optimizer's own state, so checkpoints and --resume do not change; a test trains the
same run both ways and compares them step by step. Single process only: DistributedDataParallel
averages gradients inside loss.backward(), which this step never calls.
"""
import math

import torch

from datasets import is_image_dataset


def wanted(config, device, distributed, total_steps):
    """--compile auto: a 2D run on a CPU long enough to repay the compile (~4 s from the cache,
    ~20 s the first time); on: any single-process 2D run (images/defaults.py refuses it for images)."""
    choice = config.get("compile", "auto")
    if choice == "auto":
        return device == "cpu" and not distributed and not is_image_dataset(config["dataset"]) and total_steps >= 5000
    return choice == "on" and not distributed


def compiled_training_step(model, loss, optimizer, fallback=None, log=print):
    """step(x_start, noise, t, labels=None) -> loss, as ddpm.training_step computes it, compiled.

    loss(net, x_start, noise, t, labels) is the diffusion loss of a batch for any `net` called
    as net(x_t, t[, labels]). If compiling fails at the first call (no C++ compiler, say),
    `fallback` (the eager step) takes over, with a note. Compiling happens at the first step; `log`
    says so first, so that a still progress bar is not a mystery."""
    log("compiling the training step once (about 30 s on a first run, a few s from the cache; --compile off skips it)")
    names = [name for name, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    for p in params:  # AdamW's state, made now rather than at the first optimizer.step()
        if not optimizer.state[p]:  # (a resumed run has it from the checkpoint)
            optimizer.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                      exp_avg_sq=torch.zeros_like(p))
    group = optimizer.param_groups[0]
    # every tensor goes in as an argument: fewer guards for torch.compile to check at each call
    weights = [p.detach() for p in params]  # the same storage: AdamW below updates the model
    state = [[optimizer.state[p][key] for p in params] for key in ("exp_avg", "exp_avg_sq", "step")]

    def step(weights, exp_avgs, exp_avg_sqs, state_steps, x_start, noise, t, labels, lr, step_size,
             bias_correction2_sqrt):
        def loss_of(weights):
            def net(*inputs):
                return torch.func.functional_call(model, dict(zip(names, weights)), inputs)
            return loss(net, x_start, noise, t, labels)

        grads, value = torch.func.grad_and_value(loss_of)(weights)
        # clip_grad_norm_(max_norm=1): scale every gradient by min(1, 1 / total norm)
        total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        clip = (1.0 / (total_norm + 1e-6)).clamp(max=1.0)
        # AdamW (Loshchilov & Hutter 2019, Algorithm 2) as torch.optim.AdamW does it, on its state
        beta1, beta2 = group["betas"]
        for w, g, exp_avg, exp_avg_sq, count in zip(weights, grads, exp_avgs, exp_avg_sqs, state_steps):
            g = g * clip
            count.add_(1)
            w.mul_(1 - lr * group["weight_decay"])                    # decoupled weight decay
            exp_avg.lerp_(g, 1 - beta1)                               # m_t
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)    # v_t
            w.sub_(step_size * exp_avg / (exp_avg_sq.sqrt() / bias_correction2_sqrt + group["eps"]))
        return value.detach()

    # One graph per batch shape (a short last batch: two). On a CPU, inductor's C++ wrapper calls
    # the kernels from C++ rather than Python: the step is a few microseconds of work per kernel.
    on_cpu = params[0].device.type == "cpu"
    compiled = torch.compile(step, dynamic=False, options={"cpp_wrapper": True} if on_cpu else None)
    calls = 0

    def optimizer_step(x_start, noise, t, labels=None):
        nonlocal compiled, calls
        calls += 1
        # this step's learning rate and AdamW bias corrections go in as tensors (a changing number
        # would recompile), computed here once: inside the graph they were recomputed per element
        beta1, beta2 = group["betas"]
        n = float(state[2][0]) + 1
        scalars = [torch.tensor(v) for v in (group["lr"], group["lr"] / (1 - beta1**n), math.sqrt(1 - beta2**n))]
        if compiled is not None:
            try:
                return compiled(weights, *state, x_start, noise, t, labels, *scalars)
            except Exception as e:  # e.g. no C++ compiler: the first call fails before it changes anything
                if fallback is None or calls > 1:
                    raise
                log(f"note: torch.compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]}); "
                    "training without it")
                compiled = None
        return fallback(x_start, noise, t, labels)

    return optimizer_step
