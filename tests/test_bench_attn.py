"""Fast CPU tests of the attention benchmark: cost model, pair counting, quick run, cross-check,
targets. The harness tests run on small stand-ins for lrkernels' attention ops and masks
(monkeypatched in), so they test the benchmark whether or not the real ops exist yet; one test
runs the real ops and skips while they are missing."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import lrkernels
from bench import attn
from bench.harness import Provider
from lrkernels import backends
from lrkernels.roofline import attention_cost

SVG_NS = "{http://www.w3.org/2000/svg}"
# short timing windows and one thread (no OpenMP barriers on a busy machine) keep them quick
FAST = ["--device", "cpu", "--rep-ms", "5", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ stand-ins


def _visible_slow(Sq: int, Sk: int, window) -> torch.Tensor:
    """Brute force, written independently of bench.attn: query i sees key j iff
    i + Sk - Sq - left <= j <= i + Sk - Sq + right (-1: unbounded)."""
    left, right = window
    m = torch.zeros(Sq, Sk, dtype=torch.bool)
    for i in range(Sq):
        for j in range(Sk):
            d = j - (i + Sk - Sq)
            m[i, j] = (left < 0 or d >= -left) and (right < 0 or d <= right)
    return m


def _visible(Sq: int, Sk: int, window) -> torch.Tensor:
    """The same, vectorized (the stand-in op calls it on every run)."""
    left, right = window
    d = torch.arange(Sk)[None, :] - torch.arange(Sq)[:, None] - (Sk - Sq)
    m = torch.ones(Sq, Sk, dtype=torch.bool)
    if left >= 0:
        m &= d >= -left
    if right >= 0:
        m &= d <= right
    return m


@dataclasses.dataclass
class FakeLayout:
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor | None
    full_kv_indices: torch.Tensor | None
    window: tuple[int, int]
    block_q: int
    block_k: int
    q_len: int
    kv_len: int

    def to(self, device):
        return self


def fake_layout_from_mask(vis: torch.Tensor, window, bq: int, bk: int) -> FakeLayout:
    """Blocks holding a visible pair are listed: full when every in-bounds pair is visible."""
    Sq, Sk = vis.shape
    nqb, nkb = -(-Sq // bq), -(-Sk // bk)
    part, full = [], []
    for qb in range(nqb):
        p_row, f_row = [], []
        for kb in range(nkb):
            tile = vis[qb * bq : (qb + 1) * bq, kb * bk : (kb + 1) * bk]
            if tile.all():
                f_row.append(kb)
            elif tile.any():
                p_row.append(kb)
        part.append(p_row)
        full.append(f_row)

    def pack(lists):
        width = max(1, max(len(x) for x in lists))
        num = torch.tensor([[[len(x) for x in lists]]], dtype=torch.int32)
        idx = torch.full((1, 1, nqb, width), 7777, dtype=torch.int32)  # junk past the count
        for qb, x in enumerate(lists):
            idx[0, 0, qb, : len(x)] = torch.tensor(x, dtype=torch.int32)
        return num, idx

    (n, i), (fn, fi) = pack(part), pack(full)
    return FakeLayout(n, i, fn, fi, tuple(window), bq, bk, Sq, Sk)


def fake_local_window_layout(q_len, kv_len, window, causal=False, block_q=128, block_k=128):
    left, right = window
    window = (left, 0 if causal else right)
    return fake_layout_from_mask(_visible(q_len, kv_len, window), window, block_q, block_k)


def _fake_elements(layout: FakeLayout) -> torch.Tensor:
    if "_keep" in vars(layout):  # computed once per layout
        return layout._keep
    vis = _visible(layout.q_len, layout.kv_len, layout.window)
    keep = torch.zeros_like(vis)
    bq, bk = layout.block_q, layout.block_k
    for num, idx, elem in (
        (layout.kv_num_blocks, layout.kv_indices, vis),
        (layout.full_kv_num_blocks, layout.full_kv_indices, torch.ones_like(vis)),
    ):
        for qb in range(num.shape[2]):
            for kb in idx[0, 0, qb, : int(num[0, 0, qb])].tolist():
                sl = (slice(qb * bq, (qb + 1) * bq), slice(kb * bk, (kb + 1) * bk))
                keep[sl] = elem[sl]
    layout._keep = keep
    return keep


def fake_block_sparse_attention(q, k, v, layout, *, scale=None, return_lse=False, backend=None):
    """Dense masked softmax attention in float32 (rows that see nothing give 0)."""
    keep = _fake_elements(layout).to(q.device)
    g = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(g, 1)
    vf = v.float().repeat_interleave(g, 1)
    s = q.float() @ kf.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return (p @ vf).to(q.dtype)


def _fake_reasons(backend, q, k, v, layout, explicit=True):
    return [] if backend in ("cpu", "torch") else [f"stand-in: no {backend} backend"]


@pytest.fixture
def fake_ops(monkeypatch):
    """Monkeypatch the stand-ins in place of lrkernels' attention ops and masks."""
    masks = types.ModuleType("lrkernels.masks")
    masks.BlockLayout = FakeLayout
    masks.local_window_layout = fake_local_window_layout
    masks.causal_layout = lambda q_len, kv_len, block_q=128, block_k=128: fake_local_window_layout(
        q_len, kv_len, (-1, 0), True, block_q, block_k
    )
    monkeypatch.setitem(__import__("sys").modules, "lrkernels.masks", masks)
    monkeypatch.setattr(lrkernels, "masks", masks, raising=False)
    monkeypatch.setattr(lrkernels, "block_sparse_attention", fake_block_sparse_attention, False)
    monkeypatch.setitem(backends._REASONS, "block_sparse_attention", _fake_reasons)
    monkeypatch.setattr(attn, "_extension_missing", lambda backend, grads: None)
    return masks


