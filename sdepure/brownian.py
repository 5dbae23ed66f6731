"""Noise addressed row by row (`Streams`), and the seeded Brownian motion on the step grid.

`Streams` says where each row of a batch takes its Gaussian draws from: row r is row `row[r]`
of the (width, ...) draw seeded by `seed[r]` (and a tag, such as the step index). A batch of
inputs under one seed is one block (`Streams.batch`); an input with a seed of its own is a block
of width 1 (`Streams.per_row`); DensePure's K runs of a batch are K blocks (`Streams.runs`). Row
(seed, row) gets the same numbers whichever other rows are drawn with it, in whatever order, so
an early-stopped vote, a resumed run or a fixed-randomness attack sees the draws of a plain run.

The reverse solvers integrate in step-index time (see sde.py), so every query the fixed-step
torchsde methods make is an interval [k, k + 1] with integer ends. Increment k of a block is
drawn from a generator seeded with derive_seed(seed, k): the path costs nothing to build, needs no
memory, and gives the same increments when the adjoint queries it again backwards.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchsde import BaseBrownian

from .errors import SdepureError
from .rng import Draws, derive_seed, to_device


@dataclass(frozen=True)
class Streams:
    """Noise address of each row of a batch (see the module docstring)."""
    seed: tuple[int, ...]
    row: tuple[int, ...]
    width: int

    def __post_init__(self):
        if len(self.seed) != len(self.row):
            raise SdepureError("Streams: seed and row must have one entry per row")
        if any(r < 0 or r >= self.width for r in self.row):
            raise SdepureError(f"Streams: rows must lie in [0, {self.width})")

    @classmethod
    def batch(cls, seed: int, n: int) -> "Streams":
        """n rows drawn together under one seed."""
        return cls((int(seed),) * n, tuple(range(n)), int(n))

    @classmethod
    def per_row(cls, seeds) -> "Streams":
        """One seed per row: each row's draws are its own, whatever batch it runs in."""
        seeds = tuple(int(s) for s in seeds)
        return cls(seeds, (0,) * len(seeds), 1)

    def __len__(self) -> int:
        return len(self.seed)

    def derive(self, *tags: int) -> "Streams":
        """The same rows under the child seeds derive_seed(seed, *tags)."""
        child: dict[int, int] = {}
        for s in self.seed:
            if s not in child:
                child[s] = derive_seed(s, *tags)
        return Streams(tuple(child[s] for s in self.seed), self.row, self.width)

    def take(self, rows) -> "Streams":
        rows = [int(r) for r in rows]
        return Streams(tuple(self.seed[r] for r in rows), tuple(self.row[r] for r in rows), self.width)

    def runs(self, runs, votes: int) -> "Streams":
        """DensePure's layout: for k in runs, every row (run-major, as x.repeat(len(runs))); run k
        draws from the child seed derive_seed(seed, k), and with one vote from the seed itself."""
        runs = [int(k) for k in runs]
        if any(k < 0 or k >= votes for k in runs):
            raise SdepureError(f"runs must lie in [0, {votes})")
        blocks = [self if votes == 1 else self.derive(k) for k in runs]
        return Streams(tuple(s for b in blocks for s in b.seed), self.row * len(runs), self.width)


