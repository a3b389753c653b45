"""Tile shapes of the attention kernels, per GPU architecture, launch, head-dim block and dtype width.

Four GPU tables exist, picked by ``table_for_capability`` from the compute capability of the current
CUDA device (the target Triton compiles for):

    HOPPER_TABLE     sm_90 (H100 / H200): 227 KB of shared memory per block; audited for sm_90
    BLACKWELL_TABLE  sm_100 (B200): the Hopper tiles where sm_100's compiler kept v1 spill-free; not
                     re-audited for v2, so not shipped (see SHIPPED_ARCHS); also sm_103 / sm_110
    AMPERE_TABLE     sm_80 (A100) and sm_87 (Jetson Orin) (163 KB; audited for sm_80)
    CONSUMER_TABLE   sm_86 / sm_89 (RTX 30xx / 40xx, A10, L4, L40) and sm_120 / sm_121 (RTX 50xx,
                     GB10): 99 KB of shared memory per block; audited for sm_86, sm_89 and sm_120

The v2 kernels ship where their tiles are re-audited (``SHIPPED_ARCHS``: sm_80, sm_86, sm_89, sm_90 and
sm_120, fp16 / bf16 / fp32); the sm_100 table is not re-tuned yet (33 of its 374 configurations spill),
so B200-class GPUs run the PyTorch path until it is.
GPUs before sm_80 (T4, V100: 64-96 KB, no bf16 tensor cores) get no table: ``unsupported_capability``
says why, and ``backend="auto"`` falls back to PyTorch there. Under the Triton interpreter one small
table is pinned (``INTERPRET_TABLE``): tiles of 16-32 so that tests with N ~ 100 cross many block and
window boundaries.

Every entry of a shipped table is compiled by the static audit (``python -m radio_kernels.audit``) for
the architectures it ships to (``AUDIT_CONFIGS`` below): no register spills, shared memory within the
per-block limit (227 KB on sm_90, 163 KB on sm_80, 99 KB on sm_86 / sm_89 / sm_120), and HGMMA (wgmma)
in the sm_90 SASS of the 16-bit fwd / dq / dkdv tiles of 64+ rows.

Launches (``rows`` = what a program owns, ``cols`` = what its inner loop walks):

    fwd / dq            rows = queries, cols = keys; global, or the patch queries of windowed mode
                        (the windowed forward's 16-row tails and prefix programs ride in its launch)
    fwd_prefix          the combine of the windowed forward's prefix queries (16 rows)
    dq_prefix           the P prefix queries of windowed mode, which see all N keys:
                        few rows, so a 16-row tile and a long inner loop; also 16-row window tails
    dkdv                rows = keys, cols = queries
    dkdv_prefix         the prefix keys, seen by all N queries
    delta               rowsum(dO * O), no inner loop

Windowed launches with small windows (T < 128) take the "narrow" 64-row variant: a 128-row tile
would straddle two or more windows and mask (and waste) half of every block. Prefix columns in
windowed launches are walked in blocks of BLOCK_P = 16 (ceil(P / 16) of them), not a full BLOCK_N,
since P is ~10.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

from ._backend import interpreter_enabled


@dataclass(frozen=True)
class Tile:
    block_m: int  # rows per program
    block_n: int  # columns per inner-loop step
    num_warps: int
    num_stages: int


LAUNCHES = ("fwd", "fwd_prefix", "dq", "dq_prefix", "dkdv", "dkdv_prefix", "delta")
BLOCK_DS = (16, 32, 64, 128)
NARROW_WINDOW = 128  # windows shorter than this use the narrow variant of fwd / dq / dkdv
# The architectures the audit compiles for (one table may serve several).
HOPPER, BLACKWELL, AMPERE, CONSUMER, CONSUMER_ADA, CONSUMER_BLACKWELL = 90, 100, 80, 86, 89, 120

TileKey = tuple[str, int, int, bool]  # (launch, BLOCK_D, bytes per element, narrow)


def _hopper_tiles(bd: int, es: int) -> dict[tuple[str, bool], Tile]:
    """(launch, narrow) -> Tile on sm_90 for head-dim block bd and element size es (bytes)."""
    # 128-row tiles take two warpgroups (8 warps): one wgmma M=64 slice each, and half the
    # registers per thread of a 4-warp tile (which spills in dK/dV).
    t = {
        ("fwd", False): Tile(128, 64, 8, 3),
        ("fwd", True): Tile(64, 64, 4, 3),
        ("fwd_prefix", False): Tile(16, 128 if bd * es <= 128 else 64, 4, 3),
        ("dq", False): Tile(128, 32, 8, 3),
        ("dq", True): Tile(64, 32, 4, 3),
        ("dq_prefix", False): Tile(16, 64, 4, 3),
        ("dkdv", False): Tile(128, 32, 8, 3),
        ("dkdv", True): Tile(64, 32, 4, 3),
        ("dkdv_prefix", False): Tile(16, 64, 4, 3),
        ("delta", False): Tile(64, 0, 4, 1),
    }
    if es == 2 and bd == 128:
        # 16 keys x 64-query steps spill 4-8 B at D = 72 / 80 (the two head-dim chunks): 32-query steps;
        # the narrow 64-key dK/dV spills 20 B at D = 128 on 4 warps: 8.
        t["dkdv_prefix", False] = Tile(16, 32, 4, 3)
        t["dkdv", True] = Tile(64, 32, 8, 3)
    if bd <= 32:
        # Tiny rows: some 16-row prefix tiles spill a few bytes at 3 stages or 128 columns (ptxas, sm_90a).
        t["fwd_prefix", False] = Tile(16, 64, 4, 3)
        t["dq_prefix", False] = Tile(16, 64, 4, 2)
        t["dkdv_prefix", False] = Tile(16, 64, 4, 2)
    if es == 4 and bd == 128:
        # float32 rows of 512 bytes: TF32 wgmma wants both operands K-major, and dK/dV's
        # p^T dO and ds^T Q are not, so the transposes cost registers. These tiles are the largest
        # that ptxas keeps spill-free; dK/dV and the narrow dQ fall back to mma.sync (HMMA).
        t.update({
            ("fwd", False): Tile(128, 32, 8, 3),
            ("fwd", True): Tile(64, 32, 8, 3),
            ("fwd_prefix", False): Tile(16, 32, 4, 3),
            ("dq", True): Tile(32, 32, 4, 2),  # v2: 3 stages spill 4-8 B at D = 72 / 96
            ("dq_prefix", False): Tile(16, 32, 8, 3),  # v2: 4 warps spill 4-16 B at D = 72 / 128
            ("dkdv", False): Tile(32, 16, 8, 2),  # v2: 32 x 32 spills 20-304 B at D = 72-96
            ("dkdv", True): Tile(32, 16, 8, 2),
            ("dkdv_prefix", False): Tile(16, 16, 8, 3),  # v2: 16 x 32 spills 8-108 B at D = 72 / 80
        })  # fmt: skip
    if es == 4 and bd <= 64:
        # float32 16-row dQ: 4 warps spill 4-8 B in the windowed prefix / tail rows (D = 32, 64); 8 warps do not.
        t["dq_prefix", False] = Tile(16, 64, 8, t["dq_prefix", False].num_stages)
    return t


def _ampere_tiles(bd: int, es: int) -> dict[tuple[str, bool], Tile]:
    """(launch, narrow) -> Tile on sm_80: the Hopper tiles where ptxas keeps them spill-free.

    sm_80 has no wgmma: mma.sync keeps the accumulators *and* the A operands in registers (wgmma
    reads them from shared memory), and an sm_80 block gets 163 KB of shared memory, not 227 KB.
    Each override below is the largest tile ptxas (sm_80, Triton's flags) keeps spill-free for
    every head dim of the block (D = 72 / 80, with masked columns, need the most registers).
    """
    t = _hopper_tiles(bd, es)
    if es == 2 and bd == 128:
        # Forward: 128 x 64 scores plus the 128 x D accumulator spill; 32-key steps keep 128 rows.
        t["fwd", False] = Tile(128, 32, 8, 3)
        # dK/dV: the 128-key tile keeps dK, dV (128 x D fp32 each) and K, V in registers and
        # spills 40-104 B at 4 or 8 warps; 64 keys over 8 warps need ~200 registers a thread.
        t["dkdv", False] = Tile(64, 32, 8, 3)
        t["dkdv", True] = Tile(64, 32, 8, 3)
        t["dq", True] = Tile(64, 32, 8, 3)  # 4 warps spill 8 B at D = 72 in the narrow windowed dQ
    if es == 2 and bd == 16:
        t["fwd", True] = Tile(64, 64, 4, 2)  # 3 stages spill 4 B in the narrow windowed forward
    if es == 4 and bd == 128:
        # Hopper's 128-row fp32 dQ needs 180 KB of shared memory (> 163 KB) and spills.
        t["dq", False] = Tile(64, 32, 8, 3)
        # dK/dV: 32 x 32 spills 28-224 B at D = 72-96 (windowed most), 8 warps on 16-query steps do not;
        # the 16-key tile spills 12-92 B with 32-query steps.
        t["dkdv", False] = t["dkdv", True] = Tile(32, 16, 8, 3)
        t["dkdv_prefix", False] = Tile(16, 16, 4, 3)
        t["dq", True] = Tile(32, 32, 8, 3)  # 4 warps spill 4 B at D = 96 in the narrow windowed dQ
    if es == 4 and bd == 32:
        t["dq", False] = Tile(128, 32, 4, 3)  # 8 warps: ptxas stops at 128 registers and spills 12 B (windowed)
    if es == 4 and bd == 64:
        t["dkdv", True] = Tile(64, 16, 4, 3)  # 32-query steps spill 8 B in the narrow windowed dK/dV
    return t


def _blackwell_tiles(bd: int, es: int) -> dict[tuple[str, bool], Tile]:
    """(launch, narrow) -> Tile on sm_100 (B200): the Hopper tiles, cut where the audit needs it.

    sm_100 has Hopper's 227 KB of shared memory and register file; Triton's tl.dot becomes tcgen05
    (accumulators in tensor memory) instead of wgmma, and sm_100's ptxas spills a few tiles that
    sm_90's keeps in registers. Each override is the largest tile that compiles spill-free for sm_100
    for every head dim of the block.
    """
    t = _hopper_tiles(bd, es)
    overrides = {
        (2, 32): {("dkdv_prefix", False): Tile(16, 64, 4, 1)},  # v2: 2 stages spill 4 B at D = 32
        (2, 64): {("fwd_prefix", False): Tile(16, 64, 4, 3), ("delta", False): Tile(64, 0, 8, 1)},
        (2, 128): {("dq", True): Tile(64, 32, 8, 3)},  # v2: 4 warps spill 4-8 B at D = 72 / 128 (narrow dQ)
        (4, 16): {("dkdv", False): Tile(128, 32, 8, 2)},
        (4, 32): {("dkdv", False): Tile(128, 32, 8, 2)},
        (4, 64): {("fwd", False): Tile(128, 32, 8, 3)},
        (4, 128): {
            ("dq", True): Tile(64, 16, 4, 2),
            ("dkdv", False): Tile(32, 16, 4, 3),
            ("dkdv", True): Tile(32, 16, 4, 3),
        },
    }
    t.update(overrides.get((es, bd), {}))
    return t


def _consumer_tiles(bd: int, es: int) -> dict[tuple[str, bool], Tile]:
    """(launch, narrow) -> Tile on sm_86 / sm_89 / sm_120: the Ampere tiles, cut where the audit needs it.

    These GPUs have the A100's mma.sync and register file but 99 KB of shared memory per block, not
    163 KB; and sm_120's ptxas spills a few tiles that sm_80's keeps in registers. Each override is
    the largest tile (rows, then columns, then stages) that compiles spill-free within 99 KB on both
    sm_86 and sm_120 for every head dim of the block. fp32 with D > 64 shrinks most: its forward and
    dQ tiles kept a 128 x 128 fp32 Q (or dO) block and three stages of K / V (104-128 KB).
    """
    t = _ampere_tiles(bd, es)
    overrides = {
        (2, 16): {("dq", False): Tile(128, 32, 4, 3)},  # v2: 8 warps stop at 64 registers, spill 4 B on sm_86 / 89
        (2, 32): {("fwd", False): Tile(128, 32, 8, 3)},
        (2, 64): {("fwd_prefix", False): Tile(16, 64, 4, 3)},
        (2, 128): {  # the narrow forward's tile: _WINDOW_FORWARD
            ("dq", False): Tile(128, 32, 8, 2),
            # v2 dK/dV: 64 x 32 spills 12-56 B at D = 72 / 96 (windowed) on sm_120 / sm_89, 64 x 16 on
            # sm_86 (D = 96 / 128) or sm_120 (D = 72), 32 x 32 at D = 96 on sm_120.
            ("dkdv", False): Tile(32, 16, 8, 3),
            ("dkdv", True): Tile(32, 16, 8, 3),
        },
        # dK/dV at D = 32: 128 x 32 spills 12 B on sm_120 (windowed); 16-query steps keep the 128 keys.
        # v2 narrow dK/dV at D = 32: 4 warps spill 16 B on sm_86 / sm_89.
        (4, 32): {
            ("fwd", True): Tile(64, 32, 4, 3),
            ("dkdv", False): Tile(128, 16, 8, 3),
            ("dkdv", True): Tile(64, 32, 8, 3),
        },
        (4, 64): {
            ("dq", True): Tile(64, 32, 8, 3),
            ("dq_prefix", False): Tile(16, 64, 4, 3),  # Hopper's 8 warps spill 4 B on sm_120 (windowed tail)
            ("dkdv", False): Tile(32, 32, 4, 3),
            ("dkdv", True): Tile(32, 32, 4, 3),
        },
        (4, 128): {  # the forward's tiles: _WINDOW_FORWARD
            # v2 dQ: 64 x 16 spills 8-24 B at D = 80 / 96 on sm_120 (4 or 8 warps), 32 x 16 and 16 x 32 at
            # D = 96 / 72; 16 x 16 on 8 warps does not.
            ("dq", False): Tile(16, 16, 8, 2),
            ("dq", True): Tile(16, 16, 8, 2),
            ("dq_prefix", False): Tile(16, 16, 8, 2),  # v2: 16 x 32 spills 4-12 B at D = 72-128 on sm_120
            # dK/dV at D = 72 spill 12-32 B on sm_120 / sm_86 with 32 keys, or 16 keys on 4 warps: 8 warps.
            ("dkdv", False): Tile(16, 16, 8, 3),
            ("dkdv", True): Tile(16, 16, 8, 3),
            ("dkdv_prefix", False): Tile(16, 16, 8, 3),
        },
    }
    t.update(overrides.get((es, bd), {}))
    return t


# The windowed forward (``attn_fwd_window_kernel``: wide tiles, 16-row tails and prefix programs in one
# binary, sized by its widest branch) needs more registers than the global forward with the same tile.
# Where it spilled, these entries replace the table's (es, bd) -> {(launch, narrow): Tile}: the narrow
# tile serves the windowed forward only; the wide one and fwd_prefix (the combine) serve the global
# forward too. Each is the first of 8 warps, 2 stages, 32 columns, 32 rows that compiled spill-free
# for every head dim of the block on the table's architectures.
_WINDOW_FORWARD = {
    "ampere": {
        (2, 128): {("fwd", True): Tile(64, 64, 8, 3)},
        (4, 64): {("fwd", True): Tile(64, 64, 8, 3)},
        (4, 128): {("fwd", True): Tile(32, 32, 8, 2)},
    },
    "blackwell": {
        (2, 32): {("fwd", False): Tile(128, 32, 8, 3)},
        (2, 64): {("fwd", False): Tile(128, 32, 8, 3)},
        (2, 128): {("fwd", True): Tile(64, 64, 8, 2)},
        (4, 128): {("fwd", True): Tile(32, 32, 4, 2), ("fwd_prefix", False): Tile(16, 32, 8, 3)},
    },
    "consumer": {
        (2, 64): {("fwd", True): Tile(64, 64, 8, 3)},
        (2, 128): {("fwd", True): Tile(32, 32, 4, 2)},
        (4, 128): {("fwd", False): Tile(32, 32, 8, 2), ("fwd", True): Tile(32, 32, 8, 2)},
    },
}


def _table(tiles, window_forward=None) -> dict[TileKey, Tile]:
    window_forward = window_forward or {}
    return {
        (launch, bd, es, narrow): tile
        for bd in BLOCK_DS
        for es in (2, 4)
        for (launch, narrow), tile in (tiles(bd, es) | window_forward.get((es, bd), {})).items()
    }


HOPPER_TABLE = _table(_hopper_tiles)
BLACKWELL_TABLE = _table(_blackwell_tiles, _WINDOW_FORWARD["blackwell"])
AMPERE_TABLE = _table(_ampere_tiles, _WINDOW_FORWARD["ampere"])
CONSUMER_TABLE = _table(_consumer_tiles, _WINDOW_FORWARD["consumer"])
# arch -> the table the audit compiles for it (one table may serve several archs).
GPU_TABLES = {
    HOPPER: HOPPER_TABLE,
    BLACKWELL: BLACKWELL_TABLE,
    AMPERE: AMPERE_TABLE,
    CONSUMER: CONSUMER_TABLE,
    CONSUMER_ADA: CONSUMER_TABLE,
    CONSUMER_BLACKWELL: CONSUMER_TABLE,
}
CONSUMER_CAPABILITIES = {(8, 6), (8, 9)}  # and every major >= 12

_INTERPRET_TILE = {
    "fwd": Tile(32, 32, 4, 1),
    "fwd_prefix": Tile(16, 32, 4, 1),
    "dq": Tile(32, 32, 4, 1),
    "dq_prefix": Tile(16, 32, 4, 1),
    "dkdv": Tile(32, 32, 4, 1),
    "dkdv_prefix": Tile(16, 32, 4, 1),
    "delta": Tile(32, 0, 4, 1),
}
INTERPRET_TABLE = {key: _INTERPRET_TILE[key[0]] for key in HOPPER_TABLE}


# The windowed backward's per-window kernel (5 products a pair, dQ summed in place by the program
# owning the window) keeps dK, dV, the window's dQ sums and both head-dim chunks live at once: the
# tiles ptxas keeps spill-free are small, (keys, query step) = (64, 16) at 4 warps and 1 stage, for
# 16-bit inputs and 64 <= D <= 96 (the students' head dims; audited for sm_90). Elsewhere (other
# GPUs, fp32, other D) the windowed backward runs the dK/dV + dQ launches.
WINDOW_HEAD_DIMS = range(64, 97)
# The per-window kernel's (keys, query step) tile. It serves every window size: T // keys full key
# tiles, then the last T mod keys keys in 16-key tiles (a second loop of the same kernel, so a
# 144-token 12 x 12 window is 64 + 64 + 16 keys). Separate 32- or 16-key configurations for such
# windows spilled 8-28 B on sm_90; the one kernel with both loops stays spill-free (255 registers
# at D = 72 / 80, audited).
WINDOW_TILES = {"hopper": Tile(64, 16, 4, 1), "interpret": Tile(32, 16, 4, 1)}


# Keys a prefix program of the windowed forward walks (whole windows, at least one): ~16 key blocks, a
# few times a window tile's walk. The interpreter's is small so that tests cross several groups.
PREFIX_PART_KEYS = {"gpu": 1024, "interpret": 32}


def prefix_part_keys(table) -> int:
    return PREFIX_PART_KEYS["interpret" if table is INTERPRET_TABLE else "gpu"]


def uses_tma(table, elem_size: int) -> bool:
    """Whether the forward's full key blocks load through tensor descriptors (TMA) on ``table``'s GPU:
    Hopper, 16-bit (audited for UTMALDG on sm_90); the interpreter too, so that path is checked
    numerically. The wrapper also needs 16-byte aligned K / V rows (else the pointer path runs)."""
    return table is INTERPRET_TABLE or (table is HOPPER_TABLE and elem_size == 2)


def fwd_max_regs(table, head_dim: int, elem_size: int, tile: Tile, tma: bool) -> int | None:
    """``maxnreg`` of a forward launch: 128 for Hopper's 8-warp 16-bit TMA tiles up to D = 80, so that
    two blocks share an SM (ptxas wants 131-150 otherwise: one block; with the cap it stays spill-free,
    audited), else None (ptxas chooses; the pointer path, for K / V rows that are not 16-byte aligned,
    spills a few bytes under the cap at D = 72)."""
    if table is HOPPER_TABLE and elem_size == 2 and head_dim <= 80 and tile.num_warps == 8 and tma:
        return 128
    return None


def window_tile(table, head_dim: int, elem_size: int, window_tokens: int) -> Tile | None:
    """The per-window backward kernel's tile on ``table``'s GPU for windows of ``window_tokens`` (> 0),
    or None where it does not ship (the dK/dV and dQ launches run instead). Any window size: the
    kernel walks the keys past the last full tile in 16-key tiles."""
    if window_tokens <= 0:
        return None
    if table is INTERPRET_TABLE:
        return WINDOW_TILES["interpret"]
    if table is HOPPER_TABLE and elem_size == 2 and head_dim in WINDOW_HEAD_DIMS:
        return WINDOW_TILES["hopper"]
    return None


def unsupported_capability(major: int, minor: int) -> str | None:
    """None when a device of compute capability ``major.minor`` has a tile table, else the reason."""
    if major < 8:
        return (
            f"the Triton attention kernels need compute capability >= 8.0 (tile tables for sm_80, sm_86, "
            f"sm_89, sm_90, sm_100 and sm_120), got {major}.{minor}"
        )
    return None


# Where the v2 kernels (head-dim chunks, window-aligned tiles, one-launch windowed forward, per-window
# backward, TMA) ship: the architectures and dtypes whose tiles the audit keeps spill-free (log:
# bench/results/audit_attention_v2_2026-12-01.txt); the audit compiles only these. Elsewhere
# ``backend="auto"`` runs the PyTorch path.
SHIPPED_ARCHS = (HOPPER, AMPERE, CONSUMER, CONSUMER_ADA, CONSUMER_BLACKWELL)
SHIPPED_DTYPES = ("fp16", "bf16", "fp32")


def audited_arch(major: int, minor: int) -> int:
    """The audited architecture whose compiler output a device of capability ``major.minor`` runs: sm_86 and
    sm_89 are audited on their own, other minor versions as their family's (sm_87 as sm_80, sm_121 as sm_120)."""
    return major * 10 + (minor if (major, minor) in CONSUMER_CAPABILITIES else 0)


def unshipped_reason(major: int, minor: int, dtype_name: str) -> str | None:
    """None when the kernels ship for compute capability ``major.minor`` and ``dtype_name`` ("bf16"...)."""
    if reason := unsupported_capability(major, minor):
        return reason
    if audited_arch(major, minor) not in SHIPPED_ARCHS:
        audited = ", ".join(f"sm_{arch}" for arch in sorted(SHIPPED_ARCHS))
        return (
            f"the Triton attention kernels (v2) are audited for {audited} so far, got compute capability "
            f"{major}.{minor}"
        )
    if dtype_name not in SHIPPED_DTYPES:
        return f"the Triton attention kernels (v2) on GPUs take {' / '.join(SHIPPED_DTYPES)}, got {dtype_name}"
    return None


def table_for_capability(major: int, minor: int = 0) -> dict[TileKey, Tile]:
    """The GPU table for a device of compute capability ``major.minor`` >= 8.0 (see the module docstring)."""
    if reason := unsupported_capability(major, minor):
        raise ValueError(reason)
    if major >= 12 or (major, minor) in CONSUMER_CAPABILITIES:
        return CONSUMER_TABLE
    if major >= 10:
        return BLACKWELL_TABLE
    return HOPPER_TABLE if major == 9 else AMPERE_TABLE


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    import torch

    return tuple(torch.cuda.get_device_capability(device_index))


def active_table() -> dict[TileKey, Tile]:
    """The interpreter's table, or the one for the current CUDA device (the device Triton compiles for)."""
    if interpreter_enabled():
        return INTERPRET_TABLE
    import torch

    return table_for_capability(*_capability(torch.cuda.current_device()))


def block_d_of(head_dim: int) -> int:
    """Head dims are padded (by masking, in registers) to a power of two >= 16."""
    return max(16, 1 << (head_dim - 1).bit_length())


def pick_tile(launch: str, head_dim: int, elem_size: int, window_tokens: int = 0, table=None) -> Tile:
    table = active_table() if table is None else table
    bd = block_d_of(head_dim)
    narrow = 0 < window_tokens < NARROW_WINDOW and (launch, bd, elem_size, True) in table
    return table[launch, bd, elem_size, narrow]


PREFIX_BLOCK = 16  # C-RADIO's 10 prefix tokens fit one narrow column block


def prefix_block(block_n: int) -> int:
    """Column block for the prefix range of a windowed launch: always 16 (at most BLOCK_N).

    The kernels walk the P prefix columns in ceil(P / 16) such blocks, so one value serves every P
    and the audit compiles every shipped variant; wider prefix blocks spilled for some fp32 / D=128
    tiles and bought nothing for the ~10 prefix tokens a ViT has.
    """
    return min(block_n, PREFIX_BLOCK)


# ----------------------------------------------------------------------------------------
# static GPU audit: every launch the wrappers in attention.py can make, per architecture
# ----------------------------------------------------------------------------------------
AUDIT_HEAD_DIMS = (16, 32, 64, 72, 80, 96, 128)
AUDIT_DTYPES = ("fp16", "bf16", "fp32")
# ``--sample`` (the quick audit of tests/test_audit.py): arch -> (dtype, head dim) whose global
# fwd / dq / dkdv tiles and delta it compiles; the Hopper 16-bit ones must use HGMMA, the Ampere ones
# are the tiles that override Hopper's, and float32 D = 72 is the head dim whose fp32 tiles spill first.
SAMPLE = {
    HOPPER: (("bf16", 64), ("bf16", 128), ("fp32", 72)),
    BLACKWELL: (("bf16", 64), ("bf16", 128)),
    AMPERE: (("bf16", 128), ("fp32", 128)),
    CONSUMER: (("fp32", 128),),
    CONSUMER_ADA: (("fp32", 128),),
    CONSUMER_BLACKWELL: (("bf16", 64), ("fp32", 128)),
}


def _variants(launch: str) -> list[tuple[str, str, bool, bool]]:
    """(label, tile launch, narrow, WINDOWED) of each way attention.py launches dQ or dK/dV (see
    ``_attention_plan``): wide tiles, global or windowed (64-row "narrow" ones for short windows), and
    16-row tiles for prefix rows / global tails (not windowed) and window tails (windowed)."""
    small = launch + "_prefix"
    return [
        ("global", launch, False, False),
        ("windowed", launch, False, True),
        ("windowed-narrow", launch, True, True),
        ("rows16", small, False, False),
        ("windowed-rows16", small, False, True),
    ]


def AUDIT_CONFIGS():  # noqa: N802 (name fixed by radio_kernels._audit_registry)
    """One AuditConfig per (arch, launch, head dim, dtype, variant) of the GPU tables.

    Each entry names the one arch whose table it comes from; the audit merges entries that
    compile to the same binary (e.g. a tile both tables share) and compiles each once per arch.
    Strides are plain i32 arguments scaled by STRIDE_UNIT, as attention.py passes them: 16 when
    D is a multiple of 16, 8 otherwise (D = 72: its head stride). On sm_90 every 16-bit tile of 64+
    rows must use HGMMA (wgmma): without it the Hopper kernels run at mma.sync speed.
    """
    from ._attention_kernels import (
        attn_bwd_delta_kernel,
        attn_bwd_dkdv_kernel,
        attn_bwd_dq_kernel,
        attn_bwd_window_kernel,
        attn_fwd_kernel,
        attn_fwd_prefix_combine_kernel,
        attn_fwd_window_kernel,
    )
    from ._attention_plan import SMALL, chunk_constexprs
    from ._audit_registry import AuditConfig, signature_of

    floats = ("qk_scale", "sm_scale")
    kernels = {"dq": attn_bwd_dq_kernel, "dkdv": attn_bwd_dkdv_kernel}

    def sig(kernel, ptrs):
        names = [p.name for p in kernel.params if not p.is_constexpr]
        return signature_of(kernel, ptrs={n: ptrs[n] for n in names if n in ptrs},
                            ints=tuple(n for n in names if n not in ptrs and n not in floats),
                            floats=tuple(n for n in names if n in floats))  # fmt: skip

    out = []
    for arch, table in GPU_TABLES.items():
        if arch not in SHIPPED_ARCHS:
            continue  # not launched there (the PyTorch path runs): its table is not audited yet
        for dtype in AUDIT_DTYPES:
            es = 4 if dtype == "fp32" else 2
            fp32 = ("LSE", "DELTA", "PART_ACC", "PART_ML", "DQACC")
            ptrs = {name: ("fp32" if name in fp32 else dtype) for name in
                    ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", *fp32)}  # fmt: skip
            for d in AUDIT_HEAD_DIMS:
                bd, unit = block_d_of(d), 16 if d % 16 == 0 else 8
                base = dict(**chunk_constexprs(d), BLOCK_S=SMALL, STRIDE_UNIT=unit)
                sampled = (dtype, d) in SAMPLE[arch]
                # The forward: global (wide tiles), windowed (the wide or narrow tile with its 16-row
                # tails and prefix programs in one kernel); TMA where the table says so, and the pointer
                # path for K / V rows that are not 16-byte aligned.
                tma_options = (False, True) if uses_tma(table, es) else (False,)
                for (label, kernel, narrow), tma in itertools.product(
                    (("global", attn_fwd_kernel, False), ("windowed", attn_fwd_window_kernel, False),
                     ("windowed-narrow", attn_fwd_window_kernel, True)), tma_options,
                ):  # fmt: skip
                    tile = table["fwd", bd, es, narrow]
                    out.append(AuditConfig(
                        kernel=kernel,
                        label=f"fwd {label}{' tma' * tma} {dtype} D={d} BLOCK_M={tile.block_m} BLOCK_N={tile.block_n}",
                        signature=sig(kernel, ptrs),
                        constexprs={**base, "USE_TMA": tma, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n},
                        num_warps=tile.num_warps, num_stages=tile.num_stages, uses_dot=True, archs=(arch,),
                        expect_wgmma=arch in (HOPPER, BLACKWELL) and es == 2 and tile.block_m >= 64,
                        expect_tma=tma, max_regs=fwd_max_regs(table, d, es, tile, tma),
                        sample=sampled and label in ("global", "windowed"),
                    ))  # fmt: skip
                for launch, kernel in kernels.items():
                    # The kernel's rows are BLOCK_M for queries, BLOCK_N for dK/dV's keys.
                    rows, cols = ("BLOCK_N", "BLOCK_M") if launch == "dkdv" else ("BLOCK_M", "BLOCK_N")
                    for label, tile_launch, narrow, windowed in _variants(launch):
                        tile = table[tile_launch, bd, es, narrow]
                        out.append(AuditConfig(
                            kernel=kernel,
                            label=f"{launch} {label} {dtype} D={d} {rows}={tile.block_m} {cols}={tile.block_n}",
                            signature=sig(kernel, ptrs),
                            constexprs={**base, "WINDOWED": windowed, rows: tile.block_m, cols: tile.block_n},
                            num_warps=tile.num_warps, num_stages=tile.num_stages, uses_dot=True,
                            archs=(arch,),
                            expect_wgmma=arch in (HOPPER, BLACKWELL) and es == 2 and tile.block_m >= 64,
                            sample=sampled and label == "global",
                        ))  # fmt: skip
                # The windowed backward's per-window kernel where the table ships it: one binary holds
                # both key loops (full BLOCK_N tiles, then 16-key tiles for the rest of the window).
                tile = window_tile(table, d, es, WINDOW_TILES["hopper"].block_m)
                if tile is not None:
                    kernel = attn_bwd_window_kernel
                    out.append(AuditConfig(
                        kernel=kernel,
                        label=f"window {dtype} D={d} BLOCK_N={tile.block_m} BLOCK_M={tile.block_n}",
                        signature=sig(kernel, ptrs),
                        constexprs={**base, "BLOCK_N": tile.block_m, "BLOCK_M": tile.block_n},
                        num_warps=tile.num_warps, num_stages=tile.num_stages, uses_dot=True, archs=(arch,),
                        expect_wgmma=True, sample=sampled,
                    ))  # fmt: skip
                tile = table["fwd_prefix", bd, es, False]
                out.append(AuditConfig(
                    kernel=attn_fwd_prefix_combine_kernel,
                    label=f"combine {dtype} D={d} BLOCK_S={SMALL} BLOCK_N={tile.block_n}",
                    signature=sig(attn_fwd_prefix_combine_kernel, ptrs),
                    constexprs={**base, "BLOCK_N": tile.block_n}, num_warps=tile.num_warps,
                    num_stages=tile.num_stages, uses_dot=True, archs=(arch,), sample=sampled and d == 64,
                ))  # fmt: skip
                tile = table["delta", bd, es, False]
                kernel = attn_bwd_delta_kernel
                out.append(AuditConfig(
                    kernel=kernel, label=f"delta {dtype} D={d} BLOCK_M={tile.block_m}",
                    signature=signature_of(kernel, ptrs={"O": dtype, "DO": dtype, "DELTA": "fp32"},
                                           ints=tuple(p.name for p in kernel.params[3:] if not p.is_constexpr)),
                    constexprs={"HEAD_D": d, "BLOCK_D": bd, "STRIDE_UNIT": unit, "BLOCK_M": tile.block_m},
                    num_warps=tile.num_warps, num_stages=tile.num_stages, archs=(arch,),
                    sample=sampled and d == 128,
                ))  # fmt: skip
    return out
