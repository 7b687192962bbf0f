"""Side-by-side speed and memory measurements, printed as one table.

Every row compares two implementations measured in the same run, in turns (a, b, b, a, a, b, ...),
so that load from other processes falls on both alike. A time is the median over the rounds; the
ratio a / b is the median over the rounds of a's time over b's in the same round.

    python -m tools.bench [--quick] [--device cpu|cuda]
    python -m tools.bench --flops      # parameters and training FLOPs per pair of every preset

Rows:
    sparsemax    fdt_fast.sparsemax (partial top-k, exact) vs fdt.sparsemax (full sort), and vs the
                 `entmax` package's sparsemax (full sort, and partial sort with k=64) when it is
                 installed; then on pooled relevances with as many active tokens as at T = 30 and
                 T = 1000 (on CUDA fdt_fast sorts, and the top-k row says what the partial top-k
                 would cost there)
    train step   CLIP+FDT vs the CLIP baseline at the tiny preset: time and peak memory; then the
                 fast FDT layer (fdt_fast.FDT) vs the plain one (fdt.FDT: autograd through
                 (B, T, n_fdt))
    open_clip    our CLIP baseline vs open_clip's CLIP built at the same size, when installed
    data         samples/s from the prepared cache vs decoding every item (bench_loading, which
                 measures the two one after the other)
    base, bf16   on CUDA: CLIP+FDT vs CLIP at the base preset under bf16 autocast: time, samples/s,
                 model FLOPs utilisation and peak memory

A train step is forward, contrastive loss, backward and AdamW on one fixed random batch.
Peak memory is torch.cuda.max_memory_allocated on CUDA. On CPU it is the peak of the bytes held by
live tensors (parameters, optimiser state, batch, activations, gradients): the bytes live before
the step plus the running sum of the allocations and frees the profiler records during it. Neither
counts allocator caching or fragmentation.
"""

import argparse
import functools
import os
import platform
import statistics
import time
from dataclasses import replace
from itertools import count
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (read once, when torch loads OpenMP). On a machine
# shared with other jobs a spinning thread holds the core its partner needs, and every parallel op
# then waits for a descheduled thread: a 2-thread sparsemax ran 3x slower that way, a 1-thread one
# not at all. OMP_WAIT_POLICY=ACTIVE in the environment measures the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import data  # noqa: E402
import fdt  # noqa: E402
from lib import fdt_fast, shapes  # noqa: E402
from lib.data_checks import clear_errors
from lib.flags import pick_device
from model import CLIP, PRESETS, contrastive_loss  # noqa: E402

# dense bf16 tensor-core peak in TFLOP/s (vendors' data sheets), by GPU name, for the MFU;
# first match wins, so a name that contains another comes first
# (H100 PCIe, A100, L40S before H100, A10, L4)
SHAPES_ROOT = "data/shapes"
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0,
                    "L4": 121.0, "A10": 125.0}


# -----------------------------------------------------------------------------
# measuring

