"""kernels.interpret: why the bf16-dot patch of Triton's interpreter exists, and that the kernels'
bf16 branch (not an fp32 upcast) is what the interpreted tests run."""
import numpy as np
import pytest
import torch
import triton.language as tl

from kernels.interpret import interpreting, unpatched_create_dot
from kernels.logprobs import linear_logprobs

pytestmark = pytest.mark.skipif(not interpreting(), reason="about Triton's CPU interpreter (TRITON_INTERPRET=1)")


def _bf16_handle(t):
    from triton.runtime.interpreter import TensorHandle
    return TensorHandle(t.bfloat16().view(torch.int16).numpy().view(np.uint16), tl.bfloat16)


def test_the_unpatched_interpreter_still_gets_bf16_dots_wrong():
    # If this fails, Triton's interpreter handles bf16 dots itself: delete kernels/interpret.py.
    from triton.runtime.interpreter import TensorHandle, interpreter_builder
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 16, generator=g).bfloat16(), torch.randn(16, 16, generator=g).bfloat16()
    acc = TensorHandle(np.zeros((16, 16), np.float32), tl.float32)
    raw = unpatched_create_dot()(interpreter_builder, _bf16_handle(a), _bf16_handle(b), acc, None, None)
    exact = (a.float() @ b.float()).numpy()
    assert not np.allclose(raw.data, exact, atol=1e-2), "the interpreter now computes bf16 dots correctly"


def test_patched_interpreter_gives_the_fp32_accumulated_bf16_product():
    from triton.runtime.interpreter import TensorHandle, interpreter_builder
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 16, generator=g).bfloat16(), torch.randn(16, 64, generator=g).bfloat16()
    acc = TensorHandle(np.ones((32, 64), np.float32), tl.float32)
    out = interpreter_builder.create_dot(_bf16_handle(a), _bf16_handle(b), acc, None, None)
    # bf16 x bf16 products are exact in fp32: only the fp32 summation order differs.
    np.testing.assert_allclose(out.data, (a.float() @ b.float() + 1).numpy(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_head_kernels_dot_run_dtype_operands(dtype, monkeypatch):
    from triton.runtime.interpreter import InterpreterBuilder
    seen = set()
    current = InterpreterBuilder.create_dot

    def spy(self, a, b, d, *args):
        seen.add((str(a.dtype), str(b.dtype), str(d.dtype)))
        return current(self, a, b, d, *args)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", spy)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 48, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(300, 48, generator=g) * 0.3).to(dtype).requires_grad_()
    logp, ent = linear_logprobs(hidden, weight, torch.randint(0, 300, (40,), generator=g), impl="triton")
    (logp + ent).sum().backward()
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    assert seen == {(name, name, "fp32")}  # forward and d logits kernels: run-dtype operands, fp32 accumulator
