"""Small models shared by the tests (pytest puts this folder on sys.path)."""
import math

import torch
from torch import nn

from sdepure.attacks import AttackedModel
from sdepure.defense import Defense
from sdepure.models.gmm import GaussianMixture, GaussianMixtureModel
from sdepure.schedules import LinearVP
from sdepure.settings import Purifier

MEANS = [[0.6, 0.0], [-0.6, 0.0], [0.0, 0.6]]


class NearestMean(nn.Module):
    """Classifier on [0, 1] inputs: minus the squared distance to each mean (in model space)."""

    def __init__(self, means):
        super().__init__()
        self.means = nn.Parameter(torch.as_tensor(means, dtype=torch.float64))

    def forward(self, x01):
        return -torch.cdist(2 * x01 - 1, self.means.to(x01)) ** 2


def attacked(method, classifier, num_classes, model=None, t_star=None, steps=10, solver="euler", grad="exact",
             votes=1, seed=0, draws=None, **settings):
    """An AttackedModel over the Defense these settings describe."""
    p = Purifier(method, t_star=t_star, steps=steps, solver=solver, grad=grad, votes=votes, **settings)
    return AttackedModel(Defense(p, model, classifier, num_classes, draws=draws), seed)


def single_gaussian_pf_case():
    """N(mu, s^2 I) at t = 0.3 and its exact probability-flow map to t = 0, which is affine:
    x0 = mu + s / sqrt(v_t) (x_t - sqrt(a) mu). Returns (model, t, x_t, exact x0)."""
    mu, s = torch.tensor([[0.5, -0.3]], dtype=torch.float64), 0.2
    model = GaussianMixtureModel(GaussianMixture(mu, [s]), LinearVP())
    t = 0.3
    a = float(model.schedule.alpha_bar(t))
    x_t = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return model, t, x_t, mu + s / math.sqrt(a * s * s + 1 - a) * (x_t - math.sqrt(a) * mu)


def kill_9_after(command: list[str], watch, lines: int) -> int:
    """Run `python -m sdepure_cli COMMAND...` (one OpenMP thread) and SIGKILL it as soon as the
    file `watch` holds `lines` newlines (a header and whole rows); returns the exit code."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "sdepure_cli", *command], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 300  # a loaded 2-core machine can take long to import torch
        while time.time() < deadline and proc.poll() is None:
            if watch.exists() and watch.read_bytes().count(b"\n") >= lines:
                break
            time.sleep(0.005)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    return proc.returncode
