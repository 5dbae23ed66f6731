"""External classifiers without timm/torchvision installed: stand-in modules with the same entry
points (timm.create_model, torchvision.models.get_model) check the adapters' logic."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdepure.classifiers.external import (IMAGENET_MEAN, IMAGENET_STD, PAPER_INPUTS, InputAdapter,
                                          load_timm_classifier, load_torchvision_classifier)
from sdepure.errors import SdepureError


class Recorder(nn.Module):
    """Returns its input unchanged and remembers it."""

    def forward(self, x):
        self.seen = x
        return x


def _tiny_net(num_classes=5, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, num_classes))
    with torch.no_grad():
        net[1].running_mean.normal_(0, 0.1)
        net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture
def fake_timm(monkeypatch):
    calls = []

    def create_model(name, pretrained=False, **kw):
        calls.append((name, pretrained, dict(kw)))
        if name != "tiny_net":
            raise RuntimeError(f"Unknown model ({name})")
        net = _tiny_net(kw.get("num_classes", 5), seed=123)  # different weights from the file's
        net.register_buffer("relative_position_index", torch.arange(3), persistent=False)
        if kw.pop("with_cfg", True):
            net.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "input_size": (3, 48, 48),
                                  "interpolation": "bicubic", "crop_pct": 1.0}
        return net

    mod = types.ModuleType("timm")
    mod.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", mod)
    return calls


@pytest.fixture
def fake_torchvision(monkeypatch):
    calls = []

    def get_model(name, weights=None, **kw):
        calls.append((name, weights, kw))
        if name != "tiny_net":
            raise ValueError(f"Unknown model {name}")
        return _tiny_net(kw.get("num_classes", 5), seed=321)

    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    models.get_model = get_model
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    return calls


def test_missing_packages_raise_with_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(SdepureError, match="timm is not installed.*pip install timm"):
        load_timm_classifier("resnet18", tmp_path / "w.pt")
    with pytest.raises(SdepureError, match="torchvision is not installed.*pip install torchvision"):
        load_torchvision_classifier("resnet18", tmp_path / "w.pt")


def test_timm_loads_local_weights_and_uses_pretrained_cfg(fake_timm, tmp_path):
    ref = _tiny_net()
    ema = {"module." + k: v for k, v in ref.state_dict().items()}
    ema["module.relative_position_index"] = torch.arange(3)  # non-persistent buffer in the model: dropped
    other = {k: torch.zeros_like(v) for k, v in ref.state_dict().items()}
    # timm's order: the EMA weights win over the raw ones
    torch.save({"state_dict": other, "state_dict_ema": ema, "epoch": 3}, tmp_path / "w.pt")
    clf = load_timm_classifier("tiny_net", tmp_path / "w.pt")
    assert fake_timm == [("tiny_net", False, {})]  # never pretrained=True: nothing downloads
    assert clf.size == (48, 48) and clf.interpolation == "bicubic" and clf.antialias
    x = torch.rand(2, 3, 32, 32)
    expected = ref((F.interpolate(x, size=(48, 48), mode="bicubic", antialias=True) - 0.5) / 0.5)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), expected)
    assert not clf.training and not clf.classifier.training


def test_timm_overrides_and_defaults(fake_timm, tmp_path):
    torch.save(_tiny_net(num_classes=7).state_dict(), tmp_path / "w.pt")
    clf = load_timm_classifier("tiny_net", tmp_path / "w.pt", num_classes=7, input_size=None, with_cfg=False)
    assert fake_timm[-1] == ("tiny_net", False, {"num_classes": 7, "with_cfg": False})
    assert clf.size is None
    torch.testing.assert_close(clf.mean.flatten(), torch.tensor(IMAGENET_MEAN))  # no cfg: ImageNet
    clf = load_timm_classifier("tiny_net", tmp_path / "w.pt", num_classes=7, input_size=64,
                               interpolation="bilinear", mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0))
    assert clf.size == (64, 64) and clf.interpolation == "bilinear"
    torch.testing.assert_close(clf.std.flatten(), torch.tensor([1.0, 2.0, 3.0]))


def test_timm_errors(fake_timm, tmp_path):
    with pytest.raises(SdepureError, match="timm cannot build 'nope'"):
        load_timm_classifier("nope", tmp_path / "w.pt")
    with pytest.raises(SdepureError, match="weights file not found"):
        load_timm_classifier("tiny_net", tmp_path / "missing.pt")
    torch.save(_tiny_net(num_classes=3).state_dict(), tmp_path / "w3.pt")
    with pytest.raises(SdepureError, match=r"5\.weight has shape \(3, 4\), expected \(5, 4\)"):
        load_timm_classifier("tiny_net", tmp_path / "w3.pt")
    sd = _tiny_net().state_dict()
    del sd["0.bias"]
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(SdepureError, match=r"missing keys: 0\.bias"):
        load_timm_classifier("tiny_net", tmp_path / "partial.pt")
    (tmp_path / "x.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SdepureError):
        load_timm_classifier("tiny_net", tmp_path / "x.safetensors")


def test_torchvision_loads_old_style_weights(fake_torchvision, tmp_path):
    ref = _tiny_net()
    # torchvision's original ImageNet weights predate BatchNorm's num_batches_tracked
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "w.pt")
    clf = load_torchvision_classifier("tiny_net", tmp_path / "w.pt", input_size=224)
    assert fake_torchvision == [("tiny_net", None, {})]
    x = torch.rand(2, 3, 256, 256)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = ref((F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True) - mean) / std)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), expected)
    with pytest.raises(SdepureError, match="torchvision cannot build 'nope'"):
        load_torchvision_classifier("nope", tmp_path / "w.pt")


def test_adapter_normalises_and_resizes():
    rec = Recorder()
    ad = InputAdapter(rec, size=(40, 30), mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    x = torch.rand(2, 3, 20, 20)
    out = ad(x)
    assert out.shape == (2, 3, 40, 30)
    r = F.interpolate(x, size=(40, 30), mode="bilinear", antialias=True)
    torch.testing.assert_close(out[:, 0], (r[:, 0] - 0.5) / 0.5)
    torch.testing.assert_close(out[:, 2], r[:, 2] / 2.0)
    # already the right size: no resampling at all, and no normalisation when asked for none
    y = torch.rand(1, 3, 40, 30)
    assert torch.equal(InputAdapter(rec, size=(40, 30), mean=None, std=None)(y), y)
    assert torch.equal(InputAdapter(rec, size=None, mean=None, std=None)(x), x)


def test_adapter_antialias_and_clamp():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)  # white noise: shrinking 4x should average it away
    sharp = InputAdapter(Recorder(), 16, None, None, "bilinear", antialias=False)(x)
    smooth = InputAdapter(Recorder(), 16, None, None, "bilinear", antialias=True)(x)
    assert smooth.std() < 0.6 * sharp.std()  # without the low-pass, noise aliases through
    up = torch.zeros(1, 3, 8, 8)
    up[..., 3:5, 3:5] = 1
    raw = InputAdapter(Recorder(), 32, None, None, "bicubic")(up)
    assert raw.min() < 0 or raw.max() > 1  # bicubic overshoots
    clamped = InputAdapter(Recorder(), 32, None, None, "bicubic", clamp=True)(up)
    assert clamped.min() >= 0 and clamped.max() <= 1


def test_adapter_passes_gradients():
    net = _tiny_net()
    for kw in PAPER_INPUTS.values():
        x = torch.rand(1, 3, 64, 64, requires_grad=True)
        InputAdapter(net, **kw)(x).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_adapter_rejects_bad_settings():
    with pytest.raises(SdepureError, match="interpolation"):
        InputAdapter(Recorder(), 224, interpolation="lanczos")
    with pytest.raises(SdepureError, match="both mean and std"):
        InputAdapter(Recorder(), 224, mean=(0.5,) * 3, std=None)
    with pytest.raises(SdepureError, match="std > 0"):
        InputAdapter(Recorder(), 224, mean=(0.5,) * 3, std=(0.5, 0.0, 0.5))
    with pytest.raises(SdepureError, match="channels"):
        InputAdapter(Recorder(), None)(torch.rand(1, 1, 8, 8))
    with pytest.raises(SdepureError, match=r"\(N, C, H, W\)"):
        InputAdapter(Recorder(), None)(torch.rand(3, 8, 8))
    # normalisation constants are not part of any weights file
    assert InputAdapter(nn.Identity(), 224).state_dict() == {}


@pytest.mark.parametrize("mode,size", [("bicubic", 96), ("bicubic", 20), ("bilinear", 20)])
def test_adapter_antialias_matches_pil_resize(mode, size):
    """antialias=True is PIL's Image.resize (what torchvision's Resize does to PIL images)."""
    Image = pytest.importorskip("PIL.Image")
    torch.manual_seed(0)
    x = torch.rand(1, 1, 48, 48)
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[mode]
    pil = Image.fromarray(x[0, 0].numpy(), mode="F").resize((size, size), resample)
    out = InputAdapter(Recorder(), size, None, None, mode, antialias=True)(x)
    torch.testing.assert_close(out[0, 0], torch.tensor(__import__("numpy").array(pil)), atol=1e-5, rtol=0)
