"""The tiny random LLaVA shared by the vision-language tests (test_vlm_language_model: placement (c),
test_vlm_boundary: (b), test_vlm_tower: (a); docs/vlm.md), its prompts, greedy generation, and the
checks every placement makes alike: zero reduction is the unpatched model, generation with the KV
cache equals generation without, a padded batch equals each prompt alone, a reduced model equals
the unpatched one given hand-shortened prompts and features."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from tokenreduce.errors import ConfigError

transformers = pytest.importorskip("transformers")

IMAGE = 63  # the placeholder id (the last of the 64-token vocabulary)
PAD = 0
NEW = 5  # tokens generated
IMPLS = ("eager", "sdpa")


def make_llava(attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=16, patch_size=4, projection_dim=32)
    text = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=64, max_position_embeddings=128,
                                    pad_token_id=PAD)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE,
                                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                                      attn_implementation=attn)
    return transformers.LlavaForConditionalGeneration(config).eval()


# --- prompts -------------------------------------------------------------------------------------------
def prompts():
    """Two prompts of different lengths (16 image tokens each), left-padded into one batch."""
    first = [1, 5, 6] + [IMAGE] * 16 + [7, 8, 9]
    second = [4, 5] + [IMAGE] * 16 + [7, 8]
    width = max(len(first), len(second))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in (first, second)])
    generator = torch.Generator().manual_seed(1)
    return {"input_ids": ids, "attention_mask": (ids != PAD).long(),
            "pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}


def uneven_prompts():
    """prompts() with images for which PruMerge keeps 2 and 3 tokens and PruMerge+ 5 and 9, so the
    shortened samples differ in length and the batch is re-left-padded."""
    inputs = prompts()
    generator = torch.Generator().manual_seed(5)
    inputs["pixel_values"] = torch.randn(2, 3, 16, 16, generator=generator) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    return inputs


def solo(inputs, i):
    """Sample i of a left-padded batch alone, without its padding."""
    keep = inputs["attention_mask"][i].bool()
    return {"input_ids": inputs["input_ids"][i:i + 1, keep], "pixel_values": inputs["pixel_values"][i:i + 1]}


def shortened_by_hand(inputs, counts):
    """Each sample's tokens with its image's placeholder run cut to the first `counts[i]`, then
    left-padded to the longest (one image per sample)."""
    rows = []
    for b in range(inputs["input_ids"].shape[0]):
        real = inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist()
        seen, row = 0, []
        for token in real:
            if token == IMAGE:
                seen += 1
                if seen > counts[b]:
                    continue
            row.append(token)
        rows.append(row)
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def reference_inputs(inputs, features):
    """The unpatched model's inputs that stand for a reduced model's: the placeholder runs cut by hand
    to each image's count, and the image's projected `features` (one [count, D] tensor per image)
    passed as the encoder's output."""
    ids, mask = shortened_by_hand(inputs, [f.shape[0] for f in features])
    image = transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=features)
    return {"input_ids": ids, "attention_mask": mask, "mm_encoder_outputs": {"image": image}}


# --- running -------------------------------------------------------------------------------------------
def generate(model, inputs, **kwargs):
    """Greedy tokens and logits of up to NEW steps (never the placeholder id)."""
    out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, suppress_tokens=[IMAGE],
                         output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[:, -NEW:], torch.stack(out.logits, dim=1)  # [B, NEW], [B, NEW, V]


def generate_no_early_stop(model, inputs, **kwargs):
    """Greedy tokens and logits of NEW steps; no sample stops early at the end-of-sequence token."""
    return generate(model, inputs, min_new_tokens=NEW, **kwargs)


def logits_and_language_model_width(model, inputs):
    """The logits of a forward, and the sequence width entering the language model's first layer."""
    seen = {}
    hook = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(width=(args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        hook.remove()
    return logits, seen["width"]


def unreduced_macs(inputs) -> int:
    """The MACs the stats of an unreduced ('none') tiny LLaVA count for `inputs`."""
    model = tokenreduce.apply(make_llava(), "none")
    with torch.no_grad():
        model(**inputs)
    return tokenreduce.stats(model)["macs"]


class Counter:
    """Counts the calls of the modules it hooks (to show a refusal came before any compute)."""

    def __init__(self, *modules):
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self.hit) for m in modules]

    def hit(self, module, args):
        self.calls += 1


