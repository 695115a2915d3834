"""LoRA modules: LoRALinear over dense and int8 bases, add_lora, merge / unmerge, adapter-only
save / load, PEFT interop (against PEFT itself), multi-adapter serving, and a real fine-tune."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import lrkernels
from lrkernels.nn import (
    Int8Linear,
    LoRALinear,
    MultiLoRALinear,
    add_lora,
    load_lora,
    load_peft_adapter,
    lora_layers,
    lora_state_dict,
    save_lora,
    save_peft_adapter,
)


class Tiny(nn.Module):
    """Two blocks of Linear layers with distinct names (like attention/MLP projections)."""

    def __init__(self, d=32, h=48, out=5, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Linear(8, d, dtype=dtype)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "q_proj": nn.Linear(d, d, dtype=dtype),
                    "v_proj": nn.Linear(d, d, bias=False, dtype=dtype),
                    "up": nn.Linear(d, h, dtype=dtype),
                    "down": nn.Linear(h, d, dtype=dtype),
                }
            )
            for _ in range(2)
        )
        self.head = nn.Linear(d, out, dtype=dtype)

    def forward(self, x):
        x = self.embed(x)
        for blk in self.blocks:
            x = x + blk["v_proj"](torch.tanh(blk["q_proj"](x)))
            x = x + blk["down"](torch.relu(blk["up"](x)))
        return self.head(x)


def randomize_adapters(model, std=0.3):
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, std)


# ------------------------------------------------------------------------------ LoRALinear


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_linear_module_dense(rslora):
    base = nn.Linear(24, 10)
    layer = LoRALinear(base, r=4, alpha=8, rslora=rslora)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), base(x))  # B = 0 at init
    randomize_adapters(layer)
    s = 8 / (2.0 if rslora else 4)
    want = base(x) + s * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    assert layer.scale == s


@pytest.mark.parametrize("layout", [1, 2])
def test_lora_linear_module_int8(layout):
    lin = nn.Linear(64, 16)
    base = Int8Linear.from_linear(lin, group_size=32, dtype=torch.float32, layout=layout)
    assert base.layout == layout
    layer = LoRALinear(base, r=3, alpha=3)
    randomize_adapters(layer)
    x = torch.randn(5, 64)
    want = base(x) + (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and base.bias.grad is None


def test_dropout_only_in_training():
    layer = LoRALinear(nn.Linear(32, 8), r=4, alpha=4, dropout=0.5)
    randomize_adapters(layer)
    x = torch.randn(6, 32)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("kind", ["dense", "int8", "int8-packed"])
def test_merge_unmerge(kind):
    lin = nn.Linear(64, 24)
    layout = 2 if kind == "int8-packed" else 1
    kind = kind[:4]
    base = (
        Int8Linear.from_linear(lin, group_size=64, dtype=torch.float32, layout=layout)
        if kind == "int8"
        else lin
    )
    layer = LoRALinear(base, r=4, alpha=4)
    randomize_adapters(layer, std=0.05)
    x = torch.randn(7, 64)
    before = layer(x)
    if kind == "int8":
        q0, s0 = base.qweight.clone(), base.scales.clone()
    else:
        w0 = base.weight.detach().clone()
    layer.merge()
    assert layer.merged
    merged = layer(x)
    if kind == "int8":  # re-quantized: within int8 error of the unmerged outputs
        assert (merged - before).norm() / before.norm() < 2e-2
        assert not torch.equal(base.qweight, q0)
    else:
        torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)
    if kind == "int8":  # merged in the base's own layout; the state_dict holds layout 1
        assert base.layout == layout and base.state_dict()["qweight"].dim() == 2
    layer.unmerge()
    if kind == "int8":
        assert torch.equal(base.qweight, q0) and torch.equal(base.scales, s0)  # exactly
    else:
        torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------- add_lora


def test_add_lora_report_and_target():
    model = Tiny()
    report = add_lora(model, r=4, alpha=8, target=r"(q_proj|v_proj)$")
    assert [row.name for row in report.layers] == [
        "blocks.0.q_proj",
        "blocks.0.v_proj",
        "blocks.1.q_proj",
        "blocks.1.v_proj",
    ]
    assert all(isinstance(m, LoRALinear) for m in lora_layers(model).values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{r.name}.lora_{w}" for r in report.layers for w in "AB"}
    assert report.trainable_params == sum(r.params for r in report.layers) == 4 * 2 * 4 * 32
    assert "4 of 4 selected layers adapted" in str(report)


def test_add_lora_warns_when_nothing_selected():
    with pytest.warns(UserWarning, match="selects no linear layer"):
        add_lora(Tiny(), r=2, alpha=2, target="nothing_here")


def test_add_lora_over_int8_and_mha():
    model = nn.ModuleDict({"mha": nn.MultiheadAttention(16, 2), "lin": nn.Linear(16, 16)})
    lrkernels.nn.quantize_linears(model, include="lin", dtype=torch.float32)
    report = add_lora(model, r=2, alpha=2)
    rows = {r.name: r for r in report.layers}
    assert rows["lin"].base == "int8" and rows["lin"].skipped is None
    assert "MultiheadAttention" in rows["mha.out_proj"].skipped


# ------------------------------------------------------------------------------ save / load


def test_save_load_adapters_safetensors(tmp_path):
    model = Tiny()
    add_lora(model, r=4, alpha=8, target="proj")
    randomize_adapters(model)
    state = lora_state_dict(model)
    assert set(state) == {
        f"blocks.{i}.{p}_proj.lora_{w}" for i in (0, 1) for p in "qv" for w in "AB"
    }
    save_lora(model, tmp_path / "a.safetensors")
    fresh = Tiny()
    fresh.load_state_dict(_plain_state(model))
    add_lora(fresh, r=4, alpha=8, target="proj")
    load_lora(fresh, tmp_path / "a.safetensors")
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh(x), model(x))
    # A model without matching layers is an error, naming what is missing.
    wrong = Tiny()
    add_lora(wrong, r=4, alpha=8, target="q_proj")
    with pytest.raises(ValueError, match="unexpected"):
        load_lora(wrong, tmp_path / "a.safetensors")


def _plain_state(model):
    """A LoRA model's base weights under the plain model's names."""
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            continue
        out[k.replace(".base.", ".")] = v
    return out


def _peft_model(model, **cfg):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LoraConfig(**cfg))


@pytest.mark.parametrize("rslora", [False, True])
def test_load_adapter_written_by_peft(tmp_path, rslora):
    torch.manual_seed(0)
    plain = Tiny()
    reference = Tiny()
    reference.load_state_dict(plain.state_dict())
    pm = _peft_model(
        reference,
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "up"],
        rank_pattern={"up": 2},
        alpha_pattern={"v_proj": 4},
        use_rslora=rslora,
        lora_dropout=0.1,
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(tmp_path)
    pm.eval()
    report = load_peft_adapter(plain, tmp_path)
    plain.eval()
    assert len(report.adapted) == 6
    layers = lora_layers(plain)
    assert layers["blocks.0.up"].r == 2 and layers["blocks.0.v_proj"].alpha == 4
    assert layers["blocks.1.q_proj"].dropout == pytest.approx(0.1)
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), pm(x), rtol=1e-5, atol=1e-5)


def test_peft_loads_adapter_saved_here(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    model = Tiny()
    plain_state = model.state_dict()
    add_lora(model, r=4, alpha=8, target=r"(q_proj|down)$", rslora=True)
    layers = lora_layers(model)
    layers["blocks.1.down"].alpha = 3.0  # per-layer alpha -> alpha_pattern
    randomize_adapters(model)
    save_peft_adapter(model, tmp_path)
    config = json.load(open(os.path.join(tmp_path, "adapter_config.json")))
    assert config["peft_type"] == "LORA" and config["use_rslora"] is True
    fresh = Tiny()
    fresh.load_state_dict(plain_state)
    pm = peft.PeftModel.from_pretrained(fresh, tmp_path)
    pm.eval()
    model.eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [1, 2])
def test_peft_interop_int8_base(tmp_path, layout):
    """A PEFT adapter trained on the dense model, loaded onto its int8-quantized copy (plain or
    packed): the outputs equal PEFT's on the same int8 weights (dequantized)."""
    torch.manual_seed(2)
    plain = Tiny()
    twin = Tiny()
    twin.load_state_dict(plain.state_dict())
    pm = _peft_model(twin, r=4, lora_alpha=4, target_modules=["up", "down"])
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(tmp_path)
    lrkernels.nn.quantize_linears(plain, group_size=None, include=r"(up|down)$")
    if layout == 2:
        for m in plain.modules():
            if isinstance(m, Int8Linear):
                m.pack()
    load_peft_adapter(plain, tmp_path)
    x = torch.randn(3, 8)
    with torch.no_grad():
        ours = plain(x)
        # PEFT on the same int8 weights, dequantized into its dense base layers.
        for blk_q, blk_p in zip(plain.blocks, pm.base_model.model.blocks, strict=True):
            for name in ("up", "down"):
                blk_p[name].base_layer.weight.copy_(blk_q[name].base.dequantize().weight)
        theirs = pm(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_load_peft_rejects_unsupported(tmp_path):
    pm = _peft_model(Tiny(), r=2, lora_alpha=2, target_modules=["up"], use_dora=True)
    pm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="use_dora"):
        load_peft_adapter(Tiny(), tmp_path)


