"""Train the tumor classifier (VGG16) or the liver/tumor segmenter (U-Net) on LiTS-layout data.

    python train.py --task segmentation --demo                     # synthetic phantoms, a few minutes on a CPU
    python train.py --task classification --data-dir /data/LiTS    # the real thing
    tensorboard --logdir runs

A run writes, under --output-dir (default runs/<task>): checkpoints/best.ckpt and last.ckpt (see
`checkpoint_callbacks`),
TensorBoard logs in tensorboard/version_N/ (one per run), splits.json (the patient-level split), test_metrics.json; and the
curves as PNG into --graphs-dir (default Graphs_Classification/ or Graphs_Segmentation/).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import timedelta
from pathlib import Path

import matplotlib
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, WeightAveraging
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import StrategyRegistry
from pytorch_lightning.utilities import rank_zero_info

import dataset
from evaluate import json_safe
from inference import cpu_has_fast_bf16, keep_freed_memory, load_checkpoint
from phantom import write_synthetic_lits
from dicom_datasets import add_dicom_arguments, options_from_args
from volumes import (CLS_CLASSES, SEG_CLASSES, WINDOW_HU, DataError, atomic_output, atomic_write_text, check_output,
                     float_in, int_at_least, ordered_pair, overlay, run_cli)
from lit_model import LitClassifier, LitSegmenter
from vgg16 import IMAGENET_HIDDEN, fetch_imagenet_state_dict

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

DEMO_DATA_DIR = Path("data/synthetic")
DEMO_CASES, DEMO_SIZE = 12, 128
# The demo trains for this long whatever the machine (its learning-rate schedule spans the time), so
# that each demo command ends within 5 minutes on a 2-core CPU, phantoms and cache included.
DEMO_MAX_TIME = "00:00:03:30"
# Lightning's own names, so that a misspelt one is refused while parsing, not by the Trainer later.
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", *StrategyRegistry.available_strategies())
PRECISIONS = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true", "64-true", "64",
              "transformer-engine", "transformer-engine-float16")
POSITIVE = float_in(0, math.inf, low_open=True, high_open=True)
GRAPHS_DIRS = {"classification": Path("Graphs_Classification"), "segmentation": Path("Graphs_Segmentation")}

# Values used when a flag is not given: (normal run, --demo preset) per task.
DEFAULTS = {
    "classification": {"max_epochs": (30, -1), "batch_size": (16, 16), "lr": (3e-4, 3e-4), "image_size": (224, 128),
                       "oversample_tumor": (0.5, 0.5), "dice_per_slice": (False, False), "ema": (0.0, 0.0),
                       "rotation": (20.0, 20.0), "scale": ((0.8, 1.2), (0.8, 1.2)), "paste_tumor": (0.5, 0.5),
                       "appearance": (0.0, 0.0)},
    "segmentation": {"max_epochs": (40, -1), "batch_size": (8, 16), "lr": (1e-3, 2e-3), "image_size": (256, 128),
                     "oversample_tumor": (0.0, 0.5), "dice_per_slice": (True, False), "ema": (0.995, 0.0),
                     "rotation": (10.0, 10.0), "scale": ((0.9, 1.1), (0.9, 1.1)), "paste_tumor": (0.0, 0.0),
                     "appearance": (0.0, 0.0)},
    "common": {"context_slices": (1, 1), "base_width": (32, 16), "num_workers": (4, 2), "vgg_hidden": (4096, 512),
               "vgg_width": (1.0, 0.5),
               "channels_last": (True, False), "flip": (True, True)},
}


def flags_record(args: argparse.Namespace) -> dict:
    """Every flag of the run as it was resolved (defaults and --demo's preset filled in), for
    test_metrics.json: the recipe a checkpoint's figures came from, augmentation included, which the
    checkpoint's hyperparameters (the network and its preprocessing) do not hold."""
    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return {name: plain(value) for name, value in sorted(vars(args).items())}


def _devices(text: str) -> str:
    """--devices as Lightning reads it (auto, a count, -1, or GPU ids "0,1"), checked while parsing."""
    parts = text.split(",")
    ok = text == "auto" or text == "-1" or (all(p.strip().isdigit() for p in parts) and
                                            (len(parts) > 1 or int(parts[0]) > 0))
    if not ok:
        raise argparse.ArgumentTypeError(f"found {text!r}; expected auto, a count of 1 or more, -1 or GPU ids "
                                         f"such as 0,1")
    return text


def _default(task: str, name: str, demo: bool):
    table = DEFAULTS[task] if name in DEFAULTS[task] else DEFAULTS["common"]
    return table[name][1 if demo else 0]


def _default_help(name: str) -> str:
    if name in DEFAULTS["common"]:
        normal, demo = DEFAULTS["common"][name]
        return f"(default: {normal}; --demo: {demo})"
    c, s = DEFAULTS["classification"][name], DEFAULTS["segmentation"][name]
    return f"(default: classification {c[0]}, segmentation {s[0]}; --demo: {c[1]} / {s[1]})"


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """States each flag's default, unless its help already does (task- and demo-dependent ones)."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "(default" in text or action.required else super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train VGG16 (tumor / healthy slice) or U-Net (liver and tumor masks).",
                                formatter_class=_HelpWithDefaults)
    p.add_argument("--task", required=True, choices=["classification", "segmentation"], help="what to train")
    p.add_argument("--data-dir", type=Path, default=None, action="append",
                   help=f"LiTS, MSD Task03_Liver, slice-folder, 3D-IRCADb or DICOM SEG data; repeat it to train on "
                        f"several together, e.g. LiTS and 3D-IRCADb (default: synthetic phantoms in "
                        f"{DEMO_DATA_DIR}, written there when absent)")
    p.add_argument("--drop-ircadb-duplicates", action=argparse.BooleanOptionalAction, default=True,
                   help="with 3D-IRCADb and LiTS or MSD data together, leave out LiTS volumes 28-47 (MSD "
                        "liver_28..47), the same patients as 3D-IRCADb-01's")
    add_dicom_arguments(p)
    p.add_argument("--output-dir", type=Path, default=None, help="run folder (default: runs/<task>)")
    p.add_argument("--cache-dir", type=Path, default=Path("data/cache"), help="prepared slice cache")
    p.add_argument("--graphs-dir", type=Path, default=None,
                   help="where the PNG curves go (default: Graphs_Classification or Graphs_Segmentation)")
    p.add_argument("--demo", action="store_true",
                   help=f"small preset for a CPU: synthetic data, small images and network, {DEMO_MAX_TIME} of training; "
                        "flags given explicitly override it")
    p.add_argument("--max-epochs", type=int_at_least(1), default=None,
                   help=_default_help("max_epochs") + "; -1: no limit, the --max-time budget ends the run")
    p.add_argument("--max-time", default=None,
                   help="stop after this long, DD:HH:MM:SS; without --max-epochs the learning-rate schedule spans "
                        "this time instead of an epoch count (default: none; --demo: " + DEMO_MAX_TIME + ", unless "
                        "--max-epochs is given)")
    p.add_argument("--batch-size", type=int_at_least(1), default=None, help=_default_help("batch_size"))
    p.add_argument("--lr", type=POSITIVE, default=None, help="peak learning rate of AdamW " + _default_help("lr"))
    p.add_argument("--weight-decay", type=float_in(0, math.inf, high_open=True), default=1e-4,
                   help="AdamW weight decay")
    p.add_argument("--ema", type=float_in(0, 1, high_open=True, what="a decay"), default=None, metavar="DECAY",
                   help="keep an exponential moving average of the weights (each step: average = DECAY * average + "
                        "(1 - DECAY) * weights) and validate, test and save it instead of the raw weights; 0 = off "
                        + _default_help("ema"))
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="with --ema, let the decay grow as min(DECAY, (1 + n) / (10 + n)) over the first updates n, "
                        "so that a short run's average is not mostly its initial weights")
    p.add_argument("--image-size", type=int_at_least(32), default=None,
                   help="training resolution " + _default_help("image_size"))
    p.add_argument("--context-slices", type=int_at_least(0), default=None,
                   help="neighbour slices on each side stacked as channels (2.5D) " + _default_help("context_slices"))
    p.add_argument("--window", type=float, nargs=2, action=ordered_pair(), default=list(WINDOW_HU),
                   metavar=("LOW", "HIGH"), help="HU window mapped to [0, 1]")
    p.add_argument("--base-width", type=int_at_least(1), default=None,
                   help="U-Net channels at the top level " + _default_help("base_width"))
    p.add_argument("--attention", action="store_true", help="U-Net with attention gates on the skips (default: off)")
    p.add_argument("--dice-per-slice", action=argparse.BooleanOptionalAction, default=None,
                   help="segmentation: the soft Dice term per slice, then averaged, instead of one Dice over the "
                        "batch " + _default_help("dice_per_slice"))
    p.add_argument("--unet-deep-supervision", type=int, choices=range(4), default=0, metavar="LEVELS",
                   help="segmentation: also train the U-Net decoder's LEVELS coarser outputs (1/2, 1/4, ...) "
                        "against the downsampled labels through 1x1 heads, level l weighing 1/2**l (nnU-Net's deep "
                        "supervision; 0 = off)")
    p.add_argument("--head", choices=["evidence", "fc"], default="evidence",
                   help="VGG16 head: 'evidence' scores each location of the last feature map and pools them "
                        "(smooth maximum) into the slice logit; 'fc' is the classic fully connected head")
    p.add_argument("--deep-supervision", type=float_in(0, math.inf, high_open=True), default=3.0,
                   help="weight of the evidence map's loss against the downsampled tumour mask (evidence head; "
                        "0 trains on slice labels alone)")
    p.add_argument("--liver-gate", action=argparse.BooleanOptionalAction, default=None,
                   help="evidence head: also read a liver logit per location, trained against the liver mask, and "
                        "let a location count as tumour only as far as it is liver, so tissue outside the liver "
                        "cannot make a slice tumorous (default: on with the evidence head)")
    p.add_argument("--target-sensitivity", type=float_in(0, 1, low_open=True, what="a share"), default=None,
                   help="choose the classifier's thresholds on validation patients, the slices' and the volume "
                        "verdict's, as the highest ones reaching this sensitivity (default: Youden's J, the best "
                        "sensitivity + specificity)")
    p.add_argument("--vgg-hidden", type=int_at_least(1), default=None,
                   help="VGG16 fully connected width, fc head " + _default_help("vgg_hidden"))
    p.add_argument("--vgg-width", type=float_in(0, 1, low_open=True, what="a width multiplier"), default=None,
                   help="VGG16 convolution widths as a share of the paper's (0.5: 32-256 channels, a quarter of "
                        "the arithmetic, three times the steps in a CPU's time budget; 1.0 with --pretrained) "
                        + _default_help("vgg_width"))
    p.add_argument("--pretrained", action="store_true",
                   help="start VGG16 from torchvision's ImageNet weights (needs them cached or a network; default: off)")
    p.add_argument("--oversample-tumor", type=float_in(0, 1, high_open=True, what="a share"), default=None,
                   help="share of tumor slices drawn per training epoch, 0 = natural share "
                        + _default_help("oversample_tumor"))
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="mirror half the training slices left-right and half top-bottom, so that anatomy "
                        "reaching the model mirrored (a wrong affine, slices exported flipped) is still "
                        "recognised; --no-flip when the training data already show every orientation the "
                        "model will meet (e.g. a slice export the exporter mirrored) "
                        + _default_help("flip"))
    p.add_argument("--rotation", type=float_in(0, 180, what="an angle in degrees"), default=None, metavar="DEG",
                   help="training augmentation: rotate each slice by a random angle within +-DEG degrees "
                        + _default_help("rotation"))
    p.add_argument("--scale", type=float, nargs=2, action=ordered_pair(strict=False, positive=True), default=None,
                   metavar=("LOW", "HIGH"),
                   help="training augmentation: zoom each slice by a random factor in [LOW, HIGH] "
                        + _default_help("scale"))
    p.add_argument("--paste-tumor", type=float_in(0, 1, what="a probability"), default=None, metavar="P",
                   help="training augmentation: with probability P a slice receives the tumour of another slice "
                        "of its batch, moved into its liver with the donor's contrast to the liver (TumorCP) "
                        + _default_help("paste_tumor"))
    p.add_argument("--appearance", type=float_in(0, 1, what="a probability"), default=None, metavar="P",
                   help="training augmentation: with probability P each, per slice, change the lesions' contrast "
                        "to the liver (hypo- to hyperdense), the liver's enhancement, gamma, contrast, blur, "
                        "resolution and noise, so that other scanners and phases look familiar "
                        + _default_help("appearance"))
    p.add_argument("--patch-size", type=int_at_least(0), default=0, metavar="PX",
                   help="train on PX x PX windows of the slices instead of whole slices, a share --foreground-patches "
                        "of them centred on tumour (else liver), as nnU-Net samples; a window is a tumour slice "
                        "when it holds --min-tumor-pixels of tumour; validation, test and prediction see whole "
                        "slices (default: 0, whole slices)")
    p.add_argument("--foreground-patches", type=float_in(0, 1, what="a probability"), default=0.33, metavar="P",
                   help="with --patch-size, the share of windows centred on a tumour (else liver) pixel; the "
                        "rest are placed at random (default: 0.33, nnU-Net's)")
    p.add_argument("--min-tumor-pixels", type=int_at_least(1), default=1,
                   help="a slice counts as tumor from this many tumor pixels (classification)")
    p.add_argument("--val-fraction", type=float_in(0, 1, low_open=True, high_open=True, what="a share"), default=0.15,
                   help="share of patients for validation")
    p.add_argument("--test-fraction", type=float_in(0, 1, high_open=True, what="a share"), default=0.15,
                   help="share of patients for the test")
    p.add_argument("--split-file", type=Path, default=None, help="reuse a splits.json (default: a new seeded split)")
    p.add_argument("--num-workers", type=int_at_least(0), default=None,
                   help="DataLoader workers " + _default_help("num_workers"))
    p.add_argument("--seed", type=int, default=0, help="seed for the split, initialisation and augmentation")
    p.add_argument("--accelerator", default="auto", choices=ACCELERATORS, help="cpu, gpu or auto")
    p.add_argument("--devices", default="auto", type=_devices,
                   help="devices per node: a number, a list of GPU ids (0,1), -1 for every GPU, or auto")
    p.add_argument("--num-nodes", type=int_at_least(1), default=1, help="nodes for multi-node DDP")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES, metavar="NAME",
                   help="Lightning strategy, e.g. ddp")
    p.add_argument("--precision", default=None, choices=PRECISIONS, metavar="P",
                   help="32, 16-mixed or bf16-mixed (default: bf16-mixed on a GPU that supports it and on a CPU "
                        "with native bf16 arithmetic (AVX512-BF16 or AMX), else 32)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format; measured +15%% (U-Net 256²) and +3%% (VGG16 224²) training speed on a "
                        "CPU, see BENCHMARKS.md " + _default_help("channels_last"))
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (default: off; its compile time was not repaid in CPU runs)")
    p.add_argument("--resume", type=Path, default=None, help="continue from a checkpoint, e.g. <output-dir>/checkpoints/last.ckpt")
    p.add_argument("--fast-dev-run", action="store_true", help="one batch of each split, to check the set-up")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left out with the task's defaults (or the demo preset's), and refuse with one
    line (a DataError) what parsing could not check alone: flags that contradict each other, the
    machine, or the file system. Writes nothing."""
    args.time_budget_s = None
    if args.demo and args.max_time is None and args.max_epochs is None:
        args.max_time = DEMO_MAX_TIME
    if args.max_time is not None:
        seconds = parse_duration(args.max_time)
        if args.max_epochs is None:
            args.time_budget_s = seconds
            args.max_epochs = -1  # the time budget alone ends the run
    if args.pretrained and args.vgg_width is None:
        args.vgg_width = 1.0  # the ImageNet weights' width, also under --demo
    for name in ("max_epochs", "batch_size", "lr", "image_size", "context_slices", "base_width", "num_workers",
                 "vgg_hidden", "vgg_width", "oversample_tumor", "channels_last", "flip", "dice_per_slice", "ema",
                 "rotation", "scale", "paste_tumor", "appearance"):
        if getattr(args, name) is None:
            setattr(args, name, _default(args.task, name, args.demo))
    if args.output_dir is None:
        args.output_dir = Path("runs") / args.task
    if args.graphs_dir is None:
        args.graphs_dir = GRAPHS_DIRS[args.task]
    if args.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise DataError(f"found --accelerator {args.accelerator} but no CUDA device is available; expected "
                        f"--accelerator cpu or auto")
    if args.accelerator == "mps" and not torch.backends.mps.is_available():
        raise DataError("found --accelerator mps but no MPS device is available; expected --accelerator cpu or auto")
    on_gpu = torch.cuda.is_available() and args.accelerator in ("auto", "gpu", "cuda")
    if not on_gpu and args.accelerator != "mps" and (args.devices == "-1" or "," in args.devices):
        raise DataError(f"found --devices {args.devices} on the CPU; expected a count of processes or auto "
                        f"(a list of ids, or -1, selects GPUs)")
    if args.precision is None:
        bf16 = torch.cuda.is_bf16_supported() if on_gpu else cpu_has_fast_bf16()
        args.precision = "bf16-mixed" if bf16 else "32-true"
    for flag, folder in (("--output-dir", args.output_dir), ("--graphs-dir", args.graphs_dir),
                         ("--cache-dir", args.cache_dir)):
        check_output(folder, flag, folder=True)  # not after an hour of training
    if args.split_file is not None and not args.split_file.is_file():
        raise DataError(f"{args.split_file}: --split-file not found; expected a splits.json written by train.py")
    # Each flag's own range was checked while parsing; these depend on two flags at once.
    if args.val_fraction + args.test_fraction >= 1:
        raise DataError(f"found --val-fraction {args.val_fraction} and --test-fraction {args.test_fraction}; "
                        f"expected shares that leave patients to train on (a sum below 1)")
    if args.pretrained and args.task != "classification":
        raise DataError(f"found --pretrained with --task {args.task}; expected it with --task classification "
                        f"(ImageNet weights exist for the VGG16 only)")
    if args.liver_gate and (args.task != "classification" or args.head != "evidence"):
        raise DataError(f"found --liver-gate with --task {args.task} --head {args.head}; expected it with "
                        f"--task classification --head evidence (it gates the evidence map)")
    if args.patch_size and not 16 <= args.patch_size <= args.image_size:
        raise DataError(f"found --patch-size {args.patch_size} at --image-size {args.image_size}; expected 16 to "
                        f"{args.image_size} pixels")
    if args.liver_gate is None:
        args.liver_gate = args.task == "classification" and args.head == "evidence"
    if args.pretrained and args.vgg_width != 1.0:
        raise DataError(f"found --pretrained with --vgg-width {args.vgg_width}; expected --vgg-width 1.0, the "
                        f"width of the ImageNet weights")
    if args.pretrained and args.head == "fc" and args.vgg_hidden != IMAGENET_HIDDEN:
        raise DataError(f"found --pretrained with --head fc and --vgg-hidden {args.vgg_hidden}; expected "
                        f"--vgg-hidden {IMAGENET_HIDDEN}, the width of the ImageNet weights")
    return args


def parse_duration(text: str) -> float:
    """Lightning's DD:HH:MM:SS (leading fields may be left out: "10:00" is ten minutes) -> seconds."""
    try:
        fields = [float(f) for f in text.split(":")]
    except ValueError:
        fields = []
    if not 1 <= len(fields) <= 4 or any(f < 0 for f in fields) or not any(fields):
        raise DataError(f"found --max-time {text!r}; expected a positive duration DD:HH:MM:SS, e.g. 00:00:10:00")
    return sum(f * m for f, m in zip(reversed(fields), (1, 60, 3600, 86400)))


def ensure_data(args: argparse.Namespace) -> bool:
    """Returns whether the data is the synthetic demo set (generated here when absent)."""
    if args.data_dir is not None:
        args.data_dir = list(args.data_dir) if isinstance(args.data_dir, (list, tuple)) else [args.data_dir]
        for folder in args.data_dir:
            if not Path(folder).is_dir():
                raise DataError(f"{folder}: data directory not found; expected a folder of LiTS, MSD, slice, "
                                f"3D-IRCADb or DICOM SEG data")
        return False
    args.data_dir = [DEMO_DATA_DIR]
    if not any(DEMO_DATA_DIR.glob("volume-*.nii*")):
        sys.stderr.write(f"writing {DEMO_CASES} synthetic LiTS phantoms to {DEMO_DATA_DIR} (first run only)\n")
        write_synthetic_lits(DEMO_DATA_DIR, cases=DEMO_CASES, size=DEMO_SIZE, seed=0, progress=True)
    return True


def build_model(args: argparse.Namespace):
    common = dict(in_channels=2 * args.context_slices + 1, lr=args.lr, weight_decay=args.weight_decay,
                  window=tuple(args.window), image_size=args.image_size, context_slices=args.context_slices)
    if args.task == "classification":
        model = LitClassifier(hidden=args.vgg_hidden, head=args.head, deep_supervision=args.deep_supervision,
                              liver_gate=args.liver_gate, width=args.vgg_width,
                              target_sensitivity=args.target_sensitivity, pretrained=args.pretrained,
                              class_names=CLS_CLASSES, **common)
    else:
        model = LitSegmenter(base_width=args.base_width, attention=args.attention, dice_per_slice=args.dice_per_slice,
                             deep_supervision=args.unet_deep_supervision, class_names=SEG_CLASSES, **common)
    model.time_budget_s = args.time_budget_s
    return model


def check_resume(args: argparse.Namespace) -> None:
    """--resume names a checkpoint of this task (`inference.load_checkpoint`'s checks) whose network and
    preprocessing are the ones these flags give: resumed with another --base-width or --context-slices,
    its weights would not fit the network; with another window or size, it would go on learning from
    other input. One line before anything is written, not a traceback an epoch later."""
    if args.resume is None:
        return
    expected = {"context_slices": ("--context-slices", args.context_slices),
                "image_size": ("--image-size", args.image_size), "window": ("--window", tuple(args.window))}
    if args.task == "segmentation":
        expected.update(base_width=("--base-width", args.base_width), attention=("--attention", args.attention),
                        deep_supervision=("--unet-deep-supervision", args.unet_deep_supervision))
    else:
        expected.update(head=("--head", args.head), liver_gate=("--liver-gate", args.liver_gate),
                        width=("--vgg-width", args.vgg_width))
        if args.head == "fc":
            expected.update(hidden=("--vgg-hidden", args.vgg_hidden))
    load_checkpoint(args.resume, args.task, "--resume", expected)


def check_pretrained(args: argparse.Namespace) -> None:
    """With --pretrained, the ImageNet weights are fetched (from the torch hub cache, or downloaded
    once) before anything else starts: without them the run stops here with one line."""
    if args.pretrained:
        fetch_imagenet_state_dict(batch_norm=True)


class BestCheckpoint(ModelCheckpoint):
    """best.ckpt: the epoch with the highest `monitor` (save_top_k=1, mode max).

    A tie with the best so far goes to the epoch with the lower `tiebreak` (validation loss); on equal
    loss the earlier epoch stays. Epochs where the monitor is NaN tie with each other: with neither
    liver nor tumor in the validation reference, val/dice_mean is NaN ("not applicable") in every
    epoch, and best.ckpt falls back to the lowest validation loss. A number always beats NaN."""

    def __init__(self, *args, tiebreak: str = "val/loss", **kwargs):
        super().__init__(*args, **kwargs)
        if self.save_top_k != 1 or self.mode != "max":
            raise ValueError(f"BestCheckpoint keeps one best (save_top_k=1, mode max); got "
                             f"save_top_k={self.save_top_k}, mode {self.mode}")
        self.tiebreak = tiebreak
        self.best_tiebreak = math.inf
        self._nan_noted = False

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is not None and torch.isnan(current) and not self._nan_noted:
            self._nan_noted = True
            rank_zero_info(f"note: {self.monitor} is nan (not applicable: the validation reference has none of "
                           f"that region); best.ckpt goes by the lowest {self.tiebreak} among such epochs")
        if current is None or not self.best_k_models:
            return super().check_monitor_top_k(trainer, current)
        best = self.best_k_models[self.kth_best_model_path]
        # Lightning stores a NaN best as -inf (mode max), which no Dice can be.
        tie = bool(current == best) or bool(torch.isnan(current) and torch.isneginf(best))
        if not tie:
            return super().check_monitor_top_k(trainer, current)
        loss = trainer.callback_metrics.get(self.tiebreak)
        better = loss is not None and float(loss) < self.best_tiebreak
        return trainer.strategy.reduce_boolean_decision(bool(better))

    def _update_best_and_save(self, current, trainer, monitor_candidates) -> None:
        loss = monitor_candidates.get(self.tiebreak)
        self.best_tiebreak = float(loss) if loss is not None else math.inf
        super()._update_best_and_save(current, trainer, monitor_candidates)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best_tiebreak": self.best_tiebreak}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.best_tiebreak = float(state_dict.get("best_tiebreak", math.inf))


def checkpoint_callbacks(task: str, dirpath: Path) -> list[ModelCheckpoint]:
    """The checkpoint callbacks, best.ckpt's first. For segmentation [best, last]: best.ckpt by
    `BestCheckpoint` monitoring val/dice_mean (the mean of the liver's and the tumour's Dice, the
    liver's alone without tumour in the validation reference); last.ckpt rewritten at the end of every
    training epoch (after its validation), whatever best.ckpt does, so after a run it holds the end
    of training, and a killed run resumes from its last finished epoch. (Lightning's own `save_last`
    writes only when a monitored checkpoint is written, which left last.ckpt at the best epoch.)

    For classification [one]: best.ckpt is the end of training, written after every epoch's
    validation, and last.ckpt a link to it (Lightning's `save_last="link"`), so the 177 MB of VGG16
    and its optimiser state are written once per epoch, not twice. In a sweep of 22 runs, the epoch of
    highest validation AUROC (over the few validation patients a split holds) scored 0.05 lower on
    held-out patients than the last epoch on average, and 0.53 at worst (BENCHMARKS.md, "Which epoch
    to keep")."""
    if task == "classification":
        return [ModelCheckpoint(dirpath=dirpath, filename="best", monitor=None, save_top_k=1, every_n_epochs=1,
                                enable_version_counter=False, save_last="link")]
    best = BestCheckpoint(dirpath=dirpath, filename="best", monitor="val/dice_mean", mode="max", save_top_k=1,
                          auto_insert_metric_name=False, enable_version_counter=False)
    last = ModelCheckpoint(dirpath=dirpath, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                           enable_version_counter=False)
    return [best, last]


def ema_decay(decay: float, updates: int, warmup: bool = True) -> float:
    """The decay of an average's `updates`-th update (1 for the first after the copy of the first
    step's weights). With `warmup`, min(decay, (1 + n) / (10 + n)), the schedule of TensorFlow's
    ExponentialMovingAverage(num_updates) and timm's ModelEmaV3: 0.18 at the first update, 0.5 at the
    8th, 0.9 at the 80th, 0.995 from the 1,790th on, so that a run of a few hundred steps averages
    what it learnt rather than the initial weights (a fixed 0.995 after 300 steps still holds
    0.995**300 = 22 % of the first step's weights)."""
    return min(decay, (1.0 + updates) / (10.0 + updates)) if warmup else decay


class EMAWeights(WeightAveraging):
    """An exponential moving average of the weights (BatchNorm statistics included), updated after every
    optimiser step: average = d * average + (1 - d) * weights, starting from the first step's
    weights, with d = `ema_decay(decay, n, warmup)` at the n-th update. Validation runs on the average
    (so best.ckpt is chosen by it), checkpoints hold it as their
    `state_dict` (the raw weights ride along for resuming), and the model ends training holding it.

    Lightning's `WeightAveraging` reloads the raw weights into the model whenever a checkpoint is
    restored, also by `trainer.test(ckpt_path=...)`, which would test the raw weights; here only a
    resumed fit does that, and a test keeps the average the checkpoint's `state_dict` holds."""

    # Buffers that validation sets rather than the optimiser (the classifier's operating thresholds).
    # Lightning runs the module's validation-epoch-end hook after this callback has swapped the raw
    # weights back, so the value chosen lands in the raw model; the average takes it as it is, never
    # averaged with older choices (averaged, a classifier's test once ran at a threshold of 0.01).
    CHOSEN_BY_VALIDATION = ("operating_threshold", "volume_operating_point")

    def __init__(self, decay: float, warmup: bool = True):
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        def update(averaged, current, updates: torch.Tensor) -> None:  # torch's update at this step's decay
            get_ema_multi_avg_fn(ema_decay(decay, int(updates), warmup))(averaged, current, updates)

        super().__init__(multi_avg_fn=update)
        self.decay, self.warmup = decay, warmup

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.state.fn == "fit":
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def _take_chosen(self, pl_module) -> None:
        if self._average_model is None:
            return
        average = self._average_model.module
        for name, buf in pl_module.named_buffers():
            if name in self.CHOSEN_BY_VALIDATION:
                average.get_buffer(name).copy_(buf)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._take_chosen(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        # Before the checkpoint callbacks (Lightning runs them last), which save the average.
        self._take_chosen(pl_module)


class RecordTrainingData(pl.Callback):
    """Writes into every checkpoint's hyperparameters (`training_data`) which data folders the run
    trained on and how many of each one's cases were in training, validation and test
    (`dataset.training_data_record`): a checkpoint says what it learnt from."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        found = getattr(trainer.datamodule, "training_data", None)
        if found:
            checkpoint.setdefault("hyper_parameters", {})["training_data"] = found


class LearningCheck(pl.Callback):
    """One warning line when a segmentation run has spent a third of its budget (of `--max-time`, else
    of its epochs) and its validation liver Dice is below 0.5: checked once, at the first validation
    past that third. A run at that point has nearly always been given too little compute for its image
    size and network, and would otherwise end with a model that segments nothing, silently.

    Validation comes at epoch ends. When a time-budgeted run's epoch would end more than WAIT of the
    budget after the third (a large image size on a CPU: one epoch can outlast the whole budget), the
    check asks Lightning for one validation right after the batch that crosses the third (Lightning's
    time-based validation, 2.6 and later; older versions check at the epoch end). `elapsed()` gives
    the seconds of training so far (default: the module's training clock, Lightning's Timer that
    --max-time sets)."""

    SHARE, FLOOR, WAIT = 1 / 3, 0.5, 1 / 6

    def __init__(self, budget_s: float | None, max_epochs: int, elapsed=None):
        self.budget_s, self.max_epochs, self.elapsed, self.done = budget_s, max_epochs, elapsed, False
        self.asked = self.forced = False
        self.epoch_started = 0.0

    def _clock(self, pl_module):
        return self.elapsed or pl_module._training_clock()

    def _spent(self, trainer, pl_module) -> float:
        """The share of the budget spent: of the time or of the epochs, whichever ends the run first.
        The time is the module's training clock (the Timer that --max-time adds)."""
        shares = [(trainer.current_epoch + 1) / self.max_epochs] if self.max_epochs > 0 else [0.0]
        if self.budget_s:
            shares.append(self._clock(pl_module)() / self.budget_s)
        return max(shares)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.budget_s:
            self.epoch_started = self._clock(pl_module)()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.forced:  # the asked-for validation has run: epoch ends validate again
            trainer._val_check_time_interval, self.forced = None, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (self.done or self.asked or not self.budget_s or trainer.sanity_checking
                or getattr(trainer, "_val_check_time_interval", 0.0) is not None):
            return  # checked already, no time budget, or a Lightning without time-based validation
        now = self._clock(pl_module)()
        if now < self.SHARE * self.budget_s:
            return
        self.asked = True
        per_batch = (now - self.epoch_started) / (batch_idx + 1)
        epoch_ends_in = (trainer.num_training_batches - batch_idx - 1) * per_batch  # inf for an endless loader
        if epoch_ends_in > self.WAIT * self.budget_s:
            self.forced = True  # Lightning validates after this batch: at least 0 s since "the last validation"
            trainer._val_check_time_interval, trainer._last_val_time = 0.0, time.monotonic()

    def on_validation_end(self, trainer, pl_module) -> None:
        dice = trainer.callback_metrics.get("val/dice_liver")
        if self.done or trainer.sanity_checking or dice is None:
            return
        spent = self._spent(trainer, pl_module)
        if spent < self.SHARE:
            return
        self.done = True
        if float(dice) < self.FLOOR and trainer.is_global_zero:
            budget = f"epoch {trainer.current_epoch + 1}" + (f" of {self.max_epochs}" if self.max_epochs > 0 else "")
            if self.budget_s:
                budget += f", {self.budget_s / 60:g} minutes' budget"
            sys.stderr.write(f"warning: at {spent:.0%} of the run ({budget}) the validation liver Dice is "
                             f"{float(dice):.2f}, below "
                             f"{self.FLOOR}: this run may be short of compute for its image size and network; if the "
                             f"next validation is no better, give it more time, or less to compute per step "
                             f"(--image-size 128 --base-width 16)\n")


class Throughput(pl.Callback):
    """Logs training images per second over each epoch (all processes together)."""

    def on_train_epoch_start(self, trainer, pl_module):
        self.start, self.images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.images += len(batch[0])

    def on_train_epoch_end(self, trainer, pl_module):
        rate = self.images * trainer.world_size / max(time.perf_counter() - self.start, 1e-9)
        pl_module.log("train/images_per_s", float(rate), rank_zero_only=True)


# --------------------------------------------------------------------------------------------
# The PNG graphs, drawn from the scalars logged to TensorBoard (all epochs, resumed runs included)
# --------------------------------------------------------------------------------------------

def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in a TensorBoard folder as sorted (step, value) pairs, the last write per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        by_step = {e.step: e.value for e in acc.Scalars(tag)}
        out[tag] = sorted(by_step.items())
    return out


def _by_epoch(scalars: dict, tag: str) -> tuple[list[float], list[float]]:
    """Epoch-level values of `tag`, on an axis of epochs counted from 1."""
    epoch_at = dict(scalars.get("epoch", []))
    points = [(epoch_at.get(step, np.nan) + 1, v) for step, v in scalars.get(tag, [])]
    return [p[0] for p in points], [p[1] for p in points]


def _save(fig, path: Path, synthetic: bool) -> None:
    if synthetic:
        fig.text(0.99, 0.01, "synthetic phantom data (demo), not LiTS", ha="right", va="bottom", fontsize=8,
                 color="0.35")
    fig.tight_layout(rect=(0, 0.03 if synthetic else 0, 1, 1))
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _curve(scalars: dict, tags: dict[str, str], path: Path, title: str, ylabel: str, synthetic: bool,
           per_step: bool = False) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for tag, label in tags.items():
        if per_step:
            xs, ys = [s for s, _ in scalars.get(tag, [])], [v for _, v in scalars.get(tag, [])]
        else:
            xs, ys = _by_epoch(scalars, tag)
        ax.plot(xs, ys, marker="" if per_step else "o", label=label)
    ax.set(title=title, xlabel="step" if per_step else "epoch", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(tags) > 1:
        ax.legend()
    _save(fig, path, synthetic)


def draw_graphs(task: str, tb_dir: Path, graphs_dir: Path, model, dm, synthetic: bool) -> None:
    graphs_dir.mkdir(parents=True, exist_ok=True)
    sc = read_scalars(tb_dir)
    if task == "classification":
        _curve(sc, {"train/loss_epoch": "train"}, graphs_dir / "train_loss_epoch.png", "Training loss per epoch", "cross-entropy", synthetic)
        _curve(sc, {"train/acc": "train"}, graphs_dir / "train_accuracy_epoch.png", "Training accuracy per epoch", "accuracy", synthetic)
        _curve(sc, {"train/loss_step": "train"}, graphs_dir / "train_loss_step.png", "Training loss per step", "cross-entropy", synthetic, per_step=True)
        _curve(sc, {"train/acc_step": "train"}, graphs_dir / "train_accuracy_step.png", "Training accuracy per step (batch)", "accuracy", synthetic, per_step=True)
        _curve(sc, {"val/loss": "validation"}, graphs_dir / "val_loss.png", "Validation loss", "cross-entropy", synthetic)
        _curve(sc, {"val/acc": "accuracy", "val/balanced_acc": "balanced accuracy"}, graphs_dir / "val_accuracy.png",
               "Validation accuracy", "accuracy", synthetic)
        _draw_roc_and_confusion(model, graphs_dir, synthetic)
    else:
        _curve(sc, {"val/dice_liver": "liver (label >= 1)", "val/dice_tumor": "tumor (label 2)"}, graphs_dir / "val_dice.png",
               "Validation Dice (pooled over the epoch)", "Dice", synthetic)
        _curve(sc, {"train/dice_liver": "liver (label >= 1)", "train/dice_tumor": "tumor (label 2)"},
               graphs_dir / "train_dice_epoch.png", "Training Dice per epoch", "Dice", synthetic)
        _curve(sc, {"val/loss": "validation"}, graphs_dir / "val_loss.png", "Validation loss", "CE + soft Dice", synthetic)
        _curve(sc, {"train/loss_epoch": "train"}, graphs_dir / "train_loss_epoch.png", "Training loss per epoch", "CE + soft Dice", synthetic)
        _draw_test_examples(model, dm.datasets["test"], graphs_dir / "test_examples.png", synthetic)


def _draw_roc_and_confusion(model, graphs_dir: Path, synthetic: bool) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if model.roc_curve is not None:
        fpr, tpr = (t.numpy() for t in model.roc_curve)
        ax.plot(fpr, tpr, label=f"AUROC {float(np.trapezoid(tpr, fpr)):.3f}")
        ax.legend(loc="lower right")
    else:  # all test slices healthy, or all tumorous: there is no curve to draw
        ax.text(0.5, 0.5, "the test slices hold one class only:\nno ROC curve", ha="center", va="center")
    ax.plot([0, 1], [0, 1], ls="--", color="0.6")
    ax.set(title="ROC curve, test patients", xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)", xlim=(0, 1), ylim=(0, 1.01))
    _save(fig, graphs_dir / "roc_curve.png", synthetic)
    if model.confusion is not None:
        cm = model.confusion.numpy()
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.imshow(cm, cmap="Blues")
        for (r, c), v in np.ndenumerate(cm):
            ax.text(c, r, str(int(v)), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        names = list(model.hparams.class_names)
        ax.set(title=f"Confusion matrix, test (threshold {model.threshold:.3f})", xlabel="predicted",
               ylabel="true", xticks=[0, 1], yticks=[0, 1], xticklabels=names, yticklabels=names)
        _save(fig, graphs_dir / "confusion_matrix.png", synthetic)


def _draw_test_examples(model, test_set, path: Path, synthetic: bool, count: int = 4) -> None:
    """CT | ground truth | prediction for the slice with most tumor in each of a few test patients."""
    picks = []
    for ci, case in enumerate(test_set.cases):
        score = case.tumor_pixels * 10**6 + case.liver_pixels  # most tumor first, else most liver
        z = int(np.argmax(score))
        rows = np.flatnonzero((test_set.index[:, 0] == ci) & (test_set.index[:, 1] == z))
        if len(rows):
            picks.append(int(rows[0]))
    picks = picks[:count]
    if not picks:
        return
    model.eval()
    device = next(model.parameters()).device
    fig, axes = plt.subplots(len(picks), 3, figsize=(9, 3 * len(picks)), squeeze=False)
    for row, item in enumerate(picks):
        image, target = test_set[item][:2]
        with torch.inference_mode():
            pred = model(image[None].to(device)).argmax(1)[0].cpu()
        centre = image[image.shape[0] // 2]
        cid = test_set.cases[int(test_set.index[item, 0])].case_id
        for col, (labels, name) in enumerate(((None, "CT"), (target, "ground truth"), (pred, "prediction"))):
            axes[row, col].imshow(overlay(centre, labels).permute(1, 2, 0).numpy())
            axes[row, col].set_title(f"{cid} slice {int(test_set.index[item, 1])}: {name}" if col == 0 else name,
                                     fontsize=9)
            axes[row, col].axis("off")
    fig.suptitle("Test patients: liver green, tumor red")
    _save(fig, path, synthetic)


def log_version(tb_root: Path, resume: Path | None) -> int:
    """A new run logs into a new version_N folder (an earlier run's curves are never mixed into its
    graphs); a resumed run goes on in the latest one."""
    versions = sorted(int(p.name[8:]) for p in tb_root.glob("version_*") if p.name[8:].isdigit())
    if resume is not None and versions:
        return versions[-1]
    return versions[-1] + 1 if versions else 0


def main(args: argparse.Namespace) -> dict:
    args = resolve_args(args)
    check_resume(args)
    check_pretrained(args)
    synthetic = ensure_data(args)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    keep_freed_memory()  # 256²: 27.6 M page faults and 17 % of an epoch's time without (BENCHMARKS.md)
    out = Path(args.output_dir)
    split_file = args.split_file
    if split_file is None and args.resume is not None and (out / "splits.json").is_file():
        split_file = out / "splits.json"  # a resumed run keeps its patients where they were
    dm = dataset.LiTSDataModule(
        args.data_dir, args.task, cache_dir=args.cache_dir, image_size=args.image_size, window=args.window,
        context_slices=args.context_slices, batch_size=args.batch_size, num_workers=args.num_workers,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed, split_file=split_file,
        output_dir=out, oversample_tumor=args.oversample_tumor, min_tumor_pixels=args.min_tumor_pixels,
        flip=args.flip, rotation=args.rotation, scale=args.scale, paste_tumor=args.paste_tumor,
        appearance=args.appearance, dicom_options=options_from_args(args), drop_ircadb_duplicates=args.drop_ircadb_duplicates,
        patch_size=args.patch_size, foreground=args.foreground_patches)
    model = build_model(args)
    model.set_speed(channels_last=args.channels_last, compile=args.compile)
    # Listed best first: Lightning runs checkpoint callbacks in order, so last.ckpt holds best's updated state.
    checkpoints = checkpoint_callbacks(args.task, out / "checkpoints")
    checkpoint = checkpoints[0]
    logger = TensorBoardLogger(save_dir=str(out), name="tensorboard", version=log_version(out / "tensorboard", args.resume),
                               default_hp_metric=False)
    averaging = [EMAWeights(args.ema, args.ema_warmup)] if args.ema > 0 else []
    budget_s = parse_duration(args.max_time) if args.max_time else None
    checks = [LearningCheck(budget_s, args.max_epochs)] if args.task == "segmentation" else []
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy,
        precision=args.precision, max_epochs=args.max_epochs,
        max_time=timedelta(seconds=parse_duration(args.max_time)) if args.max_time else None, logger=logger,
        callbacks=[*checkpoints, LearningRateMonitor(logging_interval="step"), Throughput(), RecordTrainingData(),
                   *averaging, *checks],
        fast_dev_run=args.fast_dev_run, log_every_n_steps=5, deterministic="warn" if args.accelerator != "cpu" else True,
        default_root_dir=str(out))
    started = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=str(args.resume) if args.resume else None)
    fit_seconds = time.perf_counter() - started
    best = checkpoint.best_model_path if not args.fast_dev_run and checkpoint.best_model_path else None
    results = trainer.test(model, datamodule=dm, ckpt_path=best, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    data_dirs = [str(d) for d in args.data_dir]
    summary = {"task": args.task, "data_dir": data_dirs[0] if len(data_dirs) == 1 else data_dirs,
               "datasets": dm.training_data, "synthetic": synthetic,
               "checkpoint": best, "last_checkpoint": str(out / "checkpoints" / "last.ckpt"),
               "tensorboard": logger.log_dir, "graphs": str(args.graphs_dir),
               "fit_seconds": round(fit_seconds, 1), "epochs": trainer.current_epoch, "test": metrics,
               "split": {k: dm.split[k] for k in ("train", "val", "test")}, "flags": flags_record(args)}
    if args.task == "segmentation":
        summary["test_per_case_dice"] = {cid: {"liver": d[0], "tumor": d[1]} for cid, d in model.per_case_dice.items()}
    if trainer.is_global_zero:
        atomic_write_text(out / "test_metrics.json", json.dumps(json_safe(summary), indent=2, allow_nan=False))
        if not args.fast_dev_run:
            draw_graphs(args.task, Path(logger.log_dir), args.graphs_dir, model, dm, synthetic)
        print_summary(summary)
    return summary


def _data_text(summary: dict) -> str:
    """The data a run trained on: its folder, or each data set with its count of training cases."""
    found = summary.get("datasets") or []
    if len(found) > 1:
        return ", ".join(f"{d['name']}: {d['train']} of {d['cases']} cases in training" for d in found)
    return str(summary["data_dir"])


def print_summary(summary: dict) -> None:
    lines = [f"\n{summary['task']} run finished in {summary['fit_seconds']} s "
             f"({'synthetic phantoms' if summary['synthetic'] else _data_text(summary)})",
             f"  best checkpoint: {summary['checkpoint']}", f"  TensorBoard:     tensorboard --logdir {summary['tensorboard']}",
             f"  graphs:          {summary['graphs']}/", "  test metrics (held-out patients):"]
    lines += [f"    {k:28s} {v:.4f}" for k, v in sorted(summary["test"].items())]
    absent = [k for k, v in sorted(summary["test"].items()) if "dice" in k and math.isnan(v)]
    if absent:
        lines.append(f"  note: {', '.join(absent)} not applicable (nan): the test patients' reference has none "
                     f"of that region, and a Dice of nothing against nothing is no score")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
