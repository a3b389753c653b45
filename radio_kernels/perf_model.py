"""Static performance model of the attention launch plan (no GPU): useful vs executed MMA FLOPs and
minimum vs planned HBM bytes, for the problems C-RADIOv4 trains on.

Everything is counted from ``_attention_plan``'s launches (grid, tiles, head-dim chunks, masked
steps), the objects ``attention.py`` launches, on the sm_90 (Hopper) tile table:

- useful FLOPs: 4 D per visible (query, key) pair forward, 10 D backward (the 5-matmul flash
  backward: S, dP, dV, dK, dQ), the counting convention of ``reference.attention_flops``.
- executed MMA FLOPs: every (row, column) pair a program's tiles compute, including masked rows
  and columns, times 2 x the executed width of each product: D0 + DC1 for products that contract
  over D (q k^T, do v^T), D0 + D1 for products whose output is D wide (see ``head_chunks``).
  Forward: 2 products, dQ kernel: 3, dK/dV kernel: 4 (7 in all: dQ recomputes S and dP); the
  windowed backward's per-window kernel: 5 for the window's own pairs (dQ summed in place), over
  its wide key tiles and the 16-key tiles of the window's ragged rest.
- HBM bytes, assuming the programs of one launch and head run together and share what they read
  through L2 (so a launch reads each K / V row it walks once) and that nothing survives in L2 from
  one launch to the next: each launch reads the Q (dO, lse, delta) rows it owns and the K, V (Q, dO)
  rows its programs walk, and writes its rows' outputs; the prefix partial states are written and
  read in fp32. Minimum: every input read once, every output written once. The assumption is
  weakest for the windowed forward's prefix programs, which walk a group of windows (~1024 keys)
  while each window's own programs walk it once; the plan bounds that group for this reason.

This is a model, not a measurement: it shows where work and traffic go, not how fast a GPU runs
it. ``python -m radio_kernels.audit --plan`` prints it, with the compiled facts (registers, shared
memory, blocks per SM, HGMMA, TMA) of every sm_90 kernel configuration the problems launch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from . import _attention_configs as configs
from ._attention_plan import SMALL, Launch, backward_plan, forward_plan, head_chunks

PREFIX = 10  # C-RADIO's prefix tokens (CLS + registers)


@dataclass(frozen=True)
class Problem:
    name: str
    px: int
    head_dim: int
    heads: int
    batch: int
    window: int  # window side in patches, 0 = global

    @property
    def grid(self) -> int:
        return self.px // 16

    @property
    def n(self) -> int:
        return self.grid**2 + PREFIX

    @property
    def window_tokens(self) -> int:
        return self.window**2


def _vit_h(px, window):
    return Problem(f"ViT-H/16 {px}px " + (f"win{window}" if window else "global"), px, 80, 16, 16, window)


PROBLEMS = (
    *(_vit_h(px, w) for px in (512, 1024, 1152) for w in (0, 8, 16) if (px // 16) % max(w, 1) == 0),
    Problem("SO400M/16 1152px win12", 1152, 72, 16, 16, 12),
    Problem("ViT-B/16 1024px global", 1024, 64, 12, 16, 0),
)
# The thresholds the plan must meet (forward executed / useful MMA, backward executed / 5-matmul,
# windowed forward planned / minimum bytes).
FWD_MMA_LIMIT = {"global": 1.15, 16: 1.15, 12: 1.4}
BWD_MMA_LIMIT = 1.5
FWD_BYTES_LIMIT = 1.2


def visible_pairs(n: int, p: int, t: int) -> int:
    if t == 0:
        return n * n
    return p * n + (n - p) * (p + t)


def _walked(length: int, block: int) -> int:
    """Columns a program computes walking ``length`` columns: full blocks, then 16-wide masked steps."""
    full = (length // block) * block
    return full + -(-(length - full) // SMALL) * SMALL


def _columns(launch: Launch, n: int, p: int) -> int:
    """Columns each program of ``launch`` walks (computes, masked ones included)."""
    step = launch.tile.block_n
    if launch.kernel == "combine":
        return _walked(p, step)
    if launch.windowed:
        return _walked(p, SMALL) + _walked(launch.seg_len, step)
    return _walked(n, step)


def window_key_rows(launch: Launch) -> int:
    """Key rows a per-window program computes: its wide key tiles, then its 16-key tiles (masked keys
    included)."""
    return launch.tiles_per_seg * launch.tile.block_m + launch.tail_tiles * SMALL


PRODUCTS = {"fwd": (1, 1), "combine": (1, 1), "dq": (2, 1), "dkdv": (2, 2)}  # (contract over D, D-wide out)


def executed_flops(launches: list[Launch], n: int, p: int, head_dim: int) -> int:
    d0, d1, dc1 = head_chunks(head_dim)

    def per_pair(contract, out):
        return 2 * (contract * (d0 + dc1) + out * (d0 + d1))

    total = 0
    for launch in launches:
        if launch.kernel == "fwd_window":  # window rows: prefix + window keys; prefix rows: their windows
            step, t = launch.tile.block_n, launch.seg_len
            wide, tails = launch.tiles_per_seg * launch.tile.block_m, launch.tail_tiles * SMALL
            total += launch.n_seg * wide * (_walked(p, SMALL) + _walked(t, step)) * per_pair(1, 1)
            # the 16-row programs (tails, prefix queries) walk keys in 16-wide steps
            total += launch.n_seg * tails * (_walked(p, SMALL) + _walked(t, SMALL)) * per_pair(1, 1)
            if launch.n_part:
                prefix_rows = launch.prefix_programs // launch.n_part * SMALL
                total += prefix_rows * launch.n_seg * _walked(t, SMALL) * per_pair(1, 1)
            continue
        if launch.kernel == "window":  # keys x (prefix queries: 4 products, window queries: 5)
            t, step = launch.seg_len, launch.tile.block_n
            key_rows = window_key_rows(launch)
            one = key_rows * (_walked(p, SMALL) * per_pair(2, 2) + _walked(t, step) * per_pair(2, 3))
            one += -(-t // step) * step * _walked(p, SMALL) * per_pair(2, 1)  # dQ's prefix keys
            total += launch.n_seg * one
            continue
        per = per_pair(*PRODUCTS[launch.kernel])
        total += launch.programs * launch.tile.block_m * _columns(launch, n, p) * per
    return total


def planned_bytes(launches: list[Launch], n: int, p: int, head_dim: int, es: int, backward: bool) -> int:
    """HBM bytes of one (batch, head) under the module docstring's model."""
    row = head_dim * es
    n_part = sum(launch.n_part for launch in launches)
    partials = n_part * p * (head_dim + 2) * 4  # the prefix queries' fp32 (acc, m, l) per group of windows
    total = 0
    for launch in launches:
        if launch.kernel == "fwd_window":
            window_rows = launch.n_seg * launch.seg_len
            total += window_rows * (2 * row + 4)  # q read, o + lse written
            total += (p + window_rows) * 2 * row  # k, v: once for the launch
            if launch.n_part:
                total += p * row + partials  # the prefix q read, partial states written
            continue
        rows = min(launch.programs * launch.tile.block_m, launch.n_seg * launch.seg_len)
        if launch.kernel == "combine":  # prefix q, k, v, partial states read, o and lse written
            total += p * (4 * row + 4) + partials
            continue
        walked = (p + launch.n_seg * launch.seg_len) if launch.windowed else n
        if launch.kernel == "window":
            t = launch.seg_len
            total += launch.n_seg * t * (6 * row + 8)  # q, do, lse, delta, k, v read; dk, dv written
            total += p * (2 * row + 8)  # the prefix q, do
            # fp32 dQ sums: written by the first key tile, read and written by each later one, read at the end
            total += launch.n_seg * t * head_dim * 4 * 2 * (launch.tiles_per_seg + launch.tail_tiles)
            total += launch.n_seg * t * row  # dq written
            continue
        if not backward:
            total += rows * (2 * row + 4)  # q read, o + lse written
            total += walked * 2 * row  # k, v
        elif launch.kernel == "dkdv":
            total += rows * 4 * row  # k, v read, dk, dv written
            total += walked * (2 * row + 8)  # q, do, lse, delta
        else:
            total += rows * (3 * row + 8)  # q, do read, dq written, lse, delta
            total += walked * 2 * row  # k, v
    return total


