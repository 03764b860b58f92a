"""Metrics, losses and checkpoint round trips of the LightningModules, against hand-computed values."""
import numpy as np
import pytest
import torch

from inference import volume_score
from tests.helpers import save_checkpoint
from lit_model import (LitClassifier, LitSegmenter, RegionDice, balanced_bce, binary_metrics_at,
                       choose_threshold, dice_from_counts, region_masks, soft_region_dice_loss, volume_scores,
                       stopwatch, warmup_cosine, warmup_cosine_in_time)


def labels(rows):
    return torch.tensor(rows, dtype=torch.int64)


def test_region_masks_follow_lits_rule():
    lab = labels([[[0, 1, 2]]])
    m = region_masks(lab)
    assert m.shape == (1, 2, 1, 3)
    assert m[0, 0, 0].tolist() == [False, True, True]   # liver region = liver + tumor
    assert m[0, 1, 0].tolist() == [False, False, True]  # tumor region = label 2 only


def test_region_dice_hand_computed():
    # liver region: pred {1,2,3,4}, truth {1,2,3,5} -> 2*3/(4+4) = 0.75; tumor: pred {4}, truth {3,5} -> 0
    pred = labels([[[0, 1, 1, 1, 2, 0]]])
    true = labels([[[0, 1, 1, 2, 0, 2]]])
    m = RegionDice()
    m.update(pred, true)
    liver, tumor = m.compute().tolist()
    assert liver == pytest.approx(0.75)
    assert tumor == pytest.approx(0.0)


def test_region_dice_pools_over_batches_not_mean_of_batches():
    m = RegionDice()
    # batch 1: tumor perfect on 1 pixel; batch 2: tumor pred 3 pixels, truth 1 overlapping
    m.update(labels([[[2, 0, 0, 0]]]), labels([[[2, 0, 0, 0]]]))
    m.update(labels([[[2, 2, 2, 0]]]), labels([[[2, 0, 0, 0]]]))
    # pooled: inter 2, pred 4, truth 2 -> 4/6; the mean of per-batch Dice would be (1 + 0.5) / 2 = 0.75
    assert m.compute()[1].item() == pytest.approx(4 / 6)


def test_empty_mask_rules_are_evaluate_py_rules():
    import evaluate
    assert dice_from_counts is evaluate.dice_from_counts  # one definition, not a copy
    m = RegionDice()
    m.update(labels([[[0, 1]]]), labels([[[0, 1]]]))  # no tumor anywhere, none predicted
    liver, tumor = m.compute().tolist()
    assert liver == 1.0 and np.isnan(tumor)  # no tumor in the split's reference: not applicable, not 1.0
    m.update(labels([[[2, 0]]]), labels([[[1, 0]]]))  # a tumor predicted, still none in the reference
    assert np.isnan(m.compute()[1].item())
    m.update(labels([[[0, 0]]]), labels([[[2, 0]]]))  # now one is missed: Dice 0
    assert m.compute()[1].item() == 0.0


def test_region_dice_per_group():
    m = RegionDice(num_groups=3)
    pred = labels([[[1, 1]], [[2, 0]], [[1, 0]]])
    true = labels([[[1, 0]], [[2, 0]], [[1, 0]]])
    m.update(pred, true, torch.tensor([0, 1, 2]))
    d = m.compute()
    assert d.shape == (3, 2)
    assert d[0].tolist() == pytest.approx([2 / 3, 1.0])  # case 0: liver 2*1/(2+1); tumor both empty: 1
    assert d[1].tolist() == pytest.approx([1.0, 1.0])
    # The mean over cases: liver (2/3 + 1 + 1) / 3; tumor (1 + 1 + 1) / 3, as the scorer's per-case mean.
    assert m.mean_over_groups().tolist() == pytest.approx([8 / 9, 1.0])
    none = RegionDice(num_groups=2)
    none.update(labels([[[1, 2]], [[1, 0]]]), labels([[[1, 1]], [[1, 0]]]), torch.tensor([0, 1]))
    liver, tumor = none.mean_over_groups().tolist()
    assert liver == pytest.approx(1.0) and np.isnan(tumor)  # no case has tumor: no tumor Dice


