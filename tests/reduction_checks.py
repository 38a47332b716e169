"""Checks shared by the merging reducers' tests: per-layer recording, slot membership and the
methods.md invariants after every layer, and the duplicate-token test of proportional attention."""

from __future__ import annotations

import torch

from tokenreduce.adapters.timm_vit import TimmBlockOps, describe
from tokenreduce.core.merge import source_matrix
from tokenreduce.core.state import ReductionState


def record_layers(reducer) -> list[dict]:
    """Make `reducer` keep, for every layer it reduces, its input, output, sizes and source map (the
    latter when the reducer traces sources)."""
    records = []
    inner = reducer.reduce

    def clone(t):
        return None if t is None else t.clone()

    def reduce(x, signals, state, layer, removal):
        entry = {"layer": layer, "x_in": x.detach().clone(), "source_in": clone(state.source),
                 "sizes_in": torch.ones_like(x[..., :1], dtype=torch.float32) if state.sizes is None
                 else state.sizes.clone()}
        out = inner(x, signals, state, layer, removal)
        entry.update(x_out=out.detach().clone(), source_out=clone(state.source), sizes_out=clone(state.sizes))
        records.append(entry)
        return out

    reducer.reduce = reduce
    return records


def slot_of(entry: dict) -> torch.Tensor:
    """[B, N_in] the output slot of every token entering the layer, from the source maps."""
    src_in, src_out = entry["source_in"], entry["source_out"]
    return torch.full_like(src_in[:, : entry["x_in"].shape[1]], -1).scatter_(1, src_in, src_out)


def groups(entry: dict, b: int) -> list[list[int]]:
    """The input tokens that became each output token of sample `b`."""
    slots = slot_of(entry)[b]
    return [(slots == s).nonzero().flatten().tolist() for s in range(entry["x_out"].shape[1])]


def check_invariants(entry: dict, num_prefix: int, total_tokens: int, sizes_are_patch_counts: bool = True):
    """Sizes sum to the tokens of the input, each input token is in one output token, prefix tokens
    stay first with their values and size 1."""
    sizes, source, x_in, x_out = entry["sizes_out"], entry["source_out"], entry["x_in"], entry["x_out"]
    batch = sizes.shape[0]
    mat = source_matrix(source, sizes.shape[1])
    assert torch.equal(mat.sum(1), torch.ones(batch, total_tokens))
    if sizes_are_patch_counts:
        assert torch.equal(sizes.sum(1), torch.full((batch, 1), float(total_tokens)))
        assert torch.equal(mat.sum(2, keepdim=True), sizes)
    assert (slot_of(entry) >= 0).all()
    assert torch.equal(source[:, :num_prefix], torch.arange(num_prefix).expand(batch, -1))
    assert torch.equal(sizes[:, :num_prefix], torch.ones(batch, num_prefix, 1))
    torch.testing.assert_close(x_out[:, :num_prefix], x_in[:, :num_prefix], rtol=1e-6, atol=1e-6)


def duplicate_pairs_through_two_blocks(model, reducer, layer: int = 0):
    """Feed block `layer` tokens that come in identical pairs, reduce every pair to one token, run the
    next block with the reducer's attention bias. Returns (reduced output mapped back to the input
    positions, the unreduced model's output of the two blocks)."""
    reducer.check_model(describe(model))
    blocks = model.blocks[layer : layer + 2]
    dim = model.embed_dim
    g = torch.Generator().manual_seed(0)
    prefix = torch.randn(1, model.num_prefix_tokens, dim, generator=g)
    pairs = 8
    x = torch.cat([prefix, torch.randn(1, pairs, dim, generator=g).repeat_interleave(2, dim=1)], dim=1)
    removals = [0] * len(model.blocks)
    removals[layer] = pairs
    state = ReductionState.start(x, model.num_prefix_tokens, removals, prop_attn=reducer.prop_attn, trace_source=True)
    with torch.no_grad():
        state.begin_layer(x.shape[1])
        y = reducer.block_forward(TimmBlockOps(blocks[0]), x, state, layer, pairs)
        state.end_layer(y.shape[1])
        assert y.shape[1] == model.num_prefix_tokens + pairs
        y = TimmBlockOps(blocks[1]).plain(y, state.attn_bias(y.dtype))
        full = blocks[1](blocks[0](x))
    return y.gather(1, state.source.unsqueeze(-1).expand(-1, -1, dim)), full


def check_zero_reduction_and_remove(model, x, reducer: str, params: dict):
    """A reducer that removes nothing gives the unpatched model's output, and `remove` restores the
    model exactly: its class, no reducer attached, the same output bit for bit."""
    import tokenreduce

    original = type(model)
    with torch.no_grad():
        expected = model(x)
        tokenreduce.apply(model, reducer, **params)
        reduced = model(x)
        tokenreduce.remove(model)
        restored = model(x)
    torch.testing.assert_close(reduced, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(restored, expected, rtol=0, atol=0)
    assert type(model) is original
    assert not hasattr(model, "token_reducer") and not hasattr(model, "_tokenreduce")


def check_grad_checkpointing(model, x):
    """A reduced model in training mode gives the same gradients with timm's gradient checkpointing."""
    import copy

    twin = copy.deepcopy(model)
    twin.set_grad_checkpointing(True)
    for m in (model, twin):
        torch.manual_seed(0)
        m(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def check_bfloat16(model, x):
    """A reduced model runs in bfloat16 with the token counts of float32, finite outputs, and sizes
    kept in float32. Returns the pass's state."""
    import tokenreduce

    with torch.no_grad():
        model(x)
        tokens = tokenreduce.stats(model)["tokens"]
        got = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert tokenreduce.stats(model)["tokens"] == tokens
    state = model._tokenreduce.last_state
    assert state.sizes is None or state.sizes.dtype == torch.float32  # sizes stay exact
    return state


def check_refused(model, words: list[str], **params) -> None:
    """`apply` refuses the model with a message holding every one of `words`, leaving it untouched."""
    import pytest

    import tokenreduce
    from tokenreduce.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError) as err:
        tokenreduce.apply(model, "tome", **params)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not hasattr(model, "_tokenreduce")


def tome_groups(keys, r: int, num_prefix: int) -> list[list[int]]:
    """One ToMe step of one image as a plain loop from methods.md: A = even positions, B = odd, each A
    token's most similar B token by cosine of `keys` [N, d], the r best A tokens merge into theirs
    (a first token that is a prefix token never does). Returns the tokens of every output token,
    kept A tokens first then the B tokens; the first of each group is the one it merged into."""
    n = keys.shape[0]
    metric = keys / keys.norm(dim=-1, keepdim=True)
    a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
    scores = metric[a_idx] @ metric[b_idx].T
    if num_prefix:
        scores[0] = -float("inf")
    best, partner = scores.max(-1)
    order = best.argsort(descending=True, stable=True)
    sources, kept = order[:r].tolist(), sorted(order[r:].tolist())
    groups = [[a_idx[i]] for i in kept] + [[j] for j in b_idx]
    for i in sources:
        groups[len(kept) + partner[i].item()].append(a_idx[i])
    return groups


def check_batch_independence(model, x):
    """Each sample's output is the one it gets alone (methods.md)."""
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def parameters_without_gradient(model, x) -> list[str]:
    """Names of the trainable parameters that get no (or an all-zero) gradient from one step."""
    model(x).logsumexp(-1).sum().backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
