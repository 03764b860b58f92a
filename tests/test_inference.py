"""inference.py: the region finding on hand-made masks, and the fast path against the exact one.

The networks here are stand-ins whose answer is known: `NearestLevel` is a 1x1 convolution that
labels each pixel by the nearest of three intensity levels, so it gives any crop or any size of a
slice the same answer pixel for pixel, and on a volume whose intensities encode its labels it
returns those labels. With it, whatever the fast path changes (a coarse pass, a crop of each slice,
logits put back in place) must come out voxel for voxel as the exact path's answer.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import inference
import phantom
import volumes
from inference import Box, region_from_mask

WINDOW = volumes.WINDOW_HU
LEVELS_HU = (-100.0, 100.0, 200.0)  # background, liver, tumour: a volume that spells out its labels


class NearestLevel(nn.Module):
    """(B, C, h, w) stacks -> logits (B, 3, h, w): logit_k = 2 c_k x - c_k^2 of the centre slice x, the
    nearest-centre rule for levels c_k (x^2, common to all k, drops out of the argmax)."""

    def __init__(self, channels: int = 3):
        super().__init__()
        levels = volumes.window_hu(np.array(LEVELS_HU), WINDOW)
        self.conv = nn.Conv2d(channels, 3, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, channels // 2, 0, 0] = torch.as_tensor(2 * levels)
            self.conv.bias.copy_(torch.as_tensor(-levels ** 2))
        self.dtypes: set[torch.dtype] = set()
        self.sizes: set[tuple[int, int]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        self.dtypes.add(out.dtype)
        self.sizes.add(tuple(x.shape[-2:]))
        return out


def hparams(image_size: int) -> dict:
    return {"task": "segmentation", "image_size": image_size, "window": WINDOW, "context_slices": 1, "depth": 4}


def coded_volume(size: int = 160, num_slices: int = 48, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A phantom's labels (Z, H, W) and HU slices that encode them (LEVELS_HU)."""
    _, labels, _ = phantom.make_phantom(size, num_slices, seed=seed, num_tumors=2)
    labels = np.ascontiguousarray(labels.transpose(2, 1, 0))  # (Z, Y, X): any order will do here
    hu = np.asarray(LEVELS_HU, dtype=np.float32)[labels]
    return labels, hu


# --------------------------------------------------------------------------------------------
# Region finding on hand-made masks
# --------------------------------------------------------------------------------------------

def test_region_of_a_block_with_margins():
    mask = np.zeros((10, 64, 64), dtype=bool)
    mask[3:6, 10:20, 20:30] = True
    box = region_from_mask(mask, np.arange(10), 10, 64, margin_px=4, margin_slices=1)
    assert box == Box(2, 7, 6, 24, 16, 34)  # slices 3..5 +- 1, rows 10..19 +- 4, columns 20..29 +- 4


def test_region_is_aligned_outward_and_clipped_at_the_volume_edges():
    mask = np.zeros((6, 64, 64), dtype=bool)
    mask[0:2, 2:20, 50:63] = True
    box = region_from_mask(mask, np.arange(6), 6, 64, margin_px=4, margin_slices=3, align=16)
    # slices 0..1 - 3 clipped at 0, + 3 -> 5; rows [2 - 4, 20 + 4) -> [0, 32); columns [46, 67) -> [32, 64)
    assert box == Box(0, 5, 0, 32, 32, 64)
    assert all(v % 16 == 0 for v in (box.y0, box.y1, box.x0, box.x1))


def test_region_of_a_strided_coarse_mask_covers_the_unseen_slices():
    zs = np.array([1, 4, 7, 10, 13])  # every third slice of 16
    mask = np.zeros((5, 32, 32), dtype=bool)
    mask[1:3, 8:12, 8:12] = True  # liver seen on slices 4 and 7, at half the model's size
    box = region_from_mask(mask, zs, 16, 64, scale=2, margin_px=0, margin_slices=1)
    # Slices 2..3 and 8..9 are unseen neighbours of the liver: in, plus one more slice each side.
    assert (box.z0, box.z1) == (1, 11)
    assert (box.y0, box.y1, box.x0, box.x1) == (16, 24, 16, 24)  # pixels 8..11 cover 16..23


