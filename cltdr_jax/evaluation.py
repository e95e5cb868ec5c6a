"""Detection mAP under the ActivityNet protocol, vectorised in numpy.

Two protocols, chosen by one visible switch (``protocol=``):

- ``"official"`` (default): ``activitynet/ActivityNet`` ``Evaluation/eval_detection.py``. Labels are
  matched by name; the subset name is compared exactly; every GT instance counts (duplicates,
  zero-length and reversed ones included); predictions whose class has no GT in the subset are ignored;
  classes are averaged in order of first appearance in the GT file.
- ``"reference"``: the CLTDR-GMG / TriDet ``libs/utils/metrics.py`` (REFERENCE.md section 10). Labels are
  ``label_id``s; the file's subset is lower-cased before the comparison; GT duplicates (same ``label_id``,
  both boundaries within 1e-3 s) are dropped; the class index runs over the sorted distinct GT
  ``label_id``s, then zero-length GT is dropped; a predicted ``label_id`` without GT keeps its raw value and
  is scored as the class whose *index* equals it, if any (the reference's ``Series.replace``); classes are
  averaged in ascending ``label_id`` order.

Both share the matching (per class, predictions by descending score, each takes the unmatched GT of its
video with the highest tIoU >= threshold) and the VOC-style interpolated AP; per-class APs equal the two
evaluators' values bit for bit (the tIoU, cumulative sums and the final ``np.sum`` repeat their arithmetic).

Ties. Predictions of one class are ranked by ``scores.argsort()[::-1]`` (numpy's default sort, reversed),
exactly the call both evaluators make on the same array in the same input order, so even the order of tied
scores agrees with them on the same numpy build; it is deterministic but not "stable" (for short arrays tied
predictions come out in reverse input order). The GTs a prediction tries are visited by decreasing tIoU with
ties in reverse GT order (stable sort, reversed), which is what the evaluators' ``argsort()[::-1]`` does for
the short per-video rows they sort; NaN tIoUs (``union == 0``) come first and count as matches, as there.

    gt = load_ground_truth("thumos14.json", subset="validation")
    metrics = evaluate(gt, load_predictions("detections.json"), DATASET_TIOU["thumos"])
    print(format_table(metrics))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cltdr_jax.data.annotations import (
    DATASET_TIOU,
    label_vocabulary,
    parse_label_id,
    parse_segment,
    read_json,
    without_duplicates,
)
from cltdr_jax.errors import DataError

PROTOCOLS = ("official", "reference")


# Rows x GT columns of one tIoU block; bounds memory for classes with many predictions.
_TIOU_BLOCK = 1 << 22


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """GT instances of one subset, already filtered and labelled as the chosen protocol does.

    Attributes:
      video_id: [N] str, video of each instance.
      video_index: [N] int64, position of that video in ``videos``.
      t_start, t_end: [N] float64 seconds, as written in the file (no clipping, no reordering).
      label: [N] int64, class index into ``class_names``.
      class_names: [K] class names in the order of the mean (official: first appearance; reference:
        ascending label_id, named from the file or ``str(label_id)``).
      class_ids: [K] int64 label_id of each class, -1 where the file gives none.
      videos: the subset's videos in file order, with or without instances.
      names_by_id, ids_by_name: every label_id <-> name pair of the file (annotations of all subsets, then
        the taxonomy), used to read predictions that give only one of the two.
    """

    video_id: np.ndarray
    video_index: np.ndarray
    t_start: np.ndarray
    t_end: np.ndarray
    label: np.ndarray
    class_names: tuple[str, ...]
    class_ids: np.ndarray
    videos: tuple[str, ...]
    names_by_id: Mapping[int, str]
    ids_by_name: Mapping[str, int]
    subset: str
    protocol: str
    source: str


@dataclass(frozen=True, eq=False)
class Predictions:
    """Detections of all videos in input order (the order decides score ties, as in the evaluators).

    Attributes:
      video_id: [M] str.
      t_start, t_end, score: [M] float64.
      label_name: [M] object, the class name, or None where the label was given as an integer.
      label_id: [M] int64, the label_id where ``has_label_id`` (an integer ``label`` or a ``label_id`` field).
      has_label_id: [M] bool.
    """

    video_id: np.ndarray
    t_start: np.ndarray
    t_end: np.ndarray
    score: np.ndarray
    label_name: np.ndarray
    label_id: np.ndarray
    has_label_id: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.score)

    @classmethod
    def from_arrays(
        cls,
        video_id: Sequence[str] | np.ndarray,
        t_start: Sequence[float] | np.ndarray,
        t_end: Sequence[float] | np.ndarray,
        label: Sequence[int | str] | np.ndarray,
        score: Sequence[float] | np.ndarray,
        source: str = "<arrays>",
    ) -> Predictions:
        """Predictions from parallel arrays [M]; ``label`` holds label_ids (ints) or class names (strs)."""
        vids = np.asarray(video_id).reshape(-1).astype(str).astype(object)
        arrays = [np.asarray(x, dtype=np.float64).reshape(-1) for x in (t_start, t_end, score)]
        lab = np.asarray(label).reshape(-1)
        m = len(vids)
        if any(len(a) != m for a in arrays) or len(lab) != m:
            lengths = [m, *(len(a) for a in arrays), len(lab)]
            raise DataError(f"{source}: video_id, t_start, t_end, score and label differ in length: {lengths}")
        names = np.full(m, None, dtype=object)
        ids = np.zeros(m, dtype=np.int64)
        has_id = np.zeros(m, dtype=bool)
        if lab.dtype.kind in "iu":
            ids[:], has_id[:] = lab, True
        elif lab.dtype.kind == "U":
            names[:] = lab.astype(object)
        else:
            for i, x in enumerate(lab):
                if isinstance(x, str):
                    names[i] = x
                elif isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)):
                    ids[i], has_id[i] = int(x), True
                else:
                    raise DataError(f"{source}: video {vids[i]!r}: label {x!r} is neither a name nor an integer id")
        preds = cls(vids, arrays[0], arrays[1], arrays[2], names, ids, has_id, source)
        _check_finite(preds)
        return preds


def _check_finite(preds: Predictions) -> None:
    for name in ("t_start", "t_end", "score"):
        bad = ~np.isfinite(getattr(preds, name))
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(
                f"{preds.source}: video {preds.video_id[i]!r}: non-finite {name} {getattr(preds, name)[i]!r}"
            )


# ---------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------


def load_ground_truth(
    path_or_dict: str | Path | Mapping[str, Any], subset: str = "validation", protocol: str = "official"
) -> GroundTruth:
    """Reads ActivityNet-format GT ``{"database": {video: {"subset", "annotations": [...]}}}``.

    Args:
      path_or_dict: JSON file or the parsed object.
      subset: the subset to evaluate. ``official``: compared exactly with each video's ``subset``;
        ``reference``: compared with the lower-cased ``subset`` (the argument itself is not lower-cased).
      protocol: ``"official"`` or ``"reference"`` (module docstring).
    """
    _check_protocol(protocol)
    data, src = read_json(path_or_dict, "ground truth")
    db = data.get("database")
    if not isinstance(db, Mapping):
        raise DataError(
            f"{src}: no 'database' object; expected ActivityNet ground truth "
            "{'database': {video_id: {'subset': ..., 'annotations': [...]}}}"
        )
    names_by_id, ids_by_name = label_vocabulary(data, src)

    videos: list[str] = []
    rows: list[tuple[str, float, float, Any]] = []  # (video, start, end, name or label_id)
    subsets_seen: set[str] = set()
    for vid, entry in db.items():
        if not isinstance(entry, Mapping) or "subset" not in entry:
            raise DataError(f"{src}: video {vid!r} has no 'subset' field")
        file_subset = entry["subset"]
        subsets_seen.add(str(file_subset))
        in_subset = file_subset == subset if protocol == "official" else str(file_subset).lower() == subset
        if not in_subset:
            continue
        anns = entry.get("annotations")
        if not isinstance(anns, list):
            raise DataError(
                f"{src}: video {vid!r} (subset {file_subset!r}) has no 'annotations' list "
                "(use [] for a video without actions)"
            )
        videos.append(vid)
        parsed = []
        for i, ann in enumerate(anns):
            where = f"{src}: video {vid!r}, annotation {i}"
            if not isinstance(ann, Mapping):
                raise DataError(f"{where}: expected an object with 'segment' and 'label', got {ann!r}")
            s, e = parse_segment(ann.get("segment"), where)
            if protocol == "official":
                if not isinstance(ann.get("label"), str):
                    raise DataError(f"{where}: 'label' must be the class name, got {ann.get('label')!r}")
                parsed.append((s, e, ann["label"]))
            else:
                if "label_id" not in ann:
                    raise DataError(
                        f"{where}: no 'label_id'; the reference protocol labels GT by id "
                        "(use --protocol official to match by name)"
                    )
                parsed.append((s, e, parse_label_id(ann["label_id"], where)))
        if protocol == "reference":
            parsed = [parsed[i] for i in without_duplicates(parsed)]
        rows.extend((vid, s, e, lab) for s, e, lab in parsed)

    if not videos:
        raise DataError(
            f"{src}: no video of subset {subset!r} ({'exact' if protocol == 'official' else 'lower-cased'} "
            f"comparison); subsets in the file: {sorted(subsets_seen)}"
        )
    if not rows:
        raise DataError(f"{src}: the {len(videos)} videos of subset {subset!r} hold no annotations; nothing to score")

    raw_labels = [r[3] for r in rows]
    if protocol == "official":
        class_keys = list(dict.fromkeys(raw_labels))  # first appearance
        class_names = tuple(class_keys)
        class_ids = np.array([ids_by_name.get(n, -1) for n in class_names], dtype=np.int64)
    else:
        class_keys = sorted(set(raw_labels))
        class_ids = np.array(class_keys, dtype=np.int64)
        class_names = _unique_names([names_by_id.get(i, str(i)) for i in class_keys], class_keys)
    index = {key: k for k, key in enumerate(class_keys)}

    video_id = np.array([r[0] for r in rows], dtype=object)
    t_start = np.array([r[1] for r in rows], dtype=np.float64)
    t_end = np.array([r[2] for r in rows], dtype=np.float64)
    label = np.array([index[lab] for lab in raw_labels], dtype=np.int64)
    if protocol == "reference":
        # The reference builds its class index first and only then drops zero-length instances.
        keep = t_start != t_end
        video_id, t_start, t_end, label = video_id[keep], t_start[keep], t_end[keep], label[keep]
    video_pos = {v: i for i, v in enumerate(videos)}
    video_index = np.array([video_pos[v] for v in video_id], dtype=np.int64)
    return GroundTruth(
        video_id=video_id,
        video_index=video_index,
        t_start=t_start,
        t_end=t_end,
        label=label,
        class_names=class_names,
        class_ids=class_ids,
        videos=tuple(videos),
        names_by_id=names_by_id,
        ids_by_name=ids_by_name,
        subset=subset,
        protocol=protocol,
        source=src,
    )


def _unique_names(names: list[str], ids: list[int]) -> tuple[str, ...]:
    # Two label_ids sharing a name would collapse into one per_class_AP entry.
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return tuple(n if counts[n] == 1 else f"{n} (label_id {i})" for n, i in zip(names, ids, strict=True))


def load_predictions(path_or_dict: str | Path | Mapping[str, Any]) -> Predictions:
    """Reads ActivityNet results ``{"results": {video: [{"segment", "label", "score", "label_id"?}]}}``.

    ``label`` may be a class name or an integer label_id (the reference's detections JSON writes ids); an
    optional ``label_id`` field is kept beside a name.
    """
    data, src = read_json(path_or_dict, "predictions")
    results = data.get("results")
    if not isinstance(results, Mapping):
        raise DataError(
            f"{src}: no 'results' object; expected ActivityNet results "
            "{'results': {video_id: [{'segment': [s, e], 'label': ..., 'score': x}]}}"
        )
    vids: list[str] = []
    starts: list[float] = []
    ends: list[float] = []
    scores: list[float] = []
    names: list[str | None] = []
    ids: list[int] = []
    has_id: list[bool] = []
    for vid, dets in results.items():
        if not isinstance(dets, list):
            raise DataError(f"{src}: video {vid!r}: expected a list of detections, got {type(dets).__name__}")
        for i, det in enumerate(dets):
            where = f"{src}: video {vid!r}, detection {i}"
            if not isinstance(det, Mapping):
                raise DataError(f"{where}: expected an object with 'segment', 'label' and 'score', got {det!r}")
            s, e = parse_segment(det.get("segment"), where)
            score = det.get("score")
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise DataError(f"{where}: 'score' must be a finite number, got {score!r}")
            lab = det.get("label")
            if isinstance(lab, str):
                name, lid, hid = lab, 0, False
                if det.get("label_id") is not None:
                    lid, hid = parse_label_id(det["label_id"], where), True
            elif isinstance(lab, int) and not isinstance(lab, bool):
                name, lid, hid = None, lab, True
            else:
                raise DataError(f"{where}: 'label' must be a class name or an integer label_id, got {lab!r}")
            vids.append(vid)
            starts.append(s)
            ends.append(e)
            scores.append(float(score))
            names.append(name)
            ids.append(lid)
            has_id.append(hid)
    label_name = np.empty(len(names), dtype=object)
    label_name[:] = names
    return Predictions(
        video_id=np.array(vids, dtype=object),
        t_start=np.array(starts, dtype=np.float64),
        t_end=np.array(ends, dtype=np.float64),
        score=np.array(scores, dtype=np.float64),
        label_name=label_name,
        label_id=np.array(ids, dtype=np.int64),
        has_label_id=np.array(has_id, dtype=bool),
        source=src,
    )


# ---------------------------------------------------------------------------------------------------------
# Matching and AP (one class)
# ---------------------------------------------------------------------------------------------------------


def segment_tiou(pred_start: np.ndarray, pred_end: np.ndarray, gt_start: np.ndarray, gt_end: np.ndarray) -> np.ndarray:
    """tIoU of predictions [P] with GT rows [P, G]; returns [P, G].

    The operations and their order are the evaluators' ``segment_iou`` (prediction first in max/min,
    union = GT length + prediction length - intersection), so values agree to the bit: reversed segments
    give 0 or -0, and ``union == 0`` gives NaN, which the matching counts as a hit.
    """
    ps, pe = pred_start[:, None], pred_end[:, None]
    inter = (np.minimum(pe, gt_end) - np.maximum(ps, gt_start)).clip(0)
    union = (gt_end - gt_start) + (pe - ps) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / union


def _rank_in_group(group: np.ndarray) -> np.ndarray:
    """[n] -> [n]: how many earlier entries share each entry's group value."""
    order = np.argsort(group, kind="stable")
    g = group[order]
    n = len(g)
    first = np.ones(n, dtype=bool)
    first[1:] = g[1:] != g[:-1]
    group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - group_start
    return rank


