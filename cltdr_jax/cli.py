"""The `cltdr` command line: one sub-command per job, each a thin wrapper over a library function.

The names, arguments and output formats are a contract with users' scripts; add options, never rename.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config", help="config file in the reference's YAML format, or a bundled config's name (see `cltdr configs`)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.embd_dim=256 (repeatable)",
    )


_CHECKPOINT_HELP = (
    "a training workdir (its latest checkpoint), a checkpoints folder (`cltdr convert`'s output) or one step's folder"
)


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step", type=int, default=None, help="use this step's checkpoint (default: the latest)")
    p.add_argument(
        "--weights",
        choices=("ema", "raw"),
        default="ema",
        help="ema (default): the averaged weights training evaluates; raw: the trained weights before averaging",
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
    p.add_argument("checkpoint_dir", nargs="?", default=None, help=_CHECKPOINT_HELP + " (not with --exported)")
    _add_checkpoint_args(p)
    _add_inference_args(p)
    p.add_argument(
        "--exported",
        default=None,
        metavar="DIR",
        help="run the programs `cltdr export` wrote to DIR instead of a checkpoint (no Flax model involved)",
    )
    p.add_argument("--out", required=True, help="detections JSON (ActivityNet results format)")
    p.add_argument("--split", default=None, help="subset to predict (default: the config's val_split)")
    p.add_argument("--profile", default=None, metavar="DIR", help="write a JAX profiler trace of the prediction")
    p.add_argument(
        "--features",
        nargs="+",
        default=None,
        help="predict these feature files instead of a split (video id = file name stem)",
    )
    p.add_argument("--fps", type=float, default=None, help="fps for --features files (default: dataset default_fps)")

    p = sub.add_parser("eval", help="predict the evaluation split and compute its mAP")
    _add_config_args(p)
    p.add_argument("checkpoint_dir", help=_CHECKPOINT_HELP)
    _add_checkpoint_args(p)
    _add_inference_args(p)
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
    p.add_argument(
        "--seeds",
        default=None,
        metavar="S,S,...",
        help="one run per seed (init_rand_seed) in WORKDIR/seed_S, then the mean and std of the final mAP",
    )
    p.add_argument("--profile", default=None, metavar="DIR", help="write a JAX profiler trace of a few train steps")

    p = sub.add_parser("configs", help="list the bundled reference configs and the paper results they correspond to")

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

    p = sub.add_parser("extract", help="two-stream I3D features of video files (one .npy per video)")
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (video id = file name up to its first dot)")
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/<video id>.npy and DIR/videos.json")
    _add_extract_args(p, window=16, stride=4, streams="rgb,flow")

    p = sub.add_parser("detect", help="from video files to detections: extract, predict and plot in one command")
    _add_config_args(p)
    p.add_argument("checkpoint_dir", help=_CHECKPOINT_HELP)
    _add_checkpoint_args(p)
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files")
    p.add_argument("--out", required=True, help="detections JSON (the format of `cltdr predict`)")
    p.add_argument("--plot", default=None, metavar="DIR", help="write a timeline picture DIR/<video id>.png per video")
    p.add_argument("--top", type=int, default=10, help="detections drawn per class in the pictures")
    p.add_argument("--features-out", default=None, metavar="DIR", help="keep the features here (default: temporary)")
    _add_extract_args(p, window=None, stride=None, streams=None)

    p = sub.add_parser("export-torch", help="write a checkpoint in the authors' PyTorch format (inverse of convert)")
    _add_config_args(p)
    p.add_argument("checkpoint", help=_CHECKPOINT_HELP + ", or a reference .pth.tar / .npz")
    p.add_argument("out", help="OUT.pth.tar (the reference's eval.py loads it) or, with --format npz, OUT.npz")
    p.add_argument(
        "--format",
        choices=("pth", "npz"),
        default="pth",
        help="pth (default): torch's zip format with epoch, state_dict and state_dict_ema; npz: one weight set",
    )
    _add_checkpoint_args(p)

    p = sub.add_parser("export", help="serialize the network and decoding as XLA programs (jax.export)")
    _add_config_args(p)
    p.add_argument("checkpoint", help=_CHECKPOINT_HELP + ", or a reference .pth.tar / .npz")
    p.add_argument("out_dir", help="directory for one program per padded length and manifest.json")
    p.add_argument(
        "--lengths",
        default="split",
        help="padded lengths to export, e.g. 2304,4608, or `split` (default): every padded length of --split",
    )
    p.add_argument("--split", default=None, help="the split of --lengths split (default: the config's val_split)")
    p.add_argument("--platforms", default="cpu,cuda", help="comma-separated: cpu, cuda, rocm, tpu (default cpu,cuda)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="compute dtype of the programs (default: the config's inference.dtype, float32)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="videos per program call (default 1, as the reference)")
    p.add_argument("--stablehlo", action="store_true", help="also write each program's bare StableHLO module (.mlirbc)")
    _add_checkpoint_args(p)
    return parser


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    """How `predict` and `eval` run the network (the config's `inference` section)."""
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="videos of one padded length per network call (default: 1 on a CPU, 4 on an accelerator)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="compute dtype of the network (default: the config's inference.dtype, float32)",
    )


def _add_extract_args(p: argparse.ArgumentParser, window: int | None, stride: int | None, streams: str | None) -> None:
    """The I3D extraction options `extract` and `detect` share (`detect` takes the grid from its config)."""
    from_config = " (default: the config's)"
    p.add_argument("--rgb-weights", default=None, metavar="FILE", help="the port's rgb_imagenet.pt (or an .npz)")
    p.add_argument("--flow-weights", default=None, metavar="FILE", help="the port's flow_imagenet.pt (or an .npz)")
    p.add_argument(
        "--streams",
        default=streams,
        help="rgb,flow (2048-d rows, rgb first), rgb or flow" + (from_config if streams is None else ""),
    )
    p.add_argument("--fps", type=float, default=30.0, help="frames are resampled to this rate (default 30)")
    p.add_argument(
        "--window",
        type=int,
        default=window,
        help="frames per feature row" + (from_config if window is None else f" (default {window})"),
    )
    p.add_argument(
        "--stride",
        type=int,
        default=stride,
        help="frames between rows" + (from_config if stride is None else f" (default {stride})"),
    )
    p.add_argument("--resize", type=int, default=256, help="shorter side before the centre crop (default 256)")
    p.add_argument("--size", type=int, default=224, help="centre crop, the network's input (default 224)")
    p.add_argument("--flow-resize", type=int, default=None, help="shorter side TV-L1 runs at (default: --resize)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per I3D call (default 8)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="I3D compute dtype")
    p.add_argument("--flow-workers", type=int, default=None, help="TV-L1 threads (default: the CPU count)")


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
    except BrokenPipeError:  # output piped into `head` or `grep -q`, which stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's advice: no error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
