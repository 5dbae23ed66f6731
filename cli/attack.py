"""`sdepure attack`: adaptive attacks (AutoAttack, PGD-EOT, BPDA+EOT, DiffAttack) on a purified
classifier, with fresh or fixed randomness."""
from __future__ import annotations

import sys
from pathlib import Path

import click
from click.core import ParameterSource
from tqdm import tqdm

from sdepure import distributed, experiments, runs
from sdepure.config import load_config
from sdepure.errors import SdepureError
from sdepure.precision import PRECISIONS
from sdepure.settings import GRAD_MODES, METHODS, Attack, attack_from_config

from .common import apply_paths, check_out, common_options, default_out, resolve_device


@click.command()
@click.option("--config", "config_name", default="digits", show_default=True)
@click.option("--autoattack", "kind", flag_value="autoattack", help="AutoAttack (official code, pyautoattack).")
@click.option("--pgd", "kind", flag_value="pgd", help="PGD with EOT (200 steps, 20 EOT, step 0.007).")
@click.option("--bpda", "kind", flag_value="bpda", help="BPDA+EOT (50 steps, 15 EOT, step 2/255).")
@click.option("--diffattack", "kind", flag_value="diffattack",
              help="DiffAttack (Kang et al. 2023): APGD on CE then DLR plus the deviated-reconstruction loss on "
                   "every reverse-process state (100 iterations per round, 20 EOT); diffpure/densepure only.")
@click.option("--method", help=f"One of {', '.join(METHODS)}.")
@click.option("--grad", help=f"Gradient through the purifier: {', '.join(GRAD_MODES)}.")
@click.option("--adjoint-method", help="torchsde adjoint scheme (default: the forward method's own).")
@click.option("--version", "version", help="AutoAttack version: standard or rand.")
@click.option("--norm", help="Linf or L2.")
@click.option("--eps", help="Radius, e.g. 8/255 or 0.5.")
@click.option("--n-examples", type=int, help="Test examples to attack.")
@click.option("--start", type=int, help="First test example.")
@click.option("--batch", type=int)
@click.option("--t-star", type=float, help="Diffusion time to purify from (DiffPure's t*).")
@click.option("--steps", type=int, help="Reverse-process steps.")
@click.option("--solver")
@click.option("--votes", type=int, help="DensePure: K purifications per prediction.")
@click.option("--eta", type=float, help="ddim solver: noise level in [0, 1] (0: deterministic).")
@click.option("--rng", help="Gaussian draws: device (default) or cpu (the device-independent CPU stream).")
@click.option("--precision", help=f"Network arithmetic: {', '.join(PRECISIONS)} (autocast; fp32 default).")
@click.option("--variance", help="ddpm solver's step variance: auto (default: the model's learned variance where it "
              "has one), learned, posterior or beta.")
@click.option("--pgd-steps", type=int, help="Iterations (PGD / BPDA; per round for DiffAttack; APGD's for AutoAttack).")
@click.option("--eot", type=int, help="Gradient samples (EOT draws) per iteration; expected loss over them.")
@click.option("--eot-batch", type=int,
              help="EOT draws evaluated together as one batch of rows (default: all of them; lower it to save memory).")
@click.option("--dev-weight", help="DiffAttack: weight lambda of the deviated-reconstruction loss (default 1).")
@click.option("--fixed-randomness", is_flag=True, default=None,
              help="Deterministic white-box (Liu et al. 2025): each example's noise and Brownian path fixed and "
                   "known to the attacker; attack and score with them (and also under fresh draws).")
@click.option("--step-size", help="PGD / BPDA step size, e.g. 2/255.")
@click.option("--score-draws", type=int, help="Purifications per example when scoring (M).")
@click.option("--threads", type=int, help="torch threads (default: the config's, else torch's own; the digits "
              "config uses 1: its small networks lose time to threads waiting for each other).")
@click.option("--save-adv", is_flag=True, help="Also write the adversarial examples (adversarial.pt).")
@click.option("--shard", type=str, help="i/n: attack every n-th batch of examples, starting at the i-th (0-based); "
              "sdepure merge combines the shards.")
@click.option("--resume", type=click.Path(path_type=Path),
              help="Continue the attack run in this directory with its recorded settings (finished batches kept).")
