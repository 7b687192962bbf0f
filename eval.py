"""Evaluation: what a checkpoint learned, and what its FDT tokens stand for.

    evaluate    what train.py reports at every checkpoint: the metrics below on the evaluation split
    retrieval   image -> text and text -> image recall@1/5/10 and rsum under the COCO 5k protocol
                (5 captions per image; an image -> text hit counts if any of its captions is in the
                top k)
    zero-shot   prompt-ensemble classification (Radford et al. 2021, Section 3.1.4) of the shapes
                world's single objects by shape, colour, (colour, shape) pair and held-out pair
    probe       shapes: linear probes of shape and colour on the frozen image embedding (CLIP's
                linear-probe evaluation, Radford et al. 2021, Section 3.2)
    binding     shapes: does an image score its caption above the same caption with two colours
                swapped, a shape replaced, a relation reversed ...? (chance 50 %)
    inspect     figures of the FDT at work (Chen et al., CVPR 2023): which tokens an image and a
                caption activate, which patches and words ground them, and for shapes whether the
                same tokens fire for "red" in images and in captions

The outside sets (CIFAR-10/100 and ImageFolder zero-shot, SugarCrepe on COCO images) are read and
scored in lib/benchmarks.py, the numbers made from embeddings in lib/metrics.py. The command line
comes last:

    python eval.py retrieval --ckpt runs/shapes-fdt-tiny/ckpt.pt
    python eval.py zeroshot --ckpt runs/shapes-fdt-tiny/ckpt.pt --dataset shapes
    python eval.py binding --ckpt runs/shapes-fdt-tiny/ckpt.pt
    python eval.py probe --ckpt runs/shapes-fdt-tiny/ckpt.pt
    python eval.py inspect --ckpt runs/shapes-fdt-tiny/ckpt.pt [--image FILE] [--text "a red star"]
    python eval.py sugarcrepe --ckpt CKPT --sugarcrepe-dir sugar-crepe/data --coco-dir data/coco
    python eval.py zeroshot --ckpt CKPT --dataset imagefolder --data-dir DIR --classnames FILE
"""

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
from lib import benchmarks, figures, shapes
from lib.data_checks import clear_errors
from lib.flags import data_source, need_shapes, refuse_overlap
from lib.metrics import (active_tokens, as_image_tensor, binding_accuracy, embed_images,
                         embed_texts, heldout_accuracy, linear_probe, marginal_probs,
                         retrieval_metrics, topk_accuracy)
from model import load_checkpoint, model_from_checkpoint

# -----------------------------------------------------------------------------
# evaluation during training

# the paper's COCO 5k test is Karpathy's
EVAL_SPLIT = {"shapes": "val", "coco": "val", "karpathy": "test"}


def evaluate(model, tokenizer, source, root, device):
    """Retrieval on the evaluation split (EVAL_SPLIT; + the shapes zero-shot, probe and binding
    tests when source == "shapes"): one flat dict of floats. `model` is the bare CLIP (not a DDP
    or compiled wrapper), already on `device`."""
    size = model.config.image_size
    val = data.load_split(source, root, EVAL_SPLIT[source], size)
    image_emb, image_w = embed_images(model, val.images, device, return_weights=True)
    metrics = evaluate_retrieval(model, tokenizer, val, device, image_emb, image_w,
                                 same_sentence=source == "shapes")
    if source == "shapes":
        metrics.update(evaluate_shapes_zeroshot(model, tokenizer, root, size, device))
        metrics.update(evaluate_shapes_probe(model, root, size, device))
        metrics.update(evaluate_binding(model, tokenizer, val, device, image_emb))
    return metrics


# -----------------------------------------------------------------------------
# retrieval