def test_region_with_a_fractional_scale_rounds_outward():
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, 3, 4:6] = True
    box = region_from_mask(mask, [0], 1, 25, scale=2.5, margin_px=0, margin_slices=0)
    assert (box.y0, box.y1, box.x0, box.x1) == (7, 10, 10, 15)  # [7.5, 10) and [10, 15) rounded outward


def test_slice_boxes_follow_the_nearest_sampled_slices():
    zs = np.array([2, 6, 10])
    mask = np.zeros((3, 32, 32), dtype=bool)
    mask[0, 4:8, 4:8] = True     # slice 2: a small liver
    mask[1, 2:12, 10:20] = True  # slice 6: a larger one; slice 10 shows none
    boxes = inference.slice_boxes(mask, zs, 0, 12, 32, margin_px=1)
    expected = {0: (3, 9, 3, 9), 2: (3, 9, 3, 9),                 # at and below the first sample: its box
                3: (1, 13, 3, 21), 5: (1, 13, 3, 21),             # between two samples: their union
                6: (1, 13, 9, 21), 7: (1, 13, 9, 21), 11: (1, 13, 9, 21)}  # past the last liver: its box
    for z, box in expected.items():
        assert tuple(boxes[z]) == box, z


def test_slice_boxes_scale_align_and_clip():
    mask = np.zeros((1, 16, 16), dtype=bool)
    mask[0, 1:3, 10:16] = True
    box = inference.slice_boxes(mask, [0], 0, 1, 64, scale=4, margin_px=2, align=16)[0]
    # rows [4, 12) - 2 -> 2 -> 0; + 2 -> 14 -> 16; columns [40, 64) -> [38, 66) -> [32, 64) clipped
    assert tuple(box) == (0, 16, 32, 64)
    with pytest.raises(ValueError, match="holds liver"):
        inference.slice_boxes(np.zeros((2, 4, 4), dtype=bool), [0, 1], 0, 2, 4)


def test_empty_mask_has_no_region():
    assert region_from_mask(np.zeros((4, 8, 8), dtype=bool), np.arange(4), 4, 8) is None


def test_region_rejects_a_mask_and_slice_list_of_different_lengths():
    with pytest.raises(ValueError, match="N slice indices"):
        region_from_mask(np.zeros((4, 8, 8), dtype=bool), np.arange(3), 4, 8)


# --------------------------------------------------------------------------------------------
# The fast path against the exact one
# --------------------------------------------------------------------------------------------

def test_exact_path_returns_the_labels_a_volume_spells_out():
    labels, hu = coded_volume(size=64, num_slices=8)
    net = NearestLevel()
    pred = inference.segment(net, hu, hparams(64), fast=False)
    np.testing.assert_array_equal(pred, labels)
    assert net.dtypes == {torch.float32} and net.sizes == {(64, 64)}


