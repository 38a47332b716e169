"""Token reduction in diffusers denoisers (tokenreduce/adapters/diffusers_models.py, reducers tomesd
and todo, core/grid.py): merge, compute, unmerge inside each BasicTransformerBlock, on tiny
SD-like and SDXL-like U-Nets, DiT and PixArt."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokenreduce
from tokenreduce.core.grid import GridBlock, downsample_tokens, grid_destinations, grid_matching
from tokenreduce.core.merge import combine, unmerge
from tokenreduce.errors import ConfigError

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

TEXT_DIM, CAPTION_DIM = 24, 12


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Case:
    """A tiny denoiser: how to build it and call it, positionally and by keyword."""

    name: str
    size: tuple[int, int]  # the latent's height and width

    def build(self):
        torch.manual_seed(0)
        if self.name in ("sd", "sdxl"):
            sd = self.name == "sd"
            down = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D") if sd else \
                ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
            up = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D") if sd else \
                ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
            model = diffusers.UNet2DConditionModel(
                sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
                down_block_types=down, up_block_types=up, cross_attention_dim=TEXT_DIM, attention_head_dim=8,
                norm_num_groups=8, use_linear_projection=not sd, transformer_layers_per_block=1 if sd else (1, 2, 2))
        elif self.name == "dit":
            model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                    out_channels=8, num_layers=2, norm_num_groups=4, sample_size=16,
                                                    num_embeds_ada_norm=1000)
        else:
            model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                       out_channels=8, num_layers=2, norm_num_groups=4,
                                                       cross_attention_dim=16, sample_size=16, caption_channels=CAPTION_DIM)
        return model.eval()

    def inputs(self, batch: int, seed: int = 1, t: float = 10.0) -> dict:
        g = torch.Generator().manual_seed(seed)
        latent = torch.randn(batch, 4, *self.size, generator=g)
        timestep = torch.full((batch,), t)
        if self.name in ("sd", "sdxl"):
            return {"sample": latent, "timestep": timestep,
                    "encoder_hidden_states": torch.randn(batch, 5, TEXT_DIM, generator=g)}
        if self.name == "dit":
            return {"hidden_states": latent, "timestep": timestep,
                    "class_labels": torch.randint(0, 1000, (batch,), generator=g)}
        return {"hidden_states": latent, "encoder_hidden_states": torch.randn(batch, 5, CAPTION_DIM, generator=g),
                "timestep": timestep, "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}

    def run(self, model, inputs: dict, keywords: bool = False) -> torch.Tensor:
        with torch.no_grad():
            if keywords:
                return model(**inputs).sample
            return model(*inputs.values()).sample


SD, SDXL, DIT, PIXART = Case("sd", (16, 16)), Case("sdxl", (16, 16)), Case("dit", (16, 16)), Case("pixart", (16, 16))
CASES = [SD, SDXL, DIT, PIXART]
# settings that merge in each case (SDXL's finest level has no transformer block)
MERGING = {"sd": {}, "sdxl": {"max_downsample": 2}, "dit": {}, "pixart": {}}


def blocks_of(model):
    basic = diffusers.models.attention.BasicTransformerBlock
    return [(name, m) for name, m in model.named_modules() if isinstance(m, basic)]


def hooks_of(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --- the model as it was ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("reducer, params", [("tomesd", {"ratio": 0.0}), ("tome", {"r": 0}), ("none", {})])
def test_zero_reduction_is_the_unpatched_model(case, reducer, params):
    model = case.build()
    inputs = case.inputs(2)
    plain = case.run(model, inputs)
    tokenreduce.apply(model, reducer, **params, **(MERGING[case.name] if reducer == "tomesd" else {}))
    assert torch.equal(case.run(model, inputs), plain)
    stats = tokenreduce.stats(model)
    assert stats["removed"] == [0] * len(blocks_of(model))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_remove_restores_the_model_and_its_state_dict(case):
    model = case.build()
    inputs = case.inputs(2)
    plain, keys, hooks = case.run(model, inputs), list(model.state_dict()), hooks_of(model)
    tokenreduce.apply(model, "tomesd", use_rand=False, **MERGING[case.name])
    assert list(model.state_dict()) == keys  # no module was wrapped or renamed
    merged = case.run(model, inputs)
    assert not torch.allclose(merged, plain)
    assert tokenreduce.reducer_of(model).name == "tomesd"
    tokenreduce.apply(model, "todo", **MERGING[case.name])  # replacing leaves one set of hooks
    tokenreduce.remove(model)
    assert hooks_of(model) == hooks and tokenreduce.reducer_of(model) is None
    assert not hasattr(model, "_tokenreduce") and list(model.state_dict()) == keys
    assert torch.equal(case.run(model, inputs), plain)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("reducer", ["tomesd", "todo", "tome"])
def test_keyword_and_positional_calls_agree(case, reducer):
    model = case.build()
    params = {"r": 20} if reducer == "tome" else {"use_rand": False} if reducer == "tomesd" else {}
    options = {"max_downsample": 2} if reducer == "tome" and case.name == "sdxl" else None
    if reducer != "tome":
        params.update(MERGING[case.name])
    tokenreduce.apply(model, reducer, adapter_options=options, **params)
    inputs = case.inputs(2)
    assert torch.equal(case.run(model, inputs, keywords=True), case.run(model, inputs))
    assert any(b["attn"] < b["tokens"] or b["attn_keys"] < b["tokens"] for b in tokenreduce.stats(model)["blocks"])


# --- tomesd ---------------------------------------------------------------------------------------
TOMESD_SETTINGS = [
    {},
    {"ratio": 0.3, "merge_crossattn": True, "merge_mlp": True},
    {"ratio": 0.6, "max_downsample": 4, "sx": 3, "sy": 1},
    {"ratio": 0.75, "max_downsample": 2, "merge_attn": False, "merge_mlp": True},
]


def tomesd_pair(case, settings, use_rand, seed=5):
    """Our tomesd and tomesd 0.1.3 on copies of one model; the oracle's random state is set as ours."""
    tomesd = pytest.importorskip("tomesd")
    ours = case.build()
    oracle = copy.deepcopy(ours)
    # tomesd measures a DiT's downsampling against the latent, so its patch size is its max_downsample 2
    oracle_settings = {**settings, "max_downsample": settings.get("max_downsample", 1) * (2 if case.name == "dit" else 1)}
    tomesd.apply_patch(oracle, use_rand=use_rand, **oracle_settings)
    tokenreduce.apply(ours, "tomesd", use_rand=use_rand, seed=seed, **settings)
    torch.manual_seed(seed)  # tomesd forks the global generator on its first merge
    return ours, oracle


