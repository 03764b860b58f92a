"""VGG16 (Simonyan & Zisserman 2015, configuration D) for N-channel images, with two heads.

    model = VGG16(in_channels=1, num_classes=2)                   # the classic fully connected head
    logits = model(torch.randn(8, 1, 224, 224))                    # (8, 2)
    model = VGG16(in_channels=3, num_classes=2, head="evidence")   # tumour evidence per location
    logits, evidence = model.forward_with_evidence(torch.randn(8, 3, 128, 128))  # (8, 2), (8, 1, 32, 32)
    model = load_imagenet_weights(VGG16(in_channels=1, num_classes=2))

The 13 convolutions are the paper's whatever the head; `width` scales their channel counts (0.5: a
quarter of the arithmetic, for a CPU's time budget; 1, the default, is the paper's and the only width
ImageNet's weights fit). The "evidence" head reads one tumour logit
per location from conv5_3, conv4_3 and conv3_3 with 1x1 convolutions and sums them coarse to fine
into one map at stride 4 (as FCN-8s does on VGG16); the map is pooled into the slice logit by a
smooth maximum (log-mean-exp), so a slice is tumorous when some place in it is. The map can be
supervised directly with the downsampled tumour mask (deep supervision) and drawn as a heat map of
where the classifier looked. With `liver_gate=True` the head also reads a liver logit per location
and a place counts as tumour only as far as it is liver (`forward_with_evidence`).
"""

from __future__ import annotations

import math
import os
import re
import socket
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from volumes import DataError, one_line

# Configuration D of the paper: numbers are 3x3 conv widths, "M" is a 2x2 max-pool.
CFG_D: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                          512, 512, 512, "M", 512, 512, 512, "M"]

# Five stride-2 poolings: anything below 2**5 px collapses to an empty map.
MIN_SIZE = 32

HEADS = ("fc", "evidence")
IMAGENET_HIDDEN = 4096
IMAGENET_CLASSES = 1000
# ImageNet's per-channel mean and standard deviation (torchvision's VGG16 weights were trained on
# images normalised by them), averaged over R, G and B: the first convolution of the pretrained
# network is the mean of the RGB filters, the same for every input channel (`_adapt_first_conv`), so
# each channel is a grey image and is normalised as one (timm does the same for one-channel input).
IMAGENET_MEAN = (0.485 + 0.456 + 0.406) / 3   # 0.449
IMAGENET_STD = (0.229 + 0.224 + 0.225) / 3    # 0.226
DOWNLOAD_TIMEOUT_S = 10.0


