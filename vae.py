"""Auto-Encoding Variational Bayes (Kingma & Welling 2014, arXiv:1312.6114): the variational autoencoder.

A latent variable model p_theta(x, z) = p_theta(x | z) p(z), with the prior p(z) = N(0, I) and a
decoder network p_theta(x | z), is trained together with an encoder (the recognition model)
q_phi(z | x) = N(mu, diag sigma^2) that approximates the intractable posterior p_theta(z | x).
Both maximise the variational lower bound L (the ELBO) on the marginal likelihood:

    Eq. 1:  log p_theta(x) = D_KL(q_phi(z|x) || p_theta(z|x)) + L(theta, phi; x)  >=  L(theta, phi; x)
    Eq. 3:  L(theta, phi; x) = -D_KL(q_phi(z|x) || p(z)) + E_q[log p_theta(x|z)]

The reparameterisation z = mu + sigma * eps, eps ~ N(0, I) (Sec. 2.4), moves the randomness out of
phi, so a Monte Carlo estimate of L is differentiable in phi: the SGVB estimator (Eq. 10), with the
KL term in closed form (Appendix B).

    Algorithm 1  Minibatch version of the Auto-Encoding VB (AEVB) algorithm
    1: theta, phi <- Initialize parameters
    2: repeat
    3:   X^M <- Random minibatch of M datapoints (drawn from full dataset)
    4:   eps <- Random samples from noise distribution p(eps)
    5:   g <- grad_{theta,phi} L~^M(theta, phi; X^M, eps)   (Gradients of minibatch estimator (8))
    6:   theta, phi <- Update parameters using gradients g (e.g. SGD or Adagrad)
    7: until convergence of parameters (theta, phi)
    8: return theta, phi

L is only a bound. The importance-weighted estimate of Burda, Grosse & Salakhutdinov 2016
(arXiv:1509.00519), log 1/K sum_k p(x, z_k) / q(z_k | x) with z_k ~ q(z | x), rises with K toward
log p(x); after training both are printed, and their gap is the price of the Gaussian q.
Applications of the autoencoder: anomaly detection (train without one class, score test images by
-ELBO, report the ROC AUC) and retrieval (nearest neighbours in mu-space).

Run:
    python vae.py                                    # Fashion-MNIST, MLP, latent 20, 10 epochs
    python vae.py --latent-dim 2 --out runs/vae2d    # the learned manifold of Figure 4
    python vae.py --anomaly-class 8 --out runs/vae-bags   # no bags in training; AUC of -ELBO
    python vae.py --retrieval 10                     # 10 nearest test neighbours in mu-space
    python vae.py --dataset cifar10 --arch conv      # Gaussian decoder
    torchrun --standalone --nproc_per_node 8 vae.py --dataset cifar10 --arch conv   # 8 GPUs
    python vae.py --sample --ckpt runs/vae/ckpt.pt --n 64 --save samples.png
The default run takes about 7 s per epoch on 2 CPU cores: test ELBO -246.6 nats per image; on 500
test images the importance-weighted bound (K = 1000) is -242.9. Both are Bernoulli
pseudo-likelihoods of grey values, not densities (see docs/vae.md).

Outputs in --out (runs/vae): samples_epochNNN.png (decoder means at fixed z ~ N(0, I)), recon.png
(test images above, reconstructions below), interpolation.png, manifold.png (with --latent-dim 2),
retrieval.png (with --retrieval), ckpt.pt; the test -ELBO in nats per image each epoch, then the
importance-weighted log-likelihood.

Differences from the paper:
- Adam (lr 1e-3, batch 128) instead of Adagrad (batch 100) with weight decay, as most code does.
- The loss is averaged over the minibatch, Eq. 8 divided by the data set size N.
- The Bernoulli decoder is fitted to grey values in [0, 1], not to binarised images (--binarize:
  stochastically binarised, a fresh draw each step, as Burda et al.).
- The Gaussian decoder has one learned variance shared by all pixels, not a per-pixel output, and
  it learns at 10 x lr.
- --arch conv, a convolutional encoder and decoder, is not in the paper (its nets are MLPs).
"""
import argparse
import contextlib
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from signal import SIGINT, SIGTERM

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset, TensorDataset

from common import UserError, load_dataset, pick_device, save_grid, seed_everything

# ==== the paper ====================================================================================
# Reparameterisation, the KL to the prior, Gaussian log-densities (no network needed)

LOG_2PI = math.log(2 * math.pi)


def reparameterize(mu, logvar, eps):
    """Sec. 2.4: z = mu + sigma * eps, sigma = exp(log sigma^2 / 2), eps ~ N(0, I). A sample of
    q_phi(z|x) = N(mu, diag sigma^2) that is a differentiable function of mu and log sigma^2."""
    return mu + (0.5 * logvar).exp() * eps


def kl_to_prior(mu, logvar):
    """Appendix B: -D_KL(q_phi(z|x) || N(0, I)) = 1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2).
    Returns D_KL per example: (..., J) -> (...)."""
    return -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(-1)


def log_normal(x, mean, logvar):
    """log N(x; mean, exp(logvar)) elementwise (a diagonal Gaussian: sum over the axes you need)."""
    return -0.5 * (LOG_2PI + logvar + (x - mean).square() / logvar.exp())