@pytest.mark.parametrize("settings", TOMESD_SETTINGS, ids=str)
@pytest.mark.parametrize("case", [SD, Case("sd", (18, 14)), DIT], ids=lambda c: f"{c.name}{c.size}")
def test_tomesd_equals_tomesd_0_1_3(case, settings):
    ours, oracle = tomesd_pair(case, settings, use_rand=False)
    inputs = case.inputs(2)
    expected = case.run(oracle, inputs)
    out = case.run(ours, inputs)
    assert (out - expected).abs().max() < 1e-5
    assert not torch.allclose(out, case.run(case.build(), inputs))  # it merged


@pytest.mark.parametrize("batch", [2, 3])
def test_tomesd_random_destinations_follow_the_seed_as_tomesd_does(batch):
    # an odd batch turns use_rand off in both; an even one draws one cell position per block
    ours, oracle = tomesd_pair(SD, {"max_downsample": 2}, use_rand=True)
    first, second = SD.inputs(batch, seed=1), SD.inputs(batch, seed=2)
    for inputs in (first, second):  # the draws go on from pass to pass
        assert (SD.run(ours, inputs) - SD.run(oracle, inputs)).abs().max() < 1e-5


def test_tomesd_on_sdxl_needs_a_coarser_level():
    model = SDXL.build()
    with pytest.raises(ConfigError, match=r"max_downsample=1 selects no block of UNet2DConditionModel.*downsampling 2, 4"):
        tokenreduce.apply(model, "tomesd")
    ours, oracle = tomesd_pair(SDXL, {"max_downsample": 2}, use_rand=False)
    inputs = SDXL.inputs(2)
    assert (SDXL.run(ours, inputs) - SDXL.run(oracle, inputs)).abs().max() < 1e-5


