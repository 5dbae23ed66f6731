import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from sdepure.errors import SdepureError
from sdepure.schedules import DiscreteVP, LinearVP, alpha_bar_for_sigma, schedule_from_config


def test_linear_alpha_bar_matches_integral_of_beta():
    s = LinearVP(0.1, 20.0)
    for t in (0.0, 0.013, 0.1, 0.37, 1.0):
        integral, _ = quad(lambda u: float(s.beta(u)), 0, t)
        assert float(s.alpha_bar(t)) == pytest.approx(math.exp(-integral), rel=1e-10)


def test_linear_inverse_and_t_star_exact():
    s = LinearVP(0.1, 20.0)
    t = torch.linspace(0.001, 1.0, 50, dtype=torch.float64)
    assert torch.allclose(s.t_of_alpha_bar(s.alpha_bar(t)), t, atol=1e-12)
    for sigma in (0.12, 0.25, 0.5, 1.0):
        ab = float(s.alpha_bar(s.t_star(sigma)))
        assert ab == pytest.approx(1 / (1 + 4 * sigma ** 2), rel=1e-12)
        assert (1 - ab) / ab == pytest.approx((2 * sigma) ** 2, rel=1e-10)


@pytest.mark.parametrize("make,refs", [
    (lambda: DiscreteVP.linear(1000), {0.25: 145, 0.5: 259, 1.0: 396}),
    (lambda: DiscreteVP.cosine(4000), {0.25: 1158, 0.5: 1984, 1.0: 2809}),
])
def test_discrete_t_star_reference_values(make, refs):
    s = make()
    ratio = np.sqrt((1 - s.alpha_bars.numpy()) / s.alpha_bars.numpy())
    for sigma, ref in refs.items():
        assert s.t_index_star(sigma, "first") == ref
        assert ratio[ref] >= 2 * sigma > ratio[ref - 1]
        nearest = s.t_index_star(sigma, "nearest")
        assert nearest == int(np.argmin(np.abs(ratio - 2 * sigma)))
        assert s.t_star(sigma, "first") == pytest.approx((ref + 1) / s.T)


def test_discrete_tables_closed_forms():
    lin = DiscreteVP.linear(1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    assert np.allclose(lin.alpha_bars.numpy(), np.cumprod(1 - betas), rtol=1e-12)
    cos = DiscreteVP.cosine(4000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # away from the clipped end, alpha_bar(i) = f((i + 1) / T) / f(0)
    for i in (0, 100, 1999, 3000):
        assert float(cos.alpha_bars[i]) == pytest.approx(f((i + 1) / 4000) / f(0), rel=1e-9)


def test_discrete_interpolation_consistent():
    s = DiscreteVP.linear(1000)
    # knots reproduce the table, alpha_bar(0) = 1
    idx = torch.tensor([0, 1, 144, 999])
    assert torch.allclose(s.alpha_bar(s.time_of_index(idx)), s.alpha_bars[idx], rtol=1e-12)
    assert float(s.alpha_bar(0.0)) == 1.0
    # beta = -d/dt log alpha_bar inside a segment
    t, h = 0.3456, 1e-7
    fd = -(float(s.log_alpha_bar(t + h)) - float(s.log_alpha_bar(t - h))) / (2 * h)
    assert float(s.beta(t)) == pytest.approx(fd, rel=1e-6)
    # 1000 T linear betas approximate the continuous 0.1 + 19.9 t
    assert float(s.beta(0.5)) == pytest.approx(float(LinearVP().beta(0.5)), rel=0.01)
    tt = torch.rand(100, dtype=torch.float64) * 0.999 + 0.0005
    assert torch.allclose(s.t_of_alpha_bar(s.alpha_bar(tt)), tt, atol=1e-10)
    assert float(s.alpha_bar(s.t_star(0.5, None))) == pytest.approx(alpha_bar_for_sigma(0.5), rel=1e-10)


def test_bad_inputs():
    with pytest.raises(SdepureError):
        LinearVP().t_star(0.0)
    with pytest.raises(SdepureError):
        DiscreteVP.linear().t_index_star(0.5, "closest")
    with pytest.raises(SdepureError):
        DiscreteVP([0.5, 0.7])  # increasing
    with pytest.raises(SdepureError):
        schedule_from_config({"kind": "sigmoid"})
    with pytest.raises(SdepureError):
        schedule_from_config({"kind": "linear", "beta_mn": 0.1})
    with pytest.raises(SdepureError):
        DiscreteVP.linear(1000).t_index_star(1e6, "first")


def test_table_beta_on_a_float_grid_reads_the_segment_each_step_covers():
    """linspace(0.15, 0, 150) in float64 puts some nodes a rounding error above their knot k / T;
    beta there is the segment below the knot (the one the step from it covers), as at the knot itself."""
    table = DiscreteVP.linear(1000)
    grid = torch.linspace(0.15, 0.0, 151, dtype=torch.float64)[:-1]
    knots = torch.round(grid * 1000) / 1000
    assert (grid != knots).any()  # the grid does sit off its knots
    assert torch.equal(table.beta(grid), table.beta(knots))
    assert torch.allclose(table.alpha_bar(grid), table.alpha_bar(knots), rtol=1e-12)
