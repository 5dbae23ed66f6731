"""The shipped configs, run end to end through `sdepure certify` / `sdepure attack` on tiny
random models saved in the published layouts (the real checkpoints cannot be downloaded here)."""
import json
import pickle
from importlib import resources

import numpy as np
import pytest
import torch

from sdepure.classifiers.wideresnet import WideResNet
from sdepure.config import config_names, load_config
from sdepure.models.adm import ADMUNet, adm_config
from sdepure.models.ncsnpp import NCSNpp, ncsnpp_config

PUBLISHED = ["carlini-cifar10", "carlini-imagenet", "densepure-cifar10", "densepure-imagenet",
             "diffpure-cifar10-l2", "diffpure-cifar10-linf", "diffpure-imagenet", "digits"]




def shipped_text(name: str) -> str:
    return (resources.files("sdepure_configs") / f"{name}.toml").read_text()


def write_cifar(root, n=6):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]:
        entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        (d / name).write_bytes(pickle.dumps(entry, protocol=2))
    return root


def tiny_wrn(path):
    torch.manual_seed(0)
    torch.save({"state_dict": {"module." + k: v for k, v in WideResNet(depth=10, widen=1).state_dict().items()}}, path)



def test_every_published_setting_has_a_config(run_cli):
    assert sorted(config_names()) == PUBLISHED
    for name in PUBLISHED:
        cfg = load_config(name)
        assert cfg["description"] and cfg["name"] == name
    assert load_config("densepure-cifar10")["method"] == {"name": "densepure", "sigma": 0.5, "votes": 40,
                                                          "steps": 10, "solver": "ddpm", "t_rule": "nearest"}
    assert load_config("densepure-imagenet")["certify"]["n"] == 10000
    assert load_config("diffpure-cifar10-linf")["attack"]["t_star"] == 0.1
    assert load_config("diffpure-cifar10-l2")["attack"]["t_star"] == 0.075
    assert load_config("diffpure-imagenet")["attack"]["eps"] == "4/255"
    code, out, _ = run_cli("models")
    assert code == 0 and all(name in out for name in PUBLISHED)
    assert all(f in out for f in ("adm", "score-sde", "diffusers", "wideresnet", "timm", "torchvision"))


def test_unset_environment_variable_is_named(tmp_path, cli_error, monkeypatch):
    monkeypatch.delenv("SDEPURE_CIFAR10", raising=False)
    cli_error("SDEPURE_CIFAR10", "certify", "--config", "densepure-cifar10", "--out", str(tmp_path / "o"))


def _tiny_densepure_cifar10(tmp_path):
    """The shipped DensePure CIFAR-10 config on a tiny improved-diffusion UNet (flat state dict,
    learned sigma) and a tiny WideResNet; returns the certify arguments."""
    torch.manual_seed(0)
    arch = dict(adm_config("improved-cifar10-uncond"), image_size=32, model_channels=32, num_res_blocks=1,
                channel_mult=(1, 2), attention_resolutions=(16,), num_heads=2)
    torch.save(ADMUNet(**arch).state_dict(), tmp_path / "cifar10_uncond_50M_500K.pt")
    tiny_wrn(tmp_path / "wrn.pt")
    text = shipped_text("densepure-cifar10")
    start = text.index("[classifier]")
    text = text[:start] + f'''[classifier]
family = "wideresnet"
depth = 10
widen = 1
weights = "{tmp_path / 'wrn.pt'}"

''' + text[text.index("[method]"):] + '''
[model.arch]
model_channels = 32
num_res_blocks = 1
channel_mult = [1, 2]
attention_resolutions = [16]
num_heads = 2
'''
    (tmp_path / "cfg.toml").write_text(text)
    write_cifar(tmp_path / "data")
    return ["--config", str(tmp_path / "cfg.toml"), "--model-weights", str(tmp_path / "cifar10_uncond_50M_500K.pt"),
            "--data-root", str(tmp_path / "data"), "--votes", "2", "--n0", "2", "--n", "4", "--batch", "4",
            "--stop", "2", "--skip", "1"]


