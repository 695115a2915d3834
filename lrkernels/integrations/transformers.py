"""Hugging Face transformers integration: ``attn_implementation="lrkernels"``.

Importing this module registers an attention implementation named ``"lrkernels"`` in
transformers' ``AttentionInterface`` (and its mask builder in ``AttentionMaskInterface``)::

    import lrkernels.integrations.transformers  # noqa: F401  (registers "lrkernels")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="lrkernels")
    # or: model.set_attn_implementation("lrkernels")

Decoder models then run their attention through `lrkernels.local_attention`: sliding-window
layers (Mistral, Qwen2's window layers, Gemma 2/3's local layers) with their window, full
layers causally with window ``(-1, 0)``; GQA without repeating k/v; the KV cache's
``Sq ≠ Sk`` (prefill, chunked prefill, decode) by the bottom-right alignment both libraries use.

Window convention. transformers' ``sliding_window=W`` lets query position ``i`` see keys
``i − W < j ≤ i`` (``sliding_window_overlay``: ``kv_idx > q_idx − W``, and causal): ``W``
keys *including* the query's own. In FlashAttention's ``(left, right)`` convention, which
lrkernels uses, that is ``(W − 1, 0)`` (lrkernels/masks.py maps the conventions).

Masks. transformers hands a registered attention function ``attention_mask=None`` unless a
mask builder is registered under the same name (it skips mask creation for unknown names —
even for a left-padded batch). So this module registers one, which returns:

- ``None`` exactly when the mask is the plain causal (or causal sliding-window) pattern,
  bottom-right aligned: no padding, no packed sequences or overlays, offsets such that the last
  query is the last key, not a chunked-attention model, and the builder's own mask function
  agrees on its last two query rows. The attention function then runs `local_attention`;
- otherwise the mask transformers' SDPA path would build (never its ``is_causal`` shortcut,
  whose top-left alignment is not ours): the attention function routes that call to
  transformers' own SDPA attention, after a one-time notice saying why. Left padding (batched
  ``generate``), static caches, packed sequences and custom masks therefore run exactly as
  with ``attn_implementation="sdpa"``: slower, never silently wrong.

Also routed, with a notice: attention dropout while training (no dropout in the kernels), and
logit soft-capping or attention sinks (Gemma 2's ``attn_logit_softcapping``, gpt-oss's sinks)
to the model's own eager attention, which implements them. Attention weights are not returned
(``None``, as with SDPA). transformers is an optional dependency: importing this module
without it raises an ImportError that says so.
"""

from __future__ import annotations

import sys
import warnings

import torch

try:
    import transformers
    from transformers import masking_utils
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface
except ImportError as exc:  # optional dependency
    raise ImportError(
        "lrkernels.integrations.transformers needs the `transformers` package (version 5 or "
        f"newer, with AttentionInterface and masking_utils.AttentionMaskInterface): {exc}. "
        "Install it with `pip install transformers`."
    ) from exc
if not hasattr(masking_utils, "AttentionMaskInterface"):
    raise ImportError(
        "lrkernels.integrations.transformers needs transformers' masking_utils."
        f"AttentionMaskInterface (transformers >= 5); found transformers {transformers.__version__}"
    )

from ..masks import window_element_mask  # noqa: E402
from ..ops.attention import local_attention  # noqa: E402

__all__ = ["NAME", "lrkernels_attention_forward", "lrkernels_attention_mask", "register"]

NAME = "lrkernels"
_NOTICES: set[str] = set()


def _notice(reason: str) -> None:
    """Says once per process and reason why a call did not run on lrkernels' kernels."""
    if reason not in _NOTICES:
        _NOTICES.add(reason)
        warnings.warn(f"lrkernels attention: {reason}", stacklevel=3)


# ------------------------------------------------------------------------------ the mask


def _rows_match_standard(mask_function, q_offset, q_length, kv_offset, kv_length, local_size):
    """Whether the builder's mask function gives, on the last two query rows, the causal (or
    causal sliding-window) rows we will compute: a guard against patterns with the same
    arguments but other semantics (chunked attention). O(Sk) work."""
    kv = torch.arange(kv_offset, kv_offset + kv_length)
    zero = torch.zeros((), dtype=torch.long)
    for row in range(max(0, q_length - 2), q_length):
        q = torch.tensor(q_offset + row)
        want = kv <= q
        if local_size is not None:
            want &= kv > q - local_size
        try:
            got = torch.as_tensor(mask_function(zero, zero, q, kv)).expand_as(want)
        except Exception:  # not index-based: cannot tell, so not standard
            return False
        if not torch.equal(got, want):
            return False
    return True


