"""`fmnist_vlm`: the project's own vision-language model, a transformers `LlavaForConditionalGeneration`
that answers templated questions about Fashion-MNIST images in one word.

The LLaVA-1.5 layout at a tiny size, so that the vision-language reducers (docs/vlm.md) change a real
accuracy on a 2-core CPU:
- vision tower: a `CLIPVisionModel` of `fmnist_vit`'s shape (1-channel 32x32 input, 4x4 patches, so
  64 patch tokens and a CLS token, 8 layers of width 128, 4 heads, MLP 512, exact GELU, layer-norm eps
  1e-6), initialised from fmnist_vit's shipped weights by `vit_to_clip`;
- projector: LLaVA's linear-GELU-linear (128 -> 128 -> 128), fed layer -2 of the tower (LLaVA-1.5's
  choice, which also leaves a next layer for PruMerge's signals), strategy "default": the 64 patch
  tokens, the CLS dropped;
- language model: a Llama of width 128, 4 layers, 4 heads, MLP 344, tied input/output embeddings,
  256 positions, over a word-level vocabulary of the questions' words (`VOCAB`).

Text is LLaVA-1.5's conversation form, "USER: <image>\\n{question} ASSISTANT:", and the answer is one
word then `</s>`: a class name (`CLASS_WORDS`) for "what is this item?", yes or no otherwise
(`ask`), alone or followed by LLaVA-1.5's short-answer instruction (`INSTRUCTION`).
`fmnist_vlm_processor()` gives a `LlavaProcessor` (the tokenizer, the chat template and an image
processor that pads the 28x28 image to 32x32 and normalises it exactly as fmnist_vit's pipeline does)
that expands `<image>` to the 64 placeholders as for a hub LLaVA; `load_fmnist_vlm()` the model with
the weights `experiment=train_fmnist_vlm` trained; `write_fmnist_questions()` a JSON-lines question set on
the Fashion-MNIST test images.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import PILImageResampling
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from tokenreduce.errors import ConfigError, check_number
from tokenreduce.models.fmnist import ARCH as VIT_ARCH
from tokenreduce.models.fmnist import FMNIST_MEAN, FMNIST_STD
from tokenreduce.models.fmnist import WEIGHTS as VIT_WEIGHTS

NAME = "fmnist_vlm"
WEIGHTS = Path(__file__).resolve().parent / "weights" / "fmnist_vlm.safetensors"
MODEL_CONFIG_KEY = "model_config"  # where a train_vlm checkpoint keeps the model's settings
VOCAB_KEY = "vocab"  # the weights file's metadata entry holding the vocabulary it was trained with

# --- questions ---------------------------------------------------------------------------------------
# Fashion-MNIST's classes in label order, each one word (the answers to "what is this item?")
CLASS_WORDS = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
WHAT_QUESTION = "what is this item?"
CLASS_QUESTION = "is this a {}?"
# category question -> the labels for which the answer is yes. Every class has at least one yes and
# one no among them, so a category question can be asked with either answer about any image. A
# dress is worn on the upper body (and below it): yes.
CATEGORIES = {
    "is this footwear?": (5, 7, 9),
    "is this worn on the upper body?": (0, 2, 3, 4, 6),
    "is this clothing?": (0, 1, 2, 3, 4, 6),
    "is this for carrying things?": (8,),
}
KINDS = ("what", "is_class", "category")
YES, NO = "yes", "no"
# LLaVA-1.5's instruction after a short-answer question (its VQAv2 prompt, task=vqa's default): training
# puts it after half of the questions, so the model answers with and without it
INSTRUCTION = "Answer the question using a single word or phrase."

# --- text --------------------------------------------------------------------------------------------
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID = range(len(SPECIAL_TOKENS))
IMAGE_TOKEN = SPECIAL_TOKENS[IMAGE_ID]
_WORD = re.compile(r"\w+|[^\w\s]+")  # what the `tokenizers` Whitespace pre-tokenizer splits text into


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


# the vocabulary, in a fixed order: the special tokens, the conversation's words, the answers, then the
# questions' other words in order of appearance. The weights file records it; loading checks it.
VOCAB = tuple(dict.fromkeys([
    *SPECIAL_TOKENS, *_words("USER: ASSISTANT:"), YES, NO, *CLASS_WORDS,
    *_words(" ".join([WHAT_QUESTION, CLASS_QUESTION.format(""), *CATEGORIES, INSTRUCTION])),
]))

# LLaVA-1.5's conversation form, written for this tokenizer: every image of a user turn as "<image>\n",
# then its text; an assistant turn is its answer and </s> (what the model is trained to produce).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set parts = message['content'] if message['content'] is not string "
    "else [{'type': 'text', 'text': message['content']}] -%}"
    "{%- if message['role'] == 'user' -%}"
    "USER: {% for part in parts if part['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for part in parts if part['type'] == 'text' %}{{ part['text'] }} {% endfor %}"
    "{%- elif message['role'] == 'assistant' -%}"
    "ASSISTANT: {% for part in parts if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}{{ eos_token }} "
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)

# --- architecture ------------------------------------------------------------------------------------
# the tower is fmnist_vit's shape, so that its weights convert one to one
VISION = dict(image_size=VIT_ARCH["img_size"], patch_size=VIT_ARCH["patch_size"], num_channels=VIT_ARCH["in_chans"],
              hidden_size=VIT_ARCH["embed_dim"], num_hidden_layers=VIT_ARCH["depth"],
              num_attention_heads=VIT_ARCH["num_heads"],
              intermediate_size=int(VIT_ARCH["embed_dim"] * VIT_ARCH["mlp_ratio"]),
              hidden_act="gelu",  # timm's nn.GELU: the exact (erf) form, not CLIP's quick_gelu
              layer_norm_eps=1e-6)  # timm's ViT LayerNorm
PATCHES = (VISION["image_size"] // VISION["patch_size"]) ** 2  # 64 image tokens per image
CONFIG = dict(text_hidden_size=128, text_layers=4, text_heads=4, text_intermediate_size=344,
              max_positions=256, vision_feature_layer=-2)
VISION_INITS = ("fmnist_vit", "random")
TIED = ("lm_head.weight",)  # the output layer is the input embedding (tie_word_embeddings)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"fmnist_vlm: {name}={value!r} is invalid; allowed: an integer >= {low}")


def model_config(**overrides) -> dict:
    """`CONFIG` with `overrides`, checked (without building anything)."""
    unknown = sorted(set(overrides) - set(CONFIG))
    if unknown:
        raise ConfigError(f"fmnist_vlm: {unknown[0]}={overrides[unknown[0]]!r} is not a setting; "
                          f"allowed: {', '.join(CONFIG)}")
    cfg = {**CONFIG, **overrides}
    for key in ("text_hidden_size", "text_layers", "text_heads", "text_intermediate_size"):
        _check_int(key, cfg[key], 1)
    _check_int("max_positions", cfg["max_positions"], longest_sequence())
    head_dim, rest = divmod(cfg["text_hidden_size"], cfg["text_heads"])
    if rest or head_dim % 2:  # rotary embeddings turn pairs of channels
        raise ConfigError(f"fmnist_vlm: text_heads={cfg['text_heads']} is invalid for text_hidden_size="
                          f"{cfg['text_hidden_size']}; allowed: a divisor leaving an even head width")
    layer, depth = cfg["vision_feature_layer"], VISION["num_hidden_layers"]
    if isinstance(layer, bool) or not isinstance(layer, int) or not -depth <= layer <= -1:
        raise ConfigError(f"fmnist_vlm: vision_feature_layer={layer!r} is invalid; allowed: an integer in "
                          f"-{depth}..-1 (the output of one of the tower's {depth} layers; LLaVA-1.5 reads -2)")
    return cfg


def longest_sequence() -> int:
    """Tokens of the longest training sequence: <s>, the prompt with its 64 placeholders, the answer, </s>."""
    questions = [WHAT_QUESTION, *(CLASS_QUESTION.format(w) for w in CLASS_WORDS), *CATEGORIES]
    prompt = max(len(_words(f"USER: {user_text(q, True)} ASSISTANT:")) for q in questions)
    return 1 + prompt + PATCHES + 2


def llava_config(**overrides):
    """The `LlavaConfig` of `CONFIG` with `overrides`."""
    cfg = model_config(**overrides)
    vision = CLIPVisionConfig(**VISION)
    text = LlamaConfig(vocab_size=len(VOCAB), hidden_size=cfg["text_hidden_size"],
                       intermediate_size=cfg["text_intermediate_size"], num_hidden_layers=cfg["text_layers"],
                       num_attention_heads=cfg["text_heads"], num_key_value_heads=cfg["text_heads"],
                       max_position_embeddings=cfg["max_positions"], tie_word_embeddings=True,
                       pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID, image_seq_length=PATCHES,
                       projector_hidden_act="gelu", vision_feature_select_strategy="default",
                       vision_feature_layer=cfg["vision_feature_layer"], tie_word_embeddings=True,
                       pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def create_fmnist_vlm(vision: str = "fmnist_vit", **overrides):
    """The model of `CONFIG` with `overrides`: the language model and projector random (the caller's
    seed), the tower converted from fmnist_vit's shipped weights (`vision="fmnist_vit"`, see
    `vit_to_clip`) or random (`vision="random"`)."""
    if vision not in VISION_INITS:
        raise ConfigError(f"fmnist_vlm: vision={vision!r} is invalid; allowed: {', '.join(VISION_INITS)}")
    config = llava_config(**overrides)
    model = LlavaForConditionalGeneration(config)
    if model.lm_head.weight is not model.model.language_model.embed_tokens.weight:
        raise RuntimeError("fmnist_vlm: the output layer is not tied to the input embedding")
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                                               do_sample=False, max_new_tokens=2)
    if vision == "fmnist_vit":
        from safetensors.torch import load_file

        model.model.vision_tower.load_state_dict(vit_to_clip(load_file(VIT_WEIGHTS)))
    return model


def vit_to_clip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """fmnist_vit's timm state dict as a transformers `CLIPVisionModel`'s (all of its keys).

    - timm's patch embedding has a bias, CLIP's has none; the bias is added to every patch token
      before the position embedding, so it folds exactly into the position embeddings of the 64 patch
      positions (the CLS position keeps its own);
    - timm's fused qkv projection splits into q, k, v (rows in that order);
    - CLIP has a layer norm before the first layer that timm's ViT lacks (`pre_layrnorm`): it starts as
      weight 1, bias 0, which is not the identity (it normalises each token), and is trained with the
      rest; with it bypassed the converted tower computes fmnist_vit's tokens (tested);
    - timm's final norm is CLIP's `post_layernorm` (both normalise the CLS token that the classifier
      reads); LLaVA reads an earlier layer, so neither is used there. The classifier head is left out.
    """
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise ConfigError(f"vit_to_clip: the state dict lacks {missing[0]}; allowed: fmnist_vit's (timm ViT) weights")
    width = state["cls_token"].shape[-1]
    out = {
        "embeddings.class_embedding": state["cls_token"].reshape(width),
        "embeddings.patch_embedding.weight": state["patch_embed.proj.weight"],
        "pre_layrnorm.weight": torch.ones(width),
        "pre_layrnorm.bias": torch.zeros(width),
        "post_layernorm.weight": state["norm.weight"],
        "post_layernorm.bias": state["norm.bias"],
    }
    position = state["pos_embed"].reshape(-1, width).clone()
    position[1:] += state["patch_embed.proj.bias"]
    out["embeddings.position_embedding.weight"] = position
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        t, c = f"blocks.{i}.", f"encoder.layers.{i}."
        for end in ("weight", "bias"):
            q, k, v = state[f"{t}attn.qkv.{end}"].chunk(3)
            out.update({f"{c}self_attn.q_proj.{end}": q, f"{c}self_attn.k_proj.{end}": k,
                        f"{c}self_attn.v_proj.{end}": v,
                        f"{c}self_attn.out_proj.{end}": state[f"{t}attn.proj.{end}"],
                        f"{c}layer_norm1.{end}": state[f"{t}norm1.{end}"],
                        f"{c}layer_norm2.{end}": state[f"{t}norm2.{end}"],
                        f"{c}mlp.fc1.{end}": state[f"{t}mlp.fc1.{end}"],
                        f"{c}mlp.fc2.{end}": state[f"{t}mlp.fc2.{end}"]})
    return {k: v.clone() for k, v in out.items()}


# --- weights -----------------------------------------------------------------------------------------
def weights_state(model) -> dict[str, Tensor]:
    """The model's state dict without the tied output layer (safetensors refuses shared tensors)."""
    return {k: v for k, v in model.state_dict().items() if k not in TIED}


