"""CLIP and CLIP+FDT: a Vision Transformer and a text Transformer joined by a contrastive loss.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (2021)
for the encoders, initialisation and loss; Chen et al., CVPR 2023, Section 3 for the FDT head.

    images (B, 3, H, W) -> VisionTransformer -> CLS (B, Wv), patches (B, N, Wv)
    tokens (B, L)       -> TextTransformer   -> EOT (B, Wt), every token (B, L, Wt), real-token mask
    head "clip": Linear(CLS) and Linear(EOT)                              (the CLIP baseline)
    head "fdt":  QueryMap(patches) and QueryMap(tokens) -> one shared FDT  (CLIP+FDT)
    -> L2-normalised embeddings (B, D) -> contrastive_loss

The two heads share everything else, so `config.head` is the only difference between the models
being compared.
"""

import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

import data
import fdt
from lib import fdt_fast


@dataclass
class ModelConfig:
    # vision tower
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    # "patch": one patch_size-stride conv (ViT); "conv": a stack of 3x3 stride-2 convs
    stem: str = "patch"
    stem_norm: bool = False       # BatchNorm after each 3x3 conv of the conv stem (see conv_stem)
    # text tower
    vocab_size: int = 512         # set from the tokenizer's compact vocabulary before training
    context_length: int = 32
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    # head
    head: str = "fdt"             # "fdt" (CLIP+FDT) or "clip" (the baseline: a projection)
    embed_dim: int = 128          # the joint space; also the FDT token dimension (d_fdt)
    # official: 16384 (the base preset); 1024 keeps the tiny model fast on CPU
    n_fdt: int = 1024
    # official: nearly all tokens active; T = 30 keeps ~36 of 1024; T = 1 one, and nothing trains
    fdt_temperature: float = 1000.0
    fdt_activation: str = "sparsemax"  # "softmax" is the paper's ablation
    # lib/fdt_fast.py's exact, faster kernels; False trains fdt.py as written
    fast_fdt: bool = True
    word_head: bool = False       # a linear map from the image embedding to the caption's words
    logit_scale_init: float = 1 / 0.07  # CLIP's initial inverse temperature (learned from there)


PRESETS = {
    # trains on a 2-core CPU in minutes (64 px shapes). A patchify ViT this small does not learn the
    # shapes' outlines in a few hundred steps even with direct labels; a conv stem with BatchNorm
    # does (python -m tools.tower; results/README.md). 16 px patches (a 4 x 4 grid; the stem's
    # four convs still see a whole ~21 px object) and 2 text layers (a 30-word language) cost a
    # third of the FLOPs of 8 px and 4 layers (python -m tools.step_cost), so the same time buys
    # more than twice the steps, and shape is learned by the end of them. A sharper initial
    # softmax (50 vs CLIP's 14.3) makes small caption differences count.
    "tiny": ModelConfig(patch_size=16, text_layers=2, stem="conv", stem_norm=True,
                        logit_scale_init=50.0),
    # one GPU, COCO at 128 px: ViT-S/16-like towers
    "small": ModelConfig(
        image_size=128, patch_size=16, vision_width=384, vision_layers=6, vision_heads=6,
        context_length=64, text_width=384, text_layers=6, text_heads=6,
        embed_dim=384, n_fdt=4096,
    ),
    # ViT-B/32 at 224 px with CLIP's 12 x 512 text transformer and the official 16384 x 512 FDT
    "base": ModelConfig(
        image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
        vocab_size=16384, context_length=77, text_width=512, text_layers=12, text_heads=8,
        embed_dim=512, n_fdt=16384,
    ),
}


# -----------------------------------------------------------------------------
# transformer

class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width, n_heads, causal):
        super().__init__()
        self.n_heads = n_heads
        self.causal = causal
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(C, dim=2)                 # 3 x (B, T, C)
        # (B, h, T, C/h)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        # causal attention is also padding-aware here: pads sit after the last real token, so no
        # real token ever attends to one (pad outputs are garbage and are masked out downstream)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, h, T, C/h)
        y = y.transpose(1, 2).reshape(B, T, C)                             # (B, T, C)
        x = x + self.out(y)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, causal):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, causal) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose statistics are those of the global batch when the batch is split over
    processes (torch.distributed): N processes then compute exactly what one process does (as
    SyncBatchNorm, which runs on GPUs only). Evaluation uses the running averages, as usual."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        B, C, H, W = x.shape
        z = x.float()                                 # statistics in float32, as autocast does
        sums = torch.stack([z.sum(dim=(0, 2, 3)), z.square().sum(dim=(0, 2, 3))])  # (2, C)
        sums = dist_nn.all_reduce(sums)                       # over processes, with gradients
        n = B * H * W * dist.get_world_size()
        mean = sums[0] / n                                    # (C,)
        var = (sums[1] / n - mean.square()).clamp(min=0)      # (C,)
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)            # unbiased, as torch
        z = (z - mean[:, None, None]) * torch.rsqrt(var[:, None, None] + self.eps)
        return (z * self.weight[:, None, None] + self.bias[:, None, None]).to(x.dtype)


