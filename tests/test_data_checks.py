"""lib/data_checks.py: caption files that are not what they claim, missing and unreadable images, a
cache that cannot be written; every problem of every split named in one report, before training."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import data
from lib import shapes
import train
from test_data import write_coco


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return shapes.prepare(tmp_path_factory.mktemp("shapes"), n_train=64, n_val=12,
                          n_test_per_pair=1)


def flags(root, out, *extra):
    return ["--data-dir", str(root), "--out", str(out), "--batch-size", "32", "--warmup", "1",
            "--device", "cpu", "--eval-every", "1", *extra]  # a checkpoint every epoch


def broken_copy(shapes_root, tmp_path, damage):
    root = tmp_path / "shapes"
    shutil.copytree(shapes_root, root, ignore=shutil.ignore_patterns("cache"))
    damage(root)
    return root


# -----------------------------------------------------------------------------
# caption files, images and the cache: data.load_split names what is wrong

def test_coco_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m tools.prepare_coco"):
        data.load_split("coco", tmp_path / "nowhere", "train", 16)
    with pytest.raises(FileNotFoundError, match="python -m lib.shapes"):
        data.load_split("shapes", tmp_path / "nowhere", "train", 16)
    write_coco(tmp_path, n_missing=2)
    with pytest.raises(ValueError,
                       match=r"2 of 7 images are missing(.|\n)*gone0.png(.|\n)*gone1.png"):
        data.load_split("coco", tmp_path, "train", 16)
    ann = tmp_path / "annotations" / "captions_train2017.json"
    ann.write_text('{"images": [')
    with pytest.raises(ValueError, match=f"{ann}: not valid JSON"):
        data.load_split("coco", tmp_path, "train", 16)
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "rgb.png"}]}))
    with pytest.raises(ValueError, match=f"{ann}: expected a COCO captions object"):
        data.load_split("coco", tmp_path, "train", 16)
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "rgb.png"}],
                               "annotations": [{"image_id": 2, "caption": "x"}]}))
    with pytest.raises(ValueError, match=r"annotations\[0\] refers to image_id 2"):
        data.load_split("coco", tmp_path, "train", 16)
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "rgb.png"}], "annotations": []}))
    with pytest.raises(ValueError, match="1 images have no caption"):
        data.load_split("coco", tmp_path, "train", 16)


def test_annotation_files_that_cannot_be_read_are_named(tmp_path):
    write_coco(tmp_path)
    ann = tmp_path / "annotations" / "captions_train2017.json"
    ann.write_bytes(b'{"images": [], "annotations": [{"caption": "caf\xe9"}]}')  # Latin-1
    with pytest.raises(ValueError, match=f"{ann}: not UTF-8 text \\(byte 0xe9"):
        data.load_split("coco", tmp_path, "train", 16)
    ann.unlink()
    ann.mkdir()
    with pytest.raises(ValueError, match=f"{ann}: cannot be read \\(Is a directory\\)"):
        data.load_split("coco", tmp_path, "train", 16)


def test_empty_splits_and_blank_captions_refused(tmp_path):
    write_coco(tmp_path)
    ann = tmp_path / "annotations" / "captions_train2017.json"
    coco = json.loads(ann.read_text())
    coco["annotations"][3]["caption"] = " \n"
    coco["annotations"][7]["caption"] = ""
    ann.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"2 captions are empty or only whitespace: annotations"
                                         r"\[3\] of six.png, annotations\[7\] of palette.png"):
        data.load_split("coco", tmp_path, "train", 16)
    (tmp_path / "annotations" / "captions_val2017.json").write_text(
        '{"images": [], "annotations": []}')
    with pytest.raises(ValueError, match="captions_val2017.json: the val split has no images"):
        data.load_split("coco", tmp_path, "val", 16)


def test_bad_images_each_named_and_none_stops_the_others(tmp_path, monkeypatch):
    write_coco(tmp_path)
    folder = tmp_path / "train2017"
    (folder / "loop.png").symlink_to(folder / "loop.png")
    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(folder / "huge.png")
    (folder / "cut.png").write_bytes((folder / "rgb.png").read_bytes()[:60])
    ann = tmp_path / "annotations" / "captions_train2017.json"
    coco = json.loads(ann.read_text())
    for k, name in enumerate(["loop.png", "huge.png", "cut.png", "nul\0.png"]):
        coco["images"].append({"id": 90 + k, "file_name": name})
        coco["annotations"].append({"id": 900 + k, "image_id": 90 + k, "caption": "a picture"})
    ann.write_text(json.dumps(coco))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)             # 60 x 60 is past twice that
    with pytest.raises(ValueError) as e:
        data.load_split("coco", tmp_path, "train", 16)
    message = str(e.value)
    assert "4 of 9 images cannot be read" in message
    assert f"{folder / 'loop.png'}: Too many levels of symbolic links" in message
    assert f"{folder / 'huge.png'}: DecompressionBombError" in message
    assert f"{folder / 'cut.png'}: " in message
    assert repr(str(folder / "nul\0.png")) + ": a NUL character in the file name" in message
    assert not list((tmp_path / "cache").glob("*.tmp*"))


def test_every_problem_of_every_split_in_one_error(tmp_path):
    write_coco(tmp_path, n_missing=1)
    shutil.copytree(tmp_path / "train2017", tmp_path / "val2017")
    coco = json.loads((tmp_path / "annotations" / "captions_train2017.json").read_text())
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(coco))
    (tmp_path / "val2017" / "gray.png").write_text("not an image")
    with pytest.raises(ValueError) as e:
        data.load_splits("coco", tmp_path, ["train", "val"], 16)
    message = str(e.value)
    assert "1 of 6 images are missing:\n  " + str(tmp_path / "train2017" / "gone0.png") in message
    assert "1 of 6 images are missing:\n  " + str(tmp_path / "val2017" / "gone0.png") in message
    assert "1 of 6 images cannot be read:\n  " + str(tmp_path / "val2017" / "gray.png") in message
    with pytest.raises(FileNotFoundError, match="^no shapes dataset at [^\n]*$"):  # said once
        data.load_splits("shapes", tmp_path / "nowhere", ["train", "val", "zeroshot"], 16)


def test_stale_temporaries_of_dead_processes_removed(tmp_path):
    write_coco(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "cache").mkdir()
    for pid in (dead, os.getppid()):                      # killed by kill -9; still running
        (tmp_path / "cache" / f"train2017_16.npy.tmp{pid}").write_bytes(b"\0" * 1000)
    data.load_split("coco", tmp_path, "train", 16)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "train2017_16.json", "train2017_16.npy", f"train2017_16.npy.tmp{os.getppid()}"]


def test_read_only_folder_without_a_cache_is_a_clear_error(tmp_path, read_only):
    write_coco(tmp_path)
    read_only(tmp_path)
    with pytest.raises(ValueError, match=f"cannot write the image cache .*Read-only file system.*"
                                         f"{tmp_path / 'cache'}/, which must be writable"):
        data.load_split("coco", tmp_path, "train", 16)


# -----------------------------------------------------------------------------
# before training: every split the run reads, checked at once, before the first step

def test_missing_val_images_refused_before_training(shapes_root, tmp_path):
    def remove_two(root):
        (root / "val2017" / "000000000003.png").unlink()
        (root / "val2017" / "000000000007.png").unlink()
    root = broken_copy(shapes_root, tmp_path, remove_two)
    with pytest.raises(SystemExit) as e:
        train.main(flags(root, tmp_path / "run", "--steps", "2"))
    message = str(e.value)
    assert "2 of 12 images are missing" in message
    assert "000000000003.png" in message and "000000000007.png" in message
    assert not (tmp_path / "run" / "ckpt.pt").exists()                  # nothing trained first


def test_unreadable_images_named_all_at_once(shapes_root, tmp_path):
    def corrupt(root):
        png = root / "zeroshot" / "000000000005.png"
        png.write_bytes(png.read_bytes()[:100])                          # truncated
        (root / "zeroshot" / "000000000009.png").write_text("not an image")
    root = broken_copy(shapes_root, tmp_path, corrupt)
    with pytest.raises(SystemExit) as e:
        train.main(flags(root, tmp_path / "run", "--steps", "2"))
    message = str(e.value)
    assert "2 of 64 images cannot be read" in message
    assert "000000000005.png" in message and "000000000009.png" in message
    assert not (tmp_path / "run" / "ckpt.pt").exists()
    # no half-built cache left behind
    assert not list((root / "cache").glob("zeroshot_*"))


def test_every_problem_of_every_split_in_one_report(shapes_root, tmp_path):
    def damage(root):
        (root / "train2017" / "000000000010.png").unlink()
        (root / "val2017" / "000000000004.png").write_text("not an image")
        (root / "zeroshot" / "000000000033.png").unlink()
    root = broken_copy(shapes_root, tmp_path, damage)
    with pytest.raises(SystemExit) as e:
        train.main(flags(root, tmp_path / "run", "--steps", "2"))
    message = str(e.value)
    assert f"1 of 64 images are missing:\n  {root / 'train2017' / '000000000010.png'}" in message
    assert f"1 of 12 images cannot be read:\n  {root / 'val2017' / '000000000004.png'}" in message
    assert f"1 of 64 images are missing:\n  {root / 'zeroshot' / '000000000033.png'}" in message
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_empty_val_split_refused_before_training(shapes_root, tmp_path):
    def empty_val(root):
        (root / "annotations" / "captions_val2017.json").write_text(
            '{"images": [], "annotations": []}')
    root = broken_copy(shapes_root, tmp_path, empty_val)
    with pytest.raises(SystemExit, match="captions_val2017.json: the val split has no images"):
        train.main(flags(root, tmp_path / "run", "--steps", "2"))
    assert not (tmp_path / "run" / "ckpt.pt").exists()
