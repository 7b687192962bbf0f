"""train.py end to end on a small shapes set: both heads, exact resume, DDP, faults, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import train
from model import CLIP, config_from_dict

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 6  # 192 train images / batch 32


def flags(root, out, *extra):
    return ["--data-dir", str(root), "--out", str(out), "--batch-size", "32", "--warmup", "2",
            "--device", "cpu", "--eval-every", "1", *extra]  # a checkpoint every epoch


def weights(out):
    return torch.load(Path(out) / "ckpt.pt", weights_only=True)["model"]


@pytest.mark.parametrize("model", ["fdt", "clip"])
def test_end_to_end(shapes_root, tmp_path, model):
    metrics = train.main(flags(shapes_root, tmp_path, "--model", model, "--steps", "4"))
    for key in ("i2t_r1", "t2i_r10", "rsum", "zs_shape", "zs_colour", "zs_pair", "zs_heldout",
                "bind_swap_colour"):
        assert 0 <= metrics[key] <= (600 if key == "rsum" else 100)
    assert ("active_image" in metrics) == (model == "fdt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)   # no pickled objects inside
    assert ckpt["step"] == 4 and ckpt["model_config"]["head"] == model
    tokenizer = data.Tokenizer.from_state_dict(ckpt["tokenizer"])
    assert tokenizer.vocab_size == ckpt["model_config"]["vocab_size"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["kind"] == "train")
    assert (tmp_path / "curves.png").stat().st_size > 5000
    assert (json.loads((tmp_path / "config.json").read_text())["model"]["head"]
            == ckpt["model_config"]["head"])


def test_resume_after_ctrl_c_is_exact(shapes_root, tmp_path, monkeypatch):
    # crosses an epoch boundary (evaluation, checkpoint)
    n = STEPS_PER_EPOCH + 2
    train.main(flags(shapes_root, tmp_path / "straight", "--steps", str(n)))

    real_lr_at = train.lr_at
    def ctrl_c_at_step_3(step, *args):
        if step == 3:
            signal.raise_signal(signal.SIGINT)     # a real Ctrl-C, mid-epoch
        return real_lr_at(step, *args)
    monkeypatch.setattr(train, "lr_at", ctrl_c_at_step_3)
    with pytest.raises(SystemExit) as stop:
        train.main(flags(shapes_root, tmp_path / "split", "--steps", str(n)))
    assert stop.value.code == 130
    # step 3 finished
    assert torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    train.main(flags(shapes_root, tmp_path / "split", "--steps", str(n), "--resume"))

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ddp_two_processes_equal_one(shapes_root, tmp_path, last_error):
    """torchrun with 2 CPU processes (gloo) on the global batch of 32 = 1 process on the same
    batch, over one step: the loss over the gathered embeddings, the gradients summed over
    processes, the stem's BatchNorm over the global batch. Later steps are not compared: Adam
    turns float noise in near-zero gradients into steps of +-lr, which then spread."""
    base = flags(shapes_root, tmp_path / "one", "--steps", "1")
    train.main(base)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train.py"), *flags(shapes_root, tmp_path / "two", "--steps", "1")]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, last_error(result.stderr)
    logged = {}
    for run in ("one", "two"):
        records = [json.loads(line)
                   for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        logged[run] = [(r["loss"], r["grad_norm"], r["lr"])
                       for r in records if r["kind"] == "train"]
    assert len(logged["one"]) == 1   # step 1
    (loss_one, norm_one, lr), (loss_two, norm_two, _) = logged["one"][0], logged["two"][0]
    assert loss_one == pytest.approx(loss_two, rel=1e-5)
    # the BatchNorm sums its statistics over processes: another order of float additions
    assert norm_one == pytest.approx(norm_two, rel=1e-4)
    # the weights after the step: Adam's first step is about lr x sign(gradient), so an element
    # whose true gradient is ~0 may step the other way (a difference of up to 2 lr); every other
    # element must agree
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.max() <= 2 * lr * 1.01
    assert (diff < 1e-5).float().mean() > 0.999


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(shapes_root, tmp_path, monkeypatch):
    real_loss = train.contrastive_loss
    calls = []
    def loss_goes_nan_at_step_7(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) == 8 else loss
    monkeypatch.setattr(train, "contrastive_loss", loss_goes_nan_at_step_7)
    with pytest.raises(SystemExit, match=r"non-finite loss .* at step 7; the last good checkpoint "
                                         r"is .*ckpt.pt \(step 6\)"):
        train.main(flags(shapes_root, tmp_path, "--steps", "8"))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == STEPS_PER_EPOCH


def test_mismatched_resume_names_every_difference(shapes_root, tmp_path):
    train.main(flags(shapes_root, tmp_path, "--steps", "1"))
    with pytest.raises(SystemExit) as e:
        train.main(flags(shapes_root, tmp_path, "--steps", "1", "--n-fdt", "256", "--seed", "1",
                         "--amp", "bf16", "--grad-clip", "0.5", "--model", "clip", "--resume"))
    lines = str(e.value).splitlines()
    assert lines[0] == "error: cannot resume: the checkpoint was trained with other settings:"
    assert sorted(line.strip() for line in lines[1:]) == sorted([
        "model.n_fdt: checkpoint 1024, now 256", "model.head: checkpoint 'fdt', now 'clip'",
        "seed: checkpoint 0, now 1", "amp: checkpoint 'off', now 'bf16'",
        "grad_clip: checkpoint 1.0, now 0.5"])
    other = tmp_path.parent / (tmp_path.name + "-copy")    # new modification times: cp -r
    shutil.copytree(shapes_root, other, copy_function=shutil.copy)
    with pytest.raises(SystemExit, match=r"train_data: the training split changed since the "
                                         r"checkpoint: images rewritten \(other modification "
                                         r"times\)$"):
        train.main(flags(other, tmp_path, "--steps", "1", "--resume"))


def test_extend_a_finished_run_on_purpose(shapes_root, tmp_path):
    train.main(flags(shapes_root, tmp_path, "--steps", "2"))
    with pytest.raises(SystemExit, match=r"total_steps: checkpoint 2, now 4 \(pass --extend"):
        train.main(flags(shapes_root, tmp_path, "--steps", "4", "--resume"))
    metrics = train.main(flags(shapes_root, tmp_path, "--steps", "4", "--resume", "--extend"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["settings"]["total_steps"] == 4 and "rsum" in metrics
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 4]
    with pytest.raises(SystemExit, match="past the 3 steps"):
        train.main(flags(shapes_root, tmp_path, "--steps", "3", "--resume", "--extend"))


def test_fewer_images_than_a_batch_is_a_clear_error(shapes_root, tmp_path):
    with pytest.raises(SystemExit, match="fewer than one batch"):
        train.main(flags(shapes_root, tmp_path, "--batch-size", "1024"))


def test_missing_coco_says_how_to_get_it(tmp_path):
    with pytest.raises(SystemExit, match="tools.prepare_coco"):
        train.main(["--data", "coco", "--data-dir", str(tmp_path / "nowhere"), "--device", "cpu"])


def test_lr_schedule():
    assert train.lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert train.lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert train.lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert train.lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)


def test_paper_recipe_is_the_official_configuration():
    args = train.parse_args(["--recipe", "paper"])
    official = {"preset": "base", "epochs": 32, "batch_size": 1024, "lr": 1e-3, "warmup": 2500,
                "warmup_from": 1e-4, "grad_clip": 0.0, "logit_scale_min": 3.0,
                "logit_scale_max": 6.0, "freeze_patch_embed": True, "augment": "mocov2",
                "amp": "off", "fdt_temperature": 1000.0, "weight_decay": 0.1}
    assert {k: getattr(args, k) for k in official} == official
    assert args.logit_scale_init == pytest.approx(1 / 0.07)
    # a flag wins
    assert train.parse_args(["--recipe", "paper", "--batch-size", "256"]).batch_size == 256
    ours = train.parse_args([])
    assert ((ours.preset, ours.augment, ours.grad_clip, ours.warmup_from)
            == ("tiny", "none", 1.0, 0.0))


def test_warmup_from_a_start_lr():
    assert train.lr_at(0, 86560, 2500, 1e-3, 1e-4) == pytest.approx(1e-4 + 9e-4 / 2500)
    assert train.lr_at(1249, 86560, 2500, 1e-3, 1e-4) == pytest.approx(1e-4 + 9e-4 * 0.5)
    assert train.lr_at(2499, 86560, 2500, 1e-3, 1e-4) == pytest.approx(1e-3)
    assert train.lr_at(86560, 86560, 2500, 1e-3, 1e-4) == pytest.approx(0.0, abs=1e-12)


def test_recipe_mechanics_frozen_stem_clamp_and_no_clipping(shapes_root, tmp_path, monkeypatch):
    max_norms = []
    real_clip = torch.nn.utils.clip_grad_norm_
    def recording_clip(params, max_norm, *args, **kwargs):
        max_norms.append(max_norm)
        return real_clip(params, max_norm, *args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    train.main(flags(shapes_root, tmp_path, "--steps", "2", "--freeze-patch-embed",
                     "--grad-clip", "0", "--logit-scale-init", "50", "--logit-scale-min", "3",
                     "--logit-scale-max", "3.5", "--augment", "mocov2"))
    assert max_norms == [float("inf")] * 2                                # no gradient clipping
    trained = weights(tmp_path)
    # ln 50 = 3.9, clamped at 3.5
    assert 3.45 < trained["logit_scale"].item() <= 3.5
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    # the run's initial weights
    torch.manual_seed(0)
    fresh = CLIP(config_from_dict(ckpt["model_config"]))
    # the stem's weights (not BatchNorm's running statistics, which are not trained)
    stem = [k for k, _ in fresh.named_parameters() if k.startswith("visual.patch_embed")]
    fresh = fresh.state_dict()
    # frozen at its initialisation
    assert stem and all(torch.equal(trained[k], fresh[k]) for k in stem)
    assert not torch.equal(trained["visual.pos"], fresh["visual.pos"])    # the rest trains


def test_the_readable_fdt_trains_as_the_fast_one(shapes_root, tmp_path):
    """--no-fast-fdt trains fdt.FDT as written; the fast kernels give the same run (to rounding)."""
    runs = {}
    for name, flag in (("fast", "--fast-fdt"), ("plain", "--no-fast-fdt")):
        train.main(flags(shapes_root, tmp_path / name, "--steps", "3", flag))
        records = [json.loads(line)
                   for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [v for r in records if r["kind"] == "train"
                      for v in (r["loss"], r["grad_norm"])]
        ckpt = torch.load(tmp_path / name / "ckpt.pt", weights_only=True)
        assert ckpt["model_config"]["fast_fdt"] == (name == "fast")
    assert runs["fast"] == pytest.approx(runs["plain"], rel=1e-4)
    a, b = weights(tmp_path / "fast"), weights(tmp_path / "plain")
    assert max((a[k] - b[k]).abs().max() for k in a) < 3e-3
