"""What prediction needs whatever the task: safe checkpoint loading, the device, batched 2.5D inference.

    ckpt = load_checkpoint("best.ckpt", "segmentation")   # weights_only: loading never runs code
    device = pick_device("auto")
    net = ckpt.network(device)                             # eval, batch norms folded, channels-last
    volume = preprocess_volume(hu, ckpt.hparams, device)   # (Z, S, S): the checkpoint's window and size
    out = infer_batched(net, volume, ckpt.hparams["context_slices"], head)

Both predict scripts are thin commands over this module (neither imports the other). The
preprocessing is `volumes.py`'s `window_hu` and `resize_slices`, the very functions training uses.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from volumes import DataError, context_indices, one_line, resize_slices, window_hu

_REQUIRED_HPARAMS = ("task", "in_channels", "window", "image_size", "context_slices")


@dataclass
class Checkpoint:
    """What a checkpoint holds for prediction: its hyperparameters and the bare network's weights."""

    path: Path
    hparams: dict
    state_dict: dict  # the network's tensors, "net." prefix removed

    def network(self, device: torch.device) -> nn.Module:
        """The network rebuilt from the hyperparameters with its weights, ready for inference on `device`:
        eval mode, batch norms folded into their convolutions, channels-last (see `prepare_for_inference`)."""
        from lit_model import build_network  # Lightning takes seconds to import: bad input is reported first
        try:
            net = build_network(self.hparams)
            net.load_state_dict(self.state_dict)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"{self.path}: weights do not fit the network its hyperparameters describe "
                            f"({one_line(exc)[:160]}); expected a checkpoint written by train.py") from None
        return prepare_for_inference(net, device)


def prepare_for_inference(net: nn.Module, device: torch.device) -> nn.Module:
    """Eval mode on `device`, each BatchNorm2d that follows a Conv2d in a Sequential folded into that
    conv, and channels-last memory layout.

    Folding is exact up to float rounding (eval-mode BN is an affine map per channel) and saves a pass
    over every activation; channels-last is the layout oneDNN (CPU) and cuDNN (CUDA) convolve fastest.
    Both measured in benchmarks/bench_predict.py (BENCHMARKS.md)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    net = net.eval()
    for module in net.modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                conv, bn = module[i], module[i + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                    module[i], module[i + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    return net.to(device).to(memory_format=torch.channels_last)


def load_checkpoint(path: str | Path, task: str) -> Checkpoint:
    """Read a Lightning checkpoint of `task` without running any code from it.

    `weights_only=True` unpickles tensors and plain containers only, so a crafted file cannot execute
    anything on load (a checkpoint may come from anywhere). Raises DataError for a missing file, a file
    that is not a checkpoint of this project (random bytes, a bare state dict, a refused pickle) or a
    checkpoint of the other task."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found; expected a .ckpt file written by train.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds for foreign or refused files
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        found = (f"a pickle that would call {refused.group(1)}, refused by the weights-only loader" if refused
                 else f"a file torch cannot load ({type(exc).__name__}: {one_line(exc)[:100]})")
        raise DataError(f"{path}: found {found}; expected a .ckpt checkpoint written by train.py") from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or not isinstance(state, dict):
        found = ("a bare state dict" if isinstance(ckpt, dict) and ckpt and
                 all(isinstance(v, torch.Tensor) for v in ckpt.values()) else f"a {type(ckpt).__name__}")
        raise DataError(f"{path}: found {found} without hyper_parameters and state_dict; expected a Lightning "
                        f"checkpoint written by train.py (it records the network and its preprocessing)")
    missing = [k for k in _REQUIRED_HPARAMS if k not in hp]
    if missing:
        raise DataError(f"{path}: hyper_parameters lack {', '.join(missing)}; expected a checkpoint written by train.py")
    if hp["task"] != task:
        raise DataError(f"{path}: found a {hp['task']} checkpoint; expected a {task} checkpoint "
                        f"(use predict_{hp['task']}.py for this one)")
    net_state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    if not net_state:
        raise DataError(f"{path}: found no 'net.' weights in its state_dict; expected a checkpoint written by train.py")
    return Checkpoint(path, dict(hp), net_state)


