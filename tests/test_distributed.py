"""Many GPUs, checked on CPUs: every method file trained by two gloo processes under torchrun
reaches the weights one process reaches on the joined batch; a two-process run resumed after it
stopped continues the same run; reflow pairs drawn in parallel are the pairs one process draws;
a global batch that does not divide over the processes is a clear error. (dit.py's own test file
checks dit.py the same way.)

One torchrun launch runs every job (tests/ddp_worker.py), so that the processes start once."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import consistency  # noqa: E402
import ddpm  # noqa: E402
import ldm  # noqa: E402
import rectified_flow  # noqa: E402
import vae  # noqa: E402

MODULES = {"ddpm": ddpm, "vae": vae, "rectified_flow": rectified_flow, "ldm": ldm, "consistency": consistency}
UNET = ["--width", "8", "--mults", "1,2", "--res-blocks", "1", "--attn", "4"]


def jobs(data, out, one):
    """[(module, argv, checkpoints to compare)]: each method for 4 steps with a global batch of 8.
    `one`: the single-process run's folder, whose stage-1 checkpoints the later stages start from."""
    common = ["--dataset", str(data), "--batch-size", "8", "--device", "cpu", "--log-every", "0"]
    return [
        ("ddpm", [*common, *UNET, "--T", "20", "--sampler", "ddim", "--sampling-steps", "2", "--n", "4",
                  "--steps", "4", "--out", str(out / "ddpm")], ["ddpm/ckpt.pt"]),
        ("vae", [*common, "--hidden", "16", "--latent-dim", "2", "--likelihood", "bernoulli", "--binarize",
                 "--iw-samples", "4", "--iw-images", "8", "--steps", "4", "--out", str(out / "vae")],
         ["vae/ckpt.pt"]),
        ("rectified_flow", [*common, *UNET, "--class-cond", "--all", "--steps", "3", "--pairs", "600",
                            "--solver", "euler", "--sampling-steps", "2", "--out", str(out / "rf")],
         ["rf/ckpt_1rf.pt", "rf/ckpt_2rf.pt", "rf/ckpt_2rf_distilled.pt"]),
        ("ldm", [*common, "--stage", "ae", "--f", "2", "--latent-channels", "2", "--ae-width", "8",
                 "--ae-res-blocks", "1", "--steps", "4", "--out", str(out / "ldm_ae")], ["ldm_ae/ckpt.pt"]),
        ("ldm", [*common[2:], "--stage", "ldm", "--ae", str(one / "ldm_ae" / "ckpt.pt"), "--width", "16",
                 "--res-blocks", "1", "--heads", "2", "--context-dim", "16", "--T", "20", "--sampling-steps",
                 "2", "--steps", "4", "--out", str(out / "ldm")], ["ldm/ckpt.pt"]),
        ("consistency", [*common, *UNET, "--stage", "teacher", "--steps", "4", "--out", str(out / "cm_t")],
         ["cm_t/ckpt.pt"]),
        ("consistency", [*common, "--stage", "cd", "--teacher", str(one / "cm_t" / "ckpt.pt"), "--steps", "4",
                         "--out", str(out / "cm_cd")], ["cm_cd/ckpt.pt"]),
    ]


def resume_jobs(data, out):
    """ddpm.py stopped after 2 steps, then resumed to 4: the 4-step run of jobs()."""
    argv = jobs(data, out, out)[0][1]
    return [("ddpm", [*argv[:-4], "--steps", "2", "--out", str(out / "ddpm_resumed")]),
            ("ddpm", [*argv[:-4], "--steps", "4", "--out", str(out / "ddpm_resumed"), "--resume"])]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    g = torch.Generator().manual_seed(0)
    x = torch.full((32, 1, 8, 8), 40, dtype=torch.uint8)
    x[:16, :, 2:6, :4], x[16:, :, 2:6, 4:] = 220, 220
    x = (x.float() + 20 * torch.randn(x.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    data = tmp / "squares.pt"
    torch.save({"x": x, "y": (torch.arange(32) >= 16).long(), "classes": ["left", "right"]}, data)
    one, two = tmp / "one", tmp / "two"
    for module, argv, _ in jobs(data, one, one):  # one process, in this one
        MODULES[module].main(argv)
    job_list = [[m, a] for m, a, _ in jobs(data, two, one)] + [[m, a] for m, a in resume_jobs(data, two)]
    job_list.append(["ddpm", [*jobs(data, two, one)[0][1][:-1], str(two / "odd"), "--batch-size", "7"]])
    (tmp / "jobs.json").write_text(json.dumps(job_list))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "tests" / "ddp_worker.py"), str(tmp / "jobs.json"), str(tmp / "errors.json")],
                       cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return data, one, two, {int(k): v for k, v in json.loads((tmp / "errors.json").read_text()).items()}, len(job_list)


def same_weights(a, b, parts=("model", "ema")):
    for part in parts:
        if a.get(part) is None:
            continue
        for k, v in a[part].items():
            assert torch.allclose(v.float(), b[part][k].float(), atol=1e-5, rtol=1e-4), f"{part}.{k}"


@pytest.mark.parametrize("index", range(7))
def test_two_processes_reach_the_weights_of_one_on_the_joined_batch(runs, index):
    data, one, two, errors, _ = runs
    module, argv, ckpts = jobs(data, two, one)[index]
    assert index not in errors, errors[index]
    for name in ckpts:
        a, b = load(one / name), load(two / name)
        assert a["step"] == b["step"] and a["step"] > 0
        same_weights(a, b, ("model", "ema", "target"))
        if module == "ldm" and "scale" in a:
            assert a["scale"] == pytest.approx(b["scale"], rel=1e-4)


def test_reflow_pairs_drawn_by_two_processes_are_the_pairs_of_one(runs):
    _, one, two, _, _ = runs
    a, b = load(one / "rf" / "pairs_1rf.pt"), load(two / "rf" / "pairs_1rf.pt")
    assert len(a["z0"]) == len(b["z0"]) == 600  # two chunks of 500 and 100: one per rank
    assert torch.equal(a["z0"], b["z0"]) and torch.equal(a["y"], b["y"])
    assert torch.allclose(a["z1"], b["z1"], atol=1e-5)


def test_a_two_process_run_resumed_continues_the_same_run(runs):
    _, one, two, errors, _ = runs
    assert not {7, 8} & set(errors), errors
    same_weights(load(one / "ddpm" / "ckpt.pt"), load(two / "ddpm_resumed" / "ckpt.pt"))


def test_a_batch_that_does_not_divide_is_a_clear_error(runs):
    *_, errors, count = runs
    assert "--batch-size 7 (the global batch) must divide evenly over 2 processes" in errors[count - 1]