def test_tomesd_seed_makes_passes_reproducible():
    model = SD.build()
    inputs = SD.inputs(2)
    tokenreduce.apply(model, "tomesd", seed=3)
    first = SD.run(model, inputs)
    assert not torch.equal(SD.run(model, inputs), first)  # new destinations each pass
    tokenreduce.apply(model, "tomesd", seed=3)
    assert torch.equal(SD.run(model, inputs), first)
    tokenreduce.reducer_of(model).reset_generator()
    assert torch.equal(SD.run(model, inputs), first)


# --- merge, compute, unmerge ------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_block_gives_every_token_an_output(case):
    model = case.build()
    tokenreduce.apply(model, "tomesd", use_rand=False, merge_crossattn=True, merge_mlp=True, **MERGING[case.name])
    seen = []
    for _, block in blocks_of(model):
        block.register_forward_hook(lambda m, a, out: seen.append((a[0].shape, out.shape)))
        # the attention's arguments as it ran (merged), its output as the block receives it (unmerged)
        block.attn1.register_forward_hook(lambda m, a, out: seen.append((seen[-1][0], out.shape)))
        block.register_forward_pre_hook(lambda m, a: seen.append((a[0].shape, None)))
    case.run(model, case.inputs(2))
    seen = [(i, o) for i, o in seen if o is not None]
    assert seen and all(i == o for i, o in seen)
    stats = tokenreduce.stats(model)
    merged = [b for b in stats["blocks"] if b["attn"] < b["tokens"]]
    half = [b["tokens"] - b["tokens"] // 2 for b in merged]
    assert merged and [b["attn"] for b in merged] == [b["mlp"] for b in merged] == half
    assert all(b["crossattn"] in (0, h) for b, h in zip(merged, half, strict=True))  # DiT has no cross-attention


@pytest.mark.parametrize("case, sublayer", [(case, sublayer) for case in CASES for sublayer in ("attn1", "attn2", "ff")
                                             if not (case.name == "dit" and sublayer == "attn2")],  # no cross-attention
                         ids=lambda c: getattr(c, "name", c))
def test_a_sublayer_runs_on_merged_tokens_and_its_output_is_unmerged(case, sublayer):
    # the placement against its definition, from what the block and its sub-layer received
    model = case.build()
    tokenreduce.apply(model, "tomesd", ratio=0.5, use_rand=False, merge_attn=sublayer == "attn1",
                      merge_crossattn=sublayer == "attn2", merge_mlp=sublayer == "ff", **MERGING[case.name])
    info = model._tokenreduce.info
    entries = model._tokenreduce.entries
    record = {}
    for entry in entries:
        seen = record.setdefault(entry.name, {})
        entry.block.register_forward_pre_hook(lambda m, a, k, seen=seen: seen.update(x=a[0] if a else k["hidden_states"]),
                                              with_kwargs=True)
        module = getattr(entry.block, sublayer)
        if module is None:
            continue
        # before the merge and after the unmerge: what the sub-layer got from the block and gave back
        module.register_forward_pre_hook(lambda m, a, k, seen=seen: seen.update(h=a[0], kwargs=dict(k)),
                                         with_kwargs=True, prepend=True)
        module.register_forward_hook(lambda m, a, out, seen=seen: seen.update(out=out))
    inputs = case.inputs(2)
    case.run(model, inputs)
    checked = 0
    for entry in entries:
        if info.block_downsample[entry.index] > MERGING[case.name].get("max_downsample", 1) or "h" not in record[entry.name]:
            continue
        x, h, kwargs, out = (record[entry.name][key] for key in ("x", "h", "kwargs", "out"))
        grid = int(x.shape[1] ** 0.5)
        matching = grid_matching(x, grid_destinations(grid, grid, 2, 2), x.shape[1] // 2)
        merged, _ = combine(h, None, matching, "mean")
        with torch.no_grad():  # called outside a pass, the sub-layer runs as diffusers defines it
            expected = unmerge(getattr(entry.block, sublayer)(merged, **kwargs), matching)
        assert (out - expected).abs().max() < 1e-5
        checked += 1
    assert checked


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("reducer, params", [("tomesd", {"use_rand": False}), ("tome", {"r": 20}),
                                             ("todo", {}), ("tofu", {"r": 20})])
def test_each_sample_is_independent_of_the_batch(case, reducer, params):
    model = case.build()
    options = {"max_downsample": 2} if reducer in ("tome", "tofu") and case.name == "sdxl" else None
    tokenreduce.apply(model, reducer, adapter_options=options,
                      **params, **(MERGING[case.name] if options is None and reducer in ("tomesd", "todo") else {}))
    for batch in (3, 4):
        inputs = case.inputs(batch)
        out = case.run(model, inputs)
        for i in range(batch):
            alone = case.run(model, {k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in inputs.items()})
            assert (out[i:i + 1] - alone).abs().max() < 1e-5


def test_guidance_pairs_share_random_destinations_and_stay_independent():
    # [unconditional, conditional] in one batch: the conditional half does not change the other's output
    model = SD.build()
    inputs, other = SD.inputs(2, seed=1), SD.inputs(2, seed=2)
    other = {**inputs, "encoder_hidden_states": torch.cat([inputs["encoder_hidden_states"][:1],
                                                           other["encoder_hidden_states"][1:]])}
    outs = []
    for batch in (inputs, other):
        tokenreduce.apply(model, "tomesd", seed=11)
        outs.append(SD.run(model, batch))
    assert torch.allclose(outs[0][:1], outs[1][:1], atol=1e-6) and not torch.allclose(outs[0][1:], outs[1][1:])


# --- the ratio per denoising step -------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [[0.5, 0.0], lambda t: 0.5 if t > 850 else 0.0], ids=["list", "callable"])
def test_a_ratio_per_denoising_step(ratio):
    model = SD.build()
    plain = {t: SD.run(model, SD.inputs(2, t=t)) for t in (900.0, 800.0, 950.0)}
    tokenreduce.apply(model, "tomesd", ratio=0.5, use_rand=False)
    fixed = {t: SD.run(model, SD.inputs(2, t=t)) for t in (900.0, 950.0)}
    tokenreduce.apply(model, "tomesd", ratio=ratio, use_rand=False)
    assert torch.equal(SD.run(model, SD.inputs(2, t=900.0)), fixed[900.0])  # step 0
    assert tokenreduce.stats(model)["step"] == 0
    for _ in range(2):  # step 1, and a second call at its timestep (guidance run apart) is still step 1
        assert torch.equal(SD.run(model, SD.inputs(2, t=800.0)), plain[800.0])
        assert tokenreduce.stats(model)["step"] == 1 and tokenreduce.stats(model)["timestep"] == 800.0
    assert torch.equal(SD.run(model, SD.inputs(2, t=950.0)), fixed[950.0])  # a new run starts at step 0
    assert tokenreduce.stats(model)["step"] == 0


def test_a_ratio_per_step_keeps_its_last_entry_and_needs_one_timestep():
    model = SD.build()
    tokenreduce.apply(model, "tomesd", ratio=[0.0, 0.5], use_rand=False)
    for t in (900.0, 800.0, 700.0):
        SD.run(model, SD.inputs(2, t=t))
    assert tokenreduce.stats(model)["step"] == 2 and tokenreduce.stats(model)["removed"][0] == 128
    inputs = {**SD.inputs(2), "timestep": torch.tensor([900.0, 800.0])}
    with pytest.raises(ConfigError, match=r"timestep=\[900.0, 800.0\] differs within the batch"):
        SD.run(model, inputs)
    tokenreduce.apply(model, "tomesd", ratio=lambda t: 0.9, use_rand=False)
    with pytest.raises(ConfigError, match=r"ratio\(t=10.0\)=0.9 is invalid; allowed: a number in \[0.0, 0.75\]"):
        SD.run(model, SD.inputs(2))


# --- ToDo --------------------------------------------------------------------------------------------
class Reference:
    """Self-attention whose keys and values come from the grid resampled by F.interpolate (or the mean
    of each 2 x 2 cell), through diffusers' own processor."""

    def __init__(self, height, width, mode):
        self.height, self.width, self.mode = height, width, mode

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        b, n, c = hidden_states.shape
        grid = hidden_states.transpose(1, 2).reshape(b, c, self.height, self.width)
        if self.mode == "avg":
            small = F.avg_pool2d(grid, 2)
        else:
            small = F.interpolate(grid, size=(self.height // 2, self.width // 2), mode=self.mode)
        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states=small.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("mode", ["nearest-exact", "bilinear", "avg"])
def test_todo_equals_attention_over_interpolated_keys(case, mode):
    model = case.build()
    reference = copy.deepcopy(model)
    max_downsample = MERGING[case.name].get("max_downsample", 1)
    tokenreduce.apply(model, "todo", mode=mode, max_downsample=max_downsample)
    patch_size = 2 if case.name in ("dit", "pixart") else 1
    for entry in model._tokenreduce.entries:
        if entry.downsample <= max_downsample:
            size = (case.size[0] // patch_size // entry.downsample, case.size[1] // patch_size // entry.downsample)
            reference.get_submodule(entry.name).attn1.set_processor(Reference(*size, mode))
    inputs = case.inputs(2)
    assert (case.run(model, inputs) - case.run(reference, inputs)).abs().max() < 1e-5
    keys = [b["attn_keys"] for b in tokenreduce.stats(model)["blocks"] if b["downsample"] <= max_downsample]
    assert keys and all(k == b // 4 for k, b in zip(keys, [b["tokens"] for b in tokenreduce.stats(model)["blocks"]
                                                          if b["downsample"] <= max_downsample], strict=True))


def test_todo_factor_per_level():
    model = SD.build()
    tokenreduce.apply(model, "todo", downsample=[1, 2], max_downsample=2)
    SD.run(model, SD.inputs(1))
    keys = {(b["downsample"], b["tokens"], b["attn_keys"]) for b in tokenreduce.stats(model)["blocks"]}
    assert keys == {(1, 256, 256), (2, 64, 16), (4, 16, 16)}


def test_downsample_tokens_is_interpolation_on_the_row_major_grid():
    x = torch.arange(2 * 6 * 4 * 3, dtype=torch.float32).view(2, 24, 3)
    grid = x.transpose(1, 2).reshape(2, 3, 6, 4)
    expected = F.interpolate(grid, size=(3, 2), mode="nearest-exact").flatten(2).transpose(1, 2)
    assert torch.equal(downsample_tokens(x, 6, 4, 2), expected)
    assert torch.equal(downsample_tokens(x, 6, 4, 2, "avg"), F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2))
    assert downsample_tokens(x, 6, 4, 8).shape == (2, 1, 3)  # at least one key
    with pytest.raises(ConfigError, match="mode='area' is invalid"):
        downsample_tokens(x, 6, 4, 2, "area")


# --- the grid matching -----------------------------------------------------------------------------
def test_grid_destinations_one_per_cell():
    dst = grid_destinations(5, 7, sx=2, sy=2).view(5, 7)
    assert dst.sum() == 2 * 3 and dst[0:4:2, 0:6:2].all()  # top-left of each cell, none in the leftover edges
    g = torch.Generator().manual_seed(0)
    drawn = grid_destinations(6, 6, sx=3, sy=2, generator=g).view(3, 2, 2, 3)  # [cell row, y, cell col, x]
    assert (drawn.sum(dim=(1, 3)) == 1).all()


def test_grid_matching_merges_the_most_similar_sources():
    # two far-apart groups of tokens: each source joins the destination of its own group
    x = torch.zeros(1, 4, 2)
    x[0, :, 0] = torch.tensor([1.0, 0.9, 0.0, 0.3])
    x[0, :, 1] = torch.tensor([0.0, 0.1, 1.0, 0.8])
    dst = torch.tensor([True, False, True, False])
    m = grid_matching(x, dst, r=1)
    assert m.n_out == 3 and m.sources.tolist() == [[1]] and m.dest.tolist() == [[0, 0, 1, 2]]
    assert grid_matching(x, dst, r=0) is None
    assert grid_matching(x, dst, r=5).n_out == 2  # at most every source


# --- our other mergers in the same placement ----------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("reducer, params", [("tome", {"r": 20}), ("pitome", {"ratio": 0.7}), ("tofu", {"r": 20}),
                                             ("atc", {"r": 20})])
