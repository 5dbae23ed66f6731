"""The shipped diffpure-imagenet config against DiffPure's ImageNet runner (NVlabs/DiffPure,
runners/diffpure_sde.py, RevVPSDE with score_type guided_diffusion), on a tiny random ADM UNet
saved in the published layout and loaded through the config.

DiffPure's reverse-SDE drift at time t (written out by hand below, in float32 as it runs):
    beta(t)      = 0.1 + t (20 - 0.1)                                  (continuous linear VP)
    alpha_bar(t) = exp(-0.5 (20 - 0.1) t^2 - 0.1 t)
    eps          = first 3 of the 6 output channels of net(x, (t.float() * 1000).long())
    score        = -eps / sqrt(1 - alpha_bar(t))
    drift        = 1/2 beta x + beta score     (the reverse drift, in reversed time s = 1 - t)
sdepure's ReverseVPSDE.f(k, y) returns h times this in step-index time (h = the grid spacing)."""
import re
from pathlib import Path

import pytest
import torch

from sdepure.config import load_config
from sdepure.errors import SdepureError
from sdepure.models import build_score_model
from sdepure.models.adm import ADMUNet, adm_config, adm_eps_model
from sdepure.models.base import TIME_INPUTS
from sdepure.schedules import LinearVP
from sdepure.sde import ReverseVPSDE, time_grid

SIZE = 16
TINY_ARCH = dict(image_size=SIZE, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                 attention_resolutions=(8,), num_head_channels=16)
ARCH_TOML = """
[model.arch]
image_size = 16
model_channels = 32
num_res_blocks = 1
channel_mult = [1, 2]
attention_resolutions = [8]
num_head_channels = 16
"""


def tiny_guided_checkpoint(path):
    """A flat fp32 state dict as 256x256_diffusion_uncond.pt stores it, every weight random (the
    default init zeroes the output layer, and then eps would not depend on the time input)."""
    net = ADMUNet(**dict(adm_config("guided-256-uncond"), **TINY_ARCH))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    torch.save(net.state_dict(), path)
    return net.eval()


def shipped_model(tmp_path, monkeypatch):
    """The [model] table of the shipped config, as the config loader reads it, with [model.arch]
    shrinking the network and the weights variable pointing at the tiny checkpoint."""
    net = tiny_guided_checkpoint(tmp_path / "256x256_diffusion_uncond.pt")
    shipped = Path(load_config("diffpure-imagenet")["source"])
    (tmp_path / "cfg.toml").write_text(shipped.read_text() + ARCH_TOML)
    cfg = load_config(str(tmp_path / "cfg.toml"))
    monkeypatch.setenv("SDEPURE_GUIDED_256", str(tmp_path / "256x256_diffusion_uncond.pt"))
    return cfg, build_score_model(cfg["model"]), net


def diffpure_drift(net, x, t: float) -> torch.Tensor:
    """DiffPure's reverse drift at physical time t (float32, as RevVPSDE computes it)."""
    tt = torch.full((x.shape[0],), t).float()
    beta = 0.1 + tt * (20 - 0.1)
    alpha_bar = torch.exp(-0.5 * (20 - 0.1) * tt ** 2 - 0.1 * tt)
    with torch.no_grad():
        eps = net(x, (tt.float() * 1000).long())[:, :3]
    score = -eps / torch.sqrt(1.0 - alpha_bar)[:, None, None, None]
    b = beta[:, None, None, None]
    return 0.5 * b * x + b * score


def test_diffpure_imagenet_drift_is_diffpures(tmp_path, monkeypatch):
    cfg, model, net = shipped_model(tmp_path, monkeypatch)
    t_star, steps = cfg["attack"]["t_star"], cfg["attack"]["steps"]
    assert (t_star, steps) == (0.15, 150)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1
    grid = time_grid(t_star, 0.0, steps)
    sde = ReverseVPSDE(model, grid, x.shape)
    h = float(grid[0] - grid[1])
    errors = {}
    # t* itself; k = 37, where the float64 grid time 0.11299999999999999 floors to 112 but its
    # float32 value to 113, as in DiffPure; the last steps (t = 0.002, 0.001); and half steps
    # (t = 0.1495, 0.0755: midpoint-type solvers and other step counts reach times between the
    # multiples of 1e-3, where the floor matters: an unfloored 1000 t is some 3% off there)
    for k in (0, 0.5, 1, 37, 74.5, 75, 120, 148, 149):
        t = sde.physical_time(k)
        with torch.no_grad():
            ours = sde.f(float(k), x.reshape(2, -1)).reshape(x.shape)
        ref = h * diffpure_drift(net, x, t)
        errors[round(t, 6)] = float((ours - ref).abs().max() / ref.abs().max())
    assert max(errors.values()) < 1e-6, f"relative drift difference by t: {errors}"


def test_floor_time_input_is_taken_on_float32_t():
    floor = TIME_INPUTS["floor(1000t)"]
    s = LinearVP(0.1, 20.0)
    # 0.15 - 1e-12 is 149.999999999 * 1e-3 in float64, but rounds to float32 0.15000001: 150, as
    # DiffPure's (t.float() * 1000).long() gives
    t = torch.tensor([0.15 - 1e-12, 0.1499, 0.0015, 0.001, 0.0], dtype=torch.float64)
    assert floor(t, s).tolist() == [150.0, 149.0, 1.0, 1.0, 0.0]
    assert floor(t, s).tolist() == (t.float() * 1000).long().tolist()


def test_adm_model_table_overrides_are_checked(tmp_path):
    net = tiny_guided_checkpoint(tmp_path / "w.pt")
    base = {"family": "adm", "preset": "guided-256-uncond", "weights": str(tmp_path / "w.pt"),
            "arch": dict(TINY_ARCH)}
    model = build_score_model(dict(base, schedule={"kind": "linear", "beta_min": 0.1, "beta_max": 20.0},
                                   time_input="floor(1000t)"))
    assert isinstance(model.schedule, LinearVP) and model.time_input == "floor(1000t)" and model.learned_sigma
    assert model.t_min == 1e-3
    # without overrides the preset's own diffusion is used, as before
    plain = build_score_model(base)
    assert plain.time_input == "index" and plain.schedule.describe() == {"kind": "linear", "T": 1000}
    assert adm_eps_model(net, "guided-256-uncond", schedule={"kind": "linear"},
                         time_input="floor(1000t)").time_input == "floor(1000t)"
    for extra, message in [({"time_input": "floor(t)"}, "unknown time input 'floor(t)'"),
                           ({"schedule": {"kind": "cosine"}}, "unknown schedule kind 'cosine'"),
                           ({"schedule": "linear"}, "model.schedule must be a table"),
                           ({"time_input": 3}, "model.time_input must be"),
                           ({"schedule": {"kind": "linear"}}, "needs a discrete (table) schedule")]:
        with pytest.raises(SdepureError, match=re.escape(message)) as info:
            build_score_model(dict(base, **extra))
        assert "\n" not in str(info.value)
