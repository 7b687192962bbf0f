"""The CUDA paths, against the CPU: skipped where there is no GPU (`python -m pytest -m cuda` on one).
./gpu_check.sh runs these, bench.py's CUDA rows and a 200-step base run."""

import json

import pytest
import torch

import fdt
from lib import fdt_fast
from lib import shapes
import train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


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


@pytest.mark.parametrize("amp", ["bf16", "fp16", "off"])
def test_train_steps_on_cuda(tmp_path, amp):
    root = shapes.prepare(tmp_path / "shapes", n_train=192, n_val=30, n_test_per_pair=1)
    train.main(["--data-dir", str(root), "--out", str(tmp_path / "run"), "--batch-size", "32", "--steps", "4",
                "--device", "cuda", "--amp", amp])                     # fused AdamW, GradScaler for fp16
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["kind"] == "train")