def test_token_merging_reducers_merge_compute_unmerge(case, reducer, params):
    model = case.build()
    options = {"max_downsample": 2} if case.name == "sdxl" else None
    inputs = case.inputs(2)
    plain = case.run(model, inputs)
    tokenreduce.apply(model, reducer, adapter_options=options, **params)
    out = case.run(model, inputs)
    assert out.shape == plain.shape and torch.isfinite(out).all() and not torch.allclose(out, plain)
    blocks = tokenreduce.stats(model)["blocks"]
    merged = [b for b in blocks if b["attn"] < b["tokens"]]
    assert merged and all(b["mlp"] == b["tokens"] for b in blocks)  # only self-attention merges by default
    assert all(b["downsample"] <= (options or {"max_downsample": 1})["max_downsample"] for b in merged)


def test_tome_in_a_block_is_bipartite_matching_on_the_block_input():
    from tokenreduce.core.matching import bipartite_soft_matching

    model = SD.build()
    tokenreduce.apply(model, "tome", r=40, prop_attn=False)
    entry = model._tokenreduce.entries[0]
    record = {}
    entry.block.register_forward_pre_hook(lambda m, a, k: record.update(x=a[0]), with_kwargs=True)
    entry.block.attn1.register_forward_pre_hook(lambda m, a, k: record.update(h=a[0]), with_kwargs=True, prepend=True)
    entry.block.attn1.register_forward_hook(lambda m, a, out: record.update(out=out))
    SD.run(model, SD.inputs(2))
    out, matching = record["out"], bipartite_soft_matching(record["x"], 40, 0)
    with torch.no_grad():
        expected = unmerge(entry.block.attn1(combine(record["h"], None, matching, "wavg")[0]), matching)
    assert (out - expected).abs().max() < 1e-5


