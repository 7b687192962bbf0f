"""sparsemax against an independent float64 reference, and the FDT layer's masking."""

import pytest
import torch

from fdt import FDT, QueryMap, sparsemax


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
        torch.testing.assert_close(p.sum(dim).double(), torch.ones_like(p.sum(dim)).double(), atol=1e-5, rtol=0)
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
    torch.testing.assert_close(sparsemax(zero_masked), torch.full((1, 8), 1 / 8))  # pads decide: uniform


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