def conv_stem(patch_size, width, norm=False):
    """Xiao et al. 2021, "Early Convolutions Help Transformers See Better": log2(patch_size) 3x3
    stride-2 convolutions (channels doubling up to width) and a 1x1 convolution, in place of the
    patchify convolution; the same (B, width, H/p, W/p) output. With norm, a BatchNorm after each
    3x3 conv (as Xiao et al.): without it each conv shrinks the signal ~0.6x at initialisation, the
    transformer first sees little but the position embedding, and shape is learned late."""
    n = patch_size.bit_length() - 1
    if patch_size != 2 ** n or n < 1:
        raise ValueError(f"the conv stem needs a power-of-two patch_size, got {patch_size}")
    # e.g. 3, 32, 64, 128 for width 128, p = 8
    channels = [3] + [max(width >> (n - 1 - i), 16) for i in range(n)]
    layers = []
    for c_in, c_out in zip(channels, channels[1:]):
        layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=not norm)]
        layers += [BatchNorm2d(c_out), nn.ReLU()] if norm else [nn.ReLU()]
    return nn.Sequential(*layers, nn.Conv2d(channels[-1], width, kernel_size=1))


class VisionTransformer(nn.Module):
    """Patch embedding (a patchify conv or a conv stem), a CLS token, learned positions, pre-LN
    transformer."""

    def __init__(self, image_size, patch_size, width, layers, heads, stem="patch", stem_norm=False):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of "
                             f"patch_size {patch_size}")
        n_patches = (image_size // patch_size) ** 2
        if stem == "patch":
            self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size,
                                         bias=False)
        elif stem == "conv":
            self.patch_embed = conv_stem(patch_size, width, stem_norm)
        else:
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        self.cls = nn.Parameter(torch.zeros(width))
        self.pos = nn.Parameter(torch.zeros(n_patches + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, causal=False)
        self.ln_post = nn.LayerNorm(width)

    def forward(self, images):
        """images (B, 3, H, W) -> CLS feature (B, Wv), patch features (B, N, Wv); Wv = width."""
        x = self.patch_embed(images)                          # (B, Wv, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)                      # (B, N, Wv), patches in raster order
        cls = self.cls.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, Wv)
        x = torch.cat([cls, x], dim=1) + self.pos.to(x.dtype)  # (B, 1 + N, Wv)
        x = self.ln_post(self.transformer(self.ln_pre(x)))
        return x[:, 0], x[:, 1:]


class TextTransformer(nn.Module):
    """Token + learned position embeddings, causal pre-LN transformer (as in CLIP)."""

    def __init__(self, vocab_size, context_length, width, layers, heads):
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(context_length, width))
        self.transformer = Transformer(width, layers, heads, causal=True)
        self.ln_final = nn.LayerNorm(width)

    def forward(self, tokens):
        """tokens (B, L), 0 = pad after the end-of-text token ->
        EOT feature (B, Wt), token features (B, L, Wt), mask (B, L) bool with True = real token."""
        B, L = tokens.shape
        x = self.token_embed(tokens) + self.pos[:L]           # (B, L, Wt)
        x = self.ln_final(self.transformer(x))
        mask = tokens != 0                                    # the end-of-text token counts as real
        # (B,) position of the end-of-text token
        eot = mask.sum(dim=1) - 1
        return x[torch.arange(B, device=x.device), eot], x, mask


# -----------------------------------------------------------------------------
# CLIP with a projection head or an FDT head

