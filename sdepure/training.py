"""Training of the embedded digits models (`sdepure train digits`): seeded, CPU-sized."""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch
from torch import nn

from .schedules import VPSchedule


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random translation by up to max_shift pixels with zero fill (per image)."""
    if max_shift == 0:
        return x
    n = x.shape[0]
    pad = nn.functional.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    h, w = x.shape[-2:]
    rows = (dy[:, None] + torch.arange(h)[None])[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, :].expand(n, h, w)
    idx = torch.arange(n)[:, None, None].expand(n, h, w)
    return pad[idx, :, rows, cols].permute(0, 3, 1, 2)


def train_eps(net: nn.Module, schedule: VPSchedule, x01: torch.Tensor, *, steps: int, seed: int,
              batch: int = 256, lr: float = 1e-3, ema_decay: float = 0.999, t_min: float = 1e-3, t_max: float = 1.0,
              max_shift: int = 0, log: Callable[[str], None] | None = None) -> tuple[nn.Module, dict]:
    """Denoising score matching in eps form for `steps` steps; returns the EMA network."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # parameter init of anything created later; the net is already built
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    x0_all = 2 * x01 - 1
    n = x0_all.shape[0]
    start = time.time()
    losses = []
    net.train()
    for step in range(1, steps + 1):
        for group in opt.param_groups:  # cosine decay to 5%
            group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(0, n, (batch,), generator=g)
        x0 = x0_all[idx]
        if max_shift:
            x0 = 2 * _shift((x0 + 1) / 2, g, max_shift) - 1
        t = t_min + (t_max - t_min) * torch.rand(batch, generator=g)
        ab = schedule.alpha_bar(t.double()).float().view(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=g)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        loss = ((net(xt, t) - noise) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - ema_decay)
        losses.append(loss.item())
        if log and step % 2000 == 0:
            log(f"eps step {step} loss {sum(losses[-2000:]) / 2000:.4f}")
    return ema, {"steps": steps, "seconds": time.time() - start, "final_loss": sum(losses[-500:]) / max(1, len(losses[-500:]))}


@torch.no_grad()
def eps_loss(net: nn.Module, schedule: VPSchedule, x01: torch.Tensor, seed: int, t_values=(0.05, 0.15, 0.25, 0.4)) -> dict:
    """Held-out eps MSE at a few fixed times (for overfitting checks)."""
    g = torch.Generator().manual_seed(seed)
    x0 = 2 * x01 - 1
    out = {}
    for t in t_values:
        ab = float(schedule.alpha_bar(torch.tensor(t, dtype=torch.float64)))
        noise = torch.randn(x0.shape, generator=g)
        xt = ab ** 0.5 * x0 + (1 - ab) ** 0.5 * noise
        out[f"t={t}"] = float(((net(xt, torch.full((len(x0),), t)) - noise) ** 2).mean())
    return out


def train_classifier(net: nn.Module, x01: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int,
                     batch: int = 64, lr: float = 2e-3, max_shift: int = 1,
                     log: Callable[[str], None] | None = None) -> tuple[nn.Module, dict]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    n = x01.shape[0]
    start = time.time()
    net.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            xb = _shift(x01[idx], g, max_shift)
            loss = nn.functional.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if log and (epoch + 1) % 10 == 0:
            log(f"classifier epoch {epoch + 1} loss {total / n:.4f}")
    net.eval()
    return net, {"epochs": epochs, "seconds": time.time() - start}
