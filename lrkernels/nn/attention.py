"""Sparse attention as a module (re-exported by `lrkernels.nn`): `SparseAttention` wraps
`lrkernels.local_attention` / `lrkernels.block_sparse_attention` with a fixed window or layout."""

from __future__ import annotations

import numbers

from torch import Tensor, nn

__all__ = ["SparseAttention"]


class SparseAttention(nn.Module):
    """Softmax attention over a sliding window or a fixed block layout, as a module.

    ``SparseAttention(window=(511, 0))`` calls `lrkernels.local_attention`;
    ``SparseAttention(layout=masks.bigbird_layout(...))`` calls
    `lrkernels.block_sparse_attention` with that layout (moved to the inputs' device once and
    kept). ``forward(q, k, v)`` takes ``(B, Hq, S, D)`` and ``(B, Hkv, S, D)`` tensors and returns
    ``(B, Hq, S, D)``. No parameters: the projections stay in the user's model.
    """

    def __init__(
        self,
        window: tuple[int, int] | None = None,
        *,
        causal: bool = False,
        layout=None,
        scale: float | None = None,
        block_size: int = 128,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        from .. import masks
        from ..backends import BACKENDS
        from ..ops.attention import check_block_size, normalize_window

        if (window is None) == (layout is None) and not (causal and layout is None):
            raise ValueError(
                "SparseAttention: give exactly one of window (or causal=True) or layout"
            )
        if not isinstance(causal, bool):
            raise TypeError(f"SparseAttention: causal must be a bool, got {causal!r}")
        if layout is not None and not isinstance(layout, masks.BlockLayout):
            raise TypeError(
                "SparseAttention: layout must be a lrkernels.masks.BlockLayout, got "
                f"{type(layout).__name__}"
            )
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
            raise TypeError(f"SparseAttention: scale must be a float or None, got {scale!r}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"SparseAttention: backend must be one of {BACKENDS} or None")
        # Checked now, not at the first forward: window entries and block_size must be ints.
        if window is not None:
            window = normalize_window(window, causal)
        self.window = window if window is not None else ((-1, 0) if layout is None else None)
        self.causal, self.layout, self.scale = causal, layout, scale
        self.block_size, self.backend = check_block_size(block_size), backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        from ..ops.attention import block_sparse_attention, local_attention

        if self.layout is None:
            return local_attention(
                q, k, v, self.window, causal=self.causal, scale=self.scale,
                backend=self.backend, block_size=self.block_size,
            )  # fmt: skip
        if self.layout.device != q.device:
            self.layout = self.layout.to(q.device)
        return block_sparse_attention(q, k, v, self.layout, scale=self.scale, backend=self.backend)

    def extra_repr(self) -> str:
        what = f"window={self.window}" if self.layout is None else f"layout={self.layout!r}"
        return f"{what}, causal={self.causal}, block_size={self.block_size}"
