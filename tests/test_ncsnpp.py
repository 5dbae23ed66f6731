"""score_sde NCSN++/DDPM++ loader: tiny models saved in the published checkpoint layout."""
import math

import pytest
import torch

from sdepure.errors import SdepureError
from sdepure.models.base import EpsNetModel
from sdepure.models.ncsnpp import NCSNpp, load_score_sde, ncsnpp_config, positional_embedding
from sdepure.schedules import LinearVP

# the DDPM++ flags of the published models, shrunk
TINY = dict(ncsnpp_config("ddpmpp-deep-continuous"), nf=16, ch_mult=(1, 2), num_res_blocks=1,
            image_size=8, attn_resolutions=(4,))




def _randomize(net, seed, scale=0.1):
    # published init_scale 0 makes the output conv ~1e-10; random weights make outputs informative
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net


def _published_checkpoint(net, shadow):
    """The dict score_sde's save_checkpoint writes for nn.DataParallel(net)."""
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    net(x, torch.tensor([10.0, 500.0])).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return {"optimizer": opt.state_dict(),
            "model": {"module." + k: v.clone() for k, v in net.state_dict().items()},
            "ema": {"decay": 0.9999, "num_updates": 1234, "shadow_params": [s.clone() for s in shadow]},
            "step": 1234}


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    net = _randomize(NCSNpp(**TINY), seed=1)
    ema_ref = _randomize(NCSNpp(**TINY), seed=2)  # EMA weights differ from the raw ones
    shadow = [p.detach() for p in ema_ref.parameters() if p.requires_grad]
    ckpt = _published_checkpoint(net, shadow)
    path = tmp_path / "checkpoint_8.pth"
    torch.save(ckpt, path)
    return path, ckpt, net.eval(), ema_ref.eval()


def test_tiny_checkpoint_loads_ema_weights(tiny_ckpt):
    path, ckpt, raw, ema_ref = tiny_ckpt
    # the whole published dict (Adam state, EMA dict, int step) reads with weights_only=True
    loaded = torch.load(path, weights_only=True)
    assert set(loaded) == {"optimizer", "model", "ema", "step"}
    assert any(k == "module.sigmas" for k in loaded["model"])

    net = load_score_sde(path, TINY)
    assert not net.training
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    labels = 999 * torch.tensor([0.02, 0.5, 1.0])
    with torch.no_grad():
        out, want, raw_out = net(x, labels), ema_ref(x, labels), raw(x, labels)
    assert torch.equal(out, want)
    assert not torch.allclose(out, raw_out)  # the raw 'model' weights were replaced by the EMA
    assert torch.equal(net.sigmas, raw.sigmas)


def test_published_calling_convention(tiny_ckpt):
    """score_sde get_score_fn for continuous VP: labels = 999 t, score = -out / std(t)."""
    path, _, _, ema_ref = tiny_ckpt
    model = EpsNetModel(load_score_sde(path, TINY), LinearVP(0.1, 20.0), time_input="999t")
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    t = torch.tensor([0.1, 0.7])
    log_mean = -0.25 * t ** 2 * (20.0 - 0.1) - 0.5 * t * 0.1
    std = torch.sqrt(1 - torch.exp(2 * log_mean))
    with torch.no_grad():
        want = -ema_ref(x, 999 * t) / std[:, None, None, None]
        got = model.score(x, t)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_positional_embedding_form():
    labels = torch.tensor([0.0, 3.0, 999.0])
    emb = positional_embedding(labels, 16)
    freqs = torch.tensor([10000.0 ** (-i / 7) for i in range(8)], dtype=torch.float64)  # dim/2 - 1 = 7
    arg = labels.double()[:, None] * freqs
    want = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1).float()
    assert torch.allclose(emb, want, atol=2e-4)  # float32 phase error at label 999


def test_key_mismatch_names_keys_and_family(tiny_ckpt, tmp_path):
    _, ckpt, _, _ = tiny_ckpt
    ckpt["model"]["module.all_modules.3.Conv_9.weight"] = ckpt["model"].pop("module.all_modules.3.Conv_0.weight")
    bad = tmp_path / "bad.pth"
    torch.save(ckpt, bad)
    with pytest.raises(SdepureError, match=r"family score_sde-ncsnpp.*missing keys: all_modules\.3\.Conv_0\.weight"
                       r".*unexpected keys: all_modules\.3\.Conv_9\.weight"):
        load_score_sde(bad, TINY)


def test_wrong_preset_is_a_shape_error(tiny_ckpt):
    path, _, _, _ = tiny_ckpt
    with pytest.raises(SdepureError, match="score_sde-ncsnpp"):
        load_score_sde(path, dict(TINY, nf=32))


