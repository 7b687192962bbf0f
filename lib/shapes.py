"""The shapes world: generated, captioned 64 px scenes of 1-3 coloured shapes, in COCO format.

It is the default dataset because it trains on a laptop CPU in minutes and because we know what
there is to learn: 8 colours, 8 shapes, which colour belongs to which shape, and where each is.
This file is the single source of its phrasings: the training captions, the zero-shot prompts
and the hard negatives of the binding test are all written here.

    sample_scene    1-3 objects with distinct shapes, each (colour, shape) a training pair
    variant         the scene with two colours swapped, a shape replaced, ... (one edit)
    render          (64, 64, 3) uint8 pixels of a scene
    captions        5 phrasings of a scene; every one names every object's colour and shape
    prompts         zero-shot prompts for one object of a (colour, shape) pair
    negatives       the binding test: per scene, a true caption and a minimally edited false one
    prepare         writes the dataset (train2017 / val2017 / zeroshot splits) under a folder
                    that is new, empty or a shapes world, never over other data
    load_zeroshot   the zero-shot split as tensors, labelled by shape, colour and pair

Training scenes come in groups of 4: a scene and 3 edits of it (colours swapped, a shape
replaced, ...) drawn at the same positions and sizes. The loader keeps a group in one batch, so
the contrastive loss can only tell a scene from its edits by shape and by which colour belongs to
which shape; in a batch of independent scenes colour, count and layout separate nearly every
caption, and shape is learned late or not at all.
"""

import json
import multiprocessing
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
from lib import data_checks

SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart"]
COLOURS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]
RGB = {"red": (215, 40, 40), "orange": (240, 135, 25), "yellow": (235, 215, 35),
       "green": (45, 165, 60), "cyan": (35, 195, 205), "blue": (45, 75, 215),
       "purple": (135, 55, 195), "pink": (240, 120, 185)}
# never in a train or val image or caption; one per colour and one per shape (a permutation), so
# every colour and every shape is still seen in training, only not together
HELDOUT_PAIRS = [("red", "square"), ("orange", "star"), ("yellow", "heart"), ("green", "triangle"),
                 ("cyan", "cross"), ("blue", "circle"), ("purple", "diamond"), ("pink", "ring")]
TRAIN_PAIRS = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS]

PX = 64
# px; two large neighbours just touch (cells are 21 px apart)
RADIUS = {"small": 7.5, "large": 10.5}
CELL_CENTRES = (11, 32, 53)             # a 3 x 3 grid of positions, one object per cell
WHERE = {(0, 0): "in the top left", (0, 1): "at the top", (0, 2): "in the top right",
         (1, 0): "on the left", (1, 1): "in the centre", (1, 2): "on the right",
         (2, 0): "in the bottom left", (2, 1): "at the bottom", (2, 2): "in the bottom right"}
# shapes are drawn 4x larger, then averaged: anti-aliased edges
SUPERSAMPLE = 4
# a 64 px PNG is ~6 KB (8 KB in 4 KB blocks), its captions ~1.5 KB: room asked for up front
BYTES_PER_IMAGE = 12 * 1024
SPLIT_SEEDS = {"train2017": 0, "val2017": 1, "zeroshot": 2}
GROUP = 4                               # training scenes per group: a scene and 3 edits of it
# how often each edit makes a group member; a swap needs two colours, so one-object scenes get
# the others
EDITS = {"swap_colour": 6, "replace_shape": 2, "replace_colour": 1, "swap_position": 1}
_YY, _XX = np.mgrid[0:PX, 0:PX].astype(np.float32) / (PX - 1) - 0.5  # (S, S) each, in [-0.5, 0.5]


# -----------------------------------------------------------------------------
# scenes

def sample_scene(rng: np.random.Generator) -> list[dict]:
    """1-3 objects with distinct shapes, uniform over the 56 training pairs, in distinct cells."""
    n = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
    pairs = []
    while len(pairs) < n:
        c, s = TRAIN_PAIRS[rng.integers(len(TRAIN_PAIRS))]
        if s not in [p[1] for p in pairs]:
            pairs.append((c, s))
    cells = rng.choice(9, n, replace=False)
    return place(pairs, cells, rng)


