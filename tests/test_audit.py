"""The static GPU audit (python -m radio_kernels.audit) compiles for sm_90 / 100 / 80 / 86 / 89 / 120 without a GPU.

It runs in a subprocess without TRITON_INTERPRET (the interpreter replaces @triton.jit functions).
Here: every registered kernel on its ``--sample`` subset (the loss kernels: their first and last
configuration on each arch; attention, on the archs it ships to: the global bf16 D=64 / D=128 tiles,
which must use HGMMA on sm_90, sm_90's fp32 D=72 tiles and the sm_80 tiles that override Hopper's),
plus the audit's bookkeeping (duplicate merging, per-arch limits, the tile table a device gets, where
the kernels ship) in-process. The full audit (every configuration of every table, ~3400 compilations)
runs in CI: ``python -m radio_kernels.audit``.
"""

import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from radio_kernels import _attention_configs as configs
from radio_kernels._audit_registry import AuditConfig, merge_duplicates
from radio_kernels.audit import SHARED_LIMIT, AuditResult, format_table

ROOT = Path(__file__).resolve().parents[1]
LOSS_KERNELS = (
    "_shifted_mse_fwd_kernel",
    "_mesa_fwd_kernel",
    "_angular_fwd_kernel",
    "_loss_finish_kernel",
    "_loss_scale_grad_kernel",
)
ATTENTION_MAIN = ("attn_fwd_kernel", "attn_bwd_dq_kernel", "attn_bwd_dkdv_kernel")
ARCH_NAMES = {"sm_90", "sm_100", "sm_80", "sm_86", "sm_89", "sm_120"}


def shipped_arch_names() -> set[str]:
    return {f"sm_{arch}" for arch in configs.SHIPPED_ARCHS}


