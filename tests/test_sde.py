import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdepure.brownian import GridBrownian, Streams
from sdepure.rng import Draws
from sdepure.errors import SdepureError
from sdepure.schedules import DiscreteVP, LinearVP
from sdepure.rng import derive_seed
from sdepure.solvers import Sampler, ddpm_times, solve

from helpers import single_gaussian_pf_case


def _noise(address, x, rng):
    """The Brownian path of a solve of x, addressed by `address` (seed or Streams), drawn by `rng`."""
    return GridBrownian.like(address, x, Draws(rng))


def test_grid_brownian_seeded_and_reversible():
    a = GridBrownian(7, (3, 5), dtype=torch.float64)
    b = GridBrownian(7, (3, 5), dtype=torch.float64)
    c = GridBrownian(8, (3, 5), dtype=torch.float64)
    assert torch.equal(a(0, 1), b(0, 1))
    assert not torch.equal(a(0, 1), c(0, 1))
    # queries in any order give the same increments; intervals add up; reverse is the negative
    assert torch.allclose(a(0, 3), a(0, 1) + a(1, 2) + a(2, 3))
    assert torch.equal(a(5, 2), -a(2, 5))
    with pytest.raises(SdepureError):
        a(0.5, 1.0)
    with pytest.raises(SdepureError):
        a(0, 1, return_U=True)


def test_grid_brownian_increments_standard_normal():
    bm = GridBrownian(0, (20000,), dtype=torch.float64)
    z = torch.cat([bm(k, k + 1) for k in range(5)])
    # mean 0 +- 4 SE, variance 1 +- 4 SE (fixed seed)
    assert abs(float(z.mean())) < 4 / math.sqrt(len(z))
    assert abs(float(z.var()) - 1) < 4 * math.sqrt(2 / len(z))


