"""Per-slice tumor probability from a trained VGG16 checkpoint.

    python predict_classification.py --checkpoint runs/classification/checkpoints/best.ckpt --input volume-7.nii
    python predict_classification.py --checkpoint best.ckpt --input volume-7.nii --slice 60
    python predict_classification.py --checkpoint best.ckpt --input scans/ --output tumor_slices.csv
    python predict_classification.py --checkpoint best.ckpt --input slice.png --threshold 0.3
    python predict_classification.py --checkpoint best.ckpt --input CT/patient-7/ --output slices.csv   # DICOM
    python predict_classification.py --checkpoint best.ckpt --input volume-7.nii --heatmap maps/

Prints a table (case, slice, probability of tumor, prediction) and, for each volume, a one-line
verdict: its tumour probability (the mean of its three most suspicious slices, over all its slices)
and the decision at the volume threshold, how many slices show tumor and the most suspicious one.
The volume threshold is the one train.py chose on its validation volumes, scored by this same rule,
with the sensitivity and specificity it gave there; a checkpoint written before train.py chose one
gives the volume's probability and no verdict (--volume-threshold decides at a threshold of yours). --output saves the table as
CSV, or slices and volume verdicts as JSON (by extension). --heatmap draws where the classifier saw
tumour (its evidence map, for checkpoints with the evidence head) on the most suspicious slices. Slices are numbered in the file's own order (its third axis); those of a DICOM
series in the series' order (by position along the slice normal), and their rows also name each
slice's SOPInstanceUID (column sop_instance_uid). A 2D slice file is slice 0. The prediction is
tumor when the probability reaches the threshold recorded in the checkpoint (chosen by train.py on
validation patients), or --threshold.

The model and its preprocessing come from the checkpoint alone, through `inference.py`. A lone 2D
slice (PNG/JPG 8-bit, already windowed; .npy or one .dcm file in HU) has no neighbours, so it stands
in for them in the 2.5D stack.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from inference import (VOLUME_TOP_K, add_runtime_flags, classify, cpu_has_fast_bf16, evidence_maps, hparam,
                       infer_batched, load_checkpoint, preprocess_volume, runtime, tumor_probability, volume_score,
                       volume_threshold)
from volumes import (CLS_CLASSES, DataError, DicomSeries, atomic_output, atomic_write_text, check_output, ensure_folder,
                     find_inputs, float_in, input_name, int_at_least, load_slice_image, one_volume, read_volume, run_cli,
                     slice_of_file)

COLUMNS = ("case", "slice", "probability", "prediction")
UID_COLUMN = "sop_instance_uid"  # rows of a DICOM series only


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Tumor / healthy per CT slice with a VGG16 checkpoint. A lone 2D slice has no neighbours, "
                    "so it stands in for them in the 2.5D stack.")
    p.add_argument("--checkpoint", required=True, type=Path, help="classification .ckpt written by train.py")
    p.add_argument("--input", required=True, type=Path,
                   help="a NIfTI volume (.nii, .nii.gz), a folder holding a DICOM CT series (any depth, files with or "
                        "without extension), a 2D slice (PNG/JPG: 8-bit, already windowed; .npy or one .dcm: HU, "
                        "windowed with the checkpoint's window) or a folder of them (NIfTI and slices at its top "
                        "level, every CT series at any depth; segmentation-N.nii and this project's outputs skipped)")
    p.add_argument("--series", default=None, metavar="UID",
                   help="with a folder as --input: only the DICOM series with this SeriesInstanceUID "
                        "(default: every CT series in the folder)")
    p.add_argument("--slice", type=int, default=None, metavar="K",
                   help="only slice K of a volume, in the file's own order (a DICOM series: the series' order) "
                        "(default: all slices)")
    p.add_argument("--threshold", type=float_in(0, 1, what="a probability"), default=None,
                   help="a slice is tumor when its probability >= this (default: the threshold recorded in the "
                        "checkpoint)")
    p.add_argument("--volume-threshold", type=float_in(0, 1, what="a probability"), default=None,
                   help="a volume is tumor when its tumour probability (the mean of its 3 most suspicious slices) "
                        ">= this (default: the volume threshold recorded in the checkpoint, chosen by train.py on "
                        "validation volumes; a checkpoint without one gives no volume verdict)")
    p.add_argument("--output", type=Path, default=None,
                   help="save the table as .csv (case,slice,probability,prediction[,sop_instance_uid]) or as .json "
                        "with the slices and each volume's verdict (default: print only)")
    p.add_argument("--heatmap", type=Path, nargs="?", const=Path("heatmaps"), default=None, metavar="DIR",
                   help="write PNGs of where the classifier saw tumour (its evidence map over the CT) into DIR "
                        "(default DIR: heatmaps): for a 2D slice, for --slice, or for a volume's most suspicious "
                        "slices; needs a checkpoint with the evidence head (default: off)")
    p.add_argument("--heatmap-slices", type=int_at_least(1), default=3, metavar="N",
                   help="how many of a volume's most suspicious slices get a heat map (default: 3)")
    add_runtime_flags(p, "slices per forward pass (default: 32 on CUDA, 8 on a CPU)")
    p.add_argument("--exact", action="store_true",
                   help="float32 on a CPU, the reference (default: off: bf16 on CPUs with native bf16, AVX512-BF16 "
                        "or AMX, about twice as fast)")
    return p


def _rows(case: str, slices, probs, threshold: float, names, uids=None) -> list[dict]:
    rows = [{"case": case, "slice": int(k), "probability": float(p), "prediction": names[int(p >= threshold)]}
            for k, p in zip(slices, probs)]
    for row, uid in zip(rows, uids or ()):
        row[UID_COLUMN] = uid
    return rows


def classify_volume(get_net, source: Path | DicomSeries, hp: dict, device: torch.device, args: argparse.Namespace,
                    threshold: float, names) -> list[dict]:
    """Rows of one volume (all slices, or --slice), in the file's own slice order (a DICOM series:
    the series' order, each row naming its slice's SOPInstanceUID). The network comes from
    `get_net()` once the volume has been read, so a bad file is reported without waiting for it.
    With --heatmap, the evidence maps of the most suspicious slices are drawn too."""
    case, _ = input_name(source)
    hu, geom = read_volume(source, dtype=None)  # (Z, H, W) HU in slices order, as stored
    where = source.label if isinstance(source, DicomSeries) else source
    zs = np.arange(hu.shape[0]) if args.slice is None else np.array([slice_of_file(geom, args.slice, where)])
    probs = classify(get_net(), hu, hp, device, args.batch_size, zs, desc=case, cpu_bf16=args.cpu_bf16)
    numbers = np.array([geom.file_slice_index(int(z)) for z in zs])
    order = np.argsort(numbers)
    uids = [str(geom.dicom[k].get("SOPInstanceUID", "")) for k in numbers[order]] if geom.dicom else None
    if args.heatmap is not None:
        picked = np.argsort(-probs, kind="stable")[:max(1, args.heatmap_slices)]
        volume = preprocess_volume(hu, hp, device)  # (Z, S, S), as `classify` saw it
        draw_heatmaps(get_net(), volume, hp, zs[picked], numbers[picked], probs[picked], case, args.heatmap)
    return _rows(case, numbers[order], probs[order], threshold, names, uids)


def volume_verdict(rows: list[dict], volume_thr: float | None, names) -> dict:
    """A volume's verdict from its slices' rows: tumour probability (`inference.volume_score`, the
    mean of its most suspicious slices, over every slice as train.py scored its validation volumes),
    the decision at the volume threshold (None without one), and the slice counts."""
    top = max(rows, key=lambda r: r["probability"])
    probability = volume_score([r["probability"] for r in rows])
    decided = names[int(probability >= volume_thr)] if volume_thr is not None else None
    return {"case": rows[0]["case"], "probability": probability, "prediction": decided,
            "tumor_slices": sum(r["prediction"] == names[1] for r in rows), "slices": len(rows),
            "most_suspicious_slice": top["slice"], "most_suspicious_probability": top["probability"]}


def volume_rule_text(volume_thr: float | None, validation: dict | None) -> str:
    """How the volume was decided: its threshold and what it gave on the validation volumes, or why
    there is no verdict."""
    if volume_thr is None:
        return ("no volume threshold: the checkpoint records none (written before train.py chose one on "
                "validation volumes, or its validation volumes held one class only); --volume-threshold sets one")
    text = f"volume threshold {volume_thr:.3g}"
    if validation:
        text += (f", chosen on {int(validation['volumes'])} validation volumes ({int(validation['tumour_volumes'])} "
                 f"with tumour): sensitivity {validation['sensitivity']:.2f}, specificity "
                 f"{validation['specificity']:.2f}")
    return text


def verdict(v: dict, threshold: float, rule: str) -> str:
    """One line for a volume."""
    return (f"{v['case']}: {v['prediction'] or 'no verdict'} (tumour probability {v['probability']:.3f}, the mean "
            f"of its {min(VOLUME_TOP_K, v['slices'])} most suspicious slices; {rule}); tumor in {v['tumor_slices']} "
            f"of {v['slices']} slice(s) at the slice threshold {threshold:.3g}; most suspicious slice "
            f"{v['most_suspicious_slice']} (probability {v['most_suspicious_probability']:.3f})")


def draw_heatmaps(net, volume: torch.Tensor, hp: dict, zs, numbers, probs, case: str, folder: Path,
                  lone: bool = False) -> list[Path]:
    """PNG per slice: the CT as the model saw it (its window and size, display orientation: anterior
    up, patient right on the image left) beside the same slice under the evidence map."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    maps = evidence_maps(net, volume, hp["context_slices"], [int(z) for z in zs], lone=lone).numpy()
    ensure_folder(folder)
    paths = []
    for z, number, p, heat in zip(zs, numbers, probs, maps):
        ct = volume[int(z)].float().cpu().numpy()  # (S, S) in [0, 1]
        fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
        for ax in axes:
            ax.imshow(ct, cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
        shown = axes[1].imshow(heat, cmap="inferno", vmin=0, vmax=1, alpha=0.5)
        axes[0].set_title("CT (model input)", fontsize=9)
        axes[1].set_title("tumour evidence", fontsize=9)
        fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
        fig.suptitle(f"{case} slice {int(number)}: tumour probability {float(p):.3f}", fontsize=10)
        path = folder / f"{case}_slice{int(number)}_evidence.png"
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


def columns(rows: list[dict]) -> tuple[str, ...]:
    """The table's columns: sop_instance_uid only when some row comes from a DICOM series."""
    return COLUMNS + ((UID_COLUMN,) if any(UID_COLUMN in r for r in rows) else ())


def format_table(rows: list[dict]) -> str:
    names = columns(rows)
    cells = [names] + [(r["case"], str(r["slice"]), f"{r['probability']:.4f}", r["prediction"],
                        r.get(UID_COLUMN, ""))[:len(names)] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(names))]
    return "\n".join("  ".join(c.rjust(w) if i in (1, 2) else c.ljust(w)
                               for i, (c, w) in enumerate(zip(cell, widths))).rstrip() for cell in cells)


