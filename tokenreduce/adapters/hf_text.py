"""Placing a reducer into Hugging Face `transformers` (>= 5) text encoders: BERT, RoBERTa and
DistilBERT, as base models and with their sequence-classification heads.

The patched model keeps its own modules and weights, and its `forward` keeps its signature and its
output class. Only the loop over the layers is replaced, by timm_vit's `run_blocks`: each layer
either runs as transformers defines it (with the proportional-attention bias as its attention mask)
or through its reducer, in the steps of `TextLayerOps`, which call the layer's own submodules. The
layers are post-norm: a reducer acts between the attention block (attention, output projection,
dropout, residual, LayerNorm) and the feed-forward block.

A padded batch (`attention_mask`, right padding) runs in groups of sequences with the same number
of real tokens, each group sliced to its real tokens and run without padding, so a padding token is
never embedded, never merges, never counts in sizes or MACs and never changes a real token; each
sequence's output is the one it gets alone, and each removes what its own length sets. The groups'
tokens are put back as `[B, most tokens left, C]`, each sequence's tokens first and zeros after;
`reduced_mask(model)` gives the attention mask of these tokens, and `mean_pool` their size-weighted
mean.

Protected tokens: the first token ([CLS] / <s>) and the last real one ([SEP] / </s>). For the pass
the last real token is moved right after the first, so the two are the reducers' two prefix tokens
(never merged, never pruned); the encoder's layers see no positions (they were added by the
embeddings) and attention does not depend on the order of the tokens, so the move changes no output.
It is put back last among the sequence's tokens at the end. The reducers that rank tokens by the
class token's attention use the first token as the class token.

A SentenceTransformer takes the reducer itself (the sentence_transformers adapter, which patches its
base model here and its Pooling there); a base model reduced on its own is refused when a
sentence-transformers Transformer module runs it, as that Pooling would misread its tokens.

`transformers` is imported only when a model's class comes from it (as in hf_vit).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from tokenreduce.adapters.base import ModelInfo, is_patched, register_adapter
from tokenreduce.adapters.blocks import run_blocks
from tokenreduce.adapters.hf_common import (
    INSTALL_HINT,
    REFUSED_OUTPUTS,
    HFAdapterBase,
    HFLayerOps,
    LayerLoop,
    bind,
    block_costs,
    check_attention_implementation,
    check_layer_types,
    encoder_of,
    family_class,
    from_transformers,
    import_transformers,
    modeling,
    refuse_outputs,
    spec_of,
)
from tokenreduce.core.macs import linear_macs, macs_parts
from tokenreduce.core.state import ReductionState
from tokenreduce.errors import ConfigError, UnclaimedModelError, UnsupportedModelError

# transformers' model family (its module under transformers.models) -> the prefix of its class names
FAMILIES = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert"}
# supported class -> (family, head): "base" the encoder itself; "pooler" BERT's classifier of its pooler
# output; "first" RoBERTa's classification head; "distil" DistilBERT's pre-classifier and classifier. Every
# head reads the first token.
SUPPORTED = {
    "BertModel": ("bert", "base"),
    "BertForSequenceClassification": ("bert", "pooler"),
    "RobertaModel": ("roberta", "base"),
    "RobertaForSequenceClassification": ("roberta", "first"),
    "DistilBertModel": ("distilbert", "base"),
    "DistilBertForSequenceClassification": ("distilbert", "distil"),
}
# heads that give an output per input token (refused with the reason)
TOKEN_LEVEL = ("ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM", "ForPreTraining", "ForCausalLM",
               "LMHeadModel")
MODULES = ("transformers.modeling_outputs", "transformers.pytorch_utils",
           *(f"transformers.models.{f}.modeling_{f}" for f in FAMILIES))
NUM_PREFIX = 2  # the first token, and the last real token placed right after it for the pass
# named arguments of the forwards that a reduced model takes (any other one must be None)
INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels", "use_cache")
PASSED = ("return_dict",)  # keyword arguments passed on (output_* are refused by name, the rest too)
# the key, in a base model's __dict__, of its link to the token-reduced SentenceTransformer it runs in
# (set by the sentence_transformers adapter, whose Pooling then reads the reduced tokens' sizes)
PIPELINE_LINK = "_tr_pipeline"


def _family_class(cls: type) -> type | None:
    """The BERT, RoBERTa or DistilBERT model class `cls` is (or derives from), or None."""
    return family_class(cls, FAMILIES)


def model_spec(model: nn.Module) -> tuple[str, str]:
    """(family, head) of a claimed model, from its original class."""
    return spec_of(model, SUPPORTED, _family_class)


def _layers(encoder: nn.Module) -> nn.ModuleList:
    """The transformer layers: `encoder.layer` (BERT, RoBERTa) or `transformer.layer` (DistilBERT)."""
    stack = getattr(encoder, "encoder", None) or getattr(encoder, "transformer", None)
    return getattr(stack, "layer", None)


def _refuse_class(model: nn.Module, cls: type) -> None:
    supported = ", ".join(SUPPORTED)
    name = cls.__name__
    if name.endswith(TOKEN_LEVEL):
        raise UnclaimedModelError(
            f"model {type(model).__name__} ({name}) has a token-level head: it gives an output for every input "
            f"token, which needs every token, while token reduction merges and prunes them; supported: {supported} "
            "(the base models give the reduced tokens with their sizes)")
    raise UnclaimedModelError(f"model {type(model).__name__} ({name}) is not supported by the text adapter; "
                              f"supported: {supported}")


def describe(model: nn.Module) -> ModelInfo:
    """Check that the adapter can reduce `model` exactly; raise UnsupportedModelError if not (a class of
    these families that it does not support: UnclaimedModelError, which is also a ConfigError)."""
    cls = _family_class(type(model)) if from_transformers(type(model)) else None
    if cls is None:
        raise UnsupportedModelError(f"model {type(model).__name__} is not a Hugging Face transformers BERT, RoBERTa "
                                    f"or DistilBERT model; supported: {', '.join(SUPPORTED)}")
    if cls.__name__ not in SUPPORTED:
        _refuse_class(model, cls)
    family, head = SUPPORTED[cls.__name__]
    config = model.config
    name = getattr(config, "name_or_path", "") or type(model).__name__
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError(f"model {name} is configured as a decoder (is_decoder / add_cross_attention): "
                                    "its attention is causal or reads another sequence; supported: encoders "
                                    "(is_decoder=False, add_cross_attention=False)")
    encoder = encoder_of(model, head)
    layers = _layers(encoder)
    if layers is None or getattr(encoder, "embeddings", None) is None:
        raise UnsupportedModelError(f"model {name} ({type(model).__name__}) lacks the layout of transformers>=5 "
                                    f"(embeddings, encoder layers); install {INSTALL_HINT}")
    module, prefix = modeling(family), FAMILIES[family]
    if family == "distilbert":
        check_layer_types(name, layers, module.TransformerBlock, module.DistilBertSelfAttention)
    else:
        check_layer_types(name, layers, getattr(module, f"{prefix}Layer"), getattr(module, f"{prefix}SelfAttention"),
                          attention_of=lambda layer: getattr(layer.attention, "self", None))
    check_attention_implementation(name, config)
    return ModelInfo(name=name, depth=len(layers), num_prefix=NUM_PREFIX, has_class_token=True,
                     embed_dim=config.hidden_size, num_heads=config.num_attention_heads)


# --- one layer -------------------------------------------------------------------------------------
class TextLayerOps(HFLayerOps):
    """The steps of a post-norm transformers text layer for a reducer. BERT/RoBERTa: `attention.self`
    (query, key, value), `attention.output` (dense, dropout, LayerNorm of the residual), then the
    feed-forward chunk (`intermediate`, `output` with its residual and LayerNorm). DistilBERT:
    `attention` (q_lin, k_lin, v_lin, out_lin), `sa_layer_norm` of the residual, then `ffn` and
    `output_layer_norm` of the residual. `plain`, the attention logits, the attention interface and
    checkpointing are hf_vit's."""

    def __init__(self, layer: nn.Module, checkpointing: bool = False):
        self.layer = layer
        self.checkpointing = checkpointing
        self.distil = hasattr(layer, "sa_layer_norm")
        attn = layer.attention if self.distil else layer.attention.self
        self.attn = attn  # the module the attention interface is called with
        self.projections = (attn.q_lin, attn.k_lin, attn.v_lin) if self.distil else (attn.query, attn.key, attn.value)
        self.out = attn.out_lin if self.distil else layer.attention.output.dense
        self.head_dim, self.scaling, self.dropout = attn.attention_head_size, attn.scaling, attn.dropout.p
        self.attention_block = layer.attention
        self.mlp_modules = (layer.ffn,) if self.distil else (layer.intermediate, layer.output)

    def mlp(self, x: Tensor) -> Tensor:
        layer = self.layer
        if self.distil:
            return self._run(lambda t: layer.output_layer_norm(layer.ffn(t) + t), x)
        chunk = sys.modules["transformers.pytorch_utils"].apply_chunking_to_forward
        return self._run(lambda t: chunk(layer.feed_forward_chunk, layer.chunk_size_feed_forward, layer.seq_len_dim, t),
                         x)

    def attn_input(self, x: Tensor) -> Tensor:
        return x  # post-norm: the attention reads the tokens themselves

    def attn_residual(self, x: Tensor, y: Tensor) -> Tensor:
        if self.distil:
            return self.layer.sa_layer_norm(y + x)
        output = self.layer.attention.output
        return output.LayerNorm(output.dropout(y) + x)