class CLIP(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.head not in ("fdt", "clip"):
            raise ValueError(f"head must be 'fdt' or 'clip', got {config.head!r}")
        self.config = config
        c = config
        self.visual = VisionTransformer(c.image_size, c.patch_size, c.vision_width, c.vision_layers,
                                        c.vision_heads, c.stem, c.stem_norm)
        self.text = TextTransformer(c.vocab_size, c.context_length, c.text_width, c.text_layers,
                                    c.text_heads)
        if c.head == "fdt":
            self.image_query = fdt.QueryMap(c.vision_width, c.embed_dim)
            self.text_query = fdt.QueryMap(c.text_width, c.embed_dim)
            # the same parameters and results either way (tests/test_fdt.py); the fast kernels skip
            # the (B, L, n_fdt) relevances in backward and sorting every row in sparsemax
            FDT = fdt_fast.FDT if c.fast_fdt else fdt.FDT
            self.fdt = FDT(c.n_fdt, c.embed_dim, c.fdt_temperature, c.fdt_activation)
        else:
            self.image_proj = nn.Linear(c.vision_width, c.embed_dim, bias=False)
            self.text_proj = nn.Linear(c.text_width, c.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(c.logit_scale_init)))
        # SuperClass (Huang et al., NeurIPS 2024): the image names its caption's words
        if c.word_head:
            self.word_head = nn.Linear(c.embed_dim, c.vocab_size)
        self._init_weights()

    def _init_weights(self):
        """CLIP's initialisation (openai/CLIP, clip/model.py: initialize_parameters)."""
        for tower, width, layers in (
                (self.visual, self.config.vision_width, self.config.vision_layers),
                (self.text, self.config.text_width, self.config.text_layers)):
            attn_std = width ** -0.5
            proj_std = width ** -0.5 * (2 * layers) ** -0.5   # residual branches scaled by depth
            fc_std = (2 * width) ** -0.5
            for block in tower.transformer.blocks:
                nn.init.normal_(block.qkv.weight, std=attn_std)
                nn.init.normal_(block.out.weight, std=proj_std)
                nn.init.normal_(block.mlp[0].weight, std=fc_std)
                nn.init.normal_(block.mlp[2].weight, std=proj_std)
        nn.init.normal_(self.visual.cls, std=self.config.vision_width ** -0.5)
        nn.init.normal_(self.visual.pos, std=self.config.vision_width ** -0.5)
        nn.init.normal_(self.text.token_embed.weight, std=0.02)
        nn.init.normal_(self.text.pos, std=0.01)
        if self.config.head == "clip":
            nn.init.normal_(self.image_proj.weight, std=self.config.vision_width ** -0.5)
            nn.init.normal_(self.text_proj.weight, std=self.config.text_width ** -0.5)

    def encode_image(self, images, return_weights=False):
        """images (B, 3, H, W) normalised -> L2-normalised embedding (B, D)
        [and the FDT weights (B, n_fdt), None for the projection head]."""
        cls, patches = self.visual(images)
        if self.config.head == "fdt":
            weights, emb = self.fdt(self.image_query(patches))   # CLS excluded, as in the paper
        else:
            weights, emb = None, self.image_proj(cls)
        emb = F.normalize(emb, dim=-1)
        return (emb, weights) if return_weights else emb

    def encode_text(self, tokens, return_weights=False):
        """tokens (B, L) -> L2-normalised embedding (B, D) [and the FDT weights (B, n_fdt)]."""
        eot, features, mask = self.text(tokens)
        if self.config.head == "fdt":
            weights, emb = self.fdt(self.text_query(features), mask)
        else:
            weights, emb = None, self.text_proj(eot)
        emb = F.normalize(emb, dim=-1)
        return (emb, weights) if return_weights else emb

    def image_relevance(self, images):
        """Per-patch relevance to every FDT token (B, N, n_fdt): which patches ground which
        token."""
        _, patches = self.visual(images)
        return self.fdt.relevance(self.image_query(patches))

    def text_relevance(self, tokens):
        """Per-word relevance to every FDT token (B, L, n_fdt) and the real-token mask (B, L)."""
        _, features, mask = self.text(tokens)
        return self.fdt.relevance(self.text_query(features)), mask

    def forward(self, images, tokens):
        """Both embeddings, both FDT weights (None for the projection head) and the caption-word
        logits of each image (B, vocab_size; None without the word head), in one call so that
        DistributedDataParallel sees every parameter used."""
        image_emb, image_weights = self.encode_image(images, return_weights=True)
        text_emb, text_weights = self.encode_text(tokens, return_weights=True)
        word_logits = self.word_head(image_emb) if self.config.word_head else None
        return image_emb, text_emb, image_weights, text_weights, word_logits