def _is_standard(
    q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, local_size,
    allow_is_causal_skip, config,
) -> bool:  # fmt: skip
    if not allow_is_causal_skip:  # overlays, packed sequences, compiled static-cache decode
        return False
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int)):  # static caches
        return False
    if q_offset + q_length != kv_offset + kv_length:  # the last query is not the last key
        return False
    if local_size is not None and getattr(config, "attention_chunk_size", None) is not None:
        return False  # chunked attention (Llama 4) uses the same argument for its chunks
    padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        if torch.compiler.is_compiling() or not bool(padding.all()):
            return False  # padded batch (or unknowable while tracing)
    if torch.compiler.is_compiling():
        return True  # the probe reads values; the arguments above already pin the pattern
    return _rows_match_standard(mask_function, q_offset, q_length, kv_offset, kv_length, local_size)


def lrkernels_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=masking_utils.causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs,
):
    """The mask builder registered as ``"lrkernels"`` (module docstring): None for the
    standard bottom-right causal / sliding-window pattern, else SDPA's boolean mask."""
    if _is_standard(
        q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, local_size,
        allow_is_causal_skip, kwargs.get("config"),
    ):  # fmt: skip
        return None
    kwargs.pop("allow_is_bidirectional_skip", None)
    return masking_utils.sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
        local_size=local_size, allow_is_causal_skip=False, **kwargs,
    )  # fmt: skip


# ---------------------------------------------------------------------- the attention


def _eager_of(module):
    """The model's own eager attention (its modeling file defines ``eager_attention_forward``,
    with the soft-capping / sinks it needs)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _additive_mask(attention_mask, query, key, is_causal, sliding_window):
    """The float mask eager attention adds to its scores (0 visible, dtype min hidden), from
    SDPA's boolean mask or, where our builder returned None, from the window it stands for."""
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return attention_mask
    if attention_mask is None:
        if not is_causal:
            return None
        window = (-1, 0) if sliding_window is None else (int(sliding_window) - 1, 0)
        sq, sk = query.shape[2], key.shape[2]
        attention_mask = window_element_mask(sq, sk, window, device=query.device)[None, None]
    hidden = torch.tensor(torch.finfo(query.dtype).min, dtype=query.dtype, device=query.device)
    return torch.where(attention_mask, torch.zeros_like(hidden), hidden)


def lrkernels_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query ``(B, Hq, Sq, D)``, key/value
    ``(B, Hkv, Sk, D)``; returns ``(out (B, Sq, Hq, D), None)``. See the module docstring for
    what runs on `lrkernels.local_attention` and what is routed elsewhere."""
    is_causal = kwargs.pop("is_causal", None)
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    if softcap is not None or sinks is not None:
        eager = _eager_of(module)
        what = "logit soft-capping" if softcap is not None else "attention sinks"
        if eager is None:
            raise NotImplementedError(
                f"lrkernels attention: {what} is not supported, and {type(module).__name__}'s "
                "module defines no eager_attention_forward to fall back on"
            )
        _notice(f"{what} is not supported by the kernels; using the model's eager attention")
        mask = _additive_mask(attention_mask, query, key, is_causal, sliding_window)
        return eager(
            module, query, key, value, mask, dropout=dropout, scaling=scaling,
            sliding_window=sliding_window, softcap=softcap, **kwargs,
        )  # fmt: skip
    reason = None
    if attention_mask is not None:
        reason = (
            "the mask is not a plain causal / sliding-window one (padded batch, static cache, "
            "packed sequences or a custom mask); using transformers' SDPA attention for it"
        )
    elif dropout and module.training:
        reason = "attention dropout is not supported by the kernels; using SDPA while training"
    elif not is_causal:
        reason = "non-causal attention; using transformers' SDPA attention"
    if reason is not None:
        _notice(reason)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, sliding_window=sliding_window, **kwargs,
        )  # fmt: skip
    window = (-1, 0) if sliding_window is None else (int(sliding_window) - 1, 0)
    out = local_attention(query, key, value, window, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> None:
    """Registers the attention function and its mask builder under ``name`` (done for
    ``"lrkernels"`` on import)."""
    AttentionInterface.register(name, lrkernels_attention_forward)
    masking_utils.AttentionMaskInterface.register(name, lrkernels_attention_mask)


register()
