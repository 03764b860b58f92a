"""Score a classification checkpoint on held-out LiTS-layout volumes as it is deployed: the slice AUROC,
sensitivity and specificity at the checkpoint's slice threshold, counted as train.py's test metrics
count them (slices that show liver; a slice is tumorous from --min-tumor-pixels tumour pixels), and
the slice AUROC of each lesion size class (the tumour slices whose largest lesion, by its largest axial
diameter as evaluate.py measures it, falls in the class, against every healthy slice: what size of
lesion the classifier sees), and the volume verdict as predict_classification.py and report.py give
it: a volume's score is the mean of its 3 highest slice probabilities over every slice, and it is
tumour when that reaches the checkpoint's volume threshold (chosen by train.py on validation volumes
scored the same way). Volume AUROC, sensitivity and specificity follow from those verdicts.

    python benchmarks/unseen_phantoms.py --out-dir data/heldout --seed 99 --cases 10
    python benchmarks/eval_classifier.py --checkpoint runs/classification/checkpoints/best.ckpt --data-dir data/heldout

Patients a run never saw, beyond its own 15 % test split: with a few test patients, that split's AUROC
swings by tenths between seeds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.classification import binary_auroc  # noqa: E402

from dataset import find_cases  # noqa: E402
from evaluate import SIZE_CLASSES, size_class  # noqa: E402
from inference import (classify, cpu_has_fast_bf16, load_checkpoint, pick_device, volume_score,  # noqa: E402
                       volume_threshold)
from lesions import label_lesions, largest_axial_diameters  # noqa: E402
from volumes import load_label_volume, load_volume  # noqa: E402


def rates(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(sensitivity, specificity) of boolean predictions; NaN where a class is absent."""
    pos, neg = int(target.sum()), int((target == 0).sum())
    sens = float((pred & (target == 1)).sum()) / pos if pos else float("nan")
    spec = float((~pred & (target == 0)).sum()) / neg if neg else float("nan")
    return sens, spec


def slice_size_classes(labels: np.ndarray, spacing) -> list[str | None]:
    """Per slice of `labels` (Z, H, W): the size class (`evaluate.SIZE_CLASSES`) of the largest lesion it
    shows, a lesion measured in 3D by its largest axial diameter; None for a slice without tumour."""
    ids, num = label_lesions(labels)
    diameters = largest_axial_diameters(ids, num, spacing, axial_axis=0)
    out = []
    for plane in ids:
        shown = np.unique(plane[plane > 0])
        out.append(size_class(float(diameters[shown - 1].max())) if len(shown) else None)
    return out


def auroc_by_size(prob: torch.Tensor, target: torch.Tensor, classes: list[str | None]) -> dict[str, dict]:
    """For each size class: its tumour slices' AUROC against every healthy slice, and their count (NaN
    AUROC where the class has no tumour slice or there is no healthy slice)."""
    healthy = target == 0
    out = {}
    for name, _, _ in SIZE_CLASSES:
        mine = torch.tensor([c == name for c in classes]) & (target == 1)
        keep = healthy | mine
        ok = int(mine.sum()) > 0 and int(healthy.sum()) > 0
        out[name] = {"slices": int(mine.sum()),
                     "auroc": float(binary_auroc(prob[keep], target[keep])) if ok else float("nan")}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="classification .ckpt")
    p.add_argument("--data-dir", type=Path, required=True, help="LiTS or MSD layout volumes with labels")
    p.add_argument("--min-tumor-pixels", type=int, default=1, help="a slice is tumorous from this many tumour pixels")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--exact", action="store_true",
                   help="float32 on a CPU (default: bf16 on CPUs with native bf16, as predict_classification.py)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, "classification")
    hp, net = ckpt.hparams, ckpt.network(device)
    threshold, volume_thr = float(hp.get("threshold", 0.5)), volume_threshold(hp)
    cpu_bf16 = not args.exact and cpu_has_fast_bf16()
    probs, targets, volumes, classes = [], [], [], []
    for case in find_cases(args.data_dir):
        hu, _ = load_volume(case.images[0])
        labels, geom = load_label_volume(case.labels[0])
        every = torch.from_numpy(classify(net, hu, hp, device, cpu_bf16=cpu_bf16)).double()  # (Z,) every slice
        zs = np.flatnonzero((labels >= 1).any(axis=(1, 2)))  # slices that show liver: the slice metrics'
        target = torch.from_numpy((labels[zs] == 2).sum(axis=(1, 2)) >= args.min_tumor_pixels).long()
        probs.append(every[zs]), targets.append(target)
        shown = slice_size_classes(labels, geom.spacing)
        classes += [shown[z] if t else None for z, t in zip(zs, target.tolist())]
        score = volume_score(every)
        volumes.append({"case": case.case_id, "score": score, "tumour": int(target.max()) if len(target) else 0,
                        "verdict": None if volume_thr is None else int(score >= volume_thr)})
    prob, target = torch.cat(probs), torch.cat(targets)
    # Within each volume holding both kinds of liver slice, how its slices rank (no offset between
    # volumes can move it), then the mean over those volumes.
    within = {v["case"]: float(binary_auroc(p, t)) for v, p, t in zip(volumes, probs, targets) if 0 < t.sum() < len(t)}
    sens, spec = rates(prob >= threshold, target)
    result = {"checkpoint": str(args.checkpoint), "data_dir": str(args.data_dir), "volumes": len(volumes),
              "slices": int(len(target)), "tumour_slices": int(target.sum()), "threshold": threshold,
              "slice_auroc": float(binary_auroc(prob, target)), "sensitivity": sens, "specificity": spec,
              "slice_auroc_by_size": auroc_by_size(prob, target, classes),
              "within_volume_auroc": within,
              "within_volume_auroc_mean": float(np.mean(list(within.values()))) if within else float("nan"),
              "tumour_volumes": sum(v["tumour"] for v in volumes), "volume_threshold": volume_thr,
              "volume_validation": hp.get("volume_validation") if volume_thr is not None else None}
    scores = torch.tensor([v["score"] for v in volumes], dtype=torch.float64)
    vol_target = torch.tensor([v["tumour"] for v in volumes])
    two = 0 < int(vol_target.sum()) < len(volumes)
    result["volume_auroc"] = float(binary_auroc(scores, vol_target)) if two else float("nan")
    if volume_thr is None:  # a checkpoint from before train.py chose one: no verdicts to score
        result["volume_sensitivity"] = result["volume_specificity"] = float("nan")
    else:
        result["volume_sensitivity"], result["volume_specificity"] = rates(scores >= volume_thr, vol_target)
    result["per_volume"] = volumes
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