@pytest.mark.parametrize("image_size", [128, 96])  # the model's grid the same size as the slices, and smaller
def test_fast_path_gives_the_exact_answer_voxel_for_voxel(image_size, monkeypatch):
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: False)  # float32: exact equality is due
    labels, hu = coded_volume(size=128)
    exact = inference.segment(NearestLevel(), hu, hparams(image_size), fast=False)
    net = NearestLevel()
    info: list = []
    fast = inference.segment(net, hu, hparams(image_size), fast=True, info=info)
    np.testing.assert_array_equal(fast, exact)
    found = info[0]
    box = found.box
    # The block covers the liver and leaves out part of the volume, or this test would prove nothing.
    assert found.bf16 is False
    z_liver = np.flatnonzero((labels >= 1).any(axis=(1, 2)))
    assert box.z0 <= z_liver[0] and z_liver[-1] < box.z1 < len(hu)
    assert found.share < 0.7 and found.full_slices >= box.z1 - box.z0
    step = inference.COARSE_STRIDE  # every step-th slice from step // 2: the samples centred in their runs
    assert found.coarse_slices == len(range(step // 2, len(hu), step))
    coarse = image_size // inference.COARSE_FACTOR
    crops = net.sizes - {(coarse, coarse)}
    assert (coarse, coarse) in net.sizes and any(h < image_size or w < image_size for h, w in crops)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in crops)  # on the pooling grid


def test_block_grows_from_a_seed_until_the_liver_ends_inside_it(monkeypatch):
    """A coarse pass that saw only a sliver of the liver: the block must grow to the whole of it."""
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: False)
    labels, hu = coded_volume(size=128)
    z_mid = int(np.flatnonzero((labels >= 1).any(axis=(1, 2))).mean())
    rows, cols = np.nonzero(labels[z_mid] >= 1)
    y, x = int(rows.mean()) // 16 * 16, int(cols.mean()) // 16 * 16
    monkeypatch.setattr(inference, "region_from_mask", lambda *a, **k: Box(z_mid, z_mid + 1, y, y + 16, x, x + 16))
    net = NearestLevel()
    info: list = []
    fast = inference.segment(net, hu, hparams(128), fast=True, info=info)
    np.testing.assert_array_equal(fast, inference.segment(net, hu, hparams(128), fast=False))
    assert info[0].grown >= 2  # in z and in-plane


def test_a_far_speck_of_liver_does_not_stretch_the_region(monkeypatch):
    """A 12x12 speck coded as liver on a sampled slice 44 slices past the liver's end: the coarse
    pass sees it, yet the block stays on the liver (only the coarse liver's largest component places
    it), and after `postprocess`, which drops the speck from --exact's answer too, the two paths
    agree voxel for voxel."""
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: False)
    labels, hu = coded_volume(size=128)  # liver on slices 8..40 of 48
    hu = np.concatenate([hu, np.full_like(hu, LEVELS_HU[0])])  # 48 more slices of background
    z_speck = 84  # sampled: 4, 12, ..., 84, 92
    assert z_speck % inference.COARSE_STRIDE == inference.COARSE_STRIDE // 2 and not (labels[41:] >= 1).any()
    hu[z_speck, 56:68, 56:68] = LEVELS_HU[1]
    info: list = []
    fast = inference.segment(NearestLevel(), hu, hparams(128), fast=True, info=info)
    exact = inference.segment(NearestLevel(), hu, hparams(128), fast=False)
    assert (exact[z_speck, 56:68, 56:68] == 1).all()  # --exact finds the speck ...
    assert not fast[z_speck].any()  # ... the fast path never looks there
    # The block: the liver's slices and the margins beyond the last sampled liver slice (36 + 7 + 2).
    assert info[0].box.z1 == 46 and info[0].full_slices <= 46
    np.testing.assert_array_equal(inference.postprocess(fast), inference.postprocess(exact))


def test_volume_without_liver_is_looked_at_again_then_left_background(monkeypatch):
    """No liver in the coarse pass: a second look at full resolution on every CONFIRM_STRIDE-th slice
    (12 slices: 2, 6, 10), none there either: all background, no full-resolution block, far less work
    than --exact's 12 slices."""
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: False)
    hu = np.full((12, 64, 64), LEVELS_HU[0], dtype=np.float32)
    net = NearestLevel()
    info: list = []
    pred = inference.segment(net, hu, hparams(64), fast=True, info=info)
    assert inference.CONFIRM_STRIDE == 4
    assert info[0].box is None and info[0].full_slices == 0 and info[0].second_look == 3
    assert pred.shape == (12, 64, 64) and not pred.any()
    assert (64, 64) in net.sizes
    summary = info[0].summary(12)
    assert summary["block_slices"] == 0 and not summary["liver_found"]
    assert inference.fast_path_slices(summary) == "3 of 12 slices (every 4th; no liver found, all background)"


