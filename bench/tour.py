"""Every method on the same data, budget and yardstick: one table and one plot.

Each method file's CPU recipe is run through its own command line (the commands README.md prints),
each checkpoint draws 1,000 samples from seed 1000 at each sampler setting through `--sample`, and
bench/quality.py scores them. Writes bench/results/tour.json, bench/results/tour.md (the Markdown
table) and assets/tour.png (FD against network evaluations per image, both on log scales, the
held-out real images as a horizontal line: "from 1000 steps to 1 step", measured).

    python bench/tour.py                              # every recipe at its own length (hours on a CPU)
    python bench/tour.py --budget-minutes 3           # each network from scratch trains ~3 minutes
    python bench/tour.py --only ddpm,consistency --resume
    python bench/tour.py --device cuda --budget-minutes 30

--budget-minutes B: every network trained from random weights (ddpm, vae, 1-RF, dit, mmdit, ldm's
autoencoder and its U-Net, the consistency teacher and CT, latte, and the ControlNet, whose copy
starts from ddpm's locked U-Net but whose condition encoder and zero convolutions are new) trains
B minutes: a 30-step probe run measures its images/s and the tour passes the matching --steps, so
the learning-rate schedule still ends where the recipe's does. A stage that starts from another
network (reflow, distillation, consistency distillation) keeps its recipe's share: its --steps
(and --pairs) scale by the factor its parent's steps did. Training minutes count whole stage
commands (start-up and per-epoch grids included, the probe not), summed along the chain: a 2-RF
row counts the 1-RF and the pairs; a CD row counts its teacher; a ControlNet row, its base.

Parameters count the network that draws the samples (a VAE's decoder; an LDM's U-Net and decoder;
a ControlNet and its locked base). The last column is a method's own yardstick: a ControlNet's edge
F1 against the test edge maps its samples were drawn from (the row with control scale 0 is its
locked base alone, the floor); for latte, the share of clips the classifier puts in one class in
every frame and the garment's distance from a straight bouncing path. Latte's rows are scored per
frame: each frame's garment window (at its centre of mass) resized to 28x28, 1,000 frames spread
over 250 clips, beside real clips of held-out test garments made and scored the same way.
RK45's evaluations are the most any chunk of images took. CT trains without the README's --teacher,
which only draws its grid's teacher row: consistency training needs no teacher, and its minutes
count CT alone.

--resume skips rows already in tour.json and stages whose checkpoint it recorded (it refuses a
tour.json measured with another length, --n or data set); --only runs some methods and keeps the
other methods' rows. A failed stage or sampler is reported in its rows and the tour goes on. Run
it alone: two torch processes on the same cores slow each other several times.
"""
import argparse
import datetime
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import quality  # noqa: E402
from common import UserError, load_clips, load_dataset  # noqa: E402

N_SAMPLES = 1000
SEED = 1000            # the sampling seed of every README measurement
PROBE_STEPS = 30
METRICS = ("fd", "kid", "precision", "recall", "class_entropy", "nearest_ratio")


@dataclass
class Stage:
    """One training command. `steps` is the recipe's length (None: `length` flags, e.g. epochs);
    `after` is the stage whose checkpoint it reads; `scratch` False means it starts from that
    checkpoint's weights, so it keeps its share of that stage's training."""
    key: str
    script: str
    flags: list
    ckpt: str                      # the checkpoint it writes, relative to the tour's --out
    steps: int = None
    length: list = field(default_factory=list)
    after: str = None
    scratch: bool = True
    pairs: int = None              # rectified_flow.py's --pairs, scaled like the steps


@dataclass
class Setting:
    """One row: a checkpoint sampled with `flags`; `nfe` None means read it from the output."""
    method: str
    model: str
    sampler: str
    stage: str
    flags: list
    nfe: int = None
    n: int = N_SAMPLES
    real: bool = False             # no sampling: the real data the stage trained on, scored alike


UNET = ["--width", "32", "--mults", "1,2,3", "--res-blocks", "1", "--batch-size", "64"]
RF_PAIRS = ["--solver", "heun", "--sampling-steps", "8", "--batch-size", "64", "--lr", "1e-3",
            "--warmup", "20", "--lr-decay", "cosine"]


