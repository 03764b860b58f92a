"""Tests for unet.py.

    .venv/bin/python -m pytest tests/test_unet.py -q
"""

from __future__ import annotations

import pytest
import torch

from unet import AttentionGate, UNet


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Hand-written parameter formulas, deliberately independent of unet.py.
def conv(c_in: int, c_out: int, k: int, bias: bool) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def bn(c: int) -> int:
    return 2 * c  # affine weight and bias; running stats are buffers


def double_conv(c_in: int, c_out: int) -> int:
    # Convs followed by BN carry no bias.
    return conv(c_in, c_out, 3, False) + bn(c_out) + conv(c_out, c_out, 3, False) + bn(c_out)


def gate(c_g: int, c_x: int) -> int:
    c_int = max(1, c_x // 2)
    w_g = conv(c_g, c_int, 1, False) + bn(c_int)
    w_x = conv(c_x, c_int, 1, False) + bn(c_int)
    psi = conv(c_int, 1, 1, False) + bn(1)
    return w_g + w_x + psi


def expected_params(
    in_channels: int, num_classes: int, base_width: int, depth: int, upsampling: str, attention: bool
) -> int:
    w = [base_width * 2**level for level in range(depth + 1)]
    total = 0
    c = in_channels
    for level in range(depth):
        total += double_conv(c, w[level])
        c = w[level]
    total += double_conv(w[depth - 1], w[depth])
    for level in range(depth):
        if upsampling == "transpose":
            total += conv(w[level + 1], w[level], 2, True)
        else:
            total += conv(w[level + 1], w[level], 1, True)
        total += double_conv(2 * w[level], w[level])
        if attention:
            total += gate(w[level + 1], w[level])
    return total + conv(w[0], num_classes, 1, True)


def test_parameter_count_small_config_by_hand() -> None:
    # depth=2, base_width=4, 1 -> 3 channels, worked out on paper:
    # encoder 196 + 896, bottleneck 3520, up 520 + 132, decoder 1760 + 448, head 15.
    assert count_params(UNet(1, 3, base_width=4, depth=2)) == 7487
    # Bilinear: 1x1 convs 16*8+8 and 8*4+4 replace the 2x2 transposed convs.
    assert count_params(UNet(1, 3, base_width=4, depth=2, upsampling="bilinear")) == 7007
    # Gates: (16*4+8) + (8*4+8) + (4+2) = 118 at level 1, (8*2+4) + (4*2+4) + (2+2) = 36 at level 0.
    assert count_params(UNet(1, 3, base_width=4, depth=2, attention=True)) == 7487 + 154


@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("in_channels, num_classes, base_width, depth", [(1, 3, 4, 2), (3, 5, 8, 3), (2, 1, 6, 4)])
def test_parameter_count_formula(
    in_channels: int, num_classes: int, base_width: int, depth: int, upsampling: str, attention: bool
) -> None:
    model = UNet(in_channels, num_classes, base_width, depth, upsampling, attention)
    assert count_params(model) == expected_params(
        in_channels, num_classes, base_width, depth, upsampling, attention
    )


def test_default_config_parameter_count() -> None:
    # The classic 64-wide, depth-4 U-Net with BN and no conv biases before BN.
    assert count_params(UNet()) == expected_params(1, 3, 64, 4, "transpose", False) == 31_036_611


@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
@pytest.mark.parametrize("base_width, depth", [(8, 2), (4, 3), (4, 4)])
def test_attention_adds_exactly_the_gate_parameters(base_width: int, depth: int, upsampling: str) -> None:
    plain = count_params(UNet(1, 3, base_width, depth, upsampling, attention=False))
    gated = count_params(UNet(1, 3, base_width, depth, upsampling, attention=True))
    w = [base_width * 2**level for level in range(depth + 1)]
    assert gated - plain == sum(gate(w[level + 1], w[level]) for level in range(depth))


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
@pytest.mark.parametrize("base_width, depth", [(8, 2), (4, 3), (4, 4)])
def test_output_keeps_input_size(base_width: int, depth: int, upsampling: str, attention: bool) -> None:
    torch.manual_seed(0)
    model = UNet(2, 3, base_width, depth, upsampling, attention).train()
    for h, w in [(16, 16), (17, 17), (31, 31), (64, 48), (23, 40)]:
        assert model(torch.randn(2, 2, h, w)).shape == (2, 3, h, w)


def test_smallest_input_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = UNet(1, 2, base_width=4, depth=3, attention=True).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 8, 9)).shape == (1, 2, 8, 9)


