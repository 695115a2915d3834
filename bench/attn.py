"""Benchmark of lrkernels' sparse attention (local window and block-sparse patterns) against
FlexAttention and SDPA, side by side.

    python bench/attn.py                    # full sweep (GPU if one is visible, else a CPU sweep)
    python bench/attn.py --quick            # GPU: S 4k/16k, causal window 512, D 128, bf16, fwd+bwd
    python bench/attn.py --headline         # the goals' problems: S 16k window 512 fwd + bwd,
                                            # dense causal 8k fwd (D 128, B·H 32, bf16)
    python bench/attn.py --write-table      # also record the times in the dispatch table
    python bench/attn.py --seq 4096 65536 --window c512 s256 --head-dim 128 --pass fwd bwd \\
        --pattern local causal --providers lrkernels-cuda,flex-attention,sdpa-causal

Problems: q (B, Hq, S, D), k and v (B, Hkv, S, D) ~ N(0, 1), scale 1/sqrt(D), dout ~ N(0, 1).
Patterns (--pattern): local (one per --window), causal (dense causal as a block layout: the
no-sparsity baseline), longformer, bigbird, dilated (built by lrkernels.masks with the
parameters listed in the `pattern_args` column). Windows (--window): cW = causal window of W
keys per query, itself included (left = W-1, right = 0); sW = symmetric, W keys on each side
(left = right = W); L:R = explicit FlashAttention window (-1 = unbounded). Every problem uses
one prebuilt lrkernels.masks.BlockLayout of --block-q x --block-k tiles (default 128 x 128 on
GPU, 64 x 64 on CPU), and every provider gets that same mask.

Providers: lrkernels-cuda, lrkernels-triton, lrkernels-cpu (lrkernels.block_sparse_attention
with that backend); flex-attention (torch.compile(flex_attention, dynamic=False) with
lrkernels.masks.to_flex_block_mask of the layout: the speedup baseline); sdpa-masked
(F.scaled_dot_product_attention with the dense boolean mask, S <= 8192 on GPU / 1024 on CPU:
O(S^2) memory and work); sdpa-causal (dense causal SDPA, is_causal=True, on a GPU its flash
backend only: what no sparsity costs; its time does not depend on the window, so it is measured
once per shape and pass and reused); reference (lrkernels' torch backend, S <= 4096 on GPU). The
backends and reference are the dispatch paths whose times --write-table records (inference
classes from fwd, training classes from fwd+bwd or the sum of fwd and bwd).

Passes (--pass): fwd (out only, no autograd), bwd (the gradients of q, k, v from a saved
forward: autograd.grad with retain_graph), fwd+bwd (both).

Cross-check before timing: every provider's out (and dq, dk, dv for bwd passes) is compared with
lrkernels' torch backend run in float32 on the same inputs (dense, so one batch and kv-head
group at a time; on a GPU only batch 0's first group, --check-heads: seconds, not minutes),
where that is affordable (GPU: S <= 32k with MHA, 16k with GQA 4:1); beyond, with the output of
lrkernels-triton (or -cuda), which must itself agree with another implementation
(lrkernels-cuda, else FlexAttention). lrkernels-cuda and lrkernels-triton must also agree with
each other on every output element. Bounds per dtype from bench.harness (twice those for
gradients). A wrong provider is FAILED, never timed, and makes the exit status 1. sdpa-causal is
checked against the dense causal result.

FLOPs (FlashAttention's convention, lrkernels.roofline.attention_cost): forward 4·D per
visible (query, key) pair (two matmuls, 2 FLOPs a multiply-add), backward 2.5x that, fwd+bwd
3.5x. "useful" counts the pairs the mask lets through (counted exactly: per query row in closed
form for windows, per listed block from the layout); "computed" counts whole block_q x block_k
tiles of the layout (what a block-sparse kernel does; SDPA with a dense mask computes every
tile, dense causal SDPA the lower triangle). TFLOP/s, the roofline and the targets use computed
FLOPs; useful_tflops is in the CSV. Bytes: q, k, v, out (+ float32 lse) for fwd; + dout, dq, dk,
dv for bwd (+ the boolean mask for sdpa-masked). Roofline: max(computed FLOPs / measured matmul
peak, bytes / measured copy bandwidth). Peak memory: torch.cuda.max_memory_allocated during one
call, minus what was allocated before it (n/a on CPU).

Rows go to <out>/attn-<device>.csv (after every problem); the headline config's time-vs-S chart
(log-log, with a slope-1 line) to <out>/attn-<device>.svg; a "linearity" line per provider:
time(64k)/time(4k) / 16 (1.0 = linear in S). On a CPU the sweep is small and says so.

Goals (issue 10; H100/H200, bf16; PASS/MISS, not asserts): at S=16k, causal window 512, D 128,
B·H 32: forward >= 300 TFLOP/s on computed blocks in <= 0.9x compiled FlexAttention's time,
backward >= 200 TFLOP/s in <= 1.0x its time; dense causal S=8k forward >= 0.8x the speed of
SDPA's flash backend; time within 10% of linear in S from 4k to 64k.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

import lrkernels
from bench import harness
from bench.harness import Provider, ProviderSkip, Row
from bench.plot import write_svg
from lrkernels import _ext, dispatch
from lrkernels.roofline import DevicePeaks, attention_cost, roofline_time

OP = "block_sparse_attention"
BASELINE = "flex-attention"
DENSE_BASELINE = "sdpa-causal"
ALL_PROVIDERS = [
    "lrkernels-cuda",
    "lrkernels-triton",
    "lrkernels-cpu",
    "flex-attention",
    "sdpa-masked",
    "sdpa-causal",
    "reference",
]
PATTERNS = ("local", "causal", "longformer", "bigbird", "dilated")
PASSES = ("fwd", "bwd", "fwd+bwd")
DTYPES = harness.DTYPES
DISPATCH_PATHS = {
    "lrkernels-cuda": "cuda",
    "lrkernels-triton": "triton",
    "lrkernels-cpu": "cpu",
    "reference": "torch",
}
# Per (device, quick): the sweep. The first value of each list is the headline one (run first).
# kv_heads None means "Hq and Hq / 4" (MHA and its GQA variant).
SWEEPS: dict[tuple[str, bool], dict] = {
    ("cuda", False): {
        "seq": [1024, 2048, 4096, 8192, 16384, 32768, 65536],
        "window": ["c512", "c256", "c1024", "s256"],
        "head_dim": [128, 64],
        "batch": [2],
        "heads": [16],
        "kv_heads": None,
        "dtype": ["bf16", "fp16"],
        "pass": list(PASSES),
        "pattern": list(PATTERNS),
    },
    ("cuda", True): {
        "seq": [4096, 16384],
        "window": ["c512"],
        "head_dim": [128],
        "batch": [2],
        "heads": [16],
        "kv_heads": [16],
        "dtype": ["bf16"],
        "pass": ["fwd", "bwd"],
        "pattern": ["local"],
    },
    ("cpu", False): {
        "seq": [256, 512, 1024],
        "window": ["c128", "c256", "s64"],
        "head_dim": [64],
        "batch": [1],
        "heads": [4],
        "kv_heads": None,
        "dtype": ["fp32"],
        "pass": list(PASSES),
        "pattern": list(PATTERNS),
    },
    ("cpu", True): {
        "seq": [128, 256],
        "window": ["c64"],
        "head_dim": [32],
        "batch": [1],
        "heads": [2],
        "kv_heads": [2],
        "dtype": ["fp32"],
        "pass": ["fwd", "bwd"],
        "pattern": ["local"],
    },
}
# headline config: (pattern, window, D, dtype, B, Hq, Hkv); the plot and the linearity line
HEADLINE = {
    "cuda": ("local", (511, 0), 128, "bfloat16", 2, 16, 16),
    "cpu": ("local", (127, 0), 64, "float32", 1, 4, 4),
}
# default layout blocks: the GPU kernels' tile; smaller on CPU, where the sizes are small
BLOCK = {"cuda": 128, "cpu": 64}
# --headline: (pattern, window, S, D, B, Hq, Hkv, dtype, passes) — the problems the goals name;
# on a CPU, small stand-ins that run the same code paths
HEADLINE_PROBLEMS = {
    "cuda": [
        ("local", "c512", 16384, 128, 2, 16, 16, "bf16", ("fwd", "bwd")),
        ("causal", None, 8192, 128, 2, 16, 16, "bf16", ("fwd",)),
    ],
    "cpu": [
        ("local", "c64", 256, 32, 1, 2, 2, "fp32", ("fwd", "bwd")),
        ("causal", None, 256, 32, 1, 2, 2, "fp32", ("fwd",)),
    ],
}
TARGET_SEQ = 16384
CAUSAL_TARGET_SEQ = 8192
LINEARITY_SEQ = (4096, 65536)
# issue 10: forward >= 300 TFLOP/s and <= 0.9x FlexAttention's time; backward >= 200 TFLOP/s and
# <= 1.0x FlexAttention's; dense causal 8k forward >= 0.8x SDPA's flash backend; time within 10%
# of linear in S
TARGETS = {
    "fwd_tflops": 300.0,
    "bwd_tflops": 200.0,
    "fwd_time_vs_flex": 0.9,
    "bwd_time_vs_flex": 1.0,
    "causal_vs_sdpa": 0.8,
    "linearity": 0.10,
}
SDPA_MASKED_MAX_SEQ = {"cuda": 8192, "cpu": 1024}
REFERENCE_MAX_SEQ = {"cuda": 4096, "cpu": 1 << 30}
# The float32 torch-backend check (dense: Sq x Sk scores) runs one (batch, kv head) group of
# heads at a time; it is used where one group's scores fit this many elements (GPU: S <= 32k
# with MHA, 16k with 4 query heads per kv head), else the agreement check.
REF_MAX_CHUNK_SCORES = {"cuda": 1 << 30, "cpu": 1 << 26}
GRAD_BOUND_FACTOR = 2.0
REPO = Path(__file__).resolve().parents[1]


def _masks():
    """lrkernels.masks, imported when first needed (the module may be missing)."""
    return importlib.import_module("lrkernels.masks")


def ops_missing() -> str | None:
    """Why the attention ops cannot be benchmarked here (None when they can)."""
    if not hasattr(lrkernels, "block_sparse_attention"):
        return "lrkernels.block_sparse_attention does not exist"
    try:
        m = _masks()
    except ImportError as e:
        return f"lrkernels.masks cannot be imported ({e})"
    if not hasattr(m, "local_window_layout"):
        return "lrkernels.masks has no local_window_layout"
    return None


# ------------------------------------------------------------------------------ cost model


def _row_ranges(Sq: int, Sk: int, window: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per query row i, the first and last visible key (lo > hi: none), FlashAttention's
    window aligned to the bottom right: i + Sk - Sq - left <= j <= i + Sk - Sq + right."""
    left, right = window
    diag = np.arange(Sq, dtype=np.int64) + (Sk - Sq)
    lo = np.maximum(diag - left, 0) if left >= 0 else np.zeros(Sq, dtype=np.int64)
    hi = np.minimum(diag + right, Sk - 1) if right >= 0 else np.full(Sq, Sk - 1, dtype=np.int64)
    return lo, hi