def log_prior(z):
    """log p(z) = log N(z; 0, I), summed over the last axis."""
    return -0.5 * (LOG_2PI + z.square()).sum(-1)


# The networks: q_phi(z|x) and p_theta(x|z)

class VAE(nn.Module):
    """An encoder x -> (B, 2J), the mean and log-variance of q_phi(z|x), and a decoder z -> x's
    shape, the logits of a Bernoulli or the mean of a Gaussian p_theta(x|z). Any pair of modules
    works (the tests use linear ones). Images x are in [-1, 1]; the Bernoulli models (x + 1) / 2."""

    def __init__(self, encoder, decoder, latent_dim, likelihood):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.latent_dim, self.likelihood = latent_dim, likelihood
        if likelihood == "gaussian":  # Appendix C.2 outputs a log sigma^2 per pixel; here one for all
            self.log_sigma2 = nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return self.encoder(x).chunk(2, dim=-1)  # mu, log sigma^2: (B, J) each

    def log_p_x_given_z(self, x, z):
        """log p_theta(x|z) summed over pixels: (B, ...) and (B, J) -> (B,)."""
        out = self.decoder(z)
        if self.likelihood == "bernoulli":
            # Appendix C.1: log p(x|z) = sum_i x_i log y_i + (1 - x_i) log(1 - y_i), y = sigmoid(out),
            # on grey values x_i in [0, 1] (unless binarised), where p(x|z) is not normalised
            ll = -F.binary_cross_entropy_with_logits(out, (x + 1) / 2, reduction="none")
        else:
            # Appendix C.2: log p(x|z) = log N(x; mu, sigma^2 I), with x in [-1, 1]
            ll = log_normal(x, out, self.log_sigma2)
        return ll.flatten(1).sum(1)

    def forward(self, x, eps):
        """The SGVB terms of Eq. 10 (see sgvb) in one call, as DistributedDataParallel wants."""
        return sgvb(self, x, eps)

    def mean(self, z):
        """E[x|z] in [-1, 1]: what the image grids show (the decoder's mean, not a sample)."""
        out = self.decoder(z)
        return out.sigmoid() * 2 - 1 if self.likelihood == "bernoulli" else out.clamp(-1, 1)


def make_model(args, shape):
    """Appendix C's MLPs (one tanh hidden layer each way, 500 units for MNIST, Sec. 5), or convs."""
    C, H, W = shape
    J, hidden = args.latent_dim, args.hidden
    if args.arch == "mlp":
        D = C * H * W
        encoder = nn.Sequential(nn.Flatten(), nn.Linear(D, hidden), nn.Tanh(), nn.Linear(hidden, 2 * J))
        decoder = nn.Sequential(nn.Linear(J, hidden), nn.Tanh(), nn.Linear(hidden, D),
                                nn.Unflatten(1, shape))
        return VAE(encoder, decoder, J, args.likelihood)
    if H % 4:
        raise UserError(f"--arch conv halves {H}x{H} images twice, so the size must be divisible "
                        f"by 4 (28, 32, 64): use --arch mlp or --image-size")
    s = H // 4
    encoder = nn.Sequential(
        nn.Conv2d(C, 32, 4, 2, 1), nn.ReLU(),                # (B, 32, H/2, W/2)
        nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),               # (B, 64, H/4, W/4)
        nn.Flatten(), nn.Linear(64 * s * s, hidden), nn.ReLU(), nn.Linear(hidden, 2 * J))
    decoder = nn.Sequential(
        nn.Linear(J, hidden), nn.ReLU(), nn.Linear(hidden, 64 * s * s), nn.ReLU(),
        nn.Unflatten(1, (64, s, s)),
        nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),      # (B, 32, H/2, W/2)
        nn.ConvTranspose2d(32, C, 4, 2, 1))                  # (B, C, H, W)
    return VAE(encoder, decoder, J, args.likelihood)


# The objective (the SGVB estimator, Eq. 10) and Algorithm 1

def sgvb(model, x, eps):
    """Eq. 10 with L = 1: per example, log p_theta(x|z) at z = mu + sigma * eps and
    D_KL(q_phi(z|x) || p(z)). The ELBO estimate is their difference."""
    mu, logvar = model.encode(x)
    z = reparameterize(mu, logvar, eps)
    return model.log_p_x_given_z(x, z), kl_to_prior(mu, logvar)


def binarize(x, n):
    """Stochastic binarisation (Burda et al. 2016): a pixel is 1 with probability its grey value
    p = (x + 1) / 2, as n < Phi^-1(p) for n ~ N(0, 1), so that the Bernoulli decoder is a true likelihood."""
    return (n < torch.special.ndtri((x + 1) / 2)).float() * 2 - 1


