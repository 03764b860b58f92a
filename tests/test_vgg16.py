"""Tests for vgg16.py.

    .venv/bin/python -m pytest tests/test_vgg16.py -q
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from torch import nn

from vgg16 import VGG16, load_imagenet_weights

TORCHVISION_VGG16_PARAMS = 138_357_544


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module", params=[1, 3])
def small_model(request: pytest.FixtureRequest) -> VGG16:
    torch.manual_seed(0)
    return VGG16(in_channels=request.param, num_classes=5, hidden=64).eval()


@pytest.mark.parametrize("size", [32, 33, 64, 97])
def test_output_shape(small_model: VGG16, size: int) -> None:
    x = torch.randn(2, small_model.in_channels, size, size)
    with torch.no_grad():
        assert small_model(x).shape == (2, 5)


def test_output_shape_non_square_without_batch_norm() -> None:
    torch.manual_seed(0)
    model = VGG16(in_channels=3, num_classes=7, batch_norm=False, hidden=64).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 3, 33, 70)).shape == (3, 7)


def test_parameter_count_matches_torchvision() -> None:
    # Meta tensors have shapes but no storage, so the 138M parameters cost nothing.
    with torch.device("meta"):
        ours = count_params(VGG16(in_channels=3, num_classes=1000, batch_norm=False))
        theirs = count_params(torchvision.models.vgg16(weights=None))
    assert ours == theirs == TORCHVISION_VGG16_PARAMS


def test_layout_matches_torchvision_with_batch_norm() -> None:
    with torch.device("meta"):
        ours = VGG16(in_channels=3, num_classes=1000, batch_norm=True).state_dict()
        theirs = torchvision.models.vgg16_bn(weights=None).state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_in_channels_only_changes_first_conv() -> None:
    with torch.device("meta"):
        rgb = count_params(VGG16(in_channels=3, batch_norm=False))
        gray = count_params(VGG16(in_channels=1, batch_norm=False))
    assert rgb - gray == 2 * 64 * 3 * 3


def test_kaiming_init_like_torchvision() -> None:
    torch.manual_seed(0)
    model = VGG16(in_channels=1, num_classes=2, hidden=256)
    conv = model.features[3]  # 64 -> 64 conv after BN and ReLU
    assert isinstance(conv, torch.nn.Conv2d)
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.05)
    assert torch.all(conv.bias == 0)
    assert model.classifier[0].weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(model.classifier[6].bias == 0)


def test_dropout_is_configurable() -> None:
    model = VGG16(hidden=8, dropout=0.3)
    rates = [m.p for m in model.classifier if isinstance(m, torch.nn.Dropout)]
    assert rates == [0.3, 0.3]


def test_wrong_channel_count_raises() -> None:
    model = VGG16(in_channels=1, hidden=8)
    with pytest.raises(ValueError, match=r"expected \(N, C=1, H, W\).*got shape \(2, 3, 32, 32\)"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"expected \(N, C=1, H, W\)"):
        model(torch.randn(1, 32, 32))


@pytest.mark.parametrize("h, w", [(31, 64), (64, 31), (16, 16)])
def test_too_small_input_raises(h: int, w: int) -> None:
    model = VGG16(in_channels=1, hidden=8)
    with pytest.raises(ValueError, match=f"expected input of at least 32x32 pixels, got {h}x{w}"):
        model(torch.randn(2, 1, h, w))


def test_returns_logits_not_probabilities() -> None:
    torch.manual_seed(0)
    model = VGG16(in_channels=1, num_classes=4, hidden=64).eval()
    # Larger final weights so logits leave [0, 1] clearly instead of sitting near 0.
    torch.nn.init.normal_(model.classifier[6].weight, 0.0, 1.0)
    x = torch.randn(3, 1, 40, 40)
    with torch.no_grad():
        logits = model(x)
        head = model.classifier(torch.flatten(model.avgpool(model.features(x)), 1))
    torch.testing.assert_close(logits, head)
    assert ((logits < 0) | (logits > 1)).any()
    assert not torch.allclose(logits.sum(dim=1), torch.ones(3))


def test_gradient_reaches_first_layer() -> None:
    torch.manual_seed(0)
    model = VGG16(in_channels=1, num_classes=2, hidden=32).train()
    loss = torch.nn.functional.cross_entropy(
        model(torch.randn(2, 1, 32, 32)), torch.tensor([0, 1])
    )
    loss.backward()
    grad = model.features[0].weight.grad
    assert grad is not None
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def expected_cache_path(torch_home: Path, batch_norm: bool) -> Path:
    weights = (
        torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1
        if batch_norm
        else torchvision.models.VGG16_Weights.IMAGENET1K_V1
    )
    return torch_home / "hub" / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def test_pretrained_fails_fast_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    timeouts: list[float | None] = []

    def offline_download(url: str, dst: str, *args: object, **kwargs: object) -> None:
        timeouts.append(socket.getdefaulttimeout())
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline_download)
    with torch.device("meta"):
        model = VGG16(in_channels=1, num_classes=2, batch_norm=False)
    timeout_before = socket.getdefaulttimeout()
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        load_imagenet_weights(model)
    assert time.monotonic() - start < 5.0
    message = str(info.value)
    assert message.startswith("could not load ImageNet weights for VGG16: ")
    assert "Network is unreachable" in message
    assert message.endswith("run with network access once or drop --pretrained")
    assert "\n" not in message
    assert timeouts and timeouts[0] is not None and timeouts[0] <= 30
    assert socket.getdefaulttimeout() == timeout_before
    assert not expected_cache_path(tmp_path, batch_norm=False).exists()


def test_pretrained_reports_corrupt_download(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def truncated_download(url: str, dst: str, *args: object, **kwargs: object) -> None:
        Path(dst).write_bytes(b"not a checkpoint")

    monkeypatch.setattr(torch.hub, "download_url_to_file", truncated_download)
    with torch.device("meta"):
        model = VGG16(in_channels=1, num_classes=2, batch_norm=True)
    with pytest.raises(RuntimeError, match=r"could not load ImageNet weights for VGG16: .*unreadable"):
        load_imagenet_weights(model)


def test_pretrained_needs_the_papers_width() -> None:
    with pytest.raises(ValueError, match="width=1, got width=0.5"):
        load_imagenet_weights(VGG16(width=0.5))


def test_pretrained_needs_imagenet_hidden_size() -> None:
    with pytest.raises(ValueError, match="hidden=4096, got hidden=64"):
        load_imagenet_weights(VGG16(hidden=64))


@pytest.fixture(scope="module")
def fake_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[bool, dict[str, torch.Tensor]]]:
    """TORCH_HOME holding random-valued torchvision VGG16 checkpoints (with and without BN)."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    generator = torch.Generator().manual_seed(0)
    checkpoints: dict[bool, dict[str, torch.Tensor]] = {}
    for batch_norm in (False, True):
        with torch.device("meta"):
            net = torchvision.models.vgg16_bn if batch_norm else torchvision.models.vgg16
            shapes = {k: v.shape for k, v in net(weights=None).state_dict().items()}
        # Random biases and BN statistics too (torchvision zeroes or ones them),
        # so a key that is not copied cannot match by coincidence. The two big FC
        # weights get a distinct constant each: their shapes already rule out a
        # mix-up, and drawing 120M random numbers would dominate the test time.
        # Leaving out num_batches_tracked mimics the real 2017 vgg16_bn checkpoint.
        state: dict[str, torch.Tensor] = {}
        for index, (key, shape) in enumerate(shapes.items()):
            if key.endswith("num_batches_tracked"):
                continue
            if key in ("classifier.0.weight", "classifier.3.weight"):
                state[key] = torch.full(shape, 0.001 * (index + 1))
            elif key.endswith("running_var"):
                state[key] = torch.rand(shape, generator=generator) + 0.5
            else:
                state[key] = torch.randn(shape, generator=generator)
        path = expected_cache_path(torch_home, batch_norm)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        checkpoints[batch_norm] = state
    return torch_home, checkpoints


