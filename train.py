"""Train CLIP+FDT (or the CLIP baseline) on image-caption pairs.

    python train.py                                  # FDT, tiny preset, the built-in shapes world
    python train.py --model clip                     # the baseline, everything else identical
    python train.py --data coco --data-dir data/coco --preset small --epochs 10
    torchrun --nproc_per_node=8 train.py --data coco --data-dir data/coco --recipe paper

Every default is in DEFAULTS below, and what `--recipe paper` changes (the official
configuration) in PAPER. Then one flat loop in the spirit of nanoGPT's train.py: AdamW (betas
0.9 / 0.98, no weight decay on norms, biases and the logit scale, as in CLIP and the FDT paper),
linear warm-up then cosine decay, gradient clipping, bf16 / fp16 autocast, an atomic checkpoint
and an evaluation every --eval-every epochs and at the end (a checkpoint on Ctrl-C or SIGTERM),
exact resume, and DistributedDataParallel with a contrastive loss over the global batch.
"""

import argparse
import fcntl
import hashlib
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
# evaluate() at every checkpoint: read it as a black box here, in eval.py / lib/metrics.py next
import eval as evaluation
from lib import augment, figures, shapes
from lib.metrics import active_tokens
from model import (CLIP, PRESETS, contrastive_loss, load_checkpoint, load_weights, save_checkpoint,
                   word_loss)

# -----------------------------------------------------------------------------
# every default, in one place. DEFAULTS trains the tiny model on the shapes world on a 2-core CPU;
# PAPER is what `--recipe paper` changes: the official FDT configuration (github
# yuxiaochen1103/FDT, example/clip_fdt/config_cc3m.yaml and train_solver.py). A flag given on the
# command line wins over both. Model sizes are named presets (model.PRESETS); the FDT settings
# that are None here keep the preset's value.

DEFAULTS = dict(
    data="shapes",          # shapes: generated on first use; coco: COCO 2017; karpathy: its splits
    data_dir=None,          # None: data/<data>
    preset="tiny",          # tiny (CPU, 64 px), small (one GPU, 128 px), base (ViT-B/32, 224 px)
    model="fdt",            # fdt: CLIP+FDT; clip: the same towers with a projection head
    epochs=6,               # 936 steps on shapes: shape needs them (results/README.md)
    steps=None,             # total optimiser steps; None: epochs x steps per epoch
    batch_size=128,         # global, over all processes
    lr=1e-3,                # peak learning rate
    weight_decay=0.1,       # CLIP's and the paper's; never on norms, biases or the logit scale
    warmup=100,             # steps of linear warm-up from warmup_from to lr
    warmup_from=0.0,
    grad_clip=1.0,          # max gradient norm; 0: off (the paper clamps the logit scale instead)
    logit_scale_min=0.0,    # clamp of the log inverse temperature after every step
    logit_scale_max=math.log(100),  # CLIP's cap
    freeze_patch_embed=False,
    amp=None,               # None: bf16 on CUDA, off on CPU
    compile=False,
    fdt_activation=None,    # None: the preset's (sparsemax; softmax is the paper's ablation)
    fast_fdt=None,          # None: the preset's (True: lib/fdt_fast.py; False: fdt.py as written)
    n_fdt=None,
    fdt_temperature=None,
    logit_scale_init=None,
    word_loss=1.0,          # weight of model.word_loss, the image predicting its caption's words:
                            # CLIP+FDT binds shape and retrieves better with it (results/README.md)
    augment=None,           # None: none for shapes (its captions say where things are: a crop
                            # would move them), crop otherwise
    batching="grouped",     # grouped: a shapes scene and its edits share a batch (lib/shapes.py)
    seed=0,
    out=None,               # None: runs/<data>-<model>-<preset>
    device=None,            # None: cuda when there is one
    workers=0,              # data loader read-ahead threads
    eval_every=2,           # checkpoint and evaluate every N epochs (and at the end)
)
PAPER = dict(preset="base", epochs=32, batch_size=1024, warmup=2500, warmup_from=1e-4,
             grad_clip=0.0, logit_scale_min=3.0, logit_scale_max=6.0, freeze_patch_embed=True,
             augment="mocov2", amp="off", fdt_temperature=1000.0, logit_scale_init=1 / 0.07,
             word_loss=0.0)