def evaluate_retrieval(model, tokenizer, caption_set, device, image_emb=None, image_w=None,
                       same_sentence=False):
    """Retrieval metrics on a caption set's first 5 captions per image, plus (FDT head) the mean
    number of FDT tokens with non-zero weight per image and per caption. With same_sentence (the
    shapes world, where many images are "a red star") a caption is right for every image that has
    that exact sentence among its captions: finding another such image is not a miss. Without it,
    the COCO 5k protocol: a caption is right for its own image only."""
    texts, match = data.retrieval_captions(caption_set)                      # match: (N_txt,)
    if same_sentence:
        owners = {}                                           # sentence -> images it describes
        for i, caps in enumerate(caption_set.captions):
            for c in caps[:5]:
                owners.setdefault(c, set()).add(i)
        # (N_img, N_txt): which images each caption is right for
        match = torch.zeros(len(caption_set.captions), len(texts), dtype=torch.bool)
        for t, c in enumerate(texts):
            match[list(owners[c]), t] = True
    if image_emb is None:
        image_emb, image_w = embed_images(model, caption_set.images, device, return_weights=True)
    text_emb, text_w = embed_texts(model, tokenizer, texts, device, return_weights=True)
    metrics = retrieval_metrics(image_emb, text_emb, match)
    if image_w is not None:
        metrics["active_image"] = active_tokens(image_w)
        metrics["active_text"] = active_tokens(text_w)
    return metrics


# -----------------------------------------------------------------------------
# zero-shot classification and linear probes of the shapes world

def shapes_prompt_embeddings(model, tokenizer, device, return_weights=False):
    """Every pair's shapes.prompts embedded: (8 colours, 8 shapes, P prompts, D)
    [and FDT weights (8, 8, P, n_fdt)], colours and shapes in shapes.COLOURS / shapes.SHAPES
    order."""
    pairs = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
    texts = [p for c, s in pairs for p in shapes.prompts(c, s)]
    emb, weights = embed_texts(model, tokenizer, texts, device, return_weights=True)
    C, S, P = len(shapes.COLOURS), len(shapes.SHAPES), len(texts) // len(pairs)
    emb = emb.view(C, S, P, -1)                                               # (C, S, P, D)
    # weights (C, S, P, n_fdt)
    return (emb, weights.view(C, S, P, -1)) if return_weights else emb


def evaluate_shapes_zeroshot(model, tokenizer, root, image_size, device, topk=(1,)):
    """Top-1 (and any other top-k) on the shapes zero-shot split of single objects, classified by
    shape (8 classes, chance 12.5 %), colour (8) and pair (64, chance 1.6 %). Keys zs_shape,
    zs_colour, zs_pair, e.g. zs_shape_top5 for k > 1, and zs_heldout: on the images of the 8
    held-out pairs, never seen together in training, heldout_accuracy (chance 50 %).

    Every class is a (colour, shape) pair with its prompts averaged; a shape's probability is the
    sum of its pairs' over the colours (metrics.marginal_probs), a colour's over the shapes."""
    zs = shapes.load_zeroshot(root, image_size)
    image_emb = embed_images(model, zs["images"], device)                     # (N, D)
    prompts = shapes_prompt_embeddings(model, tokenizer, device)              # (8, 8, P, D)
    pair = F.normalize(prompts.mean(dim=2), dim=-1)                           # (8, 8, D)
    scale = model.logit_scale.exp().clamp(max=100)
    scores = {"shape": marginal_probs(image_emb, pair, scale, dim=0),         # (N, 8)
              "colour": marginal_probs(image_emb, pair, scale, dim=1),        # (N, 8)
              # (N, 64), colour * 8 + shape
              "pair": image_emb @ pair.flatten(0, 1).t()}
    metrics = {}
    for task, score in scores.items():
        for k, acc in topk_accuracy(score, zs["labels"][task], topk).items():
            metrics[f"zs_{task}" + ("" if k == "top1" else f"_{k}")] = acc
    held = zs["heldout"].to(device)
    metrics["zs_heldout"] = heldout_accuracy(image_emb[held], pair,
                                             zs["labels"]["colour"].to(device)[held],
                                             zs["labels"]["shape"].to(device)[held])
    return metrics


