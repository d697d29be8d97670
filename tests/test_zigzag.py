import pytest
import torch

from zigzag import NUM_PATHS, PATH_ORDERS, zigzag_inverse, zigzag_path

GRIDS = [(4, 4), (3, 5), (6, 2), (1, 7), (8, 8)]


def coords(index: torch.Tensor, w: int) -> list[tuple[int, int]]:
    return [(int(i) // w, int(i) % w) for i in index]


@pytest.mark.parametrize("order", sorted(PATH_ORDERS))
@pytest.mark.parametrize("h,w", GRIDS)
@pytest.mark.parametrize("k", range(NUM_PATHS))
def test_path_is_a_permutation_of_4_neighbour_steps(h: int, w: int, k: int, order: str) -> None:
    path = zigzag_path(h, w, k, order)
    assert sorted(path.tolist()) == list(range(h * w))
    cells = coords(path, w)
    for (r0, c0), (r1, c1) in zip(cells, cells[1:], strict=False):
        assert abs(r0 - r1) + abs(c0 - c1) == 1, f"jump between {(r0, c0)} and {(r1, c1)}"


@pytest.mark.parametrize("order", sorted(PATH_ORDERS))
@pytest.mark.parametrize("h,w", GRIDS)
@pytest.mark.parametrize("k", range(NUM_PATHS))
def test_inverse_undoes_the_path(h: int, w: int, k: int, order: str) -> None:
    tokens = torch.randn(2, h * w, 3)
    scanned = tokens[:, zigzag_path(h, w, k, order)]
    assert torch.equal(scanned[:, zigzag_inverse(h, w, k, order)], tokens)


# A 2 x 3 grid in raster order:   0 1 2
#                                 3 4 5
USM_2x3 = [  # docs/upstream.md#zigzag-paths, the USM authors' numbering
    [0, 1, 2, 5, 4, 3],  # 0: row snake from the top-left
    [3, 4, 5, 2, 1, 0],  # 1: path 0 backwards
    [2, 1, 0, 3, 4, 5],  # 2: row snake from the top-right
    [5, 4, 3, 0, 1, 2],  # 3: path 2 backwards
    [0, 3, 4, 1, 2, 5],  # 4: column snake from the top-left
    [5, 2, 1, 4, 3, 0],  # 5: path 4 backwards
    [3, 0, 1, 4, 5, 2],  # 6: column snake from the bottom-left
    [2, 5, 4, 1, 0, 3],  # 7: path 6 backwards
]
ZIGMA_2x3 = [  # CompVis: corner k // 2 (TL, TR, BL, BR), row snake for even k, column for odd
    [0, 1, 2, 5, 4, 3], [0, 3, 4, 1, 2, 5], [2, 1, 0, 3, 4, 5], [2, 5, 4, 1, 0, 3],
    [3, 4, 5, 2, 1, 0], [3, 0, 1, 4, 5, 2], [5, 4, 3, 0, 1, 2], [5, 2, 1, 4, 3, 0],
]


@pytest.mark.parametrize("order,expected", [("usm", USM_2x3), ("zigma", ZIGMA_2x3)])
def test_each_order_numbers_the_paths_as_its_release(order: str, expected: list) -> None:
    assert [zigzag_path(2, 3, k, order).tolist() for k in range(NUM_PATHS)] == expected


@pytest.mark.parametrize("h,w", GRIDS)
def test_orders_hold_the_same_paths_numbered_differently(h: int, w: int) -> None:
    paths = {order: [tuple(zigzag_path(h, w, k, order).tolist()) for k in range(NUM_PATHS)]
             for order in PATH_ORDERS}
    assert set(paths["usm"]) == set(paths["zigma"])
    if h > 1 and w > 1:
        assert paths["usm"] != paths["zigma"]


def test_bad_path_index_and_order() -> None:
    with pytest.raises(ValueError, match="path index"):
        zigzag_path(4, 4, 8)
    with pytest.raises(ValueError, match="order"):
        zigzag_path(4, 4, 0, "raster")