def test_region_dice_matches_independent_numpy_on_random_labels():
    rng = np.random.default_rng(0)
    p, t = rng.integers(0, 3, (4, 16, 16)), rng.integers(0, 3, (4, 16, 16))
    m = RegionDice()
    m.update(torch.from_numpy(p), torch.from_numpy(t))
    for k, (pm, tm) in enumerate(((p >= 1, t >= 1), (p == 2, t == 2))):
        expected = 2 * np.logical_and(pm, tm).sum() / (pm.sum() + tm.sum())
        assert m.compute()[k].item() == pytest.approx(expected, rel=1e-6)


def test_soft_dice_loss_near_zero_for_confident_correct_logits_and_high_for_wrong():
    target = labels([[[0, 1, 2, 2], [0, 1, 1, 0]]])
    good = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    bad = torch.nn.functional.one_hot((target + 1) % 3, 3).permute(0, 3, 1, 2).float() * 50
    assert soft_region_dice_loss(good, target).item() < 0.05
    # Hand count for the wrong labels (eps = 1): liver region pred 6, truth 5, overlap 3 -> 7/12;
    # tumor pred 3, truth 2, overlap 0 -> 1/6; loss = 1 - (7/12 + 1/6) / 2 = 0.625
    assert soft_region_dice_loss(bad, target).item() == pytest.approx(0.625, abs=1e-4)


def test_soft_dice_loss_per_slice_weighs_a_small_liver_like_a_large_one():
    # Slice A: liver on 4 pixels, predicted exactly; slice B: liver on 1 pixel, predicted nowhere.
    target = labels([[[1, 1, 1, 1]], [[1, 0, 0, 0]]])
    pred = labels([[[1, 1, 1, 1]], [[0, 0, 0, 0]]])
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float() * 50
    # Pooled (eps = 1): liver (2*4 + 1) / (4 + 5 + 1) = 0.9, tumour absent everywhere 1/1 -> 1 - 0.95.
    assert soft_region_dice_loss(logits, target).item() == pytest.approx(0.05, abs=1e-4)
    # Per slice: liver A 9/9 = 1, liver B 1/(0 + 1 + 1) = 0.5, tumour 1 in both -> 1 - 3.5 / 4.
    assert soft_region_dice_loss(logits, target, per_slice=True).item() == pytest.approx(0.125, abs=1e-4)
    # A region absent from a slice punishes whatever is predicted there: 1 / (1 + area).
    fp = torch.nn.functional.one_hot(labels([[[0, 0, 0, 0]], [[2, 0, 0, 0]]]), 3).permute(0, 3, 1, 2).float() * 50
    # liver region (tumour counts as liver): A 1/(0+4+1) = 0.2, B (2+1)/(1+1+1) = 1; tumour: A 1/1,
    # B absent from the reference, 1 predicted pixel: 1/(1+0+1) = 0.5
    expected = 1 - (0.2 + 1 + 1 + 0.5) / 4
    assert soft_region_dice_loss(fp, target, per_slice=True).item() == pytest.approx(expected, abs=1e-4)


def test_warmup_cosine_schedule_shape():
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-9)


def test_hyperparameters_record_preprocessing_and_rebuild_network():
    from unet import UNet
    m = LitSegmenter(in_channels=3, base_width=4, depth=3, upsampling="bilinear", attention=True, image_size=64,
                     context_slices=1, window=(-100.0, 200.0))
    hp = m.hparams
    assert hp.task == "segmentation" and hp.image_size == 64 and hp.context_slices == 1
    assert tuple(hp.window) == (-100.0, 200.0) and tuple(hp.class_names) == ("background", "liver", "tumor")
    assert (hp.in_channels, hp.num_classes, hp.base_width, hp.depth, hp.upsampling, hp.attention) == \
        (3, 3, 4, 3, "bilinear", True)
    # The module's network is the U-Net those arguments describe, built here straight from unet.py
    # (how hyperparameters become a network is tests/test_inference.py's).
    assert repr(m.net) == repr(UNet(in_channels=3, num_classes=3, base_width=4, depth=3, upsampling="bilinear",
                                    attention=True))
    c = LitClassifier(in_channels=1, hidden=16, image_size=32, context_slices=0)
    assert c.hparams.task == "classification" and tuple(c.hparams.class_names) == ("healthy", "tumor")


