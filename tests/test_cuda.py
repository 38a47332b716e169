"""Checks that need a GPU; they skip, saying so, without one. experiments/gpu_speed.py runs them
first on a GPU machine."""

import pytest
import torch
from conftest import images_for, make_model
from test_attention import TOLERANCE, inputs, reference

import tokenreduce
from tokenreduce.core.attention import attention, resolve_kernel
from tokenreduce.reducers.limit import SpeedLimit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (experiments/gpu_speed.py runs these on a GPU machine)")


@pytest.mark.parametrize("kind", ["mask", "channel", "flex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_equals_the_masked_computation_on_the_gpu(kind, dtype):
    q, k, v, bias = (t.cuda() for t in inputs(d=64, dtype=dtype))
    got = attention(q, k, v, bias, kind=kind)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), reference(q, k, v, bias), rtol=tol, atol=tol)
    assert resolve_kernel(q.device) == "channel"


def test_a_reduced_model_gives_the_cpu_output_on_the_gpu():
    model = tokenreduce.apply(make_model("test_vit"), "tome", r=9)
    x = images_for(model)
    with torch.no_grad():
        want = model(x)
        got = model.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_limit_has_the_case_token_counts_on_the_gpu():
    model = tokenreduce.apply(make_model("test_vit").cuda(), "tome", r=9)
    x = images_for(model).cuda()
    with torch.no_grad():
        model(x)
        tokens = tokenreduce.stats(model)["tokens"]
        tokenreduce.apply(model, SpeedLimit.of(model._tokenreduce.last_state))(x)
    assert tokenreduce.stats(model)["tokens"] == tokens


def test_torch_compile_fullgraph_on_the_gpu():
    model = tokenreduce.apply(make_model("test_vit").cuda().to(torch.bfloat16), "tome", r=9)
    x = images_for(model).cuda().to(torch.bfloat16)
    with torch.no_grad():
        want = model(x).float()
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True)(x).float()
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)
