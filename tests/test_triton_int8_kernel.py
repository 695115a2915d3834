"""Tests of the Triton int8 weight-only kernels (triton_kernels/int8.py).

    forward:        y  = x  @ W.T + bias
    input gradient: dx = dy @ W
    W[n, k] = q[n, k] * s[n] (per channel) or q[n, k] * s[n, k // G] (per group)

Every result is compared with float64 by relative Frobenius error: at most twice the error of
torch's own same-dtype computation (W dequantized to the dtype, then F.linear / mm) plus a
small floor. Outputs are poisoned with NaN before each launch, so an element the kernel never
writes fails.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before
triton is imported) on CPU tensors. The interpreter gets bfloat16 dots wrong, so bfloat16 is
only tested on a GPU. Shapes are small on purpose: the interpreter runs programs in numpy.
"""

import os
import zlib

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Importing lrkernels (done first by this import) registers lrkernels.triton_kernels from the
# source tree when the package is not installed.
from lrkernels.triton_kernels import int8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = {torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
DTYPES = [torch.float32, torch.float16]
DTYPE_IDS = ["fp32", "fp16"]


@pytest.fixture(autouse=True)
def _seed_from_test_id(request):
    # The project's conftest seeds every test (fixture `_seed`); standalone, seed from the id.
    if "_seed" not in request.fixturenames:
        torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) % 2**31)
    yield


# --------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------


