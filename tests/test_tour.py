"""bench/tour.py: the table and plot writer, which stages and rows a run redoes, the budget's
step counts, and one method run end to end on tiny made-up data (the full tour is a benchmark)."""
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from bench import tour  # noqa: E402


def made_up_results():
    rows = [
        {"method": "ddpm", "model": "DDPM", "sampler": "DDIM 50", "nfe": 50, "n": 1000, "sample_ms": 120.0,
         "train_minutes": 8.0, "params": 1805121, "fd": 4.0, "kid": 0.0031, "precision": 0.7, "recall": 0.6,
         "class_entropy": 0.99, "nearest_ratio": 0.95},
        {"method": "ddpm", "model": "DDPM", "sampler": "DDIM 10", "nfe": 10, "n": 1000, "sample_ms": 25.0,
         "train_minutes": 8.0, "params": 1805121, "fd": 9.0, "kid": 0.01, "precision": 0.6, "recall": 0.5,
         "class_entropy": 0.98, "nearest_ratio": 0.97},
        {"method": "consistency", "model": "CD", "sampler": "1 step", "nfe": 1, "n": 1000, "sample_ms": 4.5,
         "train_minutes": 30.0, "params": 1805121, "fd": 14.0, "kid": 0.02, "precision": 0.5, "recall": 0.4,
         "class_entropy": 0.97, "nearest_ratio": 1.02},
        {"method": "dit", "model": "DiT-T/4", "sampler": "DDIM 50, guidance 1.5", "error": "dit.py exited with 1"},
    ]
    real = {"method": "real", "model": "held-out test images", "sampler": "-", "n": 1000, "fd": 0.3, "kid": 0.0,
            "precision": 0.9, "recall": 0.9, "class_entropy": 0.999, "nearest_ratio": 1.0}
    return {"rows": rows, "stages": {}, "real": real, "title": "made up"}


def test_table_has_a_row_per_result_and_reports_failures():
    lines = tour.table(made_up_results()).splitlines()
    assert len(lines) == 2 + 4 + 1                      # header, rule, rows, real images
    assert all(line.count("|") == len(tour.COLUMNS) + 1 for line in lines)
    row = "| ddpm | DDPM | DDIM 50 | 50 | 120.0 | 8.0 | 1.81M | 4.00 | 3.10 | 0.70 | 0.60 | 0.990 | 0.95 | - |"
    assert row in lines
    assert "failed: dit.py exited with 1" in lines[5]
    assert lines[-1].startswith("| real | held-out test images | - | - |")


def test_plot_draws_one_line_per_model_sorted_by_evaluations(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "tour.png"
    drawn = tour.plot(made_up_results(), path)
    assert drawn == {"ddpm: DDPM": ([10, 50], [9.0, 4.0]), "consistency: CD": ([1], [14.0])}   # no failed row
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arguments_are_checked(capsys):
    for argv, words in ((["--only", "ddpm,gan"], "unknown method gan"),
                        (["--budget-minutes", "0"], "must be > 0"),
                        (["--budget-minutes", "2", "--steps", "3"], "give one"),
                        (["--n", "5"], "at least 10")):
        with pytest.raises(SystemExit):
            tour.parse_args(argv)
        assert words in capsys.readouterr().err
    assert tour.parse_args(["--only", "vae,ldm"]).only == ["vae", "ldm"]
    assert tour.parse_args([]).only == list(tour.METHODS)


@pytest.mark.parametrize("method", tour.METHODS)
def test_every_command_is_one_the_method_file_accepts(method, tmp_path):
    """Each training and sampling command parses in its method file's own argparse, with the
    sampler the row's label names (the whole tour is a benchmark: this is what a test can check)."""
    stages, settings = tour.recipes()[method]
    module = importlib.import_module(stages[0].script[:-3])
    args = tour.parse_args(["--steps", "5"])
    for stage in stages:
        cmd = tour.training_command(stage, args, tmp_path, 5, 0.5)
        parsed = module.parse_args(cmd[1:])
        assert parsed.steps == 5 and parsed.out == str(tmp_path / stage.ckpt).rsplit("/", 1)[0]
        if stage.pairs:
            assert parsed.pairs == stage.pairs // 2
    for setting in settings:
        parsed = module.parse_args(tour.sampling_command(setting, "c.pt", args, 1000, "x.pt")[1:])
        assert parsed.sample and parsed.seed == tour.SEED
        label = setting.sampler.lower()
        if "guidance" in label:
            assert parsed.cfg_scale == float(label.split("guidance ")[1])
        for name in ("ddim", "ddpm", "euler", "rk45"):
            if name in label.split(",")[0].split():
                # a file without --sampler or --solver samples with DDIM alone
                assert name in (getattr(parsed, "sampler", "ddim"), getattr(parsed, "solver", None))
        steps = [int(w) for w in label.split(",")[0].split() if w.isdigit()]
        if steps and method != "ddpm" and "heun" not in label:
            assert parsed.sampling_steps == steps[0]


def test_parameters_count_the_sampling_network(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"model": {"encoder.w": torch.zeros(5), "decoder.w": torch.zeros(3)}}, path)
    assert tour.parameters(path) == 3                   # a VAE samples with its decoder alone
    torch.save({"model": {"w": torch.zeros(9)}, "ema": {"w": torch.zeros(7)},
                "ae": {"decoder": {"v": torch.zeros(2)}}}, path)
    assert tour.parameters(path) == 7 + 2               # LDM: the EMA U-Net and the decoder


