"""The Triton kernels against the torch paths, in Triton's interpreter on the CPU.

Runs where triton is installed (skipped otherwise, e.g. in CI); the GPU script runs the
same kernel compiled, inside the layer's GPU correctness check.
"""
import importlib
import os
import sys

import pytest
import torch

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported before its interpreter could be switched on", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # read when triton is imported
pytest.importorskip("triton")


def _fresh(name):
    sys.modules.pop(name, None)
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def triton_rows():
    yield _fresh("ep.kernels.triton_rows")
    sys.modules.pop("ep.kernels.triton_rows", None)


@pytest.fixture(scope="module")
def triton_plan():
    yield _fresh("ep.kernels.triton_plan")
    sys.modules.pop("ep.kernels.triton_plan", None)


@pytest.fixture(scope="module")
def triton_swiglu():
    yield _fresh("ep.kernels.triton_swiglu")
    sys.modules.pop("ep.kernels.triton_swiglu", None)


def _case(seed, M=40, N=23, K=3, H=37):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(M, H, generator=g)
    items = torch.randint(0, M, (N, K), generator=g)
    items[torch.rand(N, K, generator=g) < 0.3] = -1
    weights = torch.rand(N, K, generator=g)
    return src, items, weights


@pytest.mark.parametrize("with_weights", [False, True])
def test_plain_sums_match_torch(triton_rows, with_weights):
    from ep.kernels.permute import reduce_rows

    src, items, weights = _case(1)
    w = weights if with_weights else None
    want = torch.empty(items.shape[0], src.shape[1])
    reduce_rows(src, items, want, w)
    got = torch.full_like(want, float("nan"))
    triton_rows.reduce_rows_triton(src, items, got, w)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_strided_rows_match_torch(triton_rows):
    """Rows inside wider rows (the data part of `ep.layout` rows): sums and gathers."""
    from ep.kernels.permute import gather_rows_into, reduce_rows

    src, items, weights = _case(5)
    wide_src = torch.full((src.shape[0], 48), float("nan"))
    wide_src[:, :src.shape[1]] = src
    wide_got = torch.full((items.shape[0], 50), float("nan"))
    want = torch.empty(items.shape[0], src.shape[1])
    reduce_rows(src, items, want, weights)
    triton_rows.reduce_rows_triton(wide_src[:, :src.shape[1]], items, wide_got[:, :src.shape[1]], weights)
    torch.testing.assert_close(wide_got[:, :src.shape[1]], want, rtol=1e-6, atol=1e-6)
    assert wide_got[:, src.shape[1]:].isnan().all()  # nothing written past the row's data
    index = torch.tensor([3, -1, 0, 39, -1, 7])
    got = torch.full((6, 50), float("nan"))
    triton_rows.gather_rows_triton(wide_src[:, :src.shape[1]], index, got[:, :src.shape[1]])
    want = torch.full((6, 50), float("nan"))
    gather_rows_into(src, index, want[:, :src.shape[1]])
    keep = index >= 0  # rows with index -1: unspecified in the torch path, untouched by the kernel
    torch.testing.assert_close(got[keep], want[keep], equal_nan=True)
    assert got[~keep].isnan().all()


def test_rows_in_use_bound_the_kernels(triton_rows, triton_swiglu):
    """Buffers sized by a bound: rows past the device count are skipped (left as they were)."""
    g = torch.Generator().manual_seed(6)
    src = torch.randn(9, 20, generator=g)
    index = torch.tensor([4, 0, 8, 2, 2, 7])
    used = torch.tensor(4)
    out = torch.full((6, 20), float("nan"))
    triton_rows.gather_rows_triton(src, index, out, used)
    torch.testing.assert_close(out[:4], src[index[:4]])
    assert out[4:].isnan().all()
    h = torch.randn(6, 2 * 12, generator=g)
    a = triton_swiglu.swiglu_fwd_triton(h, None, used)
    torch.testing.assert_close(a[:4], triton_swiglu.swiglu_fwd_triton(h[:4]), rtol=0, atol=0)
    grad, weight = torch.randn(6, 12, generator=g), torch.rand(6, generator=g)
    got = triton_swiglu.swiglu_bwd_triton(grad, h, weight, None, used)
    want = triton_swiglu.swiglu_bwd_triton(grad[:4], h[:4], weight[:4])
    for a, b in zip(got, want):
        torch.testing.assert_close(a[:4], b, rtol=0, atol=0)


