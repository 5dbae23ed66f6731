"""One frozen, validated description of a run, built once and passed from the command line to
the solver.

- `Purifier`: how a noisy input is purified (method, sigma or t*, votes, steps, solver, t rule)
  and how gradients flow through it in an attack (grad, adjoint method).
- `Certify`: a randomized-smoothing run over a dataset (a Purifier plus Cohen's n0, n, alpha,
  the batch and the image selection).
- `Attack`: an adaptive attack (a Purifier plus the attack and its budget).

Every check on these values lives here, with one vocabulary; `from_config` reads a config's
tables and the command line's overrides (None = not given) into them. Values are typed
strictly: a count such as `steps = 10.5` is refused, never truncated.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import SdepureError
from .precision import PRECISIONS
from .rng import RNGS
from .schedules import T_RULES
from .smoothing import SAMPLINGS, checkpoints
from .solvers import (NO_ADJOINT, ODE_METHODS, SDE_METHODS, SOLVERS, VARIANCES, check_adjoint_method, check_eta,
                      check_variance, has_step_variance)

METHODS = ("none", "carlini", "diffpure", "densepure")
REVERSE_METHODS = ("diffpure", "densepure")  # methods that run the reverse process
GRAD_MODES = ("exact", "adjoint", "bpda", "ode")
NORMS = ("Linf", "L2")
AA_VERSIONS = ("standard", "rand")
ATTACK_KINDS = ("autoattack", "pgd", "bpda", "diffattack")
VARIANCE_CHOICES = ("auto", *VARIANCES)


def _name(key: str) -> str:
    return key.replace("_", "-")


def as_int(key: str, value: Any, minimum: int | None = None) -> int:
    """An integer (an integral float such as 10.0 from a config is accepted), >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SdepureError(f"{_name(key)} must be an integer, got {value!r}")
    try:
        number = float(value) if not isinstance(value, int) else value
    except ValueError:
        raise SdepureError(f"{_name(key)} must be an integer, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")) or number != int(number):
        raise SdepureError(f"{_name(key)} must be an integer, got {value!r}")
    number = int(number)
    if minimum is not None and number < minimum:
        raise SdepureError(f"{_name(key)} must be an integer >= {minimum}, got {number}")
    return number