def minimum_bytes(n: int, head_dim: int, es: int, backward: bool) -> int:
    row = head_dim * es
    if backward:  # q, k, v, o, do read (o for delta), dq, dk, dv written, lse read
        return n * (8 * row + 4)
    return n * (4 * row + 4)  # q, k, v read, o written, lse written


def plan_rows(table=None) -> list[dict]:
    """One dict per (problem, pass): the model's numbers (see the module docstring)."""
    table = configs.HOPPER_TABLE if table is None else table
    out = []
    for prob in PROBLEMS:
        n, p, t, d, es = prob.n, PREFIX, prob.window_tokens, prob.head_dim, 2
        pairs = visible_pairs(n, p, t)
        bh = prob.batch * prob.heads
        for name, launches, useful_per_pair, backward in (
            ("fwd", forward_plan(n, p, t, d, es, table), 4 * d, False),
            ("bwd", backward_plan(n, p, t, d, es, table), 10 * d, True),
        ):
            useful = useful_per_pair * pairs
            executed = executed_flops(launches, n, p, d)
            planned = planned_bytes(launches, n, p, d, es, backward)
            if backward:
                planned += n * (2 * d * es + 4)  # the delta kernel: o, do read, delta written
            minimum = minimum_bytes(n, d, es, backward)
            out.append(dict(
                problem=prob.name, pass_=name, n=n, head_dim=d, window=prob.window,
                launches=len(launches) + (1 if backward else 0),
                useful_tflop=useful * bh / 1e12, executed_tflop=executed * bh / 1e12, mma_ratio=executed / useful,
                min_mb=minimum * bh / 2**20, planned_mb=planned * bh / 2**20, bytes_ratio=planned / minimum,
                tiles=", ".join(sorted({f"{x.kernel}:{x.tile.block_m}x{x.tile.block_n}" for x in launches})),
                problem_spec=asdict(prob),
            ))  # fmt: skip
    return out