def match_detections(
    pred_video: np.ndarray,
    pred_start: np.ndarray,
    pred_end: np.ndarray,
    gt_video: np.ndarray,
    gt_start: np.ndarray,
    gt_end: np.ndarray,
    tiou_thresholds: np.ndarray,
) -> np.ndarray:
    """Greedy matching of one class's predictions, given in rank order, at every threshold at once.

    Args:
      pred_video [P], gt_video [G]: video keys (any comparable dtype); a prediction whose video has no GT
        is a false positive.
      pred_start, pred_end [P]; gt_start, gt_end [G]: seconds.
      tiou_thresholds [T].
    Returns:
      tp [T, P] bool; every other entry is a false positive.

    Videos are independent, so the sequential part runs in rounds: round r handles the r-th prediction of
    every video at once, vectorised over videos, GTs and thresholds. Predictions below the lowest threshold
    with every GT can neither match nor lock anything and are left out of the rounds.
    """
    thr = np.asarray(tiou_thresholds, dtype=np.float64)
    n_pred, n_thr = len(pred_video), len(thr)
    tp = np.zeros((n_thr, n_pred), dtype=bool)
    if n_pred == 0 or len(gt_video) == 0:
        return tp

    # GT padded to [V, Gmax] by video, in input order inside a video (the order ties fall back on).
    vids, g_row, g_count = np.unique(gt_video, return_inverse=True, return_counts=True)
    g_row = g_row.reshape(-1)
    n_vid, g_max = len(vids), int(g_count.max())
    order = np.argsort(g_row, kind="stable")
    g_slot = np.empty(len(g_row), dtype=np.int64)
    g_slot[order] = np.arange(len(g_row)) - np.repeat(np.cumsum(g_count) - g_count, g_count)
    pad_start = np.zeros((n_vid, g_max))
    pad_end = np.zeros((n_vid, g_max))
    valid = np.zeros((n_vid, g_max), dtype=bool)
    pad_start[g_row, g_slot] = gt_start
    pad_end[g_row, g_slot] = gt_end
    valid[g_row, g_slot] = True

    pos = np.minimum(np.searchsorted(vids, pred_video), n_vid - 1)
    p_row = np.where(vids[pos] == pred_video, pos, -1)

    # tIoU of every prediction that has GT in its video, in blocks. Kept: the candidates (some GT at or
    # above the lowest threshold, or NaN) and, per candidate, its GTs by decreasing tIoU (NaN first, since
    # ascending sorts NaN last; ties in reverse GT order), cut after the last column any of them can reach.
    with_gt = np.nonzero(p_row >= 0)[0]
    block = max(1, _TIOU_BLOCK // g_max)
    thr_min = thr.min()
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for b in range(0, len(with_gt), block):
        idx = with_gt[b : b + block]
        rows = p_row[idx]
        tiou = segment_tiou(pred_start[idx], pred_end[idx], pad_start[rows], pad_end[rows])
        tiou[~valid[rows]] = -np.inf  # padding: below every threshold and sorted after every real GT
        reach = (~(tiou < thr_min)).sum(axis=1)  # NaN compares False, so it counts as reachable
        keep = reach > 0
        if not keep.any():
            continue
        width = int(reach.max())
        order = np.argsort(tiou[keep], axis=1, kind="stable")[:, ::-1][:, :width]
        kept.append((idx[keep], order, np.take_along_axis(tiou[keep], order, axis=1)))
    if not kept:
        return tp
    width = max(k[1].shape[1] for k in kept)
    c_idx = np.concatenate([k[0] for k in kept])
    g_order = np.concatenate([np.pad(k[1], ((0, 0), (0, width - k[1].shape[1]))) for k in kept])
    g_tiou = np.concatenate([np.pad(k[2], ((0, 0), (0, width - k[2].shape[1])), constant_values=-np.inf) for k in kept])
    c_row = p_row[c_idx]
    # The official loop stops at the first GT below the threshold; in this order the GTs it may take
    # (tIoU >= threshold or NaN) form a prefix, so "first free GT inside the prefix" is the same rule.
    ok = ~(g_tiou[:, None, :] < thr[None, :, None])  # [C, T, width]

    locked = np.zeros((n_vid, g_max, n_thr), dtype=bool)
    rank = _rank_in_group(c_row)
    by_rank = np.argsort(rank, kind="stable")
    bounds = np.cumsum(np.bincount(rank))
    lo = 0
    for hi in bounds:
        m = by_rank[lo:hi]  # at most one candidate per video
        lo = hi
        rows, go = c_row[m], g_order[m]
        free = ok[m] & ~locked[rows[:, None], go].transpose(0, 2, 1)  # [n, T, G]
        j = np.argmax(free, axis=2)  # [n, T]
        n_i, t_i = np.nonzero(free.any(axis=2))
        locked[rows[n_i], go[n_i, j[n_i, t_i]], t_i] = True
        tp[t_i, c_idx[m[n_i]]] = True
    return tp


def interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """VOC-2011 interpolated AP of one precision/recall curve [N] (the evaluators' ``interpolated_prec_rec``).

    Pads (recall 0, precision 0) and (recall 1, precision 0), makes precision non-increasing from the right
    and sums (r_i - r_(i-1)) * p_i where recall changes, with one ``np.sum`` over exactly those terms so that
    the pairwise summation order, hence the last bit, is the evaluators'.
    """
    mprec = np.concatenate([[0.0], np.asarray(precision, dtype=np.float64), [0.0]])
    mrec = np.concatenate([[0.0], np.asarray(recall, dtype=np.float64), [1.0]])
    mprec = np.maximum.accumulate(mprec[::-1])[::-1]
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx]))


