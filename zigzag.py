"""Zigzag scan paths over a token grid (Zigma, Hu et al. 2024, Sec. 3; used by USM per block).

A Mamba block reads its tokens as a 1-D sequence. Raster order breaks spatial continuity at the
end of every row, so Zigma reads the grid as a snake (boustrophedon): consecutive tokens in the
sequence are always 4-neighbours on the grid. Stacked blocks cycle through 8 such paths, so that
every token is "early" in some scans and "late" in others.

The two published models number their 8 paths differently, and a checkpoint only reproduces its
outputs with its own numbering (docs/upstream.md#zigzag-paths), so both orders live here, by name:

- "zigma" (CompVis/zigma): path k starts at corner k // 2 (top-left, top-right, bottom-left,
  bottom-right) and is a row-wise snake for even k, a column-wise snake for odd k.
- "usm" (the USM authors' release): 0 row snake from the top-left, 2 row snake from the top-right,
  4 column snake from the top-left, 6 column snake from the bottom-left; each odd path is the path
  before it read backwards.

Reading a snake backwards gives the snake that starts at the corner where it ended, so the two
orders hold the same 8 paths on every grid, assigned to different numbers: in USM-B/1, 15 of the
25 blocks scan another path under the other numbering.

A path is a permutation `perm` of the h*w raster indices: `seq = tokens[:, perm]` gathers the
raster-ordered tokens into scan order and `tokens = seq[:, inverse]` scatters them back.
"""

from functools import cache
from typing import NamedTuple

import torch

NUM_PATHS = 8
TOP_LEFT, TOP_RIGHT, BOTTOM_LEFT, BOTTOM_RIGHT = range(4)


class Snake(NamedTuple):
    corner: int  # where the snake starts (before any reversal)
    column_wise: bool  # walk down the first column instead of along the first row
    reverse: bool = False  # read the whole snake backwards


PATH_ORDERS: dict[str, tuple[Snake, ...]] = {
    "zigma": tuple(Snake(corner, column_wise) for corner in range(4)
                   for column_wise in (False, True)),
    "usm": tuple(Snake(corner, column_wise, reverse)
                 for corner, column_wise in ((TOP_LEFT, False), (TOP_RIGHT, False),
                                             (TOP_LEFT, True), (BOTTOM_LEFT, True))
                 for reverse in (False, True)),
}


def _snake(grid: torch.Tensor) -> torch.Tensor:
    """Read a 2-D grid row by row, reversing every other row."""
    rows = [row if i % 2 == 0 else row.flip(0) for i, row in enumerate(grid)]
    return torch.cat(rows)


@cache
def zigzag_path(h: int, w: int, k: int, order: str = "zigma") -> torch.Tensor:
    """Path k (0..7) of the named order over an h x w grid, as a permutation of raster indices."""
    if not 0 <= k < NUM_PATHS:
        raise ValueError(f"zigzag path index must be in [0, {NUM_PATHS}), got {k}")
    if order not in PATH_ORDERS:
        raise ValueError(f"zigzag order must be one of {sorted(PATH_ORDERS)}, got {order!r}")
    snake = PATH_ORDERS[order][k]
    # Explicitly on the CPU: the result is cached and must not inherit a torch.device context.
    grid = torch.arange(h * w, device="cpu").reshape(h, w)
    # Flipping the grid moves the chosen corner to the top-left, where the snake starts.
    flip_dims = [d for d, flip in ((0, snake.corner in (BOTTOM_LEFT, BOTTOM_RIGHT)),
                                   (1, snake.corner in (TOP_RIGHT, BOTTOM_RIGHT))) if flip]
    if flip_dims:
        grid = grid.flip(flip_dims)
    path = _snake(grid.T if snake.column_wise else grid)
    return path.flip(0) if snake.reverse else path


@cache
def zigzag_inverse(h: int, w: int, k: int, order: str = "zigma") -> torch.Tensor:
    """Inverse permutation of `zigzag_path(h, w, k, order)`: scan order back to raster order."""
    return torch.argsort(zigzag_path(h, w, k, order))