@pytest.mark.parametrize("limit", [None, 0.5])
def test_swiglu_matches_torch(triton_swiglu, limit):
    from ep.kernels.swiglu import swiglu, swiglu_backward_weighted

    g = torch.Generator().manual_seed(4)
    I, F = 9, 40  # F not a multiple of the block: masked tails
    h = torch.randn(I, 2 * F, generator=g)  # with limit 0.5: most values are clamped
    torch.testing.assert_close(triton_swiglu.swiglu_fwd_triton(h, limit), swiglu(h, limit), rtol=1e-5, atol=1e-6)
    grad = torch.randn(I, F, generator=g)
    weight = torch.rand(I, generator=g)
    got = triton_swiglu.swiglu_bwd_triton(grad, h, weight, limit)
    want = swiglu_backward_weighted(grad, h, weight, limit)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and against autograd of the plain formula (clamped as DeepSeek-V4's block clamps)
    hh = h.clone().requires_grad_(True)
    ww = weight.clone().requires_grad_(True)
    gate, up = hh[:, :F], hh[:, F:]
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    a = torch.nn.functional.silu(gate) * up
    ((ww.unsqueeze(1) * a) * grad).sum().backward()
    torch.testing.assert_close(got[0], hh.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], ww.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("limit", [None, 0.5])
def test_swiglu_backward_quantizes_dh_as_quantize_rowwise(triton_swiglu, limit):
    """`quantize_dh` (linear1's data product in FP8): the kernel's dh, wa, dweight bitwise those
    of the call without it, and its FP8 rows and scales bitwise `quantize_rowwise` of that dh
    (the rows in use; F over a block: the second pass takes several steps), in Triton's
    interpreter and in the torch path."""
    from ep.kernels.fp8 import quantize_rowwise_torch
    from ep.kernels.swiglu import swiglu_backward_weighted

    g = torch.Generator().manual_seed(5)
    I, F = 7, 1280  # a block of next_pow2(F) = 2048 columns: 2F = 2560 takes two steps of the second pass
    h = torch.randn(I, 2 * F, generator=g).bfloat16()
    grad, weight = torch.randn(I, F, generator=g).bfloat16(), torch.rand(I, generator=g)
    used = torch.tensor(5)
    plain = triton_swiglu.swiglu_bwd_triton(grad, h, weight, limit, used)
    *same, q, scale = triton_swiglu.swiglu_bwd_triton(grad, h, weight, limit, used, quantize=True)
    for a, b in zip(same, plain):
        assert torch.equal(a[:5], b[:5])
    want_q, want_s = quantize_rowwise_torch(plain[0][:5])
    assert torch.equal(q[:5].view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scale[:5], want_s)
    *same, q, scale = swiglu_backward_weighted(grad, h, weight, limit, quantize_dh=True)
    plain = swiglu_backward_weighted(grad, h, weight, limit)
    want_q, want_s = quantize_rowwise_torch(plain[0])
    assert all(torch.equal(a, b) for a, b in zip(same, plain))
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scale, want_s)


def _routing(seed, T, E, k, bad=False):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.empty(0, k, dtype=torch.int64)
    w = torch.rand(T, k, generator=g)
    if bad and T > 3:
        idx[1, 0] = E + 2  # out of range
        idx[2, 1 % k] = idx[2, 0] if k > 1 else -1  # a repeat (or out of range at k=1)
        w[3, 0] = float("nan")
    return idx, w


