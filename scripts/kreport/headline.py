"""The headline shapes (issues 8, 9, 10, 11: the goals of each family are stated at these) and
the bytes/FLOPs floor of each, from `lrkernels.roofline`.

Everything is bfloat16. A case is one op call at one shape; the CUDA and Triton sides of the
report each turn it into their own launches (`cuda_plan`, `triton_plan`).
"""

from __future__ import annotations

import dataclasses

from . import device

LOWRANK_FEATURES = (4096, 8192)  # in = out
LOWRANK_RANKS = (64, 128, 256)
LOWRANK_M = (1, 16, 64, 256, 1024, 8192)
LOWRANK_DX_M = (8192,)  # the input gradient dx = lowrank(dy, Vᵀ, Uᵀ)
INT8_FEATURES = (4096, 8192)  # N = K
INT8_M = (1, 16, 64, 4096)
INT8_GROUPS = (0, 128)  # 0: one scale per output channel
INT8_GRAD_M = (4096,)  # dx = dy · W
# (name, S, window (left, right), head dim, backends, passes); B = 2, H = 16 (B·H = 32), block 128
ATTENTION = (
    ("local c512", 16384, (511, 0), 128, ("cuda", "triton"), ("fwd", "bwd")),
    ("dense causal", 8192, (-1, 0), 128, ("cuda", "triton"), ("fwd",)),
    ("local c512", 16384, (511, 0), 64, ("triton",), ("fwd", "bwd")),
    ("local c512", 16384, (511, 0), 256, ("triton",), ("fwd", "bwd")),
)
ATTN_B, ATTN_H, ATTN_BLOCK = 2, 16, 128
# LoRA (issue 11): 4096², r=16, bf16 activations. (name, M, base, adapters (0: one, plain
# lora_linear), dropout, passes)
LORA_FEATURES, LORA_RANK = 4096, 16
LORA = (
    ("decode", 16, "dense", 0, 0.0, ("fwd",)),
    ("decode", 16, "int8", 0, 0.0, ("fwd",)),
    ("train", 8192, "dense", 0, 0.1, ("fwd",)),
    ("multi", 64, "dense", 64, 0.0, ("fwd",)),
    ("multi", 4096, "dense", 8, 0.0, ("fwd",)),
)


