"""Write the "unseen phantoms" the model-quality tables in BENCHMARKS.md are measured on.

    python benchmarks/unseen_phantoms.py --out-dir data/unseen            # 20 cases, seed 1234, 160 px

Other anatomy and storage than the README's demo set (data/synthetic: seed 0, 128 px): another seed
and in-plane size, .nii and .nii.gz mixed, random axis flips with honest affines, and files whose
affine lies as real ones do: 4 stored as LiTS's 3D-IRCADb volumes are (identity affine, upside down
once reoriented) and 3 mirrored left-right without saying so. They go through the same code path as
LiTS: `python train.py --data-dir data/unseen ...`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phantom import write_phantom_case  # noqa: E402


def storage(index: int) -> str | None:
    """How case `index` is stored: identity affine, mirrored, or honest (None)."""
    if index % 3 == 2:
        return None
    return ("identity", "mirrored", None, None)[index % 4]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", type=Path, required=True, help="folder for volume-N / segmentation-N")
    p.add_argument("--cases", type=int, default=20, help="number of cases")
    p.add_argument("--seed", type=int, default=1234, help="random seed")
    p.add_argument("--size", type=int, default=160, help="in-plane size in voxels")
    args = p.parse_args(argv)
    for i in range(args.cases):
        wrong = storage(i)
        write_phantom_case(args.out_dir, i, size=args.size, seed=args.seed, compress=wrong is None and i % 2 == 1,
                           wrong_affine=wrong)
        print(f"volume-{i}: {wrong or 'honest affine'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