def evaluate_shapes_probe(model, root, image_size, device, n_train=4000):
    """probe_shape, probe_colour: linear probes on the frozen image embeddings of the first
    n_train shapes training images (labels: which shapes / colours each shows), scored on the
    single objects of the zero-shot split. They say whether the image tower has learned shape
    when the text side has not caught up."""
    train = data.load_split("shapes", root, "train", image_size)
    n = min(n_train, len(train.images))
    train_emb = embed_images(model, train.images[:n], device)                 # (n, D)
    zs = shapes.load_zeroshot(root, image_size)
    test_emb = embed_images(model, zs["images"], device)                      # (M, D)
    metrics = {}
    for task, names in (("shape", shapes.SHAPES), ("colour", shapes.COLOURS)):
        present = torch.zeros(n, len(names))                                  # (n, 8) multi-hot
        for i, entry in enumerate(train.entries[:n]):
            for o in entry["objects"]:
                present[i, names.index(o[task])] = 1
        metrics[f"probe_{task}"] = linear_probe(train_emb, present.to(device), test_emb,
                                                zs["labels"][task])
    return metrics


# -----------------------------------------------------------------------------
# binding: does the image prefer its caption to a minimal edit of it?

def binding_tests(caption_set, seed=0):
    """kind -> (image indices (n,), true captions, false captions) from the "objects" of every
    image entry, the edit drawn from an RNG per (seed, image): the same test every time."""
    tests = {kind: ([], [], []) for kind in shapes.NEGATIVE_KINDS}
    for i, entry in enumerate(caption_set.entries):
        for kind, (true, false) in shapes.negatives(entry["objects"],
                                                    np.random.default_rng([seed, i])).items():
            for column, value in zip(tests[kind], (i, true, false)):
                column.append(value)
    return {kind: (torch.tensor(idx, dtype=torch.long), true, false)
            for kind, (idx, true, false) in tests.items() if idx}


def evaluate_binding(model, tokenizer, caption_set, device, image_emb=None):
    """bind_<kind> for each of shapes.NEGATIVE_KINDS that applies to some image of a shapes caption
    set: two colours swapped, two shapes swapped, a shape or a colour replaced by an absent one, a
    relation reversed. image_emb (N, D) can be passed when it is already computed."""
    if image_emb is None:
        image_emb = embed_images(model, caption_set.images, device)
    tests = binding_tests(caption_set)
    # the true captions repeat across kinds
    texts = sorted({t for _, true, false in tests.values() for t in true + false})
    row = {t: i for i, t in enumerate(texts)}
    # (n_texts, D), each text once
    text_emb = embed_texts(model, tokenizer, texts, device)
    metrics = {}
    for kind, (idx, true, false) in tests.items():
        true_emb = text_emb[[row[t] for t in true]]
        false_emb = text_emb[[row[t] for t in false]]
        metrics[f"bind_{kind}"] = binding_accuracy(image_emb[idx.to(image_emb.device)], true_emb,
                                                   false_emb)
    return metrics


# -----------------------------------------------------------------------------
# what the FDT tokens stand for

@torch.no_grad()
def concept_profiles(model, tokenizer, root, device):
    """The FDT weight profile of every colour and shape word: the mean weights (16, n_fdt) of the
    single-object zero-shot images showing it and of the prompts naming it, colours first. With the
    (16, 16) cosine of every image profile against every caption profile and its mean on and off the
    diagonal: the paper's claim is that the same tokens stand for a concept in both modalities."""
    zs = shapes.load_zeroshot(root, model.config.image_size)
    _, wi = embed_images(model, zs["images"], device, return_weights=True)   # (N, n_fdt)
    # (8, 8, P, n_fdt)
    _, wt = shapes_prompt_embeddings(model, tokenizer, device, return_weights=True)
    colour, shape = zs["labels"]["colour"].to(device), zs["labels"]["shape"].to(device)
    # (16, n_fdt)
    image_rows = torch.stack([wi[colour == c].mean(dim=0) for c in range(len(shapes.COLOURS))]
                             + [wi[shape == s].mean(dim=0) for s in range(len(shapes.SHAPES))])
    text_rows = torch.cat([wt.mean(dim=(1, 2)), wt.mean(dim=(0, 2))])       # (16, n_fdt)
    # (16, 16) image x caption
    cosine = F.normalize(image_rows, dim=1) @ F.normalize(text_rows, dim=1).t()
    off_diagonal = ~torch.eye(len(cosine), dtype=torch.bool, device=device)
    return {"concepts": shapes.COLOURS + shapes.SHAPES, "image": image_rows, "text": text_rows,
            "cosine": cosine,
            "same_concept_cosine": cosine.diagonal().mean().item(),
            "other_concept_cosine": cosine[off_diagonal].mean().item()}


