"""Attention with a per-key bias (proportional attention) by each kernel: the masked call, one
extra query/key channel, FlexAttention; each equal to the masked computation."""

import pytest
import torch
from conftest import images_for, make_model

import tokenreduce
from tokenreduce.core.attention import KERNELS, attention, is_key_bias, key_bias_kernel, resolve_kernel
from tokenreduce.errors import ConfigError

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def reference(q, k, v, bias):
    """softmax(q k^T / sqrt(d) + bias) v written out, in float64."""
    q, k, v, bias = (t.double() for t in (q, k, v, bias))
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias).softmax(-1) @ v


def inputs(batch=2, heads=3, n=17, d=24, dtype=torch.float32, per_sample=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, d, generator=g).to(dtype) for _ in range(3))
    sizes = torch.randint(1, 9, (batch if per_sample else 1, n), generator=g).float()
    return q, k, v, sizes.log()[:, None, None, :]


@pytest.mark.parametrize("kind", ["mask", "channel", "flex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d, per_sample", [(24, True), (64, False), (7, True)])
def test_every_kernel_equals_the_masked_computation(kind, dtype, d, per_sample):
    q, k, v, bias = inputs(d=d, dtype=dtype, per_sample=per_sample)
    got = attention(q, k, v, bias, kind=kind)
    assert got.shape == q.shape and got.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), reference(q, k, v, bias), rtol=tol, atol=tol)


def test_a_bias_that_is_not_per_key_goes_as_a_mask():
    q, k, v, _ = inputs()
    pair_bias = torch.randn(2, 3, 17, 17)  # e.g. a relative position bias
    assert not is_key_bias(pair_bias) and is_key_bias(torch.zeros(1, 1, 1, 17))
    with key_bias_kernel("channel"):
        got = attention(q, k, v, pair_bias)
    torch.testing.assert_close(got.double(), reference(q, k, v, pair_bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention(q, k, v, None), torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_the_setting_is_scoped_checked_and_auto_picks_per_device():
    assert resolve_kernel(torch.device("cpu")) == "mask"
    assert resolve_kernel(torch.device("cuda")) == "channel"  # flash attention takes no mask
    with key_bias_kernel("flex"):
        assert resolve_kernel(torch.device("cpu")) == "flex"
    assert resolve_kernel(torch.device("cpu")) == "mask"
    with pytest.raises(ConfigError, match="key_bias_kernel='fast' is invalid; allowed: 'auto', 'mask'"):
        with key_bias_kernel("fast"):
            pass
    assert KERNELS[0] == "auto"


@pytest.mark.parametrize("kind", ["channel", "flex"])
def test_a_reduced_model_gives_the_same_output_with_every_kernel(kind):
    model = tokenreduce.apply(make_model("test_vit"), "tome", r=9)
    x = images_for(model)
    with torch.no_grad():
        want = model(x)
        with key_bias_kernel(kind):
            got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dropout_goes_to_a_kernel_that_has_it():
    q, k, v, bias = inputs()
    torch.manual_seed(0)
    assert torch.isfinite(attention(q, k, v, bias, dropout_p=0.5, kind="flex")).all()
    torch.manual_seed(0)
    dropped = attention(q, k, v, bias, dropout_p=0.5, kind="channel")
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, attention(q, k, v, bias, kind="channel"))
