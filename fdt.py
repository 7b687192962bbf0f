"""Finite Discrete Tokens (FDT): the shared token bank that both modalities are grounded in.

Chen et al., "Revisiting Multimodal Representation in Contrastive Learning: From Patch and
Token Embeddings to Finite Discrete Tokens", CVPR 2023 (arXiv 2303.14865), Section 3.2.

An image (its patch features) or a caption (its token features) is turned into queries by a
modality-specific `QueryMap`. Every query is compared with every FDT token; for each FDT token the
best-matching query (max over patches / words) gives its relevance, sparsemax turns the relevances
into sparse weights, and the embedding is the weighted sum of FDT tokens. Both modalities use the
same tokens, so an image and a caption that talk about the same thing activate the same tokens.

This file holds:
    sparsemax           the Euclidean projection onto the probability simplex (Martins & Astudillo,
                        2016), exact, from a partial top-k; sparsemax_sort is the sort-based reference
    QueryMap            token features -> FDT queries
    MaxPooledRelevance  the masked max over tokens of the relevances, keeping only the argmax
    FDT                 the token bank and the grounding (relevance, masked max-pool, sparsemax, sum)
"""

import math

import torch
import torch.nn as nn


# -----------------------------------------------------------------------------
# sparsemax

def _threshold_from_sorted(z_sorted):
    """tau and the support size of sparsemax from the m largest entries of each row, sorted in
    descending order along the last dim (Martins & Astudillo, Alg. 1): sparsemax(z) = max(z - tau, 0).

    z_sorted: (..., m). Returns tau (..., 1) and support_size (..., 1). Both are exact when m is the
    whole row, or when support_size < m: the support is a prefix of the sorted order, so once one
    of the m entries falls out of it, no later entry can be in it.
    """
    cumsum = z_sorted.cumsum(dim=-1)                          # (..., m)
    k = torch.arange(1, z_sorted.shape[-1] + 1, device=z_sorted.device, dtype=z_sorted.dtype)  # (m,) 1-based ranks
    # element k (1-based, in sorted order) is in the support iff 1 + k * z_(k) > sum_{j<=k} z_(j).
    # -inf entries never qualify (the left side is -inf); their cumsum terms are never read.
    in_support = 1 + k * z_sorted > cumsum                    # (..., m) bool
    support_size = in_support.sum(dim=-1, keepdim=True)       # (..., 1), >= 1: the max always qualifies
    tau = (cumsum.gather(-1, support_size - 1) - 1) / support_size.to(z_sorted.dtype)  # (..., 1)
    return tau, support_size


def _threshold_sort(z):
    """tau along the last dim from a full sort: O(n log n) per row, the reference."""
    z_sorted, _ = torch.sort(z, dim=-1, descending=True)     # (..., n)
    return _threshold_from_sorted(z_sorted)[0]