def test_checkpoint_reload_gives_identical_outputs(tmp_path):
    import pytorch_lightning as pl
    torch.manual_seed(0)
    for model in (LitSegmenter(in_channels=3, base_width=4, image_size=32),
                  LitClassifier(in_channels=3, hidden=16, image_size=32, head="fc"),
                  LitClassifier(in_channels=3, image_size=32),
                  LitClassifier(in_channels=3, image_size=32, liver_gate=True)):
        trainer = pl.Trainer(logger=False, enable_checkpointing=False, max_epochs=0, enable_progress_bar=False)
        trainer.strategy.connect(model)
        path = tmp_path / f"{model.hparams.task}.ckpt"
        trainer.save_checkpoint(path)
        loaded = type(model).load_from_checkpoint(path, map_location="cpu", weights_only=True)
        x = torch.rand(2, 3, 32, 32)
        model.eval(), loaded.eval()
        with torch.no_grad():
            assert torch.equal(model(x), loaded(x))


def test_speed_options_keep_outputs_and_checkpoint_keys():
    torch.manual_seed(0)
    model = LitSegmenter(in_channels=3, base_width=4, image_size=32).eval()
    keys = list(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        model.set_speed(channels_last=True)
        assert torch.allclose(model(x), reference, atol=1e-5)
    model.set_speed(channels_last=True, compile=True)  # compiles lazily, on the first call
    assert list(model.state_dict()) == keys  # checkpoints stay loadable by the predict scripts


def test_warmup_cosine_in_time_follows_the_clock_not_the_steps():
    now = [100.0]
    f = warmup_cosine_in_time(budget_s=60.0, warmup_fraction=0.1, elapsed=stopwatch(lambda: now[0]))
    assert f(0) == pytest.approx(1e-3)  # the stopwatch starts here
    now[0] = 103.0
    assert f(1) == pytest.approx(0.5)  # halfway through the 6 s warm-up
    now[0] = 106.0
    assert f(2) == pytest.approx(1.0)
    now[0] = 133.0  # (27 s after warm-up) / 54 s of decay = half: cos(pi/2)
    assert f(3) == pytest.approx(0.5)
    now[0] = 500.0
    assert f(10_000) == pytest.approx(0.0, abs=1e-12)


def test_warmup_cosine_in_time_reads_the_seconds_it_is_given():
    """A resumed run hands the schedule the training time its checkpoint saved plus what has run
    since: 30 s of a 60 s budget is the middle of the schedule, whatever the step number."""
    f = warmup_cosine_in_time(budget_s=60.0, warmup_fraction=0.0, elapsed=lambda: 30.0)
    assert f(0) == pytest.approx(0.5)  # cos(pi / 2)


def test_choose_threshold_youden_and_target_sensitivity_by_hand():
    prob = torch.tensor([0.1, 0.2, 0.35, 0.4, 0.6, 0.7, 0.8, 0.9])
    target = torch.tensor([0, 0, 1, 0, 0, 1, 1, 1])
    # Thresholds and (sensitivity, specificity): 0.9 (.25, 1), 0.8 (.5, 1), 0.7 (.75, 1) J=.75,
    # 0.6 (.75, .75), 0.4 (.75, .5), 0.35 (1, .5) J=.5, ...: Youden picks 0.7.
    assert choose_threshold(prob, target) == pytest.approx(0.7)
    # The highest threshold with sensitivity >= 0.9 is 0.35 (all four tumours found).
    assert choose_threshold(prob, target, target_sensitivity=0.9) == pytest.approx(0.35)
    assert choose_threshold(prob, target, target_sensitivity=0.5) == pytest.approx(0.8)
    assert choose_threshold(prob, torch.zeros(8, dtype=torch.int64)) is None  # one class: nothing to choose


def test_binary_metrics_at_threshold_by_hand():
    prob = torch.tensor([0.1, 0.2, 0.35, 0.4, 0.6, 0.7, 0.8, 0.9])
    target = torch.tensor([0, 0, 1, 0, 0, 1, 1, 1])
    m = binary_metrics_at(prob, target, 0.5)  # predicted tumour: 0.6, 0.7, 0.8, 0.9 -> TP 3, FP 1, FN 1, TN 3
    assert float(m["sensitivity"]) == pytest.approx(0.75) and float(m["specificity"]) == pytest.approx(0.75)
    assert float(m["acc"]) == pytest.approx(0.75) and float(m["balanced_acc"]) == pytest.approx(0.75)
    assert float(m["f1"]) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    healthy_only = binary_metrics_at(prob[:2], target[:2], 0.5)
    assert np.isnan(float(healthy_only["sensitivity"])) and float(healthy_only["specificity"]) == 1.0


def test_volume_scores_mean_of_the_three_highest_slices():
    prob = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.2, 0.3, 0.05])
    target = torch.tensor([1, 0, 1, 0, 0, 0, 0])
    case = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    scores, targets = volume_scores(prob, target, case)
    assert scores.tolist() == pytest.approx([(0.9 + 0.8 + 0.7) / 3, (0.3 + 0.2 + 0.05) / 3])
    assert targets.tolist() == [1, 0]
    assert volume_score([0.4]) == pytest.approx(0.4)  # fewer slices than three: their mean


