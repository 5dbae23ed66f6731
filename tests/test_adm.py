"""ADM UNet (guided-diffusion / improved-diffusion): published key layout, strict loading, eps adapter.

Full-size models are only built on the meta device; everything run on CPU is tiny."""
import pytest
import torch

from sdepure.errors import SdepureError
from sdepure.models.adm import ADM_DIFFUSION, ADMUNet, adm_config, adm_eps_model, load_adm, timestep_embedding

PRESETS = ("guided-256-uncond", "improved-cifar10-uncond")




def tiny_config(preset: str) -> dict:
    """The preset's structure flags at 16 px, width 32, one res block, attention at 8 px."""
    cfg = dict(adm_config(preset), image_size=16, model_channels=32, num_res_blocks=1,
               channel_mult=(1, 2), attention_resolutions=(8,))
    if cfg["num_head_channels"] != -1:
        cfg["num_head_channels"] = 16  # 64 channels at 8 px -> 4 heads
    else:
        cfg["num_heads"] = 2
    return cfg


def randomized(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (the default init leaves norms at 1/0), so each one affects the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def fixed_input(channels: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, channels, size, size, generator=g) * 2 - 1
    return x, torch.tensor([7.0, 812.5])


def save_flat(net: torch.nn.Module, path):
    """The published layout: a flat {name: fp32 tensor} dict written by torch.save."""
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    torch.save(state, path)
    return state


@pytest.mark.parametrize("preset", PRESETS)
def test_tiny_checkpoint_round_trip_is_exact(preset, tmp_path):
    ref = randomized(ADMUNet(**tiny_config(preset)))
    path = tmp_path / "tiny.pt"
    state = save_flat(ref, path)
    assert all(torch.is_tensor(v) and v.dtype == torch.float32 for v in state.values())
    assert {"input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight", "middle_block.1.qkv.weight"} <= set(state)
    net = load_adm(path, tiny_config(preset))
    assert not net.training  # dropout (0.3 for CIFAR-10) must be off
    x, t = fixed_input()
    with torch.no_grad():
        out_ref, out = ref(x, t), net(x, t)
    assert out.shape == (2, 6, 16, 16)
    assert torch.equal(out, out_ref)
    assert out.abs().max() > 0 and not torch.equal(out[0], out[1])


def test_tiny_structures_differ_where_the_repositories_do():
    guided = ADMUNet(**tiny_config("guided-256-uncond")).state_dict()
    improved = ADMUNet(**tiny_config("improved-cifar10-uncond")).state_dict()
    # guided: resblock_updown (down/up by parameter-free resampling inside a ResBlock)
    assert "input_blocks.2.0.in_layers.2.weight" in guided and "input_blocks.2.0.op.weight" not in guided
    assert "output_blocks.1.2.in_layers.2.weight" in guided
    # improved: strided conv Downsample (`op`) and Upsample (`conv`)
    assert "input_blocks.2.0.op.weight" in improved and "output_blocks.1.2.conv.weight" in improved
    # same attention keys in both
    for sd in (guided, improved):
        assert {"input_blocks.3.1.norm.weight", "input_blocks.3.1.qkv.weight", "input_blocks.3.1.proj_out.weight"} <= set(sd)


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module-prefix"])
def test_wrapped_and_prefixed_checkpoints_load(wrap, tmp_path):
    cfg = tiny_config("improved-cifar10-uncond")
    ref = randomized(ADMUNet(**cfg))
    state = ref.state_dict()
    if wrap == "module-prefix":
        payload = {"module." + k: v for k, v in state.items()}
    else:
        payload = {wrap: state, "step": torch.tensor(5)}
    torch.save(payload, tmp_path / "w.pt")
    net = load_adm(tmp_path / "w.pt", cfg)
    x, t = fixed_input()
    with torch.no_grad():
        assert torch.equal(net(x, t), ref(x, t))


def test_fp16_file_loads_into_fp32_model(tmp_path):
    cfg = tiny_config("guided-256-uncond")
    ref = randomized(ADMUNet(**cfg))
    torch.save({k: v.half() for k, v in ref.state_dict().items()}, tmp_path / "h.pt")
    net = load_adm(tmp_path / "h.pt", cfg)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    x, t = fixed_input()
    with torch.no_grad():
        assert torch.allclose(net(x, t), ref(x, t), atol=5e-2)


def test_renamed_key_is_named_in_the_error(tmp_path):
    cfg = tiny_config("guided-256-uncond")
    state = ADMUNet(**cfg).state_dict()
    state["middle_block.1.qkv_renamed.weight"] = state.pop("middle_block.1.qkv.weight")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(SdepureError) as e:
        load_adm(tmp_path / "bad.pt", cfg)
    msg = str(e.value)
    assert "missing keys: middle_block.1.qkv.weight" in msg
    assert "unexpected keys: middle_block.1.qkv_renamed.weight" in msg


def test_wrong_variant_checkpoint_is_rejected(tmp_path):
    # a guided (resblock_updown) file read as an improved-diffusion model
    torch.save(ADMUNet(**tiny_config("guided-256-uncond")).state_dict(), tmp_path / "g.pt")
    with pytest.raises(SdepureError, match="input_blocks.2.0.op.weight"):
        load_adm(tmp_path / "g.pt", tiny_config("improved-cifar10-uncond"))


def test_wrong_width_is_rejected_with_shape(tmp_path):
    torch.save(ADMUNet(**tiny_config("improved-cifar10-uncond")).state_dict(), tmp_path / "i.pt")
    with pytest.raises(SdepureError, match=r"has shape"):
        load_adm(tmp_path / "i.pt", dict(tiny_config("improved-cifar10-uncond"), model_channels=64))


def test_non_state_dict_file_is_rejected(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    with pytest.raises(SdepureError, match="state dict"):
        load_adm(tmp_path / "t.pt", tiny_config("improved-cifar10-uncond"))


def test_unknown_preset_and_improved_only_flags():
    with pytest.raises(SdepureError, match="unknown ADM preset"):
        adm_config("guided-512")
    with pytest.raises(SdepureError, match="resblock_updown"):
        ADMUNet(**dict(tiny_config("improved-cifar10-uncond"), resblock_updown=True))


@pytest.mark.parametrize("preset", PRESETS)
def test_learned_sigma_output_and_eps_adapter(preset):
    cfg = tiny_config(preset)
    net = randomized(ADMUNet(**cfg))
    x, _ = fixed_input()
    with torch.no_grad():
        out = net(x, torch.tensor([0.0, 999.0]))
        assert out.shape[1] == 2 * x.shape[1]
        # without learned sigma: C channels
        assert ADMUNet(**dict(cfg, out_channels=3))(x, torch.tensor([1.0, 2.0])).shape == x.shape
        model = adm_eps_model(net, preset)
        t = torch.tensor([0.3, 0.3])
        eps = model.eps(x, t)
        T = ADM_DIFFUSION[preset]["schedule"]["T"]
        index = 0.3 * T - 1  # sdepure places table index i at t = (i + 1) / T
        native = index * 1000.0 / T if preset.startswith("improved") else index
        assert eps.shape == x.shape
        assert torch.allclose(eps, net(x, torch.full((2,), native))[:, :3], atol=1e-6)


def test_timestep_embedding_is_cos_then_sin():
    e = timestep_embedding(torch.tensor([0.0, 10.0]), 8)
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.tensor([10000.0 ** (-i / 4) for i in range(4)])
    assert torch.allclose(e[1], torch.cat([torch.cos(10 * freqs), torch.sin(10 * freqs)]), atol=1e-6)


# Real presets, built on the meta device. Key names and shapes were checked against the model
# classes of openai/guided-diffusion and openai/improved-diffusion at the README flags.
REAL = {
    "guided-256-uncond": dict(params=552_814_086, keys=566, shapes={
        "input_blocks.0.0.weight": (256, 3, 3, 3),
        "time_embed.0.weight": (1024, 256),
        "time_embed.2.weight": (1024, 1024),
        "out.0.weight": (256,),
        "out.2.weight": (6, 256, 3, 3),
        "middle_block.0.emb_layers.1.weight": (2048, 1024),  # scale-shift norm: 2x width
        "middle_block.1.qkv.weight": (3072, 1024, 1),
        "middle_block.1.proj_out.weight": (1024, 1024, 1),
        "input_blocks.3.0.in_layers.2.weight": (256, 256, 3, 3),  # down-ResBlock
        "input_blocks.7.0.skip_connection.weight": (512, 256, 1, 1),
        "input_blocks.10.1.qkv.weight": (1536, 512, 1),  # first attention, 32 px
        "output_blocks.0.0.skip_connection.weight": (1024, 2048, 1, 1),
        "output_blocks.2.2.in_layers.2.weight": (1024, 1024, 3, 3),  # up-ResBlock
        "output_blocks.8.1.qkv.weight": (1536, 512, 1),  # last attention, 32 px
    }, absent=["input_blocks.3.0.op.weight", "output_blocks.2.2.conv.weight", "label_emb.weight",
               "output_blocks.9.1.qkv.weight"]),
    "improved-cifar10-uncond": dict(params=52_546_438, keys=446, shapes={
        "input_blocks.0.0.weight": (128, 3, 3, 3),
        "time_embed.0.weight": (512, 128),
        "time_embed.2.weight": (512, 512),
        "out.2.weight": (6, 128, 3, 3),
        "middle_block.1.qkv.weight": (768, 256, 1),
        "middle_block.1.proj_out.weight": (256, 256, 1),
        "input_blocks.4.0.op.weight": (128, 128, 3, 3),  # Downsample conv
        "input_blocks.5.0.emb_layers.1.weight": (512, 512),
        "input_blocks.5.1.qkv.weight": (768, 256, 1),  # first attention, 16 px
        "output_blocks.3.1.conv.weight": (256, 256, 3, 3),  # Upsample conv
        "output_blocks.11.2.conv.weight": (256, 256, 3, 3),
        "output_blocks.15.0.skip_connection.weight": (128, 256, 1, 1),
    }, absent=["input_blocks.4.0.in_layers.2.weight", "input_blocks.1.1.qkv.weight", "label_emb.weight"]),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_real_preset_layout_on_meta(preset):
    with torch.device("meta"):
        net = ADMUNet(**adm_config(preset))
    sd = net.state_dict()
    want = REAL[preset]
    assert sum(p.numel() for p in net.parameters()) == want["params"]
    assert len(sd) == want["keys"]
    for k, shape in want["shapes"].items():
        assert tuple(sd[k].shape) == shape, k
    for k in want["absent"]:
        assert k not in sd
    top = {k.split(".")[0] for k in sd}
    assert top == {"time_embed", "input_blocks", "middle_block", "output_blocks", "out"}