def training_step(model, x, latent_dim, draw, beta=1.0, binary=False):
    """Algorithm 1, lines 3-5, for a minibatch x; the caller takes the gradient step (line 6).
    model: called as sgvb; draw: the random draws (torch's own, or one process's share of a
    global batch's). beta weighs the KL (beta-VAE, Higgins et al. 2017; 1: the ELBO)."""
    # Algorithm 1, line 3: X^M <- random minibatch of M datapoints (binary: drawn afresh each step)
    if binary:
        x = binarize(x, draw.randn(*x.shape[1:]))
    # Algorithm 1, line 4: eps <- random samples from p(eps) = N(0, I)
    eps = draw.randn(latent_dim)
    # Algorithm 1, line 5: the minibatch estimator L~^M (Eq. 8, over N) whose gradient the caller takes
    rec, kl = model(x, eps)
    return -(rec - beta * kl).mean()


# Sampling from the prior, and the importance-weighted bound on log p(x)

@torch.no_grad()
def sample_prior(model, z):
    """New images from z ~ p(z) = N(0, I): the decoder's means E[x|z]."""
    return model.mean(z)


@torch.no_grad()
def iw_log_likelihood(model, x, K, generator=None):
    """Burda et al. 2016, Eq. 8: L_K = log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x), per
    example. L_1 is an ELBO estimate; E[L_K] rises with K toward log p(x) (their Theorem 1)."""
    mu, logvar = model.encode(x)
    B, chunk = len(x), max(1, 8192 // len(x))
    log_w = []
    for k0 in range(0, K, chunk):
        k = min(chunk, K - k0)
        eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device)
        z = reparameterize(mu, logvar, eps)                                  # (k, B, J)
        xs = x.repeat(k, *[1] * (x.dim() - 1))                               # (k * B, ...)
        log_px_z = model.log_p_x_given_z(xs, z.flatten(0, 1)).view(k, B)
        log_w.append(log_px_z + log_prior(z) - log_normal(z, mu, logvar).sum(-1))
    return torch.logsumexp(torch.cat(log_w), 0) - math.log(K)              # (B,)


# ==== harness: the same text in every method file (tests/test_harness.py compares the copies) ====
# Processes and devices, a global batch's random draws, checkpoints and resume, signals, EMA, the
# learning rate, the training loop's bookkeeping, progress lines, --sample's frame and shared flags.