@pytest.mark.parametrize("T, n, E_local, k, W, cap_factor, bad", [
    (37, 2, 4, 3, 1, 1.0, False), (50, 3, 2, 4, 4, 1.0, True), (29, 4, 3, 2, 3, 0.4, False), (0, 2, 2, 2, 2, 1.0, False),
    (9, 1, 5, 5, 2, 1.0, True), (300, 2, 4, 8, 2, 1.0, True),  # the last: 5 blocks of 32 tokens per wave
])
@pytest.mark.parametrize("split", ["tokens", "experts", "dedup"])
def test_route_rows_match_torch(triton_plan, T, n, E_local, k, W, cap_factor, bad, split):
    from ep.checks import IDX_RANGE, IDX_REPEAT, ROWS_OVER, STATUS_SLOTS, W_NONFINITE
    from ep.plan import WaveMap, sender_plan

    if split != "tokens" and not 1 < W <= E_local:
        pytest.skip("expert waves: 1 < W <= E_local (W=1 is the token map)")
    wm = WaveMap(W, by_experts=split != "tokens", dedup=split == "dedup")
    E = n * E_local
    idx, w = _routing(T * 10 + n, T, E, k, bad)
    cap = wm.capacity(T, cap_factor)
    want = sender_plan(idx, w, E, n, wm, cap, T)  # the torch path, on the CPU
    slots = (IDX_RANGE, IDX_REPEAT, W_NONFINITE, ROWS_OVER)
    mode = triton_plan.route_mode(wm.by_experts, wm.dedup)
    route, row_token, status, clamped, region_rows = triton_plan.route_rows_triton(
        idx, w, E, n, W, cap, STATUS_SLOTS, slots, mode)
    assert torch.equal(route, want.route_row) and torch.equal(row_token, want.row_token)
    assert torch.equal(clamped, want.topk_idx)
    assert torch.equal(region_rows.view(W, n), want.region_rows)
    if wm.dedup:  # the touches' table: the per-wave kernel without the input checks
        back, back_token, back_status, _, back_rows = triton_plan.route_rows_triton(
            idx, None, E, n, W, cap, STATUS_SLOTS, slots, triton_plan.PER_WAVE, checks=False)
        assert torch.equal(back, want.back_row) and torch.equal(back_token, want.back_token)
        assert torch.equal(back_rows.view(W, n), want.back_region_rows)
        status[ROWS_OVER] += back_status[ROWS_OVER]
        assert back_status[:ROWS_OVER].eq(0).all()
    assert status.tolist() == want.status.tolist()


