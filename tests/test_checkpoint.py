"""Compressed checkpoints (lrkernels/nn/checkpoint.py): a converted model saved with its plan
loads into a freshly built dense model in one call — data-dependent ranks, skipped layers,
group sizes and scale dtypes included — without calibration data or SVD; the plan format is
versioned and extensible by kind."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lrkernels
from lrkernels.nn import (
    Int8Linear,
    LowRankLinear,
    apply_plan,
    compression_plan,
    factorize_linears,
    load_compressed,
    quantize_linears,
    read_plan,
    register_plan_kind,
    save_compressed,
)
from lrkernels.nn.checkpoint import PLAN_VERSION


class Block(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(40, 32)
        self.up = nn.Linear(32, 96)
        self.down = nn.Linear(96, 32)
        self.gate = nn.Linear(32, 32, bias=False)
        self.head = nn.Linear(32, 40, bias=False)
        self.head.weight = self.emb.weight  # tied: skipped by the converters

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.down(torch.relu(self.up(h))) * torch.sigmoid(self.gate(h))
        return self.head(h)


def _batches(n=3):
    return [torch.randint(0, 40, (4, 9)) for _ in range(n)]


def _convert(model):
    """Data-dependent ranks (energy on calibrated spectra) and int8 on what is left."""
    report = factorize_linears(
        model, energy=0.8, calibration_batches=_batches(), include="up|down|head"
    )
    assert "tied" in report.layers[-1].skipped
    quantize_linears(model, group_size=32, include="gate")


def test_round_trip_into_a_fresh_dense_model(tmp_path, monkeypatch):
    model = _convert_and_return(Block())
    plan = compression_plan(model)
    json.dumps(plan)  # JSON-able as is
    assert plan["version"] == PLAN_VERSION and plan["format"] == "lrkernels.plan"
    assert set(plan["layers"]) == {"up", "down", "gate"}  # head is tied: skipped, dense
    assert plan["layers"]["up"]["kind"] == "lowrank" and plan["layers"]["up"]["rank"] >= 1
    assert plan["layers"]["gate"] == {
        "kind": "int8", "in_features": 32, "out_features": 32, "group_size": 32,
        "dtype": "float32", "bias": False, "layout": 1,
    }  # fmt: skip
    path = tmp_path / "model.safetensors"
    assert save_compressed(model, path, metadata={"note": "test"}) == plan

    # Loading needs no calibration and no factorisation.
    def forbidden(*args, **kwargs):
        raise AssertionError("load_compressed must not recompute anything")

    monkeypatch.setattr(lrkernels.nn.lowrank, "factorize_weight", forbidden)
    monkeypatch.setattr(lrkernels.nn.int8, "quantize", forbidden)
    fresh = Block(seed=1)  # different random weights, same architecture
    assert load_compressed(fresh, path) == plan
    assert isinstance(fresh.up, LowRankLinear) and isinstance(fresh.gate, Int8Linear)
    assert fresh.up.rank == model.up.rank and fresh.down.rank == model.down.rank
    assert isinstance(fresh.head, nn.Linear) and fresh.head.weight is fresh.emb.weight  # still tied
    for (name, a), (_, b) in zip(
        model.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 40, (2, 7))
    assert torch.equal(fresh(ids), model(ids))
    # The file is plain safetensors: tensors + the plan in the metadata.
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert meta["note"] == "test" and json.loads(meta["lrkernels.plan"]) == plan
        assert f.get_tensor("gate.qweight").dtype == torch.int8


def _convert_and_return(model):
    _convert(model)
    return model


def test_load_into_an_already_converted_model_and_shared_modules(tmp_path):
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(32, 8))
    factorize_linears(model, rank=4)
    path = tmp_path / "m.safetensors"
    save_compressed(model, path)
    assert list(read_plan(path)["layers"]) == ["0", "3"]
    shared2 = nn.Linear(32, 32)
    fresh = nn.Sequential(shared2, nn.ReLU(), shared2, nn.Linear(32, 8))
    load_compressed(fresh, path)
    assert isinstance(fresh[0], LowRankLinear) and fresh[0] is fresh[2]
    x = torch.randn(3, 32)
    assert torch.equal(fresh(x), model(x))
    load_compressed(fresh, path)  # idempotent: the layers already match the plan


def test_int8_scale_dtype_is_the_checkpoints(tmp_path):
    model = nn.Sequential(nn.Linear(64, 16))
    quantize_linears(model, group_size=64, dtype=torch.bfloat16)
    path = tmp_path / "q.safetensors"
    save_compressed(model, path)
    fresh = nn.Sequential(nn.Linear(64, 16))  # float32
    load_compressed(fresh, path)
    assert fresh[0].scales.dtype == torch.bfloat16 and fresh[0].bias.dtype == torch.bfloat16
    assert torch.equal(fresh[0].scales, model[0].scales)


def test_int8_load_state_dict_adopts_float32_scales():
    src = Int8Linear.from_linear(nn.Linear(64, 16), group_size=32)  # float32 scales
    sd = src.state_dict()
    dst = Int8Linear(64, 16, group_size=32, dtype=torch.bfloat16)
    bias_param = dst.bias
    dst.load_state_dict(sd)
    assert dst.scales.dtype == torch.float32 and torch.equal(dst.scales, src.scales)  # no rounding
    assert dst.bias is bias_param and dst.bias.dtype == torch.float32  # same Parameter object
    x = torch.randn(3, 64)
    assert torch.equal(dst(x), src(x))  # a float32 forward works
    bad = dict(sd, scales=sd["scales"].double())
    with pytest.raises(RuntimeError, match="dtype torch.float64 is not an activation dtype"):
        dst.load_state_dict(bad)


def test_errors_are_clear(tmp_path):
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8))
    factorize_linears(model, rank=4)
    path = tmp_path / "m.safetensors"
    save_compressed(model, path)
    with pytest.raises(ValueError, match=r"layer '0'.*\(32, 16, True\), the plan \(32, 32, True\)"):
        load_compressed(nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 8)), path)
    with pytest.raises(ValueError, match="has no module '1'"):
        load_compressed(nn.Sequential(nn.Linear(32, 32)), path)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="holds no lrkernels plan"):
        read_plan(plain)
    plan = compression_plan(model)
    with pytest.raises(ValueError, match="newer lrkernels"):
        apply_plan(nn.Sequential(nn.Linear(32, 32)), dict(plan, version=PLAN_VERSION + 1))
    with pytest.raises(ValueError, match="kind 'dora', which this lrkernels does not know"):
        apply_plan(
            nn.Sequential(nn.Linear(32, 32)),
            dict(plan, layers={"0": {"kind": "dora", "rank": 8}}),
        )
    with pytest.raises(ValueError, match="'lora' entry lacks the field 'in_features'"):
        apply_plan(
            nn.Sequential(nn.Linear(32, 32)),
            dict(plan, layers={"0": {"kind": "lora", "rank": 8}}),
        )
    with pytest.raises(ValueError, match="reserved"):
        save_compressed(model, path, metadata={"lrkernels.plan": "x"})


def test_a_new_kind_plugs_in(tmp_path):
    """How the LoRA family adds its entries: describe + build, nested base entries allowed."""

    class Scaled(nn.Module):
        def __init__(self, base: nn.Module, alpha: float):
            super().__init__()
            self.base, self.alpha = base, alpha

        def forward(self, x):
            return self.alpha * self.base(x)

    def describe(m):
        return {"alpha": m.alpha, "base": compression_plan(nn.ModuleDict({"b": m.base}))["layers"]}

    def build(linear, entry):
        base = linear
        if "b" in entry["base"]:
            base = lrkernels.nn.checkpoint.build_layer(linear, entry["base"]["b"])
        return Scaled(base, entry["alpha"])

    register_plan_kind("scaled-test", Scaled, describe, build)
    try:
        model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
        quantize_linears(model, include="0")
        model[0] = Scaled(model[0], 0.5)
        model[1] = Scaled(model[1], 2.0)
        path = tmp_path / "s.safetensors"
        plan = save_compressed(model, path)
        assert (
            plan["layers"]["0"]["base"]["b"]["kind"] == "int8" and not plan["layers"]["1"]["base"]
        )
        fresh = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
        load_compressed(fresh, path)
        assert isinstance(fresh[0].base, Int8Linear) and isinstance(fresh[1].base, nn.Linear)
        x = torch.randn(2, 32)
        assert torch.equal(fresh(x), model(x))
    finally:
        lrkernels.nn.checkpoint._KINDS.pop("scaled-test")


@pytest.mark.parametrize("int8_base", [False, True])
def test_lora_model_round_trip(tmp_path, int8_base):
    """A LoRA model (adapters trained a step, on a dense or an int8 base) reloads into a fresh
    dense model in one call, dropout and scaling included; a merged layer is refused."""
    model = Block()
    if int8_base:
        quantize_linears(model, include="up|down")
    lrkernels.nn.add_lora(model, r=4, alpha=8.0, dropout=0.1, target="up|down")
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(0.01 * torch.randn_like(p))  # B starts at zero: make the adapter count
    plan = compression_plan(model)
    entry = plan["layers"]["up"]
    assert entry["kind"] == "lora" and entry["r"] == 4 and entry["alpha"] == 8.0
    assert entry["base"]["kind"] == ("int8" if int8_base else "dense")
    path = tmp_path / "lora.safetensors"
    save_compressed(model, path)
    fresh = Block(seed=3)
    load_compressed(fresh, path)
    assert isinstance(fresh.up, lrkernels.nn.LoRALinear) and fresh.up.dropout == 0.1
    assert isinstance(fresh.up.base, Int8Linear if int8_base else nn.Linear)
    if not int8_base:
        assert not fresh.up.base.weight.requires_grad  # the base stays frozen
    model.eval(), fresh.eval()
    ids = torch.randint(0, 40, (2, 7))
    assert torch.equal(fresh(ids), model(ids))
    model.up.merge()
    with pytest.raises(ValueError, match="merged"):
        compression_plan(model)
