"""A1111's UniPC, written here from its source (modules/models/diffusion/uni_pc/uni_pc.py and
sd_samplers_timesteps_impl.unipc), at A1111's default options: variant bh1, order 3, lower orders at the end,
"time_uniform" steps, data prediction, no denoising to zero. To compare the worker's UniPC with.

The model's discrete timesteps 0 to 999 are continuous times (k + 1) / 1000; log alpha between them is linear in
time (``NoiseScheduleVP('discrete')``); the model is given the time as (t - 1/1000) x 1000.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def a1111_unipc(
    eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    order: int = 3,
) -> torch.Tensor:
    """Sample from ``x`` (noise at time 1) in ``steps`` steps; ``eps(x, t_input)`` is the guided noise prediction."""
    log_alphas = 0.5 * torch.log(alphas_cumprod.double())
    grid = torch.arange(1, len(log_alphas) + 1, dtype=torch.float64) / len(log_alphas)

    def log_alpha(t: torch.Tensor) -> torch.Tensor:
        return torch.tensor(np.interp(float(t), grid.numpy(), log_alphas.numpy()), dtype=torch.float64)

    def alpha_sigma_lambda(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        alpha = log_alpha(t).exp()
        sigma = (1 - alpha**2).sqrt()
        return alpha, sigma, alpha.log() - sigma.log()

    def data(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma, _ = alpha_sigma_lambda(t)
        noise = eps(x, (t - 1 / len(log_alphas)) * 1000).double()
        return (x - sigma * noise) / alpha

    def update(x: torch.Tensor, t: torch.Tensor, k: int, *, correct: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``multistep_uni_pc_bh_update`` from the last of ``seen`` (with ``models``, the model at each) to ``t``."""
        times = seen
        _, sigma_prev, lambda_prev = alpha_sigma_lambda(times[-1])
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(t)
        h = lambda_t - lambda_prev
        rks, d1s = [], []
        for i in range(1, k):
            rk = (alpha_sigma_lambda(times[-(i + 1)])[2] - lambda_prev) / h
            rks.append(rk)
            d1s.append((models[-(i + 1)] - models[-1]) / rk)
        rks.append(torch.tensor(1.0, dtype=torch.float64))
        ranks = torch.stack(rks)
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial, rows, b = 1, [], []
        for i in range(1, k + 1):  # bh1: B(h) = hh
            rows.append(ranks ** (i - 1))
            b.append(h_phi_k * factorial / hh)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        r, bs = torch.stack(rows), torch.stack(b)
        base = sigma_t / sigma_prev * x - alpha_t * h_phi_1 * models[-1]
        stacked = torch.stack(d1s, dim=1) if d1s else None
        x_t = base
        if stacked is not None:
            rhos_p = torch.tensor([0.5], dtype=torch.float64) if k == 2 else torch.linalg.solve(r[:-1, :-1], bs[:-1])
            x_t = base - alpha_t * hh * torch.einsum("k,bk...->b...", rhos_p, stacked)
        model_t = None
        if correct:
            model_t = data(x_t, t)
            rhos_c = torch.tensor([0.5], dtype=torch.float64) if k == 1 else torch.linalg.solve(r, bs)
            residual = torch.einsum("k,bk...->b...", rhos_c[:-1], stacked) if stacked is not None else 0
            x_t = base - alpha_t * hh * (residual + rhos_c[-1] * (model_t - models[-1]))
        return x_t, model_t

    x = x.double()
    times = list(torch.linspace(1.0, 1 / len(log_alphas), steps + 1, dtype=torch.float64))
    models: list[torch.Tensor] = [data(x, times[0])]
    seen: list[torch.Tensor] = [times[0]]
    for index in range(1, steps + 1):
        k = min(order, index, steps + 1 - index)  # warming up, and lower orders at the end
        x, model_x = update(x, times[index], k, correct=index < steps)
        if model_x is not None:  # the last step evaluates nothing after it
            models[:], seen[:] = [*models, model_x][-order:], [*seen, times[index]][-order:]
    return x