# -----------------------------------------------------------------------------
# command line

def load(args):
    """-> checkpoint dict, model on args.device in eval mode, tokenizer."""
    with clear_errors():
        ckpt = load_checkpoint(args.ckpt, map_location="cpu")
        model = model_from_checkpoint(ckpt).to(args.device).eval()
        tokenizer = data.Tokenizer.from_state_dict(ckpt["tokenizer"])
    return ckpt, model, tokenizer


def save_results(path, record):
    """The results, already printed, saved next to the checkpoint; a folder that cannot be written
    ends the run with one line and exit code 1, the printed results being all there is."""
    try:
        data.write_json(path, record)
    except OSError as e:
        raise SystemExit(f"error: cannot write {path} ({e.strerror}): the results above are not "
                         "saved; to save them, evaluate a copy of the checkpoint in a writable "
                         "folder") from None
    print(f"wrote {path}")


def run_retrieval(args):
    ckpt, model, tokenizer = load(args)
    source, root = data_source(ckpt, args.data, args.data_dir)
    refuse_overlap(ckpt, source, root, args.split, args.allow_overlap)
    with clear_errors():
        caption_set = data.load_split(source, root, args.split, model.config.image_size)
    m = evaluate_retrieval(model, tokenizer, caption_set, args.device,
                           same_sentence=source == "shapes")
    n_texts = len(data.retrieval_captions(caption_set)[0])
    print(f"{source} {args.split}: {len(caption_set.images)} images, {n_texts} captions")
    print(f"{'':>13} {'R@1':>6} {'R@5':>6} {'R@10':>6}")
    for name, label in (("i2t", "image -> text"), ("t2i", "text -> image")):
        print(f"{label:>13} " + " ".join(f"{m[f'{name}_r{k}']:6.1f}" for k in (1, 5, 10)))
    active = "".join(f" | {k} {m[k]:.1f}" for k in ("active_image", "active_text") if k in m)
    print(f"{'rsum':>13} {m['rsum']:6.1f}{active}")
    save_results(Path(args.ckpt).parent / f"retrieval_{args.split}.json",
                 {"checkpoint": str(args.ckpt), "data": source, "root": str(root),
                  "split": args.split, **m})


def run_zeroshot(args):
    ckpt, model, tokenizer = load(args)
    size = model.config.image_size
    if args.dataset == "shapes":
        _, root = data_source(ckpt, "shapes", args.data_dir)
        with clear_errors():
            m = evaluate_shapes_zeroshot(model, tokenizer, root, size, args.device, topk=(1, 5))
        rows = {task: (m[f"zs_{task}"], m[f"zs_{task}_top5"])
                for task in ("shape", "colour", "pair")}
        rows["heldout (vs other shapes)"] = (m["zs_heldout"], None)
    else:
        if args.dataset == "imagefolder" and not args.data_dir:
            raise SystemExit("--dataset imagefolder needs --data-dir: "
                             "the folder with one sub-folder per class")
        root = Path(args.data_dir or f"data/{args.dataset}")
        with clear_errors():  # e.g. no --classnames file, an unreadable image
            dataset, classnames = benchmarks.zeroshot_dataset(args.dataset, root, size,
                                                              args.classnames)
            acc = benchmarks.evaluate_zeroshot(model, tokenizer, dataset, classnames, args.device,
                                               workers=args.workers)
        rows = {f"{args.dataset} ({len(classnames)} classes, {len(dataset)} images)":
                (acc["top1"], acc["top5"])}
        m = {"zs_top1": acc["top1"], "zs_top5": acc["top5"], "classes": classnames}
    print(f"{'':>26} {'top-1':>6} {'top-5':>6}")
    for name, (top1, top5) in rows.items():
        print(f"{name:>26} {top1:6.1f} " + ("" if top5 is None else f"{top5:6.1f}"))
    save_results(Path(args.ckpt).parent / f"zeroshot_{args.dataset}.json",
                 {"checkpoint": str(args.ckpt), "dataset": args.dataset, "root": str(root), **m})


