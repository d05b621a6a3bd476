"""The row-padding rule of Learn2track tracking (models/rows.py), checked against this machine's matrix
products: a row's result must not depend on how many rows share its product."""

import pytest
import torch

from trackflow.models.rows import MIN_ROWS, ROW_BLOCK, aligned_rows, pad_rows_index, padded_row_count


def test_padded_row_count_is_a_multiple_of_the_block_and_at_least_the_minimum():
    assert [padded_row_count(n) for n in (1, 4, 5, 16, 17, 100)] == [MIN_ROWS, MIN_ROWS, MIN_ROWS, 16, 20, 100]
    index = pad_rows_index(5, "cpu")
    assert index.tolist() == [0, 1, 2, 3, 4] + [0] * (MIN_ROWS - 5)


# shapes of tracking products: tiny test models, the heads (3 outputs, 725 classes), GRU gates of 2x128 and
# 2x256 models
@pytest.mark.parametrize("in_size, out_size", [(6, 3), (8, 24), (64, 3), (64, 725), (128, 384), (256, 768)])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_padded_product_gives_each_row_what_a_large_product_gives_it(in_size, out_size, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(in_size * out_size)
        weight = torch.randn(out_size, in_size, generator=generator)
        bias = torch.randn(out_size, generator=generator)
        x = torch.randn(1024, in_size, generator=generator)
        large = torch.nn.functional.linear(aligned_rows(x), weight, bias)
        for n_rows in list(range(1, 2 * MIN_ROWS + 1)) + [99, 500]:
            padded = x[:n_rows][pad_rows_index(n_rows, "cpu")]
            small = torch.nn.functional.linear(aligned_rows(padded), weight, bias)[:n_rows]
            assert torch.equal(small, large[:n_rows]), f"{n_rows} rows"
    finally:
        torch.set_num_threads(previous)
