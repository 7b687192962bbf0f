"""Graders for the course assignments (assign.py): each test here fails on a plausible wrong answer
that the other test files could let through, and compares with an independent reference written
differently from the code it checks (loops, float64, brute force)."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import fdt
import train
from data import EOT, PAD, Tokenizer
from fdt import sparsemax
from lib import fdt_fast, metrics
from model import CLIP, PRESETS, contrastive_loss

# -----------------------------------------------------------------------------
# the text tower reads the end-of-text token, not the one before or after it


def small_text_model(head="clip"):
    config = replace(PRESETS["tiny"], head=head, vocab_size=40, context_length=10, text_width=32,
                     text_layers=2, text_heads=2, embed_dim=16, n_fdt=64)
    torch.manual_seed(0)
    return CLIP(config).eval()


def captions(lengths, context_length, vocab_size, seed=0):
    """Random words in 3..vocab_size-1, the end-of-text id last, pads (0) after it; one row per
    length (a length equal to context_length leaves no pad)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab_size, (len(lengths), context_length), generator=g)
    for row, n in enumerate(lengths):
        tokens[row, n - 1] = EOT
        tokens[row, n:] = PAD
    return tokens


def test_text_embedding_is_the_projected_end_of_text_feature():
    model = small_text_model()
    tokens = captions([1, 3, 6, 10], 10, 40)
    with torch.no_grad():
        # (B, L, Wt), every position
        _, features, _ = model.text(tokens)
        # found by its id, not by the mask
        eot = [row.tolist().index(EOT) for row in tokens]
        want = F.normalize(model.text_proj(features[torch.arange(len(tokens)), eot]), dim=-1)
        torch.testing.assert_close(model.encode_text(tokens), want)


def test_text_embedding_ignores_pads_and_sees_the_last_word():
    model = small_text_model()
    tokens = captions([4, 5, 7], 10, 40)
    with torch.no_grad():
        before = model.encode_text(tokens)
        # the pad embedding only reaches positions after the end-of-text token (causal attention)
        model.text.token_embed.weight[PAD].normal_(std=5.0)
        torch.testing.assert_close(model.encode_text(tokens), before)
        last_word = tokens.clone()
        rows = torch.arange(len(tokens))
        # the word before the end-of-text token
        last = (tokens == EOT).int().argmax(dim=1) - 1
        # another word id, never EOT or PAD
        last_word[rows, last] = 3 + (tokens[rows, last] - 3 + 1) % 37
        moved = (model.encode_text(last_word) - before).norm(dim=-1)
    assert (moved > 1e-3).all()


# -----------------------------------------------------------------------------
# the contrastive loss is symmetric, and its per-process form adds up to the whole batch


def info_nce_by_hand(image_emb, text_emb, scale):
    """float64 loops: each image picks its text among all texts, each text its image among all
    images."""
    img, txt = image_emb.double().tolist(), text_emb.double().tolist()
    sim = [[scale * sum(a * b for a, b in zip(i, t)) for t in txt] for i in img]
    n = len(sim)
    i2t = sum(math.log(sum(math.exp(s) for s in sim[i])) - sim[i][i] for i in range(n)) / n
    t2i = sum(math.log(sum(math.exp(sim[j][t]) for j in range(n))) - sim[t][t]
              for t in range(n)) / n
    return i2t, t2i


def asymmetric_batch(n=6, d=8):
    """Embeddings whose image->text and text->image losses differ clearly (a one-sided loss
    shows)."""
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    # texts crowd together, images do not
    txt[1:] = F.normalize(txt[1:] + 2 * txt[0], dim=-1)
    return img, txt


def test_contrastive_loss_is_the_mean_of_both_directions():
    img, txt = asymmetric_batch()
    log_scale = torch.tensor(math.log(20.0))
    i2t, t2i = info_nce_by_hand(img, txt, 20.0)
    # the case tells the directions apart
    assert abs(i2t - t2i) > 0.2
    got = contrastive_loss(img, txt, log_scale)
    assert got.item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)
    # symmetric in its two inputs
    swapped = contrastive_loss(txt, img, log_scale)
    assert swapped.item() == pytest.approx(got.item(), rel=1e-5)
    # the inverse temperature is capped at 100: a logit scale of ln 1000 trains as ln 100
    capped = contrastive_loss(img, txt, torch.tensor(math.log(1000.0)))
    assert capped.item() == pytest.approx(sum(info_nce_by_hand(img, txt, 100.0)) / 2, rel=1e-5)


