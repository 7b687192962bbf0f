"""The checks behind data.py: caption files that are not what they claim, images that are missing
or unreadable, an image cache that cannot be written, and the one report that names every problem
of every split at once, so the data is fixed in one go, not one file per run. data.py calls them
where it reads; a reader can skip this file and lose nothing of the pipeline.

    read_json        a JSON file, or a ValueError that says what is wrong with it
    clear_errors     a loader's FileNotFoundError / ValueError as one `error:` line, no traceback
    check_coco       a COCO captions object: its schema, blank captions, images without one
    check_karpathy   Karpathy's dataset_coco.json: the same
    check_count      an empty split, or one smaller than a batch
    check_images     which image files exist, and a fingerprint of what they hold
    check_proportions an image whose resize would take memory out of proportion
    image_problems   the lines naming every missing and unreadable image
    whole_cache      a cache that is what its meta file says, or None: it is rebuilt
    unwritable_cache the error for a cache folder that cannot be written
    reserve          a new cache file's blocks, allocated before it is written through a memmap
    check_space      a disk without room for what is about to be written, said before
    remove_stale     temporaries of cache builds killed by kill -9
    one_report       run every load, then raise one error naming every problem
"""

import errno
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:  # its position counts from the chunk read, not the file start
        raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} is not UTF-8); "
                         "save it as UTF-8") from None
    except (IsADirectoryError, PermissionError) as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None


@contextmanager
def clear_errors(what: str = ""):
    """The loaders of data.py (and checkpoint loading) raise FileNotFoundError / ValueError with a
    message that says what to fix: a command line shows only that message, not a traceback."""
    try:
        yield
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {what}{e}") from None


def check(ok: bool, path: Path, what: str):
    if not ok:
        raise ValueError(f"{path}: {what}")


def check_count(n: int, batch_size: int, caption_file: Path, split: str):
    """A split with no images, or fewer than one batch: refused before its cache is built."""
    check(n > 0, caption_file, f"the {split} split has no images")
    check(n >= batch_size, caption_file, f"the {split} split has {n} images, fewer than one "
                                         f"batch of {batch_size} (--batch-size)")


def check_coco(coco, ann_file: Path):
    """A COCO captions object, refused with the first thing wrong: its lists, every image's id
    (unique) and file name, every annotation's caption and image_id; then every blank caption
    (it would train its image to match nothing) and every image without a caption, all named."""
    check(isinstance(coco, dict) and isinstance(coco.get("images"), list)
          and isinstance(coco.get("annotations"), list), ann_file,
          "expected a COCO captions object with lists 'images' and 'annotations'")
    names = {}                                                     # image id -> file name
    for k, im in enumerate(coco["images"]):
        check(isinstance(im, dict) and isinstance(im.get("id"), int)
              and isinstance(im.get("file_name"), str),
              ann_file, f"images[{k}] needs an integer 'id' and a string 'file_name'")
        check(im["id"] not in names, ann_file, f"images[{k}]: duplicate image id {im['id']}")
        names[im["id"]] = im["file_name"]
    for k, ann in enumerate(coco["annotations"]):
        check(isinstance(ann, dict) and isinstance(ann.get("caption"), str), ann_file,
              f"annotations[{k}] needs a string 'caption'")
        check(ann.get("image_id") in names, ann_file,
              f"annotations[{k}] refers to image_id {ann.get('image_id')!r}, "
              "which is not in 'images'")
    empty = [f"annotations[{k}] of {names[ann['image_id']]}"
             for k, ann in enumerate(coco["annotations"]) if not ann["caption"].strip()]
    check(not empty, ann_file, f"{len(empty)} captions are empty or only whitespace: "
                               + ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else ""))
    captioned = {ann["image_id"] for ann in coco["annotations"]}
    bare = [im["file_name"] for im in coco["images"] if im["id"] not in captioned]
    check(not bare, ann_file, f"{len(bare)} images have no caption, e.g. {bare[:5]}")


def check_karpathy(obj, json_file: Path):
    """Karpathy's dataset_coco.json: every image of every split has a split, a file name and
    non-empty sentences, none of them blank."""
    check(isinstance(obj, dict) and isinstance(obj.get("images"), list), json_file,
          "expected an object with a list 'images'")
    for k, im in enumerate(obj["images"]):
        check(isinstance(im, dict) and im.get("split") in ("train", "restval", "val", "test")
              and isinstance(im.get("filename"), str) and isinstance(im.get("sentences"), list)
              and im["sentences"]
              and all(isinstance(s, dict) and isinstance(s.get("raw"), str)
                      for s in im["sentences"]),
              json_file, f"images[{k}] needs 'split' (train/restval/val/test), 'filename' and "
                         "non-empty 'sentences' with a string 'raw' each")
        check(all(s["raw"].strip() for s in im["sentences"]), json_file,
              f"images[{k}] ({im['filename']}) has a caption that is empty or only whitespace")