# ------------------------------------------------------------------------- multi-adapter


@pytest.mark.parametrize("kind", ["dense", "int8", "int8-packed"])
def test_multi_lora_module_equals_each_adapter(kind):
    torch.manual_seed(3)
    lin = nn.Linear(64, 24)
    layout = 2 if kind == "int8-packed" else 1
    base = (
        Int8Linear.from_linear(lin, group_size=32, dtype=torch.float32, layout=layout)
        if kind.startswith("int8")
        else lin
    )
    adapters = []
    for r in (2, 4, 3):
        layer = LoRALinear(base, r=r, alpha=2 * r)
        randomize_adapters(layer)
        adapters.append(layer)
    multi = MultiLoRALinear(base, n_adapters=4, r_max=4)  # slot 3 stays empty (rank 0)
    for i, layer in enumerate(adapters):
        multi.load_from(i, layer)
    x = torch.randn(10, 64)
    idx = torch.tensor([0, 1, 2, -1, 3, 2, 1, 0, -1, 1], dtype=torch.int32)
    with torch.no_grad():
        out = multi(x, idx)
        for m in range(10):
            a = int(idx[m])
            want = adapters[a](x[m : m + 1]) if 0 <= a < 3 else base(x[m : m + 1])
            torch.testing.assert_close(out[m : m + 1], want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- fine-tune


def test_finetune_lowers_loss_and_merge_matches():
    """LoRA on a frozen random model learns a toy regression task; the merged model equals the
    unmerged one; an adapter batch served through MultiLoRALinear equals per-row runs."""
    torch.manual_seed(4)
    model = Tiny(out=4)
    teacher = Tiny(out=4)
    x = torch.randn(256, 8)
    with torch.no_grad():
        target = teacher(x)
    add_lora(model, r=4, alpha=8, target=r"(q_proj|v_proj|up|down)$", dropout=0.05)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    loss_fn = nn.MSELoss()
    with torch.no_grad():
        first = loss_fn(model.eval()(x), target).item()
    model.train()
    for _ in range(60):
        opt.zero_grad()
        loss_fn(model(x), target).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        last = loss_fn(model(x), target).item()
        assert last < 0.7 * first, (first, last)
        for n, p in model.named_parameters():
            if n in frozen:
                assert torch.equal(p, frozen[n]), f"{n} changed: the base must stay frozen"
        unmerged = model(x)
        for layer in lora_layers(model).values():
            layer.merge()
        torch.testing.assert_close(model(x), unmerged, rtol=1e-4, atol=1e-5)
        for layer in lora_layers(model).values():
            layer.unmerge()
        torch.testing.assert_close(model(x), unmerged, rtol=1e-4, atol=1e-5)


def test_compiled_lora_model_trains_fullgraph():
    """A model with LoRA layers (dense and int8 bases, dropout) compiles with fullgraph=True
    and its compiled training step gives the eager gradients for the same dropout seed."""
    torch.manual_seed(5)
    model = Tiny()
    lrkernels.nn.quantize_linears(model, include=r"up$", dtype=torch.float32)
    add_lora(model, r=4, alpha=8, target=r"(q_proj|up)$", dropout=0.1)
    randomize_adapters(model)
    x = torch.randn(6, 8)

    def step(m):
        torch.manual_seed(123)  # the dropout seed is drawn from torch's generator
        loss = m(x).square().mean()
        loss.backward()
        return loss.detach(), {
            n.removeprefix("_orig_mod."): p.grad.clone()
            for n, p in m.named_parameters()
            if p.grad is not None
        }

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c, grads_c = step(compiled)
    model.zero_grad()
    loss_e, grads_e = step(model)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and len(grads_c) == 8
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-4, atol=1e-6)
