"""Frames and optical flow of one video file, as the I3D protocol prepares them.

For each frame of the resampled video this yields the two network inputs (`frame_inputs`):

  * **Resampling to `fps`** (default 30, the frame rate of THUMOS14 and of the features its detectors are
    trained on): target frame k is the decoded frame whose presentation time is nearest to k / fps (ties go
    to the earlier one), for every k / fps before the end of the last frame; a video already at `fps` keeps
    every frame. Timestamps, not frame counts, so variable-frame-rate files come out evenly spaced.
  * **RGB**: the frame resized so its shorter side is `resize` (256) with bilinear interpolation, centre
    crop `size` x `size` (224), values scaled from [0, 255] to [-1, 1] (later, on the device). This is the
    test-time protocol of I3D (Carreira and Zisserman 2017; the kinetics-i3d README).
  * **Flow**: TV-L1 (OpenCV's `DualTVL1OpticalFlow` with its default parameters) between the grayscale
    versions of consecutive resampled frames, computed on the resized frame (shorter side `flow_resize`,
    default `resize`), the same centre crop, truncated to [-`flow_bound`, `flow_bound`] = [-20, 20] pixels
    and divided by 20 to [-1, 1]; channels (x, y). Also the kinetics-i3d protocol.
  * **Alignment**: flow field i is the motion from frame i to frame i + 1, so N frames give N - 1 fields;
    the last frame gets a copy of field N - 2 (a zero field when the video has one frame). Both streams
    then have N per-frame inputs and a window of frames [s, s + window) uses flow fields [s, s + window).

PyAV decodes, OpenCV resizes and computes flow; both are imported on first use (`pip install cltdr-jax[video]`).
Every problem with a file is a `DataError` naming it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cltdr_jax.errors import CltdrError, DataError


class VideoDependencyError(CltdrError, ImportError):
    """PyAV or OpenCV (with its contrib modules) is not installed."""


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise VideoDependencyError("reading videos needs PyAV: pip install cltdr-jax[video]") from None
    return av


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise VideoDependencyError("optical flow needs OpenCV: pip install cltdr-jax[video]") from None
    if not hasattr(cv2, "optflow"):
        raise VideoDependencyError(
            "TV-L1 optical flow needs OpenCV's contrib modules: pip uninstall opencv-python "
            "opencv-python-headless; pip install opencv-contrib-python-headless"
        )
    return cv2


@dataclass(frozen=True)
class FrameProtocol:
    """How frames are sampled and prepared (defaults: the I3D protocol at THUMOS14's 30 fps)."""

    fps: float = 30.0
    resize: int = 256  # shorter side before the centre crop
    size: int = 224  # centre crop, the network's input size
    flow_resize: int | None = None  # shorter side TV-L1 runs at (None: `resize`); smaller is faster
    flow_bound: float = 20.0  # flow truncated to +-flow_bound pixels, then divided by it

    def __post_init__(self):
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.size > self.resize:
            raise ValueError(f"the crop ({self.size}) cannot be larger than the resized shorter side ({self.resize})")
        if self.flow_resize is not None and self.flow_resize <= 0:
            raise ValueError(f"flow_resize must be positive, got {self.flow_resize}")


@dataclass(frozen=True)
class VideoInfo:
    """What the container says before decoding (estimates: used for progress, not for results)."""

    duration: float  # seconds
    source_fps: float
    frames: int  # resampled frames expected at the protocol's fps


def _open(path: Path) -> Any:
    av = _av()
    if not path.is_file():
        raise DataError(f"{path}: video file not found")
    try:
        container = av.open(str(path))
    except Exception as e:  # av.error.InvalidDataError and friends: not a container FFmpeg knows
        raise DataError(f"{path}: not a video file PyAV/FFmpeg can read ({type(e).__name__}: {e})") from None
    if not container.streams.video:
        container.close()
        raise DataError(f"{path}: the file has no video stream")
    return container


def _source_fps(stream: Any) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def probe(path: str | Path, fps: float) -> VideoInfo:
    """Duration, source frame rate and expected number of frames at `fps`, from the container's header."""
    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        src_fps = _source_fps(stream)
        duration = 0.0
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / 1e6  # av.time_base: microseconds
        elif stream.frames and src_fps:
            duration = stream.frames / src_fps
    finally:
        container.close()
    return VideoInfo(duration, src_fps, round(duration * fps))


def _decoded(path: Path) -> Iterator[tuple[float, float, Any]]:
    """(presentation time from the first frame in s, nominal frame duration in s, av.VideoFrame), in order.

    Packets that fail to decode are skipped (FFmpeg's players conceal them too); a file in which no frame
    decodes at all is a DataError.
    """
    av = _av()
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame- and slice-threaded decoding
        src_fps = _source_fps(stream)
        step = 1.0 / src_fps if src_fps else None
        start, count, errors, last_error = None, 0, 0, ""
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                errors, last_error = errors + 1, str(e)
                continue
            for frame in frames:
                if frame.time is not None:
                    t = float(frame.time)
                else:  # no timestamps in the container: assume a constant rate
                    t = count * (step or 1.0 / 30)
                start = t if start is None else start
                count += 1
                yield t - start, step or 0.0, frame
        if count == 0:
            detail = f" ({errors} packets failed to decode, last: {last_error})" if errors else ""
            raise DataError(f"{path}: no decodable video frames{detail}")
    finally:
        container.close()


def resampled_frames(path: str | Path, fps: float) -> Iterator[Any]:
    """The video at `fps`: for each k, the decoded frame nearest to time k / fps (av.VideoFrame objects,
    the same object repeated when the source is slower than `fps`)."""
    k, prev, prev_t, step = 0, None, 0.0, 0.0
    diffs = []
    for t, frame_step, frame in _decoded(Path(path)):
        step = frame_step
        if prev is not None:
            diffs.append(t - prev_t)
            midpoint = 0.5 * (prev_t + t)
            while k / fps <= midpoint:
                yield prev
                k += 1
        prev, prev_t = frame, t
    if prev is None:
        return
    # The last frame lasts one nominal frame duration (or the median spacing when the header has no rate).
    step = step or (float(np.median(diffs)) if diffs else 1.0 / fps)
    end = prev_t + step
    while k / fps < end - 1e-3 / fps:
        yield prev
        k += 1


def resize_shorter(image: np.ndarray, side: int, interpolation: int | None = None) -> np.ndarray:
    """[H, W, ...] -> [h, w, ...] with min(h, w) = side, aspect ratio kept (bilinear by default)."""
    cv2 = _cv2()
    h, w = image.shape[:2]
    scale = side / min(h, w)
    size = (max(side, round(w * scale)), max(side, round(h * scale)))  # cv2 takes (width, height)
    if (size[1], size[0]) == (h, w):
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR if interpolation is None else interpolation)


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """[H, W, ...] -> [size, size, ...], the centre (the extra pixel of an odd margin goes to the bottom/right)."""
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