def weights_metadata(model_cfg: dict) -> dict[str, str]:
    """The header entries of a weights file: the vocabulary and the architecture it was trained with."""
    return {VOCAB_KEY: json.dumps(list(VOCAB)), MODEL_CONFIG_KEY: json.dumps(model_cfg)}


def load_fmnist_vlm(weights: str | Path | None = None, **overrides):
    """The model with trained weights, in eval mode: those shipped in the package (`WEIGHTS`, trained
    by `experiment=train_fmnist_vlm`), or those of `weights`, a safetensors file of the model's state
    dict or a `task=train_vlm` checkpoint. The architecture is the file's (else `CONFIG`) with
    `overrides`."""
    from tokenreduce.engine.weights import check_fits, weights_file

    path = weights_file(weights, WEIGHTS, "fmnist_vlm", "train_fmnist_vlm", "weights", "train_vlm")

    state, saved_config, vocab = _read(path)
    if vocab is not None and tuple(vocab) != VOCAB:
        raise ConfigError(f"weights={path} was trained with another vocabulary ({len(vocab)} words, this code has "
                          f"{len(VOCAB)}); allowed: weights trained with this version's VOCAB")
    with torch.random.fork_rng(devices=[]):  # the random start is overwritten: leave the caller's RNG alone
        model = create_fmnist_vlm(vision="random", **{**saved_config, **overrides})
    check_fits(state, weights_state(model), path, NAME)
    model.load_state_dict(state, strict=False)  # the tied output layer follows the embedding
    return model.eval()


