"""DynamicViT: counts, training with masked attention and the ratio loss, real removal at inference."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODELS, images_for, make_model, narrow_vit_b_geometry, run

import tokenreduce
from tokenreduce.losses import dynamicvit_ratio_loss
from tokenreduce.reducers.base import create_reducer
from tokenreduce.reducers.dynamicvit import DECISIONS, softmax_with_policy

STAGES = [1, 2, 3]


@pytest.mark.parametrize("name", TINY_MODELS)
def test_keeping_everything_is_the_identity(name):
    model = make_model(name)
    images = images_for(model)
    expected = run(model, images)
    tokenreduce.apply(model, "dynamicvit", ratios=[1.0, 1.0, 1.0], layers=STAGES)
    assert torch.allclose(run(model, images), expected, atol=1e-6, rtol=0)


def test_reference_counts():
    model = narrow_vit_b_geometry()
    tokenreduce.apply(model, "dynamicvit")
    run(model, torch.randn(2, 3, 224, 224))
    # int(196 * .7) = 137, int(196 * .49) = 96, int(196 * .343) = 67 patches, before blocks 3, 6, 9
    assert tokenreduce.stats(model)["tokens"] == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 4


def test_inference_removes_the_lowest_scored_tokens():
    model = make_model("test_vit")
    tokenreduce.apply(model, "dynamicvit", ratios=[0.5], layers=[2], trace_source=True)
    images = images_for(model)
    with torch.no_grad():
        tokens = model.forward_features(images)
        assert tokens.shape[1] == 51  # removed for real
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for blk in model.blocks[:2]:
            x = blk(x)
        scores = model.token_reducer.predictors[0](x[:, 1:])[..., 0]
    state = model._tokenreduce.last_state
    st = tokenreduce.stats(model)
    assert st["macs_parts"]["reducer"] > 0
    for s in range(2):
        ranked = sorted(range(100), key=lambda i: -float(scores[s, i]))
        kept = sorted(i + 1 for i in ranked[:50])
        assert [i for i in range(101) if state.source[s, i] < 51] == [0] + kept


def test_training_masks_without_removing_and_the_ratio_loss_falls():
    torch.manual_seed(0)
    model = make_model("test_vit")
    tokenreduce.apply(model, "dynamicvit", layers=STAGES)
    model.train()
    images = images_for(model, batch=8)
    optimizer = torch.optim.Adam(model.token_reducer.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        model(images)
        loss = dynamicvit_ratio_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    state = model._tokenreduce.last_state
    assert tokenreduce.stats(model)["tokens"] == [101] * 7  # masks only: the batch stays rectangular
    decisions = state.extras[DECISIONS]
    assert len(decisions) == 3 and decisions[0].shape == (8, 100)
    assert all(torch.all(later <= earlier) for earlier, later in zip(decisions, decisions[1:], strict=False))
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3


def test_ratio_loss_value():
    model = make_model("test_vit")
    tokenreduce.apply(model, "dynamicvit", layers=STAGES)
    model.train()
    model(images_for(model))
    decisions = model._tokenreduce.last_state.extras[DECISIONS]
    expected = sum(((d.mean(dim=1) - r) ** 2).mean() for d, r in zip(decisions, (0.7, 0.49, 0.343), strict=True))
    assert torch.allclose(dynamicvit_ratio_loss(model), 2.0 * expected / 3)
    assert torch.allclose(dynamicvit_ratio_loss(model, weight=1.0), expected / 3)


def test_ratio_loss_needs_a_training_pass():
    model = make_model("test_vit")
    tokenreduce.apply(model, "dynamicvit", layers=STAGES)
    run(model, images_for(model))
    with pytest.raises(tokenreduce.ConfigError, match="training mode"):
        dynamicvit_ratio_loss(model)
    tokenreduce.apply(model, "tome", r=4)
    with pytest.raises(tokenreduce.ConfigError, match="dynamicvit"):
        dynamicvit_ratio_loss(model)


def test_softmax_with_policy():
    logits = torch.randn(2, 3, 6, 6)
    ones = torch.ones(2, 6, 1)
    assert torch.allclose(softmax_with_policy(logits, ones), logits.softmax(dim=-1), atol=1e-5)
    policy = torch.tensor([1.0, 1, 0, 1, 0, 1]).expand(2, 6).unsqueeze(-1)
    probs = softmax_with_policy(logits, policy)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(2, 3, 6), atol=1e-5)
    for q in range(6):
        for k in (2, 4):
            if k != q:
                assert probs[:, :, q, k].max() < 1e-5  # dropped keys get no attention
    assert probs[:, :, 2, 2].min() > 0  # a dropped token still attends to itself


def test_predictors_live_in_the_state_dict_and_get_gradients():
    model = make_model("test_vit")
    tokenreduce.apply(model, "dynamicvit", layers=STAGES)
    assert sum(k.startswith("token_reducer.predictors.") for k in model.state_dict()) > 0
    model.train()
    model(images_for(model)).sum().backward()
    assert model.token_reducer.predictors[0].head[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "params, match",
    [
        ({"ratios": [0.7, 0.8, 0.3]}, "non-increasing"),
        ({"ratios": [0.0, 0.0, 0.0]}, "ratios"),
        ({"ratios": [0.7, 0.5]}, "layers"),
        ({"layers": [6, 3, 9]}, "layers"),
        ({"tau": 0}, "tau=0"),
        ({"ratios": 0.5}, "ratios=0.5 is invalid"),  # not a list: refused, not a TypeError
        ({"layers": [3, "x", 9]}, r"layers=\[3, 'x', 9\] is invalid"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(tokenreduce.ConfigError, match=match):
        create_reducer("dynamicvit", **params)


def test_stages_beyond_the_model():
    with pytest.raises(tokenreduce.ConfigError, match="layers"):
        tokenreduce.apply(make_model("test_vit"), "dynamicvit")  # 6 blocks; stage 9 does not exist


def test_samples_do_not_depend_on_each_other():
    model = make_model("test_vit")
    tokenreduce.apply(model, "dynamicvit", layers=STAGES)
    images = images_for(model, batch=3)
    alone = run(model, images[:1])
    assert torch.allclose(alone, run(model, images)[:1], atol=1e-5)
    assert torch.allclose(alone, run(model, images[[0, 2]])[:1], atol=1e-5)
