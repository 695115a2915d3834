"""Converted layers keep working wherever an nn.Linear did: their ``.weight`` (a read-only view,
lrkernels/nn/_weight.py) answers probes from metadata, sends ``F.linear`` to our kernels and
everything else to the dense matrix; stock ``nn.TransformerEncoder`` (eval fast path and
training) and ``nn.MultiheadAttention`` (its ``out_proj`` included) run after
``factorize_linears`` and ``quantize_linears`` and match the dense model that has the
compressed weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrkernels
from lrkernels.nn import Int8Linear, LowRankLinear, factorize_linears, quantize_linears
from lrkernels.nn._weight import DenseWeightView
from lrkernels.reference import relative_error

F32 = torch.float32


def _lowrank(dtype=F32, requires_grad=True):
    layer = LowRankLinear.from_linear(nn.Linear(24, 40, dtype=dtype), rank=6)
    layer.U.requires_grad_(requires_grad)
    layer.V.requires_grad_(requires_grad)
    return layer


def _int8(dtype=F32):
    return Int8Linear.from_linear(nn.Linear(64, 40, dtype=dtype), group_size=32)


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


# ------------------------------------------------------------------------------- the view


@pytest.mark.parametrize("make", [_lowrank, _int8], ids=["lowrank", "int8"])
def test_weight_probes_answer_from_metadata(make):
    layer = make()
    w = layer.weight
    assert isinstance(w, DenseWeightView) and not isinstance(w, nn.Parameter)
    assert w.shape == (40, layer.in_features) and w.size(1) == layer.in_features
    assert w.dtype == F32 and w.device.type == "cpu" and w.ndim == 2 and w.dim() == 2
    assert w.numel() == 40 * layer.in_features and w.is_floating_point()
    assert w.requires_grad == isinstance(layer, LowRankLinear)  # int8 is frozen
    assert w.grad is None and w.is_leaf and "weight" in repr(w)
    # never part of the module's state
    assert "weight" not in layer.state_dict()
    assert "weight" not in dict(layer.named_parameters())
    assert "weight" not in dict(layer.named_buffers())


def test_weight_dense_uses_match_and_carry_gradients():
    layer = _lowrank()
    w = layer.weight
    dense = layer.U @ layer.V
    torch.testing.assert_close(w.T, dense.T, rtol=0, atol=0)
    torch.testing.assert_close(w * 2, dense * 2, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([w, w]), torch.cat([dense, dense]), rtol=0, atol=0)
    assert not w.detach().requires_grad and w.detach().shape == (40, 24)
    (w.square().sum() + w.data.sum()).backward()  # .data: a detached view
    torch.testing.assert_close(layer.U.grad, 2 * dense.detach() @ layer.V.detach().T)
    assert layer.V.grad is not None

    q = _int8()
    torch.testing.assert_close(q.weight.float(), lrkernels.quant.dequantize(q.qweight, q.scales))
    assert not (q.weight * 1).requires_grad


def test_f_linear_on_the_view_runs_the_kernel(monkeypatch):
    lr_calls = _count_calls(monkeypatch, lrkernels.ops.lowrank, "lowrank_linear")
    q_calls = _count_calls(monkeypatch, lrkernels.ops.int8, "int8_linear")
    layer, q = _lowrank(), _int8()
    x = torch.randn(5, 24, requires_grad=True)
    bias = torch.randn(40)
    y = F.linear(x, layer.weight, bias)
    torch.testing.assert_close(y, F.linear(x, layer.U @ layer.V, bias))
    y.sum().backward()
    assert lr_calls == ["lowrank_linear"] and layer.U.grad is not None and x.grad is not None
    x8 = torch.randn(3, 64)
    torch.testing.assert_close(F.linear(x8, q.weight), q(x8) - q.bias)
    assert q_calls == ["int8_linear", "int8_linear"]


@pytest.mark.parametrize("make", [_lowrank, _int8], ids=["lowrank", "int8"])
def test_weight_is_read_only(make):
    layer = make()
    writes = [
        lambda w: w.copy_(torch.zeros(w.shape)),
        lambda w: w.data.normal_(),
        lambda w: w.zero_(),
        lambda w: w.__setitem__(0, 1.0),
        lambda w: w.requires_grad_(False),
        lambda w: nn.init.xavier_uniform_(w),
        lambda w: torch.add(w, 1, out=w),
    ]
    for write in writes:
        with pytest.raises(RuntimeError, match="read-only view"):
            write(layer.weight)
    with pytest.raises(AttributeError, match="cannot be assigned"):
        layer.weight = nn.Parameter(torch.zeros(40, layer.in_features))


def test_weight_follows_to_and_dtype():
    layer = _lowrank().to(torch.float64)
    assert layer.weight.dtype == torch.float64
    q = _int8().to(torch.bfloat16)
    assert q.weight.dtype == torch.bfloat16 and q.weight.float().dtype == F32
    layer.to("meta")
    assert layer.weight.device.type == "meta"


@pytest.mark.slow
def test_weight_under_torch_compile():
    layer = _lowrank()

    def f(x):  # reads .weight inside the compiled region: the dense product is traced
        return F.linear(x, layer.weight) + layer.weight.sum() * (layer.weight.dtype == F32)

    x = torch.randn(4, 24)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


# ---------------------------------------------------------------------- stock torch modules


def _encoder(seed=0, layers=2, norm_first=False):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(
        64, 4, 128, dropout=0.0, batch_first=True, norm_first=norm_first
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def _dense_equivalent(model: nn.Module) -> nn.Module:
    """The converted model with every converted layer back to an nn.Linear holding the
    compressed weight: the yardstick for "within the compression's own error"."""
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, LowRankLinear | Int8Linear):
            new = module.to_linear() if isinstance(module, LowRankLinear) else module.dequantize()
            if "out_proj" in name:  # MHA keeps its own Linear subclass
                new.__class__ = nn.modules.linear.NonDynamicallyQuantizableLinear
            parent_name, _, attr = name.rpartition(".")
            setattr(dense.get_submodule(parent_name), attr, new)
    return dense


CONVERTERS = {
    "factorize": lambda m: factorize_linears(m, rank=24),
    "quantize": lambda m: quantize_linears(m, group_size=32),
}


@pytest.mark.parametrize("convert", list(CONVERTERS))
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_eval_and_train(convert, norm_first, monkeypatch):
    model = _encoder(norm_first=norm_first)
    original = copy.deepcopy(model)
    report = CONVERTERS[convert](model)
    converted = [
        r.name for r in (report.factorized if convert == "factorize" else report.quantized)
    ]
    assert sorted(converted) == sorted(
        f"layers.{i}.{n}" for i in range(2) for n in ("linear1", "linear2", "self_attn.out_proj")
    )
    dense = _dense_equivalent(model)
    x = torch.randn(3, 11, 64)
    kernel = "lowrank_linear" if convert == "factorize" else "int8_linear"
    calls = _count_calls(
        monkeypatch, lrkernels.ops.lowrank if convert == "factorize" else lrkernels.ops.int8, kernel
    )
    for mode in ("eval", "train"):
        model.train(mode == "train")
        dense.train(mode == "train")
        original.train(mode == "train")
        with torch.no_grad():  # eval + no_grad: where the fused fast path would run
            out = model(x)
            want = dense(x)
            base = original(x)
        assert relative_error(out, want) < 1e-5, mode
        # and the compression's own error, relative to the unconverted model, is small
        assert relative_error(out, base) < (0.5 if convert == "factorize" else 0.02), mode
    # linear1 and linear2 ran our kernels in both modes (the fast path stepped aside)
    assert len(calls) >= 2 * 2 * 2
    # training: gradients reach U/V (or the int8 layers' biases), not a frozen weight
    model.train()
    loss = model(x).square().mean()
    loss.backward()
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            assert module.U.grad is not None and module.V.grad is not None, name
        if isinstance(module, Int8Linear):
            assert module.bias.grad is not None and not module.qweight.requires_grad, name


@pytest.mark.parametrize("convert", list(CONVERTERS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_out_proj(convert, batch_first):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(64, 4, batch_first=batch_first)
    holder = nn.ModuleDict({"mha": mha})
    report = CONVERTERS[convert](holder)
    assert [r.name for r in report.layers] == ["mha.out_proj"] and not report.skipped
    assert isinstance(mha.out_proj, LowRankLinear | Int8Linear)
    dense = _dense_equivalent(holder)["mha"]
    x = torch.randn(5, 3, 64)
    batch, seq = (5, 3) if batch_first else (3, 5)
    mask = torch.rand(batch, seq) > 0.7
    mask[:, 0] = False  # no fully masked row
    for train in (True, False):
        mha.train(train)
        dense.train(train)
        out, weights = mha(x, x, x, key_padding_mask=mask)
        want, want_weights = dense(x, x, x, key_padding_mask=mask)
        assert relative_error(out.detach(), want.detach()) < 1e-5
        torch.testing.assert_close(weights, want_weights)
    out.square().sum().backward()
    if convert == "factorize":
        assert mha.out_proj.U.grad is not None and mha.in_proj_weight.grad is not None
    else:
        assert mha.out_proj.bias.grad is not None


def test_dtype_probe_and_to_on_converted_encoder():
    model = _encoder()
    factorize_linears(model, rank=16, include="linear1")
    quantize_linears(model, include="linear2")
    layer = model.layers[0]
    assert layer.linear1.weight.dtype == layer.linear2.weight.dtype == F32
    model.to(torch.float64)
    assert layer.linear1.weight.dtype == layer.linear2.weight.dtype == torch.float64
    model.to(F32)
    out = model(torch.randn(2, 5, 64))
    assert out.dtype == F32 and torch.isfinite(out).all()


def test_tied_weights_are_skipped_with_a_reason():
    emb = nn.Embedding(50, 32)
    head = nn.Linear(32, 50, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head, "fc": nn.Linear(32, 32)})
    for convert in (lambda m: factorize_linears(m, rank=4), lambda m: quantize_linears(m)):
        report = convert(model)
        reasons = {r.name: r.skipped for r in report.layers}
        assert "tied" in reasons["head"] and model["head"] is head
        assert model["head"].weight is emb.weight


def test_filters_that_select_nothing_warn():
    model = _encoder()
    with pytest.warns(UserWarning, match=r"include='mlp' selected none of the model's 6"):
        report = factorize_linears(model, rank=4, include="mlp")
    assert not report.layers
    with pytest.warns(UserWarning, match=r"exclude=.* selected none"):
        quantize_linears(model, exclude=lambda name: True)
    with pytest.warns(UserWarning, match="has no nn.Linear layer"):
        quantize_linears(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize("convert", ["factorize", "quantize"])
def test_calibration_errors_name_the_layer(convert):
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    batches = [torch.randn(4, 32), torch.randn(4, 20)]  # the second batch has the wrong width
    run = (
        (lambda: factorize_linears(model, rank=4, calibration_batches=batches))
        if convert == "factorize"
        else (lambda: quantize_linears(model, calibration_batches=batches))
    )
    with pytest.raises(
        ValueError, match=r"calibration batch 1 failed in layer '0'.*\(\.\.\., 32\)"
    ):
        run()
    assert all(isinstance(m, nn.Linear) for m in (model[0], model[2]))  # nothing replaced

    # a failure inside a layer, after its input was accepted (float64 into a float32 layer)
    with pytest.raises(RuntimeError, match="calibration batch 0 failed in layer '0'"):
        factorize_linears(model, rank=4, calibration_batches=[torch.randn(4, 32).double()])
