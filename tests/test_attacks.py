import pytest
import torch
from torch import nn

from sdepure import attacks
from sdepure.attacks import AttackedModel, input_gradient, relative_error
from sdepure.brownian import Streams
from sdepure.classifiers import build_classifier
from sdepure.data import load_digits
from sdepure.errors import SdepureError
from sdepure.models import build_score_model
from sdepure.models.gmm import GaussianMixture, GaussianMixtureModel
from sdepure.rng import Draw, Draws, derive_seed
from sdepure.schedules import LinearVP
from sdepure.defense import Defense, majority_vote
from sdepure.solvers import Sampler, solve

from helpers import MEANS, NearestMean, attacked


@pytest.fixture(scope="module")
def gmm_target():
    model = GaussianMixtureModel(GaussianMixture(MEANS, [0.15] * 3), LinearVP())
    x = torch.tensor([[0.6, 0.55], [0.45, 0.5], [0.5, 0.75]], dtype=torch.float64)
    return model, NearestMean(MEANS), x, torch.tensor([0, 1, 2])


@pytest.fixture(scope="module")
def digits():
    model = build_score_model({"family": "digits-eps-mlp", "weights": "builtin:digits_eps.pt"})
    classifier = build_classifier({"family": "digits-cnn", "weights": "builtin:digits_classifier.pt"})
    x, y = load_digits("test")
    return model, classifier, x, y


def test_reversible_heun_adjoint_is_exact_on_gmm(gmm_target):
    """Adjoint (torchsde adjoint_reversible_heun) against exact backprop, float64: rel. error < 1e-9."""
    model, classifier, x, y = gmm_target
    grads = {g: input_gradient(attacked("diffpure", classifier, 3, model, 0.3, 40, "reversible_heun", g),
                               x, y, seed=1) for g in ("exact", "adjoint")}
    assert grads["exact"].abs().sum() > 0
    assert relative_error(grads["adjoint"], grads["exact"]) < 1e-9


def test_euler_adjoint_converges_on_gmm(gmm_target):
    """The Euler adjoint is only first-order accurate: its error shrinks about linearly in the step."""
    model, classifier, x, y = gmm_target
    errors = []
    for steps in (25, 200):
        g = {m: input_gradient(attacked("diffpure", classifier, 3, model, 0.3, steps, "euler", m), x, y, 2)
             for m in ("exact", "adjoint")}
        errors.append(relative_error(g["adjoint"], g["exact"]))
    assert errors[1] < errors[0] / 4, errors
    ode = {m: input_gradient(attacked("diffpure", classifier, 3, model, 0.3, 100, "ode-rk4", m), x, y, 3)
           for m in ("exact", "ode")}
    assert relative_error(ode["ode"], ode["exact"]) < 1e-6


def test_reversible_heun_adjoint_matches_exact_on_digits(digits):
    """On the embedded default in float32: relative error < 1e-4 (measured ~1e-6)."""
    model, classifier, x, y = digits
    g = {m: input_gradient(attacked("diffpure", classifier, 10, model, 0.15, 10, "reversible_heun", m),
                           x[:4], y[:4], seed=0) for m in ("exact", "adjoint")}
    assert g["exact"].abs().sum() > 0
    assert relative_error(g["adjoint"], g["exact"]) < 1e-4


def test_no_gradient_reaches_the_weights(digits):
    model, classifier, x, y = digits
    target = attacked("diffpure", classifier, 10, model, 0.15, 3, "euler", "adjoint")
    input_gradient(target, x[:2], y[:2], seed=0)
    assert all(p.grad is None and not p.requires_grad for p in target.parameters())


def test_bpda_gradient_is_classifier_gradient_at_purified_point(digits):
    model, classifier, x, y = digits
    target = attacked("diffpure", classifier, 10, model, 0.15, 5, "euler", "bpda")
    grad = input_gradient(target, x[:3], y[:3], seed=4)
    target.reset(4)
    with torch.no_grad():
        purified = target.defense.purified(x[:3], Streams.batch(target.next_seed(), 3))[0]
    p = purified.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(classifier(p), y[:3], reduction="sum")
    expected = torch.autograd.grad(loss, p)[0]
    assert not torch.allclose(purified, x[:3])
    assert torch.allclose(grad, expected, atol=1e-6)