def setup_processes(device_name):
    """(rank, world, device): 0 of 1, or under torchrun one process per device, NCCL on GPUs and
    gloo on CPUs, of which only rank 0 prints."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank > 0:
        sys.stdout = open(os.devnull, "w")
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = pick_device("cpu" if device_name == "auto" else device_name)
    if not dist.is_initialized():  # (a caller may have set the group up already)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        print(f"distributed: {world} processes ({dist.get_backend()})")
    return rank, world, device


class Draws:
    """A global batch of n's random draws: every process draws all n and keeps its slice, so that
    N processes compute what one process computes on the whole batch."""

    def __init__(self, n, device, rank=0, world=1):
        self.n, self.device = n, device
        self.mine = slice(rank * n // world, (rank + 1) * n // world)

    def randn(self, *shape):  # (n / world, *shape)
        return torch.randn(self.n, *shape, device=self.device)[self.mine]

    def rand(self):
        return torch.rand(self.n, device=self.device)[self.mine]

    def randint(self, low, high):
        return torch.randint(low, high, (self.n,), device=self.device)[self.mine]


def epoch_batches(dataset, args, epoch, skip, rank=0, world=1):
    """Epoch `epoch`'s shuffled batches from the `skip`-th on, rank r's slice of each global batch.
    The loader has its own generator: the global RNG's draws would differ after a resume."""
    g = torch.Generator().manual_seed(args.seed * 100003 + epoch)
    order = torch.randperm(len(dataset), generator=g)[skip * args.batch_size:]
    b = args.batch_size // world
    mine = order[:len(order) // args.batch_size * args.batch_size].view(-1, world, b)[:, rank].flatten()
    return DataLoader(Subset(dataset, mine.tolist()), b, drop_last=True, generator=g)


@torch.no_grad()
def ema_update(ema, model, n, max_decay):
    """EMA of the weights, its decay warmed up as min(max_decay, (1 + n) / (10 + n))."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - min(max_decay, (1 + n) / (10 + n)))


def learning_rate(args, step, total):
    """Linear warm-up over --warmup steps (a tenth of a shorter run), then constant or cosine."""
    warmup = min(args.warmup, total // 10)
    lr = args.lr * min(1.0, (step + 1) / warmup) if warmup else args.lr
    return lr * 0.5 * (1 + math.cos(math.pi * step / total)) if args.lr_decay == "cosine" else lr


def load_checkpoint(path, methods, keys, flag="--ckpt"):
    """A checkpoint of one of `methods` with `keys`, read as data (weights_only), or one line."""
    if not Path(path).is_file():
        raise UserError(f"no checkpoint at {path}: train first, or pass {flag} PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): it is damaged or "
                        f"incomplete (a copy cut short?), or not a checkpoint at all") from None
    method = ckpt.get("method", "unknown") if isinstance(ckpt, dict) else "unknown"
    if method not in methods:
        raise UserError(f"{path} is a checkpoint of {method}, not of {' or '.join(methods)}")
    missing = [k for k in ("args", "step", "rng", *keys) if k not in ckpt]
    if missing:
        raise UserError(f"{path} is an incomplete {method} checkpoint: no {', '.join(missing)}")
    return ckpt


def resumed_args(p, args, ckpt, free=("device", "out", "resume", "ckpt", "data_dir", "log_every",
                                      "save_every", "compile", "bf16")):
    """The checkpoint's flags, with the `free` ones and a new length given now; any other flag
    given now that differs from the checkpoint's is refused."""
    saved = ckpt["args"]
    for k, v in vars(args).items():
        if k not in (*free, "epochs", "steps") and v not in (p.get_default(k), saved.get(k)):
            raise UserError(f"--resume continues the run with its --{k.replace('_', '-')} {saved.get(k)}, "
                            f"not {v}: leave the flag out, or start a new run with another --out")
    length = ("epochs", "steps") if args.epochs or args.steps else ()
    print("--resume: the flags left out are the checkpoint's")
    return argparse.Namespace(**{**saved, **{k: getattr(args, k) for k in (*free, *length)}})


@contextlib.contextmanager
def signals_to(stop):
    """Ctrl-C and SIGTERM append their number to `stop`: the run ends its step, saves and exits."""
    old = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (SIGINT, SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class SamplingStopped(Exception):
    """Ctrl-C or SIGTERM arrived while a sampler ran."""


class Progress:
    """Called after each step of a long loop, as progress(done, total) or as a sampler's on_step(x,
    done, total): a line with the time left every few seconds; SamplingStopped once `stop` is set."""

    def __init__(self, what, stop=(), every=5.0):
        self.what, self.stop, self.every = what, stop, every
        self.start = self.last = time.time()

    def __call__(self, *step):
        done, total = step[-2:]
        if self.stop:
            raise SamplingStopped
        if time.time() - self.last >= self.every:
            left = (time.time() - self.start) / done * (total - done)
            print(f"{self.what}: step {done}/{total}, {left / 60:.1f} min left", flush=True)
            self.last = time.time()


class Run(argparse.Namespace):
    """A training run: args, method, rank, world, device, path (of its checkpoint), ckpt (resumed, or
    None), stop, shape (of an example), model, opt, dataset, loss(batch, draws) -> a scalar, and
    optionally ema, after_step(step), pictures(epoch, progress) and extra() (more to checkpoint)."""
    ckpt = ema = after_step = pictures = first = None
    step, saved, grid = 0, 0, 0.0

    def extra(self):
        return {}


def begin(args, p, method, keys):
    """A Run: its processes, --out, and with --resume its checkpoint and flags; then the seed, the
    same on every process (see Draws)."""
    rank, world, device = setup_processes(args.device)
    run = Run(method=method, rank=rank, world=world, device=device, stop=[], path=out_folder(args.out) / "ckpt.pt")
    if args.resume:
        run.ckpt = load_checkpoint(args.ckpt or run.path, [method], ("shape", *keys))
        args = resumed_args(p, args, run.ckpt)
    seed_everything(args.seed)
    run.args = args
    return run


def prepare(run):
    """A resumed run's weights, optimizer, step and RNG, and run.net: the network as training calls it."""
    args, ckpt = run.args, run.ckpt
    if args.batch_size % run.world:
        raise UserError(f"--batch-size {args.batch_size} (the global batch) must divide evenly over "
                        f"{run.world} processes")
    if len(run.dataset) < args.batch_size:
        raise UserError(f"{len(run.dataset)} training examples, fewer than --batch-size {args.batch_size}")
    if ckpt is not None:
        if tuple(ckpt["shape"]) != tuple(run.shape):
            raise UserError(f"the checkpoint was trained on {tuple(ckpt['shape'])} data, not {tuple(run.shape)}: "
                            f"resume on the data it was trained on")
        try:
            run.model.load_state_dict(ckpt["model"])
        except RuntimeError:
            raise UserError(f"{run.path}'s weights do not fit the network its flags build: damaged?") from None
        if run.ema is not None:
            run.ema.load_state_dict(ckpt["ema"])
        run.opt.load_state_dict(ckpt["optimizer"])
        run.step = run.saved = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        if ckpt["rng"]["cuda"] is not None and run.device.type == "cuda":  # each rank continues rank 0's
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], run.device)
        print(f"resumed from step {run.step}")
    run.per_epoch = len(run.dataset) // args.batch_size
    run.total = args.steps or args.epochs * run.per_epoch
    run.net = run.model
    if run.world > 1:  # averages the gradients over the processes in backward()
        run.net = DistributedDataParallel(run.model, [run.device.index] if run.device.type == "cuda" else None)
    if args.compile:
        run.net = torch.compile(run.net)


def train(run):
    """From run.step to the end: global batches, run.loss, gradient steps, EMA. The loss and the stop
    flag are read from the device every 10 steps and at each epoch's end, whose checkpoint and pictures
    follow. Ctrl-C or SIGTERM: the step ends, the run saves and exits 128 + the signal's number."""
    prepare(run)
    losses, run.bad_data, run.last_log = [], torch.zeros((), device=run.device), time.time()
    run.last_save = run.last_log
    with signals_to(run.stop):
        while run.step < run.total and not run.stop:
            epoch, skip = divmod(run.step, run.per_epoch)
            for batch in epoch_batches(run.dataset, run.args, epoch, skip, run.rank, run.world):
                losses.append(gradient_step(run, [b.to(run.device) for b in batch]))
                end = run.step % run.per_epoch == 0 or run.step == run.total
                if (end or run.step % 10 == 0 or run.world == 1 and run.stop) and check(run, losses) or end:
                    break
            if run.step % run.per_epoch == 0 or run.step == run.total:
                end_of_epoch(run, epoch)
        save(run)
    if run.world > 1:  # the others wait for rank 0's checkpoint: the next command may read it
        dist.barrier()
    print(f"{'interrupted' if run.stop else 'done'} at step {run.step}; checkpoint {run.path}")
    if run.stop:
        raise SystemExit(128 + run.stop[0])