def test_proportional_attention_biases_merged_keys_by_their_size():
    model = SD.build()
    tokenreduce.apply(model, "tome", r=40, prop_attn=True)
    entry = model._tokenreduce.entries[0]
    masks = []
    entry.block.attn1.register_forward_pre_hook(lambda m, a, k: masks.append(k.get("attention_mask")), with_kwargs=True,
                                                prepend=False)
    SD.run(model, SD.inputs(2))
    (mask,) = masks
    assert mask.shape == (2, 1, 256 - 40) and torch.allclose(mask.exp().sum(-1), torch.full((2, 1), 256.0))


@pytest.mark.parametrize("reducer, why", [
    ("evit", "needs attention probabilities"), ("topk", "needs attention probabilities"),
    ("mctf", "runs its own steps inside a block"), ("dynamicvit", "runs its own steps inside a block"),
    ("random", "prunes tokens"), ("norm", "prunes tokens"), ("compose", "runs its own steps inside a block"),
    ("diffrate", "needs attention probabilities"), ("zerotprune", "needs attention probabilities"),
])
def test_reducers_that_do_not_fit_are_refused_with_the_reason(reducer, why):
    model = DIT.build()
    with pytest.raises(ConfigError, match=f"reducer '{reducer}' cannot run in DiTTransformer2DModel: it {why}"):
        tokenreduce.apply(model, reducer)
    assert not hasattr(model, "_tokenreduce")