def as_float(key: str, value: Any) -> float:
    """A finite number; fractions such as '8/255' are accepted (attack radii)."""
    if isinstance(value, bool):
        raise SdepureError(f"{_name(key)} must be a number, got {value!r}")
    try:
        if isinstance(value, str) and "/" in value:
            num, den = value.split("/")
            number = float(num) / float(den)
        else:
            number = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise SdepureError(f"{_name(key)} must be a number (such as 0.03 or 8/255), got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise SdepureError(f"{_name(key)} must be a finite number, got {value!r}")
    return number


def as_radii(value: Any) -> tuple[float, ...]:
    """Target radii: a list, or a comma-separated string such as '0.25,0.5'; increasing, >= 0."""
    if value is None:
        raise SdepureError("--sampling sequential needs its target radii: --radii r1,r2,... (increasing)")
    items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if isinstance(items, (int, float)):
        items = [items]
    radii = tuple(as_float("radii", v) for v in items)
    if not radii:
        raise SdepureError("--radii is empty; give the target radii, such as --radii 0.25,0.5")
    if any(r < 0 for r in radii):
        raise SdepureError(f"radii must be >= 0, got {', '.join(f'{r:g}' for r in radii)}")
    if any(b <= a for a, b in zip(radii, radii[1:])):
        raise SdepureError(f"radii must increase, got {', '.join(f'{r:g}' for r in radii)}")
    return radii


def _choice(key: str, value: Any, choices) -> Any:
    if value not in choices:
        shown = ", ".join(str(c) for c in choices)
        raise SdepureError(f"unknown {_name(key).replace('-', ' ')} {value!r}; choose from {shown}")
    return value


def record_defaults(d: dict) -> dict:
    """What a record written before a setting existed ran with, so an old run resumes as it ran:
    the posterior variance for ddpm steps (learned variance came later; auto elsewhere, where it
    means the same) and the CPU stream (the only one then)."""
    ddpm = has_step_variance(d.get("solver")) and d.get("method") in REVERSE_METHODS
    return {"variance": "posterior" if ddpm else "auto", "rng": "cpu"}


def _known(cls, d: dict) -> dict:
    if not isinstance(d, dict):
        raise SdepureError(f"{cls.__name__} settings must be a table, got {type(d).__name__}")
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise SdepureError(f"unknown {cls.__name__.lower()} setting {unknown[0]!r} (a record from a newer sdepure?)")
    return dict(d)


@dataclass(frozen=True)
class Purifier:
    """How inputs are purified. `sigma` (smoothing noise on [0, 1] images) fixes t* through the
    schedule (certification); `t_star` gives it directly (attacks, DiffPure's own choice)."""
    method: str = "densepure"
    sigma: float | None = None
    t_star: float | None = None
    votes: int = 1
    steps: int = 10
    solver: str = "euler"
    t_rule: str | None = None
    grad: str = "exact"
    adjoint_method: str | None = None
    eta: float = 0.0            # ddim's noise level (0: deterministic DDIM, 1: DDPM's variance)
    precision: str = "fp32"     # autocast of the score network and classifier (precision.py)
    rng: str = "device"         # draws on the device ("cpu": the device-independent CPU stream)
    early_stop: bool = True     # DensePure: stop a draw's vote once its winner is decided (exact)
    variance: str = "auto"      # ddpm's step variance: learned where the model has it, else posterior

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: normalise once)
        _choice("method", self.method, METHODS)
        set_("votes", as_int("votes", self.votes, 1))
        set_("steps", as_int("steps", self.steps, 1))
        _choice("solver", self.solver, SOLVERS)
        _choice("gradient mode", self.grad, GRAD_MODES)
        if self.t_rule is not None:
            _choice("t rule", self.t_rule, T_RULES)
        if self.method != "densepure" and self.votes != 1:
            raise SdepureError(f"votes apply to densepure only (got votes={self.votes} with {self.method})")
        if self.sigma is not None:
            set_("sigma", as_float("sigma", self.sigma))
            if not self.sigma > 0:
                raise SdepureError(f"sigma must be > 0, got {self.sigma}")
        if self.t_star is not None:
            set_("t_star", as_float("t_star", self.t_star))
            if not 0 < self.t_star <= 1:
                raise SdepureError(f"t* must be in (0, 1], got {self.t_star}")
        if self.method != "none" and self.sigma is None and self.t_star is None:
            raise SdepureError(f"method {self.method} needs sigma or t*")
        if self.grad == "ode" and self.solver not in ODE_METHODS:
            set_("solver", "ode-euler")  # --grad ode purifies with the probability-flow ODE
        if self.grad == "adjoint" and self.method in REVERSE_METHODS and self.solver in NO_ADJOINT:
            raise SdepureError(f"the {self.solver} sampler has no adjoint; use --grad exact or an SDE/ODE solver")
        set_("eta", as_float("eta", self.eta))
        check_eta(self.eta, self.solver)
        _choice("precision", self.precision, PRECISIONS)
        _choice("rng", self.rng, RNGS)
        if not isinstance(self.early_stop, bool):
            raise SdepureError(f"early_stop must be true or false, got {self.early_stop!r}")
        _choice("variance", self.variance, VARIANCE_CHOICES)
        if self.variance != "auto":
            if self.method not in REVERSE_METHODS:
                raise SdepureError(f"variance {self.variance} applies to the ddpm solver of diffpure and densepure "
                                   f"(method {self.method} runs no reverse process)")
            check_variance(self.solver, self.variance)
        if self.adjoint_method is not None:
            if self.grad != "adjoint":
                raise SdepureError("--adjoint-method applies to --grad adjoint only")
            if self.solver not in SDE_METHODS:
                raise SdepureError(f"--adjoint-method applies to torchsde solvers, not {self.solver!r}")
            check_adjoint_method(self.solver, self.adjoint_method)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Purifier":
        """From to_dict's output; a key a record written before it existed takes record_defaults."""
        d = _known(cls, d)
        return cls(**{**record_defaults(d), **d})

    @property
    def solver_grad(self) -> str | None:
        """The solver's gradient mode for this attack gradient mode (bpda: none, it is detached)."""
        return {"exact": "exact", "adjoint": "adjoint", "ode": "adjoint", "bpda": None}[self.grad]

    def describe(self) -> str:
        parts = [self.method]
        if self.sigma is not None:
            parts.append(f"sigma={self.sigma}")
        if self.method == "densepure":
            parts.append(f"votes K={self.votes}")
        if self.method in REVERSE_METHODS:
            parts.append(f"{self.steps} {self.solver} steps" + (f" (eta {self.eta:g})" if self.eta else ""))
        if self.precision != "fp32":
            parts.append(self.precision)
        return ", ".join(parts)


