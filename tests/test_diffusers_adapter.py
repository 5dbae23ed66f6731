"""diffusers UNet2DModel adapter: tiny random UNets saved with save_pretrained, loaded offline."""
import json
import shutil
import socket
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

from sdepure.errors import SdepureError  # noqa: E402
from sdepure.models.base import EpsNetModel  # noqa: E402
from sdepure.models.diffusers_adapter import load_diffusers, schedule_from_scheduler_config  # noqa: E402
from sdepure.schedules import DiscreteVP  # noqa: E402




@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def tiny_unet(out_channels: int = 3, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=out_channels, block_out_channels=(16, 32),
                       layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every parameter random, so each one affects the output
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return unet.eval()


def save_pipeline(tmp_path, unet=None, safe=True, **sched):
    unet = tiny_unet() if unet is None else unet
    scheduler = DDPMScheduler(**sched)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path, safe_serialization=safe)
    return unet, scheduler


def x_batch(n: int = 3):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_pipeline_layout_eps_matches_unet_at_table_times(tmp_path, no_network):
    unet, _ = save_pipeline(tmp_path)
    model = load_diffusers(tmp_path)
    assert isinstance(model, EpsNetModel) and model.time_input == "index" and not model.learned_sigma
    assert isinstance(model.schedule, DiscreteVP) and model.schedule.T == 1000
    x, idx = x_batch(), torch.tensor([0, 417, 999])
    with torch.no_grad():
        ours = model.eps(x, model.schedule.time_of_index(idx).float())
        ref = unet(x, idx).sample
        # between table points the UNet gets the fractional index
        mid = model.eps(x[:2], model.schedule.time_of_index(idx[:2] + 0.5).float())
        ref_mid = unet(x[:2], idx[:2] + 0.5).sample
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(mid, ref_mid, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sched", [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="sigmoid", num_train_timesteps=200),
    dict(trained_betas=torch.linspace(1e-3, 0.05, 50).tolist(), num_train_timesteps=50),
])
def test_alpha_bar_table_equals_scheduler(sched):
    scheduler = DDPMScheduler(**sched)
    table, pred = schedule_from_scheduler_config(dict(scheduler.config))
    ref = scheduler.alphas_cumprod.double()
    assert pred == "epsilon" and table.T == len(ref)
    # diffusers accumulates in float32; the cosine tail (alpha_bar ~ 1e-8) drifts most
    torch.testing.assert_close(table.alpha_bars, ref, rtol=3e-5, atol=0)


def test_alpha_bar_table_of_loaded_cosine_model(tmp_path):
    _, scheduler = save_pipeline(tmp_path, beta_schedule="squaredcos_cap_v2", num_train_timesteps=100)
    model = load_diffusers(tmp_path)
    torch.testing.assert_close(model.schedule.alpha_bars, scheduler.alphas_cumprod.double(), rtol=3e-5, atol=0)


def test_missing_keys_default_to_the_scheduler_class_defaults():
    table, _ = schedule_from_scheduler_config({"_class_name": "HeunDiscreteScheduler", "num_train_timesteps": 10})
    # HeunDiscreteScheduler's own defaults, not DDPMScheduler's 1e-4 / 0.02
    ref = DDPMScheduler(num_train_timesteps=10, beta_start=0.00085, beta_end=0.012).alphas_cumprod.double()
    torch.testing.assert_close(table.alpha_bars, ref, rtol=1e-5, atol=0)


def test_bare_unet_layout(tmp_path, no_network):
    unet, scheduler = save_pipeline(tmp_path / "pipe")
    x, idx = x_batch(2), torch.tensor([3, 900])
    with torch.no_grad():
        ref = unet(x, idx).sample

    def check(model):
        with torch.no_grad():
            torch.testing.assert_close(model.eps(x, model.schedule.time_of_index(idx).float()), ref, rtol=0, atol=1e-6)

    check(load_diffusers(tmp_path / "pipe" / "unet"))  # finds ../scheduler/
    bare = tmp_path / "bare"
    unet.save_pretrained(bare)
    with pytest.raises(SdepureError, match="no scheduler config"):
        load_diffusers(bare)
    check(load_diffusers(bare, scheduler=tmp_path / "pipe" / "scheduler"))
    check(load_diffusers(bare, scheduler=dict(scheduler.config)))
    scheduler.save_pretrained(bare)  # scheduler_config.json next to config.json
    check(load_diffusers(bare))
    check(load_diffusers(tmp_path / "pipe", subfolder="unet"))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("learned", [False, True])