def _read(path: Path) -> tuple[dict, dict, list | None]:
    """The state dict in the file at `path`, the architecture saved with it ({} if none) and its
    vocabulary (None if not saved)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        vocab = json.loads(meta[VOCAB_KEY]) if VOCAB_KEY in meta else None
        return load_file(path), json.loads(meta.get(MODEL_CONFIG_KEY, "{}")), vocab
    from tokenreduce.engine.weights import read_saved

    saved = read_saved(path)
    state = {k[len("model."):]: v for k, v in saved["state_dict"].items() if k.startswith("model.")}
    state = {k: v for k, v in state.items() if k not in TIED}
    return state, dict(saved.get(MODEL_CONFIG_KEY) or {}), saved.get(VOCAB_KEY)


# --- tokenizer and processor -------------------------------------------------------------------------
def build_tokenizer(max_positions: int = CONFIG["max_positions"]):
    """The word-level tokenizer of `VOCAB` (the `tokenizers` library, whitespace pre-tokenizer; an
    unknown word is <unk>), as a transformers `PreTrainedTokenizerFast`: it adds <s> in front, pads on
    the left (as generation needs), and knows <image> as the image token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=SPECIAL_TOKENS[UNK_ID]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(list(SPECIAL_TOKENS))  # matched whole, before the words are split
    bos = SPECIAL_TOKENS[BOS_ID]
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                        special_tokens=[(bos, BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=SPECIAL_TOKENS[PAD_ID], bos_token=bos,
                                   eos_token=SPECIAL_TOKENS[EOS_ID], unk_token=SPECIAL_TOKENS[UNK_ID],
                                   extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left",
                                   model_max_length=max_positions, chat_template=CHAT_TEMPLATE)


def build_image_processor():
    """transformers' CLIP image processor, PIL backend, set up as fmnist_vit's evaluation pipeline:
    grey images kept at one channel (no RGB conversion), the shorter side resized to 28 (a 28x28 image
    is unchanged), centre-cropped to 32 (which pads 2 zero pixels each side), scaled to 0..1 and
    normalised with Fashion-MNIST's mean and std. On 28x28 images it gives the project's tensors bit for
    bit; the torchvision backend (`CLIPImageProcessor`) fuses scaling and normalising and differs in
    the last bit (about 1e-7), so the PIL one is used. Colour images are made grey first
    (`GreyImageProcessor`)."""
    side = VISION["image_size"]
    return GreyImageProcessor(do_resize=True, size={"shortest_edge": 28}, resample=PILImageResampling.BILINEAR,
                                 do_center_crop=True, crop_size={"height": side, "width": side}, do_rescale=True,
                                 do_normalize=True, image_mean=list(FMNIST_MEAN), image_std=list(FMNIST_STD),
                                 do_convert_rgb=False)


class GreyImageProcessor(CLIPImageProcessorPil):
    """`CLIPImageProcessorPil` that keeps grey images at one channel and turns colour ones grey
    (ITU-R 601 luma, PIL's "L" conversion for 8-bit images), so an image that went through
    `.convert("RGB")` gives the same tensor as the grey original."""

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, **kwargs):
        image = super().process_image(image, do_convert_rgb=False, input_data_format=input_data_format, **kwargs)
        if image.shape[0] in (3, 4):  # channel-first from here on; an alpha channel is dropped
            r, g, b = (image[c].astype(np.int64 if image.dtype == np.uint8 else np.float64) for c in range(3))
            if image.dtype == np.uint8:  # PIL's integer formula: grey (r = g = b) images come back exactly
                image = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[None]
            else:
                image = (0.299 * r + 0.587 * g + 0.114 * b).astype(image.dtype)[None]
        return image


