"""The run folder (--out) of train.py and what keeps its checkpoint whole and right: no run writes
over another's work, a resumed run is the run it continues, and a run that stops early (Ctrl-C,
SIGTERM, a non-finite loss, a failed evaluation) leaves a checkpoint to go on from. train.py's loop
calls these at its edges; a reader can skip this file and lose nothing of the method.

    check_paths       --out and --data-dir mistakes, a folder that already holds a run
    locked            an exclusive lock on <out>/lock while the run lasts
    write_config      <out>/config.json: the resolved flags and the model configuration
    resume_point      the checkpoint to resume, its tokenizer and history, checked before the data
    resume            checked again with the data, then the weights and optimiser restored
    run_settings      every setting that changes the result, stored in each checkpoint
    data_fingerprint  what the training split held (its files and captions, hashed)
    check_resumable   every setting that differs from the checkpoint's, named at once
    read_history      metrics.jsonl up to the checkpoint; a damaged line stops the resume
    write_history     metrics.jsonl and curves.png, written after every checkpoint
    last_evaluation   what a resumed, already finished run reports
    Stops             Ctrl-C and SIGTERM after the current step, processes agreeing on a stop,
                      non-finite losses, a failed or interrupted evaluation
"""

import hashlib
import json
import math
import os
import signal
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

import data
from lib import figures
from lib.data_checks import clear_errors
from model import load_checkpoint, load_weights


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


def lock_exclusively(handle):
    """A non-blocking exclusive lock on an open file; BlockingIOError when another process holds
    it. fcntl is POSIX's, imported here so that train.py imports everywhere; Windows locks a byte
    with msvcrt instead."""
    try:
        import fcntl
    except ImportError:
        import msvcrt
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            raise BlockingIOError from None
        return
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


@contextmanager
def locked(out):
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
            lock_exclusively(handle)
        except BlockingIOError:
            raise SystemExit(f"error: another training run is using {out} "
                             f"(it holds {out / 'lock'}); "
                             "wait for it to finish, or pass another --out") from None
        yield


def write_config(out, args, config, world_size):
    """<out>/config.json: the flags as the run resolved them and its model configuration."""
    (out / "config.json").write_text(json.dumps(
        {"args": vars(args), "model": asdict(config), "world_size": world_size}, indent=2))


# -----------------------------------------------------------------------------
# resume compatibility

def resume_point(args, model_config):
    """-> (checkpoint, its tokenizer, metrics.jsonl's records up to it), with every setting that
    needs no data checked: a wrong flag costs seconds, not a cache build. A missing, foreign or
    damaged file is one line. model_config(args, vocab_size): the model the flags ask for."""
    out = Path(args.out)
    with clear_errors("cannot resume: "):
        ckpt = load_checkpoint(out / "ckpt.pt", map_location="cpu")
        tokenizer = data.Tokenizer.from_state_dict(ckpt["tokenizer"])
    check_resumable(ckpt, run_settings(args, model_config(args, tokenizer.vocab_size)), args.extend)
    return ckpt, tokenizer, read_history(out, ckpt["step"])


