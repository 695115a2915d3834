"""``attn_implementation="lrkernels"`` (lrkernels/integrations/transformers.py) on randomly
initialised tiny transformers models built from their configs (no downloads): logits and
gradients against transformers' own eager and SDPA paths (the project's rule: at most twice
SDPA's float32 error against a float64 eager run), greedy generation past the window, the KV
cache's Sq ≠ Sk, and the calls that must be routed elsewhere (padded batches, soft-capping)
with a one-time notice — never silently wrong."""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
lrk_tf = pytest.importorskip("lrkernels.integrations.transformers")

from lrkernels.reference import relative_error  # noqa: E402

WINDOW = 16


def _mistral(dtype=torch.float32, **overrides):
    config = transformers.MistralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=8, sliding_window=WINDOW,
        max_position_embeddings=256, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(config).to(dtype).eval()


def _logits(model, impl, ids, **kwargs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach lrkernels.local_attention, and resets the notices."""
    seen = []
    original = lrk_tf.local_attention

    def counted(q, k, v, window, **kwargs):
        seen.append((q.shape[2], k.shape[2], tuple(window)))
        return original(q, k, v, window, **kwargs)

    monkeypatch.setattr(lrk_tf, "local_attention", counted)
    monkeypatch.setattr(lrk_tf, "_NOTICES", set())
    return seen


def test_mistral_logits_match_eager_and_sdpa(calls):
    model = _mistral()
    ids = torch.randint(0, 97, (2, 50))  # 50 > window 16: the window bites
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the standard path says nothing
        ours = _logits(model, "lrkernels", ids)
    assert calls and all(c == (50, 50, (WINDOW - 1, 0)) for c in calls)
    eager, sdpa = _logits(model, "eager", ids), _logits(model, "sdpa", ids)
    exact = _logits(_mistral(torch.float64), "eager", ids)
    sdpa_err = relative_error(sdpa, exact)
    assert relative_error(ours, exact) <= 2 * sdpa_err + 1e-7
    assert relative_error(ours, eager) < 5e-7 and relative_error(ours, sdpa) < 5e-7


def test_mistral_greedy_generation_past_the_window(calls):
    model = _mistral()
    prompt = torch.randint(0, 97, (1, 10))
    outs = {}
    for impl in ("eager", "sdpa", "lrkernels"):
        model.set_attn_implementation(impl)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            outs[impl] = model.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert outs["lrkernels"].shape == (1, 50)
    assert torch.equal(outs["lrkernels"], outs["eager"]) and torch.equal(
        outs["sdpa"], outs["eager"]
    )
    decode = [c for c in calls if c[0] == 1]
    assert len(decode) == 2 * 39 and max(c[1] for c in decode) >= WINDOW  # Sq=1, Sk past W


def test_kv_cache_chunked_prefill(calls):
    """Sq ≠ Sk with Sq > 1: a second chunk of 20 queries against the cache of the first 30."""
    model = _mistral()
    model.set_attn_implementation("lrkernels")
    ids = torch.randint(0, 97, (1, 50))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :30], use_cache=True)
        # transformers 5.24 renamed past_key_values to cache (the old name still works, warned)
        name = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )
        cache = {name: first.past_key_values}
        second = model(ids[:, 30:], use_cache=True, **cache).logits
    assert any(sq == 20 and sk > 20 for sq, sk, _ in calls)
    assert relative_error(second, full[:, 30:]) < 5e-7


def test_gradients_match_sdpa(calls):
    model = _mistral().train()
    ids = torch.randint(0, 97, (2, 40))
    grads = {}
    for impl in ("sdpa", "lrkernels"):
        model.zero_grad()
        model.set_attn_implementation(impl)
        model(ids, labels=ids).loss.backward()
        grads[impl] = [p.grad.clone() for p in model.parameters()]
    assert calls
    for ours, theirs in zip(grads["lrkernels"], grads["sdpa"], strict=True):
        assert relative_error(ours, theirs) < 2e-5


def test_left_padded_generate_is_routed_to_sdpa_with_one_notice(calls):
    model = _mistral()
    ids = torch.randint(1, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    ids[1, :4], mask[1, :4] = 0, 0  # left padding, as batched generate does
    outs = {}
    for impl in ("sdpa", "lrkernels"):
        model.set_attn_implementation(impl)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs[impl] = model.generate(
                ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0
            )
        notices = [str(w.message) for w in caught if "lrkernels attention" in str(w.message)]
        if impl == "lrkernels":
            assert len(notices) == 1 and "padded batch" in notices[0]  # once, not per call
    assert torch.equal(outs["lrkernels"], outs["sdpa"])
    # an unpadded batch with an all-ones mask still runs on the kernels
    calls.clear()
    _logits(model, "lrkernels", ids[:1], attention_mask=mask[:1])
    assert calls


def test_qwen2_window_and_full_layers(calls):
    config = transformers.Qwen2Config(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    types = list(model.config.layer_types)
    assert "sliding_attention" in types and "full_attention" in types
    ids = torch.randint(0, 97, (2, 40))
    ours, sdpa = _logits(model, "lrkernels", ids), _logits(model, "sdpa", ids)
    assert sorted({c[2] for c in calls}) == [(-1, 0), (WINDOW - 1, 0)]
    assert relative_error(ours, sdpa) < 5e-7


def test_gemma3_local_and_global_layers(calls):
    config = transformers.Gemma3TextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
        max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    ids = torch.randint(0, 97, (2, 40))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = _logits(model, "lrkernels", ids)
    assert sorted({c[2] for c in calls}) == [(-1, 0), (WINDOW - 1, 0)]
    sdpa, eager = _logits(model, "sdpa", ids), _logits(model, "eager", ids)
    assert relative_error(ours, sdpa) <= 2 * relative_error(sdpa, eager) + 1e-7


def test_softcapping_is_routed_to_the_models_eager_attention(calls):
    config = transformers.Gemma2Config(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
        max_position_embeddings=256, attn_logit_softcapping=50.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    ids = torch.randint(0, 97, (1, 40))
    with pytest.warns(UserWarning, match="soft-capping is not supported.*eager"):
        ours = _logits(model, "lrkernels", ids)
    assert not calls
    assert relative_error(ours, _logits(model, "eager", ids)) < 1e-6


def test_registered_names():
    from transformers import masking_utils
    from transformers.modeling_utils import AttentionInterface

    assert AttentionInterface._global_mapping["lrkernels"] is lrk_tf.lrkernels_attention_forward
    assert (
        masking_utils.AttentionMaskInterface._global_mapping["lrkernels"]
        is lrk_tf.lrkernels_attention_mask
    )


def test_import_error_without_transformers_is_clear():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "try:\n    import lrkernels.integrations.transformers\n"
        "except ImportError as e:\n    print('IMPORTERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "IMPORTERROR" in out.stdout and "pip install transformers" in out.stdout
