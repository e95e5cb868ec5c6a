"""The per-video dataset: feature files and annotations as training and inference items (REFERENCE.md 9).

Annotations are read and validated by `annotations.load_annotations` (the one reader); features by
`features.read_features`. Every item, whether from a split or from a feature file given directly
(`video_item`), is built by the same code: sliced (MultiTHUMOS `rgb_only`), strided (`downsample_rate`)
and mapped to the feature grid the same way.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from cltdr_jax.config import Config
from cltdr_jax.data.annotations import DATASET_TIOU, VideoRecord, load_annotations
from cltdr_jax.data.features import read_features
from cltdr_jax.data.transforms import truncate_feats
from cltdr_jax.errors import DataError

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# One video


def seconds_to_grid(segments_sec: np.ndarray, fps: float, num_frames: int, feat_stride: int) -> np.ndarray:
    """`(sec * fps - 0.5 * num_frames) / feat_stride` in float32 (REFERENCE.md 9.1): `[N, 2]` -> `[N, 2]`."""
    segs = np.asarray(segments_sec, dtype=np.float32).reshape(-1, 2)
    return (segs * np.float32(fps) - np.float32(0.5 * num_frames)) / np.float32(feat_stride)


def _anet_training_filter(
    segments: np.ndarray, labels: np.ndarray, vid_len: float, trunc_thresh: float, video_id: str
) -> tuple[np.ndarray, np.ndarray]:
    """REFERENCE.md 9.6: drops actions past the features or mostly outside them, clamps ends to vid_len."""
    keep = np.zeros(len(segments), dtype=bool)
    for i, (s, e) in enumerate(segments):
        if s >= np.float32(vid_len) or e == s:  # zero-length ones are dropped at load time anyway
            continue
        # Python-float arithmetic on the float32 values, as the reference (`.item()`).
        keep[i] = (min(float(e), vid_len) - float(s)) / (float(e) - float(s)) >= trunc_thresh
    if not keep.any():
        raise DataError(
            f"video {video_id!r}: every action lies (mostly) beyond the {vid_len:g} feature steps, so the "
            "training item has no actions left (the reference crashes here); check its features and duration"
        )
    segments = segments[keep].copy()
    segments[:, 1] = np.minimum(segments[:, 1], np.float32(vid_len))
    return segments, labels[keep]


def _hacs_training_filter(segments: np.ndarray, labels: np.ndarray, feat_len: int) -> tuple[np.ndarray, np.ndarray]:
    """REFERENCE.md 9.7: drops actions starting at or after T, clamps ends to T; keeps all if none survive."""
    keep = segments[:, 0] < feat_len
    if not keep.any():
        return segments, labels  # reference quirk (12.18)
    segments = segments[keep].copy()
    segments[:, 1] = np.minimum(segments[:, 1], np.float32(feat_len))
    return segments, labels[keep]


def rgb_columns(cfg: Config) -> int | None:
    """Feature columns to keep before the width check: 1024 for MultiTHUMOS `rgb_only`, else all (None)."""
    d = cfg.dataset
    if cfg.dataset_name != "multithumos":
        return None
    rgb_only = d.rgb_only if d.rgb_only is not None else d.input_dim == 1024
    how = "set in the config" if d.rgb_only is not None else f"from input_dim {d.input_dim} (REFERENCE 12.10)"
    logger.info("multithumos: rgb_only=%s (%s)", rgb_only, how)
    return 1024 if rgb_only else None


def video_item(
    cfg: Config,
    video_id: str,
    feats: np.ndarray,
    fps: float,
    duration: float,
    segments_sec: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """An inference item of one video: features as `read_features` returns them (sliced and strided) and
    the feature grid they lie on (`feat_stride` x `downsample_rate`); GT segments mapped onto it."""
    d = cfg.dataset
    feat_stride = d.feat_stride * d.downsample_rate
    segments_sec = np.zeros((0, 2)) if segments_sec is None else segments_sec
    labels = np.zeros((0,), np.int32) if labels is None else labels
    return {
        "video_id": video_id,
        "feats": feats,
        "segments": seconds_to_grid(segments_sec, fps, d.num_frames, feat_stride),
        "labels": (labels if d.num_classes > 1 else np.zeros_like(labels)).astype(np.int32),
        "fps": fps,
        "duration": duration,
        "feat_stride": feat_stride,
        "feat_num_frames": d.num_frames,
    }


class VideoDataset:
    """The videos of `splits` as items for training (`training=True`: cropped) or inference.

    `dataset[i]` draws crops from the dataset's own generator (seeded with `seed`, default
    `cfg.init_rand_seed`); `dataset.get(i, rng)` takes an explicit one, for reproducible pipelines.
    Each item: `video_id` str, `feats` float32 `[T, D_in]`, `segments` float32 `[N, 2]` (feature-grid
    units), `labels` int32 `[N]`, `fps`, `duration` (s), `feat_stride`, `feat_num_frames`.
    """

    def __init__(
        self,
        cfg: Config,
        splits: tuple[str, ...] | list[str],
        training: bool,
        preload: bool = False,
        seed: int | None = None,
    ):
        self.cfg = cfg
        self.splits = tuple(splits)
        self.training = training
        records, self._class_names, self.info = load_annotations(cfg, self.splits)
        if training:
            without = [r.video_id for r in records if len(r.labels) == 0]
            if without:
                logger.info("training leaves out %d videos without annotations", len(without))
            records = [r for r in records if len(r.labels) > 0]
            if not records:
                raise DataError(f"{cfg.dataset.json_file}: no annotated videos in {', '.join(self.splits)}")
        self._records = records
        self._columns = rgb_columns(cfg)
        self._rng = np.random.default_rng(cfg.init_rand_seed if seed is None else seed)
        self._feats = [self._read(r) for r in records] if preload else None

    def _read(self, record: VideoRecord) -> np.ndarray:
        return read_features(record.feature_path, self.cfg.dataset, record.video_id, columns=self._columns)

    @property
    def records(self) -> list[VideoRecord]:
        return self._records

    @property
    def class_names(self) -> list[str]:
        return self._class_names

    @property
    def empty_label_ids(self) -> list[int]:
        """Ids in [0, num_classes) that no annotation uses (only EPIC and custom can have any; the exact class
        count check excludes them elsewhere). Training sets their classifier bias near -13.8."""
        return list(self.info["empty_label_ids"])

    @property
    def tiou_thresholds(self) -> np.ndarray:
        return DATASET_TIOU[self.cfg.dataset_name].copy()

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index, self._rng)

    def get(self, index: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Item `index`; `rng` drives the training crop (required when training)."""
        d, name = self.cfg.dataset, self.cfg.dataset_name
        record = self._records[index]
        feats = self._feats[index] if self._feats is not None else self._read(record)
        item = video_item(
            self.cfg, record.video_id, feats, record.fps, record.duration, record.segments_sec, record.labels
        )
        if self.training:
            if rng is None:
                raise ValueError("a training item needs an rng for its random crop")
            segments, labels = item["segments"], item["labels"]
            if name == "anet":
                vid_len = feats.shape[0] + 0.5 * d.num_frames / item["feat_stride"]
                segments, labels = _anet_training_filter(segments, labels, vid_len, d.trunc_thresh, record.video_id)
            elif name == "hacs":
                segments, labels = _hacs_training_filter(segments, labels, feats.shape[0])
            feats, segments, labels, _ = truncate_feats(
                feats, segments, labels, d.max_seq_len, d.trunc_thresh, d.crop_ratio, rng
            )
            item.update(feats=feats, segments=segments.astype(np.float32), labels=labels.astype(np.int32))
        return item
