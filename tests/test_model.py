"""The two towers, both heads, every preset, the loss, and that training moves the loss."""

import math
from dataclasses import replace

import pytest
import torch

from model import CLIP, PRESETS, ModelConfig, contrastive_loss, word_loss


def batch(config, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, config.image_size, config.image_size, generator=g)
    tokens = torch.randint(3, config.vocab_size, (B, config.context_length), generator=g)
    lengths = torch.randint(2, config.context_length + 1, (B,), generator=g)
    pos = torch.arange(config.context_length)
    tokens[pos >= lengths[:, None]] = 0                     # pads after the end
    tokens[torch.arange(B), lengths - 1] = 2                # end-of-text token last
    return images, tokens


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("head", ["fdt", "clip"])
def test_shapes_for_every_preset_and_head(name, head):
    config = replace(PRESETS[name], head=head)
    torch.manual_seed(0)
    model = CLIP(config).eval()
    images, tokens = batch(config, 2)
    with torch.no_grad():
        img, txt, wi, wt, _ = model(images, tokens)
    assert img.shape == txt.shape == (2, config.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    if head == "fdt":
        assert wi.shape == wt.shape == (2, config.n_fdt)
        torch.testing.assert_close(wi.sum(-1), torch.ones(2))
        assert ((wi > 0).sum(-1) < config.n_fdt).all()      # sparse
    else:
        assert wi is None and wt is None
    torch.testing.assert_close(model.logit_scale.exp(), torch.tensor(config.logit_scale_init))


def test_conv_stem_only_for_tiny_and_same_grid():
    assert PRESETS["tiny"].stem == "conv"
    # the paper's patchify ViTs
    assert PRESETS["small"].stem == PRESETS["base"].stem == "patch"
    assert PRESETS["base"].logit_scale_init == pytest.approx(1 / 0.07)     # CLIP's
    for stem in ("patch", "conv"):
        config = replace(PRESETS["tiny"], stem=stem)
        embed = CLIP(config).visual.patch_embed
        out = embed(torch.randn(2, 3, 64, 64))
        # one feature per patch_size x patch_size patch
        grid = 64 // config.patch_size
        assert out.shape == (2, config.vision_width, grid, grid)
    # a conv stem pixel only reaches the patches its receptive field covers: not a global mixer
    # (in evaluation mode: a training BatchNorm's batch statistics mix every position): the first
    # feature sees its own patch and nothing beyond
    p = PRESETS["tiny"].patch_size
    embed = CLIP(replace(PRESETS["tiny"], stem="conv")).visual.patch_embed.eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    embed(x)[0, :, 0, 0].sum().backward()
    touched = x.grad.abs().sum(dim=(0, 1)) > 0
    assert touched[p - 1, p - 1] and not touched[p:].any() and not touched[:, p:].any()
    with pytest.raises(ValueError, match="power-of-two"):
        CLIP(replace(PRESETS["tiny"], stem="conv", image_size=60, patch_size=6))


def test_text_features_ignore_padding():
    config = replace(PRESETS["tiny"], vocab_size=50)
    torch.manual_seed(0)
    model = CLIP(config).eval()
    tokens = torch.tensor([[5, 6, 7, 2] + [0] * 28])
    with torch.no_grad():
        a, wa = model.encode_text(tokens, return_weights=True)
        short, ws = model.encode_text(tokens[:, :4], return_weights=True)   # no pads at all
    torch.testing.assert_close(a, short, atol=1e-5, rtol=0)
    torch.testing.assert_close(wa, ws, atol=1e-6, rtol=0)


@pytest.mark.parametrize("head", ["fdt", "clip"])
def test_loss_at_init_near_log_batch(head):
    config = replace(PRESETS["tiny"], head=head, vocab_size=100, logit_scale_init=1 / 0.07)
    torch.manual_seed(0)
    model = CLIP(config)
    images, tokens = batch(config, 64)
    with torch.no_grad():
        img, txt, _, _, _ = model(images, tokens)
        loss = contrastive_loss(img, txt, model.logit_scale)
    # random embeddings: cosine std ~ 1/sqrt(D), so the loss is ln(B) plus a small excess
    assert abs(loss.item() - math.log(64)) < 1.0


def test_contrastive_loss_matches_by_hand():
    # two pairs with cosines [[1, 0.6], [0, 0.8]]; at inverse temperature 5 the logits are
    # [[5, 3], [0, 4]], and each term is log(1 + e^-(own logit - other logit))
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    i2t = math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-4))     # rows: image -> texts
    t2i = math.log(1 + math.exp(-5)) + math.log(1 + math.exp(-1))     # columns: text -> images
    got = contrastive_loss(img, txt, torch.tensor(math.log(5.0)))
    assert got.item() == pytest.approx((i2t + t2i) / 4, rel=1e-6)
    # perfectly aligned embeddings with a large scale give a near-zero loss
    assert contrastive_loss(img, img, torch.tensor(math.log(100))) < 0.01


@pytest.mark.parametrize("head", ["fdt", "clip"])
def test_a_few_steps_lower_the_loss(head):
    config = ModelConfig(image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                         vision_heads=2, vocab_size=60, context_length=12, text_width=64,
                         text_layers=2, text_heads=2, embed_dim=64, n_fdt=256, head=head)
    torch.manual_seed(0)
    model = CLIP(config)
    images, tokens = batch(config, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        img, txt, _, _, _ = model(images, tokens)
        loss = contrastive_loss(img, txt, model.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_head_is_rejected():
    with pytest.raises(ValueError, match="head"):
        CLIP(replace(PRESETS["tiny"], head="linear"))


def test_incomplete_checkpoint_is_a_clear_error(tmp_path):
    from model import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint
    path = tmp_path / "ckpt.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": {}}, path)
    with pytest.raises(ValueError, match="incomplete .* no model_config, tokenizer"):
        load_checkpoint(path)


def test_word_loss_against_a_count_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, generator=g)
    # 1 = unknown
    tokens = torch.tensor([[5, 7, 5, 2, 0, 0], [3, 2, 0, 0, 0, 0], [8, 1, 4, 6, 2, 0]])
    want = 0.0
    for b in range(3):
        words = {int(t) for t in tokens[b] if t >= 3}                         # no pad, unknown, EOT
        for v in range(9):
            p = 1 / (1 + math.exp(-float(logits[b, v])))
            want -= math.log(p) if v in words else math.log(1 - p)
    assert float(word_loss(logits, tokens)) == pytest.approx(want / 27, rel=1e-5)
