"""The body of each `cltdr` sub-command (argument parsing lives in `cli.py`)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from cltdr_jax.errors import CltdrError

log = logging.getLogger("cltdr")


class UserError(Exception):
    """Reported as one line on stderr, exit status 2."""


def _write_json(path: str | Path, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def convert(args: argparse.Namespace) -> int:
    from cltdr_jax.checkpoint import save_params
    from cltdr_jax.config import load_config
    from cltdr_jax.convert import convert_checkpoint, count_params

    cfg = load_config(args.config, args.overrides)
    params = convert_checkpoint(cfg, args.checkpoint, args.weights)
    meta = {
        "source": str(Path(args.checkpoint).absolute()),
        "weights": "state_dict_ema" if args.weights == "ema" else "state_dict",
        "config": cfg.to_dict(),
        "num_params": count_params(params),
    }
    path = save_params(args.out_dir, params, meta)
    print(f"converted {meta['num_params']:,} parameters ({meta['weights']}) from {args.checkpoint} -> {path}")
    return 0


def _load_model(args: argparse.Namespace):
    from cltdr_jax.checkpoint import load_params
    from cltdr_jax.config import load_config
    from cltdr_jax.xla_cache import enable_persistent_cache

    cfg = load_config(args.config, args.overrides)
    enable_persistent_cache()
    params, _meta = load_params(args.checkpoint_dir, cfg)
    return cfg, params


def predict(args: argparse.Namespace) -> int:
    from cltdr_jax.predict import predict_files, predict_split

    cfg, params = _load_model(args)
    if args.features:
        prediction = predict_files(cfg, params, args.features, args.fps)
    else:
        prediction = predict_split(cfg, params, args.split)
    _write_json(args.out, prediction.results_json)
    n = sum(len(d) for d in prediction.detections.values())
    s = prediction.stats
    print(
        f"{s['videos']} videos, {n} detections -> {args.out}  ({s['compilations']} compilations for "
        f"{len(s['padded_lengths'])} padded lengths; network {s['network_seconds']:.1f} s, "
        f"post-processing {s['postprocess_seconds']:.1f} s)"
    )
    return 0


def eval_(args: argparse.Namespace) -> int:
    from cltdr_jax import evaluation
    from cltdr_jax.predict import evaluate_prediction, predict_split

    cfg, params = _load_model(args)
    prediction = predict_split(cfg, params)
    if args.out:
        _write_json(args.out, prediction.results_json)
    metrics = evaluate_prediction(cfg, prediction, args.protocol)
    print(f"{cfg.dataset_name} {cfg.val_split[0]}: {prediction.stats['videos']} videos ({args.protocol} protocol)")
    evaluation.print_table(metrics)
    if args.metrics_out:
        _write_json(args.metrics_out, metrics)
    if args.plots:
        from cltdr_jax.plots import plot_ap

        for path in plot_ap(metrics, args.plots):
            print(f"wrote {path}")
    return 0


def train(args: argparse.Namespace) -> int:
    from cltdr_jax.config import load_config
    from cltdr_jax.train import train_and_evaluate

    cfg = load_config(args.config, args.overrides)
    train_and_evaluate(cfg, args.workdir)
    return 0


def demo(args: argparse.Namespace) -> int:
    from cltdr_jax.demo import run_demo

    run_demo(args.workdir, seed=args.seed, quick=args.quick)
    return 0


def _map(args: argparse.Namespace) -> int:
    from cltdr_jax.evaluation import cmd_map

    return cmd_map(args)


def _synth(args: argparse.Namespace) -> int:
    from cltdr_jax.synth import cmd_synth

    return cmd_synth(args)


def _plot(args: argparse.Namespace) -> int:
    from cltdr_jax.plots import cmd_plot

    return cmd_plot(args)


def _convert_annotations(args: argparse.Namespace) -> int:
    from cltdr_jax.data.annotations import cmd_convert_annotations

    return cmd_convert_annotations(args)


COMMANDS = {
    "convert": convert,
    "predict": predict,
    "eval": eval_,
    "map": _map,
    "train": train,
    "synth": _synth,
    "demo": demo,
    "plot": _plot,
    "convert-annotations": _convert_annotations,
}


def run(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.command](args)
    except CltdrError as e:
        raise UserError(str(e)) from None
