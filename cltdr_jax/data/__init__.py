"""Data: the annotation reader, feature files, the per-video dataset and its training crop, converters."""

from cltdr_jax.data.annotations import DATASET_NAMES, DATASET_TIOU, VideoRecord, load_annotations
from cltdr_jax.data.convert_annotations import convert_anet_bsn, convert_annotations, convert_epic
from cltdr_jax.data.datasets import VideoDataset, seconds_to_grid, video_item
from cltdr_jax.data.features import read_features
from cltdr_jax.data.transforms import truncate_feats

__all__ = [
    "DATASET_NAMES",
    "DATASET_TIOU",
    "VideoDataset",
    "VideoRecord",
    "convert_anet_bsn",
    "convert_annotations",
    "convert_epic",
    "load_annotations",
    "read_features",
    "seconds_to_grid",
    "truncate_feats",
    "video_item",
]
