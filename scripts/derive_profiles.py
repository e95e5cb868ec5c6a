"""Derives the synthetic-data profiles `cltdr_jax/profiles/<name>.json` from the real annotation files.

    python scripts/derive_profiles.py --data ../shared/data --out cltdr_jax/profiles

A profile holds compact figures only (quantiles, counts, log-normal parameters, class names), never the
annotations themselves. `cltdr synth` (cltdr_jax/synth.py) samples datasets from them. Inputs:

- thumos14:    thumos14/thumos14.json (ActionFormer format)
- multithumos: multithumos/multithumos.json (ActionFormer format)
- activitynet: activitynet_1.3/{anet_anno_action.json, video_info_new.csv, action_name.csv} (BSN layout)
- epic:        epic_kitchens_100/{EPIC_100_validation.csv, EPIC_100_video_info.csv, EPIC_100_verb_classes.csv}
  (verb classes; only the validation CSV is available, so both splits are derived from it, except the
  training durations, which come from the video-info CSV's non-validation videos)
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cltdr_jax.synth import profile_config

# Quantile levels of the stored distributions: every 5 %, finer in the tails (heavy-tailed durations/counts).
QUANTILES = np.round(np.r_[0.0, 0.01, 0.025, np.linspace(0.05, 0.95, 19), 0.975, 0.99, 1.0], 4)
EPIC_TRAIN_VIDEOS = 495  # published EPIC-KITCHENS-100 training split size (the training CSV is absent here)


@dataclass
class Video:
    duration: float
    fps: float
    actions: list[tuple[float, float, int]] = field(default_factory=list)  # (start_s, end_s, label_id)


@dataclass
class Dataset:
    classes: list[str]
    splits: dict[str, list[Video]]  # lower-case split name -> videos
    subset_names: dict[str, str]  # lower-case split name -> the JSON's spelling


# ---------------------------------------------------------------------------------------------------
# Readers


def read_actionformer(path: Path) -> Dataset:
    db = json.loads(path.read_text())["database"]
    names: dict[int, str] = {}
    splits: dict[str, list[Video]] = collections.defaultdict(list)
    subset_names = {}
    for rec in db.values():
        video = Video(float(rec["duration"]), float(rec["fps"]))
        for a in rec["annotations"]:
            names[int(a["label_id"])] = a["label"]
            video.actions.append((float(a["segment"][0]), float(a["segment"][1]), int(a["label_id"])))
        splits[rec["subset"].lower()].append(video)
        subset_names[rec["subset"].lower()] = rec["subset"]
    classes = [names[i] for i in range(max(names) + 1)]
    return Dataset(classes, dict(splits), subset_names)


def read_anet_bsn(folder: Path) -> Dataset:
    classes = [row["action"] for row in csv.DictReader(open(folder / "action_name.csv"))]
    index = {name: i for i, name in enumerate(classes)}
    anno = json.loads((folder / "anet_anno_action.json").read_text())
    splits: dict[str, list[Video]] = collections.defaultdict(list)
    for row in csv.DictReader(open(folder / "video_info_new.csv")):
        if row["subset"] not in ("training", "validation"):
            continue
        rec = anno[row["video"]]
        video = Video(float(rec["duration_second"]), float(row["fps"]))
        for a in rec["annotations"]:
            video.actions.append((float(a["segment"][0]), float(a["segment"][1]), index[a["label"]]))
        splits[row["subset"]].append(video)
    return Dataset(classes, dict(splits), {"training": "training", "validation": "validation"})


def _seconds(stamp: str) -> float:
    h, m, s = stamp.split(":")
    return 3600 * int(h) + 60 * int(m) + float(s)


def read_epic(folder: Path) -> Dataset:
    classes = [row["key"] for row in csv.DictReader(open(folder / "EPIC_100_verb_classes.csv"))]
    info = {row["video_id"]: row for row in csv.DictReader(open(folder / "EPIC_100_video_info.csv"))}
    videos: dict[str, Video] = {}
    for row in csv.DictReader(open(folder / "EPIC_100_validation.csv")):
        vid = row["video_id"]
        if vid not in videos:
            videos[vid] = Video(float(info[vid]["duration"]), float(info[vid]["fps"]))
        start, stop = _seconds(row["start_timestamp"]), _seconds(row["stop_timestamp"])
        videos[vid].actions.append((start, stop, int(row["verb_class"])))
    validation = list(videos.values())
    # Training: durations and fps of the videos outside validation, annotations like validation's.
    others = [Video(float(r["duration"]), float(r["fps"])) for v, r in info.items() if v not in videos]
    splits = {"training": others, "validation": validation}
    return Dataset(classes, splits, {"training": "training", "validation": "validation"})


# ---------------------------------------------------------------------------------------------------
# Figures


def _r(x, digits: int = 4):
    """Rounds floats (and lists of them) to `digits` significant digits to keep the JSON small."""
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_r(v, digits) for v in x]
    return float(f"{float(x):.{digits}g}")


def _normal_scores(x: np.ndarray) -> np.ndarray:
    ranks = np.argsort(np.argsort(x, kind="stable"), kind="stable")
    dist = statistics.NormalDist()
    return np.array([dist.inv_cdf((r + 0.5) / len(x)) for r in ranks])


def _copula_corr(x, y) -> float:
    """Correlation of normal scores (Gaussian copula parameter) of two paired samples."""
    if len(x) < 3:
        return 0.0
    return float(np.corrcoef(_normal_scores(np.asarray(x)), _normal_scores(np.asarray(y)))[0, 1])


def _valid(video: Video) -> list[tuple[float, float, int]]:
    """Actions with positive length, ends clipped to the video (the real files have a few broken ones)."""
    out = []
    for s, e, c in video.actions:
        s, e = max(s, 0.0), min(e, video.duration)
        if e - s > 1e-3:
            out.append((s, e, c))
    return out


def length_unit(ds: Dataset) -> str:
    """'fraction' (of the video) when it varies less within a class than the length in seconds."""
    by_unit = {"seconds": collections.defaultdict(list), "fraction": collections.defaultdict(list)}
    for videos in ds.splits.values():
        for v in videos:
            for s, e, c in _valid(v):
                by_unit["seconds"][c].append(np.log(e - s))
                by_unit["fraction"][c].append(np.log((e - s) / v.duration))
    spread = {u: np.mean([np.var(x) for x in d.values() if len(x) > 2]) for u, d in by_unit.items()}
    return "fraction" if spread["fraction"] < spread["seconds"] else "seconds"


def _log_normals(logs: dict[int, list[float]], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean and std of log values; classes with fewer than 3 values get the pooled figures."""
    pooled = np.concatenate([np.array(x) for x in logs.values()])
    mu, sigma = np.full(num_classes, pooled.mean()), np.full(num_classes, pooled.std())
    for c, x in logs.items():
        if len(x) >= 3:
            mu[c], sigma[c] = np.mean(x), max(np.std(x), 0.05)
    return mu, sigma


