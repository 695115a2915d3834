"""Tests of lrkernels.nn: LowRankLinear and the factorize_linears model converter."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrkernels.factorize import relative_output_error, truncated_svd
from lrkernels.nn import FactorizeReport, LowRankLinear, factorize_linears

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _all_hooks_removed(model: nn.Module) -> bool:
    return all(
        not m._forward_pre_hooks and not m._forward_hooks and not m._forward_pre_hooks_with_kwargs
        for m in model.modules()
    )


# ---------------------------------------------------------------------------------------------
# LowRankLinear
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dense_product(dtype, bias):
    torch.manual_seed(0)
    m = LowRankLinear(24, 16, 5, bias=bias, dtype=dtype)
    assert m.U.shape == (16, 5) and m.V.shape == (5, 24)
    assert (m.bias is None) == (not bias)
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == F64 else {"atol": 1e-5, "rtol": 1e-5}
    for shape in [(24,), (7, 24), (2, 3, 24), (0, 24)]:
        x = torch.randn(*shape, dtype=dtype)
        y = m(x)
        assert y.shape == (*shape[:-1], 16) and y.dtype == dtype
        torch.testing.assert_close(y, F.linear(x, m.U @ m.V, m.bias), **tol)


def test_backend_attribute_is_passed_through():
    m = LowRankLinear(8, 4, 2)
    assert m.backend is None
    m.backend = "torch"
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), F.linear(x, m.U @ m.V, m.bias))
    assert "backend='torch'" in repr(m)
    m.backend = "no-such-backend"
    with pytest.raises((ValueError, RuntimeError)):
        m(x)


def test_init_variance_matches_nn_linear():
    torch.manual_seed(1)
    in_f, out_f, rank = 512, 512, 64
    m = LowRankLinear(in_f, out_f, rank).requires_grad_(False)
    target = 1.0 / (3 * in_f)  # nn.Linear: U(-1/√in, 1/√in)
    dense = nn.Linear(in_f, out_f)
    assert float(dense.weight.detach().var()) == pytest.approx(target, rel=0.05)
    W = (m.U @ m.V).detach()
    assert float(W.mean().abs()) < 0.05 * math.sqrt(target)
    assert float(W.var()) == pytest.approx(target, rel=0.15)
    # the factors themselves follow the documented uniform bounds
    assert float(m.V.abs().max()) <= 1 / math.sqrt(in_f)
    assert float(m.U.abs().max()) <= math.sqrt(3 / rank)
    assert float(m.V.var()) == pytest.approx(1 / (3 * in_f), rel=0.05)
    assert float(m.U.var()) == pytest.approx(1 / rank, rel=0.05)
    assert float(m.bias.abs().max()) <= 1 / math.sqrt(in_f)
    # and the output scale matches a dense layer's on unit inputs
    x = torch.randn(256, in_f)
    with torch.no_grad():
        ratio = float((m(x) - m.bias).var() / (dense(x) - dense.bias).var())
    assert ratio == pytest.approx(1.0, rel=0.15)
    # other shapes, including rank > min(in, out) and rank 1
    for i, o, r in [(64, 256, 8), (300, 40, 1), (16, 16, 32)]:
        W = (LowRankLinear(i, o, r).U @ LowRankLinear(i, o, r).V).detach()
        assert float(W.var()) == pytest.approx(1 / (3 * i), rel=0.3), (i, o, r)


def test_reset_parameters_reinitialises():
    m = LowRankLinear(10, 6, 3)
    with torch.no_grad():
        m.U.zero_()
        m.V.zero_()
        m.bias.zero_()
    m.reset_parameters()
    assert m.U.any() and m.V.any() and m.bias.any()


def test_state_dict_round_trip():
    torch.manual_seed(2)
    a = LowRankLinear(12, 9, 4)
    sd = a.state_dict()
    assert set(sd) == {"U", "V", "bias"}
    b = LowRankLinear(12, 9, 4)
    assert not torch.equal(a.U, b.U)
    b.load_state_dict(sd)
    x = torch.randn(5, 12)
    assert torch.equal(a(x), b(x))
    c = LowRankLinear(12, 9, 4, bias=False)
    assert set(c.state_dict()) == {"U", "V"}
    with pytest.raises(RuntimeError):
        c.load_state_dict(sd)  # unexpected key "bias"
    with pytest.raises(RuntimeError):
        LowRankLinear(12, 9, 3).load_state_dict(sd)  # shape mismatch
    # inside a container, with torch.save / torch.load semantics
    seq = nn.Sequential(a, nn.ReLU())
    seq2 = nn.Sequential(LowRankLinear(12, 9, 4), nn.ReLU())
    seq2.load_state_dict(seq.state_dict())
    assert torch.equal(seq(x), seq2(x))


def test_extra_repr_and_parameter_counts():
    m = LowRankLinear(20, 10, 3)
    assert repr(m) == "LowRankLinear(in_features=20, out_features=10, rank=3, bias=True)"
    assert m.parameter_count == 3 * 30 + 10 == sum(p.numel() for p in m.parameters())
    assert m.dense_parameter_count == 210
    m = LowRankLinear(20, 10, 3, bias=False)
    assert m.extra_repr() == "in_features=20, out_features=10, rank=3, bias=False"
    assert m.parameter_count == 90 == sum(p.numel() for p in m.parameters())


def test_constructor_validation():
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(4, 4, 0)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(4, 4, 1.5)
    with pytest.raises(ValueError, match="in_features"):
        LowRankLinear(-1, 4, 2)
    m = LowRankLinear(4, 4, 2, device="meta", dtype=torch.float16)
    assert m.U.device.type == "meta" and m.V.dtype == torch.float16


@pytest.mark.parametrize("bias", [True, False])
def test_to_linear(bias):
    torch.manual_seed(3)
    m = LowRankLinear(10, 7, 3, bias=bias, dtype=F64)
    lin = m.to_linear()
    assert isinstance(lin, nn.Linear) and lin.weight.dtype == F64
    assert (lin.bias is None) == (not bias)
    torch.testing.assert_close(lin.weight, m.U @ m.V)
    x = torch.randn(4, 10, dtype=F64)
    torch.testing.assert_close(lin(x), m(x))
    # a copy: changing the linear leaves the low-rank module alone
    with torch.no_grad():
        lin.weight.zero_()
    assert (m.U @ m.V).abs().sum() > 0


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_gradients_flow_to_all_inputs(dtype):
    torch.manual_seed(4)
    m = LowRankLinear(9, 6, 3, dtype=dtype)
    x = torch.randn(2, 4, 9, dtype=dtype, requires_grad=True)
    w = torch.randn(2, 4, 6, dtype=dtype)
    (m(x) * w).sum().backward()
    # reference: autograd through the two-matmul formula on detached copies
    U, V, b = (t.detach().clone().requires_grad_() for t in (m.U, m.V, m.bias))
    xr = x.detach().clone().requires_grad_()
    (F.linear(F.linear(xr, V), U, b) * w).sum().backward()
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == F64 else {"atol": 1e-5, "rtol": 1e-5}
    for got, want in [(m.U.grad, U.grad), (m.V.grad, V.grad), (m.bias.grad, b.grad)]:
        assert got is not None
        torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(x.grad, xr.grad, **tol)


def test_gradcheck_float64():
    torch.manual_seed(5)
    m = LowRankLinear(5, 4, 2, dtype=F64)
    params = [p.detach().clone().requires_grad_() for p in (m.U, m.V, m.bias)]
    x = torch.randn(3, 5, dtype=F64, requires_grad=True)

    def f(x, U, V, b):
        return torch.func.functional_call(m, {"U": U, "V": V, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


# ---------------------------------------------------------------------------------------------
# LowRankLinear.from_linear
# ---------------------------------------------------------------------------------------------


def test_from_linear_plain_svd():
    torch.manual_seed(6)
    lin = nn.Linear(20, 12, dtype=F64)
    s = torch.linalg.svdvals(lin.weight.detach())
    m = LowRankLinear.from_linear(lin, 5)
    assert isinstance(m, LowRankLinear) and m.rank == 5
    err = float(torch.linalg.matrix_norm(lin.weight - m.U @ m.V).detach())
    assert abs(err - float(s[5:].square().sum().sqrt())) < 1e-10
    # bias copied, not shared
    assert torch.equal(m.bias, lin.bias) and m.bias.data_ptr() != lin.bias.data_ptr()
    with torch.no_grad():
        lin.bias.add_(1.0)
    assert not torch.equal(m.bias, lin.bias)
    # full rank reproduces the layer
    full = LowRankLinear.from_linear(lin, 12)
    x = torch.randn(3, 20, dtype=F64)
    torch.testing.assert_close(full(x), lin(x), atol=1e-12, rtol=1e-12)
    # energy / ratio
    assert LowRankLinear.from_linear(lin, energy=1.0).rank == 12
    assert LowRankLinear.from_linear(lin, ratio=0.25).rank == 1  # floor(60 / 32) = 1
    assert LowRankLinear.from_linear(lin, ratio=0.5).rank == 3  # floor(120 / 32) = 3


def test_from_linear_keeps_dtype_device_flags_and_no_bias():
    lin = nn.Linear(16, 8, bias=False, dtype=torch.bfloat16)
    lin.weight.requires_grad_(False)
    lin.eval()
    m = LowRankLinear.from_linear(lin, rank=4, backend="torch")
    assert m.U.dtype == torch.bfloat16 and m.V.dtype == torch.bfloat16
    assert m.U.device == lin.weight.device
    assert m.bias is None and not m.U.requires_grad and not m.training
    assert m.backend == "torch"
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    assert m(x).dtype == torch.bfloat16
    U, V = truncated_svd(lin.weight, 4)
    assert torch.equal(m.U, U) and torch.equal(m.V, V)


def test_from_linear_activation_aware():
    g = _gen(7)
    lin = nn.Linear(32, 24, dtype=F64)
    scales = torch.logspace(0, -3, 32, dtype=F64)
    X = torch.randn(3, 200, 32, dtype=F64, generator=g) * scales
    Xf = X.reshape(-1, 32)
    G = Xf.T @ Xf
    plain = LowRankLinear.from_linear(lin, 6)
    aware = LowRankLinear.from_linear(lin, 6, calibration=X, damping=0.0)
    aware_g = LowRankLinear.from_linear(lin, 6, gram=G, damping=0.0)
    torch.testing.assert_close(aware.U @ aware.V, aware_g.U @ aware_g.V, atol=1e-10, rtol=1e-10)

    def out_err(m):
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(m(Xf) - lin(Xf)))

    s = torch.linalg.svdvals(lin.weight.detach() @ Xf.T)
    assert abs(out_err(aware) - float(s[6:].square().sum().sqrt())) < 1e-8
    assert out_err(aware) < 0.5 * out_err(plain)
    with pytest.raises(TypeError):
        LowRankLinear.from_linear(nn.Conv1d(3, 3, 1), 1)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear.from_linear(lin, 25)
    with pytest.raises(ValueError, match="exactly one"):
        LowRankLinear.from_linear(lin)


def test_from_factors_validation():
    with pytest.raises(ValueError, match="do not match"):
        LowRankLinear.from_factors(torch.randn(4, 2), torch.randn(3, 5))
    with pytest.raises(ValueError, match="bias"):
        LowRankLinear.from_factors(torch.randn(4, 2), torch.randn(2, 5), torch.randn(5))
    m = LowRankLinear.from_factors(torch.randn(4, 2), torch.randn(2, 5))
    assert (m.in_features, m.out_features, m.rank, m.bias) == (5, 4, 2, None)


# ---------------------------------------------------------------------------------------------
# factorize_linears
# ---------------------------------------------------------------------------------------------


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(32, 64, dtype=dtype),
        nn.ReLU(),
        nn.Linear(64, 48, dtype=dtype),
        nn.ReLU(),
        nn.Linear(48, 4, dtype=dtype),
    )


class _Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).unbind(2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(o.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    """Pre-norm transformer block: attention + MLP."""

    def __init__(self, d=32, heads=4, hidden=128):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = _Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_factorize_linears_plain_with_skips_and_totals():
    model = _mlp()
    original = [m for m in model if isinstance(m, nn.Linear)]
    before = _count(model)
    report = factorize_linears(model, rank=8)
    assert isinstance(report, FactorizeReport) and not report.calibrated
    names = [layer.name for layer in report.layers]
    assert names == ["0", "2", "4"]
    # 0: 8·96 = 768 < 2048; 2: 8·112 = 896 < 3072; 4: min(48, 4) = 4 -> rank 4, 4·52 >= 192
    assert isinstance(model[0], LowRankLinear) and model[0].rank == 8
    assert isinstance(model[2], LowRankLinear) and model[2].rank == 8
    assert model[4] is original[2]
    row0, row2, row4 = report.layers
    assert (row0.in_features, row0.out_features, row0.rank) == (32, 64, 8)
    assert row0.params_before == 32 * 64 + 64 and row0.params_after == 8 * 96 + 64
    assert row4.skipped and "does not reduce" in row4.skipped and row4.rank == 4
    assert row4.params_after == row4.params_before
    assert [r.name for r in report.factorized] == ["0", "2"]
    assert [r.name for r in report.skipped] == ["4"]
    assert report.params_before == before
    assert report.params_after == _count(model)
    assert report.params_before - report.params_after == sum(
        r.params_before - r.params_after for r in report.layers
    )
    assert report.compression == pytest.approx(report.params_after / before)
    assert all(r.relative_error is None for r in report.layers)
    # the factorised layers are the truncated SVDs of the originals
    U, V = truncated_svd(original[0].weight, 8)
    torch.testing.assert_close(model[0].U @ model[0].V, U @ V)
    torch.testing.assert_close(model[0].bias, original[0].bias)
    text = str(report)
    assert "params before" in text and "skipped" in text
    assert f"{before:,}" in text and f"{report.params_after:,}" in text
    assert re.search(r"^0\s+32\s+64\s+8\s", text, re.M)
    assert model(torch.randn(5, 32)).shape == (5, 4)


def test_factorize_linears_full_rank_preserves_outputs():
    for calibrate in (False, True):
        model = _mlp(seed=1, dtype=F64)
        ref = _mlp(seed=1, dtype=F64)
        x = torch.randn(16, 32, dtype=F64)
        batches = [torch.randn(8, 32, dtype=F64) for _ in range(3)] if calibrate else None
        report = factorize_linears(
            model, ratio=1e9, calibration_batches=batches, require_reduction=False
        )
        assert [r.rank for r in report.layers] == [32, 48, 4]
        assert all(isinstance(m, LowRankLinear) for m in (model[0], model[2], model[4]))
        assert report.params_after > report.params_before
        torch.testing.assert_close(model(x), ref(x), atol=1e-10, rtol=1e-10)
        if calibrate:
            assert all(r.relative_error < 1e-10 for r in report.layers)


def test_factorize_linears_transformer_block_with_calibration():
    torch.manual_seed(8)
    d = 32
    block = _Block(d)
    ref = _Block(d)
    ref.load_state_dict(block.state_dict())
    block.eval()
    ref.eval()
    # anisotropic token features: a few dominant directions
    mix = torch.randn(d, d) * torch.logspace(0, -2, d)[:, None]
    batches = [torch.randn(2, 10, d) @ mix for _ in range(4)]
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}

    # capture the inputs every mlp layer sees, to check the reported errors independently
    seen = {n: [] for n in linears}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: seen[n].append(args[0].detach()))
        for n, m in ref.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        for b in batches:
            ref(b)
    for h in handles:
        h.remove()

    report = factorize_linears(
        block, rank=8, include=lambda name: name.startswith("mlp"), calibration_batches=batches
    )
    assert report.calibrated
    assert [r.name for r in report.layers] == ["mlp.0", "mlp.2"]
    assert isinstance(block.mlp[0], LowRankLinear) and isinstance(block.mlp[2], LowRankLinear)
    assert block.attn.qkv is linears["attn.qkv"] and block.attn.proj is linears["attn.proj"]
    assert _all_hooks_removed(block)
    assert all(not m._forward_pre_hooks for m in linears.values())
    for row in report.layers:
        X = torch.cat(seen[row.name]).reshape(-1, row.in_features).double()
        W = linears[row.name].weight.detach().double()
        new = block.get_submodule(row.name)
        E = W - new.U.detach().double() @ new.V.detach().double()
        direct = float(torch.linalg.matrix_norm(E @ X.T) / torch.linalg.matrix_norm(W @ X.T))
        assert row.relative_error == pytest.approx(direct, rel=1e-6)
        # plain SVD of the same rank does worse on these inputs
        Up, Vp = truncated_svd(linears[row.name].weight, 8)
        plain = relative_output_error(linears[row.name].weight, Up, Vp, X.T @ X)
        assert row.relative_error < plain
    assert report.params_after == _count(block)
    out = block(batches[0])
    assert out.shape == batches[0].shape and torch.isfinite(out).all()
    assert "calibrated" in str(report)


def test_include_exclude_filters():
    block = _Block()
    report = factorize_linears(block, rank=4, include=r"^attn\.", exclude="proj")
    assert [r.name for r in report.layers] == ["attn.qkv"]
    assert isinstance(block.attn.qkv, LowRankLinear)
    assert isinstance(block.attn.proj, nn.Linear)
    block = _Block()
    report = factorize_linears(block, rank=4, exclude=lambda n: "qkv" in n)
    assert [r.name for r in report.layers] == ["attn.proj", "mlp.0", "mlp.2"]
    with pytest.raises(ValueError, match="include"):
        factorize_linears(_Block(), rank=4, include="(")
    with pytest.raises(ValueError, match="exclude"):
        factorize_linears(_Block(), rank=4, exclude=3)


def test_custom_forward_fn_and_dict_batches():
    model = _mlp(seed=2)
    batches = [{"x": torch.randn(4, 32)} for _ in range(2)]
    calls = []

    def fwd(m, batch):
        calls.append(torch.is_grad_enabled())
        return m(batch["x"])

    report = factorize_linears(model, energy=0.9, calibration_batches=batches, forward_fn=fwd)
    assert calls == [False, False]  # run under no_grad, once per batch
    assert report.calibrated
    for row in report.factorized:
        assert 1 <= row.rank < min(row.in_features, row.out_features)
        assert 0 <= row.relative_error < 1
    assert _all_hooks_removed(model)


def test_hooks_removed_when_forward_raises():
    model = _mlp(seed=3)
    linears = [m for m in model if isinstance(m, nn.Linear)]

    def bad(m, batch):
        m(batch)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        factorize_linears(model, rank=4, calibration_batches=[torch.randn(2, 32)], forward_fn=bad)
    assert _all_hooks_removed(model)
    assert [m for m in model if isinstance(m, nn.Linear)] == linears  # nothing replaced


def test_layers_without_calibration_data_fall_back_with_warning():
    model = nn.ModuleDict({"used": nn.Linear(16, 16), "unused": nn.Linear(16, 16)})
    with pytest.warns(UserWarning, match="unused"):
        report = factorize_linears(
            model,
            rank=2,
            calibration_batches=[torch.randn(4, 16)],
            forward_fn=lambda m, b: m["used"](b),
        )
    rows = {r.name: r for r in report.layers}
    assert rows["used"].relative_error is not None and rows["unused"].relative_error is None
    assert isinstance(model["unused"], LowRankLinear)


def test_ratio_rank_per_layer_and_rank_clamp():
    model = _mlp(seed=4)
    report = factorize_linears(model, ratio=0.25)
    # floor(0.25·32·64/96) = 5, floor(0.25·64·48/112) = 6, floor(0.25·48·4/52) -> 1 (at least 1)
    assert [r.rank for r in report.layers] == [5, 6, 1]
    assert [r.factorized for r in report.layers] == [True, True, True]
    model = _mlp(seed=4)
    report = factorize_linears(model, rank=100, require_reduction=False)
    assert [r.rank for r in report.layers] == [32, 48, 4]  # clamped to min(in, out)
    with pytest.raises(ValueError, match="rank"):
        factorize_linears(_mlp(), rank=0)
    with pytest.raises(ValueError, match="exactly one"):
        factorize_linears(_mlp())


def test_shared_tied_and_mha_layers():
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = factorize_linears(model, rank=4)
    assert [r.name for r in report.layers] == ["0"]
    assert isinstance(model[0], LowRankLinear) and model[0] is model[2]
    assert report.params_after == _count(model) == 4 * 64 + 32

    emb = nn.Embedding(10, 32)
    head = nn.Linear(32, 10, bias=False)
    head.weight = emb.weight
    tied = nn.ModuleDict({"emb": emb, "head": head})
    report = factorize_linears(tied, rank=2)
    assert report.layers[0].skipped and "tied" in report.layers[0].skipped
    assert tied["head"] is head and report.params_after == report.params_before

    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(self.mha(x, x, x, need_weights=False)[0])

    # MHA reads out_proj.weight instead of calling out_proj: it is converted all the same
    # (LowRankLinear.weight serves MHA), and warned about, since MHA's calls never reach it.
    model = WithMHA()
    with pytest.warns(UserWarning, match=r"'mha.out_proj' saw no calibration.*MultiheadAttention"):
        report = factorize_linears(model, rank=4, calibration_batches=[torch.randn(2, 5, 32)])
    rows = {r.name: r for r in report.layers}
    assert rows["mha.out_proj"].factorized and isinstance(model.mha.out_proj, LowRankLinear)
    assert rows["fc"].factorized and isinstance(model.fc, LowRankLinear)
    assert model(torch.randn(2, 5, 32)).shape == (2, 5, 32)
    assert _all_hooks_removed(model)


def test_factorized_model_trains():
    model = _mlp(seed=5)
    factorize_linears(model, rank=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 32), torch.randn(64, 4)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    assert losses[-1] < losses[0]
    assert model[0].U.grad is not None and model[0].V.grad is not None