class RowNoise:
    """Standard normal draws for rows addressed by `streams`: draw(*tags) gives row r the row
    streams.row[r] of randn((width, *shape), derive_seed(streams.seed[r], *tags)) (no tags: the
    seed itself), drawn in `dtype` by `draws`. Index tensors are built once, where the draws are
    made: on the device for the device stream; on the host for the CPU stream, whose rows are
    gathered there and copied to the device once per draw."""

    def __init__(self, streams: Streams, shape, draws: Draws, device="cpu", dtype=torch.float32):
        self.streams, self.shape, self.draws, self.dtype = streams, tuple(shape), draws, dtype
        self.device = torch.device(device)
        self._on = self.device if draws.rng == "device" else torch.device("cpu")
        by_seed: dict[int, list[int]] = {}
        for r, s in enumerate(streams.seed):
            by_seed.setdefault(s, []).append(r)
        self._groups = []
        for s, rows in by_seed.items():
            src = [streams.row[r] for r in rows]
            index = None if src == list(range(streams.width)) else to_device(torch.tensor(src), self._on)
            self._groups.append((s, index))
        order = [r for rows in by_seed.values() for r in rows]
        self._inverse = None
        if order != list(range(len(order))):
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            self._inverse = to_device(inverse, self._on)

    def draw(self, *tags: int) -> torch.Tensor:
        shape = (self.streams.width, *self.shape)
        pieces = []
        for seed, index in self._groups:
            z = self.draws.randn(shape, derive_seed(seed, *tags) if tags else seed, self._on, self.dtype)
            pieces.append(z if index is None else z.index_select(0, index))
        z = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if self._inverse is not None:
            z = z.index_select(0, self._inverse)
        return z if self._on == self.device else to_device(z, self.device)


class GridBrownian(BaseBrownian):
    """W on {0, 1, ..., steps} with W(k + 1) - W(k) ~ N(0, I) of shape `shape` (rows first),
    increment k of each row drawn as RowNoise.draw(k) (float32, then cast to `dtype`). `address`:
    Streams, or an int seed for one block of all rows. draws: the generator (rng.Draws; default
    the CPU stream)."""

    def __init__(self, address, shape, dtype=torch.float32, device="cpu", draws: Draws | None = None):
        shape = tuple(shape)
        streams = Streams.batch(address, shape[0]) if isinstance(address, int) else address
        if len(streams) != shape[0]:
            raise SdepureError(f"Streams address {len(streams)} rows, the solve has {shape[0]}")
        self._shape, self._dtype, self._device = shape, dtype, torch.device(device)
        self._noise = RowNoise(streams, shape[1:], draws or Draws("cpu"), self._device)

    @classmethod
    def like(cls, address, x: torch.Tensor, draws: Draws | None = None) -> "GridBrownian":
        return cls(address, x.shape, x.dtype, x.device, draws)

    def reshaped(self, shape) -> "GridBrownian":
        """The same path with increments viewed in another shape of the same rows (flattened
        states for torchsde)."""
        out = object.__new__(GridBrownian)
        out._shape, out._dtype, out._device, out._noise = tuple(shape), self._dtype, self._device, self._noise
        return out

    def increment(self, k: int) -> torch.Tensor:
        return self._noise.draw(k).reshape(self._shape).to(self._dtype)

    @staticmethod
    def _as_step(t) -> int:
        # the solvers keep their step times on the CPU, so reading one is no device synchronisation
        v = float(t)
        k = round(v)
        if abs(v - k) > 1e-6:
            raise SdepureError(
                f"GridBrownian was queried at t={v}, off the integer step grid; use a fixed-step method")
        return k

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if return_U or return_A:
            raise SdepureError("this solver needs Levy areas; use euler, milstein, heun, midpoint, "
                               "euler_heun or reversible_heun")
        if tb is None:
            ta, tb = 0, ta
        a, b = self._as_step(ta), self._as_step(tb)
        sign = 1.0
        if b < a:
            a, b, sign = b, a, -1.0
        if a < 0:
            raise SdepureError(f"GridBrownian queried before time 0 (t={a})")
        if b == a:
            return torch.zeros(self._shape, dtype=self._dtype, device=self._device)
        out = self.increment(a)
        for k in range(a + 1, b):
            out = out + self.increment(k)
        return out if sign > 0 else -out

    def __repr__(self):
        return f"GridBrownian(shape={self._shape})"

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return self._device

    @property
    def shape(self):
        return self._shape

    @property
    def levy_area_approximation(self):
        return "none"
