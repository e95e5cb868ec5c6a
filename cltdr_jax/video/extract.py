"""I3D features of whole videos: sliding windows, batched under one compiled function per batch shape.

One feature row per window of `window` frames every `stride` frames (the grid of THUMOS14's I3D features,
16 and 4 at 30 fps), so a video of N resampled frames has T = floor((N - window) / stride) + 1 rows;
row t covers frames [t * stride, t * stride + window), centred on (t * stride + window / 2) / fps seconds,
which is how `cltdr predict` places detections. A row is the RGB stream's 1024-d vector, then the flow
stream's, each the clip's Mixed_5c averaged over time and space (`I3D.clip_features`, the port's
`extract_features` for 16 x 224 x 224 clips).

Decoding and TV-L1 run on a producer thread (and flow on a pool of its own), the network on the calling
thread with one batch in flight, so the three overlap; the last, partial batch of a video is padded with
zeros so every batch has the same shape and nothing compiles twice.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cltdr_jax.errors import DataError
from cltdr_jax.video.frames import FrameProtocol, frame_inputs, probe
from cltdr_jax.video.i3d import FEATURE_DIM, I3D, i3d_of, load_i3d_weights
from cltdr_jax.xla_options import compiler_options

STREAMS = ("rgb", "flow")
INFO_FILE = "videos.json"


def video_id(path: str | Path) -> str:
    """The file name up to its first dot, as `cltdr predict --features` reads the id back."""
    return Path(path).name.split(".")[0]


def num_windows(frames: int, window: int, stride: int) -> int:
    """T = floor((frames - window) / stride) + 1, or 0 when not even one window fits."""
    return (frames - window) // stride + 1 if frames >= window else 0


@dataclass(frozen=True)
class ExtractOptions:
    """Windows, streams and batching on top of the frame protocol."""

    protocol: FrameProtocol = field(default_factory=FrameProtocol)
    window: int = 16
    stride: int = 4
    streams: tuple[str, ...] = STREAMS
    batch_size: int = 8
    dtype: str = "float32"  # compute dtype of the network: float32 or bfloat16
    flow_workers: int | None = None

    def __post_init__(self):
        if (
            not self.streams
            or any(s not in STREAMS for s in self.streams)
            or len(set(self.streams)) != len(self.streams)
        ):
            raise ValueError(f"streams must be rgb, flow or both, got {','.join(self.streams) or 'none'}")
        if self.window < 1 or self.stride < 1 or self.batch_size < 1:
            raise ValueError("window, stride and batch size must be positive")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype}")


@dataclass
class VideoFeatures:
    video_id: str
    features: np.ndarray  # [T, 1024 * len(streams)] float32
    info: dict[str, Any]  # duration, fps, frames, T, ...


class I3DFeatures:
    """The networks of the requested streams and their compiled clip-feature functions."""

    def __init__(self, weights: dict[str, str | Path], options: ExtractOptions):
        """weights: {stream: the port's .pt (or .npz) file} for every stream of `options.streams`."""
        variables = {}
        for stream in options.streams:
            if stream not in weights or weights[stream] is None:
                raise DataError(f"the {stream} stream needs its I3D weights (--{stream}-weights FILE)")
            variables[stream] = load_i3d_weights(weights[stream], stream)[1]
        self._compile_streams(variables, options)

    @classmethod
    def from_variables(cls, variables: dict[str, Any], options: ExtractOptions) -> I3DFeatures:
        """From weights already in memory, {stream: I3D variables} (benchmarks and tests without the files)."""
        network = cls.__new__(cls)
        network._compile_streams(variables, options)
        return network

    def _compile_streams(self, variables: dict[str, Any], options: ExtractOptions) -> None:
        self.options = options
        dtype = jnp.bfloat16 if options.dtype == "bfloat16" else jnp.float32
        # HIGHEST keeps float32 float32 on GPUs (no TF32); bfloat16 is the fast, approximate choice.
        precision = jax.lax.Precision.HIGHEST if options.dtype == "float32" else None
        self.variables, self._fns = {}, {}
        for stream in options.streams:
            model = i3d_of(variables[stream], dtype=dtype, precision=precision)
            self.variables[stream] = jax.device_put(variables[stream])
            self._fns[stream] = jax.jit(
                self._clip_fn(model, stream), compiler_options=compiler_options(compute_dtype=dtype)
            )

    @staticmethod
    def _clip_fn(model: I3D, stream: str) -> Callable:
        def clip_features(variables: Any, x: jax.Array) -> jax.Array:
            """x [B, window, S, S, C] (uint8 RGB or float32 flow in [-1, 1]) -> [B, 1024] float32."""
            if stream == "rgb":
                x = x.astype(jnp.float32) / 127.5 - 1.0  # [0, 255] -> [-1, 1], on the device
            return model.apply(variables, x, method=I3D.clip_features)

        return clip_features

    @property
    def feature_dim(self) -> int:
        return FEATURE_DIM * len(self.options.streams)

    def __call__(self, batch: dict[str, np.ndarray]) -> jax.Array:
        """{stream: [B, window, S, S, C]} -> [B, 1024 * streams], dispatched asynchronously."""
        return jnp.concatenate([self._fns[s](self.variables[s], batch[s]) for s in self.options.streams], axis=-1)

    def compilations(self) -> int:
        """Distinct compiled shapes so far, over all streams (tests check it stays one per batch shape)."""
        return sum(fn._cache_size() for fn in self._fns.values())


def _window_batches(
    frames: Iterator[dict[str, np.ndarray]], options: ExtractOptions
) -> Iterator[tuple[dict[str, np.ndarray], int, int]]:
    """(batch {stream: [B, window, S, S, C]}, valid rows, frames seen so far): windows every `stride` frames;
    the last batch is zero-padded to B rows. Yields ({}, 0, N) at the end with the final frame count N."""
    w, s, b = options.window, options.stride, options.batch_size
    recent: list[dict[str, np.ndarray]] = []  # the last `window` frames
    rows: list[dict[str, np.ndarray]] = []
    n = 0

    def stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        out = {}
        for stream in options.streams:
            x = np.stack([r[stream] for r in rows])
            if len(rows) < b:
                x = np.concatenate([x, np.zeros((b - len(rows), *x.shape[1:]), x.dtype)])
            out[stream] = x
        return out

    for frame in frames:
        recent.append(frame)
        if len(recent) > w:
            recent.pop(0)
        n += 1
        if n >= w and (n - w) % s == 0:
            rows.append({stream: np.stack([f[stream] for f in recent]) for stream in options.streams})
            if len(rows) == b:
                yield stack(rows), b, n
                rows = []
    if rows:
        yield stack(rows), len(rows), n
    yield {}, 0, n


def _produced(iterator: Iterator, depth: int = 2) -> Iterator:
    """Runs `iterator` on a thread of its own, `depth` items ahead; re-raises its errors here."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def offer(item) -> bool:
        """Puts `item` unless the consumer has gone; False then."""
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in iterator:
                if not offer(item):
                    return
            offer(done)
        except BaseException as e:  # noqa: B036 - handed to the consumer, which re-raises it
            offer(e)
        finally:
            # Closed on this thread, where it ran: releases the decoder and the flow pool at once.
            getattr(iterator, "close", lambda: None)()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


def extract_video(
    path: str | Path,
    network: I3DFeatures,
    progress: Callable[[int], None] | None = None,
) -> VideoFeatures:
    """Features [T, 1024 * streams] of one video file and its info (duration, fps, frames, T).

    `progress(n)` is called after each batch with the number of new clips.
    """
    path = Path(path)
    options = network.options
    p = options.protocol
    header = probe(path, p.fps)
    started = time.perf_counter()
    frames = frame_inputs(path, p, options.streams, options.flow_workers)
    outputs, in_flight, frames_seen = [], None, 0
    for batch, valid, seen in _produced(_window_batches(frames, options)):
        frames_seen = seen
        if not valid:
            continue
        result = network(batch)  # asynchronous: the producer keeps decoding meanwhile
        if in_flight is not None:
            outputs.append(np.asarray(in_flight[0])[: in_flight[1]])
            if progress:
                progress(in_flight[1])
        in_flight = (result, valid)
    if in_flight is not None:
        outputs.append(np.asarray(in_flight[0])[: in_flight[1]])
        if progress:
            progress(in_flight[1])
    t = num_windows(frames_seen, options.window, options.stride)
    if t == 0:
        raise DataError(
            f"{path}: {frames_seen} frames at {p.fps:g} fps ({frames_seen / p.fps:.2f} s), fewer than one "
            f"window of {options.window} frames: no features can be extracted"
        )
    feats = np.concatenate(outputs).astype(np.float32)
    assert feats.shape[0] == t, (feats.shape, t)
    info = {
        "duration": frames_seen / p.fps,
        "fps": p.fps,
        "frames": frames_seen,
        "T": t,
        "feature_dim": int(feats.shape[1]),
        "streams": list(options.streams),
        "window": options.window,
        "stride": options.stride,
        "source": str(path.absolute()),
        "source_fps": header.source_fps,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return VideoFeatures(video_id(path), feats, info)


def protocol_json(options: ExtractOptions) -> dict[str, Any]:
    """The settings the features were made with, stored beside them."""
    out = asdict(options)
    out["streams"] = list(options.streams)
    return out


def extract_videos(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    network: I3DFeatures,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Writes `out_dir/<video id>.npy` (float32 [T, 1024 * streams]) per video and `out_dir/videos.json`
    ({"protocol": ..., "videos": {video id: info}}, merged with what an earlier run wrote there).

    `progress(video_id, new_clips)` is called after each batch. Returns {video id: info}.
    """
    out_dir = Path(out_dir)
    ids = [video_id(p) for p in paths]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DataError(f"several videos share the id {dupes[0]!r} (the file name up to its first dot)")
    out_dir.mkdir(parents=True, exist_ok=True)
    info_path = out_dir / INFO_FILE
    infos = {}
    if info_path.is_file():
        try:
            infos = dict(json.loads(info_path.read_text()).get("videos", {}))
        except (ValueError, AttributeError):
            infos = {}  # an unreadable index is rebuilt from this run
    written = {}
    for path in paths:
        vid = video_id(path)
        result = extract_video(path, network, (lambda n, vid=vid: progress(vid, n)) if progress else None)
        tmp = out_dir / f"{vid}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, result.features)
        tmp.replace(out_dir / f"{vid}.npy")
        infos[vid] = written[vid] = result.info
        tmp = info_path.with_name(INFO_FILE + ".tmp")
        tmp.write_text(json.dumps({"protocol": protocol_json(network.options), "videos": infos}, indent=1))
        tmp.replace(info_path)
    return written


def expected_clips(paths: Sequence[str | Path], options: ExtractOptions) -> dict[str, int]:
    """Clips each video should give, from the containers' headers (for progress and ETA only)."""
    out = {}
    for path in paths:
        frames = probe(path, options.protocol.fps).frames
        out[video_id(path)] = num_windows(frames, options.window, options.stride)
    return out
