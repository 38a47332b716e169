"""Token reduction in diffusers' joint-attention transformers (tokenreduce/adapters/diffusers_models.py):
SD3/SD3.5 (`SD3Transformer2DModel`) and Flux (`FluxTransformer2DModel`) on tiny configs. Only image
tokens merge; the text tokens, and every token of a block's output, stay."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import tokenreduce
from tokenreduce.core.grid import grid_destinations, grid_matching, slot_representatives
from tokenreduce.core.merge import Assignment, combine, unmerge
from tokenreduce.errors import ConfigError, UnsupportedModelError

diffusers = pytest.importorskip("diffusers")
from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402
from test_diffusion import check_block_macs  # noqa: E402

GRID, TEXT, TEXT_DIM = 8, 5, 16


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Case:
    """A tiny joint-attention denoiser on an 8 x 8 token grid with 5 text tokens."""

    name: str  # "sd3", "sd35" (dual attention in block 0, q/k norms), "flux"

    def build(self):
        torch.manual_seed(0)
        if self.name == "flux":
            model = diffusers.FluxTransformer2DModel(
                patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
        else:
            sd35 = self.name == "sd35"
            model = diffusers.SD3Transformer2DModel(
                sample_size=GRID, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=TEXT_DIM, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                dual_attention_layers=(0,) if sd35 else (), qk_norm="rms_norm" if sd35 else None)
        return model.eval()

    def inputs(self, batch: int, seed: int = 1) -> dict:
        g = torch.Generator().manual_seed(seed)
        if self.name == "flux":
            ids = torch.zeros(GRID * GRID, 3)
            ids[:, 1], ids[:, 2] = torch.arange(GRID * GRID) // GRID, torch.arange(GRID * GRID) % GRID
            return {"hidden_states": torch.randn(batch, GRID * GRID, 4, generator=g),
                    "encoder_hidden_states": torch.randn(batch, TEXT, TEXT_DIM, generator=g),
                    "pooled_projections": torch.randn(batch, 16, generator=g), "timestep": torch.full((batch,), 0.5),
                    "img_ids": ids, "txt_ids": torch.zeros(TEXT, 3)}
        return {"hidden_states": torch.randn(batch, 4, 2 * GRID, 2 * GRID, generator=g),
                "encoder_hidden_states": torch.randn(batch, TEXT, TEXT_DIM, generator=g),
                "pooled_projections": torch.randn(batch, 16, generator=g), "timestep": torch.full((batch,), 10.0)}

    def run(self, model, inputs: dict, keywords: bool = True) -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs).sample if keywords else model(*inputs.values()).sample


SD3, SD35, FLUX = Case("sd3"), Case("sd35"), Case("flux")
CASES = [SD3, SD35, FLUX]
# the reducers' settings that merge (the token-merging reducers' proportional attention is refused)
REDUCERS = [("tomesd", {"use_rand": False}), ("todo", {}), ("tome", {"r": 20, "prop_attn": False}),
            ("pitome", {"ratio": 0.7}), ("tofu", {"r": 20, "prop_attn": False})]


def hooks_of(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def attentions(model):
    """(name, attention module) of every attention the reduction touches."""
    return [(n, m) for n, m in model.named_modules() if n.endswith((".attn", ".attn2"))]


def sample(inputs: dict, i: int) -> dict:
    return {k: v[i:i + 1] if torch.is_tensor(v) and k not in ("img_ids", "txt_ids") else v for k, v in inputs.items()}


# --- the model as it was ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("reducer, params", [("tomesd", {"ratio": 0.0}), ("tome", {"r": 0}), ("none", {})])
def test_zero_reduction_is_the_unpatched_model(case, reducer, params):
    model = case.build()
    inputs = case.inputs(2)
    plain = case.run(model, inputs)
    tokenreduce.apply(model, reducer, **params)
    assert torch.equal(case.run(model, inputs), plain)
    stats = tokenreduce.stats(model)
    assert stats["removed"] == [0] * len(model._tokenreduce.entries)
    assert all(b["context"] == TEXT for b in stats["blocks"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_remove_restores_the_model(case):
    model = case.build()
    inputs = case.inputs(2)
    plain, keys, hooks = case.run(model, inputs), list(model.state_dict()), hooks_of(model)
    processors = {n: m.processor for n, m in attentions(model)}
    for reducer, params in REDUCERS:
        tokenreduce.apply(model, reducer, **params)
        assert not torch.allclose(case.run(model, inputs), plain), reducer
        assert list(model.state_dict()) == keys
    tokenreduce.remove(model)
    assert hooks_of(model) == hooks and not hasattr(model, "_tokenreduce")
    assert {n: m.processor for n, m in attentions(model)} == processors
    assert torch.equal(case.run(model, inputs), plain)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("reducer, params", REDUCERS[:3], ids=lambda p: str(p))
def test_keyword_and_positional_calls_agree(case, reducer, params):
    model = case.build()
    tokenreduce.apply(model, reducer, **params)
    inputs = case.inputs(2)
    assert torch.equal(case.run(model, inputs, keywords=False), case.run(model, inputs))
    blocks = tokenreduce.stats(model)["blocks"]
    assert all(b["attn"] < b["tokens"] or b["attn_keys"] < b["tokens"] for b in blocks)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("reducer, params", REDUCERS, ids=lambda p: str(p))
def test_each_sample_is_independent_of_the_batch(case, reducer, params):
    model = case.build()
    tokenreduce.apply(model, reducer, **params)
    inputs = case.inputs(3)
    out = case.run(model, inputs)
    for i in range(3):
        assert (out[i:i + 1] - case.run(model, sample(inputs, i))).abs().max() < 1e-5


# --- merge, compute, unmerge against a brute-force reference ---------------------------------------------
class MergingReference:
    """An attention processor that merges the image tokens by tomesd's plan (use_rand off, ratio
    0.5) from the block's input, one sample at a time, gives each slot its destination's rotary row,
    runs diffusers' processor on them and unmerges the image part of the output."""

    gather = True  # False: the first rows instead (a wrong reference, to show the rows matter)

    def __init__(self, inner, inputs: dict, block: str, single: bool):
        self.inner, self.inputs, self.block, self.single = inner, inputs, block, single

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        x = self.inputs[self.block]
        text = x.shape[1] and (hidden_states.shape[1] - x.shape[1]) if self.single else 0
        outs = []
        for b in range(hidden_states.shape[0]):
            matching = grid_matching(x[b:b + 1], grid_destinations(GRID, GRID, 2, 2), GRID * GRID // 2)
            h = hidden_states[b:b + 1]
            merged = torch.cat([h[:, :text], combine(h[:, text:], None, matching, "mean")[0]], dim=1)
            kwargs = {}
            if image_rotary_emb is not None:
                t = TEXT  # the rows: the text tokens', then each slot's destination's
                rows = matching.reps[0] if self.gather else torch.arange(matching.n_out)
                kwargs["image_rotary_emb"] = tuple(torch.cat([m[:t], m[t:][rows]]) for m in image_rotary_emb)
            context = None if encoder_hidden_states is None else encoder_hidden_states[b:b + 1]
            out = self.inner(attn, merged, context, None, **kwargs)
            image = out[0] if isinstance(out, tuple) else out
            image = torch.cat([image[:, :text], unmerge(image[:, text:], matching)], dim=1)
            outs.append((image, *out[1:]) if isinstance(out, tuple) else (image,))
        joined = tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
        return joined if isinstance(out, tuple) else joined[0]


def merging_reference(model, merge_mlp: bool):
    """A copy of `model` whose attentions (and MLPs) merge, compute and unmerge as defined."""
    reference = copy.deepcopy(model)
    inputs = {}
    blocks = [(n, m) for n, m in reference.named_modules() if n.count(".") == 1 and "transformer_blocks" in n]
    for name, block in blocks:
        block.register_forward_pre_hook(lambda m, a, k, name=name: inputs.update({name: k["hidden_states"]}),
                                        with_kwargs=True)
        single = name.startswith("single")
        for attn in (block.attn, getattr(block, "attn2", None)):
            if attn is not None:
                attn.set_processor(MergingReference(attn.processor, inputs, name, single))
        if merge_mlp:
            mlp = block.proj_mlp if single else block.ff
            mlp.register_forward_pre_hook(lambda m, a, name=name, single=single: merge_input(a[0], inputs[name], single))
            mlp.register_forward_hook(lambda m, a, out, name=name, single=single: unmerge_output(out, inputs[name], single))
    return reference


def plan(x):
    return grid_matching(x, grid_destinations(GRID, GRID, 2, 2), GRID * GRID // 2)


def merge_input(h, x, single):
    text = TEXT if single else 0
    return (torch.cat([h[:, :text], combine(h[:, text:], None, plan(x), "mean")[0]], dim=1),)


def unmerge_output(y, x, single):
    text = TEXT if single else 0
    return torch.cat([y[:, :text], unmerge(y[:, text:], plan(x))], dim=1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("merge_mlp", [False, True])
def test_merging_equals_a_brute_force_reference_with_gathered_rope_rows(case, merge_mlp):
    # Flux: the reference passes each sample's gathered rotary rows to diffusers' own processor
    model = case.build()
    reference = merging_reference(model, merge_mlp)
    tokenreduce.apply(model, "tomesd", use_rand=False, merge_mlp=merge_mlp)
    inputs = case.inputs(2)
    out, expected = case.run(model, inputs), case.run(reference, inputs)
    assert (out - expected).abs().max() < 1e-5
    assert not torch.allclose(out, case.run(case.build(), inputs), atol=1e-3)
    for b in tokenreduce.stats(model)["blocks"]:
        assert b["attn"] == b["attn_keys"] == 32 and b["mlp"] == (32 if merge_mlp else 64) and b["context"] == TEXT


def test_rope_rows_matter():
    # the same merge with the rows of the first slots (not the destinations') gives another result
    model = FLUX.build()
    reference = merging_reference(model, False)
    for _, attn in attentions(reference):
        attn.processor.gather = False
    tokenreduce.apply(model, "tomesd", use_rand=False)
    inputs = FLUX.inputs(2)
    assert (FLUX.run(model, inputs) - FLUX.run(reference, inputs)).abs().max() > 1e-3


# --- ToDo against attention over interpolated image keys --------------------------------------------------
def small_grid(x, mode):
    """Image tokens [B, 64, C] resampled onto the 4 x 4 grid by F.interpolate or 2 x 2 means."""
    b, n, c = x.shape
    grid = x.transpose(1, 2).reshape(b, c, GRID, GRID)
    small = F.avg_pool2d(grid, 2) if mode == "avg" else F.interpolate(grid, size=(GRID // 2, GRID // 2), mode=mode)
    return small.flatten(2).transpose(1, 2)


class ToDoReference:
    """Joint attention written out: queries from every token, image keys and values from the image
    tokens resampled onto the coarser grid, text keys and values untouched; Flux's keys take the rows
    of their resampled positions."""

    def __init__(self, mode: str, model, ids=None):
        self.mode, self.model, self.ids = mode, model, ids

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        flux = image_rotary_emb is not None
        text = TEXT if flux and encoder_hidden_states is None else 0  # single stream: text tokens first
        h = hidden_states
        small = torch.cat([h[:, :text], small_grid(h[:, text:], self.mode)], dim=1)
        d = attn.to_q.out_features // attn.heads

        def heads(x):
            return x.unflatten(-1, (attn.heads, d))

        q, k, v = heads(attn.to_q(h)), heads(attn.to_k(small)), heads(attn.to_v(small))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        e = encoder_hidden_states
        if e is not None:
            eq, ek, ev = heads(attn.add_q_proj(e)), heads(attn.add_k_proj(e)), heads(attn.add_v_proj(e))
            if attn.norm_added_q is not None:
                eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            # Flux puts the text first, SD3 last
            q, k, v = ((torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)) if flux else
                       (torch.cat([q, eq], 1), torch.cat([k, ek], 1), torch.cat([v, ev], 1)))
        if flux:
            positions = small_grid(self.ids[None].float(), self.mode)[0]
            key_rows = tuple(torch.cat([full[:TEXT], part]) for full, part in
                             zip(image_rotary_emb, self.model.pos_embed(positions), strict=True))
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, key_rows, sequence_dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2)
        if e is None:
            return out if getattr(attn, "pre_only", False) else attn.to_out[1](attn.to_out[0](out))
        t = e.shape[1]
        image, context = (out[:, t:], out[:, :t]) if flux else (out[:, :-t], out[:, -t:])
        image = attn.to_out[1](attn.to_out[0](image))
        context = attn.to_add_out(context) if attn.to_add_out is not None else context
        return image, context


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("mode", ["nearest-exact", "bilinear", "avg"])
def test_todo_equals_attention_over_interpolated_image_keys(case, mode):
    model = case.build()
    inputs = case.inputs(2)
    reference = copy.deepcopy(model)
    for _, attn in attentions(reference):
        attn.set_processor(ToDoReference(mode, reference, inputs.get("img_ids")))
    tokenreduce.apply(model, "todo", mode=mode)
    assert (case.run(model, inputs) - case.run(reference, inputs)).abs().max() < 1e-5
    for b in tokenreduce.stats(model)["blocks"]:
        assert (b["attn"], b["attn_keys"], b["context"]) == (64, 16, TEXT)
        assert b["dualattn_keys"] == (16 if b["dualattn"] else 0)


# --- the other token-merging reducers --------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("reducer, params", REDUCERS[2:], ids=lambda p: str(p))
def test_token_merging_reducers_merge_only_image_tokens(case, reducer, params):
    model = case.build()
    seen = []
    for entry in model._modules["transformer_blocks"]:
        entry.register_forward_hook(lambda m, a, k, out: seen.append((k["encoder_hidden_states"], k["hidden_states"],
                                                                      *out)), with_kwargs=True)
    tokenreduce.apply(model, reducer, **params)
    case.run(model, case.inputs(2))
    for text_in, image_in, text_out, image_out in seen:  # SD3's last block returns no text tokens
        assert image_in.shape == image_out.shape and (text_out is None or text_in.shape == text_out.shape)
    blocks = tokenreduce.stats(model)["blocks"]
    assert all(b["attn"] < b["tokens"] == b["mlp"] and b["context"] == TEXT for b in blocks)


# --- MACs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("reducer, params", [("none", {}), ("tomesd", {"use_rand": False, "merge_mlp": True}),
                                             ("todo", {}), ("tome", {"r": 20, "prop_attn": False})])
def test_macs_equal_flop_counter_per_block(case, reducer, params):
    model = case.build()
    tokenreduce.apply(model, reducer, **params)
    check_block_macs(model, case.inputs(2))


# --- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [SD3, FLUX], ids=lambda c: c.name)
def test_settings_that_cannot_work_are_refused_before_the_model_is_touched(case):
    model = case.build()
    root = type(model).__name__
    with pytest.raises(ConfigError, match=f"reducer 'tome' with prop_attn=True cannot run in {root}.*allowed: "
                                          "prop_attn=False"):
        tokenreduce.apply(model, "tome", r=4)
    with pytest.raises(ConfigError, match=f"tomesd: merge_crossattn alone merges nothing in {root}"):
        tokenreduce.apply(model, "tomesd", merge_attn=False, merge_crossattn=True)
    with pytest.raises(ConfigError, match="adapter_options merge_crossattn alone merges nothing"):
        tokenreduce.apply(model, "tome", r=4, prop_attn=False,
                          adapter_options={"merge_attn": False, "merge_crossattn": True})
    assert not hasattr(model, "_tokenreduce")


def test_flux_needs_one_row_major_image_grid():
    model = tokenreduce.apply(FLUX.build(), "tomesd", use_rand=False)
    inputs = FLUX.inputs(2)
    ids = inputs["img_ids"].clone()
    ids[:, 1], ids[:, 2] = ids[:, 2].clone(), ids[:, 1].clone()  # column-major
    with pytest.raises(UnsupportedModelError, match="img_ids do not lay its 64 image tokens on one row-major grid"):
        FLUX.run(model, {**inputs, "img_ids": ids})
    with pytest.raises(ConfigError, match="img_ids=None is invalid"):
        FLUX.run(model, {**inputs, "img_ids": None})
    assert model._tokenreduce.local.ctx is None
    batched = {**inputs, "img_ids": inputs["img_ids"][None]}  # the deprecated batched form
    assert torch.equal(FLUX.run(model, batched), FLUX.run(model, inputs))


def test_flux_refuses_other_processors_and_replaced_projections_when_it_reduces():
    model = FLUX.build()
    inputs = FLUX.inputs(2)

    class Other:  # any processor but FluxAttnProcessor, here one that delegates to it
        def __init__(self):
            self.inner = diffusers.models.transformers.transformer_flux.FluxAttnProcessor()

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    plain = FLUX.run(model, inputs)
    model.transformer_blocks[0].attn.set_processor(Other())
    tokenreduce.apply(model, "tomesd", ratio=0.0)
    assert torch.equal(FLUX.run(model, inputs), plain)  # nothing moves: the processor is fine
    tokenreduce.apply(model, "tomesd")
    with pytest.raises(ConfigError, match="transformer_blocks.0: its attention processor Other is not FluxAttnProcessor"):
        FLUX.run(model, inputs)
    model.transformer_blocks[0].attn.set_processor(Other().inner)
    tokenreduce.apply(model, "todo")
    model.single_transformer_blocks[0].attn.to_k = copy.deepcopy(model.single_transformer_blocks[0].attn.to_k)
    with pytest.raises(ConfigError, match=r"single_transformer_blocks.0: attn.to_k or attn.to_v was replaced after "
                                          r"tokenreduce.apply"):
        FLUX.run(model, inputs)


def test_todo_refuses_fused_projections():
    model = SD3.build()
    model.fuse_qkv_projections()
    tokenreduce.apply(model, "todo")
    with pytest.raises(ConfigError, match="fused q/k/v projections"):
        SD3.run(model, SD3.inputs(2))
    tokenreduce.apply(model, "tomesd", use_rand=False)  # merging is fine with them
    SD3.run(model, SD3.inputs(2))


# --- pieces ----------------------------------------------------------------------------------------------
def test_slot_representatives():
    x = torch.randn(2, 16, 4)
    matching = grid_matching(x, grid_destinations(4, 4, 2, 2), 6)
    assert torch.equal(slot_representatives(matching), matching.reps)
    dest = torch.tensor([[1, 0, 1, 2, 0]])
    # the member no other token absorbed, else the first member
    assert slot_representatives(Assignment(dest, 3, merged=torch.tensor([[True, False, False, False, False]]))).tolist() \
        == [[1, 2, 3]]
    assert slot_representatives(Assignment(dest, 3)).tolist() == [[1, 0, 3]]


def test_describe_joint_models():
    from tokenreduce.adapters import adapter_for

    for case, names in ((SD3, ["transformer_blocks.0", "transformer_blocks.1"]),
                        (FLUX, ["transformer_blocks.0", "single_transformer_blocks.0"])):
        model = case.build()
        info = adapter_for(model).describe(model)
        assert info.block_downsample == (1, 1) and info.num_heads == 2 and info.layout.startswith("single-resolution")
        tokenreduce.apply(model, "tomesd")
        assert [e.name for e in model._tokenreduce.entries] == names
