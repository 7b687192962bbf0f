"""Exact, faster equivalents of the FDT layer's two costly steps; training uses these.

Nothing here changes a result: every function computes what fdt.py writes plainly (to float
rounding), and tests/test_fdt.py checks each against its plain version. Skip this file on a first
read.

    sparsemax            the threshold from a partial top-k instead of a full sort (~14x faster
                         on (256, 16384) rows on a CPU), exact on every row
    MaxPooledRelevance   the masked max over positions keeping only the argmax for backward,
                         instead of autograd through the (B, L, n_tokens) relevances
    FDT                  fdt.FDT with both: the same parameters, state dict and outputs
"""

import math

import torch

import fdt
from fdt import apply_sparsemax, threshold_from_sorted, threshold_sort


# -----------------------------------------------------------------------------
# sparsemax from a partial top-k

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
        # (..., groups, n / groups)
        columns = z.unflatten(-1, (groups, n // groups))
        # (..., k) column ids
        _, best = columns.amax(dim=-2).topk(k, dim=-1)
        # (..., groups, k)
        z = columns.gather(-1, best.unsqueeze(-2).expand(*best.shape[:-1], groups, k))
        z = z.flatten(-2)                                                        # (..., groups * k)
    return z.topk(k, dim=-1).values


def _threshold_rounds(z, k):
    """tau from the k largest entries of each row: a partial selection reads the row once instead
    of sorting it, and FDT weights are sparse (tens to a few thousand active tokens out of
    thousands), so the support mostly fits in the top k. Rows where it may not (all k candidates
    are in the support) are redone with 4k candidates, and so on, so every row is exact; past n / 8
    candidates a full sort costs less than the selection."""
    if 8 * k > z.shape[-1]:
        return threshold_sort(z)
    tau, support_size = threshold_from_sorted(_topk_values(z, k))
    # (...,) bool: the support may go past k
    unsolved = (support_size == k).squeeze(-1)
    if unsolved.any():
        tau[unsolved] = _threshold_rounds(z[unsolved], 4 * k)
    return tau


def _threshold_topk(z):
    """tau of every row, exact, from a partial top-k whose size is estimated from a sample.

    The first n / 64 entries of each row, scaled by 64, have about the row's support scaled by
    1 / 64 (FDT tokens are in no particular order). Starting from 1.5x the rows' median estimate,
    most rows are solved in one round; where it passes n / 8 (T = 1000: ~30 % of 16384 tokens
    active) the rows are sorted at once, instead of after three rounds that cost more than one."""
    n = z.shape[-1]
    m = n // 64
    if m < 8 or z.numel() == 0:
        return threshold_sort(z)
    sample, _ = torch.sort(z[..., :m] * (n / m), dim=-1, descending=True)   # (..., m)
    _, sample_support = threshold_from_sorted(sample)                       # (..., 1)
    # a typical row's support: the samples' median, scaled back to the row
    expected = sample_support.float().median().item() * n / m
    return _threshold_rounds(z, max(64, 64 * math.ceil(1.5 * expected / 64)))


def _threshold(z):
    """The top-k threshold where its host reads (the estimate, the unsolved rows) are free; on a
    GPU or under torch.compile the full sort, which reads nothing back and keeps one graph."""
    return _threshold_topk(z) if fdt.can_read_on_host(z) else threshold_sort(z)


def sparsemax(x, dim=-1):
    """fdt.sparsemax, with the threshold from a partial top-k (see _threshold)."""
    return apply_sparsemax(x, dim, _threshold)


# -----------------------------------------------------------------------------
# the max over positions, keeping only the argmax

class MaxPooledRelevance(torch.autograd.Function):
    """s[b, k] = scale * max over real positions l of q[b, l] . C[k], keeping only the argmax for
    backward.

    Plain autograd through relevance -> masked_fill -> amax saves the (B, L, n_tokens) relevances.
    But s[b, k] depends on one query only, the winning position l* = argmax_l, so its gradient
    reaches q[b, l*] and C[k] alone:
        grad_q[b, l*] += g[b, k] * scale * C[k]        grad_C[k] += g[b, k] * scale * q[b, l*]
    and sparsemax's gradient is zero off the support, so only tens of the (b, k) carry any: on the
    CPU backward gathers those. Finding them reads their count back to the host, which on a GPU
    waits for the device and under torch.compile splits the graph; there the same sums are two
    matmuls per batch slice through the relevance gradient (one non-zero per (b, k), at l*).
    Where two positions tie exactly, amax splits the gradient between them and this gives it all to
    one (both are valid subgradients); with float32 features ties have probability zero, in bfloat16
    (8-bit mantissa) 1-2 % of the maxima over tens of positions are ties.
    """

    @staticmethod
    def forward(ctx, queries, tokens, mask, scale):
        """queries (B, L, dim), tokens = C (n_tokens, dim) in any float dtype (the maths runs in
        queries' dtype; C's gradient comes back in C's), mask (B, L) bool (True = real) or None."""
        s, winner = [], []
        C = tokens.to(queries.dtype)
        # computes in queries' dtype, as s
        with torch.autocast(queries.device.type, enabled=False):
            for rows in _batch_slices(len(queries)):
                # in slices: the whole (B, L, n_tokens) never exists, and on CPU a slice's
                # relevances stay in cache between the matmul and the max (tiny preset: 4 MB).
                # bmm: matmul, given tensors that require grad, would do one mm and copy to
                # transpose
                q = queries[rows]                                    # (b, L, dim)
                r = torch.bmm(C.expand(len(q), -1, -1), q.transpose(1, 2))  # (b, n_tokens, L)
                if mask is not None:
                    r.masked_fill_(~mask[rows, None, :], float("-inf"))
                best, l_star = r.max(dim=-1)                         # (b, n_tokens) each
                s.append(best)
                winner.append(l_star)
        ctx.save_for_backward(queries, tokens, torch.cat(winner))   # (B, n_tokens): each l*
        ctx.scale = scale
        return torch.cat(s).mul_(scale)                              # scale > 0: the same max

    @staticmethod
    def backward(ctx, grad_s):
        queries, tokens, winner = ctx.saved_tensors
        B, L, dim = queries.shape
        grad_s = grad_s.float() * ctx.scale                          # (B, n_tokens)
        if fdt.can_read_on_host(grad_s):
            bk = grad_s.flatten().nonzero().squeeze(1)               # (P,) b * n_tokens + k, g != 0
            # a dense gradient (softmax): two matmuls cost less than a gathered row for each (b, k)
            if len(bk) * dim <= B * L * tokens.shape[0]:
                return *_sparse_backward(bk, grad_s, queries, tokens, winner), None, None
        return *_dense_backward(grad_s, queries, tokens, winner), None, None


def _batch_slices(B, n=8):
    """n slices of range(B), the last one shorter."""
    step = math.ceil(B / n)
    return [slice(i, i + step) for i in range(0, B, step)]


def _sparse_backward(bk, grad_s, queries, tokens, winner):
    """MaxPooledRelevance's gradients from the P pairs (b, k) with a gradient, bk (P,) flat ids.
    The sums run in float32 whatever the dtype: bfloat16 sums of tens of terms lose ~2 % (one
    rounding of the result: ~0.2 %)."""
    B, L, dim = queries.shape
    n_tokens = tokens.shape[0]
    b, k = bk // n_tokens, bk % n_tokens
    bl = b * L + winner.flatten()[bk]                                # (P,) b * L + l*, the winners
    g = grad_s.flatten()[bk, None]                                   # (P, 1) float32
    q = queries.reshape(B * L, dim)
    grad_queries = q.new_zeros(B * L, dim, dtype=torch.float32)
    grad_queries.index_add_(0, bl, tokens.index_select(0, k).float().mul_(g))
    grad_tokens = torch.zeros_like(tokens, dtype=torch.float32)
    grad_tokens.index_add_(0, k, q.index_select(0, bl).float().mul_(g))
    return grad_queries.view(B, L, dim).to(queries.dtype), grad_tokens.to(tokens.dtype)


def _dense_backward(grad_s, queries, tokens, winner):
    """MaxPooledRelevance's gradients as matmuls through the relevance gradient, one batch slice
    at a time (as forward): no data-dependent shape, nothing read back to the host."""
    B, L, dim = queries.shape
    n_tokens = tokens.shape[0]
    C = tokens.to(queries.dtype)
    grad_s = grad_s.to(queries.dtype)
    grad_queries = torch.empty_like(queries)
    grad_tokens = torch.zeros_like(tokens, dtype=torch.float32)      # summed over slices in float32
    for rows in _batch_slices(B):
        g = grad_s[rows]                                             # (b, n_tokens)
        grad_r = g.new_zeros(len(g), n_tokens, L)                    # (b, n_tokens, L)
        grad_r.scatter_(-1, winner[rows, :, None], g[..., None])
        grad_queries[rows] = grad_r.transpose(1, 2) @ C              # (b, L, dim)
        grad_tokens += torch.einsum("bkl,bld->kd", grad_r, queries[rows]).float()
    return grad_queries, grad_tokens.to(tokens.dtype)


class FDT(fdt.FDT):
    """fdt.FDT computed with MaxPooledRelevance and the top-k sparsemax: same parameters, same
    checkpoints, same outputs."""

    def pooled_relevance(self, queries, mask=None):
        return MaxPooledRelevance.apply(queries, self.tokens, mask, self.scale)  # (B, n_tokens)

    def activate(self, s):
        return sparsemax(s, dim=-1) if self.activation == "sparsemax" else super().activate(s)
