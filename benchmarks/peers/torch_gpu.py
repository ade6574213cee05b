#!/usr/bin/env python3
"""The PyTorch side of the GPU timing table (issue 17, part 8): tools/gpu_bench.cu's workloads in
PyTorch eager, with models that mirror mixprec's (include/mixprec/nn/models/gpt.hpp, resnet.hpp).

    python3 benchmarks/peers/torch_gpu.py [--workloads gpt12,gpt2l,resnet20,gptmini,bandwidth]
        [--precisions fp32,bf16,fp16] [--variants eager,tuned] [--steps N] [--windows W] [--warmup K]
    python3 benchmarks/peers/torch_gpu.py --device cpu --tiny     # a smoke run without a GPU

One line per result, as mixprec_gpu_bench prints them (benchmarks/peers/gpu_table.py merges both):
    BENCH torch|torch-tuned <workload> <precision> ms_per_step=<x> peak_mib=<y> skipped=<k> steps=<n>
    BENCH torch bw_<name> <dtype> gbps=<x> pct_of_copy=<y>

Variants: "eager" is PyTorch's defaults (cudnn.benchmark off, foreach AdamW/SGD, NCHW); "tuned" is
cudnn.benchmark + channels_last for ResNet-20 and fused AdamW for the GPTs. PyTorch's other
defaults stay as they are (float32 matmuls without TF32; cuDNN convolutions may use TF32).
Precisions: fp32; bf16 = autocast to bfloat16; fp16 = autocast to float16 + GradScaler (init
65536, as mixprec's). Timing: CUDA events around windows of several steps after a warm-up; the
median window is printed. Peak memory: torch.cuda.max_memory_allocated over the timed steps.

The workloads, as mixprec_gpu_bench's:
  gpt12    GPT 12 layers, d_model 768, 12 heads, seq 256, batch 32, byte vocabulary (256), dropout 0,
           AdamW lr 3e-4 (betas 0.9/0.999, eps 1e-8, weight decay 0.01) + clip_grad_norm_ 1.0
  gpt2l    the same with 2 layers
  resnet20 ResNet-20 (CIFAR), batch 128, 3x32x32, 10 classes, SGD lr 0.05 momentum 0.9
  gptmini  GPT 4 layers, d_model 256, 4 heads, seq 128, batch 32, AdamW lr 3e-4, no clipping
  bandwidth  copy, casts, add, broadcast add, scalar mul, gelu, relu, sum on [8192, 4096] tensors
Exit codes: 0 ran; 1 a workload failed (the others still run); 2 bad arguments; 77 no CUDA device.
"""
import argparse
import gc
import math
import statistics
import sys
import time
import warnings

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError as e:  # the caller (gpu_check.sh) checks for torch first; say why anyway
    print(f"torch_gpu.py: cannot import torch ({e}); nothing was run", flush=True)
    sys.exit(77)

WORKLOADS = ["gpt12", "gpt2l", "resnet20", "gptmini", "bandwidth"]
PRECISIONS = ["fp32", "bf16", "fp16"]
DEFAULT_STEPS = {"gpt12": 5, "gpt2l": 10, "resnet20": 20, "gptmini": 20}


def emit(line):
    print(line, flush=True)


# ---------------------------------------------------------------------------------------------
# Models mirroring mixprec's.


def sdpa_causal(q, k, v):
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True)
    # PyTorch < 2.0 (the CPU smoke run on Debian's 1.13): the same maths, composed.
    t = q.size(-2)
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v


class SelfAttention(nn.Module):
    """mixprec::nn::MultiheadAttention on self-attention: one packed [3E, E] projection with bias,
    chunked into q, k, v, heads [B, H, T, D], causal SDPA, out_proj with bias."""

    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.in_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, e = x.shape
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        heads = lambda z: z.reshape(b, t, self.h, e // self.h).transpose(1, 2)
        o = sdpa_causal(heads(q), heads(k), heads(v))
        return self.out_proj(o.transpose(1, 2).reshape(b, t, e))


class Block(nn.Module):
    """mixprec::nn::TransformerBlock: pre-norm, x + drop(attn(ln1(x))), then + mlp(ln2(.)) with
    mlp = Linear - GELU (exact erf) - Linear - Dropout."""

    def __init__(self, d, h, hidden, dropout):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, h)
        self.drop = nn.Dropout(dropout)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d), nn.Dropout(dropout))

    def forward(self, x):
        a = x + self.drop(self.attn(self.ln1(x)))
        return a + self.mlp(self.ln2(a))


