"""The `cltdr` command line: one sub-command per job, each a thin wrapper over a library function.

The names, arguments and output formats are a contract with users' scripts; add options, never rename.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="config file in the reference's YAML format")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.embd_dim=256 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cltdr", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a reference PyTorch checkpoint into an orbax checkpoint")
    _add_config_args(p)
    p.add_argument("checkpoint", help=".pth.tar / .pth / .npz checkpoint of the reference implementation")
    p.add_argument("out_dir", help="directory to write the orbax checkpoint to")
    p.add_argument(
        "--weights",
        choices=("ema", "model"),
        default="ema",
        help="which weights of a full checkpoint: state_dict_ema (default) or state_dict",
    )

    p = sub.add_parser("predict", help="detect actions in videos and write them as JSON")
    _add_config_args(p)
    p.add_argument("checkpoint_dir", help="orbax checkpoint directory (from `cltdr convert` or `cltdr train`)")
    p.add_argument("--out", required=True, help="detections JSON (ActivityNet results format)")
    p.add_argument("--split", default=None, help="subset to predict (default: the config's val_split)")
    p.add_argument(
        "--features",
        nargs="+",
        default=None,
        help="predict these feature files instead of a split (video id = file name stem)",
    )
    p.add_argument("--fps", type=float, default=None, help="fps for --features files (default: dataset default_fps)")

    p = sub.add_parser("eval", help="predict the evaluation split and compute its mAP")
    _add_config_args(p)
    p.add_argument("checkpoint_dir")
    p.add_argument("--out", default=None, help="also write the detections JSON here")
    p.add_argument("--metrics-out", default=None, help="write the metrics JSON here")
    p.add_argument(
        "--protocol",
        choices=("official", "reference"),
        default="official",
        help="official ActivityNet evaluator, or the reference's metrics.py behaviour",
    )
    p.add_argument("--plots", default=None, metavar="DIR", help="write per-class AP and mAP-vs-tIoU charts")

    p = sub.add_parser("map", help="ActivityNet-protocol detection mAP of a predictions file")
    p.add_argument("gt", help="ground truth JSON (ActivityNet format)")
    p.add_argument("pred", help="predictions JSON (ActivityNet results format)")
    p.add_argument("--tiou", default="0.3,0.4,0.5,0.6,0.7", help="comma-separated tIoU thresholds")
    p.add_argument("--subset", default="validation", help="GT subset to evaluate")
    p.add_argument("--out", default=None, help="write the metrics JSON here")
    p.add_argument("--protocol", choices=("official", "reference"), default="official")

    p = sub.add_parser("train", help="train a model (resumes when the workdir holds checkpoints)")
    _add_config_args(p)
    p.add_argument("--workdir", required=True, help="checkpoints, logs and plots go here")

    p = sub.add_parser("synth", help="write a synthetic dataset with the structure of a real benchmark")
    p.add_argument("--like", required=True, choices=("thumos14", "multithumos", "activitynet", "epic"))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--feature-dim", type=int, default=None)
    p.add_argument("--videos", type=int, default=None, help="subsample to this many videos")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--annotations", default=None, help="use this real annotation file instead of the profile")
    p.add_argument("--difficulty", type=float, default=1.0, help="scales noise and distractors (1 = default)")
    p.add_argument(
        "--max-duration",
        type=float,
        default=None,
        help="redraw sampled videos longer than this many seconds (small, fast datasets)",
    )

    p = sub.add_parser("demo", help="synthesise a small dataset, train, evaluate and plot, on CPU")
    p.add_argument("--workdir", default="demo_run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a much shorter run (for tests)")

    p = sub.add_parser("plot", help="draw detections against ground truth on a timeline")
    p.add_argument("detections", help="detections JSON")
    p.add_argument("--gt", required=True, help="ground truth JSON")
    p.add_argument("--video", required=True, help="video id")
    p.add_argument("--out", required=True, help="PNG file")
    p.add_argument("--top", type=int, default=10, help="detections drawn per class")

    p = sub.add_parser("convert-annotations", help="convert EPIC CSVs / ActivityNet BSN files to our JSON")
    p.add_argument("kind", choices=("epic", "anet-bsn"))
    p.add_argument("inputs", nargs="+", help="input files (see README)")
    p.add_argument("--out", required=True)
    p.add_argument("--classes", choices=("verb", "noun"), default="verb", help="EPIC class type")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    # orbax and absl log every checkpoint step at INFO; keep the user's terminal for our own progress.
    for noisy in ("absl", "orbax", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from cltdr_jax import commands

    try:
        return commands.run(args) or 0
    except commands.UserError as e:
        print(f"cltdr {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
