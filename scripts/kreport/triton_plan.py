"""The Triton launches of the headline shapes, compiled ahead of time for sm_90.

Run in its own process (it patches torch and triton): ``python -m kreport.triton_plan OUT.json``
with scripts/ and the repo root on PYTHONPATH; `kernel_report.py` does that.

1. The public ops (`lrkernels.lowrank_linear`, `int8_linear` (packed weight),
   `block_sparse_attention`, `lora_linear` / `lora_linear_multi`, with ``backend="triton"``) run under `FakeTensorMode` on a fake "cuda" device whose torch.cuda
   queries answer as an H200 (132 SMs, 232,448 B of opt-in shared memory per block): the real
   launchers pick their real configurations. A backward case runs the forward op's registered
   autograd formula by hand (`OpCalls`; autograd's engine needs a real CUDA device).
2. Every ``kernel[grid](...)`` lands in a recorder (``JITFunction.run`` replaced;
   ``torch.library.wrap_triton`` returns the kernel itself) with its grid and arguments; an
   autotuned kernel records every candidate config (nothing can be timed here).
3. Each distinct launch is specialised by Triton's own binder (tensors as 16-byte-aligned
   pointers, integers as passed) and compiled with ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", 90, 32))``; the cubin gives registers, stack and static shared
   memory (cuobjdump -res-usage), the instruction classes (cuobjdump -sass), the metadata the
   dynamic shared memory, the PTX which of wgmma / mma.sync / ldmatrix / cp.async / TMA it uses.

Works on triton 3.6 and 3.9 (the same binder and ``_pack_args`` API).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import multiprocessing
import os
import pkgutil
import sys
import tempfile
import time
import traceback
import types
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch  # noqa: E402

from . import headline, sass  # noqa: E402
from .device import H200  # noqa: E402

H200_PROPS = types.SimpleNamespace(
    name="NVIDIA H200",
    major=9,
    minor=0,
    multi_processor_count=H200.sms,
    shared_memory_per_block_optin=H200.smem_per_block_optin,
    shared_memory_per_block=48 * 1024,
    shared_memory_per_multiprocessor=H200.smem_per_sm,
    max_threads_per_multi_processor=H200.threads_per_sm,
    regs_per_multiprocessor=H200.regs_per_sm,
    warp_size=32,
    total_memory=141 * 10**9,
    L2_cache_size=60 * 2**20,
    is_integrated=False,
)


def _fake_h200() -> None:
    """torch.cuda's device queries answer as one H200 (device 0)."""
    torch.cuda.get_device_properties = lambda *a, **k: H200_PROPS
    torch.cuda.current_device = lambda: 0
    torch.cuda.device_count = lambda: 1
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.get_device_name = lambda *a, **k: H200_PROPS.name
    # launchers that key per-stream state (split-K counters) ask for the current stream
    torch.cuda.current_stream = lambda *a, **k: types.SimpleNamespace(cuda_stream=0)


class Recorder:
    """Collects (kernel, grid, args, kwargs) of every launch, labelled with the current case."""

    def __init__(self) -> None:
        self.launches: list[dict] = []
        self.label: tuple[str, str] | None = None

    def install(self) -> None:
        from triton.runtime import autotuner, jit

        rec = self

        def run(fn, *args, grid, warmup, **kwargs):
            config = kwargs.pop("_kreport_cfg", None)  # index of an autotuner's candidate
            if rec.label is not None and not warmup:
                rec.launches.append(
                    {"case": rec.label[0], "phase": rec.label[1], "fn": fn, "grid": grid,
                     "args": args, "kwargs": kwargs, "autotune": config}
                )  # fmt: skip
            return None

        def autotuned(tuner, *args, **kwargs):
            for i, cfg in enumerate(tuner.configs):
                tuner.fn.run(*args, **{**kwargs, **cfg.all_kwargs(), "_kreport_cfg": i})

        jit.JITFunction.run = run
        autotuner.Autotuner.run = autotuned
        torch.library.wrap_triton = lambda kernel: kernel


class _Ctx:
    """The autograd context a custom op's setup_context / backward functions use."""

    def __init__(self, needs_input_grad: tuple[bool, ...]) -> None:
        self.needs_input_grad = needs_input_grad
        self.saved_tensors: tuple = ()

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors

    def set_materialize_grads(self, value: bool) -> None:
        pass

    def mark_non_differentiable(self, *tensors) -> None:
        pass


