"""Tests of the Triton block-sparse attention kernels (triton_kernels/attention.py).

Contract: docs/attention.md. Layouts are built here by brute force (a dense element mask of
the window, cut into blocks: wholly visible -> full, partly visible -> partial, invisible or
dropped -> absent), with the listed blocks shuffled and unused list slots filled with a
valid but wrong index, so the kernels must honour the counts and not rely on the order.

Reference: float64 dense attention over the element mask "full blocks, plus partial blocks
where the window allows", a row that sees no key giving out = 0 and lse = -inf; gradients
from float64 autograd of that reference (zero for such rows). Errors are relative Frobenius
errors, bounded by twice torch's own same-dtype error (masked F.scaled_dot_product_attention
and its autograd, with kv heads repeated) plus a floor:

* forward: float32 1e-5, float16 2e-3, bfloat16 1e-2;
* gradients: float32 3e-5, float16 5e-3, bfloat16 5e-2 (looser: dS is rounded to the input dtype before
  the dq / dk products, as in FlashAttention, and the errors of three products compound);
* lse: finite entries within 1e-4 absolutely, -inf exactly where the reference has it.

Outputs (out, lse, dq, dk, dv) are poisoned with NaN before each launch, so an element a
kernel never writes fails. Without CUDA the kernels run under the Triton interpreter
(TRITON_INTERPRET=1, set before triton is imported) on CPU tensors, with 16 / 32 blocks; the
interpreter gets bfloat16 dots wrong, so bfloat16 is only tested on a GPU. On a GPU the
kernels take 64 / 128 blocks only, so every length (blocks, sequences, windows) is scaled
by 4 there.
"""

import os
import random
import zlib

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Importing lrkernels (done first by this import) registers lrkernels.triton_kernels from the
# source tree when the package is not installed.
from lrkernels.triton_kernels import attention  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
U = 4 if HAS_CUDA else 1  # length unit: GPU layouts take 64 / 128 blocks
FWD_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAD_FLOOR = {torch.float32: 3e-5, torch.float16: 5e-3, torch.bfloat16: 5e-2}
LSE_ATOL = 1e-4
DTYPES = [torch.float32, torch.float16]
DTYPE_IDS = ["fp32", "fp16"]


@pytest.fixture(autouse=True)
def _seed_from_test_id(request):
    # The project's conftest seeds every test (fixture `_seed`); standalone, seed from the id.
    if "_seed" not in request.fixturenames:
        seed = zlib.crc32(request.node.nodeid.encode()) % 2**31
        torch.manual_seed(seed)
        random.seed(seed)
    yield


# --------------------------------------------------------------------------------------
# Layouts (brute force, dense: fine at test sizes).
# --------------------------------------------------------------------------------------


