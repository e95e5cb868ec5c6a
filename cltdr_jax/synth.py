"""Synthetic temporal-action-localization datasets with the structure of the real benchmarks.

    cltdr synth --like thumos14 --out data/synth_thumos --feature-dim 2048 --videos 40 --seed 0

writes `annotations.json` (ActionFormer format), `features/<id>.npy` (`.npz` with key `feats` for epic,
float32 [T, D], time first) and `config.yaml` (the matching bundled reference config with absolute paths), which
the real loaders read unchanged.

Annotations are sampled from a profile, `cltdr_jax/profiles/<like>.json`: compact figures derived from the
real annotation files by `scripts/derive_profiles.py`. Per split: video durations and actions per video
(inverse CDF of 21 quantiles, tied by a Gaussian copula, since longer videos hold more actions), the
classes per video, the fps values, class frequencies and per-class log-normal action lengths (in seconds,
or as a fraction of the video for ActivityNet). Per dataset: labels that always come in pairs on the same
segment (THUMOS CliffDiving is also Diving) and classes that overlap each other (MultiTHUMOS). With
`annotations=FILE`, the videos and segments of a real ActionFormer-format file are used instead.

Feature model, one video at a time on the feature grid (T = floor((duration * fps - num_frames) /
feat_stride) + 1, as for real extracted features):
- every class c has a unit "body" signature b_c, a "start" s_c and an "end" e_c vector (sharing a common
  onset / offset direction), and 4 directions of intra-class variation; classes that share videos in the
  real data (CricketBowling / CricketShot), topped up with random pairs to a third of the classes, get
  correlated bodies (cosine 0.5): confusable classes;
- an action instance adds, at sub-step resolution, amp * (body(t) * (b_c + V_c z) + start(t) s_c + end(t) e_c)
  with amp ~ logNormal(0, 0.25), z ~ N(0, 0.35^2 I): the body ramps in and out around the boundaries, the
  start/end components are Gaussian bumps at the onset and offset, so boundaries are learnable;
- background distractors: short, weaker body bumps of random classes that are not annotated
  (rate proportional to `difficulty`);
- the per-step signal is averaged over the num_frames / feat_stride steps a feature window covers
  (the temporal blur of a clip feature);
- a slowly drifting background: a per-video offset plus an AR(1) process (time constant 10 s) in a fixed
  16-dimensional subspace;
- i.i.d. Gaussian noise of standard deviation `difficulty` per element.
All of it is deterministic for a seed: the class vectors depend on (seed, D), each video on (seed, video id).
Features are streamed to disk one video at a time.
"""

from __future__ import annotations

import copy
import io
import json
import math
import statistics
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from cltdr_jax.config import apply_overrides, bundled_config_dir, config_from_dict
from cltdr_jax.errors import DataError

PROFILES = ("thumos14", "multithumos", "activitynet", "epic")
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"  # package data

# Feature model constants (units: feature-space norm; the noise has std `difficulty` per element).
BODY_AMP = 2.0  # norm of a class signature
EDGE_AMP = 1.5  # norm of the start / end components
VAR_DIMS = 4  # directions of intra-class variation per class
VAR_STD = 0.35  # std of an instance's coefficient on each of them (relative to BODY_AMP)
CONFUSABLE_COS = 0.5
BG_DIMS = 16
BG_AMP = 1.0  # std of each AR(1) background coordinate
BG_TIME = 10.0  # seconds, time constant of the background drift
DISTRACTOR_RATE = 1 / 60  # bumps per feature step at difficulty 1
DISTRACTOR_AMP = 0.5
SUBSTEPS = 4  # sub-step resolution of the per-frame signal


def load_profile(like: str) -> dict:
    """The profile of a benchmark: one of PROFILES."""
    if like not in PROFILES:
        raise DataError(f"unknown profile {like!r}; choose one of {', '.join(PROFILES)}")
    return json.loads((PROFILE_DIR / f"{like}.json").read_text())


def profile_config(profile: dict) -> dict:
    """The config a profile's datasets are shaped like, as a YAML dict: the bundled reference config the
    profile names (`config.base`) with the profile's few overrides (`config.overrides`, `key=value`)."""
    spec = profile["config"]
    data = yaml.safe_load((bundled_config_dir() / f"{spec['base']}.yaml").read_text())
    return apply_overrides(data, spec.get("overrides", []))


