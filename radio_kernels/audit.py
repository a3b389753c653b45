"""Static GPU audit: compile every shipped kernel configuration for each supported NVIDIA arch, no GPU needed.

Usage::

    python -m radio_kernels.audit                 # all kernels, each on the archs it ships to
    python -m radio_kernels.audit --only mesa     # kernels whose name contains "mesa"
    python -m radio_kernels.audit --arch 90
    python -m radio_kernels.audit --list          # registered configurations, no compilation
    python -m radio_kernels.audit --sample        # flagged configurations (else first and last per kernel)
    python -m radio_kernels.audit --jobs 4        # parallel compilations (default: the usable CPUs)
    python -m radio_kernels.audit --plan [--json] # static performance model of the attention launch plan
                                                  # (radio_kernels.perf_model); exit 1 when a limit is broken

For each configuration a host wrapper can launch (dtype, block sizes, num_warps, constexprs),
the kernel is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
for every arch the configuration ships to (``AuditConfig.archs``); configurations that compile to
the same binary are merged first and compiled once. Registers, spill stores/loads and stack come
from the ``ptxas -v`` log of Triton's own compilation (the ptxas that ships with Triton, Triton's
flags; on a Triton cache hit the cached PTX is re-assembled with those flags); shared memory comes
from the compiled kernel's metadata. Tensor cores: the sm_90 SASS (``cuobjdump -sass``) is searched
for HGMMA (Hopper wgmma) and HMMA (the older mma.sync path); on the other archs the PTX's ``mma.sync``
(which assembles to HMMA) is reported. Prints one table row per (configuration, arch) and a summary per
arch, and exits 1 when any configuration fails to compile, spills, needs more shared memory than
the arch gives one block (``SHARED_LIMIT``: 227 KB on H100/H200, 163 KB on A100, 99 KB on the
RTX-class sm_86 / sm_89 / sm_120; 227 KB on sm_100 too), or is marked
``expect_wgmma`` and lacks the arch's asynchronous tensor cores (HGMMA on sm_90, tcgen05's UTCHMMA
on sm_100).

Adding kernels (e.g. attention): define ``AUDIT_CONFIGS`` in any module of the ``radio_kernels``
package, a list of :class:`radio_kernels._audit_registry.AuditConfig` or a function returning one,
with one entry per launch configuration the host wrapper can choose (set ``uses_dot=True`` for
kernels built on ``tl.dot``). The audit imports every module of the package and collects them;
see ``_audit_registry.py`` for the fields and the ``signature_of`` helper.

The audit must run without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit``
functions); when it is set, this module re-runs itself in a subprocess with it removed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import io
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ._audit_registry import ARCHS, AuditConfig, merge_duplicates

# Max dynamic shared memory per block (bytes): 227 KB on sm_90, 163 KB (166912 B) on sm_80,
# 99 KB (101376 B) on sm_86 / sm_89 / sm_120.
SHARED_LIMIT = {90: 227 * 1024, 100: 227 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 120: 99 * 1024}
# What ``expect_wgmma`` requires per arch: the asynchronous tensor cores (Hopper wgmma, Blackwell tcgen05).
ASYNC_MMA = {90: "HGMMA", 100: "UTCHMMA"}


@dataclass
class AuditResult:
    kernel: str
    label: str
    arch: int
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    tensor_cores: str = "-"
    expect_wgmma: bool = False
    expect_tma: bool = False
    error: str | None = None

    @property
    def problems(self) -> list[str]:
        if self.error:
            return [self.error]
        out = []
        if self.spill_stores or self.spill_loads:
            out.append(f"spills {self.spill_stores}/{self.spill_loads} B")
        if self.shared is not None and self.shared > SHARED_LIMIT[self.arch]:
            out.append(f"shared {self.shared / 1024:.1f} KB > {SHARED_LIMIT[self.arch] // 1024} KB")
        want = ASYNC_MMA.get(self.arch)
        if self.expect_wgmma and want and want not in self.tensor_cores.split("+"):
            out.append(f"no {want} on sm_{self.arch} (tensor cores: {self.tensor_cores})")
        if self.expect_tma and self.arch >= 90 and "UTMALDG" not in self.tensor_cores.split("+"):
            out.append(f"no TMA load (UTMALDG) on sm_{self.arch}")
        return out


def collect_configs(only: list[str] | str | None = None, sample: bool = False) -> list[AuditConfig]:
    """Every AuditConfig defined by a module of the radio_kernels package, duplicates merged.

    ``only``: keep kernels whose name contains any of these strings. ``sample``: keep the
    configurations flagged ``sample``; of a kernel that flags none, its first and last.
    """
    import radio_kernels

    configs: list[AuditConfig] = []
    for info in sorted(pkgutil.iter_modules(radio_kernels.__path__), key=lambda m: m.name):
        if info.name == "audit":
            continue
        module = importlib.import_module(f"radio_kernels.{info.name}")
        entries = getattr(module, "AUDIT_CONFIGS", None)
        if entries is None:
            continue
        configs.extend(entries() if callable(entries) else entries)
    configs = merge_duplicates(configs)
    if only:
        names = [only] if isinstance(only, str) else list(only)
        configs = [c for c in configs if any(n in c.name for n in names)]
    if sample:
        by_kernel: dict[str, list[AuditConfig]] = {}
        for c in configs:
            by_kernel.setdefault(c.name, []).append(c)
        configs = [
            c for group in by_kernel.values() for c in ([c for c in group if c.sample] or group[:1] + group[1:][-1:])
        ]
    return configs


def _nvidia_tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _parse_ptxas_log(log: str) -> dict[str, int]:
    def grab(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {
        "regs": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack": grab(r"(\d+) bytes stack frame"),
    }


def _ptxas_stats(ptx: str, arch: int, workdir: str) -> dict[str, int]:
    """Re-assemble ``ptx`` with Triton's ptxas flags (for a kernel Triton's cache returned)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    src = os.path.join(workdir, "k.ptx")
    Path(src).write_text(ptx)
    # The ptxas Triton itself runs for this arch (a newer one, ptxas-blackwell, from sm_100 on).
    cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}"]
    proc = subprocess.run([*cmd, src, "-o", os.path.join(workdir, "k.cubin")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[-500:]}")
    return _parse_ptxas_log(proc.stderr + proc.stdout)


def _compile_with_ptxas_log(src, arch: int, options: dict) -> tuple[object, str]:
    """``triton.compile`` for ``arch``, and the ``ptxas -v`` log Triton printed ("" on a cache hit)."""
    import triton
    from triton.backends.compiler import GPUTarget

    captured = io.StringIO()
    with triton.knobs.nvidia.scope(), contextlib.redirect_stdout(captured):
        triton.knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    log = captured.getvalue()
    return compiled, log if "Used " in log and " registers" in log else ""


def _tensor_core_ops(compiled, arch: int, workdir: str) -> str:
    """Tensor-core instructions in the SASS from sm_90 on: HGMMA (wgmma), UTCHMMA (tcgen05, sm_100),
    HMMA (mma.sync), and UTMALDG (a load by the tensor-memory accelerator); on older archs HMMA iff
    the PTX has mma.sync."""
    if arch < 90:
        return "HMMA" if "mma.sync" in compiled.asm["ptx"] else "none"
    path = os.path.join(workdir, "kernel.cubin")
    Path(path).write_bytes(compiled.asm["cubin"])
    sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
    found = [op for op in ("HGMMA", "UTCHMMA", "HMMA", "UTMALDG") if re.search(rf"\b{op}\b", sass)]
    return "+".join(found) if found else "none"


def audit_one(cfg: AuditConfig, arch: int, workdir: str) -> AuditResult:
    import triton

    result = AuditResult(cfg.name, cfg.label, arch, expect_wgmma=cfg.expect_wgmma, expect_tma=cfg.expect_tma)
    # Pointers are 16-byte aligned (torch allocations); so are integers the config marks aligned.
    names = list(cfg.signature)
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if cfg.signature[n].startswith("*") or n in cfg.aligned
    }
    try:
        src = triton.compiler.ASTSource(fn=cfg.kernel, signature=cfg.signature, constexprs=cfg.constexprs, attrs=attrs)
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        if cfg.max_regs:
            options["maxnreg"] = cfg.max_regs
        compiled, log = _compile_with_ptxas_log(src, arch, options)
        stats = _parse_ptxas_log(log) if log else _ptxas_stats(compiled.asm["ptx"], arch, workdir)
    except Exception as exc:  # report every failure in the table rather than stopping
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}"
        return result
    result.regs = stats["regs"]
    result.spill_stores, result.spill_loads = stats["spill_stores"], stats["spill_loads"]
    result.stack = stats["stack"]
    result.shared = compiled.metadata.shared
    if cfg.uses_dot or cfg.expect_wgmma or cfg.expect_tma:
        result.tensor_cores = _tensor_core_ops(compiled, arch, workdir)
    return result