# ------------------------------------------------------------------------------ cost model


def test_window_pairs_with_sq_not_sk_hand_example():
    # Sq=3, Sk=5, window (1, 0): the diagonal is shifted by Sk-Sq=2 (bottom-right aligned):
    # row 0 sees keys 1..2, row 1 keys 2..3, row 2 keys 3..4: 6 pairs
    assert attn.window_visible_pairs(3, 5, (1, 0)) == 6
    # causal, unbounded left: rows see 3, 4, 5 keys
    assert attn.window_visible_pairs(3, 5, (-1, 0)) == 12
    # Sq=4 > Sk=2, window (2, 1): diagonal at i-2; row 0 sees nothing (0..-1), row 1 key 0,
    # rows 2 and 3 keys 0..1: 5 pairs
    assert attn.window_visible_pairs(4, 2, (2, 1)) == 5
    # no window at all
    assert attn.window_visible_pairs(4, 7, (-1, -1)) == 28
    for Sq, Sk, w in [(3, 5, (1, 0)), (4, 2, (2, 1)), (7, 7, (2, 3)), (9, 5, (0, -1))]:
        assert attn.window_visible_pairs(Sq, Sk, w) == int(_visible_slow(Sq, Sk, w).sum())
        assert torch.equal(_visible(Sq, Sk, w), _visible_slow(Sq, Sk, w))


def test_window_blocks_and_layout_counts_agree_with_brute_force():
    for Sq, Sk, w, bq, bk in [
        (40, 40, (7, 0), 8, 8),  # causal window of 8 keys
        (37, 53, (5, 5), 8, 16),  # Sq != Sk, ragged last blocks
        (64, 24, (3, 2), 16, 8),  # Sq > Sk: early rows see nothing
        (30, 30, (-1, 0), 8, 8),  # dense causal
    ]:
        vis = _visible_slow(Sq, Sk, w)
        lay = fake_layout_from_mask(vis, w, bq, bk)
        blocks = int(lay.kv_num_blocks.sum() + lay.full_kv_num_blocks.sum())
        assert attn.window_num_blocks(Sq, Sk, w, bq, bk) == blocks
        # totals over B·Hq = 2·3 (the layout broadcasts over both)
        pairs, nblocks = attn.layout_counts(lay, Sq, Sk, 2, 3)
        assert (pairs, nblocks) == (6 * int(vis.sum()), 6 * blocks)
        dense = attn.dense_mask(lay, Sq, Sk, "cpu")
        assert dense.shape == (1, 1, Sq, Sk) and torch.equal(dense[0, 0], vis)


