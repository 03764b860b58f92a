"""Score a classification checkpoint on held-out LiTS-layout volumes: slice AUROC, sensitivity and
specificity at the checkpoint's threshold, and volume AUROC, the way train.py's test metrics count
them (slices that show liver; a slice is tumorous from --min-tumor-pixels tumour pixels; a volume's
score is the mean of its 3 highest slice probabilities).

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
from inference import infer_batched, load_checkpoint, pick_device, preprocess_volume, volume_score  # noqa: E402
from volumes import load_label_volume, load_volume  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="classification .ckpt")
    p.add_argument("--data-dir", type=Path, required=True, help="LiTS or MSD layout volumes with labels")
    p.add_argument("--min-tumor-pixels", type=int, default=1, help="a slice is tumorous from this many tumour pixels")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, "classification")
    hp, net = ckpt.hparams, ckpt.network(device)
    threshold = float(hp.get("threshold", 0.5))
    probs, targets, vol_scores, vol_targets = [], [], [], []
    for case in find_cases(args.data_dir):
        hu, _ = load_volume(case.images[0])
        labels, _ = load_label_volume(case.labels[0])
        zs = np.flatnonzero((labels >= 1).any(axis=(1, 2)))  # slices that show liver
        volume = preprocess_volume(hu, hp, device)
        prob = infer_batched(net, volume, hp["context_slices"], lambda lg: lg.softmax(1)[:, 1], 32, zs).double()
        target = torch.from_numpy((labels[zs] == 2).sum(axis=(1, 2)) >= args.min_tumor_pixels).long()
        probs.append(prob), targets.append(target)
        vol_scores.append(volume_score(prob)), vol_targets.append(int(target.max()))
    prob, target = torch.cat(probs), torch.cat(targets)
    pred = prob >= threshold
    result = {"checkpoint": str(args.checkpoint), "data_dir": str(args.data_dir), "volumes": len(vol_scores),
              "slices": int(len(target)), "tumour_slices": int(target.sum()), "threshold": threshold,
              "slice_auroc": float(binary_auroc(prob, target)),
              "sensitivity": float((pred & (target == 1)).sum() / max(1, int(target.sum()))),
              "specificity": float((~pred & (target == 0)).sum() / max(1, int((target == 0).sum()))),
              "tumour_volumes": int(sum(vol_targets))}
    two = 0 < sum(vol_targets) < len(vol_targets)
    result["volume_auroc"] = (float(binary_auroc(torch.tensor(vol_scores), torch.tensor(vol_targets)))
                              if two else float("nan"))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
