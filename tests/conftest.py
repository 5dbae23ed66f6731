import pytest
import torch

from sdepure.classifiers.digits import DigitsCNN
from sdepure.loaders import save_sdepure
from sdepure.models.digits import DigitsEpsMLP
from sdepure.models.gmm import GaussianMixture, GaussianMixtureModel
from sdepure.schedules import LinearVP

# tiny networks gain nothing from threads, and spin-waiting threads make them ~100x slower
# when another job keeps the cores busy
torch.set_num_threads(1)


@pytest.fixture
def run_cli(capsys):
    """Run the sdepure command line in-process: (exit code, stdout, stderr)."""
    from sdepure_cli.main import run

    def call(*args):
        code = run(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return call


@pytest.fixture
def cli_error(run_cli):
    """Run the command line expecting a refusal: a non-zero exit and exactly one line
    'sdepure: error: ...' that contains `needle`, and no traceback. Returns that line."""
    def call(needle, *args):
        code, stdout, err = run_cli(*args)
        assert code != 0, (args, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("sdepure: error:"), (args, err)
        assert needle in err, (needle, err)
        assert "Traceback" not in stdout + err
        return err
    return call


@pytest.fixture
def gmm_model():
    """Three separated 2-D components with an exact score (float64)."""
    mixture = GaussianMixture([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]], [0.3, 0.3, 0.3],
                              weights=[0.5, 0.3, 0.2], labels=[0, 1, 2])
    return GaussianMixtureModel(mixture, LinearVP())


@pytest.fixture
def tiny(tmp_path):
    """A config pointing at tiny random digits models (fast; tests the plumbing, not accuracy)."""
    torch.manual_seed(0)
    save_sdepure(tmp_path / "eps.pt", "digits-eps-mlp", DigitsEpsMLP(width=32, blocks=1), {})
    save_sdepure(tmp_path / "cls.pt", "digits-cnn", DigitsCNN(ch=4), {})
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(f"""
[data]
dataset = "digits"
[model]
family = "digits-eps-mlp"
weights = "{tmp_path / 'eps.pt'}"
[model.schedule]
kind = "linear"
[classifier]
family = "digits-cnn"
weights = "{tmp_path / 'cls.pt'}"
[method]
name = "densepure"
sigma = 0.5
votes = 3
steps = 4
solver = "euler"
[certify]
n0 = 4
n = 12
alpha = 0.01
batch = 8
stop = 3
[attack]
method = "diffpure"
t_star = 0.1
steps = 2
n_examples = 3
batch = 3
eps = "0.1"
score_draws = 3
""")
    return cfg
