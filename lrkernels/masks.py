"""Block-sparse attention layouts (`BlockLayout`) and their builders (docs/attention.md).

A layout says, per (batch or 1, query head or 1, query block), which key blocks a query block
reads: **full** blocks (every in-bounds element visible, no element mask) and **partial** blocks
(the element window ``layout.window`` is applied). Everything is stored in FlexAttention's
CSR-like padded form, so memory is ``O(Bl·Hl·NQB·MAXB)`` — the number of listed blocks, padded
per row — and never ``O(S²)``; the builders never materialise anything larger either.

Window convention (FlashAttention's)
------------------------------------
With ``o = kv_len − q_len`` (bottom-right alignment: the last query sees the last key), query
``i`` sees key ``j`` iff ``0 ≤ j < kv_len`` and ::

    i + o − left  ≤  j  ≤  i + o + right        (left = −1 / right = −1: unbounded side)

``causal=True`` means ``right = 0``. ``window = (left, right)`` counts keys *besides* the
diagonal one: ``(W, 0)`` sees ``W + 1`` keys.

How other libraries' windows map onto ``(left, right)``:

- FlashAttention ``window_size=(l, r)``: identical, ``(l, r)``.
- xformers ``LocalAttentionFromBottomRightMask(window_left=l, window_right=r)``: identical.
- xformers ``LowerTriangularFromBottomRightLocalAttentionMask(W)`` (also
  ``BlockDiagonalCausalLocalAttentionMask(window_size=W)``, ``make_local_attention(W)``):
  ``W`` counts the keys *including* the diagonal one, so it is ``(W − 1, 0)`` here — one less.
- FlexAttention has no window parameter: the window is whatever the ``mask_mod`` says, and the
  mask_mod sees raw, **top-left aligned** indices (no ``kv_len − q_len`` shift). The
  attention-gym example ``generate_sliding_window(W)`` (``q_idx − kv_idx <= W`` and causal) is
  ``(W, 0)`` here when ``q_len == kv_len``; Hugging Face / Mistral ``sliding_window=W``
  (``q_idx − kv_idx < W``) is ``(W − 1, 0)`` — one less. With ``q_len ≠ kv_len`` a FlexAttention
  mask_mod must add the shift itself: ours (`to_flex_block_mask`) tests
  ``d = kv_idx − q_idx − (kv_len − q_len)`` against ``−left ≤ d ≤ right``.

Block classification (every builder, and `BlockLayout.refine`)
--------------------------------------------------------------
Query block ``qb`` holds rows ``[qb·block_q, min((qb+1)·block_q, q_len))``, key block ``kb``
keys ``[kb·block_k, min((kb+1)·block_k, kv_len))``. Only **in-bounds** elements count: a block
is *full* when every in-bounds (i, j) in it is visible — so a last, short block (q_len or kv_len
not a multiple of the block) can be full — *partial* when some but not all are, *absent* when
none is. (FlexAttention's ``create_block_mask`` pads the last blocks with masked elements and
therefore calls such edge blocks partial; ``from_flex_block_mask(..., refine=True)`` reclassifies
them.) A query row that sees no key gets ``out = 0, lse = −inf`` (the kernels' contract).

Canonical form
--------------
Builders return, and `BlockLayout.canonical` produces: indices ascending within each row, the
entries past a row's count set to 0 (a valid index, harmless for a kernel that prefetches one
entry too far), partial and full lists of the same width ``MAXB = max(1, largest count)``. The
transpose (`BlockLayout.transposed`) is in the same canonical form.
"""

from __future__ import annotations

import dataclasses
import numbers
import operator
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BlockLayout",
    "TransposedLayout",
    "bigbird_layout",
    "causal_layout",
    "dilated_layout",
    "from_block_mask_matrix",
    "from_flex_block_mask",
    "local_window_layout",
    "longformer_layout",
    "to_flex_block_mask",
    "window_element_mask",
]

_I32 = torch.int32
_I64 = torch.int64


class TransposedLayout(NamedTuple):
    """Per key block, the query blocks that list it (for the dk/dv backward pass).

    ``q_num_blocks`` int32 (Bl, Hl, NKB), ``q_indices`` int32 (Bl, Hl, NKB, MAXQ) from the
    partial lists; ``full_q_*`` the same from the full lists (None when the layout has none).
    """

    q_num_blocks: Tensor
    q_indices: Tensor
    full_q_num_blocks: Tensor | None
    full_q_indices: Tensor | None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def as_int(value, what: str) -> int:
    """``value`` as a Python int: an int (not a bool), a NumPy integer or a one-element integer
    tensor; anything else (a float such as 4.9, a bool, a float tensor) is a TypeError naming
    ``what``, never silently truncated. SymInts (sizes while tracing) pass through."""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype.is_complex:
            raise TypeError(
                f"{what} must be an int or a one-element integer tensor, got a tensor of dtype "
                f"{value.dtype} and shape {tuple(value.shape)}"
            )
        if value.dtype == torch.bool:
            raise TypeError(f"{what} must be an int, got a bool tensor")
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {value!r} ({type(value).__name__})")
    return operator.index(value)


def _check_window(window, what: str = "window") -> tuple[int, int]:
    if window is None:
        return (-1, -1)
    if isinstance(window, str | bytes) or not hasattr(window, "__iter__"):
        raise TypeError(f"{what} must be a pair (left, right) of ints, got {window!r}")
    try:
        left, right = window
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a pair (left, right), got {window!r}") from None
    out = []
    for name, w in (("left", left), ("right", right)):
        w = as_int(w, f"{what}: {name}")
        if w < -1:
            raise ValueError(f"{what}: {name} must be an int >= -1 (-1 = unbounded), got {w!r}")
        out.append(w)
    return (out[0], out[1])


def _check_positive(**values) -> tuple[int, ...]:
    """The values as ints, in order; TypeError for a non-int, ValueError for one below 1."""
    out = []
    for name, v in values.items():
        out.append(as_int(v, name))
        if out[-1] < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return tuple(out)


def _check_nonneg(**values) -> tuple[int, ...]:
    """The values as ints, in order; TypeError for a non-int, ValueError for a negative one."""
    out = []
    for name, v in values.items():
        out.append(as_int(v, name))
        if out[-1] < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    return tuple(out)


# --------------------------------------------------------------------------- small list helpers


def _valid_mask(counts: Tensor, width: int) -> Tensor:
    """Bool (..., width): slot s of a row is a listed entry iff s < count."""
    return torch.arange(width, device=counts.device) < counts.unsqueeze(-1).to(_I64)