@dataclass(frozen=True)
class Certify:
    """Cohen et al.'s CERTIFY over the test images range(start, stop, skip); `sampling` says how
    many estimation draws each image takes (smoothing.py: fixed n, or iss / sequential with n as
    the cap)."""
    purifier: Purifier
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    batch: int = 100
    start: int = 0
    stop: int | None = None
    skip: int = 1
    seed: int = 0
    sampling: str = "fixed"
    radius_tol: float | None = None        # iss: the radius the fewer draws may lose (default 0.05)
    radii: tuple[float, ...] | None = None  # sequential: the target radii, increasing

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        if self.purifier.sigma is None:
            raise SdepureError("certification needs the smoothing noise sigma")
        for key, minimum in (("n0", 1), ("n", 1), ("batch", 1), ("start", 0), ("skip", 1), ("seed", 0)):
            set_(key, as_int(key, getattr(self, key), minimum))
        if self.stop is not None:
            set_("stop", as_int("stop", self.stop, 0))
        set_("alpha", as_float("alpha", self.alpha))
        if not 0 < self.alpha < 1:
            raise SdepureError(f"alpha must be in (0, 1), got {self.alpha}")
        _choice("sampling", self.sampling, SAMPLINGS)
        if self.radius_tol is not None or self.sampling == "iss":
            if self.sampling != "iss":
                raise SdepureError("--radius-tol applies to --sampling iss only")
            set_("radius_tol", as_float("radius_tol", 0.05 if self.radius_tol is None else self.radius_tol))
            if not self.radius_tol > 0:
                raise SdepureError(f"radius-tol must be > 0, got {self.radius_tol}")
        if self.radii is not None or self.sampling == "sequential":
            if self.sampling != "sequential":
                raise SdepureError("--radii applies to --sampling sequential only")
            set_("radii", as_radii(self.radii))
            checkpoints(self.n, self.batch)  # the cap must reach the first checkpoint

    @property
    def sigma(self) -> float:
        return self.purifier.sigma

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Certify":
        d = _known(cls, d)
        return cls(**{**d, "purifier": Purifier.from_dict(d.get("purifier", {}))})


PGD_BUDGET = {"pgd": {"pgd_steps": 200, "eot": 20, "step_size": 0.007},
              "bpda": {"pgd_steps": 50, "eot": 15, "step_size": 2 / 255},
              # DiffAttack (Kang et al. 2023): 100 iterations per round, 20 EOT draws, step 2 eps halved
              # at APGD's checkpoints (no --step-size), deviated-reconstruction weight lambda = 1
              "diffattack": {"pgd_steps": 100, "eot": 20}}
DIFFATTACK_METHODS = ("diffpure", "densepure")  # purifiers with intermediate reverse-process states


def check_diffattack(p: Purifier) -> None:
    """DiffAttack's loss lives on the intermediate states of a reverse process, reached by gradients."""
    if p.method not in DIFFATTACK_METHODS:
        what = "no purifier" if p.method == "none" else "one-shot denoising, no reverse process"
        raise SdepureError(f"--diffattack needs the intermediate states of a reverse process; method "
                           f"{p.method} has none ({what}); use --pgd or --autoattack")
    if p.grad == "bpda":
        raise SdepureError("--diffattack needs gradients through the reverse process; BPDA has none")


