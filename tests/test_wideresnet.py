import pytest
import torch
import torch.nn.functional as F

from sdepure.classifiers.wideresnet import WideResNet, extract_state_dict, load_wideresnet
from sdepure.errors import SdepureError


def _tiny(depth=10, widen=1, seed=0):
    """A small random WRN with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    net = WideResNet(depth, widen)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net.eval()


def _prefixed(sd, p):
    return {p + k: v for k, v in sd.items()}


@pytest.mark.parametrize("variant", ["plain", "state_dict", "module", "model", "state_dict+module",
                                     "model+extra", "no_num_batches_tracked"])
def test_checkpoint_variants_load_identically(tmp_path, variant):
    net = _tiny()
    sd = net.state_dict()
    ckpt = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 200, "best_acc": 0.95},
        "module": _prefixed(sd, "module."),
        "model": _prefixed(sd, "model."),
        "state_dict+module": {"state_dict": _prefixed(sd, "module.")},
        "model+extra": {"state_dict": _prefixed(sd, "module.model.")},
        "no_num_batches_tracked": {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")},
    }[variant]
    torch.save(ckpt, tmp_path / "w.pt")
    loaded = load_wideresnet(tmp_path / "w.pt", depth=10, widen=1)
    assert not loaded.training
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_key_mismatch_names_keys(tmp_path):
    torch.save(_tiny(depth=10).state_dict(), tmp_path / "w10.pt")
    with pytest.raises(SdepureError, match=r"missing keys: block1\.layer\.1\."):
        load_wideresnet(tmp_path / "w10.pt", depth=16, widen=1)
    sd = _tiny().state_dict()
    sd["sub_block1.layer.0.bn1.weight"] = torch.ones(16)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(SdepureError, match=r"unexpected keys: sub_block1\.layer\.0\.bn1\.weight"):
        load_wideresnet(tmp_path / "extra.pt", depth=10, widen=1)
    torch.save(_tiny(widen=3).state_dict(), tmp_path / "w3.pt")
    shape_msg = r"block1\.layer\.0\.conv1\.weight has shape \(48, 16, 3, 3\), expected \(32, 16, 3, 3\)"
    with pytest.raises(SdepureError, match=shape_msg):
        load_wideresnet(tmp_path / "w3.pt", depth=10, widen=2)


def test_refuses_pickled_objects_and_junk(tmp_path):
    torch.save({"state_dict": _tiny().state_dict(), "opt": torch.optim.SGD([torch.zeros(1)], lr=0.1)},
               tmp_path / "pickled.pt")
    with pytest.raises(SdepureError, match="refused to unpickle"):
        load_wideresnet(tmp_path / "pickled.pt", depth=10, widen=1)
    torch.save({"epoch": 3, "args": [1, 2]}, tmp_path / "nostate.pt")
    with pytest.raises(SdepureError, match="no state dict found"):
        load_wideresnet(tmp_path / "nostate.pt", depth=10, widen=1)
    with pytest.raises(SdepureError, match="not found"):
        load_wideresnet(tmp_path / "missing.pt")
    with pytest.raises(SdepureError, match="6n \\+ 4"):
        WideResNet(depth=12)


def test_prefix_stripping_keeps_own_names():
    own = ["model.weight", "bias"]
    sd = {"module.model.weight": torch.zeros(1), "module.bias": torch.zeros(1)}
    assert set(extract_state_dict(sd, own)) == {"model.weight", "bias"}


def _reference_forward(sd, x, n):
    """WRN forward written directly from the state dict (pre-activation blocks)."""
    def bn(h, p):
        return F.batch_norm(h, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                            sd[p + ".bias"], False, 0.0, 1e-5)

    h = F.conv2d(x, sd["conv1.weight"], padding=1)
    for stage, stride in ((1, 1), (2, 2), (3, 2)):
        for i in range(n):
            p = f"block{stage}.layer.{i}"
            s = stride if i == 0 else 1
            a = F.relu(bn(h, p + ".bn1"))
            out = F.conv2d(a, sd[p + ".conv1.weight"], stride=s, padding=1)
            out = F.conv2d(F.relu(bn(out, p + ".bn2")), sd[p + ".conv2.weight"], padding=1)
            short = F.conv2d(a, sd[p + ".convShortcut.weight"], stride=s) if p + ".convShortcut.weight" in sd else h
            h = out + short
    h = F.avg_pool2d(F.relu(bn(h, "bn1")), 8).flatten(1)
    return F.linear(h, sd["fc.weight"], sd["fc.bias"])


def test_forward_matches_direct_computation():
    net = _tiny(depth=16, widen=2)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = net(x)
        ref = _reference_forward(net.state_dict(), x, n=2)
    assert out.shape == (2, 10)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_wrn_28_10_on_meta_device():
    with torch.device("meta"):
        net = WideResNet(depth=28, widen=10)
    assert sum(p.numel() for p in net.parameters()) == 36_479_194  # published: 36.5M
    sd = net.state_dict()
    expected = {
        "conv1.weight": (16, 3, 3, 3),
        "block1.layer.0.bn1.weight": (16,),
        "block1.layer.0.conv1.weight": (160, 16, 3, 3),
        "block1.layer.0.convShortcut.weight": (160, 16, 1, 1),
        "block1.layer.3.conv2.weight": (160, 160, 3, 3),
        "block2.layer.0.conv1.weight": (320, 160, 3, 3),
        "block2.layer.0.convShortcut.weight": (320, 160, 1, 1),
        "block3.layer.0.convShortcut.weight": (640, 320, 1, 1),
        "block3.layer.3.bn2.running_var": (640,),
        "bn1.running_mean": (640,),
        "fc.weight": (10, 640),
        "fc.bias": (10,),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert len(sd) == 155
    assert [k for k in sd if "convShortcut" in k] == [
        "block1.layer.0.convShortcut.weight", "block2.layer.0.convShortcut.weight",
        "block3.layer.0.convShortcut.weight"]
    # no input normalisation buffers ('mu'/'sigma' in RobustBench's normalised models)
    assert not any(k.startswith(("mu", "sigma", "mean", "std")) for k in sd)
    assert list(sd)[:2] == ["conv1.weight", "block1.layer.0.bn1.weight"]
    assert list(sd)[-2:] == ["fc.weight", "fc.bias"]
