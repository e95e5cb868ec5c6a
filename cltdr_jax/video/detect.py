"""From extracted I3D features to detections and timeline pictures (what `cltdr detect` runs after `extract`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cltdr_jax.config import Config
from cltdr_jax.errors import DataError
from cltdr_jax.video.extract import ExtractOptions
from cltdr_jax.video.i3d import FEATURE_DIM


def streams_for(cfg: Config) -> tuple[str, ...]:
    """The I3D streams a config's features are made of, from its input_dim (2048: rgb then flow; 1024: rgb)."""
    dim = cfg.dataset.input_dim
    if dim == 2 * FEATURE_DIM:
        return ("rgb", "flow")
    if dim == FEATURE_DIM:
        return ("rgb",)
    raise DataError(
        f"config {cfg.source}: dataset.input_dim is {dim}, but two-stream I3D features have 2048 dimensions "
        "(1024 per stream): this model was trained on other features and cannot detect from a video file here"
    )


def check_grid(cfg: Config, options: ExtractOptions) -> list[str]:
    """Errors when the extraction grid differs from the one the model was trained on; returns warnings.

    The window (`dataset.num_frames`) and stride (`dataset.feat_stride`) fix where each feature row lies in
    time, so a mismatch would place every detection at the wrong time: an error. A frame rate other than
    the config's `default_fps` keeps the times right but changes the motion per row: a warning.
    """
    problems = []
    if options.window != cfg.dataset.num_frames:
        problems.append(f"--window {options.window} but the model's dataset.num_frames is {cfg.dataset.num_frames}")
    if options.stride != cfg.dataset.feat_stride:
        problems.append(f"--stride {options.stride} but the model's dataset.feat_stride is {cfg.dataset.feat_stride}")
    dim = FEATURE_DIM * len(options.streams)
    if dim != cfg.dataset.input_dim:
        problems.append(
            f"--streams {','.join(options.streams)} gives {dim}-d features but the model takes "
            f"dataset.input_dim = {cfg.dataset.input_dim}"
        )
    if problems:
        raise DataError(f"config {cfg.source}: the features would not fit the model: " + "; ".join(problems))
    fps = options.protocol.fps
    if cfg.dataset.default_fps and abs(cfg.dataset.default_fps - fps) > 1e-6:
        return [f"--fps {fps:g} differs from the config's dataset.default_fps {cfg.dataset.default_fps:g}"]
    return []


def detect_features(cfg: Config, params: Any, feature_dir: str | Path, infos: Mapping[str, Mapping[str, Any]]) -> Any:
    """Detections (a `predict.Prediction`, segments in seconds) of the videos in `infos`, whose features
    `extract_videos` wrote to `feature_dir`."""
    from cltdr_jax.predict import predict_files

    feature_dir = Path(feature_dir)
    fps = {info["fps"] for info in infos.values()}
    if len(fps) != 1:
        raise DataError(f"{feature_dir}: features extracted at several frame rates ({sorted(fps)}); one at a time")
    paths = [str(feature_dir / f"{vid}.npy") for vid in infos]
    # With the videos' durations, detections are clipped at their ends as a split's are.
    return predict_files(
        cfg, params, paths, fps.pop(), durations={vid: info["duration"] for vid, info in infos.items()}
    )


def plot_detections(
    results_json: Mapping[str, Any], infos: Mapping[str, Mapping[str, Any]], out_dir: str | Path, top: int = 10
) -> Sequence[Path]:
    """A timeline picture `out_dir/<video id>.png` of each video's detections (no ground truth)."""
    from cltdr_jax.plots import plot_timeline

    out_dir = Path(out_dir)
    paths = []
    for vid, info in infos.items():
        rows = results_json["results"].get(vid, [])
        paths.append(plot_timeline(rows, [], None, info["duration"], out_dir / f"{vid}.png", top=top))
    return paths
