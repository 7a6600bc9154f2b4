"""The harness block (from the line beginning "# ==== harness" to the one beginning
"# ==== end of harness") is the same text in every method file, and what it promises holds."""
import argparse
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ddpm  # noqa: E402

# the method files in the three-part shape (the paper, the harness, the command line)
METHODS = ["ddpm", "vae", "rectified_flow", "dit", "mmdit", "ldm", "consistency", "latte", "controlnet"]


def harness(name):
    lines = (ROOT / f"{name}.py").read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("# ==== harness")]
    ends = [i for i, line in enumerate(lines) if line.startswith("# ==== end of harness")]
    assert len(starts) == 1 and len(ends) == 1 and starts[0] < ends[0], \
        f"{name}.py needs one '# ==== harness' line and, after it, one '# ==== end of harness' line"
    return lines[starts[0]:ends[0] + 1], starts[0]


@pytest.mark.parametrize("name", METHODS[1:])
def test_every_copy_of_the_harness_is_the_same(name):
    reference, _ = harness(METHODS[0])
    copy, start = harness(name)
    for i, (a, b) in enumerate(zip(reference, copy)):
        assert a == b, (f"{name}.py line {start + i + 1} differs from {METHODS[0]}.py's harness:\n"
                        f"  {METHODS[0]}.py: {a}\n  {name}.py: {b}")
    assert len(reference) == len(copy), f"{name}.py's harness has {len(copy)} lines, {METHODS[0]}.py's {len(reference)}"


def test_the_comparison_names_the_first_differing_line(tmp_path, monkeypatch):
    text = (ROOT / "ddpm.py").read_text()
    (tmp_path / "a.py").write_text(text)
    (tmp_path / "b.py").write_text(text.replace("run.step % 10 == 0", "run.step % 11 == 0"))
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "METHODS", ["a", "b"])
    with pytest.raises(AssertionError, match=r"b\.py line \d+ differs"):
        test_every_copy_of_the_harness_is_the_same("b")


def test_every_method_file_is_the_paper_then_the_harness_then_the_command_line():
    for name in METHODS:
        lines = (ROOT / f"{name}.py").read_text().splitlines()
        paper = next(i for i, line in enumerate(lines) if line.startswith("# ==== the paper"))
        block, start = harness(name)
        cli = next(i for i, line in enumerate(lines) if line.startswith("# ==== the command line"))
        assert paper < start < start + len(block) <= cli, name


def test_draws_of_n_processes_are_the_draws_of_one():
    """Each process's slice of the global batch's draws, joined in rank order, is one process's."""
    def draws(rank, world):
        torch.manual_seed(0)
        d = ddpm.Draws(12, "cpu", rank, world)
        return d.randint(1, 1000), d.randn(3), d.rand()
    one = draws(0, 1)
    three = [draws(r, 3) for r in range(3)]
    for k in range(3):
        assert torch.equal(torch.cat([part[k] for part in three]), one[k])


def test_learning_rate_warms_up_then_decays_to_zero():
    args = argparse.Namespace(lr=1.0, warmup=10, lr_decay="cosine")
    lrs = [ddpm.learning_rate(args, s, 200) for s in range(200)]
    assert lrs[0] == pytest.approx(0.1 * (0.5 * (1 + 1)))
    assert max(lrs) == pytest.approx(lrs[9]) and lrs[-1] < 1e-3
    short = [ddpm.learning_rate(args, s, 50) for s in range(3)]  # warm-up capped at a tenth: 5 steps
    assert short[0] == pytest.approx(0.2 * 0.5 * (1 + 1))
    none = argparse.Namespace(lr=1.0, warmup=0, lr_decay="none")
    assert ddpm.learning_rate(none, 0, 100) == 1.0


def test_resume_refuses_a_flag_that_differs_from_the_checkpoints():
    p = ddpm.parser()
    saved = vars(ddpm.parse_args(["--width", "32", "--steps", "10"]))
    ckpt = {"args": saved}
    with pytest.raises(ddpm.UserError, match="--width 32, not 64"):
        ddpm.resumed_args(p, ddpm.parse_args(["--resume", "--width", "64"]), ckpt)
    args = ddpm.resumed_args(p, ddpm.parse_args(["--resume", "--width", "32", "--steps", "20",
                                                 "--device", "cpu"]), ckpt)
    assert args.width == 32 and args.steps == 20 and args.device == "cpu" and args.resume
    kept = ddpm.resumed_args(p, ddpm.parse_args(["--resume"]), ckpt)
    assert kept.steps == 10


def test_shared_flags_are_checked(capsys):
    for argv, words in [(["--grad-clip", "-1"], "--grad-clip must be 0 (off) or positive"),
                        (["--ema", "1"], "--ema must be in [0, 1)"), (["--lr", "0"], "--lr must be positive"),
                        (["--warmup", "-5"], "--warmup must be 0 or more"),
                        (["--mults", "0,1"], "must be a positive integer"), (["--mults", ","], "comma-separated")]:
        with pytest.raises(SystemExit):
            ddpm.parse_args(argv)
        assert words in capsys.readouterr().err, argv


def checked_run(first, world=1):
    """A run at step 5 of 10 as the harness's check() sees it: no progress line or save due."""
    args = argparse.Namespace(log_every=1e9, save_every=1e9, batch_size=1)
    return ddpm.Run(args=args, device=torch.device("cpu"), rank=1, world=world, stop=[], path="p", step=5,
                    saved=5, total=10, per_epoch=10, last_log=time.time() - 1, last_save=time.time(),
                    bad_data=torch.zeros(()), first=torch.tensor(first))


def diverged(loss, first):
    try:
        ddpm.check(checked_run(first), [torch.tensor(loss)])
    except ddpm.UserError as e:
        assert "diverged" in str(e) and "lower --lr" in str(e) and "p holds step 5" in str(e)
        return True
    return False


def test_the_divergence_rule():
    """Non-finite, or over 1000 x the first step's loss, itself at least 1: a -ELBO of hundreds
    of nats may double, a loss of 0.01 may reach 10, a Gaussian decoder's loss may go negative."""
    assert diverged(float("nan"), 1.0) and diverged(float("inf"), 1.0)
    assert diverged(1001.0, 0.5) and not diverged(999.0, 0.5)
    assert diverged(5.6e5, 550.0) and not diverged(5.4e5, 550.0) and not diverged(250.0, 550.0)
    assert not diverged(-3000.0, -2500.0) and diverged(1001.0, -2500.0)


def test_bad_data_stops_without_saving():
    run = checked_run(1.0)
    run.bad_data = torch.ones(())
    with pytest.raises(ddpm.UserError, match="the data hold NaN or inf"):
        ddpm.check(run, [torch.tensor(1.0)])


def test_a_process_stopped_by_another_processs_signal_saves_and_exits_as_after_sigterm(monkeypatch):
    def all_reduce(x):  # the other process: the same loss, and its stop flag
        x += x.new_tensor([x[0], x[1], x[2], 1.0])
    monkeypatch.setattr(ddpm.dist, "all_reduce", all_reduce)
    run = checked_run(1.0, world=2)
    assert ddpm.check(run, [torch.tensor(1.0)]) and run.stop == [signal.SIGTERM]
    run = checked_run(1.0, world=1)
    assert not ddpm.check(run, [torch.tensor(1.0)]) and run.stop == []
