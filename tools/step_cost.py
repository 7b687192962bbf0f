"""What one training step of the tiny preset costs, for recipe candidates side by side: FLOPs
(torch.utils.flop_counter, forward + backward) and the median time of a step, measured in turns
(a, b, c, ..., then in reverse order) so that load from other processes falls on all alike.
The step is train.py's: both towers, the contrastive loss, the word loss, backward, AdamW, on one
batch of 128 shapes scenes and their captions.

    python -m tools.step_cost                # the candidates below, 8 rounds
"""

import argparse
import os
import platform
import statistics
import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

import data
from lib import shapes
from model import CLIP, PRESETS, contrastive_loss, word_loss

OLD = dict(patch_size=8, text_layers=4)    # the tiny preset before 16 px patches and 2 text layers
CANDIDATES = {  # name -> changes to the tiny preset
    "8 px, 4 text layers": OLD,
    "16 px, 4 text layers": dict(OLD, patch_size=16),
    "16 px, 3 text layers": dict(OLD, patch_size=16, text_layers=3),
    "16 px, 2 text layers (tiny)": dict(OLD, patch_size=16, text_layers=2),
}


def make_step(config, images, tokens):
    model = CLIP(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        image_emb, text_emb, _, _, word_logits = model(images, tokens)
        loss = contrastive_loss(image_emb, text_emb, model.logit_scale)
        loss = loss + word_loss(word_logits, tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="data/shapes", help="the shapes world (made if missing)")
    p.add_argument("--rounds", type=int, default=8, help="timed steps of each candidate")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")

    shapes.prepare(args.data_dir)
    train = data.load_split("shapes", args.data_dir, "train", PRESETS["tiny"].image_size)
    tokenizer = data.Tokenizer.build([c for cs in train.captions for c in cs],
                                     PRESETS["tiny"].context_length)
    captions = [cs[0] for cs in train.captions[:128]]
    tokens = tokenizer.encode(captions)                                    # (128, context_length)
    tokens = tokens[:, :int((tokens != data.PAD).sum(1).max())]            # (128, L): pads trimmed
    images = data.preprocess(torch.tensor(train.images[:128]).permute(0, 3, 1, 2))  # (128, 3, S, S)
    torch.manual_seed(0)
    base = replace(PRESETS["tiny"], vocab_size=tokenizer.vocab_size, word_head=True)
    steps = {name: make_step(replace(base, **changes), images, tokens)
             for name, changes in CANDIDATES.items()}
    print(f"batch {tuple(images.shape)} images, {tuple(tokens.shape)} text ids | "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.1f}")
    flops = {}
    for name, step in steps.items():
        step()                                                              # warm-up
        with FlopCounterMode(display=False) as counter:
            step()
        flops[name] = counter.get_total_flops()
    times = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    first = next(iter(steps))
    for name in steps:
        t = statistics.median(times[name])
        print(f"{name:30s} {flops[name] / 1e9:6.1f} GFLOP | {t:.3f} s/step | "
              f"{t / statistics.median(times[first]):.2f}x the first")


if __name__ == "__main__":
    main()