# --- padding and the protected last token ---------------------------------------------------------
def real_counts(attention_mask: Tensor | None, batch: int, length: int, device: torch.device, least: int = NUM_PREFIX,
                why: str = "its first and last tokens, e.g. [CLS] and [SEP], are kept by every reducer") -> Tensor:
    """[B] each sequence's real tokens, from a [B, L] mask of 1 (real) and 0 (padding) after them; all
    real without a mask. A sequence needs `least` real tokens (by default two: its first and last
    tokens), `why` saying why in the refusal."""
    if attention_mask is None:
        return torch.full((batch,), length, dtype=torch.long, device=device)
    if attention_mask.shape != (batch, length):
        raise ConfigError(f"attention_mask of shape {tuple(attention_mask.shape)} is invalid for inputs of {batch} "
                          f"sequences of {length} tokens; allowed: a [{batch}, {length}] mask of 1 (real) and 0 "
                          "(padding)")
    valid = attention_mask.bool()
    counts = valid.sum(dim=1)
    if not torch.equal(valid, torch.arange(length, device=valid.device) < counts[:, None]):
        raise ConfigError("attention_mask has padding before real tokens; allowed: each sequence's real tokens "
                          "first, then its padding (the tokenizer's padding_side='right')")
    if bool((counts < least).any()):
        raise ConfigError(f"attention_mask leaves a sequence with {int(counts.min())} real tokens; allowed: at least "
                          f"{least} ({why})")
    return counts.to(device)


