"""Explicit, addressable randomness: seeds derived from (seed, image index, phase, ...) tuples.

Nothing here touches a global RNG; every random tensor in sdepure comes from a torch.Generator
seeded with `derive_seed(...)`. Two streams, chosen by `rng`:
- "cpu" (default): drawn by a CPU generator and moved to the device, so a result depends only
  on its address, not on the device or on what else ran before it;
- "device": drawn on the target device by a generator of that device seeded with the same
  address: no host-to-device copy per draw (what a CUDA run wants), but the values differ
  between device types (on the CPU the two streams coincide).
"""
from __future__ import annotations

import torch

from .errors import SdepureError

_MASK = (1 << 64) - 1
RNGS = ("cpu", "device")


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


def check_rng(rng: str) -> None:
    if rng not in RNGS:
        raise SdepureError(f"unknown rng {rng!r}; choose from {', '.join(RNGS)}")


def generator(seed: int, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """CPU tensor -> device. To CUDA through pinned memory without blocking: a plain .to() of
    pageable memory waits for the device's queue, a host synchronisation in every solver step."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Draws:
    """Standard normal draws addressed by seeds, on `device`, from the `rng` stream. Keeps one
    generator and re-seeds it per draw (re-seeding neither allocates nor synchronises)."""

    def __init__(self, device="cpu", rng: str = "cpu"):
        check_rng(rng)
        self.device, self.rng = torch.device(device), rng
        # the meta device (used by tests to catch host reads) has no generator
        self._device_gen = rng == "device" and self.device.type != "meta"
        self._gen = torch.Generator(device=self.device if self._device_gen else "cpu")

    def randn(self, shape, seed: int, dtype=torch.float32) -> torch.Tensor:
        self._gen.manual_seed(seed)
        if self._device_gen:
            return torch.randn(shape, generator=self._gen, dtype=dtype, device=self.device)
        if self.rng == "device":  # meta tensors have shapes, no values
            return torch.randn(shape, dtype=dtype, device=self.device)
        return to_device(torch.randn(shape, generator=self._gen, dtype=dtype), self.device)


def randn(shape, seed: int, dtype=torch.float32, device="cpu", rng: str = "cpu") -> torch.Tensor:
    """Standard normal tensor addressed by `seed`; with rng="cpu", identical values on every device."""
    return Draws(device, rng).randn(shape, seed, dtype)