def test_route_rows_leave_every_unused_row_of_a_larger_capacity_empty(triton_plan):
    """Regions sized for another rank's 4x more tokens: most rows stay unused (-1), filled by
    the count pass over several strides of its blocks."""
    from ep.checks import IDX_RANGE, IDX_REPEAT, ROWS_OVER, STATUS_SLOTS, W_NONFINITE
    from ep.plan import WaveMap, sender_plan, wave_capacity

    T, n, E_local, k, W = 40, 2, 4, 8, 2
    idx, w = _routing(7, T, n * E_local, k, False)
    cap = wave_capacity(4 * T, W)
    want = sender_plan(idx, w, n * E_local, n, WaveMap(W), cap, 4 * T)
    route, row_token, status, _, region_rows = triton_plan.route_rows_triton(
        idx, w, n * E_local, n, W, cap, STATUS_SLOTS, (IDX_RANGE, IDX_REPEAT, W_NONFINITE, ROWS_OVER))
    assert torch.equal(route, want.route_row) and torch.equal(row_token, want.row_token)
    assert (row_token == -1).sum() > W * n * cap // 2
    assert status.tolist() == want.status.tolist()
    assert torch.equal(region_rows.view(W, n), want.region_rows) and bool((region_rows < cap // 2).all())


@pytest.mark.parametrize("n, E_local, k, W, split", [(2, 4, 3, 2, "tokens"), (3, 2, 4, 1, "tokens"),
                                                     (2, 4, 3, 2, "experts"), (3, 4, 4, 3, "dedup"),
                                                     (2, 4, 3, 4, "dedup")])
def test_pack_rows_match_torch(triton_plan, n, E_local, k, W, split):
    from ep.plan import WaveMap, pack_rows, sender_plan
    from ep.layout import RowLayout

    T, H, E = 21, 13, n * E_local
    idx, w = _routing(7 + n, T, E, k)
    x = torch.randn(T, H)
    wm = WaveMap(W, by_experts=split != "tokens", dedup=split == "dedup")
    plan = sender_plan(idx, w, E, n, wm, wm.capacity(T, 0.7 if split == "dedup" else 1.0), T)
    layout = RowLayout(H, k, torch.float32)
    want = layout.empty(plan.row_token.shape[0], "cpu")
    pack_rows(x.double(), w, plan, RowLayout(H, k, torch.float64), layout_rows := RowLayout(H, k, torch.float64).empty(
        plan.row_token.shape[0], "cpu"))
    got = torch.full_like(want, float("nan"))
    triton_plan.pack_rows_triton(x, plan.topk_idx, w, plan.row_token, plan.status, layout.data(got), layout.ids(got),
                                 layout.weights(got), layout.status(got), E, n, plan.capacity,
                                 triton_plan.route_mode(wm.by_experts, wm.dedup), W,
                                 plan.back_row if wm.dedup else None, layout.back(got) if wm.dedup else None)
    ref = RowLayout(H, k, torch.float64)
    used = plan.row_token >= 0
    assert torch.equal(layout.data(got)[used], x[plan.row_token[used]])
    assert torch.equal(layout.ids(got), ref.ids(layout_rows))
    if wm.dedup:  # (a lowered capacity leaves some touches without a returned row: -1)
        assert torch.equal(layout.back(got)[used], ref.back(layout_rows)[used])
    torch.testing.assert_close(layout.weights(got), ref.weights(layout_rows).float(), rtol=0, atol=0)
    assert torch.equal(layout.status(got), ref.status(layout_rows))


@pytest.mark.parametrize("n, k, W, split", [(2, 3, 2, "tokens"), (3, 4, 3, "dedup")])
def test_pack_rows_quantized_match_torch(triton_plan, n, k, W, split):
    """FP8 dispatch's pack: each token quantized in 1x128 tiles inside the pack kernel, bit for
    bit the torch path's (`quantize_rows`, then the rows packed), bytes, scales and tables."""
    from ep.plan import WaveMap, pack_rows, sender_plan
    from ep.layout import RowLayout

    T, H, E = 19, 384, n * 4
    idx, w = _routing(11 + n, T, E, k)
    x = torch.randn(T, H) * torch.logspace(-3, 2, H)  # tiles of different binades
    x[3, 128:256] = 0  # a tile of zeros: scale 1
    wm = WaveMap(W, by_experts=split != "tokens", dedup=split == "dedup")
    plan = sender_plan(idx, w, E, n, wm, wm.capacity(T, 0.7 if split == "dedup" else 1.0), T)
    layout = RowLayout(H, k, torch.float32, torch.float8_e4m3fn)
    want = layout.empty(plan.row_token.shape[0], "cpu")
    pack_rows(x, w, plan, layout, want)  # the torch path (CPU tensors)
    got = torch.full_like(want, float("nan"))
    triton_plan.pack_rows_triton(x, plan.topk_idx, w, plan.row_token, plan.status, layout.data(got), layout.ids(got),
                                 layout.weights(got), layout.status(got), E, n, plan.capacity,
                                 triton_plan.route_mode(wm.by_experts, wm.dedup), W,
                                 plan.back_row if wm.dedup else None, layout.back(got) if wm.dedup else None,
                                 layout.scales(got))
    used = plan.row_token >= 0
    assert used.sum() > 0
    assert torch.equal(layout.data(got)[used].view(torch.uint8), layout.data(want)[used].view(torch.uint8))
    assert torch.equal(layout.scales(got)[used], layout.scales(want)[used])
    assert bool((layout.scales(got)[used] != 1).any()) and bool((layout.scales(got)[used] == 1).any())
    for part in (layout.ids, layout.weights, layout.status):
        assert torch.equal(part(got), part(want))
    if wm.dedup:
        assert torch.equal(layout.back(got)[used], layout.back(want)[used])


@pytest.mark.parametrize("N, k, E_local, empty_share", [(40, 3, 5, 0.3), (7, 8, 2, 0.6), (0, 2, 3, 0.0), (130, 4, 16, 0.1)])
def test_wave_items_match_torch(triton_plan, N, k, E_local, empty_share):
    from ep.plan import WaveMap, wave_items
    from ep.layout import RowLayout

    g = torch.Generator().manual_seed(N + k)
    ids = torch.randint(0, E_local, (N, k), generator=g, dtype=torch.int32)
    ids[torch.rand(N, k, generator=g) < empty_share] = -1
    weights = torch.rand(N, k, generator=g)
    layout = RowLayout(5, k, torch.float64)
    rows = layout.empty(N, "cpu")
    layout.ids(rows).copy_(ids)
    layout.weights(rows).copy_(weights.double())
    cap = N * min(k, E_local) + E_local
    want = wave_items(layout.ids(rows), layout.weights(rows), E_local, cap)  # torch path (float64 rows)
    f32 = RowLayout(5, k, torch.float32)
    rows32 = f32.empty(N, "cpu")
    f32.ids(rows32).copy_(ids)
    f32.weights(rows32).copy_(weights)
    item_row, item_weight, item_expert, offs, slot_item = triton_plan.wave_items_triton(
        f32.ids(rows32), f32.weights(rows32), E_local, cap)
    used = int(want.offs[-1])
    assert torch.equal(offs, want.offs) and torch.equal(slot_item, want.slot_item)
    assert torch.equal(item_row[:used], want.item_row[:used]) and torch.equal(item_expert[:used], want.item_expert[:used])
    torch.testing.assert_close(item_weight[:used], want.item_weight[:used].float(), rtol=0, atol=0)


@pytest.fixture(scope="module")
def triton_grouped():
    yield _fresh("ep.kernels.triton_grouped")
    sys.modules.pop("ep.kernels.triton_grouped", None)


@pytest.mark.parametrize("counts, K, N", [([5, 0, 37], 40, 50), ([0, 0], 16, 16), ([16, 1, 0, 33], 48, 20)])
def test_few_rows_grouped_mm_matches_float64(triton_grouped, counts, K, N):
    """Groups of more rows than a block (more passes), empty groups, K and N not multiples of
    a block, buffer rows past the last group (left alone)."""
    g = torch.Generator().manual_seed(sum(counts) + K)
    E, M = len(counts), sum(counts) + 3
    x = torch.randn(M, K, generator=g)
    w = torch.randn(E, K, N, generator=g)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    got = triton_grouped.grouped_mm_few_rows(x, w, offs, config=(16, 16, 16, 4, 1))
    start = 0
    for e, c in enumerate(counts):
        want = x[start:start + c].double() @ w[e].double()
        torch.testing.assert_close(got[start:start + c].double(), want, rtol=1e-4, atol=1e-4)
        start += c
    assert got.shape == (M, N)


def test_few_rows_grouped_mm_reads_through_an_index(triton_grouped):
    """Rows gathered by index as they are read (linear1's form) equal the gathered product,
    against float64; rows past the groups and empty groups as above."""
    g = torch.Generator().manual_seed(5)
    counts, K, N = [7, 0, 20], 24, 40
    E, I = len(counts), sum(counts)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    w = torch.randn(E, K, N, generator=g)
    src = torch.randn(50, K, generator=g)
    index = torch.randint(0, 50, (I + 2,), generator=g)  # two rows past the groups
    got = triton_grouped.grouped_mm_few_rows(src, w, offs, config=(16, 16, 16, 4, 1), index=index)
    start = 0
    for e, c in enumerate(counts):
        rows = slice(start, start + c)
        torch.testing.assert_close(got[rows].double(), src[index[rows]].double() @ w[e].double(), rtol=1e-4, atol=1e-4)
        start += c
    assert got.shape == (I + 2, N)
    with pytest.raises(ValueError, match="columns"):
        triton_grouped.grouped_mm_few_rows(src[:, :-1], w, offs)


def test_gather_slots_matches_torch(triton_rows):
    from ep.kernels.permute import gather_slots

    g = torch.Generator().manual_seed(9)
    values = torch.rand(30, generator=g)
    items = torch.randint(-1, 30, (21, 5), generator=g)
    want = torch.full((21, 8), 7.0)
    got = torch.full((21, 8), 7.0)
    gather_slots(values, items, want[:, :5])  # torch path (the module under the interpreter is triton_rows)
    triton_rows.gather_slots_triton(values, items, got[:, :5])  # strided rows, columns past k untouched
    assert torch.equal(got, want) and (got[:, 5:] == 7.0).all() and (want[:, :5][items < 0] == 0).all()


@pytest.mark.parametrize("T, n, E_local, k", [(37, 2, 4, 3), (5, 4, 2, 8), (0, 2, 2, 2)])
@pytest.mark.parametrize("split", ["tokens", "experts", "dedup"])
def test_returned_slot_values_match_torch(triton_plan, T, n, E_local, k, split):
    from ep.plan import WaveMap, returned_slot_values, sender_plan

    idx, w = _routing(T + n, T, n * E_local, k, False)
    wm = WaveMap(2, by_experts=split != "tokens", dedup=split == "dedup")
    plan = sender_plan(idx, w, n * E_local, n, wm, wm.capacity(T, 0.6), T)  # some routes past the capacity
    values = torch.randn(plan.row_token.shape[0] + 1, k + 3, generator=torch.Generator().manual_seed(T))[:, :k]
    want = returned_slot_values(plan, values)  # torch path (strided rows of values)
    got = triton_plan.returned_slots_triton(plan.back_row, plan.topk_idx, E_local, values, n, 2)
    assert torch.equal(got, want)
    if T:  # the capacity left some routes without a row: their slots read 0
        assert (plan.back_row < 0).any() and (want == 0).any()
