"""Optimizers over stacked members: every tensor has a leading member axis G, and each member has
its own learning rate and weight decay. Per member the update is exactly torch.optim.Adam
(coupled L2 decay) or torch.optim.SGD (momentum, no dampening, no Nesterov)."""
from __future__ import annotations

import torch


class StackedOptimizer:
    """Adam or SGD for tensors shaped (G, ...). `decay[i]` says whether tensor i is decayed."""

    def __init__(self, params: list[torch.Tensor], decay: list[bool], kind: str, momentum: float = 0.9,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.decay, self.kind = params, decay, kind
        self.momentum, self.betas, self.eps = momentum, betas, eps
        self.state: list[dict] = [{} for _ in params]
        self.steps = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: torch.Tensor, wd: torch.Tensor, active: torch.Tensor) -> None:
        """One update with per-member `lr`, `wd` (G,); members with `active` False stay unchanged."""
        self.steps += 1
        for p, decay, st in zip(self.params, self.decay, self.state):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            g = p.grad + wd.view(shape) * p if decay else p.grad
            if self.kind == "adam":
                b1, b2 = self.betas
                if not st:
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                st["m"].mul_(b1).add_(g, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                bc1, bc2 = 1 - b1 ** self.steps, 1 - b2 ** self.steps
                update = st["m"] / (st["v"].sqrt() / bc2 ** 0.5 + self.eps) * (lr / bc1).view(shape)
            else:
                st["buf"] = g.clone() if "buf" not in st else st["buf"].mul_(self.momentum).add_(g)
                update = st["buf"] * lr.view(shape)
            p.sub_(torch.where(active.view(shape), update, torch.zeros((), device=p.device)))
