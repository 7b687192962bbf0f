"""The CUDA paths, against the CPU: skipped where there is no GPU (`python -m pytest -m cuda` on
one). tools/gpu_check.sh runs these, bench.py's CUDA rows and short runs of every CUDA path."""

import json

import pytest
import torch

import fdt
from lib import fdt_fast
from lib import shapes
import train
from model import CLIP, config_from_dict

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def full_float32():
    """train.py turns TF32 on for the process; the comparisons with the CPU here need it off
    (conftest's restore_globals puts the flags back)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def test_sparsemax_on_cuda_matches_cpu():
    x = torch.randn(64, 16384, generator=torch.Generator().manual_seed(0)) * 3
    grad = torch.randn_like(x)
    for fn in (fdt.sparsemax, fdt_fast.sparsemax):
        results = []
        for device in ("cpu", "cuda"):
            z = x.to(device).requires_grad_()
            p = fn(z)
            (g,) = torch.autograd.grad(p, z, grad.to(device))
            results.append((p.cpu(), g.cpu()))
        torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fdt_backward_on_cuda_matches_cpu(dtype):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(32, 20, 64, generator=g)
    mask = torch.rand(32, 20, generator=g) < 0.7
    mask[:, 0] = True
    upstream = torch.randn(32, 64, generator=g)
    torch.manual_seed(0)
    layer = fdt_fast.FDT(4096, 64, temperature=10.0)
    grads = []
    for device in ("cpu", "cuda"):
        layer.to(device).zero_grad()
        x = q.to(device, dtype).requires_grad_()
        _, e = layer(x, mask.to(device))
        e.float().backward(upstream.to(device))
        grads.append((x.grad.float().cpu(), layer.tokens.grad.cpu()))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(grads[1], grads[0], atol=tol, rtol=tol)


def test_fdt_bfloat16_gradients_within_one_rounding_on_cuda():
    """bfloat16 queries on the GPU: the max-pool gradients within ~one bfloat16 rounding of a
    float64 reference (sums accumulated in bfloat16, as atomic index_add_ does, are ~1.7 % off).
    Position 1 is half position 0, so position 0 wins exactly where s > 0."""
    g = torch.Generator().manual_seed(6)
    B, n_tokens, dim = 128, 4096, 64
    q0 = torch.randn(B, dim, generator=g).bfloat16()
    q = torch.stack([q0, q0 * 0.5], dim=1).cuda().requires_grad_()           # (B, 2, dim)
    tokens = torch.randn(n_tokens, dim, generator=g).cuda().requires_grad_()
    upstream = torch.randn(B, n_tokens, generator=g) * (torch.rand(B, n_tokens, generator=g) < 0.3)
    s = fdt_fast.MaxPooledRelevance.apply(q, tokens, None, 0.5)
    s.backward(upstream.bfloat16().cuda())
    u, first = upstream.bfloat16().double(), (s.cpu() > 0).double()
    C = tokens.detach().cpu().bfloat16().double()
    ref_q = 0.5 * torch.stack([(u * first) @ C, (u * (1 - first)) @ C], dim=1)
    ref_tokens = 0.5 * ((u * first).t() @ q0.double() + (u * (1 - first)).t() @ (0.5 * q0.double()))
    for got, want in ((q.grad, ref_q), (tokens.grad, ref_tokens)):
        assert ((got.cpu().double() - want).norm() / want.norm()).item() < 5e-3


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return shapes.prepare(tmp_path_factory.mktemp("shapes"), n_train=192, n_val=30,
                          n_test_per_pair=1)


@pytest.mark.parametrize("amp", ["bf16", "fp16", "off"])
def test_train_steps_on_cuda(shapes_root, tmp_path, amp):
    # fused AdamW; GradScaler for fp16
    train.main(["--data-dir", str(shapes_root), "--out", str(tmp_path / "run"), "--batch-size",
                "32", "--steps", "4", "--device", "cuda", "--amp", amp])
    records = [json.loads(line)
               for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["kind"] == "train")
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    torch.manual_seed(0)                                       # the run's initial weights
    fresh = CLIP(config_from_dict(ckpt["model_config"])).state_dict()
    assert not torch.equal(ckpt["model"]["visual.pos"].cpu(), fresh["visual.pos"])  # it trained
    if amp == "fp16":
        assert ckpt["scaler"]["scale"] == 2.0**10                # no step skipped for an overflow


def test_a_training_step_does_not_wait_for_the_gpu(shapes_root, tmp_path, monkeypatch):
    """Step 1 (of 3) with CUDA's sync debug mode set to error: any host read or blocking copy in
    the step (mocov2 augmentation included) raises there."""
    real_lr_at = train.lr_at

    def lr_at(step, *args):
        if step == 1:
            torch.cuda.synchronize()                             # what came before: not this step
            torch.cuda.set_sync_debug_mode("error")
        elif step == 2:
            torch.cuda.set_sync_debug_mode("default")
        return real_lr_at(step, *args)
    monkeypatch.setattr(train, "lr_at", lr_at)
    try:
        train.main(["--data-dir", str(shapes_root), "--out", str(tmp_path), "--batch-size", "32",
                    "--steps", "3", "--device", "cuda", "--augment", "mocov2"])
    finally:
        torch.cuda.set_sync_debug_mode("default")