def test_contrastive_loss_split_over_processes_adds_up():
    img, txt = asymmetric_batch(n=8)
    log_scale = torch.tensor(math.log(20.0))
    whole = contrastive_loss(img, txt, log_scale)
    # two "processes" of 4 rows each, every one seeing the gathered batch
    parts = [contrastive_loss(img[r:r + 4], txt[r:r + 4], log_scale, img, txt, offset=r)
             for r in (0, 4)]
    assert (sum(parts) / 2).item() == pytest.approx(whole.item(), rel=1e-5)


# -----------------------------------------------------------------------------
# sparsemax's backward: the explicit Jacobian, on rows with one, several and every entry in the
# support


def tau_of(x, iters=200):
    """float64 (..., 1): sparsemax's threshold along the last dim, the tau with
    sum(max(x - tau, 0)) = 1, found by bisection."""
    z = x.double()
    hi = z.amax(dim=-1, keepdim=True)              # sum(max(z - hi, 0)) = 0 < 1
    lo = hi - 1                                    # sum >= 1: the max alone contributes 1
    for _ in range(iters):
        mid = (lo + hi) / 2
        enough = torch.clamp(z - mid, min=0).sum(dim=-1, keepdim=True) >= 1
        lo, hi = torch.where(enough, mid, lo), torch.where(enough, hi, mid)
    return (lo + hi) / 2


def support_of(x):
    """float64 support indicator of sparsemax(x) along the last dim."""
    return (x.double() > tau_of(x)).double()


def test_sparsemax_gradient_is_the_jacobian_product():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 7, 9, generator=g, dtype=torch.float64)
    x[0, 0] = torch.linspace(0, 10, 9, dtype=torch.float64)               # support of one entry
    # every entry in the support
    x[0, 1] = 0.01 * torch.randn(9, generator=g, dtype=torch.float64)
    # -inf entries: outside, gradient 0
    x[1, 2, :4] = float("-inf")
    # along dim 1: not the last dim
    grad_out = torch.randn(4, 9, 7, generator=g, dtype=torch.float64)
    # (4, 9, 7), sparsemax over dim 1
    x_t = x.transpose(1, 2).clone().requires_grad_()
    sparsemax(x_t, dim=1).backward(grad_out)
    s = support_of(x)                                                      # (4, 7, 9)
    assert s[0, 0].sum() == 1 and s[0, 1].sum() == 9 and (s[1, 2, :4] == 0).all()
    # (4, 7, 9), rows along the last dim
    g_rows = grad_out.transpose(1, 2)
    for b in range(4):
        for t in range(7):
            jac = torch.diag(s[b, t]) - torch.outer(s[b, t], s[b, t]) / s[b, t].sum()
            torch.testing.assert_close(x_t.grad[b, :, t], jac @ g_rows[b, t])



def test_sparsemax_row_without_a_finite_entry_is_nan_where_nothing_checks(monkeypatch):
    """On a GPU or under torch.compile (can_read_on_host is False) no check runs before the
    threshold: a row of -inf must come out as NaN weights, and the other rows as usual. Its support
    is empty, so a support size used as an index without clamping it to 1 fails here."""
    monkeypatch.setattr(fdt, "can_read_on_host", lambda t: False)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 8, generator=g)
    x[1] = float("-inf")
    x[2, :5] = float("-inf")
    good = torch.tensor([0, 2])
    want = torch.clamp(x[good].double() - tau_of(x[good]), min=0)
    for fn in (fdt.sparsemax, fdt_fast.sparsemax):
        p = fn(x)
        assert p[1].isnan().all(), fn.__module__
        torch.testing.assert_close(p[good].double(), want, atol=1e-6, rtol=0)


# -----------------------------------------------------------------------------
# the plain layer pools by itself


def test_plain_pooling_is_the_max_over_real_positions_without_the_fast_kernel(monkeypatch):
    """fdt.FDT.pooled_relevance against a loop over each caption's real positions, with
    lib/fdt_fast.py's kernel made to refuse: a student copy leaves that kernel out, so a pooling
    that called it would work only in the instructor's copy."""
    def refuse(*args):
        raise AssertionError("fdt.FDT.pooled_relevance called lib/fdt_fast.py's kernel")
    monkeypatch.setattr(fdt_fast.MaxPooledRelevance, "apply", refuse)
    torch.manual_seed(0)
    layer = fdt.FDT(12, 4, temperature=1.0)
    queries = torch.randn(3, 5, 4)
    mask = torch.tensor([[True] * 5, [True, False, True, False, False], [False] * 4 + [True]])
    got = layer.pooled_relevance(queries, mask)
    r = layer.relevance(queries).tolist()
    for b in range(3):
        for k in range(12):
            want = max(r[b][p][k] for p in range(5) if mask[b, p])
            assert got[b, k].item() == pytest.approx(want, rel=1e-6, abs=1e-7), (b, k)