def _quantized(N, K, group, dtype):
    """Random int8 weight q (N, K) and positive scales (N,) or (N, K // group)."""
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    shape = (N,) if group == 0 else (N, K // group)
    s = torch.rand(shape) * 0.02 + 0.001
    return q.to(DEVICE), s.to(dtype=dtype, device=DEVICE)


def _expand(s, K):
    """Scales broadcast to the weight's (N, K) shape."""
    if s.dim() == 1:
        return s[:, None].expand(-1, K)
    return s.repeat_interleave(K // s.shape[1], dim=1)


def _weights(q, s):
    """(W in float64, W dequantized in float32 and rounded to the dtype, as torch users do)."""
    se = _expand(s, q.shape[1])
    return q.double() * se.double(), (q.float() * se.float()).to(s.dtype)


def _rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _assert_close(out, exact, torch_out):
    assert not torch.isnan(out).any(), "unwritten (NaN) output elements"
    err = _rel_err(out, exact)
    torch_err = _rel_err(torch_out, exact)
    bound = 2 * torch_err + FLOOR[out.dtype]
    assert err <= bound, f"rel err {err:.3e} > bound {bound:.3e} (torch {torch_err:.3e})"


def _check_forward(x, q, s, b, group, out=None, config=None):
    M, N = x.shape[0], q.shape[0]
    if out is None:
        out = _nan((M, N), x.dtype)
    int8.launch_int8_linear(x, q, s, b, out, group, config=config)
    w64, w_dtype = _weights(q, s)
    exact = x.double() @ w64.T
    if b is not None:
        exact = exact + b.double()
    _assert_close(out, exact, F.linear(x, w_dtype, b))
    return out


def _check_grad(dy, q, s, group, out=None, config=None):
    M, K = dy.shape[0], q.shape[1]
    if out is None:
        out = _nan((M, K), dy.dtype)
    int8.launch_int8_linear_grad_input(dy, q, s, out, group, config=config)
    w64, w_dtype = _weights(q, s)
    _assert_close(out, dy.double() @ w64, dy @ w_dtype)
    return out


def _rand(*shape, dtype):
    return torch.randn(*shape).to(dtype=dtype, device=DEVICE)


# (M, N, K, group): odd N, K a multiple of the group (K = 45 per channel), all M sizes.
CASES = [
    (1, 29, 45, 0),
    (5, 33, 96, 0),
    (16, 29, 96, 32),
    (17, 33, 160, 32),
    (37, 29, 256, 32),
    (5, 33, 256, 64),
    (37, 29, 256, 64),
    (1, 33, 256, 128),
    (17, 29, 256, 128),
]


def _case_id(c):
    M, N, K, G = c
    return f"M{M}-N{N}-K{K}-" + (f"g{G}" if G else "chan")


# --------------------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward(case, dtype):
    M, N, K, G = case
    q, s = _quantized(N, K, G, dtype)
    x = _rand(M, K, dtype=dtype)
    # Bias on every other case keeps both HAS_BIAS variants covered across the grid.
    b = _rand(N, dtype=dtype) if (M + K) % 2 == 0 else None
    _check_forward(x, q, s, b, G)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("group", [0, 64])
def test_forward_bias_toggle(group, bias):
    q, s = _quantized(33, 128, group, torch.float32)
    x = _rand(17, 128, dtype=torch.float32)
    _check_forward(x, q, s, _rand(33, dtype=torch.float32) if bias else None, group)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group", [0, 32])
def test_forward_non_contiguous(dtype, group):
    """Transposed and sliced x, q sliced from a wider tensor, strided scales / bias / out."""
    M, N, K = 13, 29, 96
    q_wide = torch.randint(-127, 128, (N, K + 40), dtype=torch.int8, device=DEVICE)
    q = q_wide[:, 7 : 7 + K]
    _, s0 = _quantized(N, K, group, dtype)
    s_buf = torch.zeros((2 * N,) + tuple(s0.shape[1:]), dtype=dtype, device=DEVICE)
    s_buf[::2] = s0
    s = s_buf[::2]
    b_buf = _rand(2 * N, dtype=dtype)
    b = b_buf[1::2]
    x_t = _rand(K, M, dtype=dtype).T  # column-major view
    x_rows = _rand(2 * M, K + 3, dtype=dtype)[::2, 2 : K + 2]  # every other row, offset
    for x in (x_t, x_rows):
        assert not x.is_contiguous() and not q.is_contiguous() and not s.is_contiguous()
        out = _nan((N + 3, M), dtype)[1 : N + 1].T  # transposed, sliced output
        _check_forward(x, q, s, b, group, out=out)


@pytest.mark.parametrize("group", [0, 32])
def test_forward_transposed_weight_storage(group):
    """q stored column-major (stride_qn = 1)."""
    N, K = 33, 96
    q0, s = _quantized(N, K, group, torch.float32)
    q = q0.T.contiguous().T
    _check_forward(_rand(5, K, dtype=torch.float32), q, s, None, group)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group", [0, 32, 128])
def test_forward_split_k(dtype, group):
    """Decode-style split over K: several K steps per split, a shorter last split."""
    M, N, K = 3, 40, 384
    q, s = _quantized(N, K, group, dtype)
    x = _rand(M, K, dtype=dtype)
    b = _rand(N, dtype=dtype)
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT=5, num_warps=4, num_stages=2)
    # 12 K steps over 5 splits: 3, 3, 2, 2, 2 steps (at most one split per step).
    assert int8._split_plan(K, 32, 5) == (5, 12)
    assert int8._split_plan(K, 32, 20) == (12, 12)
    out = _check_forward(x, q, s, b, group, config=config)
    again = _nan((M, N), dtype)
    int8.launch_int8_linear(x, q, s, b, again, group, config=config)
    assert torch.equal(out, again), "split-K result is not deterministic"


def test_forward_small_tiles_many_programs():
    """Several row and column tiles, BLOCK_K smaller than the group."""
    M, N, K, G = 37, 50, 128, 64
    q, s = _quantized(N, K, G, torch.float16)
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=1, num_warps=4, num_stages=2)
    _check_forward(_rand(M, K, dtype=torch.float16), q, s, None, G, config=config)


@pytest.mark.parametrize("M", [1, 16])
def test_forward_gpu_heuristic_config(M):
    """The config chosen for a 132-SM GPU (which splits K at decode sizes) is correct."""
    N, K, G = 64, 1024, 128
    config = int8.choose_config(M, N, K, G, torch.float16, 132, False)
    assert config["SPLIT"] > 1
    q, s = _quantized(N, K, G, torch.float16)
    _check_forward(_rand(M, K, dtype=torch.float16), q, s, _rand(N, dtype=torch.float16), G,
                   config=config)  # fmt: skip


