"""Data preparation, run once before a job: fetch CIFAR-10 (or generate an offline stand-in)
and write one split file per site.

    flctl prepare-data [--data-root DIR] [--sites 2] [--alpha 0.5] [--seed 0] [--offline [--difficulty D]]

Writes DIR/cifar-10-batches-py/ (once) and DIR/splits/site-<i>.json (each time, replacing the
previous split). Splits are IID by default; with --alpha, each class is spread over the sites
with Dirichlet(alpha) proportions (smaller alpha, more skew). Same seed, same split. Nothing
is written outside DIR.

The offline set's --difficulty D in [0, 1] (default 0, an easy set that every setting learns)
makes the images harder: objects whose cues overlap between classes, clutter and jitter. Its
documented hard value, 0.5, gives the job's CNN about 0.74 test accuracy after 4 central epochs
(benchmarks/calibrate_difficulty.py). DIR/offline_info.json records the difficulty; a later
--difficulty that differs regenerates the set.
"""

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np

from flctl.errors import CliError, default_data_root, positive_int

NUM_CLASSES = 10  # CIFAR-10; the example's cifar10_example.data (slow to import) is loaded when needed


def _site_data():
    from cifar10_example import data

    return data


OFFLINE_MARKER = "OFFLINE_SYNTHETIC_DATA"
NOISE = 0.5  # pixel noise of the offline set: high enough that a few epochs do not saturate it
OFFLINE_INFO = "offline_info.json"  # how the offline set was made: difficulty, seed, sizes
HARD_DIFFICULTY = 0.5  # the documented hard setting (benchmarks/calibrate_difficulty.py measured it)


def check_difficulty(value) -> float:
    """The offline set's difficulty as a float in [0, 1]; ValueError otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"difficulty must be a number in [0, 1], got {value!r}") from None
    if isinstance(value, bool) or not 0 <= number <= 1:  # NaN fails the comparison too
        raise ValueError(f"difficulty must be a number in [0, 1], got {value!r}")
    return number


def difficulty_arg(text: str) -> float:
    try:
        return check_difficulty(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None


def offline_difficulty(data_root):
    """The difficulty of the offline set in data_root (0.0 for one made before the knob existed);
    None when there is no offline set there."""
    root = Path(data_root)
    if not (root / OFFLINE_MARKER).exists():
        return None
    try:
        return check_difficulty(json.loads((root / OFFLINE_INFO).read_text())["difficulty"])
    except FileNotFoundError:
        return 0.0
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: not known to be any difficulty, so a prepare with one regenerates


def iid_split(num_samples: int, num_sites: int, rng: np.random.Generator) -> list:
    return [np.sort(part) for part in np.array_split(rng.permutation(num_samples), num_sites)]


def dirichlet_split(labels: np.ndarray, num_sites: int, alpha: float, rng, min_size: int = 10) -> list:
    """Spread each class over the sites with Dirichlet(alpha) proportions.

    Redraws until every site has at least min_size samples, so no site ends up empty.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    min_size = min(min_size, len(labels) // num_sites)
    for _ in range(1000):
        parts = [[] for _ in range(num_sites)]
        for c in range(NUM_CLASSES):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_sites, alpha))) * len(idx)).astype(int)[:-1]
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"could not give every one of {num_sites} sites {min_size} samples with alpha={alpha}")


def label_skew(labels: np.ndarray, parts: list) -> float:
    """Mean total-variation distance between each site's label mix and the overall mix (0 = IID)."""
    overall = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)
    tv = [0.5 * np.abs(np.bincount(labels[p], minlength=NUM_CLASSES) / len(p) - overall).sum() for p in parts]
    return float(np.mean(tv))