def num_features(duration: float, fps: float, feat_stride: int, num_frames: int) -> int:
    """Length T of a video's features, like real clip features: windows of num_frames every feat_stride."""
    return max(1, math.floor((duration * fps - num_frames) / feat_stride) + 1)


# ---------------------------------------------------------------------------------------------------
# Annotations sampled from a profile


def inverse_cdf(levels: list[float], quantiles: list[float], u: float) -> float:
    """Samples a positive quantity from its quantiles: log-linear interpolation (heavy upper tails)."""
    return float(np.exp(np.interp(u, levels, np.log(np.maximum(quantiles, 1e-6)))))


def split_sizes(counts: dict[str, int], num_videos: int | None) -> dict[str, int]:
    """Subsamples split sizes to `num_videos` in total, keeping the proportions (largest remainders)."""
    if num_videos is None:
        return dict(counts)
    total = sum(counts.values())
    exact = {s: num_videos * n / total for s, n in counts.items()}
    sizes = {s: int(x) for s, x in exact.items()}
    for s in sorted(exact, key=lambda s: sizes[s] - exact[s])[: num_videos - sum(sizes.values())]:
        sizes[s] += 1
    if num_videos >= len(counts):  # every split gets at least one video
        for s in sizes:
            if sizes[s] == 0:
                sizes[max(sizes, key=sizes.get)] -= 1
                sizes[s] = 1
    return sizes


def _video_id(like: str, split: str, i: int) -> str:
    if like in ("thumos14", "multithumos"):
        return f"video_{split}_{i + 1:07d}"  # the real naming
    return f"synth_{split}_{i + 1:05d}"


class _Sampler:
    """Draws the annotations of one video from a profile's split figures."""

    def __init__(self, profile: dict, split: str):
        self.p = profile
        self.f = profile["splits"][split]
        names = profile["classes"]
        self.index = {n: i for i, n in enumerate(names)}
        self.also = {}  # class -> [(other class, p)]
        for d in profile["also_labelled_as"]:
            self.also.setdefault(self.index[d["class"]], []).append((self.index[d["also"]], d["p"]))
        self.overlaps = {}  # class b -> [(class a it tends to overlap, p)]
        for d in profile["overlaps"]:
            self.overlaps.setdefault(self.index[d["b"]], []).append((self.index[d["a"]], d["p"]))
        videos = np.array(self.f["class_videos"], float)
        self.present = np.flatnonzero(videos > 0)
        self.log_videos = np.log(videos[self.present])
        self.count_mu = np.array(self.f["count_log_mu"])[self.present]
        self.count_sigma = np.array(self.f["count_log_sigma"])[self.present]
        self.mu = np.array(self.f["length_log_mu"])
        self.sigma = np.array(self.f["length_log_sigma"])
        self.fps = np.array(self.f["fps"]["values"])
        self.fps_p = np.array(self.f["fps"]["counts"], float) / sum(self.f["fps"]["counts"])

    def video(self, rng: np.random.Generator) -> dict:
        cop = self.f["copula"]
        z = rng.standard_normal(3)
        z_dur = z[0]
        z_n = cop["duration_actions"] * z_dur + math.sqrt(1 - cop["duration_actions"] ** 2) * z[1]
        z_k = cop["actions_classes"] * z_n + math.sqrt(1 - cop["actions_classes"] ** 2) * z[2]
        cdf = statistics.NormalDist().cdf
        levels = self.p["quantile_levels"]
        duration = round(inverse_cdf(levels, self.f["duration_quantiles"], cdf(z_dur)), 2)
        fps = float(rng.choice(self.fps, p=self.fps_p))
        n = max(1, round(inverse_cdf(levels, self.f["actions_quantiles"], cdf(z_n))))
        k = round(inverse_cdf(levels, self.f["classes_quantiles"], cdf(z_k)))
        k = int(np.clip(k, 1, min(n, len(self.present))))
        # Classes given the number of actions per class: P(c | n/k) ~ P(c) P(n/k | c), so that classes
        # with many instances per video land in the busy videos, as in the real data.
        x = (math.log(n / k) - self.count_mu) / self.count_sigma
        logp = self.log_videos - np.log(self.count_sigma) - 0.5 * x**2
        p = np.exp(logp - logp.max())
        pick = rng.choice(len(self.present), size=k, replace=False, p=p / p.sum())
        chosen = self.present[pick]
        weights = np.exp(self.count_mu[pick])
        weights /= weights.sum()

        # Classes of the primary actions (each chosen class at least once); duplicates count towards n.
        primary, total = [], 0
        while total < n:
            c = int(chosen[len(primary)]) if len(primary) < k else int(rng.choice(chosen, p=weights))
            dups = [b for b, p in self.also.get(c, []) if rng.random() < p]
            primary.append((c, dups))
            total += 1 + len(dups)
        cls = np.array([c for c, _ in primary])
        logs = self.mu[cls] + self.sigma[cls] * rng.standard_normal(len(cls))
        lengths = np.exp(logs) * (duration if self.p["length_unit"] == "fraction" else 1.0)
        lengths = np.clip(lengths, min(0.1, duration / 2), duration)

        # Place the longest first, so shorter actions can land inside the ones they tend to overlap.
        placed: list[tuple[float, float, int]] = []
        for i in np.argsort(-lengths, kind="stable"):
            c, dups = primary[i]
            start = self._place(c, float(lengths[i]), duration, placed, rng)
            for label in [c, *dups]:
                placed.append((start, start + float(lengths[i]), label))
        annotations = []
        for s, e, c in sorted(placed, key=lambda a: (a[0], a[2])):
            s = round(s, 2)
            e = min(max(round(e, 2), s + 0.01), duration)
            annotations.append({"segment": [s, e], "label": self.p["classes"][c], "label_id": c})
        return {"duration": duration, "fps": fps, "annotations": annotations}

    def _place(self, c: int, length: float, duration: float, placed: list, rng) -> float:
        room = max(duration - length, 0.0)
        for a, p in self.overlaps.get(c, []):
            hosts = [(s, e) for s, e, label in placed if label == a]
            if hosts and rng.random() < p:
                s, e = hosts[rng.integers(len(hosts))]
                lo, hi = max(0.0, s - 0.9 * length), min(room, e - 0.1 * length)
                if lo < hi:
                    return float(rng.uniform(lo, hi))
        same = [(s, e) for s, e, label in placed if label == c]
        for _ in range(20):  # avoid overlapping an instance of the same class, as in the real data
            start = float(rng.uniform(0.0, room))
            if all(start + length <= s or start >= e for s, e in same):
                break
        return start


