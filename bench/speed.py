"""Speed of each method file's model: parameters, FLOPs, training images/s, sampling ms per call,
peak memory, and FLOP utilisation against a matmul peak measured in the same run.

    python bench/speed.py                          # every method that has an entry below
    python bench/speed.py --method ddpm --device cuda --bf16

Run it alone: two torch processes on the same cores slow each other down several times.
A method file plugs in with one entry in CONFIGS: a function returning (model, loss, call), where
loss(x) is one training loss on a batch x and call(x) is one network evaluation when sampling.
"""
import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def ddpm_config(recipe):
    import ddpm
    args = ddpm.parse_args(["--width", "32", "--mults", "1,2,3", "--res-blocks", "1"] if recipe else [])
    ddpm.fill_model_defaults(args, argparse.Namespace(size=28))
    model = ddpm.make_model(args, 1, 28).to(memory_format=torch.channels_last)
    sch = ddpm.linear_schedule(args.T)
    t = torch.full((1,), 500)
    return (model, lambda x: ddpm.training_step(model, x, sch, ddpm.Draws(len(x), x.device)),
            lambda x: model(x, t.expand(x.shape[0]).to(x.device)))


def rectified_flow_config(recipe):
    import rectified_flow as rf
    args = rf.parse_args(["--width", "32", "--mults", "1,2,3", "--res-blocks", "1"] if recipe else [])
    rf.fill_model_defaults(args, 28)
    model = rf.make_model(args, (1, 28, 28), None).to(memory_format=torch.channels_last)
    v = rf.velocity(model)
    return (model, lambda x: rf.rectified_flow_step(model, x, rf.Draws(len(x), x.device)),
            lambda x: v(x, rf.times(x, 0.5)))


CONFIGS = {  # name: (builder, batch size, image shape)
    "ddpm": (lambda: ddpm_config(recipe=False), 128, (1, 28, 28)),
    "ddpm-cpu-recipe": (lambda: ddpm_config(recipe=True), 64, (1, 28, 28)),
    "rectified-flow-cpu-recipe": (lambda: rectified_flow_config(recipe=True), 64, (1, 28, 28)),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """Median seconds of `repeats` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(device, dtype):
    n = 2048 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, device, 10)


def measure(name, device, bf16, repeats):
    build, batch, shape = CONFIGS[name]
    torch.manual_seed(0)
    model, loss_fn, call = build()
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, *shape, device=device).contiguous(memory_format=torch.channels_last)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=bf16)

    def train_step():
        with amp:
            loss = loss_fn(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        with torch.no_grad(), amp:
            call(x[:1])
    flops = counter.get_total_flops()  # forward FLOPs for one image
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_s = timed(train_step, device, repeats)
    model.eval()
    with torch.no_grad(), amp:
        call_s = timed(lambda: call(x), device, repeats)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    train_ips = batch / train_s
    matmul = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32)
    return {"method": name, "params": sum(p.numel() for p in model.parameters()),
            "gflops_per_image": flops / 1e9, "batch": batch, "train_img_per_s": train_ips,
            "sample_ms_per_image_call": 1000 * call_s / batch, "peak_mem_mb": peak / 2 ** 20,
            "matmul_tflops": matmul / 1e12,
            # training is about 3x the forward FLOPs (forward, and backward for inputs and weights)
            "train_flop_utilisation": 3 * flops * train_ips / matmul}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    rows = [measure(m, device, args.bf16, args.repeats) for m in args.method]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'method':25s} {'params':>7s} {'GFLOP/img':>9s} {'train img/s':>11s} {'ms/call/img':>11s} "
          f"{'peak MB':>8s} {'util':>6s}")
    for r in rows:
        print(f"{r['method']:25s} {r['params'] / 1e6:6.2f}M {r['gflops_per_image']:9.3f} "
              f"{r['train_img_per_s']:11.1f} {r['sample_ms_per_image_call']:11.2f} "
              f"{r['peak_mem_mb']:8.0f} {100 * r['train_flop_utilisation']:5.1f}%")


if __name__ == "__main__":
    main()
