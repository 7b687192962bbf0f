"""The flags of train.py and eval.py, checked: a number out of range, flags that contradict each
other, a device this machine lacks, data that does not fit the command, each refused in one line
before any work. The command lines read as if every flag were right; this is why they may.

train.py
    number         argparse type: a finite int or float in a range (nan and inf never pass)
    check          flags that contradict each other; an --n-fdt beyond this machine's memory
    pick_device    --device as a torch.device, or one line saying which devices there are
    check_batch    a --batch-size that the processes cannot share evenly
    check_amp      --amp fp16 on a CPU
    warn_warmup    a run that ends inside its warm-up (a warning: it may be meant)
eval.py
    data_source    --data / --data-dir, by default the checkpoint's
    refuse_overlap an evaluation split that shares images with the training split
    need_shapes    a --data-dir without the shapes world a command needs
"""

import argparse
import math
import os
import sys
from pathlib import Path

import torch

import data
from lib import shapes


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


def memory_bytes():
    """This machine's physical memory, or None where the OS does not say (os.sysconf is POSIX)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check(parser, args, embed_dim):
    """Usage errors (exit 2) for flags that contradict each other, once the defaults are filled in,
    and for an --n-fdt whose tokens alone would not fit in memory: refused before an allocation
    that would fail or swap. embed_dim: the FDT token dimension of args.preset."""
    if args.logit_scale_min > args.logit_scale_max:
        parser.error("--logit-scale-min is above --logit-scale-max")
    if args.extend and not args.resume:
        parser.error("--extend only makes sense with --resume")
    if args.overwrite and args.resume:
        parser.error("--overwrite starts afresh and --resume continues: pass one of them")
    if args.n_fdt is not None:
        need = args.n_fdt * embed_dim * 4 * 4      # fp32: weights, gradient, Adam's two states
        ram = memory_bytes()
        if ram is not None and need > ram:
            parser.error(f"--n-fdt {args.n_fdt}: the FDT tokens alone need {need / 2**30:.0f} GiB "
                         f"(weights, gradient and AdamW's two states); this machine has "
                         f"{ram / 2**30:.0f} GiB")


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


def check_batch(batch_size, world_size):
    """The global batch is split evenly over the processes."""
    if batch_size % world_size:
        raise SystemExit(f"--batch-size {batch_size} is not divisible by {world_size} processes")


def check_amp(amp, device):
    """fp16 needs a GradScaler on CUDA; a CPU has bf16 autocast or none."""
    if amp == "fp16" and device.type != "cuda":
        raise SystemExit("--amp fp16 needs CUDA; use --amp bf16 or off on CPU")


def warn_warmup(args, total_steps, lr_at):
    """A run shorter than its warm-up never reaches --lr: said on stderr, the run goes on."""
    if args.warmup > total_steps:
        last_lr = lr_at(total_steps - 1, total_steps, args.warmup, args.lr, args.warmup_from)
        print(f"warning: the run ends inside its warm-up (--warmup {args.warmup}, "
              f"{total_steps} steps): the learning rate reaches {last_lr:.3g}, not --lr "
              f"{args.lr:g}", file=sys.stderr)


# -----------------------------------------------------------------------------
# eval.py

def data_source(ckpt, source=None, root=None):
    """The given data source and root, else what the checkpoint was trained on."""
    trained = ckpt.get("data", {})
    source = source or trained.get("source")
    root = root or (trained.get("root") if source == trained.get("source") else None)
    if source is None:
        raise SystemExit("the checkpoint does not say which data it was trained on: "
                         "pass --data and --data-dir")
    if root is None:
        raise SystemExit(f"the checkpoint was trained on {trained.get('source')}, not {source}: "
                         "pass --data-dir")
    return source, Path(root)


def refuse_overlap(ckpt, source, root, split, allow):
    """Stop when the evaluation split shares COCO images with the checkpoint's training split
    (train2017 holds most of Karpathy's test images, Karpathy's train+restval part of val2017):
    the numbers would measure memory, not generalisation. --allow-overlap skips the check."""
    trained = ckpt.get("data", {})
    if allow or "shapes" in (source, trained.get("source")):
        return
    try:
        overlap = (data.image_ids(source, root, split)
                   & data.image_ids(trained["source"], trained["root"], "train"))
    except (KeyError, OSError, ValueError) as e:
        raise SystemExit(f"error: cannot check that {source} {split} is disjoint from the "
                         f"checkpoint's training split ({type(e).__name__}: {e}); "
                         "pass --allow-overlap to evaluate anyway") from None
    if overlap:
        raise SystemExit(f"error: {len(overlap)} images of {source} {split} are in the "
                         f"checkpoint's training split ({trained['source']} train in "
                         f"{trained['root']}), e.g. COCO ids {sorted(overlap)[:3]}: the results "
                         "would be inflated. Evaluate on a disjoint split (a --data karpathy "
                         "checkpoint on --data karpathy --split test, a --data coco one on "
                         "--data coco), or pass --allow-overlap")


def need_shapes(root, why):
    """Refuse a folder without a shapes world (a COCO folder: its images have no "objects")."""
    if not shapes.ready(root):
        raise SystemExit(f"error: {why}, and {root} holds no shapes world (no shapes.json): pass "
                         "the --data-dir of one (`python -m lib.shapes --root DIR` makes one)")