def gradient_step(run, batch):
    run.bad_data += (~torch.isfinite(batch[0])).any()
    for group in run.opt.param_groups:
        group["lr"] = learning_rate(run.args, run.step, run.total)
    with torch.autocast("cuda", torch.bfloat16, enabled=run.args.bf16 and run.device.type == "cuda"):
        loss = run.loss(batch, Draws(run.args.batch_size, run.device, run.rank, run.world))
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.args.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.args.grad_clip)
    run.opt.step()
    run.step += 1
    if run.ema is not None:
        ema_update(run.ema, run.model, run.step, run.args.ema)
    if run.after_step is not None:
        run.after_step(run.step)
    run.first = loss.detach().float() if run.first is None else run.first
    return loss.detach().float()


def check(run, losses):
    """Stops a diverged run (a loss over 1000 x its first, or 1) without saving; prints progress; saves
    every --save-every minutes. Returns whether any process was asked to stop."""
    stop = torch.tensor(float(len(run.stop)), device=run.device)
    x = torch.stack([torch.stack(losses).mean(), run.first, run.bad_data, stop])
    if run.world > 1:
        dist.all_reduce(x)
        x /= run.world
    (loss, first, bad, stop), now = x.tolist(), time.time()
    if bad or not math.isfinite(loss) or loss > 1000 * max(first, 1):
        held = f"{run.path} holds step {run.saved}" if run.saved else "this run has written no checkpoint yet"
        why = "the data hold NaN or inf" if bad else f"the loss went from {first:.3g} to {loss:.3g} " \
            f"(diverged: try a lower --lr)"
        raise UserError(f"stopped at step {run.step} without saving, as {why}; {held}")
    if now - run.last_log >= run.args.log_every or stop or run.step == run.total:
        speed = len(losses) * run.args.batch_size / (now - run.last_log)
        left = (run.total - run.step) * (run.args.batch_size / speed + run.grid / run.per_epoch)
        print(f"step {run.step}/{run.total}  loss {loss:.4f}  {speed:.0f} img/s  {left / 60:.1f} min left",
              flush=True)
        losses.clear()
        run.last_log = now
    if stop and not run.stop:  # another process's signal: exit as after SIGTERM
        run.stop.append(SIGTERM)
    if now - run.last_save >= 60 * run.args.save_every or stop:
        save(run)
    return bool(stop)


def save(run):
    """The run and the RNG states, written to a temporary file and renamed: a crash leaves no broken file."""
    if run.rank == 0 and run.saved != run.step:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        torch.save({"method": run.method, "args": vars(run.args), "step": run.step, "shape": list(run.shape),
                    "model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "rng": rng,
                    "ema": None if run.ema is None else run.ema.state_dict(), **run.extra()}, f"{run.path}.tmp")
        os.replace(f"{run.path}.tmp", run.path)
    run.saved, run.last_save = run.step, time.time()


def end_of_epoch(run, epoch):
    save(run)
    if run.pictures is None or run.rank > 0:  # the other processes wait meanwhile
        return
    start = time.time()
    try:
        run.pictures(epoch, Progress(f"epoch {epoch + 1} grid", run.stop))
    except SamplingStopped:
        print(f"stopped while drawing the grid; {run.path} holds step {run.step}")
    run.grid, run.last_log = time.time() - start, time.time()  # img/s counts training alone


def sample_command(args, methods, keys, load, nrow=None, write=None):
    """--sample: load(ckpt, device) of --ckpt gives (net, draw); --n samples drawn 256 at a time by
    draw(first, n, progress), checked and written to --save as a tensor, a grid nrow wide (nrow: a
    number, or a function of the checkpoint), or by write(x, path) for a method's own kinds of file."""
    if not args.ckpt:
        raise UserError(f"--sample needs --ckpt PATH, a checkpoint its training wrote (in {args.out})")
    check_save(args.save, (".png", ".pt", *getattr(write, "suffixes", ())))
    ckpt = load_checkpoint(args.ckpt, methods, ("shape", *keys))
    net, draw = load(ckpt, pick_device(args.device))
    if not all(torch.isfinite(w).all() for w in net.parameters()):
        raise UserError(f"{args.ckpt} holds non-finite weights (its run diverged): retrain with a lower --lr")
    start, chunks = time.time(), []
    for i in range(0, args.n, 256):
        progress = Progress(f"samples {i + 1}-{min(i + 256, args.n)} of {args.n}")
        chunks.append(draw(i, min(256, args.n - i), progress).float().cpu())
    x = torch.cat(chunks)
    if not torch.isfinite(x).all():
        raise UserError(f"the samples of {args.ckpt} came out non-finite: the checkpoint is broken, retrain it")
    print(f"{args.n} samples in {time.time() - start:.2f} s")
    if write is not None:
        write(x, args.save)
    elif args.save.endswith(".pt"):
        torch.save(x, args.save)
    else:
        save_grid(x[:, :3], args.save, nrow=nrow(ckpt) if callable(nrow) else nrow)
    print(f"saved {args.save}")


