"""Make Triton's CPU interpreter (TRITON_INTERPRET=1) compute bf16 `tl.dot` correctly.

Triton 3.9's interpreter stores bf16 tensors as numpy uint16 and its `create_dot` hands those raw
bits to `np.matmul` (fp8 operands are converted first, bf16 ones are not), so a bf16 x bf16 dot
returns the product of the bit patterns read as integers (e.g. 2e10 for a 16x16 product of O(1)
values). The kernels would then need an interpreter-only fp32 upcast before every dot, and the bf16
branch that runs on the GPU would never run in a test.

`patch_bf16_dot()` instead wraps the interpreter's `create_dot`: bf16 operands are widened to fp32
(exact) before the product, which is accumulated in the accumulator's dtype (fp32 in our kernels):
what a tensor-core bf16 dot with fp32 accumulation computes, up to summation order. The kernels
keep one code path, `tl.dot(bf16, bf16, fp32_acc)`, on the GPU and under the interpreter.
Applied by `kernels.logprobs` at import, only when TRITON_INTERPRET=1; a no-op otherwise.
`tests/kernels/test_interpret.py` checks that the unpatched interpreter still gets it wrong (so
this module is deleted once Triton fixes it) and that the kernels' dots really see bf16 operands.
"""
import os

import triton.language as tl

PATCHED_FLAG = "_megatron_vlm_bf16_dot"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _widen_bf16(handle):
    """A bf16 TensorHandle (uint16 bits) -> the same values as an fp32 TensorHandle."""
    from triton.runtime.interpreter import TensorHandle
    bits = handle.data.astype("uint32") << 16  # bf16 is the top half of an fp32 (numpy, by dtype name)
    return TensorHandle(bits.view("float32"), tl.float32)


def unpatched_create_dot():
    """The interpreter's own create_dot (for the test that shows why the patch exists)."""
    from triton.runtime.interpreter import InterpreterBuilder
    dot = InterpreterBuilder.create_dot
    return getattr(dot, PATCHED_FLAG, dot)


def patch_bf16_dot() -> bool:
    """Wrap InterpreterBuilder.create_dot once; returns whether the patch is in place."""
    if not interpreting():
        return False
    from triton.runtime.interpreter import InterpreterBuilder
    original = InterpreterBuilder.create_dot
    if hasattr(original, PATCHED_FLAG):
        return True

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16:
            a = _widen_bf16(a)
        if b.dtype == tl.bfloat16:
            b = _widen_bf16(b)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    setattr(create_dot, PATCHED_FLAG, original)
    InterpreterBuilder.create_dot = create_dot
    return True
