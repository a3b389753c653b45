"""Tile shapes of the attention kernels, per launch, head-dim block and dtype width.

Every shape the host wrappers can launch on a GPU is in ``GPU_TABLE``; the static audit compiles
each of them for sm_90 and sm_80 (``AUDIT_CONFIGS`` in ``_attention_kernels``). Under the Triton
interpreter one small table is pinned (``INTERPRET_TABLE``): tiles of 16-32 so that tests with
N ~ 100 cross many block and window boundaries.

Launches (``rows`` = what a program owns, ``cols`` = what its inner loop walks):

    fwd / dq            rows = queries, cols = keys; global, or the patch queries of windowed mode
    fwd_prefix / dq_prefix   the P prefix queries of windowed mode, which see all N keys:
                        few rows, so a 16-row tile and a long inner loop
    dkdv                rows = keys, cols = queries
    dkdv_prefix         the prefix keys, seen by all N queries
    delta               rowsum(dO * O), no inner loop

Windowed launches with small windows (T < 128) take the "narrow" 64-row variant: a 128-row tile
would straddle two or more windows and mask (and waste) half of every block. Prefix columns in
windowed launches are walked in blocks of BLOCK_P = next_pow2(P) (min 16, max BLOCK_N), not a
full BLOCK_N, since P is ~10.
"""

from __future__ import annotations

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


def _tiles(bd: int, es: int) -> dict[tuple[str, bool], Tile]:
    """(launch, narrow) -> Tile for head-dim block bd and element size es (bytes)."""
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
            ("dq", True): Tile(32, 32, 4, 3),
            ("dq_prefix", False): Tile(16, 32, 4, 3),
            ("dkdv", False): Tile(32, 32, 4, 2),
            ("dkdv", True): Tile(32, 32, 4, 2),
            ("dkdv_prefix", False): Tile(16, 32, 4, 3),
        })  # fmt: skip
    return t


def _gpu_table() -> dict[tuple[str, int, int, bool], Tile]:
    """(launch, BLOCK_D, bytes per element, narrow) -> Tile, chosen with ptxas on sm_90a.

    Every entry compiles without register spills for sm_90 (see AUDIT_CONFIGS in
    _attention_kernels); 16-bit fwd / dq / dkdv tiles of 64+ rows use HGMMA (wgmma).
    """
    return {
        (launch, bd, es, narrow): tile
        for bd in BLOCK_DS
        for es in (2, 4)
        for (launch, narrow), tile in _tiles(bd, es).items()
    }


GPU_TABLE = _gpu_table()
_INTERPRET_TILE = {
    "fwd": Tile(32, 32, 4, 1),
    "fwd_prefix": Tile(16, 32, 4, 1),
    "dq": Tile(32, 32, 4, 1),
    "dq_prefix": Tile(16, 32, 4, 1),
    "dkdv": Tile(32, 32, 4, 1),
    "dkdv_prefix": Tile(16, 32, 4, 1),
    "delta": Tile(32, 0, 4, 1),
}
INTERPRET_TABLE = {
    (launch, bd, es, narrow): tile for (launch, bd, es, narrow) in GPU_TABLE for tile in (_INTERPRET_TILE[launch],)
}


def active_table() -> dict[tuple[str, int, int, bool], Tile]:
    return INTERPRET_TABLE if interpreter_enabled() else GPU_TABLE


def block_d_of(head_dim: int) -> int:
    """Head dims are padded (by masking, in registers) to a power of two >= 16."""
    return max(16, 1 << (head_dim - 1).bit_length())


def pick_tile(launch: str, head_dim: int, elem_size: int, window_tokens: int = 0, table=None) -> Tile:
    table = active_table() if table is None else table
    bd = block_d_of(head_dim)
    narrow = 0 < window_tokens < NARROW_WINDOW and (launch, bd, elem_size, True) in table
    return table[launch, bd, elem_size, narrow]


def prefix_block(num_prefix: int, block_n: int) -> int:
    """Column block for the prefix range of a windowed launch: next_pow2(P) in [16, block_n]."""
    return min(block_n, max(16, 1 << (max(num_prefix, 1) - 1).bit_length()))