def _loop_order(count: int, device: torch.device) -> Tensor:
    """The tokens of a sequence of `count` real ones in the order of the pass: first, last, the rest."""
    return torch.cat([torch.tensor([0, count - 1], device=device), torch.arange(1, count - 1, device=device)])


def _restore(y: Tensor, state: ReductionState, count: int, length: int) -> Tensor:
    """Put the last real token back last among the `y` tokens the pass left, in the tokens, their sizes
    and the source map (which then covers the `length` input tokens, padding dropped)."""
    n_out = y.shape[1]
    order = torch.cat([torch.tensor([0], device=y.device), torch.arange(2, n_out, device=y.device),
                       torch.tensor([1], device=y.device)])
    y = y[:, order]
    if state.sizes is not None:
        state.sizes = state.sizes[:, order]
    if state.source is not None:  # source[:, loop position] -> restored output slot; n_out marks a dropped token
        slot = torch.empty(n_out + 1, dtype=torch.long, device=y.device)
        slot[order] = torch.arange(n_out, device=y.device)
        slot[n_out] = n_out
        inverse = torch.empty(count, dtype=torch.long, device=y.device)
        inverse[_loop_order(count, y.device)] = torch.arange(count, device=y.device)
        source = slot[state.source[:, inverse]]
        state.source = torch.cat([source, source.new_full((len(source), length - count), n_out)], dim=1)
    return y