def number(kind, low=-math.inf, high=math.inf, low_open=False):
    """argparse type: a finite int or float in [low, high] ((low, high] with low_open). A check
    such as `x <= 0` lets nan through (every comparison with nan is False), so nan and inf are
    refused here, once for every numeric flag, with the values out of range."""
    what = "an integer" if kind is int else "a finite number"
    bounds = " and ".join(([f"> {low}" if low_open else f">= {low}"] if low > -math.inf else [])
                          + ([f"<= {high}"] if high < math.inf else []))

    def parse(text):
        try:
            x = kind(text)
            ok = math.isfinite(x) and (low < x if low_open else low <= x) and x <= high
        except (ValueError, OverflowError):
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what} {bounds}".rstrip()
                                             + f", got {text!r}")
        return x
    return parse


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--recipe", choices=["default", "paper"], default="default",
        help="DEFAULTS in train.py, or those with PAPER's changes (the official configuration)")
    add("--data", choices=["shapes", "coco", "karpathy"])
    add("--data-dir", help="dataset root")
    add("--preset", choices=sorted(PRESETS), help="model size (model.PRESETS)")
    add("--model", choices=["fdt", "clip"], help="the FDT head or the CLIP projection head")
    add("--epochs", type=number(int, 1), help="passes over the training set (ignored with --steps)")
    add("--steps", type=number(int, 1), help="total optimiser steps")
    add("--batch-size", type=number(int, 1), help="global batch size, over all processes")
    add("--lr", type=number(float, 0, 1, low_open=True), help="peak learning rate")
    add("--weight-decay", type=number(float, 0))
    add("--warmup", type=number(int, 0), help="linear warm-up steps")
    add("--warmup-from", type=number(float, 0, 1), help="learning rate at step 0 of the warm-up")
    add("--grad-clip", type=number(float, 0), help="max gradient norm (0: off)")
    add("--logit-scale-min", type=number(float), help="lower clamp of the log inverse temperature")
    add("--logit-scale-max", type=number(float), help="upper clamp of the log inverse temperature")
    add("--freeze-patch-embed", action=argparse.BooleanOptionalAction,
        help="keep the ViT's patch embedding at its initialisation")
    add("--amp", choices=["bf16", "fp16", "off"], help="autocast precision")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    add("--fdt-activation", choices=["sparsemax", "softmax"])
    add("--fast-fdt", action=argparse.BooleanOptionalAction,
        help="the exact fast FDT kernels (lib/fdt_fast.py), or fdt.py as written")
    add("--n-fdt", type=number(int, 1), help="number of FDT tokens")
    add("--fdt-temperature", type=number(float, 0, low_open=True))
    add("--logit-scale-init", type=number(float, 0, low_open=True),
        help="initial inverse temperature")
    add("--word-loss", type=number(float, 0), help="weight of the caption-word loss (0: off)")
    add("--augment", choices=["crop", "mocov2", "none"],
        help="a mild random resized crop, or MoCo v2's augmentation (the paper's)")
    add("--batching", choices=["grouped", "random"])
    add("--seed", type=number(int, 0, 2**32 - 1))
    add("--out", help="run folder")
    add("--resume", action="store_true", help="continue from <out>/ckpt.pt with the same settings")
    add("--overwrite", action="store_true",
        help="start afresh in an --out that holds a checkpoint, replacing it")
    add("--extend", action="store_true",
        help="with --resume: allow a longer (or shorter) run than the checkpoint's; "
             "the schedule is recomputed for the new length, so the result differs from a run of "
             "that length")
    add("--device", help="cpu, cuda, cuda:1 ...")
    add("--workers", type=number(int, 0), help="data loader read-ahead threads")
    add("--eval-every", type=number(int, 1), help="checkpoint and evaluate every N epochs")
    args = p.parse_args(argv)
    for key, value in (DEFAULTS | (PAPER if args.recipe == "paper" else {})).items():
        if getattr(args, key) is None:          # not given on the command line
            setattr(args, key, value)
    if args.logit_scale_min > args.logit_scale_max:
        p.error("--logit-scale-min is above --logit-scale-max")
    if args.extend and not args.resume:
        p.error("--extend only makes sense with --resume")
    if args.overwrite and args.resume:
        p.error("--overwrite starts afresh and --resume continues: pass one of them")
    if args.n_fdt is not None:   # refused before an allocation that would fail or swap
        need = args.n_fdt * PRESETS[args.preset].embed_dim * 4 * 4  # fp32: weights, grad, Adam x 2
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > ram:
            p.error(f"--n-fdt {args.n_fdt}: the FDT tokens alone need {need / 2**30:.0f} GiB "
                    f"(weights, gradient and AdamW's two states); this machine has "
                    f"{ram / 2**30:.0f} GiB")
    args.augment = args.augment or ("none" if args.data == "shapes" else "crop")
    args.data_dir = args.data_dir or f"data/{args.data}"
    args.out = args.out or f"runs/{args.data}-{args.model}-{args.preset}"
    return args