LATTE = ["--canvas", "32", "--frames", "4", "--model", "T/4", "--tubelet", "2", "--depth", "6", "--width", "192",
         "--heads", "3", "--variant", "1", "--batch-size", "32", "--lr", "1e-3", "--warmup", "100",
         "--lr-decay", "cosine", "--ema", "0.999"]  # docs/latte.md's CPU recipe


def recipes():
    """{method: (stages in training order, settings)}: README.md's CPU recipes and the samplers."""
    def euler(k):
        return ["--solver", "euler", "--sampling-steps", str(k)]

    def steps_of(k):
        return f"{k} step{'s' if k > 1 else ''}"

    return {
        "vae": ([Stage("vae", "vae.py", ["--batch-size", "128", "--out", "vae"], "vae/ckpt.pt",
                       length=["--epochs", "10"])],
                [Setting("vae", "VAE", "prior sample", "vae", [], 1)]),
        "ddpm": ([Stage("ddpm", "ddpm.py", [*UNET, "--lr", "2e-3", "--warmup", "100", "--lr-decay", "cosine",
                                            "--sampler", "ddim", "--sampling-steps", "50", "--out", "ddpm"],
                        "ddpm/ckpt.pt", 800)],
                 [Setting("ddpm", "DDPM", "DDPM 1000 steps", "ddpm", ["--sampler", "ddpm"], 1000, n=200)]
                 + [Setting("ddpm", "DDPM", f"DDIM {k}", "ddpm", ["--sampler", "ddim", "--sampling-steps", str(k)], k)
                    for k in (10, 20, 50)]),
        "rectified_flow": (
            [Stage("1rf", "rectified_flow.py", [*UNET, "--lr", "2e-3", "--warmup", "100", "--lr-decay", "cosine",
                                                "--out", "rf"], "rf/ckpt_1rf.pt", 800),
             Stage("2rf", "rectified_flow.py", ["--reflow", "--ckpt", "rf/ckpt_1rf.pt", *RF_PAIRS, "--out", "rf"],
                   "rf/ckpt_2rf.pt", 400, after="1rf", scratch=False, pairs=5000),
             Stage("distilled", "rectified_flow.py", ["--distill", "--ckpt", "rf/ckpt_2rf.pt", *RF_PAIRS,
                                                      "--out", "rf"],
                   "rf/ckpt_2rf_distilled.pt", 400, after="2rf", scratch=False, pairs=5000)],
            [Setting("rectified_flow", "1-RF", f"Euler {k}", "1rf", euler(k), k) for k in (1, 2, 4, 8, 100)]
            + [Setting("rectified_flow", "1-RF", "RK45", "1rf", ["--solver", "rk45"])]
            + [Setting("rectified_flow", "2-RF", f"Euler {k}", "2rf", euler(k), k) for k in (1, 2, 4)]
            + [Setting("rectified_flow", "2-RF distilled", "one step", "distilled",
                       ["--solver", "euler", "--sampling-steps", "1"], 1)]),
        "dit": ([Stage("dit", "dit.py", ["--model", "T/4", "--batch-size", "64", "--lr", "1e-3", "--warmup", "100",
                                         "--lr-decay", "cosine", "--ema", "0.999", "--sampling-steps", "100",
                                         "--out", "dit"], "dit/ckpt.pt", 1800)],
                # guidance 1.5 (the paper's FID setting) evaluates the network twice per step
                [Setting("dit", "DiT-T/4", "DDPM 250, guidance 1.5", "dit",
                         ["--sampler", "ddpm", "--sampling-steps", "250", "--cfg-scale", "1.5"], 500, n=200),
                 Setting("dit", "DiT-T/4", "DDIM 50, guidance 1.5", "dit",
                         ["--sampler", "ddim", "--sampling-steps", "50", "--cfg-scale", "1.5"], 100)]),
        "mmdit": ([Stage("mmdit", "mmdit.py", ["--model", "T/4", "--batch-size", "64", "--lr", "1e-3", "--warmup",
                                               "100", "--lr-decay", "cosine", "--ema", "0.999", "--out", "mmdit"],
                         "mmdit/ckpt.pt", 1350)],
                  # prompts are the class names in turn; guidance evaluates the network twice per step
                  [Setting("mmdit", "MM-DiT-T/4", f"Euler {k}, guidance 1.5", "mmdit",
                           ["--sampling-steps", str(k), "--cfg-scale", "1.5"], 2 * k) for k in (10, 50)]),
        "ldm": ([Stage("ldm_ae", "ldm.py", ["--stage", "ae", "--f", "2", "--latent-channels", "2", "--ae-width", "32",
                                            "--ae-res-blocks", "1", "--batch-size", "64", "--lr", "1e-3",
                                            "--out", "ldm_ae"], "ldm_ae/ckpt.pt", 600),
                 Stage("ldm", "ldm.py", ["--stage", "ldm", "--ae", "ldm_ae/ckpt.pt", "--width", "32", "--res-blocks",
                                         "1", "--batch-size", "64", "--lr", "2e-3", "--warmup", "100",
                                         "--lr-decay", "cosine", "--out", "ldm"], "ldm/ckpt.pt", 2000, after="ldm_ae")],
                [Setting("ldm", "LDM f=2", "DDIM 50", "ldm", ["--sampler", "ddim", "--sampling-steps", "50"], 50),
                 Setting("ldm", "LDM f=2", "DDIM 50, guidance 1.5", "ldm",
                         ["--sampler", "ddim", "--sampling-steps", "50", "--cfg-scale", "1.5"], 100)]),
        "consistency": (
            [Stage("cm_teacher", "consistency.py", ["--stage", "teacher", *UNET, "--lr", "2e-3", "--warmup", "100",
                                                    "--lr-decay", "cosine", "--out", "cm_teacher"],
                   "cm_teacher/ckpt.pt", 1500),
             Stage("cm_cd", "consistency.py", ["--stage", "cd", "--teacher", "cm_teacher/ckpt.pt", "--batch-size", "64",
                                               "--lr-decay", "cosine", "--warmup", "50", "--out", "cm_cd"],
                   "cm_cd/ckpt.pt", 700, after="cm_teacher", scratch=False),
             Stage("cm_ct", "consistency.py", ["--stage", "ct", "--ict", *UNET, "--lr", "1e-3", "--lr-decay", "cosine",
                                               "--warmup", "50", "--out", "cm_ct"], "cm_ct/ckpt.pt", 1000)],
            [Setting("consistency", "EDM teacher", "Heun 18 steps", "cm_teacher", [], 35)]
            + [Setting("consistency", model, steps_of(k), stage, ["--sampling-steps", str(k)], k)
               for model, stage in (("CD", "cm_cd"), ("CT (iCT)", "cm_ct")) for k in (1, 2, 4)]),
        # trains on ddpm's checkpoint as its locked base, one sample for each of the first N test edge maps
        "controlnet": ([Stage("controlnet", "controlnet.py", ["--base", "ddpm/ckpt.pt", "--condition", "edges",
                                                              "--batch-size", "64", "--lr", "1e-3", "--warmup", "100",
                                                              "--lr-decay", "cosine", "--out", "controlnet"],
                              "controlnet/ckpt.pt", 1500, after="ddpm")],
                       [Setting("controlnet", "ControlNet (edges)", "DDIM 50", "controlnet",
                                ["--control-from-test", "{n}", "--sampling-steps", "50"], 50),
                        Setting("controlnet", "its locked base (control scale 0)", "DDIM 50", "controlnet",
                                ["--control-from-test", "{n}", "--control-scale", "0", "--sampling-steps", "50"], 50)]),
        # clips of 4 frames: 250 clips give the 1,000 frames FD is taken on
        "latte": ([Stage("latte", "latte.py", [*LATTE, "--out", "latte"], "latte/ckpt.pt", 4200)],
                  [Setting("latte", "Latte-T/4, tubelet 2 (Variant 1)", "DDIM 50, guidance 1.5", "latte",
                           ["--sampling-steps", "50", "--cfg-scale", "1.5"], 100, n=250),
                   Setting("latte", "real clips (test garments)", "-", "latte", [], n=250, real=True)]),
    }