def place(pairs: list[tuple[str, str]], cells, rng: np.random.Generator) -> list[dict]:
    """Objects for (colour, shape) pairs in grid cells 0-8, with random sizes and a 1 px jitter."""
    objects = []
    for (colour, shape), cell in zip(pairs, cells):
        row, col = divmod(int(cell), 3)
        x, y = np.array([CELL_CENTRES[col], CELL_CENTRES[row]]) + rng.uniform(-1, 1, 2)
        objects.append({"colour": colour, "shape": shape,
                        "size": ["small", "large"][rng.integers(2)],
                        "row": row, "col": col, "x": round(float(x), 2), "y": round(float(y), 2)})
    return _reading_order(objects)


def _reading_order(objects: list[dict]) -> list[dict]:
    return sorted(objects, key=lambda o: (o["row"], o["col"]))  # as captions list them


def variant(objects: list[dict], edit: str, rng: np.random.Generator) -> list[dict] | None:
    """The scene with one edit, or None where the edit does not apply:
    swap_colour    two objects of different colours exchange their colours
    swap_shape     two objects exchange their shapes
    replace_shape  one object gets a shape that no object in the scene has
    replace_colour one object gets a colour that no object in the scene has
    swap_position  two objects exchange their places (what the relations say changes)
    Positions, sizes and everything else stay. The result may contain a held-out pair."""
    objects = [dict(o) for o in objects]
    n = len(objects)
    if edit in ("swap_colour", "swap_shape", "swap_position"):
        key = {"swap_colour": "colour", "swap_shape": "colour", "swap_position": "cell"}[edit]
        # swapping shapes is the same scene as swapping colours; both are kept as different captions
        candidates = [(i, j) for i in range(n) for j in range(i + 1, n)
                      if key == "cell" or objects[i]["colour"] != objects[j]["colour"]]
        if not candidates:
            return None
        i, j = candidates[rng.integers(len(candidates))]
        a, b = objects[i], objects[j]
        if edit == "swap_colour":
            a["colour"], b["colour"] = b["colour"], a["colour"]
        elif edit == "swap_shape":
            a["shape"], b["shape"] = b["shape"], a["shape"]
        else:
            for k in ("row", "col", "x", "y"):
                a[k], b[k] = b[k], a[k]
        return _reading_order(objects)
    key, values = {"replace_shape": ("shape", SHAPES), "replace_colour": ("colour", COLOURS)}[edit]
    absent = [v for v in values if v not in {o[key] for o in objects}]
    objects[rng.integers(n)][key] = absent[rng.integers(len(absent))]
    return objects


def training_group(rng: np.random.Generator, size: int = GROUP) -> list[list[dict]]:
    """A scene and size - 1 distinct edits of it, all made of training pairs only."""
    group = [sample_scene(rng)]
    edits, weights = list(EDITS), np.array(list(EDITS.values()), dtype=float)
    while len(group) < size:
        edit = edits[rng.choice(len(edits), p=weights / weights.sum())]
        scene = variant(group[0], edit, rng)
        if (scene is not None and scene not in group
                and all((o["colour"], o["shape"]) in TRAIN_PAIRS for o in scene)):
            group.append(scene)
    return group


# -----------------------------------------------------------------------------
# pixels

def _outline(shape: str, r: float) -> np.ndarray:
    """Polygon vertices (n, 2) of a shape of radius r around (0, 0); y points down."""
    def ngon(n, start):
        a = start + 2 * np.pi * np.arange(n) / n
        return np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.8 * r
    if shape == "triangle":
        return ngon(3, -np.pi / 2) * r + [0, 0.2 * r]
    if shape == "diamond":
        return ngon(4, -np.pi / 2) * r
    if shape == "star":
        return ngon(10, -np.pi / 2) * np.where(np.arange(10) % 2, 0.45, 1.0)[:, None] * r
    if shape == "cross":
        a = 0.33
        return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1],
                         [-a, a], [-1, a], [-1, -a], [-a, -a]]) * 0.95 * r
    # the classic parametric heart curve: x in [-16, 16], y in [-12, 17], centred
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y - 2.5], 1) / 16 * r
    raise ValueError(shape)


