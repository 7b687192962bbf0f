"""Train CLIP+FDT (or the CLIP baseline) on image-caption pairs.

    python train.py                                  # FDT, tiny preset, the built-in shapes world
    python train.py --model clip                     # the baseline, everything else identical
    python train.py --data coco --data-dir data/coco --preset small --epochs 10
    torchrun --nproc_per_node=8 train.py --data coco --data-dir data/coco --recipe paper

Every default is in DEFAULTS, what `--recipe paper` changes in PAPER; then the command line, the
pieces of a step, the set-up and the loop (`train`) in the order of a step: the learning rate, the
forward pass under autocast, the loss over the global batch, backward, clipping, the AdamW step,
logging, then a checkpoint and an evaluation every --eval-every epochs. Resume is exact; N processes
compute what one would. The guard rails sit one call away, in lib/flags.py (the flags) and
lib/run_folder.py (its lock, resume, Ctrl-C, SIGTERM, SIGHUP, non-finite losses, a full disk).
"""

import argparse
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
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
from lib import augment, flags, run_folder, shapes
from lib.data_checks import clear_errors
from lib.flags import EXP_MAX, number
from lib.metrics import active_tokens
from model import CLIP, PRESETS, contrastive_loss, save_checkpoint, word_loss

# -----------------------------------------------------------------------------
# every default, in one place. DEFAULTS trains the tiny model on the shapes world on a 2-core CPU;
# PAPER is what `--recipe paper` changes: the official FDT configuration (github yuxiaochen1103/FDT,
# example/clip_fdt/config_cc3m.yaml and train_solver.py). A flag given on the command line wins
# over both. Model sizes are named presets (model.PRESETS); FDT settings left None: the preset's.

DEFAULTS = dict(
    data="shapes",          # shapes: generated on first use; coco: COCO 2017; karpathy: its splits
    data_dir=None,          # None: data/<data>
    preset="tiny",          # tiny (CPU, 64 px), small (one GPU, 128 px), base (ViT-B/32, 224 px)
    model="fdt",            # fdt: CLIP+FDT; clip: the same towers with a projection head
    epochs=11,              # 1716 steps on shapes: shape needs them (results/README.md)
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
    eval_every=6,           # checkpoint and evaluate every N epochs (and at the end)
)
PAPER = dict(preset="base", epochs=32, batch_size=1024, warmup=2500, warmup_from=1e-4,
             grad_clip=0.0, logit_scale_min=3.0, logit_scale_max=6.0, freeze_patch_embed=True,
             augment="mocov2", amp="off", fdt_temperature=1000.0, logit_scale_init=1 / 0.07,
             word_loss=0.0)
LOG_EVERY = 10              # steps between logs, loss checks and the processes agreeing on a stop


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add, on_off = p.add_argument, argparse.BooleanOptionalAction
    add("--recipe", choices=["default", "paper"], default="default", help="paper: the official one")
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
    add("--logit-scale-min", type=number(float, -EXP_MAX, EXP_MAX), help="lower clamp of log 1/T")
    add("--logit-scale-max", type=number(float, -EXP_MAX, EXP_MAX), help="upper clamp of log 1/T")
    add("--freeze-patch-embed", action=on_off, help="keep the ViT's patch embedding as initialised")
    add("--amp", choices=["bf16", "fp16", "off"], help="autocast precision")
    add("--compile", action=on_off, help="torch.compile the model")
    add("--fdt-activation", choices=["sparsemax", "softmax"])
    add("--fast-fdt", action=on_off, help="lib/fdt_fast.py's exact kernels, or fdt.py as written")
    add("--n-fdt", type=number(int, 1), help="number of FDT tokens")
    add("--fdt-temperature", type=number(float, 0, low_open=True))
    add("--logit-scale-init", type=number(float, 0, low_open=True), help="initial 1 / temperature")
    add("--word-loss", type=number(float, 0), help="weight of the caption-word loss (0: off)")
    add("--augment", choices=["crop", "mocov2", "none"], help="mocov2: the paper's")
    add("--batching", choices=["grouped", "random"])
    add("--seed", type=number(int, 0, 2**32 - 1))
    add("--out", help="run folder")
    add("--resume", action="store_true", help="continue from <out>/ckpt.pt with the same settings")
    add("--overwrite", action="store_true", help="start afresh in an --out with a run or files")
    add("--extend", action="store_true", help="with --resume: another length than the checkpoint's "
        "(the schedule is recomputed: the result differs from a run of that length)")
    add("--device", help="cpu, cuda, cuda:1 ...")
    add("--workers", type=number(int, 0), help="data loader read-ahead threads")
    add("--eval-every", type=number(int, 1), help="checkpoint and evaluate every N epochs")
    args = p.parse_args(argv)
    for key, value in (DEFAULTS | (PAPER if args.recipe == "paper" else {})).items():
        if getattr(args, key) is None:          # not given on the command line
            setattr(args, key, value)
    flags.check(p, args, PRESETS[args.preset].embed_dim)
    args.augment = args.augment or ("none" if args.data == "shapes" else "crop")
    args.data_dir = args.data_dir or f"data/{args.data}"
    args.out = args.out or f"runs/{args.data}-{args.model}-{args.preset}"
    return args