def split_figures(videos: list[Video], num_classes: int, unit: str, like: list[Video] | None) -> dict:
    """Figures of one split. `like`: take the annotation figures from these videos instead (EPIC train)."""
    ann = like if like is not None else videos
    durations = [v.duration for v in videos]
    fps = collections.Counter(round(v.fps, 3) for v in videos)
    valid = [_valid(v) for v in ann]
    n_actions = [len(a) for a in valid]
    n_classes = [len({c for _, _, c in a}) for a in valid]
    instances, in_videos = np.zeros(num_classes, int), np.zeros(num_classes, int)
    logs, counts = collections.defaultdict(list), collections.defaultdict(list)
    for v, acts in zip(ann, valid, strict=True):
        for s, e, c in acts:
            instances[c] += 1
            logs[c].append(np.log(e - s if unit == "seconds" else (e - s) / v.duration))
        for c, n in collections.Counter(c for _, _, c in acts).items():
            in_videos[c] += 1
            counts[c].append(np.log(n))
    mu, sigma = _log_normals(logs, num_classes)
    count_mu, count_sigma = _log_normals(counts, num_classes)
    return {
        "num_videos": len(videos),
        "num_instances": int(instances.sum()),
        "duration_quantiles": _r(np.quantile(durations, QUANTILES)),
        "fps": {"values": sorted(fps), "counts": [fps[f] for f in sorted(fps)]},
        "actions_quantiles": _r(np.quantile(n_actions, QUANTILES)),
        "classes_quantiles": _r(np.quantile(n_classes, QUANTILES)),
        "copula": {
            "duration_actions": _r(_copula_corr([v.duration for v in ann], n_actions), 3),
            "actions_classes": _r(_copula_corr(n_actions, n_classes), 3),
        },
        "class_instances": instances.tolist(),
        "class_videos": in_videos.tolist(),
        "length_log_mu": _r(mu),
        "length_log_sigma": _r(sigma),
        "count_log_mu": _r(count_mu),  # instances of the class in a video that has it
        "count_log_sigma": _r(count_sigma),
    }