def _inputs_of(arguments: dict, index: Tensor | None, count: int, batch: int) -> dict:
    """The token inputs of the sequences `index` (None: all), cut to their first `count` tokens."""
    inputs = {}
    for key in ("input_ids", "token_type_ids", "position_ids", "inputs_embeds"):
        value = arguments.get(key)
        if value is not None:
            if index is not None and value.shape[0] == batch:  # position_ids may be [1, L]
                value = value[index]
            value = value[:, :count]
        inputs[key] = value
    return inputs


def _embed(family: str, encoder: nn.Module, inputs: dict) -> Tensor:
    if family == "distilbert":
        return encoder.embeddings(inputs["input_ids"], inputs["inputs_embeds"], inputs["position_ids"])
    return encoder.embeddings(**inputs)


def run_text(model: nn.Module, family: str, encoder: nn.Module, arguments: dict, counts: Tensor,
             length: int) -> tuple[Tensor, ReductionState]:
    """Embed and run each group of sequences with the same number of real tokens without its padding;
    return the tokens back in one zero-padded batch and the pass's state (with `groups` when the batch
    mixes lengths; `sizes` always set, 0 for padding)."""
    layers = _layers(encoder)
    loop = LayerLoop(model.token_reducer, NUM_PREFIX, layers, bool(layers[0].gradient_checkpointing) and
                 layers[0].training, TextLayerOps)
    batch = len(counts)
    groups = []
    for count in counts.unique().tolist():
        index = (counts == count).nonzero().flatten()
        index = None if len(index) == batch else index  # None: the whole batch, cut to its one length
        x = _embed(family, encoder, _inputs_of(arguments, index, count, batch))
        y, state, _ = run_blocks(loop, x[:, _loop_order(count, x.device)], None)
        y = _restore(y, state, count, length)
        groups.append((torch.arange(batch, device=counts.device) if index is None else index, y, state))
    if len(groups) == 1:  # every sequence has the same real tokens: no padding left
        _, y, state = groups[0]
    else:
        width = max(y.shape[1] for _, y, _ in groups)
        y = groups[0][1].new_zeros(batch, width, groups[0][1].shape[2])
        for index, out, _ in groups:
            y[index, : out.shape[1]] = out
        state = ReductionState.gather(groups, batch, length, width)
    if state.sizes is None:
        state.sizes = torch.ones(batch, y.shape[1], 1, device=y.device)
    return y, state


# --- the patched model -----------------------------------------------------------------------------
def _check_arguments(model: nn.Module, arguments: dict, extra: dict) -> None:
    """Refuse, before any compute, what a reduced pass cannot give, naming the argument."""
    who = refuse_outputs(model, extra)
    unknown = sorted(set(extra) - set(PASSED) - set(REFUSED_OUTPUTS))
    unknown += sorted(k for k, v in arguments.items() if k not in INPUTS and v is not None)
    if unknown:
        raise ConfigError(f"{', '.join(unknown)} not supported on a {who} (an encoder without cross-attention or cache); "
                          "allowed: input_ids or inputs_embeds, attention_mask, token_type_ids, position_ids, "
                          "labels (classifiers) and return_dict")
    if (arguments.get("input_ids") is None) == (arguments.get("inputs_embeds") is None):
        raise ConfigError(f"a {who} takes exactly one of input_ids and inputs_embeds")


