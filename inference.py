"""What prediction needs whatever the task: safe checkpoint loading, the device, batched 2.5D inference,
and segmentation's fast path.

    ckpt = load_checkpoint("best.ckpt", "segmentation")   # weights_only: loading never runs code
    device = pick_device("auto")
    net = ckpt.network(device)                             # eval, batch norms folded, channels-last
    labels = segment(net, hu, ckpt.hparams, device)        # (Z, H, W) uint8: the fast path
    labels = segment(net, hu, ckpt.hparams, device, fast=False)   # every slice, float32 on a CPU
    labels = postprocess(labels)                           # largest liver component, tumour in liver
    probs = classify(net, hu, ckpt.hparams, device)        # (Z,) tumour probability of every slice
    volume = preprocess_volume(hu, ckpt.hparams, device)   # (Z, S, S): the checkpoint's window and size
    out = infer_batched(net, volume, ckpt.hparams["context_slices"], head)

Both predict scripts and report.py are thin commands over this module (none imports another), and
nothing here imports Lightning (seconds of start-up a prediction need not pay). The preprocessing is `volumes.py`'s
`window_hu` and `resize_slices`, the very functions training uses.
"""
from __future__ import annotations

import ctypes
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from volumes import DataError, context_indices, int_at_least, one_line, resize_slices, window_hu

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
        try:
            net = build_network(self.hparams)
            net.load_state_dict(self.state_dict)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"{self.path}: weights do not fit the network its hyperparameters describe "
                            f"({one_line(exc)[:160]}); expected a checkpoint written by train.py") from None
        return prepare_for_inference(net, device)


# Hyperparameters a checkpoint may lack, by task, each at the value every network had before checkpoints
# recorded it: absent means that value, when a network is rebuilt (`build_network`) and when a checkpoint
# is compared with the flags of a run that would resume it (`load_checkpoint`'s `expected`).
LEGACY_HPARAMS = {
    "classification": {"head": "fc",            # before the evidence head
                       "pool_sharpness": 5.0,   # before it was recorded
                       "liver_gate": False,     # before the liver gate
                       "width": 1.0},           # before the width multiplier
    "segmentation": {"deep_supervision": 0},    # before the U-Net's deep supervision (decoder levels)
}


def hparam(hparams: dict, name: str):
    """A checkpoint's hyperparameter, or the value it had before checkpoints recorded it (`LEGACY_HPARAMS`)."""
    return hparams[name] if name in hparams else LEGACY_HPARAMS[hparams["task"]][name]


def build_network(hparams: dict) -> nn.Module:
    """The bare network of a task from a checkpoint's hyperparameters, without Lightning.

    The one definition: `lit_model` builds its networks with it too. It lives here, Lightning-free,
    because importing Lightning costs about 2 s of start-up on a CPU, a tenth of the fast path's run."""
    hp = dict(hparams)
    if hp["task"] == "classification":
        from vgg16 import VGG16
        return VGG16(in_channels=hp["in_channels"], num_classes=hp["num_classes"], batch_norm=hp["batch_norm"],
                     dropout=hp["dropout"], hidden=hp["hidden"], head=hparam(hp, "head"),
                     pool_sharpness=hparam(hp, "pool_sharpness"), liver_gate=hparam(hp, "liver_gate"),
                     width=hparam(hp, "width"),
                     # Absent or None: no normalisation, as before pretrained weights brought ImageNet's.
                     input_mean=hp.get("input_mean") or 0.0, input_std=hp.get("input_std") or 1.0)
    if hp["task"] == "segmentation":
        from unet import UNet
        return UNet(in_channels=hp["in_channels"], num_classes=hp["num_classes"], base_width=hp["base_width"],
                    depth=hp["depth"], upsampling=hp["upsampling"], attention=hp["attention"])
    raise ValueError(f"unknown task {hp['task']!r}; expected 'classification' or 'segmentation'")


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