def also_labelled_as(ds: Dataset, min_prob: float = 0.5, min_count: int = 5) -> list[dict]:
    """Pairs (a, b): an instance of a is also annotated as b with the same segment, with probability p."""
    same, count = collections.Counter(), collections.Counter()
    for videos in ds.splits.values():
        for v in videos:
            for s, e, c in v.actions:
                count[c] += 1
                twins = {b for s2, e2, b in v.actions if abs(s2 - s) < 1e-3 and abs(e2 - e) < 1e-3}
                for b in twins - {c}:
                    same[c, b] += 1
    pairs = {k: n / count[k[0]] for k, n in same.items() if n >= min_count and n / count[k[0]] >= min_prob}
    # Keep one direction per pair: the one that holds more often (a subset is labelled as its superset).
    keep = [k for k in pairs if (pairs[k], k[1]) > (pairs.get(k[::-1], 0.0), k[0])]
    return [{"class": ds.classes[a], "also": ds.classes[b], "p": _r(pairs[a, b], 3)} for a, b in sorted(keep)]


def overlap_pairs(ds: Dataset, skip: set, top: int = 60, min_prob: float = 0.25, min_support: int = 20):
    """Pairs (a, b): in videos that contain class a, the fraction p of b's instances that overlap an a."""
    hit, support = collections.Counter(), collections.Counter()
    for videos in ds.splits.values():
        for v in videos:
            acts = np.array(_valid(v)).reshape(-1, 3)
            if len(acts) < 2:
                continue
            s, e, c = acts[:, 0], acts[:, 1], acts[:, 2].astype(int)
            inter = (np.minimum(e[:, None], e[None]) - np.maximum(s[:, None], s[None])) > 0
            present = set(c.tolist())
            for a in present:
                over_a = inter[c == a].any(axis=0)  # [N]: instance overlaps some instance of a
                for b in present - {a}:
                    mask = c == b
                    support[a, b] += int(mask.sum())
                    hit[a, b] += int((over_a & mask).sum())
    pairs = [
        (hit[k] / n, k)
        for k, n in support.items()
        if n >= min_support and hit[k] / n >= min_prob and k not in skip and k[::-1] not in skip
    ]
    pairs.sort(key=lambda x: (-x[0], x[1]))
    return [{"a": ds.classes[a], "b": ds.classes[b], "p": _r(p, 3)} for p, (a, b) in pairs[:top]]


def confusable_pairs(ds: Dataset, min_jaccard: float = 0.1) -> list[list[str]]:
    """Greedy matching of classes that share videos most (Jaccard of their video sets), each class once."""
    sets = collections.defaultdict(set)
    i = 0
    for videos in ds.splits.values():
        for v in videos:
            for c in {c for _, _, c in v.actions}:
                sets[c].add(i)
            i += 1
    scores = []
    for a in sets:
        for b in sets:
            if a < b:
                j = len(sets[a] & sets[b]) / len(sets[a] | sets[b])
                if j >= min_jaccard:
                    scores.append((j, a, b))
    used, out = set(), []
    for _, a, b in sorted(scores, reverse=True):
        if a not in used and b not in used:
            used |= {a, b}
            out.append([ds.classes[a], ds.classes[b]])
    return out


