"""Tests of lrkernels.masks: BlockLayout, its builders, transpose, validation and the
FlexAttention conversions, against brute-force element masks at small sizes (CPU)."""

from __future__ import annotations

import itertools
import math
import random
import time
import warnings

import pytest
import torch

from lrkernels import masks
from lrkernels.masks import BlockLayout

I32 = torch.int32


# ---------------------------------------------------------------------------------------------
# Brute-force references (written independently of the module's arithmetic)
# ---------------------------------------------------------------------------------------------


def brute_window(sq, sk, left, right):
    """Bool (Sq, Sk) straight from the contract: i + Sk − Sq − left ≤ j ≤ i + Sk − Sq + right."""
    vis = torch.zeros(sq, sk, dtype=torch.bool)
    for i in range(sq):
        lo = 0 if left < 0 else max(0, i + sk - sq - left)
        hi = sk - 1 if right < 0 else min(sk - 1, i + sk - sq + right)
        if lo <= hi:
            vis[i, lo : hi + 1] = True
    return vis


def block_stats(vis, bq, bk):
    """(any, all) bool (..., NQB, NKB) over the in-bounds elements of each block."""
    sq, sk = vis.shape[-2:]
    nqb, nkb = math.ceil(sq / bq), math.ceil(sk / bk)
    pad = (0, nkb * bk - sk, 0, nqb * bq - sq)
    v = torch.nn.functional.pad(vis.to(torch.int64), pad)
    inb = torch.nn.functional.pad(torch.ones(sq, sk, dtype=torch.int64), pad)
    shape = (*v.shape[:-2], nqb, bq, nkb, bk)
    cnt = v.reshape(shape).sum((-3, -1))
    tot = inb.reshape(nqb, bq, nkb, bk).sum((-3, -1))
    return cnt > 0, cnt == tot


def check_canonical(layout: BlockLayout):
    """Ascending entries, 0 padding, common width max(1, largest count)."""
    lists = [(layout.kv_num_blocks, layout.kv_indices)]
    if layout.full_kv_num_blocks is not None:
        lists.append((layout.full_kv_num_blocks, layout.full_kv_indices))
    width = layout.kv_indices.shape[-1]
    assert width == max([1] + [int(c.max()) for c, _ in lists])
    for counts, idx in lists:
        assert idx.shape[-1] == width
        valid = torch.arange(width) < counts.unsqueeze(-1)
        assert (idx[~valid] == 0).all()
        d = idx[..., 1:] - idx[..., :-1]
        assert (d[valid[..., 1:]] > 0).all()


def check_exact(layout: BlockLayout, vis):
    """full ⇔ every in-bounds element visible, partial ⇔ some, absent ⇔ none; and the
    layout's implied element mask (full blocks + window on partial) equals `vis`."""
    layout.validate()
    check_canonical(layout)
    any_v, all_v = block_stats(vis, layout.block_q, layout.block_k)
    full = layout.dense_block_mask("full")
    part = layout.dense_block_mask("partial")
    assert torch.equal(full, all_v.expand_as(full)), "full blocks != fully visible blocks"
    assert torch.equal(part, (any_v & ~all_v).expand_as(part)), "partial != some visible"
    assert torch.equal(layout.dense_element_mask(), vis.expand(*layout.broadcast_shape, -1, -1))


def check_covers(layout: BlockLayout, vis):
    """Every visible element lies in a listed block (and the implied mask is `vis`)."""
    layout.validate()
    any_v, _ = block_stats(vis, layout.block_q, layout.block_k)
    listed = layout.dense_block_mask("all")
    assert not (any_v & ~listed).any(), "a visible element lies outside the listed blocks"
    assert torch.equal(layout.dense_element_mask(), vis.expand(*layout.broadcast_shape, -1, -1))


def same_lists(a: BlockLayout, b: BlockLayout):
    a, b = a.canonical(), b.canonical()
    assert (a.q_len, a.kv_len, a.block_q, a.block_k, a.window) == (
        b.q_len,
        b.kv_len,
        b.block_q,
        b.block_k,
        b.window,
    )
    assert torch.equal(a.kv_num_blocks, b.kv_num_blocks)
    assert torch.equal(a.kv_indices, b.kv_indices)
    assert (a.full_kv_num_blocks is None) == (b.full_kv_num_blocks is None)
    if a.full_kv_num_blocks is not None:
        assert torch.equal(a.full_kv_num_blocks, b.full_kv_num_blocks)
        assert torch.equal(a.full_kv_indices, b.full_kv_indices)


# ---------------------------------------------------------------------------------------------
# local_window_layout / causal_layout
# ---------------------------------------------------------------------------------------------

