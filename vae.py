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

The course's autoencoder applications: anomaly detection (train without one class, score test
images by -ELBO, report the ROC AUC) and unsupervised retrieval (nearest neighbours in mu-space).

Run:
    python vae.py                                    # Fashion-MNIST, MLP, latent 20, 10 epochs
    python vae.py --latent-dim 2 --out runs/vae2d    # the learned manifold of Figure 4
    python vae.py --anomaly-class 8 --out runs/vae-bags   # no bags in training; AUC of -ELBO
    python vae.py --retrieval 10                     # 10 nearest test neighbours in mu-space
    torchrun --standalone --nproc_per_node 8 vae.py --dataset cifar10 --arch conv   # 8 GPUs
    python vae.py --dataset cifar10 --arch conv      # Gaussian decoder
    python vae.py --sample --ckpt runs/vae/ckpt.pt --n 64 --save samples.png
The default run takes about 7 s per epoch on 2 CPU cores (under 2 minutes in all): test ELBO
-246.6 nats per image; on 500 test images the importance-weighted bound (K = 1000) is -242.9. Both
are Bernoulli pseudo-likelihoods of grey values, not densities (see README.md).

Outputs in --out (runs/vae): samples_epochNNN.png (decoder means at fixed z ~ N(0, I)), recon.png
(test images above, reconstructions below), interpolation.png (between pairs of test images),
manifold.png (with --latent-dim 2), retrieval.png (with --retrieval), ckpt.pt; the train and test
-ELBO in nats per image each epoch, then the importance-weighted log-likelihood.

