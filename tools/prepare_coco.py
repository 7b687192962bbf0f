"""Download COCO 2017 (train2017, val2017 and the caption annotations) into the layout data.py
reads.

    # 19 GB of zips; resumable, verified, extracted in place
    python -m tools.prepare_coco data/coco

Resumable HTTP Range downloads with a progress bar, size and md5 checks; a bad file is kept as
`*.bad` for inspection. Finished zips are kept and never fetched again. Karpathy's split needs
`dataset_coco.json` (from caption_datasets.zip) in the same folder.
"""

import argparse
import hashlib
import http.client
import os
import time
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from lib.data_checks import listed


COCO_URL = "http://images.cocodataset.org/"
# file name -> (path under the base URL, "algorithm:hexdigest" or None for a size check only).
# md5 sums as published with the dataset lists of PaddleDetection (ppdet/utils/download.py) and
# others
COCO_FILES = {
    "annotations_trainval2017.zip": ("annotations/annotations_trainval2017.zip",
                                     "md5:f4bbac642086de4f52a3fdda2de5fa2c"),
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
            with (urllib.request.urlopen(request, timeout=60) as r,
                  tqdm(total=total, initial=done if r.status == 206 else 0, unit="B",
                       unit_scale=True, desc=target.name) as bar,
                  open(part, "ab" if r.status == 206 else "wb") as f):
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


def refuse_foreign(dest: Path, files: dict):
    """ValueError unless dest is missing, empty or holds only what a COCO download puts there
    (its zips and their temporaries, the extracted folders, Karpathy's file, the image cache): the
    zips extract over whatever else is there, a shapes world's annotations say."""
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest} is a file; pass a folder for COCO")
    ours = {"annotations", "train2017", "val2017", "cache", "dataset_coco.json",
            "caption_datasets.zip"}
    ours |= {f"{name}{end}" for name in files for end in ("", ".part", ".bad")}
    ours |= {f".{name}.extracted" for name in files}
    found = sorted(p.name for p in dest.iterdir() if p.name not in ours) if dest.exists() else []
    if found:
        raise ValueError(f"{dest} holds {listed(found)}, which a COCO download does not "
                         "write: COCO is downloaded only into a new or empty folder, or one of "
                         "its own (nothing was written)")


def download_coco(dest: str | Path, files: dict = COCO_FILES, base_url: str = COCO_URL,
                  retries: int = 5) -> Path:
    """Downloads and extracts COCO 2017 (images and caption annotations) into dest, giving the
    layout load_split("coco", dest, ...) reads. Finished zips are kept and never fetched again."""
    dest = Path(dest)
    refuse_foreign(dest, files)
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


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="download COCO 2017 images and captions")
    parser.add_argument("dest", help="folder for the zips and the extracted layout, e.g. data/coco")
    args = parser.parse_args(argv)
    try:
        root = download_coco(args.dest)
    # no network, a bad file
    except (OSError, http.client.HTTPException, RuntimeError, ValueError,
            zipfile.BadZipFile) as e:
        raise SystemExit(f"error: the COCO download into {args.dest} stopped: {e}") from None
    print(f"COCO 2017 ready in {root}")


if __name__ == "__main__":
    main()