LENGTHS = [(1, 1), (5, 5), (100, 100), (97, 203), (203, 97), (300, 31), (17, 300), (256, 256)]
BLOCKS = [(16, 16), (32, 16), (16, 64), (64, 32)]
WINDOWS = [(-1, -1), (-1, 0), (0, 0), (0, -1), (5, 3), (40, 0), (0, 40), (100, -1), (-1, 17)]
WINDOWS += [(63, 64), (1000, 1000), (16, 16)]


@pytest.mark.parametrize("sq,sk", LENGTHS)
@pytest.mark.parametrize("bq,bk", BLOCKS)
def test_local_window_matches_brute_force(sq, sk, bq, bk):
    for window in WINDOWS:
        layout = masks.local_window_layout(sq, sk, window, block_q=bq, block_k=bk)
        assert layout.window == window
        assert layout.kv_indices.dtype == I32 and layout.full_kv_indices.dtype == I32
        assert layout.kv_num_blocks.shape == (1, 1, math.ceil(sq / bq))
        check_exact(layout, brute_window(sq, sk, *window))


def test_local_window_random_configs():
    rng = random.Random(1234)
    for _ in range(60):
        sq, sk = rng.randint(1, 300), rng.randint(1, 300)
        bq, bk = rng.choice([16, 32, 64]), rng.choice([16, 32, 64])
        window = (
            rng.choice([-1, 0, 1, rng.randint(0, 320)]),
            rng.choice([-1, 0, 1, rng.randint(0, 320)]),
        )
        layout = masks.local_window_layout(sq, sk, window, block_q=bq, block_k=bk)
        check_exact(layout, brute_window(sq, sk, *window))


def test_last_short_blocks_can_be_full():
    # Sq = Sk = 40 with 32-blocks: the last query block has 8 rows, the last key block 8 keys.
    # Causal: block (1, 0) (rows 32..39, keys 0..31) is wholly visible, so it is full although
    # only 8 of its 32 rows exist; (1, 1) is cut by the diagonal, (0, 1) lies above it.
    layout = masks.causal_layout(40, 40, block_q=32, block_k=32)
    assert layout.dense_block_mask("full")[0, 0].tolist() == [[False, False], [True, False]]
    assert layout.dense_block_mask("partial")[0, 0].tolist() == [[True, False], [False, True]]
    # Unbounded window: everything full, no partial block anywhere, even the short ones.
    layout = masks.local_window_layout(41, 23, (-1, -1), block_q=16, block_k=16)
    assert int(layout.kv_num_blocks.sum()) == 0
    assert layout.dense_block_mask("full").all()


def test_rows_that_see_nothing_have_count_zero():
    # Sq > Sk, causal: the first Sq − Sk rows see no key (bottom-right alignment).
    layout = masks.causal_layout(200, 50, block_q=32, block_k=16)
    counts = layout.kv_num_blocks + layout.full_kv_num_blocks
    assert counts[0, 0, :4].tolist() == [0, 0, 0, 0]  # rows 0..127 < 150
    assert counts[0, 0, 4] > 0  # rows 128..159 include rows ≥ 150
    check_exact(layout, brute_window(200, 50, -1, 0))


def test_causal_layout_and_causal_flag():
    a = masks.causal_layout(130, 170, block_q=32, block_k=16)
    b = masks.local_window_layout(130, 170, (-1, 0), block_q=32, block_k=16)
    c = masks.local_window_layout(130, 170, causal=True, block_q=32, block_k=16)
    d = masks.local_window_layout(130, 170, (20, -1), causal=True, block_q=32, block_k=16)
    same_lists(a, b)
    same_lists(a, c)
    assert d.window == (20, 0)
    check_exact(d, brute_window(130, 170, 20, 0))
    with pytest.raises(ValueError, match="causal"):
        masks.local_window_layout(10, 10, (4, 1), causal=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(q_len=0, kv_len=4),
        dict(q_len=4, kv_len=-1),
        dict(q_len=4, kv_len=4, block_q=0),
        dict(q_len=4, kv_len=4, window=(-2, 0)),
        dict(q_len=4, kv_len=4, window=(1, 2, 3)),
    ],
)
def test_local_window_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        masks.local_window_layout(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window=(4.9, 0)), r"window: left must be an int, got 4\.9"),
        (dict(window=(-0.5, 0)), r"window: left must be an int, got -0\.5"),
        (dict(window=(True, 0)), r"window: left must be an int, got True"),
        (
            dict(window=(0, torch.tensor(1.0))),
            "window: right must be an int or a one-element integer",
        ),
        (dict(window="4"), "window must be a pair"),
        (dict(block_q=64.0), "block_q must be an int, got 64.0"),
        (dict(block_k=True), "block_k must be an int, got True"),
        (dict(q_len=torch.tensor(True)), "q_len must be an int, got a bool tensor"),
    ],
)
def test_window_and_sizes_must_be_ints(kwargs, match):
    args = dict(q_len=64, kv_len=64, window=(4, 0), block_q=16, block_k=16) | kwargs
    with pytest.raises(TypeError, match=match):
        masks.local_window_layout(**args)