def ap_from_matches(tp: np.ndarray, num_positives: int) -> np.ndarray:
    """AP [T] from ranked true-positive flags tp [T, P] and the number of GT instances."""
    n_thr = tp.shape[0]
    if tp.shape[1] == 0 or num_positives == 0:
        # num_positives == 0 only under the reference protocol (every GT of the class zero-length), where
        # the reference itself fails (KeyError); 0 keeps the mean defined.
        return np.zeros(n_thr)
    tp_cum = np.cumsum(tp, axis=1).astype(np.float64)
    fp_cum = np.cumsum(~tp, axis=1).astype(np.float64)
    recall = tp_cum / float(num_positives)
    precision = tp_cum / (tp_cum + fp_cum)
    return np.array([interpolated_ap(precision[t], recall[t]) for t in range(n_thr)])


def average_precision(
    pred_video: np.ndarray,
    pred_start: np.ndarray,
    pred_end: np.ndarray,
    pred_score: np.ndarray,
    gt_video: np.ndarray,
    gt_start: np.ndarray,
    gt_end: np.ndarray,
    tiou_thresholds: Sequence[float] | np.ndarray,
) -> np.ndarray:
    """AP [T] of one class: predictions [P] in input order, GT [G], thresholds [T]."""
    thr = np.asarray(tiou_thresholds, dtype=np.float64)
    pred_score = np.asarray(pred_score, dtype=np.float64)
    if len(pred_score) == 0:
        return np.zeros(len(thr))
    # The evaluators' ranking call, so tied scores come out in the same order (module docstring).
    rank = pred_score.argsort()[::-1]
    tp = match_detections(
        np.asarray(pred_video)[rank],
        np.asarray(pred_start, dtype=np.float64)[rank],
        np.asarray(pred_end, dtype=np.float64)[rank],
        np.asarray(gt_video),
        np.asarray(gt_start, dtype=np.float64),
        np.asarray(gt_end, dtype=np.float64),
        thr,
    )
    return ap_from_matches(tp, len(gt_video))


