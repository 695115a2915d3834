"""Tests of lrkernels.nn.int8: the Int8Linear module and the quantize_linears converter.

Module tests pin ``backend="torch"`` so they test the module, not the kernels (those are
tested against the same reference in the op's own tests)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrkernels.nn import Int8LayerReport, Int8Linear, QuantizeReport, quantize_linears
from lrkernels.quant import dequantize, quantize, search_clip_ratio

F64 = torch.float64
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def _all_hooks_removed(model: nn.Module) -> bool:
    return all(
        not m._forward_pre_hooks and not m._forward_hooks and not m._forward_pre_hooks_with_kwargs
        for m in model.modules()
    )


def _reference(x, q, s, bias):
    return F.linear(x, dequantize(q, s).to(x.dtype), bias)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to(F64), b.detach().to(F64)
    return float((a - b).norm() / b.norm())


def _module(in_f=96, out_f=29, *, bias=True, group=None, dtype=F32) -> tuple[Int8Linear, nn.Linear]:
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    m = Int8Linear.from_linear(lin, group)
    m.backend = "torch"
    return m, lin


# ---------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group,scale_shape", [(None, (29,)), (0, (29,)), (32, (29, 3))])
def test_constructor_buffers_and_parameters(group, scale_shape):
    m = Int8Linear(96, 29, group_size=group)
    assert m.qweight.dtype == torch.int8 and m.qweight.shape == (29, 96)
    assert not m.qweight.any()
    # dtype defaults to torch's default dtype, as for nn.Linear
    assert m.scales.dtype == F32 and m.scales.shape == scale_shape
    assert m.bias.dtype == F32 and m.bias.shape == (29,) and m.bias.requires_grad
    assert m.dtype == F32 and m.group_size == (group or 0) and m.backend is None
    assert [name for name, _ in m.named_parameters()] == ["bias"]
    assert {name for name, _ in m.named_buffers()} == {"qweight", "scales"}
    assert set(m.state_dict()) == {"qweight", "scales", "bias"}
    m2 = Int8Linear(96, 29, bias=False, dtype=F16)
    assert m2.bias is None and list(m2.parameters()) == [] and m2.scales.dtype == F16


def test_default_dtype_follows_torch_default():
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(F16)
        assert Int8Linear(32, 8).dtype == F16 == nn.Linear(32, 8).weight.dtype
        torch.set_default_dtype(F64)
        with pytest.raises(ValueError, match="default dtype is torch.float64.*pass dtype="):
            Int8Linear(32, 8)
        assert Int8Linear(32, 8, dtype=F32).dtype == F32
    finally:
        torch.set_default_dtype(previous)
    m = Int8Linear(32, 8, group_size=32)
    m.backend = "torch"
    assert m(torch.randn(3, 32)).dtype == F32  # a float32 forward works out of the box


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (
            {"group_size": 64},
            ValueError,
            r"in_features \(96\) must be divisible by group_size \(64\)",
        ),
        ({"group_size": 16}, ValueError, "group_size must be None"),
        (
            {"dtype": F64},
            ValueError,
            "dtype must be torch.float16, torch.bfloat16 or torch.float32",
        ),
        ({"dtype": torch.int8}, ValueError, "dtype must be"),
        ({"in_features": 0}, ValueError, "in_features must be >= 1"),
        ({"out_features": 2.5}, ValueError, "out_features must be an integer"),
        ({"in_features": True}, ValueError, "in_features must be an integer"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    args = {"in_features": 96, "out_features": 8, **kwargs}
    with pytest.raises(exc, match=match):
        Int8Linear(**args)


def test_extra_repr_and_memory_bytes():
    m = Int8Linear(256, 10, group_size=64, dtype=F16)
    r = repr(m)
    for part in [
        "in_features=256",
        "out_features=10",
        "bias=True",
        "group_size=64",
        "torch.float16",
    ]:
        assert part in r
    assert "backend" not in r
    m.backend = "torch"
    assert "backend='torch'" in repr(m)
    assert "group_size=per-channel" in repr(Int8Linear(256, 10, bias=False))
    assert m.memory_bytes == 256 * 10 + 10 * 4 * 2 + 10 * 2
    assert Int8Linear(256, 10, bias=False, dtype=F32).memory_bytes == 256 * 10 + 10 * 4


# ---------------------------------------------------------------------------------------------
# from_linear / forward / gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(dtype, group, bias):
    m, lin = _module(bias=bias, group=group, dtype=dtype)
    q, s = quantize(lin.weight, group)
    assert torch.equal(m.qweight, q) and torch.equal(m.scales, s)
    assert m.scales.dtype == dtype and m.group_size == (group or 0)
    if bias:
        assert torch.equal(m.bias.detach(), lin.bias.detach())
    for shape in [(96,), (7, 96), (2, 3, 96), (0, 96)]:
        x = torch.randn(*shape, dtype=dtype)
        y = m(x)
        assert y.shape == (*shape[:-1], 29) and y.dtype == dtype
        torch.testing.assert_close(y, _reference(x, q, s, lin.bias), rtol=0, atol=0)
        if x.numel():
            # and close to the dense layer (int8 error ~0.5%; bf16 rounding on top)
            assert _rel(y, lin(x)) < (0.015 if dtype == F32 else 0.03)


def test_from_linear_dtype_and_flags():
    lin = nn.Linear(64, 16)
    lin.bias.requires_grad_(False)
    lin.eval()
    m = Int8Linear.from_linear(lin, 32, dtype=BF16)
    assert m.scales.dtype == BF16 and m.bias.dtype == BF16
    assert not m.bias.requires_grad and not m.training
    q, s = quantize(lin.weight, 32, scale_dtype=BF16)
    assert torch.equal(m.qweight, q) and torch.equal(m.scales, s)
    m64 = Int8Linear.from_linear(nn.Linear(64, 16, dtype=F64))  # float64 layer -> float32
    assert m64.dtype == F32
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        Int8Linear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="dtype must be"):
        Int8Linear.from_linear(lin, dtype=F64)
    with pytest.raises(ValueError, match=r"in_features \(64\) must be divisible"):
        Int8Linear.from_linear(nn.Linear(64, 4), 128)


def test_from_linear_clip_search():
    lin = nn.Linear(128, 24)
    with torch.no_grad():
        lin.weight[:, 5] = 3.0  # outliers on a quiet input feature
    X = torch.randn(300, 128)
    X[:, 5] *= 0.01
    G = X.double().T @ X.double()
    m = Int8Linear.from_linear(lin, calibration=X, clip_search=True)
    ratios = search_clip_ratio(lin.weight, gram=G)
    q, s = quantize(lin.weight, clip_ratio=ratios)
    assert torch.equal(m.qweight, q) and torch.equal(m.scales, s)
    m_gram = Int8Linear.from_linear(lin, gram=G, clip_search=True)
    assert torch.equal(m_gram.qweight, q)
    plain = Int8Linear.from_linear(lin)
    m.backend = plain.backend = "torch"
    with torch.no_grad():
        err_clip = (m(X) - lin(X)).square().sum()
        err_plain = (plain(X) - lin(X)).square().sum()
    assert float(err_clip) < float(err_plain)
    with pytest.raises(ValueError, match="clip_search=True needs calibration"):
        Int8Linear.from_linear(lin, clip_search=True)
    with pytest.raises(ValueError, match="pass clip_search=True"):
        Int8Linear.from_linear(lin, calibration=X)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("group", [None, 32])
def test_gradients_flow_to_input_and_bias_only(dtype, group):
    m, _ = _module(group=group, dtype=dtype)
    x = torch.randn(5, 96, dtype=dtype, requires_grad=True)
    dy = torch.randn(5, 29, dtype=dtype)
    m(x).backward(dy)
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = m.bias.detach().clone().requires_grad_(True)
    _reference(x_ref, m.qweight, m.scales, b_ref).backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(m.bias.grad, b_ref.grad)
    assert m.qweight.grad is None and m.scales.grad is None
    assert not m.qweight.requires_grad and not m.scales.requires_grad
    assert all(p is m.bias for p in m.parameters())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    q_before, b_before = m.qweight.clone(), m.bias.detach().clone()
    opt.step()
    assert torch.equal(m.qweight, q_before) and not torch.equal(m.bias.detach(), b_before)


# ---------------------------------------------------------------------------------------------
# Conversion, state_dict, devices and dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("bias", [True, False])
def test_dequantize_to_linear(dtype, bias):
    m, _ = _module(bias=bias, group=32, dtype=dtype)
    m.eval()
    lin = m.dequantize()
    assert type(lin) is nn.Linear
    assert lin.weight.dtype == dtype and lin.weight.device == m.qweight.device
    assert (lin.in_features, lin.out_features) == (96, 29)
    assert torch.equal(lin.weight.detach(), dequantize(m.qweight, m.scales))
    assert (lin.bias is None) == (not bias)
    if bias:
        assert torch.equal(lin.bias.detach(), m.bias.detach())
        assert lin.bias.data_ptr() != m.bias.data_ptr()
    assert not lin.training
    x = torch.randn(4, 96, dtype=dtype)
    torch.testing.assert_close(lin(x), m(x), rtol=0, atol=0)


def test_from_quantized():
    q, s = quantize(torch.randn(8, 64), 32, scale_dtype=BF16)
    b = torch.randn(8, dtype=BF16)
    m = Int8Linear.from_quantized(q, s, b, backend="torch")
    assert (m.in_features, m.out_features, m.group_size, m.dtype) == (64, 8, 32, BF16)
    assert torch.equal(m.qweight, q) and torch.equal(m.scales, s) and m.backend == "torch"
    assert m.qweight.data_ptr() != q.data_ptr()
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        Int8Linear.from_quantized(q, s, torch.zeros(9, dtype=BF16))
    with pytest.raises(ValueError, match="scales' dtype must be"):
        Int8Linear.from_quantized(q, s.double())
    with pytest.raises(TypeError, match="qweight must be int8"):
        Int8Linear.from_quantized(q.to(torch.int16), s)


@pytest.mark.parametrize("group", [None, 64])
def test_state_dict_round_trip(group):
    m, _ = _module(in_f=128, out_f=12, group=group, dtype=BF16)
    sd = m.state_dict()
    assert set(sd) == {"qweight", "scales", "bias"}
    assert sd["qweight"].dtype == torch.int8 and sd["scales"].dtype == BF16
    fresh = Int8Linear(128, 12, group_size=group, dtype=BF16)
    fresh.load_state_dict(sd)
    fresh.backend = "torch"
    for name in ("qweight", "scales", "bias"):
        assert torch.equal(getattr(fresh, name), getattr(m, name))
    x = torch.randn(3, 128, dtype=BF16)
    assert torch.equal(fresh(x), m(x))
    other = Int8Linear(128, 12, group_size=32 if group else 64, dtype=BF16)
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(sd)


def test_safetensors_round_trip(tmp_path):
    import safetensors.torch as st  # a real dependency (setup.py): this test always runs

    model = nn.Sequential(Int8Linear(64, 32, group_size=32), nn.ReLU(), Int8Linear(32, 8))
    for layer in (model[0], model[2]):
        src = nn.Linear(layer.in_features, layer.out_features, dtype=BF16)
        layer.load_state_dict(Int8Linear.from_linear(src, layer.group_size or None).state_dict())
        layer.backend = "torch"
    path = tmp_path / "int8.safetensors"
    st.save_file(model.state_dict(), str(path))
    loaded = st.load_file(str(path))
    assert loaded["0.qweight"].dtype == torch.int8 and loaded["0.scales"].dtype == BF16
    fresh = nn.Sequential(Int8Linear(64, 32, group_size=32), nn.ReLU(), Int8Linear(32, 8))
    fresh.load_state_dict(loaded)
    for layer in (fresh[0], fresh[2]):
        layer.backend = "torch"
    x = torch.randn(4, 64, dtype=BF16)
    assert torch.equal(fresh(x), model(x))


def test_dtype_conversion_with_to():
    m, lin = _module(group=32, dtype=BF16)
    q, s = m.qweight.clone(), m.scales.clone()
    m32 = m.to(torch.float32)
    assert m32 is m
    assert m.qweight.dtype == torch.int8 and torch.equal(m.qweight, q)
    assert m.scales.dtype == F32 and torch.equal(m.scales, s.float())  # exact widening
    assert m.bias.dtype == F32 and m.dtype == F32
    assert "torch.float32" in repr(m)
    x = torch.randn(6, 96, dtype=F32)
    torch.testing.assert_close(m(x), _reference(x, q, s.float(), m.bias), rtol=0, atol=0)
    with pytest.raises(TypeError, match="scales must have x's dtype"):
        m(x.to(BF16))
    m.half()
    assert m.scales.dtype == F16 and m.qweight.dtype == torch.int8


def test_to_device_moves_buffers():
    m = Int8Linear(64, 8, group_size=32)
    m.to("meta")
    assert m.qweight.device.type == "meta" and m.scales.device.type == "meta"
    assert m.qweight.dtype == torch.int8
    m.to_empty(device="cpu")
    assert m.qweight.device.type == "cpu"


def test_forward_checks_are_clear():
    m = Int8Linear(64, 8, dtype=F32)
    m.backend = "torch"
    with pytest.raises(ValueError, match="last dimension must be 64"):
        m(torch.randn(3, 32))
    m.backend = "no-such-backend"
    with pytest.raises((ValueError, RuntimeError)):
        m(torch.randn(3, 64))


# ---------------------------------------------------------------------------------------------
# quantize_linears
# ---------------------------------------------------------------------------------------------


class ToyMLP(nn.Module):
    def __init__(self, dtype=F32):
        super().__init__()
        self.up = nn.Linear(64, 128, dtype=dtype)
        self.mid = nn.Linear(128, 96, dtype=dtype)
        self.down = nn.Linear(96, 40, dtype=dtype)
        self.head = nn.Linear(40, 10, bias=False, dtype=dtype)

    def forward(self, x):
        return self.head(F.relu(self.down(F.relu(self.mid(F.relu(self.up(x)))))))


def _bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_quantize_linears_toy_mlp_report_and_accuracy():
    model = ToyMLP().eval()
    x = torch.randn(32, 64)
    with torch.no_grad():
        y_ref = model(x)
    before = _bytes(model)
    report = quantize_linears(model, group_size=64, include=r"up|mid|down", backend="torch")
    assert isinstance(report, QuantizeReport)
    assert [row.name for row in report.layers] == ["up", "mid", "down"]  # head: not included
    assert [row.name for row in report.quantized] == ["up", "mid"]
    (skipped,) = report.skipped
    assert (
        skipped.name == "down"
        and "in_features 96 is not divisible by group_size 64" in skipped.skipped
    )
    assert skipped.bytes_after == skipped.bytes_before == (96 * 40 + 40) * 4
    assert isinstance(model.up, Int8Linear) and isinstance(model.mid, Int8Linear)
    assert type(model.down) is nn.Linear and type(model.head) is nn.Linear
    assert model.up.group_size == 64 and model.up.dtype == F32 and model.up.backend == "torch"
    up = report.layers[0]
    assert isinstance(up, Int8LayerReport)
    assert (up.in_features, up.out_features, up.group_size) == (64, 128, 64)
    assert up.bytes_before == (64 * 128 + 128) * 4
    assert up.bytes_after == 64 * 128 + 128 * 1 * 4 + 128 * 4
    assert report.bytes_before == before and report.bytes_after == _bytes(model)
    saved = sum(r.bytes_before - r.bytes_after for r in report.layers)
    assert report.bytes_before - report.bytes_after == saved > 0
    assert report.compression == pytest.approx(report.bytes_after / report.bytes_before)
    assert up.relative_error is None and not report.calibrated
    text = str(report)
    for part in ["up", "mid", "down", "skipped: in_features 96", f"{report.bytes_before:,}"]:
        assert part in text
    with torch.no_grad():
        y = model(x)
    assert _rel(y, y_ref) < 0.01


def test_quantize_linears_per_channel_bf16_and_exclude():
    model = ToyMLP(dtype=BF16).eval()
    x = torch.randn(16, 64, dtype=BF16)
    with torch.no_grad():
        y_ref = model(x)
    report = quantize_linears(model, exclude=lambda name: name == "head", backend="torch")
    assert [row.name for row in report.quantized] == ["up", "mid", "down"]
    assert model.down.dtype == BF16 and model.down.group_size == 0
    assert type(model.head) is nn.Linear
    with torch.no_grad():
        assert _rel(model(x), y_ref) < 0.03  # bf16 activations: rounding dominates


def test_quantize_linears_calibration_and_clip_search():
    torch.manual_seed(0)
    model = ToyMLP().eval()
    batches = [torch.randn(16, 64) for _ in range(4)]
    x = torch.cat(batches)
    with torch.no_grad():
        y_ref = model(x)
    calls = []

    def forward_fn(m, batch):
        calls.append(batch.shape)
        return m(batch)

    plain = ToyMLP().eval()
    plain.load_state_dict(model.state_dict())
    quantize_linears(plain, group_size=32, backend="torch")
    report = quantize_linears(
        model,
        group_size=32,
        calibration_batches=batches,
        forward_fn=forward_fn,
        clip_search=True,
        backend="torch",
    )
    assert len(calls) == 4 and report.calibrated and report.clip_search
    assert _all_hooks_removed(model)
    assert [row.name for row in report.quantized] == ["up", "mid", "down"]  # head: in=40
    for row in report.quantized:
        assert row.relative_error is not None and 0 < row.relative_error < 0.01
        assert 0.7 <= row.clip_ratio <= 1.0
    with torch.no_grad():
        y, y_plain = model(x), plain(x)
    assert _rel(y, y_ref) < 0.01
    assert _rel(y, y_ref) <= _rel(y_plain, y_ref) * 1.5
    assert "calibrated, clip search" in str(report)


def test_quantize_linears_hooks_removed_when_forward_raises():
    model = ToyMLP()

    def bad_forward(m, batch):
        m(batch)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        quantize_linears(model, calibration_batches=[torch.randn(2, 64)], forward_fn=bad_forward)
    assert _all_hooks_removed(model)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())


def test_quantize_linears_skips_tied_and_float64_converts_mha_out_proj():
    emb = nn.Embedding(10, 32)
    head = nn.Linear(32, 10, bias=False)
    head.weight = emb.weight  # tied
    mha = nn.MultiheadAttention(32, 4)
    model = nn.ModuleDict(
        {"emb": emb, "head": head, "mha": mha, "f64": nn.Linear(32, 32, dtype=F64)}
    )
    report = quantize_linears(model)
    reasons = {row.name: row.skipped for row in report.layers}
    assert "tied" in reasons["head"]
    assert "torch.float64" in reasons["f64"] and "dtype=" in reasons["f64"]
    assert [row.name for row in report.quantized] == ["mha.out_proj"]  # MHA reads .weight
    assert isinstance(mha.out_proj, Int8Linear) and model["head"] is head
    report = quantize_linears(model, include="f64", dtype=F32)
    assert isinstance(model["f64"], Int8Linear) and model["f64"].dtype == F32


def test_quantize_linears_shared_module_replaced_everywhere():
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = quantize_linears(model)
    assert [row.name for row in report.layers] == ["0"]
    assert isinstance(model[0], Int8Linear) and model[0] is model[2]


def test_quantize_linears_argument_errors():
    model = ToyMLP()
    with pytest.raises(ValueError, match="clip_search=True needs calibration_batches"):
        quantize_linears(model, clip_search=True)
    with pytest.raises(ValueError, match="group_size must be"):
        quantize_linears(model, group_size=48)
    with pytest.raises(ValueError, match="include is not a valid regular expression"):
        quantize_linears(model, include="(")
    with pytest.raises(ValueError, match="exclude must be a callable"):
        quantize_linears(model, exclude=3)
    with pytest.raises(ValueError, match="dtype must be"):
        quantize_linears(model, dtype=F64)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert re.search("up", "up")  # the name filters use re.search semantics


# ---------------------------------------------------------------------------------------------
# Layout 2 (packed weights)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [None, 32])
def test_packed_module_forward_pack_unpack(group):
    lin = nn.Linear(96, 29, dtype=F32)
    plain = Int8Linear.from_linear(lin, group, layout=1)
    packed = Int8Linear.from_linear(lin, group, layout=2)
    assert plain.layout == 1 and packed.layout == 2 and "layout=2" in repr(packed)
    assert packed.qweight.shape == (1, 6, 512)
    assert packed.memory_bytes == 32 * 96 + plain.memory_bytes - 29 * 96  # rows padded to 32
    for m in (plain, packed):
        m.backend = "torch"
    x = torch.randn(5, 96)
    assert torch.equal(packed(x), plain(x))
    assert torch.equal(packed.dequantize().weight, plain.dequantize().weight)
    assert packed.unpack() is packed and packed.layout == 1
    assert torch.equal(packed.qweight, plain.qweight) and torch.equal(packed.scales, plain.scales)
    assert packed.pack().layout == 2 and torch.equal(packed(x), plain(x))
    with pytest.raises(ValueError, match="in_features % 16 == 0, got 45"):
        Int8Linear(45, 8, layout=2)
    with pytest.raises(ValueError, match="in_features % 16 == 0, got 45"):
        Int8Linear(45, 8).pack()
    # CPU default: layout 1 (packing pays off on CUDA, where .to("cuda") packs).
    assert Int8Linear.from_linear(lin, group).layout == 1
    # An explicitly packed module stays packed through CPU-side conversions; arriving on the CPU
    # from another device unpacks it (the cpu kernels read layout 1). meta -> cpu stands in for
    # cuda -> cpu here (to_empty: the values are not the point, the layout is).
    packed.pack()
    assert packed.float().layout == 2 and packed.to("cpu").layout == 2
    moved = packed.to("meta")
    assert moved.layout == 2 and moved.qweight.is_meta
    assert moved.to_empty(device="cpu").layout == 1 and moved.qweight.shape == (29, 96)


@pytest.mark.parametrize("group", [None, 64])
def test_packed_state_dict_is_portable_layout_1(group, tmp_path):
    src = Int8Linear.from_linear(nn.Linear(128, 40, dtype=BF16), group, layout=2)
    sd = src.state_dict()
    assert sd["qweight"].shape == (40, 128) and sd["scales"].is_contiguous()
    plain = Int8Linear.from_linear(nn.Linear(128, 40, dtype=BF16), group, layout=1)
    plain.load_state_dict(sd)  # packed module -> plain module
    assert plain.layout == 1
    packed = Int8Linear(128, 40, group_size=group, dtype=BF16, layout=2)
    packed.load_state_dict(plain.state_dict())  # layout-1 checkpoint -> packed module
    assert packed.layout == 2 and torch.equal(packed.qweight, src.qweight)
    packed.load_state_dict({k: v for k, v in src.named_buffers()} | {"bias": src.bias})
    assert torch.equal(packed.qweight, src.qweight)  # packed tensors load as they are
    plain.load_state_dict({k: v for k, v in src.named_buffers()} | {"bias": src.bias})
    assert plain.layout == 1 and torch.equal(plain.qweight, sd["qweight"])
    if group:
        assert packed.scales.stride() == (1, 40)  # group-major, as the kernels stream them
    for m in (src, plain, packed):
        m.backend = "torch"
    x = torch.randn(3, 128, dtype=BF16)
    assert torch.equal(packed(x), src(x)) and torch.equal(plain(x), src(x))
    st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "packed.safetensors"
    st.save_file(src.state_dict(), str(path))  # contiguous layout-1 tensors: saves as is
    fresh = Int8Linear(128, 40, group_size=group, dtype=BF16, layout=2)
    fresh.load_state_dict(st.load_file(str(path)))
    fresh.backend = "torch"
    assert torch.equal(fresh(x), src(x))
