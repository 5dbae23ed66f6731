"""Intermediate reverse-process states, DiffAttack's deviated-reconstruction loss, the EOT batch,
and the fixed-randomness (deterministic white-box) defense; checked against closed forms, plain
backprop and finite differences on the Gaussian-mixture oracle (float64)."""
from fractions import Fraction
import math

import pytest
import torch
from torch import nn

from sdepure import attacks
from sdepure.attacks import eot_gradient, relative_error
from sdepure.brownian import GridBrownian, Streams
from sdepure.diffattack import FixedRandomness, apgd_checkpoints, check_diffattack, cls_loss, diffattack, dlr_loss
from sdepure.errors import SdepureError
from sdepure.rng import Draw, Draws
from sdepure.models.gmm import GaussianMixture, GaussianMixtureModel
from sdepure.schedules import LinearVP
from sdepure.sde import time_grid
from sdepure.solvers import Sampler, solve

from helpers import MEANS, NearestMean, attacked


@pytest.fixture(scope="module")
def gmm():
    model = GaussianMixtureModel(GaussianMixture(MEANS, [0.15] * 3), LinearVP())
    x = torch.tensor([[0.6, 0.55], [0.45, 0.5], [0.5, 0.75]], dtype=torch.float64)
    return model, NearestMean(MEANS), x, torch.tensor([0, 1, 2])


# -- solver states ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["euler", "heun", "ode-rk4", "ddpm", "ddim", "dpm-solver-2m"])
def test_states_are_the_solution_at_each_step(gmm, method):
    """State k equals a solve that stops at t_k on the same grid and path; the last is the output."""
    model, _, x, _ = gmm
    xt = 2 * x - 1
    steps = 6
    out, states, times = solve(model, xt, 0.3, Sampler(method, steps), 4, states=True)
    assert states.shape == (steps, *x.shape) and times.shape == (steps,)
    assert torch.equal(out, solve(model, xt, 0.3, Sampler(method, steps), 4))
    assert torch.equal(states[-1], out) and float(times[-1]) == 0.0
    if method not in ("ddpm", "ddim", "dpm-solver-2m"):  # subsequence samplers: times from ddpm_times
        assert torch.allclose(times, time_grid(0.3, 0.0, steps)[1:])
        from sdepure.solvers import reverse_ode, reverse_sde
        for k in (1, 3):
            if method.startswith("ode"):
                part = reverse_ode(model, xt, 0.3, k, method, t_end=float(times[k - 1]))
            else:
                part = reverse_sde(model, xt, 0.3, k, 4, method, t_end=float(times[k - 1]))
            assert torch.allclose(states[k - 1], part, atol=1e-12)


@pytest.mark.parametrize("method,steps", [("euler", 20), ("euler", 5), ("ode-euler", 20), ("ddpm", 20),
                                          ("dpm-solver-2m", 20)])
