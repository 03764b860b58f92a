"""LightningModules for the two tasks: `LitClassifier` (VGG16) and `LitSegmenter` (U-Net).

    model = LitSegmenter(in_channels=3, base_width=16, image_size=128, context_slices=1)
    trainer.fit(model, datamodule=LiTSDataModule("data/synthetic", "segmentation", image_size=128))

Each module records its preprocessing (window, image size, context slices, class names, task) with
`save_hyperparameters()`, so a checkpoint alone rebuilds the network and its input pipeline
(see `build_network` and the predict scripts).

Metric rules, stated once:
- Regions follow the LiTS scorer: liver = label >= 1 (liver and tumor together), tumor = label 2.
- Dice is accumulated over every pixel of the epoch (sum of intersections over sum of sizes),
  not averaged over batches or slices, so empty tumor slices neither inflate nor deflate it.
- Empty masks, the rules of `evaluate.py` (one definition for training and evaluation): a split whose
  reference has none of a region (e.g. liver-only data: no tumor in any validation patient) gets NaN
  for that region's Dice, "not applicable", never 1.0 (`evaluate.pooled_dice`); per test case, both
  empty is 1 and one empty is 0 (`evaluate.dice_from_counts`), and the mean over cases is NaN when no
  case has the region (`evaluate.mean_case_dice`).
- Background is never part of a reported Dice.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Timer
from torch import nn
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc, binary_roc
from torchmetrics.utilities import dim_zero_cat

from evaluate import dice_from_counts, mean_case_dice, pooled_dice
from inference import build_network, infer_batched, tumor_probability, volume_score
from volumes import CLS_CLASSES, SEG_CLASSES, WINDOW_HU, overlay
from vgg16 import IMAGENET_MEAN, IMAGENET_STD, load_imagenet_weights


def region_masks(labels: torch.Tensor) -> torch.Tensor:
    """Labels (N, H, W) in {0, 1, 2} -> boolean regions (N, 2, H, W): [liver (>= 1), tumor (== 2)]."""
    return torch.stack([labels >= 1, labels == 2], dim=1)


class RegionDice(Metric):
    """Dice of the liver and tumor regions, accumulated over all pixels since the last reset.

    With `num_groups`, counts are kept per group (e.g. per test case) and `compute` returns
    (num_groups, 2); without, (2,) as [liver, tumor]. Counts are exact integers, summed across
    processes under DDP."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_groups: int | None = None):
        super().__init__()
        self.per_group = num_groups is not None
        for name in ("inter", "pred_sum", "target_sum"):
            self.add_state(name, torch.zeros(num_groups or 1, 2, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred_labels: torch.Tensor, target: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        p, t = region_masks(pred_labels), region_masks(target)  # (N, 2, H, W)
        if groups is None:
            groups = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
        for state, value in ((self.inter, (p & t).sum((2, 3))), (self.pred_sum, p.sum((2, 3))),
                             (self.target_sum, t.sum((2, 3)))):
            state.index_add_(0, groups, value.to(torch.int64))

    def _counts(self):
        return (t.detach().cpu().numpy() for t in (self.inter, self.pred_sum, self.target_sum))

    def compute(self) -> torch.Tensor:
        """Per group: each group's Dice by the per-case rule. Without groups: the split's pooled Dice,
        NaN for a region absent from the whole reference."""
        rule = dice_from_counts if self.per_group else pooled_dice
        dice = torch.as_tensor(rule(*self._counts()), dtype=torch.float32, device=self.inter.device)
        return dice if self.per_group else dice[0]

    def mean_over_groups(self) -> torch.Tensor:
        """(2,) [liver, tumor]: the mean over groups of the per-group Dice, NaN for a region no group's
        reference has."""
        with self.sync_context():  # compute() syncs across processes by itself; this needs it said
            inter, pred, target = self._counts()
        return torch.tensor([mean_case_dice(inter[:, r], pred[:, r], target[:, r]) for r in range(2)],
                            dtype=torch.float32, device=self.inter.device)


class SliceCounts(Metric):
    """Per-slice liver and tumour counts (intersection, prediction, reference) of every slice seen,
    gathered across processes: the "Dice per slice" of 2D data (slice folders, where a patient is a
    few scattered slices) is their `mean_case_dice`, each slice a case."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("counts", default=[], dist_reduce_fx="cat")

    def update(self, pred_labels: torch.Tensor, target: torch.Tensor) -> None:
        p, t = region_masks(pred_labels), region_masks(target)  # (N, 2, H, W)
        self.counts.append(torch.stack([(p & t).sum((2, 3)), p.sum((2, 3)), t.sum((2, 3))], dim=1))  # (N, 3, 2)

    def compute(self) -> torch.Tensor:
        # A list before synchronisation, one tensor after it (under DDP).
        if isinstance(self.counts, list) and not self.counts:
            return torch.full((2,), float("nan"))
        c = dim_zero_cat(self.counts).cpu().numpy()  # (slices, 3, 2)
        return torch.tensor([mean_case_dice(c[:, 0, r], c[:, 1, r], c[:, 2, r]) for r in range(2)],
                            dtype=torch.float32)


def soft_region_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
                          per_slice: bool = False) -> torch.Tensor:
    """1 - soft Dice of the liver and tumor regions, averaged over the two.

    logits (N, 3, H, W); target (N, H, W). Region probabilities: liver = p1 + p2, tumor = p2,
    the same regions the metrics score. By default one Dice over the whole batch (a region's Dice
    weighs slices by their area, as the pooled metric does). `per_slice`: one Dice per slice and
    region, then their mean, as the "Dice per slice" metric weighs them: a slice with a small liver
    counts as much as a large one; a region absent from a slice scores 1 / (1 + its predicted area),
    which punishes any prediction there (MONAI's `DiceLoss(batch=False)` rule, with eps = 1)."""
    prob = logits.float().softmax(dim=1)
    p = torch.stack([prob[:, 1] + prob[:, 2], prob[:, 2]], dim=1)  # (N, 2, H, W)
    t = region_masks(target).float()
    dims = (2, 3) if per_slice else (0, 2, 3)
    inter = (p * t).sum(dims)
    dice = (2 * inter + eps) / (p.sum(dims) + t.sum(dims) + eps)  # (N, 2) per slice, else (2,)
    return 1 - dice.mean()


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR factor: linear warm-up from ~0 to 1, then cosine decay to 0 at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def stopwatch(clock=time.monotonic):
    """Seconds since the first call: the clock of a time-budgeted schedule run without Lightning's
    `Timer` (a run that cannot be resumed, as nothing saves where it stood)."""
    start: list[float] = []

    def elapsed() -> float:
        now = clock()
        if not start:
            start.append(now)
        return now - start[0]
    return elapsed


def warmup_cosine_in_time(budget_s: float, warmup_fraction: float, elapsed):
    """The same shape as `warmup_cosine` over training time: a run with a time budget and no epoch
    count warms up over the first `warmup_fraction` of the budget and decays to 0 as it runs out,
    however many steps fit. `elapsed()` gives the seconds of training so far; `_Base` passes the
    trainer's `Timer` (the clock `--max-time` stops the run by), which a checkpoint saves and
    `--resume` restores, so a resumed run goes on along its schedule instead of warming up again."""
    def factor(step: int) -> float:
        progress = min(1.0, max(0.0, elapsed()) / budget_s)
        if progress < warmup_fraction:
            return max(progress / warmup_fraction, 1e-3)
        return 0.5 * (1 + math.cos(math.pi * (progress - warmup_fraction) / (1 - warmup_fraction)))
    return factor


class _Base(pl.LightningModule):
    """What both tasks share: the split routing of the Lightning hooks, the speed options, and the
    optimiser (AdamW, warm-up then cosine, stepped per batch)."""

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on biases and norms
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr)
        if self.time_budget_s:
            factor = warmup_cosine_in_time(self.time_budget_s, hp.warmup_fraction, self._training_clock())
        else:
            total = max(1, int(self.trainer.estimated_stepping_batches))
            factor = warmup_cosine(total, max(1, int(total * hp.warmup_fraction)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # Seconds the schedule spans instead of the epochs, for a run bounded by time alone (train.py
    # --max-time without --max-epochs); a run-time choice, not a hyperparameter of the model.
    time_budget_s: float | None = None

    def _training_clock(self):
        """Seconds of training so far: the trainer's `Timer` (present with `max_time`; its count
        survives a resume), else a stopwatch started at the first call."""
        trainer = self._trainer
        timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None) if trainer else None
        return (lambda: timer.time_elapsed("train")) if timer is not None else stopwatch()

    _channels_last = False
    _compiled: nn.Module | None = None

    def set_speed(self, channels_last: bool = False, compile: bool = False) -> None:
        """Run-time speed choices that leave the weights and the checkpoint format as they are."""
        self._channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        # Kept out of the module registry, so state_dict keys stay "net.*" with or without compile.
        self.__dict__["_compiled"] = torch.compile(self.net) if compile else None

    def _prepared(self, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
        """(the network to call, compiled when asked; x (N, C, H, W) in its memory format): what every
        forward pass of the wrapped network goes through, whichever of its forward methods it calls."""
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._compiled or self.net, x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> logits from the wrapped network (see its forward)."""
        net, x = self._prepared(x)
        return net(x)

    # Each task defines `_step(batch, split)` (loss, metric updates, step logging) and
    # `_log_epoch(split)` (epoch metrics); the Lightning hooks only route the splits.
    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_train_epoch_end(self):
        self._log_epoch("train")

    def on_validation_epoch_end(self):
        self._log_epoch("val")

    def on_test_epoch_end(self):
        self._log_epoch("test")


class SlicePredictions(Metric):
    """Every tumour probability, target and case index of an epoch, gathered across processes, so
    that metrics needing the whole epoch (ROC, a chosen threshold, per-volume scores) see it all."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        for name in ("prob", "target", "case"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, prob: torch.Tensor, target: torch.Tensor, case: torch.Tensor | None = None) -> None:
        self.prob.append(prob.detach().float())
        self.target.append(target.detach().long())
        self.case.append(case.detach().long() if case is not None else torch.full_like(target, -1).long())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(self.prob, list) and not self.prob:  # no batch this epoch
            return torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        return dim_zero_cat(self.prob), dim_zero_cat(self.target), dim_zero_cat(self.case)


def choose_threshold(prob: torch.Tensor, target: torch.Tensor, target_sensitivity: float | None = None) -> float | None:
    """The operating point on validation predictions: the threshold maximising Youden's J
    (sensitivity + specificity - 1), or, with `target_sensitivity`, the highest threshold whose
    sensitivity reaches it (the most specific one that finds that share of tumours). None when the
    predictions hold only one class (no ROC to choose on)."""
    if prob.numel() == 0 or target.min() == target.max():
        return None
    fpr, tpr, thresholds = binary_roc(prob, target)  # thresholds descending, the first is 1 (nothing positive)
    if target_sensitivity is None:
        i = int(torch.argmax(tpr - fpr))
    else:
        i = int(torch.nonzero(tpr >= target_sensitivity - 1e-12)[0])
    return float(thresholds[i].clamp(0.0, 1.0))


def volume_scores(prob: torch.Tensor, target: torch.Tensor, case: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-volume tumour score (`inference.volume_score`: the mean of its highest slice
    probabilities, as the predict script gives it) and target (whether any of its slices is
    tumorous). Returns (scores (V,), targets (V,)) over the cases present."""
    cases = torch.unique(case)
    scores = torch.tensor([volume_score(prob[case == c]) for c in cases], device=prob.device)
    return scores, torch.stack([target[case == c].max() for c in cases])


def balanced_bce(logits: torch.Tensor, target: torch.Tensor, liver: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of an evidence map against its tumour target (both (N, 1, h, w)),
    averaged within each group of locations and then over the groups present: tumour, healthy
    liver (where `liver` is set and there is no tumour) and everything else. Tumour covers a few
    percent of a map and healthy liver a tenth: a plain mean would teach "never tumour", and
    tumour against everything else would teach "liver is tumour"; here healthy liver, the
    negative that matters, weighs a third."""
    per = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    pos = target > 0.5
    groups = [pos, ~pos] if liver is None else [pos, (liver > 0.5) & ~pos, (liver <= 0.5) & ~pos]
    means = [per[g].mean() for g in groups if g.any()]
    return torch.stack(means).mean()


def binary_metrics_at(prob: torch.Tensor, target: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    """Accuracy, balanced accuracy, sensitivity, specificity and F1 at `threshold` (tumour when
    prob >= threshold); a rate with an empty denominator is NaN."""
    pred = prob >= threshold
    pos, neg = target == 1, target == 0
    tp, fn = (pred & pos).sum().double(), (~pred & pos).sum().double()
    tn, fp = (~pred & neg).sum().double(), (pred & neg).sum().double()
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=prob.device)
    sens = tp / (tp + fn) if tp + fn > 0 else nan
    spec = tn / (tn + fp) if tn + fp > 0 else nan
    return {"acc": (tp + tn) / max(1, len(target)), "balanced_acc": (sens + spec) / 2, "sensitivity": sens,
            "specificity": spec, "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else nan}


# The volume verdict's operating point: the threshold, then the sensitivity and specificity it gave on
# the validation volumes, how many volumes there were and how many held tumour.
VOLUME_POINT = ("threshold", "sensitivity", "specificity", "volumes", "tumour_volumes")


class LitClassifier(_Base):
    """VGG16 deciding per slice: healthy (0) or tumor (1).

    head="evidence" (default) scores each location of the last feature map and pools the scores
    into the slice logit; with `deep_supervision` > 0 that map is also trained against the tumour
    mask max-pooled to its size (binary cross-entropy), the dense signal that lets a VGG16 learn
    tumours from a dozen patients. With `liver_gate` the head also reads a liver logit per location,
    trained the same way against the liver mask, and tumour evidence counts only as far as the place
    is liver (`vgg16.VGG16.forward_with_evidence`). head="fc" is the classic VGG16 head, trained on
    slice labels.
    The operating threshold is chosen on each validation epoch's predictions (Youden's J, or the
    highest threshold reaching `target_sensitivity`), kept in the state dict and written into the
    checkpoint's hyperparameters as `threshold`, which the predict script uses.

    A volume's verdict has a threshold of its own, chosen by the same rule on the validation volumes'
    scores, each scored as the predict script and report.py score a volume: `inference.volume_score`
    (the mean of its 3 highest slice probabilities) over every slice of the volume. The loaders serve
    the slices that show liver (what the classifier learns and its slice metrics count), so the other
    slices of each validation and test volume are scored apart, once per epoch (`_score_unserved_slices`).
    The threshold and the sensitivity and specificity it gave on the validation volumes go into the
    checkpoint's hyperparameters as `volume_threshold` and `volume_validation` (None while the
    validation volumes hold one class only: no threshold can be chosen)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, batch_norm: bool = True, dropout: float = 0.5,
                 hidden: int = 4096, head: str = "evidence", pool_sharpness: float = 5.0,
                 deep_supervision: float = 3.0, liver_gate: bool = False, width: float = 1.0,
                 pretrained: bool = False,
                 lr: float = 1e-4, weight_decay: float = 1e-4, warmup_fraction: float = 0.05,
                 class_weights: Sequence[float] | None = None, threshold: float = 0.5,
                 target_sensitivity: float | None = None, window: Sequence[float] = WINDOW_HU,
                 image_size: int = 256, context_slices: int = 1, class_names: Sequence[str] = CLS_CLASSES,
                 task: str = "classification", volume_threshold: float | None = None,
                 volume_validation: dict | None = None, input_mean: float | None = None,
                 input_std: float | None = None):
        super().__init__()
        if num_classes != 2:
            raise ValueError(f"the classifier is binary (healthy/tumor), got num_classes={num_classes}")
        if target_sensitivity is not None and not 0 < target_sensitivity <= 1:
            raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
        self.save_hyperparameters()
        if pretrained and input_mean is None and input_std is None:
            # ImageNet's weights expect ImageNet's normalisation; recorded, so prediction normalises too.
            self.hparams.input_mean, self.hparams.input_std = IMAGENET_MEAN, IMAGENET_STD
        self.net = build_network(self.hparams)
        if pretrained:
            load_imagenet_weights(self.net)
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weight", weight, persistent=False)
        # In the state dict, so `trainer.test(ckpt_path=best)` tests at the threshold chosen with best.
        self.register_buffer("operating_threshold", torch.tensor(float(threshold), dtype=torch.float64))
        # The volume verdict's operating point, NaN until chosen: VOLUME_POINT's fields, in that order.
        found = volume_validation or {}
        point = [volume_threshold] + [found.get(k) for k in VOLUME_POINT[1:]]
        self.register_buffer("volume_operating_point", torch.tensor(
            [float("nan") if v is None else float(v) for v in point], dtype=torch.float64))
        self.train_preds, self.val_preds, self.test_preds = SlicePredictions(), SlicePredictions(), SlicePredictions()
        # The slices of each validation and test volume that the loader does not serve (no liver shown).
        self.val_rest, self.test_rest = SlicePredictions(), SlicePredictions()
        self.roc_curve: tuple[torch.Tensor, torch.Tensor] | None = None
        self.confusion: torch.Tensor | None = None

    @property
    def threshold(self) -> float:
        return float(self.operating_threshold)

    @property
    def volume_point(self) -> dict | None:
        """The volume verdict's threshold and what it gave on the validation volumes (`VOLUME_POINT`),
        None before one was chosen."""
        values = self.volume_operating_point.tolist()
        return None if math.isnan(values[0]) else dict(zip(VOLUME_POINT, values))

    def _logits_and_loss(self, images: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None):
        if self.hparams.head != "evidence":
            logits = self(images)  # (N, 2)
            return logits, F.cross_entropy(logits.float(), target, weight=self.class_weight)
        net, images = self._prepared(images)
        supervise = self.hparams.deep_supervision > 0 and labels is not None and self.training
        out = net.forward_with_evidence(images, aux=supervise)
        logits = out[0]  # (N, 2); out[1] is the evidence map (N, 1, H/4, W/4), out[2] its coarser partial sums
        loss = F.cross_entropy(logits.float(), target, weight=self.class_weight)
        if supervise:
            tumor, liver = (labels == 2)[:, None].float(), (labels >= 1)[:, None].float()  # (N, 1, H, W)
            maps = [(out[1], 1.0)] + [(m, 0.5) for m in out[2]]  # the auxiliary maps count half
            # A location is tumour evidence when any pixel under it is tumour (max-pooled mask).
            ds = sum(w * balanced_bce(m, F.adaptive_max_pool2d(tumor, m.shape[-2:]),
                                      F.adaptive_max_pool2d(liver, m.shape[-2:])) for m, w in maps)
            # The liver gate's logits against the liver mask (tumour included), weighted alike, finest
            # map first: a location is liver when any pixel under it is.
            livers = zip(out[3][::-1], (w for _, w in maps))
            ds = ds + sum(w * balanced_bce(m, F.adaptive_max_pool2d(liver, m.shape[-2:])) for m, w in livers)
            loss = loss + self.hparams.deep_supervision * ds / sum(w for _, w in maps)
        return logits, loss

    def _step(self, batch, split: str) -> torch.Tensor:
        images, target = batch[0], batch[1]  # (N, C, H, W), (N,)
        labels = batch[2] if len(batch) > 2 else None  # (N, H, W) label map
        case = batch[3] if len(batch) > 3 else None  # (N,) case index
        logits, loss = self._logits_and_loss(images, target, labels)
        prob = logits.detach().float().softmax(dim=1)[:, 1]  # (N,) tumor probability
        getattr(self, f"{split}_preds").update(prob, target, case)
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(target),
                 sync_dist=not on_step)
        if on_step:
            acc = ((prob >= self.threshold).long() == target).float().mean()
            self.log("train/acc_step", acc, on_step=True, on_epoch=False, batch_size=len(target))
        return loss

    def _log_epoch(self, split: str) -> None:
        collected = getattr(self, f"{split}_preds")
        prob, target, case = collected.compute()
        collected.reset()
        if prob.numel() == 0:
            return
        if split == "val":
            chosen = choose_threshold(prob, target, self.hparams.target_sensitivity)
            if chosen is not None:
                self.operating_threshold.fill_(chosen)
        both = target.min() != target.max()
        nan = torch.tensor(float("nan"), device=prob.device)
        values = {"auroc": binary_auroc(prob, target) if both else nan, "threshold": self.operating_threshold}
        values.update(binary_metrics_at(prob, target, self.threshold))
        if split != "train" and (case >= 0).any():
            values.update(self._volume_metrics(split, prob, target, case))
        self.log_dict({f"{split}/{k}": v.float() for k, v in values.items()}, prog_bar=split != "train")
        if split == "test":
            fpr, tpr, _ = binary_roc(prob, target) if both else (None, None, None)
            self.roc_curve = (fpr.cpu(), tpr.cpu()) if both else None
            pred = (prob >= self.threshold).long()
            self.confusion = torch.stack([torch.stack([((target == t) & (pred == p)).sum() for p in (0, 1)])
                                          for t in (0, 1)]).cpu()

    def _volume_metrics(self, split: str, prob: torch.Tensor, target: torch.Tensor,
                        case: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each volume scored over all its slices (those served and `_score_unserved_slices`' rest); on
        validation the volume threshold chosen on those scores; the volume AUROC, and the sensitivity
        and specificity at the volume threshold (NaN while none is chosen)."""
        rest = getattr(self, f"{split}_rest")
        extra = rest.compute()
        rest.reset()
        served = case >= 0
        scores, vol_target = volume_scores(torch.cat([prob[served], extra[0].to(prob.device)]),
                                           torch.cat([target[served], extra[1].to(target.device)]),
                                           torch.cat([case[served], extra[2].to(case.device)]))
        sanity = self._trainer is not None and self._trainer.sanity_checking
        if split == "val" and not sanity:
            chosen = choose_threshold(scores, vol_target, self.hparams.target_sensitivity)
            if chosen is not None:
                at = binary_metrics_at(scores, vol_target, chosen)
                self.volume_operating_point.copy_(torch.tensor(
                    [chosen, float(at["sensitivity"]), float(at["specificity"]), len(scores),
                     int(vol_target.sum())], dtype=torch.float64))
        nan = torch.tensor(float("nan"), device=prob.device)
        two = vol_target.min() != vol_target.max()
        threshold = float(self.volume_operating_point[0])
        at = binary_metrics_at(scores, vol_target, threshold) if not math.isnan(threshold) else {}
        return {"auroc_volume": binary_auroc(scores, vol_target) if two else nan,
                "threshold_volume": self.volume_operating_point[0],
                "sensitivity_volume": at.get("sensitivity", nan), "specificity_volume": at.get("specificity", nan)}

    def on_validation_epoch_start(self):
        self._score_unserved_slices("val")

    def on_test_epoch_start(self):
        self._score_unserved_slices("test")

    def _score_unserved_slices(self, split: str) -> None:
        """Score the slices of the split's volumes that its loader leaves out (those without liver),
        from the prepared cache the loader reads, as the predict script would score them
        (`inference.infer_batched`). Each process takes every world_size-th volume; the predictions
        are gathered with the rest of the epoch's. Runs in the evaluation loop's epoch start, after
        the callbacks' (an EMA callback has put the averaged weights in place by then). Skipped
        without a datamodule that names its volumes, and in the sanity check."""
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        ds = getattr(dm, "datasets", {}).get(split) if dm is not None else None
        if ds is None or not getattr(ds, "return_case", False) or trainer.sanity_checking:
            return
        probs, cases = [torch.zeros(0)], [torch.zeros(0, dtype=torch.long)]
        for ci in range(trainer.global_rank, len(ds.cases), trainer.world_size):
            c = ds.cases[ci]
            rest = np.setdiff1d(np.arange(c.num_slices), ds.index[ds.index[:, 0] == ci, 1])
            if not len(rest):
                continue
            volume = torch.from_numpy(np.load(c.image_path).astype(np.float32)).to(self.device)  # (Z, S, S)
            probs.append(infer_batched(self._compiled or self.net, volume, self.hparams.context_slices,
                                       tumor_probability, getattr(dm, "batch_size", 16), rest).float())
            cases.append(torch.full((len(rest),), ci, dtype=torch.long))
        prob = torch.cat(probs).to(self.device)
        # A slice without liver holds no tumour (tumour voxels are liver voxels, label >= 1).
        getattr(self, f"{split}_rest").update(prob, torch.zeros_like(prob, dtype=torch.long),
                                              torch.cat(cases).to(self.device))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The predict scripts read the operating points from the hyperparameters.
        hp = checkpoint.setdefault("hyper_parameters", {})
        hp["threshold"] = self.threshold
        point = self.volume_point
        hp["volume_threshold"] = point["threshold"] if point else None
        found = {k: point[k] for k in VOLUME_POINT[1:]} if point else {}
        hp["volume_validation"] = found if found and not any(math.isnan(v) for v in found.values()) else None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints from before the volume threshold lack its buffer: none chosen, as they chose none.
        state = checkpoint.get("state_dict", {})
        if "operating_threshold" in state and "volume_operating_point" not in state:
            state["volume_operating_point"] = torch.full((len(VOLUME_POINT),), float("nan"), dtype=torch.float64)


class LitSegmenter(_Base):
    """U-Net labelling each pixel background (0), liver (1) or tumor (2); loss = CE + region soft Dice.

    With `deep_supervision` = k > 0 (nnU-Net's deep supervision), the decoder's outputs at levels
    1..k (1/2 .. 1/2**k of the resolution) get a 1x1 head each, trained with the same loss against the
    labels downsampled by nearest neighbour; level l weighs 1/2**l, the weights normalised to sum 1.
    Training only: validation and test score the full-resolution logits, and the heads live outside
    the network (`ds_heads`), so checkpoints rebuild the same network for inference."""

    def __init__(self, in_channels: int = 3, num_classes: int = 3, base_width: int = 32, depth: int = 4,
                 upsampling: str = "transpose", attention: bool = False, lr: float = 1e-3,
                 weight_decay: float = 1e-4, warmup_fraction: float = 0.05, dice_weight: float = 1.0,
                 dice_per_slice: bool = False, deep_supervision: int = 0,
                 class_weights: Sequence[float] | None = None, window: Sequence[float] = WINDOW_HU,
                 image_size: int = 256, context_slices: int = 1, class_names: Sequence[str] = SEG_CLASSES,
                 task: str = "segmentation", num_overlays: int = 4):
        super().__init__()
        if num_classes != 3:
            raise ValueError(f"the segmenter predicts background/liver/tumor, got num_classes={num_classes}")
        if not 0 <= deep_supervision < depth:
            raise ValueError(f"deep_supervision counts decoder levels below the output: expected 0 to {depth - 1}, "
                             f"got {deep_supervision}")
        self.save_hyperparameters()
        self.net = build_network(self.hparams)
        self.ds_heads = nn.ModuleList(nn.Conv2d(base_width * 2**level, num_classes, kernel_size=1)
                                      for level in range(1, deep_supervision + 1))
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weight", weight, persistent=False)
        self.train_dice, self.val_dice, self.test_dice = RegionDice(), RegionDice(), RegionDice()
        self.case_dice: RegionDice | None = None
        self.slice_dice = SliceCounts()
        self.per_case_dice: dict[str, tuple[float, float]] = {}
        self._overlay_batch = None

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), target, weight=self.class_weight)
        per_slice = self.hparams.get("dice_per_slice", False)  # absent from older checkpoints
        return ce + self.hparams.dice_weight * soft_region_dice_loss(logits, target, per_slice=per_slice)

    def _deep_loss(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(full-resolution logits (N, 3, H, W), the deep-supervision loss over all levels)."""
        net, images = self._prepared(images)
        logits, decoded = net.forward_with_decoder(images, len(self.ds_heads))
        weights = [0.5**level for level in range(len(decoded) + 1)]
        loss = weights[0] * self.loss(logits, target)
        for w, head, features in zip(weights[1:], self.ds_heads, decoded):
            coarse = head(features)  # (N, 3, H_l, W_l)
            small = F.interpolate(target[:, None].float(), size=coarse.shape[-2:], mode="nearest")[:, 0].long()
            loss = loss + w * self.loss(coarse, small)
        return logits, loss / sum(weights)

    def _step(self, batch, split: str) -> torch.Tensor:
        images, target = batch[0], batch[1]  # (N, C, H, W), (N, H, W)
        if split == "train" and len(self.ds_heads):
            logits, loss = self._deep_loss(images, target)
        else:
            logits = self(images)  # (N, 3, H, W)
            loss = self.loss(logits, target)
        pred = logits.argmax(dim=1)  # (N, H, W)
        getattr(self, f"{split}_dice").update(pred, target)
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(target),
                 sync_dist=not on_step)
        if split == "test" and len(batch) == 3 and self.case_dice is not None:
            self.case_dice.update(pred, target, batch[2])
        if split == "test":
            self.slice_dice.update(pred, target)
        return loss

    def _log_epoch(self, split: str) -> None:
        metric = getattr(self, f"{split}_dice")
        dice = metric.compute()
        values = {f"{split}/dice_liver": dice[0], f"{split}/dice_tumor": dice[1]}
        if split == "val":
            # What best.ckpt goes by: both regions LiTS scores (the tumour alone once picked an epoch
            # whose liver Dice was 0.34); the liver alone where no validation patient has tumour.
            values["val/dice_mean"] = torch.nanmean(dice)
        self.log_dict(values, prog_bar=split == "val")
        metric.reset()

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self._overlay_batch = (batch[0][: self.hparams.num_overlays].detach(),
                                   batch[1][: self.hparams.num_overlays].detach())
        super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        self._log_overlays()

    def on_test_epoch_start(self):
        # One Dice accumulator per test case: per-patient Dice, as the LiTS scorer reports it.
        dm = getattr(self.trainer, "datamodule", None)
        cases = getattr(dm, "datasets", {}).get("test") if dm is not None else None
        self._test_case_ids = [c.case_id for c in cases.cases] if cases is not None else []
        self.case_dice = RegionDice(num_groups=max(1, len(self._test_case_ids))).to(self.device)

    def on_test_epoch_end(self):
        super().on_test_epoch_end()
        if self.case_dice is not None and self._test_case_ids:
            per_case = self.case_dice.compute().cpu()  # (cases, 2)
            self.per_case_dice = {cid: (float(d[0]), float(d[1])) for cid, d in zip(self._test_case_ids, per_case)}
            mean = self.case_dice.mean_over_groups()
            self.log_dict({"test/dice_liver_per_case": mean[0], "test/dice_tumor_per_case": mean[1]})
        per_slice = self.slice_dice.compute()
        self.log_dict({"test/dice_liver_per_slice": per_slice[0], "test/dice_tumor_per_slice": per_slice[1]})
        self.slice_dice.reset()
        self.case_dice = None

    def _log_overlays(self) -> None:
        logger = self.logger
        if self._overlay_batch is None or logger is None or not hasattr(logger.experiment, "add_image"):
            return
        images, target = self._overlay_batch
        with torch.no_grad():
            pred = self(images).argmax(dim=1)
        rows = [torch.cat([overlay(images[i, images.shape[1] // 2], lab) for lab in (None, target[i], pred[i])], dim=2)
                for i in range(images.shape[0])]
        logger.experiment.add_image("val/ct_truth_prediction", torch.cat(rows, dim=1), self.global_step)
        self._overlay_batch = None


LIT_MODULES = {"classification": LitClassifier, "segmentation": LitSegmenter}