def positive_int(s):
    if not s.strip().isdigit() or int(s) == 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return int(s)


def int_list(s):
    if not s.replace(",", "").strip():
        raise argparse.ArgumentTypeError(f"must be comma-separated integers such as 1,2,2, got {s!r}")
    return tuple(positive_int(x) for x in s.split(",") if x.strip())


def shared_flags(p, out, lr, batch_size=128, warmup=0, ema=0.9999, grad_clip=1.0):
    """DESIGN.md's command line: the flags of every method file, with the method's defaults."""
    p.add_argument("--dataset", help="mnist | fashion-mnist (default) | cifar10 | FOLDER | FILE.pt")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--image-size", type=positive_int, help="for image folders")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int)
    length.add_argument("--steps", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=warmup, help="steps of linear warm-up (0: none)")
    p.add_argument("--lr-decay", choices=["none", "cosine"], default="none")
    p.add_argument("--ema", type=float, default=ema, help="EMA decay of the weights")
    p.add_argument("--grad-clip", type=float, default=grad_clip, help="gradient norm clip (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--out", default=out)
    p.add_argument("--resume", action="store_true", help="continue OUT's checkpoint (or --ckpt)")
    p.add_argument("--log-every", type=float, default=5.0, help="seconds between progress lines")
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    p.add_argument("--sample", action="store_true", help="only sample from --ckpt")
    p.add_argument("--ckpt")
    p.add_argument("--n", type=positive_int, default=64, help="images to sample")
    p.add_argument("--save", help="FILE.png (a grid) or FILE.pt (a tensor) for --sample")


def check_shared_flags(p, args):
    for flag, ok, what in [("lr", args.lr > 0, "positive"), ("warmup", args.warmup >= 0, "0 or more"),
                           ("grad_clip", args.grad_clip >= 0, "0 (off) or positive"),
                           ("ema", 0 <= args.ema < 1, "in [0, 1)")]:
        if not ok:
            p.error(f"--{flag.replace('_', '-')} must be {what}, got {getattr(args, flag)}")
    if not args.resume:
        args.dataset = args.dataset or "fashion-mnist"
        args.epochs = args.epochs or (None if args.steps else 10)


def out_folder(path):
    if Path(path).exists() and not Path(path).is_dir():
        raise UserError(f"--out {path} is a file: give a folder for the run's outputs")
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def check_save(path, suffixes=(".png", ".pt")):
    if path and Path(path).is_dir():
        raise UserError(f"--save {path} is a folder: give a file name ending in {' or '.join(suffixes)}")
    if not path or Path(path).suffix not in suffixes:
        raise UserError(f"--sample needs --save FILE{' or FILE'.join(suffixes)}")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write --save {path}: {e.strerror}") from None


def run_command(command, args):
    """main()'s body: a user's error is one line, and so is Ctrl-C before training or while
    sampling (status 130); the process group, if any, is closed."""
    try:
        command(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except (KeyboardInterrupt, SamplingStopped):
        print("interrupted: nothing saved", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
# ==== end of harness ===============================================================================


# ==== the command line =============================================================================

KEYS = ("model", "optimizer")  # of a vae.py checkpoint, besides the harness's


def check_data(args, info, dataset, test_set):
    """The likelihood (Bernoulli for MNIST-like grey images, else Gaussian), the anomaly run's
    training set (without its class) and the test set (binarised once), checked."""
    if args.likelihood is None:
        args.likelihood = "bernoulli" if args.dataset in ("mnist", "fashion-mnist") else "gaussian"
    if args.likelihood == "bernoulli" and info.channels != 1:
        raise UserError(f"--likelihood bernoulli models grey values in [0, 1] of one-channel images; "
                        f"{info.name} has {info.channels} channels: use --likelihood gaussian")
    if args.binarize and args.likelihood != "bernoulli":
        raise UserError("--binarize makes binary images for a Bernoulli decoder: use --likelihood bernoulli")
    if args.binarize:
        test_set = binarized(test_set)
    if args.anomaly_class is not None:
        if info.num_classes is None:
            raise UserError(f"--anomaly-class needs labels; {info.name} has none (use class subfolders)")
        if not 0 <= args.anomaly_class < info.num_classes:
            raise UserError(f"--anomaly-class must be 0..{info.num_classes - 1}, got {args.anomaly_class}")
        labels = torch.as_tensor(dataset.labels)
        dataset = Subset(dataset, (labels != args.anomaly_class).nonzero().flatten().tolist())
        print(f"anomaly detection: training on {len(dataset)} images without class {args.anomaly_class}")
    if args.retrieval and args.retrieval >= len(test_set):
        raise UserError(f"--retrieval {args.retrieval} needs more test images than {len(test_set)}")
    if os.path.isdir(args.dataset):
        print("note: an image folder has no test split, so the test numbers are on the training images")
    return dataset, test_set


def binarized(dataset, seed=0):
    """The test set binarised once, with a fixed seed, so every evaluation sees the same images."""
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.as_tensor([dataset[i][1] for i in range(len(dataset))])
    return TensorDataset(binarize(x, torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))), y)