@pytest.mark.parametrize(
    "in_channels, num_classes, batch_norm", [(1, 2, False), (3, 1000, False), (1, 2, True)]
)
def test_pretrained_copies_cached_weights(
    monkeypatch: pytest.MonkeyPatch,
    fake_cache: tuple[Path, dict[bool, dict[str, torch.Tensor]]],
    in_channels: int,
    num_classes: int,
    batch_norm: bool,
) -> None:
    torch_home, checkpoints = fake_cache
    source = checkpoints[batch_norm]
    monkeypatch.setenv("TORCH_HOME", str(torch_home))

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached checkpoint must not be downloaded again")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    torch.manual_seed(0)
    model = VGG16(in_channels=in_channels, num_classes=num_classes, batch_norm=batch_norm)
    fresh_last_fc = model.classifier[6].weight.detach().clone()

    assert load_imagenet_weights(model) is model
    state = model.state_dict()

    first = source["features.0.weight"]  # (64, 3, 3, 3)
    expected_first = first.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) * (3 / in_channels)
    torch.testing.assert_close(state["features.0.weight"], expected_first)
    copied = [k for k in source if k != "features.0.weight" and not k.startswith("classifier.6.")]
    # 13 convs (weight, bias) minus the adapted first weight, 4 tensors per BN, FC1 and FC2.
    assert len(copied) == 2 * 13 - 1 + (4 * 13 if batch_norm else 0) + 4
    assert [k for k in copied if not torch.equal(state[k], source[k])] == []
    if num_classes == 1000:
        assert torch.equal(state["classifier.6.weight"], source["classifier.6.weight"])
    else:
        assert torch.equal(model.classifier[6].weight, fresh_last_fc)

    with torch.no_grad():
        assert model.eval()(torch.randn(1, in_channels, 32, 32)).shape == (1, num_classes)