def test_densepure_cifar10_config_with_tiny_improved_diffusion(tmp_path, run_cli):
    """The shipped DensePure CIFAR-10 settings on a tiny improved-diffusion UNet (flat state dict)
    and a tiny WideResNet (wrapped, prefixed), through --model-weights / --data-root; its ddpm
    steps use the checkpoint's learned variance, as DensePure ran it, and the run records that."""
    out = tmp_path / "run"
    code, stdout, err = run_cli("certify", *_tiny_densepure_cifar10(tmp_path), "--out", str(out))
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["purifier"]["solver"] == "ddpm" and summary["images"] == 2
    # sigma 0.5 on the cosine T=4000 table, nearest rule: index 1983 -> t = 1984 / 4000
    assert summary["t_star"] == pytest.approx(1984 / 4000)
    assert summary["settings"]["purifier"]["variance"] == "auto" and summary["resolved"]["variance"] == "learned"
    assert json.loads((out / "run.json").read_text())["resolved"] == {"variance": "learned"}
    assert "learned ddpm variance" in stdout


def test_a_record_from_before_learned_variance_resumes_with_the_posterior_variance(tmp_path, run_cli):
    """run.json written before variance (and rng, early_stop, the resolved meaning) existed: the
    run resumes as it ran, with the posterior variance, not the learned one auto now means."""
    args = _tiny_densepure_cifar10(tmp_path)
    run = tmp_path / "run"
    code, _, err = run_cli("certify", *args, "--out", str(run))
    assert code == 0, err
    record = json.loads((run / "run.json").read_text())
    for key in ("variance", "rng", "early_stop"):
        del record["settings"]["purifier"][key]
    del record["resolved"]
    (run / "run.json").write_text(json.dumps(record))
    lines = (run / "certify.tsv").read_text().splitlines(keepends=True)
    (run / "certify.tsv").write_text("".join(lines[:2]))  # the second image to redo
    code, stdout, err = run_cli("certify", "--resume", str(run), "--model-weights", args[3], "--data-root", args[5])
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["resolved"]["variance"] == "posterior"
    assert "learned" not in stdout


def test_diffpure_cifar10_config_with_tiny_score_sde(tmp_path, run_cli):
    """The shipped DiffPure settings on a tiny DDPM++ checkpoint in score_sde's layout (EMA list)."""
    torch.manual_seed(0)
    arch = dict(ncsnpp_config("ddpmpp-deep-continuous"), nf=16, ch_mult=(1, 2), num_res_blocks=1,
                image_size=32, attn_resolutions=(16,))
    net = NCSNpp(**arch)
    torch.save({"model": {"module." + k: v for k, v in net.state_dict().items()},
                "ema": {"decay": 0.9999, "num_updates": 1,
                        "shadow_params": [p.detach().clone() for p in net.parameters() if p.requires_grad]},
                "optimizer": torch.optim.Adam(net.parameters()).state_dict(), "step": 1}, tmp_path / "ckpt.pth")
    tiny_wrn(tmp_path / "wrn.pt")
    text = shipped_text("diffpure-cifar10-linf").replace("depth = 28", "depth = 10").replace("widen = 10", "widen = 1")
    text += "\n[model.arch]\nnf = 16\nch_mult = [1, 2]\nnum_res_blocks = 1\nattn_resolutions = [16]\n"
    (tmp_path / "cfg.toml").write_text(text)
    write_cifar(tmp_path / "data")
    out = tmp_path / "run"
    code, stdout, err = run_cli("attack", "--pgd", "--config", str(tmp_path / "cfg.toml"),
                                "--model-weights", str(tmp_path / "ckpt.pth"),
                                "--classifier-weights", str(tmp_path / "wrn.pt"), "--data-root", str(tmp_path / "data"),
                                "--n-examples", "2", "--steps", "2", "--pgd-steps", "1", "--eot", "1",
                                "--score-draws", "2", "--out", str(out))
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["purifier"]["grad"] == "adjoint" and summary["settings"]["eps"] == pytest.approx(8 / 255)
    assert summary["max_perturbation"]["Linf"] <= 8 / 255 + 1e-6


class Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_pickle_that_runs_code_is_refused(tmp_path, cli_error):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": Evil(marker)}, tmp_path / "evil.pt")
    for args in (["--model-weights", str(tmp_path / "evil.pt")], ["--classifier-weights", str(tmp_path / "evil.pt")]):
        cli_error("refused to unpickle", "certify", *args, "--out", str(tmp_path / "o"))
    assert not marker.exists() and not (tmp_path / "o").exists()
