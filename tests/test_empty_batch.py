"""A batch of no images: every reducer gives the unpatched model's empty output, and the next batch
is reduced as before."""

import pytest
import torch
from conftest import images_for, make_model
from test_invariants import SEQUENCE_REDUCERS, SETTINGS

import tokenreduce


def tiny_vit() -> torch.nn.Module:
    # timm's test_vit is built with dynamic_img_size, whose position embedding cannot reshape an
    # empty batch even unpatched; without it the unpatched model returns [0, classes]
    return make_model("test_vit", dynamic_img_size=False)


@pytest.mark.parametrize("name", sorted(SEQUENCE_REDUCERS))
def test_every_reducer_gives_the_unpatched_models_empty_output(name):
    plain = tiny_vit()
    empty = images_for(plain, batch=0)
    with torch.no_grad():
        expected, expected_features = plain(empty), plain.forward_features(empty)
    assert expected.shape == (0, plain.num_classes)
    model = tokenreduce.apply(tiny_vit(), name, **SETTINGS[name])
    with torch.no_grad():
        assert model(empty).shape == expected.shape
        assert model.forward_features(empty).shape == expected_features.shape
        tokens = tokenreduce.stats(model)["tokens"]
        assert tokens == [expected_features.shape[1]] * (len(model.blocks) + 1)  # nothing to reduce
        reduced = model(images_for(model, batch=2))
    assert reduced.shape == (2, plain.num_classes)
    if name != "none":
        assert tokenreduce.stats(model)["tokens"][-1] < tokens[-1]


@pytest.mark.parametrize("name", sorted(SEQUENCE_REDUCERS))
def test_every_reducer_trains_on_an_empty_batch(name):
    model = tokenreduce.apply(tiny_vit(), name, **SETTINGS[name]).train()
    out = model(images_for(model, batch=0))
    assert out.shape == (0, model.num_classes)
    out.sum().backward()  # an empty sum: zero gradients, no error
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())