METHODS = tuple(recipes())


def row_key(row):
    return (row["method"], row["model"], row["sampler"])


# ----------------------------------------------------------------------------------------------
# Running the method files
# ----------------------------------------------------------------------------------------------

class StageFailed(Exception):
    pass


def run(cmd, log_path):
    """Run a method file's command line in the repository root; its output goes to log_path.
    Returns (stdout, seconds) or raises StageFailed with the error's last line."""
    start = time.time()
    r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - start
    Path(log_path).write_text(f"$ python {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    if r.returncode:
        last = (r.stderr.strip() or r.stdout.strip() or f"exit status {r.returncode}").splitlines()[-1]
        raise StageFailed(f"{cmd[0]} exited with {r.returncode}: {last} (log: {log_path})")
    return r.stdout, seconds


def common_flags(args):
    return ["--dataset", args.dataset, "--data-dir", args.data_dir, "--device", args.device]


def in_out(flags, out):
    """The recipe's flags with its relative paths (--out, --ckpt, --ae, --teacher) under `out`."""
    paths = ("--out", "--ckpt", "--ae", "--teacher", "--base")
    return [str(out / f) if i and flags[i - 1] in paths else f for i, f in enumerate(flags)]


def probe_steps(stage, args, out):
    """The --steps that train `stage` for about --budget-minutes, from a short run's images/s."""
    flags = in_out(stage.flags, out)
    flags[flags.index("--out") + 1] = str(out / "probe" / stage.key)
    shutil.rmtree(out / "probe" / stage.key, ignore_errors=True)      # a fresh run, not a resumed one
    stdout, _ = run([stage.script, *flags, *common_flags(args), "--steps", str(PROBE_STEPS), "--log-every", "0.5"],
                    out / "logs" / f"probe_{stage.key}.log")
    speeds = re.findall(r"([\d.]+) img/s", stdout)
    if not speeds:
        raise StageFailed(f"the probe run of {stage.key} printed no img/s")
    batch = int(stage.flags[stage.flags.index("--batch-size") + 1])
    return max(1, round(60 * args.budget_minutes * float(speeds[-1]) / batch))


def training_command(stage, args, out, steps, factor):
    """The recipe's command line with the tour's paths, data, device and length (None: the
    recipe's own `length` flags)."""
    length = ["--steps", str(steps)] if steps else stage.length
    if stage.pairs:
        length += ["--pairs", str(max(64, round(stage.pairs * factor)))]
    return [stage.script, *in_out(stage.flags, out), *common_flags(args), *length]


def sampling_command(setting, ckpt, args, n, path):
    script = recipes()[setting.method][0][0].script
    return [script, "--sample", "--ckpt", str(ckpt), "--n", str(n), "--seed", str(SEED), "--save", str(path),
            "--device", args.device, *[f.format(n=n) for f in setting.flags]]


def train(stage, args, out, done):
    """Run one stage; `done` holds the stages already trained ({key: record}). Returns its record."""
    if args.steps:                                    # a smoke run: every stage the same few steps
        steps = args.steps
    elif not stage.scratch:                           # keeps its share of its parent's training
        steps = max(1, round(stage.steps * done[stage.after]["factor"]))
    elif args.budget_minutes:
        steps = probe_steps(stage, args, out)
    else:
        steps = stage.steps
    factor = steps / stage.steps if stage.steps else 1.0
    cmd = training_command(stage, args, out, steps, factor)
    stdout, seconds = run(cmd, out / "logs" / f"{stage.key}.log")
    chain = done[stage.after]["chain_minutes"] if stage.after else 0.0
    return {"command": "python " + " ".join(cmd), "steps": steps,
            "factor": factor, "minutes": seconds / 60, "chain_minutes": chain + seconds / 60,
            "ckpt": str(out / stage.ckpt)}


def parameters(ckpt_path):
    """Parameters of the network the samples come from: no encoder (vae), the decoder added (ldm),
    the locked base added (controlnet)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    weights = ckpt.get("ema") or ckpt["model"]
    count = sum(t.numel() for k, t in weights.items() if not k.startswith("encoder."))
    if isinstance(ckpt.get("ae"), dict):
        count += sum(t.numel() for t in ckpt["ae"]["decoder"].values())
    if isinstance(ckpt.get("base"), str):
        count += parameters(ckpt["base"])
    return count


def sample(setting, ckpt, args, out):
    """(samples, seconds of sampling as the method file prints it, network evaluations per image)."""
    name = re.sub(r"\W+", "_", f"{setting.model}_{setting.sampler}").strip("_").lower()
    path = out / "samples" / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    n = min(setting.n, args.n)
    log = out / "logs" / f"sample_{name}.log"
    stdout, _ = run(sampling_command(setting, ckpt, args, n, path), log)
    seconds, nfe = re.search(r"samples in ([\d.]+) s", stdout), re.search(r"NFE (\d+)", stdout)
    if not seconds or not (setting.nfe or nfe):
        raise StageFailed(f"{setting.method} --sample printed no sampling time or evaluation count (log: {log})")
    return torch.load(path, weights_only=True), float(seconds.group(1)), setting.nfe or int(nfe.group(1))


def scored(samples, args, score, **reference):
    q = score(samples, args.dataset, args.data_dir, "cpu" if args.device == "auto" else args.device, **reference)
    return {**{k: q[k] for k in METRICS if k in q},
            "nearest_ratio": q["nn_train_median"] / max(q["nn_train_median_real"], 1e-12)}


def measures(setting, ckpt, x, args, score):
    """The row's numbers: bench/quality.py's, and a method's own yardstick under "own"."""
    if setting.method == "latte":
        return clip_measures(x, ckpt, args, score, setting.real)
    row = scored(x, args, score)
    if setting.method == "controlnet":
        row["own"] = condition_fidelity(x, ckpt, args)
    return row


def condition_fidelity(x, ckpt_path, args):
    """{measure: value} of the samples against the conditions of the first len(x) test images, the
    ones they were drawn from (controlnet.py's edge F1, mask IoU or low-res PSNR)."""
    import controlnet
    condition = torch.load(ckpt_path, map_location="cpu", weights_only=True)["args"]["condition"]
    test, _ = load_dataset(args.dataset, args.data_dir, train=False)
    c = controlnet.CONDITIONS[condition](torch.stack([test[i][0] for i in range(len(x))]))
    return {controlnet.MEASURES[condition]: controlnet.FIDELITY[condition](x.float(), c).mean().item()}


def clip_args(ckpt_path):
    return torch.load(ckpt_path, map_location="cpu", weights_only=True)["args"]


def real_clips(ckpt_path, args, n):
    """n clips of held-out test garments made as the stage's training clips were, and the rest of
    the test split, their reference (as real_row takes it)."""
    a = clip_args(ckpt_path)
    clips, _ = load_clips(args.dataset, args.data_dir, False, a["frames"], a["canvas"], image_size=a["image_size"])
    _, _, test_x, _ = quality.reference(args.dataset, args.data_dir, "cpu")
    order = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(0))
    return torch.stack([clips[i][0] for i in order[:n].tolist()]), test_x[order[n:]]


