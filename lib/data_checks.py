"""The checks behind data.py: caption files that are not what they claim, images that are missing
or unreadable, an image cache that cannot be written, and the one report that names every problem
of every split at once, so the data is fixed in one go, not one file per run. data.py calls them
where it reads; a reader can skip this file and lose nothing of the pipeline.

    read_json        a JSON file, or a ValueError that says what is wrong with it
    clear_errors     a loader's FileNotFoundError / ValueError as one `error:` line, no traceback
    check_coco       a COCO captions object: its schema, blank captions, images without one
    check_karpathy   Karpathy's dataset_coco.json: the same
    check_images     which image files exist, and a fingerprint of what they hold
    image_problems   the lines naming every missing and unreadable image
    unwritable_cache the error for a cache folder that cannot be written
    remove_stale     temporaries of cache builds killed by kill -9
    one_report       run every load, then raise one error naming every problem
"""

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path


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
    image's path relative to `folder` and its size: what the cache holds, whichever way the data
    folder is spelled and wherever it is moved or copied (an image edited in place to the same size
    goes unnoticed)."""
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
        h.update(f"{os.path.relpath(f, folder)}\t{st.st_size}\n".encode())
    return h.hexdigest(), found, missing, unreadable


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
    return ValueError("\n".join(image_problems(missing, unreadable, n) + [
        f"cannot write the image cache {array} ({error.strerror}): images are decoded once into "
        f"{array.parent}/, which must be writable (a copy of the data folder that holds its "
        "cache/ needs no writing)"]))


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