def test_integer_tensors_and_numpy_ints_are_ints():
    import numpy as np

    ref = masks.local_window_layout(64, 64, (4, 0), block_q=16, block_k=16)
    got = masks.local_window_layout(
        torch.tensor(64), np.int64(64), (torch.tensor(4), np.int32(0)), block_q=np.int64(16),
        block_k=torch.tensor(16, dtype=torch.int32),
    )  # fmt: skip
    assert got.window == (4, 0) and type(got.window[0]) is int and type(got.q_len) is int
    assert torch.equal(got.kv_indices, ref.kv_indices)
    for build in (
        lambda: masks.dilated_layout(64, 64, stride=2.0, window_blocks=1, block_q=16, block_k=16),
        lambda: masks.bigbird_layout(
            64, 64, window_blocks=1, global_blocks=1, random_blocks=1.5, block_q=16, block_k=16
        ),
        lambda: masks.longformer_layout(64, 64, window=3.5, global_tokens=1),
        lambda: masks.BlockLayout(
            64, 64, 16, 16, ref.kv_num_blocks, ref.kv_indices, window=(2.5, 0)
        ),
    ):
        with pytest.raises(TypeError, match="must be (an int|a pair)"):
            build()


def test_one_million_tokens_is_linear_in_memory():
    s, block, w = 1 << 20, 128, 512
    t0 = time.perf_counter()
    layout = masks.local_window_layout(s, s, (w, w), block_q=block, block_k=block)
    t = layout.transposed()
    elapsed = time.perf_counter() - t0
    nqb = s // block
    maxb = layout.kv_indices.shape[-1]
    # The band of a 128-row block spans 128 + 2·512 keys: at most 10 key blocks.
    assert maxb <= (block + 2 * w) // block + 1
    assert layout.kv_indices.shape == (1, 1, nqb, maxb)
    assert layout.full_kv_indices.shape == (1, 1, nqb, maxb)
    assert t.q_indices.shape[:3] == (1, 1, nqb) and t.q_indices.shape[-1] <= 10
    total = sum(
        x.numel()
        for x in (
            layout.kv_num_blocks,
            layout.kv_indices,
            layout.full_kv_num_blocks,
            layout.full_kv_indices,
            *t,
        )
    )
    assert total < 50 * nqb  # O(NQB·MAXB), nowhere near S² = 2^40
    # Interior row 100 (rows 12800..12927) touches keys 12288..13439 (blocks 96..104); blocks
    # 97..103 lie inside every row's ±512 band: 7 full, 2 partial.
    assert layout.full_kv_num_blocks[0, 0, 100] == 7 and layout.kv_num_blocks[0, 0, 100] == 2
    assert layout.num_computed_blocks() == int(
        layout.kv_num_blocks.sum() + layout.full_kv_num_blocks.sum()
    )
    assert elapsed < 10, f"1M-token layout took {elapsed:.1f}s"


# ---------------------------------------------------------------------------------------------
# dilated / longformer / bigbird / from_block_mask_matrix
# ---------------------------------------------------------------------------------------------


def brute_dilated(sq, sk, bq, bk, stride, window_blocks, causal):
    vis = torch.zeros(sq, sk, dtype=torch.bool)
    o = sk - sq
    nqb, nkb = math.ceil(sq / bq), math.ceil(sk / bk)
    for qb in range(nqb):
        i1 = min((qb + 1) * bq, sq) - 1
        c = (i1 + o) // bk
        for kb in range(nkb):
            dist = kb - c
            if abs(dist) > window_blocks or dist % stride != 0 or (causal and dist > 0):
                continue
            for i in range(qb * bq, min((qb + 1) * bq, sq)):
                hi = min((kb + 1) * bk, sk)
                if causal:
                    hi = min(hi, i + o + 1)
                if kb * bk < hi:
                    vis[i, kb * bk : hi] = True
    return vis