def threshold_failures(rows: list[dict]) -> list[str]:
    """The rows that break the plan's limits, as readable lines (empty: all met)."""
    failures = []
    for r in rows:
        key = "global" if r["window"] == 0 else r["window"]
        if r["pass_"] == "fwd" and key in FWD_MMA_LIMIT and r["mma_ratio"] > FWD_MMA_LIMIT[key]:
            failures.append(f"{r['problem']} fwd: executed/useful MMA {r['mma_ratio']:.3f} > {FWD_MMA_LIMIT[key]}")
        if r["pass_"] == "bwd" and r["mma_ratio"] > BWD_MMA_LIMIT:
            failures.append(f"{r['problem']} bwd: executed/5-matmul {r['mma_ratio']:.3f} > {BWD_MMA_LIMIT}")
        if r["pass_"] == "fwd" and r["window"] and r["bytes_ratio"] > FWD_BYTES_LIMIT:
            failures.append(f"{r['problem']} fwd: planned/minimum bytes {r['bytes_ratio']:.3f} > {FWD_BYTES_LIMIT}")
    return failures


def format_plan(rows: list[dict]) -> str:
    head = (
        "problem",
        "pass",
        "N",
        "D",
        "launches",
        "useful TFLOP",
        "executed/useful",
        "min MB",
        "planned/min",
        "tiles",
    )
    lines = [head]
    for r in rows:
        lines.append((r["problem"], r["pass_"], str(r["n"]), str(r["head_dim"]), str(r["launches"]),
                      f"{r['useful_tflop']:.2f}", f"{r['mma_ratio']:.3f}", f"{r['min_mb']:.0f}",
                      f"{r['bytes_ratio']:.3f}", r["tiles"]))  # fmt: skip
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


# ----------------------------------------------------------------------------------------
# compiled facts of the configurations the problems launch (sm_90)
# ----------------------------------------------------------------------------------------
KERNEL_NAMES = {
    "fwd": "attn_fwd_kernel",
    "fwd_window": "attn_fwd_window_kernel",
    "combine": "attn_fwd_prefix_combine_kernel",
    "dq": "attn_bwd_dq_kernel",
    "dkdv": "attn_bwd_dkdv_kernel",
    "window": "attn_bwd_window_kernel",
}