class GPT(nn.Module):
    """mixprec::nn::models::GPT: token + learned position embeddings, pre-norm blocks, final
    LayerNorm, bias-free head tied to the token embedding; GPT-2 initialisation (N(0, 0.02),
    residual projections N(0, 0.02 / sqrt(2 n_layer)), biases 0, LayerNorms 1 / 0)."""

    def __init__(self, vocab, block_size, n_layer, n_head, d, hidden, dropout=0.0):
        super().__init__()
        self.vocab = vocab
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(block_size, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(d, n_head, hidden, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        resid_std = 0.02 / math.sqrt(2.0 * max(n_layer, 1))
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("attn.out_proj.weight") or name.endswith("mlp.2.weight"):
                    p.normal_(0.0, resid_std)
                elif name.startswith("ln") or ".ln" in name:
                    continue  # LayerNorm: 1 / 0 already
                elif p.dim() >= 2:
                    p.normal_(0.0, 0.02)
                elif name.endswith("bias"):
                    p.zero_()
        self.head.weight = self.tok_emb.weight  # tied, after init (as mixprec's)

    def forward(self, idx):
        t = idx.size(1)
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        return self.head(self.ln_f(self.blocks(self.drop(x))))

    def loss(self, idx, targets):
        return F.cross_entropy(self.forward(idx).reshape(-1, self.vocab), targets.reshape(-1))


class BasicBlock(nn.Module):
    """mixprec::nn::models::BasicBlock: conv3x3(stride) - BN - ReLU - conv3x3 - BN, + shortcut
    (1x1 conv + BN projection when the shape changes), ReLU (not in place, as mixprec's)."""

    def __init__(self, inplanes, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class ResNetCifar(nn.Module):
    """mixprec::nn::models::resnet20: conv3x3 stem (16), BN, ReLU, no max-pool; 3 stages of n
    BasicBlocks at 16/32/64 channels (stride 2 at stages 2, 3); adaptive average pool; fc with
    bias. Convolutions kaiming_normal(fan_out, relu)."""

    def __init__(self, depth=20, num_classes=10, in_channels=3):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        inplanes, stages = 16, []
        for i, planes in enumerate([16, 32, 64]):
            blocks = []
            for b in range(n):
                s = (1 if i == 0 else 2) if b == 0 else 1
                down = None
                if s != 1 or inplanes != planes:
                    down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, s, 0, bias=False), nn.BatchNorm2d(planes))
                blocks.append(BasicBlock(inplanes, planes, s, down))
                inplanes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.layer3(self.layer2(self.layer1(y)))
        return self.fc(self.avgpool(y).flatten(1))


# ---------------------------------------------------------------------------------------------
# Timing.


class Timer:
    """ms per call of f: CUDA events on the current stream (host time between launches counts,
    as it does for mixprec_gpu_bench), or the wall clock on the CPU."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def ms_per_call(self, iters, f):
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                f()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            f()
        return (time.perf_counter() - t0) * 1e3 / iters

    def median_ms(self, windows, iters, f):
        return statistics.median(self.ms_per_call(iters, f) for _ in range(windows))


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def make_scaler(device, enabled):
    kw = dict(init_scale=65536.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000, enabled=enabled)
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device, **kw)
    if enabled and device != "cuda":
        raise RuntimeError(f"PyTorch {torch.__version__} has no GradScaler for {device}")
    return torch.cuda.amp.GradScaler(**kw)


AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_training(args, label, workload, model, opt, clip, loss_fn):
    steps = args.steps or DEFAULT_STEPS[workload]
    timer = Timer(args.device)
    params = [p for p in model.parameters()]
    failed = 0
    for prec in args.precisions:
        amp = AMP[prec]
        if args.device == "cuda" and amp is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            emit(f"# {workload} {prec}: bfloat16 is not supported on this device; skipped")
            continue
        try:
            scaler = make_scaler(args.device, amp is torch.float16)
            with torch.autocast(device_type=args.device, dtype=amp or torch.bfloat16, enabled=amp is not None):
                pass
        except (RuntimeError, ValueError) as e:
            emit(f"# {label} {workload} {prec}: not run on {args.device}: {e}")
            continue

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=args.device, dtype=amp or torch.bfloat16, enabled=amp is not None):
                loss = loss_fn()
            scaler.scale(loss).backward()
            if clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, clip)
            scaler.step(opt)
            scaler.update()

        try:
            for _ in range(args.warmup):
                step()
            sync(args.device)
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            scale_before = scaler.get_scale() if scaler.is_enabled() else 1.0
            ms = timer.median_ms(args.windows, steps, step)
            peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else 0.0
            # Each skipped step halves the scale (no growth within 2000 steps): counted without a
            # host synchronisation inside the timed steps.
            scale_after = scaler.get_scale() if scaler.is_enabled() else 1.0
            skipped = round(math.log2(scale_before / scale_after)) if scale_after > 0 else -1
        except Exception as e:  # noqa: BLE001 - the next precision still runs
            emit(f"# {label} {workload} {prec} failed: {type(e).__name__}: {e}")
            failed = 1
            continue
        emit(f"BENCH {label} {workload} {prec} ms_per_step={ms:.3f} peak_mib={peak:.1f} skipped={skipped} "
             f"steps={args.windows * steps}")
    return failed


def free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_gpt(args, workload, tuned):
    label = "torch-tuned" if tuned else "torch"
    if workload == "gptmini":
        layers, d, h, t, clip = 4, 256, 4, 128, 0.0
    else:
        layers, d, h, t, clip = (12 if workload == "gpt12" else 2), 768, 12, 256, 1.0
    batch = 32
    if args.tiny:
        layers, d, h, t, batch = min(layers, 2), 64, 4, 32, 4
    torch.manual_seed(7)
    model = GPT(256, t, layers, h, d, 4 * d).to(args.device)
    g = torch.Generator().manual_seed(8)
    idx = torch.randint(0, 256, (batch, t), generator=g).to(args.device)
    tgt = torch.randint(0, 256, (batch, t), generator=g).to(args.device)
    kw = dict(lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    if tuned and args.device == "cuda":
        kw["fused"] = True
    opt = torch.optim.AdamW(model.parameters(), **kw)
    if not tuned:
        nparams = sum(p.numel() for p in model.parameters())
        emit(f"# {workload}: GPT {layers} layers, d_model {d}, {h} heads, seq {t}, batch {batch}, {nparams} parameters, "
             f"AdamW lr 3e-4{' + clip_grad_norm_ 1.0' if clip else ''}")
    failed = time_training(args, label, workload, model, opt, clip, lambda: model.loss(idx, tgt))
    del model, opt, idx, tgt
    free(args.device)
    return failed


def run_resnet(args, tuned):
    label = "torch-tuned" if tuned else "torch"
    batch = 8 if args.tiny else 128
    torch.manual_seed(7)
    model = ResNetCifar(20, 10, 3).to(args.device)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(args.device)
    y = torch.randint(0, 10, (batch,), generator=g).to(args.device)
    if tuned:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if not tuned:
        emit(f"# resnet20: ResNet-20 (CIFAR), batch {batch}, 3x32x32, 10 classes, SGD lr 0.05 momentum 0.9")
    failed = time_training(args, label, "resnet20", model, opt, 0.0, lambda: F.cross_entropy(model(x), y))
    del model, opt, x, y
    free(args.device)
    return failed


def run_bandwidth(args):
    """GB/s = (bytes read + bytes written) / time over contiguous tensors, as mixprec_gpu_bench's.
    The reference (bw_memcpy) is a same-dtype contiguous copy_, which PyTorch issues as one
    cudaMemcpyAsync device to device."""
    r, c = (256, 256) if args.tiny else (args.bw_rows, args.bw_cols)
    n = r * c
    emit(f"# bandwidth: contiguous [{r}, {c}] tensors ({n} elements), GB/s = (bytes read + written) / time, "
         "pct_of_copy against copy_ float32 (cudaMemcpyAsync device to device)")
    timer = Timer(args.device)
    g = torch.Generator().manual_seed(9)
    dev = args.device
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16"}

    def rate(nbytes, f):
        f()
        f()
        return nbytes / (timer.median_ms(args.windows, 10, f) * 1e-3) / 1e9

    with torch.no_grad():
        a32 = torch.randn(r, c, generator=g).to(dev)
        b32 = torch.randn(r, c, generator=g).to(dev)
        row32 = torch.randn(c, generator=g).to(dev)
        dst32 = torch.empty_like(a32)
        copy_gbps = rate(8.0 * n, lambda: dst32.copy_(a32))

        failed = 0

        def line(what, dt, nbytes, f):  # one op: its line, or why it could not run
            nonlocal failed
            try:
                gbps = rate(nbytes, f)
                emit(f"BENCH torch bw_{what} {names[dt]} gbps={gbps:.1f} pct_of_copy={100.0 * gbps / copy_gbps:.1f}")
            except Exception as e:  # noqa: BLE001
                emit(f"# bw_{what} {names[dt]} failed: {type(e).__name__}: {e}")
                failed = 1

        emit(f"BENCH torch bw_memcpy float32 gbps={copy_gbps:.1f} pct_of_copy=100.0")
        line("cast_f32_bf16", torch.float32, 6.0 * n, lambda: a32.to(torch.bfloat16))
        for dt in (torch.float32, torch.bfloat16):
            a, b, row = a32.to(dt), b32.to(dt), row32.to(dt)
            s = float(n * a.element_size())
            if dt == torch.bfloat16:
                line("cast_bf16_f32", dt, 3 * s, lambda: a.to(torch.float32))
            dst = torch.empty_like(a)
            line("copy", dt, 2 * s, lambda: dst.copy_(a))
            line("add", dt, 3 * s, lambda: torch.add(a, b))
            line("add_row", dt, 2 * s, lambda: torch.add(a, row))
            line("mul_scalar", dt, 2 * s, lambda: torch.mul(a, 1.5))
            line("gelu", dt, 2 * s, lambda: F.gelu(a))
            line("relu", dt, 2 * s, lambda: torch.relu(a))
            line("sum", dt, s, lambda: torch.sum(a))
        # The multi-tensor passes (mixprec_gpu_bench's *_multi lines) over 48 float32 tensors:
        # fused AdamW (28 bytes per element: PyTorch writes no 16-bit copy), the total norm as
        # clip_grad_norm_ computes it (reads 4) and its foreach scaling (reads and writes 8).
        parts = 48
        per = n // parts
        params = [torch.randn(per, generator=g).to(dev).requires_grad_() for _ in range(parts)]
        grads = [torch.randn(per, generator=g).to(dev) for _ in range(parts)]
        for p, gr in zip(params, grads):
            p.grad = gr
        elems = float(parts * per)
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=(dev == "cuda"))
        line("adamw_multi", torch.float32, 28.0 * elems, opt.step)
        line("grad_norm_multi", torch.float32, 4.0 * elems, lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        line("clip_multi", torch.float32, 8.0 * elems, lambda: torch._foreach_mul_(grads, 0.9999))
    free(dev)
    return failed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--variants", default="eager,tuned", help="eager, tuned or both")
    ap.add_argument("--steps", type=int, default=0, help="steps per timed window (default per workload)")
    ap.add_argument("--windows", type=int, default=3, help="timed windows; the median is printed")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, 1 window of 1 step (a smoke run)")
    ap.add_argument("--bw-rows", type=int, default=8192)
    ap.add_argument("--bw-cols", type=int, default=4096)
    args = ap.parse_args()
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.precisions = [p for p in args.precisions.split(",") if p]
    variants = [v for v in args.variants.split(",") if v]
    bad = [w for w in args.workloads if w not in WORKLOADS] + [p for p in args.precisions if p not in PRECISIONS] + \
          [v for v in variants if v not in ("eager", "tuned")]
    if bad:
        print(f"torch_gpu.py: unknown workload, precision or variant: {', '.join(bad)}", file=sys.stderr)
        return 2
    if args.tiny:
        args.steps, args.windows, args.warmup = args.steps or 1, 1, min(args.warmup, 1)
    args.windows = max(1, args.windows)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            emit("torch_gpu.py: no usable CUDA device (torch.cuda.is_available() is False); nothing was run")
            return 77
        with warnings.catch_warnings():  # PyTorch >= 2.9 prefers fp32_precision to the allow_tf32 flags
            warnings.simplefilter("ignore")
            tf32 = f"matmul TF32 {torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}"
        emit(f"# torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
             f"{torch.cuda.get_device_name()}; {tf32}")
    else:
        emit(f"# torch {torch.__version__} on the CPU ({torch.get_num_threads()} threads)")
    failed = 0
    for w in args.workloads:
        for v in (["eager"] if w == "bandwidth" else variants):
            tuned = v == "tuned"
            torch.backends.cudnn.benchmark = tuned
            try:
                if w == "bandwidth":
                    failed |= run_bandwidth(args)
                elif w == "resnet20":
                    failed |= run_resnet(args, tuned)
                else:
                    failed |= run_gpt(args, w, tuned)
            except Exception as e:  # noqa: BLE001 - report and go on with the next workload
                emit(f"# {w} ({v}) failed: {type(e).__name__}: {e}")
                failed = 1
                free(args.device)
    return failed


if __name__ == "__main__":
    sys.exit(main())
