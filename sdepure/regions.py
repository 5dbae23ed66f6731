"""Robust regions on 2-D slices of input space: the plane through an input x spanned by a chosen
direction u (e.g. toward the nearest adversarial example) and a random direction v orthogonal to
it, a grid on that plane, and the smoothed classifier's PREDICT on every grid point, batched over
grid points and noise draws (Smooth.predict_many: one defense call for many points).
"""
from __future__ import annotations

import torch

from .errors import SdepureError
from .rng import derive_seed, generator
from .smoothing import Smooth


def slice_plane(x: torch.Tensor, direction: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v): u the unit vector along `direction`, v a unit vector orthogonal to u drawn from
    `seed` (a Gaussian direction with its u component removed); both shaped like x."""
    if direction.shape != x.shape:
        raise SdepureError(f"the slice direction has shape {tuple(direction.shape)}, the image {tuple(x.shape)}")
    length = float(direction.norm())
    if not length > 0:
        raise SdepureError("the slice direction has zero length")
    u = direction / length
    g = torch.randn(x.shape, generator=generator(seed), dtype=x.dtype).to(x.device)
    v = g - (g * u).sum() * u
    return u, v / v.norm()


def grid(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, extent: float, size: int):
    """(points (size * size, *x.shape), offsets (size,)): x + a u + b v for a, b on size evenly
    spaced offsets in [-extent, extent], row-major (b the row, a the column)."""
    if size < 2:
        raise SdepureError(f"a grid needs at least 2 points per side, got {size}")
    if not extent > 0:
        raise SdepureError(f"the grid's extent must be > 0, got {extent}")
    if u.shape != x.shape or v.shape != x.shape:
        raise SdepureError(f"slice directions of shape {tuple(u.shape)} and {tuple(v.shape)} for an image of "
                           f"shape {tuple(x.shape)}")
    t = torch.linspace(-extent, extent, size, dtype=x.dtype, device=x.device)
    b, a = torch.meshgrid(t, t, indexing="ij")
    shape = (-1, *([1] * x.dim()))
    points = x.unsqueeze(0) + a.reshape(shape) * u.unsqueeze(0) + b.reshape(shape) * v.unsqueeze(0)
    return points, t


def decision_map(smooth: Smooth, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, extent: float, size: int,
                 n: int, alpha: float, batch: int, seed: int, rows: int | None = None) -> torch.Tensor:
    """(size, size) PREDICT labels (ABSTAIN = -1) of the smoothed classifier on grid(...); grid
    point i draws under derive_seed(seed, i), so a point's label does not depend on the grid's
    other points or on how they are batched."""
    points, _ = grid(x, u, v, extent, size)
    labels = smooth.predict_many(points, n, alpha, batch, [derive_seed(seed, i) for i in range(len(points))], rows)
    return torch.tensor(labels).reshape(size, size)
