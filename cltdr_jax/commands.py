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

    cfg = load_config(args.config, _inference_overrides(args))
    enable_persistent_cache()
    step, weights = getattr(args, "step", None), getattr(args, "weights", "ema")
    params, meta = load_params(args.checkpoint_dir, cfg, step=step, weights=weights)
    log.info("checkpoint %s (step %s): %s", meta["checkpoint"], meta.get("step", "?"), meta["loaded_weights"])
    return cfg, params


def _inference_overrides(args: argparse.Namespace) -> list[str]:
    """--set overrides plus the inference options (`--dtype`, `--batch-size`) as config keys."""
    overrides = list(args.overrides)
    if getattr(args, "dtype", None):
        overrides.append(f"inference.dtype={args.dtype}")
    if getattr(args, "batch_size", None) is not None:
        if args.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
        overrides.append(f"inference.batch_size={args.batch_size}")
    return overrides


def _load_exported(args: argparse.Namespace):
    from cltdr_jax.config import load_config
    from cltdr_jax.export.programs import ExportedPredictor
    from cltdr_jax.xla_cache import enable_persistent_cache

    if args.checkpoint_dir is not None:
        raise UserError("give either a checkpoint or --exported DIR, not both")
    fixed = (getattr(args, "dtype", None), getattr(args, "batch_size", None), getattr(args, "step", None))
    if any(x is not None for x in fixed) or getattr(args, "weights", "ema") != "ema":
        raise UserError("--dtype, --batch-size, --step and --weights were fixed by `cltdr export`: not with --exported")
    cfg = load_config(args.config, args.overrides)
    enable_persistent_cache()
    predictor = ExportedPredictor(args.exported, cfg)
    m = predictor.manifest
    log.info(
        "exported programs %s: padded lengths %s, %s, batch size %d, weights %s",
        args.exported,
        ", ".join(map(str, predictor.lengths)),
        m.get("dtype"),
        predictor.batch_size,
        m.get("source", {}).get("weights", "?"),
    )
    return cfg, None, predictor


def predict(args: argparse.Namespace) -> int:
    from cltdr_jax.predict import predict_files, predict_split
    from cltdr_jax.train import profiler_trace

    if getattr(args, "exported", None):
        cfg, params, predictor = _load_exported(args)
    elif args.checkpoint_dir is None:
        raise UserError("the checkpoint_dir argument is required (or --exported DIR)")
    else:
        (cfg, params), predictor = _load_model(args), None
    # The trace covers the whole prediction (compilation included): give a small split or a few --features.
    with profiler_trace(args.profile):
        if args.features:
            prediction = predict_files(cfg, params, args.features, args.fps, predictor=predictor)
        else:
            prediction = predict_split(cfg, params, args.split, predictor=predictor)
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
    print(evaluation.format_table(metrics))
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
    if args.seeds is None:
        train_and_evaluate(cfg, args.workdir, profile_dir=args.profile)
        return 0
    from cltdr_jax.train import train_seeds

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {args.seeds!r}: expected distinct comma-separated integers, e.g. 0,1,2")
    train_seeds(cfg, args.workdir, seeds, profile_dir=args.profile)
    return 0


