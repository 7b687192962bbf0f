"""lib/run_folder.py: the run folder's lock, resume compatibility, Ctrl-C and SIGTERM, non-finite
losses and a failed evaluation; each costs no more than the work since the last checkpoint."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import eval as evaluation
from lib import shapes
import train

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
# the folder: one run at a time, replaced only on purpose

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


def test_second_run_on_the_same_folder_refused(shapes_root, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    # what a running train.py holds
    with open(tmp_path / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match="another training run is using"):
            train.main(flags(shapes_root, tmp_path, "--steps", "1"))
    train.main(flags(shapes_root, tmp_path, "--steps", "1"))            # free again: runs


# -----------------------------------------------------------------------------
# resume: the same settings, the same data, the history intact

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


# -----------------------------------------------------------------------------
# stopping early: the checkpoint comes first

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


def test_non_finite_loss_before_any_checkpoint_names_none(shapes_root, tmp_path, monkeypatch):
    real_loss = train.contrastive_loss
    monkeypatch.setattr(train, "contrastive_loss", lambda *args: real_loss(*args) * float("nan"))
    with pytest.raises(SystemExit) as e:
        train.main(flags(shapes_root, tmp_path, "--model", "clip", "--steps", "2"))
    assert str(e.value) == ("stopped: non-finite loss (nan) at step 0; "
                            "no checkpoint was saved before it")
    assert not (tmp_path / "ckpt.pt").exists()


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