def load_checkpoint(path: str | Path, task: str, flag: str | None = None,
                    expected: dict[str, tuple[str, object]] | None = None) -> Checkpoint:
    """Read a Lightning checkpoint of `task` without running any code from it.

    `weights_only=True` unpickles tensors and plain containers only, so a crafted file cannot execute
    anything on load (a checkpoint may come from anywhere). Raises DataError for a missing file, a file
    that is not a checkpoint of this project (random bytes, a bare state dict, a refused pickle) or a
    checkpoint of the other task. `flag` names the command-line flag that gave the path, for a command
    that takes both tasks' checkpoints (report.py): the message then names the flag, not a script.
    `expected` maps hyperparameters to (the flag that sets them, the value it gives): a checkpoint that
    recorded another value is refused, naming each such flag (train.py's --resume: a network of another
    shape, or other preprocessing, cannot go on training). A hyperparameter it did not record is compared
    at the value it had before checkpoints recorded it (`LEGACY_HPARAMS`), or not at all when it has none."""
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
    # The task first: a checkpoint of the other task is the likelier mistake than a damaged one.
    if "task" in hp and hp["task"] != task:
        hint = (f"given as {flag}" if flag else f"use predict_{hp['task']}.py for this one")
        raise DataError(f"{path}: found a {hp['task']} checkpoint; expected a {task} checkpoint ({hint})")
    missing = [k for k in _REQUIRED_HPARAMS if k not in hp]
    if missing:
        raise DataError(f"{path}: hyper_parameters lack {', '.join(missing)}; expected a checkpoint written by train.py")
    known = {**LEGACY_HPARAMS.get(hp["task"], {}), **hp}  # what it recorded, else its value from before
    differ = [(name, known[name], value) for name, (_, value) in (expected or {}).items()
              if name in known and _plain(known[name]) != _plain(value)]
    if differ:
        flags = dict((name, f) for name, (f, _) in expected.items())
        raise DataError(f"{path}: found a checkpoint of {', '.join(f'{flags[n]} {_shown(v)}' for n, v, _ in differ)}; "
                        f"expected {', '.join(f'{flags[n]} {_shown(w)}' for n, _, w in differ)} as given "
                        f"(give the values it was trained with)")
    net_state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    if not net_state:
        raise DataError(f"{path}: found no 'net.' weights in its state_dict; expected a checkpoint written by train.py")
    return Checkpoint(path, dict(hp), net_state)


def _plain(value):
    """A hyperparameter comparable whatever container it was saved in (a window as list or tuple)."""
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else value


def _shown(value) -> str:
    """A hyperparameter as a command line would give it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(f"{float(v):g}" for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def pick_device(name: str) -> torch.device:
    """The device for --device: auto takes CUDA when available, else the CPU; asking for CUDA without
    one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"found --device {name} but no CUDA device is available; expected --device cpu or auto")
    return torch.device(name)


def add_runtime_flags(p, batch_help: str) -> None:
    """--device, --batch-size and --threads of a prediction command, as `runtime` reads them."""
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto takes CUDA when available (default: auto)")
    p.add_argument("--batch-size", type=int_at_least(1), default=None, help=batch_help)
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="CPU threads for torch (default: the cores this process may run on, as torch counts them)")


def runtime(device_name: str, batch_size: int | None, threads: int | None) -> tuple[torch.device, int]:
    """The device and batch size of a prediction command from its --device, --batch-size and --threads
    (checked, one line each for a bad value); sets torch's CPU threads when asked. The batch size
    defaults to 32 slices on CUDA and 8 on a CPU, where larger batches run slower (BENCHMARKS.md)."""
    if batch_size is not None and batch_size < 1:
        raise DataError(f"found --batch-size {batch_size}; expected 1 or more")
    if threads is not None:
        if threads < 1:
            raise DataError(f"found --threads {threads}; expected 1 or more")
        torch.set_num_threads(threads)
    device = pick_device(device_name)
    keep_freed_memory()
    return device, batch_size or (32 if device.type == "cuda" else 8)


KEEP_FREED_BYTES = 1 << 30  # blocks up to 1 GiB stay with the process once freed


