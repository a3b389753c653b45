"""FeatSharp upsampler: shapes per factor, gradients, the de-bias buffer, determinism, files."""

import copy
import json

import pytest
import torch

from radio.teachers import Teacher, TeacherOutput, tiny_teacher
from radio.teachers.featsharp import (
    FeatSharpUpsampler,
    JBULevel,
    LocalAttention,
    featsharp_teacher_output,
    load_featsharp,
    prime_factors,
    save_featsharp,
)
from radio.teachers.featsharp.training import (
    FeatSharpTrainConfig,
    consistency_loss,
    resample_boxes,
    train_featsharp,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _inputs(b, n, f, c, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, 8 * f * n, 8 * f * n, generator=g, dtype=dtype)
    global_features = torch.randn(b, n, n, c, generator=g, dtype=dtype)
    tiles = torch.randn(b, f * n, f * n, c, generator=g, dtype=dtype)
    return images, global_features, tiles


def _randomize(module: torch.nn.Module, seed: int = 1) -> None:
    """Move every parameter off its (often zero / tiny) initial value, so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_prime_factors():
    assert prime_factors(1) == []
    assert prime_factors(2) == [2]
    assert prime_factors(4) == [2, 2]
    assert prime_factors(12) == [2, 2, 3]
    with pytest.raises(ValueError, match="positive int"):
        prime_factors(0)


@pytest.mark.parametrize("factor", [1, 2, 3, 4])
def test_shapes_per_factor(factor):
    torch.manual_seed(0)
    up = FeatSharpUpsampler(16, 3, factor)
    assert len(up.levels) == len(prime_factors(factor))
    images, g, t = _inputs(2, 3, factor, 16)
    out = up(images, g, t)
    assert out.shape == (2, 3 * factor, 3 * factor, 16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("factor", [2, 3])
def test_teacher_output_with_tiny_siglip(factor):
    teacher = tiny_teacher("siglip2")
    torch.manual_seed(0)
    up = FeatSharpUpsampler(teacher.feature_dim, teacher.native_size // teacher.patch_size, factor)
    images = torch.rand(2, 3, 100, 100)  # resized to factor * native inside
    out = featsharp_teacher_output(teacher, up, images)
    n = teacher.native_size // teacher.patch_size
    assert out.features.shape == (2, factor * n, factor * n, teacher.feature_dim)
    # The summary is the teacher's own on the global view: unchanged by the upsampler.
    native = torch.nn.functional.interpolate(images, size=(64, 64), mode="bilinear", antialias=True)
    torch.testing.assert_close(out.summary, teacher(native).summary)
    # A summary box runs its own view.
    boxed = featsharp_teacher_output(teacher, up, images, summary_box=(10, 20, 60))
    crop = images[..., 10:70, 20:80]
    want = teacher(torch.nn.functional.interpolate(crop, size=(64, 64), mode="bilinear", antialias=True)).summary
    torch.testing.assert_close(boxed.summary, want)
    torch.testing.assert_close(boxed.features, out.features)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="factor"):
        FeatSharpUpsampler(8, 2, 0)
    up = FeatSharpUpsampler(8, 2, 2)
    images, g, t = _inputs(1, 2, 2, 8)
    with pytest.raises(ValueError, match="tile features"):
        up(images, g, t[:, :2])
    with pytest.raises(ValueError, match="native"):
        up(images, g[:, :1], t)
    with pytest.raises(ValueError, match="images"):
        up(images[:, :2], g, t)
    teacher = tiny_teacher("siglip2")
    with pytest.raises(ValueError, match="does not fit"):
        featsharp_teacher_output(teacher, up, torch.rand(1, 3, 64, 64))


def test_jbu_preserves_constants_and_follows_edges():
    """Normalised kernel: constant features stay constant; with an edge in the pixels, the upsampled
    step is sharper than bilinear (weights across the edge are down-weighted)."""
    torch.manual_seed(0)
    level = JBULevel(4, 2, radius=2)
    images = torch.zeros(1, 3, 16, 16)
    images[..., 8:] = 1.0  # a vertical edge halfway
    const = torch.full((1, 4, 4, 4), 0.7)
    torch.testing.assert_close(level(const, images), torch.full((1, 4, 8, 8), 0.7))
    # Keys = the centred pixels themselves: unit vectors of opposite sign on the two sides of the edge.
    level.keys = torch.nn.Identity()
    with torch.no_grad():
        level.log_temperature.fill_(torch.tensor(10.0).log())
    step = torch.zeros(1, 4, 4, 4)
    step[..., 2:] = 1.0
    bilinear = torch.nn.functional.interpolate(step, size=(8, 8), mode="bilinear", align_corners=False)
    out = level(step, images)
    # Columns 3 and 4 straddle the edge: JBU pushes them towards their own side.
    assert (out[..., 3] < bilinear[..., 3] - 0.02).all() and (out[..., 4] > bilinear[..., 4] + 0.02).all()


def test_local_attention_is_local():
    """A change at one token moves outputs only within the window radius."""
    torch.manual_seed(0)
    attn = LocalAttention(8, heads=2, window=3)
    x = torch.randn(1, 8, 9, 9)
    y = x.clone()
    y[..., 4, 4] += 5.0
    diff = (attn(x) - attn(y)).abs().sum(1)[0]
    assert diff[3:6, 3:6].min() > 0
    mask = torch.ones(9, 9, dtype=torch.bool)
    mask[3:6, 3:6] = False
    assert diff[mask].max() == 0


def test_gradients_reach_every_parameter_and_gradcheck():
    torch.manual_seed(0)
    up = FeatSharpUpsampler(8, 2, 2)
    _randomize(up)
    images, g, t = _inputs(2, 2, 2, 8)
    up(images, g, t).square().mean().backward()
    for name, p in up.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"
    # Analytic vs numeric gradient of the whole upsampler w.r.t. its feature inputs, in float64.
    up = up.double()
    images, g, t = _inputs(1, 2, 2, 8, dtype=torch.float64)
    g.requires_grad_(True)
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: up(images, a, b), (g, t), eps=1e-6, atol=1e-5, fast_mode=True)


def test_debias_removes_a_fixed_pattern():
    """Features = content + a fixed pattern P per native position (in every tile and the global view).
    An upsampler whose de-bias buffer holds P gives, on them, what the same upsampler without buffer
    gives on the content alone."""
    torch.manual_seed(0)
    n, f, c = 3, 2, 8
    clean = FeatSharpUpsampler(c, n, f)
    _randomize(clean)
    with torch.no_grad():
        clean.bias.zero_()
        clean.feature_mean.uniform_(-1, 1)
        clean.feature_std.uniform_(0.5, 2)
    debias = copy.deepcopy(clean)
    pattern = torch.randn(n, n, c)
    pattern = pattern - pattern.mean((0, 1))  # only the deviation between positions is identifiable
    with torch.no_grad():
        debias.bias.copy_(pattern)
    images, g, t = _inputs(2, n, f, c)
    raw_pattern = pattern * clean.feature_std  # the pattern in the teacher's units
    noisy_g, noisy_t = g + raw_pattern, t + raw_pattern.repeat(f, f, 1)
    torch.testing.assert_close(debias(images, noisy_g, noisy_t), clean(images, g, t), atol=1e-5, rtol=1e-5)
    assert (clean(images, noisy_g, noisy_t) - clean(images, g, t)).abs().max() > 0.1


def test_determinism_and_file_round_trip(tmp_path):
    teacher = tiny_teacher("siglip2")
    n = teacher.native_size // teacher.patch_size

    def build():
        torch.manual_seed(3)
        up = FeatSharpUpsampler(teacher.feature_dim, n, 2)
        _randomize(up, seed=4)
        return up

    a, b = build(), build()
    images = torch.rand(2, 3, 128, 128)
    out_a = featsharp_teacher_output(teacher, a, images).features
    torch.testing.assert_close(out_a, featsharp_teacher_output(teacher, b, images).features, rtol=0, atol=0)
    torch.testing.assert_close(out_a, featsharp_teacher_output(teacher, a, images).features, rtol=0, atol=0)
    path = save_featsharp(a, teacher, tmp_path)
    loaded = load_featsharp(tmp_path, teacher)
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(featsharp_teacher_output(teacher, loaded, images).features, out_a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="trained for teacher"):
        load_featsharp(path, tiny_teacher("dinov3"))
    with pytest.raises(FileNotFoundError, match="no FeatSharp"):
        load_featsharp(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


class PatternTeacher(Teacher):
    """Per-patch linear teacher plus a fixed pattern per token position (its "position noise")."""

    def __init__(self, pattern: torch.Tensor, patch: int = 8):
        n, _, c = pattern.shape
        super().__init__(
            name="pattern", patch_size=patch, feature_dim=c, summary_dim=None, mean=(0.5,) * 3, std=(0.5,) * 3,
            fixed_size=None, native_size=n * patch,
        )  # fmt: skip
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, c, patch, stride=patch)
        self.register_buffer("pattern", pattern)
        self.requires_grad_(False)

    def _encode(self, pixels):
        features = self.conv(pixels).permute(0, 2, 3, 1)
        reps = (features.shape[1] // self.pattern.shape[0], features.shape[2] // self.pattern.shape[1])
        return TeacherOutput(None, features + self.pattern.repeat(reps[0], reps[1], 1))


def test_consistency_training_learns_the_fixed_pattern():
    """The multi-view loss moves content but not the teacher's position pattern: the de-bias buffer
    is the only thing that can explain it, and it learns it."""
    g = torch.Generator().manual_seed(0)
    pattern = torch.randn(4, 4, 8, generator=g)
    pattern = pattern - pattern.mean((0, 1))
    teacher = PatternTeacher(pattern)
    torch.manual_seed(0)
    up = FeatSharpUpsampler(8, 4, 2)
    # Smooth random images (low-frequency noise), so that content varies slowly under the jitter.
    images = torch.nn.functional.interpolate(torch.rand(64, 3, 8, 8, generator=g), size=(64, 64), mode="bilinear")
    up.fit_normalization(teacher(images[:8]).features)
    opt = torch.optim.AdamW(up.parameters(), lr=2e-2, weight_decay=0.0)
    for step in range(40):
        batch = images[(step * 4) % 64 :][:4]
        loss = consistency_loss(up, teacher, batch, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    learned = up.debias_pattern().detach() * up.feature_std  # back in the teacher's units
    cos = torch.nn.functional.cosine_similarity(learned.flatten(), pattern.flatten(), dim=0)
    assert cos > 0.8, f"learned de-bias pattern has cosine {cos:.3f} with the true pattern"


def test_resample_boxes_identity_and_flip():
    feats = torch.randn(2, 8, 8, 5)
    whole = torch.tensor([[0, 0, 64], [0, 0, 64]])
    pooled = torch.nn.functional.avg_pool2d(feats.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    no_flip = torch.zeros(2, dtype=torch.bool)
    torch.testing.assert_close(resample_boxes(feats, whole, no_flip, 64, 4), pooled)
    torch.testing.assert_close(resample_boxes(feats, whole, ~no_flip, 64, 4), pooled.flip(2))
    # A box of the top-left quarter at the feature resolution returns that quarter exactly.
    quarter = torch.tensor([[0, 0, 32], [0, 0, 32]])
    torch.testing.assert_close(resample_boxes(feats, quarter, no_flip, 64, 4), feats[:, :4, :4])


def _train_cfg(out, **kw):
    base = dict(factor=2, steps=4, batch_size=2, checkpoint_every=2, warmup_steps=1, out=str(out))
    return FeatSharpTrainConfig(**(base | kw))


def test_train_resume_matches_an_uninterrupted_run(tmp_path):
    full = train_featsharp(_train_cfg(tmp_path / "a"), progress=False, log=lambda *_: None)
    assert full["step"] == 4 and full["file"] is not None
    part = train_featsharp(_train_cfg(tmp_path / "b"), stop_after=2, progress=False, log=lambda *_: None)
    assert part["file"] is None and not (tmp_path / "b" / "featsharp.pt").exists()
    with pytest.raises(ValueError, match="--resume"):
        train_featsharp(_train_cfg(tmp_path / "b"), progress=False, log=lambda *_: None)
    done = train_featsharp(_train_cfg(tmp_path / "b"), resume=True, progress=False, log=lambda *_: None)
    assert done["step"] == 4
    a = torch.load(tmp_path / "a" / "featsharp.pt", weights_only=False)["state"]
    b = torch.load(tmp_path / "b" / "featsharp.pt", weights_only=False)["state"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    strip = lambda text: [{k: v for k, v in json.loads(x).items() if k != "time"} for x in text.splitlines()]  # noqa: E731
    assert strip((tmp_path / "b" / "metrics.jsonl").read_text()) == strip(
        (tmp_path / "a" / "metrics.jsonl").read_text()
    )
    assert (tmp_path / "b" / "loss.png").is_file()
    with pytest.raises(ValueError, match="no FeatSharp checkpoint"):
        train_featsharp(_train_cfg(tmp_path / "c"), resume=True, progress=False)


def test_a_diverging_featsharp_run_stops_and_saves_nothing_non_finite(tmp_path, monkeypatch):
    from radio.cli import main
    from radio.finite import NonFiniteError
    from radio.teachers.featsharp import training

    real = training.consistency_loss
    calls = []

    def diverging(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(training, "consistency_loss", diverging)
    with pytest.raises(NonFiniteError, match="non-finite loss at step 3"):
        train_featsharp(_train_cfg(tmp_path / "a"), progress=False, log=lambda *_: None)
    assert not (tmp_path / "a" / "featsharp.pt").exists()
    assert [p.name for p in (tmp_path / "a" / "checkpoints").glob("step_*.pt")] == ["step_00000002.pt"]
    calls.clear()  # through the CLI: one line, exit status 1
    args = ["featsharp", "train", "--factor", "2", "--steps", "4", "--batch-size", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "b")]) == 1


def test_a_broken_latest_featsharp_checkpoint_is_skipped_on_resume(tmp_path):
    train_featsharp(_train_cfg(tmp_path / "a"), stop_after=4, progress=False, log=lambda *_: None)
    latest = tmp_path / "a" / "checkpoints" / "step_00000004.pt"
    latest.write_bytes(latest.read_bytes()[:100])
    logs = []
    done = train_featsharp(_train_cfg(tmp_path / "a"), resume=True, progress=False, log=logs.append)
    assert done["step"] == 4 and any("falling back to step_00000002.pt" in line for line in logs)


def test_cli_featsharp_train(tmp_path, capsys):
    from radio.cli import main

    out = tmp_path / "fs"
    rc = main(
        ["featsharp", "train", "--factor", "2", "--steps", "2", "--batch-size", "1", "--out", str(out), "--no-progress"]
    )
    assert rc == 0
    assert "featsharp.pt" in capsys.readouterr().out
    up = load_featsharp(out, tiny_teacher("siglip2"))
    assert up.factor == 2
    assert main(["featsharp", "train", "--factor", "0", "--out", str(tmp_path / "x")]) == 2
    # Interrupted, then resumed without --steps: the run keeps its own total, wherever the folder went.
    common = ["--factor", "2", "--batch-size", "1", "--no-progress"]
    assert main(["featsharp", "train", *common, "--steps", "3", "--stop-after", "1", "--out", str(tmp_path / "r")]) == 0
    (tmp_path / "r").rename(tmp_path / "moved")
    assert main(["featsharp", "train", "--resume", "--out", str(tmp_path / "moved"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "moved" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    assert (tmp_path / "moved" / "featsharp.pt").is_file() and not (tmp_path / "r").exists()
