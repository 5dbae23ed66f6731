"""Exact gradients skip recomputation when a plain autograd graph is small: the same gradient,
fewer network calls; and the attack's thread setting."""
import pytest
import torch
from torch import nn

from sdepure import solvers
from sdepure.attacks import AttackedModel, input_gradient
from sdepure.defense import Defense
from sdepure.classifiers import build_classifier
from sdepure.data import load_digits
from sdepure.experiments import torch_threads
from sdepure.models import build_score_model
from sdepure.models.base import EpsNetModel
from sdepure.models.digits import DigitsEpsMLP
from sdepure.schedules import LinearVP
from sdepure.settings import Attack, Purifier
from sdepure.errors import SdepureError


@pytest.fixture(scope="module")
def digits():
    model = build_score_model({"family": "digits-eps-mlp", "weights": "builtin:digits_eps.pt"})
    classifier = build_classifier({"family": "digits-cnn", "weights": "builtin:digits_classifier.pt"})
    x, y = load_digits("test")
    return model, classifier, x[:6], y[:6]


class _Probe(nn.Module):
    """u = linear(x), tanh(u) * u: a frozen linear layer keeps nothing but its weight for the
    input gradient; tanh keeps its output, the product both factors (tanh's output once more)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 8)
        self.lin.requires_grad_(False)

    def call(self, x, t):
        u = self.lin(x)
        return torch.tanh(u) * u


def test_graph_bytes_counts_saved_activations_not_weights():
    """Closed form: rows x (8 + 8) float32 values (u and tanh(u), each once); no weights."""
    probe = _Probe()
    for rows in (1, 5):
        assert solvers.graph_bytes(probe.call, torch.randn(rows, 4), 0.3) == rows * (8 + 8) * 4


def test_plain_graph_fits_budget_and_needs_frozen_weights():
    model = EpsNetModel(DigitsEpsMLP(width=16, blocks=1, emb_dim=8), LinearVP())
    model.requires_grad_(False)
    # 10 rows x 8 steps x (1 call x 100 + 5 x 10 state bytes) = 12,000 bytes
    assert solvers.plain_graph_fits(model, "euler", 8, 10, 100, 10, budget=12_000)
    assert not solvers.plain_graph_fits(model, "euler", 8, 10, 100, 10, budget=11_999)
    assert not solvers.plain_graph_fits(model, "heun", 8, 10, 100, 10, budget=12_000)  # 2 calls a step
    assert not solvers.plain_graph_fits(model, "ode-dopri5", 8, 10, 100, 10, budget=10 ** 12)  # adaptive
    model.net.out.weight.requires_grad_(True)  # a plain graph would send gradients into the weights
    assert not solvers.plain_graph_fits(model, "euler", 8, 10, 100, 10, budget=10 ** 12)


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("solver", ["euler", "heun", "reversible_heun", "ode-euler", "ddpm", "ddim",
                                    "dpm-solver-2m"])
def test_plain_graph_gives_the_recomputed_gradient_bit_for_bit(digits, solver):
    """On the shipped digits models (float32): the input gradient without recomputation equals
    the recomputed one exactly, at a step count below and one above the segment threshold, and
    the backward pass makes no network call (with recomputation: one per forward call)."""
    model, classifier, x, y = digits
    for steps in (4, solvers.SEGMENT_FROM + 1):
        target = AttackedModel(Defense(Purifier("diffpure", t_star=0.15, steps=steps, solver=solver, grad="exact"),
                                       model, classifier, 10))
        grads, calls = {}, {}
        for budget in (0, solvers.EXACT_GRAPH_BUDGET):
            target.defense.graph_budget = budget
            input_gradient(target, x, y, seed=3)  # the first exact solve measures the graph once
            log, handle = _count_calls(model.net)
            grads[budget] = input_gradient(target, x, y, seed=3)
            handle.remove()
            calls[budget] = len(log)
        assert target.defense.solver_grad(target.defense.x_t_star(x)) is None  # the default budget holds it
        assert grads[0].abs().sum() > 0
        assert torch.equal(grads[0], grads[solvers.EXACT_GRAPH_BUDGET]), (solver, steps)
        forward_calls = calls[solvers.EXACT_GRAPH_BUDGET]
        assert forward_calls >= steps
        # recomputation calls the network again for each call (and again per segment from SEGMENT_FROM on)
        assert calls[0] >= 2 * forward_calls, (solver, steps, calls)
        assert all(p.grad is None for p in target.parameters())


def test_graph_measured_once_per_purifier(digits):
    model, classifier, x, y = digits
    target = AttackedModel(Defense(Purifier("diffpure", t_star=0.15, steps=3, grad="exact"), model, classifier, 10))
    log, handle = _count_calls(model.net)
    input_gradient(target, x, y, seed=0)
    first = len(log)
    input_gradient(target, x, y, seed=0)
    handle.remove()
    assert first == 3 + 1 and len(log) - first == 3  # the probe: one call, on the first solve only
    # with no gradient wanted nothing is measured or recomputed
    fresh = AttackedModel(Defense(Purifier("diffpure", t_star=0.15, steps=3, grad="exact"), model, classifier, 10))
    with torch.no_grad():
        fresh(x)
    assert fresh.defense._call_bytes_per_row is None


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            raise RuntimeError("fails inside")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True])
def test_attack_threads_validated(bad):
    with pytest.raises(SdepureError, match="threads"):
        Attack(Purifier("diffpure", t_star=0.1), threads=bad)
    assert Attack(Purifier("diffpure", t_star=0.1), threads=2.0).threads == 2