@dataclasses.dataclass
class Case:
    """One op call at a headline shape.

    family: "lowrank", "int8", "attention" or "lora"; op: "fwd", "dx" (lowrank input gradient),
    "grad_input" (int8 input gradient) or "bwd" (attention); params: the sizes (see the family's
    constructor below); backends: which report sides launch it."""

    family: str
    op: str
    params: dict
    backends: tuple[str, ...] = ("cuda", "triton")

    @property
    def id(self) -> str:
        p = self.params
        if self.family == "lowrank":
            return f"lowrank {self.op} {p['in']}->{p['out']} r={p['rank']} M={p['M']}"
        if self.family == "int8":
            g = "g128" if p["group"] else "per-ch"
            return f"int8 {self.op} {p['N']}x{p['K']} {g} M={p['M']}"
        if self.family == "lora":
            base = "int8 base" if p["base"] == "int8" else "bf16 base"
            extra = f" {p['adapters']} adapters" if p["adapters"] else ""
            extra += f" dropout {p['dropout']}" if p["dropout"] else ""
            return f"lora {self.op} {p['N']}x{p['K']} r={p['rank']} {base} M={p['M']}{extra}"
        return f"attn {self.op} {p['pattern']} S={p['S']} D={p['D']} B={p['B']} H={p['H']}"

    def torch_reason(self, backend: str) -> str | None:
        """Why the op itself runs torch's matmuls instead of `backend`'s kernels at this case
        (its own crossover rule), or None. The report still plans the kernels it would launch."""
        if self.family == "lowrank" and self.op == "dx":
            import torch

            from lrkernels.ops.lowrank import kernel_expected_faster

            p = self.params  # the backward's call: (M, out) -> (M, in) through rank
            if not kernel_expected_faster(
                backend, p["M"], p["out"], p["in"], p["rank"], torch.bfloat16
            ):
                return (
                    "the backward's crossover (lrkernels.ops.lowrank.kernel_expected_faster) "
                    f"gives dx at M={p['M']} to torch's two matmuls"
                )
        return None

    def cost(self) -> tuple[float, float]:
        """(FLOPs the kernels do, minimum bytes) of the call, from lrkernels.roofline."""
        from lrkernels import roofline

        p = self.params
        if self.family == "lowrank":
            if self.op == "dx":  # dy (M, out) -> dx (M, in) through Uᵀ... Vᵀ, no bias
                return roofline.lowrank_linear_cost(p["M"], p["out"], p["in"], p["rank"], 2, False)
            return roofline.lowrank_linear_cost(p["M"], p["in"], p["out"], p["rank"], 2, True)
        if self.family == "int8":
            if self.op == "grad_input":  # dy (M, N) · W (N, K) -> (M, K)
                return roofline.int8_linear_cost(p["M"], p["N"], p["K"], 2, p["group"], False)
            return roofline.int8_linear_cost(p["M"], p["K"], p["N"], 2, p["group"], True)
        if self.family == "lora":
            return roofline.lora_linear_cost(
                p["M"], p["K"], p["N"], p["rank"], 2, bias=True,
                group_size=0 if p["base"] == "int8" else None, n_adapters=max(1, p["adapters"]),
            )  # fmt: skip
        from bench.attn import window_num_blocks, window_visible_pairs

        S, w, bs, bh = p["S"], tuple(p["window"]), ATTN_BLOCK, p["B"] * p["H"]
        visible = bh * window_visible_pairs(S, S, w)
        blocks = bh * window_num_blocks(S, S, w, bs, bs)
        _, computed, nbytes = roofline.attention_cost(
            p["B"], p["H"], p["H"], S, S, p["D"], 2, visible_pairs=visible,
            computed_blocks=blocks, block_q=bs, block_k=bs, pass_=self.op,
        )  # fmt: skip
        return computed, nbytes

    def expectation(self) -> str:
        """The roofline floor at the H200's measured peaks: what a GPU run can hold a kernel
        to (its time / this floor = its fraction of the roofline)."""
        flops, nbytes = self.cost()
        t, bound = device.floor_time(flops, nbytes)
        ai = flops / nbytes if nbytes else float("inf")
        if bound == "memory":
            rate = f"{device.H200.bandwidth_bytes_per_s / 1e12:.1f} TB/s"
        else:
            rate = f"{device.H200.bf16_flops_per_s / 1e12:.0f} TFLOP/s"
        return f"{bound}-bound (AI {ai:.0f}): >= {_us(t)} at {rate}"


def _us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.1f} us" if us < 100 else f"{us:.0f} us"


def cases() -> list[Case]:
    out: list[Case] = []
    for f in LOWRANK_FEATURES:
        for r in LOWRANK_RANKS:
            for m in LOWRANK_M:
                out.append(Case("lowrank", "fwd", {"M": m, "in": f, "out": f, "rank": r}))
            for m in LOWRANK_DX_M:
                out.append(Case("lowrank", "dx", {"M": m, "in": f, "out": f, "rank": r}))
    for f in INT8_FEATURES:
        for g in INT8_GROUPS:
            for m in INT8_M:
                out.append(Case("int8", "fwd", {"M": m, "N": f, "K": f, "group": g}))
            for m in INT8_GRAD_M:
                out.append(Case("int8", "grad_input", {"M": m, "N": f, "K": f, "group": g}))
    for pattern, S, window, D, backends, passes in ATTENTION:
        for op in passes:
            params = {"pattern": pattern, "S": S, "window": window, "D": D, "B": ATTN_B,
                      "H": ATTN_H, "block": ATTN_BLOCK}  # fmt: skip
            out.append(Case("attention", op, params, backends))
    for _, M, base, adapters, dropout, passes in LORA:
        for op in passes:
            params = {"M": M, "N": LORA_FEATURES, "K": LORA_FEATURES, "rank": LORA_RANK,
                      "base": base, "adapters": adapters, "dropout": dropout}  # fmt: skip
            out.append(Case("lora", op, params))
    return out