# --------------------------------------------------------------------------------------
# Input gradient.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_grad_input(case, dtype):
    M, N, K, G = case
    q, s = _quantized(N, K, G, dtype)
    _check_grad(_rand(M, N, dtype=dtype), q, s, G)


@pytest.mark.parametrize(
    "group, block_k",
    [(32, 64), (64, 128), (32, 16), (64, 32), (0, 32)],
    ids=["gather-g32", "gather-g64", "tile-g32", "tile-g64", "chan"],
)
def test_grad_input_scale_paths(group, block_k):
    """Per-element scale gather (BLOCK_K > G) and per-tile scale vector (BLOCK_K | G)."""
    M, N, K = 17, 45, 192
    q, s = _quantized(N, K, group, torch.float32)
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=block_k, SPLIT=1, num_warps=4, num_stages=2)
    _check_grad(_rand(M, N, dtype=torch.float32), q, s, group, config=config)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grad_input_split_n(dtype):
    """Split over N: 6 steps of 16 (the last one partial) dealt out as 2, 2, 1, 1; deterministic."""
    M, N, K, G = 5, 90, 128, 32
    q, s = _quantized(N, K, G, dtype)
    dy = _rand(M, N, dtype=dtype)
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT=4, num_warps=4, num_stages=2)
    out = _check_grad(dy, q, s, G, config=config)
    again = _nan((M, K), dtype)
    int8.launch_int8_linear_grad_input(dy, q, s, again, G, config=config)
    assert torch.equal(out, again)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("G", [0, 32])
def test_grad_input_non_contiguous(dtype, G):
    """Sliced q, strided (per channel) or column-major (per group) scales, transposed dy/out."""
    M, N, K = 11, 33, 160
    q_wide = torch.randint(-127, 128, (N + 4, K + 32), dtype=torch.int8, device=DEVICE)
    q = q_wide[2 : N + 2, 16 : K + 16]
    _, s0 = _quantized(N, K, G, dtype)
    if G == 0:
        s = torch.stack([s0, s0 + 1], dim=1)[:, 0]  # stride 2
    else:
        s = s0.T.contiguous().T  # column-major
    dy = _rand(N, M, dtype=dtype).T
    out = _nan((K, M), dtype).T
    assert not q.is_contiguous() and not dy.is_contiguous() and not s.is_contiguous()
    _check_grad(dy, q, s, G, out=out)


# --------------------------------------------------------------------------------------
# Packed weights (layout 2), the bit-trick conversion, in-launch split-K.
# --------------------------------------------------------------------------------------

PACKED_CASES = [(1, 40, 48, 0), (5, 33, 96, 32), (17, 64, 256, 64), (37, 70, 256, 128)]


def _packed(q, s):
    from lrkernels import quant

    return quant.pack(q, s)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", PACKED_CASES, ids=_case_id)
def test_packed_forward_and_grad(case, dtype):
    """The packed weight gives the plain weight's product (both directions)."""
    M, N, K, G = case
    q, s = _quantized(N, K, G, dtype)
    qp, sp = _packed(q, s)
    x, b = _rand(M, K, dtype=dtype), _rand(N, dtype=dtype)
    out = _nan((M, N), dtype)
    int8.launch_int8_linear(x, qp, sp, b, out, G)
    w64, w_dtype = _weights(q, s)
    _assert_close(out, x.double() @ w64.T + b.double(), F.linear(x, w_dtype, b))
    dy = _rand(M, N, dtype=dtype)
    dx = _nan((M, K), dtype)
    int8.launch_int8_linear_grad_input(dy, qp, sp, dx, G)
    _assert_close(dx, dy.double() @ w64, dy @ w_dtype)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_split_k_in_one_launch_is_deterministic_and_resets_counters(packed):
    """Forced splits in both directions: one launch, partials added in split order by the
    tile's last program, bitwise the same on a second launch; the counters end at zero."""
    M, N, K, G = 3, 96, 512, 64
    q, s = _quantized(N, K, G, torch.float16)
    qq, ss = _packed(q, s) if packed else (q, s)
    x, dy = _rand(M, K, dtype=torch.float16), _rand(M, N, dtype=torch.float16)
    fwd = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT=3, num_warps=4, num_stages=2)
    grad = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT=3, num_warps=4, num_stages=2)
    outs = []
    for _ in range(2):
        out, dx = _nan((M, N), torch.float16), _nan((M, K), torch.float16)
        int8.launch_int8_linear(x, qq, ss, None, out, G, config=fwd)
        int8.launch_int8_linear_grad_input(dy, qq, ss, dx, G, config=grad)
        outs.append((out, dx))
    w64, w16 = _weights(q, s)
    _assert_close(outs[0][0], x.double() @ w64.T, F.linear(x, w16))
    _assert_close(outs[0][1], dy.double() @ w64, dy @ w16)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert all(int(c.abs().sum()) == 0 for c in int8._COUNTERS.values())