class TVL1:
    """TV-L1 optical flow with OpenCV's defaults; one solver per thread (the solver object keeps state)."""

    def __init__(self):
        self._local = threading.local()

    def __call__(self, prev_gray: np.ndarray, next_gray: np.ndarray) -> np.ndarray:
        """Two uint8 [H, W] frames -> flow [H, W, 2] float32 in pixels, (x, y): where each pixel moves."""
        solver = getattr(self._local, "solver", None)
        if solver is None:
            solver = self._local.solver = _cv2().optflow.DualTVL1OpticalFlow_create()
        return solver.calc(prev_gray, next_gray, None)


def _flow_input(flow: np.ndarray, protocol: FrameProtocol, resized_hw: tuple[int, int]) -> np.ndarray:
    """Flow [h, w, 2] at the flow resolution -> network input [size, size, 2] float32 in [-1, 1]."""
    if flow.shape[:2] != resized_hw:  # TV-L1 ran smaller: bring the field to the RGB's resolution
        cv2 = _cv2()
        scale = resized_hw[1] / flow.shape[1]
        flow = cv2.resize(flow, (resized_hw[1], resized_hw[0]), interpolation=cv2.INTER_LINEAR) * scale
    flow = centre_crop(flow, protocol.size)
    return np.clip(flow, -protocol.flow_bound, protocol.flow_bound) / np.float32(protocol.flow_bound)


def frame_inputs(
    path: str | Path,
    protocol: FrameProtocol,
    streams: tuple[str, ...] = ("rgb", "flow"),
    flow_workers: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Per resampled frame i: {"rgb": uint8 [size, size, 3], "flow": float32 [size, size, 2] in [-1, 1]}.

    Only the requested streams are computed. TV-L1 runs on `flow_workers` threads (default: the CPU
    count), several frame pairs at once; OpenCV releases the GIL, so this overlaps with decoding.
    """
    path = Path(path)
    cv2 = _cv2()
    want_flow = "flow" in streams
    flow_side = protocol.flow_resize or protocol.resize
    tvl1 = TVL1()
    workers = flow_workers or os.cpu_count() or 1
    pool = concurrent.futures.ThreadPoolExecutor(workers) if want_flow else None
    pending: collections.deque = collections.deque()  # (rgb crop or None, future of flow i -> i + 1)
    prev_frame, prev_gray, prev_item, resized_hw, last_flow = None, None, None, None, None

    def emit(item: tuple[np.ndarray | None, Any]) -> dict[str, np.ndarray]:
        nonlocal last_flow
        rgb, flow = item
        out = {}
        if rgb is not None:
            out["rgb"] = rgb
        if want_flow:
            last_flow = _flow_input(flow.result(), protocol, resized_hw) if flow is not None else last_flow
            out["flow"] = last_flow
        return out

    try:
        for frame in resampled_frames(path, protocol.fps):
            if frame is not prev_frame:  # a repeated source frame is converted once
                image = frame.to_ndarray(format="rgb24")
                resized = resize_shorter(image, protocol.resize)
                resized_hw = resized.shape[:2]
                rgb = np.ascontiguousarray(centre_crop(resized, protocol.size)) if "rgb" in streams else None
                gray = None
                if want_flow:
                    small = resized if flow_side == protocol.resize else resize_shorter(image, flow_side)
                    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
                prev_frame = frame
            if want_flow and prev_gray is not None:
                pending.append((prev_item, pool.submit(tvl1, prev_gray, gray)))
            elif prev_item is not None:  # rgb only: no need to wait for the next frame
                yield emit((prev_item, None))
            prev_item, prev_gray = rgb, gray
            while pending and (pending[0][1].done() or len(pending) > 2 * workers):
                yield emit(pending.popleft())
        while pending:
            yield emit(pending.popleft())
        if prev_frame is not None:
            # The last frame: its flow is a copy of the previous field (zeros for a one-frame video).
            if want_flow and last_flow is None:
                last_flow = np.zeros((protocol.size, protocol.size, 2), np.float32)
            yield emit((prev_item, None))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
