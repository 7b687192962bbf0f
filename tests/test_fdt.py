"""sparsemax against an independent float64 reference, the fast sparsemax against the sort-based
one, the FDT layer's masking, and its max-pooled relevance against plain autograd."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fdt as fdt_module
from lib import fdt_fast
from fdt import FDT, QueryMap, sparsemax
from lib.fdt_fast import MaxPooledRelevance


def sparsemax_bisection(x, dim=-1, iters=200):
    """Independent float64 reference: find tau with sum(max(x - tau, 0)) = 1 by bisection."""
    z = x.double().movedim(dim, -1)
    hi = z.amax(dim=-1, keepdim=True)              # sum(max(z - hi, 0)) = 0 < 1
    lo = hi - 1                                    # sum >= 1 (the max alone contributes 1)
    for _ in range(iters):
        mid = (lo + hi) / 2
        total = torch.clamp(z - mid, min=0).sum(dim=-1, keepdim=True)
        lo = torch.where(total >= 1, mid, lo)
        hi = torch.where(total >= 1, hi, mid)
    return torch.clamp(z - (lo + hi) / 2, min=0).movedim(-1, dim)


def random_inputs():
    g = torch.Generator().manual_seed(0)
    cases = []
    for shape in [(7,), (5, 13), (3, 4, 33), (2, 3, 4, 9), (16, 1024)]:
        for scale in [1e-4, 1.0, 30.0, 1e4]:
            cases.append(torch.randn(shape, generator=g) * scale)
    ties = torch.randint(0, 3, (32, 50), generator=g).float()          # many exact ties
    cases.append(ties)
    cases.append(torch.zeros(4, 10))                                    # all tied: uniform
    with_inf = torch.randn(32, 40, generator=g)
    with_inf[torch.rand(32, 40, generator=g) < 0.5] = float("-inf")
    with_inf[:, 0] = torch.randn(32, generator=g)                        # at least one finite
    cases.append(with_inf)
    return cases


@pytest.mark.parametrize("case", range(len(random_inputs())))
def test_sparsemax_matches_bisection_reference_on_every_dim(case):
    x = random_inputs()[case]
    for dim in range(-x.dim(), x.dim()):
        p = sparsemax(x, dim=dim)
        ref = sparsemax_bisection(x, dim=dim)
        assert p.shape == x.shape and p.dtype == x.dtype
        scale = x[torch.isfinite(x)].abs().max().clamp(min=1).item()
        torch.testing.assert_close(p.double(), ref, atol=1e-6 * scale, rtol=0)
        torch.testing.assert_close(p.sum(dim).double(), torch.ones_like(p.sum(dim)).double(),
                                   atol=1e-5, rtol=0)
        assert (p >= 0).all()


def test_sparsemax_is_sparse_and_inf_gets_exact_zero():
    x = torch.randn(64, 200) * 10
    x[:, 100:] = float("-inf")
    p = sparsemax(x)
    assert (p[:, 100:] == 0).all()
    assert ((p > 0).sum(-1) < 20).all()       # far from dense at this scale
    # the top entry always survives, a uniform row stays uniform
    assert (p.argmax(-1) == x.argmax(-1)).all()
    torch.testing.assert_close(sparsemax(torch.zeros(3, 8)), torch.full((3, 8), 1 / 8))


def test_sparsemax_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    for shape, dim in [((4, 9), -1), ((3, 5, 6), 1), ((6, 4), 0)]:
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: sparsemax(t, dim=dim), (x,), eps=1e-6, atol=1e-5)


def test_sparsemax_backward_matches_jacobian():
    x = torch.randn(5, 12, dtype=torch.float64) * 3
    g = torch.randn(5, 12, dtype=torch.float64)
    x.requires_grad_()
    sparsemax(x).backward(g)
    p = sparsemax(x.detach())
    for i in range(5):
        s = (p[i] > 0).double()
        jac = torch.diag(s) - torch.outer(s, s) / s.sum()       # symmetric
        torch.testing.assert_close(x.grad[i], jac @ g[i])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparsemax_low_precision_input(dtype):
    x = torch.randn(8, 300) * 5
    p = sparsemax(x.to(dtype))
    assert p.dtype == dtype
    ref = sparsemax_bisection(x.to(dtype).float())
    torch.testing.assert_close(p.double(), ref, atol=1e-2, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = sparsemax(x)
    torch.testing.assert_close(q.double(), sparsemax_bisection(x), atol=1e-6 * 5 * 4, rtol=0)


def test_query_map_layers_in_order():
    qm = QueryMap(24, 16)
    kinds = [type(m).__name__ for m in qm]
    assert kinds == ["LayerNorm", "Linear", "GELU", "LayerNorm", "Linear"]
    assert qm(torch.randn(2, 5, 24)).shape == (2, 5, 16)


def test_fdt_weights_and_embedding():
    torch.manual_seed(0)
    fdt = FDT(64, 16, temperature=2.0)
    q = torch.randn(3, 7, 16)
    w, e = fdt(q)
    assert w.shape == (3, 64) and e.shape == (3, 16)
    # by hand: relevance, max over tokens, sparsemax, weighted sum
    r = torch.einsum("btd,kd->btk", q, fdt.tokens) / 4.0 / 2.0
    ref_w = sparsemax_bisection(r.amax(1)).float()
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(e, ref_w @ fdt.tokens, atol=1e-5, rtol=0)


def test_fdt_padding_invariance():
    torch.manual_seed(0)
    fdt = FDT(128, 16, temperature=1.0)
    q = torch.randn(4, 5, 16)
    w, e = fdt(q, torch.ones(4, 5, dtype=torch.bool))
    pads = torch.randn(4, 9, 16) * 50                      # arbitrary features at pad positions
    mask = torch.cat([torch.ones(4, 5), torch.zeros(4, 9)], 1).bool()
    w2, e2 = fdt(torch.cat([q, pads], 1), mask)
    torch.testing.assert_close(w2, w)
    torch.testing.assert_close(e2, e)


def test_negative_relevance_caption_not_captured_by_pads():
    """With 0/1-mask multiplication (the official code) pads score 0 and beat an all-negative
    caption; with -inf masking the caption's own best token must win."""
    torch.manual_seed(0)
    fdt = FDT(8, 4, temperature=1.0)
    with torch.no_grad():
        fdt.tokens.copy_(torch.rand(8, 4) + 0.1)             # all-positive tokens
    q = -torch.rand(1, 2, 4) - 0.1                          # two words, every relevance < 0
    real = torch.tensor([[True, True, False, False]])
    queries = torch.cat([q, torch.zeros(1, 2, 4)], dim=1)   # pad features 0 -> relevance 0
    w, _ = fdt(queries, real)
    w_real, _ = fdt(q)
    torch.testing.assert_close(w, w_real)
    assert w.max() > 1 / 8 + 0.1                            # the caption's best tokens win
    zero_masked = (fdt.relevance(queries) * real[:, :, None]).amax(1)   # the official 0/1 mask
    # pads decide: uniform
    torch.testing.assert_close(sparsemax(zero_masked), torch.full((1, 8), 1 / 8))