# -----------------------------------------------------------------------------
# the pieces of the loop: pure functions

def lr_at(step, total, warmup, peak, start=0.0):
    """Linear warm-up from `start` to `peak` over `warmup` steps, then cosine decay to 0 at
    `total`.

    Steps count from 0. Step s < warmup has start + (peak - start) * (s + 1) / warmup: step 0
    already trains, step warmup - 1 is the first at peak; with warmup 0 training starts at peak.
    From step warmup the cosine falls from peak to 0 at step total and stays 0 after it."""
    if step < warmup:
        return start + (peak - start) * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model, weight_decay):
    """No weight decay on norms, biases and the logit scale (every parameter with < 2 dims); the
    FDT tokens (2-D) are decayed, as in the official code. Frozen parameters are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def global_contrastive_loss(image_emb, text_emb, logit_scale, rank, world_size):
    """This process's share of the contrastive loss over the global batch: its b rows against all
    world * b rows, gathered with gradients (open_clip's gather_with_grad + local_loss). DDP's mean
    of the processes' gradients is then exactly the 1-process gradient of the global batch."""
    if world_size == 1:
        return contrastive_loss(image_emb, text_emb, logit_scale)
    # (world * b, D), in global batch order
    all_image = torch.cat(dist_nn.all_gather(image_emb))
    all_text = torch.cat(dist_nn.all_gather(text_emb))
    return contrastive_loss(image_emb, text_emb, logit_scale, all_image, all_text,
                            offset=rank * image_emb.shape[0])


def model_input(images, args, step, local):
    """uint8 batch -> normalised float, augmented as --augment says. The random draws are for the
    global batch, from (seed, step), this process's rows kept: a resumed run redraws the same
    augmentation and N processes augment exactly as one process would."""
    if args.augment == "none":
        return data.preprocess(images)
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    if args.augment == "crop":
        return augment.crop(images, torch.rand(args.batch_size, 4, generator=g)[local])
    return augment.mocov2(images,
                          torch.rand(args.batch_size, augment.MOCOV2_DRAWS, generator=g)[local])


# -----------------------------------------------------------------------------
# setup, checkpoints, resume

def check_paths(args):
    """Mistakes in --out and --data-dir, each refused in one line before anything is read or
    written. A run folder that holds a checkpoint is only continued (--resume) or, when asked,
    replaced (--overwrite): starting afresh in it would overwrite ckpt.pt and metrics.jsonl."""
    out, root = Path(args.out), Path(args.data_dir)
    if root.exists() and not root.is_dir():
        raise SystemExit(f"error: --data-dir {root} is a file; pass the dataset's folder")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == out else f"is under {existing}, which is a file"
        raise SystemExit(f"error: --out {out} {where}; pass a folder for the run")
    ckpt_path = out / "ckpt.pt"
    if args.resume and not ckpt_path.exists():
        raise SystemExit(f"error: --resume: there is no checkpoint at {ckpt_path}; "
                         "check --out, or start the run without --resume")
    if ckpt_path.exists() and not (args.resume or args.overwrite):
        raise SystemExit(f"error: {out} already holds a run (its checkpoint {ckpt_path}): continue "
                         "it with --resume, or pass another --out (--overwrite replaces it)")


def pick_device(name):
    """--device as a torch.device, refused in one line when this machine has no such device."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    count = {"cpu": 1, "cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
             "mps": int(torch.backends.mps.is_available())}
    if device is None or device.type not in count:
        raise SystemExit(f"error: --device {name!r} is not a device; "
                         "expected cpu, cuda, cuda:N or mps")
    n = count[device.type]
    if (device.index or 0) >= n:
        has = f"no {device.type} device" if n == 0 else f"{device.type}:0 to {device.type}:{n - 1}"
        raise SystemExit(f"error: --device {name}: this machine has {has}; use --device cpu")
    return device


def setup_processes(args):
    """-> device, rank, world_size. torchrun sets WORLD_SIZE, RANK and LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = pick_device(args.device)
    if device.type == "cuda":
        # TF32 for float32 matmuls and convolutions (float32's range, a 10-bit mantissa): without it
        # a float32 run (--amp off, the paper recipe) does every matmul at a fraction of the speed
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        # the other ranks wait at a barrier while rank 0 checkpoints and evaluates: that can take
        # longer than NCCL's 10-minute default timeout (COCO's 25k val captions at base)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=1))
    if args.batch_size % world_size:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by "
                         f"{world_size} processes")
    return device, rank, world_size