def _cdiv(a, b):
    return -(-a // b)


def window_mask(Sq, Sk, left, right):
    """(Sq, Sk) bool: query i sees key j iff Sk-Sq-left <= j-i <= Sk-Sq+right (-1: unbounded)."""
    diff = torch.arange(Sk)[None, :] - torch.arange(Sq)[:, None]
    vis = torch.ones(Sq, Sk, dtype=torch.bool)
    if left >= 0:
        vis &= diff >= Sk - Sq - left
    if right >= 0:
        vis &= diff <= Sk - Sq + right
    return vis


def _pack(cls, want, n_slots):
    """Per row of cls (..., NB_outer, NB_inner) the inner indices whose class is `want`,
    shuffled, left-packed into (..., NB_outer, n_slots); unused slots hold a wrong index."""
    lead = cls.shape[:-1]
    nb_inner = cls.shape[-1]
    num = torch.zeros(lead, dtype=torch.int32)
    idx = torch.full((*lead, n_slots), nb_inner - 1, dtype=torch.int32)
    for pos in torch.cartesian_prod(*[torch.arange(n) for n in lead]).reshape(-1, len(lead)):
        pos = tuple(pos.tolist())
        sel = [j for j in range(nb_inner) if cls[pos][j] == want]
        random.shuffle(sel)
        num[pos] = len(sel)
        if sel:
            idx[pos][: len(sel)] = torch.tensor(sel, dtype=torch.int32)
    return num, idx


def build_layout(
    Sq,
    Sk,
    bq,
    bk,
    window,
    Bl=1,
    Hl=1,
    keep_prob=1.0,
    full_lists=True,
    force_partial=False,
    empty_partial=False,
    drop_qblock=None,
):
    """Block lists of `window` (plus random block drops) and the element mask they denote.

    Returns (lists, vis): lists holds the forward and transposed lists (full ones None when
    full_lists=False: full blocks then become partial, where the window mask is all true);
    vis (Bl, Hl, Sq, Sk) is the contract's element mask: full blocks, plus partial blocks
    where the window allows. empty_partial also lists (as partial) blocks the window hides
    entirely; drop_qblock removes every block of one query block (its rows see nothing).
    """
    win = window_mask(Sq, Sk, *window)
    nqb, nkb = _cdiv(Sq, bq), _cdiv(Sk, bk)
    cls = torch.zeros(Bl, Hl, nqb, nkb, dtype=torch.int8)  # 0 absent, 1 partial, 2 full
    keep = torch.rand(Bl, Hl, nqb, nkb) < keep_prob
    for qb in range(nqb):
        for kb in range(nkb):
            region = win[qb * bq : (qb + 1) * bq, kb * bk : (kb + 1) * bk]
            if region.all() and full_lists and not force_partial:
                c = 2
            elif region.any() or empty_partial:
                c = 1
            else:
                c = 0
            cls[:, :, qb, kb] = torch.where(keep[:, :, qb, kb], c, 0)
    if drop_qblock is not None:
        cls[:, :, drop_qblock, :] = 0

    def lists(c):
        num, idx = _pack(c, 1, c.shape[-1] + 1)
        fnum, fidx = _pack(c, 2, c.shape[-1] + 1)
        return (num, idx, fnum, fidx) if full_lists else (num, idx, None, None)

    fwd = lists(cls)
    bwd = lists(cls.transpose(2, 3).contiguous())
    dev = [None if t is None else t.to(DEVICE) for t in fwd + bwd]
    el = cls.repeat_interleave(bq, 2)[:, :, :Sq].repeat_interleave(bk, 3)[..., :Sk]
    vis = (el == 2) | ((el == 1) & win)
    return dev, vis


# --------------------------------------------------------------------------------------
# Reference and checks.
# --------------------------------------------------------------------------------------


def _rel_err(a, ref):
    ref = ref.double()
    norm = ref.norm()
    diff = (a.double() - ref).norm()
    return (diff / norm).item() if norm > 0 else diff.item()


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def reference(q, k, v, vis, scale):
    """Dense masked attention (differentiable); rows that see no key: out 0, lse -inf."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)
    v = v.repeat_interleave(group, 1)
    rows = vis.any(-1, keepdim=True)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, float("-inf")).masked_fill(~rows, 0.0)
    lse = torch.logsumexp(s, -1, keepdim=True)
    out = (torch.exp(s - lse) * rows) @ v
    return out, lse.squeeze(-1).masked_fill(~rows.squeeze(-1), float("-inf"))


def torch_same_dtype(q, k, v, vis, scale, dout):
    """torch's own masked SDPA in the inputs' dtype: (out, dq, dk, dv)."""
    group = q.shape[1] // k.shape[1]
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    rows = vis.any(-1, keepdim=True)
    mask = vis | ~rows  # fully masked rows would give NaN: compute them, then zero them
    out = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask, scale=scale
    )
    out = out * rows
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _assert_err(name, got, exact, yardstick, floor):
    assert not torch.isnan(got).any(), f"{name}: unwritten (NaN) elements"
    err = _rel_err(got, exact)
    torch_err = _rel_err(yardstick, exact)
    bound = 2 * torch_err + floor
    assert err <= bound, f"{name}: rel err {err:.3e} > bound {bound:.3e} (torch {torch_err:.3e})"
    return err


def _make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, noncontig=False):
    def rnd(H, S):
        if noncontig:  # (B, S, H, D) storage viewed as (B, H, S, D)
            t = torch.randn(B, S, H, D).to(dtype=dtype, device=DEVICE).transpose(1, 2)
            assert not t.is_contiguous()
            return t
        return torch.randn(B, H, S, D).to(dtype=dtype, device=DEVICE)

    return rnd(Hq, Sq), rnd(Hkv, Sk), rnd(Hkv, Sk)


def run_forward(q, k, v, lists, bq, bk, window, scale, config=None):
    B, Hq, Sq, D = q.shape
    out = _nan((B, Hq, Sq, D), q.dtype)
    lse = _nan((B, Hq, Sq), torch.float32)
    attention.launch_block_sparse_attention_fwd(
        q, k, v, *lists[:4], bq, bk, window[0], window[1], scale, out, lse, config=config
    )
    return out, lse


def run_backward(
    dout, q, k, v, out, lse, lists, bq, bk, window, scale, dkdv_config=None, dq_config=None
):
    dq = _nan(q.shape, q.dtype)
    dk = _nan(k.shape, k.dtype)
    dv = _nan(v.shape, v.dtype)
    attention.launch_block_sparse_attention_bwd(
        dout, q, k, v, out, lse, *lists, bq, bk, window[0], window[1], scale, dq, dk, dv,
        dkdv_config=dkdv_config, dq_config=dq_config,
    )  # fmt: skip
    return dq, dk, dv


def check_case(
    B=1,
    Hq=2,
    Hkv=1,
    Sq=40,
    Sk=40,
    D=32,
    bq=16,
    bk=16,
    window=(-1, 0),
    dtype=torch.float32,
    noncontig=False,
    configs=(None, None, None),
    determinism=False,
    **layout_kw,
):
    """Forward + backward of one case against the float64 reference. Lengths in units of U."""
    Sq, Sk, bq, bk = Sq * U, Sk * U, bq * U, bk * U
    window = tuple(w * U if w > 0 else w for w in window)
    lists, vis = build_layout(Sq, Sk, bq, bk, window, **layout_kw)
    vis = vis.expand(B, Hq, Sq, Sk).to(DEVICE)
    q, k, v = _make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, noncontig)
    scale = D**-0.5

    out, lse = run_forward(q, k, v, lists, bq, bk, window, scale, config=configs[0])
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference(q64, k64, v64, vis, scale)
    dout = torch.randn(B, Sq, Hq, D).to(dtype=dtype, device=DEVICE).transpose(1, 2)
    ref_out.backward(dout.double())
    t_out, t_dq, t_dk, t_dv = torch_same_dtype(q, k, v, vis, scale, dout)

    _assert_err("out", out, ref_out.detach(), t_out, FWD_FLOOR[dtype])
    assert not torch.isnan(lse).any(), "lse: unwritten (NaN) elements"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse: -inf pattern differs"
    assert (lse[~finite] == float("-inf")).all()
    if finite.any():
        lse_err = (lse[finite].double() - ref_lse.detach()[finite]).abs().max().item()
        assert lse_err <= LSE_ATOL, f"lse: max abs err {lse_err:.3e}"
    blind_rows = ~vis.any(-1)
    assert (out[blind_rows] == 0).all(), "rows that see no key must give out = 0"

    dq, dk, dv = run_backward(
        dout, q, k, v, out, lse, lists, bq, bk, window, scale, configs[1], configs[2]
    )
    _assert_err("dq", dq, q64.grad, t_dq, GRAD_FLOOR[dtype])
    _assert_err("dk", dk, k64.grad, t_dk, GRAD_FLOOR[dtype])
    _assert_err("dv", dv, v64.grad, t_dv, GRAD_FLOOR[dtype])
    assert (dq[blind_rows] == 0).all(), "rows that see no key must give dq = 0"
    group = Hq // Hkv
    unseen_keys = ~vis.any(-2).reshape(B, Hkv, group, Sk).any(2)
    assert (dk[unseen_keys] == 0).all() and (dv[unseen_keys] == 0).all()

    if determinism:
        out2, lse2 = run_forward(q, k, v, lists, bq, bk, window, scale, config=configs[0])
        assert torch.equal(out, out2) and torch.equal(lse, lse2)
        again = run_backward(
            dout, q, k, v, out, lse, lists, bq, bk, window, scale, configs[1], configs[2]
        )
        for a, b in zip((dq, dk, dv), again, strict=True):
            assert torch.equal(a, b), "backward is not bitwise reproducible"
    return out, lse, (dq, dk, dv)


# --------------------------------------------------------------------------------------
# Windows, sequence lengths, masked rows.
# --------------------------------------------------------------------------------------

# (Sq, Sk, window, bq, bk): causal / sliding / two-sided / unbounded, Sq == Sk and both
# Sq < Sk (decode-like, bottom-right diagonal) and Sq > Sk (the first rows see nothing),
# lengths that are not multiples of the blocks.
WINDOW_CASES = [
    (45, 45, (-1, 0), 16, 16),
    (50, 50, (20, 0), 16, 32),
    (37, 37, (8, 5), 32, 16),
    (33, 47, (-1, -1), 16, 16),
    (24, 61, (-1, 0), 16, 32),
    (53, 30, (-1, 0), 32, 16),
    (40, 29, (6, -1), 16, 16),
    (19, 70, (10, 3), 16, 16),
]


def _window_id(c):
    Sq, Sk, (left, right), bq, bk = c
    return f"q{Sq}-k{Sk}-w{left}_{right}-b{bq}x{bk}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=_window_id)
def test_windows(case, dtype):
    Sq, Sk, window, bq, bk = case
    check_case(Sq=Sq, Sk=Sk, window=window, bq=bq, bk=bk, dtype=dtype)


def test_rows_before_the_diagonal_see_nothing():
    # Sq > Sk, causal: the first Sq - Sk queries see no key (out 0, lse -inf, dq 0).
    out, lse, _ = check_case(Sq=40, Sk=17, window=(-1, 0))
    assert (lse[:, :, : 23 * U] == float("-inf")).all()
    assert torch.isfinite(lse[:, :, 23 * U :]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_query_block_without_blocks(dtype):
    # Query block 1 lists no key block: its rows see nothing.
    out, lse, (dq, _, _) = check_case(Sq=48, Sk=48, window=(-1, -1), dtype=dtype, drop_qblock=1)
    rows = slice(16 * U, 32 * U)
    assert (lse[:, :, rows] == float("-inf")).all()
    assert (out[:, :, rows] == 0).all() and (dq[:, :, rows] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_partial_blocks_hidden_by_the_window(dtype):
    # Partial blocks the window masks entirely (all scores -inf, also as the first tile).
    check_case(Sq=45, Sk=45, window=(4, 0), dtype=dtype, empty_partial=True)


# --------------------------------------------------------------------------------------
# Layout forms: GQA, broadcast / per-head / per-batch lists, full-only, partial-only.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("Hkv", [2, 1], ids=["gqa2", "mqa"])
def test_gqa_per_head_layout(Hkv, dtype):
    # Each query head has its own (randomly thinned) lists: the dk/dv pass sums the group.
    check_case(B=2, Hq=4, Hkv=Hkv, Sq=37, Sk=45, window=(12, 4), Hl=4, keep_prob=0.7, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_per_batch_broadcast_heads(dtype):
    check_case(
        B=2, Hq=4, Hkv=2, Sq=41, Sk=41, window=(-1, 0), Bl=2, Hl=1, keep_prob=0.6, dtype=dtype
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_per_batch_and_head(dtype):
    check_case(
        B=2, Hq=2, Hkv=2, Sq=33, Sk=50, window=(-1, -1), Bl=2, Hl=2, keep_prob=0.5, dtype=dtype
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_full_only(dtype):
    # No window: every kept block is full, the partial lists are empty (except the
    # sequence bounds of the last blocks, handled without an element mask).
    lists, _ = build_layout(45 * U, 39 * U, 16 * U, 16 * U, (-1, -1), keep_prob=0.6)
    assert int(lists[0].sum()) == 0 and int(lists[4].sum()) == 0
    check_case(Sq=45, Sk=39, window=(-1, -1), keep_prob=0.6, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_partial_only_without_full_lists(dtype):
    # full lists None: the band's full blocks are listed as partial (window mask all true).
    check_case(Sq=47, Sk=47, window=(15, 0), full_lists=False, dtype=dtype)


def test_all_blocks_partial_with_full_lists_empty():
    check_case(Sq=40, Sk=40, window=(9, 2), force_partial=True)


# --------------------------------------------------------------------------------------
# Head dims, strides, tiles smaller than the layout blocks, bfloat16.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("D", [64, 96])
def test_head_dims(D, dtype):
    check_case(Sq=35, Sk=35, D=D, window=(10, 0), dtype=dtype)


@pytest.mark.parametrize("D", [128, 256])
def test_large_head_dims_tiny(D):
    check_case(Sq=20, Sk=20, D=D, window=(-1, 0), dtype=torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_contiguous(dtype):
    # q, k, v, dout are (B, S, H, D) tensors viewed as (B, H, S, D).
    check_case(B=2, Hq=4, Hkv=2, Sq=29, Sk=38, window=(-1, 0), noncontig=True, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tiles_smaller_than_layout_blocks(dtype):
    # Kernel tiles of half the layout blocks (the program reads its enclosing block's list).
    def cfg(m, n):
        return dict(BLOCK_M=m * U, BLOCK_N=n * U, D_PAD=32, num_warps=4, num_stages=1)

    check_case(
        Sq=45,
        Sk=51,
        bq=32,
        bk=32,
        window=(20, 3),
        configs=(cfg(16, 16), cfg(16, 16), cfg(16, 32)),
        dtype=dtype,
    )


def test_output_views():
    # out / lse / dq / dk / dv written through non-contiguous views.
    B, Hq, Hkv, Sq, Sk, D, bq, bk = 1, 2, 1, 37 * U, 37 * U, 32, 16 * U, 16 * U
    window = (-1, 0)
    lists, vis = build_layout(Sq, Sk, bq, bk, window)
    q, k, v = _make_qkv(B, Hq, Hkv, Sq, Sk, D, torch.float32)
    scale = D**-0.5
    out = _nan((B, Sq, Hq, D), torch.float32).transpose(1, 2)
    lse = _nan((B, Sq, Hq), torch.float32).transpose(1, 2)
    attention.launch_block_sparse_attention_fwd(
        q, k, v, *lists[:4], bq, bk, *window, scale, out, lse
    )
    ref, ref_lse = reference(q.double(), k.double(), v.double(), vis.to(DEVICE), scale)
    assert _rel_err(out, ref) <= FWD_FLOOR[torch.float32]
    assert (lse.double() - ref_lse).abs().max() <= LSE_ATOL
    dout = torch.randn_like(q)
    grads = [
        _nan((B, S, H, D), torch.float32).transpose(1, 2)
        for H, S in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk))
    ]
    attention.launch_block_sparse_attention_bwd(
        dout, q, k, v, out, lse, *lists, bq, bk, *window, scale, *grads
    )
    expected = run_backward(dout, q, k, v, out, lse, lists, bq, bk, window, scale)
    for got, exp in zip(grads, expected, strict=True):
        assert torch.equal(got, exp)


@pytest.mark.skipif(not HAS_CUDA, reason="the interpreter gets bfloat16 dots wrong")
@pytest.mark.parametrize("D", [64, 128])
def test_bfloat16_gpu(D):
    check_case(B=2, Hq=4, Hkv=2, Sq=45, Sk=45, D=D, window=(20, 0), dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------
# Determinism, 64-bit indexing, empty inputs, configuration, validation.
# --------------------------------------------------------------------------------------


def test_deterministic():
    check_case(
        B=1, Hq=4, Hkv=1, Sq=40, Sk=40, window=(-1, 0), Hl=4, keep_prob=0.8, determinism=True
    )


def test_int64_indexing(monkeypatch):
    # Force the 64-bit address path (real triggers need > 2**31-element tensors; the
    # interpreter takes it anyway, see attention._INTERPRETER_INDEX_64).
    monkeypatch.setattr(attention, "_INT32_LIMIT", 0)
    check_case(Hq=2, Hkv=1, Sq=33, Sk=40, window=(10, 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_int32_indexing(monkeypatch, dtype):
    # The 32-bit address path (the one GPUs take for ordinary sizes), also under the
    # interpreter; with GQA, odd lengths and tiles smaller than the layout blocks.
    monkeypatch.setattr(attention, "_INTERPRETER_INDEX_64", False)

    def cfg(m, n):
        return dict(BLOCK_M=m * U, BLOCK_N=n * U, D_PAD=32, num_warps=4, num_stages=1)

    check_case(
        Hq=2,
        Hkv=1,
        Sq=37,
        Sk=45,
        bq=32,
        bk=32,
        window=(12, 2),
        configs=(cfg(16, 16), cfg(16, 16), cfg(16, 16)),
        dtype=dtype,
    )


def test_empty_keys_and_queries():
    B, H, D, bq, bk = 1, 2, 32, 16 * U, 16 * U
    q, k, v = _make_qkv(B, H, H, 20 * U, 0, D, torch.float32)
    lists, _ = build_layout(20 * U, 0, bq, bk, (-1, -1))
    out, lse = run_forward(q, k, v, lists, bq, bk, (-1, -1), 1.0)
    assert (out == 0).all() and (lse == float("-inf")).all()
    dq, dk, dv = run_backward(torch.randn_like(q), q, k, v, out, lse, lists, bq, bk, (-1, -1), 1.0)
    assert (dq == 0).all() and dk.numel() == 0
    # No queries: dk, dv are zero.
    q, k, v = _make_qkv(B, H, H, 0, 20 * U, D, torch.float32)
    lists, _ = build_layout(0, 20 * U, bq, bk, (-1, -1))
    out, lse = run_forward(q, k, v, lists, bq, bk, (-1, -1), 1.0)
    dq, dk, dv = run_backward(torch.randn_like(q), q, k, v, out, lse, lists, bq, bk, (-1, -1), 1.0)
    assert (dk == 0).all() and (dv == 0).all()


def test_choose_config_invariants():
    def pow2(x):
        return x >= 16 and x & (x - 1) == 0

    for kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
        for dtype, esize in ((torch.float32, 4), (torch.float16, 2), (torch.bfloat16, 2)):
            for D in (32, 64, 96, 128, 256):
                for bq in (64, 128):
                    for bk in (64, 128):
                        for S in (1, 100, 8192):
                            for smem in (None, 101_376, 232_448 * 9 // 10):
                                c = attention.choose_config(kernel, bq, bk, D, dtype, S, S, smem)
                                assert pow2(c["BLOCK_M"]) and bq % c["BLOCK_M"] == 0, c
                                assert pow2(c["BLOCK_N"]) and bk % c["BLOCK_N"] == 0, c
                                assert c["D_PAD"] >= D and pow2(c["D_PAD"]), c
                                assert c["num_warps"] in (4, 8) and c["num_stages"] in (1, 2, 3)
                                need = attention._smem_estimate(
                                    kernel, c["BLOCK_M"], c["BLOCK_N"], c["D_PAD"], esize,
                                    c["num_stages"],
                                )  # fmt: skip
                                assert need <= (smem or 96 * 1024), (kernel, dtype, D, c)
                c = attention.choose_config(kernel, 16, 32, 32, dtype, 40, 40, interpret=True)
                assert (c["BLOCK_M"], c["BLOCK_N"]) == (16, 32)


def test_input_validation():
    B, H, S, D = 1, 2, 32, 32
    bq = bk = 16 * U
    S *= U
    q, k, v = _make_qkv(B, H, H, S, S, D, torch.float32)
    lists, _ = build_layout(S, S, bq, bk, (-1, 0))
    fwd = attention.launch_block_sparse_attention_fwd

    def call(q=q, k=k, v=v, lists=lists, bq=bq, bk=bk, out=None, lse=None):
        out = _nan(q.shape, q.dtype) if out is None else out
        lse = _nan(q.shape[:3], torch.float32) if lse is None else lse
        fwd(q, k, v, *lists[:4], bq, bk, -1, 0, 1.0, out, lse)

    call()  # valid
    with pytest.raises(ValueError):
        call(k=k[:, :, :, :16].contiguous(), v=v[:, :, :, :16].contiguous())
    with pytest.raises(ValueError):  # Hq % Hkv
        call(q=torch.randn(B, 3, S, D, device=DEVICE))
    with pytest.raises(TypeError):
        call(k=k.half())
    with pytest.raises(ValueError):  # block size not allowed
        call(bq=24 * U)
    with pytest.raises(ValueError):  # wrong number of query blocks
        call(bq=32 * U)
    with pytest.raises(TypeError):
        call(lists=[lists[0].long()] + list(lists[1:]))
    with pytest.raises(ValueError):  # only half of the full lists
        call(lists=list(lists[:2]) + [lists[2], None])
    with pytest.raises(ValueError):  # non-unit last stride
        call(q=q.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(ValueError):
        call(out=_nan((B, H, D, S), torch.float32).transpose(2, 3))
    with pytest.raises(TypeError):
        call(lse=_nan((B, H, S), torch.float16))
    if not HAS_CUDA:
        return
    with pytest.raises(ValueError):  # GPU kernels take 64 / 128 blocks only
        call(bq=16, bk=16, lists=build_layout(S, S, 16, 16, (-1, 0))[0])
