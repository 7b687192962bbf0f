"""Finite Discrete Tokens (FDT): the shared token bank that both modalities are grounded in.

Chen et al., "Revisiting Multimodal Representation in Contrastive Learning: From Patch and
Token Embeddings to Finite Discrete Tokens", CVPR 2023 (arXiv 2303.14865), Section 3.2.

An image (its patch features) or a caption (its token features) is turned into queries by a
modality-specific `QueryMap`. Every query is compared with every FDT token; for each FDT token the
best-matching query (max over patches / words) gives its relevance, sparsemax turns the relevances
into sparse weights, and the embedding is the weighted sum of FDT tokens. Both modalities use the
same tokens, so an image and a caption that talk about the same thing activate the same tokens.

This file holds:
    sparsemax      the Euclidean projection onto the probability simplex (Martins & Astudillo, 2016)
    QueryMap       token features -> FDT queries
    FDT            the token bank and the grounding (relevance, masked max-pool, sparsemax, sum)
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# sparsemax

def _sparsemax_threshold(z):
    """The threshold tau of sparsemax along the last dim: sparsemax(z) = max(z - tau, 0).

    z: (..., n) float32. Returns tau: (..., 1). Sort-based (Martins & Astudillo, Alg. 1).
    """
    z_sorted, _ = torch.sort(z, dim=-1, descending=True)     # (..., n)
    cumsum = z_sorted.cumsum(dim=-1)                          # (..., n)
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)  # (n,) 1-based ranks
    # element k (1-based, in sorted order) is in the support iff 1 + k * z_(k) > sum_{j<=k} z_(j);
    # the support is a prefix of the sorted order, so its size is the number of such k.
    # -inf entries never qualify (the left side is -inf); their cumsum terms are never read.
    in_support = 1 + k * z_sorted > cumsum                    # (..., n) bool
    support_size = in_support.sum(dim=-1, keepdim=True)       # (..., 1), >= 1: the max always qualifies
    tau = (cumsum.gather(-1, support_size - 1) - 1) / support_size.to(z.dtype)  # (..., 1)
    return tau


class SparsemaxFunction(torch.autograd.Function):
    """sparsemax along the last dim, with the analytic backward.

    The Jacobian of sparsemax is diag(s) - s s^T / |S| where s is the 0/1 support indicator,
    so the vector-Jacobian product is g - mean(g over the support), zeroed off the support.
    """

    @staticmethod
    def forward(ctx, z):
        tau = _sparsemax_threshold(z)
        p = torch.clamp(z - tau, min=0)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad_p):
        (p,) = ctx.saved_tensors
        support = p > 0                                                     # (..., n) bool
        g = torch.where(support, grad_p, torch.zeros_like(grad_p))
        g_mean = g.sum(dim=-1, keepdim=True) / support.sum(dim=-1, keepdim=True)  # (..., 1)
        return torch.where(support, grad_p - g_mean, torch.zeros_like(grad_p))


def sparsemax(x, dim=-1):
    """Project x onto the probability simplex along `dim`: argmin_p ||p - x||^2, p >= 0, sum p = 1.

    Works on any shape and any dim. The maths runs in float32 whatever the input dtype (so it is
    safe under autocast; float64 stays float64) and the result has x's dtype. -inf entries get
    exactly 0.
    """
    z = x.movedim(dim, -1).to(torch.promote_types(x.dtype, torch.float32))  # (..., n)
    with torch.autocast(device_type=x.device.type, enabled=False):
        p = SparsemaxFunction.apply(z.contiguous())
    return p.to(x.dtype).movedim(-1, dim)


# -----------------------------------------------------------------------------
# the query map and the FDT layer

class QueryMap(nn.Sequential):
    """Token features (d_in) -> FDT queries (dim), as in the official code:
    LayerNorm -> Linear -> GELU -> LayerNorm -> Linear."""

    def __init__(self, in_dim, dim):
        super().__init__(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, dim),
            nn.GELU(),
            nn.LayerNorm(dim),
            nn.Linear(dim, dim),
        )


class FDT(nn.Module):
    """The token bank C (n_tokens, dim), shared by images and text, and the grounding step.

    temperature divides the relevances before sparsemax: with tokens ~ N(0, 1) the raw scaled
    dot products are far apart and sparsemax keeps a single token, so training stalls; a larger
    temperature spreads the weight over more tokens (official value 1000 keeps nearly all of them).
    """

    def __init__(self, n_tokens, dim, temperature=1.0, activation="sparsemax"):
        super().__init__()
        if activation not in ("sparsemax", "softmax"):
            raise ValueError(f"activation must be 'sparsemax' or 'softmax', got {activation!r}")
        self.tokens = nn.Parameter(torch.randn(n_tokens, dim))  # C: both key and value, not projected
        self.temperature = temperature
        self.activation = activation

    def relevance(self, queries):
        """r[b, t, k] = q[b, t] . C[k] / sqrt(dim) / T.  queries (B, T, dim) -> (B, T, n_tokens)."""
        scale = 1.0 / (math.sqrt(self.tokens.shape[1]) * self.temperature)
        return (queries @ self.tokens.t().to(queries.dtype)) * scale

    def pooled_relevance(self, queries, mask=None):
        """s[b, k] = max over real tokens t of r[b, t, k]. mask (B, T) bool, True = real token.

        Pads get -inf, never 0: a 0 would beat every negative relevance of the real tokens, so
        a caption's padding could decide which FDT tokens it activates.
        """
        r = self.relevance(queries)                                  # (B, T, n_tokens)
        if mask is not None:
            r = r.masked_fill(~mask[:, :, None], float("-inf"))
        return r.amax(dim=1)                                         # (B, n_tokens)

    def forward(self, queries, mask=None):
        """queries (B, T, dim) already query-mapped -> weights (B, n_tokens), embedding (B, dim)."""
        s = self.pooled_relevance(queries, mask)                     # (B, n_tokens)
        if self.activation == "sparsemax":
            weights = sparsemax(s, dim=-1)
        else:
            weights = torch.softmax(s.float(), dim=-1).to(s.dtype)
        embedding = weights @ self.tokens.to(weights.dtype)          # (B, dim), not yet normalised
        return weights, embedding
