"""What a GPU run depends on, checked on the CPU: no value read back to the host in a training
step, one graph under torch.compile, the fp16 loss scale, device-only augmentation, TF32 and the
DDP timeout, and (2 gloo processes) one cache build and one stopping step for all ranks."""

import math
import os
import subprocess
import sys
import traceback
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fdt
from lib import augment, fdt_fast, shapes
import train
from model import CLIP, PRESETS, contrastive_loss

REPO = Path(__file__).resolve().parents[1]


def flags(root, out, *extra):
    return ["--data-dir", str(root), "--out", str(out), "--batch-size", "32", "--warmup", "2",
            "--device", "cpu", *extra]


# -----------------------------------------------------------------------------
# host reads: each one makes the host wait for every kernel queued on the GPU

# aten ops whose result the host must read: item / bool / int, data-dependent shapes, error checks
READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "masked_select", "unique",
         "_unique2", "unique_consecutive", "unique_dim", "_linalg_check_errors"}


class HostReads(TorchDispatchMode):
    """Records every op that reads a value back to the host (a boolean mask index is a nonzero).
    The CPU's AdamW reads its step count; on CUDA train.py uses the fused AdamW, which does not."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[1]
        indices = args[1] if name.startswith("index") and isinstance(args[1], (list, tuple)) else []
        masks = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        if name in READS or masks:
            frames = traceback.extract_stack()[:-1]
            if not any(f"torch{os.sep}optim{os.sep}" in f.filename for f in frames):
                here = next(f for f in reversed(frames) if str(REPO) in f.filename)
                self.reads.append(f"{name} at {Path(here.filename).name}:{here.lineno}")
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_nothing_back_and_feeds_contiguous_batches(shapes_root, tmp_path,
                                                                         monkeypatch):
    """Step 1 of a run as a GPU runs it (the CPU-only validity checks skipped): no host read, and
    images in the standard memory format (channels-last ones make channels-last conv gradients)."""
    monkeypatch.setattr(fdt, "can_read_on_host", lambda t: False, raising=False)
    mode, real_lr_at, inputs = HostReads(), train.lr_at, []

    def lr_at(step, *args):
        if step == 1:
            mode.__enter__()
        elif step == 2:
            mode.__exit__(None, None, None)
        return real_lr_at(step, *args)
    monkeypatch.setattr(train, "lr_at", lr_at)
    real_forward = CLIP.forward

    def forward(self, images, tokens):
        inputs.append(images)
        return real_forward(self, images, tokens)
    monkeypatch.setattr(CLIP, "forward", forward)
    train.main(flags(shapes_root, tmp_path, "--steps", "3", "--augment", "mocov2"))
    assert mode.reads == []
    assert len(inputs) >= 3 and all(x.is_contiguous() for x in inputs)


def test_the_fdt_layer_compiles_to_one_graph():
    layer = fdt_fast.FDT(256, 16, temperature=3.0)
    q = torch.randn(4, 7, 16, requires_grad=True)
    mask = torch.rand(4, 7, generator=torch.Generator().manual_seed(0)) < 0.6
    mask[:, 0] = True
    torch._dynamo.reset()
    # the custom autograd Functions' backward is traced with their forward: a break there shows too
    explained = torch._dynamo.explain(lambda q, mask: layer(q, mask)[1].pow(2).sum())(q, mask)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()


def test_augmentation_stays_on_the_batch_device():
    """On the meta device any read-back or copy to the CPU fails: crop and mocov2 have neither."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g).to("meta")
    for fn, n in ((augment.crop, 4), (augment.mocov2, augment.MOCOV2_DRAWS)):
        out = fn(images, torch.rand(4, n, generator=g))
        assert out.device.type == "meta" and out.shape == (4, 3, 32, 32)