def check_text_reducer(model: nn.Module, counts: Tensor) -> None:
    """Refuse, before any compute, what the reducer cannot do on text run in groups of real lengths
    `counts` [B]: MSTM's fusion (it pools a square grid of patches), and in training a reducer with
    losses of the whole pass on a batch that mixes lengths."""
    for reducer in model.token_reducer.modules():
        if getattr(reducer, "name", None) == "mstm" and getattr(reducer, "fusion", None) is not None:
            raise ConfigError("mstm: fusion=True is not supported on a text model: the fusion pools a square grid "
                              "of patches, which text has none of; allowed: fusion=False")
    if model.training and len(counts.unique()) > 1 and model.token_reducer.has_training_losses():
        raise ConfigError(f"reducer {model.token_reducer.name} trains with losses of the whole pass, which a batch "
                          "of sequences with different real lengths splits into groups; allowed: batches whose "
                          "sequences have one length, or eval mode")


def _refuse_sentence_pipeline(model: nn.Module) -> None:
    """Refuse a pass that a sentence-transformers Transformer module runs on a base model reduced on its
    own: the SentenceTransformer's Pooling would read the reduced tokens with the input's attention mask,
    which no longer fits them, and average every token, padding included, with equal weights."""
    if "sentence_transformers" not in sys.modules or PIPELINE_LINK in model.__dict__:
        return
    # the Transformer module calls the model's forward directly (or through nn.Module.__call__): a few
    # frames up; its class is looked at before any attribute, so no other caller's property runs
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return
        caller = frame.f_locals.get("self")
        if type(caller).__module__.startswith("sentence_transformers.") and getattr(caller, "auto_model",
                                                                                    None) is model:
            raise ConfigError(f"a {model._tokenreduce.original_class.__name__} that carries a reducer of its own is "
                              "run by a sentence-transformers Transformer module, whose Pooling would average its reduced "
                              "tokens with the input's attention mask (padding included, sizes ignored); allowed: "
                              "the reducer applied to the SentenceTransformer itself (tokenreduce.remove(model[0]."
                              "auto_model), then tokenreduce.apply(model, ...))")
        frame = frame.f_back


class _ReducedHFText:
    """Methods placed in front of the model's own class by `patch` (the adapter adds a `forward` that
    keeps the class's own signature and calls `_tr_forward`)."""

    def _tr_forward(self, original, *args, **kwargs):
        arguments, extra = bind(original, self, args, kwargs)
        _check_arguments(self, arguments, extra)
        family, head = model_spec(self)
        if head == "base":
            _refuse_sentence_pipeline(self)
        encoder = encoder_of(self, head)
        tokens = arguments["input_ids"] if arguments.get("input_ids") is not None else arguments["inputs_embeds"]
        batch, length = tokens.shape[:2]
        counts = real_counts(arguments.get("attention_mask"), batch, length, tokens.device)
        check_text_reducer(self, counts)
        sequence, state = run_text(self, family, encoder, arguments, counts, length)
        self._tokenreduce.last_state = state
        output = self._tr_outputs(family, head, encoder, sequence, arguments.get("labels"))
        return_dict = extra.get("return_dict")
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    def _tr_outputs(self, family: str, head: str, encoder: nn.Module, sequence: Tensor, labels: Tensor | None):
        outputs = import_transformers("transformers.modeling_outputs")
        if head == "base":
            if family == "distilbert":
                return outputs.BaseModelOutput(last_hidden_state=sequence)
            pooled = encoder.pooler(sequence) if encoder.pooler is not None else None
            return outputs.BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=sequence,
                                                                        pooler_output=pooled)
        if head == "pooler":  # BERT: the pooler (dense + tanh of the first token), dropout, classifier
            logits = self.classifier(self.dropout(encoder.pooler(sequence)))
        elif head == "first":  # RoBERTa's head reads the first token itself
            logits = self.classifier(sequence)
        else:  # DistilBERT: the first token through pre_classifier, ReLU, dropout, classifier
            logits = self.classifier(self.dropout(torch.relu(self.pre_classifier(sequence[:, 0]))))
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        return outputs.SequenceClassifierOutput(loss=loss, logits=logits)


