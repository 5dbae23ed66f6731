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


# -- serialisation: every field survives the round trip through a run record ------------------

PURIFIERS = [  # between them, every Purifier field away from its default
    Purifier("densepure", sigma=0.3, votes=4, steps=7, solver="ddpm", t_rule="first", grad="bpda",
             precision="bf16", rng="cpu", early_stop=False, variance="beta"),
    Purifier("diffpure", sigma=0.2, t_star=0.3, solver="ddim", eta=0.5),
    Purifier("diffpure", sigma=0.2, solver="heun", grad="adjoint", adjoint_method="midpoint"),
]
CERTIFIES = [Certify(p, n0=7, n=33, alpha=0.01, batch=9, start=2, stop=40, skip=3, seed=5) for p in PURIFIERS] + [
    Certify(PURIFIERS[0], sampling="iss", radius_tol=0.1),
    Certify(PURIFIERS[1], n=400, batch=50, sampling="sequential", radii=(0.0, 0.25, 0.5))]
ATTACKS = [
    Attack(Purifier("densepure", t_star=0.2, votes=3), kind="pgd", norm="L2", eps=0.5, n_examples=5, start=1,
           batch=4, score_draws=7, pgd_steps=9, eot=4, step_size=0.01, eot_batch=2, seed=3, threads=1),
    Attack(Purifier("diffpure", t_star=0.2), kind="diffattack", version="standard", dev_weight=0.5,
           fixed_randomness=True),
]


def _covers_every_field(objects, cls):
    default = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    for name in default:
        assert any(getattr(o, name) != default[name] for o in objects), \
            f"no sample sets {cls.__name__}.{name}: add one, so that its round trip is tested"


def test_every_setting_round_trips_through_a_record():
    import json
    _covers_every_field(PURIFIERS, Purifier)
    _covers_every_field(CERTIFIES, Certify)
    _covers_every_field(ATTACKS, Attack)
    for cls, objects in ((Certify, CERTIFIES), (Attack, ATTACKS), (Purifier, PURIFIERS)):
        for o in objects:
            assert cls.from_dict(json.loads(json.dumps(o.to_dict()))) == o
    for c in CERTIFIES:  # and through the flat names a resume applies flags with
        assert certify_from_config({}, {}, base=c) == c
        assert certify_from_config({}, {"n": 50, "rng": "device"}, base=c) == Certify(
            Purifier(**{**c.purifier.to_dict(), "rng": "device"}), **{**_fields(c), "n": 50})


def _fields(c):
    return {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "purifier"}


def test_a_record_from_before_a_setting_reads_as_that_run_ran():
    """Keys an older sdepure did not write: the posterior ddpm variance and the CPU stream."""
    old = {"purifier": {"method": "densepure", "sigma": 0.5, "votes": 4, "steps": 5, "solver": "ddpm"},
           "n0": 8, "n": 20}
    p = Certify.from_dict(old).purifier
    assert (p.variance, p.rng) == ("posterior", "cpu")
    euler = {"purifier": {**old["purifier"], "solver": "euler"}}
    assert Certify.from_dict(euler).purifier.variance == "auto"  # no ddpm step: nothing to choose
    with pytest.raises(SdepureError, match="unknown purifier setting 'speed'"):
        Certify.from_dict({"purifier": {**old["purifier"], "speed": 2}})


@pytest.mark.parametrize("kwargs,needle", [
    ({"variance": "learnt"}, "unknown variance"),
    ({"variance": "posterior"}, "ddpm solver"),           # euler has no step variance to choose
    ({"variance": "beta", "solver": "ddim"}, "ddpm solver"),
    ({"method": "carlini", "variance": "learned"}, "method carlini"),
])
def test_variance_refusals(kwargs, needle):
    with pytest.raises(SdepureError, match=needle):
        Purifier(**{"method": "diffpure", "t_star": 0.1, **kwargs})