def test_int8_exact_every_byte():
    """The bit-trick conversion gives every int8 value exactly, in float16 and float32."""
    import triton
    import triton.language as tl

    @triton.jit
    def convert(q_ptr, h_ptr, f_ptr):
        q = tl.load(q_ptr + tl.arange(0, 256))
        tl.store(h_ptr + tl.arange(0, 256), int8.int8_exact(q, tl.float16))
        tl.store(f_ptr + tl.arange(0, 256), int8.int8_exact(q, tl.float32))

    q = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).to(DEVICE)
    h = torch.empty(256, dtype=torch.float16, device=DEVICE)
    f = torch.empty(256, dtype=torch.float32, device=DEVICE)
    convert[(1,)](q, h, f)
    assert torch.equal(h.float(), q.float()) and torch.equal(f, q.float())


@pytest.mark.parametrize("transposed", [False, True])
def test_load_packed_tile(transposed):
    """load_packed_tile (public, for other kernels reading an int8 base) returns W's tile."""
    import triton
    import triton.language as tl

    @triton.jit
    def tile(q_ptr, out_ptr, n0, k0, NB, KB, BN: tl.constexpr, BK: tl.constexpr,
             TR: tl.constexpr):  # fmt: skip
        t = int8.load_packed_tile(q_ptr, n0, k0, NB, KB, BN, BK, TR)
        if TR:
            offs = tl.arange(0, BN)[:, None] * BK + tl.arange(0, BK)[None, :]
        else:
            offs = tl.arange(0, BK)[:, None] * BN + tl.arange(0, BN)[None, :]
        tl.store(out_ptr + offs, t)

    N, K = 70, 96
    q, s = _quantized(N, K, 0, torch.float32)
    qp, _ = _packed(q, s)
    padded = torch.zeros(96 + 32, K + 64, dtype=torch.int8, device=DEVICE)
    padded[:N, :K] = q
    for n0, k0 in ((0, 0), (32, 48), (64, 64)):
        shape = (64, 32) if transposed else (32, 64)
        out = torch.empty(shape, dtype=torch.int8, device=DEVICE)
        tile[(1,)](qp, out, n0, k0, qp.shape[0], qp.shape[1], 64, 32, transposed)
        want = padded[n0 : n0 + 64, k0 : k0 + 32]
        assert torch.equal(out, want if transposed else want.T), (n0, k0)


# --------------------------------------------------------------------------------------
# Edge cases, indexing, config, validation, bfloat16.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [0, 32])
def test_zero_rows(group):
    q, s = _quantized(29, 96, group, torch.float32)
    out = torch.empty(0, 29, device=DEVICE)
    int8.launch_int8_linear(torch.empty(0, 96, device=DEVICE), q, s, None, out, group)
    dx = torch.empty(0, 96, device=DEVICE)
    int8.launch_int8_linear_grad_input(torch.empty(0, 29, device=DEVICE), q, s, dx, group)
    assert out.shape == (0, 29) and dx.shape == (0, 96)


