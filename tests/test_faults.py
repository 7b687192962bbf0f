"""Bad input and faults of the model, the FDT layer, the shapes world and eval.py's commands: each
is refused with a message that names it, or loses nothing written before it. The flags, the run
folder and the data have test files of their own (test_flags, test_run_folder, test_data_checks)."""

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import eval as evaluation
import fdt
from lib import fdt_fast
from lib import shapes
import train
from model import CLIP, PRESETS, load_checkpoint, model_from_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


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
# checkpoints: written whole, read only when they are ours

SAVE_LOOP = """
import sys, torch
import data, model
from dataclasses import replace
# ~10 MB of weights: a save takes a while
m = model.CLIP(replace(model.PRESETS["tiny"], n_fdt=16384))
tok = data.Tokenizer([1, 2, 3], 8)
step = 0
while True:
    step += 1
    model.save_checkpoint(sys.argv[1], m, tok, {"source": "shapes", "root": "x"}, step=step,
                          blob=torch.full((2_000_000,), float(step)))
"""


def test_kill_9_during_save_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    rng = np.random.default_rng(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(path)], cwd=REPO)
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.05, 0.6))                              # somewhere inside a save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = load_checkpoint(path)
        assert ckpt["step"] >= 1 and torch.equal(ckpt["blob"],
                                                 torch.full((2_000_000,), float(ckpt["step"])))


def test_foreign_and_truncated_checkpoints_are_clear_errors(tmp_path):
    path = tmp_path / "ckpt.pt"
    model = CLIP(PRESETS["tiny"])
    save_checkpoint(path, model, data.Tokenizer([1, 2], 8), {"source": "shapes", "root": "x"},
                    step=1)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable FDT-CLIP checkpoint"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not an FDT-CLIP checkpoint"):
        load_checkpoint(path)


def test_a_random_file_as_checkpoint_gets_no_advice_to_unpickle_it(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(ValueError) as e:
        load_checkpoint(path)
    assert str(e.value).startswith(f"{path} is not a readable FDT-CLIP checkpoint (Unpickling")
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def test_weights_that_do_not_fit_their_config_are_one_line(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, CLIP(PRESETS["tiny"]), data.Tokenizer([1, 2], 8),
                    {"source": "shapes", "root": "x"}, step=1)
    ckpt = load_checkpoint(path)
    ckpt["model_config"]["n_fdt"] = 512
    del ckpt["model"]["logit_scale"]
    ckpt["model"]["extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError) as e:
        model_from_checkpoint(ckpt)
    assert str(e.value) == ("the checkpoint's weights do not match its model config: 1 missing "
                            "(logit_scale); 1 unexpected (extra.weight); 1 of another shape "
                            "(fdt.tokens: (1024, 128), config (512, 128))")


# -----------------------------------------------------------------------------
# degenerate rows in sparsemax and the FDT layer

@pytest.mark.parametrize("sparsemax", [fdt.sparsemax, fdt_fast.sparsemax])
def test_sparsemax_rows_without_a_finite_entry_are_a_clear_error(sparsemax):
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.isfinite(sparsemax(x)).all()
    for bad in (float("-inf"), float("nan")):
        y = x.clone()
        y[2] = bad
        with pytest.raises(ValueError, match=r"1 of 4 rows have no finite entry .* index \[2\]"):
            sparsemax(y)
    y = x.clone()
    # e.g. fp16 relevances that overflowed
    y[1, 7] = float("inf")
    with pytest.raises(ValueError, match="overflowed"):
        sparsemax(y)
    y = x.clone()
    # one finite entry is fine: weight 1 (z - (z - 1) in float32: 1 within rounding), 0 elsewhere
    y[3, :299] = float("-inf")
    p = sparsemax(y)
    assert p[3, 299].item() == pytest.approx(1, abs=1e-6) and (p[3, :299] == 0).all()


def test_fdt_all_padding_row_is_a_clear_error():
    layer = fdt_fast.FDT(32, 8)
    q = torch.randn(3, 5, 8)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"rows \[1\] of the mask have no real position"):
        layer(q, mask)


def test_fp16_overflow_of_relevances_is_not_silent():
    torch.manual_seed(0)
    for layer in (fdt.FDT(16, 8, temperature=1e-4), fdt_fast.FDT(16, 8, temperature=1e-4)):
        # relevances ~1e6: past fp16's 65504
        q = torch.full((2, 3, 8), 30.0, dtype=torch.float16)
        with pytest.raises(ValueError, match="overflowed"):
            layer.half()(q)


# -----------------------------------------------------------------------------
# data folders and evaluation: nothing written over other data, every bad file named at once

def write_coco_ids(root, split, ids):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]
    (root / "annotations" / f"captions_{split}.json").write_text(
        json.dumps({"images": images, "annotations": []}))


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_shapes_world_never_written_into_another_folder(shapes_root, tmp_path):
    coco = tmp_path / "coco"
    write_coco_ids(coco, "train2017", [1, 2])
    (coco / "train2017").mkdir()
    (coco / "train2017" / "000000000001.jpg").write_bytes(b"a jpeg")
    before = tree(coco)
    with pytest.raises(SystemExit, match=r"holds annotations/captions_train2017.json, train2017/"
                                         r"000000000001.jpg without shapes.json: a COCO folder\? "
                                         r"train on it with --data coco"):
        train.main(flags(coco, tmp_path / "run", "--steps", "1"))
    assert tree(coco) == before and not (tmp_path / "run" / "ckpt.pt").exists()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="is a file; pass the dataset.s folder"):
        train.main(flags(tmp_path / "notes.txt", tmp_path / "run", "--steps", "1"))
    with pytest.raises(SystemExit, match=r"holds coco/, notes.txt, run/ without shapes.json: "
                                         r".*new or empty folder"):
        train.main(flags(tmp_path, tmp_path / "run", "--steps", "1"))
    # an interrupted generation is a shapes world: it is finished, not refused
    def interrupted(root):
        (root / "shapes.json").unlink()
        (root / "annotations" / "captions_zeroshot.json").unlink()
    root = broken_copy(shapes_root, tmp_path, interrupted)
    shapes.prepare(root, n_train=64, n_val=12, n_test_per_pair=1)
    assert tree(root) == {k: v for k, v in tree(shapes_root).items() if not k.startswith("cache/")}
    assert shapes.ready(root)


