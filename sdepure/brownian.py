"""A seeded Brownian motion on the integer step grid 0..steps, addressed row by row.

The reverse solvers integrate in step-index time (see sde.py), so every query the fixed-step
torchsde methods make is an interval [k, k + 1] with integer ends. Increment k is drawn from a
generator seeded with derive_seed(seed, k): the path costs nothing to build, needs no memory,
and gives the same increments when the adjoint queries it again backwards.

`Streams` addresses the noise of each row separately, for DensePure's K runs per noise draw:
row r of the solve is row `row[r]` of stream `stream[r]`, and increment k of stream s is one
(width, ...) draw seeded by derive_seed(derive_seed(seed, s), k). Run s of the `width` inputs so
gets the path of a plain solve of all of them with seed derive_seed(seed, s), whether or not its
other rows are evaluated and whatever batch it shares (an early-stopped vote relies on this).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchsde import BaseBrownian

from .errors import SdepureError
from .rng import Draws, derive_seed


@dataclass(frozen=True)
class Streams:
    """Noise address of each row of a batched solve (see the module docstring)."""
    stream: tuple[int, ...]
    row: tuple[int, ...]
    width: int

    @classmethod
    def blocks(cls, streams, rows, width: int) -> "Streams":
        """Stream-major rows: for s in streams, for r in rows (the layout of x.repeat(len(streams)))."""
        streams, rows = [int(s) for s in streams], [int(r) for r in rows]
        return cls(tuple(s for s in streams for _ in rows), tuple(rows) * len(streams), int(width))

    def __post_init__(self):
        if len(self.stream) != len(self.row):
            raise SdepureError("Streams: stream and row must have one entry per row")
        if any(r < 0 or r >= self.width for r in self.row) or any(s < 0 for s in self.stream):
            raise SdepureError(f"Streams: rows must lie in [0, {self.width}) and streams be >= 0")


class GridBrownian(BaseBrownian):
    """W on {0, 1, ..., steps} with W(k + 1) - W(k) ~ N(0, I) of shape `shape`.
    rng: "cpu" (device-independent values) or "device" (drawn on the device), see rng.py."""

    def __init__(self, seed: int, shape, dtype=torch.float32, device="cpu", rng: str = "cpu",
                 streams: Streams | None = None):
        self.seed = int(seed)
        self._shape = tuple(shape)
        self._dtype = dtype
        self._device = torch.device(device)
        self._draws = Draws(self._device, rng)
        self._groups, self._inverse = None, None
        if streams is not None:
            self._plan(streams)

    def _plan(self, streams: Streams) -> None:
        """Index tensors built once, so that a step makes no host-to-device copy."""
        if len(streams.stream) != self._shape[0]:
            raise SdepureError(f"Streams address {len(streams.stream)} rows, the solve has {self._shape[0]}")
        by_stream: dict[int, list[int]] = {}
        for r, s in enumerate(streams.stream):
            by_stream.setdefault(s, []).append(r)
        order = [r for rows in by_stream.values() for r in rows]
        self._groups = []
        for s, rows in by_stream.items():
            src = [streams.row[r] for r in rows]
            index = None if src == list(range(streams.width)) else torch.tensor(src, device=self._device)
            self._groups.append((derive_seed(self.seed, s), index))
        self._width = streams.width
        if order != list(range(len(order))):
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            self._inverse = inverse.to(self._device)

    def increment(self, k: int) -> torch.Tensor:
        if self._groups is None:
            return self._draws.randn(self._shape, derive_seed(self.seed, k)).to(self._dtype)
        shape = (self._width, *self._shape[1:])
        pieces = []
        for stream_seed, index in self._groups:
            z = self._draws.randn(shape, derive_seed(stream_seed, k))
            pieces.append(z if index is None else z.index_select(0, index))
        z = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if self._inverse is not None:
            z = z.index_select(0, self._inverse)
        return z.to(self._dtype)

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
        return f"GridBrownian(seed={self.seed}, shape={self._shape})"

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