def write_splits(data_root, labels, num_sites, alpha, seed, val_fraction) -> dict:
    """Write splits/site-<i>.json for i = 1..num_sites (replacing any earlier split)."""
    if num_sites < 1:
        raise ValueError(f"sites must be >= 1, got {num_sites}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    if alpha is None:
        parts = iid_split(len(labels), num_sites, rng)
    else:
        parts = dirichlet_split(labels, num_sites, alpha, rng)
    out = Path(data_root) / _site_data().SPLITS_DIR
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("site-*.json"):
        old.unlink()
    counts = {}
    for i, part in enumerate(parts, start=1):
        shuffled = rng.permutation(part)
        n_val = int(round(len(part) * val_fraction)) if len(part) > 1 else 0
        site = f"site-{i}"
        entry = {"site": site, "train": sorted(shuffled[n_val:].tolist()), "val": sorted(shuffled[:n_val].tolist())}
        (out / f"{site}.json").write_text(json.dumps(entry))
        counts[site] = {"train": len(entry["train"]), "val": len(entry["val"])}
    info = {
        "sites": num_sites,
        "split": "iid" if alpha is None else "dirichlet",
        "alpha": alpha,
        "seed": seed,
        "val_fraction": val_fraction,
        "label_skew": round(label_skew(labels, parts), 4),
        "counts": counts,
    }
    (out / "split_info.json").write_text(json.dumps(info, indent=2))
    return info


def _hard_sampler(rng, prototypes, d: float):
    """sample(n) -> (uint8 data n x 3072, labels) for difficulty d in (0, 1].

    An image is a background (a class's coarse colour pattern, as at difficulty 0) with an
    object on it: a textured ellipse. Each cue is shared by some classes, so only their
    combination names the class: classes 2k and 2k+1 have the same object colour, c and c+5
    the same orientation, even and odd classes a rounder or a longer shape, the two halves a
    coarse or a fine texture. As d grows, each cue varies more within a class until the classes'
    ranges overlap: the background is more often another class's and fainter, the object moves
    and scales more, its orientation, shape, colour and texture jitter, smaller objects of other
    classes (distractors) appear more often, the colour balance drifts and blotches appear,
    while pixel noise falls (a hard image is cluttered, not just noisy).
    """
    classes = np.arange(NUM_CLASSES)
    palette = rng.uniform(0.1, 0.9, size=(NUM_CLASSES // 2, 3))
    colour = palette[classes // 2]
    angle = (classes % 5) * np.pi / 5
    aspect = np.where(classes % 2 == 0, 1.6, 2.4)
    tex_angle = ((classes * 3) % NUM_CLASSES) * np.pi / NUM_CLASSES
    tex_freq = np.where(classes < 5, 0.12, 0.2)  # cycles per pixel
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float64)
    shift = int(round(6 * d))

    def jitter(n, spread):
        return rng.uniform(1 - spread * d, 1 + spread * d, n)

    def texture(cls, n):
        theta = tex_angle[cls] + rng.normal(0, 0.4 * d, n)
        freq = tex_freq[cls] * jitter(n, 0.35)
        phase = rng.uniform(0, 2 * np.pi, n)
        along = xx * np.cos(theta)[:, None, None] + yy * np.sin(theta)[:, None, None]
        return np.sin(2 * np.pi * freq[:, None, None] * along + phase[:, None, None])

    def paint(images, cls, cx, cy, size):
        """Draw a soft textured ellipse of each sample's class cls centred at (cx, cy)."""
        n = len(cls)
        tilt = angle[cls] + rng.normal(0, 0.45 * d, n)
        cos, sin = np.cos(tilt)[:, None, None], np.sin(tilt)[:, None, None]
        u, v = xx - cx[:, None, None], yy - cy[:, None, None]
        a = size[:, None, None]
        b = a / (aspect[cls] * jitter(n, 0.3))[:, None, None]
        r = np.sqrt(((u * cos + v * sin) / a) ** 2 + ((v * cos - u * sin) / b) ** 2)
        mask = np.clip((1.0 - r) * 3.0 + 0.5, 0.0, 1.0)[:, None]
        tint = colour[cls] + rng.normal(0, 0.2 * d, (n, 3))
        obj = tint[:, :, None, None] * (1 + 0.4 * texture(cls, n)[:, None])
        return images * (1 - mask) + obj * mask

    def sample(n):
        labels = rng.integers(0, NUM_CLASSES, size=n)
        context = np.where(rng.random(n) < 0.8 * d, rng.integers(0, NUM_CLASSES, size=n), labels)
        images = 0.5 + (prototypes[context] - 0.5) * (1 - 0.5 * d)
        dx, dy = rng.integers(-shift, shift + 1, size=(2, n))
        for sx, sy in sorted(set(zip(dx.tolist(), dy.tolist(), strict=True))):
            pick = (dx == sx) & (dy == sy)
            images[pick] = np.roll(images[pick], (sy, sx), axis=(2, 3))
        reach = 3 + 7 * d
        cx, cy = 15.5 + rng.uniform(-reach, reach, size=(2, n))
        images = paint(images, labels, cx, cy, 7.5 * jitter(n, 0.3))
        for _ in range(2):  # up to two distractors, smaller objects of any class
            pick = np.flatnonzero(rng.random(n) < 0.45 * d)
            others = rng.integers(0, NUM_CLASSES, size=len(pick))
            ox, oy = rng.uniform(2, 30, size=(2, len(pick)))
            images[pick] = paint(images[pick], others, ox, oy, rng.uniform(3.0, 5.5, len(pick)))
        gain = rng.uniform(1 - 0.3 * d, 1 + 0.3 * d, size=(n, 3, 1, 1))
        contrast = rng.uniform(0.6, 1.2, size=(n, 1, 1, 1))
        brightness = rng.uniform(-0.15, 0.15, size=(n, 1, 1, 1))
        blotches = rng.normal(0, 0.15 * d, size=(n, 3, 8, 8)).repeat(4, axis=2).repeat(4, axis=3)
        noise = rng.normal(0, NOISE * (1 - 0.5 * d), size=images.shape)
        images = (images * gain - 0.5) * contrast + 0.5 + brightness + blotches + noise
        data = (np.clip(images, 0, 1) * 255).astype(np.uint8).reshape(n, -1)
        return data, labels

    return sample


def generate_offline(
    data_root, train_size: int = 6000, test_size: int = 1000, seed: int = 1234, difficulty: float = 0.0
) -> None:
    """Write a small learnable dataset in CIFAR-10's layout, for machines without internet.

    Each class is a fixed coarse colour pattern; samples add a random shift, contrast,
    brightness and pixel noise, so a small CNN learns it well but not trivially. That is
    difficulty 0 (the default). A difficulty in (0, 1] draws objects on those patterns instead,
    and the higher it is, the less any one cue gives the class away (see _hard_sampler).
    Same seed and difficulty, same bytes. The difficulty, seed and sizes go to OFFLINE_INFO.
    """
    difficulty = check_difficulty(difficulty)
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0.35, 0.65, size=(NUM_CLASSES, 3, 4, 4))
    prototypes = prototypes.repeat(8, axis=2).repeat(8, axis=3)  # 4x4 blocks -> 32x32

    def easy_sample(n):
        labels = rng.integers(0, NUM_CLASSES, size=n)
        images = prototypes[labels]
        shifts = rng.integers(-3, 4, size=n)
        for s in np.unique(shifts):  # horizontal shift per sample, grouped to stay vectorized
            images[shifts == s] = np.roll(images[shifts == s], s, axis=3)
        contrast = rng.uniform(0.6, 1.2, size=(n, 1, 1, 1))
        brightness = rng.uniform(-0.15, 0.15, size=(n, 1, 1, 1))
        images = (images - 0.5) * contrast + 0.5 + brightness + rng.normal(0, NOISE, size=images.shape)
        data = (np.clip(images, 0, 1) * 255).astype(np.uint8).reshape(n, -1)
        return data, labels

    sample = easy_sample if difficulty == 0 else _hard_sampler(rng, prototypes, difficulty)
    site = _site_data()
    folder = site.batches_dir(data_root)
    folder.mkdir(parents=True, exist_ok=True)
    per_batch = np.array_split(np.arange(train_size), len(site.TRAIN_BATCHES))
    for name, idx in zip(site.TRAIN_BATCHES, per_batch, strict=True):
        data, labels = sample(len(idx))
        _write_batch(folder / name, data, labels, name)
    data, labels = sample(test_size)
    _write_batch(folder / site.TEST_BATCH, data, labels, site.TEST_BATCH)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class_{c}" for c in range(NUM_CLASSES)]}, f)
    (Path(data_root) / OFFLINE_MARKER).write_text("generated by custom/data_prep.py; not CIFAR-10\n")
    info = {"difficulty": difficulty, "seed": seed, "train_size": train_size, "test_size": test_size}
    (Path(data_root) / OFFLINE_INFO).write_text(json.dumps(info, indent=2) + "\n")


def _write_batch(path: Path, data, labels, batch_label: str) -> None:
    with open(path, "wb") as f:
        pickle.dump({"batch_label": batch_label, "data": data, "labels": [int(v) for v in labels]}, f)


def download_cifar10(data_root) -> None:
    """Fetch CIFAR-10 once with torchvision (it checks MD5 sums and skips a complete download);
    CliError, one line, when it cannot (no internet, a proxy refusing, a broken download)."""
    import torchvision

    site = _site_data()
    try:
        torchvision.datasets.CIFAR10(root=str(data_root), train=True, download=True)
        torchvision.datasets.CIFAR10(root=str(data_root), train=False, download=True)
    except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError; a bad checksum a RuntimeError
        why = getattr(e, "reason", None) or e
        raise CliError(
            f"CIFAR-10 could not be downloaded ({type(e).__name__}: {str(why)[:200]}); without internet, use "
            f"--offline (a generated stand-in), or --data-root DIR with CIFAR-10's python batches in "
            f"DIR/{site.BATCHES_DIR} ({', '.join(site.TRAIN_BATCHES[:1])}..5, {site.TEST_BATCH})"
        ) from None


def readable_batches(data_root) -> bool:
    """Whether data_root holds CIFAR-10's python batches (all five and the test batch) that read
    correctly as CIFAR-10 images: the user's own copy is then used as it is, without download or
    checksum (torchvision would download over files that are not byte-identical to its own)."""
    site = _site_data()
    folder = site.batches_dir(data_root)
    if not all((folder / name).is_file() for name in (*site.TRAIN_BATCHES, site.TEST_BATCH)):
        return False
    try:
        site.read_train_set(data_root)
        site.read_test_set(data_root)
    except (site.SiteDataError, ValueError, OSError):
        return False
    return True


def split_matches(data_root, sites: int, alpha=None, seed: int | None = 0) -> bool:
    """Whether the split on disk is for these sites (and this alpha and seed; seed None: any)."""
    try:
        info = json.loads((Path(data_root) / "splits" / "split_info.json").read_text())
        return (info["sites"], info["alpha"]) == (sites, alpha) and seed in (None, info["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def prepare(
    data_root,
    sites: int = 2,
    alpha=None,
    seed: int = 0,
    val_fraction: float = 0.1,
    offline=False,
    offline_sizes=(6000, 1000),
    say=print,
    difficulty=None,
) -> dict:
    """The data (downloaded or generated once) and a fresh split; CliError when it cannot be.

    difficulty (offline only): None keeps the offline set on disk whatever its difficulty (a new
    one gets 0); a number in [0, 1] regenerates the set unless it already has that difficulty.
    """
    site = _site_data()
    root = Path(data_root)
    is_offline = (root / OFFLINE_MARKER).exists()
    has_batches = (root / site.BATCHES_DIR / site.TEST_BATCH).exists()
    try:
        if difficulty is not None:
            if not offline:
                raise CliError("--difficulty applies to the offline dataset only (add --offline)")
            difficulty = check_difficulty(difficulty)
        if offline:
            if has_batches and not is_offline:
                raise CliError(f"{root} holds real CIFAR-10; choose another --data-root for offline data")
            on_disk = offline_difficulty(root) if has_batches else None
            if not has_batches or (difficulty is not None and on_disk != difficulty):
                wanted = difficulty or 0.0
                note = f", difficulty {wanted}" if wanted else ""
                if has_batches:
                    note += f", replacing the set of difficulty {'unknown' if on_disk is None else on_disk}"
                say(f"generating offline dataset in {root} ({offline_sizes[0]} train, {offline_sizes[1]} test{note})")
                generate_offline(root, *offline_sizes, difficulty=wanted)
        else:
            if is_offline:
                raise CliError(f"{root} holds the offline dataset; choose another --data-root for CIFAR-10")
            if readable_batches(root):
                say(f"data: using the CIFAR-10 batches in {site.batches_dir(root)} as they are")
            else:
                download_cifar10(root)
        _, labels = site.read_train_set(root)
        info = write_splits(root, labels, sites, alpha, seed, val_fraction)
    except (ValueError, site.SiteDataError) as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"cannot write the data in {root}: {e}") from None
    say(f"wrote {info['split']} split for {sites} sites (label skew {info['label_skew']}) in {root / 'splits'}")
    for name, c in info["counts"].items():
        say(f"  {name}: {c['train']} train, {c['val']} val")
    return info


def register(subparsers) -> None:
    p = subparsers.add_parser("prepare-data", help="fetch or generate the data; split it per site", description=__doc__)
    p.add_argument("--data-root", help="data folder (default /tmp/nvflare/data/cifar10, or offline-cifar10)")
    p.add_argument("--sites", type=positive_int, default=2, help="number of sites (default 2)")
    p.add_argument("--alpha", type=float, default=None, help="Dirichlet concentration; omit for IID")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of each site kept for validation")
    p.add_argument("--offline", action="store_true", help="generate the offline dataset instead of downloading")
    p.add_argument(
        "--difficulty",
        type=difficulty_arg,
        default=None,
        metavar="D",
        help=f"offline dataset difficulty in [0, 1]: 0 easy (a new set's default), {HARD_DIFFICULTY} hard; "
        "a set of another difficulty is regenerated (omitted: the set on disk is kept)",
    )
    p.add_argument("--offline-train-size", type=positive_int, default=6000, help=argparse.SUPPRESS)
    p.add_argument("--offline-test-size", type=positive_int, default=1000, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args) -> int:
    root = default_data_root(args.data_root, args.offline)
    sizes = (args.offline_train_size, args.offline_test_size)
    prepare(root, args.sites, args.alpha, args.seed, args.val_fraction, args.offline, sizes, difficulty=args.difficulty)
    return 0


def main(argv=None) -> int:
    """As `flctl prepare-data ARGS`."""
    from flctl.cli import main as cli_main

    return cli_main(["prepare-data", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