Differences from the paper:
- Adam (lr 1e-3, batch 128) instead of Adagrad (batch 100) with weight decay, as most code does.
- The loss is averaged over the minibatch, Eq. 8 divided by the data set size N.
- The Bernoulli decoder is fitted to grey values in [0, 1], not to binarised images.
- The Gaussian decoder has one learned variance shared by all pixels, not a per-pixel output.
- --arch conv, a convolutional encoder and decoder, is not in the paper (its nets are MLPs).
"""
import argparse
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset, TensorDataset

from common import UserError, load_dataset, pick_device, save_grid, seed_everything

LOG_2PI = math.log(2 * math.pi)

# ----------------------------------------------------------------------------------------------
# The math without a network: reparameterisation, KL to the prior, Gaussian log-densities
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# The networks: q_phi(z|x) and p_theta(x|z)
# ----------------------------------------------------------------------------------------------

class VAE(nn.Module):
    """An encoder x -> (B, 2J), the mean and log-variance of q_phi(z|x), and a decoder z -> x's
    shape, the logits of a Bernoulli or the mean of a Gaussian p_theta(x|z). Any pair of modules
    works (the tests use linear ones). Images x are in [-1, 1]; the Bernoulli models (x + 1) / 2."""

    def __init__(self, encoder, decoder, latent_dim, likelihood):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.latent_dim, self.likelihood = latent_dim, likelihood
        if likelihood == "gaussian":
            # Note: Appendix C.2's decoder outputs a log sigma^2 per pixel; one learned variance for
            # all pixels cannot collapse onto constant pixels and is still a proper density.
            self.log_sigma2 = nn.Parameter(torch.zeros(()))

    def encode(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=-1)  # (B, J) each
        return mu, logvar

    def log_p_x_given_z(self, x, z):
        """log p_theta(x|z) summed over pixels: (B, ...) and (B, J) -> (B,)."""
        out = self.decoder(z)
        if self.likelihood == "bernoulli":
            # Appendix C.1: log p(x|z) = sum_i x_i log y_i + (1 - x_i) log(1 - y_i), y = sigmoid(out)
            # Note: x_i are grey values in [0, 1], not binarised pixels: the usual choice for MNIST,
            # though then p(x|z) is not normalised over [0, 1] (see the continuous Bernoulli).
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


# ----------------------------------------------------------------------------------------------
# The objective (the SGVB estimator, Eq. 10) and the importance-weighted bound
# ----------------------------------------------------------------------------------------------

def sgvb(model, x, eps):
    """Eq. 10 with L = 1: per example, log p_theta(x|z) at z = mu + sigma * eps and
    D_KL(q_phi(z|x) || p(z)). The ELBO estimate is their difference."""
    mu, logvar = model.encode(x)
    z = reparameterize(mu, logvar, eps)
    return model.log_p_x_given_z(x, z), kl_to_prior(mu, logvar)


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


# ----------------------------------------------------------------------------------------------
# Evaluation: test ELBO, log p(x), figures, and the autoencoder applications
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def per_image_elbo(model, dataset, device, seed=0):
    """log p(x|z) (one z per image), D_KL, mu and the label of every image in a data set."""
    g = torch.Generator(device).manual_seed(seed)
    rec, kl, mus, ys = [], [], [], []
    for x, y in DataLoader(dataset, 500, generator=torch.Generator()):  # see epoch_batches
        x = x.to(device)
        mu, logvar = model.encode(x)
        z = reparameterize(mu, logvar, torch.randn(mu.shape, generator=g, device=device))
        rec.append(model.log_p_x_given_z(x, z).cpu())
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
    n = min(16, len(dataset))
    x = torch.stack([dataset[i][0] for i in range(n)]).to(device)
    mu, _ = model.encode(x)
    save_grid(torch.cat([x, model.mean(mu)]), out / "recon.png", nrow=n)  # originals above, E[x|mu] below
    t = torch.linspace(0, 1, 10, device=device)[:, None]
    rows = [torch.cat([x[a:a + 1], model.mean((1 - t) * mu[a] + t * mu[a + 1]), x[a + 1:a + 2]])
            for a in range(0, n - 1, 2)[:4]]  # 4 pairs of test images, 10 steps between their mu
    save_grid(torch.cat(rows), out / "interpolation.png", nrow=12)
    figures = ["recon.png", "interpolation.png"]
    if model.latent_dim == 2:
        # Figure 4: "linearly spaced coordinates on the unit square were transformed through the
        # inverse CDF of the Gaussian to produce values of the latent variables z"
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
    model.eval()
    rec, kl, mu, ys = per_image_elbo(model, test_set, device)
    elbo = rec - kl
    # a Bernoulli decoder on grey values is not a normalised density: its nats are comparable
    # between runs, not with published log-likelihoods (those binarise the images)
    pseudo = " (Bernoulli pseudo-likelihood on grey values)" if args.likelihood == "bernoulli" \
        and not args.binarize else ""
    print(f"test: ELBO {elbo.mean():.2f} nats/image (log p(x|z) {rec.mean():.2f}, "
          f"KL {kl.mean():.2f}) on {len(elbo)} images{pseudo}")
    n = min(args.iw_images, len(test_set))
    g = torch.Generator(device).manual_seed(1)
    log_px, start, last = [], time.time(), time.time()
    for x, _ in DataLoader(Subset(test_set, range(n)), 50, generator=torch.Generator()):
        log_px.append(iw_log_likelihood(model, x.to(device), args.iw_samples, g).cpu())
        done = sum(map(len, log_px))
        if time.time() - last >= args.log_every and done < n:  # K passes per image: it takes a while
            left = (time.time() - start) / done * (n - done)
            print(f"log p(x): {done}/{n} images, {left / 60:.1f} min left", flush=True)
            last = time.time()
    log_px = torch.cat(log_px)
    print(f"test, first {n} images: ELBO {elbo[:n].mean():.2f}, log p(x) >= {log_px.mean():.2f} "
          f"(importance-weighted, K = {args.iw_samples}); gap {log_px.mean() - elbo[:n].mean():.2f} nats")
    save_figures(model, test_set, device, out)
    if args.retrieval:
        retrieval(mu, ys, test_set, args.retrieval, out)
    if args.anomaly_class is not None:
        anomalous = ys == args.anomaly_class
        auc = roc_auc(-elbo, anomalous)
        print(f"anomaly: class {args.anomaly_class} (unseen, {int(anomalous.sum())} images) vs the "
              f"rest ({int((~anomalous).sum())}): -ELBO {-elbo[anomalous].mean():.1f} vs "
              f"{-elbo[~anomalous].mean():.1f} nats; ROC AUC {auc:.3f}")


# ----------------------------------------------------------------------------------------------
# Training: Algorithm 1, logging, checkpoints, grids
# ----------------------------------------------------------------------------------------------

def save_checkpoint(path, model, opt, step, args, shape):
    state = {"method": "vae", "args": vars(args), "shape": list(shape), "step": step,
             "model": model.state_dict(), "optimizer": opt.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                     "mps": torch.mps.get_rng_state() if torch.backends.mps.is_available() else None}}
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a broken ckpt.pt


def restore_device_rng(rng):
    """The CUDA generators of the devices this machine has (a checkpoint from a machine with more
    GPUs restores the first ones), and MPS's."""
    for i, state in enumerate(rng["cuda"][:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state, i)
    if rng.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(rng["mps"])


def load_checkpoint(path):
    if not Path(path).is_file():
        raise UserError(f"no checkpoint at {path}: train first (python vae.py) or pass --ckpt PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): it is damaged or "
                        f"incomplete (a copy cut short?), or not a checkpoint at all") from None
    if not isinstance(ckpt, dict) or ckpt.get("method") != "vae":
        method = ckpt.get("method", "unknown") if isinstance(ckpt, dict) else "unknown"
        raise UserError(f"{path} is a checkpoint of {method}, not of vae.py")
    missing = [k for k in ("args", "shape", "step", "model", "optimizer", "rng") if k not in ckpt]
    if missing:
        raise UserError(f"{path} is an incomplete vae.py checkpoint: no {', '.join(missing)}")
    return ckpt


def epoch_batches(dataset, args, epoch, skip, rank=0, world=1):
    """Epoch `epoch`'s shuffled batches from the `skip`-th on, the same order on every run; under
    torchrun, rank r's slice r of each global batch of --batch-size."""
    g = torch.Generator().manual_seed(args.seed * 100003 + epoch)
    order = torch.randperm(len(dataset), generator=g)[skip * args.batch_size:]
    b = args.batch_size // world
    mine = order[:len(order) // args.batch_size * args.batch_size].view(-1, world, b)[:, rank].flatten()
    # A DataLoader draws a seed from the generator it is given, else from the global RNG, which
    # would then differ between a run resumed mid-epoch and one never stopped.
    return DataLoader(Subset(dataset, mine.tolist()), b, drop_last=True, generator=g)


def check_likelihood(args, info):
    """Bernoulli for MNIST-like grey images, Gaussian for colour images and folders."""
    if args.likelihood is None:
        args.likelihood = "bernoulli" if args.dataset in ("mnist", "fashion-mnist") else "gaussian"
    if args.likelihood == "bernoulli" and info.channels != 1:
        raise UserError(f"--likelihood bernoulli models grey values in [0, 1] of one-channel images; "
                        f"{info.name} has {info.channels} channels: use --likelihood gaussian")
    if args.binarize and args.likelihood != "bernoulli":
        raise UserError("--binarize makes binary images for a Bernoulli decoder: use --likelihood bernoulli")


def binarize(x, generator=None, rank=0, world=1):
    """Stochastic binarisation (as Burda et al. 2016 and most published MNIST likelihoods): each pixel
    is 1 with probability its grey value, so the Bernoulli decoder is a true likelihood. Under
    torchrun each rank draws the whole global batch's coins and keeps its slice (see sgvb_batch)."""
    coins = torch.rand(world * len(x), *x.shape[1:], generator=generator, device=x.device)
    return (coins[rank * len(x):(rank + 1) * len(x)] < (x + 1) / 2).float() * 2 - 1


def binarized(dataset, seed=0):
    """The test set binarised once, with a fixed seed, so every evaluation sees the same images."""
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.as_tensor([dataset[i][1] for i in range(len(dataset))])
    return TensorDataset(binarize(x, torch.Generator().manual_seed(seed)), y)


# ----------------------------------------------------------------------------------------------
# Many GPUs (torchrun): one process per device; without torchrun, one process and none of this
# ----------------------------------------------------------------------------------------------

def setup_distributed(device_name):
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is rank 0 of 1. NCCL on
    GPUs, gloo on CPUs. Ranks > 0 print nothing. Returns (rank, world, device)."""
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


def all_sum(x, world):
    """The sum of a tensor over all ranks (itself for one process)."""
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def stopped(stop, ranks, device):
    """Whether Ctrl-C or SIGTERM reached any rank: all ranks then stop after the same step."""
    if ranks.world > 1 and all_sum(torch.tensor(float(len(stop)), device=device), ranks.world).item():
        stop.append(signal.SIGTERM)  # every rank's list then says so; a rank not signalled exits 143
    return bool(stop)


def diverged(loss, first):
    """The loss is non-finite, or finite but absurd: over 1000 x the first step's (at least 1). A run
    at 1e22 stays finite, trains nothing and would sample noise."""
    return not math.isfinite(loss) or loss > 1000 * max(first, 1.0)


def divergence_error(loss, first, batch, step, kept, ranks, device, data="the data set has NaN or inf in it"):
    """What a diverged loss means: a batch holding NaN or inf on any rank (a lower --lr cannot help
    that), or else training that blew up."""
    bad = sum(float(not torch.isfinite(x).all()) for x in batch if x.is_floating_point())
    if all_sum(torch.tensor(bad, device=device), ranks.world).item():
        return UserError(f"the batch at step {step} holds non-finite values: {data}; stopped without "
                         f"saving ({kept})")
    scale = f" (over 1000 x the first step's {first:.4g})" if math.isfinite(loss) else ""
    return UserError(f"the loss became {loss:.4g}{scale} at step {step}; stopped without saving ({kept}). "
                     f"Try a lower --lr.")


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------

def train(args):
    rank, world, device = setup_distributed(args.device)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.ckpt or Path(args.out) / "ckpt.pt")
        for k in ("dataset", "image_size"):
            if getattr(args, k) is not None and getattr(args, k) != ckpt["args"][k]:
                raise UserError(f"the run was trained with --{k.replace('_', '-')} {ckpt['args'][k]}; "
                                f"--resume continues it on the same data (leave out --{k.replace('_', '-')})")
        keep = {k: getattr(args, k) for k in ("epochs", "steps", "device", "out", "resume", "ckpt")}
        # the evaluation flags the run was started with, unless given again
        keep.update({k: getattr(args, k) for k in ("iw_samples", "iw_images", "retrieval")
                     if getattr(args, k) is not None})
        if keep["epochs"] is None and keep["steps"] is None:
            keep["epochs"], keep["steps"] = ckpt["args"]["epochs"], ckpt["args"]["steps"]
        args = argparse.Namespace(**{"binarize": False, **ckpt["args"], **keep})  # older runs: grey values
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} (the global batch) must divide evenly over "
                        f"{world} processes")
    seed_everything(args.seed)  # the same on every rank: every rank draws the global batch's eps
    dataset, info = load_dataset(args.dataset, args.data_dir, True, args.image_size)
    test_set, _ = load_dataset(args.dataset, args.data_dir, False, args.image_size)
    shape = (info.channels, info.size, info.size)
    if ckpt is not None and tuple(ckpt["shape"]) != shape:
        raise UserError(f"the checkpoint was trained on {tuple(ckpt['shape'])} images, "
                        f"{args.dataset} has {shape}: use the same --dataset and --image-size")
    check_likelihood(args, info)
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
    if len(dataset) < args.batch_size:
        raise UserError(f"{args.dataset} has {len(dataset)} images, fewer than --batch-size {args.batch_size}")
    if args.retrieval and args.retrieval >= len(test_set):
        raise UserError(f"--retrieval {args.retrieval} needs more test images than {len(test_set)}")
    if os.path.isdir(args.dataset):
        print("note: an image folder has no test split, so the test numbers are on the training images")

    # Algorithm 1, line 1: theta, phi <- Initialize parameters
    model = make_model(args, shape).to(device)
    # Note: the Gaussian decoder's log sigma^2 learns at 10 x lr: Adam moves a weight by about lr
    # per step, and log sigma^2 must go from 0 to log(reconstruction error), about -4, early on.
    groups = [{"params": [p for n, p in model.named_parameters() if n != "log_sigma2"]},
              {"params": [p for n, p in model.named_parameters() if n == "log_sigma2"], "lr": 10 * args.lr}]
    opt = torch.optim.Adam([g for g in groups if g["params"]], lr=args.lr)
    print(f"model: {args.arch}, latent {args.latent_dim}, {args.likelihood} decoder, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, beta {args.beta}")
    per_epoch = len(dataset) // args.batch_size
    total = args.steps or args.epochs * per_epoch
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        restore_device_rng(ckpt["rng"])
        if world > 1 and device.type == "cuda":  # every rank continues rank 0's stream (device 0)
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], device)
        print(f"resumed from step {step}")
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model  # averages the gradients over the ranks in backward()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder for the run's outputs")
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"

    stop = []  # Ctrl-C or SIGTERM (kill, timeout, a cluster's scheduler) finishes the step, saves, exits
    handlers = {s: signal.signal(s, lambda signum, _: stop.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    ranks = argparse.Namespace(ddp=ddp, rank=rank, world=world)
    try:
        step = run_epochs(args, model, opt, dataset, test_set, device, shape, step, total,
                          per_epoch, ckpt_path, stop, ranks)
        if rank == 0:  # Algorithm 1, line 8: return theta, phi
            save_checkpoint(ckpt_path, model, opt, step, args, shape)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if world > 1:
            dist.destroy_process_group()
    print(f"{'interrupted' if stop else 'done'} at step {step}; checkpoint {ckpt_path}")
    if stop:  # 130 after Ctrl-C, 143 after SIGTERM: a script or a scheduler tells it from "done"
        sys.exit(128 + stop[0])
    if rank == 0:
        try:
            evaluate(args, model, test_set, device, out)
        except KeyboardInterrupt:
            print(f"interrupted during the evaluation; {ckpt_path} holds step {step}", file=sys.stderr)
            sys.exit(130)


def run_epochs(args, model, opt, dataset, test_set, device, shape, step, total, per_epoch,
               ckpt_path, stop, ranks):
    """The training loop. ranks: the model to call (DistributedDataParallel under torchrun), this
    process's rank and the world size; rank 0 alone logs, saves and evaluates."""
    last_log = last_save = time.time()
    seen, t_log = 0, time.time()
    saved = step or None  # the step ckpt_path holds from this run (a resumed run: where it resumed)
    first = None  # the loss of this process's first step, the scale of the divergence rule
    # Algorithm 1, lines 2 and 7: repeat ... until convergence (here: a fixed number of steps)
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        t_epoch, elbo_sum, count = time.time(), 0.0, 0
        model.train()
        # Algorithm 1, line 3: X^M <- random minibatch of M datapoints
        for x, _ in epoch_batches(dataset, args, epoch, skip, ranks.rank, ranks.world):
            x = x.to(device)
            if args.binarize:  # a fresh binarisation every time an image is seen
                x = binarize(x, None, ranks.rank, ranks.world)
            # Algorithm 1, line 4: eps <- random samples from p(eps) = N(0, I) (under torchrun:
            # drawn for the whole global batch, this rank's slice kept, as binarize's coins)
            mine = slice(ranks.rank * len(x), (ranks.rank + 1) * len(x))
            eps = torch.randn(ranks.world * len(x), args.latent_dim, device=device)[mine]
            rec, kl = ranks.ddp(x, eps)  # sgvb(model, x, eps)
            # Eq. 8 over N, and beta-VAE (Higgins et al. 2017) weighs the KL by beta (1: the ELBO)
            loss = -(rec - args.beta * kl).mean()
            loss_all = all_sum(loss.detach(), ranks.world) / ranks.world  # the same on every rank
            first = loss_all.item() if first is None else first
            if diverged(loss_all.item(), first):  # a -ELBO of hundreds of nats at the start sets the scale
                kept = f"{ckpt_path} holds step {saved}" if saved else "this run has written no checkpoint yet"
                raise divergence_error(loss_all.item(), first, (x,), step + 1, kept, ranks, device)
            opt.zero_grad(set_to_none=True)
            # Algorithm 1, line 5: g <- grad_{theta,phi} L~^M(theta, phi; X^M, eps)
            loss.backward()
            # Algorithm 1, line 6: theta, phi <- update parameters using g (Adam)
            opt.step()
            step += 1
            elbo_sum += (rec - kl).detach().sum().item()
            count += x.shape[0]
            seen += args.batch_size
            now = time.time()
            if now - last_log >= args.log_every or step == total:
                speed = seen / (now - t_log)
                left = (total - step) * args.batch_size / speed
                print(f"step {step}/{total}  epoch {epoch + 1}  loss {loss_all.item():.2f}  "
                      f"{speed:.0f} img/s  {left / 60:.1f} min left", flush=True)
                last_log, seen, t_log = now, 0, now
            if now - last_save >= 60 * args.save_every and ranks.rank == 0:
                save_checkpoint(ckpt_path, model, opt, step, args, shape)
                last_save, saved = now, step
            if step == total or stopped(stop, ranks, device):
                break
        if (step % per_epoch == 0 or step == total) and ranks.rank == 0:  # the others wait meanwhile
            save_checkpoint(ckpt_path, model, opt, step, args, shape)
            saved = step
            end_of_epoch(args, model, test_set, device, epoch, time.time() - t_epoch, elbo_sum / count)
        if stopped(stop, ranks, device):
            break
    return step


@torch.no_grad()
def end_of_epoch(args, model, test_set, device, epoch, seconds, train_elbo):
    model.eval()
    rec, kl, _, _ = per_image_elbo(model, test_set, device)
    z = torch.randn(64, args.latent_dim, generator=torch.Generator().manual_seed(0)).to(device)
    path = Path(args.out) / f"samples_epoch{epoch + 1:03d}.png"
    save_grid(model.mean(z), path)
    print(f"epoch {epoch + 1} ({seconds:.1f} s): train -ELBO {-train_elbo:.2f}, test -ELBO "
          f"{(kl - rec).mean():.2f} nats/image (-log p(x|z) {-rec.mean():.2f} + KL {kl.mean():.2f}); "
          f"samples in {path}", flush=True)
    model.train()


# ----------------------------------------------------------------------------------------------
# Sampling from a checkpoint: z ~ p(z) = N(0, I), x = E[x|z]
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(args):
    if not args.ckpt:
        raise UserError("--sample needs --ckpt PATH (e.g. runs/vae/ckpt.pt)")
    if not args.save or Path(args.save).suffix not in (".png", ".pt"):
        raise UserError("--sample needs --save FILE.png (a grid) or FILE.pt (a tensor)")
    ckpt = load_checkpoint(args.ckpt)
    device = pick_device(args.device)
    model = make_model(argparse.Namespace(**ckpt["args"]), tuple(ckpt["shape"])).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(f"{args.ckpt} holds non-finite weights (its run diverged): retrain with a lower --lr")
    g = torch.Generator().manual_seed(args.seed)
    z = torch.randn(args.n, model.latent_dim, generator=g).to(device)
    start = time.time()
    x = torch.cat([model.mean(zz) for zz in z.split(1024)]).cpu()
    print(f"{args.n} samples in {time.time() - start:.3f} s")   # one decoder pass: milliseconds
    if not torch.isfinite(x).all():
        raise UserError(f"the samples of {args.ckpt} came out non-finite: the checkpoint is broken, retrain it")
    Path(args.save).parent.mkdir(parents=True, exist_ok=True)
    if args.save.endswith(".pt"):
        torch.save(x, args.save)
    else:
        save_grid(x, args.save)
    print(f"saved {args.n} samples to {args.save}")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="mnist | fashion-mnist (default) | cifar10 | PATH")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--image-size", type=positive_int, help="for image folders")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int)
    length.add_argument("--steps", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/vae")
    p.add_argument("--resume", action="store_true", help="continue OUT/ckpt.pt (or --ckpt)")
    p.add_argument("--sample", action="store_true", help="only sample from --ckpt")
    p.add_argument("--ckpt")
    p.add_argument("--n", type=positive_int, default=64)
    p.add_argument("--save")
    # VAE
    p.add_argument("--latent-dim", type=positive_int, default=20, help="J, the size of z")
    p.add_argument("--arch", choices=["mlp", "conv"], default="mlp")
    p.add_argument("--hidden", type=positive_int, default=500, help="hidden units (Sec. 5: 500)")
    p.add_argument("--likelihood", choices=["bernoulli", "gaussian"],
                   help="p(x|z); default bernoulli for (fashion-)mnist, gaussian otherwise")
    p.add_argument("--beta", type=float, default=1.0, help="KL weight (beta-VAE)")
    p.add_argument("--binarize", action="store_true",
                   help="stochastically binarised images: a true Bernoulli likelihood (Burda et al.)")
    p.add_argument("--iw-samples", type=positive_int, help="K of the IW bound (default 1000)")
    p.add_argument("--iw-images", type=positive_int, help="test images for log p(x) (default 500)")
    p.add_argument("--anomaly-class", type=int, help="train without class k; AUC of -ELBO")
    p.add_argument("--retrieval", type=positive_int, metavar="K", help="K nearest neighbours in mu-space")
    p.add_argument("--log-every", type=float, default=5.0, help="seconds")
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    args = p.parse_args(argv)
    if not args.beta >= 0:
        p.error(f"--beta must be >= 0, got {args.beta}")
    if not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr}")
    if not args.resume:
        args.dataset = args.dataset or "fashion-mnist"
        args.iw_samples, args.iw_images = args.iw_samples or 1000, args.iw_images or 500
        if not args.sample and args.epochs is None and args.steps is None:
            args.epochs = 10
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        sample(args) if args.sample else train(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C where no checkpoint is at stake: sampling, or before training
        print("interrupted: nothing saved", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
