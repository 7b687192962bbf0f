"""Train CLIP+FDT (or the CLIP baseline) on image-caption pairs.

    python train.py                                  # FDT, tiny preset, the built-in shapes data
    python train.py --model clip                     # the baseline, everything else identical
    python train.py --data coco --data-dir data/coco --preset small --epochs 10
    torchrun --nproc_per_node=4 train.py --data coco --data-dir data/coco --preset base

One flat loop in the spirit of nanoGPT's train.py: AdamW (betas 0.9 / 0.98, no weight decay on
norms, biases and the logit scale, as in CLIP and the FDT paper), linear warm-up then cosine decay,
gradient clipping, bf16 / fp16 autocast, an evaluation and an atomic checkpoint every epoch (or
every --eval-every epochs; and on Ctrl-C), exact resume, and DistributedDataParallel with a contrastive loss over the global batch.
"""

import argparse
import json
import math
import os
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import eval as evaluation
import figures
import shapes
from model import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CLIP, PRESETS, contrastive_loss, load_checkpoint

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the learned inverse temperature at 100


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=["shapes", "coco", "karpathy"], default="shapes",
                   help="shapes: generated on first use; coco: COCO 2017 layout; karpathy: dataset_coco.json splits")
    p.add_argument("--data-dir", default=None, help="dataset root (default: data/<data>)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size (model.PRESETS)")
    p.add_argument("--model", choices=["fdt", "clip"], default="fdt", help="FDT head or the CLIP projection head")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training set (ignored with --steps)")
    p.add_argument("--steps", type=int, default=None, help="total optimiser steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size, over all processes")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default=None,
                   help="autocast precision (default: bf16 on CUDA, off on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fdt-activation", choices=["sparsemax", "softmax"], default=None, help="default: preset's")
    p.add_argument("--n-fdt", type=int, default=None, help="number of FDT tokens (default: preset's)")
    p.add_argument("--fdt-temperature", type=float, default=None, help="FDT temperature (default: preset's)")
    p.add_argument("--logit-scale-init", type=float, default=None, help="initial inverse temperature (default: preset's)")
    p.add_argument("--augment", choices=["crop", "none"], default=None,
                   help="random resized crops, or none (default: none for shapes, whose captions say where "
                        "things are and whose objects a crop can cut off; crop otherwise)")
    p.add_argument("--batching", choices=["grouped", "random"], default="grouped",
                   help="grouped: a shapes scene and its edits share a batch; random: every image on its own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder (default: runs/<data>-<model>-<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--workers", type=int, default=0, help="data loader read-ahead threads")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate and checkpoint every N epochs")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    if args.lr <= 0:
        p.error("--lr must be positive")
    for name in ("weight_decay", "warmup", "grad_clip", "workers"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative")
    if args.n_fdt is not None and args.n_fdt < 1:
        p.error("--n-fdt must be at least 1")
    for name in ("fdt_temperature", "logit_scale_init"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    args.augment = args.augment or ("none" if args.data == "shapes" else "crop")
    args.data_dir = args.data_dir or f"data/{args.data}"
    args.out = args.out or f"runs/{args.data}-{args.model}-{args.preset}"
    return args


def lr_at(step, total, warmup, peak):
    """Linear warm-up to `peak`, then cosine decay to 0 at `total` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model, weight_decay):
    """No weight decay on norms, biases and the logit scale (every parameter with < 2 dims)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def global_contrastive_loss(image_emb, text_emb, logit_scale, rank, world_size):
    """This process's share of the contrastive loss over the global batch: its b rows against all
    world * b rows, gathered with gradients (open_clip's gather_with_grad + local_loss). DDP's mean of
    the processes' gradients is then exactly the 1-process gradient of the global batch."""
    if world_size == 1:
        return contrastive_loss(image_emb, text_emb, logit_scale)
    all_image = torch.cat(dist_nn.all_gather(image_emb))       # (world * b, D), in global batch order
    all_text = torch.cat(dist_nn.all_gather(text_emb))
    return contrastive_loss(image_emb, text_emb, logit_scale, all_image, all_text, offset=rank * image_emb.shape[0])


def save_checkpoint(path, state):
    """Atomic: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def check_resumable(ckpt, model_config, args, total_steps):
    """Resuming is exact only with the same model and the same data order, crops and schedule;
    name every setting that differs."""
    stored = ckpt["model_config"]
    diffs = [f"{k}: checkpoint {stored.get(k)!r} vs now {v!r}" for k, v in asdict(model_config).items()
             if stored.get(k) != v]
    now = {"batch_size": args.batch_size, "seed": args.seed, "lr": args.lr, "warmup": args.warmup,
           "weight_decay": args.weight_decay, "total_steps": total_steps, "augment": args.augment,
           "batching": args.batching}
    diffs += [f"{k}: checkpoint {ckpt['train'].get(k)!r} vs now {v!r}" for k, v in now.items()
              if ckpt["train"].get(k) != v]
    if diffs:
        raise SystemExit("cannot resume: the checkpoint was trained with another configuration:\n  "
                         + "\n  ".join(diffs))


def main(argv=None):
    args = parse_args(argv)

    # --- processes and devices -------------------------------------------------
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.batch_size % world_size:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by {world_size} processes")
    master = rank == 0
    amp = args.amp or ("bf16" if device.type == "cuda" else "off")
    if amp == "fp16" and device.type != "cuda":
        raise SystemExit("--amp fp16 needs CUDA; use --amp bf16 or off on CPU")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]

    # --- data ------------------------------------------------------------------
    root = Path(args.data_dir)
    if args.data == "shapes" and master and not shapes.ready(root):
        shapes.prepare(root)
    if world_size > 1:
        dist.barrier()                              # other ranks wait for the generated data
    preset = PRESETS[args.preset]
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    ckpt = None
    try:   # missing or malformed data and checkpoints, too few images: the message, not a traceback
        train_set = data.load_split(args.data, root, "train", preset.image_size)
        if args.resume:
            ckpt = load_checkpoint(ckpt_path, map_location="cpu")
            tokenizer = data.Tokenizer.from_state_dict(ckpt["tokenizer"])
        else:
            tokenizer = data.Tokenizer.build((c for caps in train_set.captions for c in caps), preset.context_length)
        loader = data.TrainLoader(train_set, tokenizer, args.batch_size, seed=args.seed, rank=rank,
                                  world_size=world_size, num_workers=args.workers, grouped=args.batching == "grouped")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None

    # --- model -----------------------------------------------------------------
    overrides = {"head": "fdt" if args.model == "fdt" else "proj", "vocab_size": tokenizer.vocab_size}
    for key in ("fdt_activation", "n_fdt", "fdt_temperature", "logit_scale_init"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    config = replace(preset, **overrides)
    torch.manual_seed(args.seed)                    # same initial weights on every rank
    model = CLIP(config).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.98), eps=1e-8, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # bf16 needs no loss scaling
    steps_per_epoch = len(loader)
    total_steps = args.steps or args.epochs * steps_per_epoch
    step = 0
    history = []
    if ckpt is not None:
        check_resumable(ckpt, config, args, total_steps)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        step = ckpt["step"]
        metrics = out / "metrics.jsonl"        # written with each checkpoint, so it matches this step
        history = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint():
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        save_checkpoint(ckpt_path, {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "model": raw_model.state_dict(), "model_config": asdict(config),
            "tokenizer": tokenizer.state_dict(), "data": {"source": args.data, "root": str(root)},
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "epoch": step // steps_per_epoch, "rng": rng,
            "train": {**{k: v for k, v in vars(args).items() if v is not None}, "total_steps": total_steps},
        })
        # metrics.jsonl only ever holds what a checkpoint can resume from
        (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        figures.plot_history(history, out / "curves.png")

    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"args": vars(args), "model": asdict(config),
                                                     "world_size": world_size, "amp": amp}, indent=2))
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{args.model} | preset {args.preset} | {n_params / 1e6:.2f}M parameters | {device} x {world_size} "
              f"| amp {amp} | {len(train_set.images)} images | {steps_per_epoch} steps/epoch | {total_steps} steps")

    # --- the loop ----------------------------------------------------------------
    # Ctrl-C finishes the current step, then checkpoints and exits: never a half-applied update
    interrupted = []

    def on_ctrl_c(*_):
        if interrupted:            # a second Ctrl-C: stop at once, keeping the last checkpoint
            raise KeyboardInterrupt
        interrupted.append(True)
    previous_handler = signal.signal(signal.SIGINT, on_ctrl_c)
    bar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True)
    last_eval = next((h for h in reversed(history) if h["kind"] == "eval"), {})   # a finished run resumed
    last_eval = {k: v for k, v in last_eval.items() if k not in ("kind", "step", "epoch")}
    t_last, samples_since = time.time(), 0
    try:
        while step < total_steps and not interrupted:
            epoch, start_batch = divmod(step, steps_per_epoch)
            for images, tokens in loader.epoch(epoch, start_batch):
                lr = lr_at(step, total_steps, args.warmup, args.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = images.to(device, non_blocking=True)
                tokens = tokens.to(device, non_blocking=True)
                # crops for the global batch drawn from (seed, step), this process's rows kept: a resumed
                # run redraws the same crops and N processes crop exactly as one process would
                if args.augment == "crop":
                    crops = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
                    images = data.augment(images, torch.rand(args.batch_size, 4, generator=crops)[loader.local])
                else:
                    images = data.preprocess(images)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    image_emb, text_emb, image_w, text_w = model(images, tokens)
                loss = global_contrastive_loss(image_emb, text_emb, raw_model.logit_scale, rank, world_size)
                if not torch.isfinite(loss):
                    raise SystemExit(f"stopped: non-finite loss ({loss.item()}) at step {step}; "
                                     f"the last good checkpoint is {ckpt_path}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip or float("inf"))
                scaler.step(optimizer)
                scaler.update()
                with torch.no_grad():
                    raw_model.logit_scale.clamp_(max=MAX_LOGIT_SCALE)
                step += 1
                samples_since += args.batch_size
                bar.update(1)

                if step % 10 == 0 or step == total_steps:
                    if world_size > 1:                    # log the global batch's loss
                        loss = loss.detach().clone()
                        dist.all_reduce(loss)
                        loss /= world_size
                    record = {"kind": "train", "step": step, "epoch": epoch, "loss": loss.item(), "lr": lr,
                              "grad_norm": grad_norm.item(),
                              "logit_scale": raw_model.logit_scale.exp().item(),
                              "samples_per_s": samples_since / (time.time() - t_last)}
                    if image_w is not None:
                        record["active_image"] = (image_w > 0).sum(-1).float().mean().item()
                        record["active_text"] = (text_w > 0).sum(-1).float().mean().item()
                    history.append(record)
                    t_last, samples_since = time.time(), 0
                    bar.set_postfix({k: f"{record[k]:.3g}" for k in
                                     ("loss", "lr", "logit_scale", "active_image", "samples_per_s") if k in record})
                epoch_done = step % steps_per_epoch == 0 and (step // steps_per_epoch) % args.eval_every == 0
                if step == total_steps or epoch_done:
                    if master:
                        raw_model.eval()
                        last_eval = evaluation.evaluate(raw_model, tokenizer, args.data, root, device)
                        raw_model.train()
                        history.append({"kind": "eval", "step": step, "epoch": step / steps_per_epoch, **last_eval})
                        bar.write(f"step {step} | " + " | ".join(f"{k} {v:.1f}" for k, v in last_eval.items()))
                        checkpoint()
                    if world_size > 1:
                        dist.barrier()
                if step == total_steps or interrupted:
                    break
        if interrupted:
            if master:
                checkpoint()
                bar.write(f"interrupted at step {step}: saved {ckpt_path}; "
                          "run again with the same flags and --resume to continue")
            raise SystemExit(130)
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous_handler)
        if world_size > 1:
            dist.destroy_process_group()

    if master:
        summary = " | ".join(f"{k} {v:.1f}" for k, v in last_eval.items())
        print(f"done: {step} steps | {summary}\ncheckpoint {ckpt_path} | curves {out / 'curves.png'}")
    return last_eval


if __name__ == "__main__":
    main()
