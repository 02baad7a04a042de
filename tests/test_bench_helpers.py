"""The benchmark's pure helpers: which rows get a timeline (the GPU run depends on it)."""
from benchmarks.overlap import traced_rows


def _row(W, transport, carveout, ms, split="tokens", graph=False):
    return dict(split=split, W=W, transport=transport, carveout=carveout, fwd_ms=ms, graph=graph, dedup="rank")


def test_timelines_are_of_each_split_and_transports_fastest_waved_row_and_of_each_named_w():
    rows = [_row(1, "nccl", 0, 10.0), _row(2, "nccl", 0, 8.5), _row(2, "nccl", 16, 8.4), _row(4, "nccl", 0, 9.0),
            _row(4, "nccl", 16, 8.8), _row(2, "device_put", 0, 7.0), _row(4, "device_put", 0, 6.5, graph=True),
            _row(2, "nccl", 0, 1.0, split="experts")]
    picked = {(r["split"], r["transport"], r["W"], r["carveout"]) for r in traced_rows(rows, "4")}
    # W=1 is no waved row, graphs are not traced; W=4's fastest nccl token row is added
    assert picked == {("tokens", "nccl", 2, 16), ("tokens", "nccl", 4, 16), ("tokens", "device_put", 2, 0),
                      ("experts", "nccl", 2, 0)}
    assert {(r["split"], r["transport"], r["W"]) for r in traced_rows(rows, "")} == {
        ("tokens", "nccl", 2), ("tokens", "device_put", 2), ("experts", "nccl", 2)}
    assert traced_rows([_row(1, "nccl", 0, 10.0)], "4") == []