# ---------------------------------------------------------------------------------------------------------
# All classes
# ---------------------------------------------------------------------------------------------------------


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def _thresholds(tiou_thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    thr = np.asarray(tiou_thresholds, dtype=np.float64).reshape(-1)
    if thr.size == 0 or not np.all(np.isfinite(thr)):
        raise ValueError(f"tIoU thresholds must be a non-empty list of finite numbers, got {tiou_thresholds!r}")
    return thr


def _factorize(values: np.ndarray) -> tuple[list, np.ndarray]:
    """[n] hashable objects -> (distinct values in first-seen order, codes [n]); a dict pass, no sorting."""
    seen: dict = {}
    codes = np.fromiter((seen.setdefault(v, len(seen)) for v in values), dtype=np.int64, count=len(values))
    return list(seen), codes


def prediction_classes(gt: GroundTruth, preds: Predictions) -> np.ndarray:
    """Class index [M] of each prediction under ``gt.protocol``; -1 means it enters no AP."""
    n_classes = len(gt.class_names)
    cls = np.full(len(preds), -1, dtype=np.int64)
    named = ~preds.has_label_id if gt.protocol == "reference" else np.not_equal(preds.label_name, None)
    if gt.protocol == "official":
        # Labels without GT in the subset are skipped (patch P5 of the official evaluator).
        by_name = {n: k for k, n in enumerate(gt.class_names)}
        if named.any():
            names, codes = _factorize(preds.label_name[named])
            cls[named] = np.array([by_name.get(n, -1) for n in names], dtype=np.int64)[codes]
        if (~named).any():
            if not gt.names_by_id:
                raise DataError(
                    f"{preds.source}: detections label classes by integer id but {gt.source} gives no "
                    "label_id/taxonomy to translate ids into names"
                )
            ids, codes = np.unique(preds.label_id[~named], return_inverse=True)
            by_id = [by_name.get(gt.names_by_id.get(int(i)), -1) for i in ids]
            cls[~named] = np.array(by_id, dtype=np.int64)[codes.reshape(-1)]
        return cls

    raw = preds.label_id.copy()
    known = preds.has_label_id.copy()
    if named.any():
        names, codes = _factorize(preds.label_name[named])
        name_ids = np.array([gt.ids_by_name.get(n, -1) for n in names], dtype=np.int64)[codes]
        name_known = np.array([n in gt.ids_by_name for n in names], dtype=bool)[codes]
        raw[named], known[named] = name_ids, name_known
    if known.any():
        remap = {int(c): k for k, c in enumerate(gt.class_ids)}
        ids, codes = np.unique(raw[known], return_inverse=True)
        # Series.replace semantics: an id without GT keeps its raw value, which may equal a class index.
        cls[known] = np.array([remap.get(int(i), int(i)) for i in ids], dtype=np.int64)[codes.reshape(-1)]
    cls[(cls < 0) | (cls >= n_classes)] = -1
    return cls


def _per_class_ap(gt: GroundTruth, preds: Predictions, thr: np.ndarray) -> np.ndarray:
    """AP [T, K], classes in ``gt.class_names`` order."""
    n_classes = len(gt.class_names)
    cls = prediction_classes(gt, preds)
    video_pos = {v: i for i, v in enumerate(gt.videos)}
    names, codes = _factorize(preds.video_id)
    p_video = np.array([video_pos.get(v, -1) for v in names] + [-1], dtype=np.int64)[codes]

    # Stable grouping keeps input order inside a class, which the score ranking's ties depend on.
    p_order = np.argsort(cls, kind="stable")
    p_bounds = np.searchsorted(cls[p_order], np.arange(n_classes + 1))
    g_order = np.argsort(gt.label, kind="stable")
    g_bounds = np.searchsorted(gt.label[g_order], np.arange(n_classes + 1))

    ap = np.zeros((len(thr), n_classes))
    for k in range(n_classes):
        pk = p_order[p_bounds[k] : p_bounds[k + 1]]
        gk = g_order[g_bounds[k] : g_bounds[k + 1]]
        ap[:, k] = average_precision(
            p_video[pk],
            preds.t_start[pk],
            preds.t_end[pk],
            preds.score[pk],
            gt.video_index[gk],
            gt.t_start[gk],
            gt.t_end[gk],
            thr,
        )
    return ap


def evaluate(gt: GroundTruth, preds: Predictions, tiou_thresholds: Sequence[float] | np.ndarray) -> dict:
    """mAP of ``preds`` against ``gt`` under ``gt.protocol``.

    Returns ``{"tiou_thresholds": [T], "mAP": [T], "average_mAP": float, "per_class_AP": {name: [T]}}``,
    fractions; ``per_class_AP`` is in the order of the mean.
    """
    thr = _thresholds(tiou_thresholds)
    ap = _per_class_ap(gt, preds, thr)
    # Same [T, K] array and reductions as the evaluators (ap.mean(axis=1), then the mean of that).
    m_ap = ap.mean(axis=1)
    return {
        "tiou_thresholds": [float(t) for t in thr],
        "mAP": [float(x) for x in m_ap],
        "average_mAP": float(m_ap.mean()),
        "per_class_AP": {name: [float(x) for x in ap[:, k]] for k, name in enumerate(gt.class_names)},
    }


def evaluate_arrays(
    video_id: Sequence[str] | np.ndarray,
    t_start: Sequence[float] | np.ndarray,
    t_end: Sequence[float] | np.ndarray,
    label: Sequence[int | str] | np.ndarray,
    score: Sequence[float] | np.ndarray,
    gt: GroundTruth,
    tiou_thresholds: Sequence[float] | np.ndarray,
) -> dict:
    """``evaluate`` on detections given as parallel arrays [M] (labels: label_ids or class names)."""
    return evaluate(gt, Predictions.from_arrays(video_id, t_start, t_end, label, score), tiou_thresholds)


# ---------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------


def format_table(metrics: Mapping[str, Any], per_class: bool = False) -> str:
    """The paper's table: mAP (%) at each tIoU threshold and their average; optionally one row per class."""
    thr = metrics["tiou_thresholds"]
    rows = [("mAP (%)", list(metrics["mAP"]), metrics["average_mAP"])]
    if per_class:
        rows += [(name, list(ap), float(np.mean(ap))) for name, ap in metrics["per_class_AP"].items()]
    width = max(8, *(len(r[0]) for r in rows))
    header = f"{'tIoU':<{width}} " + " ".join(f"{t:>6.2f}" for t in thr) + f" | {'Avg.':>6}"
    lines = [header, "-" * len(header)]
    for name, values, avg in rows:
        lines.append(f"{name:<{width}} " + " ".join(f"{100 * v:6.2f}" for v in values) + f" | {100 * avg:6.2f}")
    return "\n".join(lines)


def parse_tiou(text: str) -> np.ndarray:
    """``"0.3,0.4,0.5"`` -> thresholds; a dataset name (``thumos``, ``anet``, ...) gives its default set."""
    key = text.strip().lower()
    if key in DATASET_TIOU:
        return DATASET_TIOU[key].copy()
    try:
        thr = np.array([float(x) for x in text.split(",") if x.strip()], dtype=np.float64)
    except ValueError:
        raise DataError(
            f"--tiou {text!r}: expected comma-separated numbers such as 0.3,0.5,0.7 "
            f"or a dataset name ({', '.join(DATASET_TIOU)})"
        ) from None
    if thr.size == 0 or not np.all(np.isfinite(thr)):
        raise DataError(f"--tiou {text!r}: no usable threshold")
    return thr