def _pack(cand: Tensor, ncols: int) -> tuple[Tensor, Tensor]:
    """Left-pack candidate rows into canonical form.

    ``cand`` int64 (..., W): key-block indices, any value outside [0, ncols) meaning "no entry".
    Duplicates within a row are merged (so callers may build rows from overlapping pieces).
    Returns (counts int64 (...), indices int64 (..., W)) with ascending entries, 0 padding.
    """
    if cand.shape[-1] == 0:
        return cand.new_zeros(cand.shape[:-1]), cand
    c = torch.where((cand >= 0) & (cand < ncols), cand, ncols)
    c = c.sort(dim=-1).values
    # Merge duplicates: an entry equal to its left neighbour becomes "no entry", then re-sort
    # so the survivors are left-packed again.
    dup = torch.zeros_like(c, dtype=torch.bool)
    dup[..., 1:] = c[..., 1:] == c[..., :-1]
    if bool(dup.any()):
        c = torch.where(dup, ncols, c).sort(dim=-1).values
    valid = c < ncols
    return valid.sum(-1), torch.where(valid, c, 0)


def _fit_width(indices: Tensor, width: int) -> Tensor:
    """Trim or zero-pad the last dimension to `width` (entries past the counts are 0)."""
    w = indices.shape[-1]
    if w >= width:
        return indices[..., :width]
    pad = indices.new_zeros((*indices.shape[:-1], width - w))
    return torch.cat([indices, pad], dim=-1)


def _finish(q_len, kv_len, block_q, block_k, partial, full, window, device=None) -> BlockLayout:
    """BlockLayout from packed (counts, indices) pairs; common width MAXB = max(1, counts)."""
    pc, pi = partial
    if full is None:
        width = max(1, int(pc.max()) if pc.numel() else 1)
        fc = fi = None
    else:
        fc, fi = full
        width = max(1, int(pc.max()) if pc.numel() else 1, int(fc.max()) if fc.numel() else 1)
        fc, fi = fc.to(_I32), _fit_width(fi, width).to(_I32)
    layout = BlockLayout(
        q_len=q_len,
        kv_len=kv_len,
        block_q=block_q,
        block_k=block_k,
        kv_num_blocks=pc.to(_I32).contiguous(),
        kv_indices=_fit_width(pi, width).to(_I32).contiguous(),
        full_kv_num_blocks=None if fc is None else fc.contiguous(),
        full_kv_indices=None if fi is None else fi.contiguous(),
        window=window,
    )
    return layout if device is None else layout.to(device)


def _lists_to_dense(counts: Tensor, indices: Tensor, ncols: int) -> Tensor:
    """Bool (..., rows, ncols) from CSR-like lists. O(rows·ncols): tests/small sizes only."""
    valid = _valid_mask(counts, indices.shape[-1])
    cols = torch.where(valid, indices.to(_I64), ncols)
    dense = torch.zeros((*indices.shape[:-1], ncols + 1), dtype=torch.bool, device=counts.device)
    dense.scatter_(-1, cols, True)
    return dense[..., :ncols]


def _transpose_lists(counts: Tensor, indices: Tensor, nkb: int) -> tuple[Tensor, Tensor]:
    """Per key block, the ascending query blocks listing it. O(listed blocks), no block loop.

    counts (Bl, Hl, NQB), indices (Bl, Hl, NQB, MAXB) -> counts_t int64 (Bl, Hl, NKB),
    indices_t int64 (Bl, Hl, NKB, max(1, max counts_t)).
    """
    bl, hl, nqb, maxb = indices.shape
    dev = indices.device
    valid = _valid_mask(counts, maxb)
    # The flat (bh, qb, kb) pair list of the listed blocks, in (bh, qb) row-major order.
    pos = valid.nonzero()  # (n, 4): b, h, qb, slot
    kb = indices[valid].to(_I64)
    bh = pos[:, 0] * hl + pos[:, 1]
    qb = pos[:, 2]
    group = bh * nkb + kb  # one group per (bh, key block)
    # A stable sort by group keeps the row-major order within a group: ascending qb.
    order = torch.sort(group, stable=True).indices
    group_s, qb_s = group[order], qb[order]
    counts_t = torch.bincount(group, minlength=bl * hl * nkb)
    starts = torch.cumsum(counts_t, 0) - counts_t
    rank = torch.arange(group_s.numel(), device=dev) - starts[group_s]
    width = max(1, int(counts_t.max()) if counts_t.numel() else 1)
    out = torch.zeros((bl * hl * nkb, width), dtype=_I64, device=dev)
    out[group_s, rank] = qb_s
    return counts_t.view(bl, hl, nkb), out.view(bl, hl, nkb, width)


def _block_bounds(qb: Tensor, kb: Tensor, q_len, kv_len, block_q, block_k):
    """First/last in-bounds row of query block qb and key of key block kb (int64)."""
    i0 = qb * block_q
    i1 = torch.clamp((qb + 1) * block_q, max=q_len) - 1
    k0 = kb * block_k
    k1 = torch.clamp((kb + 1) * block_k, max=kv_len) - 1
    return i0, i1, k0, k1


def _window_block_visibility(qb, kb, q_len, kv_len, block_q, block_k, window):
    """(any_visible, all_visible) bool tensors for (query block, key block) pairs under the
    element window, counting in-bounds elements only.

    With o = kv_len − q_len, row i sees [i + o − left, i + o + right]. These intervals move by
    one per row and are at least one key wide, so the rows [i0, i1] of a block together see the
    contiguous range [i0 + o − left, i1 + o + right]: the block has a visible element iff its
    keys [k0, k1] meet that range; all its elements are visible iff [k0, k1] lies inside every
    row's interval, i.e. k0 ≥ i1 + o − left and k1 ≤ i0 + o + right.
    """
    left, right = window
    o = kv_len - q_len
    i0, i1, k0, k1 = _block_bounds(qb, kb, q_len, kv_len, block_q, block_k)
    any_v = torch.ones_like(k0, dtype=torch.bool)
    all_v = torch.ones_like(k0, dtype=torch.bool)
    if left >= 0:
        any_v &= k1 >= i0 + o - left
        all_v &= k0 >= i1 + o - left
    if right >= 0:
        any_v &= k0 <= i1 + o + right
        all_v &= k1 <= i0 + o + right
    return any_v, all_v & any_v


