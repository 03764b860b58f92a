"""U-Net (Ronneberger et al. 2015) with optional attention gates (Oktay et al. 2018).

    model = UNet(in_channels=1, num_classes=3, attention=True)
    logits = model(torch.randn(2, 1, 97, 128))  # (2, 3, 97, 128)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

Upsampling = Literal["transpose", "bilinear"]


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BN -> ReLU) twice; same padding keeps H and W."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        # No conv bias: the following BN subtracts the mean and adds its own shift,
        # so a bias there would be a parameter with no effect.
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class AttentionGate(nn.Module):
    """Additive attention gate that re-weights skip features by a coarser gating signal."""

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.w_g = nn.Sequential(
            nn.Conv2d(gate_channels, inter_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(inter_channels),
        )
        self.w_x = nn.Sequential(
            nn.Conv2d(skip_channels, inter_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(inter_channels),
        )
        self.relu = nn.ReLU(inplace=True)
        self.psi = nn.Sequential(
            nn.Conv2d(inter_channels, 1, kernel_size=1, bias=False),
            nn.BatchNorm2d(1),
            nn.Sigmoid(),
        )

    def forward(self, gate: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Gate ``skip`` (N, C_x, H, W) by ``gate`` (N, C_g, H', W'); returns (N, C_x, H, W)."""
        g = self.w_g(gate)  # (N, C_int, H', W')
        # Resampling after the 1x1 projection interpolates C_int rather than C_g
        # channels, which is cheaper; a 1x1 conv commutes with bilinear resampling.
        g = F.interpolate(g, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = self.w_x(skip)  # (N, C_int, H, W)
        alpha = self.psi(self.relu(g + x))  # (N, 1, H, W), in [0, 1]
        return skip * alpha  # (N, C_x, H, W)


class Up(nn.Module):
    """Double the resolution and halve the channels: C_in -> C_out."""

    def __init__(self, in_channels: int, out_channels: int, mode: Upsampling) -> None:
        super().__init__()
        if mode == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, out_channels, kernel_size=1),
            )

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """(N, C_in, h, w) -> (N, C_out, *size); ``size`` is at most one pixel larger than 2h, 2w."""
        x = self.up(x)  # (N, C_out, 2h, 2w)
        # Max-pooling floors odd sizes, so doubling can come out one pixel short
        # of the skip; pad rather than crop so no skip pixel is lost.
        dh, dw = size[0] - x.shape[-2], size[1] - x.shape[-1]
        if dh or dw:
            x = F.pad(x, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])
        return x  # (N, C_out, *size)


class UNet(nn.Module):
    """U-Net for semantic segmentation; level l has ``base_width * 2**l`` channels."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        base_width: int = 64,
        depth: int = 4,
        upsampling: Upsampling = "transpose",
        attention: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"expected in_channels >= 1, got {in_channels}")
        if num_classes < 1:
            raise ValueError(f"expected num_classes >= 1, got {num_classes}")
        if base_width < 1:
            raise ValueError(f"expected base_width >= 1, got {base_width}")
        if depth < 1:
            raise ValueError(f"expected depth >= 1, got {depth}")
        if upsampling not in ("transpose", "bilinear"):
            raise ValueError(f"expected upsampling 'transpose' or 'bilinear', got {upsampling!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"expected dropout in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.depth = depth
        self.attention = attention

        widths = [base_width * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList()
        channels = in_channels
        for width in widths[:-1]:
            self.encoders.append(DoubleConv(channels, width))
            channels = width
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.bottleneck = DoubleConv(widths[-2], widths[-1])
        # Dropout at the end of the contracting path, as in the original paper.
        self.dropout = nn.Dropout(p=dropout)

        # Decoder modules are indexed by level (0 = finest), like the encoders.
        self.ups = nn.ModuleList(Up(widths[l + 1], widths[l], upsampling) for l in range(depth))
        self.decoders = nn.ModuleList(DoubleConv(2 * widths[l], widths[l]) for l in range(depth))
        # The gating signal for level l is the decoder output one level coarser;
        # the intermediate width w_l // 2 follows Oktay et al.
        self.gates: nn.ModuleList | None = None
        if attention:
            self.gates = nn.ModuleList(
                AttentionGate(widths[l + 1], widths[l], max(1, widths[l] // 2))
                for l in range(depth)
            )
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment a batch of images.

        Args:
            x: float tensor of shape (N, in_channels, H, W) with H, W >= 2**depth;
                odd sizes are fine.

        Returns:
            Per-pixel logits of shape (N, num_classes, H, W); no softmax is applied.
        """
        return self.forward_with_decoder(x)[0]

    def forward_with_decoder(self, x: torch.Tensor, levels: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """As `forward`, and also the decoder's outputs at levels 1..levels (coarser than the logits),
        for deep supervision: returns (logits (N, num_classes, H, W), [(N, w_l, H_l, W_l) for l = 1..levels])."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected (N, C={self.in_channels}, H, W) input, got shape {tuple(x.shape)}"
            )
        if not 0 <= levels < self.depth:
            raise ValueError(f"expected 0 <= levels < depth={self.depth}, got {levels}")
        h, w = x.shape[-2:]
        min_size = 2**self.depth
        if h < min_size or w < min_size:
            raise ValueError(
                f"expected input of at least {min_size}x{min_size} pixels for depth={self.depth}, "
                f"got {h}x{w}"
            )
        skips: list[torch.Tensor] = []
        for encoder in self.encoders:
            x = encoder(x)  # (N, w_l, H_l, W_l) with H_l = H // 2**l
            skips.append(x)
            x = self.pool(x)  # (N, w_l, H_l // 2, W_l // 2)
        x = self.dropout(self.bottleneck(x))  # (N, w_depth, H // 2**depth, W // 2**depth)
        decoded: list[torch.Tensor] = []
        for level in reversed(range(self.depth)):
            skip = skips[level]  # (N, w_l, H_l, W_l)
            if self.gates is not None:
                skip = self.gates[level](x, skip)  # (N, w_l, H_l, W_l)
            up = self.ups[level](x, skip.shape[-2:])  # (N, w_l, H_l, W_l)
            x = self.decoders[level](torch.cat([skip, up], dim=1))  # (N, w_l, H_l, W_l)
            if 1 <= level <= levels:
                decoded.insert(0, x)
        return self.head(x), decoded  # (N, num_classes, H, W), finest first