class OpCalls:
    """Records the forward call (inputs, output) of every lrkernels custom op with an autograd
    formula, by wrapping its setup_context, so that a case's backward can be run by hand:
    autograd's engine cannot run on a fake CUDA device without a GPU (it asks the CUDA runtime
    about the device), the op's own backward formula can."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, tuple, dict, object]] = []
        self.setup: dict[int, object] = {}

    def install(self) -> None:
        from torch._library.custom_ops import OPDEFS

        for qualname, opdef in OPDEFS.items():
            if not qualname.startswith("lrkernels::") or opdef._backward_fn is None:
                continue
            self.setup[id(opdef)] = opdef._setup_context_fn
            opdef._setup_context_fn = self._wrap(opdef, opdef._setup_context_fn)

    def _wrap(self, opdef, setup):
        def setup_context(ctx, inputs, output, **kwargs):
            self.calls.append((opdef, tuple(inputs), kwargs, output))
            return setup(ctx=ctx, inputs=inputs, output=output, **kwargs)

        return setup_context

    def backward(self, call) -> None:
        """Runs the op's registered backward on a gradient shaped like its first output (None
        for the others, as for an unused log-sum-exp)."""
        opdef, inputs, kwargs, out = call
        needs = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in inputs)
        ctx = _Ctx(needs)
        outs = out if isinstance(out, tuple | list) else (out,)
        with torch.no_grad():
            self.setup[id(opdef)](ctx=ctx, inputs=inputs, output=out, **kwargs)
            opdef._backward_fn(ctx, torch.empty_like(outs[0]), *([None] * (len(outs) - 1)))


def _fake_like(t: torch.Tensor) -> torch.Tensor:
    """A fake cuda tensor with t's shape, strides and dtype (inside FakeTensorMode)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")


