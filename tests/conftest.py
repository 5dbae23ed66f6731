import pytest
import torch

from sdepure.models.gmm import GaussianMixture, GaussianMixtureModel
from sdepure.schedules import LinearVP

torch.set_num_threads(2)


@pytest.fixture
def gmm_model():
    """Three separated 2-D components with an exact score (float64)."""
    mixture = GaussianMixture([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]], [0.3, 0.3, 0.3],
                              weights=[0.5, 0.3, 0.2], labels=[0, 1, 2])
    return GaussianMixtureModel(mixture, LinearVP())
