"""PPT: each image prunes or pools by the variance of its class attention; each branch is exactly
the method it borrows (Top-K pruning, ToMe pooling), and the choice follows the threshold."""

import pytest
import torch
from conftest import images_for, make_model

import tokenreduce
from tokenreduce.errors import ConfigError
from tokenreduce.reducers.ppt import DECISIONS, prunes

R = [0, 30, 0, 21, 0, 0]  # what Top-K at 0.7 removes at layers 1 and 3 of test_vit's 100 patches


def outputs(reducer: str, x, **params):
    model = tokenreduce.apply(make_model("test_vit"), reducer, **params)
    with torch.no_grad():
        out = model(x)
    return out, model._tokenreduce.last_state


def test_the_policy_is_the_variance_against_the_threshold():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 40, generator=g) * torch.tensor([0.1, 1.0, 0.01, 3.0, 0.5])[:, None]
    for threshold in (1e-4, 1e-2, 0.1):
        want = []
        for row in scores.tolist():
            mean = sum(row) / len(row)
            want.append(sum((v - mean) ** 2 for v in row) / (len(row) - 1) > threshold)
        assert prunes(scores, threshold).tolist() == want


def test_a_threshold_of_zero_prunes_as_top_k_and_an_infinite_one_pools_as_tome():
    x = images_for(make_model("test_vit"))
    topk, _ = outputs("topk", x, ratio=0.7, layers=[1, 3])
    tome, _ = outputs("tome", x, r=R)
    pruned, state = outputs("ppt", x, r=R, layers=None, threshold=0.0, prop_attn=False)
    assert all(d.all() for d in state.extras[DECISIONS])
    torch.testing.assert_close(pruned, topk, rtol=1e-5, atol=1e-5)
    pooled, state = outputs("ppt", x, r=R, layers=None, threshold=float("inf"))
    assert not any(d.any() for d in state.extras[DECISIONS])
    torch.testing.assert_close(pooled, tome, rtol=1e-5, atol=1e-5)


def test_images_of_one_batch_choose_apart():
    x = images_for(make_model("test_vit"), batch=4)
    _, state = outputs("ppt", x, r=R, layers=None, threshold=0.0)
    # the variances of layer 1's significance, from an unreduced pass with attention kept
    model = make_model("test_vit")
    kept = {}
    attn = model.blocks[1].attn
    attn.fused_attn = False
    attn.attn_drop.register_forward_hook(lambda m, i, o: kept.setdefault("p", i[0]))
    with torch.no_grad():
        model(x)
    variances = kept["p"][:, :, 0, 1:].mean(1).var(dim=1)
    threshold = variances.sort().values[1:3].mean().item()  # two images above, two below
    mixed, state = outputs("ppt", x, r=R, layers=None, threshold=threshold)
    decisions = state.extras[DECISIONS][0]
    assert decisions.tolist() == (variances > threshold).tolist() and 0 < decisions.sum() < 4
    pruned, _ = outputs("ppt", x, r=[0, 30, 0, 0, 0, 0], layers=None, threshold=0.0)
    pooled, _ = outputs("ppt", x, r=[0, 30, 0, 0, 0, 0], layers=None, threshold=float("inf"))
    first_layer_only, _ = outputs("ppt", x, r=[0, 30, 0, 0, 0, 0], layers=None, threshold=threshold)
    want = torch.where(decisions[:, None], pruned, pooled)
    torch.testing.assert_close(first_layer_only, want, rtol=1e-5, atol=1e-5)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="ppt: threshold=-1"):
        tokenreduce.apply(make_model("test_vit"), "ppt", threshold=-1)
    model = make_model("test_vit")
    model.cls_token = None
    model.num_prefix_tokens = 0
    model.global_pool = "avg"
    with pytest.raises(ConfigError, match="ppt: ranks tokens by the class token's attention"):
        tokenreduce.apply(model, "ppt", layers=[1])
