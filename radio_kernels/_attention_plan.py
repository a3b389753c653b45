"""The launch plan of the attention kernels: which launches, with which tiles, cover which rows.

``attention.py`` launches exactly what ``forward_plan`` / ``backward_plan`` return, and the static
performance model (``radio_kernels.perf_model``) counts FLOPs and bytes from the same objects, so
the model cannot drift from the code.

Rows (queries, or keys for dK/dV) come in segments: the whole sequence [0, N) (global attention),
the P prefix rows (windowed backward, which see all N columns), or the (N - P) / T windows of T
rows each. Windows: ``split_segment`` covers a segment of L rows with L // BLOCK wide tiles and, for
the rest, ceil((L mod BLOCK) / 16) tiles of 16 rows in a second launch, so no tile spans two
windows and at most 15 rows per window are computed and dropped; the backward's global segment
alike. The forward's global segment takes ceil(N / BLOCK) wide tiles, the last one partial (a tail
launch would stream K and V again).
Windowed launches pick their wide tile between the table's
wide (128-row) and narrow (64-row) entries: the one that leaves the fewest 16-row tail tiles
(they run at mma.sync's speed: wgmma needs 64 rows), the wider on a tie.

The windowed forward is one launch (``window_forward``): each window's wide and 16-row tiles, and
programs that walk groups of windows for the prefix queries (their partial states), then a small
combine launch that adds the prefix keys and merges the groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import _attention_configs as configs

SMALL = 16  # rows of a tail / prefix tile, and columns of a masked step (BLOCK_S)


def head_chunks(head_dim: int) -> tuple[int, int, int]:
    """(D0, D1, DC1): D0 = the largest power of two <= D (at least 16), D1 the next power of two
    >= D - D0 (at least 8; 0 when D0 covers D), DC1 = max(D1, 16) (0 when D1 = 0): the width chunk 1
    is read with for products that contract over D (K >= 16 on tensor cores)."""
    d0 = max(SMALL, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d0
    if rest <= 0:
        return d0, 0, 0
    d1 = max(8, 1 << (rest - 1).bit_length())
    return d0, d1, max(d1, SMALL)


def chunk_constexprs(head_dim: int) -> dict:
    """The head-dim constexprs every attention kernel takes."""
    d0, d1, dc1 = head_chunks(head_dim)
    return dict(HEAD_D=head_dim, D0=d0, D1=d1, DC1=dc1)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``tiles_per_seg`` tiles of ``tile.block_m`` rows in each of ``n_seg``
    segments of ``seg_len`` rows starting at ``row_base``, the first tile ``seg_offset`` rows into
    its segment. ``windowed`` rows see the prefix and their own segment, others all N columns.

    "window" (the per-window backward): one program per segment (window), which walks the window's
    keys in ``tiles_per_seg`` tiles of ``tile.block_m`` keys and then ``tail_tiles`` tiles of 16
    (SMALL) keys, the last one masked where SMALL does not divide the rest."""

    kernel: str  # "fwd", "fwd_window", "dq", "dkdv", "window" (windowed backward), "combine" (prefix queries)
    tile_key: str  # the tile table entry
    tile: configs.Tile
    windowed: bool
    row_base: int
    seg_len: int
    n_seg: int
    seg_offset: int
    tiles_per_seg: int
    # "fwd_window" and "window": 16-row (16-key) tiles per segment after its wide ones, in the same launch.
    tail_tiles: int = 0
    # "fwd_window": the programs that walk the windows for the prefix queries, and how many windows each walks.
    prefix_programs: int = 0
    windows_per_part: int = 0

    @property
    def programs(self) -> int:
        if self.kernel == "window":
            return self.n_seg
        return self.n_seg * (self.tiles_per_seg + self.tail_tiles) + self.prefix_programs

    @property
    def n_part(self) -> int:
        """Partial states a prefix query gets from the window launch (groups of windows)."""
        return -(-self.n_seg // self.windows_per_part) if self.windows_per_part else 0


def split_segment(seg_len: int, block: int) -> tuple[int, int]:
    """(wide tiles, 16-row tail tiles) covering ``seg_len`` rows with ``block``-row wide tiles."""
    main = seg_len // block
    return main, -(-(seg_len - main * block) // SMALL)


def _pick_wide(table, rows: int, wide_keys) -> tuple[tuple, int, int]:
    """(table key, wide tiles, 16-row tail tiles) of the wide entry that covers ``rows`` rows with the
    fewest tails, the wider on a tie."""
    options = [(split_segment(rows, table[key].block_m), -table[key].block_m, key) for key in wide_keys]
    (main, tail), _, key = min(options, key=lambda o: (o[0][1], o[1]))
    return key, main, tail


def _segment_launches(kernel, table, bd, es, windowed, row_base, seg_len, n_seg, wide_keys):
    if n_seg == 0 or seg_len == 0:
        return []
    if not windowed and kernel == "fwd":
        # The forward's one segment: a partial last wide tile wastes < BLOCK rows of N, where a 16-row
        # tail launch would stream all of K and V a second time. The backward (7 products a pair,
        # compute-bound) takes the tail launch.
        tile = table[wide_keys[0]]
        tiles = -(-seg_len // tile.block_m)
        return [Launch(kernel, wide_keys[0][0], tile, windowed, row_base, seg_len, n_seg, 0, tiles)]
    key, main, tail = _pick_wide(table, seg_len, wide_keys)
    launches = []
    tile = table[key]
    common = dict(windowed=windowed, row_base=row_base, seg_len=seg_len, n_seg=n_seg)
    if main:
        launches.append(Launch(kernel, key[0], tile, seg_offset=0, tiles_per_seg=main, **common))
    if tail:
        small = table[key[0] + "_prefix", bd, es, False]
        launches.append(Launch(kernel, kernel + "_prefix", small, seg_offset=main * tile.block_m,
                               tiles_per_seg=tail, **common))  # fmt: skip
    return launches


def _wide_keys(kernel, bd, es, window_tokens, table):
    keys = [(kernel, bd, es, False)]
    if window_tokens and (kernel, bd, es, True) in table:
        keys.append((kernel, bd, es, True))
    return keys


def row_plan(kernel: str, n: int, num_prefix: int, window_tokens: int, head_dim: int, elem_size: int,
             table=None) -> list[Launch]:  # fmt: skip
    """Launches of ``kernel`` ("fwd" global only, "dq" or "dkdv") covering all N rows once.

    Global (T = 0): one segment [0, N). Windowed: the P prefix rows as a global-mode segment of
    16-row tiles, then the windows.
    """
    table = configs.active_table() if table is None else table
    bd = configs.block_d_of(head_dim)
    if window_tokens == 0:
        wide = _wide_keys(kernel, bd, elem_size, 0, table)
        return _segment_launches(kernel, table, bd, elem_size, False, 0, n, 1, wide)
    launches = []
    P, T = num_prefix, window_tokens
    if P:  # prefix rows see all N columns: a global-mode launch of 16-row tiles
        small = table[kernel + "_prefix", bd, elem_size, False]
        launches.append(Launch(kernel, kernel + "_prefix", small, False, 0, P, 1, 0, -(-P // SMALL)))
    wide = _wide_keys(kernel, bd, elem_size, T, table)
    return launches + _segment_launches(kernel, table, bd, elem_size, True, P, T, (n - P) // T, wide)


def window_forward(n: int, num_prefix: int, window_tokens: int, head_dim: int, elem_size: int,
                   table) -> list[Launch]:  # fmt: skip
    """The windowed forward: one "fwd_window" launch (see ``attn_fwd_window_kernel``) and, with
    prefix tokens, the combine launch (ceil(P / 16) programs).

    Each prefix program walks ``windows_per_part`` windows (about ``configs.PREFIX_PART_KEYS`` keys):
    fewer windows per program would write more fp32 partial states, more would make it the launch's
    longest program by far (and outlive the L2 lines it shares with the windows' own programs).
    """
    P, T = num_prefix, window_tokens
    n_seg = (n - P) // T
    bd = configs.block_d_of(head_dim)
    key, wide, tail = _pick_wide(table, T, _wide_keys("fwd", bd, elem_size, T, table))
    per_part = min(n_seg, max(1, configs.prefix_part_keys(table) // T)) if P else 0
    prefix_tiles = -(-P // SMALL)
    launches = []
    if n_seg:
        part_count = -(-n_seg // per_part) if per_part else 0
        launches.append(Launch("fwd_window", key[0], table[key], True, P, T, n_seg, 0, wide, tail_tiles=tail,
                               prefix_programs=part_count * prefix_tiles, windows_per_part=per_part))  # fmt: skip
    if P:
        small = table["fwd_prefix", bd, elem_size, False]
        launches.append(Launch("combine", "fwd_prefix", small, False, 0, P, 1, 0, prefix_tiles))
    return launches


def forward_plan(n, num_prefix, window_tokens, head_dim, elem_size, table=None) -> list[Launch]:
    table = configs.active_table() if table is None else table
    if window_tokens == 0:
        return row_plan("fwd", n, num_prefix, 0, head_dim, elem_size, table)
    return window_forward(n, num_prefix, window_tokens, head_dim, elem_size, table)


def backward_plan(n, num_prefix, window_tokens, head_dim, elem_size, table=None) -> list[Launch]:
    """dK/dV launches, then dQ launches (delta's one launch is not listed: no matmul).

    Windowed: the prefix keys' dK/dV and the prefix queries' dQ (16-row global-mode launches, they
    see everything), then, where the table has its tile (``configs.window_tile``), one program per
    window (``attn_bwd_window_kernel``) for the rest: 5 products a visible pair, dQ summed in a fixed
    order by the program that owns the window, keys in full wide tiles and then 16-key tiles (any T);
    elsewhere windowed dK/dV and dQ launches (7 products).
    """
    table = configs.active_table() if table is None else table
    if window_tokens == 0:
        return [
            launch
            for kernel in ("dkdv", "dq")
            for launch in row_plan(kernel, n, num_prefix, window_tokens, head_dim, elem_size, table)
        ]
    bd = configs.block_d_of(head_dim)
    P, T = num_prefix, window_tokens
    launches = []
    for kernel in ("dkdv", "dq") if P else ():
        small = table[kernel + "_prefix", bd, elem_size, False]
        launches.append(Launch(kernel, kernel + "_prefix", small, False, 0, P, 1, 0, -(-P // SMALL)))
    tile = configs.window_tile(table, head_dim, elem_size, T)
    if tile is None:  # no audited per-window tile here: dK/dV and dQ launches over the windows
        return launches + [
            launch
            for kernel in ("dkdv", "dq")
            for launch in _segment_launches(
                kernel, table, bd, elem_size, True, P, T, (n - P) // T, _wide_keys(kernel, bd, elem_size, T, table)
            )  # fmt: skip
        ]
    if n > P:  # one program per window walks its T // BLOCK wide key tiles, then 16-key tiles
        main, tail = split_segment(T, tile.block_m)
        launches.append(Launch("window", "window", tile, True, P, T, (n - P) // T, 0, main, tail_tiles=tail))
    return launches