def _window_ranges(q_len, kv_len, block_q, block_k, window, device=None):
    """Per query block, the touched key-block range [t0, t1] and the full range [f0, f1]
    (int64 (NQB,); empty ranges have last < first). See `_window_block_visibility`."""
    left, right = window
    nqb, nkb = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
    o = kv_len - q_len
    qb = torch.arange(nqb, dtype=_I64, device=device)
    i0 = qb * block_q
    i1 = torch.clamp((qb + 1) * block_q, max=q_len) - 1
    full_nkb = torch.full_like(qb, nkb - 1)
    if left >= 0:
        lo = i0 + o - left  # the first key any row sees (before clipping)
        t0 = torch.where(lo > kv_len - 1, nkb, torch.div(lo, block_k, rounding_mode="floor"))
        t0 = t0.clamp(min=0)
        a = i1 + o - left  # a full block must start at or after a
        f0 = (-torch.div(-a, block_k, rounding_mode="floor")).clamp(min=0)  # ceil(a / bk)
    else:
        t0 = torch.zeros_like(qb)
        f0 = torch.zeros_like(qb)
    if right >= 0:
        hi = i1 + o + right  # the last key any row sees (before clipping)
        t1 = torch.div(hi, block_k, rounding_mode="floor").clamp(min=-1, max=nkb - 1)
        b = i0 + o + right  # a full block must end at or before b (its last in-bounds key)
        f1 = torch.where(
            b >= kv_len - 1, full_nkb, torch.div(b + 1, block_k, rounding_mode="floor") - 1
        )
    else:
        t1 = full_nkb.clone()
        f1 = full_nkb.clone()
    f0 = torch.maximum(f0, t0)
    f1 = torch.minimum(f1, t1)
    return t0, t1, f0, f1


def _window_candidates(q_len, kv_len, block_q, block_k, window, device=None):
    """Candidate rows (int64 (NQB, W), out-of-range = no entry) of the partial and the full
    key blocks of the window layout, built by arithmetic on the per-row ranges."""
    nkb = _cdiv(kv_len, block_k)
    t0, t1, f0, f1 = _window_ranges(q_len, kv_len, block_q, block_k, window, device)
    n_touched = (t1 - t0 + 1).clamp(min=0)
    n_full = (f1 - f0 + 1).clamp(min=0)
    # Without full blocks the whole touched range is the left fringe.
    no_full = n_full == 0
    f0 = torch.where(no_full, t1 + 1, f0)
    f1 = torch.where(no_full, t1, f1)
    n_part = n_touched - n_full
    w_full = max(1, int(n_full.max()) if n_full.numel() else 1)
    w_part = max(1, int(n_part.max()) if n_part.numel() else 1)
    s = torch.arange(w_full, dtype=_I64, device=device)
    full = torch.where(s < n_full[:, None], f0[:, None] + s, nkb)
    s = torch.arange(w_part, dtype=_I64, device=device)
    n_left = (f0 - t0)[:, None]  # partial blocks left of the full range; the rest are right
    part = torch.where(s < n_left, t0[:, None] + s, f1[:, None] + 1 + (s - n_left))
    part = torch.where(s < n_part[:, None], part, nkb)
    return part, full


def _diagonal_key_block(q_len, kv_len, block_q, block_k, device=None) -> Tensor:
    """int64 (NQB,): c(qb) = floor((i1 + kv_len − q_len) / block_k), the key block holding the
    aligned diagonal key of the query block's last row i1 (may be < 0 or ≥ NKB when
    q_len ≠ kv_len puts the diagonal outside the keys)."""
    nqb = _cdiv(q_len, block_q)
    qb = torch.arange(nqb, dtype=_I64, device=device)
    i1 = torch.clamp((qb + 1) * block_q, max=q_len) - 1
    return torch.div(i1 + kv_len - q_len, block_k, rounding_mode="floor")


