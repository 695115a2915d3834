"""The LoRA Triton launchers directly: the split-reduction paths (which the CPU interpreter's
heuristic never picks: it sees one SM), forced tile configs, and the config invariants."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matches

from lrkernels.reference import (
    dequantize_reference,
    lora_dropout_keep_mask,
    lora_linear_exact,
    lora_linear_reference,
)

tl_lora = pytest.importorskip("lrkernels.triton_kernels.lora")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or TRITON_INTERPRET=1",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _base(kind, N, K, dtype):
    if kind == "dense":
        return torch.randn(N, K, device=DEV).to(dtype) / K**0.5, None
    q = torch.randint(-127, 128, (N, K), device=DEV, dtype=torch.int8)
    shape = (N,) if kind == 0 else (N, K // kind)
    return q, ((torch.rand(shape, device=DEV) + 0.5) / (127 * K**0.5)).to(dtype)


def _cfg(bm, bn, bk, br, split):
    return dict(
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, SPLIT=split, num_warps=4, num_stages=2
    )


@pytest.mark.parametrize("kind", ["dense", 0, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("threshold", [0, 20000])
def test_forward_split(kind, dtype, threshold):
    M, K, N, R = 5, 160, 36, 6
    x = torch.randn(M, K, device=DEV).to(dtype)
    w, s = _base(kind, N, K, dtype)
    A = (torch.randn(R, K, device=DEV) / K**0.5).to(dtype)
    B = torch.randn(N, R, device=DEV).to(dtype)
    bias = torch.randn(N, device=DEV).to(dtype)
    seed = torch.tensor([31337], device=DEV)
    y = torch.full((M, N), float("nan"), device=DEV, dtype=dtype)
    t = torch.full((M, R), float("nan"), device=DEV, dtype=dtype)
    tl_lora.launch_lora_linear(
        x, w, s, A, B, bias, 0.8, threshold, seed, y, t, config=_cfg(16, 16, 32, 16, 3)
    )
    exact = lora_linear_exact(x, w, s, A, B, bias, 0.8, threshold, seed)
    same = lora_linear_reference(x, w, s, A, B, bias, 0.8, threshold, seed)
    assert_matches(y, exact, same)
    keep = lora_dropout_keep_mask(seed, M, K, threshold)
    t_exact = (x.double() * keep) @ A.double().t()
    assert_matches(t, t_exact, ((x * keep) @ A.t()), what="t")


@pytest.mark.parametrize("kind", ["dense", 0, 32])
@pytest.mark.parametrize("split", [1, 3])
def test_grad_input_split(kind, split):
    M, K, N, R = 7, 96, 80, 5
    dy = torch.randn(M, N, device=DEV)
    w, s = _base(kind, N, K, torch.float32)
    A = torch.randn(R, K, device=DEV)
    dt = torch.randn(M, R, device=DEV)
    seed = torch.tensor([5], device=DEV)
    out = torch.full((M, K), float("nan"), device=DEV)
    # BLOCK_K (dx columns) 16 does not divide into one group of 32 per tile: gathered scales.
    tl_lora.launch_lora_grad_input(
        dy, w, s, dt, A, 9000, seed, out, config=_cfg(16, 16, 16, 16, split)
    )
    wd = w.double() if s is None else dequantize_reference(w, s.double(), torch.float64)
    keep = lora_dropout_keep_mask(seed, M, K, 9000)
    want = dy.double() @ wd + keep * (dt.double() @ A.double())
    assert (out.double() - want).norm() / want.norm() < 1e-5


@pytest.mark.parametrize("split", [1, 4])
def test_grad_A_split(split):
    M, K, R = 70, 48, 3
    dt = torch.randn(M, R, device=DEV)
    x = torch.randn(M, K, device=DEV)
    seed = torch.tensor([8], device=DEV)
    out = torch.full((R, K), float("nan"), device=DEV)
    tl_lora.launch_lora_grad_A(dt, x, 30000, seed, out, split=split)
    keep = lora_dropout_keep_mask(seed, M, K, 30000)
    want = dt.double().t() @ (x.double() * keep)
    assert (out.double() - want).norm() / want.norm() < 1e-5


def test_group_must_contain_block_k():
    x = torch.randn(2, 64, device=DEV)
    w, s = _base(32, 8, 64, torch.float32)
    A, B = torch.randn(2, 64, device=DEV), torch.randn(8, 2, device=DEV)
    y, t = torch.empty(2, 8, device=DEV), torch.empty(2, 2, device=DEV)
    with pytest.raises(ValueError, match="BLOCK_K=64 must divide group_size=32"):
        tl_lora.launch_lora_linear(
            x, w, s, A, B, None, 1.0, 0, None, y, t, config=_cfg(16, 16, 64, 16, 1)
        )


@pytest.mark.parametrize("M", [1, 16, 17, 300, 8192])
@pytest.mark.parametrize("group", [0, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_config_invariants(M, group, dtype):
    for transposed in (False, True):
        cfg = tl_lora.choose_config(M, 4096, 4096, 16, group, dtype, 132, transposed)
        for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R"):
            assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0, cfg
        if group and not transposed:
            assert group % cfg["BLOCK_K"] == 0
        assert 1 <= cfg["SPLIT"] <= 32
        if M >= 300:  # enough row tiles to fill the GPU: no split-K round trip
            assert cfg["SPLIT"] == 1
