"""`sdepure attack`: adaptive attacks (AutoAttack, PGD-EOT, BPDA+EOT) on a purified classifier."""
from __future__ import annotations

import time

import click
import torch
from tqdm import tqdm

from sdepure import attacks, report
from sdepure.classifiers import build_classifier
from sdepure.config import load_config, merged
from sdepure.data import load_dataset, take
from sdepure.errors import SdepureError
from sdepure.models import build_score_model
from sdepure.rng import derive_seed
from sdepure.solvers import check_solver

from .common import apply_paths, check_out, common_options, default_out, make_out, resolve_device

DEFAULTS = {"method": "diffpure", "t_star": 0.1, "steps": 10, "solver": "euler", "grad": "exact",
            "norm": "Linf", "eps": "8/255", "version": "rand", "n_examples": 64, "batch": 32,
            "score_draws": 20, "votes": 1, "adjoint_method": None, "start": 0}
PGD = {"pgd_steps": 200, "eot": 20, "step_size": "0.007"}
BPDA = {"pgd_steps": 50, "eot": 15, "step_size": "2/255"}


def settings(cfg: dict, over: dict, kind: str) -> dict:
    s = {**DEFAULTS, **(PGD if kind == "pgd" else BPDA if kind == "bpda" else {}),
         **merged(cfg, "attack", over)}
    if kind == "bpda":
        if over.get("grad") not in (None, "bpda"):
            raise SdepureError("--bpda attacks with BPDA gradients; drop --grad or use --pgd")
        s["grad"] = "bpda"
    if s["method"] not in attacks.ATTACK_METHODS:
        raise SdepureError(f"unknown method {s['method']!r}; choose from {', '.join(attacks.ATTACK_METHODS)}")
    if s["grad"] not in attacks.GRAD_MODES:
        raise SdepureError(f"unknown gradient mode {s['grad']!r}; choose from {', '.join(attacks.GRAD_MODES)}")
    if s["norm"] not in attacks.NORMS:
        raise SdepureError(f"unknown norm {s['norm']!r}; choose from {', '.join(attacks.NORMS)}")
    if s["version"] not in ("standard", "rand"):
        raise SdepureError(f"unknown AutoAttack version {s['version']!r}; choose standard or rand")
    s["eps"] = attacks.parse_eps(str(s["eps"]))
    if "step_size" in s:
        s["step_size"] = attacks.parse_eps(str(s["step_size"]))
        if s["step_size"] <= 0:
            raise SdepureError("step size must be > 0")
    for key in ("n_examples", "batch", "score_draws", "steps", "votes", "pgd_steps", "eot"):
        if key in s and (not isinstance(s[key], int) or s[key] < 1):
            raise SdepureError(f"{key.replace('_', '-')} must be an integer >= 1, got {s[key]}")
    if s["method"] != "densepure" and s["votes"] != 1:
        raise SdepureError(f"--votes applies to densepure only (method is {s['method']})")
    if not isinstance(s["start"], int) or s["start"] < 0:
        raise SdepureError(f"start must be an integer >= 0, got {s['start']}")
    t_star = float(s["t_star"])
    if not 0 < t_star <= 1:
        raise SdepureError(f"t* must be in (0, 1], got {t_star}")
    s["t_star"] = t_star
    check_solver(s["solver"])
    return s