# --- what the reduced tokens are -------------------------------------------------------------------
def _last_sizes(model: nn.Module, x: Tensor | None = None) -> Tensor:
    if not is_patched(model) or model._tokenreduce.last_state is None:
        raise ConfigError("the model has not run a token-reduced forward pass; call tokenreduce.apply(model, ...) "
                          "and run it first")
    sizes = model._tokenreduce.last_state.sizes
    if x is not None and (sizes is None or sizes.shape[:2] != x.shape[:2]):
        raise ConfigError(f"last_hidden_state of shape {tuple(x.shape)} is not the output of the model's last pass "
                          f"(its tokens: {None if sizes is None else tuple(sizes.shape[:2])})")
    return sizes


def reduced_mask(model: nn.Module) -> Tensor:
    """[B, N] long: the attention mask of the tokens the model's last pass returned (1 real, 0 padding)."""
    return (_last_sizes(model)[..., 0] > 0).long()


def mean_pool(model: nn.Module, last_hidden_state: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """[B, C] the mean of each sequence's real tokens, each weighted by its size (the input tokens it
    stands for): what mean pooling (sentence-transformers') becomes with merged tokens, and the plain
    masked mean when nothing was reduced.

    On the output of a reduced model the sizes already leave padding out (size 0), so `attention_mask`
    may be the input mask, the one of `reduced_mask`, or None; a mask with the output's width multiplies
    the sizes (a right-padded input mask as wide as the output leaves every real token in). On a model
    without a reducer it is the plain masked mean (`attention_mask` over the output tokens, or None).
    """
    x = last_hidden_state
    if is_patched(model):
        weights = _last_sizes(model, x)[..., 0]
        if attention_mask is not None:
            if attention_mask.shape[0] != x.shape[0]:
                raise ConfigError(f"attention_mask of shape {tuple(attention_mask.shape)} does not fit "
                                  f"last_hidden_state of shape {tuple(x.shape)}")
            if attention_mask.shape[1] == x.shape[1]:
                weights = weights * attention_mask.to(weights.dtype)
    else:
        if attention_mask is not None and attention_mask.shape != x.shape[:2]:
            raise ConfigError(f"attention_mask of shape {tuple(attention_mask.shape)} does not fit "
                              f"last_hidden_state of shape {tuple(x.shape)}; allowed: [B, N] over its tokens")
        weights = torch.ones(x.shape[:2], device=x.device) if attention_mask is None else attention_mask.float()
    weights = weights.unsqueeze(-1)
    return ((x.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)).to(x.dtype)


# --- cost --------------------------------------------------------------------------------------
def pass_macs(model: nn.Module, state: ReductionState) -> dict[str, int]:
    """MACs of one sequence for the pass that left `state`, split by where they are spent (the
    embeddings are lookups: no MACs)."""
    family, head = model_spec(model)
    encoder = encoder_of(model, head)
    costs = block_costs(_layers(encoder), model.config.hidden_size, TextLayerOps)
    heads = [getattr(encoder, "pooler", None)]
    if head == "first":
        heads = [model.classifier]
    elif head == "distil":
        heads = [model.pre_classifier, model.classifier]
    elif head == "pooler":
        heads.append(model.classifier)
    head_macs = sum(linear_macs(m) for m in heads if m is not None)
    return macs_parts(0, costs, state.records, head_macs)


@register_adapter("hf_text")
class HFTextAdapter(HFAdapterBase):
    family = (f"Hugging Face transformers text encoders ({', '.join(SUPPORTED)}; token-level heads are refused: they "
              "need every token)")
    reduced_methods = _ReducedHFText

    # every model of these families, so a class it does not support is refused with the reason
    claimed_class = staticmethod(_family_class)
    model_info = staticmethod(describe)
    model_macs = staticmethod(pass_macs)

    def unpatch(self, model: nn.Module) -> None:
        if PIPELINE_LINK in model.__dict__:  # its SentenceTransformer's Pooling reads its passes
            raise ConfigError(f"this {model._tokenreduce.original_class.__name__} is the transformers model of a "
                              "token-reduced SentenceTransformer; allowed: tokenreduce.remove or tokenreduce.apply on "
                              "the SentenceTransformer")
        super().unpatch(model)