def test_wrong_channel_count_raises() -> None:
    model = UNet(in_channels=1, base_width=4, depth=2)
    with pytest.raises(ValueError, match=r"expected \(N, C=1, H, W\).*got shape \(2, 3, 16, 16\)"):
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"expected \(N, C=1, H, W\)"):
        model(torch.randn(1, 16, 16))


@pytest.mark.parametrize("h, w", [(15, 32), (32, 15), (8, 8)])
def test_too_small_input_raises(h: int, w: int) -> None:
    model = UNet(in_channels=1, base_width=4, depth=4)
    with pytest.raises(ValueError, match=f"at least 16x16 pixels for depth=4, got {h}x{w}"):
        model(torch.randn(2, 1, h, w))


def test_invalid_config_raises() -> None:
    with pytest.raises(ValueError, match="'transpose' or 'bilinear', got 'nearest'"):
        UNet(upsampling="nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="depth >= 1, got 0"):
        UNet(depth=0)


def test_attention_coefficients_are_in_unit_interval_and_scale_the_skip() -> None:
    torch.manual_seed(0)
    model = UNet(1, 3, base_width=4, depth=3, attention=True).train()
    assert model.gates is not None
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    coefficients: list[torch.Tensor] = []

    def on_psi(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        coefficients.append(out.detach())

    def on_gate(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen.append((args[1].detach(), out.detach(), coefficients[-1]))

    for g in model.gates:
        assert isinstance(g, AttentionGate)
        g.psi.register_forward_hook(on_psi)
        g.register_forward_hook(on_gate)
    model(torch.randn(2, 1, 33, 20))

    assert len(seen) == 3
    for skip, gated, alpha in seen:
        assert alpha.shape == (skip.shape[0], 1, *skip.shape[-2:])
        assert alpha.min() >= 0 and alpha.max() <= 1
        assert alpha.std() > 0  # coefficients vary over pixels, not a constant
        torch.testing.assert_close(gated, skip * alpha)


def test_zeroed_psi_halves_the_skip() -> None:
    torch.manual_seed(0)
    g = AttentionGate(gate_channels=8, skip_channels=4, inter_channels=2).eval()
    with torch.no_grad():
        g.psi[0].weight.zero_()  # eval BN maps 0 to 0, so sigmoid gives 0.5 everywhere
        skip = torch.randn(2, 4, 9, 7)
        gated = g(torch.randn(2, 8, 4, 3), skip)
    torch.testing.assert_close(gated, 0.5 * skip)


def test_returns_logits_not_probabilities() -> None:
    torch.manual_seed(0)
    model = UNet(1, 4, base_width=4, depth=2).eval()
    head_out: list[torch.Tensor] = []
    model.head.register_forward_hook(lambda m, a, out: head_out.append(out))
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 20, 20))
    assert logits is head_out[0]  # nothing (softmax, sigmoid) after the 1x1 head
    assert ((logits < 0) | (logits > 1)).any()
    assert not torch.allclose(logits.sum(dim=1), torch.ones(2, 20, 20))


@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
def test_gradient_reaches_first_layer(upsampling: str) -> None:
    torch.manual_seed(0)
    model = UNet(1, 3, base_width=4, depth=3, upsampling=upsampling, attention=True).train()
    target = torch.randint(0, 3, (2, 17, 19))
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 1, 17, 19)), target)
    loss.backward()
    first = model.encoders[0][0].weight.grad
    assert first is not None and torch.isfinite(first).all() and first.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_dropout_is_active_only_in_training() -> None:
    torch.manual_seed(0)
    model = UNet(1, 2, base_width=4, depth=2, dropout=0.5)
    x = torch.randn(2, 1, 16, 16)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))


def test_forward_with_decoder_returns_the_coarser_decoder_outputs() -> None:
    torch.manual_seed(0)
    net = UNet(in_channels=1, num_classes=3, base_width=4, depth=3).eval()
    x = torch.randn(2, 1, 32, 32)
    logits, decoded = net.forward_with_decoder(x, levels=2)
    assert torch.equal(logits, net(x))
    assert [tuple(d.shape) for d in decoded] == [(2, 8, 16, 16), (2, 16, 8, 8)]
    assert net.forward_with_decoder(x)[1] == []
    with pytest.raises(ValueError, match="levels"):
        net.forward_with_decoder(x, levels=3)