def _run_case(case: headline.Case, rec: Recorder, ops: OpCalls) -> None:
    """Calls the case's op (and its backward for dx / grad_input / bwd) on fake cuda tensors;
    only the launches of the case's own pass are labelled."""
    import lrkernels
    from lrkernels import masks

    p, bf16 = case.params, torch.bfloat16
    forward_only = case.op == "fwd"
    layout = None
    if case.family == "attention":  # the block lists are data: built for real, on the CPU
        layout = masks.local_window_layout(
            p["S"], p["S"], tuple(p["window"]), block_q=headline.ATTN_BLOCK,
            block_k=headline.ATTN_BLOCK,
        )  # fmt: skip
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):

        def new(*shape, dtype=bf16, grad=False):
            return torch.empty(shape, dtype=dtype, device="cuda", requires_grad=grad)

        rec.label = (case.id, case.op) if forward_only else None
        if case.family == "lowrank":
            x = new(p["M"], p["in"], grad=not forward_only)
            U, V, b = new(p["out"], p["rank"]), new(p["rank"], p["in"]), new(p["out"])
            y = lrkernels.lowrank_linear(x, U, V, b, backend="triton")
        elif case.family == "int8":  # the packed layout 2 (Int8Linear packs on CUDA)
            x = new(p["M"], p["K"], grad=not forward_only)
            q = new(-(-p["N"] // 32), p["K"] // 16, 512, dtype=torch.int8)
            if p["group"]:  # group-major, as lrkernels.quant.pack stores them
                s = torch.empty_strided((p["N"], p["K"] // p["group"]), (1, p["N"]), dtype=bf16,
                                        device="cuda")  # fmt: skip
            else:
                s = new(p["N"])
            y = lrkernels.int8_linear(x, q, s, new(p["N"]), backend="triton")
        elif case.family == "lora":
            x = new(p["M"], p["K"], grad=not forward_only)
            base = new(p["N"], p["K"])
            if p["base"] == "int8":  # lora_linear's int8 base: layout 1, per-channel scales
                base = (new(p["N"], p["K"], dtype=torch.int8), new(p["N"]))
            n, r = p["adapters"], p["rank"]
            if n:
                A, B = new(n, r, p["K"]), new(n, p["N"], r)
                index = new(p["M"], dtype=torch.int32)
                ranks, scales = new(n, dtype=torch.int32), new(n, dtype=torch.float32)
                y = lrkernels.lora_linear_multi(x, base, A, B, index, ranks=ranks, scales=scales,
                                                bias=new(p["N"]), backend="triton")  # fmt: skip
            else:
                A, B = new(r, p["K"]), new(p["N"], r)
                y = lrkernels.lora_linear(x, base, A, B, new(p["N"]), scale=2.0,
                                          dropout_p=p["dropout"], backend="triton")  # fmt: skip
        else:
            fields = {
                f.name: _fake_like(getattr(layout, f.name))
                for f in dataclasses.fields(layout)
                if f.init and isinstance(getattr(layout, f.name), torch.Tensor)
            }
            fake_layout = dataclasses.replace(layout, **fields)
            shape = (p["B"], p["H"], p["S"], p["D"])
            q, k, v = (new(*shape, grad=not forward_only) for _ in range(3))
            y = lrkernels.block_sparse_attention(q, k, v, fake_layout, backend="triton")
        del y
        if not forward_only and case.torch_reason("triton"):
            # The op's backward runs torch's matmuls here; record what its kernel would launch
            # (dx = lowrank(dy, Vᵀ, Uᵀ), the call the backward makes otherwise) as not taken.
            rec.label = (case.id, f"{case.op} (not taken)")
            lrkernels.lowrank_linear(new(p["M"], p["out"]), V.t(), U.t(), None, backend="triton")
        elif not forward_only:
            rec.label = (case.id, case.op)
            ops.backward(ops.calls[-1])
        rec.label = None


class _Pointer:
    """What Triton's binder needs of a tensor argument: its dtype and a 16-byte-aligned address."""

    def __init__(self, dtype):
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 1 << 20


def _concrete(v):
    return _Pointer(v.dtype) if isinstance(v, torch.Tensor) else v


def _specialise(launch: dict, target):
    """(signature, constexprs, attrs, options, bound arguments) of a recorded launch, as
    JITFunction.run builds them."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch["fn"]
    backend = make_backend(target)
    args = [_concrete(a) for a in launch["args"]]
    kwargs = {k: _concrete(v) for k, v in launch["kwargs"].items()}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )
    return signature, constexprs, attrs, options, bound


def _constexprs(launch: dict, bound: dict) -> dict:
    fn = launch["fn"]
    out = {}
    for p in fn.params:
        if p.is_constexpr:
            v = bound.get(p.name)
            out[p.name] = v if isinstance(v, bool | int | float | str) or v is None else str(v)
    return out


def _grid(launch: dict, bound: dict) -> list[int]:
    grid = launch["grid"]
    if callable(grid):
        grid = grid(bound)
    grid = [int(g) for g in grid] + [1] * (3 - len(grid))
    return grid[:3]


def _ptx_flags(ptx: str) -> dict[str, bool]:
    return {
        "wgmma": "wgmma.mma_async" in ptx,
        "mma.sync": "mma.sync" in ptx,
        "ldmatrix": "ldmatrix" in ptx,
        "cp.async": "cp.async.ca" in ptx or "cp.async.cg" in ptx,
        "tma": "cp.async.bulk.tensor" in ptx,
    }


def _compile(fn, signature, constexprs, attrs, options, target) -> dict:
    import triton
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    src = ASTSource(fn, signature, constexprs, attrs)
    kernel = triton.compile(src, target=target, options=options.__dict__)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="kreport-") as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        res, counts = sass.analyze_cubin(cubin)
    if len(res) != 1:
        raise RuntimeError(f"expected one kernel in the cubin, got {sorted(res)}")
    (name, usage), = res.items()  # fmt: skip
    md = kernel.metadata
    return {
        "name": name,
        "regs": usage.get("REG", 0),
        "stack": usage.get("STACK", 0),
        "static_smem": sass.static_smem(usage),
        "dynamic_smem": int(md.shared),
        "num_warps": int(md.num_warps),
        "num_stages": int(md.num_stages),
        "num_ctas": int(getattr(md, "num_ctas", 1)),
        "counts": dict(counts.get(name, {})),
        "ptx": _ptx_flags(kernel.asm["ptx"]),
        "compile_s": round(seconds, 2),
    }


_JOBS: list[tuple] = []  # what forked compile workers read (they inherit it)
_TARGET = None


def _compile_job(i: int) -> dict:
    _, fn, signature, constexprs, attrs, options = _JOBS[i]
    try:
        return _compile(fn, signature, constexprs, attrs, options, _TARGET)
    except Exception as e:  # returned, not raised: Triton's errors do not always pickle
        return {"error": f"{type(e).__name__}: {e}"}


def _compile_all(jobs: list[tuple], target) -> dict[str, dict]:
    """Compiles the jobs, in forked worker processes (one per core) where the platform allows,
    serially otherwise."""
    global _JOBS, _TARGET
    _JOBS, _TARGET = jobs, target
    results: dict[str, dict] = {}
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        try:
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                done = pool.map(_compile_job, range(len(jobs)))
                results = dict(zip([j[0] for j in jobs], done, strict=True))
        except BrokenProcessPool:
            results = {}
    for i, (kid, *_) in enumerate(jobs):
        if kid not in results:
            results[kid] = _compile_job(i)
    return results


def plan(cases: list[headline.Case]) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    _fake_h200()
    rec = Recorder()
    rec.install()
    import lrkernels

    for mod in pkgutil.iter_modules(lrkernels.ops.__path__):  # triton ops register on first use;
        ensure = getattr(importlib.import_module(f"lrkernels.ops.{mod.name}"), "_ensure_triton_ops",
                         None)  # fmt: skip
        if ensure is not None:  # register them now, so that OpCalls sees their autograd
            ensure()
    ops = OpCalls()
    ops.install()
    avail = getattr(lrkernels.backends, "_AVAILABILITY", None)
    if isinstance(avail, dict):
        avail["triton"] = None  # there is a (fake) CUDA device
    errors: list[str] = []
    routed = [(c.id, c.torch_reason("triton")) for c in cases if "triton" in c.backends
              and c.op != "fwd" and c.torch_reason("triton")]  # fmt: skip
    notes = [
        f"Triton {routed[0][0].split()[0]}: {routed[0][1]} ({len(routed)} headline cases); "
        "the launches marked (not taken) are what it would launch"
    ] if routed else []  # fmt: skip
    for case in cases:
        if "triton" not in case.backends:
            continue
        try:
            _run_case(case, rec, ops)
        except Exception as e:  # reported, and the test fails on it
            errors.append(f"{case.id}: {type(e).__name__}: {e}")
            traceback.print_exc()

    target = GPUTarget("cuda", 90, 32)
    keys: dict[str, str] = {}
    jobs: list[tuple] = []
    launches = []
    for launch in rec.launches:
        fn = launch["fn"]
        try:
            signature, constexprs, attrs, options, bound = _specialise(launch, target)
        except Exception as e:
            errors.append(f"{launch['case']} {fn.__name__}: {type(e).__name__}: {e}")
            continue
        key = repr((fn.__module__, fn.__qualname__, signature, constexprs, attrs,
                    sorted(options.__dict__.items())))  # fmt: skip
        if key not in keys:
            keys[key] = f"t{len(keys)}"
            jobs.append((keys[key], fn, signature, constexprs, attrs, options))
        launches.append(
            {"case": launch["case"], "phase": launch["phase"], "kernel": fn.__name__,
             "compiled": keys[key], "grid": _grid(launch, bound),
             "constexprs": _constexprs(launch, bound), "autotune_config": launch["autotune"]}
        )  # fmt: skip
    compiled = _compile_all(jobs, target)
    kernels = {}
    for kid, fn, *_ in jobs:
        result = compiled[kid]
        if "error" in result:
            errors.append(f"compiling {fn.__name__} ({kid}): {result['error']}")
        else:
            kernels[kid] = {"kernel": fn.__name__, "module": fn.__module__, **result}
    launches = [ln for ln in launches if ln["compiled"] in kernels]
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "target": "cuda sm_90 (GPUTarget('cuda', 90, 32))",
        "launches": launches,
        "kernels": kernels,
        "errors": errors,
        "notes": notes,
    }


def main(argv: list[str]) -> int:
    """argv: OUT.json [substring ...] (only the cases whose id contains one of them)."""
    out, only = Path(argv[0]), argv[1:]
    t0 = time.perf_counter()
    cases = [c for c in headline.cases() if not only or any(o in c.id for o in only)]
    result = plan(cases)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
