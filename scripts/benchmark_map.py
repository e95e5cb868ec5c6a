"""Time the vectorised mAP against a straightforward per-prediction loop; prints one JSON object.

    python scripts/benchmark_map.py                     # 200 videos x 2,000 detections, 20 classes, 10 tIoUs
    python scripts/benchmark_map.py --loop-videos 200   # run the loop on everything (slow)

The loop is the official evaluator's algorithm without pandas (one numpy tIoU row per prediction, then the
threshold and GT loops in Python). By default it runs on the first `--loop-videos` videos only and its time
is extrapolated linearly to all videos (its cost is linear in the number of predictions, each compared with
the GT of its own video); the JSON says so. On that subsample both implementations must give identical APs.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from cltdr_jax import evaluation as ev


def synthetic(n_videos: int, n_dets: int, n_classes: int, gt_per_video: int, seed: int):
    """GT and detector-like predictions: half jittered copies of GT, half random segments."""
    rng = np.random.default_rng(seed)
    db, rows = {}, []
    for v in range(n_videos):
        vid = f"video_{v:04d}"
        dur = float(rng.uniform(60, 600))
        n_gt = int(rng.integers(1, 2 * gt_per_video))
        starts = rng.uniform(0, dur - 10, n_gt)
        lengths = rng.uniform(1, 30, n_gt)
        labels = rng.integers(0, n_classes, n_gt)
        anns = [
            {"segment": [float(s), float(min(s + ln, dur))], "label": f"class{c:02d}", "label_id": int(c)}
            for s, ln, c in zip(starts, lengths, labels, strict=True)
        ]
        db[vid] = {"subset": "validation", "duration": dur, "annotations": anns}
        near = n_dets // 2
        g = rng.integers(0, n_gt, near)
        ctr = (starts[g] + lengths[g] / 2) + rng.normal(0, 2, near)
        ln = lengths[g] * rng.uniform(0.5, 1.5, near)
        lab = np.where(rng.random(near) < 0.7, labels[g], rng.integers(0, n_classes, near))
        far = n_dets - near
        s_far = rng.uniform(0, dur, far)
        seg_s = np.concatenate([ctr - ln / 2, s_far])
        seg_e = np.concatenate([ctr + ln / 2, s_far + rng.uniform(1, 30, far)])
        lab = np.concatenate([lab, rng.integers(0, n_classes, far)])
        score = rng.random(n_dets)
        rows.append((np.full(n_dets, vid, dtype=object), seg_s, seg_e, lab, score))
    arrays = [np.concatenate([r[i] for r in rows]) for i in range(5)]
    return {"database": db}, arrays


def loop_per_class_ap(gt: ev.GroundTruth, preds: ev.Predictions, thr: np.ndarray) -> np.ndarray:
    """The official algorithm, one prediction at a time; AP [T, K]."""
    cls = ev.prediction_classes(gt, preds)
    ap = np.zeros((len(thr), len(gt.class_names)))
    for k in range(len(gt.class_names)):
        g_by_video: dict[str, list[int]] = {}
        for j in np.nonzero(gt.label == k)[0]:
            g_by_video.setdefault(gt.video_id[j], []).append(j)
        n_pos = int(np.sum(gt.label == k))
        p = np.nonzero(cls == k)[0]
        if len(p) == 0:
            continue
        p = p[preds.score[p].argsort()[::-1]]
        tp = np.zeros((len(thr), len(p)))
        locked = {}
        for r, i in enumerate(p):
            js = g_by_video.get(preds.video_id[i])
            if not js:
                continue
            js = np.array(js)
            gs, ge = gt.t_start[js], gt.t_end[js]
            inter = (np.minimum(preds.t_end[i], ge) - np.maximum(preds.t_start[i], gs)).clip(0)
            with np.errstate(divide="ignore", invalid="ignore"):
                tiou = inter / ((ge - gs) + (preds.t_end[i] - preds.t_start[i]) - inter)
            order = np.argsort(tiou, kind="stable")[::-1]
            for t, th in enumerate(thr):
                for o in order:
                    if tiou[o] < th:
                        break
                    if locked.get((t, js[o])):
                        continue
                    locked[(t, js[o])] = True
                    tp[t, r] = 1
                    break
        ap[:, k] = ev.ap_from_matches(tp.astype(bool), n_pos)
    return ap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--detections", type=int, default=2000, help="per video")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--gt-per-video", type=int, default=15, help="mean GT instances per video")
    parser.add_argument("--loop-videos", type=int, default=20, help="videos the loop runs on (then extrapolated)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    thr = ev.DATASET_TIOU["anet"]

    gt_json, (vid, s, e, lab, score) = synthetic(
        args.videos, args.detections, args.classes, args.gt_per_video, args.seed
    )
    gt = ev.load_ground_truth(gt_json, protocol="reference")
    t0 = time.perf_counter()
    preds = ev.Predictions.from_arrays(vid, s, e, lab, score)
    t_arrays = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = ev.evaluate(gt, preds, thr)
    t_vec = time.perf_counter() - t0

    # Subsample: the first loop-videos videos, GT and predictions alike.
    n_sub = min(args.loop_videos, args.videos)
    keep_videos = {f"video_{v:04d}" for v in range(n_sub)}
    sub_gt = ev.load_ground_truth(
        {"database": {k: v for k, v in gt_json["database"].items() if k in keep_videos}}, protocol="reference"
    )
    sel = np.array([v in keep_videos for v in vid])
    sub_preds = ev.Predictions.from_arrays(vid[sel], s[sel], e[sel], lab[sel], score[sel])
    t0 = time.perf_counter()
    ap_loop = loop_per_class_ap(sub_gt, sub_preds, thr)
    t_loop_sub = time.perf_counter() - t0
    t0 = time.perf_counter()
    sub_metrics = ev.evaluate(sub_gt, sub_preds, thr)
    t_vec_sub = time.perf_counter() - t0
    ap_vec = np.array([sub_metrics["per_class_AP"][n] for n in sub_gt.class_names]).T
    t_loop_all = t_loop_sub * args.videos / n_sub

    print(
        json.dumps(
            {
                "videos": args.videos,
                "detections": int(len(score)),
                "classes": args.classes,
                "gt_instances": int(len(gt.t_start)),
                "tiou_thresholds": len(thr),
                "from_arrays_s": round(t_arrays, 3),
                "vectorised_s": round(t_vec, 3),
                "vectorised_subsample_s": round(t_vec_sub, 3),
                "loop_subsample_videos": n_sub,
                "loop_subsample_detections": int(sel.sum()),
                "loop_subsample_s": round(t_loop_sub, 3),
                "loop_all_videos_s": round(t_loop_all, 3),
                "loop_all_videos_is": "measured" if n_sub == args.videos else f"extrapolated x{args.videos / n_sub:g}",
                "speedup_subsample": round(t_loop_sub / t_vec_sub, 1),
                "speedup_all_videos": round(t_loop_all / t_vec, 1),
                "subsample_per_class_AP_identical": bool(np.array_equal(ap_loop, ap_vec)),
                "average_mAP": metrics["average_mAP"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