def pick_device(name: str) -> torch.device:
    """The device for --device: auto takes CUDA when available, else the CPU; asking for CUDA without
    one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"found --device {name} but no CUDA device is available; expected --device cpu or auto")
    return torch.device(name)


def preprocess_volume(slices, hparams: dict, device: torch.device | str = "cpu",
                      windowed: bool = False) -> torch.Tensor:
    """Slices (Z, H, W) -> (Z, S, S) float32 in [0, 1] on `device`, exactly as training prepares them:
    `window_hu` with the checkpoint's window (skipped for `windowed` input such as 8-bit PNGs), then
    `resize_slices` to its image size. The whole volume at once: one pass, on the GPU when there is one."""
    t = torch.as_tensor(slices).to(device)
    unit = t.float() if windowed else window_hu(t, hparams["window"])  # (Z, H, W)
    return resize_slices(unit, int(hparams["image_size"]), "image")  # (Z, S, S)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (fp16 where the GPU lacks bf16), nothing on the CPU: one code path for both."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def infer_batched(net: nn.Module, volume: torch.Tensor, context_slices: int,
                  head: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 32,
                  slices: Sequence[int] | None = None, lone: bool = False, desc: str | None = None) -> torch.Tensor:
    """Run `net` over the slices of a preprocessed volume (Z, S, S), `batch_size` 2.5D stacks at a time.

    Slice z goes in as the stack `context_indices(z, Z, context_slices)` (C = 2k+1 channels, the stacks
    training uses). With `lone`, each slice is an image of its own (a folder of 2D slices): it has no
    neighbours, so it stands in for them and its stack repeats it C times. `head` maps each batch of
    logits to what is kept (labels at native size, probabilities), so full logits never pile up.
    Returns the heads' outputs for `slices` (default all), in that order, on the CPU. Runs under
    inference_mode, channels-last; bf16 autocast on CUDA, float32 on the CPU."""
    device = volume.device
    num = volume.shape[0]
    zs = np.arange(num) if slices is None else np.asarray(slices, dtype=np.int64)
    channels = 2 * int(context_slices) + 1
    outputs = []
    bar = tqdm(total=len(zs), desc=desc or "slices", unit="slice", file=sys.stderr, delay=1.0, leave=False)
    try:
        with torch.inference_mode(), autocast_for(device):
            for start in range(0, len(zs), batch_size):
                batch_z = zs[start:start + batch_size]
                if lone:
                    stacks = np.repeat(batch_z[:, None], channels, axis=1)
                else:
                    stacks = np.stack([context_indices(int(z), num, int(context_slices)) for z in batch_z])
                x = volume[torch.from_numpy(stacks).to(device)]  # (B, C, S, S)
                logits = net(x.contiguous(memory_format=torch.channels_last))  # (B, classes, ...)
                outputs.append(head(logits.float()).cpu())
                bar.update(len(batch_z))
    finally:
        bar.close()
    return torch.cat(outputs)


# --------------------------------------------------------------------------------------------
# Classification: one verdict per volume, and where the classifier looked
# --------------------------------------------------------------------------------------------

VOLUME_TOP_K = 3  # slices whose mean probability is a volume's tumour score


def volume_score(probs, top_k: int = VOLUME_TOP_K) -> float:
    """A volume's tumour probability from its slices' probabilities (any 1D sequence): the mean of
    the `top_k` highest. A lesion shows on a few neighbouring slices; one stray slice moves this
    less than it would move the maximum. The same rule scores volumes in training's test metrics."""
    p = torch.as_tensor(probs, dtype=torch.float64).flatten()
    if p.numel() == 0:
        raise ValueError("a volume score needs at least one slice probability")
    return float(p.topk(min(top_k, p.numel())).values.mean())


def evidence_maps(net: nn.Module, volume: torch.Tensor, context_slices: int, slices: Sequence[int],
                  lone: bool = False) -> torch.Tensor:
    """Tumour evidence of a VGG16 with the evidence head on slices `slices` of a preprocessed volume
    (Z, S, S): sigmoid of its evidence map, upsampled (bilinear) to the slice size. Returns
    (len(slices), S, S) float32 in [0, 1] on the CPU: where the classifier saw tumour."""
    size = tuple(volume.shape[-2:])

    class _Evidence(nn.Module):
        def forward(self, x):
            return net.forward_with_evidence(x)[1]  # (B, 1, S/16, S/16) logits

    def head(evidence: torch.Tensor) -> torch.Tensor:
        up = torch.nn.functional.interpolate(evidence, size=size, mode="bilinear", align_corners=False)
        return up[:, 0].sigmoid()  # (B, S, S)

    return infer_batched(_Evidence(), volume, context_slices, head, batch_size=8, slices=slices, lone=lone)


# --------------------------------------------------------------------------------------------
# Segmentation: test-time augmentation
# --------------------------------------------------------------------------------------------

class FlipTTA(nn.Module):
    """Test-time augmentation by mirroring: the network sees each slice as it is, mirrored
    left-right and mirrored top-bottom; the three softmax outputs, mirrored back, are averaged.
    Returns log-probabilities (B, classes, H, W), which argmax like logits. Three times the work."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prob = self.net(x).float().softmax(dim=1)
        for dims in ((-1,), (-2,)):
            prob = prob + self.net(x.flip(dims)).float().softmax(dim=1).flip(dims)
        return (prob / 3).clamp_min(1e-12).log()