def keep_freed_memory(limit: int = KEEP_FREED_BYTES) -> bool:
    """Let glibc's malloc keep freed blocks of up to `limit` bytes for the next allocation instead of
    handing each back to the kernel. By default a large block (above 128 KiB at first, above 32 MiB
    at most: an activation of a forward pass) is mapped fresh and unmapped on free, so each forward
    faults its memory in anew, 4 KiB at a time: on the 2-core VM of BENCHMARKS.md a 512x512x200
    --exact run took 5 million page faults, 9 s of system time and 19 s; 14 s with these settings
    (a training epoch at 256², one core: 27.6 million faults, 4:24 min; 0.75 million, 3:40 min).
    PyTorch's performance tuning guide ("Switch Memory allocator") advises the same by swapping the
    allocator (jemalloc or tcmalloc through LD_PRELOAD); two mallopt settings get it in-process. The
    price: the resident size stays at its peak. Returns whether the settings took (False off glibc:
    macOS, Windows, musl)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (ValueError, OSError, AttributeError):  # no such confstr name, no dlopen(NULL), no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, limit)) and bool(mallopt(m_trim_threshold, limit))


def preprocess_volume(slices, hparams: dict, device: torch.device | str = "cpu",
                      windowed: bool = False, chunk: int = 32) -> torch.Tensor:
    """Slices (Z, H, W) -> (Z, S, S) float32 in [0, 1] on `device`, exactly as training prepares them:
    `window_hu` with the checkpoint's window (skipped for `windowed` input such as 8-bit PNGs), then
    `resize_slices` to its image size. `chunk` slices at a time: both steps work slice by slice, and
    a windowed copy of a whole 512x512x500 volume would hold another 0.5 GB at the peak. `slices` may
    be a tensor or a numpy array of any dtype, byte order and strides (`volumes.load_volume(dtype=None)`):
    a numpy chunk becomes float32 as it is copied, as `load_volume` would have made it."""
    size = int(hparams["image_size"])
    num = len(slices)
    out = torch.empty((num, size, size), dtype=torch.float32, device=device)
    for start in range(0, num, chunk):
        part = slices[start:start + chunk]
        t = torch.as_tensor(np.ascontiguousarray(part, dtype=np.float32) if isinstance(part, np.ndarray) else part)
        t = t.to(device)
        unit = t.float() if windowed else window_hu(t, hparams["window"])  # (c, H, W)
        out[start:start + chunk] = resize_slices(unit, size, "image")  # (c, S, S)
    return out


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). There, bf16 autocast runs the
    U-Net about twice as fast as float32 (BENCHMARKS.md); elsewhere bf16 is emulated and slower, so
    float32 stays."""
    try:
        caps = torch._C._cpu._get_cpu_capability()  # private, hence the guard: absent means no
    except Exception:
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def autocast_for(device: torch.device, cpu_bf16: bool = False):
    """bf16 autocast on CUDA (fp16 where the GPU lacks bf16); on the CPU bf16 autocast with `cpu_bf16`,
    else nothing (float32): one code path for both."""
    if device.type != "cuda":
        return torch.autocast("cpu", dtype=torch.bfloat16) if cpu_bf16 else nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def infer_batched(net: nn.Module, volume: torch.Tensor, context_slices: int,
                  head: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 32,
                  slices: Sequence[int] | None = None, lone: bool = False, desc: str | None = None,
                  cpu_bf16: bool = False) -> torch.Tensor:
    """Run `net` over the slices of a preprocessed volume (Z, S, S), `batch_size` 2.5D stacks at a time.

    Slice z goes in as the stack `context_indices(z, Z, context_slices)` (C = 2k+1 channels, the stacks
    training uses). With `lone`, each slice is an image of its own (a folder of 2D slices): it has no
    neighbours, so it stands in for them and its stack repeats it C times. `head` maps each batch of
    logits to what is kept (labels at native size, probabilities), so full logits never pile up.
    Returns the heads' outputs for `slices` (default all), in that order, on the CPU. Runs under
    inference_mode, channels-last; bf16 autocast on CUDA, on the CPU float32 (bf16 with `cpu_bf16`).
    The slices may be any size (a crop of the model's grid, a smaller copy): the networks are fully
    convolutional, or pool globally."""
    device = volume.device
    num = volume.shape[0]
    zs = np.arange(num) if slices is None else np.asarray(slices, dtype=np.int64)
    channels = 2 * int(context_slices) + 1
    outputs = []
    bar = tqdm(total=len(zs), desc=desc or "slices", unit="slice", file=sys.stderr, delay=1.0, leave=False)
    try:
        with torch.inference_mode(), autocast_for(device, cpu_bf16):
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


def volume_threshold(hparams: dict) -> float | None:
    """The threshold of a volume's verdict (tumour when its `volume_score` over all its slices reaches
    it), chosen by train.py on its validation volumes scored by that same rule. None for a checkpoint
    without one: written before train.py chose it (those applied the slice threshold to the volume
    score, a pairing never validated), or whose validation volumes held one class only."""
    value = hparams.get("volume_threshold")
    return None if value is None or math.isnan(float(value)) else float(value)


def tumor_probability(logits: torch.Tensor) -> torch.Tensor:
    """Logits (B, 2) -> probability of class 1, tumour (B,)."""
    return logits.softmax(dim=1)[:, 1]


def classify(net: nn.Module, slices, hparams: dict, device: torch.device | str = "cpu", batch_size: int = 32,
             which: Sequence[int] | None = None, windowed: bool = False, lone: bool = False,
             desc: str | None = None, cpu_bf16: bool = False) -> np.ndarray:
    """Slices (Z, H, W) in HU (or [0, 1] when `windowed`) -> the classifier's tumour probability of each
    of slices `which` (default all), (len(which),) float32, preprocessed as training did (the
    checkpoint's window, size and 2.5D stacks; `lone` 2D images stand in for their own neighbours).
    float32 on a CPU unless `cpu_bf16` (the caller decides: about twice as fast where the CPU has
    native bf16, BENCHMARKS.md)."""
    volume = preprocess_volume(slices, hparams, device, windowed)  # (Z, S, S)
    return infer_batched(net, volume, hparams["context_slices"], tumor_probability, batch_size, which, lone,
                         desc, cpu_bf16=cpu_bf16).numpy()


def evidence_maps(net: nn.Module, volume: torch.Tensor, context_slices: int, slices: Sequence[int],
                  lone: bool = False) -> torch.Tensor:
    """Tumour evidence of a VGG16 with the evidence head on slices `slices` of a preprocessed volume
    (Z, S, S): sigmoid of its evidence map, upsampled (bilinear) to the slice size. Returns
    (len(slices), S, S) float32 in [0, 1] on the CPU: where the classifier saw tumour."""
    size = tuple(volume.shape[-2:])

    class _Evidence(nn.Module):
        def forward(self, x):
            return net.forward_with_evidence(x)[1]  # (B, 1, S/4, S/4) logits

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


