"""The peer baseline for segmentation quality: MONAI's tutorial U-Net, trained by this project's
train.py on the same data, split, preprocessing, augmentation and time budget as our U-Net.

    pip install monai          # not a dependency of the project; only this script needs it
    python benchmarks/monai_baseline.py --data-dir real-liver-slices --image-size 128 \
        --context-slices 0 --max-time 00:00:10:00        # into runs/monai, its graphs in runs/monai/graphs

Every train.py flag is accepted and means what it means there; the model differs, as in MONAI's
3D spleen-segmentation tutorial made 2D: `monai.networks.nets.UNet(spatial_dims=2, channels=(16, 32,
64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm=BATCH)`, `DiceLoss(to_onehot_y=True,
softmax=True)` (background included), Adam at a constant 1e-4 (`--lr` changes it). The test metrics
(pooled, per patient, per slice) are computed by our LitSegmenter, so both models are scored by the
same code. The checkpoint it writes holds MONAI's network and is not for the predict scripts; instead
`--predict-dir DIR --predict-out OUT` segments every volume of DIR after training as
`predict_segmentation.py --exact` does (the same preprocessing, `inference.segment`, `postprocess`,
labels on the input's grid as `<name>_seg.nii.gz`), for `evaluate.py --pred OUT --gt DIR`.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import train  # noqa: E402
from lit_model import LitSegmenter  # noqa: E402


class MonaiTutorialSegmenter(LitSegmenter):
    """LitSegmenter's metrics and logging around MONAI's tutorial network, loss and optimiser."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from monai.losses import DiceLoss
        from monai.networks.layers import Norm
        from monai.networks.nets import UNet
        self.net = UNet(spatial_dims=2, in_channels=self.hparams.in_channels, out_channels=self.hparams.num_classes,
                        channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm=Norm.BATCH)
        self.dice_loss = DiceLoss(to_onehot_y=True, softmax=True)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice_loss(logits.float(), target[:, None])  # (N, 3, H, W) logits, (N, 1, H, W) labels

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def build_model(args):
    model = MonaiTutorialSegmenter(base_width=args.base_width, in_channels=2 * args.context_slices + 1, lr=args.lr,
                                   window=tuple(args.window), image_size=args.image_size,
                                   context_slices=args.context_slices)
    model.time_budget_s = None
    return model


def predict_folder(model: MonaiTutorialSegmenter, folder: Path, out: Path) -> None:
    """Every volume of `folder` through the trained network, as predict_segmentation.py --exact does."""
    from inference import postprocess, segment
    from volumes import find_inputs, input_name, read_volume, write_labels
    out.mkdir(parents=True, exist_ok=True)
    hp = dict(model.hparams, task="segmentation")
    net = model.net.eval()
    for source, kind in find_inputs(folder):
        if kind != "volume":
            continue
        hu, geom = read_volume(source, dtype=None)
        labels = postprocess(segment(net, hu, hp, "cpu", fast=False))
        write_labels(labels, geom, out / f"{input_name(source)[0]}_seg.nii.gz")


def parse_args(argv=None):
    """train.py's flags and the two of this script. The run folder defaults to runs/monai and the graphs
    to <run folder>/graphs, so that the peer never writes into our runs/segmentation or over the
    project's Graphs_Segmentation/."""
    parser = train.get_args_parser()
    parser.set_defaults(lr=1e-4, output_dir=Path("runs/monai"))
    parser.add_argument("--predict-dir", type=Path, default=None, help="volumes to segment after training")
    parser.add_argument("--predict-out", type=Path, default=Path("runs/monai/predictions"),
                        help="where --predict-dir's label volumes go")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv if "--task" in argv else ["--task", "segmentation", *argv])
    if args.task != "segmentation":
        parser.error("the MONAI baseline is a segmentation model; expected --task segmentation")
    if args.graphs_dir is None:
        args.graphs_dir = args.output_dir / "graphs"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    built: list = []
    train.build_model = lambda a: built.append(build_model(a)) or built[-1]
    summary = train.main(args)
    if args.predict_dir is not None:
        model, best = built[-1], summary.get("checkpoint")
        if best:  # best.ckpt's weights into the model as built (its hyperparameters carry train.py's extras)
            model.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
        predict_folder(model, args.predict_dir, args.predict_out)
    return summary


if __name__ == "__main__":
    main()
