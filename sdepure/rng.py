"""Explicit, addressable randomness: seeds derived from (seed, image index, phase, ...) tuples.

Nothing here touches a global RNG; every random tensor in sdepure comes from a torch.Generator
seeded with `derive_seed(...)`, drawn on the CPU and moved to the device, so a result depends
only on its address, not on the device or on what else ran before it.
"""
from __future__ import annotations

import torch

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (order matters)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = _splitmix64(h ^ _splitmix64(int(p) & _MASK))
    return h >> 1


def generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def randn(shape, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Standard normal tensor addressed by `seed`: identical values on every device."""
    return torch.randn(shape, generator=generator(seed), dtype=dtype).to(device)
