"""DP-AdamBC: Adam with its second moment corrected for the DP noise (Tang, Shpilevskiy and
Lécuyer, AAAI 2024), the run config's `optimizer = "adam_bc"`.

Under DP-SGD every coordinate of the averaged gradient carries Gaussian noise of the same,
known variance (noise multiplier x clipping norm / expected batch size, squared). Adam's
second moment then estimates the signal's square plus that constant, which dwarfs it on most
coordinates, so Adam divides every coordinate by about the same number and its steps become
DP-SGD's. This optimizer subtracts the known variance before the square root (floored, so a
coordinate whose estimate falls below the noise does not take an unbounded step). It only
post-processes the privatized gradient: clipping, noise and accounting are untouched, so the
privacy guarantee is the same as with any other optimizer.
"""

from __future__ import annotations

import torch


class BiasCorrectedAdam(torch.optim.Optimizer):
    """Adam whose second-moment estimate has `noise_variance` taken out (no weight decay).

    `noise_variance` is per coordinate of the gradient the step sees; the trainer sets it from
    the round's DP plan once Opacus has wrapped the optimizer (0 without DP: plain Adam, with
    `floor` in place of Adam's epsilon).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        floor: float = 5e-8,
        noise_variance: float = 0.0,
    ):
        super().__init__(params, {"lr": lr, "betas": betas, "floor": floor})
        self.noise_variance = noise_variance

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["mean"] = torch.zeros_like(p)
                    state["square"] = torch.zeros_like(p)
                state["step"] += 1
                state["mean"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["square"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                mean = state["mean"] / (1 - beta1 ** state["step"])
                square = state["square"] / (1 - beta2 ** state["step"])
                denominator = (square - self.noise_variance).clamp(min=group["floor"]).sqrt()
                p.addcdiv_(mean, denominator, value=-group["lr"])
        return loss