def window_visible_pairs(Sq: int, Sk: int, window: tuple[int, int]) -> int:
    """Number of (i, j) a window lets through for one (batch, head), in closed form per row."""
    lo, hi = _row_ranges(Sq, Sk, window)
    return int(np.clip(hi - lo + 1, 0, None).sum())


def window_num_blocks(Sq: int, Sk: int, window: tuple[int, int], block_q: int, block_k: int) -> int:
    """Key blocks a window touches, summed over query blocks, for one (batch, head). A row's
    range moves by one key per row, so a query block's visible keys form one interval."""
    lo, hi = _row_ranges(Sq, Sk, window)
    empty = lo > hi
    nqb = -(-Sq // block_q)
    pad = nqb * block_q - Sq
    lo = np.concatenate([np.where(empty, np.iinfo(np.int64).max, lo), np.full(pad, Sk)])
    hi = np.concatenate([np.where(empty, -1, hi), np.full(pad, -1)])
    first = lo.reshape(nqb, block_q).min(1)
    last = hi.reshape(nqb, block_q).max(1)
    has = last >= 0
    return int((last[has] // block_k - first[has] // block_k + 1).sum())


@dataclasses.dataclass
class LayoutInfo:
    """The block lists of a layout as numpy arrays, plus its element window and broadcast."""

    num: np.ndarray  # (Bl, Hl, NQB) partial blocks per query block
    idx: np.ndarray  # (Bl, Hl, NQB, MAXB)
    full_num: np.ndarray | None
    full_idx: np.ndarray | None
    window: tuple[int, int]
    block_q: int
    block_k: int


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.int64) if torch.is_tensor(t) else np.asarray(t)


def layout_info(layout, block_q: int, block_k: int) -> LayoutInfo:
    """Reads a lrkernels.masks.BlockLayout (anything with its attributes)."""
    full_num = getattr(layout, "full_kv_num_blocks", None)
    full_idx = getattr(layout, "full_kv_indices", None)
    window = getattr(layout, "window", None)
    return LayoutInfo(
        num=_np(layout.kv_num_blocks),
        idx=_np(layout.kv_indices),
        full_num=None if full_num is None else _np(full_num),
        full_idx=None if full_idx is None else _np(full_idx),
        window=(-1, -1) if window is None else (int(window[0]), int(window[1])),
        block_q=int(getattr(layout, "block_q", block_q)),
        block_k=int(getattr(layout, "block_k", block_k)),
    )


def _listed(num: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query block, key block) of every listed entry (entries past the count are ignored)."""
    valid = np.arange(idx.shape[-1]) < num[..., None]
    qb = np.broadcast_to(np.arange(idx.shape[2])[None, None, :, None], idx.shape)
    return qb[valid], idx[valid]


def layout_counts(layout, Sq: int, Sk: int, B: int, Hq: int, block_q=128, block_k=128):
    """(visible pairs, listed blocks), totals over the B·Hq (batch, head) pairs: full blocks
    count their in-bounds rows x columns, partial blocks the pairs their window lets through."""
    info = layout if isinstance(layout, LayoutInfo) else layout_info(layout, block_q, block_k)
    bq, bk = info.block_q, info.block_k
    Bl, Hl = info.num.shape[:2]
    if B % Bl or Hq % Hl:
        raise ValueError(f"layout broadcast ({Bl}, {Hl}) does not fit B={B}, Hq={Hq}")
    reps = (B // Bl) * (Hq // Hl)
    nqb = info.num.shape[2]
    lo, hi = _row_ranges(Sq, Sk, info.window)
    pad = nqb * bq - Sq
    lo = np.concatenate([lo, np.full(max(pad, 0), 1)])[: nqb * bq].reshape(nqb, bq)
    hi = np.concatenate([hi, np.full(max(pad, 0), 0)])[: nqb * bq].reshape(nqb, bq)
    pairs = 0
    qb, kb = _listed(info.num, info.idx)
    blocks = len(qb)
    for s in range(0, len(qb), 1 << 14):  # bounded memory: 16k blocks x block_q rows at a time
        q_, k0 = qb[s : s + (1 << 14)], kb[s : s + (1 << 14)] * bk
        a = np.maximum(lo[q_], k0[:, None])
        b = np.minimum(hi[q_], np.minimum(k0 + bk, Sk)[:, None] - 1)
        pairs += int(np.clip(b - a + 1, 0, None).sum())
    if info.full_num is not None and info.full_idx is not None:
        fq, fk = _listed(info.full_num, info.full_idx)
        blocks += len(fq)
        rows = np.minimum((fq + 1) * bq, Sq) - fq * bq
        cols = np.minimum((fk + 1) * bk, Sk) - fk * bk
        pairs += int((np.clip(rows, 0, None) * np.clip(cols, 0, None)).sum())
    return pairs * reps, blocks * reps


def window_mask(Sq: int, Sk: int, window: tuple[int, int], device) -> torch.Tensor:
    """(Sq, Sk) bool: the window's visible pairs (bottom-right aligned)."""
    left, right = window
    i = torch.arange(Sq, device=device)[:, None] + (Sk - Sq)
    j = torch.arange(Sk, device=device)[None, :]
    m = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    if left >= 0:
        m &= j >= i - left
    if right >= 0:
        m &= j <= i + right
    return m


def dense_mask(layout, Sq: int, Sk: int, device, block_q=128, block_k=128) -> torch.Tensor:
    """(Bl, Hl, Sq, Sk) bool of a block layout: full blocks entirely, partial blocks through the
    window. O(S^2) memory: for the sdpa-masked provider and tests only."""
    info = layout if isinstance(layout, LayoutInfo) else layout_info(layout, block_q, block_k)
    bq, bk = info.block_q, info.block_k
    nkb = -(-Sk // bk)

    def blockmap(num, idx) -> torch.Tensor:
        num_t = torch.as_tensor(num, device=device)
        idx_t = torch.as_tensor(idx, device=device)
        valid = torch.arange(idx_t.shape[-1], device=device) < num_t[..., None]
        m = torch.zeros(*idx_t.shape[:3], nkb + 1, dtype=torch.bool, device=device)
        spare = torch.where(valid, idx_t.long().clamp(0, nkb), nkb)  # unused entries: spare column
        m.scatter_(-1, spare, True)
        return m[..., :nkb]

    def expand(m: torch.Tensor) -> torch.Tensor:
        return m.repeat_interleave(bq, -2).repeat_interleave(bk, -1)[..., :Sq, :Sk]

    out = expand(blockmap(info.num, info.idx)) & window_mask(Sq, Sk, info.window, device)
    if info.full_num is not None and info.full_idx is not None:
        out |= expand(blockmap(info.full_num, info.full_idx))
    return out


# ------------------------------------------------------------------------------ problems


def parse_window(text: str) -> tuple[int, int]:
    """cW -> (W-1, 0) (W keys, itself included); sW -> (W, W); W -> cW; L:R -> (L, R)."""
    t = str(text).strip().lower()
    try:
        if ":" in t:
            left, right = (int(p) for p in t.split(":"))
            if left < -1 or right < -1:
                raise ValueError
            return left, right
        if t.startswith("s"):
            w = int(t[1:])
            if w < 0:
                raise ValueError
            return w, w
        w = int(t[1:] if t.startswith("c") else t)
        if w < 1:
            raise ValueError
        return w - 1, 0
    except ValueError:
        raise SystemExit(
            f"--window: expected cW (causal, W keys), sW (W each side) or L:R, got {text!r}"
        ) from None


def window_label(window: tuple[int, int]) -> str:
    left, right = window
    if right == 0 and left >= 0:
        return f"causal {left + 1}"
    if left == right and left >= 0:
        return f"symmetric {left}"
    return f"{left}:{right}"


@dataclasses.dataclass(frozen=True)
class Problem:
    pattern: str
    window: tuple[int, int] | None  # the local pattern's window (None for the others)
    S: int
    D: int
    B: int
    Hq: int
    Hkv: int
    dtype: torch.dtype
    block_q: int
    block_k: int

    @property
    def dname(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def config(self) -> tuple:
        """What the headline and the plot group by (everything but S)."""
        return (self.pattern, self.window, self.D, self.dname, self.B, self.Hq, self.Hkv)

    def describe(self) -> str:
        what = f"local {window_label(self.window)}" if self.window else self.pattern
        return (
            f"{what}, S={self.S}, D={self.D}, B={self.B}, Hq={self.Hq}, Hkv={self.Hkv}, "
            f"{self.dname}, blocks {self.block_q}x{self.block_k}"
        )


def pattern_params(pattern: str, width: int, block_q: int, block_k: int, heads: int) -> dict:
    """The parameters the bench gives a block-pattern builder of lrkernels.masks; `width` is the
    headline window's size (keys). Only those a builder takes are passed (see _call_builder)."""
    half = max(width // 2, 1)
    if pattern == "causal":
        return {}
    if pattern == "longformer":  # symmetric window + global tokens (one block), encoder
        return {"window": (half, half), "global_tokens": block_q}
    if pattern == "bigbird":  # 3-block window, 1 global block, 2 random blocks, per head
        return {
            "window_blocks": 1,
            "global_blocks": 1,
            "random_blocks": 2,
            "seed": 0,
            "num_heads": heads,
        }
    if pattern == "dilated":  # causal, every other key block over twice the window's reach
        return {"stride": 2, "window_blocks": max(2 * width // block_k, 1), "causal": True}
    raise ValueError(f"unknown pattern {pattern!r}")


class LayoutSkip(Exception):
    """The bench cannot build this pattern's layout here (missing builder, unknown parameters)."""


def _call_builder(fn: Callable, values: dict) -> tuple[object, str]:
    """fn(**the values it takes); its required parameters must all be known. Returns the layout
    and the non-size arguments passed, as text."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as e:
        raise LayoutSkip(f"cannot read the signature of {fn.__name__}: {e}") from e
    kwargs, missing = {}, []
    for name, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in values:
            kwargs[name] = values[name]
        elif p.default is p.empty:
            missing.append(name)
    if missing:
        raise LayoutSkip(
            f"lrkernels.masks.{fn.__name__}{inspect.signature(fn)} needs {missing}, which the "
            "bench does not know how to fill"
        )
    sizes = {"q_len", "kv_len", "block_q", "block_k", "device"}
    told = ",".join(f"{k}={v}" for k, v in kwargs.items() if k not in sizes).replace(" ", "")
    return fn(**kwargs), told


def build_layout(prob: Problem, width: int, device) -> tuple[object, str]:
    """The problem's BlockLayout (on `device` when the layout has .to) and its pattern args.
    Raises LayoutSkip where this bench cannot build it; other errors propagate (a bug)."""
    m = _masks()
    S, bq, bk = prob.S, prob.block_q, prob.block_k
    if prob.pattern == "local":
        left, right = prob.window
        layout = m.local_window_layout(
            S, S, (left, right), causal=right == 0, block_q=bq, block_k=bk
        )
        told = f"window={left}:{right}"
    else:
        values = {"q_len": S, "kv_len": S, "block_q": bq, "block_k": bk, "device": device}
        values |= pattern_params(prob.pattern, width, bq, bk, prob.Hq)
        builder = getattr(m, f"{prob.pattern}_layout", None)
        if builder is None and prob.pattern == "causal":
            layout = m.local_window_layout(S, S, (-1, 0), causal=True, block_q=bq, block_k=bk)
            told = "window=-1:0 (local_window_layout)"
        elif builder is None:
            raise LayoutSkip(f"lrkernels.masks has no {prob.pattern}_layout")
        else:
            layout, told = _call_builder(builder, values)
    if hasattr(layout, "to"):
        layout = layout.to(device)
    return layout, told


def make_inputs(prob: Problem, device, seed: int) -> dict[str, torch.Tensor]:
    """q, k, v, dout ~ N(0, 1); the same seed for the same shape and dtype, whatever the
    pattern, so that pattern-independent providers can reuse a measurement."""
    key = f"{prob.S},{prob.D},{prob.B},{prob.Hq},{prob.Hkv},{prob.dname}".encode()
    g = torch.Generator(device=device).manual_seed(seed + zlib.crc32(key) % 1_000_003)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g).to(prob.dtype)

    return {
        "q": randn(prob.B, prob.Hq, prob.S, prob.D),
        "k": randn(prob.B, prob.Hkv, prob.S, prob.D),
        "v": randn(prob.B, prob.Hkv, prob.S, prob.D),
        "dout": randn(prob.B, prob.Hq, prob.S, prob.D),
    }


# ------------------------------------------------------------------------------ providers


def pass_callable(op: Callable, inp: dict) -> Callable[[], object]:
    """The callable one pass times, from op(q, k, v) -> out. fwd: out (no autograd); bwd: out
    (computed once, here) and the gradients (autograd.grad with retain_graph, every call);
    fwd+bwd: both, every call. Non-fwd passes return (out, dq, dk, dv)."""
    q, k, v, dout, pas = inp["q"], inp["k"], inp["v"], inp["dout"], inp["pass"]
    if pas == "fwd":

        def fwd():
            with torch.no_grad():
                return op(q, k, v)

        return fwd
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    if pas == "bwd":
        out = op(qg, kg, vg)

        def bwd():
            return (out, *torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True))

        return bwd

    def fwd_bwd():
        o = op(qg, kg, vg)
        return (o, *torch.autograd.grad(o, (qg, kg, vg), dout))

    return fwd_bwd


def _lrk_op(inp: dict, backend: str, layout=None) -> Callable:
    layout = inp["layout"] if layout is None else layout
    scale = inp["scale"]

    def op(q, k, v):
        return lrkernels.block_sparse_attention(q, k, v, layout, scale=scale, backend=backend)

    return op


def _reasons(backend: str, inp: dict) -> list[str]:
    try:
        return list(
            lrkernels.not_supported_reasons(
                OP, backend, inp["q"], inp["k"], inp["v"], inp["layout"]
            )
        )
    except ValueError as e:  # the op is not registered
        return [str(e)]


def _extension_missing(backend: str, grads: bool) -> str | None:
    """Why the compiled extension cannot serve `backend` (None: it can, or not compiled)."""
    if backend not in ("cuda", "cpu"):
        return None
    key = backend.upper()
    for op in ("block_sparse_attention_fwd", "block_sparse_attention_bwd")[: 1 + grads]:
        if not _ext.has_kernel_for(op, key):
            return f"the extension was built without the {op} {key} kernel"
    return None


def _backend_provider(name: str, backend: str) -> Provider:
    def build(inp: dict):
        reasons = _reasons(backend, inp)
        if reasons:
            raise ProviderSkip("; ".join(reasons))
        missing = _extension_missing(backend, inp["pass"] != "fwd")
        if missing:
            raise ProviderSkip(missing)
        return pass_callable(_lrk_op(inp, backend), inp)

    return Provider(name, build)


def _reference_build(inp: dict):
    limit = REFERENCE_MAX_SEQ[inp["device"].type]
    if inp["prob"].S > limit:
        raise ProviderSkip(f"the torch backend is timed at S <= {limit} only (small sizes)")
    reasons = _reasons("torch", inp)
    if reasons:
        raise ProviderSkip("; ".join(reasons))
    return pass_callable(_lrk_op(inp, "torch"), inp)


_FLEX: dict[str, Callable] = {}


def _compiled_flex() -> Callable:
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        # one static compile per shape: torch 2.14's automatic dynamic shapes break flex's
        # lowering here (CPU: "'Mul' object has no attribute 'get_name'", C++ errors)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _widen_lists(layout, width: int):
    """The same layout with its block lists padded to `width` entries (padding is ignored:
    it lies past each row's count)."""
    changes = {}
    for name in ("kv_indices", "full_kv_indices"):
        t = getattr(layout, name, None)
        if t is not None and t.shape[-1] < width:
            changes[name] = F.pad(t, (0, width - t.shape[-1]))
    return dataclasses.replace(layout, **changes) if changes else layout


def _flex_build(inp: dict):
    if inp["device"].type == "cpu" and inp["pass"] != "fwd":
        raise ProviderSkip("FlexAttention has no backward on CPU")
    m = _masks()
    if not hasattr(m, "to_flex_block_mask"):
        raise ProviderSkip("lrkernels.masks has no to_flex_block_mask")
    try:
        if "flex_mask" not in inp["cache"]:
            layout = inp["layout"]
            if inp["device"].type == "cpu":  # flex's CPU kernel wants lists NKB entries wide
                layout = _widen_lists(layout, -(-inp["prob"].S // inp["prob"].block_k))
            inp["cache"]["flex_mask"] = m.to_flex_block_mask(layout)
        block_mask = inp["cache"]["flex_mask"]
        flex = _compiled_flex()
        gqa = inp["prob"].Hq != inp["prob"].Hkv
        scale = inp["scale"]

        def op(q, k, v):
            return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)

        fn = pass_callable(op, inp)
        fn()  # compile now, outside the check and the timing
    except Exception as e:  # no compiler, inductor limits, ...: torch's limitation, reported
        raise ProviderSkip(
            f"torch.compile(flex_attention) failed: {type(e).__name__}: {harness._one_line(e)}"
        ) from e
    return fn


def _sdpa_masked_build(inp: dict):
    prob, dev = inp["prob"], inp["device"].type
    if prob.S > SDPA_MASKED_MAX_SEQ[dev]:
        raise ProviderSkip(
            f"S={prob.S} > {SDPA_MASKED_MAX_SEQ[dev]}: a dense S x S mask and SDPA's masked "
            "kernels are O(S^2) in memory and work"
        )
    mask = inp["cache"].get("dense_mask")
    if mask is None:
        mask = dense_mask(inp["layout_info"], prob.S, prob.S, inp["device"])
        inp["cache"]["dense_mask"] = mask
    if not bool(mask.any(-1).all()):
        raise ProviderSkip("some query rows see no key: SDPA returns NaN there, the op 0")
    gqa, scale = prob.Hq != prob.Hkv, inp["scale"]

    def op(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)

    return pass_callable(op, inp)


def _sdpa_causal_build(inp: dict):
    """Dense causal SDPA: on a GPU its flash backend only (the yardstick of the dense causal
    goal), skipped with torch's reason where flash refuses the case; on a CPU torch's choice."""
    prob = inp["prob"]
    gqa, scale = prob.Hq != prob.Hkv, inp["scale"]
    if inp["device"].type != "cuda":

        def op(q, k, v):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=gqa
            )

        return pass_callable(op, inp)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if prob.dtype not in (torch.float16, torch.bfloat16):
        raise ProviderSkip(f"SDPA's flash backend takes float16 / bfloat16, not {prob.dname}")

    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=gqa
            )

    try:
        fn = pass_callable(flash, inp)
        fn()
    except RuntimeError as e:  # flash refuses the case: torch's limitation, reported
        raise ProviderSkip(f"SDPA's flash backend refused: {harness._one_line(e)}") from e
    return fn


def make_providers(names: list[str]) -> list[Provider]:
    table = {
        "lrkernels-cuda": _backend_provider("lrkernels-cuda", "cuda"),
        "lrkernels-triton": _backend_provider("lrkernels-triton", "triton"),
        "lrkernels-cpu": _backend_provider("lrkernels-cpu", "cpu"),
        "flex-attention": Provider("flex-attention", _flex_build),
        "sdpa-masked": Provider("sdpa-masked", _sdpa_masked_build),
        "sdpa-causal": Provider("sdpa-causal", _sdpa_causal_build),
        "reference": Provider("reference", _reference_build),
    }
    return [table[n] for n in names]


# ------------------------------------------------------------------------------ costs


@dataclasses.dataclass
class Work:
    """What one function of the problem costs: visible pairs and listed blocks (totals over
    B·Hq) and the dense-mask bytes it reads (sdpa-masked)."""

    pairs: int
    blocks: int
    extra_bytes: int = 0


def provider_work(name: str, inp: dict) -> Work:
    prob = inp["prob"]
    if name == "sdpa-masked":  # the same function, every tile computed, the mask read
        nb = -(-prob.S // prob.block_q) * -(-prob.S // prob.block_k) * prob.B * prob.Hq
        return Work(inp["work"].pairs, nb, inp["mask_bytes"])
    if name == DENSE_BASELINE:
        return inp["causal_work"]
    return inp["work"]


def row_cost(prob: Problem, work: Work, pas: str) -> tuple[int, int, int]:
    useful, computed, nbytes = attention_cost(
        prob.B,
        prob.Hq,
        prob.Hkv,
        prob.S,
        prob.S,
        prob.D,
        torch.empty((), dtype=prob.dtype).element_size(),
        visible_pairs=work.pairs,
        computed_blocks=work.blocks,
        block_q=prob.block_q,
        block_k=prob.block_k,
        pass_=pas,
    )
    return useful, computed, nbytes + work.extra_bytes


# ------------------------------------------------------------------------------ checking


@dataclasses.dataclass
class AttnRow(Row):
    useful_flops: int = 0
    visible_pairs: int = 0
    computed_blocks: int = 0
    density: float = math.nan
    peak_mem_mib: str = ""
    vs_sdpa_causal: float = math.nan
    grad_rel_err: float = math.nan
    grad_max_err: float = math.nan
    grad_err_bound: float = math.nan
    checked_against: str = ""
    features: dict | None = None  # the op's dispatch features (lrkernels.dispatch), no column

    @property
    def useful_tflops(self) -> float:
        return self.useful_flops / (self.ms_median * 1e-3) / 1e12 if self.ok else math.nan


EXTRA_COLUMNS = [
    "useful_flops",
    "useful_tflops",
    "visible_pairs",
    "computed_blocks",
    "density",
    "peak_mem_mib",
    "vs_sdpa_causal",
    "grad_rel_err",
    "grad_max_err",
    "grad_err_bound",
    "checked_against",
]
OUT_NAMES = ("out", "dq", "dk", "dv")


@dataclasses.dataclass
class Expected:
    """Trusted results of one function of the problem: (out,) or (out, dq, dk, dv)."""

    label: str
    tensors: tuple[torch.Tensor, ...] | None
    anchor: str | None = None  # the provider whose own output this is (agreement mode)
    why_none: str = ""
    heads: tuple[slice, slice] | None = None  # (q heads, kv heads) of batch 0, if a slice


OUT_KEYS = ("q", "k", "v", "dout")


def _slice_layout(layout, b: int, heads: slice):
    """The layout for batch b and the query heads `heads` (broadcast dims stay 1)."""
    bl, hl = layout.kv_num_blocks.shape[:2]
    if bl == 1 and hl == 1:
        return layout
    bs = slice(b, b + 1) if bl > 1 else slice(0, 1)
    hs = heads if hl > 1 else slice(0, 1)
    changes = {
        name: t[bs, hs]
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
        if (t := getattr(layout, name, None)) is not None
    }
    return dataclasses.replace(layout, **changes)


def _torch_reference(
    inp: dict, layout, grads: bool, first_only: bool = False
) -> tuple[torch.Tensor, ...]:
    """lrkernels' torch backend in float32, one (batch, group of kv heads) at a time so that
    its dense Sq x Sk scores stay within REF_MAX_CHUNK_SCORES; (out[, dq, dk, dv]). With
    `first_only`, the first such chunk only (batch 0, the first kv heads and their query heads):
    tensors of the slice's shape."""
    prob, dev = inp["prob"], inp["device"]
    g = prob.Hq // prob.Hkv
    per_kv = g * prob.S * prob.S
    kv_step = max(1, min(prob.Hkv, REF_MAX_CHUNK_SCORES[dev.type] // per_kv))
    q, k, v, dout = (inp[n] for n in OUT_KEYS)
    if first_only:
        ks, qs = slice(0, kv_step), slice(0, kv_step * g)
        q, dout, k, v = q[:1, qs], dout[:1, qs], k[:1, ks], v[:1, ks]
    res = [torch.empty(q.shape, dtype=torch.float32, device=dev)]
    if grads:
        res += [torch.empty(t.shape, dtype=torch.float32, device=dev) for t in (q, k, v)]
    for b in range(1 if first_only else prob.B):
        for h0 in range(0, k.shape[1], kv_step):
            ks = slice(h0, min(h0 + kv_step, prob.Hkv))
            qs = slice(ks.start * g, ks.stop * g)
            part = {"q": q[b : b + 1, qs], "dout": dout[b : b + 1, qs]}
            part |= {"k": k[b : b + 1, ks], "v": v[b : b + 1, ks]}
            op = _lrk_op(inp, "torch", _slice_layout(layout, b, qs))
            got = _run_for_check(op, part, torch.float32, grads)
            for dst, src, hs in zip(res, got, (qs, qs, ks, ks), strict=False):
                dst[b : b + 1, hs] = src
            del got
    return tuple(res)


def _run_for_check(op: Callable, inp: dict, dtype: torch.dtype | None, grads: bool):
    """(out, [dq, dk, dv]) of op on inp's q, k, v, dout (cast to dtype when given)."""
    q, k, v, dout = (t if dtype is None else t.to(dtype) for t in (inp[n] for n in OUT_KEYS))
    if not grads:
        with torch.no_grad():
            return (op(q, k, v),)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    with torch.enable_grad():
        out = op(qg, kg, vg)
        g = torch.autograd.grad(out, (qg, kg, vg), dout)
    return (out.detach(), *g)


def _anchor_backend(inp: dict) -> str | None:
    """The GPU backend whose output stands in for the reference at sizes it cannot reach."""
    if inp["device"].type != "cuda":
        return None
    for backend in ("triton", "cuda"):
        if not _reasons(backend, inp) and not _extension_missing(backend, inp["grads_needed"]):
            return backend
    return None


def expected_for(inp: dict, which: str) -> Expected:
    """The trusted result of `which` ("main": the problem's mask; "causal": dense causal):
    lrkernels' torch backend in float32 where affordable, else a GPU backend's own output
    (agreement mode). Computed once per problem, with gradients when any pass needs them."""
    cache = inp["cache"]
    key = f"expected-{which}"
    if key in cache:
        return cache[key]
    prob, device, grads = inp["prob"], inp["device"], inp["grads_needed"]
    layout = inp["layout"] if which == "main" else inp["causal_layout"]()
    what = "" if which == "main" else " (dense causal)"
    exp = None
    anchor = _anchor_backend(inp)
    affordable = (prob.Hq // prob.Hkv) * prob.S * prob.S <= REF_MAX_CHUNK_SCORES[device.type]
    if affordable or anchor is None:
        try:
            first = inp["check_heads"] == "first" and (prob.B > 1 or prob.Hkv > 1)
            t = _torch_reference(inp, layout, grads, first_only=first)
            if first:
                kv = t[-1].shape[1] if grads else t[0].shape[1] // (prob.Hq // prob.Hkv)
                heads = (slice(0, kv * (prob.Hq // prob.Hkv)), slice(0, kv))
                exp = Expected(
                    f"torch backend, float32{what}, batch 0, heads {heads[0].start}-"
                    f"{heads[0].stop - 1}",
                    t,
                    heads=heads,
                )
            else:
                exp = Expected(f"torch backend, float32{what}", t)
        except torch.cuda.OutOfMemoryError as e:
            if anchor is None:
                exp = Expected("", None, why_none=f"out of memory in the reference ({e})"[:200])
        except Exception as e:
            if anchor is None:  # nothing else to check against: every row says why
                why = f"the reference raised {type(e).__name__}: {harness._one_line(e)}"
                exp = Expected("", None, why_none=why)
            else:
                print(
                    f"note: the float32 reference raised ({harness._one_line(e)}); "
                    f"checking against lrkernels-{anchor} agreement instead"
                )
    if exp is None:
        try:
            t = _run_for_check(_lrk_op(inp, anchor, layout), inp, None, grads)
            exp = Expected(
                f"lrkernels-{anchor}{what}, agreement (no reference at this size)",
                t,
                anchor=f"lrkernels-{anchor}" if which == "main" else None,
            )
        except Exception as e:
            why = f"lrkernels-{anchor} raised {type(e).__name__}: {harness._one_line(e)}"
            exp = Expected("", None, why_none=why)
    cache[key] = exp
    return exp


def compare_all(outs, expected: tuple[torch.Tensor, ...], dtype: torch.dtype, heads=None):
    """(out rel, out max, grad rel, grad max, failure message or ''); with `heads` (q heads,
    kv heads), the outputs' batch 0 and those heads are compared with `expected`."""
    if torch.is_tensor(outs):
        outs = (outs,)
    outs = tuple(outs)
    if heads is not None:
        qs, ks = heads
        outs = tuple(t[:1, qs if i < 2 else ks] for i, t in enumerate(outs))
    if len(outs) != len(expected):
        msg = f"returned {len(outs)} tensor(s), expected {', '.join(OUT_NAMES[: len(expected)])}"
        return math.nan, math.nan, math.nan, math.nan, msg
    rel_b, max_b = harness.ERROR_BOUNDS[dtype]
    errs = []
    for name, o, e in zip(OUT_NAMES, outs, expected, strict=False):
        try:
            rel, mx = harness.compare(o, e)
        except ValueError as err:
            return math.nan, math.nan, math.nan, math.nan, f"{name}: {err}"
        if o.dtype != dtype:
            return rel, mx, math.nan, math.nan, f"{name} dtype {o.dtype} != {dtype}"
        errs.append((name, rel, mx))
    msgs = []
    for name, rel, mx in errs:
        f = 1.0 if name == "out" else GRAD_BOUND_FACTOR
        if not (rel <= rel_b * f and mx <= max_b * f):
            msgs.append(
                f"{name} rel_err {rel:.3g} (bound {rel_b * f:g}), max_err {mx:.3g} "
                f"(bound {max_b * f:g})"
            )
    g_rel = max((r for n, r, _ in errs if n != "out"), default=math.nan)
    g_max = max((m for n, _, m in errs if n != "out"), default=math.nan)
    return errs[0][1], errs[0][2], g_rel, g_max, "; ".join(msgs)


def _peak_mib(fn: Callable, device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a"
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    res = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del res
    return f"{peak / 2**20:.1f}"


# ------------------------------------------------------------------------------ one pass


def run_pass(
    inp: dict,
    providers: list[Provider],
    peaks: DevicePeaks,
    timer_kw: dict,
    reuse: dict,
) -> list[AttnRow]:
    """Check every provider on one (problem, pass), then time those that passed; one AttnRow
    each. lrkernels-cuda and lrkernels-triton must also agree with each other on the whole
    outputs (gradients included), beyond the reference's slice of heads."""
    prob, pas, device = inp["prob"], inp["pass"], inp["device"]
    grads = pas != "fwd"
    shape = {
        "pattern": prob.pattern,
        "pass": pas,
        "S": prob.S,
        "D": prob.D,
        "B": prob.B,
        "Hq": prob.Hq,
        "Hkv": prob.Hkv,
        "window_left": inp["window"][0],
        "window_right": inp["window"][1],
        "block_q": prob.block_q,
        "block_k": prob.block_k,
        "pattern_args": inp["pattern_args"],
    }
    rel_b = harness.ERROR_BOUNDS[prob.dtype][0]
    rows: dict[str, AttnRow] = {}
    kept: dict[str, tuple] = {}  # agreement mode: a provider's check result vs the anchor
    fns: dict[str, Callable] = {}  # the providers that passed their check, to be timed
    agree: dict[str, object] = {}  # whole outputs of the providers in harness.AGREE
    order = list(providers)
    main = expected_for(inp, "main") if inp["main_needed"] else None
    anchor = main.anchor if main is not None else None
    if anchor is not None:  # the anchor is judged last, by whether others agree with it
        order.sort(key=lambda p: p.name == anchor)

    for prov in order:
        work = provider_work(prov.name, inp)
        useful, computed, nbytes = row_cost(prob, work, pas)
        row = AttnRow(
            op=OP, provider=prov.name, device=device.type, dtype=prob.dname, shape=dict(shape)
        )
        row.flops, row.bytes, row.useful_flops = computed, nbytes, useful
        row.visible_pairs, row.computed_blocks = work.pairs, work.blocks
        row.density = work.pairs / (prob.B * prob.Hq * prob.S * prob.S)
        row.err_bound = rel_b
        row.grad_err_bound = rel_b * GRAD_BOUND_FACTOR if grads else math.nan
        rows[prov.name] = row
        if inp.get("fail_all"):
            row.status = inp["fail_all"]
            continue
        which = "causal" if prov.name == DENSE_BASELINE and prob.pattern != "causal" else "main"
        rkey = (prov.name, prob.S, prob.D, prob.B, prob.Hq, prob.Hkv, prob.dname, pas, which)
        if prov.name == DENSE_BASELINE and rkey in reuse:
            _copy_measurement(row, reuse[rkey])
            continue
        try:
            fn = prov.build(inp)
            outs = fn()
        except ProviderSkip as e:
            row.status = f"skipped: {e}"
            continue
        except torch.cuda.OutOfMemoryError as e:
            row.status = f"skipped: out of GPU memory ({harness._one_line(e, 100)})"
            continue
        except Exception as e:  # a provider that should run but raises is broken
            row.status = f"FAILED: raised {type(e).__name__}: {harness._one_line(e)}"
            continue
        exp = expected_for(inp, which) if which == "causal" else main
        if exp is None or exp.tensors is None:
            why = exp.why_none if exp is not None else "no reference"
            row.status = f"skipped: cannot be cross-checked at this size ({why})"
            continue
        want = exp.tensors if grads else exp.tensors[:1]
        if prov.name == exp.anchor:
            row.status = _judge_anchor(row, kept, outs, want, prob.dtype)
        else:
            rel, mx, grel, gmx, msg = compare_all(outs, want, prob.dtype, exp.heads)
            row.rel_err, row.max_err, row.grad_rel_err, row.grad_max_err = rel, mx, grel, gmx
            row.checked_against = exp.label
            if exp.anchor is not None and which == "main":
                kept[prov.name] = (msg, rel, mx, grel, gmx)
            if msg:
                who = f" {exp.anchor} (agreement check)" if exp.anchor else " the reference"
                row.status = f"FAILED vs{who}: {msg}"
        if row.ok:
            fns[prov.name] = fn
            if prov.name in harness.AGREE:
                agree[prov.name] = outs
        del outs, fn

    for name, status in harness.agreement_failures(agree, prob.dtype).items():
        rows[name].status = status
    agree.clear()
    for name, fn in fns.items():
        row = rows[name]
        if not row.ok:
            continue
        med, p20, p80, n, how = harness.time_fn(fn, device, **timer_kw)
        row.ms_median, row.ms_p20, row.ms_p80, row.n_runs, row.timing = med, p20, p80, n, how
        row.peak_mem_mib = _peak_mib(fn, device)
        row.roofline_ms = roofline_time(row.flops, row.bytes, peaks) * 1e3
        if name == DENSE_BASELINE:
            which = "causal" if prob.pattern != "causal" else "main"
            rkey = (name, prob.S, prob.D, prob.B, prob.Hq, prob.Hkv, prob.dname, pas, which)
            reuse[rkey] = (row, prob.describe())
    fns.clear()

    out = [rows[p.name] for p in providers]
    for r in out:
        r.features = inp.get("features", {}).get(pas)
    base = rows.get(BASELINE)
    dense = rows.get(DENSE_BASELINE)
    for r in out:
        r.baseline = BASELINE
        if r.ok and base is not None and base.ok:
            r.speedup = base.ms_median / r.ms_median
        if r.ok and dense is not None and dense.ok:
            r.vs_sdpa_causal = dense.ms_median / r.ms_median
    return out


def _judge_anchor(row: AttnRow, kept: dict, outs, want: tuple, dtype) -> str:
    """The anchor's own status in agreement mode: ok if another implementation agreed with it,
    FAILED if those compared disagreed, skipped if none could be compared."""
    msg = compare_all(outs, want, dtype)[4]  # against its own earlier output
    if msg:
        return f"FAILED: a second call differs from the first beyond the bounds: {msg}"
    agreed = [p for p, v in kept.items() if not v[0]]
    if agreed:
        _, row.rel_err, row.max_err, row.grad_rel_err, row.grad_max_err = kept[agreed[0]]
        row.checked_against = f"agreement with {agreed[0]} (no reference at this size)"
        return "ok"
    if kept:
        return "FAILED: disagrees with " + ", ".join(kept) + " (no reference at this size)"
    return "skipped: no second implementation ran to cross-check against at this size"


def _copy_measurement(row: AttnRow, saved: tuple[AttnRow, str]) -> None:
    src, where = saved
    for f in ("ms_median", "ms_p20", "ms_p80", "n_runs", "roofline_ms", "peak_mem_mib"):
        setattr(row, f, getattr(src, f))
    for f in ("rel_err", "max_err", "grad_rel_err", "grad_max_err", "checked_against"):
        setattr(row, f, getattr(src, f))
    row.timing = f"{src.timing}; measured at {where} (same inputs and computation), reused"


# ------------------------------------------------------------------------------ one problem


def run_problem(
    prob: Problem,
    passes: list[str],
    providers: list[Provider],
    device: torch.device,
    peaks: DevicePeaks,
    timer_kw: dict,
    reuse: dict,
    width: int,
    seed: int,
    deadline: float | None,
    check_heads: str = "all",
) -> tuple[list[AttnRow], int, str]:
    """All passes of one problem: (rows, passes not run for lack of time, header text).
    `check_heads`: "all" checks every head against the float32 reference, "first" batch 0's
    first kv-head group only (lrkernels-cuda and -triton must then agree on the rest)."""
    inp: dict = {"prob": prob, "device": device, "scale": prob.D**-0.5, "cache": {}}
    inp["check_heads"] = check_heads
    fail_all = ""
    try:
        layout, told = build_layout(prob, width, device)
    except LayoutSkip as e:
        layout, told, fail_all = None, "", f"skipped: {e}"
    except Exception as e:
        layout, told = None, ""
        fail_all = f"FAILED: building the layout raised {type(e).__name__}: {harness._one_line(e)}"
        if prob.pattern not in ("local", "causal"):  # the bench guessed the builder's arguments
            fail_all = "skipped: " + fail_all[len("FAILED: ") :]
    inp["pattern_args"] = told
    S = prob.S
    note = ""
    if layout is not None:
        info = layout_info(layout, prob.block_q, prob.block_k)
        inp["layout"], inp["layout_info"] = layout, info
        inp["window"] = prob.window or info.window
        pairs, blocks = layout_counts(info, S, S, prob.B, prob.Hq)
        inp["work"] = Work(pairs, blocks)
        if prob.pattern in ("local", "causal"):  # a window: its layout can be checked exactly
            win, per = prob.window or (-1, 0), prob.B * prob.Hq
            want = window_visible_pairs(S, S, win) * per
            want_blocks = window_num_blocks(S, S, win, prob.block_q, prob.block_k) * per
            if pairs != want:
                fail_all = (
                    f"FAILED: the layout lets {pairs} (i, j) pairs through, the window {want}: "
                    f"the {prob.pattern} layout of lrkernels.masks is wrong"
                )
            elif blocks != want_blocks:
                note = f"note: the layout lists {blocks} blocks; the window touches {want_blocks}"
    else:
        inp["window"] = prob.window or (-1, -1)
        inp["work"] = Work(0, 0)
    per = prob.B * prob.Hq
    inp["causal_work"] = Work(
        window_visible_pairs(S, S, (-1, 0)) * per,
        window_num_blocks(S, S, (-1, 0), prob.block_q, prob.block_k) * per,
    )
    inp["mask_bytes"] = S * S * (1 if layout is None else int(np.prod(info.num.shape[:2])))

    def causal_layout():
        if "causal_layout" not in inp["cache"]:
            m = _masks()
            lay = m.local_window_layout(
                S, S, (-1, 0), causal=True, block_q=prob.block_q, block_k=prob.block_k
            )
            inp["cache"]["causal_layout"] = lay.to(device) if hasattr(lay, "to") else lay
        return inp["cache"]["causal_layout"]

    inp["causal_layout"] = causal_layout
    inp["fail_all"] = fail_all
    inp["main_needed"] = not fail_all and (
        prob.pattern == "causal" or any(p.name != DENSE_BASELINE for p in providers)
    )
    inp["grads_needed"] = any(p != "fwd" for p in passes)
    density = inp["work"].pairs / (prob.B * prob.Hq * S * S) if layout is not None else math.nan
    header = prob.describe()
    if layout is not None:
        header += (
            f"; {told}; density {100 * density:.2f}%, "
            f"{inp['work'].blocks // (prob.B * prob.Hq)} blocks per head"
        )
    if note:
        header += f"\n{note}"
    rows: list[AttnRow] = []
    if not fail_all:
        inp.update(make_inputs(prob, device, seed))
        inp["features"] = _dispatch_features(inp, passes)
    else:
        inp.update(dict.fromkeys(OUT_KEYS))
    left = 0
    for i, pas in enumerate(passes):
        if deadline is not None and time.monotonic() > deadline:
            left = len(passes) - i
            break
        inp["pass"] = pas
        rows += run_pass(inp, providers, peaks, timer_kw, reuse)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    inp.clear()
    return rows, left, header


def _dispatch_features(inp: dict, passes: list[str]) -> dict[str, dict | None]:
    """Per pass, the op's dispatch features of this problem (lrkernels.dispatch): inference
    for the forward, training for the passes with gradients."""
    hooks = dispatch.hooks(OP)
    if hooks is None or not hasattr(inp["layout"], "kv_indices"):
        return {}
    f = hooks.features(inp["q"], inp["k"], inp["v"], inp["layout"])
    return {p: {**f, "mode": "infer" if p == "fwd" else "train"} for p in passes}


def dispatch_entries(rows: list[AttnRow], device: torch.device) -> list[dict]:
    """The table entries of a run: inference classes from the forward rows, training classes
    from the fwd+bwd rows, or from the sums of a problem's forward and backward times."""
    train = {}
    for r in rows:
        if r.shape["pass"] != "bwd" or r.features is None:
            continue
        key = {**r.shape, "pass": "fwd"}
        fwd = next((f for f in rows if f.provider == r.provider and f.shape == key), None)
        has_sum = any(f.shape == {**r.shape, "pass": "fwd+bwd"} for f in rows)
        if fwd is None or has_sum:
            continue
        total = dataclasses.replace(r, shape={**r.shape, "pass": "fwd+bwd (sum)"})
        if fwd.failed or r.failed:
            total.status = fwd.status if fwd.failed else r.status
        elif fwd.ok and r.ok:
            total.ms_median = fwd.ms_median + r.ms_median
        else:
            total.status = "skipped"
        train[(r.provider, str(total.shape))] = total
    return harness.dispatch_entries(
        rows + list(train.values()),
        op=OP,
        paths=DISPATCH_PATHS,
        features=lambda r: None if r.shape["pass"] == "bwd" else r.features,
        device=device,
    )


# ------------------------------------------------------------------------------ CLI


_flat = harness.flat


def _ints(values, what: str) -> list[int]:
    try:
        out = [int(v) for v in _flat(values)]
    except ValueError:
        raise SystemExit(f"--{what}: expected integers, got {values}") from None
    if any(v < 1 for v in out):
        raise SystemExit(f"--{what}: values must be positive, got {out}")
    return out


def parse_args(argv):
    p = harness.make_parser(__doc__, ALL_PROVIDERS, unit="problem")
    g = p.add_argument_group("problems (default: the sweep's)")
    g.add_argument("--seq", nargs="+", help="sequence lengths S (queries = keys)")
    g.add_argument(
        "--window",
        nargs="+",
        help="local windows: cW (causal, W keys), sW (W each side), L:R (FlashAttention's)",
    )
    g.add_argument("--head-dim", nargs="+", help="head dims D")
    g.add_argument("--batch", nargs="+", help="batch sizes B")
    g.add_argument("--heads", nargs="+", help="query heads Hq")
    g.add_argument(
        "--kv-heads", nargs="+", help="key/value heads Hkv (default: Hq and Hq/4, MHA and GQA)"
    )
    g.add_argument("--pass", dest="passes", nargs="+", help=f"any of {', '.join(PASSES)}")
    g.add_argument("--pattern", nargs="+", help=f"any of {', '.join(PATTERNS)}")
    g.add_argument(
        "--block-q",
        type=int,
        help=f"layout query block (the GPU kernels take 64 or 128; default: {BLOCK['cuda']} on "
        f"a GPU, {BLOCK['cpu']} on a CPU)",
    )
    g.add_argument("--block-k", type=int, help="layout key block (default: as --block-q)")
    g.add_argument(
        "--check-heads",
        choices=["first", "all"],
        help="heads checked against the float32 reference: 'first' (batch 0's first kv-head "
        "group; lrkernels-cuda and -triton must agree on all) or 'all' (default: first on a "
        "GPU, all on a CPU)",
    )
    return p.parse_args(argv)


def headline_problems(device_type: str) -> list[tuple[Problem, list[str]]]:
    """The --headline problems with their passes (HEADLINE_PROBLEMS)."""
    out = []
    for pattern, win, S, D, B, H, Hkv, dt, passes in HEADLINE_PROBLEMS[device_type]:
        window = parse_window(win) if win else None
        bs = BLOCK[device_type]
        out.append((Problem(pattern, window, S, D, B, H, Hkv, DTYPES[dt], bs, bs), list(passes)))
    return out


def build_problems(args, device_type: str) -> tuple[list[Problem], list[str], int]:
    """(problems in run order, passes, the window width block patterns use). Order: the
    headline config first, then configs that differ from it in one setting, then two, ...;
    within a config the target lengths (16k, 4k, 64k) first, then S ascending (a run cut short
    keeps the most important rows)."""
    sw = SWEEPS[(device_type, bool(args.quick))]
    seqs = _ints(args.seq, "seq") if args.seq else sw["seq"]
    windows = [parse_window(w) for w in _flat(args.window)] if args.window else None
    windows = windows or [parse_window(w) for w in sw["window"]]
    dims = _ints(args.head_dim, "head-dim") if args.head_dim else sw["head_dim"]
    batches = _ints(args.batch, "batch") if args.batch else sw["batch"]
    heads = _ints(args.heads, "heads") if args.heads else sw["heads"]
    kv = _ints(args.kv_heads, "kv-heads") if args.kv_heads else sw["kv_heads"]
    names = _flat(args.dtype) if args.dtype else sw["dtype"]
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise SystemExit(f"unknown dtype(s) {unknown}; choose from {sorted(DTYPES)}")
    passes = _flat(args.passes) if args.passes else sw["pass"]
    bad = [p for p in passes if p not in PASSES]
    if bad:
        raise SystemExit(f"unknown pass(es) {bad}; choose from {list(PASSES)}")
    patterns = _flat(args.pattern) if args.pattern else sw["pattern"]
    bad = [p for p in patterns if p not in PATTERNS]
    if bad:
        raise SystemExit(f"unknown pattern(s) {bad}; choose from {list(PATTERNS)}")
    bq = args.block_q or BLOCK[device_type]
    bk = args.block_k or bq
    for b in (bq, bk):
        if b < 16 or b & (b - 1):
            raise SystemExit(f"--block-q/--block-k: a power of two >= 16, got {b}")
    dtypes = list(dict.fromkeys(DTYPES[n] for n in names))
    heads_kv = []
    for h in dict.fromkeys(heads):
        for hk in dict.fromkeys(kv if kv else [h, max(h // 4, 1)]):
            if h % hk:
                raise SystemExit(f"--kv-heads: {hk} does not divide --heads {h}")
            heads_kv.append((h, hk))
    shapes = [
        (p, w) for p in dict.fromkeys(patterns) for w in (windows if p == "local" else [None])
    ]
    shapes = list(dict.fromkeys(shapes))
    lists = [shapes, list(dict.fromkeys(dims)), dtypes, list(dict.fromkeys(batches)), heads_kv]
    problems = []
    for si, (pat, win) in enumerate(shapes):
        for di, d in enumerate(lists[1]):
            for ti, dt in enumerate(dtypes):
                for bi, b in enumerate(lists[3]):
                    for hi, (h, hk) in enumerate(heads_kv):
                        idx = (si, di, ti, bi, hi)
                        for s in sorted(set(seqs)):
                            # the sequence lengths the targets read first, then ascending
                            first = s not in (TARGET_SEQ, *LINEARITY_SEQ)
                            key = (sum(i > 0 for i in idx), idx, first, s)
                            prob = Problem(pat, win, s, d, b, h, hk, dt, bq, bk)
                            problems.append((key, prob))
    problems.sort(key=lambda kp: kp[0])
    width = windows[0][0] + 1 if windows[0][1] == 0 else max(windows[0][0], 1)
    return [p for _, p in problems], list(dict.fromkeys(passes)), width


# ------------------------------------------------------------------------------ reports


def write_csv(path: Path, rows: list[AttnRow], meta: dict, peaks_by_dtype: dict) -> Path:
    return harness.write_csv(path, rows, meta, peaks_by_dtype, extra=EXTRA_COLUMNS)


def format_table(rows: list[AttnRow]) -> str:
    head = ["provider", "pass", "S", "ms", "TFLOP/s", "useful", "GB/s", "peak MiB", "roofline"]
    head += ["vs flex", "vs causal"]
    lines = []
    for r in rows:
        cells = [r.provider, str(r.shape["pass"]), str(r.shape["S"])]
        if r.ok:

            def x(v: float) -> str:
                return "" if math.isnan(v) else f"{v:.2f}x"

            cells += [
                f"{r.ms_median:.4f}",
                f"{r.tflops:.2f}",
                f"{r.useful_tflops:.2f}",
                f"{r.gbps:.1f}",
                r.peak_mem_mib,
                f"{100 * r.roofline_frac:.1f}%",
                x(r.speedup),
                x(r.vs_sdpa_causal),
            ]
        else:
            cells.append(r.status)
        lines.append(cells)
    widths = [len(h) for h in head]
    for cells in lines:
        if len(cells) == len(head):
            widths = [max(w, len(c)) for w, c in zip(widths, cells, strict=True)]
    widths[0] = max([widths[0]] + [len(c[0]) for c in lines])

    def fmt(cells):
        out = []
        for i, c in enumerate(cells):
            if len(cells) < len(head) and i == len(cells) - 1 and i >= 3:
                out.append(c)
            else:
                out.append(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]))
        return "  ".join(out).rstrip()

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *(fmt(c) for c in lines)])


def _config_of(r: AttnRow) -> tuple:
    s = r.shape
    win = (s["window_left"], s["window_right"]) if s["pattern"] == "local" else None
    return (s["pattern"], win, s["D"], r.dtype, s["B"], s["Hq"], s["Hkv"])


def headline_rows(rows: list[AttnRow], device_type: str) -> tuple[tuple, list[AttnRow]]:
    """The forward rows of the headline config (or of the first config timed, when the
    headline was not run)."""
    fwd = [r for r in rows if r.shape["pass"] == "fwd"]
    key = HEADLINE[device_type]
    if not any(_config_of(r) == key and r.ok for r in fwd):
        ok = [r for r in fwd if r.ok]
        if ok:
            key = _config_of(ok[0])
    return key, [r for r in fwd if _config_of(r) == key]


def config_label(key: tuple, pas: str = "fwd") -> str:
    pattern, win, D, dt, B, Hq, Hkv = key
    what = f"local {window_label(win)}" if win else pattern
    return f"{what}, D {D}, {dt}, B={B}, Hq={Hq}, Hkv={Hkv}" + (f", {pas}" if pas else "")


def linearity(rows: list[AttnRow]) -> dict[str, tuple[int, int, float, float]]:
    """Per provider: (S0, S1, time ratio / S ratio, computed-work ratio / S ratio), with
    (4096, 65536) when both were timed, else the smallest and largest S timed."""
    out = {}
    for p in dict.fromkeys(r.provider for r in rows):
        by_s = {r.shape["S"]: r for r in rows if r.provider == p and r.ok}
        if len(by_s) < 2:
            continue
        s0, s1 = LINEARITY_SEQ if all(s in by_s for s in LINEARITY_SEQ) else (min(by_s), max(by_s))
        a, b = by_s[s0], by_s[s1]
        out[p] = (s0, s1, b.ms_median / a.ms_median / (s1 / s0), b.flops / a.flops / (s1 / s0))
    return out


def linearity_lines(rows: list[AttnRow], device_type: str) -> list[str]:
    key, sel = headline_rows(rows, device_type)
    lin = linearity(sel)
    lines = [f"linearity at {config_label(key)} (1.0 = time linear in S; target within 10%):"]
    if not lin:
        return lines + ["  fewer than two sequence lengths timed"]
    for p, (s0, s1, t, w) in lin.items():
        within = "within 10%" if abs(t - 1) <= TARGETS["linearity"] else "NOT within 10%"
        lines.append(
            f"  linearity {p}: time({s1})/time({s0}) / {s1 // s0} = {t:.3f} ({within}; "
            f"computed blocks give {w:.3f})"
        )
    return lines


def write_plot(path: Path, rows: list[AttnRow], device_type: str, device_label: str) -> Path:
    key, sel = headline_rows(rows, device_type)
    series: dict[str, list[tuple[float, float]]] = {}
    for r in sel:
        if r.ok:
            series.setdefault(r.provider, []).append((r.shape["S"], r.ms_median))
    anchor = next((p for p in series if p.startswith("lrkernels-")), next(iter(series), None))
    if anchor is not None:
        s0, t0 = min(series[anchor])
        s_max = max(s for pts in series.values() for s, _ in pts)
        if s_max > s0:
            series["slope 1 (linear in S)"] = [(s0, t0), (s_max, t0 * s_max / s0)]
    return write_svg(
        path,
        series,
        title=f"attention, {config_label(key)} — {device_label}",
        xlabel="sequence length S",
        ylabel="median time (ms)",
    )


def targets_summary(rows: list[AttnRow]) -> list[str]:
    """The goals of issue 10 at the headline config (S=16384) and at dense causal S=8192:
    PASS/MISS (goals, not asserts)."""
    key = HEADLINE["cuda"]
    gpu = [r for r in rows if r.device == "cuda" and r.ok]
    at_key = [r for r in gpu if _config_of(r) == key]
    t = TARGETS
    lines = [
        f"attention targets (issue 10) at {config_label(key, '')}, S={TARGET_SEQ} (goals, not "
        f"asserts): forward >= {t['fwd_tflops']:g} TFLOP/s on computed blocks in <= "
        f"{t['fwd_time_vs_flex']:g}x {BASELINE}'s time; backward >= {t['bwd_tflops']:g} "
        f"TFLOP/s in <= {t['bwd_time_vs_flex']:g}x its time; dense causal S={CAUSAL_TARGET_SEQ} "
        f"forward >= {t['causal_vs_sdpa']:g}x the speed of SDPA's flash backend; time within "
        f"{100 * t['linearity']:.0f}% of linear in S from 4096 to 65536"
    ]
    provs = [p for p in dict.fromkeys(r.provider for r in gpu) if p.startswith("lrkernels-")]
    if not provs:
        return lines + ["  no lrkernels provider was run at the goals' problems on a GPU"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    def at(p: str, pas: str) -> AttnRow | None:
        return next(
            (
                r
                for r in at_key
                if r.provider == p and r.shape["pass"] == pas and r.shape["S"] == TARGET_SEQ
            ),
            None,
        )

    causal_key = ("causal", None, *key[2:])
    lin = linearity([r for r in at_key if r.shape["pass"] == "fwd"])
    for p in provs:
        for pas, name in (("fwd", "forward"), ("bwd", "backward")):
            r = at(p, pas)
            if r is None:
                lines.append(f"  {p}: {name} at S={TARGET_SEQ}: not measured")
                continue
            goal = t[f"{pas}_tflops"]
            lines.append(
                f"  {p}: {name} {r.tflops:.1f} TFLOP/s on computed blocks "
                f"({r.useful_tflops:.1f} useful, {r.ms_median:.3f} ms) (goal >= {goal:g}) "
                f"{verdict(r.tflops >= goal)}"
            )
            limit = t[f"{pas}_time_vs_flex"]
            if math.isnan(r.speedup):
                lines.append(f"  {p}: {name} vs {BASELINE}: {BASELINE} not timed")
            else:
                ratio = 1 / r.speedup
                lines.append(
                    f"  {p}: {name} time {ratio:.2f}x {BASELINE}'s (goal <= {limit:g}x) "
                    f"{verdict(ratio <= limit)}"
                )
        c = next(
            (
                r
                for r in gpu
                if r.provider == p
                and _config_of(r) == causal_key
                and r.shape["pass"] == "fwd"
                and r.shape["S"] == CAUSAL_TARGET_SEQ
            ),
            None,
        )
        if c is None or math.isnan(c.vs_sdpa_causal):
            what = "not measured" if c is None else f"{DENSE_BASELINE} not timed"
            lines.append(f"  {p}: dense causal S={CAUSAL_TARGET_SEQ} forward: {what}")
        else:
            lines.append(
                f"  {p}: dense causal S={CAUSAL_TARGET_SEQ} forward: {c.vs_sdpa_causal:.2f}x "
                f"the speed of {DENSE_BASELINE} (goal >= {t['causal_vs_sdpa']:g}x) "
                f"{verdict(c.vs_sdpa_causal >= t['causal_vs_sdpa'])}"
            )
        if p in lin and lin[p][:2] == LINEARITY_SEQ:
            ratio = lin[p][2]
            lines.append(
                f"  {p}: time(65536)/time(4096) / 16 = {ratio:.3f} (goal within 10% of 1.0) "
                f"{verdict(abs(ratio - 1) <= t['linearity'])}"
            )
        else:
            lines.append(f"  {p}: linearity 4096 -> 65536: not measured")
    return lines


def is_headline(r: AttnRow) -> bool:
    for pattern, win, S, D, B, H, Hkv, dt, passes in HEADLINE_PROBLEMS[r.device]:
        s = r.shape
        window = parse_window(win) if win else None
        if (
            (s["pattern"], s["S"], s["D"], s["B"], s["Hq"], s["Hkv"]) == (pattern, S, D, B, H, Hkv)
            and r.dtype == str(DTYPES[dt])[6:]
            and s["pass"] in passes
            and (window is None or (s["window_left"], s["window_right"]) == window)
        ):
            return True
    return False


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None, extra_providers: list[Provider] | None = None) -> int:
    """Run the benchmark; returns the exit status (1 iff a correctness check failed).
    `extra_providers` adds providers (tests inject a deliberately wrong one)."""
    args = parse_args(argv)
    missing = ops_missing()
    if missing:
        raise SystemExit(f"bench/attn.py: {missing}; nothing to benchmark")

    def flex_left_out(device_type: str) -> list[tuple[str, str]]:
        if device_type == "cpu" and (args.quick or args.headline):
            why = (
                f"--{'quick' if args.quick else 'headline'} on CPU: torch.compile of "
                "flex_attention takes ~15 s a shape here; name it in --providers to run it"
            )
            return [(BASELINE, why)]
        return []

    run = harness.Bench(
        name="attn",
        op=OP,
        args=args,
        all_providers=ALL_PROVIDERS,
        baseline=BASELINE,
        extra_left_out=flex_left_out,
        require_baseline=False,
    )
    if BASELINE in run.provider_names:  # one compile per shape and pass: clear of the limit
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
        dynamo_config.accumulated_recompile_limit = max(
            dynamo_config.accumulated_recompile_limit, 4096
        )
    providers = make_providers(run.provider_names) + list(extra_providers or [])
    problems, passes, width = build_problems(args, run.device_type)
    plan = headline_problems(run.device_type) if args.headline else [(p, passes) for p in problems]
    check_heads = args.check_heads or ("first" if run.device_type == "cuda" else "all")
    run.banner(
        "attention benchmark",
        [
            "FLOPs: 4·D per visible (query, key) pair forward, x2.5 backward, x3.5 fwd+bwd; "
            "TFLOP/s on computed blocks (whole tiles of the layout), 'useful' on visible pairs",
            f"checked against the float32 reference on "
            f"{'batch 0, first kv-head group' if check_heads == 'first' else 'every head'}",
        ],
    )
    n_pass = sum(len(ps) for _, ps in plan)
    print(
        f"{len(plan)} problems, {n_pass} passes x {len(providers)} providers; speedups vs "
        f"{BASELINE}",
        flush=True,
    )

    rows: list[AttnRow] = []
    reuse: dict = {}
    truncated = 0
    for i, (prob, prob_passes) in enumerate(plan):
        if run.out_of_time():
            truncated = len(plan) - i
            break
        peaks = run.peaks(prob.dtype)
        prob_rows, left, header = run_problem(
            prob,
            prob_passes,
            providers,
            run.device,
            peaks,
            run.timer_kw,
            reuse,
            width,
            args.seed,
            run.deadline,
            check_heads,
        )
        rows += prob_rows
        print(f"\n[{i + 1}/{len(plan)}] {header}")
        if prob_rows:
            checked = {r.checked_against for r in prob_rows if r.checked_against}
            print(format_table(prob_rows))
            if checked:
                print("checked against: " + "; ".join(sorted(checked)))
        run.write_csv(rows, extra=EXTRA_COLUMNS)  # after every problem
        if left:
            truncated = len(plan) - i - 1
            print(f"({left} pass(es) of this problem not run: --max-seconds reached)")
            break

    return run.finish(
        rows,
        table=format_table,
        report=[*linearity_lines(rows, run.device_type), "", *targets_summary(rows)],
        plot=lambda path: write_plot(path, rows, run.device_type, run.label),
        truncated=truncated,
        headline=is_headline,
        dispatch_entries=lambda: dispatch_entries(rows, run.device),
    )


if __name__ == "__main__":
    sys.exit(main())
