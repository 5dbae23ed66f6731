"""Small models shared by the tests (pytest puts this folder on sys.path)."""
import torch
from torch import nn

from sdepure.attacks import AttackedModel
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
             votes=1, seed=0):
    return AttackedModel(Purifier(method, t_star=t_star, steps=steps, solver=solver, grad=grad, votes=votes),
                         classifier, num_classes, model, seed)
