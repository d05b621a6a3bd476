"""The row-padding rule of tracking (models/rows.py) and the transformers' smallest key-group width, checked
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


# head sizes of the tiny test models (2, 4), dwi_ml's peer TTO (8) and larger transformers; cache widths up to
# 1,024 positions; as many slots as a decoding step has rows or only a few
# Powers of two only: with head sizes of 6 or 12 floats the sums change at more widths (measured), and
# a row of a model with such heads can still differ in its last bits with the rows in flight.
@pytest.mark.parametrize("head_size", [2, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_decoding_row_attends_the_same_at_every_group_width_from_the_minimum(head_size, threads):
    # A row's key group (min_group_keys positions or more) depends on the other rows in flight: its result
    # must not.
    from trackflow.models.attention import MultiheadAttention, min_group_keys
    least = min_group_keys(head_size)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        nheads, max_width = 4, 1024
        attention = MultiheadAttention(nheads * head_size, nheads, dropout=0.0)
        generator = torch.Generator().manual_seed(head_size)
        keys_values = torch.randn(2, 64, nheads, max_width, head_size, generator=generator)
        queries = torch.randn(64, nheads, 1, head_size, generator=generator)
        lengths = torch.randint(1, least + 1, (64,), generator=generator)

        def attend(n_rows, width):
            padding = torch.arange(width) >= lengths[:n_rows, None]
            bias = torch.zeros(n_rows, width).masked_fill_(padding, float("-inf"))
            bias = bias[:, None].expand(-1, nheads, -1).reshape(-1, 1, width)
            keys, values = keys_values[:, :n_rows, :, :width]
            return attention._attend_one_token(queries[:n_rows], keys, values, bias, 0.0)

        reference = attend(64, least)
        for n_rows in (1, 5, 64):
            for width in list(range(least, 2 * least + 1)) + [w for w in (333, 512, max_width) if w > least]:
                assert torch.equal(attend(n_rows, width), reference[:n_rows]), f"{n_rows} rows, width {width}"
    finally:
        torch.set_num_threads(previous)