def test_a_liver_the_coarse_pass_missed_is_found_by_the_second_look(monkeypatch):
    """A coarse pass that sees no liver (as a network that does not recognise it at half size): the
    second look at full size finds it, places the block, and the answer is --exact's, voxel for voxel."""
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: False)
    labels, hu = coded_volume(size=64)
    monkeypatch.setattr(inference, "_coarse_liver", lambda net, volume, *a: (np.arange(4, len(volume), 8), None, 2.0))
    info: list = []
    fast = inference.segment(NearestLevel(), hu, hparams(64), fast=True, info=info)
    np.testing.assert_array_equal(fast, inference.segment(NearestLevel(), hu, hparams(64), fast=False))
    assert info[0].box is not None and info[0].second_look == len(range(2, len(hu), 4))


def test_a_liver_on_fewer_slices_than_the_second_looks_stride_can_be_missed(monkeypatch):
    """The stated limit: liver on slices 3-5 only, between the second look's slices 2 and 6, and a
    coarse pass that misses it: background, where --exact finds it."""
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: False)
    labels, hu = coded_volume(size=64)
    hu[3:6] = hu[24]  # a liver slice (the liver spans 8..40)
    hu[:3], hu[6:] = LEVELS_HU[0], LEVELS_HU[0]
    monkeypatch.setattr(inference, "_coarse_liver", lambda net, volume, *a: (np.arange(4, len(volume), 8), None, 2.0))
    assert not inference.segment(NearestLevel(), hu, hparams(64), fast=True).any()
    assert inference.segment(NearestLevel(), hu, hparams(64), fast=False)[3:6].any()


def test_chosen_slices_and_lone_images_take_the_full_resolution_pass(monkeypatch):
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: False)
    labels, hu = coded_volume(size=64, num_slices=8)
    net = NearestLevel()
    info: list = []
    np.testing.assert_array_equal(inference.segment(net, hu, hparams(64), which=[5, 2], info=info), labels[[5, 2]])
    np.testing.assert_array_equal(inference.segment(net, hu, hparams(64), lone=True, info=info), labels)
    assert info == [] and net.sizes == {(64, 64)}


def test_cpu_without_native_bf16_stays_float32(monkeypatch):
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: False)
    _, hu = coded_volume(size=64, num_slices=8)
    net = NearestLevel()
    inference.segment(net, hu, hparams(64), fast=True)
    assert net.dtypes == {torch.float32}


@pytest.mark.skipif(not inference.cpu_has_fast_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 or AMX)")
def test_fast_path_runs_bf16_on_a_cpu_that_has_it_and_agrees():
    labels, hu = coded_volume(size=128)
    net = NearestLevel()
    info: list = []
    fast = inference.segment(net, hu, hparams(96), fast=True, info=info)
    assert info[0].bf16 is True and net.dtypes == {torch.bfloat16}
    exact = inference.segment(NearestLevel(), hu, hparams(96), fast=False)
    # bf16 rounds the logits (8 bits of mantissa): only pixels near a tie may change.
    assert (fast == exact).mean() > 0.999
    for region in (lambda a: a >= 1, lambda a: a == 2):
        a, b = region(fast), region(exact)
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.99


# --------------------------------------------------------------------------------------------
# Preprocessing and the Lightning-free network builder
# --------------------------------------------------------------------------------------------

def test_chunked_preprocessing_equals_the_whole_volume_at_once():
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 1000, size=(7, 40, 30)).astype(np.float32)
    expected = volumes.resize_slices(torch.from_numpy(volumes.window_hu(hu, WINDOW)), 24)
    got = inference.preprocess_volume(hu, {"window": WINDOW, "image_size": 24}, chunk=3)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_preprocessing_reads_any_dtype_byte_order_and_strides_as_float32_would():
    # A big-endian int16 volume seen through flips (negative strides), as load_volume(dtype=None) may
    # give it, against the float32 copy load_volume makes by default.
    rng = np.random.default_rng(1)
    stored = rng.integers(-1024, 2000, size=(7, 40, 30)).astype(">i2")[::-1, :, ::-1]
    hp = {"window": WINDOW, "image_size": 24}
    expected = inference.preprocess_volume(np.ascontiguousarray(stored, dtype=np.float32), hp)
    got = inference.preprocess_volume(stored, hp, chunk=3)
    assert torch.equal(got, expected)