def _cpu_stream(shape, seed, k):
    """Increment k as sdepure has always drawn it: float32 from a CPU generator seeded (seed, k)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(seed, k)), dtype=torch.float32)


def _manual_euler(model, x, t_start, steps, seed):
    """Euler-Maruyama in physical time with the CPU-stream increments, written out by hand."""
    grid = torch.linspace(t_start, 0.0, steps + 1, dtype=torch.float64)
    for k in range(steps):
        t, h = float(grid[k]), float(grid[k] - grid[k + 1])
        beta = float(model.schedule.beta(t))
        score = model.score(x, torch.full((x.shape[0],), t, dtype=x.dtype))
        x = x + h * (0.5 * beta * x + beta * score) + math.sqrt(beta * h) * _cpu_stream(x.shape, seed, k).to(x.dtype)
    return x


def test_torchsde_solve_equals_hand_written_euler(gmm_model):
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = solve(gmm_model, x, 0.3, Sampler("euler", 37), 5)
    ref = _manual_euler(gmm_model, x, 0.3, 37, seed=5)
    assert torch.allclose(out, ref, atol=1e-12)


def test_same_seed_same_output_different_seed_differs(gmm_model):
    x = torch.zeros(16, 2, dtype=torch.float64)
    for method in ("euler", "reversible_heun", "ddpm"):
        a = solve(gmm_model, x, 0.25, Sampler(method, 20, clip_x0=False), 1)
        b = solve(gmm_model, x, 0.25, Sampler(method, 20, clip_x0=False), 1)
        c = solve(gmm_model, x, 0.25, Sampler(method, 20, clip_x0=False), 2)
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


@pytest.mark.parametrize("method,steps", [("euler", 500), ("reversible_heun", 200), ("ddpm", 200), ("ddim", 200)])
def test_reverse_sde_samples_exact_posterior(gmm_model, method, steps):
    """From a fixed x_t*, the reverse process must sample p(x0 | x_t*) (a Gaussian mixture).
    Tolerances: mixture weights within 0.03 (binomial SE at n=4000 is <= 0.008), component
    means within 0.03, per-coordinate spread within 10% of the exact posterior std."""
    t_star = gmm_model.schedule.t_star(0.5)
    x_t = torch.tensor([[0.1, 0.2]], dtype=torch.float64)
    w, m, c = gmm_model.posterior(x_t, t_star)
    n = 4000
    eta = 1.0 if method == "ddim" else 0.0  # DDIM at eta = 1 samples as ddpm does
    y = solve(gmm_model, x_t.expand(n, 2).clone(), t_star, Sampler(method, steps, eta, clip_x0=False), 11)
    comp = torch.cdist(y, m[0]).argmin(1)
    share = torch.bincount(comp, minlength=3).double() / n
    assert torch.allclose(share, w[0], atol=0.03), (share, w)
    for k in range(3):
        sel = y[comp == k]
        assert torch.allclose(sel.mean(0), m[0, k], atol=0.03)
        assert float(sel.std(0).mean()) == pytest.approx(math.sqrt(float(c[0, k])), rel=0.1)


def test_probability_flow_ode_single_gaussian_closed_form():
    """For N(mu, s^2 I) the PF-ODE is linear: x0 = mu + s / sqrt(v_t) (x_t - sqrt(a) mu)."""
    model, t, x_t, exact = single_gaussian_pf_case()
    out = solve(model, x_t, t, Sampler("ode-rk4", 200))
    assert torch.allclose(out, exact, atol=1e-6)
    assert torch.allclose(solve(model, x_t, t, Sampler("ode-dopri5", 1)), exact, atol=1e-4)


def test_ddpm_subsequence_follows_densepure_rule():
    s = DiscreteVP.linear(1000)
    times = ddpm_times(s, float(s.time_of_index(259)), 10)
    idx = [round(float(t) * 1000 - 1) for t in times[:-1]]
    assert idx == [round(259 - j * 259 / 10) for j in range(10)]
    assert float(times[-1]) == 0.0
    cont = ddpm_times(LinearVP(), 0.3, 4)
    assert torch.allclose(cont, torch.tensor([0.3, 0.225, 0.15, 0.075, 0.0], dtype=torch.float64))


def test_bad_solver_and_steps(gmm_model):
    x = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(SdepureError):
        solve(gmm_model, x, 0.3, Sampler("srk", 10), 0)
    with pytest.raises(SdepureError):
        solve(gmm_model, x, 0.3, Sampler("euler", 0), 0)


class _CountingModel:
    """Counts network (score) calls of a wrapped model."""

    def __init__(self, model):
        self.model, self.schedule, self.calls = model, model.schedule, 0

    def score(self, x, t):
        self.calls += 1
        return self.model.score(x, t)


@pytest.mark.parametrize("method,steps", [("euler", 37), ("midpoint", 16), ("reversible_heun", 20),
                                          ("ode-rk4", 30)])
def test_exact_gradient_in_segments_equals_plain_backprop(gmm_model, method, steps, monkeypatch):
    """grad="exact" solves in checkpointed segments above SEGMENT_FROM steps: same output as the
    plain solve, same input gradient as backprop through every step (float64, 1e-12).
    reversible_heun is never cut (its second state would restart) and recomputes each call once."""
    from sdepure import solvers

    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def run(grad):
        xi = x.clone().requires_grad_(True)
        counting = _CountingModel(gmm_model)
        out = solvers.solve(counting, xi, 0.3, Sampler(method, steps), 9, grad=grad)
        forward_calls = counting.calls
        (out * weights).sum().backward()
        return out.detach(), xi.grad, forward_calls, counting.calls

    plain_out, plain_grad, plain_calls, _ = run(None)
    out, grad, calls, total = run("exact")
    assert steps >= solvers.SEGMENT_FROM
    assert torch.allclose(out, plain_out, atol=1e-12) and torch.allclose(grad, plain_grad, atol=1e-12)
    # the memo spares the shape-check call at each segment's start: forward costs what the plain
    # solve costs, and backward recomputes each segment, then each network call inside it
    assert calls == plain_calls
    assert total == (2 if method == "reversible_heun" else 3) * plain_calls
    monkeypatch.setattr(solvers, "SEGMENT_FROM", 10**9)  # per-call checkpoints only
    flat_out, flat_grad, _, flat_total = run("exact")
    assert torch.allclose(flat_grad, grad, atol=1e-12) and flat_total == 2 * plain_calls


# -- random streams: CPU stream unchanged, device stream reproducible, rows addressed -----------

def test_cpu_stream_is_the_one_drawn_before():
    """rng="cpu" increments are exactly torch.randn from a CPU generator seeded (seed, k), in any
    dtype request (drawn float32, then cast), as sdepure drew them before the device option."""
    for dtype in (torch.float32, torch.float64):
        bm = GridBrownian(5, (4, 3), dtype=dtype, draws=Draws("cpu"))
        for k in (0, 1, 7):
            assert torch.equal(bm.increment(k), _cpu_stream((4, 3), 5, k).to(dtype))
        assert torch.equal(bm(2, 4), _cpu_stream((4, 3), 5, 2).to(dtype) + _cpu_stream((4, 3), 5, 3).to(dtype))


@pytest.mark.parametrize("method", ["euler", "ddpm", "ddim"])
def test_device_rng_solve_is_reproducible(gmm_model, method):
    x = torch.zeros(16, 2, dtype=torch.float64)
    eta = 1.0 if method == "ddim" else 0.0
    a = solve(gmm_model, x, 0.25, Sampler(method, 6, eta, clip_x0=False), _noise(1, x, "device"))
    b = solve(gmm_model, x, 0.25, Sampler(method, 6, eta, clip_x0=False), _noise(1, x, "device"))
    c = solve(gmm_model, x, 0.25, Sampler(method, 6, eta, clip_x0=False), _noise(2, x, "device"))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # on the CPU the device generator is the CPU generator: both streams coincide
    assert torch.equal(a, solve(gmm_model, x, 0.25, Sampler(method, 6, eta, clip_x0=False), _noise(1, x, "cpu")))
    with pytest.raises(SdepureError, match="rng"):
        Draws("gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_rng_on_cuda_is_reproducible_and_cpu_stream_matches_cpu(gmm_model):
    x = torch.zeros(16, 2, dtype=torch.float64)
    cuda = [solve(gmm_model, x.cuda(), 0.25, Sampler("euler", 6), _noise(1, x.cuda(), "device")).cpu() for _ in range(2)]
    assert torch.equal(cuda[0], cuda[1])
    on_cuda_cpu_stream = solve(gmm_model, x.cuda(), 0.25, Sampler("euler", 6), _noise(1, x.cuda(), "cpu")).cpu()
    assert torch.allclose(on_cuda_cpu_stream, solve(gmm_model, x, 0.25, Sampler("euler", 6), 1), atol=1e-10)


@pytest.mark.parametrize("rng", ["cpu", "device"])
def test_streams_address_each_row_independently_of_the_others(rng):
    """Row (stream s, row b) gets row b of the plain width-row path seeded derive_seed(seed, s),
    in any order and whichever other rows are present."""
    width, shape, draws = 5, (5, 3), Draws(rng)
    plain = {s: GridBrownian(derive_seed(9, s), shape, dtype=torch.float64, draws=draws) for s in range(4)}
    full = GridBrownian(Streams.batch(9, width).runs(range(4), 4), (20, 3), dtype=torch.float64, draws=draws)
    streams, rows = (3, 0, 3, 1), (4, 2, 0, 2)  # unsorted, streams interleaved
    mixed = GridBrownian(Streams(tuple(derive_seed(9, s) for s in streams), rows, width), (4, 3),
                         dtype=torch.float64, draws=draws)
    for k in (0, 3):
        z = full.increment(k)
        for s in range(4):
            assert torch.equal(z[s * 5:(s + 1) * 5], plain[s].increment(k))
        m = mixed.increment(k)
        for r, (s, b) in enumerate(zip(streams, rows)):
            assert torch.equal(m[r], plain[s].increment(k)[b])
    with pytest.raises(SdepureError):
        Streams((0, 1), (0, 5), width)
    with pytest.raises(SdepureError):
        GridBrownian(Streams.batch(9, 3), (4, 3))  # 3 rows addressed, 4 solved


# -- no host-device synchronisation inside a solve ------------------------------------------

class _HostTraffic(TorchDispatchMode):
    """Counts what would synchronise a CUDA run on a meta-device solve: host reads of device
    values (_local_scalar_dense; on meta they raise anyway) and copies host -> device. A CPU
    0-dim tensor in arithmetic is a wrapped scalar (passed by value, no copy) and is not counted."""

    def __init__(self):
        super().__init__()
        self.reads, self.copies = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if func is torch.ops.aten._local_scalar_dense.default and tensors[0].device.type != "cpu":
            self.reads += 1
        out = func(*args, **kwargs)
        if (func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
                and isinstance(out, torch.Tensor) and out.device.type == "meta"
                and any(t.device.type == "cpu" and t.dim() > 0 for t in tensors)):
            self.copies += 1
        return out


def _meta_model(schedule):
    from sdepure.models.base import EpsNetModel
    from sdepure.models.digits import DigitsEpsMLP
    return EpsNetModel(DigitsEpsMLP(width=8, blocks=1, emb_dim=8).to("meta"), schedule)


@pytest.mark.parametrize("schedule", [LinearVP(), DiscreteVP.linear(1000)], ids=["continuous", "table"])
def test_solves_make_no_host_device_traffic_per_step(schedule):
    """Every fixed-step solver runs on the meta device (any host read of a device value would
    raise), and with rng="device" copies nothing from the host at all; with rng="cpu" it copies
    one draw per noisy step (on CUDA through pinned memory without blocking). ode-dopri5 is
    adaptive: its step-size control reads the error estimate, by design."""
    from sdepure.solvers import SOLVERS
    model = _meta_model(schedule)
    x = torch.empty(6, 1, 8, 8, device="meta")
    streams = Streams((5, 5, 5, 6, 6, 6), (0, 1, 2, 2, 0, 1), 3)
    solve(model, x, 0.3, Sampler("euler", 2), _noise(streams, x, "device"))  # lazy one-time set-up
    for method in SOLVERS:
        if method == "ode-dopri5":
            continue
        noisy = method in SDE_NOISY or method == "ddpm"
        for rng in ("device", "cpu") if noisy else ("device",):
            traffic = {}
            for steps in (2, 4):
                with _HostTraffic() as watch:
                    y = solve(model, x, 0.3, Sampler(method, steps), _noise(streams, x, rng))
                assert y.device.type == "meta" and watch.reads == 0, (method, rng)
                traffic[steps] = watch.copies
            if rng == "device" or not noisy:  # nothing per step (setup may copy an index once)
                assert traffic[4] == traffic[2] <= 1, (method, rng, traffic)
            else:
                assert traffic[4] > traffic[2], (method, traffic)  # shows the counter sees the copies


SDE_NOISY = ("euler", "milstein", "heun", "midpoint", "euler_heun", "reversible_heun")


def test_item_on_a_device_value_inside_a_solve_is_caught():
    """The meta-device check can fail: a model that reads a value on the host is refused."""
    class Reads(torch.nn.Module):
        def forward(self, x, t):
            return x * float(t[0])
    from sdepure.models.base import EpsNetModel
    model = EpsNetModel(Reads(), LinearVP())
    with pytest.raises(Exception, match="meta"):
        solve(model, torch.empty(2, 4, device="meta"), 0.3, Sampler("euler", 2), _noise(0, torch.empty(2, 4, device="meta"), "device"))


# -- exact gradients: input only, at every step count and for every method family -----------

def _mlp_model():
    from sdepure.models.base import EpsNetModel
    from sdepure.models.digits import DigitsEpsMLP
    torch.manual_seed(0)
    return EpsNetModel(DigitsEpsMLP(width=16, blocks=1, emb_dim=8, dim=2).double(), LinearVP())


@pytest.mark.parametrize("method", ["euler", "midpoint", "reversible_heun", "ode-euler", "ode-rk4",
                                    "ode-dopri5", "ddpm", "ddim", "dpm-solver-2m"])
def test_exact_gradients_are_input_only_and_equal_plain_backprop(method):
    """grad="exact" gives the network's weights no gradient, below and above SEGMENT_FROM steps,
    while the input gradient is plain backprop's (float64, 1e-10)."""
    from sdepure import solvers
    model = _mlp_model()
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    w = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for steps in (3, solvers.SEGMENT_FROM + 4):
        grads = {}
        for grad in (None, "exact"):
            model.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            out = solve(model, xi, 0.3, Sampler(method, steps, clip_x0=False), 2, grad=grad)
            (out * w).sum().backward()
            grads[grad] = xi.grad
            weight_grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grad is None:
                assert weight_grads  # plain backprop reaches the weights: the check below can fail
            else:
                assert not weight_grads, (method, steps)
        assert torch.allclose(grads["exact"], grads[None], atol=1e-10), (method, steps)


@pytest.mark.parametrize("method", ["ode-euler", "ode-midpoint", "ode-rk4"])
def test_fixed_step_ode_loop_equals_torchdiffeq(gmm_model, method):
    """The PF-ODE steps written here follow torchdiffeq's formulas (rk4: its 3/8 rule)."""
    import torchdiffeq

    from sdepure.sde import ProbabilityFlowODE, time_grid
    from sdepure.solvers import ODE_METHODS
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    func = ProbabilityFlowODE(gmm_model, time_grid(0.3, 0.0, 12), x.shape)
    ts = torch.tensor([0.0, 12.0], dtype=torch.float64)
    ref = torchdiffeq.odeint(func, x, ts, method=ODE_METHODS[method], options={"step_size": 1.0})[-1]
    assert torch.allclose(solve(gmm_model, x, 0.3, Sampler(method, 12)), ref, atol=1e-12)
