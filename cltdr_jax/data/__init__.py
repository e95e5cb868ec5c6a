"""Data: annotation files, feature files, the per-video dataset and its training crop."""

from cltdr_jax.data.annotations import cmd_convert_annotations, convert_anet_bsn, convert_epic
from cltdr_jax.data.datasets import (
    DATASET_NAMES,
    VideoDataset,
    VideoRecord,
    ground_truth_dict,
    load_annotations,
    seconds_to_grid,
)
from cltdr_jax.data.features import read_features
from cltdr_jax.data.transforms import truncate_feats

__all__ = [
    "DATASET_NAMES",
    "VideoDataset",
    "VideoRecord",
    "cmd_convert_annotations",
    "convert_anet_bsn",
    "convert_epic",
    "ground_truth_dict",
    "load_annotations",
    "read_features",
    "seconds_to_grid",
    "truncate_feats",
]