def test_wrong_number_of_shadow_params(tiny_ckpt, tmp_path):
    _, ckpt, _, _ = tiny_ckpt
    n = len(ckpt["ema"]["shadow_params"])
    ckpt["ema"]["shadow_params"] = ckpt["ema"]["shadow_params"][:-1]
    bad = tmp_path / "short.pth"
    torch.save(ckpt, bad)
    with pytest.raises(SdepureError, match=rf"EMA has {n - 1} shadow params, family score_sde-ncsnpp has {n}"):
        load_score_sde(bad, TINY)


def test_misaligned_shadow_params(tiny_ckpt, tmp_path):
    _, ckpt, _, _ = tiny_ckpt
    shadow = ckpt["ema"]["shadow_params"]
    shadow[2], shadow[3] = shadow[3], shadow[2]  # conv_in weight and bias swapped
    bad = tmp_path / "swapped.pth"
    torch.save(ckpt, bad)
    with pytest.raises(SdepureError, match=r"shadow param 2 has shape .* for all_modules\.1\.weight"):
        load_score_sde(bad, TINY)


def test_not_a_score_sde_checkpoint(tmp_path):
    p = tmp_path / "plain.pth"
    torch.save({"state_dict": {}}, p)
    with pytest.raises(SdepureError, match="not a score_sde checkpoint"):
        load_score_sde(p, TINY)
    with pytest.raises(SdepureError, match="unknown NCSN\\+\\+ preset"):
        load_score_sde(p, "ddpm++")


@pytest.mark.parametrize("name,n_params,n_keys,n_modules", [
    ("ddpmpp-deep-continuous", 106_632_579, 957, 91),
    ("ddpmpp-continuous", 61_804_419, 565, 55),
])
def test_real_presets_on_meta(name, n_params, n_keys, n_modules):
    with torch.device("meta"):
        net = NCSNpp(**ncsnpp_config(name))
    assert sum(p.numel() for p in net.parameters()) == n_params
    sd = net.state_dict()
    assert len(sd) == n_keys and len(net.all_modules) == n_modules
    assert len([p for p in net.parameters() if p.requires_grad]) == n_keys - 1  # all but sigmas
    shapes = {
        "sigmas": (1000,),
        "all_modules.0.weight": (512, 128),          # temb Linear(nf, 4 nf)
        "all_modules.1.weight": (512, 512),
        "all_modules.2.weight": (128, 3, 3, 3),      # input conv
        "all_modules.3.GroupNorm_0.weight": (128,),
        "all_modules.3.Dense_0.weight": (128, 512),
        "all_modules.3.Conv_1.weight": (128, 128, 3, 3),
        f"all_modules.{n_modules - 2}.weight": (128,),           # output GroupNorm
        f"all_modules.{n_modules - 1}.weight": (3, 128, 3, 3),   # output conv
    }
    r = ncsnpp_config(name)["num_res_blocks"]
    shapes.update({
        f"all_modules.{3 + r}.Conv_2.weight": (128, 128, 1, 1),   # BigGAN downsampling block
        f"all_modules.{4 + r}.Conv_2.weight": (256, 128, 1, 1),   # first 16x16 block, 128 -> 256
        f"all_modules.{5 + r}.NIN_0.W": (256, 256),               # its attention
        f"all_modules.{5 + r}.NIN_3.b": (256,),
    })
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("module.") for k in sd)


@pytest.mark.parametrize("flags", [
    dict(fir=True, progressive_input="residual"),                      # NCSN++ (VP) flags
    dict(fir=True, progressive="output_skip", progressive_input="input_skip", embedding_type="fourier",
         scale_by_sigma=True),                                           # NCSN++ (VE) flags
    dict(resblock_type="ddpm", progressive="residual", progressive_combine="cat",
         progressive_input="input_skip", centered=False, conditional=False),
])
def test_other_flag_combinations_run(flags):
    net = _randomize(NCSNpp(**dict(TINY, **flags)), seed=3).eval()
    labels = torch.tensor([0.5, 20.0]) if flags.get("embedding_type") == "fourier" else torch.tensor([1.0, 900.0])
    with torch.no_grad():
        out = net(torch.rand(2, 3, 8, 8), labels)
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_presets_are_copies():
    a = ncsnpp_config("ddpmpp-continuous")
    a["nf"] = 1
    assert ncsnpp_config("ddpmpp-continuous")["nf"] == 128
    assert ncsnpp_config("ddpmpp-continuous")["num_res_blocks"] == 4
    assert ncsnpp_config("ddpmpp-deep-continuous")["num_res_blocks"] == 8
    assert math.isclose(ncsnpp_config("ddpmpp-deep-continuous")["dropout"], 0.1)
