"""Launch plans of the loss kernels (block sizes, warps, passes) and a static bytes model built on them.

The host wrappers of ``shifted_mse``, ``mesa_loss`` and ``angular_loss`` choose their block sizes with
the plan functions below, so the bytes and launch counts reported by :func:`loss_plan_rows` follow
the code: change a plan and the model changes with it. Pure Python (no Triton, no tensors).

Launches per loss call (every op, ``n`` = rows of the main kernel, ``g`` = whether a gradient is kept)::

    forward:  main kernel (if n > 0)  ->  finish kernel (always: loss = sum / N and 1 / N, no host sync)
    backward: one scale kernel (if g and the gradient is not empty): grad * (grad_output / N)

The main kernel writes one partial sum and one cell count per program; the finish kernel reduces
them in a fixed order (deterministic, no atomics). Without a gradient (``torch.no_grad()`` or an
input that does not require grad) the main kernel runs its loss-only variant and nothing is stored.

Bytes (a *model*: counted from the plan, not measured)::

    bytes_min      inputs read once + the gradient written once in the input's dtype (the fused ideal)
    bytes_planned  what the forward launches read and write: each input element read ``passes``
                   times (1 for the register-resident and single-sweep plans; 3 for the chunked
                   fallbacks, whose 2nd and 3rd sweeps re-read the program's rows from L1/L2 right
                   after the first: counted as L2-or-HBM bytes), the shift gathers, the stored
                   gradient, the per-program partials and the finish kernel
    bytes_backward the backward scale pass: the stored gradient read once and written once

Storing the gradient and scaling it in backward costs ``bytes_backward`` (2/3 of ``bytes_min`` for
equal dtypes) on top of the forward, because ``grad_output`` is only known in backward; recomputing
the gradient there instead would re-read both inputs (more). So ``bytes_planned / bytes_min`` judges
the forward plan and ``(bytes_planned + bytes_backward) / bytes_min`` is ~5/3 by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

# Elements of one input that one thread of the register-resident kernels holds per tile: the register
# budget. MESA keeps s and t in fp32 plus the normalised s and d until the gradient is formed (64 per
# lane: ~100-220 registers on sm_80..sm_120, no spills); angular keeps x, y, x^, y^ and the chords, twice
# that live state (64 per lane spilled on sm_90, so 32). A row wider than one warp's share is split
# over several warps at SPLIT_ELEMS_PER_THREAD per lane (MESA at 64 per lane over two warps reached
# 255 registers on sm_100: too close to spilling).
MESA_ELEMS_PER_THREAD = 64
ANGULAR_ELEMS_PER_THREAD = 32
SPLIT_ELEMS_PER_THREAD = 32
THREADS_PER_WARP = 32
# Register-resident plans cover C up to this many channels; wider rows take the chunked fallback.
MAX_RESIDENT_C = 4096
# Row-tile widths of the register-resident plans: C is padded up to the next one (masked lanes move no bytes).
RESIDENT_BLOCK_C = (64, 256, 1024, 2048, 4096)
# The chunked fallbacks: one row per 4-warp program, C swept in chunks of this width.
CHUNK_C = 2048
CHUNK_WARPS = 4
# shifted_mse: (BLOCK_R x BLOCK_C) tiles of 2048 elements, one sweep over C.
SHIFTED_TILE = 2048
SHIFTED_WARPS = 4
# Second-stage and backward kernels.
FINISH_BLOCK = 1024
FINISH_WARPS = 4
SCALE_BLOCK = 2048
SCALE_WARPS = 4
# Bytes per shift gather: dy and dx as int64, loaded once per row of the main kernel.
SHIFT_BYTES_PER_ROW = 16
# Per-program partials (fp32 sum + fp32 cell count) written by the main kernel, read by the finish kernel.
PARTIAL_BYTES = 8

OPS = ("shifted_mse", "mesa_loss", "angular_loss")


@dataclass(frozen=True)
class KernelPlan:
    """How the main kernel of a loss tiles its rows: ``block_r`` rows x ``block_c`` channels per program.

    ``resident``: the program's rows are held in registers whole (``block_c >= C``), so every input
    element is loaded once; else C is swept in ``block_c`` chunks. ``passes``: how many times each
    input element is loaded.
    """

    block_r: int
    block_c: int
    num_warps: int
    resident: bool
    passes: int

    def grid(self, n_rows: int) -> int:
        return -(-n_rows // self.block_r)


def _resident_or_chunked(C: int, elems_per_thread: int) -> KernelPlan:
    """MESA / angular: register-resident rows when C fits, else the 3-sweep chunked kernel.

    Resident: ``elems_per_thread`` elements of each input per lane; rows of up to 32 x that many
    channels get one-warp programs owning whole rows (every row reduction is warp shuffles: no shared
    memory, no barrier), wider rows one program of several warps per row.
    """
    if C > MAX_RESIDENT_C:
        return KernelPlan(block_r=1, block_c=CHUNK_C, num_warps=CHUNK_WARPS, resident=False, passes=3)
    block_c = next(b for b in RESIDENT_BLOCK_C if b >= C)
    tile = elems_per_thread * THREADS_PER_WARP
    if block_c <= tile:  # one warp, whole rows
        return KernelPlan(block_r=tile // block_c, block_c=block_c, num_warps=1, resident=True, passes=1)
    num_warps = block_c // (SPLIT_ELEMS_PER_THREAD * THREADS_PER_WARP)
    return KernelPlan(block_r=1, block_c=block_c, num_warps=num_warps, resident=True, passes=1)


def mesa_plan(C: int) -> KernelPlan:
    """C <= 2048 (the paper's 1280): one warp per row (or rows); C in (2048, 4096]: four warps per row
    (a 4096-channel row of s and t in fp32 is 256 values per lane of one warp: it would spill)."""
    return _resident_or_chunked(C, MESA_ELEMS_PER_THREAD)


def angular_plan(C: int) -> KernelPlan:
    """C <= 1024: one warp per row (or rows); the paper's 1152 / 1536 two warps per row, 4096 four."""
    return _resident_or_chunked(C, ANGULAR_ELEMS_PER_THREAD)


def shifted_mse_plan(C: int) -> KernelPlan:
    """One sweep over C in chunks: each element is loaded once and only a running sum of squares per
    row outlives its chunk, so there is nothing to hold in registers: no register-resident layout needed."""
    block_c = 16 if C <= 16 else 64 if C <= 64 else 256
    block_r = SHIFTED_TILE // block_c
    return KernelPlan(block_r=block_r, block_c=block_c, num_warps=SHIFTED_WARPS, resident=False, passes=1)


PLANS = {"shifted_mse": shifted_mse_plan, "mesa_loss": mesa_plan, "angular_loss": angular_plan}


def scale_grid(numel: int) -> int:
    return -(-numel // SCALE_BLOCK)


def forward_launches(plan: KernelPlan, n_rows: int) -> tuple[str, ...]:
    """Kernels the forward launches, in order."""
    return (("main",) if plan.grid(n_rows) > 0 else ()) + ("finish",)


def backward_launches(numel: int, grad_stored: bool) -> tuple[str, ...]:
    return ("scale",) if grad_stored and scale_grid(numel) > 0 else ()


def count_launches(op: str, n_rows: int, C: int, grad_stored: bool) -> int:
    """Kernel launches of one forward (+ backward when a gradient is stored) of ``op``."""
    plan = PLANS[op](C)
    return len(forward_launches(plan, n_rows)) + len(backward_launches(n_rows * C, grad_stored))


def traffic(
    op: str,
    n_rows: int,
    C: int,
    s_bytes: int,
    t_bytes: int,
    grad_bytes: int,
    valid_rows: int | None = None,
    grad_stored: bool = True,
) -> dict[str, int]:
    """The bytes model of one call: see the module docstring.

    ``s_bytes`` / ``t_bytes``: bytes per element of the two inputs; ``grad_bytes``: of the stored
    gradient (``shifted_mse.grad_dtype``); ``valid_rows``: rows in Omega (default: all; cells off
    Omega load no input). The returned gradient has the student's dtype.
    """
    plan = PLANS[op](C)
    valid = n_rows if valid_rows is None else valid_rows
    grid = plan.grid(n_rows)
    reads = valid * C * (s_bytes + t_bytes) * plan.passes
    if op != "angular_loss":
        reads += n_rows * SHIFT_BYTES_PER_ROW
    grad_write = n_rows * C * grad_bytes if grad_stored else 0
    partials = grid * PARTIAL_BYTES
    finish = partials + 8  # reads the partials, writes loss and 1 / N
    backward = (n_rows * C * (grad_bytes + s_bytes) + 8) if backward_launches(n_rows * C, grad_stored) else 0
    return {
        "bytes_min": n_rows * C * (s_bytes + t_bytes) + (n_rows * C * s_bytes if grad_stored else 0),
        "bytes_planned": reads + grad_write + partials + finish,
        "bytes_backward": backward,
        "launches": count_launches(op, n_rows, C, grad_stored),
    }


# The paper's problem sizes: a ViT-H/16 student at 1024 px (64 x 64 patches), batch 16, matched to
# teachers of width 1280 / 1536 / 4096; MESA on the student's own 1280-wide features; summaries of
# a batch of 1024 against teachers of width 1152 / 1536 / 4096. bf16 throughout, zero shift (full overlap).
PAPER_MAP = (16, 64, 64)
PAPER_TEACHER_C = (1280, 1536, 4096)
PAPER_MESA_C = (1280,)
PAPER_SUMMARY_ROWS = 1024
PAPER_SUMMARY_C = (1152, 1536, 4096)
BF16_BYTES = 2


def paper_problems() -> list[tuple[str, tuple[int, ...]]]:
    """(op, input shape) of every paper-size problem: (B, H, W, C) maps or (B, C) summaries."""
    B, H, W = PAPER_MAP
    problems = [("shifted_mse", (B, H, W, C)) for C in PAPER_TEACHER_C]
    problems += [("mesa_loss", (B, H, W, C)) for C in PAPER_MESA_C]
    problems += [("angular_loss", (PAPER_SUMMARY_ROWS, C)) for C in PAPER_SUMMARY_C]
    return problems


def loss_plan_rows() -> list[dict]:
    """One dict per (op, paper problem), bf16: op, problem, bytes_min, bytes_planned, bytes_backward,
    launches (forward + backward), grad_stored, and the plan (block_r, block_c, num_warps, passes)."""
    rows = []
    for op, shape in paper_problems():
        *lead, C = shape
        n_rows = 1
        for d in lead:
            n_rows *= d
        plan = PLANS[op](C)
        dims = "x".join(map(str, shape))
        problem = f"({dims}) bf16" + ("" if op == "angular_loss" else " shift=0")
        row = {"op": op, "problem": problem}
        row.update(traffic(op, n_rows, C, BF16_BYTES, BF16_BYTES, BF16_BYTES))
        row.update(
            grad_stored=True,
            block_r=plan.block_r,
            block_c=plan.block_c,
            num_warps=plan.num_warps,
            passes=plan.passes,
            resident=plan.resident,
        )
        rows.append(row)
    return rows