@pytest.fixture
def fake_runs(monkeypatch, tmp_path):
    """tour_method with training and sampling replaced by records of what was asked."""
    calls = {"train": [], "sample": []}
    failing = set()

    def train(stage, args, out, done):
        calls["train"].append(stage.key)
        if stage.key in failing:
            raise tour.StageFailed(f"{stage.key} diverged")
        ckpt = tmp_path / f"{stage.key}.pt"
        ckpt.write_bytes(b"")
        return {"steps": 1, "factor": 1.0, "minutes": 1.0, "ckpt": str(ckpt),
                "chain_minutes": 1.0 + (done[stage.after]["chain_minutes"] if stage.after else 0.0)}

    def sample(setting, ckpt, args, out):
        calls["sample"].append((setting.model, setting.sampler))
        return torch.zeros(10, 1, 28, 28), 0.1, setting.nfe or 7

    monkeypatch.setattr(tour, "train", train)
    monkeypatch.setattr(tour, "sample", sample)
    monkeypatch.setattr(tour, "parameters", lambda ckpt: 123)
    score = lambda x, *a: {"fd": 1.0, "kid": 0.0, "precision": 1.0, "recall": 1.0, "class_entropy": 1.0,  # noqa: E731
                           "nn_train_median": 1.0, "nn_train_median_real": 1.0}
    return calls, failing, score


def test_resume_redoes_only_missing_rows_and_the_stages_they_need(fake_runs, tmp_path):
    calls, failing, score = fake_runs
    args = tour.parse_args(["--only", "consistency"])
    results = {"rows": [], "stages": {}, "real": None}
    tour.tour_method("consistency", args, tmp_path, results, score)
    assert calls["train"] == ["cm_teacher", "cm_cd", "cm_ct"]
    assert len(results["rows"]) == 7 and all("error" not in r for r in results["rows"])
    assert [r["train_minutes"] for r in results["rows"]][:4] == [1.0, 2.0, 2.0, 2.0]   # CD counts its teacher

    # CT's rows lost, its checkpoint kept: --resume samples only its rows and trains nothing
    results["rows"] = [r for r in results["rows"] if r["model"] != "CT (iCT)"]
    calls["train"].clear(), calls["sample"].clear()
    tour.tour_method("consistency", tour.parse_args(["--resume"]), tmp_path, results, score)
    assert calls["train"] == []
    assert calls["sample"] == [("CT (iCT)", "1 step"), ("CT (iCT)", "2 steps"), ("CT (iCT)", "4 steps")]
    assert [r["model"] for r in results["rows"]] == ["EDM teacher"] + ["CD"] * 3 + ["CT (iCT)"] * 3

    # CD's checkpoint gone: its rows are redone, and CD retrained from the recorded teacher
    Path(results["stages"]["cm_cd"]["ckpt"]).unlink()
    results["rows"] = [r for r in results["rows"] if r["model"] != "CD"]
    calls["train"].clear()
    tour.tour_method("consistency", tour.parse_args(["--resume"]), tmp_path, results, score)
    assert calls["train"] == ["cm_cd"]

    # without --resume everything is redone
    calls["train"].clear()
    tour.tour_method("consistency", tour.parse_args([]), tmp_path, results, score)
    assert calls["train"] == ["cm_teacher", "cm_cd", "cm_ct"]