def test_exact_state_gradients_equal_plain_backprop(gmm, method, steps):
    """Recomputed segments (from 16 steps) give the gradient of a loss on all states bit for bit
    up to rounding (rel. error < 1e-12)."""
    model, _, x, _ = gmm
    w = torch.randn(steps, *x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = {}
    for grad in (None, "exact"):
        xa = (2 * x - 1).requires_grad_(True)
        _, states, _ = solve(model, xa, 0.3, Sampler(method, steps), 1, grad=grad, states=True)
        grads[grad] = torch.autograd.grad((states * w).sum(), xa)[0]
    assert grads[None].abs().sum() > 0
    assert relative_error(grads["exact"], grads[None]) < 1e-12


def test_adjoint_state_gradients_exact_for_reversible_heun(gmm):
    """torchsde's adjoint takes the gradient of every state (reset at each output time): with
    adjoint_reversible_heun it equals backprop up to rounding (< 1e-9). With Euler the reset leaves a
    per-step error h (J(y_k+1) - J(y_k)) ~ h^1.5 (the Brownian increment), so order 1/2 overall:
    8x the steps should shrink it by about sqrt(8) = 2.8; asserted: by more than 1.5."""
    model, _, x, _ = gmm
    w = torch.randn(20, *x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def grad_of(method, grad, steps=20, ww=w):
        xa = (2 * x - 1).requires_grad_(True)
        _, states, _ = solve(model, xa, 0.3, Sampler(method, steps), 2, grad=grad, states=True)
        return torch.autograd.grad((states * ww).sum(), xa)[0]

    assert relative_error(grad_of("reversible_heun", "adjoint"), grad_of("reversible_heun", None)) < 1e-9
    # Euler's adjoint error shrinks with the step: loss on the final state only, 25 vs 200 steps
    errors = []
    for steps in (25, 200):
        ww = torch.zeros(steps, *x.shape, dtype=torch.float64)
        ww[-1] = 1.0
        errors.append(relative_error(grad_of("euler", "adjoint", steps, ww), grad_of("euler", None, steps, ww)))
    assert errors[1] < errors[0] / 1.5 and errors[0] < 0.1, errors


def test_row_seeds_make_a_row_independent_of_its_batch(gmm):
    """Streams.per_row gives each row its own Brownian stream (a block of width 1)."""
    model, _, x, _ = gmm
    xt = (2 * x - 1)
    seeds = (11, 12, 13)

    def run(x, row_seeds, method="euler"):
        return solve(model, x, 0.3, Sampler(method, 5), GridBrownian.like(Streams.per_row(row_seeds), x))

    batch = run(xt, seeds)
    for i in range(3):
        alone = run(xt[i:i + 1], (seeds[i],))
        assert torch.equal(batch[i], alone[0])
    assert torch.equal(run(xt.flip(0), seeds[::-1], "ddpm").flip(0), run(xt, seeds, "ddpm"))
    assert not torch.equal(batch, solve(model, xt, 0.3, Sampler("euler", 5), 11))
    with pytest.raises(SdepureError):
        run(xt, (1, 2))


# -- the deviated-reconstruction loss -------------------------------------------------------------

def test_deviation_loss_matches_gaussian_closed_form():
    """One Gaussian component N(m, s^2 I): the probability-flow ODE keeps (x - sqrt(a_t) m) / sqrt(v_t)
    constant (v_t = a_t s^2 + 1 - a_t), so every reverse state is known in closed form, and so is L_dev
    = mean_k mean_i (x'_tk - x_tk)^2 with x_tk = sqrt(a_tk) (2x - 1) + sqrt(1 - a_tk) z. rk4 at 100 steps
    agrees to 1e-7."""
    m, s = torch.tensor([0.2, -0.1], dtype=torch.float64), 0.3
    model = GaussianMixtureModel(GaussianMixture(m[None], [s]), LinearVP())
    classifier = NearestMean([[0.2, -0.1], [-0.5, 0.5], [0.5, 0.5]])
    target = attacked("diffpure", classifier, 3, model, 0.4, 100, "ode-rk4", "exact")
    x = torch.tensor([[0.55, 0.5], [0.4, 0.6], [0.7, 0.3]], dtype=torch.float64)
    streams = Streams.batch(7, 3)
    purified, dev = target.defense.purified(x, streams, with_dev=True)

    sched = model.schedule
    z = Draws("cpu").randn(x.shape, Streams.batch(7, 3).derive(Draw.FORWARD).seed[0], dtype=x.dtype)
    a_star = float(sched.alpha_bar(torch.tensor(0.4, dtype=torch.float64)))
    x_star = a_star ** 0.5 * (2 * x - 1) + (1 - a_star) ** 0.5 * z
    v = lambda a: a * s * s + 1 - a  # noqa: E731
    u = (x_star - a_star ** 0.5 * m) / v(a_star) ** 0.5
    times = time_grid(0.4, 0.0, 100)[1:]
    expected = torch.zeros(3, dtype=torch.float64)
    for t in times.tolist():
        a = float(sched.alpha_bar(torch.tensor(t, dtype=torch.float64))) if t > 0 else 1.0
        reverse = a ** 0.5 * m + v(a) ** 0.5 * u
        forward = a ** 0.5 * (2 * x - 1) + (1 - a) ** 0.5 * z
        expected += ((reverse - forward) ** 2).mean(1) / len(times)
    assert torch.allclose(dev, expected, rtol=1e-7, atol=1e-12)
    assert torch.allclose(purified, ((m + s * u).clamp(-1, 1) + 1) / 2, atol=1e-7)
    # the purification is the one the plain path makes with the same address
    assert torch.equal(purified, target.defense.purified(x, streams)[0])


class OtherDevice(Draws):
    """A device stream that differs from the CPU stream, as a GPU's does (on the CPU the real
    device stream equals the CPU stream, so a path that bypassed the defense's draws would go
    unseen without it)."""

    def __init__(self):
        super().__init__("device")

    def randn(self, shape, seed, device="cpu", dtype=torch.float32):
        return -super().randn(shape, seed, device, dtype)


@pytest.mark.parametrize("rng", ["cpu", "device"])
@pytest.mark.parametrize("method,solver,votes", [("diffpure", "euler", 1), ("densepure", "ddpm", 3)])
def test_states_path_purifies_as_the_plain_path(gmm, rng, method, solver, votes):
    """DiffAttack's path (intermediate states, L_dev) and the plain path give the same purified
    outputs for the same address, with the CPU stream and with a device stream that differs from
    it; and both decide recomputation by the same graph budget."""
    model, classifier, x, _ = gmm
    draws = OtherDevice() if rng == "device" else None
    target = attacked(method, classifier, 3, model, 0.3, 5, solver, "exact", votes=votes, rng=rng, draws=draws)
    defense, streams = target.defense, Streams.batch(9, 3)
    plain, _ = defense.purified(x, streams)
    with_states, dev = defense.purified(x, streams, with_dev=True)
    assert torch.equal(plain, with_states) and dev.shape == (3 * votes,)
    assert torch.equal(defense(x, streams).logits, defense(x, streams, with_dev=True).logits)
    if rng == "device":  # the double is in use: the CPU stream gives other outputs
        cpu = attacked(method, classifier, 3, model, 0.3, 5, solver, "exact", votes=votes, rng="cpu")
        assert not torch.equal(plain, cpu.defense.purified(x, streams)[0])
    fresh = attacked(method, classifier, 3, model, 0.3, 5, solver, "exact", votes=votes, rng=rng, draws=draws)
    xa = x.clone().requires_grad_(True)
    fresh.defense.purified(xa, streams, with_dev=True)
    assert fresh.defense._call_bytes_per_row is not None  # the budget check ran on the states path


@pytest.mark.parametrize("grad,solver,votes,tol", [("exact", "euler", 1, 1e-6), ("exact", "ddpm", 2, 1e-6),
                                                    ("adjoint", "reversible_heun", 2, 1e-6),
                                                    ("ode", "ode-rk4", 1, 1e-3)])
def test_diffattack_loss_gradient_matches_finite_differences(gmm, grad, solver, votes, tol):
    """Gradient of CE + L_dev under fixed randomness against a central difference (h = 1e-6) along a
    random direction: agreement to 1e-6 relative for exact backprop and the reversible-Heun adjoint;
    torchdiffeq's rk4 adjoint re-solves the ODE backwards, so it carries rk4's discretisation error
    (measured 6e-5 at 20 steps): 1e-3."""
    model, classifier, x, y = gmm
    method = "densepure" if votes > 1 else "diffpure"
    target = attacked(method, classifier, 3, model, 0.3, 20, solver, grad, votes=votes)
    fixed = FixedRandomness(target.defense, x, [0, 1, 2], seed=3, eps=0.01)

    def loss(z):
        logits, dev, _ = fixed.outputs(z, with_dev=True)
        return (cls_loss("ce", logits, y) + dev).sum()

    xa = x.clone().requires_grad_(True)
    g = torch.autograd.grad(loss(xa), xa)[0]
    v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    h = 1e-6
    fd = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
    assert float(fd) != 0
    assert abs(float((g * v).sum()) - float(fd)) < tol * abs(float(fd)) + 1e-9


def test_diffattack_refuses_purifiers_without_states(gmm):
    model, classifier, _, _ = gmm
    for method, needle in (("none", "no purifier"), ("carlini", "one-shot")):
        with pytest.raises(SdepureError, match=needle):
            check_diffattack(attacked(method, classifier, 3, model, 0.3))
    with pytest.raises(SdepureError, match="BPDA"):
        check_diffattack(attacked("diffpure", classifier, 3, model, 0.3, 5, "euler", "bpda"))


def test_dlr_loss_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.5, 2.0, 1.5, 0.0]])
    y = torch.tensor([0, 0])
    # row 0 right: -(3 - 1) / (3 - 0); row 1 wrong: -(0.5 - 2) / (2 - 0.5)
    assert torch.allclose(dlr_loss(logits, y), torch.tensor([-2 / 3, 1.0]))
    with pytest.raises(SdepureError):
        dlr_loss(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))