@pytest.fixture
def checkpoint(shapes_root, tmp_path):
    """An untrained tiny model, saved as train.py saves it, trained on shapes_root."""
    train_set = data.load_split("shapes", shapes_root, "train", PRESETS["tiny"].image_size)
    tokenizer = data.Tokenizer.build([c for caps in train_set.captions for c in caps], 32)
    model = CLIP(dataclasses.replace(PRESETS["tiny"], vocab_size=tokenizer.vocab_size,
                                     context_length=32))
    path = tmp_path / "run" / "ckpt.pt"
    path.parent.mkdir()
    save_checkpoint(path, model, tokenizer, {"source": "shapes", "root": str(shapes_root)}, step=1)
    return path


def test_binding_on_a_folder_without_shapes_is_a_clear_error(checkpoint, tmp_path):
    coco = tmp_path / "coco"
    write_coco_ids(coco, "val2017", [1])
    with pytest.raises(SystemExit, match=f"binding tests the shapes world's scenes, and {coco} "
                                         "holds no shapes world"):
        evaluation.main(["binding", "--ckpt", str(checkpoint), "--data-dir", str(coco),
                         "--device", "cpu"])


def test_unreadable_imagefolder_images_named(checkpoint, shapes_root, tmp_path):
    folder = tmp_path / "folder"
    for name in ("red", "blue"):
        (folder / name).mkdir(parents=True)
        for k in range(2):
            shutil.copy(shapes_root / "val2017" / f"00000000000{k}.png", folder / name / f"{k}.png")
    (folder / "blue" / "1.png").write_text("not an image")
    (folder / "red" / "0.png").write_bytes((folder / "red" / "0.png").read_bytes()[:80])  # cut
    blue, red = folder / "blue" / "1.png", folder / "red" / "0.png"
    with pytest.raises(SystemExit, match=f"2 of 4 images cannot be read .*:\n  {blue}\n  {red}\n"
                                         "replace or remove them"):
        evaluation.main(["zeroshot", "--ckpt", str(checkpoint), "--dataset", "imagefolder",
                         "--data-dir", str(folder), "--workers", "1", "--device", "cpu"])


def test_read_only_checkpoint_folder_shows_results_then_one_line(checkpoint, capsys, read_only):
    read_only(checkpoint.parent)
    json_file = checkpoint.parent / "retrieval_val.json"
    with pytest.raises(SystemExit, match=f"cannot write {json_file} \\(Read-only file system\\): "
                                         "the results above are not saved") as e:
        evaluation.main(["retrieval", "--ckpt", str(checkpoint), "--device", "cpu"])
    assert e.value.code != 0 and "rsum" in capsys.readouterr().out
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["ckpt.pt"]