def test_a_failed_stage_fails_its_rows_and_the_stages_after_it_only(fake_runs, tmp_path):
    calls, failing, score = fake_runs
    failing.add("1rf")
    results = {"rows": [{"method": "ddpm", "model": "DDPM", "sampler": "DDIM 10", "fd": 2.0}],
               "stages": {}, "real": None}
    tour.tour_method("rectified_flow", tour.parse_args([]), tmp_path, results, score)
    assert calls["train"] == ["1rf"]                    # 2-RF and distillation need the 1-RF
    rf_rows = [r for r in results["rows"] if r["method"] == "rectified_flow"]
    assert len(rf_rows) == 10 and all("1rf diverged" in r["error"] or "needs" in r["error"] for r in rf_rows)
    assert "needs 2rf, which failed" in rf_rows[-1]["error"]
    assert results["rows"][0] == {"method": "ddpm", "model": "DDPM", "sampler": "DDIM 10", "fd": 2.0}  # kept

    calls["train"].clear(), failing.clear()             # --resume retries the failed rows
    tour.tour_method("rectified_flow", tour.parse_args(["--resume"]), tmp_path, results, score)
    assert calls["train"] == ["1rf", "2rf", "distilled"]
    assert not any("error" in r for r in results["rows"])


def test_budget_sets_steps_from_the_probe_and_later_stages_keep_their_share(monkeypatch, tmp_path):
    commands = []

    def run(cmd, log_path):
        commands.append(cmd)
        return ("step 30/30  loss 0.1  640 img/s  0.0 min left\n" if "--log-every" in cmd else "done"), 90.0

    monkeypatch.setattr(tour, "run", run)
    stages = {s.key: s for s in tour.recipes()["rectified_flow"][0]}
    args = tour.parse_args(["--budget-minutes", "2"])
    done = {}
    done["1rf"] = tour.train(stages["1rf"], args, tmp_path, done)
    assert done["1rf"]["steps"] == 2 * 60 * 640 // 64 == 1200 and done["1rf"]["factor"] == 1.5
    assert commands[-1][commands[-1].index("--steps") + 1] == "1200"
    done["2rf"] = tour.train(stages["2rf"], args, tmp_path, done)
    flags = commands[-1]
    assert flags[flags.index("--steps") + 1] == "600" and flags[flags.index("--pairs") + 1] == "7500"
    assert flags[flags.index("--ckpt") + 1] == str(tmp_path / "rf" / "ckpt_1rf.pt")
    assert done["2rf"]["chain_minutes"] == 3.0          # the 1-RF's 1.5 minutes and its own