def run_binding(args):
    ckpt, model, tokenizer = load(args)
    source, root = data_source(ckpt, "shapes", args.data_dir)
    need_shapes(root, "binding tests the shapes world's scenes")
    with clear_errors():
        caption_set = data.load_split(source, root, "val", model.config.image_size)
    m = evaluate_binding(model, tokenizer, caption_set, args.device)
    tests = binding_tests(caption_set)
    print(f"binding on {len(caption_set.images)} shapes val images: "
          "true caption vs a minimal edit (chance 50 %)")
    for kind in tests:
        print(f"{kind:>15} {m[f'bind_{kind}']:6.1f}  ({len(tests[kind][0])} images; e.g. "
              f"\"{tests[kind][1][0]}\" vs \"{tests[kind][2][0]}\")")
    save_results(Path(args.ckpt).parent / "binding.json",
                 {"checkpoint": str(args.ckpt), "root": str(root), **m})


def run_probe(args):
    ckpt, model, tokenizer = load(args)
    _, root = data_source(ckpt, "shapes", args.data_dir)
    need_shapes(root, "the probes read the shapes world's labels")
    with clear_errors():
        m = evaluate_shapes_probe(model, root, model.config.image_size, args.device, args.n_train)
    print(f"linear probes of the image embedding: fitted on up to {args.n_train} training "
          "images, scored on the single objects of the zero-shot split (chance 12.5 %)")
    for task in ("shape", "colour"):
        print(f"{task:>8} {m[f'probe_{task}']:6.1f}")
    save_results(Path(args.ckpt).parent / "probe.json",
                 {"checkpoint": str(args.ckpt), "root": str(root), **m})


def run_sugarcrepe(args):
    ckpt, model, tokenizer = load(args)
    coco = Path(args.coco_dir)
    refuse_overlap(ckpt, "coco", coco, "val", args.allow_overlap)   # its images are val2017's
    with clear_errors():
        items = benchmarks.read_sugarcrepe(args.sugarcrepe_dir)
        m = benchmarks.evaluate_sugarcrepe(model, tokenizer, items, coco / "val2017",
                                           coco / "cache" / f"sugarcrepe_{model.config.image_size}",
                                           args.device)
    print("SugarCrepe: image scores the caption above the negative (chance 50 %)")
    for category in benchmarks.SUGARCREPE + ["mean"]:
        n = f" ({len(items[category])} items)" if category in items else ""
        print(f"{category:>12} {m[category]:6.1f}{n}")
    save_results(Path(args.ckpt).parent / "sugarcrepe.json", {"checkpoint": str(args.ckpt), **m})


