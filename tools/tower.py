"""How fast the image path alone learns shape: the image tower and its head, as training builds
them (preset, stem, FDT head or projection), trained on "which shapes does this image show"
(multi-label, 8 shapes) with a linear classifier on the image embedding, and scored top-1 on the
single objects of the shapes zero-shot split every 100 steps. A supervised upper bound for what
the contrastive run can name: if the tower cannot see shape here, no caption will teach it.

    python -m tools.tower                    # the tiny preset's CLIP+FDT image path, 300 steps
    python -m tools.tower --no-stem-norm     # the same without BatchNorm in the conv stem
"""

import argparse
import time
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from lib import shapes
from lib.data_checks import clear_errors
from lib.flags import number
from model import CLIP, PRESETS


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="data/shapes")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--model", choices=["fdt", "clip"], default="fdt")
    p.add_argument("--stem-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="BatchNorm in the conv stem (default: the preset's)")
    p.add_argument("--fdt-temperature", type=number(float, 0, low_open=True), default=None,
                   help="default: the preset's")
    p.add_argument("--steps", type=number(int, 1), default=300)
    p.add_argument("--lr", type=number(float, 0, 1, low_open=True), default=1e-3)
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0)
    args = p.parse_args(argv)

    config = replace(PRESETS[args.preset], head=args.model)
    for key in ("stem_norm", "fdt_temperature"):
        if getattr(args, key) is not None:
            config = replace(config, **{key: getattr(args, key)})
    with clear_errors():  # a file, a COCO folder, a full disk: one line
        if not shapes.ready(args.data_dir):  # a world of any size is used as it is
            shapes.prepare(args.data_dir)
        train = data.load_split("shapes", args.data_dir, "train", config.image_size)
    present = torch.zeros(len(train.images), len(shapes.SHAPES))              # (N, 8) multi-hot
    for i, entry in enumerate(train.entries):
        for o in entry["objects"]:
            present[i, shapes.SHAPES.index(o["shape"])] = 1
    with clear_errors():
        test = shapes.load_zeroshot(args.data_dir, config.image_size)

    torch.manual_seed(args.seed)
    model = CLIP(config)
    head = nn.Linear(config.embed_dim, len(shapes.SHAPES))
    # the image path only: the text tower gets no gradient and is left out of the optimiser
    params = [p for name, p in model.named_parameters() if not name.startswith(("text", "logit"))]
    optimizer = torch.optim.AdamW(params + list(head.parameters()), lr=args.lr, betas=(0.9, 0.98),
                                  weight_decay=0.1)

    def logits(images):
        # the unit-norm embedding times sqrt(D): entries of order 1, as the head's init expects
        return head(model.encode_image(data.preprocess(images)) * config.embed_dim ** 0.5)

    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    print(f"{args.model} image path | preset {args.preset} | stem norm {config.stem_norm} | "
          f"FDT temperature {config.fdt_temperature}")
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(train.images), (128,), generator=g)
        images = torch.from_numpy(train.images[idx.numpy()]).permute(0, 3, 1, 2)  # (128, 3, S, S)
        loss = F.binary_cross_entropy_with_logits(logits(images), present[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                pred = torch.cat([logits(test["images"][a:a + 256]).argmax(dim=1)
                                  for a in range(0, len(test["images"]), 256)])
            model.train()
            acc = 100 * (pred == test["labels"]["shape"]).float().mean().item()
            print(f"step {step} | loss {loss.item():.3f} | single-object shape top-1 {acc:.1f} % | "
                  f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
