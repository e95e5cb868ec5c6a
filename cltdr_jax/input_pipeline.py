"""Training batches with grain: deterministic random crops, padding to max_seq_len, shuffling per epoch.

Every batch is a pure function of (seed, global step): step s of epoch e takes positions
[b * B, (b + 1) * B) of a permutation of the training videos drawn from (seed, e), and each item's random
crop draws from (seed, e, position). So worker processes, restarts and the number of hosts never change what
a step sees, and the grain iterator state saved with a checkpoint resumes exactly where training stopped.

A batch (host-local part of the global batch) is a dict of numpy arrays:
  feats [B, L, D_in] float32 (zero-padded), mask [B, L] bool, segments [B, G, 2] float32 (grid units),
  labels [B, G] int32, segment_mask [B, G] bool,
with L = max_seq_len and G a fixed number of ground-truth slots (so the train step compiles once).
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from cltdr_jax.config import Config
from cltdr_jax.data.datasets import VideoDataset
from cltdr_jax.errors import DataError


def segment_slots(dataset: VideoDataset) -> int:
    """Ground-truth slots per item: the most annotations of any training video, rounded up to a power of 2."""
    most = max((len(r.labels) for r in dataset.records), default=1)
    return 1 << max(0, int(np.ceil(np.log2(max(most, 1)))))


class TrainBatches:
    """Random-access training batches: `batches[step]` is the host-local part of global step `step`."""

    def __init__(
        self,
        cfg: Config,
        dataset: VideoDataset,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.cfg, self.dataset, self.seed = cfg, dataset, seed
        self.batch_size = cfg.loader.batch_size
        if self.batch_size % process_count:
            raise DataError(f"loader.batch_size {self.batch_size} is not divisible by {process_count} hosts")
        self.local_size = self.batch_size // process_count
        self.local_offset = process_index * self.local_size
        self.steps_per_epoch = len(dataset) // self.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{cfg.dataset.json_file}: {len(dataset)} training videos are fewer than one batch "
                f"(loader.batch_size {self.batch_size})"
            )
        self.slots = segment_slots(dataset)

    def _item(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        item = self.dataset.get(int(order[position]), np.random.default_rng([self.seed, epoch, position]))
        d = self.cfg.dataset
        feats = item["feats"]
        t = feats.shape[0]
        if t > d.max_seq_len:  # the crop guarantees this; a bug elsewhere must not silently truncate
            raise DataError(f"video {item['video_id']!r}: {t} steps after cropping > max_seq_len {d.max_seq_len}")
        padded = np.zeros((d.max_seq_len, feats.shape[1]), np.float32)
        padded[:t] = feats
        n = len(item["labels"])
        segments = np.zeros((self.slots, 2), np.float32)
        labels = np.zeros(self.slots, np.int32)
        segments[:n] = item["segments"]
        labels[:n] = item["labels"]
        return {
            "feats": padded,
            "mask": np.arange(d.max_seq_len) < t,
            "segments": segments,
            "labels": labels,
            "segment_mask": np.arange(self.slots) < n,
        }

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, index = divmod(step, self.steps_per_epoch)
        first = index * self.batch_size + self.local_offset
        items = [self._item(epoch, first + i) for i in range(self.local_size)]
        return {key: np.stack([it[key] for it in items]) for key in items[0]}

    def iterator(self, total_steps: int, workers: int = 0, state: dict[str, Any] | None = None):
        """A grain iterator over steps 0 .. total_steps - 1; `state` (from `get_state()`) resumes it."""
        dataset = grain.MapDataset.range(total_steps).map(self)
        iter_ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
        if workers > 0:
            from absl import flags

            # grain's worker processes read absl flags; outside an absl app nobody parsed them.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        it = iter(iter_ds)
        if state is not None:
            it.set_state(state)
        return it