def test_int64_indexing(monkeypatch):
    # Force the 64-bit address path (real triggers need > 2**31-element operands).
    monkeypatch.setattr(int8, "_INT32_LIMIT", 0)
    q, s = _quantized(29, 96, 32, torch.float32)
    _check_forward(_rand(17, 96, dtype=torch.float32), q, s, _rand(29, dtype=torch.float32), 32)
    split = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT=2, num_warps=4, num_stages=2)
    _check_forward(_rand(3, 96, dtype=torch.float32), q, s, None, 32, config=split)
    _check_grad(_rand(5, 29, dtype=torch.float32), q, s, 32)


def test_choose_config_invariants():
    def pow2(v):
        return v >= 16 and v & (v - 1) == 0

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for M in (1, 7, 16, 17, 300, 8192):
            for N, K in ((1, 32), (29, 45), (4096, 4096), (11008, 4096), (4096, 11008)):
                for G in (0, 32, 64, 128):
                    if G and K % G:
                        continue
                    for sms in (1, 108, 132):
                        for transposed in (False, True):
                            packed = (M + N) % 2 == 0 and K % 16 == 0
                            c = int8.choose_config(
                                M, N, K, G, dtype, sms, transposed, packed=packed
                            )
                            if packed and transposed:
                                assert c["BLOCK_N"] % 32 == 0, c
                            elif packed:
                                assert c["BLOCK_N"] % 32 == 0 and c["BLOCK_K"] % 16 == 0, c
                            for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
                                assert pow2(c[key]) and c[key] <= 128, (key, c)
                            if G and not transposed:
                                assert G % c["BLOCK_K"] == 0, c
                            red, block_r = (N, c["BLOCK_N"]) if transposed else (K, c["BLOCK_K"])
                            assert 1 <= c["SPLIT"] <= max(1, -(-red // block_r)), c
                            if sms == 1:
                                assert c["SPLIT"] == 1
                            assert c["num_warps"] in (4, 8) and c["num_stages"] in (2, 3, 4)
    # Decode on a large GPU splits the reduction; a big batch does not.
    assert int8.choose_config(1, 4096, 4096, 128, torch.float16, 132, False)["SPLIT"] > 1
    assert int8.choose_config(4096, 4096, 4096, 128, torch.float16, 132, False)["SPLIT"] == 1


def test_input_validation():
    q, s = _quantized(8, 64, 32, torch.float32)
    x = _rand(4, 64, dtype=torch.float32)
    out = _nan((4, 8), torch.float32)
    with pytest.raises(ValueError):  # scales do not match group_size
        int8.launch_int8_linear(x, q, s, None, out, 64)
    with pytest.raises(ValueError):  # per-channel scales expected
        int8.launch_int8_linear(x, q, s, None, out, 0)
    with pytest.raises(ValueError):  # wrong out shape
        int8.launch_int8_linear(x, q, s, None, out[:, :5], 32)
    with pytest.raises(TypeError):  # dtype mismatch
        int8.launch_int8_linear(x, q, s.half(), None, out, 32)
    with pytest.raises(TypeError):  # weight not int8
        int8.launch_int8_linear(x, q.float(), s, None, out, 32)
    with pytest.raises(ValueError):  # BLOCK_K does not divide the group
        bad = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT=1, num_warps=4, num_stages=2)
        int8.launch_int8_linear(x, q, s, None, out, 32, config=bad)
    with pytest.raises(ValueError):  # dy has K instead of N columns
        int8.launch_int8_linear_grad_input(x, q, s, _nan((4, 64), torch.float32), 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 dots need a GPU")
@pytest.mark.parametrize("M", [1, 37, 300])
@pytest.mark.parametrize("group", [0, 32, 128])
def test_bfloat16_gpu(M, group):
    N, K = 72, 512
    q, s = _quantized(N, K, group, torch.bfloat16)
    _check_forward(_rand(M, K, dtype=torch.bfloat16), q, s, _rand(N, dtype=torch.bfloat16), group)
    _check_grad(_rand(M, N, dtype=torch.bfloat16), q, s, group)
