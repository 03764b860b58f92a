"""report.py end to end on a large phantom, beside the two predict scripts it brings together.

    python benchmarks/bench_report.py --segmentation-checkpoint seg.ckpt --classification-checkpoint cls.ckpt
    python benchmarks/bench_report.py ... --size 512 --slices 200 --repeats 2 --exact

A CT phantom (`phantom.write_phantom_case`, 512x512x200 unless told, the phantom of bench_predict.py's
end-to-end table) is written to a temporary folder. In rounds, each command runs on it in a child
process as a user runs it (`--device cpu` unless told): report.py (the fast path; with --exact also
report.py --exact), predict_segmentation.py and predict_classification.py, after one untimed warm-up
report (it loads torch and the files into the page cache). For each: seconds from process start to
exit (best of the rounds) and peak resident memory (GNU time's %M); for the report also its own
breakdown (report.json's `timing_s`: read, segmentation, classification, measurements, figures,
writing) and what it found. The last line is the report's time against the two predict scripts'
together: what bringing them together costs, or saves (one read of the volume instead of two).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_predict import host_line, run_script, write_bench_phantom  # noqa: E402
from volumes import run_cli  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="report.py end to end on a phantom, beside predict_segmentation.py and "
                                            "predict_classification.py.")
    p.add_argument("--segmentation-checkpoint", required=True, type=Path, help="segmentation .ckpt")
    p.add_argument("--classification-checkpoint", required=True, type=Path, help="classification .ckpt")
    p.add_argument("--size", type=int, default=512, help="in-plane size of the phantom (default: 512)")
    p.add_argument("--slices", type=int, default=200, help="slices of the phantom (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default: 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="(default: cpu)")
    p.add_argument("--repeats", type=int, default=2, help="rounds over all commands; the best counts (default: 2)")
    p.add_argument("--exact", action="store_true", help="also time report.py --exact (default: off)")
    return p


def main(args: argparse.Namespace) -> dict:
    seg, cls = str(args.segmentation_checkpoint), str(args.classification_checkpoint)
    print(host_line())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vol, _ = write_bench_phantom(tmp, args)

        def report_argv(out: str, *extra: str) -> list[str]:
            return ["--input", str(vol), "--segmentation-checkpoint", seg, "--classification-checkpoint", cls,
                    "--output-dir", str(tmp / out), "--device", args.device, "--overwrite", *extra]

        commands = {"report.py": ("report.py", report_argv("report")),
                    "predict_segmentation.py": ("predict_segmentation.py",
                                                ["--checkpoint", seg, "--input", str(vol), "--output",
                                                 str(tmp / "seg.nii.gz"), "--device", args.device]),
                    "predict_classification.py": ("predict_classification.py",
                                                  ["--checkpoint", cls, "--input", str(vol), "--output",
                                                   str(tmp / "cls.csv"), "--device", args.device])}
        if args.exact:
            commands["report.py --exact"] = ("report.py", report_argv("report-exact", "--exact"))
        run_script("report.py", report_argv("warm"))  # warm-up, untimed
        runs: dict[str, list] = {name: [] for name in commands}
        reports: dict[str, list] = {"report.py": [], "report.py --exact": []}
        for _ in range(args.repeats):
            for name, (script, argv) in commands.items():
                runs[name].append(run_script(script, argv))
                if name in reports:
                    reports[name].append(json.loads((tmp / argv[argv.index("--output-dir") + 1] /
                                                     "report.json").read_text()))
    print(f"\n| command | end to end (s), best of {args.repeats} | each run (s) | peak memory (MB) |")
    print("| --- | --- | --- | --- |")
    best = {}
    for name, r in runs.items():
        best[name] = min(t for t, _ in r)
        print(f"| {name} | {best[name]:.1f} | {', '.join(f'{t:.1f}' for t, _ in r)} | {max(m for _, m in r):.0f} |")
    for name, found in reports.items():
        if not found:
            continue
        saved = min(found, key=lambda s: s["timing_s"]["total"])
        print(f"\n{name}, its fastest run inside the process (s): {saved['timing_s']}")
        print(f"  found: liver {saved['liver_volume_ml']:.1f} mL, {saved['num_lesions']} lesion(s), tumour "
              f"{saved['tumor_volume_ml']:.2f} mL; classifier {saved['classifier']['verdict']} "
              f"({saved['classifier']['volume_probability']:.3f}); {len(saved['disagreements'])} disagreement run(s); "
              f"fast path {saved['fast_path']}")
    both = best["predict_segmentation.py"] + best["predict_classification.py"]
    print(f"\nreport.py {best['report.py']:.1f} s against predict_segmentation.py + predict_classification.py "
          f"{both:.1f} s: ratio {best['report.py'] / both:.2f}")
    return {"best": best}


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
