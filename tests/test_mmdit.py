"""Tests for mmdit.py: patches, byte prompts, the two-stream block's joint attention, rectified flow's
objective and Euler sampler by value, a small learning check, many processes, and the command line."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import mmdit  # noqa: E402


def perturbed(net, std=0.05, seed=0):
    """The network with every parameter nudged, so that zero-initialised layers pass signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return net


def tiny(text_len=8):
    return mmdit.MMDiT(1, 8, 2, depth=2, width=32, heads=2, text_len=text_len)


# ----------------------------------------------------------------------------------------------
# Patches, prompts and the network
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [1, 2, 4, 7])
def test_patchify_and_unpatchify_are_inverses(p):
    x = torch.randn(2, 3, 28, 28)
    tokens = mmdit.patchify(x, p)
    assert tokens.shape == (2, (28 // p) ** 2, p * p * 3)
    assert torch.equal(mmdit.unpatchify(tokens, p, 3), x)
    k = 28 // p + 1 if 28 // p > 1 else 0  # token k: the patch at row k // (28 / p), column k % (28 / p)
    r, c = divmod(k, 28 // p)
    assert torch.equal(tokens[0, k], x[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).flatten())


def test_tokenize():
    ids = mmdit.tokenize(["Bag", ""], 5)
    assert ids.tolist() == [[ord("b") + 1, ord("a") + 1, ord("g") + 1, 0, 0], [0] * 5]
    with pytest.raises(mmdit.UserError, match="at most 5"):
        mmdit.tokenize(["Ankle boot"], 5)


def test_a_fresh_mmdit_outputs_exactly_zero_and_its_blocks_start_as_the_identity():
    torch.manual_seed(0)
    net = tiny()
    out = net(torch.randn(4, 1, 8, 8), torch.rand(4), mmdit.tokenize(["ab"] * 4, 8))
    assert out.shape == (4, 1, 8, 8) and torch.count_nonzero(out) == 0
    x, ctx, c = torch.randn(2, 16, 32), torch.randn(2, 8, 32), torch.randn(2, 32)
    x_out, ctx_out = net.blocks[0](x, ctx, c)
    assert torch.equal(x_out, x) and torch.equal(ctx_out, ctx)


def test_mmdit_joint_attention_lets_text_and_image_change_each_other():
    torch.manual_seed(0)
    net = perturbed(tiny()).eval()
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([0.5])
    # "ab" and "ba" have the same pooled vector: only attention tells them apart
    ab, ba = mmdit.tokenize(["ab"], 8), mmdit.tokenize(["ba"], 8)
    assert not torch.allclose(net(x, t, ab), net(x, t, ba), atol=1e-4)
    block, c = net.blocks[0], torch.randn(1, 32)
    ctx = torch.randn(1, 8, 32)
    _, ctx1 = block(torch.randn(1, 16, 32), ctx, c)
    _, ctx2 = block(torch.randn(1, 16, 32), ctx, c)
    assert not torch.allclose(ctx1, ctx2, atol=1e-4)
    # the last block's text stream only feeds attention
    assert not hasattr(net.blocks[-1].text, "mlp") and hasattr(net.blocks[0].text, "mlp")


def test_qk_norm_gives_q_and_k_unit_rms_per_head():
    torch.manual_seed(0)
    stream = perturbed(mmdit.Stream(32, 2, 4.0, qk_norm=True))
    with torch.no_grad():
        stream.q_norm.weight.fill_(1)
        stream.k_norm.weight.fill_(1)
    q, k, v, _ = stream.pre_attention(10 * torch.randn(2, 5, 32), torch.randn(2, 32))
    for a in (q, k):
        assert torch.allclose(a.square().mean(-1), torch.ones(2, 2, 5), atol=1e-3)
    assert not torch.allclose(v.square().mean(-1), torch.ones(2, 2, 5), atol=0.1)


# ----------------------------------------------------------------------------------------------
# Rectified flow: the objective and the sampler by value
# ----------------------------------------------------------------------------------------------

def point_mass_velocity(x1):
    """The exact velocity of rectified flow when the data is the single point x1:
    E[x_1 - x_0 | x_t] = (x1 - x_t) / (1 - t), since x_t = t x1 + (1 - t) x_0."""
    def v(x_t, t, tokens=None):
        return (x1 - x_t) / (1 - t.view(-1, 1, 1, 1))
    return v


def test_rf_loss_is_zero_for_a_point_mass_exact_velocity():
    torch.manual_seed(0)
    x1, x0 = torch.randn(1, 1, 4, 4).expand(3, -1, -1, -1), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0.1, 0.5, 0.9])
    assert mmdit.rf_loss(point_mass_velocity(x1), x1, None, x0, t).abs().max() < 1e-10
    assert (mmdit.rf_loss(point_mass_velocity(x1 + 0.1), x1, None, x0, t) > 1e-3).all()


def test_euler_with_the_exact_velocity_moves_from_noise_to_the_data_point_in_a_straight_line():
    """t = 0 is noise, t = 1 the data: after step k of n, x = (k / n) x1 + (1 - k / n) x_noise."""
    torch.manual_seed(0)
    x1, noise, n, path = torch.randn(1, 1, 4, 4), torch.randn(3, 1, 4, 4), 8, []
    v = point_mass_velocity(x1)
    x = mmdit.sample_euler(lambda x, t: v(x, t), noise.clone(), n, on_step=lambda x, k, _: path.append(x))
    assert torch.allclose(x, x1.expand_as(x), atol=1e-5)
    for k, x_k in enumerate(path, 1):
        assert torch.allclose(x_k, k / n * x1 + (1 - k / n) * noise, atol=1e-5), k


def test_training_is_at_logit_normal_t_on_the_straight_path_from_noise_to_data():
    """SD3 Sec. 3.1: t = sigmoid(n), n ~ N(0, 1); the network sees x_t = t x_1 + (1 - t) x_0 with
    the data x_1 (here the constant 5) and the noise x_0 ~ N(0, I); the prompt is dropped at p_uncond."""
    torch.manual_seed(0)
    seen = []

    def net(x_t, t, tokens):
        seen.append((x_t, t, tokens))
        return torch.zeros_like(x_t)

    n = 20000
    mmdit.training_step(net, torch.full((n, 1, 1, 1), 5.0), mmdit.tokenize(["a"] * n, 16), 0.1,
                        mmdit.Draws(n, "cpu"))
    x_t, t, tokens = seen[0][0].flatten().double(), seen[0][1].double(), seen[0][2]
    logit = torch.logit(t)
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
    x0 = (x_t - 5 * t) / (1 - t)  # the noise, if x_t is where it should be
    assert abs(x0.mean()) < 0.03 and abs(x0.std() - 1) < 0.03
    dropped = (tokens == 0).all(1).double().mean()
    assert abs(dropped - 0.1) < 0.01 and ((tokens[:, 0] == 0) | (tokens[:, 0] == ord("a") + 1)).all()


def test_guidance_at_1_is_conditional_at_0_unconditional_and_linear_between():
    torch.manual_seed(0)
    net = perturbed(tiny()).eval()
    x, t, tokens = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 0.5, 0.9]), mmdit.tokenize(["ab", "c", "d"], 8)
    cond, uncond = net(x, t, tokens), net(x, t, torch.zeros_like(tokens))
    assert torch.allclose(mmdit.guided(net, tokens, 1.0)(x, t), cond, atol=1e-5)
    assert torch.allclose(mmdit.guided(net, tokens, 0.0)(x, t), uncond, atol=1e-5)
    assert torch.allclose(mmdit.guided(net, tokens, 4.0)(x, t), uncond + 4 * (cond - uncond), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Learning: a tiny MM-DiT draws what its prompt names
# ----------------------------------------------------------------------------------------------

def two_kinds(n, g):
    """8x8 images: class 0 bright on the left half, class 1 bright on the right half."""
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.full((n, 1, 8, 8), -0.8) + 0.1 * torch.randn(n, 1, 8, 8, generator=g)
    left = torch.arange(8) < 4
    x += 1.6 * torch.where(y[:, None, None, None] == 0, left.float(), (~left).float())
    return x.clamp(-1, 1), y


def test_a_tiny_mmdit_learns_two_prompts():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = mmdit.MMDiT(1, 8, 2, depth=2, width=64, heads=2, text_len=8)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0)
    names = mmdit.tokenize(["left", "right"], 8)
    for _ in range(300):
        x, y = two_kinds(64, g)
        loss = mmdit.training_step(net, x, names[y], 0.1, mmdit.Draws(64, "cpu"))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    tokens = names[torch.tensor([0] * 32 + [1] * 32)]
    x = mmdit.sample_euler(mmdit.guided(net, tokens, 2.0), torch.randn(64, 1, 8, 8), 20)
    left, right = x[..., :4].mean((1, 2, 3)), x[..., 4:].mean((1, 2, 3))
    assert (left[:32] > right[:32] + 0.5).float().mean() > 0.9, (left[:32], right[:32])
    assert (right[32:] > left[32:] + 0.5).float().mean() > 0.9, (left[32:], right[32:])


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """32 8x8 uint8 images of two named classes, saved as a tensor file: a data set."""
    x, y = two_kinds(32, torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("data") / "two.pt"
    torch.save({"x": ((x + 1) * 127.5).round().to(torch.uint8), "y": y, "classes": ["Left", "Right"]}, path)
    return path


def argv(data, out, *extra, steps="6"):
    return ["--dataset", str(data), "--model", "T/4", "--depth", "2", "--width", "32", "--heads", "2",
            "--batch-size", "8", "--steps", steps, "--sampling-steps", "3", "--out", str(out),
            "--device", "cpu", "--lr", "1e-3", *extra]


def exit_message(args, capsys=None):
    """What a failed command says: its exit message and, given capsys, its stderr."""
    try:
        mmdit.main(args)
    except SystemExit as e:
        return str(e.code) + (capsys.readouterr().err if capsys else "")
    return None


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """An uninterrupted 6-step run: 4 batches per epoch, so grids after steps 4 and 6."""
    out = tmp_path_factory.mktemp("trained") / "run"
    mmdit.main(argv(data, out))
    return out


def test_cli_trains_and_writes_its_outputs(trained):
    ckpt = load(trained / "ckpt.pt")
    assert ckpt["method"] == "mmdit" and ckpt["step"] == 6 and ckpt["classes"] == ["Left", "Right"]
    assert ckpt["args"]["text_len"] == 16 and ckpt["args"]["depth"] == 2
    assert sorted(p.name for p in trained.glob("samples_epoch*.png")) == ["samples_epoch001.png",
                                                                         "samples_epoch002.png"]
    assert not list(trained.glob("*.tmp"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_resume_after_a_signal_is_bit_for_bit(data, trained, tmp_path, monkeypatch, sig):
    out, real, calls = tmp_path / "run", mmdit.ema_update, []

    def ema_update_then_signal(*a):
        real(*a)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(mmdit, "ema_update", ema_update_then_signal)
    with pytest.raises(SystemExit) as e:
        mmdit.main(argv(data, out))
    assert e.value.code == 128 + sig  # saved, then the exit status of an interrupted run
    assert load(out / "ckpt.pt")["step"] == 3
    monkeypatch.setattr(mmdit, "ema_update", real)
    mmdit.main(argv(data, out, "--resume"))
    resumed, straight = load(out / "ckpt.pt"), load(trained / "ckpt.pt")
    assert resumed["step"] == 6
    for part in ("model", "ema", "optimizer"):
        assert str(resumed[part].keys()) == str(straight[part].keys())
    for part in ("model", "ema"):
        for k, v in straight[part].items():
            assert torch.equal(v, resumed[part][k]), f"{part}.{k}"


def test_sample_a_prompt_the_classes_in_turn_and_an_unseen_prompt(trained, tmp_path, capsys):
    pt, png = tmp_path / "x.pt", tmp_path / "left.png"
    mmdit.main(["--sample", "--ckpt", str(trained / "ckpt.pt"), "--n", "5", "--save", str(pt),
                "--sampling-steps", "4", "--device", "cpu", "--prompt", "right"])
    x = load(pt)
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32 and x.abs().max() <= 1
    assert "5 samples in" in capsys.readouterr().out
    mmdit.main(["--sample", "--ckpt", str(trained / "ckpt.pt"), "--n", "4", "--save", str(png),
                "--sampling-steps", "3", "--cfg-scale", "1", "--device", "cpu"])
    assert png.is_file()
    mmdit.main(["--sample", "--ckpt", str(trained / "ckpt.pt"), "--n", "2", "--save", str(pt),
                "--sampling-steps", "2", "--device", "cpu", "--prompt", "Ankle boot"])
    assert "not a training prompt" in capsys.readouterr().out and load(pt).shape == (2, 1, 8, 8)
    msg = exit_message(["--sample", "--ckpt", str(trained / "ckpt.pt"), "--save", str(png),
                        "--sampling-steps", "1000000", "--device", "cpu"], capsys)
    assert msg and "between 1 and 1000, got 1000000" in msg
    msg = exit_message(["--sample", "--ckpt", str(trained / "ckpt.pt"), "--save", str(png), "--device", "cpu",
                        "--prompt", "a prompt much longer than sixteen bytes"])
    assert msg and "reads at most 16" in msg


def test_two_processes_train_as_one_process_on_the_joined_batch(data, trained, tmp_path):
    """torchrun with 2 gloo processes, a global batch of 8 (4 each): the same weights as one process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "mmdit.py"), *argv(data, tmp_path / "ddp")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two, one = load(tmp_path / "ddp" / "ckpt.pt"), load(trained / "ckpt.pt")
    assert two["step"] == 6
    for k, v in one["model"].items():
        assert torch.allclose(v, two["model"][k], atol=1e-5, rtol=1e-4), k


@pytest.mark.parametrize("extra, words", [
    (["--patch", "3"], ["--patch 3", "8x8", "[1, 2, 4]"]),
    (["--grad-clip", "-1"], ["--grad-clip must be 0 (off) or positive, got -1"]),
    (["--lr", "0"], ["--lr must be positive"]),
    (["--prompt", "x"], ["--prompt is for --sample"]),
    (["--sampling-steps", "1000000"], ["Euler sampler must be between 1 and 1000"]),
    (["--p-uncond", "1"], ["--p-uncond must be in [0, 1)"]),
    (["--lr", "1e9"], ["stopped at step", "without saving", "diverged: try a lower --lr"]),
    (["--model", "M/2"], ["unknown model 'M/2'"]),
    (["--model", "T/0"], ["unknown model 'T/0'"]),
])
def test_bad_training_input(data, tmp_path, extra, words, capsys):
    text = exit_message(argv(data, tmp_path / "run", *extra), capsys) or ""
    assert all(w in text for w in words), text


def test_data_without_labels_or_with_nan_is_a_clear_error(tmp_path):
    x = (torch.rand(16, 1, 8, 8) * 255).to(torch.uint8)
    torch.save(x, tmp_path / "plain.pt")
    msg = exit_message(argv(tmp_path / "plain.pt", tmp_path / "run", steps="1"))
    assert msg and "no labels" in msg
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    x[9] = float("nan")
    torch.save({"x": x, "y": torch.zeros(16, dtype=torch.long), "classes": ["a"]}, tmp_path / "nan.pt")
    msg = exit_message(argv(tmp_path / "nan.pt", tmp_path / "run", steps="2"))
    assert msg and "the data hold NaN or inf" in msg and "--lr" not in msg
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_bad_checkpoints_and_paths(trained, data, tmp_path, capsys):
    torch.save({"method": "dit"}, tmp_path / "dit.pt")
    sample = ["--sample", "--device", "cpu", "--save", str(tmp_path / "x.png"), "--ckpt"]
    assert "a checkpoint of dit, not of mmdit" in exit_message(sample + [str(tmp_path / "dit.pt")])
    assert "no checkpoint" in exit_message(sample + [str(tmp_path / "none.pt")])
    torch.save({"method": "mmdit", "shape": [1, 8, 8], "model": {}}, tmp_path / "part.pt")
    for extra in (["--sample", "--save", str(tmp_path / "x.png")], ["--resume"]):
        msg = exit_message(["--ckpt", str(tmp_path / "part.pt"), "--device", "cpu", *extra])
        assert msg and "incomplete mmdit checkpoint: no args, step, rng, classes, ema, optimizer" in msg, msg
    msg = exit_message(["--resume", "--out", str(trained), "--device", "cpu", "--no-qk-norm"])
    assert msg and "--resume continues the run with its --qk-norm True" in msg
    (tmp_path / "file").write_text("")
    assert "is a file" in exit_message(argv(data, tmp_path / "file"))
    (tmp_path / "dir.png").mkdir()
    msg = exit_message(sample[:-3] + ["--save", str(tmp_path / "dir.png"), "--ckpt", str(trained / "ckpt.pt")])
    assert msg and "is a folder" in msg and "samples in" not in capsys.readouterr().out  # before sampling
    msg = exit_message(sample[:-3] + ["--save", str(tmp_path / "file" / "x.pt"), "--ckpt", str(trained / "ckpt.pt")])
    assert msg and "cannot write --save" in msg


def test_ctrl_c_during_sample_is_one_line_and_exit_130(trained, tmp_path, monkeypatch, capsys):
    real = mmdit.guided

    def guided_then_ctrl_c(*a):
        v = real(*a)
        return lambda x, t: (os.kill(os.getpid(), signal.SIGINT), v(x, t))[1]

    monkeypatch.setattr(mmdit, "guided", guided_then_ctrl_c)
    with pytest.raises(SystemExit) as e:
        mmdit.main(["--sample", "--ckpt", str(trained / "ckpt.pt"), "--save", str(tmp_path / "x.png"),
                    "--device", "cpu"])
    assert e.value.code == 130 and "interrupted: nothing saved" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