@pytest.mark.parametrize("sq,sk", [(100, 100), (97, 203), (203, 97), (256, 256), (5, 70)])
@pytest.mark.parametrize("bq,bk", [(16, 16), (32, 16), (16, 32)])
@pytest.mark.parametrize("causal", [False, True])
def test_dilated_matches_definition(sq, sk, bq, bk, causal):
    for stride, wb in [(1, 0), (1, 2), (2, 4), (3, 7), (2, 100)]:
        layout = masks.dilated_layout(
            sq, sk, stride=stride, window_blocks=wb, block_q=bq, block_k=bk, causal=causal
        )
        assert layout.window == ((-1, 0) if causal else (-1, -1))
        check_exact(layout, brute_dilated(sq, sk, bq, bk, stride, wb, causal))
        if not causal:
            assert int(layout.kv_num_blocks.sum()) == 0  # all listed blocks full


def test_dilated_square_is_block_stride_pattern():
    layout = masks.dilated_layout(128, 128, stride=2, window_blocks=4, block_q=16, block_k=16)
    dense = layout.dense_block_mask()[0, 0]
    for qb, kb in itertools.product(range(8), range(8)):
        assert bool(dense[qb, kb]) == (abs(kb - qb) <= 4 and (kb - qb) % 2 == 0)
    with pytest.raises(ValueError, match="stride"):
        masks.dilated_layout(10, 10, stride=0, window_blocks=1)


def brute_longformer(sq, sk, bq, bk, window, g):
    vis = brute_window(sq, sk, *window)
    gq, gk = math.ceil(g / bq) * bq, math.ceil(g / bk) * bk
    vis[:gq, :] = True
    vis[:, :gk] = True
    return vis


@pytest.mark.parametrize("sq,sk", [(100, 100), (97, 203), (203, 97), (300, 300)])
@pytest.mark.parametrize("bq,bk", [(16, 16), (32, 16), (16, 64)])
def test_longformer_matches_definition(sq, sk, bq, bk):
    for window, g in [((8, 8), 0), ((8, 8), 1), ((20, 3), 17), ((0, 0), 40), ((-1, 0), 5)]:
        window = window if window != (8, 8) else 8  # the int form is (w, w)
        layout = masks.longformer_layout(
            sq, sk, window=window, global_tokens=g, block_q=bq, block_k=bk
        )
        win = (window, window) if isinstance(window, int) else window
        assert layout.window == win
        check_exact(layout, brute_longformer(sq, sk, bq, bk, win, g))
        if g > 0:
            assert layout.kv_indices.shape[-1] == math.ceil(sk / bk)  # global rows list all


def test_bigbird_structure_and_determinism():
    sq = sk = 320
    b = 16
    nqb = nkb = sq // b
    kw = dict(window_blocks=1, global_blocks=2, random_blocks=3, block_q=b, block_k=b)
    layout = masks.bigbird_layout(sq, sk, seed=7, num_heads=4, **kw)
    layout.validate()
    check_canonical(layout)
    assert layout.broadcast_shape == (1, 4)
    assert int(layout.kv_num_blocks.sum()) == 0 and layout.window == (-1, -1)
    dense = layout.dense_block_mask("full")[0]
    for h, qb in itertools.product(range(4), range(nqb)):
        row = dense[h, qb]
        if qb < 2:
            assert row.all()
            continue
        fixed = {0, 1} | {k for k in range(qb - 1, qb + 2) if 0 <= k < nkb}
        assert all(row[k] for k in fixed)
        extra = set(row.nonzero().flatten().tolist()) - fixed
        assert len(extra) == min(3, nkb - len(fixed))
    again = masks.bigbird_layout(sq, sk, seed=7, num_heads=4, **kw)
    same_lists(layout, again)
    other = masks.bigbird_layout(sq, sk, seed=8, num_heads=4, **kw)
    assert not torch.equal(other.full_kv_indices, layout.full_kv_indices)
    assert not torch.equal(dense[0], dense[1])  # heads draw independently