def format_table(results: list[AuditResult]) -> str:
    header = ("kernel", "config", "arch", "regs", "spill st/ld B", "stack B", "shared KB", "tensor cores", "status")
    rows = [header]
    for r in results:
        ok = not r.problems
        rows.append(
            (
                r.kernel,
                r.label,
                f"sm_{r.arch}",
                "-" if r.regs is None else str(r.regs),
                "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}",
                "-" if r.stack is None else str(r.stack),
                "-" if r.shared is None else f"{r.shared / 1024:.1f}",
                r.tensor_cores,
                "ok" if ok else "FAIL: " + "; ".join(r.problems),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


_CONFIGS: list[AuditConfig] = []  # set before forking workers, read by _audit_job


def _audit_job(job: tuple[int, int]) -> AuditResult:
    index, arch = job
    with tempfile.TemporaryDirectory(prefix="radio_audit_") as workdir:
        return audit_one(_CONFIGS[index], arch, workdir)


def default_jobs() -> int:
    """The CPUs this process may run on (the cgroup / affinity view, not the host's count)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_audit(
    only: list[str] | str | None = None,
    archs: tuple[int, ...] = ARCHS,
    jobs: int | None = None,
    sample: bool = False,
) -> tuple[list[AuditResult], str]:
    """Compile every collected configuration for each of its archs among ``archs``.

    ``jobs``: parallel compilations in forked workers (default: ``default_jobs()``).
    """
    jobs = default_jobs() if jobs is None else jobs
    _CONFIGS[:] = collect_configs(only, sample)
    work = [(i, arch) for i, cfg in enumerate(_CONFIGS) for arch in archs if arch in cfg.archs]
    if jobs > 1 and len(work) > 1:
        ctx = multiprocessing.get_context("fork")  # workers inherit the collected kernels
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            results = list(pool.map(_audit_job, work))
    else:
        results = [_audit_job(job) for job in work]
    return results, format_table(results)


def summarize(results: list[AuditResult]) -> str:
    """Per arch: compilations, ok, spilling, over the shared-memory limit, errors, HGMMA checks."""
    lines = []
    for arch in sorted({r.arch for r in results}, reverse=True):
        mine = [r for r in results if r.arch == arch]
        spills = sum(bool(r.spill_stores or r.spill_loads) for r in mine)
        smem = sum(r.shared is not None and r.shared > SHARED_LIMIT[arch] for r in mine)
        line = (
            f"sm_{arch}: {len(mine)} compiled, {sum(not r.problems for r in mine)} ok, {spills} spill, "
            f"{smem} over {SHARED_LIMIT[arch] // 1024} KB shared, {sum(r.error is not None for r in mine)} errors"
        )
        if mine:
            shared, regs = max(r.shared or 0 for r in mine), max(r.regs or 0 for r in mine)
            line += f"; max shared {shared / 1024:.1f} KB, max regs {regs}"
        checked = [r for r in mine if r.expect_wgmma]
        if arch in ASYNC_MMA and checked:
            op = ASYNC_MMA[arch]
            with_op = sum(op in r.tensor_cores.split("+") for r in checked)
            line += f"; {op} in {with_op}/{len(checked)} configurations that require it"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m radio_kernels.audit", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", metavar="NAME", action="append", help="audit only kernels whose name contains NAME (repeatable)"
    )
    parser.add_argument(
        "--sample", action="store_true", help="only flagged configurations (else the first and last of each kernel)"
    )
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="compute capability (repeatable)")
    parser.add_argument("--jobs", type=int, default=default_jobs(), help="parallel compilations (default: CPUs)")
    parser.add_argument("--list", action="store_true", help="print the registered configurations, compile nothing")
    parser.add_argument("--plan", action="store_true", help="print the static performance model, compile nothing")
    parser.add_argument("--json", action="store_true", help="with --plan: JSON rows instead of a table")
    args = parser.parse_args(argv)
    if args.plan:
        return _print_plan(args.json)
    archs = tuple(args.arch) if args.arch else ARCHS
    if args.list:
        for cfg in collect_configs(args.only, args.sample):
            shipped = ",".join(f"sm_{a}" for a in cfg.archs if a in archs)
            if shipped:
                print(
                    f"{cfg.name}\t{cfg.label}\tnum_warps={cfg.num_warps}\tnum_stages={cfg.num_stages}\t{shipped}"
                    + ("\texpect_wgmma" * cfg.expect_wgmma)
                )
        return 0
    start = time.perf_counter()
    results, table = run_audit(args.only, archs, jobs=max(args.jobs, 1), sample=args.sample)
    if not results:
        print(f"no kernel configuration matches --only {args.only} --arch {list(archs)}", file=sys.stderr)
        return 2
    print(table)
    failed = [r for r in results if r.problems]
    kernels = sorted({r.kernel for r in results})
    print("\n" + summarize(results))
    print(
        f"{len(results)} compilations of {len(kernels)} kernels in {time.perf_counter() - start:.1f} s "
        f"({max(args.jobs, 1)} jobs): " + (f"{len(failed)} FAILED" if failed else "all ok")
    )
    return 1 if failed else 0


def _print_plan(as_json: bool) -> int:
    import json

    from . import perf_model

    rows = perf_model.plan_rows()
    failures = perf_model.threshold_failures(rows)
    facts = perf_model.compiled_facts(jobs=default_jobs())
    failures += [f"{f['kernel']} {f['config']}: {f['error'] or 'spills'}" for f in facts if f["error"] or f["spills"]]
    if as_json:
        print(json.dumps({"rows": rows, "compiled_sm90": facts, "failures": failures}, indent=1))
    else:
        print("Static model of the attention launch plan on the sm_90 tiles (not a measurement):")
        print(perf_model.format_plan(rows))
        print("\nThe sm_90 configurations these plans launch (bf16, compiled here; blocks/SM from registers, shared):")
        print(perf_model.format_facts(facts))
        print("\n" + ("\n".join(f"OVER LIMIT: {f}" for f in failures) if failures else "all limits met"))
    return 1 if failures else 0


def _rerun_without_interpreter() -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "radio_kernels.audit", *sys.argv[1:]], env=env).returncode


if __name__ == "__main__":
    from ._backend import interpreter_enabled

    sys.exit(_rerun_without_interpreter() if interpreter_enabled() else main())