def configs(args: argparse.Namespace) -> int:
    from cltdr_jax.config import bundled_config_dir, bundled_configs

    listed = bundled_configs()
    width = max(len(c.name) for c in listed)
    print(f"{'name':<{width}}  {'paper result':<28} {'avg. mAP':>8}  {'tIoU':<14} dataset and features")
    for c in listed:
        if c.reference:
            print(f"{c.name:<{width}}  {c.result:<28} {c.average_map:>8.1f}  {c.tiou:<14} {c.description}")
    extras = [c for c in listed if not c.reference]
    if extras:
        print("\nalso bundled, not one of the reference's configs:")
        for c in extras:
            print(f"{c.name:<{width}}  {c.description}")
    print(f"\nfiles in {bundled_config_dir()}; a name works wherever a CONFIG is taken, e.g.")
    print("  cltdr train thumos_i3d_focalloss --workdir runs/thumos_i3d")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Synthesise, train, evaluate and draw in `--workdir` (`--quick`: a much shorter run, for tests)."""
    import time

    from cltdr_jax import evaluation
    from cltdr_jax.demo import FEATURE_DIM, MAX_DURATION, demo_config
    from cltdr_jax.plots import plot_timeline
    from cltdr_jax.synth import synthesize
    from cltdr_jax.train import train_and_evaluate

    workdir, seed, quick = Path(args.workdir).absolute(), args.seed, args.quick
    start = time.perf_counter()
    data_dir = workdir / "data"
    num_videos = 24 if quick else 160
    print(f"[1/4] synthesising a THUMOS14-like dataset ({num_videos} videos, {FEATURE_DIM}-d) in {data_dir}")
    dataset_config = synthesize(
        "thumos14", data_dir, feature_dim=FEATURE_DIM, num_videos=num_videos, seed=seed, max_duration=MAX_DURATION
    )
    cfg = demo_config(dataset_config, quick, [f"init_rand_seed={seed}"])

    print(f"[2/4] training ({cfg.opt.warmup_epochs + cfg.opt.epochs} epochs) in {workdir / 'train'}")
    summary = train_and_evaluate(cfg, workdir / "train")
    metrics = summary["final_metrics"]

    print("[3/4] the final EMA model's detections on the test split")
    results = summary["final_detections"]
    detections_path = workdir / "train" / "detections.json"

    print("[4/4] drawing detections against ground truth")
    gt = json.loads(Path(cfg.dataset.json_file).read_text())["database"]
    figures = []
    test_videos = sorted(v for v, e in gt.items() if e["subset"].lower() == cfg.val_split[0])
    for vid in test_videos[:3]:
        out = workdir / f"timeline_{vid}.png"
        plot_timeline(results["results"].get(vid, []), gt[vid]["annotations"], None, gt[vid]["duration"], out, top=5)
        figures.append(out)

    print()
    print(f"Synthetic THUMOS14-like test split, {len(test_videos)} videos, EMA model after the last epoch:")
    print(evaluation.format_table(metrics))
    print()
    print(f"finished in {time.perf_counter() - start:.0f} s. Results in {workdir}:")
    print(f"  detections        {detections_path}")
    print(f"  metrics           {workdir / 'train' / 'metrics.json'}")
    print(f"  training log      {workdir / 'train' / 'log.jsonl'}")
    print(f"  training curves   {workdir / 'train' / 'training_curves.png'}")
    for f in figures:
        print(f"  timeline          {f}")
    print(f"  checkpoints       {workdir / 'train' / 'checkpoints'}  (cltdr predict / cltdr eval read them)")
    return 0


def map_(args: argparse.Namespace) -> int:
    import numpy as np

    from cltdr_jax import evaluation

    thr = evaluation.parse_tiou(args.tiou)
    gt = evaluation.load_ground_truth(args.gt, subset=args.subset, protocol=args.protocol)
    preds = evaluation.load_predictions(args.pred)
    metrics = evaluation.evaluate(gt, preds, thr)
    ignored = int(np.sum(evaluation.prediction_classes(gt, preds) < 0))
    print(
        f"{gt.source}: {len(gt.t_start)} GT instances, {len(gt.class_names)} classes, {len(gt.videos)} "
        f"{args.subset!r} videos; {preds.source}: {len(preds)} detections ({ignored} enter no class's AP), "
        f"protocol {args.protocol}"
    )
    print(evaluation.format_table(metrics))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
        print(f"metrics written to {out}")
    return 0


def synth(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from cltdr_jax.synth import synthesize

    t0 = time.perf_counter()
    lengths: list[int] = []
    state = {"next": 0.0}

    def report(done: int, total: int, vid: str, T: int) -> None:
        lengths.append(T)
        if done >= state["next"] or done == total:
            state["next"] += max(1, total / 20)
            rate = done / (time.perf_counter() - t0)
            print(f"  [{done:>{len(str(total))}}/{total}] {vid}  T={T}  {rate:.1f} videos/s", flush=True)

    print(f"cltdr synth: writing a dataset like {args.like} to {args.out} (seed {args.seed})", flush=True)
    config_path = synthesize(
        args.like, args.out, feature_dim=args.feature_dim, num_videos=args.videos, seed=args.seed,
        annotations=args.annotations, difficulty=args.difficulty, progress=report,
        max_duration=getattr(args, "max_duration", None),
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    out = config_path.parent
    database = json.loads((out / "annotations.json").read_text())["database"]
    per_split: dict[str, list[int]] = {}
    for rec in database.values():
        per_split.setdefault(rec["subset"], []).append(len(rec["annotations"]))
    size = sum(p.stat().st_size for p in (out / "features").iterdir())
    for subset, counts in per_split.items():
        print(f"  {subset}: {len(counts)} videos, {sum(counts)} actions")
    if lengths:
        from cltdr_jax.config import load_config

        input_dim = load_config(config_path).dataset.input_dim
        print(
            f"  features: float32 [T, {input_dim}], T {min(lengths)}..{max(lengths)} "
            f"(mean {np.mean(lengths):.0f}), {size / 2**20:.1f} MiB in {out / 'features'}"
        )
    print(f"  {len(database)} videos in {seconds:.1f} s ({len(database) / seconds:.2f} videos/s)")
    print(f"  config: {config_path}")
    return 0


def plot(args: argparse.Namespace) -> int:
    from cltdr_jax.plots import plot_video

    out = plot_video(args.detections, args.gt, args.video, args.out, top=args.top)
    print(f"timeline of {args.video} written to {out}")
    return 0


def convert_annotations(args: argparse.Namespace) -> int:
    from cltdr_jax.data.convert_annotations import convert_annotations

    out = convert_annotations(args.kind, args.inputs, getattr(args, "classes", "verb"))
    _write_json(args.out, out)
    by_subset: dict[str, list[int]] = {}
    for entry in out["database"].values():
        counts = by_subset.setdefault(entry["subset"], [0, 0])
        counts[0] += 1
        counts[1] += len(entry["annotations"])
    summary = ", ".join(f"{s}: {v} videos / {n} segments" for s, (v, n) in sorted(by_subset.items()))
    print(f"wrote {args.out} ({summary})")
    return 0


# ---------------------------------------------------------------------------------------------------
# Video files: `extract` and `detect`


class _ClipProgress:
    """Clips done of the expected total, clips/s and ETA on one line (a fresh line every 10 s off a terminal)."""

    def __init__(self, total: int):
        import sys
        import time

        self._time, self._out = time.perf_counter, sys.stderr
        self.total, self.done, self.start, self.last, self.video = max(total, 1), 0, self._time(), 0.0, ""
        self.tty = self._out.isatty()

    def update(self, video_id: str, clips: int) -> None:
        self.done, self.video = self.done + clips, video_id
        now = self._time()
        if self.tty or now - self.last >= 10.0:
            self.last = now
            self._print()

    def _print(self) -> None:
        import time

        rate = self.done / max(self._time() - self.start, 1e-9)
        left = max(self.total - self.done, 0) / rate if rate > 0 else 0.0
        line = (
            f"extract {self.video}: {self.done}/{self.total} clips ({100 * min(self.done / self.total, 1):.0f}%) "
            f"{rate:.2f} clips/s ETA {time.strftime('%H:%M:%S', time.gmtime(left))}"
        )
        print("\r" + line if self.tty else line, end="" if self.tty else "\n", file=self._out, flush=True)

    def finish(self) -> None:
        if self.done:
            self._print()  # the final count and rate, also when the last update was not shown
        if self.tty:
            print(file=self._out)


def _extract_options(args: argparse.Namespace, window: int, stride: int, streams: str):
    from cltdr_jax.video.extract import ExtractOptions
    from cltdr_jax.video.frames import FrameProtocol

    try:
        protocol = FrameProtocol(args.fps, args.resize, args.size, args.flow_resize)
        names = tuple(s.strip() for s in streams.split(",") if s.strip())
        return ExtractOptions(protocol, window, stride, names, args.batch_size, args.dtype, args.flow_workers)
    except ValueError as e:
        raise UserError(str(e)) from None


def _extract_to(args: argparse.Namespace, options, out_dir: str | Path) -> dict:
    from cltdr_jax.video.extract import I3DFeatures, expected_clips, extract_videos
    from cltdr_jax.xla_cache import enable_persistent_cache

    weights = {"rgb": args.rgb_weights, "flow": args.flow_weights}
    for stream in options.streams:
        if not weights[stream]:
            raise UserError(
                f"the {stream} stream needs --{stream}-weights FILE (the I3D port's models/{stream}_imagenet.pt, "
                "see the README), or leave it out with --streams"
            )
    totals = expected_clips(args.videos, options)  # a file that is not a video fails here, before the weights load
    enable_persistent_cache()
    network = I3DFeatures(weights, options)
    progress = _ClipProgress(sum(totals.values()))
    infos = extract_videos(args.videos, out_dir, network, progress.update)
    progress.finish()
    return infos


def extract(args: argparse.Namespace) -> int:
    from cltdr_jax.video.extract import INFO_FILE

    options = _extract_options(args, args.window, args.stride, args.streams)
    infos = _extract_to(args, options, args.out)
    for vid, info in infos.items():
        print(
            f"{vid}: {info['frames']} frames ({info['duration']:.2f} s at {info['fps']:g} fps) -> "
            f"{Path(args.out) / vid}.npy [{info['T']}, {info['feature_dim']}] in {info['seconds']:.1f} s"
        )
    print(f"durations, fps and T of each video: {Path(args.out) / INFO_FILE}")
    return 0


def detect(args: argparse.Namespace) -> int:
    import contextlib
    import tempfile

    from cltdr_jax.checkpoint import load_params
    from cltdr_jax.config import load_config
    from cltdr_jax.video.detect import check_grid, detect_features, plot_detections, streams_for

    # Not _load_model: --dtype and --batch-size are the I3D network's here, not inference.* keys.
    cfg = load_config(args.config, args.overrides)
    # A bad checkpoint fails before the slow extraction.
    params, _meta = load_params(args.checkpoint_dir, cfg, step=args.step, weights=args.weights)
    streams = args.streams or ",".join(streams_for(cfg))
    window = args.window if args.window is not None else cfg.dataset.num_frames
    stride = args.stride if args.stride is not None else cfg.dataset.feat_stride
    options = _extract_options(args, window, stride, streams)
    for warning in check_grid(cfg, options):
        log.warning(warning)
    keep = args.features_out
    with contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(prefix="cltdr_features_") as folder:
        infos = _extract_to(args, options, folder)
        prediction = detect_features(cfg, params, folder, infos)
    _write_json(args.out, prediction.results_json)
    n = sum(len(rows) for rows in prediction.results_json["results"].values())
    print(f"{len(infos)} videos, {n} detections -> {args.out}" + (f" (features in {keep})" if keep else ""))
    if args.plot:
        for path in plot_detections(prediction.results_json, infos, args.plot, top=args.top):
            print(f"wrote {path}")
    return 0


def export_torch(args: argparse.Namespace) -> int:
    from cltdr_jax.config import load_config
    from cltdr_jax.export.reference import export_torch as write_export

    cfg = load_config(args.config, args.overrides)
    if args.format == "pth" and not args.out.endswith(".pth.tar"):
        log.warning("%s: the reference's eval.py only takes checkpoint files whose name holds .pth.tar", args.out)
    if args.format == "pth" and args.weights != "ema":
        log.info("--weights %s has no effect with --format pth: the file holds both weight sets", args.weights)
    s = write_export(cfg, args.checkpoint, args.out, args.format, args.weights, args.step)
    what = "epoch, state_dict, state_dict_ema" if args.format == "pth" else f"{args.weights} weights"
    print(
        f"wrote {s['tensors']} tensors ({s['values']:,} values; {what}) in the reference's layout -> {s['path']} "
        f"(written by {s['writer']})"
    )
    return 0


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--lengths must be comma-separated integers or `split`, got {text!r}") from None
    if not lengths:
        raise UserError("--lengths is empty")
    return lengths


def export_(args: argparse.Namespace) -> int:
    from cltdr_jax.config import load_config
    from cltdr_jax.export.programs import export_programs, split_padded_lengths
    from cltdr_jax.export.reference import load_weights
    from cltdr_jax.predict import class_names

    cfg = load_config(args.config, _inference_overrides(args))  # --dtype and --batch-size are baked in
    lengths = split_padded_lengths(cfg, args.split) if args.lengths == "split" else _lengths(args.lengths)
    weights = load_weights(cfg, args.checkpoint, args.step, raw=args.weights == "raw")
    params = weights.raw if args.weights == "raw" else weights.ema
    manifest = export_programs(
        cfg,
        params,
        args.out_dir,
        lengths,
        platforms=[p.strip() for p in args.platforms.split(",") if p.strip()],
        class_names=class_names(cfg.dataset.json_file, cfg.dataset.num_classes),
        stablehlo=args.stablehlo,
        source={"checkpoint": str(Path(args.checkpoint).absolute()), "weights": args.weights, "step": args.step},
    )
    size = sum(p["bytes"] for p in manifest["programs"].values())
    print(
        f"exported {len(manifest['lengths'])} programs (padded lengths {', '.join(map(str, manifest['lengths']))}; "
        f"{', '.join(manifest['platforms'])}; {manifest['dtype']}; {size / 1e6:.1f} MB) -> {args.out_dir}"
    )
    return 0


COMMANDS = {
    "convert": convert,
    "predict": predict,
    "eval": eval_,
    "map": map_,
    "train": train,
    "synth": synth,
    "demo": demo,
    "plot": plot,
    "convert-annotations": convert_annotations,
    "configs": configs,
    "extract": extract,
    "detect": detect,
    "export-torch": export_torch,
    "export": export_,
}


def run(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.command](args)
    except CltdrError as e:
        raise UserError(str(e)) from None
