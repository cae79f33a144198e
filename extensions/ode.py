"""Euler and Heun steps along a probability-flow ODE dx/ds = f(x, s), the samplers of flow.py and edm.py.

Both walk a grid s_0 > s_1 > ... > s_N from noise to data. Euler takes one evaluation of f a step:
    x_{i+1} = x_i + (s_{i+1} - s_i) f(x_i, s_i)
Heun (Karras et al. 2022, Algorithm 1, their deterministic sampler) corrects it with the slope at the
end of the step, the trapezoidal rule:
    x'      = x_i + (s_{i+1} - s_i) f(x_i, s_i)
    x_{i+1} = x_i + (s_{i+1} - s_i) (f(x_i, s_i) + f(x', s_{i+1})) / 2
except at the last step, which lands on s = 0 and stays Euler's (there EDM's slope divides by sigma = 0).
So N steps cost N evaluations with Euler and 2N - 1 with Heun: `evaluations` counts them, so that
tables compare samplers at equal cost. With churn gamma > 0 (EDM's stochastic sampler, their Algorithm 2;
for paths x = x_0 + s eps only) each step first raises the noise to s_hat = (1 + gamma) s with fresh noise,
    x_hat = x_i + sqrt(s_hat^2 - s_i^2) z,   z ~ N(0, I)
and steps from (x_hat, s_hat) to s_{i+1}: it forgets part of the error made so far.
"""
import math

import torch

SAMPLERS = ("euler", "heun")


def evaluations(sampler, steps):
    return steps if sampler == "euler" else 2 * steps - 1


def solve(slope, x, grid, sampler, trajectory=None, churn=0.0, generator=None):
    """x at grid[-1] from x at grid[0]: slope(x, s) is f; grid a list of floats. trajectory: a list that
    gets every x_i appended. churn: gamma, with noise from `generator`."""
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        if churn > 0:  # Algorithm 2: up to s_hat = (1 + gamma) s with fresh noise, then the step from there
            s_hat = (1 + churn) * s
            x = x + math.sqrt(s_hat**2 - s**2) * torch.randn(x.shape, generator=generator, device=x.device)
            s = s_hat
        d = slope(x, s)
        x_next = x + (s_next - s) * d                                  # Euler
        if sampler == "heun" and i < len(grid) - 2:                    # the last step stays Euler's
            x_next = x + (s_next - s) * (d + slope(x_next, s_next)) / 2  # the trapezoidal correction
        x = x_next
        if trajectory is not None:
            trajectory.append(x)
    return x