# --- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, match", [
    ({"ratio": 0.8}, r"ratio=0.8 is invalid; allowed: a number in \[0, 0.75\]"),
    ({"ratio": [0.5, 1.2]}, r"ratio=\[0.5, 1.2\] is invalid; allowed: a non-empty list"),
    ({"sx": 1, "sy": 1}, "sx=1, sy=1 is invalid"),
    ({"sx": 0}, "sx=0 is invalid; allowed: an integer >= 1"),
    ({"max_downsample": 0}, "max_downsample=0 is invalid"),
    ({"use_rand": 1}, "use_rand=1 is invalid; allowed: true or false"),
    ({"merge_attn": False}, "all false, so nothing would merge"),
    ({"seed": -1}, "seed=-1 is invalid"),
])
def test_tomesd_parameters_are_checked(params, match):
    with pytest.raises(ConfigError, match=match):
        tokenreduce.create_reducer("tomesd", **params)


@pytest.mark.parametrize("params, match", [
    ({"downsample": 1}, "downsample=1 is invalid; allowed: an integer >= 2"),
    ({"downsample": [1, 1]}, "keeps every level's keys, so it would change nothing"),
    ({"downsample": [2, 0]}, "downsample=.2, 0. is invalid"),
    ({"mode": "area"}, "mode='area' is invalid"),
    ({"max_downsample": 1.5}, "max_downsample=1.5 is invalid"),
])
def test_todo_parameters_are_checked(params, match):
    with pytest.raises(ConfigError, match=match):
        tokenreduce.create_reducer("todo", **params)