def render(objects: list[dict], rng: np.random.Generator) -> np.ndarray:
    """(64, 64, 3) uint8: a desaturated grey background (gradient, faint tint, noise: never one of
    the 8 colours) with the objects painted over it."""
    S, k = PX, SUPERSAMPLE
    angle = rng.uniform(0, 2 * np.pi)
    # (S, S)
    grey = rng.uniform(70, 185) + rng.uniform(0, 50) * (np.cos(angle) * _XX + np.sin(angle) * _YY)
    # (S, S, 3)
    noise = rng.uniform(0, 12) * (rng.random((S, S, 3), dtype=np.float32) - 0.5)
    # (S, S, 3)
    image = (grey[..., None] + rng.normal(0, 4, 3) + noise).astype(np.float32)
    for o in objects:
        r = RADIUS[o["size"]]
        x0, y0 = max(0, int(o["x"] - r) - 1), max(0, int(o["y"] - r) - 1)  # the object's window, px
        x1, y1 = min(S, int(o["x"] + r) + 2), min(S, int(o["y"] + r) + 2)
        mask = Image.new("L", ((x1 - x0) * k, (y1 - y0) * k))
        draw = ImageDraw.Draw(mask)
        x, y, r = (o["x"] - x0) * k, (o["y"] - y0) * k, r * k  # in supersampled window coordinates
        if o["shape"] == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
        elif o["shape"] == "ring":
            draw.ellipse([x - r, y - r, x + r, y + r], outline=255, width=round(0.4 * r))
        else:
            draw.polygon([tuple(p) for p in _outline(o["shape"], r) + [x, y]], fill=255)
        # (y1 - y0, x1 - x0, 1) coverage
        alpha = np.asarray(mask.reduce(k), dtype=np.float32)[..., None] / 255
        colour = (np.array(RGB[o["colour"]], dtype=np.float32)
                  + rng.uniform(-12, 12, 3).astype(np.float32))
        window = image[y0:y1, x0:x1]  # a view: painting it paints the image
        window += alpha * (colour - window)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


# -----------------------------------------------------------------------------
# words

def with_article(words: str) -> str:
    """The words with "a" or "an" in front, as the first word needs: "a red star",
    "an orange star"."""
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _named(o: dict) -> str:
    return with_article(f"{o['colour']} {o['shape']}")


def _relation(a: dict, b: dict) -> str:
    return "left of" if a["col"] < b["col"] else "right of" if a["col"] > b["col"] else "above"


def relation_caption(objects: list[dict]) -> str:
    """Each object relative to the previous one in reading order: "a red star left of a blue
    circle, which is above a pink heart"."""
    caption = _named(objects[0])
    for j in range(1, len(objects)):
        a, b = objects[j - 1], objects[j]
        caption += (" " if j == 1 else ", which is ") + f"{_relation(a, b)} {_named(b)}"
    return caption


def captions(objects: list[dict]) -> list[str]:
    """5 differently phrased captions: colour, shape, size, position, count and relations. Every
    caption names every object's colour and shape, so every caption of a scene tells it apart from
    the edits of it that share its batch."""
    o = objects[0]
    if len(objects) == 1:
        return [_named(o),
                f"{with_article(o['size'])} {o['colour']} {o['shape']} {WHERE[o['row'], o['col']]}",
                f"there is one {o['size']} {o['shape']} and it is {o['colour']}",
                f"{WHERE[o['row'], o['col']]}, {with_article(o['colour'])} {o['shape']}",
                f"the {o['shape']} is {o['colour']}"]
    number = ["two", "three"][len(objects) - 2]
    named = [_named(p) for p in objects]
    counted = f"{number} shapes: " + _join([with_article(f"{p['size']} {p['colour']} {p['shape']}")
                                            for p in objects])
    placed = _join([f"{n} {WHERE[p['row'], p['col']]}" for n, p in zip(named, objects)])
    if len({p["colour"] for p in objects}) == 1:
        attribute = _join([f"the {p['shape']}" for p in objects]) + \
            f" are {'both' if len(objects) == 2 else 'all'} {o['colour']}"
    else:
        attribute = _join([f"the {p['shape']} is {p['colour']}" for p in objects])
    return [_join(named), counted, relation_caption(objects), placed, attribute]


def prompts(colour: str, shape: str) -> list[str]:
    """Zero-shot prompts for one object of a (colour, shape) pair: the single-object captions that
    do not say where it is, so they fit an object anywhere."""
    return [with_article(f"{colour} {shape}"), f"the {shape} is {colour}",
            f"there is one small {shape} and it is {colour}",
            f"there is one large {shape} and it is {colour}"]


# the binding test's kinds, each with its chance level of 50 %: the true caption must score higher
NEGATIVE_KINDS = ["swap_colour", "swap_shape", "replace_shape", "replace_colour", "swap_relation"]


