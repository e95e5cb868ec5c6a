"""truncate_feats (REFERENCE.md 7.2) on hand-computed cases, plus the reference's own crops of the fixture."""

from __future__ import annotations

import numpy as np

from cltdr_jax.config import load_config
from cltdr_jax.data import VideoDataset, truncate_feats


class ScriptedRng:
    """Stands in for np.random.Generator: returns the scripted integers and records each draw's bounds."""

    def __init__(self, values):
        self.values = list(values)
        self.calls = []

    def integers(self, low, high, endpoint=False):
        assert endpoint, "draws must include the upper bound, as Python's random.randint"
        value = self.values.pop(0)
        assert low <= value <= high, (low, high, value)
        self.calls.append((low, high))
        return value


def _feats(t, d=3):
    return np.arange(t * d, dtype=np.float32).reshape(t, d)


def _segs(*pairs):
    return np.array(pairs, dtype=np.float32).reshape(-1, 2)


def test_short_video_without_crop_is_unchanged():
    feats, segs, labels = _feats(5), _segs([1, 3]), np.array([2], np.int32)
    out = truncate_feats(feats, segs, labels, 8, 0.5, None, ScriptedRng([]))
    assert out[0] is feats and out[1] is segs and out[2] is labels and out[3] == 0


def test_long_video_is_cut_to_max_seq_len_and_a_straddling_action_is_clipped():
    # T = 10, M = 4, start 3: window [3, 7].
    # [2, 5]: 2 of 3 inside (0.67 >= 0.5) -> kept, clipped to [3, 5], shifted to [0, 2].
    # [6, 9]: 1 of 3 inside -> dropped. [0, 1]: outside -> dropped. [4, 6]: inside -> [1, 3].
    feats = _feats(10)
    segs = _segs([2, 5], [6, 9], [0, 1], [4, 6])
    labels = np.array([7, 8, 9, 5], np.int32)
    rng = ScriptedRng([3])
    f, s, l, start = truncate_feats(feats, segs, labels, 4, 0.5, (0.9, 1.0), rng)
    assert rng.calls == [(0, 6)]  # crop_ratio does not apply to long videos
    assert start == 3
    np.testing.assert_array_equal(f, feats[3:7])
    np.testing.assert_array_equal(s, [[0, 2], [1, 3]])
    np.testing.assert_array_equal(l, [7, 5])
    assert s.dtype == np.float32


def test_threshold_is_inclusive():
    # window [0, 4]; [2, 6] has exactly half inside -> kept (ratio >= thresh).
    f, s, l, _ = truncate_feats(_feats(10), _segs([2, 6]), np.array([1]), 4, 0.5, None, ScriptedRng([0]))
    np.testing.assert_array_equal(s, [[2, 4]])


def test_retries_until_a_window_keeps_an_action():
    # first window [0, 4] misses [7, 9]; the second, [6, 10], keeps it.
    rng = ScriptedRng([0, 6])
    f, s, l, start = truncate_feats(_feats(10), _segs([7, 9]), np.array([4]), 4, 0.5, None, rng)
    assert start == 6 and len(rng.calls) == 2
    np.testing.assert_array_equal(s, [[1, 3]])


def test_after_200_failed_trials_the_last_window_is_used_without_actions():
    rng = ScriptedRng([0] * 199 + [2])
    f, s, l, start = truncate_feats(_feats(10), _segs([8, 10]), np.array([1]), 4, 0.9, None, rng)
    assert len(rng.calls) == 200 and start == 2
    np.testing.assert_array_equal(f, _feats(10)[2:6])
    assert s.shape == (0, 2) and l.shape == (0,)


def test_zero_length_and_reversed_actions_are_never_kept():
    # zero length: 0/0 = NaN ratio; reversed: |length| > 0 but no intersection. [1, 2] keeps the window.
    segs = _segs([2, 2], [3, 1], [1, 2])
    f, s, l, _ = truncate_feats(_feats(10), segs, np.array([0, 1, 2]), 4, 0.5, None, ScriptedRng([0]))
    np.testing.assert_array_equal(s, [[1, 2]])
    np.testing.assert_array_equal(l, [2])


def test_short_video_crop_bounds_use_bankers_rounding():
    # T = 5, crop (0.5, 0.9): round(2.5) = 2 and round(4.5) = 4 (halves to even) -> length drawn in [2, 4].
    rng = ScriptedRng([3, 1])
    f, s, l, start = truncate_feats(_feats(5), _segs([1, 4]), np.array([0]), 8, 0.5, (0.5, 0.9), rng)
    assert rng.calls == [(2, 4), (0, 2)]
    assert start == 1 and f.shape[0] == 3
    np.testing.assert_array_equal(s, [[0, 3]])


def test_short_video_crop_to_full_length_is_unchanged():
    feats, segs, labels = _feats(10), _segs([1, 3]), np.array([0])
    rng = ScriptedRng([10])  # bounds [9, 10]
    out = truncate_feats(feats, segs, labels, 16, 0.5, (0.9, 1.0), rng)
    assert rng.calls == [(9, 10)]
    assert out[0] is feats and out[3] == 0


def test_crop_length_at_least_one():
    rng = ScriptedRng([1])  # T = 1 * 0.1 rounds to 0 -> lower bound 1 -> full length
    out = truncate_feats(_feats(1), _segs([0, 1]), np.array([0]), 8, 0.5, (0.1, 1.0), rng)
    assert rng.calls == [(1, 1)] and out[3] == 0


def test_deterministic_given_the_generator_and_bounds_inclusive():
    feats, segs, labels = _feats(50), _segs([0, 50]), np.array([0])
    a = truncate_feats(feats, segs, labels, 20, 0.1, (0.9, 1.0), np.random.default_rng(3))
    b = truncate_feats(feats, segs, labels, 20, 0.1, (0.9, 1.0), np.random.default_rng(3))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    rng = np.random.default_rng(0)
    starts = {truncate_feats(_feats(5), _segs([0, 5]), labels, 4, 0.1, None, rng)[3] for _ in range(100)}
    assert starts == {0, 1}


def test_reproduces_the_reference_items_of_the_fixture(thumos_small, monkeypatch):
    """The fixture's training batches: whole videos (grid mapping) and the reference's own random crops."""
    fixture = thumos_small
    monkeypatch.chdir(fixture)
    cfg = load_config("config.yaml")
    ds = VideoDataset(cfg, cfg.train_split, training=True)
    index = {r.video_id: i for i, r in enumerate(ds.records)}
    ref = np.load(fixture / "reference_outputs.npz")
    checked = 0
    for b in range(2):
        for v, vid in enumerate(ref[f"train/batch{b}/video_ids"]):
            key = f"train/batch{b}/v{v}/"
            start, end = (int(x) for x in ref[key + "feat_window"])
            feats = np.load(f"features/{vid}.npy")
            t = feats.shape[0]
            if (start, end) == (0, t):  # fed whole, without the crop
                item = VideoDataset(cfg, cfg.train_split, training=False)[index[str(vid)]]
            else:  # replay the reference's draws: crop length (short videos only), then the start
                script = [start] if t > cfg.dataset.max_seq_len else [end - start, start]
                item = ds.get(index[str(vid)], ScriptedRng(script))
            np.testing.assert_array_equal(item["feats"], feats[start:end])
            np.testing.assert_array_equal(item["segments"], ref[key + "segments"])
            np.testing.assert_array_equal(item["labels"], ref[key + "labels"])
            checked += 1
    assert checked == 4