@dataclass(frozen=True)
class Attack:
    """An adaptive attack on the purified classifier and how its result is scored."""
    purifier: Purifier
    kind: str = "autoattack"
    norm: str = "Linf"
    eps: float = 8 / 255
    version: str = "rand"
    n_examples: int = 64
    start: int = 0
    batch: int = 32
    score_draws: int = 20
    pgd_steps: int | None = None
    eot: int | None = None
    step_size: float | None = None
    eot_batch: int | None = None
    dev_weight: float | None = None
    fixed_randomness: bool = False
    seed: int = 0
    threads: int | None = None  # torch threads while the attack runs; None: torch's default

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        _choice("attack", self.kind, ATTACK_KINDS)
        if self.threads is not None:
            set_("threads", as_int("threads", self.threads, 1))
        _choice("norm", self.norm, NORMS)
        _choice("AutoAttack version", self.version, AA_VERSIONS)
        set_("eps", as_float("eps", self.eps))
        if not self.eps >= 0:
            raise SdepureError(f"eps must be >= 0, got {self.eps}")
        for key, minimum in (("n_examples", 1), ("start", 0), ("batch", 1), ("score_draws", 1), ("seed", 0)):
            set_(key, as_int(key, getattr(self, key), minimum))
        if not isinstance(self.fixed_randomness, bool):
            raise SdepureError(f"fixed-randomness must be true or false, got {self.fixed_randomness!r}")
        if self.fixed_randomness and self.purifier.method == "none":
            raise SdepureError("--fixed-randomness: method none draws no randomness to fix")
        if self.dev_weight is not None and self.kind != "diffattack":
            raise SdepureError("--dev-weight (DiffAttack's lambda) applies to --diffattack only")
        if self.fixed_randomness:
            # the defense is deterministic per example: every EOT draw would be the same
            if self.eot is not None and as_int("eot", self.eot, 1) != 1:
                raise SdepureError(f"--fixed-randomness makes the defense deterministic; --eot must be 1, got {self.eot}")
            set_("eot", 1)
        if self.kind == "autoattack":
            # --pgd-steps / --eot set APGD's iterations and EOT draws (None: AutoAttack's own, 100 / 20 for rand)
            if self.step_size is not None or self.eot_batch is not None:
                raise SdepureError("--step-size and --eot-batch apply to --pgd, --bpda and --diffattack "
                                   "(AutoAttack sets its own step and runs its EOT draws one by one)")
            for key in ("pgd_steps", "eot"):
                if getattr(self, key) is not None:
                    set_(key, as_int(key, getattr(self, key), 1))
        else:
            if self.kind == "diffattack":
                if self.step_size is not None:
                    raise SdepureError("--step-size applies to --pgd and --bpda; DiffAttack steps 2 eps, halved "
                                       "at APGD's checkpoints")
                check_diffattack(self.purifier)
                set_("dev_weight", as_float("dev_weight", 1.0 if self.dev_weight is None else self.dev_weight))
                if not self.dev_weight >= 0:
                    raise SdepureError(f"dev-weight must be >= 0, got {self.dev_weight}")
            for key, default in PGD_BUDGET[self.kind].items():
                if getattr(self, key) is None:
                    set_(key, default)
            set_("pgd_steps", as_int("pgd_steps", self.pgd_steps, 1))
            set_("eot", as_int("eot", self.eot, 1))
            set_("eot_batch", as_int("eot_batch", self.eot if self.eot_batch is None else self.eot_batch, 1))
            if self.eot_batch > self.eot:
                raise SdepureError(f"eot-batch (draws per forward pass) must be <= eot = {self.eot}, "
                                   f"got {self.eot_batch}")
            if self.kind != "diffattack":
                set_("step_size", as_float("step_size", self.step_size))
                if not self.step_size > 0:
                    raise SdepureError(f"step size must be > 0, got {self.step_size}")
        if self.kind == "bpda" and self.purifier.grad != "bpda":
            raise SdepureError("--bpda attacks with BPDA gradients; drop --grad or use --pgd")
        if self.purifier.t_star is None and self.purifier.method != "none":
            raise SdepureError("an attack purifies from an explicit t* (--t-star)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Attack":
        d = _known(cls, d)
        return cls(**{**d, "purifier": Purifier.from_dict(d.get("purifier", {}))})


# -- from a config's tables and the command line -------------------------------------------

CERTIFY_DEFAULTS = {"method": {"name": "densepure", "sigma": 0.5, "votes": 10, "steps": 10, "solver": "euler"},
                    "certify": {"n0": 100, "n": 1000, "alpha": 0.001, "batch": 100, "start": 0, "stop": None,
                                "skip": 1, "sampling": "fixed", "radius_tol": None, "radii": None}}
ATTACK_DEFAULTS = {"method": "diffpure", "t_star": 0.1, "steps": 10, "solver": "euler", "grad": "exact",
                   "norm": "Linf", "eps": "8/255", "version": "rand", "n_examples": 64, "batch": 32,
                   "score_draws": 20, "votes": 1, "adjoint_method": None, "start": 0}


def _table(cfg: dict, name: str, known) -> dict:
    table = dict(cfg.get(name, {}))
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise SdepureError(f"config {cfg.get('source', '')}: unknown key {unknown[0]!r} in [{name}]; "
                           f"known keys: {', '.join(sorted(known))}")
    return table


def _given(overrides: dict) -> dict:
    return {k: v for k, v in overrides.items() if v is not None}


# the flat names of certify's [method] table and command line -> Purifier fields: every field but
# those of attacks (a new setting is a certify key unless excluded here)
CERTIFY_METHOD_KEYS = {"name": "method", **{f.name: f.name for f in dataclasses.fields(Purifier)
                                            if f.name not in ("method", "t_star", "grad", "adjoint_method")}}
# the purifier keys of an attack's [attack] table and command line: every field but certify's own
ATTACK_PURIFIER_KEYS = {f.name for f in dataclasses.fields(Purifier)} - {"sigma", "early_stop"}


def certify_from_config(cfg: dict, overrides: dict, base: Certify | None = None) -> Certify:
    """Certify settings from defaults < the config's [method] and [certify] < overrides (flat
    names: the keys of CERTIFY_METHOD_KEYS and of [certify], and seed). With `base` (a run's
    recorded settings), base < overrides: the config's tables are not read."""
    cert_keys = set(CERTIFY_DEFAULTS["certify"])
    over = _given(overrides)
    if base is None:
        fields_, seed = {}, 0
        m = {**CERTIFY_DEFAULTS["method"], **_table(cfg, "method", CERTIFY_METHOD_KEYS)}
        c = {**CERTIFY_DEFAULTS["certify"], **_table(cfg, "certify", cert_keys)}
    else:
        fields_, seed = base.purifier.to_dict(), base.seed
        m = {flat: fields_[name] for flat, name in CERTIFY_METHOD_KEYS.items()}
        c = {k: getattr(base, k) for k in cert_keys}
    m.update({k: v for k, v in over.items() if k in CERTIFY_METHOD_KEYS})
    c.update({k: v for k, v in over.items() if k in cert_keys})
    if base is not None and "variance" not in over and m["solver"] != fields_["solver"]:
        m["variance"] = "auto"  # the recorded choice went with the recorded solver; the resume names the solver
    if m["name"] != "densepure":
        if over.get("votes") not in (None, 1):
            _choice("method", m["name"], METHODS)
            raise SdepureError(f"--votes applies to densepure only (method is {m['name']})")
        m["votes"] = 1
    purifier = Purifier(**{**fields_, **{CERTIFY_METHOD_KEYS[k]: v for k, v in m.items()}})
    return Certify(purifier=purifier, seed=over.get("seed", seed), **c)


def attack_from_config(cfg: dict, kind: str | None, overrides: dict) -> Attack:
    """Attack settings from defaults < the config's [attack] < overrides (flat names as the
    command line's options)."""
    if kind is None:
        raise SdepureError("choose an attack: --autoattack, --pgd, --bpda or --diffattack")
    purifier_keys = ATTACK_PURIFIER_KEYS
    attack_keys = {f.name for f in dataclasses.fields(Attack)} - {"purifier", "kind", "seed"}
    over = _given(overrides)
    table = _table(cfg, "attack", purifier_keys | attack_keys)
    if kind == "autoattack":  # a config's PGD budget applies to --pgd/--bpda only
        for key in ("pgd_steps", "eot", "step_size", "eot_batch", "dev_weight"):
            table.pop(key, None)
    s = {**ATTACK_DEFAULTS, **table, **over}
    if kind == "bpda":
        if over.get("grad") not in (None, "bpda"):
            raise SdepureError("--bpda attacks with BPDA gradients; drop --grad or use --pgd")
        s["grad"] = "bpda"
    purifier = Purifier(**{k: s[k] for k in purifier_keys if k in s})
    rest = {k: s[k] for k in attack_keys if k in s}
    return Attack(purifier=purifier, kind=kind, seed=over.get("seed", 0), **rest)