# --------------------------------------------------------------------------------- BlockLayout


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
    """A block-sparse attention layout (docs/attention.md), FlexAttention's CSR-like form.

    Fields
        q_len, kv_len: sequence lengths Sq, Sk. block_q, block_k: block sizes.
        kv_num_blocks int32 (Bl, Hl, NQB), kv_indices int32 (Bl, Hl, NQB, MAXB): per query block
            the **partial** key blocks, left-packed (entries at or past the count are ignored);
            the element window is applied on them.
        full_kv_num_blocks, full_kv_indices (optional, same shapes): the **full** key blocks,
            disjoint from the partial ones, no element mask.
        window (left, right): the element window of partial blocks ((-1, -1): bounds only).

    ``NQB = ceil(Sq / block_q)``, ``NKB = ceil(Sk / block_k)``; ``Bl`` is 1 or the batch,
    ``Hl`` 1 or the number of query heads (broadcast). Construction does no checking (it is
    cheap enough for autograd's backward); call `validate` on untrusted input.
    """

    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    kv_num_blocks: Tensor
    kv_indices: Tensor
    full_kv_num_blocks: Tensor | None = None
    full_kv_indices: Tensor | None = None
    window: tuple[int, int] = (-1, -1)
    _transposed: TransposedLayout | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        w = self.window
        if isinstance(w, list | tuple) and len(w) == 2:
            left, right = as_int(w[0], "window: left"), as_int(w[1], "window: right")
            object.__setattr__(self, "window", (left, right))

    # ------------------------------------------------------------------ derived sizes

    @property
    def num_q_blocks(self) -> int:
        """NQB = ceil(q_len / block_q)."""
        return _cdiv(self.q_len, self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        """NKB = ceil(kv_len / block_k)."""
        return _cdiv(self.kv_len, self.block_k)

    @property
    def broadcast_shape(self) -> tuple[int, int]:
        """(Bl, Hl): 1 means broadcast over the batch / the query heads."""
        return (int(self.kv_num_blocks.shape[0]), int(self.kv_num_blocks.shape[1]))

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    @property
    def has_full(self) -> bool:
        return self.full_kv_num_blocks is not None

    # ------------------------------------------------------------------ transpose

    def transposed(self) -> TransposedLayout:
        """(q_num_blocks (Bl, Hl, NKB), q_indices (Bl, Hl, NKB, MAXQ), full_q_num_blocks,
        full_q_indices), int32: per key block the query blocks listing it (ascending), partial
        and full kept separate; one common width MAXQ = max(1, largest count).

        Computed once (a sort of the flat pair list: O(listed blocks) memory, no loop over
        blocks) and cached on the layout, so repeated backward passes reuse it.
        """
        cached = self._transposed
        if cached is not None:
            return cached
        nkb = self.num_kv_blocks
        qc, qi = _transpose_lists(self.kv_num_blocks, self.kv_indices, nkb)
        if self.full_kv_num_blocks is not None:
            fc, fi = _transpose_lists(self.full_kv_num_blocks, self.full_kv_indices, nkb)
            width = max(qi.shape[-1], fi.shape[-1])
            result = TransposedLayout(
                qc.to(_I32),
                _fit_width(qi, width).to(_I32).contiguous(),
                fc.to(_I32),
                _fit_width(fi, width).to(_I32).contiguous(),
            )
        else:
            result = TransposedLayout(qc.to(_I32), qi.to(_I32).contiguous(), None, None)
        object.__setattr__(self, "_transposed", result)
        return result

    # ------------------------------------------------------------------ checks

    def validate(self, batch: int | None = None, heads: int | None = None) -> BlockLayout:
        """Check every field; raise ValueError naming the field. Returns self.

        dtypes int32; kv_num_blocks (Bl, Hl, NQB) and kv_indices (Bl, Hl, NQB, MAXB) with
        NQB = ceil(q_len / block_q); full lists both or neither, same shapes and device;
        counts in [0, MAXB]; listed indices in [0, NKB); no key block listed twice in a row
        (partial and full together); window values ≥ −1; lengths and block sizes ≥ 1.
        With `batch` / `heads`, also Bl ∈ {1, batch}, Hl ∈ {1, heads}. Cost O(listed blocks).
        """
        for name in ("q_len", "kv_len", "block_q", "block_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BlockLayout.{name} must be a positive int, got {v!r}")
        _check_window(self.window, "BlockLayout.window")
        nqb, nkb = self.num_q_blocks, self.num_kv_blocks
        pairs = [("kv_num_blocks", "kv_indices")]
        if (self.full_kv_num_blocks is None) != (self.full_kv_indices is None):
            raise ValueError(
                "BlockLayout.full_kv_num_blocks and BlockLayout.full_kv_indices must be both "
                "given or both None"
            )
        if self.full_kv_num_blocks is not None:
            pairs.append(("full_kv_num_blocks", "full_kv_indices"))
        for cname, iname in pairs:
            counts, idx = getattr(self, cname), getattr(self, iname)
            for name, t in ((cname, counts), (iname, idx)):
                if not isinstance(t, Tensor):
                    raise ValueError(f"BlockLayout.{name} must be a tensor, got {type(t)}")
                if t.dtype != _I32:
                    raise ValueError(f"BlockLayout.{name} must be int32, got {t.dtype}")
                if t.device != self.kv_num_blocks.device:
                    raise ValueError(
                        f"BlockLayout.{name} is on {t.device}, kv_num_blocks on "
                        f"{self.kv_num_blocks.device}"
                    )
            if counts.dim() != 3:
                raise ValueError(
                    f"BlockLayout.{cname} must be 3-D (Bl, Hl, NQB), got {tuple(counts.shape)}"
                )
            if idx.dim() != 4:
                raise ValueError(
                    f"BlockLayout.{iname} must be 4-D (Bl, Hl, NQB, MAXB), got {tuple(idx.shape)}"
                )
            if counts.shape[2] != nqb:
                raise ValueError(
                    f"BlockLayout.{cname} has {counts.shape[2]} query blocks, expected "
                    f"NQB = ceil({self.q_len} / {self.block_q}) = {nqb}"
                )
            if tuple(idx.shape[:3]) != tuple(counts.shape):
                raise ValueError(
                    f"BlockLayout.{iname} shape {tuple(idx.shape)} does not match "
                    f"{cname} shape {tuple(counts.shape)} in its first three dims"
                )
            if counts.shape[0] < 1 or counts.shape[1] < 1:
                raise ValueError(f"BlockLayout.{cname}: Bl and Hl must be >= 1")
            if idx.shape[3] < 1:
                raise ValueError(f"BlockLayout.{iname}: MAXB must be >= 1")
        if self.full_kv_num_blocks is not None:
            if self.full_kv_indices.shape != self.kv_indices.shape:
                raise ValueError(
                    f"BlockLayout.full_kv_indices shape {tuple(self.full_kv_indices.shape)} "
                    f"differs from kv_indices shape {tuple(self.kv_indices.shape)}"
                )
        bl, hl = self.broadcast_shape
        if batch is not None and bl not in (1, batch):
            raise ValueError(f"BlockLayout.kv_num_blocks: Bl = {bl} must be 1 or batch {batch}")
        if heads is not None and hl not in (1, heads):
            raise ValueError(f"BlockLayout.kv_num_blocks: Hl = {hl} must be 1 or heads {heads}")
        maxb = self.kv_indices.shape[3]
        for cname, iname in pairs:
            counts, idx = getattr(self, cname), getattr(self, iname)
            bad = (counts < 0) | (counts > maxb)
            if bool(bad.any()):
                where = tuple(bad.nonzero()[0].tolist())
                raise ValueError(
                    f"BlockLayout.{cname}{list(where)} = {int(counts[where])} is outside "
                    f"[0, MAXB = {maxb}]"
                )
            valid = _valid_mask(counts, maxb)
            bad = valid & ((idx < 0) | (idx >= nkb))
            if bool(bad.any()):
                where = tuple(bad.nonzero()[0].tolist())
                raise ValueError(
                    f"BlockLayout.{iname}{list(where)} = {int(idx[where])} is outside "
                    f"[0, NKB = {nkb})"
                )
        # Duplicates: sort each row's entries (partial then full); unlisted slots get distinct
        # values >= NKB so that only real entries can collide.
        rows = [self.kv_indices]
        valids = [_valid_mask(self.kv_num_blocks, maxb)]
        if self.full_kv_num_blocks is not None:
            rows.append(self.full_kv_indices)
            valids.append(_valid_mask(self.full_kv_num_blocks, maxb))
        vals = torch.cat(rows, dim=-1).to(_I64)
        valid = torch.cat(valids, dim=-1)
        filler = nkb + torch.arange(vals.shape[-1], device=vals.device)
        vals = torch.where(valid, vals, filler).sort(dim=-1).values
        dup = vals[..., 1:] == vals[..., :-1]
        if bool(dup.any()):
            where = tuple(dup.nonzero()[0].tolist())
            raise ValueError(
                f"BlockLayout.kv_indices/full_kv_indices: key block {int(vals[where])} is listed "
                f"twice in row {list(where[:3])} (partial and full lists must be disjoint and "
                "free of repeats)"
            )
        return self

    # ------------------------------------------------------------------ conversions

    def to(self, device) -> BlockLayout:
        """The same layout with every tensor (and the cached transpose) on `device`; `self`
        when it is already there."""
        device = torch.device(device)

        def mv(t):
            return None if t is None else t.to(device)

        fields = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
        moved = {f: mv(getattr(self, f)) for f in fields}
        if all(moved[f] is getattr(self, f) for f in fields):
            return self  # already there: keep the object (and its cached transpose)
        new = dataclasses.replace(self, **moved)
        if self._transposed is not None:
            object.__setattr__(new, "_transposed", TransposedLayout(*map(mv, self._transposed)))
        return new

    def canonical(self) -> BlockLayout:
        """The same lists in canonical form: ascending within each row, 0 padding, common
        width max(1, largest count). Two layouts list the same blocks iff their canonical
        forms have equal tensors."""
        nkb = self.num_kv_blocks

        def packed(counts, idx):
            valid = _valid_mask(counts, idx.shape[-1])
            return _pack(torch.where(valid, idx.to(_I64), nkb), nkb)

        part = packed(self.kv_num_blocks, self.kv_indices)
        full = None
        if self.full_kv_num_blocks is not None:
            full = packed(self.full_kv_num_blocks, self.full_kv_indices)
        return _finish(self.q_len, self.kv_len, self.block_q, self.block_k, part, full, self.window)

    def refine(self) -> BlockLayout:
        """Reclassify the partial blocks by the window: blocks whose in-bounds elements are all
        visible become full, blocks with none visible are dropped. The attention is unchanged
        (a partial block only ever shows its window-visible elements). Canonical output."""
        nqb, nkb = self.num_q_blocks, self.num_kv_blocks
        idx = self.kv_indices.to(_I64)
        valid = _valid_mask(self.kv_num_blocks, idx.shape[-1])
        qb = torch.arange(nqb, dtype=_I64, device=idx.device).view(1, 1, nqb, 1)
        any_v, all_v = _window_block_visibility(
            qb, idx, self.q_len, self.kv_len, self.block_q, self.block_k, self.window
        )
        promote = valid & all_v
        keep = valid & any_v & ~all_v
        full_parts = [torch.where(promote, idx, nkb)]
        if self.full_kv_num_blocks is not None:
            fvalid = _valid_mask(self.full_kv_num_blocks, self.full_kv_indices.shape[-1])
            full_parts.append(torch.where(fvalid, self.full_kv_indices.to(_I64), nkb))
        full = _pack(torch.cat(full_parts, dim=-1), nkb)
        part = _pack(torch.where(keep, idx, nkb), nkb)
        return _finish(self.q_len, self.kv_len, self.block_q, self.block_k, part, full, self.window)

    # ------------------------------------------------------------------ statistics

    def num_computed_blocks(self, batch: int | None = None, heads: int | None = None) -> int:
        """Listed (partial + full) blocks summed over the stored (Bl, Hl); with `batch` /
        `heads`, counted as the kernels run them: a broadcast dim (1) is multiplied out."""
        total = int(self.kv_num_blocks.to(_I64).sum())
        if self.full_kv_num_blocks is not None:
            total += int(self.full_kv_num_blocks.to(_I64).sum())
        bl, hl = self.broadcast_shape
        for name, n, stored in (("batch", batch, bl), ("heads", heads, hl)):
            if n is None:
                continue
            if stored == 1:
                total *= n
            elif stored != n:
                raise ValueError(f"num_computed_blocks: {name} = {n} but the layout has {stored}")
        return total

    def density(self) -> float:
        """Fraction of the Bl·Hl·NQB·NKB blocks that are listed (computed)."""
        bl, hl = self.broadcast_shape
        total = bl * hl * self.num_q_blocks * self.num_kv_blocks
        return self.num_computed_blocks() / total

    def dense_block_mask(self, which: str = "all") -> Tensor:
        """Bool (Bl, Hl, NQB, NKB): the listed blocks (`which` = "all", "partial" or "full").
        O(blocks²) memory: for tests and small sizes only."""
        nkb = self.num_kv_blocks
        part = _lists_to_dense(self.kv_num_blocks, self.kv_indices, nkb)
        if which == "partial":
            return part
        if self.full_kv_num_blocks is None:
            full = torch.zeros_like(part)
        else:
            full = _lists_to_dense(self.full_kv_num_blocks, self.full_kv_indices, nkb)
        if which == "full":
            return full
        if which == "all":
            return part | full
        raise ValueError(
            f"dense_block_mask: which must be 'all', 'partial' or 'full', got {which!r}"
        )

    def dense_element_mask(self) -> Tensor:
        """Bool (Bl, Hl, Sq, Sk): key j visible to query i (full blocks wholly, partial blocks
        through the window). O(Sq·Sk) memory: for tests and references at small sizes only."""
        bq, bk, sq, sk = self.block_q, self.block_k, self.q_len, self.kv_len
        dev = self.device
        full = self.dense_block_mask("full")
        part = self.dense_block_mask("partial")
        rows = torch.arange(sq, device=dev) // bq
        cols = torch.arange(sk, device=dev) // bk
        full_e = full[:, :, rows][:, :, :, cols]
        part_e = part[:, :, rows][:, :, :, cols]
        return full_e | (part_e & window_element_mask(sq, sk, self.window, device=dev))

    def __repr__(self) -> str:
        bl, hl = self.broadcast_shape
        npart = int(self.kv_num_blocks.to(_I64).sum())
        nfull = 0 if self.full_kv_num_blocks is None else int(self.full_kv_num_blocks.sum())
        return (
            f"BlockLayout(q_len={self.q_len}, kv_len={self.kv_len}, "
            f"block=({self.block_q}, {self.block_k}), bh=({bl}, {hl}), "
            f"grid=({self.num_q_blocks}, {self.num_kv_blocks}), maxb={self.kv_indices.shape[-1]}, "
            f"partial={npart}, full={nfull}, window={self.window}, device={self.device})"
        )


def window_element_mask(q_len: int, kv_len: int, window, *, device=None) -> Tensor:
    """Bool (Sq, Sk): the window alone, i + o − left ≤ j ≤ i + o + right with o = Sk − Sq.
    O(Sq·Sk): tests and references only."""
    left, right = _check_window(window)
    i = torch.arange(q_len, device=device).unsqueeze(1)
    j = torch.arange(kv_len, device=device).unsqueeze(0)
    d = j - i - (kv_len - q_len)
    vis = torch.ones((q_len, kv_len), dtype=torch.bool, device=device)
    if left >= 0:
        vis &= d >= -left
    if right >= 0:
        vis &= d <= right
    return vis


# ------------------------------------------------------------------------------------ builders


def local_window_layout(
    q_len: int,
    kv_len: int,
    window=(-1, -1),
    *,
    causal: bool = False,
    block_q: int = 128,
    block_k: int = 128,
    device=None,
) -> BlockLayout:
    """The layout of the element window (FlashAttention's convention, module docstring).

    Query i sees key j iff i + o − left ≤ j ≤ i + o + right, o = kv_len − q_len, −1 unbounded;
    ``causal=True`` sets right = 0 (a window with right > 0 and causal is a ValueError).
    Blocks wholly inside the band (every in-bounds element visible, see the module docstring
    for the sequence ends) are full, blocks the band's edges cut are partial, the rest absent;
    rows that see nothing have count 0. Returns a (1, 1, NQB, ·) canonical layout holding
    `window`, built by per-row arithmetic in O(NQB · MAXB) memory.
    """
    q_len, kv_len, block_q, block_k = _check_positive(
        q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k
    )
    left, right = _check_window(window)
    if causal:
        if right > 0:
            raise ValueError(
                f"local_window_layout: causal=True needs window right of 0 or -1, got {right}"
            )
        right = 0
    win = (left, right)
    nkb = _cdiv(kv_len, block_k)
    part, full = _window_candidates(q_len, kv_len, block_q, block_k, win, device)
    return _finish(
        q_len, kv_len, block_q, block_k,
        _pack(part[None, None], nkb), _pack(full[None, None], nkb), win,
    )  # fmt: skip


def causal_layout(
    q_len: int, kv_len: int, *, block_q: int = 128, block_k: int = 128, device=None
) -> BlockLayout:
    """Bottom-right causal attention: `local_window_layout` with window (-1, 0)."""
    return local_window_layout(
        q_len, kv_len, (-1, 0), block_q=block_q, block_k=block_k, device=device
    )


def dilated_layout(
    q_len: int,
    kv_len: int,
    *,
    stride: int,
    window_blocks: int,
    block_q: int = 128,
    block_k: int = 128,
    causal: bool = False,
    device=None,
) -> BlockLayout:
    """Strided (dilated) block pattern.

    Let c(qb) = floor((i1 + kv_len − q_len) / block_k) be the key block of the aligned diagonal
    of query block qb's last row i1 (c = qb when q_len == kv_len and block_q == block_k).
    Query block qb reads the key blocks ::

        kb = c(qb) + m·stride,   m ∈ ℤ,   |kb − c(qb)| ≤ window_blocks,   0 ≤ kb < NKB

    (with ``causal``, only m ≤ 0). Without causal every listed block is full (window
    (-1, -1)); with causal the listed blocks keep window (-1, 0): blocks wholly below the
    diagonal are full, those the diagonal cuts partial. ``stride = 1`` is a block band.
    """
    q_len, kv_len, block_q, block_k, stride = _check_positive(
        q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k, stride=stride
    )
    (window_blocks,) = _check_nonneg(window_blocks=window_blocks)
    nkb = _cdiv(kv_len, block_k)
    c = _diagonal_key_block(q_len, kv_len, block_q, block_k, device)
    m_max = window_blocks // stride
    m = torch.arange(-m_max, 1 if causal else m_max + 1, dtype=_I64, device=device)
    cand = c[:, None] + m[None, :] * stride  # ascending in m; out-of-range = no entry
    nqb = c.numel()
    if not causal:
        empty = torch.full((nqb, 1), nkb, dtype=_I64, device=device)
        return _finish(
            q_len, kv_len, block_q, block_k,
            _pack(empty[None, None], nkb), _pack(cand[None, None], nkb), (-1, -1),
        )  # fmt: skip
    qb = torch.arange(nqb, dtype=_I64, device=device)[:, None]
    any_v, all_v = _window_block_visibility(
        qb, cand.clamp(0, nkb - 1), q_len, kv_len, block_q, block_k, (-1, 0)
    )
    in_range = (cand >= 0) & (cand < nkb)
    full = torch.where(in_range & all_v, cand, nkb)
    part = torch.where(in_range & any_v & ~all_v, cand, nkb)
    return _finish(
        q_len, kv_len, block_q, block_k,
        _pack(part[None, None], nkb), _pack(full[None, None], nkb), (-1, 0),
    )  # fmt: skip


def longformer_layout(
    q_len: int,
    kv_len: int,
    *,
    window,
    global_tokens: int,
    block_q: int = 128,
    block_k: int = 128,
    device=None,
) -> BlockLayout:
    """Longformer: a sliding window plus global tokens.

    ``window``: (left, right) in the module's convention, or an int w for (w, w).
    ``global_tokens`` g is rounded **up** to whole blocks, separately on each side: the first
    ``Gq = ceil(g / block_q)`` query blocks (rows i < Gq·block_q) attend to every key, and the
    first ``Gk = ceil(g / block_k)`` key blocks (keys j < Gk·block_k) are attended by every
    query. So query i sees key j iff i < Gq·block_q or j < Gk·block_k or the window shows j to
    i. Global blocks are full; the others are classified by the window exactly as in
    `local_window_layout` (partial blocks keep the window). Rows of global query blocks list
    all NKB key blocks, so MAXB = NKB whenever g > 0 (the padded form's price).
    """
    q_len, kv_len, block_q, block_k = _check_positive(
        q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k
    )
    (global_tokens,) = _check_nonneg(global_tokens=global_tokens)
    if isinstance(window, numbers.Integral) and not isinstance(window, bool):
        window = (window, window)
    win = _check_window(window)
    nqb, nkb = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
    gq = min(_cdiv(global_tokens, block_q), nqb)
    gk = min(_cdiv(global_tokens, block_k), nkb)
    part, full = _window_candidates(q_len, kv_len, block_q, block_k, win, device)
    # Window blocks inside the global key columns are full anyway (global wins).
    part = torch.where(part < gk, nkb, part)
    cols = torch.arange(gk, dtype=_I64, device=device).expand(nqb, gk)
    full = torch.cat([cols, full], dim=1)
    if gq > 0:
        width = max(full.shape[1], nkb)
        full = torch.cat([full, full.new_full((nqb, width - full.shape[1]), nkb)], dim=1)
        all_cols = torch.arange(width, dtype=_I64, device=device)  # >= nkb: no entry
        is_global = torch.arange(nqb, device=device)[:, None] < gq
        full = torch.where(is_global, all_cols, full)
        part = torch.where(is_global, nkb, part)
    return _finish(
        q_len, kv_len, block_q, block_k,
        _pack(part[None, None], nkb), _pack(full[None, None], nkb), win,
    )  # fmt: skip


def bigbird_layout(
    q_len: int,
    kv_len: int,
    *,
    window_blocks: int,
    global_blocks: int,
    random_blocks: int,
    block_q: int = 128,
    block_k: int = 128,
    seed: int = 0,
    num_heads: int = 1,
    device=None,
) -> BlockLayout:
    """BigBird block pattern: window + global + random key blocks, all full.

    With c(qb) as in `dilated_layout`, query block qb reads
      - global: key blocks kb < global_blocks; query blocks qb < global_blocks read every key
        block (and nothing else is needed for them);
      - window: |kb − c(qb)| ≤ window_blocks;
      - random: ``random_blocks`` further key blocks drawn uniformly without replacement from
        those not already listed (all of them if fewer remain), independently per query block
        and per head (``num_heads`` > 1 gives Hl = num_heads different patterns).
    Deterministic for a given seed (a CPU torch.Generator; Floyd's sampling, vectorised over
    rows, one step per random block). Window (-1, -1).
    """
    q_len, kv_len, block_q, block_k, num_heads = _check_positive(
        q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k, num_heads=num_heads
    )
    window_blocks, global_blocks, random_blocks = _check_nonneg(
        window_blocks=window_blocks, global_blocks=global_blocks, random_blocks=random_blocks
    )
    seed = as_int(seed, "seed")
    nqb, nkb = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
    g = min(global_blocks, nkb)
    c = _diagonal_key_block(q_len, kv_len, block_q, block_k)  # on CPU with the generator
    w0 = torch.clamp(c - window_blocks, min=0)
    w1 = torch.clamp(c + window_blocks, max=nkb - 1)
    w_empty = w0 > w1
    # Not yet listed: [g, NKB) minus the window [w0, w1] -> two intervals, sizes n1 and n2.
    w0 = torch.where(w_empty, nkb, w0)
    w1 = torch.where(w_empty, nkb - 1, w1)
    n1 = (torch.clamp(w0, max=nkb) - g).clamp(min=0)
    start2 = torch.clamp(w1 + 1, min=g)
    n2 = (nkb - start2).clamp(min=0)
    avail = (n1 + n2).expand(num_heads, nqb)
    r = random_blocks
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.full((num_heads, nqb, max(r, 1)), -1, dtype=_I64)
    for k in range(r):  # Floyd: after the last step, a uniform min(r, avail)-subset of [0, avail)
        j = avail - r + k
        t = (torch.rand((num_heads, nqb), generator=gen, dtype=torch.float64) * (j + 1)).long()
        t = torch.minimum(t, j)  # guard the float rounding edge
        taken = (chosen == t.unsqueeze(-1)).any(-1)
        chosen[..., k] = torch.where(j >= 0, torch.where(taken, j, t), -1)
    # Map u in [0, avail) onto the free key blocks.
    rnd = torch.where(chosen < n1[:, None], g + chosen, start2[:, None] + (chosen - n1[:, None]))
    rnd = torch.where(chosen >= 0, rnd, nkb)
    if r == 0:
        rnd = rnd[..., :0]
    win = (c[:, None] + torch.arange(-window_blocks, window_blocks + 1)).expand(num_heads, -1, -1)
    glob = torch.arange(g, dtype=_I64).expand(num_heads, nqb, g)
    full = torch.cat([glob, win, rnd], dim=-1)
    if global_blocks > 0:
        width = max(full.shape[-1], nkb)
        pad = full.new_full((num_heads, nqb, width - full.shape[-1]), nkb)
        full = torch.cat([full, pad], dim=-1)
        is_global = (torch.arange(nqb) < global_blocks)[:, None]
        full = torch.where(is_global, torch.arange(width, dtype=_I64), full)
    empty = torch.full((num_heads, nqb, 1), nkb, dtype=_I64)
    return _finish(
        q_len, kv_len, block_q, block_k,
        _pack(empty[None], nkb), _pack(full[None], nkb), (-1, -1), device,
    )  # fmt: skip


def from_block_mask_matrix(
    mask: Tensor,
    q_len: int,
    kv_len: int,
    block_q: int,
    block_k: int,
    *,
    full: Tensor | None = None,
    window=(-1, -1),
) -> BlockLayout:
    """Layout from a dense bool block matrix ``mask`` (Bl, Hl, NQB, NKB) (or (NQB, NKB)).

    Listed blocks are full, unless ``full`` (bool, same shape, a subset of ``mask``) is given:
    then ``mask & full`` are full and ``mask & ~full`` partial (with ``window``).
    """
    q_len, kv_len, block_q, block_k = _check_positive(
        q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k
    )
    win = _check_window(window)
    nqb, nkb = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)

    def as4d(name, t):
        if not isinstance(t, Tensor) or t.dtype != torch.bool:
            raise ValueError(f"from_block_mask_matrix: {name} must be a bool tensor")
        if t.dim() == 2:
            t = t[None, None]
        if t.dim() != 4 or tuple(t.shape[2:]) != (nqb, nkb):
            raise ValueError(
                f"from_block_mask_matrix: {name} must be (Bl, Hl, {nqb}, {nkb}) or "
                f"({nqb}, {nkb}), got {tuple(t.shape)}"
            )
        return t

    mask = as4d("mask", mask)
    if full is None:
        full_m, part_m = mask, torch.zeros_like(mask)
    else:
        full = as4d("full", full)
        if full.shape != mask.shape:
            raise ValueError(
                f"from_block_mask_matrix: full shape {tuple(full.shape)} != mask shape "
                f"{tuple(mask.shape)}"
            )
        if bool((full & ~mask).any()):
            raise ValueError("from_block_mask_matrix: full must be a subset of mask")
        full_m, part_m = mask & full, mask & ~full
    cols = torch.arange(nkb, dtype=_I64, device=mask.device)
    return _finish(
        q_len, kv_len, block_q, block_k,
        _pack(torch.where(part_m, cols, nkb), nkb), _pack(torch.where(full_m, cols, nkb), nkb),
        win,
    )  # fmt: skip