def compute_counter(model):
    return Counter(model.model.vision_tower, model.model.language_model.embed_tokens)


# --- checks every placement makes (greedy: generate, or generate_no_early_stop) ------------------------
def check_unpatched_when_nothing_is_reduced(greedy, model, inputs, name, params):
    """`model` reduced by `name` at a setting that reduces nothing gives the unpatched model's logits,
    tokens and generation logits, exactly."""
    with torch.no_grad():
        expected = model(**inputs).logits
    tokens, logits = greedy(model, inputs)
    tokenreduce.apply(model, name, **params)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
    got_tokens, got_logits = greedy(model, inputs)
    assert torch.equal(got_tokens, tokens) and torch.equal(got_logits, logits)


def check_cache_equals_no_cache(greedy, model, inputs, name, params):
    """Greedy generation of the reduced `model` with the KV cache equals generation without it, and
    differs from the unreduced model's."""
    _, unreduced = greedy(model, inputs)
    tokenreduce.apply(model, name, **params)
    tokens, logits = greedy(model, inputs)
    no_cache_tokens, no_cache_logits = greedy(model, inputs, use_cache=False)
    assert torch.equal(tokens, no_cache_tokens)
    torch.testing.assert_close(logits, no_cache_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, unreduced, atol=1e-3)  # the reduction changed the outputs


def check_batch_equals_each_alone(greedy, model, inputs):
    """The reduced `model` generates for each prompt of the left-padded batch what it generates for
    that prompt alone."""
    tokens, logits = greedy(model, inputs)
    for i in range(inputs["input_ids"].shape[0]):
        alone_tokens, alone_logits = greedy(model, solo(inputs, i))
        assert torch.equal(tokens[i:i + 1], alone_tokens)
        torch.testing.assert_close(logits[i:i + 1], alone_logits, atol=1e-5, rtol=1e-5)


def check_batch_is_wrong_once_broken(greedy, model, inputs, i, break_decode):
    """The control of check_batch_equals_each_alone: once `break_decode()` has taken the decode steps'
    correction away, sample i of the batch fails or generates other logits than it does alone."""
    _, alone = greedy(model, solo(inputs, i))
    break_decode()
    try:
        _, logits = greedy(model, inputs)
    except (RuntimeError, IndexError, ValueError):
        return
    assert not torch.allclose(logits[i:i + 1], alone, atol=1e-3)


def check_generation_equals_the_reference(reference, features, model, inputs):
    """generate() on the reduced `model` gives the unpatched `reference`'s generation from the
    hand-shortened prompt and the reduced `features` (reference_inputs)."""
    tokens, logits = generate_no_early_stop(reference, reference_inputs(inputs, features))
    got_tokens, got_logits = generate_no_early_stop(model, inputs)
    assert torch.equal(got_tokens, tokens)
    torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=1e-5)


def check_generate_refused_before_any_compute(model, kwargs, words):
    """generate() with `kwargs` on the reduced `model` raises a ConfigError naming `words` and what is
    allowed, before the vision tower or the language model runs."""
    inputs = prompts()
    counter = compute_counter(model)
    with pytest.raises(ConfigError, match=f"{words}.*allowed: "):
        model.generate(**inputs, max_new_tokens=2, **kwargs)
    assert counter.calls == 0


def continue_by_hand(model, inputs, banned):
    """A plain forward of the reduced `model` with use_cache (positions as generate numbers them), its
    greedy next token with the `banned` ids excluded (as generate excludes them), and the forward of
    that token on the returned cache (the mask and position in the original prompt's numbering).
    Returns the step [B, 1], the step's logits [B, V], the cache and the step's mask."""
    with torch.no_grad():
        positions = (inputs["attention_mask"].cumsum(-1) - 1).masked_fill(inputs["attention_mask"] == 0, 1)
        out = model(**inputs, position_ids=positions, use_cache=True)
        excluded = torch.isin(torch.arange(out.logits.shape[-1]), torch.tensor(banned))
        step = out.logits[:, -1].masked_fill(excluded, float("-inf")).argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones(step.shape[0], 1, dtype=torch.long)], dim=1)
        nxt = model(input_ids=step, attention_mask=mask, position_ids=mask.cumsum(-1)[:, -1:] - 1, cache=out.cache)
    return step, nxt.logits[:, -1], out.cache, mask