def run_audit(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "radio_kernels.audit", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def table_rows(stdout: str) -> list[list[str]]:
    """[kernel, config, arch, regs, spill st/ld, stack, shared KB, tensor cores, status] per row."""
    rows = [line for line in stdout.splitlines() if re.match(r"^\S+\s+.*\s+sm_\d{2,3}", line)]
    return [re.split(r"\s{2,}", line.strip()) for line in rows]


@pytest.fixture(scope="module")
def listing() -> list[str]:
    """The audit's registry listing: kernel, label, num_warps, num_stages, archs [, expect_wgmma]."""
    proc = run_audit("--list")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.fixture(scope="module")
def registered(listing) -> dict[str, dict[str, int]]:
    """{kernel name: {arch: number of configurations}}."""
    counts: dict[str, dict[str, int]] = {}
    for line in listing:
        name, *_, archs = line.split("\t")[:5]
        for arch in archs.split(","):
            counts.setdefault(name, {}).setdefault(arch, 0)
            counts[name][arch] += 1
    return counts


def test_loss_kernels_audit_sample(registered):
    """The loss kernels' first and last configuration (CI's full audit compiles all ~900) on every arch."""
    args = [a for name in LOSS_KERNELS for a in ("--only", name)]
    proc = run_audit("--sample", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    for name in LOSS_KERNELS:
        mine = [r for r in rows if r[0] == name]
        assert registered[name].keys() == ARCH_NAMES and min(registered[name].values()) >= 1, name
        assert {r[2] for r in mine} == ARCH_NAMES, name
        assert all(r[-1] == "ok" and r[4] == "0/0" and 0 < int(r[3]) <= 255 for r in mine), mine
    assert "all ok" in proc.stdout


def test_sample_of_the_attention_kernels_on_the_shipped_archs(registered):
    """Every attention table is registered for its arch(s); the sample compiles spill-free on the archs
    where the kernels ship (``configs.SHIPPED_ARCHS``), with HGMMA on sm_90, where the forward's TMA
    variant loads through UTMALDG, and in float32 too."""
    others = sorted(set(registered) - set(LOSS_KERNELS))
    assert set(ATTENTION_MAIN) <= set(others)
    for name in others:  # the per-window backward ships on sm_90 only (``window_tile``)
        want = {"sm_90"} if name == "attn_bwd_window_kernel" else shipped_arch_names()
        assert set(registered[name]) == want, (name, registered[name])
    shipped = [a for arch in configs.SHIPPED_ARCHS for a in ("--arch", str(arch))]
    proc = run_audit("--sample", *shipped, *[a for name in others for a in ("--only", name)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert {r[0] for r in rows} == set(others)
    assert {r[2] for r in rows} == {f"sm_{arch}" for arch in configs.SHIPPED_ARCHS}
    assert all(r[-1] == "ok" and r[4] == "0/0" for r in rows), [r for r in rows if r[-1] != "ok"]
    for name in ATTENTION_MAIN:
        mine = [r for r in rows if r[0] == name]
        for d in (64, 128):
            hopper = [r for r in mine if f"global bf16 D={d} " in r[1] and r[2] == "sm_90"]
            assert len(hopper) == 1 and hopper[0][7] == "HGMMA", (name, d, hopper)
        assert any(" fp32 " in r[1] for r in mine), name  # float32 ships too
    tma = [r for r in rows if r[0] == "attn_fwd_kernel" and "global tma bf16" in r[1]]
    assert tma and all(r[7] == "HGMMA+UTMALDG" for r in tma), tma
    summary = {line.split(":")[0]: line for line in proc.stdout.splitlines() if line.startswith("sm_")}
    found = re.search(r"HGMMA in (\d+)/(\d+)", summary["sm_90"])
    assert found and found[1] == found[2] and int(found[2]) >= 6, summary["sm_90"]


def test_failures_are_reported():
    ok = AuditResult("k", "cfg", 90, regs=64, spill_stores=0, spill_loads=0, stack=0, shared=1024)
    spill = AuditResult("k", "cfg", 90, regs=255, spill_stores=8, spill_loads=8, stack=8, shared=0)
    smem = AuditResult("k", "cfg", 90, regs=64, spill_stores=0, spill_loads=0, stack=0, shared=228 * 1024)
    broken = AuditResult("k", "cfg", 80, error="CompilationError: boom")
    assert not ok.problems and spill.problems and smem.problems and broken.problems
    table = format_table([ok, spill, smem, broken])
    assert table.count("FAIL") == 3 and "spills 8/8 B" in table and "shared 228.0 KB > 227 KB" in table


def test_shared_memory_limit_is_per_arch():
    assert SHARED_LIMIT == {
        90: 227 * 1024,
        100: 227 * 1024,
        80: 163 * 1024,
        86: 99 * 1024,
        89: 99 * 1024,
        120: 99 * 1024,
    }
    kw = dict(regs=64, spill_stores=0, spill_loads=0, stack=0, shared=180 * 1024)
    assert not AuditResult("k", "cfg", 90, **kw).problems
    assert AuditResult("k", "cfg", 80, **kw).problems == ["shared 180.0 KB > 163 KB"]
    kw["shared"] = 100 * 1024
    assert not AuditResult("k", "cfg", 80, **kw).problems
    assert AuditResult("k", "cfg", 120, **kw).problems == ["shared 100.0 KB > 99 KB"]


def test_missing_async_tensor_cores_fail_on_hopper_and_blackwell_only():
    kw = dict(regs=128, spill_stores=0, spill_loads=0, stack=0, shared=64 * 1024, expect_wgmma=True)
    assert not AuditResult("k", "cfg", 90, tensor_cores="HGMMA", **kw).problems
    assert AuditResult("k", "cfg", 90, tensor_cores="HMMA", **kw).problems == ["no HGMMA on sm_90 (tensor cores: HMMA)"]
    assert not AuditResult("k", "cfg", 100, tensor_cores="UTCHMMA", **kw).problems
    assert AuditResult("k", "cfg", 100, tensor_cores="HMMA", **kw).problems == [
        "no UTCHMMA on sm_100 (tensor cores: HMMA)"
    ]
    assert not AuditResult("k", "cfg", 80, tensor_cores="HMMA", **kw).problems


def _config(label: str, archs: tuple[int, ...], block: int, **kw) -> AuditConfig:
    return AuditConfig(configs, label, signature={"x": "*fp32"}, constexprs={"B": block}, archs=archs, **kw)


def test_duplicates_merge_into_one_compilation_per_arch():
    merged = merge_duplicates([
        _config("a", (90,), 64, expect_wgmma=True),
        _config("b", (80,), 64, sample=True),
        _config("c", (90,), 64),
        _config("a", (80,), 128),
    ])  # fmt: skip
    assert [(c.label, c.archs, c.expect_wgmma, c.sample) for c in merged] == [
        ("a | b | c", (90, 80), True, True),
        ("a", (80,), False, False),
    ]


def test_attention_registry_covers_every_shipped_table(listing):
    """Every shipped GPU table is registered (fp16 / bf16 / fp32) for the archs it serves, and only those
    (sm_100's is not shipped: the full audit would compile what never launches); the per-window backward
    only for sm_90's 16-bit tiles."""
    attention = [line.split("\t") for line in listing if line.startswith("attn_")]
    archs = {arch for row in attention for arch in row[4].split(",")}
    assert archs == shipped_arch_names() and "sm_100" not in archs
    for dtype in ("fp16", "bf16", "fp32"):
        in_dtype = {a for row in attention if f" {dtype} " in row[1] for a in row[4].split(",")}
        assert in_dtype == shipped_arch_names(), dtype
    window = [row for row in attention if row[0] == "attn_bwd_window_kernel"]
    assert window and all(row[4] == "sm_90" and " fp32 " not in row[1] for row in window)
    expected = {
        configs.HOPPER: configs.Tile(128, 32, 8, 3),
        configs.BLACKWELL: configs.Tile(128, 32, 8, 3),
        configs.AMPERE: configs.Tile(64, 32, 8, 3),
        configs.CONSUMER: configs.Tile(32, 16, 8, 3),
    }
    for arch, table in configs.GPU_TABLES.items():
        assert table["dkdv", 128, 2, False] == expected.get(arch, expected[configs.CONSUMER]), arch
    dkdv = {row[1].split(" D=128 ")[1] for row in attention if row[1].startswith("dkdv global bf16 D=128 ")}
    assert dkdv == {"BLOCK_N=128 BLOCK_M=32", "BLOCK_N=64 BLOCK_M=32", "BLOCK_N=32 BLOCK_M=16"}
    # merged duplicates: one entry per binary, listed once; a label listed twice is two binaries (e.g.
    # Hopper's forward with maxnreg, sm_100's without) on disjoint archs
    seen: dict[str, set[str]] = {}
    for line in listing:
        key, archs = line.removesuffix("\texpect_wgmma").rsplit("\t", 1)
        assert not seen.setdefault(key, set()) & set(archs.split(",")), line
        seen[key] |= set(archs.split(","))
    # the loss kernels ship everywhere
    everywhere = "\tsm_90,sm_100,sm_80,sm_86,sm_89,sm_120"
    assert any(line.startswith("_mesa_fwd_kernel\t") and everywhere in line for line in listing)
    # every Hopper 16-bit attention tile of 64+ rows is checked for HGMMA
    assert sum(line.startswith("attn_") and line.endswith("expect_wgmma") for line in listing) > 50


@pytest.mark.parametrize(
    ("capability", "table"),
    [
        ((9, 0), "HOPPER_TABLE"),  # H100 / H200
        ((10, 0), "BLACKWELL_TABLE"),  # B200: 227 KB of shared memory too
        ((10, 3), "BLACKWELL_TABLE"),  # B300
        ((11, 0), "BLACKWELL_TABLE"),  # Thor
        ((8, 0), "AMPERE_TABLE"),  # A100
        ((8, 7), "AMPERE_TABLE"),  # Jetson Orin: 163 KB
        ((8, 6), "CONSUMER_TABLE"),  # RTX 30xx, A10: 99 KB
        ((8, 9), "CONSUMER_TABLE"),  # RTX 40xx, L4, L40
        ((12, 0), "CONSUMER_TABLE"),  # RTX 50xx
        ((12, 1), "CONSUMER_TABLE"),  # GB10
    ],
)
def test_device_capability_picks_the_tile_table(capability, table):
    assert configs.unsupported_capability(*capability) is None
    assert configs.table_for_capability(*capability) is getattr(configs, table)
    configs._capability.cache_clear()
    try:
        with (
            mock.patch.object(configs, "interpreter_enabled", lambda: False),
            mock.patch("torch.cuda.current_device", lambda: 0),
            mock.patch("torch.cuda.get_device_capability", lambda index: capability),
        ):
            assert configs.active_table() is getattr(configs, table)
    finally:
        configs._capability.cache_clear()


@pytest.mark.parametrize("capability", [(7, 5), (7, 0), (6, 1)])
def test_gpus_before_sm80_get_no_table(capability):
    """T4 / V100 have 64-96 KB of shared memory and no bf16 tensor cores: auto falls back to PyTorch."""
    reason = configs.unsupported_capability(*capability)
    assert reason and "compute capability >= 8.0" in reason and f"{capability[0]}.{capability[1]}" in reason
    with pytest.raises(ValueError, match="compute capability >= 8.0"):
        configs.table_for_capability(*capability)


def test_tables_cover_the_same_launches_and_the_consumer_one_differs_only_where_audited():
    keys = configs.HOPPER_TABLE.keys()
    assert keys == configs.BLACKWELL_TABLE.keys() == configs.AMPERE_TABLE.keys() == configs.CONSUMER_TABLE.keys()
    assert keys == configs.INTERPRET_TABLE.keys()
    assert configs.pick_tile("dq", 128, 4, table=configs.AMPERE_TABLE) == configs.Tile(64, 32, 8, 3)
    changed = {k for k in keys if configs.CONSUMER_TABLE[k] != configs.AMPERE_TABLE[k]}
    area = {k: (t.block_m * t.block_n, a.block_m * a.block_n)
            for k in changed for t, a in [(configs.CONSUMER_TABLE[k], configs.AMPERE_TABLE[k])]}  # fmt: skip
    assert changed and all(mine <= ampere for mine, ampere in area.values())  # only ever smaller tiles
    assert all(t.block_m <= 64 for k, t in configs.CONSUMER_TABLE.items() if k[3])  # narrow stays narrow


def test_audit_rejects_unknown_kernel_name():
    proc = run_audit("--only", "no_such_kernel")
    assert proc.returncode == 2


@pytest.mark.parametrize(
    ("capability", "dtype", "match"),
    [
        ((9, 0), "bf16", None),
        ((9, 0), "fp16", None),
        ((9, 0), "fp32", None),
        ((8, 0), "bf16", None),
        ((8, 0), "fp32", None),
        ((8, 7), "fp16", None),  # Jetson Orin: sm_80's table and compiler output
        ((8, 6), "bf16", None),
        ((8, 9), "fp32", None),
        ((12, 0), "fp16", None),
        ((12, 1), "bf16", None),  # GB10: sm_120's
        ((10, 0), "bf16", "audited for sm_80, sm_86, sm_89, sm_90, sm_120 so far, got compute capability 10.0"),
        ((11, 0), "fp32", "got compute capability 11.0"),  # Thor: sm_100's table, not audited on its own
        ((7, 5), "bf16", "compute capability >= 8.0"),
    ],
)
def test_attention_ships_where_audited(capability, dtype, match):
    """On a GPU the attention kernels run where the audit keeps their v2 tiles spill-free; elsewhere auto
    takes PyTorch and backend="triton" says why."""
    reason = configs.unshipped_reason(*capability, dtype)
    assert reason is None if match is None else match in reason
    assert set(configs.SHIPPED_ARCHS) == set(configs.GPU_TABLES) - {configs.BLACKWELL}
    assert configs.SHIPPED_DTYPES == ("fp16", "bf16", "fp32")
    assert configs.audited_arch(8, 6) == 86 and configs.audited_arch(8, 7) == 80 and configs.audited_arch(12, 1) == 120
