"""The static GPU audit (python -m radio_kernels.audit) compiles for sm_90 / sm_80 without a GPU.

It runs in a subprocess without TRITON_INTERPRET (the interpreter replaces @triton.jit functions).
The loss kernels are audited in full (every shipped configuration, both archs); every other
registered kernel (attention: hundreds of configurations, minutes to compile) is audited on its
first and last configuration for sm_90 here, and in full by ``python -m radio_kernels.audit``.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from radio_kernels.audit import AuditResult, format_table

ROOT = Path(__file__).resolve().parents[1]
LOSS_KERNELS = ("_shifted_mse_fwd_kernel", "_mesa_fwd_kernel", "_angular_fwd_kernel")


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
    return [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines() if re.match(r"^\S+\s+.*\s+sm_\d\d", line)]


@pytest.fixture(scope="module")
def registered() -> dict[str, int]:
    """{kernel name: number of configurations} from the audit's own registry listing."""
    proc = run_audit("--list")
    assert proc.returncode == 0, proc.stderr
    counts: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        name = line.split("\t")[0]
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_loss_kernels_audit_in_full(registered):
    args = [a for name in LOSS_KERNELS for a in ("--only", name)]
    proc = run_audit(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    for name in LOSS_KERNELS:
        mine = [r for r in rows if r[0] == name]
        # every configuration, once per arch, with register counts and no spills
        assert len(mine) == 2 * registered[name], name
        assert {r[2] for r in mine} == {"sm_90", "sm_80"}
        assert all(r[-1] == "ok" and r[4] == "0/0" and 0 < int(r[3]) <= 255 for r in mine), mine
    assert "all ok" in proc.stdout


def test_every_registered_kernel_compiles_for_hopper(registered):
    assert set(LOSS_KERNELS) <= set(registered)
    proc = run_audit("--sample", "--arch", "90")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    audited = {r[0] for r in table_rows(proc.stdout)}
    assert audited == set(registered)


def test_failures_are_reported():
    ok = AuditResult("k", "cfg", 90, regs=64, spill_stores=0, spill_loads=0, stack=0, shared=1024)
    spill = AuditResult("k", "cfg", 90, regs=255, spill_stores=8, spill_loads=8, stack=8, shared=0)
    smem = AuditResult("k", "cfg", 90, regs=64, spill_stores=0, spill_loads=0, stack=0, shared=228 * 1024)
    broken = AuditResult("k", "cfg", 80, error="CompilationError: boom")
    assert not ok.problems and spill.problems and smem.problems and broken.problems
    table = format_table([ok, spill, smem, broken])
    assert table.count("FAIL") == 3 and "spills 8/8 B" in table and "shared 228.0 KB > 227 KB" in table


def test_audit_rejects_unknown_kernel_name():
    proc = run_audit("--only", "no_such_kernel")
    assert proc.returncode == 2