def test_balanced_bce_weighs_rare_positives_like_the_negatives():
    logits = torch.tensor([[2.0, -1.0, -1.0, -1.0]])
    target = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    sp = torch.nn.functional.softplus
    expected = 0.5 * (sp(torch.tensor(-2.0)) + sp(torch.tensor(-1.0)))  # -log sigmoid(2), -log(1 - sigmoid(-1))
    assert balanced_bce(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert balanced_bce(logits[:, 1:], target[:, 1:]).item() == pytest.approx(sp(torch.tensor(-1.0)).item())


def test_classifier_evidence_loss_uses_the_tumour_mask():
    torch.manual_seed(0)
    model = LitClassifier(in_channels=1, image_size=64, context_slices=0)
    images = torch.rand(2, 1, 64, 64)
    target = torch.tensor([1, 0])
    labels = torch.zeros(2, 64, 64, dtype=torch.uint8)
    labels[0, 10:20, 30:40] = 2
    model.train()
    _, with_mask = model._logits_and_loss(images, target, labels)
    _, slice_only = model._logits_and_loss(images, target, None)
    model.hparams.deep_supervision = 0.0
    _, switched_off = model._logits_and_loss(images, target, labels)
    assert with_mask.item() > slice_only.item() and switched_off.item() == pytest.approx(slice_only.item())


def test_classifier_liver_gate_loss_by_hand():
    """Zeroed 1x1 heads, the coarsest one's biases tumour bt and liver bl: every location of every
    stride has tumour logit bt and liver logit bl, so the evidence is g = bt + log(sigmoid(bl))
    everywhere and the slice logit is g. Each of the three maps scores the tumour BCE of g over its
    three groups (tumour, healthy liver, the rest: all present) and the liver BCE of bl over two
    (liver, the rest); loss = CE + 3 * (tumour BCE + liver BCE), the maps' weights cancelling."""
    bt, bl = 0.7, -1.3
    model = LitClassifier(in_channels=1, image_size=64, context_slices=0, liver_gate=True)
    net = model.net
    for conv in (net.evidence, *net.evidence_skip):
        torch.nn.init.zeros_(conv.weight), torch.nn.init.zeros_(conv.bias)
    with torch.no_grad():
        net.evidence.bias.copy_(torch.tensor([bt, bl]))
    labels = torch.zeros(2, 64, 64, dtype=torch.uint8)
    labels[0, :32, :32] = 1
    labels[0, :16, :16] = 2  # one cell of the coarsest (4x4) map
    labels[1, 32:, 32:] = 1
    sp = lambda v: float(np.log1p(np.exp(v)))  # softplus: -log(sigmoid(-v))
    g = bt - sp(-bl)
    ce = (sp(-g) + sp(g)) / 2  # targets tumour, healthy
    tumour_bce = (sp(-g) + sp(g) + sp(g)) / 3
    liver_bce = (sp(-bl) + sp(bl)) / 2
    model.train()
    logits, loss = model._logits_and_loss(torch.rand(2, 1, 64, 64), torch.tensor([1, 0]), labels)
    assert logits[:, 1].tolist() == pytest.approx([g, g], rel=1e-5)
    assert loss.item() == pytest.approx(ce + 3.0 * (tumour_bce + liver_bce), rel=1e-5)


def test_checkpoint_carries_the_chosen_threshold(tmp_path):
    import pytorch_lightning as pl
    model = LitClassifier(in_channels=3, image_size=32)
    model.operating_threshold.fill_(0.123)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, max_epochs=0, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["threshold"] == pytest.approx(0.123)  # what the predict script reads
    loaded = LitClassifier.load_from_checkpoint(tmp_path / "c.ckpt", map_location="cpu", weights_only=True)
    assert loaded.threshold == pytest.approx(0.123)


def _validate_by_hand(model, volumes):
    """Feed one validation epoch: per volume, (served liver slices' probabilities, their targets,
    probabilities of its slices without liver); then the epoch's end (no trainer: nothing is logged)."""
    for i, (liver, target, rest) in enumerate(volumes):
        model.val_preds.update(torch.tensor(liver), torch.tensor(target), torch.full((len(liver),), i))
        model.val_rest.update(torch.tensor(rest), torch.zeros(len(rest), dtype=torch.int64),
                              torch.full((len(rest),), i, dtype=torch.int64))
    model._log_epoch("val")


# Five validation volumes. Scores over every slice (the mean of the 3 highest): V0 tumour
# (0.9+0.8+0.7)/3 = 0.8; V1 healthy, whose slice without liver reads 0.95: (0.95+0.3+0.2)/3 = 0.4833;
# V2 tumour (0.5+0.45+0.4)/3 = 0.45; V3 healthy (0.2+0.15+0.1)/3 = 0.15; V4 healthy 0.3.
HAND_VOLUMES = [([0.9, 0.8, 0.7], [1, 1, 0], []), ([0.3, 0.2], [0, 0], [0.95, 0.1]),
                ([0.5, 0.45, 0.4, 0.1], [0, 1, 0, 0], []), ([0.1, 0.2, 0.15], [0, 0, 0], [0.05]),
                ([0.35, 0.3, 0.25], [0, 0, 0], [])]


def test_volume_threshold_is_chosen_on_every_slice_of_the_validation_volumes(tmp_path):
    """Youden's J over the five volumes' scores: at 0.8 sensitivity 1/2, specificity 1 (J 0.5); at
    0.4833 1/2, 2/3; at 0.45 1, 2/3 (J 0.667, the best); at 0.3 1, 1/3. Scored over liver slices
    alone, V1 would read 0.25 and 0.45 would have specificity 1: the 2/3 is V1's slice without liver."""
    model = LitClassifier(in_channels=3, hidden=16, image_size=32)
    assert model.volume_point is None  # nothing chosen before validation
    _validate_by_hand(model, HAND_VOLUMES)
    assert model.volume_point == pytest.approx({"threshold": 0.45, "sensitivity": 1.0, "specificity": 2 / 3,
                                                "volumes": 5, "tumour_volumes": 2})
    save_checkpoint(model, tmp_path / "c.ckpt")
    hp = torch.load(tmp_path / "c.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hp["volume_threshold"] == pytest.approx(0.45)  # what the predict script and report.py read
    assert hp["volume_validation"] == pytest.approx({"sensitivity": 1.0, "specificity": 2 / 3, "volumes": 5,
                                                     "tumour_volumes": 2})
    loaded = LitClassifier.load_from_checkpoint(tmp_path / "c.ckpt", map_location="cpu", weights_only=True)
    assert loaded.volume_point == pytest.approx(model.volume_point)
    # --target-sensitivity 0.5: the highest threshold finding half the tumour volumes, 0.8.
    wanting = LitClassifier(in_channels=3, hidden=16, image_size=32, target_sensitivity=0.5)
    _validate_by_hand(wanting, HAND_VOLUMES)
    assert wanting.volume_point["threshold"] == pytest.approx(0.8)
    assert wanting.volume_point["specificity"] == pytest.approx(1.0)


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 1)])
def test_unserved_slices_are_each_volumes_slices_without_liver(tmp_path, world_size, rank):
    """The slices a classifier's loader leaves out are scored from the cache: their probabilities are
    the network's on the 2.5D stacks built here by hand (the end slice repeating at the edges), case by
    case; with two processes, the second takes the second volume."""
    import types
    import dataset
    import phantom
    phantom.write_synthetic_lits(tmp_path / "d", cases=2, size=32, seed=0)
    cases = dataset.prepare_cases(dataset.find_cases(tmp_path / "d"), tmp_path / "cache", tmp_path / "d", 32,
                                  progress=False)
    ds = dataset.LiTSSliceDataset(cases, "classification", context_slices=1, liver_only=True, return_case=True)
    torch.manual_seed(0)
    model = LitClassifier(in_channels=3, hidden=16, image_size=32).eval()
    model._trainer = types.SimpleNamespace(datamodule=types.SimpleNamespace(datasets={"val": ds}, batch_size=4),
                                           sanity_checking=False, global_rank=rank, world_size=world_size)
    model._score_unserved_slices("val")
    model._trainer = None
    prob, target, case = model.val_rest.compute()
    expected, expected_case = [], []
    for ci in range(rank, len(cases), world_size):
        images = torch.from_numpy(np.load(cases[ci].image_path).astype(np.float32))  # (Z, S, S)
        z_count = len(images)
        for z in np.flatnonzero(cases[ci].liver_pixels == 0):
            stack = images[[max(z - 1, 0), z, min(z + 1, z_count - 1)]][None]  # (1, 3, S, S)
            with torch.no_grad():
                expected.append(model.net(stack).softmax(1)[0, 1])
            expected_case.append(ci)
    assert len(expected) > 0 and case.tolist() == expected_case and not target.any()
    torch.testing.assert_close(prob, torch.stack(expected), atol=1e-4, rtol=0)