def launch_constexprs(launch: Launch, head_dim: int, use_tma: bool) -> dict:
    """The constexprs ``attention.py`` passes for ``launch``."""
    from ._attention_plan import chunk_constexprs

    out = dict(**chunk_constexprs(head_dim), BLOCK_S=SMALL)
    tile = launch.tile
    if launch.kernel == "combine":
        return out | {"BLOCK_N": tile.block_n}
    rows, cols = ("BLOCK_N", "BLOCK_M") if launch.kernel in ("dkdv", "window") else ("BLOCK_M", "BLOCK_N")
    out |= {rows: tile.block_m, cols: tile.block_n}
    if launch.kernel == "window":
        return out
    if launch.kernel in ("fwd", "fwd_window"):
        return out | {"USE_TMA": use_tma}
    return out | {"WINDOWED": launch.windowed}


def blocks_per_sm(regs: int, shared: int, num_warps: int) -> int:
    """Resident blocks per sm_90 SM: 64K registers (allocated per warp in units of 256), 228 KB of shared
    memory (1 KB reserved per block), at most 64 warps and 32 blocks."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = 65536 // (per_warp * num_warps)
    by_shared = (228 * 1024) // (shared + 1024)
    return max(0, min(by_regs, by_shared, 64 // num_warps, 32))


def compiled_facts(jobs: int = 2) -> list[dict]:
    """Compile (sm_90, bf16) every configuration the problems' plans launch; one dict per configuration."""
    import concurrent.futures
    import multiprocessing

    from .audit import collect_configs

    registry = [c for c in collect_configs(["attn"]) if 90 in c.archs and c.signature.get("Q") == "*bf16"]
    wanted: dict[int, object] = {}
    used_by: dict[int, set[str]] = {}
    for prob in PROBLEMS:
        n, t, d = prob.n, prob.window_tokens, prob.head_dim
        for launches in (forward_plan(n, PREFIX, t, d, 2, configs.HOPPER_TABLE),
                         backward_plan(n, PREFIX, t, d, 2, configs.HOPPER_TABLE)):  # fmt: skip
            for launch in launches:
                want = launch_constexprs(launch, d, configs.uses_tma(configs.HOPPER_TABLE, 2))
                options = (launch.tile.num_warps, launch.tile.num_stages)
                regs_cap = (
                    configs.fwd_max_regs(configs.HOPPER_TABLE, d, 2, launch.tile, True)
                    if launch.kernel in ("fwd", "fwd_window")
                    else None
                )
                match = [i for i, c in enumerate(registry) if c.name == KERNEL_NAMES[launch.kernel]
                         and all(c.constexprs.get(k) == v for k, v in want.items())
                         and (c.num_warps, c.num_stages) == options and c.max_regs == regs_cap]  # fmt: skip
                if len(match) != 1:
                    raise RuntimeError(f"{prob.name}: {launch} matches {len(match)} audited configurations")
                wanted[match[0]] = registry[match[0]]
                used_by.setdefault(match[0], set()).add(prob.name)

    from . import audit

    order = sorted(wanted)
    audit._CONFIGS[:] = [registry[i] for i in order]  # the audit's forked workers read them from there
    work = [(i, 90) for i in range(len(order))]
    if jobs > 1 and len(work) > 1:
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            results = list(pool.map(audit._audit_job, work))
    else:
        results = [audit._audit_job(job) for job in work]
    out = []
    for index, r in zip(order, results):
        cfg = registry[index]
        ops = r.tensor_cores.split("+")
        out.append(dict(
            kernel=r.kernel, config=r.label.split(" | ")[0], regs=r.regs, shared_kb=(r.shared or 0) / 1024,
            spills=(r.spill_stores or 0) + (r.spill_loads or 0), num_warps=cfg.num_warps,
            blocks_per_sm=blocks_per_sm(r.regs or 255, r.shared or 0, cfg.num_warps) if not r.error else 0,
            hgmma="HGMMA" in ops, tma="UTMALDG" in ops, error=r.error, problems=len(used_by[index]),
        ))  # fmt: skip
    return out


def format_facts(facts: list[dict]) -> str:
    head = ("kernel", "config", "regs", "shared KB", "blocks/SM", "HGMMA", "TMA", "spills", "problems")
    lines = [head]
    for f in facts:
        lines.append((f["kernel"], f["config"], str(f["regs"]), f"{f['shared_kb']:.1f}", str(f["blocks_per_sm"]),
                      "yes" if f["hgmma"] else "no", "yes" if f["tma"] else "no", str(f["spills"]),
                      str(f["problems"])))  # fmt: skip
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)