def _topk_values(z, k, groups=16):
    """The k largest entries of each row along the last dim, in descending order (as torch.topk)."""
    n = z.shape[-1]
    if n >= 4 * k * groups and n % groups == 0:
        # Split each row into n / groups columns of `groups` entries (column j holds entries j,
        # j + n / groups, ...) and keep only the k columns with the largest maxima: every entry of
        # another column is at most its max, so at most the k-th largest column max, and the kept
        # columns hold k entries (their maxima) at least that large. Two selections over n / groups
        # and k * groups entries then replace one over the whole row (topk on CPU copies every
        # entry it looks at; the column max is a vectorised elementwise max).
        columns = z.unflatten(-1, (groups, n // groups))                         # (..., groups, n / groups)
        _, best = columns.amax(dim=-2).topk(k, dim=-1)                           # (..., k) column ids
        z = columns.gather(-1, best.unsqueeze(-2).expand(*best.shape[:-1], groups, k))  # (..., groups, k)
        z = z.flatten(-2)                                                        # (..., groups * k)
    return z.topk(k, dim=-1).values


def _threshold_topk(z, k=64):
    """The same tau from the k largest entries of each row: a partial selection reads the row once
    instead of sorting it, and FDT weights are sparse (tens to a few hundred active tokens out of
    thousands), so the support mostly fits in the top k. Rows where it may not (all k candidates
    are in the support) are redone with 4k candidates, and so on up to the full sort, so every row
    is exact."""
    if k >= z.shape[-1]:
        return _threshold_sort(z)
    tau, support_size = _threshold_from_sorted(_topk_values(z, k))
    unsolved = (support_size == k).squeeze(-1)                # (...,) bool: the support may go past k
    if unsolved.any():
        tau[unsolved] = _threshold_topk(z[unsolved], 4 * k)
    return tau


class SparsemaxFunction(torch.autograd.Function):
    """sparsemax along the last dim, with the analytic backward; `threshold` computes tau.

    The Jacobian of sparsemax is diag(s) - s s^T / |S| where s is the 0/1 support indicator,
    so the vector-Jacobian product is g - mean(g over the support), zeroed off the support.
    """

    @staticmethod
    def forward(ctx, z, threshold):
        p = (z - threshold(z)).clamp_(min=0)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad_p):
        (p,) = ctx.saved_tensors
        support = p.sign()                                     # (..., n): 1 on the support, 0 off it (p >= 0)
        g_mean = torch.linalg.vecdot(grad_p, support).unsqueeze(-1) / support.sum(dim=-1, keepdim=True)  # (..., 1)
        return (grad_p - g_mean).mul_(support), None


def _sparsemax(x, dim, threshold):
    z = x.movedim(dim, -1).to(torch.promote_types(x.dtype, torch.float32))  # (..., n)
    with torch.autocast(device_type=x.device.type, enabled=False):
        p = SparsemaxFunction.apply(z.contiguous(), threshold)
    return p.to(x.dtype).movedim(-1, dim)


def sparsemax(x, dim=-1):
    """Project x onto the probability simplex along `dim`: argmin_p ||p - x||^2, p >= 0, sum p = 1.

    Works on any shape and any dim. The maths runs in float32 whatever the input dtype (so it is
    safe under autocast; float64 stays float64) and the result has x's dtype. -inf entries get
    exactly 0. The threshold comes from a partial top-k selection, exact on every row (see
    `_threshold_topk`); `sparsemax_sort` is the same function through a full sort.
    """
    return _sparsemax(x, dim, _threshold_topk)


def sparsemax_sort(x, dim=-1):
    """sparsemax with the threshold from a full sort of every row: the readable reference."""
    return _sparsemax(x, dim, _threshold_sort)


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


class MaxPooledRelevance(torch.autograd.Function):
    """s[b, k] = scale * max over real tokens t of q[b, t] . C[k], keeping only the argmax for backward.

    Plain autograd through relevance -> masked_fill -> amax saves the (B, T, n_tokens) relevances
    and spends two more matmuls of that size in backward. But s[b, k] depends on one query only, the
    winning token t* = argmax_t, so its gradient reaches q[b, t*] and C[k] alone:
        grad_q[b, t*] += g[b, k] * scale * C[k]        grad_C[k] += g[b, k] * scale * q[b, t*]
    and sparsemax's gradient is zero off the support, so only tens of the (b, k) carry any.
    Where two tokens tie exactly, amax splits the gradient between them and this gives it all to one
    (both are valid subgradients); with float32 features ties have probability zero, in bfloat16
    (8-bit mantissa) 1-2 % of the maxima over tens of tokens are ties.
    """

    @staticmethod
    def forward(ctx, queries, tokens, mask, scale):
        B, T, _ = queries.shape
        s = queries.new_empty(B, tokens.shape[0])                    # (B, n_tokens)
        winner = torch.empty_like(s, dtype=torch.long)               # (B, n_tokens), t* of every (b, k)
        # in 8 slices of the batch: the whole (B, T, n_tokens) never exists, and on CPU a slice's
        # relevances stay in cache between the matmul and the max (tiny preset: 4 MB)
        chunk = math.ceil(B / 8)
        with torch.autocast(queries.device.type, enabled=False):     # computes in queries' dtype, as s
            for i in range(0, B, chunk):
                rows = slice(i, i + chunk)
                q = queries[rows]                                    # (b, T, dim)
                # bmm: matmul, given tensors that require grad, would do one mm and copy to transpose
                r = torch.bmm(tokens.expand(len(q), -1, -1), q.transpose(1, 2))  # (b, n_tokens, T), T contiguous
                if mask is not None:
                    r.masked_fill_(~mask[rows, None, :], float("-inf"))
                torch.max(r, dim=-1, out=(s[rows], winner[rows]))
        ctx.save_for_backward(queries, tokens, winner)
        ctx.scale = scale
        return s.mul_(scale)                                         # scale > 0: the max is unchanged

    @staticmethod
    def backward(ctx, grad_s):
        queries, tokens, winner = ctx.saved_tensors
        B, T, dim = queries.shape
        n_tokens = tokens.shape[0]
        grad_s = (grad_s * ctx.scale).to(queries.dtype)              # (B, n_tokens)
        bk = grad_s.flatten().nonzero().squeeze(1)                   # (P,) flat ids b * n_tokens + k with a gradient
        if len(bk) * dim > B * T * n_tokens:
            # a dense gradient (softmax): the relevance gradient, one non-zero per (b, k), and two
            # matmuls cost less than gathering a row of dim for every (b, k)
            grad_r = grad_s.new_zeros(B, n_tokens, T)
            grad_r.scatter_(-1, winner[..., None], grad_s[..., None])  # (B, n_tokens, T)
            return grad_r.transpose(1, 2) @ tokens, torch.einsum("bkt,btd->kd", grad_r, queries), None, None
        b, k = bk // n_tokens, bk % n_tokens
        bt = b * T + winner.flatten()[bk]                            # (P,) flat ids b * T + t* of their winners
        g = grad_s.flatten()[bk, None]                               # (P, 1)
        q = queries.reshape(B * T, dim)
        grad_queries = torch.zeros_like(q).index_add_(0, bt, tokens.index_select(0, k).mul_(g))  # (B * T, dim)
        grad_tokens = torch.zeros_like(tokens).index_add_(0, k, q.index_select(0, bt).mul_(g))   # (n_tokens, dim)
        return grad_queries.view(B, T, dim), grad_tokens, None, None


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

    @property
    def scale(self):
        """The factor on every dot product q . C[k]: 1 / sqrt(dim) (attention's) / T."""
        return 1.0 / (math.sqrt(self.tokens.shape[1]) * self.temperature)

    def relevance(self, queries):
        """r[b, t, k] = q[b, t] . C[k] / sqrt(dim) / T.  queries (B, T, dim) -> (B, T, n_tokens)."""
        return (queries @ self.tokens.t().to(queries.dtype)) * self.scale

    def pooled_relevance(self, queries, mask=None):
        """s[b, k] = max over real tokens t of r[b, t, k]. mask (B, T) bool, True = real token.

        Pads get -inf, never 0: a 0 would beat every negative relevance of the real tokens, so
        a caption's padding could decide which FDT tokens it activates. The relevances themselves
        are not kept for backward (see MaxPooledRelevance).
        """
        return MaxPooledRelevance.apply(queries, self.tokens.to(queries.dtype), mask, self.scale)  # (B, n_tokens)

    def forward(self, queries, mask=None):
        """queries (B, T, dim) already query-mapped -> weights (B, n_tokens), embedding (B, dim)."""
        s = self.pooled_relevance(queries, mask)                     # (B, n_tokens)
        if self.activation == "sparsemax":
            weights = sparsemax(s, dim=-1)
        else:
            weights = torch.softmax(s.float(), dim=-1).to(s.dtype)
        embedding = weights @ self.tokens.to(weights.dtype)          # (B, dim), not yet normalised
        return weights, embedding
