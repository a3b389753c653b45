"""Static GPU audit: compile every shipped kernel configuration for Hopper and Ampere, no GPU needed.

Usage::

    python -m radio_kernels.audit                 # all kernels, sm_90 and sm_80
    python -m radio_kernels.audit --only mesa     # kernels whose name contains "mesa"
    python -m radio_kernels.audit --arch 90
    python -m radio_kernels.audit --list          # registered configurations, no compilation
    python -m radio_kernels.audit --sample        # first and last configuration of each kernel

For each configuration a host wrapper can launch (dtype, block sizes, num_warps, constexprs),
the kernel is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``;
the PTX is re-assembled with the ``ptxas -v`` that ships with Triton (same flags Triton uses) to
read registers, spill stores/loads and stack; shared memory comes from the compiled kernel's
metadata; for configurations that use ``tl.dot`` the sm_90 SASS (``cuobjdump -sass``) is searched
for Hopper tensor-core instructions (HGMMA; HMMA is the older mma.sync path). Prints one table
row per (configuration, arch) and exits 1 when any configuration fails to compile, spills, or
needs more than 227 KB of shared memory (the per-block limit on H100/H200; A100: 163 KB is
flagged too).

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
import importlib
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

from ._audit_registry import AuditConfig

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # max dynamic shared memory per block (bytes)
ARCHS = (90, 80)


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
        return out


def collect_configs(only: list[str] | str | None = None, sample: bool = False) -> list[AuditConfig]:
    """Every AuditConfig defined by a module of the radio_kernels package.

    ``only``: keep kernels whose name contains any of these strings. ``sample``: keep the first
    and the last configuration of each kernel (registries list small tiles first).
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
    if only:
        names = [only] if isinstance(only, str) else list(only)
        configs = [c for c in configs if any(n in c.name for n in names)]
    if sample:
        by_kernel: dict[str, list[AuditConfig]] = {}
        for c in configs:
            by_kernel.setdefault(c.name, []).append(c)
        configs = [c for group in by_kernel.values() for c in (group[:1] + group[1:][-1:])]
    return configs


def _nvidia_tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _ptxas_stats(ptx: str, arch: int, workdir: str) -> dict[str, int]:
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    src = os.path.join(workdir, "k.ptx")
    Path(src).write_text(ptx)
    cmd = [_nvidia_tool("ptxas"), "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}"]
    proc = subprocess.run([*cmd, src, "-o", os.path.join(workdir, "k.cubin")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[-500:]}")
    log = proc.stderr + proc.stdout

    def grab(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {
        "regs": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack": grab(r"(\d+) bytes stack frame"),
    }


def _tensor_core_ops(cubin: bytes, workdir: str) -> str:
    path = os.path.join(workdir, "kernel.cubin")
    Path(path).write_bytes(cubin)
    sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
    found = [op for op in ("HGMMA", "HMMA") if op in sass]
    return "+".join(found) if found else "none"


def audit_one(cfg: AuditConfig, arch: int, workdir: str) -> AuditResult:
    import triton
    from triton.backends.compiler import GPUTarget

    result = AuditResult(cfg.name, cfg.label, arch)
    # Pointers are 16-byte aligned (torch allocations); so are integers the config marks aligned.
    names = list(cfg.signature)
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if cfg.signature[n].startswith("*") or n in cfg.aligned
    }
    try:
        src = triton.compiler.ASTSource(fn=cfg.kernel, signature=cfg.signature, constexprs=cfg.constexprs, attrs=attrs)
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
        )
        stats = _ptxas_stats(compiled.asm["ptx"], arch, workdir)
    except Exception as exc:  # report every failure in the table rather than stopping
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}"
        return result
    result.regs = stats["regs"]
    result.spill_stores, result.spill_loads = stats["spill_stores"], stats["spill_loads"]
    result.stack = stats["stack"]
    result.shared = compiled.metadata.shared
    if cfg.uses_dot:
        result.tensor_cores = _tensor_core_ops(compiled.asm["cubin"], workdir)
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


def run_audit(
    only: list[str] | str | None = None, archs: tuple[int, ...] = ARCHS, jobs: int = 1, sample: bool = False
) -> tuple[list[AuditResult], str]:
    """Compile every collected configuration for every arch; ``jobs`` > 1 uses forked workers."""
    _CONFIGS[:] = collect_configs(only, sample)
    work = [(i, arch) for i in range(len(_CONFIGS)) for arch in archs]
    if jobs > 1 and len(work) > 1:
        ctx = multiprocessing.get_context("fork")  # workers inherit the collected kernels
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            results = list(pool.map(_audit_job, work))
    else:
        results = [_audit_job(job) for job in work]
    return results, format_table(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m radio_kernels.audit", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", metavar="NAME", action="append", help="audit only kernels whose name contains NAME (repeatable)"
    )
    parser.add_argument("--sample", action="store_true", help="only the first and last configuration of each kernel")
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="compute capability (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    parser.add_argument("--list", action="store_true", help="print the registered configurations, compile nothing")
    args = parser.parse_args(argv)
    if args.list:
        for cfg in collect_configs(args.only, args.sample):
            print(f"{cfg.name}\t{cfg.label}\tnum_warps={cfg.num_warps}\tnum_stages={cfg.num_stages}")
        return 0
    start = time.perf_counter()
    results, table = run_audit(
        args.only, tuple(args.arch) if args.arch else ARCHS, jobs=max(args.jobs, 1), sample=args.sample
    )
    if not results:
        print(f"no kernel configuration matches --only {args.only}", file=sys.stderr)
        return 2
    print(table)
    failed = [r for r in results if r.problems]
    kernels = sorted({r.kernel for r in results})
    print(
        f"\n{len(results)} compilations of {len(kernels)} kernels in {time.perf_counter() - start:.1f} s: "
        + (f"{len(failed)} FAILED" if failed else "all ok")
    )
    return 1 if failed else 0


def _rerun_without_interpreter() -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "radio_kernels.audit", *sys.argv[1:]], env=env).returncode


if __name__ == "__main__":
    from ._backend import interpreter_enabled

    sys.exit(_rerun_without_interpreter() if interpreter_enabled() else main())
