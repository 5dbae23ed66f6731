"""`sdepure train digits`: train the embedded default's eps-network and classifier."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from sdepure.classifiers.digits import DigitsCNN
from sdepure.data import load_digits
from sdepure.errors import SdepureError
from sdepure.loaders import save_sdepure
from sdepure.models.digits import DigitsEpsMLP
from sdepure.schedules import LinearVP
from sdepure.training import eps_loss, train_classifier, train_eps

from .common import check_out, make_out


@click.group()
def train():
    """Train models."""


@train.command("digits")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="New output directory.")
@click.option("--steps", type=int, default=14000, show_default=True, help="eps-network training steps.")
@click.option("--epochs", type=int, default=60, show_default=True, help="Classifier epochs.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=0, help="torch threads (0: leave torch's default).")
def digits(out, steps, epochs, seed, threads):
    """Train the 8x8 digits eps-network (linear VP, beta 0.1..20) and CNN classifier.

    Writes digits_eps.pt and digits_classifier.pt (sdepure weight files) and train.json."""
    if steps < 1 or epochs < 1:
        raise SdepureError(f"--steps and --epochs must be >= 1, got {steps} and {epochs}")
    if threads < 0:
        raise SdepureError(f"--threads must be >= 0, got {threads}")
    check_out(out)
    if threads:
        torch.set_num_threads(threads)
    make_out(out)
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("test")
    schedule = LinearVP(0.1, 20.0)
    log = click.echo

    torch.manual_seed(seed)
    classifier, cls_info = train_classifier(DigitsCNN(), x_train, y_train, epochs=epochs, seed=seed, log=log)
    with torch.no_grad():
        cls_info["test_accuracy"] = float((classifier(x_test).argmax(1) == y_test).float().mean())
    save_sdepure(out / "digits_classifier.pt", "digits-cnn", classifier, cls_info)
    log(f"classifier: test accuracy {cls_info['test_accuracy']:.4f}")

    torch.manual_seed(seed)
    net = DigitsEpsMLP(**EPS_ARCH)
    ema, eps_info = train_eps(net, schedule, x_train, steps=steps, seed=seed, **EPS_TRAINING, log=log)
    eps_info["train_eps_mse"] = eps_loss(ema, schedule, x_train, seed + 1)
    eps_info["test_eps_mse"] = eps_loss(ema, schedule, x_test, seed + 1)
    eps_info.update(schedule=schedule.describe(), training=EPS_TRAINING)
    save_sdepure(out / "digits_eps.pt", "digits-eps-mlp", ema, eps_info, dtype=torch.float16)
    log(f"eps-network: {eps_info['steps']} steps, held-out eps MSE {eps_info['test_eps_mse']}")
    with open(out / "train.json", "w") as fh:
        json.dump({"seed": seed, "classifier": cls_info, "eps": eps_info,
                   "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, fh, indent=2)
    log(f"wrote {out}/digits_eps.pt, digits_classifier.pt, train.json")


EPS_ARCH = {"width": 512, "blocks": 4, "dropout": 0.1}
EPS_TRAINING = {"batch": 256, "lr": 1e-3, "t_max": 0.5}