@click.command()
@click.option("--config", "config_name", default="digits", show_default=True)
@click.option("--autoattack", "kind", flag_value="autoattack", help="AutoAttack (official code, pyautoattack).")
@click.option("--pgd", "kind", flag_value="pgd", help="PGD with EOT (200 steps, 20 EOT, step 0.007).")
@click.option("--bpda", "kind", flag_value="bpda", help="BPDA+EOT (50 steps, 15 EOT, step 2/255).")
@click.option("--method", help=f"One of {', '.join(attacks.ATTACK_METHODS)}.")
@click.option("--grad", help=f"Gradient through the purifier: {', '.join(attacks.GRAD_MODES)}.")
@click.option("--adjoint-method", help="torchsde adjoint scheme (default: the forward method's own).")
@click.option("--version", "aa_version", help="AutoAttack version: standard or rand.")
@click.option("--norm", help="Linf or L2.")
@click.option("--eps", help="Radius, e.g. 8/255 or 0.5.")
@click.option("--n-examples", type=int, help="Test examples to attack.")
@click.option("--start", type=int, help="First test example.")
@click.option("--batch", type=int)
@click.option("--t-star", type=float, help="Diffusion time to purify from (DiffPure's t*).")
@click.option("--steps", type=int, help="Reverse-process steps.")
@click.option("--solver")
@click.option("--votes", type=int, help="DensePure: K purifications per prediction.")
@click.option("--pgd-steps", type=int, help="PGD / BPDA iterations.")
@click.option("--eot", type=int, help="PGD / BPDA: gradient samples per iteration.")
@click.option("--step-size", help="PGD / BPDA step size, e.g. 2/255.")
@click.option("--score-draws", type=int, help="Purifications per example when scoring (M).")
@click.option("--save-adv", is_flag=True, help="Also write the adversarial examples (adversarial.pt).")
@common_options
def attack(config_name, kind, method, grad, adjoint_method, aa_version, norm, eps, n_examples, start, batch,
           t_star, steps, solver, votes, pgd_steps, eot, step_size, score_draws, save_adv, seed, device, out,
           allow_pickle, model_weights, classifier_weights, data_root):
    """Attack a purified classifier with gradients through the reverse process.

    Reports clean and robust accuracy, which attack broke which example, and the defense scored
    over --score-draws independent purifications (majority vote, and any-of-N: broken if any draw is wrong). Writes
    summary.json and examples.tsv to --out."""
    t0 = time.time()
    if kind is None:
        raise SdepureError("choose an attack: --autoattack, --pgd or --bpda")
    cfg = apply_paths(load_config(config_name), model_weights, classifier_weights, data_root)
    over = dict(method=method, grad=grad, adjoint_method=adjoint_method, version=aa_version, norm=norm, eps=eps,
                n_examples=n_examples, start=start, batch=batch, t_star=t_star, steps=steps, solver=solver,
                votes=votes, score_draws=score_draws)
    if kind != "autoattack":
        over.update(pgd_steps=pgd_steps, eot=eot, step_size=step_size)
    elif any(v is not None for v in (pgd_steps, eot, step_size)):
        raise SdepureError("--pgd-steps, --eot and --step-size apply to --pgd and --bpda")
    s = settings(cfg, over, kind)
    dev = resolve_device(device)
    out = check_out(out or default_out("attack", cfg["name"], s["method"], kind))

    x, y, num_classes = load_dataset(cfg["data"])
    idx = list(range(s["start"], min(s["start"] + s["n_examples"], len(x))))
    if not idx:
        raise SdepureError(f"no examples selected: start={s['start']} of {len(x)}")
    x, y = take(x, idx).to(dev), y[idx].to(dev)
    model = build_score_model(cfg["model"], allow_pickle).to(dev) if s["method"] != "none" else None
    classifier = build_classifier(cfg["classifier"], allow_pickle, num_classes).to(dev)
    target = attacks.AttackedModel(s["method"], classifier, num_classes, model, s["t_star"], s["steps"],
                                   s["solver"], s["grad"], s["votes"], s["adjoint_method"], seed)
    what = {"autoattack": f"AutoAttack {s['version']}", "pgd": "PGD-EOT", "bpda": "BPDA+EOT"}[kind]
    click.echo(f"sdepure attack: {what} {s['norm']} eps={s['eps']:.4g} on {s['method']} ({cfg['name']}, "
               f"{len(idx)} examples from {s['start']}), t*={s['t_star']}, {s['steps']} {target.solver} steps, "
               f"grad={s['grad']}" + (f", votes K={s['votes']}" if s["votes"] > 1 else ""))
    if kind != "autoattack":
        click.echo(f"  {s['pgd_steps']} steps of {s['step_size']:.4g}, {s['eot']} EOT samples")
    make_out(out)

    if kind == "autoattack":
        x_adv, info = attacks.autoattack(target, x, y, s["eps"], s["norm"], s["version"], seed, s["batch"], dev)
        clean_flags, robust_flags = info["clean_flags"], info["robust_flags"]
        broken_by = info["broken_by"]
        breakdown = info["accuracy_after"]
    else:
        with torch.no_grad():
            target.reset(derive_seed(seed, 1))
            clean_flags = [bool(v) for v in torch.cat(
                [target(x[i:i + s["batch"]]).argmax(1) for i in range(0, len(x), s["batch"])]).eq(y).tolist()]
        target.reset(seed)
        chunks = []
        with tqdm(total=s["pgd_steps"] * ((len(x) + s["batch"] - 1) // s["batch"]), desc=kind, unit="step",
                  leave=False) as bar:
            for i in range(0, len(x), s["batch"]):
                chunks.append(attacks.pgd_eot(target, x[i:i + s["batch"]], y[i:i + s["batch"]], s["eps"], s["norm"],
                                              s["pgd_steps"], s["step_size"], s["eot"], derive_seed(seed, 3, i), progress=bar.update))
        x_adv = torch.cat(chunks)
        target.reset(derive_seed(seed, 2))
        with torch.no_grad():
            robust_flags = [bool(v) for v in torch.cat(
                [target(x_adv[i:i + s["batch"]]).argmax(1) for i in range(0, len(x), s["batch"])]).eq(y).tolist()]
        broken_by = [kind if (c and not r) else None for c, r in zip(clean_flags, robust_flags)]
        breakdown = {"clean": sum(clean_flags) / len(idx), kind: sum(robust_flags) / len(idx)}

    target.reset(seed)
    draws = s["score_draws"]
    clean_score = attacks.score_defense(target, x, y, draws, derive_seed(seed, 4), s["batch"])
    adv_score = attacks.score_defense(target, x_adv, y, draws, derive_seed(seed, 5), s["batch"])
    linf = float((x_adv - x).abs().flatten(1).max(1).values.max())
    l2 = float((x_adv - x).flatten(1).norm(dim=1).max())
    with open(out / "examples.tsv", "w") as fh:
        fh.write("idx\tlabel\tclean_correct\trobust\tbroken_by\tadv_majority_correct\tadv_any_of_n_correct\n")
        for j, i in enumerate(idx):
            fh.write(f"{i}\t{int(y[j])}\t{int(clean_flags[j])}\t{int(robust_flags[j])}\t{broken_by[j] or '-'}\t"
                     f"{int(adv_score['per_example']['majority'][j])}\t{int(adv_score['per_example']['any_of_n'][j])}\n")
    if save_adv:
        torch.save({"x_adv": x_adv.cpu(), "y": y.cpu(), "idx": torch.tensor(idx)}, out / "adversarial.pt")
    clean_acc, robust_acc = sum(clean_flags) / len(idx), sum(robust_flags) / len(idx)
    wall = time.time() - t0
    summary = {
        "command": "attack", "attack": kind, "config": cfg["name"], "settings": {**s, "solver": target.solver},
        "seed": seed, "device": str(dev), "examples": len(idx),
        "clean_accuracy": clean_acc, "robust_accuracy": robust_acc, "accuracy_after_each_attack": breakdown,
        "broken_by_counts": {a: broken_by.count(a) for a in sorted({b for b in broken_by if b})},
        "scored_over_draws": {"clean": {k: v for k, v in clean_score.items() if k != "per_example"},
                              "adversarial": {k: v for k, v in adv_score.items() if k != "per_example"}},
        "max_perturbation": {"Linf": linf, "L2": l2}, "wall_seconds": wall,
    }
    report.write_json(out / "summary.json", summary)
    click.echo(f"clean accuracy {clean_acc:.3f}, robust accuracy {robust_acc:.3f} (single draw, as the attack saw it)")
    click.echo("  after each attack: " + ", ".join(f"{k} {v:.3f}" for k, v in breakdown.items()))
    click.echo(f"scored over {draws} purifications: clean majority {clean_score['majority']:.3f} / any-of-N "
               f"{clean_score['any_of_n']:.3f}; adversarial single {adv_score['single']:.3f}, majority "
               f"{adv_score['majority']:.3f}, any-of-N {adv_score['any_of_n']:.3f}")
    click.echo(f"wrote {out}/summary.json, examples.tsv{', adversarial.pt' if save_adv else ''} ({wall:.1f} s)")