def test_checkpoint_from_before_the_volume_threshold_loads_with_none_chosen(tmp_path):
    model = LitClassifier(in_channels=3, hidden=16, image_size=32)
    save_checkpoint(model, tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", map_location="cpu", weights_only=True)
    del ckpt["state_dict"]["volume_operating_point"]
    for key in ("volume_threshold", "volume_validation"):
        del ckpt["hyper_parameters"][key]
    torch.save(ckpt, tmp_path / "old.ckpt")
    assert LitClassifier.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu",
                                              weights_only=True).volume_point is None


def test_pretrained_weights_bring_imagenet_normalisation_to_training_and_prediction(tmp_path, monkeypatch):
    """--pretrained: the input is normalised by ImageNet's mean and standard deviation averaged over
    R, G and B, (0.485 + 0.456 + 0.406) / 3 and (0.229 + 0.224 + 0.225) / 3 (every channel meets the same
    grey filters), in training's forward and, read from the checkpoint, in prediction's network. The
    weights cannot be downloaded here: their loading is skipped, the normalisation is what is tested."""
    import lit_model
    from inference import load_checkpoint
    from vgg16 import VGG16
    monkeypatch.setattr(lit_model, "load_imagenet_weights", lambda net: net)
    torch.manual_seed(0)
    model = LitClassifier(in_channels=3, image_size=32, pretrained=True).eval()
    mean, std = (0.485 + 0.456 + 0.406) / 3, (0.229 + 0.224 + 0.225) / 3
    assert model.hparams.input_mean == pytest.approx(mean) and model.hparams.input_std == pytest.approx(std)
    bare = VGG16(in_channels=3, num_classes=2, head="evidence")
    bare.load_state_dict(model.net.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = bare.eval()((x - mean) / std)
        torch.testing.assert_close(model(x), expected)
        net = load_checkpoint(save_checkpoint(model, tmp_path / "p.ckpt"), "classification").network(torch.device("cpu"))
        torch.testing.assert_close(net(x), expected, atol=1e-4, rtol=1e-4)  # batch norms folded there
        plain = LitClassifier(in_channels=3, image_size=32)  # from scratch: the [0, 1] input as it is
        assert plain.hparams.input_mean is None
        bare.load_state_dict(plain.net.state_dict())
        torch.testing.assert_close(plain.eval()(x), bare(x))


def test_slice_counts_mean_per_slice_dice_by_hand():
    from lit_model import SliceCounts
    m = SliceCounts()
    # slice 0: liver pred {0,1}, ref {1} -> 2/3; slice 1: liver pred {}, ref {0} -> 0; slice 2: both empty -> 1
    m.update(labels([[[1, 1, 0]], [[0, 0, 0]]]), labels([[[0, 1, 0]], [[1, 0, 0]]]))
    m.update(labels([[[0, 0, 0]]]), labels([[[0, 0, 0]]]))
    liver, tumor = m.compute().tolist()
    assert liver == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert np.isnan(tumor)  # no slice's reference has tumour: not applicable


def test_balanced_bce_three_groups_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -2.0]])
    target = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]])
    liver = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    sp = lambda v: torch.nn.functional.softplus(torch.tensor(v)).item()
    tumour, healthy_liver, rest = sp(-2.0), (sp(1.0) + sp(0.0)) / 2, (sp(-1.0) + sp(-2.0)) / 2
    assert balanced_bce(logits, target, liver).item() == pytest.approx((tumour + healthy_liver + rest) / 3, rel=1e-6)