def test_attention_cost_conventions():
    # B=2, Hq=4, Hkv=2, S=256, D=64, bf16; window layout with 7 blocks of 128x128 per head,
    # 30000 visible pairs per head
    B, Hq, Hkv, S, D = 2, 4, 2, 256, 64
    pairs, blocks = 30000 * B * Hq, 7 * B * Hq
    useful, computed, nbytes = attention_cost(
        B, Hq, Hkv, S, S, D, 2, visible_pairs=pairs, computed_blocks=blocks
    )
    assert useful == 4 * D * pairs
    assert computed == 4 * D * 128 * 128 * blocks
    q_el, kv_el = B * Hq * S * D, B * Hkv * S * D
    assert nbytes == 2 * (2 * q_el + 2 * kv_el) + 4 * B * Hq * S  # q, k, v, out + f32 lse
    u_b, c_b, b_b = attention_cost(
        B, Hq, Hkv, S, S, D, 2, visible_pairs=pairs, computed_blocks=blocks, pass_="bwd"
    )
    assert (u_b, c_b) == (useful * 5 // 2, computed * 5 // 2)  # backward = 2.5x forward
    assert b_b == 2 * (4 * q_el + 4 * kv_el) + 4 * B * Hq * S  # + dout, dq, dk, dv
    u_fb, c_fb, b_fb = attention_cost(
        B, Hq, Hkv, S, S, D, 2, visible_pairs=pairs, computed_blocks=blocks, pass_="fwd+bwd"
    )
    assert (u_fb, c_fb, b_fb) == (useful * 7 // 2, computed * 7 // 2, nbytes + b_b)
    _, c64, _ = attention_cost(
        B, Hq, Hkv, S, S, D, 2, visible_pairs=pairs, computed_blocks=blocks, block_q=64
    )
    assert c64 == computed // 2
    with pytest.raises(ValueError):
        attention_cost(1, 3, 2, 8, 8, 8, 2, visible_pairs=1, computed_blocks=1)
    with pytest.raises(ValueError):
        attention_cost(1, 2, 2, 8, 8, 8, 2, visible_pairs=1, computed_blocks=1, pass_="back")


def test_window_parsing_and_case_order():
    assert attn.parse_window("c512") == (511, 0)
    assert attn.parse_window("512") == (511, 0)
    assert attn.parse_window("s256") == (256, 256)
    assert attn.parse_window("-1:0") == (-1, 0)
    with pytest.raises(SystemExit):
        attn.parse_window("x12")
    args = argparse.Namespace(
        quick=False,
        seq=None,
        window=None,
        head_dim=None,
        batch=None,
        heads=None,
        kv_heads=None,
        dtype=None,
        passes=None,
        pattern=None,
        block_q=128,
        block_k=128,
    )
    probs, passes, width = attn.build_problems(args, "cuda")
    assert passes == ["fwd", "bwd", "fwd+bwd"] and width == 512
    head = attn.HEADLINE["cuda"]
    first = probs[:7]  # the headline config comes first: the targets' S, then the others
    assert all(p.config == head for p in first)
    assert [p.S for p in first] == [4096, 16384, 65536, 1024, 2048, 8192, 32768]
    assert {(p.Hq, p.Hkv) for p in probs} == {(16, 16), (16, 4)}
    assert len(probs) == 7 * (4 + 4) * 2 * 2 * 2  # S x (windows + patterns) x D x dtype x kv
    args.quick = True
    quick, qpasses, _ = attn.build_problems(args, "cuda")
    assert [p.S for p in quick] == [4096, 16384] and qpasses == ["fwd", "bwd"]
    assert all(p.config == head for p in quick)


# ------------------------------------------------------------------------------ runs


def _check_rows(rows):
    for r in rows:
        if r["status"].startswith("skipped: "):
            assert len(r["status"]) > len("skipped: ") + 5, r  # a reason, not a bare skip
            assert r["ms_median"] == ""
            continue
        assert r["status"] == "ok", r
        for col in ("ms_median", "flops", "useful_flops", "bytes", "tflops", "useful_tflops"):
            v = float(r[col])
            assert math.isfinite(v) and v > 0, (col, r)
        assert float(r["flops"]) >= float(r["useful_flops"])  # whole tiles >= visible pairs
        assert float(r["rel_err"]) <= float(r["err_bound"])
        assert r["peak_mem_mib"] == "n/a" and r["checked_against"]
        assert r["git_commit"] and r["torch_version"] and r["peaks_how"]
        assert "not GPU numbers" in r["timing"]
        if r["pass"] != "fwd":
            assert float(r["grad_rel_err"]) <= float(r["grad_err_bound"])


def test_quick_cpu_run_on_stand_ins(tmp_path, fake_ops, capsys):
    argv = ["--quick", "--out", str(tmp_path), *FAST]
    assert attn.main(argv) == 0
    out = capsys.readouterr().out
    rows = _read_csv(tmp_path / "attn-cpu.csv")
    _check_rows(rows)
    ok = {r["provider"] for r in rows if r["status"] == "ok"}
    assert {"sdpa-masked", "sdpa-causal", "reference"} <= ok
    if lrkernels.available_backends()["cpu"] is None:
        assert "lrkernels-cpu" in ok
    assert {r["pass"] for r in rows} == {"fwd", "bwd"}
    assert {r["S"] for r in rows} == {"128", "256"}
    assert "flex-attention" not in {r["provider"] for r in rows}  # left out of a CPU --quick
    assert "not run on cpu: --quick on CPU" in out
    # causal window of 64 keys at S=128, blocks 64 (CPU): 2 diagonal blocks + 1 below = 3 per
    # head, 2 heads
    r = next(r for r in rows if r["provider"] == "reference" and r["S"] == "128")
    assert (r["window_left"], r["window_right"], r["block_q"]) == ("63", "0", "64")
    assert int(r["computed_blocks"]) == 3 * 2 and int(r["visible_pairs"]) == 2 * (
        attn.window_visible_pairs(128, 128, (63, 0))
    )
    # sdpa-causal does the dense causal work (10 of 16 tiles at S=256), sdpa-masked every tile
    c = next(r for r in rows if r["provider"] == "sdpa-causal" and r["S"] == "256")
    m = next(r for r in rows if r["provider"] == "sdpa-masked" and r["S"] == "256")
    assert int(c["computed_blocks"]) == 2 * 10 and int(m["computed_blocks"]) == 2 * 16
    assert "linearity" in out and "time(256)/time(128) / 2" in out
    svg = ET.parse(tmp_path / "attn-cpu.svg").getroot()
    names = {t.text for t in svg.iter(f"{SVG_NS}title")}
    assert {"reference", "slope 1 (linear in S)"} <= names


def test_wrong_provider_is_failed_and_exit_status_is_1(tmp_path, fake_ops):
    def wrong(inp):
        S, bq = inp["prob"].S, inp["prob"].block_q
        lay = fake_local_window_layout(S, S, (64, 0), True, bq, bq)  # one key too many

        def op(q, k, v):
            return fake_block_sparse_attention(q, k, v, lay, scale=inp["scale"])

        return attn.pass_callable(op, inp)

    argv = ["--out", str(tmp_path), "--no-plot", "--seq", "128", "--window", "c64"]
    argv += ["--pass", "fwd,bwd", "--providers", "reference", "--heads", "2", "--kv-heads", "1"]
    argv += ["--pattern", "local"]
    assert attn.main(argv + FAST, extra_providers=[Provider("wrong", wrong)]) == 1
    rows = _read_csv(tmp_path / "attn-cpu.csv")
    assert len(rows) == 2 * 2
    assert not list(tmp_path.glob("*.svg"))
    for r in rows:
        if r["provider"] == "wrong":
            assert r["status"].startswith("FAILED") and r["ms_median"] == "", r
        else:
            assert r["status"] == "ok", r
            assert r["Hkv"] == "1"


def test_broken_layout_fails_every_row(tmp_path, fake_ops, monkeypatch):
    def short_layout(q_len, kv_len, window, causal=False, block_q=128, block_k=128):
        lay = fake_local_window_layout(q_len, kv_len, window, causal, block_q, block_k)
        lay.kv_num_blocks = lay.kv_num_blocks.clone()
        lay.kv_num_blocks[0, 0, -1] -= 1  # drops a partial block
        return lay

    monkeypatch.setattr(fake_ops, "local_window_layout", short_layout)
    argv = ["--out", str(tmp_path), "--no-plot", "--seq", "128", "--window", "c64"]
    argv += ["--pass", "fwd", "--providers", "reference,sdpa-masked", "--pattern", "local"]
    assert attn.main(argv + FAST) == 1
    rows = _read_csv(tmp_path / "attn-cpu.csv")
    assert rows and all("the local layout of lrkernels.masks is wrong" in r["status"] for r in rows)


def test_unknown_builder_is_skipped_with_reason(tmp_path, fake_ops):
    argv = ["--out", str(tmp_path), "--no-plot", "--seq", "128", "--pass", "fwd"]
    argv += ["--pattern", "causal,bigbird", "--providers", "reference,sdpa-causal"]
    assert attn.main(argv + FAST) == 0
    rows = _read_csv(tmp_path / "attn-cpu.csv")
    big = [r for r in rows if r["pattern"] == "bigbird"]
    assert big and all("no bigbird_layout" in r["status"] for r in big)
    causal = [r for r in rows if r["pattern"] == "causal"]
    assert {r["status"] for r in causal} == {"ok"}
    # with the causal pattern sdpa-causal computes the same function and the same tiles
    assert len({r["computed_blocks"] for r in causal}) == 1


def _row(provider, pas, S, ms, computed, speedup=math.nan, pattern="local", vs_causal=math.nan):
    shape = {"pattern": pattern, "pass": pas, "S": S, "D": 128, "B": 2, "Hq": 16, "Hkv": 16}
    shape |= {"window_left": 511, "window_right": 0}
    r = attn.AttnRow("block_sparse_attention", provider, "cuda", "bfloat16", shape)
    r.ms_median, r.flops, r.useful_flops, r.speedup = ms, computed, computed // 2, speedup
    r.vs_sdpa_causal = vs_causal
    return r


def test_targets_summary_pass_and_miss():
    rows = [
        _row("lrkernels-cuda", "fwd", 16384, 1.0, int(350e9), speedup=1.25),
        _row("lrkernels-cuda", "bwd", 16384, 1.0, int(150e9), speedup=0.8),
        _row("lrkernels-cuda", "fwd", 4096, 0.25, int(80e9)),
        _row("lrkernels-cuda", "fwd", 65536, 4.2, int(1400e9)),
        _row("lrkernels-cuda", "fwd", 8192, 1.0, int(1e12), pattern="causal", vs_causal=0.85),
        _row("lrkernels-triton", "fwd", 16384, 2.0, int(350e9), speedup=0.6),
        _row("flex-attention", "fwd", 16384, 1.2, int(350e9)),
    ]
    text = "\n".join(attn.targets_summary(rows))
    assert "lrkernels-cuda: forward 350.0 TFLOP/s" in text and "(goal >= 300) PASS" in text
    assert "lrkernels-cuda: forward time 0.80x flex-attention's (goal <= 0.9x) PASS" in text
    assert "lrkernels-cuda: backward 150.0 TFLOP/s" in text and "(goal >= 200) MISS" in text
    assert "lrkernels-cuda: backward time 1.25x flex-attention's (goal <= 1x) MISS" in text
    assert "dense causal S=8192 forward: 0.85x the speed of sdpa-causal (goal >= 0.8x) PASS" in text
    assert "lrkernels-cuda: time(65536)/time(4096) / 16 = 1.050" in text
    assert "lrkernels-triton: forward 175.0 TFLOP/s" in text
    assert "lrkernels-triton: forward time 1.67x flex-attention's (goal <= 0.9x) MISS" in text
    assert "lrkernels-triton: backward at S=16384: not measured" in text
    assert "lrkernels-triton: dense causal S=8192 forward: not measured" in text
    assert not any(ln.startswith("  flex-attention") for ln in text.splitlines())
    verdicts = [ln for ln in text.splitlines() if ln.rstrip().endswith(("PASS", "MISS"))]
    assert len(verdicts) == 8
    lines = "\n".join(attn.linearity_lines(rows, "cuda"))
    assert "linearity lrkernels-cuda: time(65536)/time(4096) / 16 = 1.050 (within 10%" in lines


# ------------------------------------------------------------------------------ real ops


def test_quick_cpu_run_real_ops(tmp_path):
    missing = attn.ops_missing()
    if missing or not hasattr(lrkernels, "local_attention"):
        pytest.skip(
            f"the attention ops are not in lrkernels yet: {missing or 'no local_attention'}"
        )
    assert attn.main(["--quick", "--out", str(tmp_path), "--no-plot", *FAST]) == 0
    rows = _read_csv(tmp_path / "attn-cpu.csv")
    _check_rows(rows)
    ok = {r["provider"] for r in rows if r["status"] == "ok"}
    assert {"sdpa-masked", "sdpa-causal", "reference"} <= ok
