"""One module per op family: the public function, backend choice, fake and autograd."""


def compile_time_constant(fn):
    """Marks ``fn`` as `torch.compiler.assume_constant_result` does: torch.compile then calls it
    eagerly while tracing and uses its result as a constant, instead of tracing into it. The
    public decorator imports torch._dynamo (about a second), which ``import lrkernels`` must not
    pay; on torch 2.11–2.15 it only sets this attribute (tests/test_import_time.py checks that
    it still does)."""
    fn._dynamo_marked_constant = True
    return fn


def register_triton_ops() -> None:
    """Registers every ``lrkernels::*_triton`` op now. They are otherwise registered on first
    use of the triton backend, so that ``import lrkernels`` does not import triton (and
    torch._inductor); call this before using ``torch.ops.lrkernels.*_triton`` directly."""
    from . import attention, int8, lora, lowrank

    for family in (lowrank, int8, attention, lora):
        family._ensure_triton_ops()
