"""ARGenerateTokens' preview: the grid fills in raster order, with a cursor on the next cell."""

from __future__ import annotations

import torch

import tessera.nodes.autoregressive as ar_nodes


class FlatVQ:
    """Decodes every known token to mid grey and every unknown one to black, 4 px per token."""

    def decode_partial(self, ids, known):
        cells = known.float() * 0.0 - (~known).float()  # grey (0 -> 0.5) where known, black where not
        return cells[:, None].repeat_interleave(4, 2).repeat_interleave(4, 3).expand(-1, 3, -1, -1)


def test_preview_frames_the_cell_of_the_next_token():
    tokens = torch.arange(6)[None]  # 6 of a 4 x 3 grid: the next token is row 1, column 2
    picture = ar_nodes._preview(FlatVQ(), tokens, height=3, width=4)
    assert picture.size == (16, 12)
    assert picture.getpixel((8, 4)) == (255, 220, 0)  # the cursor's top-left corner
    assert picture.getpixel((11, 7)) == (255, 220, 0)  # and its bottom-right one
    assert picture.getpixel((1, 1)) == (128, 128, 128)  # a decoded cell
    assert picture.getpixel((13, 9)) == (0, 0, 0)  # a cell still to come


def test_a_finished_grid_has_no_cursor():
    picture = ar_nodes._preview(FlatVQ(), torch.arange(12)[None], height=3, width=4)
    assert (255, 220, 0) not in {picture.getpixel((x, y)) for x in range(16) for y in range(12)}