def contrastive_loss(image_emb, text_emb, logit_scale, all_image_emb=None, all_text_emb=None,
                     offset=0):
    """Symmetric InfoNCE: image i matches text i. Embeddings (B, D) L2-normalised; logit_scale is
    the log of the inverse temperature (learned).

    With the batch split over processes (open_clip's local loss): image_emb, text_emb are this
    process's b rows, all_*_emb the whole batch (N, D) gathered with gradients, and offset the
    index of the first local row in it. The mean of the processes' losses is then the loss of the
    whole batch, and so is the mean of their gradients, which is what DDP computes.

    What the graders check: the value against a float64 count by hand on a batch where the two
    directions differ (a one-sided loss shows); the same loss with the inputs swapped; the split
    over processes; the logit scale's exponential capped at 100 (CLIP's cap); ln(B) at
    initialisation; training with it lowers the loss.
    """
    all_image_emb = image_emb if all_image_emb is None else all_image_emb
    all_text_emb = text_emb if all_text_emb is None else all_text_emb
    # CLIP's cap (and the official FDT code's) on the inverse temperature
    scale = logit_scale.exp().clamp(max=100)
    logits_i2t = scale * image_emb.float() @ all_text_emb.float().t()   # (b, N)
    logits_t2i = scale * text_emb.float() @ all_image_emb.float().t()   # (b, N)
    labels = offset + torch.arange(image_emb.shape[0], device=image_emb.device)
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def word_loss(word_logits, tokens):
    """Which words of its caption an image shows, as multi-label classification over the vocabulary
    (SuperClass, Huang et al., NeurIPS 2024; CatLIP): BCE of word_logits (B, vocab_size) against
    the multi-hot set of the caption's text ids (B, L), pads and other special ids left out. It
    asks the image tower for every word, shape included, where the contrastive loss is satisfied
    by whatever separates the batch first (often colour)."""
    target = torch.zeros_like(word_logits, dtype=torch.float32).scatter_(1, tokens, 1.0)
    target[:, :data.N_SPECIAL] = 0                                   # pad, unknown, end of text
    return F.binary_cross_entropy_with_logits(word_logits.float(), target)


# -----------------------------------------------------------------------------
# checkpoints: plain tensors, numbers, strings and lists only, so torch.load(weights_only=True)
# reads them and no pickled object can run code

CHECKPOINT_FORMAT = "fdt-clip"
CHECKPOINT_VERSION = 1


def config_from_dict(d):
    """ModelConfig from a checkpoint's dict; unknown keys are an error, not silently dropped.
    Checkpoints from before the baseline head was named "clip" call it "proj"."""
    d = {**d, "head": "clip"} if d.get("head") == "proj" else d
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"model config has unknown fields {unknown}")
    return ModelConfig(**d)


def load_checkpoint(path, map_location="cpu"):
    """Read one of our checkpoints, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # torch's message for a file it refuses to unpickle advises weights_only=False, which would
        # run whatever the file holds: keep only the reason (its "WeightsUnpickler error" line)
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]*?)(\. |\n|$)", str(e))
        reason = reason.group(1) if reason else (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{path} is not a readable FDT-CLIP checkpoint "
                         f"({type(e).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an FDT-CLIP checkpoint "
                         f"(no format tag {CHECKPOINT_FORMAT!r})")
    missing = [key for key in ("model", "model_config", "tokenizer") if key not in ckpt]
    if missing:
        raise ValueError(f"{path} is an incomplete FDT-CLIP checkpoint: no {', '.join(missing)}")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint format version {ckpt['version']}, "
                         f"newer than this code reads ({CHECKPOINT_VERSION}); update the code")
    return ckpt


def save_checkpoint(path, model, tokenizer, data_source, **train_state):
    """Write model, config, tokenizer and training state (step, optimizer, ...) to `path`
    atomically: under a temporary name, flushed to disk, then renamed, so a crash or kill -9 at any
    moment leaves either the previous checkpoint or this one, never half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                        "model": model.state_dict(),
                        "model_config": asdict(model.config), "tokenizer": tokenizer.state_dict(),
                        "data": data_source, **train_state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # a full disk: no half-written temporary left to fill it
        tmp.unlink(missing_ok=True)


def load_weights(model, state):
    """model.load_state_dict(state), but weights that do not fit the model are one line naming a
    few of the keys that differ, not torch's list of every one."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k}: {tuple(getattr(state[k], 'shape', ()))}, config {tuple(own[k].shape)}"
                for k in own if k in state and getattr(state[k], "shape", None) != own[k].shape]
    problems = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for what, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("of another shape", reshaped)) if keys]
    if problems:
        raise ValueError("the checkpoint's weights do not match its model config: "
                         + "; ".join(problems))
    model.load_state_dict(state)


def model_from_checkpoint(ckpt):
    """Rebuild the CLIP model stored in a checkpoint dict (from load_checkpoint)."""
    model = CLIP(config_from_dict(ckpt["model_config"]))
    load_weights(model, ckpt["model"])
    return model