# -----------------------------------------------------------------------------
# recall@k: a right answer at rank exactly k (k better wrong ones) is not in the top k


def test_recall_counts_a_right_answer_at_rank_k_as_a_miss():
    # wrong candidates above each right one
    ranks = [0, 1, 4, 5, 9, 10, 0, 5, 10, 1, 3, 11]
    n_images = len(ranks)
    # (60,), 5 captions per image
    text_to_image = torch.arange(n_images).repeat_interleave(5)
    # image -> text: image i's best caption scores 1 (its other four 0.5), ranks[i] others' captions
    # score 2
    sim = torch.zeros(n_images, 5 * n_images)
    for i, r in enumerate(ranks):
        own = (text_to_image == i).nonzero().flatten()
        sim[i, own] = 0.5
        sim[i, own[2]] = 1.0
        sim[i, (text_to_image != i).nonzero().flatten()[:r]] = 2.0
    # image_emb = I: sim as given
    m = metrics.retrieval_metrics(torch.eye(n_images), sim.t(), text_to_image)
    for k in (1, 5, 10):
        assert m[f"i2t_r{k}"] == pytest.approx(100 * sum(r < k for r in ranks) / n_images), k
    # text -> image: caption t's own image scores 1, ranks[t % 12] other images score 2
    sim = torch.zeros(n_images, 5 * n_images)
    for t in range(5 * n_images):
        own, r = int(text_to_image[t]), ranks[t % n_images]
        sim[own, t] = 1.0
        sim[[i for i in range(n_images) if i != own][:r], t] = 2.0
    m = metrics.retrieval_metrics(torch.eye(n_images), sim.t(), text_to_image)
    want = [ranks[t % n_images] for t in range(5 * n_images)]
    for k in (1, 5, 10):
        assert m[f"t2i_r{k}"] == pytest.approx(100 * sum(r < k for r in want) / len(want)), k


# -----------------------------------------------------------------------------
# the learning-rate schedule: where warm-up starts and ends, the cosine's shape, 0 at the end


def test_lr_warmup_is_linear_and_reaches_peak_on_its_last_step():
    peak, warmup, total = 2.0, 10, 110
    for step in range(warmup):
        # step 0 already trains (peak / warmup), step warmup - 1 is the first at peak
        assert (train.lr_at(step, total, warmup, peak)
                == pytest.approx(peak * (step + 1) / warmup)), step
    # the cosine starts at its top
    assert train.lr_at(warmup, total, warmup, peak) == pytest.approx(peak)
    # no warm-up: peak at once
    assert train.lr_at(0, 100, 0, peak) == pytest.approx(peak)


def test_lr_cosine_shape_and_zero_at_the_end():
    peak, warmup, total = 2.0, 10, 110
    decay = total - warmup
    for fraction in (0.25, 0.5, 0.75):
        step = warmup + int(fraction * decay)
        want = peak * math.cos(math.pi * fraction / 2) ** 2            # 0.854, 0.5, 0.146 of peak
        assert train.lr_at(step, total, warmup, peak) == pytest.approx(want), fraction
    assert train.lr_at(total, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)
    # stays at 0
    assert train.lr_at(total + 7, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)
    lrs = [train.lr_at(s, total, warmup, peak) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))                   # never rises after warm-up


# -----------------------------------------------------------------------------
# the zero-shot classifier: per class, the renormalised mean of its templates' unit embeddings


def test_zeroshot_classifier_is_the_renormalised_template_mean():
    model = small_text_model()
    words = "a photo of the red blue pink circle star ring small"
    tokenizer = Tokenizer.build([words], context_length=10)
    # 4 classes and 3 templates: an average over the wrong axis cannot pass
    classes = ["red circle", "blue star", "pink ring", "small red star"]
    templates = ["a photo of the {}", "the {}", "a {} photo"]
    got = metrics.zeroshot_classifier(model, tokenizer, classes, templates, "cpu")
    assert got.shape == (4, 16)
    with torch.no_grad():
        for c, row in zip(classes, got):
            unit = model.encode_text(tokenizer.encode([t.format(c) for t in templates])).double()
            mean = unit.mean(dim=0)
            torch.testing.assert_close(row.double(), mean / mean.norm(), atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="never occurred.*'ebra'"):
        metrics.zeroshot_classifier(model, tokenizer, ["red zebra"], templates, "cpu")
