"""The shuffle buffer on hand-made rows: each row served once, aligned hooks, exact resume."""

from __future__ import annotations

import torch

from saelab.data.shuffle import ShuffleBuffer, buffer_rows


def rows(start: int, n: int) -> dict[str, torch.Tensor]:
    """Rows numbered start..start+n-1 for two hooks; hook "b" is hook "a" negated."""
    ids = torch.arange(start, start + n, dtype=torch.float32)[:, None]
    return {"a": ids.repeat(1, 3), "b": -ids.repeat(1, 3)}


def serve(buffer: ShuffleBuffer, batches: int, batch: int, source: list[int]) -> list[torch.Tensor]:
    """``batches`` batches, refilling from a counter in ``source[0]`` as the buffer asks."""
    out = []
    for _ in range(batches):
        if buffer.due:
            n = buffer.space()
            buffer.refill(rows(source[0], n))
            source[0] += n
        got = buffer.take(batch)
        assert torch.equal(got["a"], -got["b"])  # one permutation for every hook
        out.append(got["a"][:, 0].clone())
    return out


def test_size_rule_holds_two_batches():
    for batch, size in [(32, 10), (32, 64), (32, 65), (7, 50), (100, 1000)]:
        assert buffer_rows(batch, size) == max(size, 2 * batch)


def test_every_row_is_served_once_and_refills_replace_only_the_served_half():
    buffer, source = ShuffleBuffer(batch_size=8, buffer_size=40, seed=0), [0]
    served = torch.cat(serve(buffer, 30, 8, source))
    assert served.unique().numel() == served.numel()  # no row twice
    assert buffer.serve_per_fill == 16 and buffer.held == 40
    # Everything read but not served is still held, unserved: nothing is dropped.
    held = set(buffer.rows["a"][buffer.served :, 0].tolist())
    assert held | set(served.tolist()) == set(range(source[0]))
    assert not held & set(served.tolist())
    assert not torch.equal(served[:16], torch.arange(16.0))  # shuffled


def test_last_fill_is_served_whole_and_take_stops_at_the_limit():
    buffer = ShuffleBuffer(batch_size=4, buffer_size=10, seed=0)
    buffer.refill(rows(0, 7), last=True)
    first, second = buffer.take(5), buffer.take(5)
    assert first["a"].shape[0] == 5 and second["a"].shape[0] == 2 and buffer.due
    assert sorted(torch.cat([first["a"], second["a"]])[:, 0].tolist()) == list(range(7))


def test_state_dict_resumes_the_same_rows():
    buffer, source = ShuffleBuffer(batch_size=8, buffer_size=40, seed=3), [0]
    serve(buffer, 5, 8, source)
    state, at = buffer.state_dict(), list(source)
    expected = serve(buffer, 9, 8, source)
    resumed = ShuffleBuffer(batch_size=8, buffer_size=40, seed=99)
    resumed.load_state_dict(state)
    for want, got in zip(expected, serve(resumed, 9, 8, at), strict=True):
        assert torch.equal(want, got)