# Hyperparameters written out by hand, none at its default, and the network each must give, built
# straight from unet.py / vgg16.py: an argument build_network dropped or mixed up would show.
SEG_HP = {"task": "segmentation", "in_channels": 5, "num_classes": 3, "base_width": 4, "depth": 3,
          "upsampling": "bilinear", "attention": True}
CLS_HP = {"task": "classification", "in_channels": 3, "num_classes": 2, "batch_norm": False, "dropout": 0.3,
          "hidden": 16, "head": "evidence", "pool_sharpness": 2.0}


def _direct(task: str, hp: dict) -> nn.Module:
    if task == "segmentation":
        from unet import UNet
        return UNet(in_channels=5, num_classes=3, base_width=4, depth=3, upsampling="bilinear", attention=True)
    from vgg16 import VGG16
    return VGG16(in_channels=3, num_classes=2, batch_norm=False, dropout=0.3, hidden=16,
                 head=hp.get("head", "fc"), pool_sharpness=hp.get("pool_sharpness", 5.0),
                 liver_gate=hp.get("liver_gate", False), width=hp.get("width", 1.0))


@pytest.mark.parametrize("task, hp", [("segmentation", SEG_HP), ("classification", CLS_HP),
                                      ("classification", {**CLS_HP, "liver_gate": True, "width": 0.25}),
                                      ("classification", {k: v for k, v in CLS_HP.items()
                                                          if k not in ("head", "pool_sharpness")})],
                         ids=["segmentation", "classification", "classification-liver-gate",
                              "classification-before-the-evidence-head"])
def test_build_network_from_hyperparameters_alone(task, hp):
    """A checkpoint's hyperparameters give the network they describe (a checkpoint from before the
    evidence head, without `head`, the classic fc head)."""
    torch.manual_seed(0)
    expected = _direct(task, hp).eval()
    got = inference.build_network(hp).eval()
    assert type(got) is type(expected) and repr(got) == repr(expected)  # layers, widths, dropout, upsampling
    got.load_state_dict(expected.state_dict(), strict=True)  # the same parameters, names and shapes
    x = torch.rand(2, hp["in_channels"], 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(got(x), expected(x), rtol=0, atol=0)  # and forward (pool sharpness)


def test_postprocess_removes_a_detached_island_and_a_far_tumor_voxel():
    labels = np.zeros((6, 32, 32), dtype=np.uint8)
    labels[1:5, 4:20, 4:20] = 1
    labels[1:5, 5:19, 5:19] = 2  # a large tumor filling the liver: its core is far from parenchyma, kept
    labels[2:4, 25:28, 25:28] = 1  # small detached liver island
    labels[5, 30, 1] = 2  # tumor voxel far from any liver
    expected = labels.copy()
    expected[2:4, 25:28, 25:28] = 0
    expected[5, 30, 1] = 0
    np.testing.assert_array_equal(inference.postprocess(labels), expected)
    # A tumor blob next to no liver parenchyma goes even when it is the largest piece.
    lone_tumor = np.zeros((3, 20, 20), dtype=np.uint8)
    lone_tumor[:, 2:10, 2:10] = 2
    lone_tumor[1, 15:17, 15:17] = 1
    cleaned = inference.postprocess(lone_tumor)
    assert (cleaned == 2).sum() == 0 and (cleaned == 1).sum() == 4


def test_runtime_checks_batch_and_threads_and_defaults_the_batch_per_device():
    before = torch.get_num_threads()
    try:
        device, batch = inference.runtime("cpu", None, 1)
        assert device.type == "cpu" and batch == 8 and torch.get_num_threads() == 1
        assert inference.runtime("cpu", 3, None)[1] == 3
        for bad_batch, bad_threads, flag in ((0, None, "--batch-size 0"), (None, 0, "--threads 0")):
            with pytest.raises(volumes.DataError, match=flag):
                inference.runtime("cpu", bad_batch, bad_threads)
    finally:
        torch.set_num_threads(before)


FAULTS_SCRIPT = """
import resource
import torch
import inference

def faults_of(rounds):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        block = torch.ones(16 << 20)  # 64 MiB of float32, above glibc's largest mmap threshold
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = faults_of(8)
took = inference.keep_freed_memory()
faults_of(8)  # the heap grows to hold the blocks glibc's layout needs (one to a few, run to run)
kept = faults_of(8)
print(took, plain, kept)
"""


def _glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (AttributeError, ValueError):  # no confstr, or no such name: not glibc
        return False


@pytest.mark.skipif(not _glibc(), reason="mallopt is glibc's")
def test_keep_freed_memory_lets_a_freed_block_be_reused_without_faulting_it_in_again():
    # A fresh process: the setting is process-wide. 8 rounds of a 64 MiB tensor: 16,384 pages each
    # (torch, unlike numpy, does not ask for huge pages, so a block faults in 4 KiB at a time).
    root = Path(inference.__file__).resolve().parent
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True, check=True, cwd=root)
    took, plain, kept = out.stdout.split()
    pages = 16 << 20 >> 10  # 64 MiB in 4 KiB pages
    assert took == "True"
    assert int(plain) >= 8 * pages * 0.9  # each round mapped anew and faulted in page by page
    assert int(kept) <= pages // 4  # once grown, the heap's pages are reused: next to no faults


