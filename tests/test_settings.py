"""The one settings object: strict types, one vocabulary, config < command line precedence."""
import dataclasses

import pytest

from sdepure import attacks, defense
from sdepure.errors import SdepureError
from sdepure.settings import (GRAD_MODES, METHODS, Attack, Certify, Purifier, as_float, as_int,
                              attack_from_config, certify_from_config)
from sdepure.solvers import SOLVERS

CFG = {"name": "t", "source": "t.toml", "data": {}, "classifier": {},
       "method": {"name": "densepure", "sigma": 0.25, "votes": 4, "steps": 6},
       "certify": {"n0": 10, "n": 50, "batch": 5},
       "attack": {"method": "diffpure", "t_star": 0.2, "steps": 3, "eps": "8/255", "n_examples": 4}}


def test_settings_are_frozen_and_normalised():
    p = Purifier("densepure", sigma="0.5", votes=10.0, steps=10)
    assert p.votes == 10 and isinstance(p.votes, int) and p.sigma == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.steps = 3


@pytest.mark.parametrize("value", [10.5, "ten", True, float("nan"), None, [1]])
def test_counts_are_never_truncated(value):
    with pytest.raises(SdepureError, match="integer"):
        as_int("steps", value)


def test_numbers_and_fractions():
    assert as_float("eps", "8/255") == pytest.approx(8 / 255)
    assert as_float("eps", 0.5) == 0.5
    for bad in ("abc", "1/0", "nan", "8/", "inf", True):
        with pytest.raises(SdepureError):
            as_float("eps", bad)


def test_config_steps_10_5_refused_by_certify_and_attack_alike():
    cfg = {**CFG, "method": {**CFG["method"], "steps": 10.5}, "attack": {**CFG["attack"], "steps": 10.5}}
    with pytest.raises(SdepureError, match="steps must be an integer"):
        certify_from_config(cfg, {})
    with pytest.raises(SdepureError, match="steps must be an integer"):
        attack_from_config(cfg, "autoattack", {})


def test_precedence_defaults_config_command_line():
    c = certify_from_config(CFG, {"steps": 2, "n": None, "seed": 7})
    assert (c.purifier.votes, c.purifier.steps, c.purifier.sigma) == (4, 2, 0.25)
    assert (c.n0, c.n, c.alpha, c.batch, c.seed) == (10, 50, 0.001, 5, 7)
    assert certify_from_config(CFG, {"name": "carlini"}).purifier.votes == 1  # votes are densepure's
    a = attack_from_config(CFG, "pgd", {"eot": 3})
    assert (a.purifier.t_star, a.purifier.steps, a.eps, a.eot, a.pgd_steps) == (0.2, 3, pytest.approx(8 / 255), 3, 200)
    assert attack_from_config(CFG, "bpda", {}).purifier.grad == "bpda"


def test_one_vocabulary():
    assert defense.Defense.__init__.__annotations__["settings"] in ("Purifier", Purifier)
    assert set(GRAD_MODES) >= {"exact", "adjoint", "bpda", "ode"} and METHODS[-1] == "densepure"
    assert not hasattr(attacks, "ATTACK_METHODS") and not hasattr(defense, "METHODS")
    for solver in SOLVERS:
        Purifier("diffpure", t_star=0.1, solver=solver)


@pytest.mark.parametrize("kwargs,needle", [
    ({"method": "purepure"}, "unknown method"),
    ({"grad": "magic"}, "unknown gradient mode"),
    ({"solver": "rk45"}, "unknown solver"),
    ({"t_rule": "last"}, "unknown t rule"),
    ({"method": "carlini", "votes": 3}, "densepure only"),
    ({"t_star": 1.5}, "t*"),
    ({"sigma": None, "t_star": None}, "needs sigma or t*"),
    ({"solver": "ddpm", "grad": "adjoint"}, "no adjoint"),
    ({"adjoint_method": "heun"}, "--grad adjoint only"),
    ({"grad": "adjoint", "adjoint_method": "srk"}, "does not pair"),
])
def test_purifier_refusals(kwargs, needle):
    with pytest.raises(SdepureError, match=needle.replace("*", r"\*")):
        Purifier(**{"method": "diffpure", "t_star": 0.1, **kwargs})


def test_certify_and_attack_refusals():
    p = Purifier("diffpure", sigma=0.5)
    for kwargs, needle in (({"alpha": 1.0}, "alpha"), ({"n0": 0}, "n0"), ({"skip": 0}, "skip"),
                           ({"start": -1}, "start")):
        with pytest.raises(SdepureError, match=needle):
            Certify(p, **kwargs)
    with pytest.raises(SdepureError, match="sigma"):
        Certify(Purifier("diffpure", t_star=0.1))
    q = Purifier("diffpure", t_star=0.1)
    for kwargs, needle in (({"kind": "fgsm"}, "unknown attack"), ({"norm": "L3"}, "unknown norm"),
                           ({"eps": -1}, "eps"), ({"kind": "autoattack", "step_size": 0.01}, "apply to --pgd"),
                           ({"kind": "pgd", "step_size": 0}, "step size"), ({"kind": "bpda"}, "BPDA")):
        with pytest.raises(SdepureError, match=needle):
            Attack(q, **kwargs)


def test_unknown_config_key_is_refused():
    with pytest.raises(SdepureError, match="unknown key 'stesp' in \\[method\\]"):
        certify_from_config({**CFG, "method": {"stesp": 3}}, {})