def test_densepure_attack_differentiates_mean_logits(gmm_target):
    """DensePure as its authors define it: one forward draw to x_t*, then K reverse runs from it
    (run k on its own path), the attack's output the mean of the K runs' logits and the defense's
    label their vote; each run rebuilt here by a plain solve."""
    model, classifier, x, y = gmm_target
    target = attacked("densepure", classifier, 3, model, 0.2, 5, "euler", "exact", votes=4)
    target.reset(0)
    out = target.outputs(x)
    target.reset(0)
    seed = target.next_seed()
    defense = target.defense
    z = Draws("cpu").randn(x.shape, derive_seed(seed, Draw.FORWARD), dtype=x.dtype)
    xt = defense.x_t_star(x + defense.sigma * z)
    path = derive_seed(seed, Draw.PATH)
    each = torch.stack([classifier((solve(model, xt, 0.2, Sampler("euler", 5), derive_seed(path, k)).clamp(-1, 1)
                                    + 1) / 2) for k in range(4)])
    assert torch.allclose(out.logits, each.mean(0), atol=1e-12)
    assert torch.equal(out.labels, majority_vote(each.argmax(-1).T, 3))
    assert torch.equal(out.labels, target.predict(x, seed))  # the early-stopped vote agrees


def test_autoattack_breaks_undefended_classifier(digits):
    """The attack works: at Linf eps 0.3 the undefended digits CNN falls to <= 10% (16 examples)."""
    _, classifier, x, y = digits
    target = attacked("none", classifier, 10)
    x_adv, info = attacks.autoattack(target, x[:16], y[:16], 0.3, "Linf", "standard", 0, 16, "cpu")
    assert info["accuracy_after"]["clean"] >= 0.9
    assert sum(info["robust_flags"]) / 16 <= 0.1
    assert float((x_adv - x[:16]).abs().max()) <= 0.3 + 1e-6
    broken = [b for b, c in zip(info["broken_by"], info["clean_flags"]) if c]
    assert all(b in info["attacks"] for b in broken if b is not None)


@pytest.mark.parametrize("norm,eps", [("Linf", 0.2), ("L2", 1.5)])
def test_pgd_eot_stays_in_ball_and_fools_undefended(digits, norm, eps):
    _, classifier, x, y = digits
    target = attacked("none", classifier, 10)
    x_adv = attacks.pgd_eot(target, x[:16], y[:16], eps, norm, steps=20, step_size=eps / 4, eot=1, seed=0)
    delta = (x_adv - x[:16]).flatten(1)
    size = delta.abs().max(1).values if norm == "Linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps + 1e-5
    assert 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
    with torch.no_grad():
        assert (classifier(x_adv).argmax(1) == y[:16]).double().mean() < 0.5


def test_score_defense_counts_single_majority_and_any_of_n():
    """single is the mean over all N draws (not the first draw's), with its standard error over
    the per-example shares; majority and any-of-N as DiffHammer counts them."""
    class Scripted:
        """Draw d of example i is right unless (i, d) is listed."""

        def __init__(self):
            self.num_classes, self.calls = 3, 0
            self.wrong = {(1, 0), (2, 0), (2, 1), (2, 2)}

        @torch.no_grad()
        def predict(self, x, seed):
            d = self.calls  # batch 8 > 3 examples: one call per draw
            self.calls += 1
            return torch.tensor([(1 if (i, d) in self.wrong else 0) for i in range(x.shape[0])])

    x = torch.zeros(3, 1)
    x[:, 0] = torch.tensor([0.0, 1.0, 2.0])
    score = attacks.score_defense(Scripted(), x, torch.zeros(3, dtype=torch.long), draws=4, seed=0, batch=8)
    shares = torch.tensor([1.0, 0.75, 0.25], dtype=torch.float64)  # right in 4, 3 and 1 of the 4 draws
    assert score["single"] == pytest.approx(2 / 3)  # the first draw alone would say 1/3
    assert score["single_se"] == pytest.approx(float(shares.std() / 3 ** 0.5))
    assert score["per_example"]["single"] == pytest.approx(shares.tolist())
    assert score["majority"] == pytest.approx(2 / 3)
    assert score["any_of_n"] == pytest.approx(1 / 3)


