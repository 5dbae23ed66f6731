"""Autocast precision and channels_last for the networks."""
import pytest
import torch

from sdepure import precision
from sdepure.brownian import Streams
from sdepure.defense import Defense
from sdepure.settings import Purifier
from sdepure.errors import SdepureError


@pytest.fixture(scope="module")
def digits():
    from sdepure.classifiers import build_classifier
    from sdepure.config import load_config
    from sdepure.data import load_dataset
    from sdepure.models import build_score_model

    cfg = load_config("digits")
    x, y, _ = load_dataset(cfg["data"])
    return build_score_model(cfg["model"]), build_classifier(cfg["classifier"], False, 10), x[:200], y[:200]


def test_bf16_autocast_stays_close_to_fp32_on_the_digits_model(digits):
    """One 10-step Euler purification of 200 noisy test digits (sigma 0.5, same noise and path):
    bf16 pixels within 0.01 on average of fp32 (images in [0, 1]; bf16 keeps 8 bits of mantissa),
    classifier labels agree on >= 95% and accuracy moves by <= 0.03; outputs stay fp32."""
    model, classifier, x, y = digits
    noisy = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    out, labels = {}, {}
    for p in ("fp32", "bf16"):
        base = Defense(Purifier("diffpure", sigma=0.5, steps=10, solver="euler", precision=p), model, classifier, 10)
        with torch.no_grad():
            out[p] = base.purify(noisy, Streams.batch(1, len(noisy)))
            labels[p] = base.classify(out[p]).argmax(-1)
        assert out[p].dtype == torch.float32
    diff = (out["bf16"] - out["fp32"]).abs()
    assert 0 < float(diff.mean()) < 0.01  # > 0: autocast did change the arithmetic
    assert float((labels["bf16"] == labels["fp32"]).double().mean()) >= 0.95
    acc = {p: float((labels[p] == y).double().mean()) for p in labels}
    assert abs(acc["bf16"] - acc["fp32"]) <= 0.03, acc


def test_precision_refusals():
    with pytest.raises(SdepureError, match="precision"):
        precision.check_precision("fp8")
    with pytest.raises(SdepureError, match="precision"):
        precision.with_precision(torch.nn.Identity(), "half")


def test_channels_last_keeps_the_function_and_is_off_by_default_on_cpu():
    from sdepure.classifiers.digits import DigitsCNN

    torch.manual_seed(0)
    net = DigitsCNN(ch=4).eval()
    x = torch.rand(5, 1, 8, 8)
    ref = net(x)
    precision.prepare(net)  # auto: CPU, left alone
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous()
    precision.prepare(net, channels_last=True)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert torch.allclose(net(x), ref, atol=1e-6)


def test_channels_last_runs_the_published_architectures():
    """The ADM UNets and NCSN++ (tiny, random) give the same output with channels_last weights
    (what prepare() does on CUDA): no view of a conv output depends on the NCHW layout."""
    import test_ncsnpp  # the tests' own tiny models (pytest puts tests/ on the path)
    from test_adm import fixed_input, randomized, tiny_config

    from sdepure.models.adm import ADMUNet
    from sdepure.models.ncsnpp import NCSNpp

    nets = [randomized(ADMUNet(**tiny_config(p))) for p in ("guided-256-uncond", "improved-cifar10-uncond")]
    nets.append(test_ncsnpp._randomize(NCSNpp(**test_ncsnpp.TINY), seed=1).eval())
    for net in nets:
        x, t = fixed_input()
        with torch.no_grad():
            ref = net(x, t)
            precision.prepare(net, channels_last=True)
            out = net(x, t)
        assert torch.allclose(out, ref, atol=1e-5), type(net).__name__