def fmnist_vlm_processor():
    """A `LlavaProcessor` as a hub LLaVA-1.5 has one: `apply_chat_template(conversation)` renders the
    prompt, `processor(images=..., text=...)` gives `pixel_values` [B, 1, 32, 32] and `input_ids` with
    each <image> expanded to the 64 placeholders the model's features fill (65 tokens with the CLS,
    minus the CLS for strategy "default")."""
    return LlavaProcessor(image_processor=build_image_processor(), tokenizer=build_tokenizer(),
                          patch_size=VISION["patch_size"], vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def user_text(question: str, instructed: bool = False) -> str:
    """The text of the user's turn: the question, with `instructed` followed by `INSTRUCTION` on a
    line of its own (as task=vqa's default prompt puts it)."""
    return f"{question}\n{INSTRUCTION}" if instructed else question


def conversation(text: str, answer: str | None = None) -> list[dict]:
    """The chat messages of one question about one image, `text` the user's (`user_text`), and the
    answer when given."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


class QuestionEncoder:
    """Token ids of questions (and answers) as the processor makes them, for batches of many images:
    each question's prompt ids are computed once, through the processor's chat template and tokenizer
    (the placeholders expanded as `processor(images=..., text=...)` expands them), then reused."""

    def __init__(self, processor=None):
        self.processor = processor or fmnist_vlm_processor()
        self.tokenizer = self.processor.tokenizer
        self._prompts: dict[str, list[int]] = {}
        self.answer_ids = {w: self.tokenizer.convert_tokens_to_ids(w) for w in (*CLASS_WORDS, YES, NO)}

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt's ids for the user's `text` (`user_text`): <s>, the turn with its placeholders,
        then "ASSISTANT:"."""
        if text not in self._prompts:
            prompt = self.processor.apply_chat_template(conversation(text), add_generation_prompt=True)
            prompt = prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * PATCHES)
            self._prompts[text] = self.tokenizer(prompt)["input_ids"]
        return self._prompts[text]

    def encode(self, questions: list[str], answers: list[str] | None = None) -> dict[str, Tensor]:
        """For the user texts `questions` (`user_text`): left-padded `input_ids`, `attention_mask` and `position_ids` (numbered from each sample's
        first real token, as `generate` numbers them; padding gets 1, as there); with `answers`, each
        sequence ends with the answer and </s>, and `labels` is -100 but on those two tokens, so a
        loss counts only the answer."""
        rows, targets = [], []
        for i, question in enumerate(questions):
            ids = list(self.prompt_ids(question))
            target = [-100] * len(ids)
            if answers is not None:
                tail = [self.answer_ids.get(answers[i], UNK_ID), EOS_ID]
                ids += tail
                target += tail
            rows.append(ids)
            targets.append(target)
        width = max(map(len, rows))
        input_ids = torch.tensor([[PAD_ID] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
        if answers is not None:
            batch["labels"] = torch.tensor([[-100] * (width - len(t)) + t for t in targets])
        return batch


@torch.no_grad()
def answer(model, encoder: QuestionEncoder, pixel_values: Tensor, questions: list[str],
           max_new_tokens: int = 2) -> list[str]:
    """Greedy answers of `model` to `questions` about the images `pixel_values` (one each): the words
    generated before </s> (an answer and </s> are two tokens). The special tokens other than </s> are
    never generated (an untrained model could otherwise emit a placeholder)."""
    batch = {k: v.to(pixel_values.device) for k, v in encoder.encode(questions).items()}
    out = model.generate(pixel_values=pixel_values, input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"], max_new_tokens=max_new_tokens, do_sample=False,
                         suppress_tokens=[PAD_ID, BOS_ID, UNK_ID, IMAGE_ID], pad_token_id=PAD_ID,
                         eos_token_id=EOS_ID)
    new = out[:, batch["input_ids"].shape[1]:]
    return [encoder.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


# --- question sets -----------------------------------------------------------------------------------
def true_answer(question: str, label: int) -> str:
    """The answer to `question` (one of the templates) about an image of class `label`."""
    if question == WHAT_QUESTION:
        return CLASS_WORDS[label]
    if question in CATEGORIES:
        return YES if label in CATEGORIES[question] else NO
    for index, word in enumerate(CLASS_WORDS):
        if question == CLASS_QUESTION.format(word):
            return YES if index == label else NO
    raise ConfigError(f"question={question!r} is not one of fmnist_vlm's templates; allowed: {WHAT_QUESTION!r}, "
                      f"{CLASS_QUESTION.format('<class>')!r}, {', '.join(map(repr, CATEGORIES))}")


def ask(kind: str, label: int, rng, yes: bool | None = None) -> tuple[str, str]:
    """A question of `kind` about an image of class `label`, and its answer. For the yes/no kinds
    the answer is `yes` (true or false), or drawn from `rng` (a `random.Random`, or the `random`
    module) with even odds; "is this a {class}?" then names the class, or one of the other nine, and
    a category question is one of those with that answer for the class."""
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r} is invalid; allowed: {', '.join(KINDS)}")
    if kind == "what":
        return WHAT_QUESTION, CLASS_WORDS[label]
    if yes is None:
        yes = rng.random() < 0.5
    if kind == "is_class":
        named = label if yes else rng.choice([c for c in range(len(CLASS_WORDS)) if c != label])
        question = CLASS_QUESTION.format(CLASS_WORDS[named])
    else:
        question = rng.choice([q for q, members in CATEGORIES.items() if (label in members) == yes])
    return question, YES if yes else NO


def write_fmnist_questions(path: str | Path, images: int = 500, seed: int = 0, root: str | Path | None = None,
                    kinds=KINDS) -> Path:
    """A JSON-lines question set on Fashion-MNIST's test images, in VQAv2's form; returns its path.

    `images` test images are drawn with `seed`, as evenly over the classes as the count allows
    (class c gets images // 10, one more for the first images % 10 classes), each written as a PNG
    (28x28 grey, as stored) into the folder `<name>_images` beside the file. Each image is asked one
    question of every kind in `kinds`; for a yes/no kind exactly half of the images (rounded up) get
    the answer yes. Each line: {"question_id", "image" (the PNG's path relative to the file's folder),
    "image_index" (in the test split), "label", "question", "question_type", "answer", "answers" (ten
    copies, as VQAv2 lines have ten annotators')}. `root`: the Fashion-MNIST folder (Debian's default).
    An existing file is refused, never overwritten."""
    from PIL import Image

    from tokenreduce.data.fashion_mnist import DEBIAN_ROOT, SPLIT_SIZES, load_split
    from tokenreduce.engine.record import staged_file, write_new

    check_number("write_fmnist_questions", "images", images, low=1, high=SPLIT_SIZES["test"], integer=True)
    check_number("write_fmnist_questions", "seed", seed, low=0, integer=True)
    given, kinds = kinds, tuple(kinds) if isinstance(kinds, (list, tuple)) else ()
    if not kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= set(KINDS):
        raise ConfigError(f"write_fmnist_questions: kinds={given!r} is invalid; allowed: a list of distinct kinds "
                          f"among {', '.join(KINDS)}")
    path = Path(path)
    if path.exists():
        raise ConfigError(f"write_fmnist_questions: {path} already exists; allowed: a new file")
    pixels, labels = load_split(DEBIAN_ROOT if root is None else root, "test", key="root")
    rng = random.Random(seed)
    chosen: list[int] = []
    for c in range(len(CLASS_WORDS)):
        members = (labels == c).nonzero().flatten().tolist()
        chosen += rng.sample(members, images // len(CLASS_WORDS) + (c < images % len(CLASS_WORDS)))
    rng.shuffle(chosen)
    answers_yes = {}
    for kind in kinds:
        flags = [i < (images + 1) // 2 for i in range(images)]
        rng.shuffle(flags)
        answers_yes[kind] = flags
    folder = path.parent / f"{path.stem}_images"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for n, index in enumerate(chosen):
        label = int(labels[index])
        image = folder / f"test_{index:05d}.png"
        with staged_file(image, replace=True) as temporary:
            Image.fromarray(pixels[index].numpy(), mode="L").save(temporary, format="PNG")
        for kind in kinds:
            question, reply = ask(kind, label, rng, yes=answers_yes[kind][n] if kind != "what" else None)
            lines.append(json.dumps({"question_id": len(lines), "image": f"{folder.name}/{image.name}",
                                     "image_index": index, "label": label, "question": question,
                                     "question_type": kind, "answer": reply, "answers": [reply] * 10}))
    return write_new(path, "\n".join(lines) + "\n")