# ------------------------------------------------------------------------------------------------
# The evidence head
# ------------------------------------------------------------------------------------------------

def test_evidence_head_shapes_and_pooled_logit_by_hand() -> None:
    torch.manual_seed(0)
    model = VGG16(in_channels=3, num_classes=2, head="evidence", pool_sharpness=2.0).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        logits, evidence = model.forward_with_evidence(x)
        plain = model(x)
    assert logits.shape == (2, 2) and evidence.shape == (2, 1, 16, 24)  # stride 4
    assert torch.equal(plain, logits)
    assert torch.all(logits[:, 0] == 0)
    for i in range(2):  # log-mean-exp at r = 2, written out from its definition
        e = evidence[i].flatten().double()
        expected = math.log(sum(math.exp(2 * v) for v in e.tolist()) / len(e)) / 2
        assert logits[i, 1].item() == pytest.approx(expected, rel=1e-5)
        assert e.mean() - 1e-6 <= logits[i, 1] <= e.max() + 1e-6  # between the mean and the maximum


def test_evidence_map_is_the_fcn_sum_of_three_depths() -> None:
    torch.manual_seed(1)
    model = VGG16(in_channels=2, num_classes=2, head="evidence").eval()
    for conv in (model.evidence, *model.evidence_skip):  # weights that make every term count
        torch.nn.init.normal_(conv.weight, 0.0, 0.1)
    x = torch.rand(1, 2, 64, 64)
    outs, h = [], x
    with torch.no_grad():
        for layer in model.features:  # the maps just before each pooling, by walking the layers
            if isinstance(layer, nn.MaxPool2d):
                outs.append(h)
            h = layer(h)
        conv3_3, conv4_3, conv5_3 = outs[2], outs[3], outs[4]  # (1, 256, 16, 16), (1, 512, 8, 8), (1, 512, 4, 4)
        up = lambda t: t.repeat_interleave(2, -1).repeat_interleave(2, -2)  # nearest, x2
        s8 = model.evidence_skip[0](conv4_3) + up(model.evidence(conv5_3))
        expected = model.evidence_skip[1](conv3_3) + up(s8)
        _, evidence, (coarse, middle), liver = model.forward_with_evidence(x, aux=True)
    torch.testing.assert_close(evidence, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(middle, s8, atol=1e-5, rtol=1e-5)
    assert coarse.shape == (1, 1, 4, 4) and middle.shape == (1, 1, 8, 8) and evidence.shape == (1, 1, 16, 16)
    assert liver == []  # no liver gate, no liver maps


def test_liver_gate_lowers_tumour_evidence_by_log_liver_probability_by_hand() -> None:
    """With the liver gate each 1x1 head reads two logits, tumour t and liver l, summed coarse to
    fine as the FCN sum is; the evidence is t + log(sigmoid(l)) at each of the three strides."""
    torch.manual_seed(2)
    model = VGG16(in_channels=1, num_classes=2, head="evidence", liver_gate=True, pool_sharpness=3.0).eval()
    for conv in (model.evidence, *model.evidence_skip):
        torch.nn.init.normal_(conv.weight, 0.0, 0.1)
    x = torch.rand(2, 1, 64, 64)
    outs, h = [], x
    with torch.no_grad():
        for layer in model.features:
            if isinstance(layer, nn.MaxPool2d):
                outs.append(h)
            h = layer(h)
        up = lambda t: t.repeat_interleave(2, -1).repeat_interleave(2, -2)
        s16 = model.evidence(outs[4])  # (2, 2, 4, 4): channel 0 tumour, channel 1 liver
        s8 = model.evidence_skip[0](outs[3]) + up(s16)
        s4 = model.evidence_skip[1](outs[2]) + up(s8)
        logits, evidence, coarser, liver = model.forward_with_evidence(x, aux=True)
    gate = lambda m: m[:, :1] - torch.log1p(torch.exp(-m[:, 1:]))  # t + log(1 / (1 + e^-l))
    torch.testing.assert_close(evidence, gate(s4), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(coarser[1], gate(s8), atol=1e-5, rtol=1e-5)
    for got, want in zip(liver, (s16, s8, s4)):
        torch.testing.assert_close(got, want[:, 1:], atol=1e-5, rtol=1e-5)
    for i in range(2):  # the slice logit pools the gated map
        e = evidence[i].flatten().double()
        assert logits[i, 1].item() == pytest.approx(math.log(torch.exp(3 * e).mean().item()) / 3, rel=1e-5)


def test_liver_gate_keeps_places_that_are_not_liver_from_making_a_slice_tumorous() -> None:
    """Tumour logits of +20 everywhere: a confident tumour slice, unless the network also says
    nowhere is liver (liver logit -40), when the slice's tumour logit is 20 + log(sigmoid(-40)), -20."""
    model = VGG16(in_channels=1, num_classes=2, head="evidence", liver_gate=True).eval()
    for conv in (model.evidence, *model.evidence_skip):
        torch.nn.init.zeros_(conv.weight), torch.nn.init.zeros_(conv.bias)
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        model.evidence.bias.copy_(torch.tensor([20.0, 30.0]))
        liver = model(x).softmax(1)[0, 1].item()
        model.evidence.bias.copy_(torch.tensor([20.0, -40.0]))
        elsewhere = model(x).softmax(1)[0, 1].item()
    assert liver == pytest.approx(1.0, abs=1e-6)
    assert elsewhere == pytest.approx(1 / (1 + math.exp(-(20 + math.log(1 / (1 + math.exp(40)))))), rel=1e-4)
    assert elsewhere < 1e-8


def test_evidence_head_has_no_fully_connected_layers() -> None:
    model = VGG16(in_channels=1, num_classes=2, head="evidence")
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"features", "evidence", "evidence_skip"}
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13  # VGG16's own convolutions are all there


@pytest.mark.parametrize("kwargs", [dict(head="gap"), dict(head="evidence", num_classes=3),
                                    dict(head="evidence", pool_sharpness=0.0), dict(head="fc", liver_gate=True)])
def test_evidence_head_bad_arguments_raise(kwargs) -> None:
    with pytest.raises(ValueError):
        VGG16(in_channels=1, **{"num_classes": 2, **kwargs})


def test_fc_head_has_no_evidence_map() -> None:
    with pytest.raises(RuntimeError):
        VGG16(in_channels=1, num_classes=2, hidden=8).forward_with_evidence(torch.rand(1, 1, 32, 32))


def test_pretrained_evidence_head_copies_convolutions_keeps_fresh_head(
    monkeypatch: pytest.MonkeyPatch, fake_cache: tuple[Path, dict[bool, dict[str, torch.Tensor]]]
) -> None:
    torch_home, checkpoints = fake_cache
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    torch.manual_seed(0)
    model = VGG16(in_channels=3, num_classes=2, batch_norm=True, head="evidence")
    fresh = model.evidence.weight.detach().clone()
    load_imagenet_weights(model)
    source = checkpoints[True]
    state = model.state_dict()
    convs = [k for k in source if k.startswith("features.") and k != "features.0.weight"]
    assert [k for k in convs if not torch.equal(state[k], source[k])] == []
    assert torch.equal(model.evidence.weight, fresh)


def test_width_scales_every_convolution_and_a_quarter_of_the_arithmetic() -> None:
    """At width 0.5 each convolution has half the paper's channels (32 ... 256), the heads read the
    narrower maps at the same strides, and a forward pass costs a quarter of the multiply-adds, but for
    the first convolution, whose input stays 3 channels (counted by hand: 3 * 64w * 9 per pixel)."""
    from torch.utils.flop_counter import FlopCounterMode

    paper = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    flops = {}
    for width in (1.0, 0.5):
        model = VGG16(in_channels=3, head="evidence", liver_gate=True, width=width).eval()
        convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
        assert [c.out_channels for c in convs] == [int(p * width) for p in paper]
        x = torch.rand(1, 3, 64, 64)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            logits, evidence, coarse, liver = model.forward_with_evidence(x, aux=True)
        flops[width] = counter.get_total_flops()
        assert logits.shape == (1, 2) and evidence.shape == (1, 1, 16, 16)
        assert [m.shape for m in coarse] == [(1, 1, 4, 4), (1, 1, 8, 8)] and len(liver) == 3
    first = 2 * 3 * 9 * 64 * 64 * 64  # conv1_1's flops at width 1: 2 per multiply-add
    assert flops[0.5] - first / 2 == pytest.approx((flops[1.0] - first) / 4, rel=0.01)


@pytest.mark.parametrize("width", [0.0, 1.5, 0.01])
def test_width_out_of_range_raises(width: float) -> None:
    with pytest.raises(ValueError, match="width"):
        VGG16(width=width)
