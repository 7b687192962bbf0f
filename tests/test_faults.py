"""Bad input and faults: each is refused before the first step with a message that names it, or
loses no more than the work since the last checkpoint."""

import dataclasses
import fcntl
import json
import os
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


def no_data_read(*args):
    raise AssertionError("data was read before the mistake was refused")


def step_of(out):
    return torch.load(Path(out) / "ckpt.pt", weights_only=True)["step"]


# -----------------------------------------------------------------------------
# bad data: refused before the first step, every bad file named at once

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


# -----------------------------------------------------------------------------
# bad flags and folders: one line before any data is read

@pytest.mark.parametrize("argv", [["--lr", "nan"], ["--lr", "inf"], ["--lr", "1e30"],
                                  ["--grad-clip", "nan"], ["--weight-decay", "nan"],
                                  ["--logit-scale-init", "inf"], ["--fdt-temperature", "nan"],
                                  ["--warmup-from", "nan"], ["--logit-scale-min=-inf"],
                                  ["--logit-scale-max", "nan"], ["--seed", "-1"]])
def test_non_finite_and_out_of_range_numbers_are_flag_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2
    flag, value = argv[0].split("=")[0], argv[-1].split("=")[-1]
    err = capsys.readouterr().err
    assert f"error: argument {flag}: expected " in err and err.endswith(f", got '{value}'\n")


def test_an_n_fdt_beyond_memory_is_refused_with_what_it_needs(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--n-fdt", "1000000000"])
    assert e.value.code == 2
    # 1e9 tokens x 128 dims x 4 bytes x 4 (weights, gradient, two AdamW states)
    assert "--n-fdt 1000000000: the FDT tokens alone need 1907 GiB" in capsys.readouterr().err
    assert train.parse_args(["--n-fdt", "16384"]).n_fdt == 16384


def test_an_out_with_a_checkpoint_is_resumed_or_overwritten_on_purpose(shapes_root, tmp_path,
                                                                        monkeypatch):
    train.main(flags(shapes_root, tmp_path, "--steps", "1"))
    before = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "metrics.jsonl")}
    with monkeypatch.context() as m:
        m.setattr(data, "load_split", no_data_read)
        with pytest.raises(SystemExit) as e:
            train.main(flags(shapes_root, tmp_path, "--steps", "2"))            # forgot --resume
    assert str(e.value) == (f"error: {tmp_path} already holds a run (its checkpoint "
                            f"{tmp_path / 'ckpt.pt'}): continue it with --resume, or pass another "
                            "--out (--overwrite replaces it)")
    assert all((tmp_path / name).read_bytes() == content for name, content in before.items())
    train.main(flags(shapes_root, tmp_path, "--steps", "2", "--overwrite"))
    assert step_of(tmp_path) == 2
    with pytest.raises(SystemExit):
        train.parse_args(["--resume", "--overwrite"])