def machine(device):
    """One line naming the machine the numbers come from."""
    cpu = platform.processor() or "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    line = (f"{cpu}, {os.cpu_count()} cores | torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    if device.type == "cuda":
        line += f" | {torch.cuda.get_device_name(device)}"
    return f"{line} | runs on {device.type}"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_in_turns(fns, device, reps, warmup=1):
    """Seconds of each callable in fns (name -> f) over reps rounds: name -> list. Every round runs
    each callable once, in reversed order every other round, so none is always first."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {name: [] for name in fns}
    for i in range(reps):
        for name in list(fns)[::-1 if i % 2 else 1]:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median_ms(times, name):
    return statistics.median(times[name]) * 1e3


def paired_ratio(times, a, b):
    """Median over rounds of a's time / b's time in the same round: load that comes and goes
    between rounds cancels out."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def _storage_bytes(tensors):
    """Bytes of the distinct storages behind tensors."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors}.values())


def peak_memory(f, device, live):
    """Peak bytes of live tensors while f() runs; `live`: the tensors that exist before it."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        f()
        _sync(device)
        return torch.cuda.max_memory_allocated(device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        f()
    # every allocation (+bytes) and free (-bytes) during f, in the order they happened
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    held = peak = _storage_bytes(live)
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def row(name, a, b, a_value, b_value, unit, ratio, target="", note=""):
    """One line of the table: a_value and b_value in `unit`, ratio = a / b."""
    return {"name": name, "a": a, "b": b, "a_value": a_value, "b_value": b_value, "unit": unit,
            "ratio": ratio, "target": target, "note": note}


def skipped(name, note):
    return row(name, "", "", None, None, "", None, note=note)


# -----------------------------------------------------------------------------
# 1. sparsemax

def bench_sparsemax(device, reps, shape=(256, 16384)):
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device)
    grad = torch.randn(shape, generator=g, device=device)

    def forward_backward(fn):
        z = x.clone().requires_grad_()
        fn(z).backward(grad)

    fns = {"ours": fdt_fast.sparsemax, "full sort": fdt.sparsemax}
    try:
        import entmax
        fns["entmax"] = functools.partial(entmax.sparsemax, dim=-1)
        fns["entmax k=64"] = functools.partial(entmax.sparsemax, dim=-1, k=64)
    except ImportError:
        pass
    t = run_in_turns({name: functools.partial(forward_backward, fn) for name, fn in fns.items()},
                     device, reps)
    name = f"sparsemax fwd+bwd {tuple(shape)} fp32"
    targets = {"full sort": "<= 0.10", "entmax k=64": "<= 1.00"}
    rows = [row(name, "ours", other, median_ms(t, "ours"), median_ms(t, other), "ms",
                paired_ratio(t, "ours", other), targets.get(other, ""))
            for other in fns if other != "ours"]
    if "entmax" not in fns:
        rows.append(skipped(name, "entmax not installed: skipped"))
    return rows + bench_sparsemax_fdt(device, reps, shape)


# pooled relevances as the FDT layer sees them, the max over 49 positions of Gaussian relevances,
# spread so that as many FDT tokens stay active as at T = 30 (~200 of 16,384) and T = 1000 (~4,800)
FDT_SPREADS = {"T = 30": 0.02, "T = 1000": 0.0006}


def bench_sparsemax_fdt(device, reps, shape):
    g = torch.Generator(device).manual_seed(1)
    rows = []
    for label, spread in FDT_SPREADS.items():
        u = torch.rand(shape, generator=g, device=device, dtype=torch.float64)
        x = (torch.special.ndtri(u ** (1 / 49)) * spread).float()  # max of 49 N(0, 1): inverse CDF
        grad = torch.randn(shape, generator=g, device=device)

        def forward_backward(fn):
            z = x.clone().requires_grad_()
            fn(z).backward(grad)

        fns = {"ours": fdt_fast.sparsemax, "full sort": fdt.sparsemax}
        if device.type == "cuda":
            fns["top-k"] = functools.partial(fdt.apply_sparsemax, dim=-1,
                                             threshold=fdt_fast._threshold_topk)
        t = run_in_turns({name: functools.partial(forward_backward, fn)
                          for name, fn in fns.items()}, device, reps)
        active = (fdt.sparsemax(x) > 0).sum(-1).float().mean().item()
        name = f"sparsemax {tuple(shape)}, {label}"
        rows += [row(name, a, "full sort", median_ms(t, a), median_ms(t, "full sort"), "ms",
                     paired_ratio(t, a, "full sort"), "<= 1.00" if a == "ours" else "",
                     f"{active:,.0f} active per row") for a in fns if a != "full sort"]
    return rows


# -----------------------------------------------------------------------------
# 2. and 3. train steps