def negatives(objects: list[dict], rng: np.random.Generator) -> dict[str, tuple[str, str]]:
    """kind -> (true caption, false caption) for every kind that applies to the scene. The captions
    name every object in reading order ("a red circle and a blue star"); for swap_relation they are
    relation captions, and the false one reverses the first relation ("a blue star right of a red
    circle" for "a red circle left of a blue star")."""
    true = captions(objects)[0]
    out = {}
    for kind in ("swap_colour", "swap_shape", "replace_shape", "replace_colour"):
        edited = variant(objects, kind, rng)
        if edited is not None:
            out[kind] = (true, captions(edited)[0])
    if len(objects) > 1:
        a, b = objects[:2]
        out["swap_relation"] = (relation_caption([a, b]),
                                f"{_named(b)} {_relation(a, b)} {_named(a)}")
    return out


# -----------------------------------------------------------------------------
# the dataset on disk

def _chunk(job: tuple) -> list[tuple[list[dict], list[str], int | None]]:
    """Renders and writes images start..stop-1 of a split; -> (objects, captions, group) for each.
    Every image (and every training group) has its own RNG seeded by (seed, split, index), so
    chunks can run in any process and the output stays identical."""
    split, start, stop, seed, per_pair, folder = job
    records, groups = [], {}
    for i in range(start, stop):
        rng = np.random.default_rng([seed, SPLIT_SEEDS[split], i])
        group = None
        if split == "zeroshot":  # single objects, per_pair images of each of the 64 pairs
            pair = (COLOURS[i // per_pair // 8], SHAPES[i // per_pair % 8])
            objects = place([pair], [rng.integers(9)], rng)
        elif split == "train2017":  # images g * GROUP ... g * GROUP + GROUP - 1 are group g
            group = i // GROUP
            if group not in groups:
                groups[group] = training_group(
                    np.random.default_rng([seed, SPLIT_SEEDS[split], group, GROUP]))
            objects = groups[group][i % GROUP]
        else:
            objects = sample_scene(rng)
        # fixed PNG settings (no timestamps, fixed zlib level): the same seed gives the same bytes
        Image.fromarray(render(objects, rng)).save(Path(folder) / f"{i:012d}.png", compress_level=1)
        records.append((objects, captions(objects), group))
    return records


def ready(root: str | Path) -> bool:
    """Whether a complete shapes dataset (of any size) is at root."""
    return (Path(root) / "shapes.json").exists()


def refuse_foreign(root: Path):
    """ValueError unless root is missing, empty or holds only what prepare writes (an interrupted
    generation included): a folder of other data, say COCO's, is never written over."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file, not a folder")
    if not root.exists() or (root / "shapes.json").exists():
        return
    found = []
    for entry in sorted(root.iterdir()):
        if entry.name in SPLIT_SEEDS and entry.is_dir():
            found += [f"{entry.name}/{f.name}" for f in sorted(entry.iterdir())
                      if not re.fullmatch(r"\d{12}\.png", f.name)]
        elif entry.name == "annotations" and entry.is_dir():
            found += [f"annotations/{f.name}" for f in sorted(entry.iterdir()) if not _ours(f)]
        elif entry.name != "cache":
            found.append(entry.name + ("/" if entry.is_dir() else ""))
    if not found:
        return
    if {"annotations/captions_train2017.json", "annotations/captions_val2017.json"} & set(found):
        what = "a COCO folder? train on it with --data coco"
    elif "dataset_coco.json" in found:
        what = "COCO with Karpathy's splits? train on it with --data karpathy"
    else:
        what = "the shapes world is generated only into a new or empty folder"
    raise ValueError(f"{root} holds {data_checks.listed(found)} without shapes.json: {what} "
                     "(nothing was written)")


def _ours(annotation: Path) -> bool:
    """Whether an annotation file (or its temporary) was begun by prepare: its start says so."""
    if (not re.fullmatch(r"captions_(train2017|val2017|zeroshot)\.json(\.tmp\d+)?", annotation.name)
            or not annotation.is_file()):
        return False
    with open(annotation, "rb") as f:
        return f.read(40).startswith(b'{"info": {"description": "shapes ')


def prepare(root: str | Path, n_train: int = 20000, n_val: int = 1000, n_test_per_pair: int = 20,
            seed: int = 0) -> Path:
    """Writes the shapes dataset in COCO format under root (annotations/captions_{train2017,
    val2017,zeroshot}.json, image folders train2017/, val2017/, zeroshot/) unless it is already
    complete for these arguments. Image entries carry "objects" (reading order) and, in train2017,
    "group". The zero-shot split holds single objects of all 64 (colour, shape) pairs, held-out
    ones included."""
    root = Path(root)
    params = {"n_train": n_train, "n_val": n_val, "n_test_per_pair": n_test_per_pair, "seed": seed,
              "version": 2}
    # written last: its presence means the whole dataset is there (ready)
    done = root / "shapes.json"
    if done.exists():
        if json.loads(done.read_text()) == params:
            return root
        raise ValueError(f"{root} holds a shapes world of other settings ({done.read_text()}), "
                         f"not {json.dumps(params)}: it is not regenerated over; use it as it "
                         "is, or pass a new folder (nothing was written)")
    refuse_foreign(root)
    sizes = {"train2017": n_train, "val2017": n_val, "zeroshot": 64 * n_test_per_pair}
    data_checks.check_space(root, BYTES_PER_IMAGE * sum(sizes.values()), f"the shapes world {root}")
    try:
        _generate(root, sizes, params)
    except OSError as e:  # read-only, a full disk: from this process or a worker of the pool
        raise ValueError(f"cannot write the shapes world in {root} ({e.strerror}); what was "
                         "written is finished by the next run, given space and write access"
                         ) from None
    return root


def _generate(root: Path, sizes: dict, params: dict):
    seed, n_test_per_pair = params["seed"], params["n_test_per_pair"]
    done = root / "shapes.json"
    done.unlink(missing_ok=True)
    with multiprocessing.Pool() as pool:
        for split, n in sizes.items():
            (root / split).mkdir(parents=True, exist_ok=True)
            # 500 images per job: a multiple of GROUP, so no group is split over two jobs
            jobs = [(split, a, min(a + 500, n), seed, n_test_per_pair, str(root / split))
                    for a in range(0, n, 500)]
            records = [r for chunk in pool.imap(_chunk, jobs) for r in chunk]
            images = [{"id": i, "file_name": f"{i:012d}.png", "height": PX, "width": PX,
                       "objects": objects}
                      | ({} if group is None else {"group": group})
                      for i, (objects, _, group) in enumerate(records)]
            annotations = [{"id": 5 * i + j, "image_id": i, "caption": c}
                           for i, (_, caps, _) in enumerate(records) for j, c in enumerate(caps)]
            data.write_json(root / "annotations" / f"captions_{split}.json",
                       {"info": {"description": f"shapes {split}", **params}, "images": images,
                        "annotations": annotations})
    data.write_json(done, params)


def load_zeroshot(root: str | Path, image_size: int) -> dict:
    """The zero-shot test split: images as torch uint8 (N, 3, S, S), labels by shape, colour and
    pair (colour index * 8 + shape index), and which images show a held-out pair."""
    root = Path(root)
    ann_file = root / "annotations" / "captions_zeroshot.json"
    if not ann_file.exists():
        raise FileNotFoundError(f"no shapes zero-shot split at {ann_file}: generate it with "
                                f"`python -m lib.shapes --root {root}`")
    cs = data.load_split("shapes", root, "zeroshot", image_size)
    colour = torch.tensor([COLOURS.index(e["objects"][0]["colour"]) for e in cs.entries])
    shape = torch.tensor([SHAPES.index(e["objects"][0]["shape"]) for e in cs.entries])
    heldout = torch.tensor([(COLOURS[c], SHAPES[s]) in HELDOUT_PAIRS
                            for c, s in zip(colour.tolist(), shape.tolist())])
    # (N, S, S, 3) -> (N, 3, S, S)
    return {"images": torch.from_numpy(np.ascontiguousarray(cs.images.transpose(0, 3, 1, 2))),
            "labels": {"shape": shape, "colour": colour, "pair": colour * 8 + shape},
            "classes": {"shape": SHAPES, "colour": COLOURS,
                        "pair": [f"{c} {s}" for c in COLOURS for s in SHAPES]},
            "heldout": heldout}


if __name__ == "__main__":
    import argparse
    import time
    parser = argparse.ArgumentParser(
        description="generate the shapes dataset (train.py does this on first use)")
    parser.add_argument("--root", default="data/shapes")
    args = parser.parse_args()
    t0 = time.perf_counter()
    try:
        prepare(args.root)
    except ValueError as e:  # a folder of other data, no write access, a full disk
        raise SystemExit(f"error: {e}") from None
    print(f"shapes dataset ready in {args.root} ({time.perf_counter() - t0:.1f} s)")