@common_options
def attack(config_name, kind, save_adv, shard, resume, seed, device, out, allow_pickle, model_weights, classifier_weights,
           data_root, **options):
    """Attack a purified classifier with gradients through the reverse process.

    Reports clean and robust accuracy, which attack broke which example, and the defense scored
    over --score-draws independent purifications (single draw, majority vote, and any-of-N: broken
    if any draw is wrong), with one table row per randomness scored. Writes summary.json and
    examples.tsv to --out."""
    env = distributed.from_environ()
    if resume is not None:
        ctx = click.get_current_context()
        given = [name for name in ("config_name", "kind", "seed", "out", "shard", *options)
                 if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)]
        if given:
            flag = ctx.command.params[[p.name for p in ctx.command.params].index(given[0])].opts[0]
            raise SdepureError(f"--resume continues the run with the settings it recorded; drop {flag}")
        record = runs.load_record(resume, runs.ATTACK_FORMAT)
        runs.check_world_size(resume, record, env.world_size)
        cfg = apply_paths(runs.config_from_record(record), model_weights, classifier_weights, data_root)
        settings, out, kind = Attack.from_dict(record["settings"]), resume, record["settings"]["kind"]
        part = runs.record_shard(record)
        save_adv = save_adv or bool(record.get("save_adv"))
    else:
        cfg = apply_paths(load_config(config_name), model_weights, classifier_weights, data_root)
        settings = attack_from_config(cfg, kind, {**options, "seed": seed})
        part = runs.parse_shard(shard) if shard is not None else None
        named = default_out("attack", cfg["name"], settings.purifier.method, kind,
                            *([f"shard{part.index}of{part.count}"] if part else []))
        # under torchrun rank 0 names the default directory (its time stamp) and checks it
        out = check_out(out or named) if (out is not None or not env.active) else named
    dev = distributed.device_for(env, resolve_device(device))  # cuda:LOCAL_RANK under torchrun
    rounds = 2 if kind == "diffattack" else 1
    steps = rounds * settings.pgd_steps * -(-settings.n_examples // settings.batch) if kind != "autoattack" else None
    bars = []  # opened at the first step, so a refusal before the attack prints one line only
    terminal = sys.stderr.isatty()  # elsewhere (CI, nohup, SLURM logs): the batch lines only, no \r updates

    def progress(n: int) -> None:
        if not terminal:
            return
        if not bars:
            bars.append(tqdm(total=steps, desc=kind, unit="step", leave=False))
        bars[0].update(n)

    class BatchLines:  # one line per finished batch, above the step bar in a terminal
        def write(self, text: str) -> None:
            tqdm.write(text.rstrip("\n"), file=sys.stderr)

        def flush(self) -> None:
            sys.stderr.flush()
    try:
        s = experiments.attack(cfg, settings, dev, out, allow_pickle, save_adv=save_adv, echo=click.echo,
                               progress=progress if steps is not None else None, resume=resume is not None,
                               log=BatchLines(), shard=part, dist=env)
    finally:
        for bar in bars:
            bar.close()
    if not env.is_main:
        click.echo(f"{env.prefix}shard {env.rank}/{env.world_size} done ({s['examples']} examples); rank 0 merges")
        return
    click.echo(f"clean accuracy {s['clean_accuracy']:.3f}, robust accuracy {s['robust_accuracy']:.3f} "
               "(single draw, as the attack saw it)")
    click.echo("  after each attack: " + ", ".join(f"{k} {v:.3f}" for k, v in s["accuracy_after_each_attack"].items()))
    clean, adv = s["scored_over_draws"]["clean"], s["scored_over_draws"]["adversarial"]
    click.echo(f"scored over {adv['draws']} purifications: clean majority {clean['majority']:.3f} / any-of-N "
               f"{clean['any_of_n']:.3f}; adversarial single {adv['single']:.3f}"
               + (f" (SE {adv['single_se']:.3f}, mean over the draws)" if adv["single_se"] is not None else "")
               + f", majority {adv['majority']:.3f}, "
               f"any-of-N {adv['any_of_n']:.3f}")
    click.echo(experiments.table_markdown(s["table"]))
    click.echo(f"wrote {out}/summary.json, examples.tsv{', adversarial.pt' if save_adv else ''} "
               f"({s['wall_seconds']:.1f} s)")
