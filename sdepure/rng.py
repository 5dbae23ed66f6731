"""Explicit, addressable randomness: seeds derived from (seed, image index, phase, ...) tuples.

Nothing here touches a global RNG; every random tensor in sdepure comes from a torch.Generator
seeded with `derive_seed(...)`. Two streams, chosen by `rng`:
- "cpu": drawn by a CPU generator and moved to the device, so a result depends only on its
  address, not on the device or on what else ran before it;
- "device": drawn on the target device by a generator of that device seeded with the same
  address: no host-to-device copy per draw (what a CUDA run wants), but the values differ
  between device types (on the CPU the two streams coincide).

The address tree. Every seed is derive_seed(parent, tag or counter, ...); the tags of each level
are named once, below, so that no draw reuses another's seed. Values are those of earlier
versions except the attack's: its call counter used to sit beside the attack's phases under the
run seed (call c had the seed of phase c), and since attack runs resume batch by batch every
attack phase is addressed per batch of examples (batch b = examples b*batch .. (b+1)*batch - 1 of
the selection).

    certify run seed -> image i                      derive_seed(seed, i)
      image -> Smoothing.SELECT / ESTIMATE / PREDICT   derive_seed(image, phase)
        phase -> batch b -> Batch.NOISE / BASE       derive_seed(phase, b, tag); BASE is a draw seed
    attack run seed -> AttackPhase.CLEAN_FLAGS, ROBUST_FLAGS, CALLS, batch b  derive_seed(seed, phase, b)
                       -> call counter c             derive_seed(phase b, c)  (a draw seed)
                    -> AttackPhase.SCORE_CLEAN, SCORE_ADV, batch b
                       -> draw d, row offset 0        derive_seed(phase b, d, 0)  (a draw seed)
                    -> AttackPhase.FIXED -> example i  derive_seed(phase, i)  (a draw seed)
                    -> AttackPhase.OPTIMISE, batch b  derive_seed(seed, OPTIMISE, b); AutoAttack's
                       seed (pyautoattack reseeds torch's generators with it at each attack)
    search seed (an input of regions.nearest_change) -> Search.CONFIRM, RUNNER_UP
                                                     -> Search.CANDIDATE, c (a candidate direction)
        candidate -> Search.SOFT step k -> Batch.NOISE / BASE; Search.SEARCH call k
    draw seed (one call of the defense) -> Draw.FORWARD (forward noise to t*), Draw.PATH
      path -> K > 1: run k's stream                  derive_seed(path, k)
              K = 1: the path is the stream itself
        stream -> step k                              derive_seed(stream, k)
(A path's children are runs when K > 1 and steps when K = 1, never both in one defense.)
"""
from __future__ import annotations

from enum import IntEnum, unique

import torch

from .errors import SdepureError

_MASK = (1 << 64) - 1
RNGS = ("cpu", "device")


@unique
class Smoothing(IntEnum):
    """Phases of one image's CERTIFY / PREDICT (children of the image's seed)."""
    SELECT = 0
    ESTIMATE = 1
    PREDICT = 2


@unique
class Batch(IntEnum):
    """Within batch b of a smoothing phase: derive_seed(phase, b, tag)."""
    NOISE = 0   # the smoothing noise
    BASE = 1    # the base classifier's draw seed


@unique
class Draw(IntEnum):
    """One call of the defense on clean inputs (attacks): forward noise, then the reverse paths."""
    FORWARD = 0
    PATH = 1


@unique
class AttackPhase(IntEnum):
    """Phases of an attack run (children of the run's seed)."""
    CLEAN_FLAGS = 1
    ROBUST_FLAGS = 2
    OPTIMISE = 3        # per batch b of examples: derive_seed(seed, OPTIMISE, b)
    SCORE_CLEAN = 4
    SCORE_ADV = 5
    FIXED = 6           # fixed randomness: example i's draw seed is derive_seed(phase, i)
    CALLS = 7           # the attacked model's calls during optimisation


@unique
class Search(IntEnum):
    """The search for an input's nearest change of a smoothed classifier (regions.py): CONFIRM and
    RUNNER_UP are children of the input's seed, SOFT and SEARCH of a candidate direction's."""
    SOFT = 0       # step k of the attack on the soft classifier: derive_seed(candidate, SOFT, k), then Batch tags
    SEARCH = 1     # the search's k-th PREDICT: derive_seed(candidate, SEARCH, k)
    CONFIRM = 2    # the one fresh PREDICT at the final point: derive_seed(input, CONFIRM)
    RUNNER_UP = 3  # the soft classifier at the input, for the runner-up class
    CANDIDATE = 4  # candidate direction c: derive_seed(input, CANDIDATE, c)


@unique
class Optimise(IntEnum):
    """Within one batch's optimisation (DiffAttack): round r starts from derive_seed(batch, r),
    and the round's result is judged on draws derive_seed(batch, SELECT, r, d)."""
    SELECT = 100


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
    """Standard normal draws addressed by seeds, from the `rng` stream, on any device. Keeps one
    generator per device and re-seeds it per draw (re-seeding neither allocates nor synchronises).
    One object is made where a defense or solve is set up and passed down; tests replace it."""

    def __init__(self, rng: str = "cpu"):
        check_rng(rng)
        self.rng = rng
        self._gens: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._gens.get(device)
        if g is None:
            g = self._gens[device] = torch.Generator(device=device)
        return g

    def randn(self, shape, seed: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
        device = torch.device(device)
        if self.rng == "device":
            if device.type == "meta":  # meta tensors have shapes, no values (tests catch host reads)
                return torch.randn(shape, dtype=dtype, device=device)
            return torch.randn(shape, generator=self._generator(device).manual_seed(seed), dtype=dtype,
                               device=device)
        z = torch.randn(shape, generator=self._generator(torch.device("cpu")).manual_seed(seed), dtype=dtype)
        return z if device.type == "cpu" else to_device(z, device)


def randn(shape, seed: int, dtype=torch.float32, device="cpu", rng: str = "cpu") -> torch.Tensor:
    """Standard normal tensor addressed by `seed`; with rng="cpu", identical values on every device."""
    return Draws(rng).randn(shape, seed, device, dtype)