def test_fdt_softmax_mode_is_dense_and_normalised():
    torch.manual_seed(0)
    fdt = FDT(32, 8, temperature=1.0, activation="softmax")
    w, e = fdt(torch.randn(2, 3, 8))
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    with pytest.raises(ValueError):
        FDT(4, 4, activation="entmax")


def test_fdt_gradients_flow_to_tokens_and_queries():
    torch.manual_seed(0)
    fdt = FDT(64, 8, temperature=3.0)
    q = torch.randn(2, 4, 8, requires_grad=True)
    w, e = fdt(q, torch.tensor([[True, True, False, False], [True] * 4]))
    e.pow(2).sum().backward()
    assert q.grad[0, 2:].abs().sum() == 0                   # pads get no gradient
    assert q.grad[0, :2].abs().sum() > 0 and fdt.tokens.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# the fast sparsemax (partial top-k) against the sort-based reference

def rows_with_support(n, sizes, generator, spread=1e-3):
    """One row per size s whose sparsemax support is exactly s: s entries within `spread` of 1 (so
    each keeps about 1 / s > spread), all others at -100."""
    rows = torch.full((len(sizes), n), -100.0)
    for i, s in enumerate(sizes):
        where = torch.randperm(n, generator=generator)[:s]
        rows[i, where] = 1 + spread * torch.rand(s, generator=generator)
    return rows


def fast_path_inputs():
    """(x, dim) pairs covering the partial top-k, its column narrowing (rows of >= 4096 entries),
    the fall-back to 4k candidates and to the full sort, ties, -inf and wide supports."""
    g = torch.Generator().manual_seed(0)
    cases = [(torch.randn(8, 16384, generator=g) * scale, -1) for scale in (1e-4, 1.0, 30.0, 1e4)]
    # not a multiple of 16
    cases.append((torch.randn(6, 5000, generator=g), -1))
    cases.append((torch.randn(3, 4096, 2, generator=g) * 3, 1))                   # another dim
    # all tied: support = row
    cases.append((torch.zeros(4, 16384), -1))
    # ~1365 tied maxima
    cases.append((torch.randint(0, 3, (16, 4096), generator=g).float(), -1))
    # a few tied maxima
    cases.append((torch.randint(0, 1000, (16, 4096), generator=g).float() / 10, -1))
    with_inf = torch.randn(16, 4096, generator=g)
    with_inf[torch.rand(16, 4096, generator=g) < 0.9] = float("-inf")
    # fewer finite entries than k
    with_inf[:4, 10:] = float("-inf")
    # at least one finite
    with_inf[:, 0] = torch.randn(16, generator=g)
    cases.append((with_inf, -1))
    # around k = 64 and 4k = 256
    sizes = [1, 2, 63, 64, 65, 255, 256, 257, 1000]
    for n in (4096, 16384):
        cases.append((rows_with_support(n, sizes, g), -1))
    # rows too short to narrow
    cases.append((rows_with_support(300, sizes[:-1], g), -1))
    one_column = torch.randn(4, 4096, generator=g)
    # the 16 largest share a column
    one_column[:, 7::256] += 20
    cases.append((one_column, -1))
    for n in (1, 63, 64, 65):
        cases.append((torch.randn(5, n, generator=g), -1))
    return cases


