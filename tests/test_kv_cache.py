"""The KV cache's views: extended in place without copying the context, never changing a view that
exists, forks and prefixes sharing memory, read-only blocks leaving nothing behind."""

import torch

from irg.model.attention import LayerKV


def rows(start: int, count: int) -> torch.Tensor:
    return torch.arange(start, start + count, dtype=torch.float32).view(count, 1, 1).expand(count, 2, 4).clone()


def test_decoding_appends_in_place_with_a_few_doublings_and_matches_concatenation():
    layer = LayerKV(rows(0, 10), rows(100, 10))
    reference_k, reference_v = layer.keys.clone(), layer.values.clone()
    buffers = set()
    for t in range(10, 200):
        layer = layer.extended(rows(t, 1), rows(100 + t, 1))
        reference_k, reference_v = torch.cat([reference_k, rows(t, 1)]), torch.cat([reference_v, rows(100 + t, 1)])
        buffers.add(id(layer._buffer))
    assert torch.equal(layer.keys, reference_k) and torch.equal(layer.values, reference_v)
    assert len(buffers) <= 5  # 10 -> 20 -> 40 -> 80 -> 160 -> 320 rows: a copy per doubling, not per token


def test_a_view_never_changes_and_a_fork_gets_its_own_rows():
    prefix = LayerKV(rows(0, 8), rows(0, 8)).extended(rows(8, 1), rows(8, 1))  # 9 rows, room for 16
    before = prefix.keys.clone()
    a = prefix.extended(rows(50, 3), rows(50, 3))
    b = prefix.extended(rows(70, 2), rows(70, 2))  # the rows after the prefix are a's: b forks
    assert torch.equal(prefix.keys, before) and prefix.length == 9
    assert torch.equal(a.keys, torch.cat([before, rows(50, 3)]))
    assert torch.equal(b.keys, torch.cat([before, rows(70, 2)]))
    assert a._buffer is prefix._buffer and b._buffer is not prefix._buffer
    assert a.keys.data_ptr() == prefix.keys.data_ptr()  # the prefix's memory is shared, not copied


def test_a_block_read_once_leaves_nothing_claimed():
    context = LayerKV(rows(0, 8), rows(0, 8)).extended(rows(8, 1), rows(8, 1))  # 9 rows, room for 16
    keys, values = context.read_with(rows(90, 3), rows(90, 3))
    assert torch.equal(keys, torch.cat([context.keys, rows(90, 3)])) and torch.equal(values[-3:], rows(90, 3))
    later = context.extended(rows(9, 1), rows(9, 1))  # the same rows are free for the next real token
    assert later._buffer is context._buffer and torch.equal(later.keys[-1:], rows(9, 1))
    shorter = LayerKV(rows(0, 4), rows(0, 4))  # no room: the block is concatenated instead
    keys, _ = shorter.read_with(rows(90, 2), rows(90, 2))
    assert torch.equal(keys, torch.cat([rows(0, 4), rows(90, 2)]))