def test_segmenter_deep_supervision_loss_by_hand():
    """All logits zero at every level (zeroed output and deep-supervision heads): softmax 1/3 each, so
    CE = ln 3 and, on an all-background target, the batch soft Dice (eps 1) of a region with
    probability q over P pixels is 1 / (q P + 1). Level 0 (32x32) weighs 1, level 1 (16x16) 1/2."""
    model = LitSegmenter(in_channels=1, base_width=4, depth=3, image_size=32, context_slices=0, deep_supervision=1)
    for conv in (model.net.head, model.ds_heads[0]):
        torch.nn.init.zeros_(conv.weight), torch.nn.init.zeros_(conv.bias)
    target = torch.zeros(1, 32, 32, dtype=torch.long)

    def level_loss(pixels):
        dice = [1 / (q * pixels + 1) for q in (2 / 3, 1 / 3)]  # liver = p1 + p2, tumour = p2
        return np.log(3) + 1 - np.mean(dice)

    expected = (level_loss(32 * 32) + 0.5 * level_loss(16 * 16)) / 1.5
    logits, loss = model._deep_loss(torch.randn(1, 1, 32, 32), target)
    assert logits.shape == (1, 3, 32, 32)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert "ds_heads.0.weight" in model.state_dict()  # beside the network, not in it
    assert not any(k.startswith("ds_heads") for k in model.net.state_dict())
    with pytest.raises(ValueError, match="deep_supervision"):
        LitSegmenter(depth=3, deep_supervision=3)