@contextmanager
def locked_run_folder(out):
    """An exclusive lock on <out>/lock while the run lasts: a second run on the same folder would
    interleave checkpoints. The OS drops the lock when the process dies, even by kill -9."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / "lock", "w")
    except OSError as e:
        raise SystemExit(f"error: cannot write in --out {out} ({e.strerror}); "
                         "pass another --out") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: another training run is using {out} "
                             f"(it holds {out / 'lock'}); "
                             "wait for it to finish, or pass another --out") from None
        yield


def model_config(args, vocab_size):
    """The preset, with the model flags given."""
    overrides = {"head": args.model, "vocab_size": vocab_size, "word_head": args.word_loss > 0}
    for key in ("fdt_activation", "fast_fdt", "n_fdt", "fdt_temperature", "logit_scale_init"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    return replace(PRESETS[args.preset], **overrides)


def data_fingerprint(cs, root):
    """What a resumed run must find again in its training split: its image files (names within
    the data folder, sizes) and its captions, each as a short hash."""
    def digest(obj):
        return hashlib.sha1(json.dumps(obj).encode()).hexdigest()[:16]
    return {"images": len(cs.image_files),
            "file names": digest([os.path.relpath(f, root) for f in cs.image_files]),
            "file sizes": digest([os.path.getsize(f) for f in cs.image_files]),
            "captions": digest(cs.captions)}


def run_settings(args, config):
    """Every setting that changes the result and needs no data: a resumed run must have the same
    ones (and the same total_steps and train_data, added once the data is read)."""
    return {"model": asdict(config), "data": args.data,
            "data_dir": str(Path(args.data_dir).resolve()),
            "batch_size": args.batch_size, "seed": args.seed, "lr": args.lr, "warmup": args.warmup,
            "warmup_from": args.warmup_from, "weight_decay": args.weight_decay,
            "grad_clip": args.grad_clip,
            "logit_scale_min": args.logit_scale_min, "logit_scale_max": args.logit_scale_max,
            "freeze_patch_embed": args.freeze_patch_embed, "amp": args.amp, "augment": args.augment,
            "batching": args.batching, "word_loss": args.word_loss}


def check_resumable(ckpt, settings, extend):
    """Resuming is exact only with the same settings: name every one that differs, one per line.
    With --extend the schedule length may differ (but not below the steps already done)."""
    stored = ckpt.get("settings", {})
    diffs = []
    for key, now in settings.items():
        if key == "model":
            # fast_fdt may differ: both kernels compute the same (tests/test_train.py)
            diffs += [f"model.{k}: checkpoint {stored.get('model', {}).get(k)!r}, now {v!r}"
                      for k, v in now.items() if stored.get("model", {}).get(k) != v
                      and k != "fast_fdt"]
        elif key == "train_data":   # checkpoints written before it was recorded have none
            changed = [k for k in now if key in stored and stored[key].get(k) != now[k]]
            if changed:
                diffs.append("train_data: the training split changed since the checkpoint: "
                             + ", ".join(f"images {stored[key][k]} -> {now[k]}" if k == "images"
                                         else f"other {k}" for k in changed))
        elif stored.get(key) != now and not (key == "total_steps" and extend):
            hint = " (pass --extend to train for another length)" if key == "total_steps" else ""
            diffs.append(f"{key}: checkpoint {stored.get(key)!r}, now {now!r}{hint}")
    if diffs:
        raise SystemExit("error: cannot resume: the checkpoint was trained with other settings:\n  "
                         + "\n  ".join(diffs))
    if settings.get("total_steps", math.inf) < ckpt["step"]:
        raise SystemExit(f"error: the checkpoint is at step {ckpt['step']}, "
                         f"past the {settings['total_steps']} steps asked for")


def read_history(out, step):
    """metrics.jsonl up to `step` (the checkpoint's): it is written right after each checkpoint.
    A damaged line stops the resume instead of being skipped: the file is rewritten at the next
    checkpoint, and a skipped line would be lost with it."""
    metrics, history = out / "metrics.jsonl", []
    if not metrics.exists():
        return history
    for n, line in enumerate(metrics.read_bytes().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:          # not JSON, or not UTF-8
            record = None
        if not (isinstance(record, dict) and record.get("kind") in ("train", "eval")
                and isinstance(record.get("step"), int)):
            raise SystemExit(f"error: cannot resume: {metrics} line {n} is not a metrics record "
                             f"({line[:60]!r}); repair or delete that line (the checkpoint is "
                             "intact)")
        if record["step"] <= step:
            history.append(record)
    return history


def write_history(out, history):
    data.write_atomic(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    figures.plot_history(history, out / "curves.png")


# -----------------------------------------------------------------------------
# the run

def main(argv=None):
    args = parse_args(argv)
    check_paths(args)
    device, rank, world_size = setup_processes(args)
    with locked_run_folder(Path(args.out)) if rank == 0 else nullcontext():
        return run(args, device, rank, world_size)


def run(args, device, rank, world_size):
    master = rank == 0
    amp = args.amp or ("bf16" if device.type == "cuda" else "off")
    if amp == "fp16" and device.type != "cuda":
        raise SystemExit("--amp fp16 needs CUDA; use --amp bf16 or off on CPU")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    args.amp = amp
    out, root, preset = Path(args.out), Path(args.data_dir), PRESETS[args.preset]
    ckpt_path = out / "ckpt.pt"

    # --- resume: the checkpoint, its history and every setting that needs no data are checked
    # before any data is read: a wrong flag costs seconds, not a cache build
    ckpt, history = None, []
    if args.resume:
        with data.clear_errors("cannot resume: "):
            ckpt = load_checkpoint(ckpt_path, map_location="cpu")
            tokenizer = data.Tokenizer.from_state_dict(ckpt["tokenizer"])
        config = model_config(args, tokenizer.vocab_size)
        check_resumable(ckpt, run_settings(args, config), args.extend)
        history = read_history(out, ckpt["step"])

    # --- data: every split the run reads is checked (and cached) before the first step ----------
    with data.clear_errors():  # a folder of other data, missing or unreadable files: one message
        if args.data == "shapes" and master and not shapes.ready(root):
            shapes.prepare(root)
        if master:  # rank 0 alone builds the image caches: N ranks would each decode and write one
            splits = ["train", evaluation.EVAL_SPLIT[args.data]]
            splits += ["zeroshot"] if args.data == "shapes" else []
            # every problem of every split in one report
            train_set = data.load_splits(args.data, root, splits, preset.image_size)[0]
        if world_size > 1:
            dist.barrier()                          # the others wait for the data and its caches
        if not master:
            train_set = data.load_split(args.data, root, "train", preset.image_size)
        if ckpt is None:
            captions = (c for caps in train_set.captions for c in caps)
            tokenizer = data.Tokenizer.build(captions, preset.context_length)
        loader = data.TrainLoader(train_set, tokenizer, args.batch_size, seed=args.seed, rank=rank,
                                  world_size=world_size, num_workers=args.workers,
                                  grouped=args.batching == "grouped")

    # --- model, optimiser, resume ------------------------------------------------
    config = model_config(args, tokenizer.vocab_size)
    torch.manual_seed(args.seed)                    # same initial weights on every rank
    model = CLIP(config).to(device)
    model.visual.patch_embed.requires_grad_(not args.freeze_patch_embed)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.98), eps=1e-8, fused=device.type == "cuda")
    # bf16 needs no loss scaling. fp16 starts at 2**10, not the default 2**16: from there the
    # first six steps' gradients overflow and are skipped (the tiny preset on shapes)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, enabled=amp == "fp16")
    steps_per_epoch = len(loader)
    total_steps = args.steps or args.epochs * steps_per_epoch
    settings = run_settings(args, config) | {"total_steps": total_steps,
                                              "train_data": data_fingerprint(train_set, root)}
    step, saved = 0, None          # saved: the step of the checkpoint this run can go back to
    if ckpt is not None:
        check_resumable(ckpt, settings, args.extend)
        try:
            load_weights(model, ckpt["model"])
        except ValueError as e:
            raise SystemExit(f"error: cannot resume from {ckpt_path}: {e}") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step = saved = ckpt["step"]
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint():
        """The weights, optimiser and everything needed to resume, then the history up to here."""
        nonlocal saved
        save_checkpoint(ckpt_path, raw_model, tokenizer,
                        {"source": args.data, "root": str(root.resolve())},
                        step=step, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                        settings=settings)
        write_history(out, history)
        saved = step

    def evaluate():
        """Validation metrics, after the checkpoint: an error here loses no training."""
        raw_model.eval()
        try:
            metrics = evaluation.evaluate(raw_model, tokenizer, args.data, root, device)
        except KeyboardInterrupt:   # a second Ctrl-C or SIGTERM: only this evaluation is lost
            bar.write(f"stopped during the evaluation at step {step}; {ckpt_path} is saved: " + (
                f"training is finished; evaluate it with `python eval.py retrieval --ckpt "
                f"{ckpt_path}`" if step == total_steps else
                "run again with the same flags and --resume to continue"))
            raise SystemExit(128 + interrupted[0]) from None
        except Exception as e:
            raise SystemExit(f"error: the evaluation at step {step} failed "
                             f"({type(e).__name__}: {e}); "
                             f"the checkpoint {ckpt_path} is saved: fix the cause and run again "
                             "with --resume") from None
        raw_model.train()
        history.append({"kind": "eval", "step": step, "epoch": step / steps_per_epoch, **metrics})
        write_history(out, history)
        return metrics

    if master:
        (out / "config.json").write_text(json.dumps({"args": vars(args), "model": asdict(config),
                                                     "world_size": world_size}, indent=2))
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{args.model} | preset {args.preset} | {n_params / 1e6:.2f}M parameters "
              f"| {device} x {world_size} | amp {amp} | {len(train_set.images)} images "
              f"| {steps_per_epoch} steps/epoch | {total_steps} steps")
        if args.warmup > total_steps:
            last_lr = lr_at(total_steps - 1, total_steps, args.warmup, args.lr, args.warmup_from)
            print(f"warning: the run ends inside its warm-up (--warmup {args.warmup}, "
                  f"{total_steps} steps): the learning rate reaches {last_lr:.3g}, not --lr "
                  f"{args.lr:g}", file=sys.stderr)

    # --- the loop ----------------------------------------------------------------
    # Ctrl-C, or a scheduler's SIGTERM, finishes the current step, then checkpoints and exits with
    # 128 + the signal's number (130, 143), as a shell reports it: never a half-applied update
    interrupted = []

    def on_stop(signum, _):
        if interrupted:            # a second one: stop at once, keeping the last checkpoint
            raise KeyboardInterrupt
        interrupted.append(signum)
    previous_handlers = {s: signal.signal(s, on_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def all_stop():
        """The signal to stop on after this step (0: none). A signal reaches each process at its own
        step; they agree at logging steps (an all-reduce that the host waits for), so all stop at
        one step, on the same signal."""
        signum = interrupted[0] if interrupted else 0
        if world_size == 1:
            return signum
        if step % 10:
            return 0
        flag = torch.tensor(signum, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    bar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True)
    last_eval = next((h for h in reversed(history) if h["kind"] == "eval" and h["step"] == step),
                     {})
    last_eval = {k: v for k, v in last_eval.items() if k not in ("kind", "step", "epoch")}
    losses = []  # (step, loss on the device) since the last check

    def check_losses():
        """Stop on a non-finite loss, read here (before logging and checkpoints) rather than every
        step, where the host would wait for the device: a NaN can reach the weights, never a
        checkpoint. Every process calls it at the same steps, and all stop if one must (the
        others would wait for it in the next all-reduce)."""
        values = torch.stack([value for _, value in losses]).tolist() if losses else []
        bad = [(s, v) for (s, _), v in zip(losses, values) if not math.isfinite(v)]
        losses.clear()
        if world_size > 1:
            flag = torch.tensor(float(bool(bad)), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not bad:
                raise SystemExit("stopped: another process had a non-finite loss")
        if bad:
            raise SystemExit(f"stopped: non-finite loss ({bad[0][1]}) at step {bad[0][0]}; " + (
                f"the last good checkpoint is {ckpt_path} (step {saved})" if saved is not None
                else "no checkpoint was saved before it"))

    t_last, samples_since, stopped = time.time(), 0, 0
    try:
        for images, tokens in loader.stream(step):
            stopped = all_stop()
            if step == total_steps or stopped:
                break
            lr = lr_at(step, total_steps, args.warmup, args.lr, args.warmup_from)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if device.type == "cuda":  # pinned: the copies below do not wait for the GPU to finish
                images, tokens = images.pin_memory(), tokens.pin_memory()
            # .contiguous(): the loader's channels-last batches would make the conv weight
            # gradients channels-last, which DDP copies into its buckets every step
            images = images.to(device, non_blocking=True).contiguous()
            images = model_input(images, args, step, loader.local)
            tokens = tokens.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                image_emb, text_emb, image_w, text_w, word_logits = model(images, tokens)
            loss = global_contrastive_loss(image_emb, text_emb, raw_model.logit_scale, rank,
                                           world_size)
            words = None if word_logits is None else word_loss(word_logits, tokens)
            if words is not None:
                loss = loss + args.word_loss * words
            losses.append((step, loss.detach()))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                       args.grad_clip or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                raw_model.logit_scale.clamp_(args.logit_scale_min, args.logit_scale_max)
            step += 1
            samples_since += args.batch_size
            bar.update(1)

            if step % 10 == 0 or step == total_steps:  # logging reads values off the device: a sync
                check_losses()
                if world_size > 1:                    # log the global batch's loss
                    loss = loss.detach().clone()
                    dist.all_reduce(loss)
                    loss /= world_size
                record = {"kind": "train", "step": step, "epoch": step / steps_per_epoch,
                          "loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                          "logit_scale": raw_model.logit_scale.exp().item(),
                          "samples_per_s": samples_since / (time.time() - t_last)}
                if words is not None:   # this process's: the loss above includes it, weighted
                    record["word_loss"] = words.item()
                if image_w is not None:
                    record["active_image"] = active_tokens(image_w)
                    record["active_text"] = active_tokens(text_w)
                history.append(record)
                t_last, samples_since = time.time(), 0
                bar.set_postfix({k: f"{record[k]:.3g}" for k in
                                 ("loss", "lr", "logit_scale", "active_image", "samples_per_s")
                                 if k in record})
            if step == total_steps or (step % steps_per_epoch == 0
                                       and (step // steps_per_epoch) % args.eval_every == 0):
                check_losses()
                if master:
                    checkpoint()
                    last_eval = evaluate()
                    bar.write(f"step {step} | "
                              + " | ".join(f"{k} {v:.1f}" for k, v in last_eval.items()))
                if world_size > 1:
                    dist.barrier()
                saved = step                          # by rank 0, for every rank
        if stopped and step < total_steps:   # after the last step the run is complete
            check_losses()
            if master:
                checkpoint()
                bar.write(f"interrupted ({signal.Signals(stopped).name}) at step {step}: "
                          f"saved {ckpt_path}; run again with the same flags and --resume to "
                          "continue")
            if world_size > 1:
                dist.barrier()                       # the others wait for the checkpoint
            raise SystemExit(128 + stopped)
    finally:
        bar.close()
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        if world_size > 1:
            dist.destroy_process_group()

    if master:
        summary = " | ".join(f"{k} {v:.1f}" for k, v in last_eval.items())
        print(f"done: {step} steps | {summary}\n"
              f"checkpoint {ckpt_path} | curves {out / 'curves.png'}")
    return last_eval


if __name__ == "__main__":
    main()