# ---------------------------------------------------------------------------------------------------
# The reference config each profile's datasets are shaped like (REFERENCE.md section 2.3). A profile names
# it instead of copying it: `cltdr synth` loads it from the bundled configs (cltdr_jax.synth.profile_config)
# and applies these overrides (a synthetic dataset has no output folder or particular GPU; the dataset's
# paths and sizes are filled in by synth itself).

BASE_CONFIGS = {
    "thumos14": {"base": "thumos_i3d_focalloss", "overrides": ["output_folder=null"]},
    "multithumos": {"base": "multithumos_i3d", "overrides": ["output_folder=null", "devices=[cuda:0]"]},
    "activitynet": {"base": "anet_tsp", "overrides": ["output_folder=null", "test_cfg.ext_score_file=null"]},
    "epic": {"base": "epic_slowfast_verb_vflloss", "overrides": ["output_folder=null", "devices=[cuda:0]"]},
}

SOURCES = {
    "thumos14": "thumos14/thumos14.json",
    "multithumos": "multithumos/multithumos.json",
    "activitynet": "activitynet_1.3/ (BSN: anet_anno_action.json, video_info_new.csv, action_name.csv)",
    "epic": "epic_kitchens_100/ (EPIC_100_validation.csv, EPIC_100_video_info.csv, "
    "EPIC_100_verb_classes.csv); training: durations of the non-validation videos, annotation figures "
    f"of validation, {EPIC_TRAIN_VIDEOS} videos (published split size)",
}


def build_profile(name: str, ds: Dataset) -> dict:
    conv = profile_config({"config": BASE_CONFIGS[name]})
    unit = length_unit(ds)
    dup = also_labelled_as(ds)
    index = {c: i for i, c in enumerate(ds.classes)}
    skip = {(index[d["class"]], index[d["also"]]) for d in dup}
    splits = {}
    for split in conv["train_split"] + conv["val_split"]:
        like = ds.splits["validation"] if name == "epic" and split == "training" else None
        figures = split_figures(ds.splits[split], len(ds.classes), unit, like)
        if name == "epic" and split == "training":
            figures["num_videos"] = EPIC_TRAIN_VIDEOS
            figures["num_instances"] = None  # unknown: the training CSV is not available here
        splits[split] = {"subset": ds.subset_names[split], **figures}
    return {
        "name": name,
        "quantile_levels": QUANTILES.tolist(),
        "source": SOURCES[name],
        "classes": ds.classes,
        "length_unit": unit,
        "splits": splits,
        "also_labelled_as": dup,
        "overlaps": overlap_pairs(ds, skip),
        "confusable": confusable_pairs(ds),
        "config": BASE_CONFIGS[name],
    }


def _dump(value, indent: str = "") -> str:
    """JSON with one key per line and every list of numbers or strings on one line (small, diffable)."""
    if isinstance(value, dict) and value:
        inner = indent + "  "
        items = [f"{inner}{json.dumps(k)}: {_dump(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        inner = indent + "  "
        return "[\n" + ",\n".join(inner + _dump(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value, separators=(",", ":"))


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=here.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=here / "cltdr_jax" / "profiles")
    args = p.parse_args()
    readers = {
        "thumos14": lambda: read_actionformer(args.data / SOURCES["thumos14"]),
        "multithumos": lambda: read_actionformer(args.data / SOURCES["multithumos"]),
        "activitynet": lambda: read_anet_bsn(args.data / "activitynet_1.3"),
        "epic": lambda: read_epic(args.data / "epic_kitchens_100"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, read in readers.items():
        profile = build_profile(name, read())
        path = args.out / f"{name}.json"
        path.write_text(_dump(profile) + "\n")
        summary = ", ".join(f"{s} {f['num_videos']} videos" for s, f in profile["splits"].items())
        print(
            f"{path}: {path.stat().st_size / 1024:.1f} KB; {len(profile['classes'])} classes; {summary}; "
            f"lengths in {profile['length_unit']}; {len(profile['also_labelled_as'])} also-labelled, "
            f"{len(profile['overlaps'])} overlap, {len(profile['confusable'])} confusable pairs"
        )


if __name__ == "__main__":
    main()