def resume(ckpt, settings, args, model, optimizer, scaler):
    """Every setting checked again, now with the data's (the schedule length, the training split),
    then the weights, the optimiser and the loss scaler restored: -> the step to go on from."""
    check_resumable(ckpt, settings, args.extend)
    with clear_errors(f"cannot resume from {Path(args.out) / 'ckpt.pt'}: "):
        load_weights(model, ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    return ckpt["step"]


def run_settings(args, config, total_steps=None, train_set=None):
    """Every setting that changes the result: a resumed run must have the same ones. Before the data
    is read, those that need none; then the schedule's length and the training split's fingerprint
    too (total_steps, train_set)."""
    known = {} if train_set is None else {
        "total_steps": total_steps,
        "train_data": data_fingerprint(train_set, Path(args.data_dir))}
    return {"model": asdict(config), "data": args.data,
            "data_dir": str(Path(args.data_dir).resolve()),
            "batch_size": args.batch_size, "seed": args.seed, "lr": args.lr, "warmup": args.warmup,
            "warmup_from": args.warmup_from, "weight_decay": args.weight_decay,
            "grad_clip": args.grad_clip,
            "logit_scale_min": args.logit_scale_min, "logit_scale_max": args.logit_scale_max,
            "freeze_patch_embed": args.freeze_patch_embed, "amp": args.amp, "augment": args.augment,
            "batching": args.batching, "word_loss": args.word_loss, **known}


def data_fingerprint(cs, root):
    """What a resumed run must find again in its training split: its image files (names within
    the data folder, sizes) and its captions, each as a short hash."""
    def digest(obj):
        return hashlib.sha1(json.dumps(obj).encode()).hexdigest()[:16]
    return {"images": len(cs.image_files),
            "file names": digest([os.path.relpath(f, root) for f in cs.image_files]),
            "file sizes": digest([os.path.getsize(f) for f in cs.image_files]),
            "captions": digest(cs.captions)}


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


def last_evaluation(history, step):
    """The metrics of the evaluation at `step` (a resumed run that is already finished reports
    them), or {}."""
    record = next((h for h in reversed(history) if h["kind"] == "eval" and h["step"] == step), {})
    return {k: v for k, v in record.items() if k not in ("kind", "step", "epoch")}


# -----------------------------------------------------------------------------
# stopping early without losing work

class Stops:
    """Why a run stops before its last step, and how it keeps its work.

    Ctrl-C, or a scheduler's SIGTERM, finishes the current step; the run then checkpoints and exits
    with 128 + the signal's number (130, 143), as a shell reports it: never a half-applied update.
    A second one stops at once, keeping the last checkpoint. A non-finite loss stops the run before
    it reaches a checkpoint. Used as a context: the previous signal handlers come back at its end.
    With several processes, `every` is how often they agree (the steps train.py logs at)."""

    def __init__(self, world_size, device, every, ckpt_path, saved):
        self.world_size, self.device, self.every = world_size, device, every
        self.ckpt_path = ckpt_path
        self.saved = saved          # the step of the checkpoint the run can go back to, or None
        self.signum = 0             # the first signal received (0: none)
        self.losses = []            # (step, loss on the device) since the last check

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.receive) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def receive(self, signum, _):
        if self.signum:            # a second one: stop at once, keeping the last checkpoint
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self, step):
        """The signal to stop on after this step (0: none). A signal reaches each process at its own
        step; they agree at logging steps (an all-reduce that the host waits for), so all stop at
        one step, on the same signal."""
        if self.world_size == 1:
            return self.signum
        if step % self.every:
            return 0
        flag = torch.tensor(self.signum, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def record(self, step, loss):
        self.losses.append((step, loss.detach()))

    def check_losses(self):
        """Stop on a non-finite loss, read here (before logging and checkpoints) rather than every
        step, where the host would wait for the device: a NaN can reach the weights, never a
        checkpoint. Every process calls it at the same steps, and all stop if one must (the
        others would wait for it in the next all-reduce)."""
        values = torch.stack([value for _, value in self.losses]).tolist() if self.losses else []
        bad = [(s, v) for (s, _), v in zip(self.losses, values) if not math.isfinite(v)]
        self.losses.clear()
        if self.world_size > 1:
            flag = torch.tensor(float(bool(bad)), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not bad:
                raise SystemExit("stopped: another process had a non-finite loss")
        if bad:
            raise SystemExit(f"stopped: non-finite loss ({bad[0][1]}) at step {bad[0][0]}; " + (
                f"the last good checkpoint is {self.ckpt_path} (step {self.saved})"
                if self.saved is not None else "no checkpoint was saved before it"))

    def exit(self, signum, step, write=None):
        """After the checkpoint a signal asked for: say so (write, on rank 0), wait for the other
        processes, exit with 128 + the signal's number."""
        if write is not None:
            write(f"interrupted ({signal.Signals(signum).name}) at step {step}: saved "
                  f"{self.ckpt_path}; run again with the same flags and --resume to continue")
        if self.world_size > 1:
            dist.barrier()                       # the others wait for the checkpoint
        raise SystemExit(128 + signum)

    @contextmanager
    def evaluation(self, step, finished, write):
        """Around an evaluation, which runs after its checkpoint: an error in it, or a second
        Ctrl-C, loses no training, and the line says how to go on. finished: the last step."""
        try:
            yield
        except KeyboardInterrupt:   # a second Ctrl-C or SIGTERM: only this evaluation is lost
            write(f"stopped during the evaluation at step {step}; {self.ckpt_path} is saved: " + (
                f"training is finished; evaluate it with `python eval.py retrieval --ckpt "
                f"{self.ckpt_path}`" if finished else
                "run again with the same flags and --resume to continue"))
            raise SystemExit(128 + self.signum) from None
        except Exception as e:
            raise SystemExit(f"error: the evaluation at step {step} failed "
                             f"({type(e).__name__}: {e}); "
                             f"the checkpoint {self.ckpt_path} is saved: fix the cause and run "
                             "again with --resume") from None
