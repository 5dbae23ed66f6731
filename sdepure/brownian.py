"""A seeded Brownian motion on the integer step grid 0..steps.

The reverse solvers integrate in step-index time (see sde.py), so every query the fixed-step
torchsde methods make is an interval [k, k + 1] with integer ends. Increment k is drawn from a
generator seeded with derive_seed(seed, k): the path costs nothing to build, needs no memory,
and gives the same increments when the adjoint queries it again backwards.
"""
from __future__ import annotations

import torch
from torchsde import BaseBrownian

from .errors import SdepureError
from .rng import derive_seed, randn


class GridBrownian(BaseBrownian):
    """W on {0, 1, ..., steps} with W(k + 1) - W(k) ~ N(0, I) of shape `shape`."""

    def __init__(self, seed: int, shape, dtype=torch.float32, device="cpu"):
        self.seed = int(seed)
        self._shape = tuple(shape)
        self._dtype = dtype
        self._device = torch.device(device)

    def increment(self, k: int) -> torch.Tensor:
        return randn(self._shape, derive_seed(self.seed, k), dtype=torch.float32, device=self._device).to(self._dtype)

    @staticmethod
    def _as_step(t) -> int:
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
        out = torch.zeros(self._shape, dtype=self._dtype, device=self._device)
        for k in range(a, b):
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


class RowBrownian(GridBrownian):
    """One GridBrownian per row: row i's increment k is drawn from derive_seed(seeds[i], k), so a
    row's path depends on its own seed only, not on the batch it runs in (used to fix the
    defense's randomness per example, sdepure.diffattack)."""

    def __init__(self, seeds, shape, dtype=torch.float32, device="cpu"):
        if len(seeds) != shape[0]:
            raise SdepureError(f"RowBrownian needs one seed per row: {len(seeds)} seeds for {shape[0]} rows")
        super().__init__(0, shape, dtype, device)
        self.seeds = tuple(int(s) for s in seeds)

    def increment(self, k: int) -> torch.Tensor:
        rows = [randn(self._shape[1:], derive_seed(s, k), dtype=torch.float32) for s in self.seeds]
        return torch.stack(rows).to(device=self._device, dtype=self._dtype)

    def __repr__(self):
        return f"RowBrownian({len(self.seeds)} rows, shape={self._shape})"