# ------------------------------------------------------------------------------ FlexAttention


def _window_mask_mod(q_len: int, kv_len: int, window):
    left, right = window
    offset = kv_len - q_len

    def window_mask(b, h, q_idx, kv_idx):
        # FlexAttention's indices are top-left aligned: shift to bottom-right ourselves.
        d = kv_idx - q_idx - offset
        vis = d == d  # all-True of the right shape (and traceable)
        if left >= 0:
            vis = vis & (d >= -left)
        if right >= 0:
            vis = vis & (d <= right)
        return vis

    return window_mask


def _window_alone_is_exact(layout: BlockLayout) -> bool:
    """True when the window alone, applied to every element, gives the layout's attention:
    every listed full block is wholly window-visible and every block the window touches is
    listed (partial blocks are window-masked anyway). O(listed blocks + NQB)."""
    sq, sk, bq, bk, win = layout.q_len, layout.kv_len, layout.block_q, layout.block_k, layout.window
    nqb = layout.num_q_blocks
    qb = torch.arange(nqb, dtype=_I64, device=layout.device).view(1, 1, nqb, 1)
    t0, t1, _, _ = _window_ranges(sq, sk, bq, bk, win, layout.device)
    touched = (t1 - t0 + 1).clamp(min=0)
    listed_touching = torch.zeros_like(layout.kv_num_blocks, dtype=_I64)
    lists = [(layout.kv_num_blocks, layout.kv_indices, False)]
    if layout.full_kv_num_blocks is not None:
        lists.append((layout.full_kv_num_blocks, layout.full_kv_indices, True))
    for counts, idx, is_full in lists:
        idx = idx.to(_I64)
        valid = _valid_mask(counts, idx.shape[-1])
        any_v, all_v = _window_block_visibility(qb, idx, sq, sk, bq, bk, win)
        if is_full and bool((valid & ~all_v).any()):
            return False
        listed_touching += (valid & any_v).sum(-1)
    return bool((listed_touching == touched).all())