def sample_annotations(
    like: str | dict, num_videos: int | None = None, seed: int = 0, max_duration: float | None = None
) -> dict[str, dict]:
    """Samples a database {video_id: {subset, duration, fps, annotations}} from a profile.

    max_duration: videos longer than this are redrawn (rejection sampling keeps the other statistics
    conditional on the length), so that small demos fit in one padded length.
    """
    profile = load_profile(like) if isinstance(like, str) else like
    sizes = split_sizes({s: f["num_videos"] for s, f in profile["splits"].items()}, num_videos)
    database = {}
    for j, (split, count) in enumerate(sizes.items()):
        sampler = _Sampler(profile, split)
        rng = np.random.default_rng([seed, 1, j])
        subset = profile["splits"][split]["subset"]
        for i in range(count):
            video = sampler.video(rng)
            while max_duration is not None and video["duration"] > max_duration:
                video = sampler.video(rng)
            database[_video_id(profile["name"], split, i)] = {"subset": subset, **video}
    return database


def real_annotations(path: str | Path, num_videos: int | None = None, seed: int = 0) -> dict[str, dict]:
    """The videos of a real ActionFormer-format file, subsampled per split (same proportions) if asked."""
    path = Path(path)
    try:
        database = json.loads(path.read_text())["database"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: not an ActionFormer-format annotation file ({e})") from None
    by_split: dict[str, list[str]] = {}
    for vid, rec in database.items():
        if "subset" not in rec or "duration" not in rec or "annotations" not in rec:
            raise DataError(f"{path}: video {vid} lacks subset, duration or annotations")
        by_split.setdefault(rec["subset"].lower(), []).append(vid)
    sizes = split_sizes({s: len(v) for s, v in by_split.items()}, num_videos)
    rng = np.random.default_rng([seed, 2])
    keep = set()
    for split, vids in by_split.items():
        keep.update(vids[i] for i in rng.choice(len(vids), size=sizes[split], replace=False))
    return {vid: copy.deepcopy(rec) for vid, rec in database.items() if vid in keep}


def _compact_labels(database: dict, dataset_name: str, num_classes: int) -> int:
    """The config's num_classes; renumbers label_id in place where the loader needs every class present.

    The thumos / multithumos loaders require exactly num_classes distinct labels; a small subsample may
    miss some classes, so the present ones are renumbered 0..k-1 in their original order.
    """
    if dataset_name == "anet":
        return 1
    ids = sorted({a["label_id"] for rec in database.values() for a in rec["annotations"]})
    if dataset_name not in ("thumos", "multithumos"):
        return max(num_classes, ids[-1] + 1 if ids else 0)
    if ids == list(range(num_classes)):
        return num_classes
    new = {old: i for i, old in enumerate(ids)}
    for rec in database.values():
        for a in rec["annotations"]:
            a["label_id"] = new[a["label_id"]]
    return len(ids)


# ---------------------------------------------------------------------------------------------------
# Features


@dataclass(frozen=True)
class FeatureModel:
    """The class vectors of one synthetic dataset (see the module docstring).

    basis: [C * (3 + VAR_DIMS), D] float32, rows: bodies [C], starts [C], ends [C], variations [C * VAR_DIMS]
    background: [BG_DIMS, D] float32 unit rows.
    """

    num_classes: int
    basis: np.ndarray
    background: np.ndarray
    confusable: tuple[tuple[int, int], ...]

    @property
    def bodies(self) -> np.ndarray:
        """[C, D] the class signatures (norm BODY_AMP)."""
        return self.basis[: self.num_classes]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def feature_model(num_classes: int, dim: int, seed: int, confusable: list[tuple[int, int]] = ()) -> FeatureModel:
    """Class vectors of `num_classes` classes in `dim` dims; `confusable` pairs get correlated bodies."""
    rng = np.random.default_rng([seed, 3, dim])
    C = num_classes
    g = _unit(rng.standard_normal((C * (3 + VAR_DIMS) + 2 + BG_DIMS, dim)))
    body, start, end = g[:C], g[C : 2 * C], g[2 * C : 3 * C]
    var = g[3 * C : C * (3 + VAR_DIMS)]
    onset, offset = g[-BG_DIMS - 2], g[-BG_DIMS - 1]
    pairs = [(a, b) for a, b in confusable if a < C and b < C]
    used = {c for pair in pairs for c in pair}
    free = [int(c) for c in rng.permutation(C) if c not in used]
    while len(used) < C // 3 and len(free) >= 2:  # top up with random pairs to a third of the classes
        a, b = free.pop(), free.pop()
        pairs.append((a, b))
        used |= {a, b}
    for a, b in pairs:
        body[b] = _unit(CONFUSABLE_COS * body[a] + math.sqrt(1 - CONFUSABLE_COS**2) * body[b])
    start = _unit(0.6 * onset + 0.8 * start)
    end = _unit(0.6 * offset + 0.8 * end)
    basis = np.concatenate([BODY_AMP * body, EDGE_AMP * start, EDGE_AMP * end, BODY_AMP * var])
    background = g[-BG_DIMS:]
    return FeatureModel(C, basis.astype(np.float32), background.astype(np.float32), tuple(pairs))


def _add_instance(A: np.ndarray, C: int, c: int, a: float, b: float, amp: float, z, edges: bool) -> None:
    """Adds one action of class c spanning steps [a, b] (float) to the coefficients A [n_steps, K]."""
    length = b - a
    ramp = min(max(0.2 * length, 0.25), 2.0)
    width = min(max(0.15 * length, 0.25), 1.0)
    margin = ramp + 3 * width
    j0, j1 = max(0, math.floor(a - margin)), min(len(A), math.ceil(b + margin) + 1)
    if j0 >= j1:
        return
    p = (np.arange(j0, j1)[:, None] + (np.arange(SUBSTEPS) + 0.5) / SUBSTEPS).ravel()
    body = np.clip((p - a) / ramp + 0.5, 0, 1) * np.clip((b - p) / ramp + 0.5, 0, 1)
    body = amp * body.reshape(-1, SUBSTEPS).mean(1)
    A[j0:j1, c] += body
    A[j0:j1, 3 * C + c * VAR_DIMS : 3 * C + (c + 1) * VAR_DIMS] += body[:, None] * z
    if edges:
        for col, at in ((C + c, a), (2 * C + c, b)):
            bump = np.exp(-0.5 * ((p - at) / width) ** 2).reshape(-1, SUBSTEPS).mean(1)
            A[j0:j1, col] += amp * bump


def video_features(
    model: FeatureModel,
    segments: np.ndarray,
    labels: np.ndarray,
    duration: float,
    fps: float,
    feat_stride: int,
    num_frames: int,
    rng: np.random.Generator,
    difficulty: float = 1.0,
    distractor_p: np.ndarray | None = None,
) -> np.ndarray:
    """Features [T, D] float32 of one video with actions `segments` [N, 2] (seconds) of class `labels` [N].

    distractor_p: [C] class probabilities of the unannotated distractor bumps (uniform if None).
    """
    C, D = model.num_classes, model.basis.shape[1]
    T = num_features(duration, fps, feat_stride, num_frames)
    w = max(1, round(num_frames / feat_stride))
    # A step covers feat_stride frames; feature i averages steps i .. i + w - 1.
    A = np.zeros((T + w - 1, model.basis.shape[0]), np.float32)
    scale = fps / feat_stride  # steps per second
    for (s, e), c in zip(np.asarray(segments, float).reshape(-1, 2), labels, strict=True):
        amp = math.exp(0.25 * rng.standard_normal())
        z = VAR_STD * rng.standard_normal(VAR_DIMS)
        _add_instance(A, C, int(c), s * scale, e * scale, amp, z, edges=True)
    for _ in range(rng.poisson(difficulty * DISTRACTOR_RATE * len(A))):
        c = rng.choice(C, p=distractor_p)
        centre, half = rng.uniform(0, len(A)), rng.uniform(0.25, 1.5)
        z = VAR_STD * rng.standard_normal(VAR_DIMS)
        _add_instance(A, C, int(c), centre - half, centre + half, DISTRACTOR_AMP, z, edges=False)
    cum = np.concatenate([np.zeros((1, A.shape[1]), np.float32), np.cumsum(A, axis=0)])
    blurred = (cum[w : w + T] - cum[:T]) / w
    cols = np.flatnonzero(np.abs(blurred).max(axis=0) > 0)

    rho = math.exp(-1.0 / (BG_TIME * scale))
    drive = rng.standard_normal((T, BG_DIMS)) * math.sqrt(1 - rho**2)
    drift = np.empty((T, BG_DIMS))
    drift[0] = rng.standard_normal(BG_DIMS)
    for t in range(1, T):
        drift[t] = rho * drift[t - 1] + drive[t]
    offset = rng.standard_normal(BG_DIMS) * 2.0 / math.sqrt(BG_DIMS)
    coefs = np.concatenate([blurred[:, cols], BG_AMP * drift + offset], axis=1).astype(np.float32)
    vectors = np.concatenate([model.basis[cols], model.background])

    x = rng.standard_normal((T, D), dtype=np.float32)
    x *= np.float32(difficulty)
    x += coefs @ vectors
    return x


def _save_npz(path: Path, feats: np.ndarray) -> None:
    """np.savez with a fixed timestamp, so the same seed gives the same bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, feats, allow_pickle=False)
    info = zipfile.ZipInfo("feats.npy", date_time=(1980, 1, 1, 0, 0, 0))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        z.writestr(info, buf.getvalue())


# ---------------------------------------------------------------------------------------------------
# The dataset on disk


def synthesize(
    like: str,
    out_dir: str | Path,
    feature_dim: int | None = None,
    num_videos: int | None = None,
    seed: int = 0,
    annotations: str | Path | None = None,
    difficulty: float = 1.0,
    features: bool = True,
    progress: Callable[[int, int, str, int], None] | None = None,
    max_duration: float | None = None,
) -> Path:
    """Writes a synthetic dataset like the benchmark `like` into `out_dir`; returns the config path.

    annotations: a real ActionFormer-format file whose videos and segments are used instead of sampling.
    features: False writes only annotations.json and config.yaml.
    progress: called after each video as progress(done, total, video_id, T).
    """
    profile = load_profile(like)
    conv = profile_config(profile)
    data = config_from_dict(conv, source=f"the {like} profile's config").dataset
    dim = int(feature_dim or data.input_dim)
    if dim < 1 or difficulty < 0:
        raise DataError(f"feature dim must be >= 1 and difficulty >= 0, got {dim} and {difficulty}")
    out = Path(out_dir).resolve()
    feat_dir = out / "features"
    feat_dir.mkdir(parents=True, exist_ok=True)

    if annotations is not None:
        database = real_annotations(annotations, num_videos, seed)
    else:
        database = sample_annotations(profile, num_videos, seed, max_duration)
    classes = profile["classes"]
    # Signatures are indexed by the original label_id (before any renumbering below).
    labels = {vid: [a["label_id"] for a in rec["annotations"]] for vid, rec in database.items()}
    num_classes = max([len(classes), *(max(v) + 1 for v in labels.values() if v)])
    database_out = copy.deepcopy(database)
    config_classes = _compact_labels(database_out, conv["dataset_name"], data.num_classes)
    version = f"synthetic-{like}-seed{seed}" + (f"-from-{Path(annotations).name}" if annotations else "")
    (out / "annotations.json").write_text(json.dumps({"version": version, "database": database_out}))

    cfg = copy.deepcopy({k: v for k, v in conv.items()})
    cfg["dataset"].update(
        json_file=str(out / "annotations.json"),
        feat_folder=str(feat_dir),
        input_dim=dim,
        num_classes=config_classes,
    )
    if conv["dataset_name"] == "anet":
        # ActivityNet detections are class-agnostic; labels come from video-level class scores (score fusion).
        scores_path = out / "external_cls_scores.json"
        scores_path.write_text(json.dumps({"results": external_class_scores(database_out, seed)}))
        cfg.setdefault("test_cfg", {})["ext_score_file"] = str(scores_path)
    header = (
        f"# Synthetic dataset like {like}: cltdr synth --like {like} --seed {seed} --feature-dim {dim}"
        f" --difficulty {difficulty}" + (f" --annotations {annotations}" if annotations else "") + "\n"
        f"# The bundled reference config {profile['config']['base']} with this dataset's paths and sizes.\n"
    )
    config_path = out / "config.yaml"
    config_path.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    if not features:
        return config_path

    index = {n: i for i, n in enumerate(classes)}
    confusable = [(index[a], index[b]) for a, b in profile["confusable"]]
    model = feature_model(num_classes, dim, seed, confusable)
    freq = np.zeros(num_classes)
    for f in profile["splits"].values():
        freq[: len(classes)] += f["class_instances"]
    freq += 0.5 * freq.mean() + 1e-9  # distractors of every class, the frequent ones more often
    prefix, ext = data.file_prefix or "", data.file_ext
    for done, (vid, rec) in enumerate(database.items(), 1):
        fps = data.default_fps or rec.get("fps") or 30.0
        segments = np.array([a["segment"] for a in rec["annotations"]], float).reshape(-1, 2)
        rng = np.random.default_rng([seed, 4, zlib.crc32(vid.encode())])
        x = video_features(
            model, segments, np.array(labels[vid], int), float(rec["duration"]), float(fps),
            data.feat_stride, data.num_frames, rng, difficulty, freq / freq.sum(),
        )  # fmt: skip
        path = feat_dir / f"{prefix}{vid}{ext}"
        if ext == ".npz":
            _save_npz(path, x)
        else:
            np.save(path, x)
        if progress is not None:
            progress(done, len(database), vid, len(x))
    return config_path


def external_class_scores(database: dict, seed: int, accuracy: float = 0.85) -> dict[str, list[float]]:
    """Video-level class scores for ActivityNet-style score fusion, like a video classifier's output.

    Scores are a softmax over random logits in which, with probability `accuracy`, the video's most frequent
    class gets a clear margin; otherwise a random wrong class does (the true class still gets a smaller boost,
    so it often ranks second, as with a real classifier's top-2).
    """
    num_classes = 1 + max((a["label_id"] for r in database.values() for a in r["annotations"]), default=0)
    out = {}
    for vid in sorted(database):
        rng = np.random.default_rng([seed, 5, zlib.crc32(vid.encode())])
        logits = rng.normal(0.0, 1.0, num_classes)
        ids = [a["label_id"] for a in database[vid]["annotations"]]
        if ids:
            true = max(set(ids), key=ids.count)
            if rng.random() < accuracy:
                logits[true] += 6.0
            else:
                logits[rng.integers(num_classes)] += 6.0
                logits[true] += 4.0
        p = np.exp(logits - logits.max())
        out[vid] = [round(float(v), 6) for v in p / p.sum()]
    return out