def test_fast_path_slices_counts_the_block_not_the_crops_run_again():
    # The block held all 50 slices and one ran again on a wider crop: 51 crops, not "51 of 50 slices".
    assert inference.fast_path_slices({"slices": 50, "block_slices": 50, "full_resolution_slices": 51}) == \
        "50 of 50 slices (1 run again on a wider crop)"
    assert inference.fast_path_slices({"slices": 200, "block_slices": 111, "full_resolution_slices": 111}) == \
        "111 of 200 slices"


def test_evidence_map_is_a_quarter_of_the_slice_before_it_is_upsampled():
    """The comment at `evidence_maps` says S/4: what the network gives (three pooling stages deep,
    conv3_3's grid), checked on a tensor."""
    from vgg16 import VGG16
    net = VGG16(in_channels=3, num_classes=2, hidden=16, head="evidence").eval()
    with torch.inference_mode():
        for size in (64, 96):
            evidence = net.forward_with_evidence(torch.zeros(2, 3, size, size))[1]
            assert tuple(evidence.shape) == (2, 1, size // 4, size // 4)
    volume = torch.rand(3, 64, 64)
    maps = inference.evidence_maps(net, volume, context_slices=1, slices=[0, 2])
    assert tuple(maps.shape) == (2, 64, 64) and float(maps.min()) >= 0 and float(maps.max()) <= 1


def test_load_checkpoint_refuses_hyperparameters_other_than_expected(tmp_path):
    from lit_model import LitSegmenter
    from tests.helpers import assert_one_line_naming, save_checkpoint
    path = save_checkpoint(LitSegmenter(in_channels=3, base_width=4, image_size=32, context_slices=1,
                                        window=(-100.0, 200.0)), tmp_path / "seg.ckpt")
    same = {"base_width": ("--base-width", 4), "window": ("--window", [-100, 200]), "not_recorded": ("--x", 1)}
    assert inference.load_checkpoint(path, "segmentation", expected=same).hparams["base_width"] == 4
    other = {"base_width": ("--base-width", 8), "context_slices": ("--context-slices", 1),
             "window": ("--window", (-200.0, 250.0)), "attention": ("--attention", True)}
    with pytest.raises(volumes.DataError) as err:
        inference.load_checkpoint(path, "segmentation", "--resume", expected=other)
    msg = assert_one_line_naming(err, "seg.ckpt", "--base-width 4", "--base-width 8", "--window -100 200",
                                 "--window -200 250", "--attention off", "--attention on", "expected")
    assert "--context-slices" not in msg  # the one that agrees is not named