# --------------------------------------------------------------------------------------------
# Segmentation: every slice (the exact path), or the liver's region found first (the fast path)
# --------------------------------------------------------------------------------------------

# The fast path's settings, chosen by measurement (BENCHMARKS.md, "Fast prediction on a CPU").
COARSE_FACTOR = 2      # the coarse pass sees slices at 1/COARSE_FACTOR of the model's size ...
COARSE_STRIDE = 8      # ... every COARSE_STRIDE-th slice
MARGIN_PX = 24         # in-plane margin around the liver, in pixels of the model's grid (S x S)
GROW_WITHIN_PX = 4     # a crop grows where the liver comes this close to its side
MARGIN_SLICES = 2      # margin beyond the liver's first and last slice, besides the coarse stride
CONFIRM_STRIDE = 4     # no liver in the coarse pass: every CONFIRM_STRIDE-th slice is looked at again at full size
BACKGROUND_LOGIT = 30.0  # outside the region the logits say background by this much


def label_head(size: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits (B, 3, S, S) -> labels (B, H, W) uint8: bilinear upsampling of the logits to the native
    slice size, then argmax (smoother borders than upsampling the labels)."""
    size = tuple(int(s) for s in size)

    def head(logits: torch.Tensor) -> torch.Tensor:
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # (B, 3, H, W)
        return argmax3(logits)  # (B, H, W)
    return head


def argmax3(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=1)` as uint8, ties to the first class as argmax breaks them, for 3 classes by
    two comparisons. On this project's CPU, for 8 slices of 512x512: 0.015 s, against torch's argmax
    0.03 s on channels-last logits and 0.15 s on channels-first ones (about 5 s per volume).
    Other class counts take argmax."""
    if logits.shape[1] != 3:
        return logits.argmax(dim=1).to(torch.uint8)
    l0, l1, l2 = logits.unbind(dim=1)  # (B, H, W) each
    labels = ((l1 > l0) & (l1 >= l2)).to(torch.uint8)
    labels[(l2 > l0) & (l2 > l1)] = 2
    return labels


@dataclass(frozen=True)
class Box:
    """A block of a preprocessed volume (Z, S, S): slices z0..z1-1, rows y0..y1-1, columns x0..x1-1."""

    z0: int
    z1: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def plane(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def _lower_out(lo, margin: int, align: int):
    """A lower end (int or int array) moved `margin` down, rounded down to a multiple of `align`, not
    below 0. Aligned ends put a crop on the pooling grid of the full slice, so away from its border a
    crop's logits are the full slice's."""
    return np.maximum(0, (lo - margin) // align * align)


def _upper_out(hi, margin: int, align: int, limit: int):
    """An exclusive upper end (int or int array) moved `margin` up, rounded up to a multiple of `align`,
    not above `limit`."""
    return np.minimum(limit, -(-(hi + margin) // align) * align)


def _widen(lo: int, hi: int, margin: int, align: int, limit: int) -> tuple[int, int]:
    """[lo, hi) widened by `margin` each side, ends rounded outward to multiples of `align`, clipped to
    [0, limit]."""
    return int(_lower_out(lo, margin, align)), int(_upper_out(hi, margin, align, limit))


def region_from_mask(liver, zs: Sequence[int], num_slices: int, size: int, scale: float = 1.0,
                     margin_px: int = MARGIN_PX, margin_slices: int = MARGIN_SLICES, align: int = 1) -> Box | None:
    """The block of a (num_slices, size, size) volume to segment at full resolution, from a liver mask.

    `liver` (N, h, w) bool holds slices `zs` (N increasing indices) of the volume, each `scale` times
    smaller than `size` in-plane (a coarse pass; a pixel k covers [k * scale, (k + 1) * scale)). The block spans the liver's slices plus
    `margin_slices` plus the gap to the next unseen slice on each side (the liver may continue
    there), and its in-plane box plus `margin_px`, rounded outward to multiples of `align`; all
    clipped to the volume. Returns None when the mask holds no liver."""
    liver = np.asarray(liver, dtype=bool)
    zs = np.asarray(zs, dtype=np.int64)
    if liver.ndim != 3 or len(zs) != len(liver):
        raise ValueError(f"expected a mask (N, h, w) and N slice indices, got {liver.shape} and {len(zs)}")
    has = np.flatnonzero(liver.any(axis=(1, 2)))
    if has.size == 0:
        return None
    first, last = int(has[0]), int(has[-1])
    below = int(zs[first] - zs[first - 1]) - 1 if first > 0 else int(zs[first])  # unseen slices below
    above = int(zs[last + 1] - zs[last]) - 1 if last + 1 < len(zs) else num_slices - 1 - int(zs[last])
    z0 = max(0, int(zs[first]) - below - margin_slices)
    z1 = min(num_slices, int(zs[last]) + 1 + above + margin_slices)
    rows = np.flatnonzero(liver.any(axis=(0, 2)))
    cols = np.flatnonzero(liver.any(axis=(0, 1)))
    y0, y1 = _widen(math.floor(rows[0] * scale), math.ceil((rows[-1] + 1) * scale), margin_px, align, size)
    x0, x1 = _widen(math.floor(cols[0] * scale), math.ceil((cols[-1] + 1) * scale), margin_px, align, size)
    return Box(z0, z1, y0, y1, x0, x1)


def slice_boxes(liver, zs: Sequence[int], z0: int, z1: int, size: int, scale: float = 1.0,
                margin_px: int = MARGIN_PX, align: int = 1) -> np.ndarray:
    """In-plane boxes (z1 - z0, 4) as (y0, y1, x0, x1) on a size x size grid, one per slice z0..z1-1,
    from a liver mask `liver` (N, h, w) on slices `zs` (N increasing indices), `scale` times smaller.

    Slice z gets the union of the liver's boxes on the nearest sampled slice at or below z that shows
    liver and the nearest at or above (one of them past the liver's ends), widened by `margin_px` and
    rounded outward to multiples of `align`, clipped to the grid: the liver's cross-section changes
    along z, and one box for every slice would be the largest one. The mask must hold liver."""
    liver = np.asarray(liver, dtype=bool)
    seen = np.flatnonzero(liver.any(axis=(1, 2)))
    if seen.size == 0:
        raise ValueError("slice_boxes needs a mask that holds liver")
    at = np.asarray(zs, dtype=np.int64)[seen]
    boxes = np.empty((len(seen), 4), dtype=np.int64)
    for i, k in enumerate(seen):
        rows, cols = np.flatnonzero(liver[k].any(axis=1)), np.flatnonzero(liver[k].any(axis=0))
        boxes[i] = (math.floor(rows[0] * scale), math.ceil((rows[-1] + 1) * scale),
                    math.floor(cols[0] * scale), math.ceil((cols[-1] + 1) * scale))
    z = np.arange(z0, z1)
    below = np.clip(np.searchsorted(at, z, side="right") - 1, 0, len(at) - 1)  # a missing side: the other one
    above = np.clip(np.searchsorted(at, z, side="left"), 0, len(at) - 1)
    out = np.stack([np.minimum(boxes[below, 0], boxes[above, 0]), np.maximum(boxes[below, 1], boxes[above, 1]),
                    np.minimum(boxes[below, 2], boxes[above, 2]), np.maximum(boxes[below, 3], boxes[above, 3])], 1)
    out[:, 0::2] = _lower_out(out[:, 0::2], margin_px, align)
    out[:, 1::2] = _upper_out(out[:, 1::2], margin_px, align, size)
    return out


_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity in 3D (8 in a single slice)


def largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest 26-connected component of a 3D boolean mask, as a mask of the same shape; None when
    the mask is empty."""
    from scipy import ndimage
    comps, n = ndimage.label(mask, structure=_FULL)
    if n == 0:
        return None
    sizes = np.bincount(comps.ravel())
    sizes[0] = 0
    return comps == int(sizes.argmax())


def _placed_head(box: Box, grid: int, size: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits of a crop (B, 3, h, w) -> labels (B, H, W) of the whole slice: the crop's logits are put
    back at `box`'s place on the model's grid (grid x grid), background everywhere else, then upsampled
    and argmaxed as the full slice's would be (`label_head`), so every voxel lands where --exact puts it."""
    whole = label_head(size)

    def head(logits: torch.Tensor) -> torch.Tensor:
        # Channels-last like the network's own output: bilinear upsampling runs about twice as fast so.
        canvas = logits.new_full((logits.shape[0], logits.shape[1], grid, grid), -BACKGROUND_LOGIT)
        canvas = canvas.contiguous(memory_format=torch.channels_last)
        canvas[:, 0] = BACKGROUND_LOGIT
        canvas[(slice(None), slice(None), *box.plane)] = logits
        return whole(canvas)  # (B, H, W)
    return head


@dataclass
class FastInfo:
    """What the fast path did to one volume: the bounding block of what it segmented at full
    resolution (None: no liver found, neither by the coarse pass nor by the second look at every
    CONFIRM_STRIDE-th slice at full resolution; the labels are all background), how many slices
    each pass ran (a slice run again on a wider crop counts again, so the full-resolution count can
    exceed the block's slices), how many times the block grew
    because the liver reached its edge, the share of the volume's model-grid voxels inside the final
    crops, whether it ran in bf16, and how many slices the second look at full resolution saw (0: the
    coarse pass found the liver)."""

    box: Box | None
    coarse_slices: int
    full_slices: int
    grown: int
    bf16: bool
    share: float = 1.0
    second_look: int = 0

    def summary(self, num_slices: int) -> dict:
        """What the fast path did, for a report: slices through each pass, the share of the volume's
        model-grid voxels inside the full-resolution crops, and how often the block had to grow."""
        block = 0 if self.box is None else self.box.z1 - self.box.z0
        return {"slices": num_slices, "coarse_slices": self.coarse_slices, "full_resolution_slices": self.full_slices,
                "block_slices": block, "share_of_volume": round(self.share, 4), "liver_found": self.box is not None,
                "grown": self.grown, "bf16": self.bf16, "second_look_slices": self.second_look}


def fast_path_slices(summary: dict) -> str:
    """'N of M slices' of a `FastInfo.summary`: the slices of the block segmented at full resolution,
    and how many of them ran again on a wider crop, for a printout or a report."""
    if not summary.get("liver_found", True):
        return (f"{summary['second_look_slices']} of {summary['slices']} slices (every {CONFIRM_STRIDE}th; "
                "no liver found, all background)")
    rerun = summary["full_resolution_slices"] - summary["block_slices"]
    return f"{summary['block_slices']} of {summary['slices']} slices" + (
        f" ({rerun} run again on a wider crop)" if rerun > 0 else "")


def segment(net: nn.Module, slices, hparams: dict, device: torch.device | str = "cpu", fast: bool = True,
            batch_size: int = 8, which: Sequence[int] | None = None, windowed: bool = False, lone: bool = False,
            desc: str | None = None, cpu_bf16: bool | None = None, info: list | None = None) -> np.ndarray:
    """Slices (Z, H, W) in HU (or [0, 1] when `windowed`) -> labels (len(which), H, W) uint8 in {0, 1, 2}
    (all Z slices when `which` is None), on the slices' own grid.

    `fast=False` is the exact path: every slice at the checkpoint's full resolution, float32 on a CPU
    (bf16 on CUDA, as always). `fast=True` (the default) on a whole volume: `fast_segment` (a coarse
    pass finds the liver, the full network runs on its region only); on chosen slices (`which`) or
    lone 2D images, every one of them at full resolution. Both fast forms use bf16 on a CPU that
    computes it natively (`cpu_bf16=None` asks `cpu_has_fast_bf16`). `info`, a list, receives the
    fast path's `FastInfo`."""
    device = torch.device(device)
    bf16 = bool(fast and (cpu_has_fast_bf16() if cpu_bf16 is None else cpu_bf16))
    volume = preprocess_volume(slices, hparams, device, windowed)  # (Z, S, S)
    size = np.shape(slices)[1:]
    if fast and which is None and not lone and hparams.get("task", "segmentation") == "segmentation":
        labels, found = fast_segment(net, volume, hparams, size, batch_size, bf16, desc)
        if info is not None:
            info.append(found)
        return labels
    labels = infer_batched(net, volume, hparams["context_slices"], label_head(size), batch_size, which, lone,
                           desc, cpu_bf16=bf16)
    return labels.numpy()


def fast_segment(net: nn.Module, volume: torch.Tensor, hparams: dict, size: Sequence[int], batch_size: int = 8,
                 cpu_bf16: bool = False, desc: str | None = None) -> tuple[np.ndarray, FastInfo]:
    """Labels (Z, H, W) uint8 of a preprocessed volume (Z, S, S) whose slices are (H, W) natively, with
    the full-resolution network run only where the liver is.

    1. Coarse pass (`_coarse_liver`): the same network on every COARSE_STRIDE-th slice (from COARSE_STRIDE // 2),
       shrunk COARSE_FACTOR times: at the defaults a quarter of the arithmetic per slice on a
       quarter of the slices, 1/16 of a full pass.
    2. `region_from_mask` turns its liver's largest 3D component into the block of slices to
       segment, `slice_boxes` into each slice's in-plane crop (the liver's box on the nearest
       sampled slices, with a margin, on the U-Net's pooling grid); the full network runs on each
       slice's crop (`_segment_crops`), its logits put back in place (`_placed_head`); outside the crops everything is
       background.
    3. The block grows (`_grow`) while the full-resolution liver's largest 3D component touches its edge: by
       MARGIN_SLICES + the stride where it reaches an end slice, and a slice's crop by MARGIN_PX at
       each side its liver comes within GROW_WITHIN_PX of (that slice then runs again; the others
       keep their answer, their crop held their liver and its margin). A component that ends inside
       the block is whole, so the largest one, which `postprocess` keeps, is the one --exact keeps,
       unless the coarse pass missed a separate larger one.
    No liver in the coarse pass (a scan without liver, or a network that does not recognise it at half
    size): the network looks again at full resolution on every CONFIRM_STRIDE-th slice; liver there
    places the block as in 2, none leaves the volume background. A liver on fewer than CONFIRM_STRIDE
    consecutive slices can be missed that way; --exact looks at every slice. Returns the labels and a FastInfo."""
    num, grid = volume.shape[0], volume.shape[-1]
    context = hparams["context_slices"]
    align = 2 ** int(hparams.get("depth", 4))
    zs, liver, scale = _coarse_liver(net, volume, context, align, batch_size, cpu_bf16, desc)
    coarse_slices, looked_again = len(zs), 0
    if liver is None:
        zs = np.arange(min(CONFIRM_STRIDE // 2, num - 1), num, CONFIRM_STRIDE)
        found = infer_batched(net, volume, context, lambda logits: logits.argmax(dim=1) >= 1, batch_size, zs,
                              desc=f"{desc or 'volume'}: no liver at half size, looking again", cpu_bf16=cpu_bf16)
        liver, scale, looked_again = largest_component(found.numpy()), 1.0, len(zs)
    box = None if liver is None else region_from_mask(liver, zs, num, grid, scale, MARGIN_PX, MARGIN_SLICES, align)
    labels = np.zeros((num, *size), dtype=np.uint8)
    if box is None:
        return labels, FastInfo(None, coarse_slices, 0, 0, cpu_bf16, looked_again / max(num, 1), looked_again)
    z0, z1 = box.z0, box.z1
    planes = np.zeros((num, 4), dtype=np.int64)  # per slice (y0, y1, x0, x1); used on z0..z1-1
    planes[z0:z1] = slice_boxes(liver, zs, z0, z1, grid, scale, MARGIN_PX, align)

    def run(zlist: np.ndarray) -> int:
        return _segment_crops(net, volume, labels, planes, zlist, context, size, batch_size, cpu_bf16, desc)

    full_slices, grown = run(np.arange(z0, z1)), 0
    while True:
        new_z0, new_z1, fresh = _grow(labels, planes, z0, z1, grid, size, align)
        if fresh.size == 0:
            break
        z0, z1, grown = new_z0, new_z1, grown + 1
        full_slices += run(fresh)
    p = planes[z0:z1]
    box = Box(z0, z1, int(p[:, 0].min()), int(p[:, 1].max()), int(p[:, 2].min()), int(p[:, 3].max()))
    share = float(((p[:, 1] - p[:, 0]) * (p[:, 3] - p[:, 2])).sum()) / (num * grid * grid)
    return labels, FastInfo(box, coarse_slices, full_slices, grown, cpu_bf16, share, looked_again)


def _coarse_liver(net: nn.Module, volume: torch.Tensor, context: int, align: int, batch_size: int, cpu_bf16: bool,
                  desc: str | None) -> tuple[np.ndarray, np.ndarray | None, float]:
    """The fast path's step 1: the network on every COARSE_STRIDE-th slice of a preprocessed volume
    (Z, S, S), shrunk COARSE_FACTOR times. Returns the slices it saw (N,), their liver's largest 3D
    component (N, s, s) bool (None: no liver), and how many model pixels a coarse pixel spans."""
    num, grid = volume.shape[0], volume.shape[-1]
    coarse_size = max(align, grid // COARSE_FACTOR)
    zs = np.arange(min(COARSE_STRIDE // 2, num - 1), num, COARSE_STRIDE)
    coarse = resize_slices(volume, coarse_size, "image")  # (Z, s, s)
    liver = infer_batched(net, coarse, context, lambda logits: logits.argmax(dim=1) >= 1, batch_size, zs,
                          desc=f"{desc or 'volume'}: finding the liver", cpu_bf16=cpu_bf16)  # (len(zs), s, s)
    # Only the coarse liver's largest component: a speck of false liver far from the liver would
    # otherwise stretch the block over the slices between them (and its crops to the speck). A true
    # piece of liver left out here still joins through step 3, where it touches the block.
    return zs, largest_component(liver.numpy()), grid / coarse_size


def _segment_crops(net: nn.Module, volume: torch.Tensor, labels: np.ndarray, planes: np.ndarray, zlist: np.ndarray,
                   context: int, size: Sequence[int], batch_size: int, cpu_bf16: bool, desc: str | None) -> int:
    """Slices `zlist` of a preprocessed volume (Z, S, S) through the full network, each on its crop
    `planes[z]` (y0, y1, x0, x1), their labels written into `labels` (Z, H, W); slices that share a
    crop share the batches. Returns how many slices ran."""
    grid = volume.shape[-1]
    crops, which = np.unique(planes[zlist], axis=0, return_inverse=True)
    for k, (y0, y1, x0, x1) in enumerate(crops.tolist()):
        group = zlist[which.ravel() == k]
        crop = Box(0, 0, y0, y1, x0, x1)
        labels[group] = infer_batched(net, volume[(slice(None), *crop.plane)], context,
                                      _placed_head(crop, grid, size), batch_size, group, desc=desc,
                                      cpu_bf16=cpu_bf16).numpy()
    return len(zlist)


def _grow(labels: np.ndarray, planes: np.ndarray, z0: int, z1: int, grid: int, size: Sequence[int],
          align: int) -> tuple[int, int, np.ndarray]:
    """The fast path's step 3, once, on the labels (Z, H, W) of the block z0..z1-1 and its crops
    `planes` (Z, 4) as (y0, y1, x0, x1) on the model's grid x grid: a crop's side that the liver's
    largest 3D component comes within GROW_WITHIN_PX of moves out by MARGIN_PX; at an end slice that
    holds liver the block goes on by MARGIN_SLICES + the coarse stride, each new slice with that end's
    crop (both written into `planes`). Returns the block's new ends and the slices to run (again):
    the touched ones and the new ones; none once the block holds the liver."""
    num, near = len(planes), GROW_WITHIN_PX
    rows_per_px, cols_per_px = size[0] / grid, size[1] / grid
    # Only the liver's largest 3D component decides (the one `postprocess` keeps): specks of
    # false liver near an edge must not drag the block over the whole volume.
    p = planes[z0:z1]  # a view: widening below edits `planes`
    r0, c0 = math.floor(p[:, 0].min() * rows_per_px), math.floor(p[:, 2].min() * cols_per_px)
    r1, c1 = math.ceil(p[:, 1].max() * rows_per_px), math.ceil(p[:, 3].max() * cols_per_px)
    liver3d = largest_component(labels[z0:z1, r0:r1, c0:c1] >= 1)  # (z, r, c) in the block's window
    if liver3d is None:
        return z0, z1, np.zeros(0, dtype=np.int64)
    rows, cols = liver3d.any(axis=2), liver3d.any(axis=1)  # (z, r), (z, c)
    has = rows.any(axis=1)
    # Each slice's liver extent on the model grid, then the sides it comes within `near` of.
    top = (rows.argmax(axis=1) + r0) / rows_per_px
    bottom = (rows.shape[1] - rows[:, ::-1].argmax(axis=1) + r0) / rows_per_px
    left = (cols.argmax(axis=1) + c0) / cols_per_px
    right = (cols.shape[1] - cols[:, ::-1].argmax(axis=1) + c0) / cols_per_px
    sides = [has & (p[:, 0] > 0) & (top < p[:, 0] + near), has & (p[:, 1] < grid) & (bottom > p[:, 1] - near),
             has & (p[:, 2] > 0) & (left < p[:, 2] + near), has & (p[:, 3] < grid) & (right > p[:, 3] - near)]
    for j, side in enumerate(sides):
        p[side, j] = (_lower_out(p[side, j], MARGIN_PX, align) if j % 2 == 0
                      else _upper_out(p[side, j], MARGIN_PX, align, grid))
    touched = np.flatnonzero(sides[0] | sides[1] | sides[2] | sides[3]) + z0
    # Beyond an end slice that holds liver the block goes on, each new slice with that end's crop.
    step = COARSE_STRIDE
    new_z0 = max(0, z0 - MARGIN_SLICES - step) if z0 > 0 and has[0] else z0
    new_z1 = min(num, z1 + MARGIN_SLICES + step) if z1 < num and has[-1] else z1
    planes[new_z0:z0], planes[z1:new_z1] = planes[z0], planes[z1 - 1]
    # Slices whose liver stayed clear of every side keep their answer: their crop held all of
    # their liver with its margin. The touched ones, and the new ones, run on their wider crops.
    fresh = np.concatenate([np.arange(new_z0, z0), touched, np.arange(z1, new_z1)]).astype(np.int64)
    return new_z0, new_z1, fresh


# --------------------------------------------------------------------------------------------
# Segmentation: post-processing
# --------------------------------------------------------------------------------------------

def postprocess(labels: np.ndarray, margin: int = 2) -> np.ndarray:
    """Clean a label volume (Z, H, W); returns a new array.

    1. A tumor component (26-connected) with no liver (label 1) within `margin` pixels in-plane is
       removed (set to 0): a liver tumor lies in the liver.
    2. The liver region (label >= 1, tumor included) keeps its largest 3D component (26-connected);
       everything outside it becomes background.
    On a single slice both rules work in 2D. Both rules only look at nonzero voxels and their
    neighbours, so they run on the block that holds them (`lesions.nonzero_box`): the fast path leaves
    most of a volume background. The generous 26-connectivity is a cleaning rule (keep what touches
    the liver at all); lesions are counted face-connected (`lesions.label_lesions`)."""
    from lesions import nonzero_box
    out = labels.copy()
    box = nonzero_box(out)
    if box is not None:
        out[box] = _postprocess_block(out[box], margin)
    return out


def _postprocess_block(out: np.ndarray, margin: int) -> np.ndarray:
    from scipy import ndimage
    tumor = out == 2
    if tumor.any():
        comps, _ = ndimage.label(tumor, structure=_FULL)
        inplane = np.zeros((3, 3, 3), dtype=bool)
        inplane[1] = ndimage.generate_binary_structure(2, 2)
        near_liver = ndimage.binary_dilation(out == 1, structure=inplane, iterations=margin)
        keep = np.unique(comps[near_liver & tumor])
        out[tumor & ~np.isin(comps, keep)] = 0
    region = out >= 1
    liver = largest_component(region)
    if liver is not None:
        out[region & ~liver] = 0
    return out