@torch.no_grad()
def per_image_elbo(model, dataset, device, seed=0):
    """log p(x|z) (one z per image), D_KL, mu and the label of every image in a data set."""
    g = torch.Generator(device).manual_seed(seed)
    rec, kl, mus, ys = [], [], [], []
    for x, y in DataLoader(dataset, 500, generator=torch.Generator()):  # not the global RNG: see epoch_batches
        mu, logvar = model.encode(x.to(device))
        eps = torch.randn(mu.shape, generator=g, device=device)
        rec.append(model.log_p_x_given_z(x.to(device), reparameterize(mu, logvar, eps)).cpu())
        kl.append(kl_to_prior(mu, logvar).cpu())
        mus.append(mu.cpu())
        ys.append(torch.as_tensor(y))
    return torch.cat(rec), torch.cat(kl), torch.cat(mus), torch.cat(ys)


def roc_auc(scores, positive):
    """P(score of a positive > score of a negative), ties counting half: the area under the ROC."""
    pos, neg = scores[positive][:, None], scores[~positive][None]
    return ((pos > neg).float().mean() + 0.5 * (pos == neg).float().mean()).item()


@torch.no_grad()
def save_figures(model, dataset, device, out):
    """Reconstructions, interpolations between 4 pairs of test images in mu-space, and Figure 4's
    manifold: a grid on the unit square through the Gaussian's inverse CDF, with --latent-dim 2."""
    n = min(16, len(dataset))
    x = torch.stack([dataset[i][0] for i in range(n)]).to(device)
    mu, _ = model.encode(x)
    save_grid(torch.cat([x, model.mean(mu)]), out / "recon.png", nrow=n)
    t = torch.linspace(0, 1, 10, device=device)[:, None]
    rows = [torch.cat([x[a:a + 1], model.mean((1 - t) * mu[a] + t * mu[a + 1]), x[a + 1:a + 2]])
            for a in range(0, n - 1, 2)[:4]]
    save_grid(torch.cat(rows), out / "interpolation.png", nrow=12)
    figures = ["recon.png", "interpolation.png"]
    if model.latent_dim == 2:
        u = torch.special.ndtri(torch.linspace(0.05, 0.95, 20, device=device))
        z2, z1 = torch.meshgrid(u.flip(0), u, indexing="ij")
        save_grid(model.mean(torch.stack([z1, z2], -1).view(-1, 2)), out / "manifold.png", nrow=20)
        figures.append("manifold.png")
    print(f"figures: {', '.join(str(out / f) for f in figures)}")


def retrieval(mu, ys, dataset, K, out, queries=1000, shown=8):
    """The K nearest test images of each query in mu-space (Euclidean); precision@K on labels."""
    Q = min(queries, len(mu))
    d = torch.cdist(mu[:Q], mu)                                               # (Q, N)
    d[torch.arange(Q), torch.arange(Q)] = math.inf  # a query is not its own neighbour
    nearest = d.topk(K, largest=False).indices                                # (Q, K)
    grid = [dataset[int(i)][0] for q in range(min(shown, Q)) for i in [q, *nearest[q]]]
    save_grid(torch.stack(grid), out / "retrieval.png", nrow=K + 1)
    line = f"retrieval: {K} nearest test neighbours in mu-space in {out / 'retrieval.png'} (query first)"
    if (ys >= 0).all():
        precision = (ys[nearest] == ys[:Q, None]).float().mean().item()
        line += f"; precision@{K} (same label) over {Q} queries: {precision:.3f}"
    print(line)


def evaluate(args, model, test_set, device, out):
    """The test ELBO, the importance-weighted log p(x), the figures and the applications."""
    rec, kl, mu, ys = per_image_elbo(model, test_set, device)
    elbo = rec - kl
    grey = args.likelihood == "bernoulli" and not args.binarize  # not a density: nats comparable between runs
    print(f"test: ELBO {elbo.mean():.2f} nats/image (log p(x|z) {rec.mean():.2f}, KL {kl.mean():.2f}) on "
          f"{len(elbo)} images{' (Bernoulli pseudo-likelihood on grey values)' if grey else ''}")
    n = min(args.iw_images, len(test_set))
    g = torch.Generator(device).manual_seed(1)
    progress, log_px = Progress("log p(x) on test images", every=args.log_every), []
    for x, _ in DataLoader(Subset(test_set, range(n)), 50, generator=torch.Generator()):
        log_px.append(iw_log_likelihood(model, x.to(device), args.iw_samples, g).cpu())
        progress(sum(map(len, log_px)), n)  # K passes per image: it takes a while
    log_px = torch.cat(log_px).mean()
    print(f"test, first {n} images: ELBO {elbo[:n].mean():.2f}, log p(x) >= {log_px:.2f} "
          f"(importance-weighted, K = {args.iw_samples}); gap {log_px - elbo[:n].mean():.2f} nats")
    save_figures(model, test_set, device, out)
    if args.retrieval:
        retrieval(mu, ys, test_set, args.retrieval, out)
    if args.anomaly_class is not None:
        bad = ys == args.anomaly_class
        print(f"anomaly: class {args.anomaly_class} (unseen, {int(bad.sum())} images) vs the rest "
              f"({int((~bad).sum())}): -ELBO {-elbo[bad].mean():.1f} vs {-elbo[~bad].mean():.1f} nats; "
              f"ROC AUC {roc_auc(-elbo, bad):.3f}")


