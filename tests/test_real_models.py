"""The first thing a user does, kept green: build a small real-world model — a stock
``nn.TransformerEncoder`` and a GPT-style decoder with tied embeddings and lrkernels'
sliding-window attention — and run every converter, save/load through the compressed
checkpoint, ``torch.compile(fullgraph=True)`` and a few training steps on it. Small shapes:
seconds on a CPU."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrkernels
from lrkernels.nn import (
    Int8Linear,
    LowRankLinear,
    SparseAttention,
    factorize_linears,
    load_compressed,
    quantize_linears,
    save_compressed,
)
from lrkernels.reference import relative_error

VOCAB, DIM, HEADS, SEQ = 61, 64, 4, 24


@pytest.fixture(autouse=True)
def _one_thread():
    """These shapes are far too small for intra-op threads: on a loaded 2-core machine the
    C++ CPU attention kernels' OpenMP workers mostly spin (seen: 0.5–2 s of CPU per forward and
    backward with 2 threads, 0.07 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class GPTBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.attn = SparseAttention((7, 0), causal=True, block_size=16)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, HEADS, DIM // HEADS).unbind(2)
        a = self.attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, DIM))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, seed: int = 0, layers: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Embedding(SEQ, DIM)
        self.blocks = nn.ModuleList(GPTBlock() for _ in range(layers))
        self.ln = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT-2

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class Classifier(nn.Module):
    """A stock nn.TransformerEncoder with an input projection and a classification head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(16, DIM)
        layer = nn.TransformerEncoderLayer(DIM, HEADS, 2 * DIM, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(DIM, 5)

    def forward(self, x):
        return self.out(self.encoder(self.inp(x)).mean(1))


def _gpt_batch(n=4):
    return torch.randint(0, VOCAB, (n, SEQ))


def _enc_batch(n=4):
    return torch.randn(n, SEQ, 16)


MODELS = {
    "gpt": (
        TinyGPT,
        _gpt_batch,
        lambda out, ids: F.cross_entropy(out.flatten(0, 1), ids.flatten()),
    ),
    "encoder": (Classifier, _enc_batch, lambda out, x: out.square().mean()),
}


def _convert(model, how, batch):
    calib = [batch(2) for _ in range(2)]
    if how == "factorize":
        return factorize_linears(model, ratio=0.5, calibration_batches=calib)
    if how == "quantize":
        return quantize_linears(model, group_size=32, calibration_batches=calib, clip_search=True)
    # both: low rank on the MLPs, int8 on the rest
    factorize_linears(model, ratio=0.5, include=r"mlp|linear")
    return quantize_linears(model, group_size=32, exclude=r"mlp|linear")


def _converted_layers(model):
    return [m for m in model.modules() if isinstance(m, LowRankLinear | Int8Linear)]


@pytest.mark.parametrize("how", ["factorize", "quantize", "both"])
@pytest.mark.parametrize("name", list(MODELS))
def test_convert_save_load_train(name, how, tmp_path):
    build, batch, loss_fn = MODELS[name]
    model = build().eval()
    x = batch()
    with torch.no_grad():
        before = model(x)
    # MHA never calls its out_proj, which therefore sees no calibration inputs: warned
    warns = name == "encoder" and how != "both"
    with pytest.warns(UserWarning, match="out_proj") if warns else contextlib.nullcontext():
        report = _convert(model, how, batch)
    assert report is not None and _converted_layers(model)
    if name == "gpt":  # the tied head stays dense and tied
        assert isinstance(model.head, nn.Linear) and model.head.weight is model.tok.weight
    with torch.no_grad():
        after = model(x)
    assert torch.isfinite(after).all()
    assert relative_error(after, before) < (0.6 if how != "quantize" else 0.05)

    # save / load into a freshly built dense model: identical outputs
    path = tmp_path / "model.safetensors"
    plan = save_compressed(model, path)
    fresh = build(seed=123).eval()
    assert load_compressed(fresh, path) == plan
    with torch.no_grad():
        assert torch.equal(fresh(x), after)
    if name == "gpt":
        assert fresh.head.weight is fresh.tok.weight

    # a few training steps: the loss falls, gradients reach factors and biases, int8 stays
    fresh.train()
    frozen = {
        id(m): m.qweight.clone() for m in _converted_layers(fresh) if isinstance(m, Int8Linear)
    }
    opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = loss_fn(fresh(x), x)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for m in _converted_layers(fresh):
        if isinstance(m, LowRankLinear):
            assert m.U.grad is not None and m.V.grad is not None
        else:
            assert torch.equal(m.qweight, frozen[id(m)]) and m.bias.grad is not None


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_converted_model_trains(name):
    """torch.compile(fullgraph=True) of a converted model: forward and backward match eager.
    (aot_eager keeps this fast; tests/test_compile.py runs inductor over every op.)"""
    build, batch, loss_fn = MODELS[name]
    model = build()
    _convert(model, "both", batch)
    model.train()
    twin = copy.deepcopy(model)
    x = batch()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = loss_fn(compiled(x), x)
    loss.backward()
    ref = loss_fn(twin(x), x)
    ref.backward()
    assert relative_error(loss.detach(), ref.detach()) < 1e-5
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        if p.grad is not None:
            assert relative_error(p.grad, q.grad) < 1e-4, n
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), twin.eval()(x), rtol=1e-4, atol=1e-5)


def test_readme_quickstart_shapes_run():
    """The README's drop-in claims on a converted stock encoder: `.weight` probes, F.linear on
    it, state_dict without a `weight` key."""
    model = Classifier()
    factorize_linears(model, rank=8, include="encoder")
    layer = model.encoder.layers[0].linear1
    assert layer.weight.shape == (2 * DIM, DIM) and layer.weight.dtype == torch.float32
    x = torch.randn(3, DIM)
    torch.testing.assert_close(F.linear(x, layer.weight, layer.bias), layer(x))
    assert not any(k.endswith("linear1.weight") for k in model.state_dict())
    assert lrkernels.nn.compression_plan(model)["layers"]


@pytest.mark.parametrize("base", ["dense", "int8"])
@pytest.mark.parametrize("name", list(MODELS))
def test_lora_finetune_save_load(name, base, tmp_path):
    """LoRA on a frozen model (dense or int8 base): a few steps lower the loss and train only the
    adapters (and nothing of the base); the model saves with its plan and reloads into a fresh
    dense model with identical outputs; merging changes the outputs by rounding only."""
    build, batch, loss_fn = MODELS[name]
    model = build()
    x = batch()
    if base == "int8":
        with (
            pytest.warns(UserWarning, match="out_proj")
            if name == "encoder"
            else (contextlib.nullcontext())
        ):
            quantize_linears(model, group_size=32, calibration_batches=[batch(2)])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = lrkernels.nn.add_lora(model, r=4, alpha=8.0, dropout=0.1)
    assert report is not None and lrkernels.nn.lora_layers(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = loss_fn(model(x), x)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    for n, p in model.named_parameters():  # the base did not move
        if "lora_" not in n:
            old = n.replace(".base.", ".") if n not in frozen else n
            assert torch.equal(p, frozen[old]), n

    model.eval()
    with torch.no_grad():
        out = model(x)
    path = tmp_path / "lora.safetensors"
    save_compressed(model, path)
    fresh = build(seed=7).eval()
    load_compressed(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
        for layer in lrkernels.nn.lora_layers(fresh).values():
            layer.merge()
        merged = fresh(x)
    assert relative_error(merged, out) < (1e-5 if base == "dense" else 0.05)