def test_attacked_model_bad_settings(digits):
    model, classifier, _, _ = digits
    for kwargs in ({"grad": "magic"}, {"votes": 3}, {"steps": 0}, {"t_star": 1.5}, {"solver": "rk45"},
                   {"solver": "ddpm", "grad": "adjoint"}):
        args = {"method": "diffpure", "classifier": classifier, "num_classes": 10, "model": model,
                "t_star": 0.1, **kwargs}
        with pytest.raises(SdepureError):
            attacked(**args)
    with pytest.raises(SdepureError):
        attacked("diffpure", classifier, 10, None, 0.1)


@pytest.mark.parametrize("kind", ["pgd", "diffattack"])
def test_no_two_phases_of_an_attack_run_draw_from_the_same_seed(tiny, monkeypatch, kind):
    """Every seed a PGD run draws from (sdepure.rng's address tree), grouped by the phase that drew
    it (clean flags, the attack's calls, robust flags, each scoring): no seed serves two phases.
    Before the attack's calls moved under their own phase, call c of the attack had the seed of
    phase c, and the clean-flag pass's first forward draw was the attack's first Brownian one.
    (Under fixed randomness an example's draws are the same in every phase: that is the setting.)"""
    from sdepure import experiments
    from sdepure.config import load_config
    from sdepure.rng import AttackPhase
    from sdepure.settings import attack_from_config

    phase, drawn = ["setup"], {}
    real_randn, real_reset, real_score = Draws.randn, AttackedModel.reset, attacks.score_defense

    def randn(self, shape, seed, *args, **kwargs):
        drawn.setdefault(seed, set()).add(phase[0])
        return real_randn(self, shape, seed, *args, **kwargs)

    def reset(self, seed):
        phase[0] = ("calls", seed)
        return real_reset(self, seed)

    def score(model, x, y, draws, seed, batch):
        phase[0] = ("score", seed)
        return real_score(model, x, y, draws, seed, batch)

    def generator(seed, *args):  # the attacks' random starts
        drawn.setdefault(seed, set()).add(phase[0])
        return real_generator(seed, *args)

    from sdepure import diffattack, rng
    real_generator = rng.generator
    monkeypatch.setattr(attacks, "generator", generator)
    monkeypatch.setattr(diffattack, "generator", generator)
    monkeypatch.setattr(Draws, "randn", randn)
    monkeypatch.setattr(AttackedModel, "reset", reset)
    monkeypatch.setattr(attacks, "score_defense", score)
    cfg = load_config(str(tiny))
    settings = attack_from_config(cfg, kind, {"pgd_steps": 2, "eot": 2, "seed": 4})
    experiments.attack(cfg, settings, "cpu")
    phases = {p for ps in drawn.values() for p in ps}
    assert {("calls", derive_seed(4, AttackPhase.CLEAN_FLAGS, 0)), ("calls", derive_seed(4, AttackPhase.CALLS, 0)),
            ("calls", derive_seed(4, AttackPhase.ROBUST_FLAGS, 0))} <= phases and len(drawn) > 20
    shared = {seed: ps for seed, ps in drawn.items() if len(ps) > 1}
    assert not shared, shared

    # the test sees a collision where there is one: the old addressing (attack calls under the run seed)
    def seeds_of(reset_seed):
        drawn.clear()
        target = AttackedModel(Defense(settings.purifier, *_tiny_nets(cfg)), reset_seed)
        target(torch.rand(3, 1, 8, 8))
        return set(drawn)
    assert seeds_of(4) & seeds_of(derive_seed(4, AttackPhase.CLEAN_FLAGS))


def _tiny_nets(cfg):
    from sdepure.classifiers import build_classifier
    return build_score_model(cfg["model"]), build_classifier(cfg["classifier"], False, 10), 10