class VGG16(nn.Module):
    """VGG16 with batch norm optional and a configurable input channel count.

    The module layout (``features``, ``avgpool``, ``classifier`` and their
    indices) is identical to ``torchvision.models.vgg16`` / ``vgg16_bn`` so that
    ImageNet state dicts map key-for-key onto it.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        batch_norm: bool = True,
        dropout: float = 0.5,
        hidden: int = 4096,
        head: str = "fc",
        pool_sharpness: float = 5.0,
        input_mean: float = 0.0,
        input_std: float = 1.0,
        liver_gate: bool = False,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"expected head in {HEADS}, got {head!r}")
        if head == "evidence" and num_classes != 2:
            raise ValueError(f"the evidence head is binary (num_classes=2), got num_classes={num_classes}")
        if liver_gate and head != "evidence":
            raise ValueError(f"the liver gate belongs to the evidence head, got head={head!r}")
        if not pool_sharpness > 0:
            raise ValueError(f"expected pool_sharpness > 0, got {pool_sharpness}")
        if in_channels < 1:
            raise ValueError(f"expected in_channels >= 1, got {in_channels}")
        if num_classes < 1:
            raise ValueError(f"expected num_classes >= 1, got {num_classes}")
        if hidden < 1:
            raise ValueError(f"expected hidden >= 1, got {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"expected dropout in [0, 1), got {dropout}")
        if not input_std > 0:
            raise ValueError(f"expected input_std > 0, got {input_std}")
        if not 0 < width <= 1 or int(64 * width) < 1:
            raise ValueError(f"expected width in (0, 1] giving conv1 at least one channel, got {width}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.batch_norm = batch_norm
        self.hidden = hidden
        self.head = head
        self.pool_sharpness = float(pool_sharpness)
        self.liver_gate = bool(liver_gate)
        self.width = float(width)
        # The input is (x - input_mean) / input_std before the first convolution: ImageNet's values for
        # pretrained weights (recorded in the checkpoint's hyperparameters, so prediction does the same).
        self.input_mean, self.input_std = float(input_mean), float(input_std)

        layers: list[nn.Module] = []
        channels = in_channels
        for spec in CFG_D:
            if spec == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = self.channels(int(spec))
            # Bias kept even before BN (redundant there) to match torchvision's
            # vgg16_bn, whose checkpoints carry those biases.
            layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            channels = out
        self.features = nn.Sequential(*layers)
        c256, c512 = self.channels(256), self.channels(512)
        if head == "evidence":
            # As in FCN-8s (Long et al. 2015) on VGG16: scores read by 1x1 convolutions from conv5_3
            # (stride 16), conv4_3 (8) and conv3_3 (4), summed coarse to fine into one map at stride 4.
            # The shallow maps see a lesion's edge and texture, the deep one its context; the map is
            # fine enough that a lesion and the healthy liver beside it fall on different locations.
            # With the liver gate each location also gets a liver logit (second channel), read the same way.
            maps = 2 if liver_gate else 1
            self.evidence = nn.Conv2d(c512, maps, kernel_size=1)  # conv5_3
            self.evidence_skip = nn.ModuleList([nn.Conv2d(c512, maps, kernel_size=1),
                                                nn.Conv2d(c256, maps, kernel_size=1)])
            self.reset_parameters()
            # Small weights and a prior of about 5 % tumour locations: the first steps neither
            # saturate the pooled logit nor flood the map with false evidence. The liver logit starts at 0.
            for conv, bias in ((self.evidence, -3.0), (self.evidence_skip[0], 0.0), (self.evidence_skip[1], 0.0)):
                nn.init.normal_(conv.weight, 0.0, 0.01)
                nn.init.zeros_(conv.bias)
                nn.init.constant_(conv.bias[:1], bias)
            return
        # Fixed 7x7 output makes the classifier size independent of the input
        # size, so inputs other than 224 px work and ImageNet FC weights still fit.
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(c512 * 7 * 7, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        self.reset_parameters()

    def channels(self, paper: int) -> int:
        """A convolution's channel count at this width, from the paper's."""
        return int(paper * self.width)

    def reset_parameters(self) -> None:
        """Initialise like torchvision (Kaiming fan-out for convs, N(0, 0.01) for FC)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of images.

        Args:
            x: float tensor of shape (N, in_channels, H, W) with H, W >= 32.

        Returns:
            Logits of shape (N, num_classes); no softmax is applied.
        """
        if self.head == "evidence":
            return self.forward_with_evidence(x)[0]
        x = self.features(self._checked(x))  # (N, 512, H // 32, W // 32)
        x = self.avgpool(x)  # (N, 512, 7, 7)
        x = torch.flatten(x, 1)  # (N, 25088)
        return self.classifier(x)  # (N, num_classes)

    def forward_with_evidence(self, x: torch.Tensor, aux: bool = False):
        """Slice logits and the tumour evidence map they are pooled from (evidence head only).

        Args:
            x: float tensor of shape (N, in_channels, H, W) with H, W >= 32.
            aux: also return the coarser partial sums and the liver maps (for deep supervision).

        Returns:
            (logits (N, 2), evidence (N, 1, H // 4, W // 4)), and with `aux` two more elements:
            the coarser evidence maps [conv5_3's (N, 1, H // 16, W // 16), conv5_3's + conv4_3's
            (N, 1, H // 8, W // 8)], and the liver logits at the three strides, coarse to fine (each
            (N, 1, h, w); an empty list without the liver gate). All are logits. Each map is
            conv5_3's + conv4_3's + conv3_3's, each upsampled (nearest) to the next.
            With the liver gate, the tumour evidence at a location is its tumour logit t plus
            log(sigmoid(l)) of its liver logit l: the log-odds of "tumour" lowered by the log of the
            probability that the place is liver at all, so a location the network does not take for
            liver cannot make a slice tumorous however tumour-like it looks (t where l >> 0, -inf as
            l -> -inf). The slice logits are [0, s] with s the log-mean-exp of the evidence at
            sharpness r, s = log(mean(exp(r * e))) / r, between the mean (r -> 0) and the maximum
            (r -> inf) of the map, so softmax(logits)[:, 1] = sigmoid(s).
        """
        if self.head != "evidence":
            raise RuntimeError("forward_with_evidence needs head='evidence'")
        feat = self._checked(x)
        taps = []
        # All but the fifth pooling; the maps just before the third and fourth poolings are tapped.
        for layer in self.features[:-1]:
            if isinstance(layer, nn.MaxPool2d):
                taps.append(feat)  # conv1_2, conv2_2, conv3_3 (256 channels at width 1), conv4_3 (512)
            feat = layer(feat)  # ends (N, 512, H // 16, W // 16): conv5_3
        maps = [self.evidence(feat).float()]  # (N, 1 or 2, H // 16, W // 16)
        for conv, tap in zip(self.evidence_skip, (taps[3], taps[2])):
            fine = conv(tap).float()  # (N, 1 or 2, H // 8, W // 8), then (N, 1 or 2, H // 4, W // 4)
            maps.append(fine + F.interpolate(maps[-1], size=fine.shape[-2:], mode="nearest"))
        liver = [m[:, 1:] for m in maps] if self.liver_gate else []
        if self.liver_gate:
            maps = [m[:, :1] + F.logsigmoid(m[:, 1:]) for m in maps]
        evidence = maps[-1]  # (N, 1, H // 4, W // 4)
        r = self.pool_sharpness
        flat = evidence.flatten(1)  # (N, h * w)
        s = (torch.logsumexp(r * flat, dim=1) - math.log(flat.shape[1])) / r  # (N,)
        logits = torch.stack([torch.zeros_like(s), s], dim=1)
        if not aux:
            return logits, evidence
        return logits, evidence, maps[:-1], liver

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        """x checked for its shape, then normalised (input_mean, input_std)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected (N, C={self.in_channels}, H, W) input, got shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h < MIN_SIZE or w < MIN_SIZE:
            raise ValueError(
                f"expected input of at least {MIN_SIZE}x{MIN_SIZE} pixels, got {h}x{w}"
            )
        if self.input_mean != 0.0 or self.input_std != 1.0:
            x = (x - self.input_mean) / self.input_std
        return x


def imagenet_weights_url(batch_norm: bool) -> str:
    """URL of torchvision's ImageNet checkpoint for VGG16 with or without BN."""
    from torchvision.models import VGG16_BN_Weights, VGG16_Weights

    weights = VGG16_BN_Weights.IMAGENET1K_V1 if batch_norm else VGG16_Weights.IMAGENET1K_V1
    return weights.url


def imagenet_cache_path(url: str) -> str:
    """Where ``torch.hub`` keeps (or would keep) the checkpoint behind ``url``."""
    filename = os.path.basename(urlparse(url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def fetch_imagenet_state_dict(batch_norm: bool) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet VGG16 weights from the torch hub cache, downloaded there first when
    absent. Neither cached nor downloadable, or unreadable: a one-line DataError (the user's set-up,
    not a bug), which train.py reports before anything else starts."""
    url = imagenet_weights_url(batch_norm)
    path = imagenet_cache_path(url)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # torchvision names files "<name>-<sha256 prefix>.pth"; checking it
        # rejects truncated or tampered downloads before they enter the cache.
        match = re.search(r"-([a-f0-9]+)\.", os.path.basename(path))
        hash_prefix = match.group(1) if match else None
        # urllib has no timeout by default, so an offline machine behind a
        # black-holing firewall would otherwise block forever.
        previous_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            torch.hub.download_url_to_file(url, path, hash_prefix, progress=False)
        except Exception as exc:
            raise DataError(f"found no ImageNet weights at {path}, and their download from {url} failed "
                            f"({one_line(exc)}); expected them cached there or a network to fetch them once") from exc
        finally:
            socket.setdefaulttimeout(previous_timeout)
    try:
        # mmap avoids holding a second ~530 MB copy in RAM while copying.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise DataError(f"{path}: found an unreadable cached file ({type(exc).__name__}: "
                        f"{one_line(exc)[:100]}); expected torchvision's ImageNet weights (delete it to download "
                        f"them again)") from exc


def _adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Map (64, 3, 3, 3) RGB filters to (64, in_channels, 3, 3)."""
    mean = weight.mean(dim=1, keepdim=True)  # (64, 1, 3, 3)
    # Scaling by 3 / in_channels keeps the summed response equal to that of the
    # RGB filters on a gray image (R = G = B): the pretrained BN statistics and
    # later layers then see activations of the scale they were trained on.
    return mean.repeat(1, in_channels, 1, 1) * (3.0 / in_channels)


def load_imagenet_weights(model: VGG16) -> VGG16:
    """Initialise ``model`` in place from torchvision's ImageNet VGG16 weights.

    All convolutions (and BN layers when ``model.batch_norm``) and the first two
    FC layers are copied; the first convolution is adapted to
    ``model.in_channels`` (see ``_adapt_first_conv``); the last FC layer is
    copied only when ``model.num_classes == 1000`` and otherwise keeps its fresh
    initialisation; the evidence head (``head="evidence"``) keeps its fresh one. Uses the torch hub cache, downloading at most once.

    Raises:
        ValueError: the FC head's ``model.hidden`` is not 4096, or ``model.width`` is not 1, so the
            weights cannot fit.
        RuntimeError: the weights are neither cached nor downloadable, or unusable.
    """
    if model.width != 1.0:
        raise ValueError(f"ImageNet weights need width=1, got width={model.width}")
    if model.head == "fc" and model.hidden != IMAGENET_HIDDEN:
        raise ValueError(
            f"ImageNet weights need hidden={IMAGENET_HIDDEN}, got hidden={model.hidden}"
        )
    try:
        source = fetch_imagenet_state_dict(model.batch_norm)
        target = model.state_dict()
        # Checkpoints saved before PyTorch 0.4.1 (torchvision's VGG files date from
        # 2017) may lack BN num_batches_tracked; it only matters for momentum=None.
        missing = sorted(
            k for k in set(target) - set(source)
            if not k.endswith("num_batches_tracked") and not k.startswith("evidence")
        )
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} keys, e.g. {missing[0]!r}")
        last_fc = f"classifier.{len(model.classifier) - 1}." if model.head == "fc" else "evidence."
        first_conv = "features.0.weight"
        new_state: dict[str, torch.Tensor] = {}
        for key, current in target.items():
            if key.startswith(last_fc) and model.num_classes != IMAGENET_CLASSES:
                new_state[key] = current
                continue
            if key not in source:
                new_state[key] = current
                continue
            value = source[key]
            if key == first_conv:
                value = _adapt_first_conv(value.float(), model.in_channels)
            if value.shape != current.shape:
                raise RuntimeError(
                    f"{key} has shape {tuple(value.shape)} in the checkpoint, "
                    f"expected {tuple(current.shape)}"
                )
            new_state[key] = value
        model.load_state_dict(new_state, strict=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise RuntimeError(
            f"could not load ImageNet weights for VGG16: {reason}; "
            "run with network access once or drop --pretrained"
        ) from exc
    return model