def check_images(files: list[Path], folder: Path) -> tuple[str, list[int], list[str], list[str]]:
    """(fingerprint, indices of the files found, missing, unreadable). The fingerprint hashes every
    image's path relative to `folder`, its size and its modification time (ns): an image rewritten
    in place, even to the same size, changes it, and a folder moved (or copied with its times, as
    `cp -a` and rsync -a do) keeps it, whichever way it is spelled. Reading every file's content
    instead would cost minutes on COCO; one stat per file costs ~1.2 s for 118k files."""
    h, found, missing, unreadable = hashlib.sha1(), [], [], []
    for i, f in enumerate(files):
        try:
            st = os.stat(f)
        except (FileNotFoundError, NotADirectoryError):
            missing.append(str(f))
            continue
        except OSError as e:  # a symlink loop, no permission
            unreadable.append(f"{f}: {e.strerror}")
            continue
        except ValueError:  # os.stat refuses the name
            unreadable.append(f"{str(f)!r}: a NUL character in the file name")
            continue
        found.append(i)
        h.update(f"{os.path.relpath(f, folder)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest(), found, missing, unreadable


RESIZE_BUDGET = 64 * 2**20  # bytes of one image resized to the cache's short side


def check_proportions(width: int, height: int, size: int):
    """ValueError for an image whose resize to `size` px on its short side would take more than
    RESIZE_BUDGET: an extreme aspect ratio, which PIL's pixel limit lets through (a 60000 x 1 px
    PNG of 256 bytes is resized through a 64 x 3,840,000 image, 703 MB). Checked on the header,
    before any pixel is decoded. A 224 px cache allows up to ~445:1, a 64 px one ~5,400:1."""
    short, long = min(width, height), max(width, height)
    need = size * (size * long // short) * 3
    if need > RESIZE_BUDGET:
        raise ValueError(f"{width} x {height} px, an aspect ratio of {long / short:.0f}:1: "
                         f"resizing it to {size} px would take {need / 2**20:.0f} MB, over the "
                         f"{RESIZE_BUDGET // 2**20} MB allowed for one image; crop it or remove it")


def image_problems(missing: list[str], unreadable: list[str], n: int) -> list[str]:
    """The lines that name every missing and unreadable image (up to 10 of each); [] if none."""
    lines = [f"{len(items)} of {n} images {what}:\n  " + "\n  ".join(items[:10])
             + ("\n  ..." if len(items) > 10 else "")
             for what, items in (("are missing", missing), ("cannot be read", unreadable)) if items]
    if not lines:
        return []
    return lines + ["re-download or replace them (or remove their entries from the caption file)"]


def unwritable_cache(array: Path, error: OSError, missing, unreadable, n) -> ValueError:
    """The images already known to be bad, then why the cache cannot be built."""
    advice = ("the disk is full: free some space, or put the data on a larger disk"
              if error.errno == errno.ENOSPC else
              f"images are decoded once into {array.parent}/, which must be writable (a copy of "
              "the data folder that holds its cache/ needs no writing)")
    return ValueError("\n".join(image_problems(missing, unreadable, n) + [
        f"cannot write the image cache {array} ({error.strerror}): {advice}"]))


def reserve(path: Path):
    """Every block of a new file allocated now (a memmap is sparse): a disk that fills up is
    ENOSPC here, not a SIGBUS at some write into the mapping. Where os.posix_fallocate is missing
    (macOS, Windows) the space checked up front stands alone. The file is removed on failure."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError:
        path.unlink(missing_ok=True)
        raise


def listed(names: list[str], first: int = 3) -> str:
    """The first few names, and how many more: "a, b, c and 4 more"."""
    more = f" and {len(names) - first} more" if len(names) > first else ""
    return ", ".join(names[:first]) + more


def size_text(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def check_space(folder: Path, need: int, what: str):
    """ValueError naming `what`, the space it needs and the space free, when the file system of
    `folder` (or of its nearest existing parent) has less free: said before the work, where a full
    disk would otherwise end it half-way (a memmap on a full disk dies of SIGBUS, unexplained)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise ValueError(f"not enough space for {what}: it needs {size_text(need)}, "
                         f"{existing} has {size_text(free)} free; free some space, or put the "
                         "data on a larger disk")


def whole_cache(array: Path, meta_file: Path, meta: dict, shape: tuple):
    """The cached images (a read-only memmap) when meta_file says the cache holds `meta` and the
    array is whole, else None: a stale, zero-byte or truncated cache is rebuilt, never read."""
    try:
        if read_json(meta_file) != meta:
            return None
        images = np.load(array, mmap_mode="r")
    except (OSError, ValueError, EOFError):  # missing, damaged, not an array
        return None
    return images if images.shape == shape and images.dtype == np.uint8 else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(cache: Path):
    """Remove the temporaries of cache builds whose process is gone (killed before cleaning up)."""
    for stale in cache.parent.glob(f"{cache.name}.*.tmp*"):
        pid = stale.name.rpartition(".tmp")[2]
        if pid.isdigit() and int(pid) > 0 and not alive(int(pid)):
            stale.unlink(missing_ok=True)


def one_report(loads):
    """[load() for load in loads], every load run even after one failed; then one error names every
    problem of all of them (a problem they share, such as a missing dataset, once)."""
    results, problems = [], []
    for load in loads:
        try:
            results.append(load())
        except (FileNotFoundError, ValueError) as e:
            problems.append(e)
    messages = list(dict.fromkeys(map(str, problems)))
    if len(messages) == 1:
        raise problems[0]
    if messages:
        raise ValueError("\n".join(messages))
    return results