def test_bigbird_uneven_and_saturated():
    # Sq ≠ Sk and odd lengths: random blocks only from the free ones; when fewer than
    # random_blocks are free, every block gets listed.
    layout = masks.bigbird_layout(
        203, 97, window_blocks=1, global_blocks=1, random_blocks=50, block_q=32, block_k=16
    )
    layout.validate()
    assert layout.dense_block_mask().all()
    layout = masks.bigbird_layout(
        97, 203, window_blocks=0, global_blocks=0, random_blocks=2, block_q=16, block_k=32, seed=3
    )
    layout.validate()
    counts = layout.full_kv_num_blocks[0, 0]
    c = [((min((q + 1) * 16, 97) - 1 + 106) // 32) for q in range(7)]
    for qb in range(7):
        assert counts[qb] == (1 if 0 <= c[qb] < 7 else 0) + 2


def test_from_block_mask_matrix_and_errors():
    torch.manual_seed(0)
    sq, sk, bq, bk = 150, 77, 32, 16
    nqb, nkb = 5, 5
    mask = torch.rand(2, 3, nqb, nkb) < 0.5
    full = mask & (torch.rand(2, 3, nqb, nkb) < 0.5)
    layout = masks.from_block_mask_matrix(mask, sq, sk, bq, bk, full=full, window=(3, 3))
    layout.validate()
    check_canonical(layout)
    assert layout.broadcast_shape == (2, 3) and layout.window == (3, 3)
    assert torch.equal(layout.dense_block_mask("full"), full)
    assert torch.equal(layout.dense_block_mask("partial"), mask & ~full)
    all_full = masks.from_block_mask_matrix(mask[0, 0], sq, sk, bq, bk)
    assert torch.equal(all_full.dense_block_mask("full")[0, 0], mask[0, 0])
    assert int(all_full.kv_num_blocks.sum()) == 0
    # An empty mask still gives MAXB = 1 (non-empty tensors for the kernels).
    empty = masks.from_block_mask_matrix(torch.zeros(nqb, nkb, dtype=torch.bool), sq, sk, bq, bk)
    assert empty.kv_indices.shape == (1, 1, nqb, 1) and empty.num_computed_blocks() == 0
    with pytest.raises(ValueError, match="subset"):
        masks.from_block_mask_matrix(mask, sq, sk, bq, bk, full=~mask)
    with pytest.raises(ValueError, match="mask must be"):
        masks.from_block_mask_matrix(mask[..., :4], sq, sk, bq, bk)
    with pytest.raises(ValueError, match="bool"):
        masks.from_block_mask_matrix(mask.int(), sq, sk, bq, bk)


# ---------------------------------------------------------------------------------------------
# transpose, statistics, refine, to()
# ---------------------------------------------------------------------------------------------


def _layouts_for_transpose():
    torch.manual_seed(1)
    mask = torch.rand(2, 3, 7, 9) < 0.4
    yield masks.from_block_mask_matrix(
        mask, 200, 130, 32, 16, full=mask & (torch.rand_like(mask, dtype=torch.float) < 0.5)
    )
    yield masks.local_window_layout(300, 190, (50, 20), block_q=16, block_k=32)
    yield masks.causal_layout(97, 203, block_q=16, block_k=16)
    yield masks.bigbird_layout(
        256, 256, window_blocks=1, global_blocks=1, random_blocks=2, block_q=16, block_k=16,
        num_heads=2,
    )  # fmt: skip
    yield masks.longformer_layout(200, 200, window=10, global_tokens=20, block_q=32, block_k=16)
    only_partial = masks.local_window_layout(64, 64, (3, 3), block_q=16, block_k=16)
    yield BlockLayout(
        q_len=64, kv_len=64, block_q=16, block_k=16,
        kv_num_blocks=only_partial.kv_num_blocks, kv_indices=only_partial.kv_indices,
        window=(3, 3),
    )  # fmt: skip


@pytest.mark.parametrize("layout", list(_layouts_for_transpose()), ids=lambda x: repr(x)[:60])
def test_transpose_matches_dense_and_is_cached(layout):
    t = layout.transposed()
    assert layout.transposed() is t
    nqb = layout.num_q_blocks
    bl, hl = layout.broadcast_shape
    assert t.q_num_blocks.shape == (bl, hl, layout.num_kv_blocks)
    assert t.q_num_blocks.dtype == I32 and t.q_indices.dtype == I32
    assert (t.full_q_num_blocks is None) == (layout.full_kv_num_blocks is None)
    # The transpose is itself a layout of the transposed problem (keys as queries).
    as_layout = BlockLayout(
        q_len=layout.kv_len, kv_len=layout.q_len, block_q=layout.block_k,
        block_k=layout.block_q, kv_num_blocks=t.q_num_blocks, kv_indices=t.q_indices,
        full_kv_num_blocks=t.full_q_num_blocks, full_kv_indices=t.full_q_indices,
    )  # fmt: skip
    as_layout.validate()
    check_canonical(as_layout)
    for which in ("partial", "full"):
        expect = layout.dense_block_mask(which).transpose(-1, -2)
        assert torch.equal(as_layout.dense_block_mask(which), expect)
    assert t.q_indices.shape[-1] <= nqb
    moved = layout.to("cpu")
    assert moved._transposed is not None and torch.equal(moved.transposed().q_indices, t.q_indices)


def test_statistics_and_repr():
    layout = masks.local_window_layout(256, 256, (16, 16), block_q=32, block_k=32)
    n = int(layout.kv_num_blocks.sum() + layout.full_kv_num_blocks.sum())
    assert layout.num_computed_blocks() == n
    assert layout.num_computed_blocks(batch=3, heads=4) == 12 * n
    assert layout.density() == pytest.approx(n / 64)
    assert layout.broadcast_shape == (1, 1)
    r = repr(layout)
    assert len(r) < 200 and "window=(16, 16)" in r and "grid=(8, 8)" in r
    multi = masks.from_block_mask_matrix(torch.ones(2, 1, 8, 8, dtype=torch.bool), 256, 256, 32, 32)
    assert multi.num_computed_blocks(batch=2, heads=5) == 2 * 64 * 5
    with pytest.raises(ValueError, match="batch"):
        multi.num_computed_blocks(batch=3)


def test_refine_and_canonical():
    # All touched blocks listed as partial with the window: refining yields the window layout.
    sq, sk, bq, bk, win = 150, 181, 16, 32, (30, 5)
    any_v, _ = block_stats(brute_window(sq, sk, *win), bq, bk)
    loose = masks.from_block_mask_matrix(
        any_v, sq, sk, bq, bk, full=torch.zeros_like(any_v), window=win
    )
    same_lists(loose.refine(), masks.local_window_layout(sq, sk, win, block_q=bq, block_k=bk))
    # Extra listed blocks with nothing visible are dropped by refine.
    everything = torch.ones_like(any_v)
    loose = masks.from_block_mask_matrix(
        everything, sq, sk, bq, bk, full=torch.zeros_like(any_v), window=win
    )
    same_lists(loose.refine(), masks.local_window_layout(sq, sk, win, block_q=bq, block_k=bk))
    # canonical() sorts, pads with 0 and trims.
    layout = BlockLayout(
        q_len=32, kv_len=64, block_q=16, block_k=16,
        kv_num_blocks=torch.tensor([[[2, 1]]], dtype=I32),
        kv_indices=torch.tensor([[[[3, 1, 7, 9], [2, 5, 5, 5]]]], dtype=I32),
    )  # fmt: skip
    c = layout.canonical()
    assert c.kv_indices.tolist() == [[[[1, 3], [2, 0]]]]
    assert c.full_kv_num_blocks is None


# ---------------------------------------------------------------------------------------------
# validate()
# ---------------------------------------------------------------------------------------------


def _good():
    return masks.local_window_layout(100, 90, (20, 5), block_q=16, block_k=16)


def _with(**changes):
    g = _good()
    fields = dict(
        q_len=g.q_len, kv_len=g.kv_len, block_q=g.block_q, block_k=g.block_k,
        kv_num_blocks=g.kv_num_blocks.clone(), kv_indices=g.kv_indices.clone(),
        full_kv_num_blocks=g.full_kv_num_blocks.clone(), full_kv_indices=g.full_kv_indices.clone(),
        window=g.window,
    )  # fmt: skip
    for k, v in changes.items():
        fields[k] = v(fields[k]) if callable(v) else v
    return BlockLayout(**fields)


def _set(t, where, value):
    t = t.clone()
    t[where] = value
    return t


BAD = {
    "counts dtype": (dict(kv_num_blocks=lambda t: t.long()), r"kv_num_blocks must be int32"),
    "indices dtype": (dict(full_kv_indices=lambda t: t.long()), r"full_kv_indices must be int32"),
    "counts ndim": (dict(kv_num_blocks=lambda t: t[0]), r"kv_num_blocks must be 3-D"),
    "indices ndim": (dict(kv_indices=lambda t: t[0]), r"kv_indices must be 4-D"),
    "wrong NQB": (dict(q_len=200), r"kv_num_blocks has 7 query blocks"),
    "shape mismatch": (
        dict(kv_indices=lambda t: t.expand(2, 1, -1, -1).contiguous()),
        r"kv_indices shape",
    ),
    "full shape": (dict(full_kv_indices=lambda t: t[..., :1].contiguous()), r"full_kv_indices"),
    "full one-sided": (dict(full_kv_indices=None), r"full_kv_num_blocks and"),
    "count too big": (
        dict(kv_num_blocks=lambda t: _set(t, (0, 0, 3), 99)),
        r"kv_num_blocks\[0, 0, 3\] = 99",
    ),
    "count negative": (
        dict(full_kv_num_blocks=lambda t: _set(t, (0, 0, 1), -1)),
        r"full_kv_num_blocks\[0, 0, 1\] = -1",
    ),
    "index too big": (
        dict(kv_indices=lambda t: _set(t, (0, 0, 6, 0), 6)),
        r"kv_indices\[0, 0, 6, 0\] = 6 is outside \[0, NKB = 6\)",
    ),
    "index negative": (
        dict(full_kv_indices=lambda t: _set(t, (0, 0, 6, 0), -3)),
        r"full_kv_indices\[0, 0, 6, 0\] = -3",
    ),
    "duplicate across lists": (
        dict(kv_indices=lambda t: _set(t, (0, 0, 6, 0), 5)),  # row 6: full [5], partial [4]
        r"key block 5 is listed twice in row \[0, 0, 6\]",
    ),
    "window": (dict(window=(-2, 0)), r"BlockLayout.window: left"),
    "block size": (dict(block_k=0), r"BlockLayout.block_k must be a positive int"),
    "q_len": (dict(q_len=0), r"BlockLayout.q_len must be a positive int"),
}


def test_good_layout_validates():
    g = _good()
    assert g.validate() is g
    # The rows used by BAD: row 6 has full [5] and partial [4]; row 3 partial [1, 2, 3].
    assert g.full_kv_num_blocks[0, 0, 6] == 1 and g.full_kv_indices[0, 0, 6, 0] == 5
    assert g.kv_num_blocks[0, 0, 6] == 1 and g.kv_indices[0, 0, 6, 0] == 4
    assert g.kv_indices[0, 0, 3].tolist() == [1, 2, 3]


@pytest.mark.parametrize("name", list(BAD))
def test_validate_errors(name):
    changes, pattern = BAD[name]
    with pytest.raises(ValueError, match=pattern):
        _with(**changes).validate()


def test_validate_duplicates_within_a_list_and_broadcast():
    dup = _with(kv_indices=lambda t: _set(t, (0, 0, 3, 1), 1))
    with pytest.raises(ValueError, match="listed twice"):
        dup.validate()
    with pytest.raises(ValueError, match="Bl = 2 must be 1 or batch 3"):
        _with(kv_num_blocks=lambda t: t.expand(2, 1, -1).contiguous(),
              kv_indices=lambda t: t.expand(2, 1, -1, -1).contiguous(),
              full_kv_num_blocks=lambda t: t.expand(2, 1, -1).contiguous(),
              full_kv_indices=lambda t: t.expand(2, 1, -1, -1).contiguous()).validate(batch=3)  # fmt: skip
    _good().validate(batch=5, heads=7)  # (1, 1) broadcasts to anything


# ---------------------------------------------------------------------------------------------
# FlexAttention
# ---------------------------------------------------------------------------------------------

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def dense_attention(q, k, v, vis, scale):
    """Masked softmax reference in float64; rows with no visible key give out 0, lse −inf."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return p @ v.double(), lse


def run_flex(q, k, v, block_mask, scale):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile" (eager is the point)
        out, aux = flex.flex_attention(
            q, k, v, block_mask=block_mask, scale=scale, return_aux=flex.AuxRequest(lse=True),
            enable_gqa=q.shape[1] != k.shape[1],
        )  # fmt: skip
    return out, aux.lse


WINDOW_CASES = ("window", "causal sq>sk", "decode-like")


def _flex_cases():
    yield "window", masks.local_window_layout(150, 93, (20, 7), block_q=32, block_k=16), 2, 2
    yield "causal sq>sk", masks.causal_layout(203, 97, block_q=16, block_k=32), 1, 2
    yield "decode-like", masks.local_window_layout(5, 130, (40, 0), block_q=16, block_k=16), 2, 1
    yield (
        "dilated causal",
        masks.dilated_layout(
            130, 130, stride=2, window_blocks=4, block_q=16, block_k=16, causal=True
        ),
        1,
        1,
    )
    yield (
        "longformer",
        masks.longformer_layout(120, 150, window=(9, 4), global_tokens=10, block_q=16, block_k=32),
        1,
        1,
    )
    yield "bigbird heads", masks.bigbird_layout(
        128, 128, window_blocks=1, global_blocks=1, random_blocks=1, block_q=16, block_k=16,
        num_heads=4,
    ), 2, 4  # fmt: skip
    torch.manual_seed(5)
    m = torch.rand(2, 1, 5, 7) < 0.5
    yield (
        "matrix",
        masks.from_block_mask_matrix(
            m, 77, 100, 16, 16, full=m & (torch.rand(2, 1, 5, 7) < 0.5), window=(10, 10)
        ),
        2,
        2,
    )


@pytest.mark.parametrize(
    "name,layout,batch,heads", list(_flex_cases()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_flex_attention_matches_dense_reference(name, layout, batch, heads):
    torch.manual_seed(0)
    d = 16
    q = torch.randn(batch, heads, layout.q_len, d)
    hkv = 2 if heads == 4 else heads  # GQA in the bigbird case
    k = torch.randn(batch, hkv, layout.kv_len, d)
    v = torch.randn(batch, hkv, layout.kv_len, d)
    scale = d**-0.5
    layout.validate(batch=batch, heads=heads)
    vis = layout.dense_element_mask()  # (Bl, Hl, Sq, Sk); checked against brute force above
    if name in WINDOW_CASES:  # and here straight from the contract's window formula
        assert torch.equal(vis[0, 0], brute_window(layout.q_len, layout.kv_len, *layout.window))
    kk = k.repeat_interleave(heads // hkv, dim=1)
    vv = v.repeat_interleave(heads // hkv, dim=1)
    ref_out, ref_lse = dense_attention(q, kk, vv, vis, scale)
    bm = masks.to_flex_block_mask(layout)
    # The default mask_mod is the window alone where that is exact, else the block table.
    assert bm.mask_mod.lrkernels_uses_table == (name not in WINDOW_CASES)
    out, lse = run_flex(q, k, v, bm, scale)
    seen = vis.expand(batch, heads, -1, -1).any(-1)
    torch.testing.assert_close(out.double()[seen], ref_out[seen], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double()[seen], ref_lse[seen], atol=1e-5, rtol=1e-5)
    # FlexAttention gives unseeing rows out = 0 and lse = −inf, like the kernels' contract.
    assert (out[~seen] == 0).all() and torch.isneginf(lse[~seen]).all()
    if name == "causal sq>sk":
        assert (~seen).any()
    if name in WINDOW_CASES:
        # The block-table mask_mod gives the same attention.
        bm2 = masks.to_flex_block_mask(layout, exact_mask_mod=True)
        assert bm2.mask_mod.lrkernels_uses_table
        out2, _ = run_flex(q, k, v, bm2, scale)
        torch.testing.assert_close(out2[seen], out[seen], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "name,layout,batch,heads", list(_flex_cases()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_flex_round_trip(name, layout, batch, heads):
    bm = masks.to_flex_block_mask(layout)
    assert bm.BLOCK_SIZE == (layout.block_q, layout.block_k)
    assert bm.seq_lengths == (layout.q_len, layout.kv_len)
    back = masks.from_flex_block_mask(bm)  # window recorded on the mask_mod
    same_lists(back, layout)
    assert back.window == layout.window
    back = masks.from_flex_block_mask(bm, window=(-1, -1))
    assert back.window == (-1, -1)
    # FlexAttention's own dense transpose agrees with ours. (Its lists are as wide as the block
    # count, which torch < 2.13 requires: the BlockMask's kv lists are padded to that width.)
    assert bm.kv_indices.shape[-1] == layout.num_kv_blocks
    assert bm.q_indices.shape[-1] == layout.num_q_blocks
    ref = flex.BlockMask.from_kv_blocks(
        bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
        bm.full_kv_indices, BLOCK_SIZE=(layout.block_q, layout.block_k),
        seq_lengths=(layout.q_len, layout.kv_len),
    )  # fmt: skip
    t = layout.transposed()
    for ours_c, ours_i, theirs_c, theirs_i in (
        (t.q_num_blocks, t.q_indices, ref.q_num_blocks, ref.q_indices),
        (t.full_q_num_blocks, t.full_q_indices, ref.full_q_num_blocks, ref.full_q_indices),
    ):
        assert torch.equal(ours_c, theirs_c)
        w = ours_i.shape[-1]
        valid = torch.arange(w) < ours_c.unsqueeze(-1)
        # FlexAttention lists the valid entries first, ascending, like our canonical form.
        assert torch.equal(ours_i[valid], theirs_i[..., :w][valid])


@pytest.mark.parametrize("sq,sk", [(150, 150), (97, 203), (203, 97), (40, 40)])
@pytest.mark.parametrize("window", [(-1, 0), (20, 7), (0, 0), (33, -1), (-1, -1)])
def test_create_block_mask_matches_local_window_layout(sq, sk, window):
    bq, bk = 32, 16
    left, right = window
    o = sk - sq

    def mask_mod(b, h, q_idx, kv_idx):
        d = kv_idx - q_idx - o
        ok = d == d
        if left >= 0:
            ok = ok & (d >= -left)
        if right >= 0:
            ok = ok & (d <= right)
        return ok

    bm = flex.create_block_mask(mask_mod, 1, 1, sq, sk, device="cpu", BLOCK_SIZE=(bq, bk))
    ours = masks.local_window_layout(sq, sk, window, block_q=bq, block_k=bk)
    same_lists(masks.from_flex_block_mask(bm, window=window, refine=True), ours)
    # Unrefined: FlexAttention pads the last blocks, so some of our full edge blocks are
    # partial there; the union of listed blocks is the same.
    raw = masks.from_flex_block_mask(bm, window=window)
    assert torch.equal(raw.dense_block_mask(), ours.dense_block_mask())
    assert not (raw.dense_block_mask("full") & ~ours.dense_block_mask("full")).any()