def test_hue_basis_is_a_rotation_of_the_yiq_chroma_plane():
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    c, s = math.cos(0.3), math.sin(0.3)
    rotate = torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]])          # the chroma plane (I, Q)
    basis = augment.HUE_BASIS
    torch.testing.assert_close(basis[0] + c * basis[1] + s * basis[2],
                               torch.linalg.inv(to_yiq) @ rotate @ to_yiq, atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# fp16 loss scaling, TF32, the DDP timeout

def test_fp16_loss_scale_lets_the_first_steps_update_the_weights(shapes_root, tmp_path,
                                                                 monkeypatch):
    """train.py's GradScaler settings, replayed on the CPU (fp16 autocast, tiny preset): from the
    default scale 2**16 the first seven steps overflow and are skipped."""
    made = []

    class Stop(Exception):
        pass

    def recording_scaler(*args, **kwargs):
        made.append(kwargs)
        raise Stop
    monkeypatch.setattr(torch.amp, "GradScaler", recording_scaler)
    with pytest.raises(Stop):
        train.main(flags(shapes_root, tmp_path, "--steps", "1"))
    monkeypatch.undo()
    settings = {k: v for k, v in made[0].items() if k != "enabled"}

    torch.manual_seed(0)
    model = CLIP(replace(PRESETS["tiny"], vocab_size=60))
    optimizer = torch.optim.AdamW(train.param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.98))
    scaler = torch.amp.GradScaler("cpu", **settings)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 64, 64, generator=g)
    tokens = torch.randint(3, 60, (8, 32), generator=g)
    tokens[:, 12], tokens[:, 13:] = 2, 0                     # end of text, then pads
    before, scale = model.visual.pos.detach().clone(), scaler.get_scale()
    with torch.autocast("cpu", dtype=torch.float16):
        image_emb, text_emb, _, _, _ = model(images, tokens)
    scaler.scale(contrastive_loss(image_emb, text_emb, model.logit_scale)).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == scale                       # no overflow
    assert not torch.equal(model.visual.pos, before)         # the first step was taken, not skipped


def test_tf32_on_cuda_and_a_long_ddp_timeout(monkeypatch):
    """setup_processes turns TF32 on for a CUDA device, and gives the process group an hour: rank 0
    checkpoints and evaluates while the others wait (NCCL's default is 10 minutes)."""
    # conftest's restore_globals puts the flags back (monkeypatch cannot: torch serves them through
    # a module __getattr__)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    monkeypatch.setattr("lib.flags.pick_device", lambda name: torch.device(name))  # no GPU needed
    train.setup_processes(train.parse_args(["--device", "cuda"]))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    train.setup_processes(train.parse_args(["--device", "cpu"]))
    assert not torch.backends.cuda.matmul.allow_tf32

    calls = []
    monkeypatch.setattr(train.dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    train.setup_processes(train.parse_args(["--device", "cpu"]))
    assert calls and calls[0][1].get("timeout", timedelta(0)) >= timedelta(hours=1)


# -----------------------------------------------------------------------------
# two processes (gloo, as torchrun runs NCCL on GPUs)

RANK_HOOKS = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import data, train
rank, marks = os.environ["RANK"], {marks!r}
real_decode, real_lr_at = data._decode_or_error, train.lr_at

def decode(*args, **kwargs):          # which ranks decode images into a cache
    open(os.path.join(marks, "decoded-by-rank" + rank), "w").close()
    return real_decode(*args, **kwargs)

def lr_at(step, *args):               # Ctrl-C reaches rank 1 alone, at step 3
    if step == 3 and rank == "1":
        signal.raise_signal(signal.SIGINT)
    return real_lr_at(step, *args)
data._decode_or_error, train.lr_at = decode, lr_at
train.main(sys.argv[1:])
"""


def test_two_ranks_build_the_cache_once_and_stop_at_one_step(tmp_path, last_error):
    root = shapes.prepare(tmp_path / "shapes", n_train=192, n_val=30, n_test_per_pair=1)
    marks = tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "ranks.py"
    script.write_text(RANK_HOOKS.format(repo=str(REPO), marks=str(marks)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), *flags(root, tmp_path / "run", "--steps", "30", "--eval-every", "100")]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    decoded = sorted(p.name for p in marks.iterdir())
    assert decoded == ["decoded-by-rank0"], last_error(result.stderr)
    assert not list((root / "cache").glob("*.tmp*"))
    # both ranks stop after step 10, the first logging step after the Ctrl-C, and exit with 130
    assert "interrupted (SIGINT) at step 10" in result.stdout + result.stderr, last_error(
        result.stderr)
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 10
    assert result.returncode != 0                             # SystemExit(130) on both ranks