def to_flex_block_mask(layout: BlockLayout, *, exact_mask_mod: bool | None = None):
    """FlexAttention ``BlockMask`` computing exactly this layout's attention.

    The lists are passed as they are (BLOCK_SIZE = (block_q, block_k), seq_lengths =
    (q_len, kv_len)); the transposed lists come from `BlockLayout.transposed` (not
    FlexAttention's dense transpose). FlexAttention's compiled kernels skip unlisted blocks and
    apply mask_mod on partial blocks only — exactly our semantics with the window as mask_mod.
    Its eager path, however, ignores the lists and applies mask_mod to every element, so there
    the mask_mod must carry the whole layout. Hence:

    - ``exact_mask_mod=False``: mask_mod = the window (shifted to bottom-right alignment).
    - ``exact_mask_mod=True``: visible iff the element's block is listed full, or listed partial
      and the window shows it, through a captured int8 block-status table (Bl, Hl, NQB, NKB)
      (O(blocks²) bytes, one gather per masked element).
    - ``None`` (default): the window alone when that is already exact for every element —
      every listed full block wholly window-visible and every window-touched block listed
      (e.g. `local_window_layout`, `causal_layout`) — else the table. Checked in O(listed).

    The mask_mod carries ``lrkernels_window`` (read back by `from_flex_block_mask`) and
    ``lrkernels_uses_table``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    win = layout.window
    window_mask = _window_mask_mod(layout.q_len, layout.kv_len, win)
    if exact_mask_mod is None:
        exact_mask_mod = not _window_alone_is_exact(layout)
    if exact_mask_mod:
        bq, bk = layout.block_q, layout.block_k
        bl, hl = layout.broadcast_shape
        status = layout.dense_block_mask("partial").to(torch.int8)
        status = torch.where(layout.dense_block_mask("full"), 2, status).to(torch.int8)

        def mask_mod(b, h, q_idx, kv_idx):
            s = status[b if bl > 1 else 0, h if hl > 1 else 0, q_idx // bq, kv_idx // bk]
            return (s == 2) | ((s == 1) & window_mask(b, h, q_idx, kv_idx))

    else:
        mask_mod = window_mask
    mask_mod.lrkernels_window = win
    mask_mod.lrkernels_uses_table = bool(exact_mask_mod)
    t = layout.transposed()
    # FlexAttention's own lists are as wide as the other side's block count, and torch < 2.13
    # relies on it (its list-to-dense conversion writes one slot past the width: our trimmed
    # lists make it index out of bounds). Pad to that width; the entries past the counts are 0.
    nqb, nkb = layout.num_q_blocks, layout.num_kv_blocks

    def wide(indices, width):
        return None if indices is None else _fit_width(indices, width).contiguous()

    return BlockMask(
        seq_lengths=(layout.q_len, layout.kv_len),
        kv_num_blocks=layout.kv_num_blocks,
        kv_indices=wide(layout.kv_indices, nkb),
        full_kv_num_blocks=layout.full_kv_num_blocks,
        full_kv_indices=wide(layout.full_kv_indices, nkb),
        q_num_blocks=t.q_num_blocks,
        q_indices=wide(t.q_indices, nqb),
        full_q_num_blocks=t.full_q_num_blocks,
        full_q_indices=wide(t.full_q_indices, nqb),
        BLOCK_SIZE=(layout.block_q, layout.block_k),
        mask_mod=mask_mod,
    )


def from_flex_block_mask(block_mask, *, window=None, refine: bool = False) -> BlockLayout:
    """BlockLayout from a FlexAttention ``BlockMask`` (4-D lists: (B or 1, H or 1, NQB, ·)).

    The caller asserts that the BlockMask's mask_mod, on its partial blocks, is the element
    window ``window`` in this module's convention (None: the window recorded by
    `to_flex_block_mask`, else (-1, -1)). Lists are canonicalised (ascending, trimmed width).
    ``refine=True`` also reclassifies partial blocks by that window (`BlockLayout.refine`):
    e.g. ``create_block_mask`` calls the padded last blocks partial even when every in-bounds
    element is visible; refined, its layout equals `local_window_layout`'s.
    """
    if window is None:
        window = getattr(block_mask.mask_mod, "lrkernels_window", (-1, -1))
    win = _check_window(window)
    if block_mask.kv_indices.dim() != 4:
        raise ValueError(
            f"from_flex_block_mask: expected 4-D kv_indices, got {tuple(block_mask.kv_indices.shape)}"
        )
    q_len, kv_len = (int(x) for x in block_mask.seq_lengths)
    block_q, block_k = (int(x) for x in block_mask.BLOCK_SIZE)
    full_num, full_idx = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    layout = BlockLayout(
        q_len=q_len,
        kv_len=kv_len,
        block_q=block_q,
        block_k=block_k,
        kv_num_blocks=block_mask.kv_num_blocks.to(_I32),
        kv_indices=block_mask.kv_indices.to(_I32),
        full_kv_num_blocks=None if full_num is None else full_num.to(_I32),
        full_kv_indices=None if full_idx is None else full_idx.to(_I32),
        window=win,
    )
    return layout.refine() if refine else layout.canonical()