def main(args: argparse.Namespace) -> dict:
    device, args.batch_size = runtime(args.device, args.batch_size, args.threads)
    # Heat maps stay float32 either way: a few slices, drawn for a person to read.
    args.cpu_bf16 = not args.exact and cpu_has_fast_bf16()
    ckpt = load_checkpoint(args.checkpoint, "classification")
    hp = ckpt.hparams
    threshold = float(hp.get("threshold", 0.5) if args.threshold is None else args.threshold)
    if not 0.0 <= threshold <= 1.0:
        raise DataError(f"found threshold {threshold}; expected a probability in [0, 1]")
    volume_thr = volume_threshold(hp) if args.volume_threshold is None else float(args.volume_threshold)
    if volume_thr is not None and not 0.0 <= volume_thr <= 1.0:
        raise DataError(f"found volume threshold {volume_thr}; expected a probability in [0, 1]")
    validation = hp.get("volume_validation") if args.volume_threshold is None else None
    rule = volume_rule_text(volume_thr, validation)
    names = tuple(hp.get("class_names", CLS_CLASSES))
    if args.heatmap is not None:
        check_output(args.heatmap, "--heatmap", folder=True)  # not after classifying every volume
        if hparam(hp, "head") != "evidence":
            raise DataError(f"{args.checkpoint}: found a VGG16 with the {hparam(hp, 'head')!r} head; --heatmap "
                            f"expected a checkpoint with the evidence head (train.py --head evidence)")
    inputs = find_inputs(args.input, args.series)
    if args.slice is not None and not one_volume(args.input, inputs):
        raise DataError(f"{args.input}: --slice needs one volume as --input; found "
                        f"{'a folder' if args.input.is_dir() else 'a 2D slice'}")
    if args.output is not None:
        if args.output.suffix.lower() not in (".csv", ".json"):
            raise DataError(f"{args.output}: found output suffix {args.output.suffix or 'none'}; expected .csv or .json")
        ensure_folder(args.output.parent)
    get_net = functools.cache(lambda: ckpt.network(device))

    rows, verdicts, volume_rows = [], [], []
    volumes = [p for p, kind in inputs if kind == "volume"]
    # Closed on the way out, error or not (leave=False clears its line), so an error stays one clean line.
    with tqdm(total=len(volumes), desc="volumes", unit="file", file=sys.stderr, disable=len(volumes) < 2,
              delay=1.0, leave=False) as bar:
        for source in volumes:
            case_rows = classify_volume(get_net, source, hp, device, args, threshold, names)
            rows += case_rows
            if args.slice is None:  # a volume's verdict is over all its slices, as it was validated
                volume_rows.append(volume_verdict(case_rows, volume_thr, names))
                verdicts.append(verdict(volume_rows[-1], threshold, rule))
            bar.update()
    images = [p for p, kind in inputs if kind == "image"]
    if images:
        # Windowed with the checkpoint's window, as training windowed its slices; every slice is resized
        # to the model's size, so slices of any size share the batches.
        volume = torch.cat([preprocess_volume(load_slice_image(p, hp["window"])[None], hp, device, windowed=True)
                            for p in images])
        probs = infer_batched(get_net(), volume, hp["context_slices"], tumor_probability, args.batch_size,
                              lone=True, desc=f"{len(images)} slice(s)", cpu_bf16=args.cpu_bf16).numpy()
        for path, p in zip(images, probs):
            rows += _rows(input_name(path)[0], [0], [p], threshold, names)
        if args.heatmap is not None:
            for i, path in enumerate(images):
                draw_heatmaps(get_net(), volume, hp, [i], [0], [probs[i]], input_name(path)[0], args.heatmap,
                              lone=True)

    sys.stdout.write(format_table(rows) + "\n" + "".join(v + "\n" for v in verdicts))
    if args.output is not None:
        if args.output.suffix.lower() == ".json":
            text = json.dumps({"threshold": threshold, "volume_threshold": volume_thr, "volume_validation": validation,
                               "volumes": volume_rows, "slices": rows}, indent=2)
        else:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=columns(rows), lineterminator="\n")
            writer.writeheader()
            writer.writerows({**r, "probability": f"{r['probability']:.6f}"} for r in rows)
            text = buf.getvalue()
        try:
            atomic_write_text(args.output, text)
        except OSError as exc:
            raise DataError(f"{args.output}: cannot write ({exc.strerror}); expected a writable path") from None
    return {"threshold": threshold, "volume_threshold": volume_thr, "volume_validation": validation, "rows": rows,
            "volumes": volume_rows, "verdicts": verdicts}


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