def train_command(args, p):
    run = begin(args, p, "vae", KEYS)
    args = run.args
    dataset, info = load_dataset(args.dataset, args.data_dir, True, args.image_size)
    test_set, _ = load_dataset(args.dataset, args.data_dir, False, args.image_size)
    run.shape = (info.channels, info.size, info.size)
    run.dataset, test_set = check_data(args, info, dataset, test_set)
    # Algorithm 1, line 1: theta, phi <- Initialize parameters
    run.model = make_model(args, run.shape).to(run.device)
    print(f"model: {args.arch}, latent {args.latent_dim}, {args.likelihood} decoder, "
          f"{sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M parameters, beta {args.beta}")
    # Adam moves a weight by about lr a step, and log sigma^2 must go from 0 to log(reconstruction
    # error), about -4, early on: its group's lr is 10 x the harness's (set in step_loss)
    groups = [[p for n, p in run.model.named_parameters() if (n == "log_sigma2") == s] for s in (False, True)]
    run.opt = torch.optim.Adam([{"params": g} for g in groups if g], lr=args.lr)

    def step_loss(batch, draws):
        for group in run.opt.param_groups[1:]:
            group["lr"] *= 10
        return training_step(run.net, batch[0], args.latent_dim, draws, args.beta, args.binarize)

    def pictures(epoch, progress):
        """The epoch's grid (decoder means at fixed z ~ N(0, I)) and its test -ELBO."""
        rec, kl, _, _ = per_image_elbo(run.model, test_set, run.device)
        z = torch.randn(64, args.latent_dim, generator=torch.Generator().manual_seed(0)).to(run.device)
        path = Path(args.out) / f"samples_epoch{epoch + 1:03d}.png"
        save_grid(sample_prior(run.model, z), path)
        print(f"epoch {epoch + 1}: test -ELBO {(kl - rec).mean():.2f} nats/image (-log p(x|z) {-rec.mean():.2f} "
              f"+ KL {kl.mean():.2f}); samples in {path}", flush=True)

    run.loss, run.pictures = step_loss, pictures
    train(run)  # Algorithm 1, lines 2-8: a fixed number of steps, then theta, phi in the checkpoint
    if run.rank == 0:
        try:
            evaluate(args, run.model, test_set, run.device, Path(args.out))
        except KeyboardInterrupt:
            print(f"interrupted during the evaluation; {run.path} holds step {run.step}", file=sys.stderr)
            sys.exit(130)


def sample(args):
    def load(ckpt, device):
        model = make_model(argparse.Namespace(**ckpt["args"]), tuple(ckpt["shape"])).to(device)
        model.load_state_dict(ckpt["model"])

        def draw(first, n, progress):  # one decoder pass: milliseconds
            z = torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(args.seed + first))
            return sample_prior(model, z.to(device))
        return model, draw

    sample_command(args, ["vae"], KEYS, load)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_flags(p, "runs/vae", lr=1e-3, grad_clip=0.0)
    p.add_argument("--latent-dim", type=positive_int, default=20, help="J, the size of z")
    p.add_argument("--arch", choices=["mlp", "conv"], default="mlp")
    p.add_argument("--hidden", type=positive_int, default=500, help="hidden units (Sec. 5: 500)")
    p.add_argument("--likelihood", choices=["bernoulli", "gaussian"],
                   help="p(x|z); default bernoulli for (fashion-)mnist, gaussian otherwise")
    p.add_argument("--beta", type=float, default=1.0, help="KL weight (beta-VAE)")
    p.add_argument("--binarize", action="store_true",
                   help="stochastically binarised images: a true Bernoulli likelihood (Burda et al.)")
    p.add_argument("--iw-samples", type=positive_int, default=1000, help="K of the importance-weighted bound")
    p.add_argument("--iw-images", type=positive_int, default=500, help="test images for log p(x)")
    p.add_argument("--anomaly-class", type=int, help="train without class k; AUC of -ELBO")
    p.add_argument("--retrieval", type=positive_int, metavar="K", help="K nearest neighbours in mu-space")
    return p


def parse_args(argv=None, p=None):
    p = p or parser()
    args = p.parse_args(argv)
    check_shared_flags(p, args)
    if not args.beta >= 0:
        p.error(f"--beta must be >= 0, got {args.beta}")
    if args.ema != p.get_default("ema"):
        p.error("--ema: vae.py keeps no moving average of its weights")
    return args


def main(argv=None):
    p = parser()
    args = parse_args(argv, p)
    run_command(sample if args.sample else lambda a: train_command(a, p), args)


if __name__ == "__main__":
    main()
