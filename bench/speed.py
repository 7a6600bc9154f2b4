"""Speed of each method file's model: parameters, FLOPs, training images/s and achieved TFLOP/s
(torch's flop counter over one whole training step, divided by the step's time), sampling ms per
call, peak memory, and the FLOP utilisation against a matmul peak measured in the same run.

    python bench/speed.py                                      # every method below, on the CPU
    python bench/speed.py --device cuda --bf16 --compile       # every method on a GPU

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


UNET = ["--width", "32", "--mults", "1,2,3", "--res-blocks", "1"]  # the CPU recipes' U-Net
CLASSES = [f"class {k}" for k in range(10)]


def draws(x):
    import ddpm
    return ddpm.Draws(len(x), x.device)


def labels(x):
    return torch.arange(len(x), device=x.device) % 10


def ddpm_config(recipe):
    import ddpm
    args = ddpm.parse_args(UNET if recipe else [])
    ddpm.fill_model_defaults(args, argparse.Namespace(size=28))
    model = ddpm.make_model(args, 1, 28).to(memory_format=torch.channels_last)
    sch = ddpm.linear_schedule(args.T)
    return (model, lambda x: ddpm.training_step(model, x, sch, draws(x)),
            lambda x: model(x, torch.full((len(x),), 500, device=x.device)))


def vae_config():
    import vae
    args = vae.parse_args(["--likelihood", "bernoulli"])  # vae.py's choice for Fashion-MNIST
    model = vae.make_model(args, (1, 28, 28))
    return (model, lambda x: vae.training_step(model, x, args.latent_dim, draws(x), args.beta, args.binarize),
            lambda x: model.decoder(torch.randn(len(x), args.latent_dim, device=x.device)))


def rectified_flow_config():
    import rectified_flow as rf
    args = rf.parse_args(UNET)
    rf.fill_model_defaults(args, 28)
    model = rf.make_model(args, (1, 28, 28), None).to(memory_format=torch.channels_last)
    v = rf.velocity(model)
    return (model, lambda x: rf.rectified_flow_step(model, x, draws(x)),
            lambda x: v(x, rf.times(x, 0.5)))


def dit_config():
    import dit
    args = dit.parse_args(["--model", "T/4"])
    dit.fill_model_defaults(args)
    model = dit.make_model(args, (1, 28, 28), 10)
    sch = dit.linear_schedule(args.T)
    return (model, lambda x: dit.training_step(model, x, labels(x), sch, draws(x), 10, args.p_uncond,
                                               args.learn_sigma, args.lambda_vlb),
            lambda x: model(x, torch.full((len(x),), 500, device=x.device), labels(x)))


def mmdit_config():
    import mmdit
    args = mmdit.parse_args(["--model", "T/4"])
    mmdit.fill_model_defaults(args, CLASSES)
    model = mmdit.make_model(args, (1, 28, 28))
    tokens = mmdit.tokenize(CLASSES, args.text_len)
    return (model, lambda x: mmdit.training_step(model, x, tokens.to(x.device)[labels(x)], args.p_uncond, draws(x)),
            lambda x: model(x, torch.full((len(x),), 0.5, device=x.device), tokens.to(x.device)[labels(x)]))


def ldm_config():
    """Stage 2 on the CPU recipe's f = 2 latents (2 x 14 x 14); x holds the encoder's moments."""
    import ldm
    args = ldm.parse_args(["--stage", "ldm", "--ae", "unused.pt", "--width", "32", "--res-blocks", "1"])
    ldm.fill_model_defaults(args, 14)
    model = ldm.make_model(args, (2, 14, 14), 10)
    sch, table = ldm.Schedule(args.T), ldm.condition_table(CLASSES, args, "cpu")
    return (model, lambda x: ldm.stage_2_step(model, x, labels(x), 1.0, table.to(x.device), args.p_uncond, sch,
                                              draws(x)),
            lambda x: model(x[:, :2], torch.full((len(x),), 500, device=x.device), table.to(x.device)[labels(x)]))


def consistency_config():
    """The EDM teacher of the CPU recipe (CD and CT train the same U-Net)."""
    import consistency as cm
    args = cm.parse_args(["--stage", "teacher", *UNET])
    cm.fill_model_defaults(args, argparse.Namespace(size=28))
    model = cm.make_model(args, 1, 28, boundary=False).to(memory_format=torch.channels_last)
    return (model, lambda x: cm.teacher_step(model, x, args.sigma_data, draws(x)),
            lambda x: model(x, torch.full((len(x),), 1.0, device=x.device)))


def controlnet_config():
    """A ControlNet on edges over the locked U-Net of ddpm.py's CPU recipe (its optimizer holds the
    ControlNet alone; the locked base's forward is in every step and every call)."""
    import controlnet
    import ddpm
    args = ddpm.parse_args(UNET)
    ddpm.fill_model_defaults(args, argparse.Namespace(size=28))
    ckpt = {"args": vars(args), "shape": [1, 28, 28], "ema": ddpm.make_model(args, 1, 28).state_dict()}
    base = controlnet.locked_base(ckpt)
    net = controlnet.ControlNet(base, 1, 10)
    sch = controlnet.base_schedule(ckpt["args"])
    return (net, lambda x: controlnet.training_step(base.to(x.device), net, x, controlnet.edges(x), labels(x), sch,
                                                    draws(x)),
            lambda x: controlnet.eps_theta(base.to(x.device), [(net, controlnet.edges(x))], x,
                                           torch.full((len(x),), 500, device=x.device), labels(x)))


