import pytest
import torch

from zigzag import NUM_PATHS, zigzag_inverse, zigzag_path

GRIDS = [(4, 4), (3, 5), (6, 2), (1, 7), (8, 8)]


def coords(index: torch.Tensor, w: int) -> list[tuple[int, int]]:
    return [(int(i) // w, int(i) % w) for i in index]


@pytest.mark.parametrize("h,w", GRIDS)
@pytest.mark.parametrize("k", range(NUM_PATHS))
def test_path_is_a_permutation_of_4_neighbour_steps(h: int, w: int, k: int) -> None:
    path = zigzag_path(h, w, k)
    assert sorted(path.tolist()) == list(range(h * w))
    cells = coords(path, w)
    for (r0, c0), (r1, c1) in zip(cells, cells[1:], strict=False):
        assert abs(r0 - r1) + abs(c0 - c1) == 1, f"jump between {(r0, c0)} and {(r1, c1)}"


@pytest.mark.parametrize("h,w", GRIDS)
@pytest.mark.parametrize("k", range(NUM_PATHS))
def test_inverse_undoes_the_path(h: int, w: int, k: int) -> None:
    tokens = torch.randn(2, h * w, 3)
    scanned = tokens[:, zigzag_path(h, w, k)]
    assert torch.equal(scanned[:, zigzag_inverse(h, w, k)], tokens)


@pytest.mark.parametrize("h,w", [(4, 4), (3, 5), (6, 2)])
def test_each_corner_has_a_row_and_a_column_snake(h: int, w: int) -> None:
    corners = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)]
    for k in range(NUM_PATHS):
        cells = coords(zigzag_path(h, w, k), w)
        assert cells[0] == corners[k // 2]
        column_wise = k % 2 == 1
        # A row-wise snake first walks along the starting row, a column-wise one down the column.
        first_line = [rc[1] if column_wise else rc[0] for rc in cells[: (h if column_wise else w)]]
        assert len(set(first_line)) == 1
    paths = {tuple(zigzag_path(h, w, k).tolist()) for k in range(NUM_PATHS)}
    assert len(paths) == NUM_PATHS


def test_bad_path_index() -> None:
    with pytest.raises(ValueError):
        zigzag_path(4, 4, 8)
