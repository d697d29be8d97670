"""Zigzag scan paths over a token grid (Zigma, Hu et al. 2024, Sec. 3; used by USM per block).

A Mamba block reads its tokens as a 1-D sequence. Raster order breaks spatial continuity at the
end of every row, so Zigma reads the grid as a snake (boustrophedon): consecutive tokens in the
sequence are always 4-neighbours on the grid. There are 8 such paths, one row-wise and one
column-wise snake starting from each of the 4 corners; block k uses path k mod 8 so that, over a
stack of blocks, every token is "early" in some scans and "late" in others.

A path is a permutation `perm` of the h*w raster indices: `seq = tokens[:, perm]` gathers the
raster-ordered tokens into scan order and `tokens = seq[:, inverse]` scatters them back.
"""

from functools import cache

import torch

NUM_PATHS = 8


def _snake(grid: torch.Tensor) -> torch.Tensor:
    """Read a 2-D grid row by row, reversing every other row."""
    rows = [row if i % 2 == 0 else row.flip(0) for i, row in enumerate(grid)]
    return torch.cat(rows)


@cache
def zigzag_path(h: int, w: int, k: int) -> torch.Tensor:
    """Path k (0..7) over an h x w grid as a permutation of the raster indices.

    k // 2 picks the starting corner (top-left, top-right, bottom-left, bottom-right) and
    k % 2 the direction (0: row-wise snake, 1: column-wise snake).
    """
    if not 0 <= k < NUM_PATHS:
        raise ValueError(f"zigzag path index must be in [0, {NUM_PATHS}), got {k}")
    # Explicitly on the CPU: the result is cached and must not inherit a torch.device context.
    grid = torch.arange(h * w, device="cpu").reshape(h, w)
    corner, column_wise = divmod(k, 2)
    # Flipping the grid moves the chosen corner to the top-left, where the snake starts.
    flip_dims = [d for d, flip in ((0, corner >= 2), (1, corner % 2 == 1)) if flip]
    if flip_dims:
        grid = grid.flip(flip_dims)
    return _snake(grid.T if column_wise else grid)


@cache
def zigzag_inverse(h: int, w: int, k: int) -> torch.Tensor:
    """Inverse permutation of `zigzag_path(h, w, k)`: scan order back to raster order."""
    return torch.argsort(zigzag_path(h, w, k))
