"""The adapter registry: each model family is claimed by one adapter, a new family is one file and
one registration, and a model no adapter can reduce is refused before any compute, with the reason."""

import pytest
import torch
from conftest import make_model
from timm.layers import PatchEmbed
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.vision_transformer import Block
from torch import nn

import tokenreduce
from tokenreduce.adapters import Adapter, ModelInfo, adapter_for, adapters, base, is_patched, register_adapter
from tokenreduce.adapters.blocks import run_blocks
from tokenreduce.adapters.timm_vit import TimmBlockOps, pass_macs
from tokenreduce.errors import ConfigError, UnsupportedModelError


def tiny_eva():
    torch.manual_seed(0)
    import timm

    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56, depth=2).eval()


def test_builtin_adapters_are_registered():
    assert set(adapters()) == {"timm_vit", "timm_eva", "timm_relpos", "timm_naflex", "hf_vit", "hf_text", "hf_clip", "hf_clip_text",
                                "hf_media", "hf_vlm", "sentence_transformers", "diffusers"}
    assert all(isinstance(a, Adapter) and a.family for a in adapters().values())


def test_each_family_gets_its_adapter_and_keeps_it_while_patched():
    vit, eva = make_model("test_vit"), tiny_eva()
    assert adapter_for(vit) is adapters()["timm_vit"] and adapter_for(eva) is adapters()["timm_eva"]
    tokenreduce.apply(eva, "tome", r=2)
    assert is_patched(eva) and not is_patched(vit)
    assert adapter_for(eva) is eva._tokenreduce.adapter is adapters()["timm_eva"]
    assert tokenreduce.reducer_of(eva).name == "tome" and tokenreduce.reducer_of(vit) is None
    tokenreduce.remove(eva)
    assert not is_patched(eva) and type(eva).__name__ == "Eva"


def _counting_forwards(model):
    calls = []
    for module in model.modules():
        module.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_an_unclaimed_model_is_one_config_error_listing_the_families():
    model = nn.Sequential(nn.Linear(3, 3))
    calls = _counting_forwards(model)
    with pytest.raises(ConfigError) as err:
        tokenreduce.apply(model, "tome", r=1)
    assert isinstance(err.value, UnsupportedModelError)  # as before adapters were a registry
    message = str(err.value)
    assert "Sequential is not claimed by any adapter" in message
    assert all(a.family in message for a in adapters().values())
    assert not calls and not hasattr(model, "_tokenreduce")


@pytest.mark.parametrize("build, kind", [
    (lambda: SwinTransformer(img_size=32, patch_size=4, window_size=2, embed_dim=16, depths=(1, 1), num_heads=(1, 1)),
     "Swin Transformer"),
    (lambda: SwinTransformerV2(img_size=32, patch_size=4, window_size=2, embed_dim=16, depths=(1, 1),
                               num_heads=(1, 1)), "Swin Transformer V2"),
])
def test_windowed_models_are_refused_with_the_reason_and_what_to_use(build, kind):
    model = build()
    calls = _counting_forwards(model)
    with pytest.raises(ConfigError) as err:
        tokenreduce.apply(model, "tome", r=1)
    message = str(err.value)
    assert kind in message and "windows" in message and "changes the number of tokens" in message
    assert "timm VisionTransformer" in message and "timm Eva" in message
    assert not calls and not hasattr(model, "_tokenreduce")


def test_adapter_options_are_per_family():
    model = make_model("test_vit")
    with pytest.raises(ConfigError, match="merged_position not known to the timm VisionTransformer .* no options"):
        tokenreduce.apply(model, "tome", r=1, adapter_options={"merged_position": "mean"})
    with pytest.raises(ConfigError, match="adapter_options='mean' is invalid; allowed: a dict"):
        tokenreduce.apply(model, "tome", r=1, adapter_options="mean")
    assert not hasattr(model, "_tokenreduce")


# --- a new family: one class, one registration (the example of docs/adapters.md) -----------------
class TinyNet(nn.Module):
    """A family of our own: patch embedding, timm blocks, no prefix tokens, mean pooling."""

    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=32)
        self.blocks = nn.ModuleList(Block(32, num_heads=2) for _ in range(3))
        self.head = nn.Linear(32, 4)
        self.num_prefix_tokens, self.embed_dim, self.attn_pool, self.grad_checkpointing = 0, 32, None, False

    def forward(self, x):
        x = self.patch_embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x.mean(1))


class ReducedTinyNet:
    """Placed in front of TinyNet's class while it is patched."""

    def _tr_start(self, state, extra):
        pass

    def _tr_block_ops(self, block, state, extra, checkpointing):
        return TimmBlockOps(block, checkpointing)

    def forward(self, x):
        x, state, _ = run_blocks(self, self.patch_embed(x), None)
        self._tokenreduce.last_state = state
        sizes = state.sizes if state.sizes is not None else torch.ones_like(x[..., :1])
        return self.head((x * sizes).sum(1) / sizes.sum(1))  # each token weighs what it stands for


class TinyNetAdapter(Adapter):
    family = "TinyNet"
    reduced_methods = ReducedTinyNet

    def claims(self, model):
        return isinstance(model, TinyNet)

    def describe(self, model):
        return ModelInfo(name="TinyNet", depth=len(model.blocks), num_prefix=0, has_class_token=False,
                         embed_dim=model.embed_dim, num_heads=model.blocks[0].attn.num_heads)

    def pass_macs(self, model, state):
        return pass_macs(model, state)


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(base, "_ADAPTERS", dict(base._ADAPTERS))


def test_a_new_family_is_one_registration(registry):
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ConfigError, match="not claimed"):
        tokenreduce.apply(model, "tome", r=2)
    register_adapter("tiny_net")(TinyNetAdapter)
    assert "TinyNet" in str(adapters()["tiny_net"].family)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(tokenreduce.apply(model, "tome", r=0)(x), want)
        tokenreduce.apply(model, "tome", r=2)(x)
        assert tokenreduce.stats(model)["tokens"] == [16, 14, 12, 10]
        assert tokenreduce.stats(model)["macs"] > 0
        assert torch.equal(tokenreduce.remove(model)(x), want)
    assert type(model) is TinyNet


def test_a_name_is_registered_once(registry):
    with pytest.raises(ValueError, match="already registered"):
        register_adapter("timm_vit")(TinyNetAdapter)