def garments(clips, size):
    """Every frame of clips (N, F, C, H, W) as a 28x28 image for quality.py: the size x size window
    at the frame's centre of mass (where the garment is), resized. (N * F, C, 28, 28)"""
    import latte
    frames = clips.flatten(0, 1)
    corner = (latte.centre_of_mass(clips).flatten(0, 1) - (size - 1) / 2).round().long()
    corner = corner.clamp(0, clips.shape[-1] - size)
    window = torch.arange(size)
    rows, cols = corner[:, :1] + window, corner[:, 1:] + window            # (N * F, size) each
    crops = frames[torch.arange(len(frames))[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    crops = crops.permute(0, 3, 1, 2)                                        # (N * F, C, size, size)
    return F.interpolate(crops, size=28, mode="bilinear", antialias=True).clamp(-1, 1)


def frame_classes(images, args):
    """bench/quality.py's classifier's class of each image."""
    classifier = quality.reference(args.dataset, args.data_dir, "cpu")[0]
    return quality.features_and_probs(classifier, images)[1].argmax(1)


def clip_measures(clips, ckpt_path, args, score, real):
    """Per-frame scores of clips on bench/quality.py, args.n frames spread evenly over the clips'
    frames; and under "own" latte.py's video measures: the share of clips the classifier puts in one
    class in every frame, and the centre of mass's distance from a straight bouncing path and its
    speed (pixels a frame)."""
    import latte
    a = clip_args(ckpt_path)
    reference = {}
    if real:
        clips, reference["test_images"] = clips
    n_clips, n_frames = clips.shape[:2]
    size = a["image_size"] or load_dataset(args.dataset, args.data_dir, train=False)[1].size  # None: the data's own
    images = garments(clips, size).unflatten(0, (n_clips, n_frames))
    chosen = torch.linspace(0, n_frames - 1, -(-args.n // n_clips)).round().long()
    row = scored(images[:, chosen].flatten(0, 1)[:args.n], args, score, **reference)
    residual, speed = latte.motion(clips, a["canvas"] - size)
    classes = frame_classes(images.flatten(0, 1), args).view(n_clips, n_frames)
    own = {"one class": latte.temporal_consistency(classes), "px off a bouncing path": residual.mean().item(),
           "px a frame": speed.mean().item()}
    return {**row, "n": min(args.n, n_clips * len(chosen)), "clips": n_clips, "own": own}


def real_row(args):
    """The held-out test images scored against the rest of the test split (bench/calibrate.py's
    'real (held-out test)'): the floor every model's FD is read against."""
    _, _, test_x, _ = quality.reference(args.dataset, args.data_dir, "cpu")
    order = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(0))
    q = quality.score(test_x[order[:args.n]], args.dataset, args.data_dir, "cpu",
                      test_images=test_x[order[args.n:]])
    return {"method": "real", "model": "held-out test images", "sampler": "-", "n": args.n,
            **{k: q[k] for k in METRICS if k in q},
            "nearest_ratio": q["nn_train_median"] / max(q["nn_train_median_real"], 1e-12)}


def tour_method(method, args, out, results, score):
    """Train the method's stages and score its settings; rows replace the method's old rows."""
    stages, settings = recipes()[method]
    old = {row_key(r): r for r in results["rows"] if r["method"] == method}
    todo = [s for s in settings
            if not (args.resume and "error" not in old.get((s.method, s.model, s.sampler), {"error": 1}))]
    done, failed, trained = results["stages"], {}, set()
    needed = {s.stage for s in todo}
    for stage in reversed(stages):            # and the stages they read, back along the chain
        if stage.key in needed and stage.after:
            needed.add(stage.after)
    for stage in stages:
        recorded = done.get(stage.key)
        fresh = args.resume and recorded and Path(recorded["ckpt"]).exists() and stage.after not in trained
        if stage.key not in needed or fresh:
            continue
        if stage.after in failed:
            failed[stage.key] = f"needs {stage.after}, which failed"
            continue
        print(f"[{method}] training {stage.key}", flush=True)
        try:
            done[stage.key] = train(stage, args, out, done)
            trained.add(stage.key)
            print(f"[{method}] {stage.key}: {done[stage.key]['steps']} steps in "
                  f"{done[stage.key]['minutes']:.1f} min", flush=True)
        except Exception as e:            # reported in the stage's rows; the tour goes on
            failed[stage.key] = str(e) if isinstance(e, StageFailed) else f"{type(e).__name__}: {e}"
            done.pop(stage.key, None)
            print(f"[{method}] {stage.key} failed: {e}", flush=True)
    rows = dict(old)
    for s in todo:
        row = {"method": s.method, "model": s.model, "sampler": s.sampler}
        try:
            if s.stage in failed:
                raise StageFailed(f"training failed: {failed[s.stage]}")
            record = done[s.stage]
            if s.real:
                x = real_clips(record["ckpt"], args, min(s.n, args.n))
            else:
                x, seconds, nfe = sample(s, record["ckpt"], args, out)
                row.update(nfe=nfe, n=len(x), sample_ms=1000 * seconds / len(x),
                           train_minutes=record["chain_minutes"], params=parameters(record["ckpt"]))
            row.update(measures(s, record["ckpt"], x, args, score))
        except StageFailed as e:
            row["error"] = str(e)
        except Exception as e:            # whatever went wrong is reported in the row; the tour goes on
            row["error"] = f"{type(e).__name__}: {e}"
        rows[row_key(row)] = row
        print(f"[{method}] {format_row(row)}", flush=True)
    order = [(s.method, s.model, s.sampler) for s in settings]
    kept = [r for r in results["rows"] if r["method"] != method] + [rows[k] for k in order if k in rows]
    results["rows"] = sorted(kept, key=lambda r: METHODS.index(r["method"]))   # stable: settings' order


# ----------------------------------------------------------------------------------------------
# The table and the plot
# ----------------------------------------------------------------------------------------------

COLUMNS = ("method", "model", "sampler", "evaluations", "ms/img", "train min", "params", "FD", "KID ×10³",
           "precision", "recall", "class entropy", "nearest train", "own measure")


def format_row(r, n=N_SAMPLES):
    """One Markdown table row; a row scored on other than n samples says so (FD depends on N), and
    a row of clips says how many (its ms/img is per clip, its scores per frame)."""
    if r.get("clips"):
        r = {**r, "sampler": f"{r['sampler']} ({r['clips']} clips, {r['n']} frames)"}
    elif r.get("n") not in (None, n):
        r = {**r, "sampler": f"{r['sampler']} ({r['n']} samples)"}
    if "error" in r:
        error = (r["error"].strip().splitlines() or ["?"])[-1].replace("|", "\\|")
        return f"| {r['method']} | {r['model']} | {r['sampler']} | failed: {error} |" + " |" * (len(COLUMNS) - 4)

    def f(key, fmt):
        return format(r[key], fmt) if r.get(key) is not None else "-"
    params = f"{r['params'] / 1e6:.2f}M" if r.get("params") else "-"
    ms = f("sample_ms", ".2f" if (r.get("sample_ms") or 1) < 1 else ".1f")
    return (f"| {r['method']} | {r['model']} | {r['sampler']} | {f('nfe', 'd')} | {ms} | "
            f"{f('train_minutes', '.1f')} | {params} | {f('fd', '.2f')} | "
            f"{format(1e3 * r['kid'], '.2f') if r.get('kid') is not None else '-'} | {f('precision', '.2f')} | "
            f"{f('recall', '.2f')} | {f('class_entropy', '.3f')} | {f('nearest_ratio', '.2f')} | "
            f"{', '.join(f'{k} {v:.3g}' for k, v in r.get('own', {}).items()) or '-'} |")


def table(results):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    n = results.get("n", N_SAMPLES)
    lines += [format_row(r, n) for r in results["rows"]]
    if results.get("real"):
        lines.append(format_row({**results["real"], "nfe": None}, n))
    return "\n".join(lines) + "\n"


def plot(results, path):
    """FD against evaluations per image, log-log, one line per model, real images as a floor; clips'
    per-frame FD, whose floor is another, stays in the table. Returns the lines drawn, {label:
    (evaluations, FDs)}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    models, drawn = {}, {}
    for r in results["rows"]:
        if "error" not in r and r.get("fd") and r.get("nfe") and not r.get("clips"):
            models.setdefault(f"{r['method']}: {r['model']}", []).append(r)
    colours = plt.get_cmap("tab20").colors
    for i, (label, rows) in enumerate(models.items()):
        rows = sorted(rows, key=lambda r: r["nfe"])
        drawn[label] = ([r["nfe"] for r in rows], [r["fd"] for r in rows])
        line, = ax.plot(*drawn[label], "os^D"[i % 4] + "-", color=colours[i % 20], label=label)
        for r in rows:                    # FD is biased up on fewer samples: such a point says so
            if r.get("n") not in (None, results.get("n", N_SAMPLES)):
                ax.plot(r["nfe"], r["fd"], "o", mfc="white", color=line.get_color())
                ax.annotate(f"{r['n']} samples", (r["nfe"], r["fd"]), xytext=(-8, 6),
                            textcoords="offset points", ha="right", fontsize=7)
    if (results.get("real") or {}).get("fd"):
        ax.axhline(results["real"]["fd"], color="grey", linestyle="--",
                   label=f"held-out real images ({results['real']['n']})")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations per image",
           ylabel="FD (bench/quality.py, lower is better)")
    ax.set_title(results.get("title", "Fashion-MNIST"), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return drawn


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help=f"comma-separated methods of {','.join(METHODS)} (default: all)")
    p.add_argument("--budget-minutes", type=float, help="training minutes of each network from scratch "
                   "(default: each recipe's own length)")
    p.add_argument("--steps", type=int, help="every stage trains this many steps (a smoke run)")
    p.add_argument("--resume", action="store_true", help="skip rows and stages already in --results")
    p.add_argument("--n", type=int, default=N_SAMPLES, help="samples per setting (DDPM 1000 steps and "
                   "DiT's DDPM 250: 200; latte: 250 clips)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/tour", help="checkpoints, samples and logs")
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "tour.json"))
    p.add_argument("--plot", default=str(ROOT / "assets" / "tour.png"))
    p.add_argument("--no-real", action="store_true", help="do not score held-out real images")
    p.add_argument("--report", action="store_true", help="only rewrite the table and plot from --results")
    args = p.parse_args(argv)
    only = args.only.split(",") if args.only else list(METHODS)
    unknown = [m for m in only if m not in METHODS]
    if unknown:
        p.error(f"--only: unknown method {', '.join(unknown)}; choose from {','.join(METHODS)}")
    args.only = only
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        p.error(f"--budget-minutes must be > 0, got {args.budget_minutes}")
    if args.budget_minutes and args.steps:
        p.error("--budget-minutes and --steps both set the training length: give one")
    if args.steps is not None and args.steps <= 0 or args.n < 10:
        p.error("--steps must be > 0 and --n at least 10 (quality.py's minimum)")
    return args


def load_results(path, setting, resume):
    """The results so far. Rows of other methods are kept when they were measured the same way
    (training length, samples, data set); --resume refuses to mix two ways."""
    fresh = {"rows": [], "stages": {}, "real": None, "setting": setting}
    if not Path(path).exists():
        return fresh
    old = json.loads(Path(path).read_text())
    if old.get("setting") != setting:
        if resume:
            raise UserError(f"{path} was measured with {old.get('setting')}, this run asks for {setting}: "
                            f"give the same --budget-minutes/--steps, --n and --dataset, or drop --resume "
                            f"(which starts the table afresh)")
        print(f"{path} holds rows measured with {old.get('setting')}: starting afresh", flush=True)
        return fresh
    if resume:
        return old
    return {**fresh, "rows": old.get("rows", []), "stages": old.get("stages", {}), "real": old.get("real")}


def machine():
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else []
    cpu = names[0].strip() if names else platform.processor() or platform.machine()
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{cpu}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"


def main(argv=None, score=quality.score):
    args = parse_args(argv)
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    length = (f"--budget-minutes {args.budget_minutes:g}" if args.budget_minutes else
              f"--steps {args.steps}" if args.steps else "each recipe's own length")
    if args.report:
        if not Path(args.results).exists():
            raise UserError(f"no {args.results}: run the tour first (without --report)")
        return report(json.loads(Path(args.results).read_text()), args)
    results = load_results(args.results, {"length": length, "n": args.n, "dataset": args.dataset}, args.resume)
    for method in args.only:
        try:
            tour_method(method, args, out, results, score)
        finally:                          # every method's rows reach the disk as soon as they exist
            save(results, args)
    if not args.no_real and not (args.resume and results.get("real")):
        results["real"] = real_row(args)
    results.update(date=datetime.date.today().isoformat(), machine=machine(), n=args.n,
                   title=f"{args.dataset}, {length}, {args.n} samples per point")
    save(results, args)
    report(results, args)


def report(results, args):
    print(table(results))
    try:
        plot(results, args.plot)
        print(f"plot in {args.plot}")
    except ImportError:
        print("matplotlib is missing (pip install -r bench/requirements.txt): no plot", file=sys.stderr)


def save(results, args):
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=1))
    Path(args.results).with_suffix(".md").write_text(table(results))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