# -----------------------------------------------------------------------------
# the pieces of a step: pure functions

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


def model_config(args, vocab_size):
    """The preset, with the model flags given."""
    overrides = {"head": args.model, "vocab_size": vocab_size, "word_head": args.word_loss > 0}
    for key in ("fdt_activation", "fast_fdt", "n_fdt", "fdt_temperature", "logit_scale_init"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    return replace(PRESETS[args.preset], **overrides)


# -----------------------------------------------------------------------------
# set-up: processes, data, model and optimiser

def setup_processes(args):
    """-> device, rank, world_size. torchrun sets WORLD_SIZE, RANK and LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = flags.pick_device(args.device)
    if device.type == "cuda":
        # TF32 (float32's range, a 10-bit mantissa): without it fp32 runs (the paper's) are slow
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        # the others wait while rank 0 evaluates, longer than NCCL's default 10 minutes on COCO
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=1))
    flags.check_batch(args.batch_size, world_size)
    args.amp = args.amp or ("bf16" if device.type == "cuda" else "off")
    flags.check_amp(args.amp, device)
    return device, rank, world_size


def load_data(args, tokenizer, rank, world_size):
    """-> the training split, the tokenizer (a new run builds it from the training captions) and
    the loader. Every split the run reads is checked and cached before the first step."""
    root, preset = Path(args.data_dir), PRESETS[args.preset]
    with clear_errors():  # a folder of other data, missing or unreadable files: one message
        if args.data == "shapes" and rank == 0 and not shapes.ready(root):
            shapes.prepare(root)
        if rank == 0:  # rank 0 alone builds the caches: N ranks would each decode and write one
            splits = ["train", evaluation.EVAL_SPLIT[args.data]]
            splits += ["zeroshot"] if args.data == "shapes" else []
            train_set = data.load_splits(args.data, root, splits, preset.image_size,
                                         args.batch_size)[0]
        if world_size > 1:
            dist.barrier()                          # the others wait for the data and its caches
        if rank != 0:
            train_set = data.load_split(args.data, root, "train", preset.image_size)
        captions = (c for caps in train_set.captions for c in caps)
        tokenizer = tokenizer or data.Tokenizer.build(captions, preset.context_length)
        loader = data.TrainLoader(train_set, tokenizer, args.batch_size, seed=args.seed, rank=rank,
                                  world_size=world_size, num_workers=args.workers,
                                  grouped=args.batching == "grouped")
    return train_set, tokenizer, loader


@dataclass
class Run:
    """What the loop reads, made by `setup`."""
    args: argparse.Namespace
    device: torch.device
    rank: int
    world_size: int
    model: torch.nn.Module          # what the step calls: compiled and / or DDP-wrapped
    raw_model: CLIP                 # the bare model: checkpoints, evaluation, the logit-scale clamp
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler    # loss scaling, on for fp16 only
    tokenizer: data.Tokenizer
    loader: data.TrainLoader
    total_steps: int
    settings: dict                  # what a resumed run must match (lib/run_folder.py)
    history: list                   # the records of metrics.jsonl


def setup(args, device, rank, world_size):
    """-> (Run, the step to start at). The checkpoint to resume is checked before any data is read
    (a wrong flag costs seconds, not a cache build); then the data, the model and its optimiser."""
    ckpt, tokenizer, history = None, None, []
    if args.resume:
        ckpt, tokenizer, history = run_folder.resume_point(args, model_config)
    train_set, tokenizer, loader = load_data(args, tokenizer, rank, world_size)
    config = model_config(args, tokenizer.vocab_size)
    torch.manual_seed(args.seed)                    # same initial weights on every rank
    raw_model = CLIP(config).to(device)
    raw_model.visual.patch_embed.requires_grad_(not args.freeze_patch_embed)
    optimizer = torch.optim.AdamW(param_groups(raw_model, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.98), eps=1e-8, fused=device.type == "cuda")
    # bf16 needs no loss scaling. fp16 starts at 2**9, not the default 2**16: from there the
    # first seven steps' gradients overflow and are skipped (the tiny preset on shapes)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**9, enabled=args.amp == "fp16")
    total_steps = args.steps or args.epochs * len(loader)
    settings = run_folder.run_settings(args, config, total_steps, train_set)
    step = run_folder.resume(ckpt, settings, args, raw_model, optimizer, scaler) if ckpt else 0
    model = torch.compile(raw_model) if args.compile else raw_model
    if world_size > 1:
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if rank == 0:
        run_folder.write_config(Path(args.out), args, raw_model, world_size)
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{args.model} | preset {args.preset} | {n_params / 1e6:.2f}M parameters "
              f"| {device} x {world_size} | amp {args.amp} | {len(train_set.images)} images "
              f"| {len(loader)} steps/epoch | {total_steps} steps")
        flags.warn_warmup(args, total_steps, lr_at)
    return Run(args, device, rank, world_size, model, raw_model, optimizer, scaler, tokenizer,
               loader, total_steps, settings, history), step


# -----------------------------------------------------------------------------
# checkpoints, evaluation and the loop

def checkpoint(run, step):
    """The weights, optimiser and everything needed to resume, then the history up to here."""
    args = run.args
    with run_folder.writing(Path(args.out) / "ckpt.pt"):    # a full disk: one line, not a trace
        save_checkpoint(Path(args.out) / "ckpt.pt", run.raw_model, run.tokenizer,
                        {"source": args.data, "root": str(Path(args.data_dir).resolve())},
                        step=step, optimizer=run.optimizer.state_dict(),
                        scaler=run.scaler.state_dict(), settings=run.settings)
        run_folder.write_history(Path(args.out), run.history)


def evaluate(run, step, stops, bar):
    """Validation metrics, after the checkpoint: an error here loses no training."""
    args = run.args
    run.raw_model.eval()
    with stops.evaluation(step, step == run.total_steps, bar.write):
        metrics = evaluation.evaluate(run.raw_model, run.tokenizer, args.data,
                                      Path(args.data_dir), run.device)
    run.raw_model.train()
    run.history.append({"kind": "eval", "step": step, "epoch": step / len(run.loader), **metrics})
    run_folder.write_history(Path(args.out), run.history)
    bar.write(f"step {step} | " + " | ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
    return metrics


def main(argv=None):
    args = parse_args(argv)
    run_folder.check_paths(args)
    device, rank, world_size = setup_processes(args)
    with run_folder.locked(Path(args.out)) if rank == 0 else nullcontext():
        run, step = setup(args, device, rank, world_size)
        try:
            return train(run, step)
        finally:
            if world_size > 1:
                dist.destroy_process_group()


def train(run, step):
    """The loop, from `step` to run.total_steps; returns the last evaluation's metrics."""
    args, model, raw_model, optimizer = run.args, run.model, run.raw_model, run.optimizer
    scaler, device, rank, world_size = run.scaler, run.device, run.rank, run.world_size
    total_steps, steps_per_epoch = run.total_steps, len(run.loader)
    master, ckpt_path = rank == 0, Path(args.out) / "ckpt.pt"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]
    last_eval = run_folder.last_evaluation(run.history, step)
    t_last, samples_since, stopped = time.time(), 0, 0
    # Ctrl-C, SIGTERM, SIGHUP: the step finishes, then a checkpoint; non-finite losses stop the run
    with tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True) as bar, \
            run_folder.Stops(world_size, device, LOG_EVERY, ckpt_path,
                             saved=step if args.resume else None) as stops:
        for images, tokens in run.loader.stream(step):
            stopped = stops.agreed(step)
            if step == total_steps or stopped:
                break
            lr = lr_at(step, total_steps, args.warmup, args.lr, args.warmup_from)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if device.type == "cuda":  # pinned: the copies below do not wait for the GPU to finish
                images, tokens = images.pin_memory(), tokens.pin_memory()
            # .contiguous(): channels-last batches make channels-last conv gradients, copied by DDP
            images = images.to(device, non_blocking=True).contiguous()
            images = augment.apply(images, args.augment, args.seed, step, args.batch_size,
                                   run.loader.local)
            tokens = tokens.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                image_emb, text_emb, image_w, text_w, word_logits = model(images, tokens)
            loss = global_contrastive_loss(image_emb, text_emb, raw_model.logit_scale, rank,
                                           world_size)
            words = None if word_logits is None else word_loss(word_logits, tokens)
            if words is not None:
                loss = loss + args.word_loss * words
            stops.record(step, loss)
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

            if step % LOG_EVERY == 0 or step == total_steps:  # reads values off the device: a sync
                stops.check_losses()
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
                run.history.append(record)
                t_last, samples_since = time.time(), 0
                bar.set_postfix({k: f"{record[k]:.3g}" for k in
                                 ("loss", "lr", "logit_scale", "active_image", "samples_per_s")
                                 if k in record})
            if step == total_steps or (step % steps_per_epoch == 0
                                       and (step // steps_per_epoch) % args.eval_every == 0):
                stops.check_losses()
                if master:
                    checkpoint(run, step)
                    last_eval = evaluate(run, step, stops, bar)
                if world_size > 1:
                    dist.barrier()
                stops.saved = step                    # by rank 0, for every rank
        if stopped and step < total_steps:   # after the last step the run is complete
            stops.check_losses()
            if master:
                checkpoint(run, step)
            stops.exit(stopped, step, bar.write if master else None)

    if master:
        summary = " | ".join(f"{k} {v:.1f}" for k, v in last_eval.items())
        print(f"done: {step} steps | {summary}\n"
              f"checkpoint {ckpt_path} | curves {Path(args.out) / 'curves.png'}")
    return last_eval


if __name__ == "__main__":
    main()