def test_settings_that_change_nothing_are_errors():
    sdxl = SDXL.build()
    with pytest.raises(ConfigError, match="todo: max_downsample=1 selects no block"):
        tokenreduce.apply(sdxl, "todo")
    with pytest.raises(ConfigError, match=r"todo: downsample=\[2\] with max_downsample=2 sets a factor of 1 at every level"):
        tokenreduce.apply(sdxl, "todo", downsample=[2], max_downsample=2)
    with pytest.raises(ConfigError, match=r"adapter_options \(reducer 'tome'\): max_downsample=1 selects no block"):
        tokenreduce.apply(sdxl, "tome", r=4)
    with pytest.raises(ConfigError, match="merge_crossattn and merge_mlp are all false"):
        tokenreduce.apply(SD.build(), "tome", r=4, adapter_options={"merge_attn": False})
    with pytest.raises(ConfigError, match=r"adapter_options \{'max_downsample': 2\} are for token-merging reducers"):
        tokenreduce.apply(sdxl, "tomesd", adapter_options={"max_downsample": 2})
    assert not hasattr(sdxl, "_tokenreduce")


def test_grid_reducers_refuse_other_models():
    import timm

    vit = timm.create_model("test_vit", pretrained=False)
    for name in ("tomesd", "todo"):
        with pytest.raises(ConfigError, match=f"{name}: runs on diffusion models .* model test_vit.* is not one"):
            tokenreduce.apply(vit, name)


def test_what_a_reduced_pass_cannot_run_is_refused_before_compute():
    model = SD.build()
    tokenreduce.apply(model, "tomesd", use_rand=False)
    inputs = SD.inputs(2)
    with pytest.raises(ConfigError, match="attention_mask is not supported on a token-reduced UNet2DConditionModel"):
        SD.run(model, {**inputs, "attention_mask": torch.ones(2, 5)}, keywords=True)
    model.enable_gradient_checkpointing()
    with pytest.raises(ConfigError, match="gradient checkpointing is on"):
        model(**inputs)
    model.disable_gradient_checkpointing()
    tokenreduce.apply(model, "tomesd", use_rand=False, merge_mlp=True)
    for _, block in blocks_of(model):
        block.set_chunk_feed_forward(16, dim=1)
    with pytest.raises(ConfigError, match=r"its mlp received tokens of shape \(2, 16\).*set_chunk_feed_forward\(None\)"):
        SD.run(model, inputs)
    assert model._tokenreduce.local.ctx is None  # a failed pass leaves nothing behind
    tokenreduce.apply(model, "tomesd", use_rand=False)  # chunking is fine when the MLP does not merge
    SD.run(model, inputs)


def test_a_copy_of_a_reduced_model_is_refused():
    model = tokenreduce.apply(DIT.build(), "tomesd")
    with pytest.raises(ConfigError, match="cannot be copied or pickled"):
        copy.deepcopy(model)
    shallow = copy.copy(model)  # shares the hooks, which belong to the original
    with pytest.raises(ConfigError, match="is a copy of a token-reduced model"):
        DIT.run(shallow, DIT.inputs(2))
    assert model.state_dict().keys() == DIT.build().state_dict().keys()


def test_blocks_called_outside_a_pass_run_as_diffusers_defines_them():
    model = SD.build()
    block = model._modules["down_blocks"][0].attentions[0].transformer_blocks[0]
    x, context = torch.randn(2, 256, 16), torch.randn(2, 5, TEXT_DIM)
    with torch.no_grad():
        plain = block(x, encoder_hidden_states=context)
        tokenreduce.apply(model, "tomesd", use_rand=False)
        assert torch.equal(block(x, encoder_hidden_states=context), plain)