def run_inspect(args):
    ckpt, model, tokenizer = load(args)
    if model.config.head != "fdt":
        raise SystemExit(f"{args.ckpt} is a CLIP baseline (projection head): it has no FDT "
                         "tokens to inspect; train one with `python train.py --model fdt`")
    out = Path(args.out or Path(args.ckpt).parent / "inspect")
    size = model.config.image_size
    examples = []  # (file name prefix, uint8 image (3, S, S) or None, caption or None)
    concepts_root = None
    if args.image or args.text:
        image = None
        if args.image:
            try:
                with Image.open(args.image) as im:
                    image = benchmarks.image_transform(size)(im.convert("RGB"))
            except OSError as e:  # missing, a folder, or not an image PIL can read
                raise SystemExit(f"error: cannot read {args.image} as an image ({e})") from None
        examples.append(("", image, args.text))
    else:  # a few validation pairs of the training data, and for shapes the concept matrix
        source, root = data_source(ckpt, root=args.data_dir)
        with clear_errors():
            caption_set = data.load_split(source, root, "val", size)
        for i in range(min(args.examples, len(caption_set.images))):
            examples.append((f"val{i}_", as_image_tensor(caption_set.images[i:i + 1])[0],
                             caption_set.captions[i][0]))
        concepts_root = root if source == "shapes" else None
    written = []
    for prefix, image, caption in examples:
        if image is not None:
            written.append(figures.plot_image_tokens(model, image,
                                                     out / f"{prefix}image_tokens.png"))
        if caption is not None:
            written.append(figures.plot_text_tokens(model, tokenizer, caption,
                                                    out / f"{prefix}text_tokens.png"))
        if image is not None and caption is not None:
            written.append(figures.plot_shared_tokens(model, tokenizer, image, caption,
                                                      out / f"{prefix}pair_tokens.png"))
    if concepts_root is not None:
        with clear_errors():
            result = concept_profiles(model, tokenizer, concepts_root, args.device)
        figures.plot_concept_tokens(result, out / "concept_tokens.png")
        written.append(out / "concept_tokens.png")
        print("image vs caption FDT weight profiles, cosine: "
              f"same concept {result['same_concept_cosine']:.2f}, "
              f"different concepts {result['other_concept_cosine']:.2f}")
    print("wrote " + ", ".join(str(p) for p in written))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, run, help):
        p = sub.add_parser(name, help=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.set_defaults(run=run)
        return p

    p = command("retrieval", run_retrieval, "COCO-protocol image-text retrieval")
    p.add_argument("--data", choices=["shapes", "coco", "karpathy"],
                   help="default: the checkpoint's")
    p.add_argument("--data-dir", help="default: the checkpoint's")
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--allow-overlap", action="store_true",
                   help="evaluate even on images the checkpoint was trained on "
                        "(the results are then inflated)")
    p = command("zeroshot", run_zeroshot, "prompt-ensemble zero-shot classification")
    p.add_argument("--dataset", choices=["shapes", "cifar10", "cifar100", "imagefolder"],
                   required=True)
    p.add_argument("--data-dir", help="shapes: default the checkpoint's; cifar: default "
                                      "data/<dataset>; imagefolder: required")
    p.add_argument("--classnames", help="imagefolder: one class name per line, sorted-folder order")
    p.add_argument("--workers", type=int, default=4, help="image decoding processes")
    p = command("binding", run_binding, "shapes: true captions vs swapped, replaced, reversed ones")
    p.add_argument("--data-dir", help="default: the checkpoint's")
    p = command("probe", run_probe,
                "shapes: linear probes of shape and colour on the frozen image features")
    p.add_argument("--data-dir", help="default: the checkpoint's")
    p.add_argument("--n-train", type=int, default=4000,
                   help="training images the probes are fitted on")
    p = command("sugarcrepe", run_sugarcrepe,
                "SugarCrepe compositional benchmark on COCO val2017 images")
    p.add_argument("--sugarcrepe-dir", required=True,
                   help="folder with add_att.json ... swap_obj.json")
    p.add_argument("--coco-dir", required=True, help="COCO 2017 root (with val2017/)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="evaluate a checkpoint trained on val2017 images anyway")
    p = command("inspect", run_inspect, "figures of the FDT tokens an image and a caption activate")
    p.add_argument("--image", help="an image file")
    p.add_argument("--text", help="a caption")
    p.add_argument("--data-dir", help="validation examples from here (default: the checkpoint's)")
    p.add_argument("--examples", type=int, default=3,
                   help="validation examples without --image / --text")
    p.add_argument("--out", help="figure folder (default: inspect/ next to the checkpoint)")
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