FAST_PATH_INPUTS = fast_path_inputs()


@pytest.mark.parametrize("case", range(len(FAST_PATH_INPUTS)))
def test_fast_sparsemax_matches_sort_reference(case):
    x, dim = FAST_PATH_INPUTS[case]
    x = x.clone().requires_grad_()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(case))
    p = fdt_fast.sparsemax(x, dim)
    (g,) = torch.autograd.grad(p, x, grad)
    ref = sparsemax(x, dim)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(p, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=0)
    assert (p[x == float("-inf")] == 0).all()


def test_fast_sparsemax_support_sizes_around_k():
    sizes = [1, 2, 63, 64, 65, 255, 256, 257, 1000]
    x = rows_with_support(16384, sizes, torch.Generator().manual_seed(1))
    assert (fdt_fast.sparsemax(x) > 0).sum(-1).tolist() == sizes


def test_fast_sparsemax_sorts_at_once_when_the_support_is_large(monkeypatch):
    """Supports past n / 8 (T = 1000: ~4,800 of 16,384 tokens active) go straight to the sort,
    with no top-k round; a batch of supports near 200 (T = 30) needs one round. Both are exact, as
    is a batch mixing small supports with a large one."""
    rounds = []
    real_topk_values = fdt_fast._topk_values
    monkeypatch.setattr(fdt_fast, "_topk_values",
                        lambda z, k: rounds.append(k) or real_topk_values(z, k))
    g = torch.Generator().manual_seed(5)
    for sizes, n_rounds in (([4800, 5000, 4500, 3000], [0]), (list(range(150, 231, 5)), [1]),
                            ([10, 20, 30, 5000], [0, 1, 2])):
        x = rows_with_support(16384, sizes, g, spread=1e-5).requires_grad_()
        rounds.clear()
        p = fdt_fast.sparsemax(x)
        assert len(rounds) in n_rounds, rounds
        assert (p > 0).sum(-1).tolist() == sizes
        grad = torch.randn(x.shape, generator=g)
        ref = sparsemax(x)
        torch.testing.assert_close(p, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.autograd.grad(p, x, grad)[0],
                                   torch.autograd.grad(ref, x, grad)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_fast_sparsemax_dtypes(dtype):
    x = (torch.randn(8, 4096, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    p = fdt_fast.sparsemax(x)
    assert p.dtype == dtype
    torch.testing.assert_close(p, sparsemax(x), atol=0, rtol=0)


# -----------------------------------------------------------------------------
# the max-pooled relevance against plain autograd through the (B, T, n_tokens) relevances

@pytest.fixture(params=["host reads", "no host reads"])
def host_reads(request, monkeypatch):
    """Both backward paths of MaxPooledRelevance: the gather on the CPU, the matmuls (as on a GPU
    and under torch.compile)."""
    if request.param == "no host reads":
        monkeypatch.setattr(fdt_module, "can_read_on_host", lambda t: False)
    return request.param


def fast_and_plain(*args, **kwargs):
    """fdt_fast.FDT and fdt.FDT with the same FDT tokens."""
    fast = fdt_fast.FDT(*args, **kwargs)
    plain = FDT(*args, **kwargs)
    plain.load_state_dict(fast.state_dict())
    return fast, plain


def random_mask(B, T, generator):
    mask = torch.rand(B, T, generator=generator) < 0.6
    mask[:, 0] = True                                            # every caption has a real token
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 13])
def test_max_pooled_relevance_matches_plain_autograd(B, dtype, host_reads):
    g = torch.Generator().manual_seed(B)
    torch.manual_seed(B)
    fdt, plain = (m.to(dtype) for m in fast_and_plain(96, 16, temperature=2.0))
    T = 11
    for mask in (None, random_mask(B, T, g)):
        q = torch.randn(B, T, 16, generator=g, dtype=dtype).requires_grad_()
        s = fdt.pooled_relevance(q, mask)
        ref = plain.pooled_relevance(q, mask)
        torch.testing.assert_close(s, ref, atol=1e-6, rtol=1e-6)
        dense = torch.randn(B, 96, generator=g, dtype=dtype)
        # as after sparsemax: most (b, k) get none
        sparse = dense * (torch.rand(B, 96, generator=g) < 0.1)
        for upstream in (dense, sparse, torch.zeros_like(dense)):
            grads = torch.autograd.grad(s, (q, fdt.tokens), upstream, retain_graph=True)
            ref_grads = torch.autograd.grad(ref, (q, plain.tokens), upstream, retain_graph=True)
            for got, want in zip(grads, ref_grads):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_max_pooled_relevance_gradcheck_float64(host_reads):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    for mask in (None, random_mask(2, 4, g)):
        assert torch.autograd.gradcheck(lambda a, b: MaxPooledRelevance.apply(a, b, mask, 0.7),
                                        (q, tokens))


def test_max_pooled_relevance_keeps_no_relevance_tensor():
    fdt = fdt_fast.FDT(512, 8)
    s = fdt.pooled_relevance(torch.randn(4, 16, 8, requires_grad=True))
    assert max(t.numel() for t in s.grad_fn.saved_tensors) < 4 * 16 * 512


class Accumulations(TorchDispatchMode):
    """The dtype of every index_add_ (the sums of the gathered backward)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name == "aten::index_add_":
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_max_pooled_relevance_sums_bfloat16_gradients_in_float32(host_reads):
    """bfloat16 queries: the gradients within one bfloat16 rounding of a float64 reference (a sum
    of 200 terms rounded at every add, as a GPU's bfloat16 index_add_ does, is ~1.7 % off). Two
    positions, the second half the first, so the winner is known: position 0 where s > 0."""
    g = torch.Generator().manual_seed(6)
    B, n_tokens, dim = 2048, 256, 16
    q0 = torch.randn(B, dim, generator=g).bfloat16()
    q = torch.stack([q0, q0 * 0.5], dim=1).requires_grad_()               # (B, 2, dim)
    tokens = torch.randn(n_tokens, dim, generator=g, requires_grad=True)
    upstream = torch.randn(B, n_tokens, generator=g) * (torch.rand(B, n_tokens, generator=g) < 0.1)
    with Accumulations() as spy:
        s = MaxPooledRelevance.apply(q, tokens, None, 0.5)
        s.backward(upstream.bfloat16())
    assert all(dtype == torch.float32 for dtype in spy.dtypes)
    u, first = upstream.bfloat16().double(), (s > 0).double()          # first: position 0 wins
    C = tokens.detach().bfloat16().double()
    ref_q = 0.5 * torch.stack([(u * first) @ C, (u * (1 - first)) @ C], dim=1)
    ref_tokens = 0.5 * ((u * first).t() @ q0.double() + (u * (1 - first)).t() @ (0.5 * q0.double()))
    for got, want in ((q.grad, ref_q), (tokens.grad, ref_tokens)):
        assert ((got.double() - want).norm() / want.norm()).item() < 5e-3


@pytest.mark.parametrize("activation", ["sparsemax", "softmax"])
def test_fdt_forward_matches_plain_composite(activation, host_reads):
    torch.manual_seed(0)
    fdt, plain = fast_and_plain(200, 16, temperature=0.5, activation=activation)
    q = torch.randn(6, 9, 16, requires_grad=True)
    mask = random_mask(6, 9, torch.Generator().manual_seed(4))
    w, e = fdt(q, mask)
    w_ref, e_ref = plain(q, mask)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(e, e_ref, atol=1e-5, rtol=1e-5)
    upstream = torch.randn(6, 16)
    grads = torch.autograd.grad(e, (q, fdt.tokens), upstream)
    ref_grads = torch.autograd.grad(e_ref, (q, plain.tokens), upstream)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fdt_under_bfloat16_autocast():
    torch.manual_seed(0)
    (fdt, plain), query_map = fast_and_plain(256, 16, temperature=3.0), torch.nn.Linear(16, 16)
    x = torch.randn(4, 9, 16)
    mask = random_mask(4, 9, torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, e = fdt(query_map(x), mask)
        s_ref = plain.pooled_relevance(query_map(x), mask)
    assert w.dtype == e.dtype == torch.bfloat16
    torch.testing.assert_close(w.float(), sparsemax(s_ref).float(), atol=2e-2, rtol=0)
    e.float().pow(2).sum().backward()
    assert fdt.tokens.grad.dtype == query_map.weight.grad.dtype == torch.float32
    assert torch.isfinite(fdt.tokens.grad).all() and query_map.weight.grad.abs().sum() > 0