def test_x0_matches_diffusers_step(tmp_path, prediction_type, learned):
    """x0 from our eps equals DDPMScheduler.step's pred_original_sample for every prediction type."""
    unet, scheduler = save_pipeline(tmp_path, unet=tiny_unet(6 if learned else 3), clip_sample=False,
                                    prediction_type=prediction_type,
                                    variance_type="learned_range" if learned else "fixed_small")
    model = load_diffusers(tmp_path)
    assert model.learned_sigma == learned
    x = x_batch(1)
    for i in (5, 600):
        with torch.no_grad():
            out = unet(x, torch.tensor([i])).sample
            ref = scheduler.step(out, i, x, generator=torch.Generator().manual_seed(0)).pred_original_sample
            ours = model.x0(x, model.schedule.time_of_index(torch.tensor([i])).float())
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_pickled_bin_refused_unless_allowed(tmp_path, no_network):
    unet, _ = save_pipeline(tmp_path, safe=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert not (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    with pytest.raises(SdepureError, match="refused to unpickle"):
        load_diffusers(tmp_path)
    model = load_diffusers(tmp_path, allow_pickle=True)
    x, idx = x_batch(1), torch.tensor([10])
    with torch.no_grad():
        torch.testing.assert_close(model.eps(x, model.schedule.time_of_index(idx).float()), unet(x, idx).sample)


def test_safetensors_preferred_over_bin(tmp_path):
    save_pipeline(tmp_path, unet=tiny_unet(seed=1), safe=False)
    unet, _ = save_pipeline(tmp_path, unet=tiny_unet(seed=2))  # now both files, different weights
    model = load_diffusers(tmp_path, allow_pickle=True)
    x, idx = x_batch(1), torch.tensor([10])
    with torch.no_grad():
        torch.testing.assert_close(model.eps(x, model.schedule.time_of_index(idx).float()), unet(x, idx).sample)


def edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("target,changes,message", [
    ("scheduler/scheduler_config.json", dict(prediction_type="flow_prediction"), "prediction_type"),
    ("scheduler/scheduler_config.json", dict(beta_schedule="laplace"), "beta_schedule 'laplace'"),
    ("scheduler/scheduler_config.json", dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    ("scheduler/scheduler_config.json", dict(_class_name="ScoreSdeVeScheduler"), "ScoreSdeVeScheduler"),
    ("scheduler/scheduler_config.json", dict(trained_betas=[0.1, 0.0]), "strictly decreasing"),
    ("unet/config.json", dict(time_embedding_type="fourier"), "time_embedding_type"),
    ("unet/config.json", dict(num_class_embeds=10), "class-conditional"),
    ("unet/config.json", dict(_class_name="UNet2DConditionModel"), "only UNet2DModel"),
])
def test_unsupported_configs(tmp_path, target, changes, message):
    save_pipeline(tmp_path)
    edit_json(tmp_path / target, **changes)
    with pytest.raises(SdepureError, match=message):
        load_diffusers(tmp_path)


def test_missing_paths(tmp_path):
    with pytest.raises(SdepureError, match="directory not found"):
        load_diffusers(tmp_path / "nope")
    with pytest.raises(SdepureError, match="neither a diffusers pipeline"):
        load_diffusers(tmp_path)
    save_pipeline(tmp_path)
    shutil.rmtree(tmp_path / "scheduler")
    with pytest.raises(SdepureError, match="no scheduler config"):
        load_diffusers(tmp_path)
    with pytest.raises(SdepureError, match="scheduler config not found"):
        load_diffusers(tmp_path, scheduler=tmp_path / "elsewhere.json")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(SdepureError, match="no weights"):
        load_diffusers(tmp_path, scheduler={"beta_schedule": "linear"})


def test_corrupt_and_mismatched_weights(tmp_path):
    from safetensors.torch import load_file, save_file
    save_pipeline(tmp_path)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state.pop(next(iter(state)))
    save_file(state, weights)
    with pytest.raises(SdepureError, match="missing keys"):
        load_diffusers(tmp_path)
    weights.write_bytes(b"\x00" * 100)
    with pytest.raises(SdepureError, match="cannot load UNet weights"):
        load_diffusers(tmp_path)


def test_without_diffusers_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(SdepureError, match=r"pip install 'sdepure\[diffusers\]'"):
        load_diffusers(tmp_path)