def random_batch(config, batch_size, device, seed=0):
    """Random images and captions of random lengths (pads after the end-of-text token)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, config.image_size, config.image_size, generator=g)
    tokens = torch.randint(data.N_SPECIAL, config.vocab_size, (batch_size, config.context_length),
                           generator=g)
    lengths = torch.randint(2, config.context_length + 1, (batch_size,), generator=g)
    tokens[torch.arange(config.context_length) >= lengths[:, None]] = data.PAD
    tokens[torch.arange(batch_size), lengths - 1] = data.EOT
    return images.to(device), tokens.to(device)


def encode_ours(model, images, tokens):
    return model(images, tokens)[:2]


def encode_open_clip(model, images, tokens):
    return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


class TrainStep:
    """One train step on a fixed batch: forward, contrastive loss, backward, AdamW.
    encode(model, images, tokens) -> (image_emb, text_emb)."""

    def __init__(self, model, encode, images, tokens, amp):
        self.model, self.encode, self.images, self.tokens, self.amp = (
            model, encode, images, tokens, amp)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-8,
                                           weight_decay=0.1)

    def __call__(self):
        with torch.autocast(self.images.device.type, dtype=torch.bfloat16, enabled=self.amp):
            image_emb, text_emb = self.encode(self.model, self.images, self.tokens)
            loss = contrastive_loss(image_emb, text_emb, self.model.logit_scale)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def live_tensors(self):
        """What exists between steps: parameters, optimiser state, the batch."""
        state = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return [*self.model.parameters(), *state, self.images, self.tokens]


def build(config, device, seed=0):
    torch.manual_seed(seed)
    return CLIP(config).to(device)


def compare_steps(steps, device, reps):
    """Times (in turns) and peak memory (one more step each) of named train steps."""
    t = run_in_turns(steps, device, reps, warmup=2 if device.type == "cuda" else 1)
    memory = {name: peak_memory(step, device, step.live_tensors()) for name, step in steps.items()}
    return t, memory


def bench_train_step(device, reps, batch_size):
    config = PRESETS["tiny"]
    images, tokens = random_batch(config, batch_size, device)
    fast, clip, plain = (build(replace(config, head=head), device)
                         for head in ("fdt", "clip", "fdt"))
    # the same model with the plain FDT layer of fdt.py: autograd through the relevances, full sort
    c = plain.config
    plain.fdt = fdt.FDT(c.n_fdt, c.embed_dim, c.fdt_temperature, c.fdt_activation).to(device)
    plain.fdt.load_state_dict(fast.fdt.state_dict())
    steps = {name: TrainStep(model, encode_ours, images, tokens, amp=False)
             for name, model in (("fdt", fast), ("clip", clip), ("plain", plain))}
    t, mem = compare_steps(steps, device, reps)
    name = f"train step, tiny, batch {batch_size}"
    return [
        row(name, "CLIP+FDT", "CLIP", median_ms(t, "fdt"), median_ms(t, "clip"), "ms",
            paired_ratio(t, "fdt", "clip"), "<= 1.25"),
        row(name, "CLIP+FDT", "CLIP", mem["fdt"] / 2**20, mem["clip"] / 2**20, "MiB",
            mem["fdt"] / mem["clip"], "<= 1.30"),
        row(name, "fdt_fast.FDT", "fdt.FDT", median_ms(t, "fdt"), median_ms(t, "plain"), "ms",
            paired_ratio(t, "fdt", "plain")),
        row(name, "fdt_fast.FDT", "fdt.FDT", mem["fdt"] / 2**20, mem["plain"] / 2**20, "MiB",
            mem["fdt"] / mem["plain"]),
    ]


def open_clip_model(config):
    """open_clip's CLIP at our config's sizes (pre-LN ViT with a CLS token, causal text transformer,
    linear projections, GELU), built directly: nothing is downloaded."""
    import open_clip
    vision = open_clip.CLIPVisionCfg(layers=config.vision_layers, width=config.vision_width,
                                     head_width=config.vision_width // config.vision_heads,
                                     patch_size=config.patch_size, image_size=config.image_size)
    text = open_clip.CLIPTextCfg(context_length=config.context_length, vocab_size=config.vocab_size,
                                 width=config.text_width, heads=config.text_heads,
                                 layers=config.text_layers)
    return open_clip.CLIP(config.embed_dim, vision, text)


def bench_open_clip(device, reps, batch_size):
    name = f"train step, tiny CLIP, batch {batch_size}"
    config = replace(PRESETS["tiny"], head="clip")
    try:
        theirs = open_clip_model(config).to(device)
    except ImportError:
        return [skipped(name, "open_clip not installed: skipped")]
    ours = build(config, device)
    images, tokens = random_batch(config, batch_size, device)
    steps = {"ours": TrainStep(ours, encode_ours, images, tokens, amp=False),
             "open_clip": TrainStep(theirs, encode_open_clip, images, tokens, amp=False)}
    t, mem = compare_steps(steps, device, reps)
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (ours, theirs))
    return [row(name, "ours", "open_clip", median_ms(t, "ours"), median_ms(t, "open_clip"), "ms",
                paired_ratio(t, "ours", "open_clip"), "<= 1.00",
                f"parameters {n_ours:.2f}M vs {n_theirs:.2f}M"),
            row(name, "ours", "open_clip", mem["ours"] / 2**20, mem["open_clip"] / 2**20, "MiB",
                mem["ours"] / mem["open_clip"])]


# -----------------------------------------------------------------------------
# 4. data loading

class _PILDataset(torch.utils.data.Dataset):
    """The usual pipeline: open, decode, resize and tokenise each item when it is asked for."""

    def __init__(self, files: list[str], captions: list[list[str]], tokenizer: data.Tokenizer,
                 size: int):
        self.files, self.captions, self.tokenizer, self.size = files, captions, tokenizer, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        # (3, S, S)
        image = torch.from_numpy(data._decode(Path(self.files[i]), self.size)).permute(2, 0, 1)
        return image, self.tokenizer.encode([self.captions[i][0]])[0]


def _samples_per_s(batches, seconds: float) -> float:
    next(batches)  # warm-up: worker start, page cache
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += len(next(batches)[0])
    return n / (time.perf_counter() - start)


def bench_loading(root, split="val",
                  sizes: tuple[int, ...] = (64, 224), batch_size: int = 256,
                  seconds: float = 3.0) -> list[dict]:
    """Samples/s of TrainLoader (from the cache) and of a PIL-per-item Dataset + DataLoader with one
    worker per core, on the same images: one row per image size."""
    rows = []
    for size in sizes:
        cs = data.load_split("shapes", root, split, size)
        tokenizer = data.Tokenizer.build([c for caps in cs.captions for c in caps],
                                         context_length=32)
        loader = data.TrainLoader(cs, tokenizer, batch_size, seed=0)
        cached = (batch for e in count() for batch in loader.epoch(e))
        dataset = _PILDataset(cs.image_files, cs.captions, tokenizer, size)
        dl = torch.utils.data.DataLoader(dataset, batch_size, shuffle=True, drop_last=True,
                                         num_workers=os.cpu_count(), persistent_workers=True)
        pil = (batch for _ in count() for batch in dl)
        rows.append({"image_size": size, "cache_samples_per_s": _samples_per_s(cached, seconds),
                     "pil_samples_per_s": _samples_per_s(pil, seconds),
                     "pil_workers": os.cpu_count()})
    return rows


def bench_data(quick, root=SHAPES_ROOT):
    name = "data loading, shapes val"
    if quick and not shapes.ready(root):
        return [skipped(name, f"no shapes dataset in {root} (python -m lib.shapes): "
                              "skipped with --quick")]
    with clear_errors():  # a world of any size is used as it is; another folder is one line
        if not shapes.ready(root):
            shapes.prepare(root)
    rows = bench_loading(root, sizes=(64,), seconds=1.0) if quick else bench_loading(root)
    return [row(f"{name}, {r['image_size']} px", "prepared cache",
                f"decode per item ({r['pil_workers']} workers)",
                r["cache_samples_per_s"], r["pil_samples_per_s"], "samples/s",
                r["cache_samples_per_s"] / r["pil_samples_per_s"]) for r in rows]


# -----------------------------------------------------------------------------
# 5. the base preset on CUDA

def bench_base_cuda(device, reps, batch_size):
    config = PRESETS["base"]
    images, tokens = random_batch(config, batch_size, device)
    steps = {head: TrainStep(build(replace(config, head=head), device), encode_ours, images, tokens,
                             amp=True)
             for head in ("fdt", "clip")}
    flops = {}
    for head, step in steps.items():
        with FlopCounterMode(display=False) as counter:
            step()
        flops[head] = counter.get_total_flops()
    t, mem = compare_steps(steps, device, reps)
    gpu = torch.cuda.get_device_name(device)
    peak = next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS.items() if key in gpu), None)
    seconds = {head: median_ms(t, head) / 1e3 for head in steps}
    mfu = {head: f"{flops[head] / seconds[head] / peak:.1%}" if peak else "n/a" for head in steps}
    note = (f"samples/s {batch_size / seconds['fdt']:,.0f} vs {batch_size / seconds['clip']:,.0f}; "
            f"MFU {mfu['fdt']} vs {mfu['clip']} "
            f"({flops['fdt'] / 1e12:.2f} vs {flops['clip'] / 1e12:.2f} TFLOP/step counted by "
            f"FlopCounterMode, peak {peak / 1e12 if peak else 'unknown'} TFLOP/s bf16)")
    name = f"train step, base, bf16, batch {batch_size}"
    return [row(name, "CLIP+FDT", "CLIP", median_ms(t, "fdt"), median_ms(t, "clip"), "ms",
                paired_ratio(t, "fdt", "clip"), "<= 1.25", note),
            row(name, "CLIP+FDT", "CLIP", mem["fdt"] / 2**20, mem["clip"] / 2**20, "MiB",
                mem["fdt"] / mem["clip"], "<= 1.30")]


# -----------------------------------------------------------------------------
# the table

def print_table(rows, header):
    print(header)
    print(f"{'benchmark':<38} {'a':<16} {'b':<30} {'a':>10} {'b':>10} {'unit':<9} {'a / b':>6} "
          f"{'target':>8}  note")
    for r in rows:
        if r["ratio"] is None:
            print(f"{r['name']:<38} {r['note']}")
        else:
            print(f"{r['name']:<38} {r['a']:<16} {r['b']:<30} {r['a_value']:>10,.1f} "
                  f"{r['b_value']:>10,.1f} {r['unit']:<9} {r['ratio']:>6.2f} {r['target']:>8}  "
                  f"{r['note']}")


# -----------------------------------------------------------------------------
# model FLOPs per preset (counted, not timed: the basis of the GPU time estimates in the README)

def count_flops():
    """Parameters and training FLOPs per image-caption pair (forward + backward) of every preset and
    head, counted by torch's FlopCounterMode on one CPU step of a batch of 2."""
    rows = []
    for name, preset in PRESETS.items():
        for head in ("clip", "fdt"):
            model = CLIP(replace(preset, head=head))
            images, tokens = random_batch(preset, 2, "cpu")
            with FlopCounterMode(display=False) as counter:
                image_emb, text_emb, _, _, _ = model(images, tokens)
                contrastive_loss(image_emb, text_emb, model.logit_scale).backward()
            params = sum(p.numel() for p in model.parameters())
            rows.append((name, "CLIP+FDT" if head == "fdt" else "CLIP", params,
                         counter.get_total_flops() / 2))
    print(f"{'preset':8}{'model':10}{'parameters':>12}{'GFLOP / pair':>14}")
    for name, model, params, flops in rows:
        print(f"{name:8}{model:10}{params / 1e6:>11.1f}M{flops / 1e9:>14.2f}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="side-by-side speed and memory measurements")
    parser.add_argument("--quick", action="store_true",
                        help="2 repetitions, smaller batches and sparsemax input: the whole run in "
                             "under a minute")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--flops", action="store_true",
                        help="only count the training FLOPs of every preset")
    args = parser.parse_args(argv)
    if args.flops:
        return count_flops()
    device = pick_device(args.device)  # --device cuda without a GPU: one line
    reps, batch_size = (2, 16) if args.quick else (11, 128)

    rows = bench_sparsemax(device, reps, shape=(32, 16384) if args.quick else (256, 16384))
    rows += bench_train_step(device, reps, batch_size)
    rows += bench_open_clip(device, reps, batch_size)
    rows += bench_data(args.quick)
    if device.type == "cuda":
        rows += bench_base_cuda(device, reps, batch_size=32 if args.quick else 256)
    print_table(rows, f"machine: {machine(device)}")
    return rows


if __name__ == "__main__":
    main()