def latte_config():
    """docs/latte.md's CPU recipe: Latte T/4, Variant 1, depth 6, width 192, 2 x 4 x 4 tubelets of
    4 frames of 32 x 32."""
    import latte
    args = latte.parse_args(["--model", "T/4", "--tubelet", "2", "--depth", "6", "--width", "192", "--heads", "3"])
    latte.fill_model_defaults(args)
    model = latte.make_model(args, (4, 1, 32, 32), 10)
    sch = latte.linear_schedule(args.T)
    return (model, lambda x: latte.training_step(model, x, labels(x), sch, draws(x), 10, args.p_uncond),
            lambda x: model(x, torch.full((len(x),), 500, device=x.device), labels(x)))


CONFIGS = {  # name: (builder, batch size, shape of a training example)
    "ddpm": (lambda: ddpm_config(recipe=False), 128, (1, 28, 28)),
    "ddpm-cpu-recipe": (lambda: ddpm_config(recipe=True), 64, (1, 28, 28)),
    "vae": (vae_config, 128, (1, 28, 28)),
    "rectified-flow-cpu-recipe": (rectified_flow_config, 64, (1, 28, 28)),
    "dit-T/4": (dit_config, 64, (1, 28, 28)),
    "mmdit-T/4": (mmdit_config, 64, (1, 28, 28)),
    "ldm-cpu-recipe": (ldm_config, 64, (4, 14, 14)),
    "consistency-teacher-cpu-recipe": (consistency_config, 64, (1, 28, 28)),
    "controlnet-cpu-recipe": (controlnet_config, 64, (1, 28, 28)),
    "latte-cpu-recipe": (latte_config, 32, (4, 1, 32, 32)),  # clips (F, C, H, W)
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


def measure(name, device, bf16, compile_, repeats):
    build, batch, shape = CONFIGS[name]
    torch.manual_seed(0)
    model, loss_fn, call = build()
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, *shape, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x  # (clips are 5-D)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=bf16)
    loss_of = torch.compile(loss_fn) if compile_ else loss_fn  # compiles the network's calls in the loss

    def train_step():
        with amp:
            loss = loss_of(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        with torch.no_grad(), amp:
            call(x[:1])
    flops = counter.get_total_flops()  # forward FLOPs for one image
    with FlopCounterMode(display=False) as counter:
        train_step()  # forward and backward of one whole training step, as counted by torch
    step_flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_s = timed(train_step, device, repeats)
    model.eval()
    with torch.no_grad(), amp:
        call_s = timed(lambda: call(x), device, repeats)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    matmul = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32)
    return {"method": name, "params": sum(p.numel() for p in model.parameters()),
            "gflops_per_image": flops / 1e9, "batch": batch, "train_img_per_s": batch / train_s,
            "train_tflops_per_s": step_flops / train_s / 1e12, "sample_ms_per_image_call": 1000 * call_s / batch,
            "peak_mem_mb": peak / 2 ** 20, "matmul_tflops": matmul / 1e12,
            "train_flop_utilisation": step_flops / train_s / matmul}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training loss")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rows = [measure(m, device, args.bf16, args.compile, args.repeats) for m in args.method]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"bf16 {args.bf16}, compile {args.compile}")
    print(f"{'method':31s} {'params':>7s} {'GFLOP/img':>9s} {'train img/s':>11s} {'TFLOP/s':>8s} "
          f"{'ms/call/img':>11s} {'peak MB':>8s} {'util':>6s}")
    for r in rows:
        print(f"{r['method']:31s} {r['params'] / 1e6:6.2f}M {r['gflops_per_image']:9.3f} "
              f"{r['train_img_per_s']:11.1f} {r['train_tflops_per_s']:8.3f} {r['sample_ms_per_image_call']:11.2f} "
              f"{r['peak_mem_mb']:8.0f} {100 * r['train_flop_utilisation']:5.1f}%")


if __name__ == "__main__":
    main()