def test_out_and_data_dir_mistakes_are_one_line(shapes_root, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load_split", no_data_read)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    # root may write in a read-only folder, not in sysfs
    unwritable = Path("/sys/fdt-clip-run") if os.geteuid() == 0 else read_only / "run"
    cases = [(flags(shapes_root, a_file), f"error: --out {a_file} is a file"),
             (flags(shapes_root, a_file / "run"),
              f"error: --out {a_file / 'run'} is under {a_file}, which is a file"),
             (flags(shapes_root, unwritable), f"error: cannot write in --out {unwritable}"),
             (flags(a_file, tmp_path / "run"), f"error: --data-dir {a_file} is a file")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            train.main(argv + ["--steps", "1"])
        assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_unavailable_devices_are_one_line(shapes_root, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load_split", no_data_read)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)    # also on a machine with a GPU
    for device, message in [("banana", "error: --device 'banana' is not a device"),
                            ("cuda", "error: --device cuda: this machine has no cuda device")]:
        with pytest.raises(SystemExit) as e:      # the last --device wins over flags()'s cpu
            train.main(flags(shapes_root, tmp_path, "--steps", "1", "--device", device))
        assert str(e.value).startswith(message)


def test_resume_is_checked_before_any_data_is_read(shapes_root, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(data, "load_split", no_data_read)
        with pytest.raises(SystemExit, match=r"--resume: there is no checkpoint at .*ckpt.pt"):
            train.main(flags(shapes_root, tmp_path, "--steps", "1", "--resume"))
    train.main(flags(shapes_root, tmp_path, "--steps", "1"))
    with pytest.raises(SystemExit, match=r"model.image_size: checkpoint 64, now 128"):
        train.main(flags(shapes_root, tmp_path, "--steps", "1", "--resume", "--preset", "small"))
    assert not list((shapes_root / "cache").glob("*_128*"))           # no 128 px cache built first


def test_resume_names_a_changed_training_split(shapes_root, tmp_path):
    root = broken_copy(shapes_root, tmp_path, lambda root: None)
    train.main(flags(root, tmp_path / "run", "--steps", "1"))
    captions = root / "annotations" / "captions_train2017.json"
    coco = json.loads(captions.read_text())
    assert coco["annotations"][0]["caption"] != coco["annotations"][-1]["caption"]
    coco["annotations"][0]["caption"] = coco["annotations"][-1]["caption"]  # a caption rewritten
    captions.write_text(json.dumps(coco))
    with pytest.raises(SystemExit, match="train_data: the training split changed since the "
                                         "checkpoint: other captions$"):
        train.main(flags(root, tmp_path / "run", "--steps", "1", "--resume"))
    gone = coco["images"].pop()                                            # an image removed
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != gone["id"]]
    captions.write_text(json.dumps(coco))
    (root / "train2017" / gone["file_name"]).unlink()
    with pytest.raises(SystemExit, match="changed since the checkpoint: images 64 -> 63, other "
                                         "file names, other file sizes, other captions$"):
        train.main(flags(root, tmp_path / "run", "--steps", "1", "--resume"))


def test_damaged_metrics_stop_the_resume_and_lose_nothing(shapes_root, tmp_path):
    train.main(flags(shapes_root, tmp_path, "--steps", "1"))
    metrics = tmp_path / "metrics.jsonl"
    lines = len(metrics.read_bytes().splitlines())
    damaged = metrics.read_bytes() + b'{"kind": "train", "step": \xff\n'  # cut short, not UTF-8
    metrics.write_bytes(damaged)
    with pytest.raises(SystemExit, match=rf"metrics.jsonl line {lines + 1} is not a metrics "):
        train.main(flags(shapes_root, tmp_path, "--steps", "2", "--resume", "--extend"))
    assert metrics.read_bytes() == damaged and step_of(tmp_path) == 1


def test_a_run_that_ends_inside_its_warmup_is_warned(shapes_root, tmp_path, capsys):
    train.main(flags(shapes_root, tmp_path, "--steps", "2", "--warmup", "1000"))
    assert ("warning: the run ends inside its warm-up (--warmup 1000, 2 steps): the learning "
            "rate reaches 2e-06, not --lr 0.001") in capsys.readouterr().err


# -----------------------------------------------------------------------------
# the checkpoint comes before the evaluation

def test_evaluation_error_keeps_the_checkpoint(shapes_root, tmp_path, monkeypatch):
    def broken_evaluation(*args):
        raise RuntimeError("something went wrong in evaluation")
    monkeypatch.setattr(evaluation, "evaluate", broken_evaluation)
    with pytest.raises(SystemExit, match=r"evaluation at step 2 failed .*something went wrong"
                                         r".*ckpt.pt is saved"):
        train.main(flags(shapes_root, tmp_path, "--steps", "2"))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # no claim past the checkpoint
    assert records and all(r["kind"] == "train" and r["step"] <= 2 for r in records)


# -----------------------------------------------------------------------------
# process faults

def test_non_finite_loss_before_any_checkpoint_names_none(shapes_root, tmp_path, monkeypatch):
    real_loss = train.contrastive_loss
    monkeypatch.setattr(train, "contrastive_loss", lambda *args: real_loss(*args) * float("nan"))
    with pytest.raises(SystemExit) as e:
        train.main(flags(shapes_root, tmp_path, "--model", "clip", "--steps", "2"))
    assert str(e.value) == ("stopped: non-finite loss (nan) at step 0; "
                            "no checkpoint was saved before it")
    assert not (tmp_path / "ckpt.pt").exists()


def test_second_run_on_the_same_folder_refused(shapes_root, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    # what a running train.py holds
    with open(tmp_path / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match="another training run is using"):
            train.main(flags(shapes_root, tmp_path, "--steps", "1"))
    train.main(flags(shapes_root, tmp_path, "--steps", "1"))            # free again: runs


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


def test_sigterm_checkpoints_like_ctrl_c_and_restores_the_handlers(shapes_root, tmp_path,
                                                                   monkeypatch, capsys):
    received = []
    def ours(*_):
        received.append(1)
    default_sigterm, sigint = signal.signal(signal.SIGTERM, ours), signal.getsignal(signal.SIGINT)
    real_lr_at = train.lr_at
    def sigterm_at_step_1(step, *args):
        if step == 1:
            signal.raise_signal(signal.SIGTERM)
        return real_lr_at(step, *args)
    monkeypatch.setattr(train, "lr_at", sigterm_at_step_1)
    try:
        with pytest.raises(SystemExit) as stop:
            train.main(flags(shapes_root, tmp_path, "--steps", "4", "--eval-every", "2"))
        assert stop.value.code == 143 and step_of(tmp_path) == 2         # step 1 finished
        assert received == []                                            # train.py's handler had it
        assert signal.getsignal(signal.SIGTERM) is ours                  # both handlers restored
        assert signal.getsignal(signal.SIGINT) is sigint
    finally:
        signal.signal(signal.SIGTERM, default_sigterm)
    assert (f"interrupted (SIGTERM) at step 2: saved {tmp_path / 'ckpt.pt'}; run again with the "
            "same flags and --resume to continue") in capsys.readouterr().out


def test_sigterm_from_outside_saves_and_says_how_to_resume(shapes_root, tmp_path):
    """A scheduler's SIGTERM to a real train.py process: it checkpoints and exits with 143."""
    argv = flags(shapes_root, tmp_path, "--steps", "1000")
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (tmp_path / "ckpt.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)                                     # until the checkpoint of epoch 1
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output
    step = step_of(tmp_path)
    assert 2 <= step < 1000
    assert f"interrupted (SIGTERM) at step {step}: saved" in output
    assert "--resume to continue" in output


def test_ctrl_c_during_the_final_evaluation_finishes_the_run(shapes_root, tmp_path, monkeypatch,
                                                             capsys):
    real_evaluate = evaluation.evaluate
    def ctrl_c_then_evaluate(*args, times=1):
        for _ in range(times):
            signal.raise_signal(signal.SIGINT)
        return real_evaluate(*args)
    monkeypatch.setattr(evaluation, "evaluate", ctrl_c_then_evaluate)
    metrics = train.main(flags(shapes_root, tmp_path / "once", "--steps", "2"))  # evaluated
    out = capsys.readouterr().out
    assert "rsum" in metrics and "done: 2 steps" in out and "interrupted" not in out
    monkeypatch.setattr(evaluation, "evaluate", lambda *args: ctrl_c_then_evaluate(*args, times=2))
    with pytest.raises((SystemExit, KeyboardInterrupt)) as stop:     # a second Ctrl-C stops it
        train.main(flags(shapes_root, tmp_path / "twice", "--steps", "2"))
    assert stop.type is SystemExit and stop.value.code == 130
    ckpt = tmp_path / "twice" / "ckpt.pt"
    assert (f"stopped during the evaluation at step 2; {ckpt} is saved: training is finished; "
            f"evaluate it with `python eval.py retrieval --ckpt {ckpt}`") in capsys.readouterr().out
    assert step_of(tmp_path / "twice") == 2


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
# no evaluation on images the checkpoint was trained on

def write_coco_ids(root, split, ids):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]
    (root / "annotations" / f"captions_{split}.json").write_text(
        json.dumps({"images": images, "annotations": []}))


def test_train_test_overlap_refused_across_layouts(tmp_path):
    root = tmp_path / "coco"
    write_coco_ids(root, "train2017", [1, 2, 3, 4])
    write_coco_ids(root, "val2017", [10, 11])
    karpathy = [{"cocoid": 1, "split": "test"}, {"cocoid": 10, "split": "train"},
                {"cocoid": 11, "split": "restval"}, {"cocoid": 2, "split": "val"},
                {"cocoid": 20, "split": "test"}]
    (root / "dataset_coco.json").write_text(json.dumps({"images": karpathy}))
    assert (data.image_ids("karpathy", root, "train") == {10, 11}
            and data.image_ids("coco", root, "val") == {10, 11})
    coco_ckpt = {"data": {"source": "coco", "root": str(root)}}
    karpathy_ckpt = {"data": {"source": "karpathy", "root": str(root)}}
    with pytest.raises(SystemExit, match=r"1 images of karpathy test are in the checkpoint's "
                                         r"training split .*ids \[1\]"):
        evaluation.refuse_overlap(coco_ckpt, "karpathy", root, "test", allow=False)
    with pytest.raises(SystemExit, match="2 images of coco val are in"):
        evaluation.refuse_overlap(karpathy_ckpt, "coco", root, "val", allow=False)
    evaluation.refuse_overlap(coco_ckpt, "coco", root, "val", allow=False)          # disjoint: fine
    evaluation.refuse_overlap(karpathy_ckpt, "karpathy", root, "test", allow=False)
    evaluation.refuse_overlap(coco_ckpt, "karpathy", root, "test", allow=True)      # on purpose
    with pytest.raises(SystemExit, match="cannot check .*--allow-overlap"):
        evaluation.refuse_overlap({"data": {"source": "coco", "root": str(tmp_path / "gone")}},
                                  "coco", root, "val", allow=False)


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
# data folders and evaluation: nothing written over other data, every bad file named at once

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