# --- stats and MACs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("reducer, params", [("none", {}), ("tomesd", {"use_rand": False, "merge_crossattn": True}),
                                             ("todo", {}), ("tome", {"r": 20})])
def test_macs_equal_flop_counter_per_block(case, reducer, params):
    model = case.build()
    if reducer in ("tomesd", "todo"):
        params = {**params, **MERGING[case.name]}
    options = {"max_downsample": 2} if reducer == "tome" and case.name == "sdxl" else None
    tokenreduce.apply(model, reducer, adapter_options=options, **params)
    stats = check_block_macs(model, case.inputs(2))
    assert stats["macs_parts"]["reducer"] == sum(b["reducer_macs"] for b in stats["blocks"])


def check_block_macs(model, inputs: dict) -> dict:
    """Each block's MACs in `stats` against torch's FLOP counter (math attention kernel, one image of
    the pair); the total their sum. Returns the stats."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**inputs)
    counts = counter.get_flop_counts()
    stats = tokenreduce.stats(model)
    root = type(model).__name__
    for b in stats["blocks"]:
        flops = sum(counts[f"{root}.{b['block']}"].values())
        assert b["macs"] + b["reducer_macs"] == flops // 2 // 2, b["block"]
    assert stats["macs"] == sum(b["macs"] + b["reducer_macs"] for b in stats["blocks"])
    return stats


# --- pipelines and imports ----------------------------------------------------------------------------
def test_a_pipeline_is_reduced_in_its_denoiser():
    transformer = DIT.build()
    transformer.register_to_config(sample_size=8)  # a 4 x 4 token grid, to keep the pipeline quick
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).eval()
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe(class_labels=[1], num_inference_steps=2, guidance_scale=4.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    plain = sample()
    assert tokenreduce.apply(pipe, "tomesd", ratio=[0.5, 0.0]) is pipe
    assert tokenreduce.reducer_of(pipe) is transformer.token_reducer
    reduced = sample()
    stats = tokenreduce.stats(pipe)
    assert stats["step"] == 1 and stats["removed"] == [0, 0]  # the second step's ratio is 0
    assert not (reduced == plain).all()
    assert tokenreduce.remove(pipe) is pipe and (sample() == plain).all()


LOOKUP = """
import json, sys
import timm, tokenreduce
from tokenreduce.adapters import adapter_for
model = timm.create_model("test_vit", pretrained=False)
tokenreduce.apply(model, "tome", r=2)
before = "diffusers" in sys.modules
import diffusers
unet = diffusers.UNet2DConditionModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=8, attention_head_dim=4)
print(json.dumps({"before": before, "timm": adapter_for(model).name, "unet": adapter_for(unet).name}))
"""


def test_a_diffusers_model_is_recognised_only_once_diffusers_is_loaded(monkeypatch):
    import timm

    from tokenreduce.adapters import adapter_for, adapters

    unet = SD.build()
    monkeypatch.delitem(sys.modules, "diffusers")  # as if the user had not imported it
    assert adapter_for(timm.create_model("test_vit", pretrained=False)).name == "timm_vit"
    assert "diffusers" not in sys.modules and not adapters()["diffusers"].claims(unet)
    monkeypatch.undo()
    assert adapter_for(unet).name == "diffusers"


@pytest.mark.slow
def test_diffusers_is_imported_only_by_the_user():
    done = subprocess.run([sys.executable, "-c", LOOKUP], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"before": False, "timm": "timm_vit", "unet": "diffusers"}


def test_grid_block_is_what_a_reducer_sees():
    # the plan a reducer makes from a GridBlock: tomesd on the finest level only
    reducer = tokenreduce.create_reducer("tomesd", use_rand=False)
    x = torch.randn(2, 64, 8)
    assert reducer.plan_block(x, GridBlock(0, 3, 8, 8, downsample=2)) is None
    plan = reducer.plan_block(x, GridBlock(0, 3, 8, 8, downsample=1))
    assert plan.assignment.n_out == 32 and plan.reducer_macs == 48 * 16 * 8