def test_apgd_checkpoints_follow_the_recursion():
    """p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), iteration ceil(p_j n),
    computed here in exact fractions."""
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    for n in (10, 100, 37):
        assert apgd_checkpoints(n) == sorted({math.ceil(q * n) for q in p[1:] if q < 1})


# -- EOT over a batch of draws ------------------------------------------------------------------

def test_eot_gradient_is_the_mean_over_draws_in_any_batching():
    """Row d*B + b is draw d of example b: a loss that depends on the draw index through the row
    position checks the bookkeeping; the result must not depend on the batching."""
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    calls = []

    def loss_rows(rows):
        calls.append(rows.shape[0])
        return (rows ** 2).sum(1) * 3.0

    for batch in (1, 2, 5):
        calls.clear()
        mean, grad = eot_gradient(loss_rows, x, draws=5, batch=batch)
        assert torch.allclose(mean, 3 * (x ** 2).sum(1)) and torch.allclose(grad, 6 * x)
        assert sum(calls) == 5 * 2 and max(calls) == 2 * batch


def test_eot_batch_estimates_the_same_expected_gradient(gmm):
    """The EOT gradient from 64 draws as one batch of rows and from 64 sequential calls estimate the
    same expectation: their difference is within 5 standard errors (per-draw spread measured)."""
    model, classifier, x, y = gmm
    target = attacked("diffpure", classifier, 3, model, 0.3, 8, "euler", "exact", seed=0)
    ce = lambda rows: nn.functional.cross_entropy(target(rows), y.repeat(rows.shape[0] // 3), reduction="none")  # noqa: E731
    _, g_batch = eot_gradient(ce, x, draws=64, batch=64)
    _, g_seq = eot_gradient(ce, x, draws=64, batch=1)
    singles = torch.stack([eot_gradient(ce, x, 1, 1)[1] for _ in range(32)])
    se = singles.std(0) * (2 / 64) ** 0.5
    assert ((g_batch - g_seq).abs() <= 5 * se + 1e-9).all()
    assert not torch.equal(g_batch, g_seq)  # different draws, same expectation


# -- fixed randomness ---------------------------------------------------------------------------

def test_fixed_randomness_is_per_example_and_batch_independent(gmm):
    model, classifier, x, y = gmm
    target = attacked("densepure", classifier, 3, model, 0.3, 5, "euler", "exact", votes=3)
    fixed = FixedRandomness(target.defense, x, [10, 11, 12], seed=1, eps=0.05)
    x_in = x + 0.02  # queries inside the balls
    a = fixed(x_in)
    assert torch.equal(a, fixed(x_in))  # same randomness every call
    assert torch.equal(fixed(x_in.flip(0)), a.flip(0))  # whatever the order
    assert torch.equal(fixed(x_in[1:2].repeat(4, 1)), a[1:2].repeat(4, 1))  # whatever the batch
    # it is the defense under that one draw: each example's own seed through Defense.forward
    out = target.defense(x_in, Streams.per_row(fixed.seeds))
    assert torch.equal(a, out.logits) and torch.equal(out.labels, fixed.predict(x_in))
    # and differs from a fresh draw
    target.reset(0)
    assert not torch.equal(a, target(x_in))
    labels = fixed.predict(x_in)
    assert torch.equal(labels, fixed.predict(x_in, seed=99))


def test_fixed_randomness_refuses_overlapping_balls(gmm):
    model, classifier, x, _ = gmm
    target = attacked("diffpure", classifier, 3, model, 0.3, 5)
    with pytest.raises(SdepureError, match="apart"):
        FixedRandomness(target.defense, x, [0, 1, 2], seed=0, eps=0.2)  # rows 0 and 1 are 0.15 apart in Linf


def test_diffattack_breaks_what_it_can_and_not_what_it_cannot(gmm):
    """Under fixed randomness the defense is a deterministic map of a 2-D input, so a 41 x 41 grid
    over the eps-ball (within the image box) says whether the example can be broken at all: the
    optimiser (10 APGD iterations per round, CE then DLR) must break every example the grid
    breaks, and none when eps is tiny. Results stay in the ball. The deviation weight is 0 here:
    in 2-D a 0.2 step moves x_t by as much as the whole classification margin, and with lambda = 1
    L_dev can steer the iterates away from every misclassified point (seen for (0.5, 0.8))."""
    model, classifier, x, y = gmm
    target = attacked("diffpure", classifier, 3, model, 0.3, 6, "euler", "exact")
    small = FixedRandomness(target.defense, x, [0, 1, 2], seed=2, eps=0.005)
    own = small.predict(x)  # the defense's clean prediction under this fixed draw
    x_adv, _ = diffattack(small, x, own, 0.005, iters=5, eot=1, seed=0)
    assert (small.predict(x_adv) == own).all()
    assert float((x_adv - x).abs().max()) <= 0.005 + 1e-12
    target = attacked("diffpure", classifier, 3, model, 0.1, 6, "euler", "exact")
    eps, breakable = 0.2, 0
    offsets = torch.linspace(-eps, eps, 41, dtype=torch.float64)
    grid = torch.cartesian_prod(offsets, offsets)
    for i, example in enumerate(((0.8, 0.5), (0.5, 0.8), (0.65, 0.65))):
        xs = torch.tensor([example], dtype=torch.float64)
        for seed in range(3):
            fixed = FixedRandomness(target.defense, xs, [i], seed=seed, eps=eps)
            ys = fixed.predict(xs)  # attack the defense's own clean prediction
            points = (xs + grid).clamp(0, 1)
            can_break = bool((fixed.predict(points) != ys).any())
            x_adv, info = diffattack(fixed, xs, ys, eps, iters=10, eot=1, seed=seed, dev_weight=0.0)
            assert float((x_adv - xs).abs().max()) <= eps + 1e-12
            assert set(info["final_loss"]) == {"ce", "dlr"}
            broke = bool((fixed.predict(x_adv) != ys).all())
            assert broke == can_break, (example, seed, can_break)
            breakable += can_break
    assert 0 < breakable < 9  # the check saw both cases


def test_diffattack_randomized_lowers_accuracy_and_deviation_rises(gmm):
    """Fresh randomness, EOT 8 as one batch: the deviated-reconstruction loss of the result exceeds
    the clean one on average over 64 draws, and the majority over 32 draws drops (all 4 right before)."""
    model, classifier, _, _ = gmm
    target = attacked("diffpure", classifier, 3, model, 0.1, 6, "euler", "exact", seed=0)
    xs = torch.tensor([[0.75, 0.5], [0.25, 0.5], [0.5, 0.78], [0.7, 0.6]], dtype=torch.float64)
    ys = torch.tensor([0, 1, 2, 0])
    x_adv, _ = diffattack(target, xs, ys, 0.12, iters=8, eot=8, seed=1, dev_weight=1.0)

    def stats(z):
        target.reset(5)
        devs = torch.stack([target.outputs(z, with_dev=True).dev for _ in range(64)])
        acc = attacks.score_defense(target, z, ys, 32, seed=3, batch=8)
        return devs.mean(), acc["majority"], acc["any_of_n"]

    dev_clean, maj_clean, any_clean = stats(xs)
    dev_adv, maj_adv, any_adv = stats(x_adv)
    assert maj_clean == 1.0
    assert dev_adv > dev_clean
    assert maj_adv < maj_clean and any_adv <= any_clean


def test_states_make_no_host_device_traffic_per_step():
    """The states path keeps the solvers' GPU discipline (see test_sde): on the meta device no
    host read of a device value, and with rng="device" no per-step copy from the host."""
    from sdepure.schedules import DiscreteVP
    from sdepure.solvers import SOLVERS
    from test_sde import _HostTraffic, _meta_model
    model = _meta_model(DiscreteVP.linear(1000))
    x = torch.empty(4, 1, 8, 8, device="meta")
    noise = GridBrownian.like(Streams((0, 0, 1, 1), (0, 1, 1, 0), 2), x, Draws("device"))
    solve(model, x, 0.3, Sampler("euler", 2), noise, states=True)  # one-time set-up
    for method in SOLVERS:
        if method == "ode-dopri5":  # adaptive: reads its error estimate by design
            continue
        copies = {}
        for steps in (2, 4):
            with _HostTraffic() as watch:
                out, states, times = solve(model, x, 0.3, Sampler(method, steps), noise, grad="exact", states=True)
            assert states.device.type == "meta" and watch.reads == 0, method
            copies[steps] = watch.copies
        assert copies[4] == copies[2] <= 1, (method, copies)