def test_one_method_on_tiny_data_end_to_end(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "tiny.pt"
    torch.save((torch.rand(160, 1, 28, 28, generator=g) * 255).to(torch.uint8), data)
    scored = []

    def score(x, *a):
        scored.append(x)
        return {"fd": 5.0, "kid": 0.01, "precision": 0.5, "recall": 0.4, "class_entropy": 0.8,
                "nn_train_median": 3.0, "nn_train_median_real": 6.0}

    results = tmp_path / "tour.json"
    tour.main(["--only", "vae", "--steps", "2", "--n", "12", "--dataset", str(data), "--no-real",
               "--out", str(tmp_path / "runs"), "--results", str(results), "--plot", str(tmp_path / "t.png")],
              score=score)
    row, = json.loads(results.read_text())["rows"]
    assert row["nfe"] == 1 and row["n"] == 12 and row["nearest_ratio"] == 0.5 and row["params"] > 0
    assert row["train_minutes"] > 0 and row["sample_ms"] >= 0
    assert scored[0].shape == (12, 1, 28, 28) and scored[0].abs().max() <= 1
    assert (tmp_path / "runs" / "vae" / "ckpt.pt").is_file()
    assert "| vae | VAE | prior sample | 1 |" in results.with_suffix(".md").read_text()


def test_results_of_another_length_are_never_mixed_in(tmp_path):
    path = tmp_path / "tour.json"
    short = {"length": "--budget-minutes 4", "n": 1000, "dataset": "fashion-mnist"}
    path.write_text(json.dumps({**made_up_results(), "setting": short}))
    assert len(tour.load_results(path, short, resume=False)["rows"]) == 4      # --only keeps the others
    assert len(tour.load_results(path, short, resume=True)["rows"]) == 4
    longer = {**short, "length": "each recipe's own length"}
    assert tour.load_results(path, longer, resume=False)["rows"] == []          # a new table
    with pytest.raises(tour.UserError, match="--budget-minutes 4"):
        tour.load_results(path, longer, resume=True)


def test_garments_cut_each_frame_at_its_garment_and_resize_it_to_28():
    """A symmetric garment moving on the canvas: every frame's window is the garment itself."""
    disk = ((torch.arange(20) - 9.5).square()[:, None] + (torch.arange(20) - 9.5).square() < 64).float() * 2 - 1
    clips = torch.stack([common.MovingClips([(disk[None], 0)], frames=6, canvas=32, seed=s)[0][0] for s in range(3)])
    crops = tour.garments(clips, 20)
    assert crops.shape == (18, 1, 28, 28)
    expected = torch.nn.functional.interpolate(disk[None, None], size=28, mode="bilinear", antialias=True)
    torch.testing.assert_close(crops, expected.expand(18, -1, -1, -1).clamp(-1, 1))


def test_clip_rows_score_frames_spread_over_clips_and_measure_the_motion(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    images = [(torch.rand(1, 20, 20, generator=g) * 2 - 1, 0) for _ in range(40)]
    data = tmp_path / "clips.pt"             # a clip file: the stage trained on (and reads back) its clips
    torch.save(torch.stack([c for c, _ in common.MovingClips(images, frames=8, canvas=32)]), data)
    ckpt = tmp_path / "latte.pt"
    torch.save({"args": {"frames": 8, "canvas": 32, "image_size": 20}}, ckpt)
    scored = []

    def score(x, *a, **reference):
        scored.append((x, reference))
        return {"fd": 5.0, "nn_train_median": 1.0, "nn_train_median_real": 1.0}
    monkeypatch.setattr(tour, "frame_classes", lambda images, args: torch.zeros(len(images), dtype=torch.long))
    monkeypatch.setattr(tour.quality, "reference", lambda *a: (None, 0.9, torch.zeros(40, 1, 28, 28), None))
    args = tour.parse_args(["--n", "24", "--dataset", str(data)])
    clips, held_out = tour.real_clips(ckpt, args, 10)
    assert clips.shape == (10, 8, 1, 32, 32) and len(held_out) == 30
    row = tour.clip_measures((clips, held_out), ckpt, args, score, real=True)
    (x, reference), = scored
    assert x.shape == (24, 1, 28, 28) and reference["test_images"] is held_out   # 3 frames from each of 8 clips
    assert row["n"] == 24 and row["clips"] == 10 and row["own"]["one class"] == 1.0
    assert row["own"]["px off a bouncing path"] < 0.1 and row["own"]["px a frame"] > 1
    still = clips[:, :1].expand(-1, 8, -1, -1, -1)
    assert tour.clip_measures(still, ckpt, args, score, real=False)["own"]["px a frame"] == 0


def test_clip_rows_of_a_run_at_its_datas_own_size_take_that_size(tmp_path, monkeypatch):
    """No --image-size: the checkpoint holds None and the window and the travel come from the data."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 1, 20, 20, generator=g) * 2 - 1
    data = tmp_path / "images.pt"
    torch.save(images, data)
    clips = torch.stack([c for c, _ in common.MovingClips([(x, 0) for x in images], frames=8, canvas=32)])
    ckpt = tmp_path / "latte.pt"
    torch.save({"args": {"frames": 8, "canvas": 32, "image_size": None}}, ckpt)
    sizes = []
    garments = tour.garments
    monkeypatch.setattr(tour, "garments", lambda clips, size: sizes.append(size) or garments(clips, size))
    monkeypatch.setattr(tour, "frame_classes", lambda images, args: torch.zeros(len(images), dtype=torch.long))
    score = lambda *a, **r: {"fd": 5.0, "nn_train_median": 1.0, "nn_train_median_real": 1.0}  # noqa: E731
    row = tour.clip_measures(clips, ckpt, tour.parse_args(["--n", "24", "--dataset", str(data)]), score, real=False)
    assert sizes == [20]
    assert row["own"]["px off a bouncing path"] < 0.1 and row["own"]["px a frame"] > 1


def test_controlnet_rows_measure_the_samples_against_the_test_conditions(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "tiny.pt"
    images = torch.zeros(30, 1, 28, 28, dtype=torch.uint8)
    for image, (r, c, h, w) in zip(images, torch.randint(2, 12, (30, 4), generator=g).tolist()):
        image[:, r:r + h, c:c + w] = 255                            # a rectangle each
    torch.save(images, data)
    ckpt = tmp_path / "cn.pt"
    torch.save({"args": {"condition": "edges"}}, ckpt)
    args = tour.parse_args(["--dataset", str(data)])
    test = images[:12].float() / 127.5 - 1
    assert tour.condition_fidelity(test, ckpt, args) == {"edge F1": 1.0}
    assert tour.condition_fidelity(test.flip(0), ckpt, args)["edge F1"] < 0.9
