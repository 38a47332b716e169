"""task=vqa: a vision-language model answers visual questions, unreduced and with each of `vqa.reducers`,
side by side (docs/vlm.md, "VQA: task=vqa").

The same questions go through every setting, batch by batch, the settings in turn within each batch (so
machine noise hits them alike), after one untimed batch of each. Per setting and batch: a timed prefill
(`generate` with one new token: the time to the first token, the KV cache it leaves, `tokenreduce.stats`
of it), then the timed greedy answer (`do_sample=False`) through the processor's chat template. The
table: accuracy (the VQAv2 rule or normalised exact match), visual tokens and prefill MACs per sample,
time to the first token and its speed-up, decoding tokens/s, KV-cache bytes per sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

import tokenreduce
from tokenreduce.cost import VISUAL_MEASURES, searchable
from tokenreduce.engine.config import settings_of
from tokenreduce.engine.console import progress, show, tell
from tokenreduce.engine.record import write_new
from tokenreduce.engine.speed import (
    DTYPES,
    TIMING_LEGEND,
    Load,
    load_average,
    marks_note,
    resolve_device,
    spread,
    synchronize,
    timing_marks,
)
from tokenreduce.engine.tasks import ONE_MODEL, TRAINING, RunContext, Task, register_task
from tokenreduce.engine.vqa_data import Question, read_questions
from tokenreduce.errors import ConfigError, UnsupportedModelError, check_number
from tokenreduce.reducers.base import create_reducer, reducer_class

OWN_MODEL = "fmnist_vlm"  # the project's own small LLaVA (tokenreduce/models/fmnist_vlm.py)
RECORD, TABLE_MD = "vqa.json", "vqa.md"
OWN_QUESTIONS = "questions.jsonl"  # the own model's question set, written into the run directory
METRICS = ("vqa", "exact")
DEFAULT_PROMPT = "{question}\nAnswer the question using a single word or phrase."  # LLaVA-1.5's evaluation
PART = "macs_parts."  # the sums' keys of the prefill MACs' parts


# --- answers: the VQAv2 evaluation's normalisation and accuracy ------------------------------------
# The published rule (Antol et al. 2015 and the evaluation code of visualqa.org): a punctuation mark is
# removed where it touches a space or the answer holds a digit-comma-digit, else it becomes a space;
# a period not followed by a digit is removed; then lower case, number words to digits, articles
# dropped, contractions written with their apostrophes.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
COMMA_NUMBER = re.compile(r"\d,\d")
PERIOD = re.compile(r"\.(?!\d)")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# contractions as the evaluation writes them; a form without some of its apostrophes maps to it. Those
# whose bare form is a word of its own (its, lets, well, were, ill, id, hell, shell, wed, shed) are not listed.
CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't shouldn't've
somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd
something'd've something'll something's that's there'd there'd've there're there's they'd they'd've they'll
they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've
who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll
y'all'd've you'd you'd've you'll you're you've""".split()


def _apostrophe_variants(word: str) -> dict[str, str]:
    marks = [i for i, c in enumerate(word) if c == "'"]
    variants = {}
    for dropped in itertools.chain.from_iterable(itertools.combinations(marks, k) for k in range(1, len(marks) + 1)):
        variants["".join(c for i, c in enumerate(word) if i not in dropped)] = word
    return variants


CONTRACTIONS = {bare: word for w in CONTRACTED for bare, word in _apostrophe_variants(w).items()}


def normalize_answer(text: str) -> str:
    """An answer as the VQAv2 evaluation compares it: "Two dogs." -> "2 dogs", "the Dont" -> "don't"."""
    text = " ".join(text.replace("\n", " ").replace("\t", " ").split())
    touches = COMMA_NUMBER.search(text) is not None
    out = text
    for mark in PUNCTUATION:  # the conditions read the answer as given, not as partly cleaned
        gone = touches or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if gone else " ")
    out = PERIOD.sub("", out)
    words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The VQAv2 accuracy: min(#annotators who gave the answer / 3, 1), averaged over the subsets that
    leave one annotator out (10 choose 9 for VQAv2's ten), after `normalize_answer`. With ten answers,
    one match scores 0.3, two 0.6, three 0.9, four or more 1.0."""
    if len(answers) < 2:
        raise ValueError("the VQA accuracy needs at least 2 answers")
    given = normalize_answer(prediction)
    same = [normalize_answer(a) == given for a in answers]
    matches = sum(same)
    return sum(min(1.0, (matches - s) / 3) for s in same) / len(same)


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 when the normalised prediction equals one of the normalised answers (GQA, POPE's yes/no)."""
    given = normalize_answer(prediction)
    return float(any(normalize_answer(a) == given for a in answers))


SCORERS = {"vqa": vqa_accuracy, "exact": exact_match}


# --- settings ---------------------------------------------------------------------------------------
@dataclass
class VQASettings:
    """model: `fmnist_vlm` (the project's own small LLaVA, shipped weights), or a local folder or hub id
              loaded with AutoModelForImageTextToText and AutoProcessor.
    questions: a JSON-lines question file (vqa_data.py); null with fmnist_vlm: its Fashion-MNIST set,
              written into the run directory.
    limit: the first N questions (null: all). metric: vqa (the VQAv2 rule) or exact (normalised match).
    prompt: the text around the question, `{question}` where it goes; the processor's chat template
              wraps it with the image.
    max_new_tokens: the longest answer. batch_size: questions per generate call (left-padded).
    dtype: auto (the checkpoint's), float32, float16 or bfloat16.
    reducers: the reduced settings, each {name: reducer, its parameters...}.
    match: null, or {tokens: [visual tokens per image...], measure: final | mean, tolerance: relative
              (0.02), methods: [{name: reducer, fixed parameters...}]}: each method set to keep each
              count by `tokenreduce.match_visual_tokens` on the loaded model, measured after `reducers`."""

    model: str = OWN_MODEL
    questions: str | None = None
    limit: int | None = None
    metric: str = "exact"
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 16
    batch_size: int = 8
    dtype: str = "auto"
    reducers: list[dict] = field(default_factory=list)
    match: dict | None = None

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"vqa.model={self.model!r} is invalid; allowed: {OWN_MODEL}, a local model folder or "
                              "a hub id")
        if self.questions is None and self.model != OWN_MODEL:
            raise ConfigError(f"vqa.questions=None is invalid with vqa.model={self.model}; allowed: a JSON-lines "
                              f"question file (null only with vqa.model={OWN_MODEL})")
        if self.questions is not None and (not isinstance(self.questions, str) or not self.questions):
            raise ConfigError(f"vqa.questions={self.questions!r} is invalid; allowed: a JSON-lines question file")
        if self.limit is not None:
            check_number("vqa", "limit", self.limit, low=1, integer=True)
        if self.metric not in METRICS:
            raise ConfigError(f"vqa.metric={self.metric!r} is invalid; allowed: {', '.join(METRICS)}")
        check_number("vqa", "max_new_tokens", self.max_new_tokens, low=1, integer=True)
        check_number("vqa", "batch_size", self.batch_size, low=1, integer=True)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"vqa.dtype={self.dtype!r} is invalid; allowed: auto, {', '.join(DTYPES)}")
        if not isinstance(self.prompt, str) or "{question}" not in self.prompt:
            raise ConfigError(f"vqa.prompt={self.prompt!r} is invalid; allowed: a text holding {{question}}")
        try:
            self.prompt.format(question="")
        except (KeyError, IndexError, ValueError):
            raise ConfigError(f"vqa.prompt={self.prompt!r} is invalid; allowed: a text whose only field is "
                              "{question} (write other braces doubled: {{ }})") from None
        if not isinstance(self.reducers, list):
            raise ConfigError(f"vqa.reducers={self.reducers!r} is invalid; allowed: a list of {{name: reducer, "
                              "parameters...}")
        self.reducers = [reducer_entry(i, entry) for i, entry in enumerate(self.reducers)]
        if self.match is not None:
            self.match = match_entry(self.match)


MATCH_KEYS = ("tokens", "measure", "tolerance", "methods")


def match_entry(match) -> dict:
    """{tokens, measure, methods} of vqa.match, each method's fixed parameters checked by building it
    (without its strength, which the match sets)."""
    if not isinstance(match, dict) or set(match) - set(MATCH_KEYS) or "tokens" not in match or "methods" not in match:
        raise ConfigError(f"vqa.match={match!r} is invalid; allowed: null or {{tokens: [visual tokens per image...], "
                          "measure: final | mean, methods: [{name: reducer, fixed parameters...}]}")
    tokens = match["tokens"]
    if not isinstance(tokens, list) or not tokens:
        raise ConfigError(f"vqa.match.tokens={tokens!r} is invalid; allowed: a non-empty list of token counts")
    for count in tokens:
        check_number("vqa.match", "tokens", count, low=1, integer=True)
    measure = match.get("measure", VISUAL_MEASURES[0])
    if measure not in VISUAL_MEASURES:
        raise ConfigError(f"vqa.match.measure={measure!r} is invalid; allowed: {', '.join(VISUAL_MEASURES)}")
    tolerance = match.get("tolerance", 0.02)
    check_number("vqa.match", "tolerance", tolerance, low=0)
    if not isinstance(match["methods"], list) or not match["methods"]:
        raise ConfigError(f"vqa.match.methods={match['methods']!r} is invalid; allowed: a non-empty list of "
                          "{name: reducer, fixed parameters...}")
    methods = []
    for i, entry in enumerate(match["methods"]):
        method = reducer_entry(i, entry, where="vqa.match.methods")
        if not reducer_class(method["name"]).strength:
            raise ConfigError(f"vqa.match.methods[{i}]: {method['name']} has no strength to set (its count adapts to "
                              "each image, or it removes nothing); allowed: a reducer of "
                              + ", ".join(searchable()) + "; list it under vqa.reducers instead")
        searched = reducer_class(method["name"]).strength[0].param
        if searched in method["params"]:
            raise ConfigError(f"vqa.match.methods[{i}]: {searched}={method['params'][searched]!r} is the parameter "
                              f"being searched; allowed: fixed parameters of {method['name']} other than {searched}")
        methods.append(method)
    return {"tokens": list(tokens), "measure": measure, "tolerance": tolerance, "methods": methods}


def reducer_entry(index: int, entry, where: str = "vqa.reducers") -> dict:
    """{name, params} of one entry of vqa.reducers (or vqa.match.methods), the reducer built once to check it."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ConfigError(f"{where}[{index}]={entry!r} is invalid; allowed: {{name: reducer, parameters...}}, "
                          "e.g. {name: fastv, layer: 2, keep: 0.25}")
    params = {k: v for k, v in entry.items() if k != "name"}
    try:
        create_reducer(entry["name"], **params)  # an unknown reducer or parameter fails now
    except ConfigError as err:
        raise ConfigError(f"{where}[{index}]: {err}") from None
    return {"name": entry["name"], "params": params}


@dataclass
class Plan:
    """What check gives run: the settings, and the questions (None: the own model's set, written at run)."""

    settings: VQASettings
    questions: list[Question] | None


def check_vqa(cfg: DictConfig) -> Plan:
    """The settings and the questions, checked before any model is built; also the device."""
    settings = settings_of(VQASettings, cfg.get("vqa"), "vqa")
    resolve_device(cfg.measure.get("device", "auto"))
    questions = None if settings.questions is None else read_questions(settings.questions, settings.limit)
    if questions is not None:
        check_metric_fits(settings.metric, questions, settings.questions)
    return Plan(settings, questions)


def check_metric_fits(metric: str, questions: list[Question], source: str) -> None:
    if metric != "vqa":
        return
    few = next((q for q in questions if len(q.answers) < 2), None)
    if few is not None:
        raise ConfigError(f"vqa.metric=vqa needs at least 2 answers per question (it averages over the answers "
                          f"left out one at a time; VQAv2 has 10), but {source} line {few.line} has {len(few.answers)}; "
                          "allowed: vqa.metric=exact for a single-answer set (GQA, POPE)")


# --- the model ----------------------------------------------------------------------------------------
def load_named_model(name: str):
    """The project's own model `name`: (model, processor, write_questions), the last writing its
    question set as JSON lines to the path it is given and returning that path."""
    from tokenreduce.models import fmnist_vlm

    return fmnist_vlm.load_fmnist_vlm(), fmnist_vlm.fmnist_vlm_processor(), fmnist_vlm.write_fmnist_questions


def load_model(settings: VQASettings, device: torch.device):
    """(model in eval mode on `device`, processor padding on the left, question writer or None)."""
    dtype = None if settings.dtype == "auto" else DTYPES[settings.dtype]
    writer = None
    if settings.model == OWN_MODEL:
        model, processor, writer = load_named_model(settings.model)
        if dtype is not None:
            model = model.to(dtype)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(settings.model)
            model = AutoModelForImageTextToText.from_pretrained(settings.model, dtype=dtype or "auto")
        except (OSError, ValueError) as err:
            raise ConfigError(f"vqa.model={settings.model!r} cannot be loaded ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:300]}); allowed: {OWN_MODEL}, a local model folder, or a "
                              "hub id this machine can reach") from None
    if getattr(processor, "chat_template", None) is None:
        raise ConfigError(f"vqa.model={settings.model!r}: its processor has no chat template; allowed: a model whose "
                          "processor has one (the prompt goes through it with the image)")
    processor.tokenizer.padding_side = "left"  # batched generation continues each prompt at the right edge
    return model.to(device).eval(), processor, writer


class Answerer:
    """Questions to model inputs (the prompt through the processor's chat template, the image first), greedy
    generation with the arguments every call shares, and the answers' text."""

    def __init__(self, model, processor, prompt: str, max_new_tokens: int, device: torch.device):
        self.model, self.processor, self.prompt, self.device = model, processor, prompt, device
        self.max_new_tokens = max_new_tokens
        config = model.config
        self.image_token_id = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
        tokenizer = processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # a real answer never holds the image placeholder; a random (test) model might emit it, and the
        # reducers refuse images after the prefill
        self.kwargs = {"do_sample": False, "num_beams": 1, "pad_token_id": pad,
                       **({"suppress_tokens": [self.image_token_id]} if self.image_token_id is not None else {})}

    def inputs(self, batch: list[Question]) -> dict:
        from PIL import Image

        images = []
        for q in batch:
            with Image.open(q.image) as image:
                images.append(image.convert("RGB"))
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt.format(question=q.question)}]}],
            add_generation_prompt=True, tokenize=False) for q in batch]
        encoded = self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        dtype = self.model.dtype
        return {k: v.to(self.device, dtype=dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in encoded.items()}

    def generate(self, inputs: dict, max_new_tokens: int, **kwargs):
        return self.model.generate(**inputs, **self.kwargs, max_new_tokens=max_new_tokens, **kwargs)

    def decode(self, sequences: torch.Tensor, width: int) -> list[str]:
        return [t.strip() for t in self.processor.batch_decode(sequences[:, width:], skip_special_tokens=True)]


class StepClock:
    """A streamer for `generate` that notes when each step's tokens arrive (the first `put` is the
    prompt); `generate` copies them to the host, so the time is the device's."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def cache_bytes(cache) -> int:
    """Bytes of the key and value tensors of a transformers cache (a DynamicCache's layers, or the legacy
    tuple of (key, value) per layer)."""
    layers = getattr(cache, "layers", cache)
    total = 0
    for layer in layers or ():
        tensors = (getattr(layer, "keys", None), getattr(layer, "values", None)) if hasattr(layer, "keys") else layer
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


# --- the settings measured ------------------------------------------------------------------------------
@dataclass
class Setting:
    reducer: str
    params: dict
    reducible: bool = True  # whether `tokenreduce` is placed (and its stats read); not for an unclaimed model
    answers: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)  # seconds per batch
    decode_seconds: float = 0.0
    decode_tokens: int = 0
    samples: int = 0
    sums: dict = field(default_factory=dict)  # per-sample figures summed over the samples
    values: dict = field(default_factory=dict)  # the table's measures

    @contextlib.contextmanager
    def placed(self, model):
        """The setting's reducer on `model` for the block, removed after it (also on an error)."""
        if not self.reducible:
            yield
            return
        tokenreduce.apply(model, self.reducer, **self.params)
        try:
            yield
        finally:
            tokenreduce.remove(model)

    def add(self, key: str, per_sample: float | None, samples: int) -> None:
        if per_sample is None:
            self.sums[key] = None
        elif key not in self.sums or self.sums[key] is not None:
            self.sums[key] = self.sums.get(key, 0.0) + per_sample * samples

    def mean(self, key: str) -> float | None:
        total = self.sums.get(key)
        return None if total is None else total / self.samples

    def measure(self, answerer: Answerer, inputs: dict, device: torch.device) -> None:
        """One batch: the timed prefill and what it left, then the timed answer."""
        batch, width = inputs["input_ids"].shape
        synchronize(device)
        began = time.perf_counter()
        out = answerer.generate(inputs, 1, return_dict_in_generate=True)
        synchronize(device)
        self.ttft.append(time.perf_counter() - began)
        self.add("kv_cache_bytes", cache_bytes(out.cache) / batch, batch)
        del out  # its cache is not needed any more
        for key, value in self.pass_figures(answerer, inputs).items():
            self.add(key, value, batch)
        clock = StepClock()
        sequences = answerer.generate(inputs, answerer.max_new_tokens, streamer=clock)
        synchronize(device)
        ended = time.perf_counter()
        steps = len(clock.times) - 1  # tokens per sample
        if steps > 1:  # the decoding: every step after the first token
            self.decode_seconds += ended - clock.times[1]
            self.decode_tokens += batch * (steps - 1)
        self.answers += answerer.decode(sequences, width)
        self.samples += batch

    def pass_figures(self, answerer: Answerer, inputs: dict) -> dict:
        """Per sample, of the last prefill: visual tokens after the reducer's last cut and their mean over
        the language model's layers, the prefill's MACs and their parts, the first decode step's MACs."""
        if not self.reducible:  # nothing reads the pass: the image placeholders are the visual tokens
            ids = inputs["input_ids"]
            count = float((ids == answerer.image_token_id).sum()) / ids.shape[0] if answerer.image_token_id is not None else None
            return {"visual_tokens": count, "visual_tokens_layer_mean": count, "prefill_macs": None, "decode_macs": None}
        stats = tokenreduce.stats(answerer.model)
        if "visual_per_image" in stats:  # cut at the boundary or in the tower: the same count at every layer
            visual = statistics.fmean(stats["visual_per_sample"])
            layer_mean = visual
        else:  # inside the language model: each sample's counts, layer by layer
            rows = stats["visual_by_sample"]
            visual = statistics.fmean(row[-1] for row in rows)
            layer_mean = statistics.fmean(statistics.fmean(row) for row in rows)
        parts = {f"{PART}{k}": v for k, v in (stats.get("macs_parts") or {}).items() if k != "total"}
        return {"visual_tokens": visual, "visual_tokens_layer_mean": layer_mean, "prefill_macs": stats["macs"],
                "decode_macs": stats.get("decode_macs"), **parts}


def settings_to_measure(model, settings: VQASettings) -> list[Setting]:
    """The unreduced setting ('none', or the bare model where tokenreduce does not claim it) and the
    reducers, each applied and removed once first, so a reducer that does not fit fails before any
    question is asked."""
    base = Setting("none", {})
    try:
        with base.placed(model):
            pass
    except (ConfigError, UnsupportedModelError):
        if settings.reducers:
            raise
        base.reducible = False  # a model no adapter claims: unreduced only, counted from its placeholders
    measured = [base] + [Setting(r["name"], r["params"]) for r in settings.reducers] + matched(model, settings.match)
    for s in measured[1:]:
        with s.placed(model):
            pass
    return measured


def matched(model, match: dict | None) -> list[Setting]:
    """Each of match's methods at each of its token counts, set by `match_visual_tokens` (counts first,
    so a table reads method by method within a count)."""
    if match is None:
        return []
    found = []
    for count in match["tokens"]:
        for method in match["methods"]:
            try:
                params, _ = tokenreduce.match_visual_tokens(model, method["name"], count, measure=match["measure"],
                                                            tolerance=match["tolerance"], **method["params"])
            except ConfigError as err:
                raise ConfigError(f"vqa.match: {method['name']} at tokens={count}: {err}") from None
            found.append(Setting(method["name"], params))
    return found


def measure_settings(answerer: Answerer, measured: list[Setting], questions: list[Question], batch_size: int,
                     device: torch.device) -> Load:
    """Every question with every setting, batch by batch, the settings in turn within a batch, after one
    untimed batch of each; the machine's load around the timings."""
    batches = [questions[i:i + batch_size] for i in range(0, len(questions), batch_size)]
    model = answerer.model
    first = answerer.inputs(batches[0])
    for s in measured:  # kernels, allocator pools and caches warm alike
        with s.placed(model):
            answerer.generate(first, min(2, answerer.max_new_tokens))
    before = load_average()
    for batch in progress(batches, "vqa", unit="batches",
                          note=lambda b: f"{len(measured)} settings of lines {b[0].line}..{b[-1].line}"):
        inputs = answerer.inputs(batch)  # prepared once, untimed
        for s in measured:
            with s.placed(model):
                s.measure(answerer, inputs, device)
    return Load.since(before)


# --- the run ------------------------------------------------------------------------------------------------
def run_vqa(cfg: DictConfig, plan: Plan, output_dir: Path) -> list[Setting]:
    settings = plan.settings
    output_dir = Path(output_dir)
    outputs = [RECORD, TABLE_MD] + ([OWN_QUESTIONS] if plan.questions is None else [])
    found = [name for name in outputs if (output_dir / name).exists()]
    if found:  # before anything is loaded or computed
        raise ConfigError(f"{output_dir / found[0]} already exists; a run never overwrites an earlier run's results")
    device = resolve_device(cfg.measure.get("device", "auto"))
    model, processor, writer = load_model(settings, device)
    questions, source = plan.questions, settings.questions
    if questions is None:
        output_dir.mkdir(parents=True, exist_ok=True)
        source = str(writer(output_dir / OWN_QUESTIONS))
        questions = read_questions(source, settings.limit)
        check_metric_fits(settings.metric, questions, source)
    answerer = Answerer(model, processor, settings.prompt, settings.max_new_tokens, device)
    measured = settings_to_measure(model, settings)
    load = measure_settings(answerer, measured, questions, settings.batch_size, device)
    score = SCORERS[settings.metric]
    scores = [[score(a, q.answers) for a, q in zip(s.answers, questions, strict=True)] for s in measured]
    base = measured[0]
    for s, per_question in zip(measured, scores, strict=True):
        s.values = figures(s, base, per_question, questions, load)
    dtype = str(model.dtype).replace("torch.", "")
    protocol = (f"vqa: {len(questions)} questions of {source} ({settings.metric} accuracy), {settings.model} "
                f"({dtype}, {device.type}), greedy answers of up to {settings.max_new_tokens} tokens, batches of "
                f"{settings.batch_size} (left-padded) with the settings in turn; per sample: visual tokens and prefill "
                "MACs (tokenreduce.stats, at the batch's padded width), KV cache after the prefill; TTFT: median over batches of the batch's generate(max_new_tokens=1); decode: tokens per "
                "second after the first")
    table = markdown_table(measured)
    legend = f"\n\n{TIMING_LEGEND}" if any(s.values["timing_marks"] for s in measured) else ""
    show(f"{protocol}\n\n{table}{legend}")
    write_new(output_dir / TABLE_MD, f"{protocol}\n\n{table}{legend}\n")
    write_new(output_dir / RECORD, json.dumps({
        "task": "vqa", "protocol": protocol, "settings": dataclasses.asdict(settings), "questions_file": source,
        "count": len(questions), "device": str(device), "dtype": dtype,
        "rows": [{"reducer": s.reducer, "params": s.params, **s.values} for s in measured],
        "answers": [{"question_id": q.question_id, "image": str(q.image), "question": q.question,
                     "question_type": q.question_type, "answers": q.answers,
                     "predictions": [s.answers[i] for s in measured], "scores": [row[i] for row in scores]}
                    for i, q in enumerate(questions)],
        "finished": datetime.datetime.now().isoformat(timespec="seconds")}, indent=2, default=str))
    tell(f"results: {output_dir / TABLE_MD}, {output_dir / RECORD}")
    return measured


def figures(s: Setting, base: Setting, per_question: list[float], questions: list[Question], load: Load) -> dict:
    ttft = statistics.median(s.ttft)
    base_ttft = statistics.median(base.ttft)
    macs, base_macs = s.mean("prefill_macs"), base.mean("prefill_macs")
    by_type: dict[str, list[float]] = {}
    for q, value in zip(questions, per_question, strict=True):
        if q.question_type is not None:
            by_type.setdefault(q.question_type, []).append(value)
    timing = {"spread": spread(s.ttft), **load.as_record()}
    return {
        "accuracy": statistics.fmean(per_question),
        "accuracy_by_type": {k: statistics.fmean(v) for k, v in sorted(by_type.items())},
        "visual_tokens": s.mean("visual_tokens"), "visual_tokens_layer_mean": s.mean("visual_tokens_layer_mean"),
        "prefill_macs": macs, "prefill_macs_parts": {k[len(PART):]: s.mean(k) for k in s.sums if k.startswith(PART)},
        "decode_macs": s.mean("decode_macs"),
        "mac_fraction": macs / base_macs if macs is not None and base_macs else None,
        "ttft_ms": 1000 * ttft, "ttft_seconds_per_batch": s.ttft,
        "prefill_speedup": base_ttft / ttft if ttft > 0 else None,
        "decode_tokens_per_s": s.decode_tokens / s.decode_seconds if s.decode_seconds > 0 else None,
        "kv_cache_bytes": s.mean("kv_cache_bytes"),
        "timing": timing, "timing_marks": timing_marks(timing), "timing_note": marks_note(timing),
    }


def _fmt(value, pattern: str) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else format(value, pattern)


def markdown_table(measured: list[Setting]) -> str:
    from tokenreduce.engine.compare import format_params

    lines = ["| reducer | params | accuracy | visual tokens | visual tokens, layer mean | prefill GMACs | MAC fraction "
             "| TTFT ms | prefill speed-up | decode tokens/s | KV cache MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in measured:
        v = s.values
        gmacs = None if v["prefill_macs"] is None else v["prefill_macs"] / 1e9
        kv_mb = None if v["kv_cache_bytes"] is None else v["kv_cache_bytes"] / 2**20
        speedup = "-" if s is measured[0] else _fmt(v["prefill_speedup"], ".2f") + "x"
        lines.append(f"| {s.reducer} | {format_params(s.params)} | {_fmt(v['accuracy'], '.4f')} | "
                     f"{_fmt(v['visual_tokens'], '.1f')} | {_fmt(v['visual_tokens_layer_mean'], '.1f')} | "
                     f"{_fmt(gmacs, '.4g')} | {_fmt(v['mac_fraction'], '.3f')} | {_fmt(v['ttft_ms'], '.1f')}"
                     f"{v['timing_marks']} | {speedup} | {_fmt(v['decode_tokens_per_s'], '.1f')} | {_fmt(kv_mb, '.4g')} |")
    return "\n".join(lines)


# --- the task --------------------------------------------------------------------------------------------
def check(cfg: DictConfig, overrides: list[str] | None) -> Plan:
    return check_vqa(cfg)


def run(context: RunContext, plan: Plan) -> None:
    run_vqa(context.cfg, plan, context.output_dir)


TASK = register_task(Task(
    name="vqa", check=check, run=run,
    unused=("model", "reducer", "text_reducer", "data", "trainer", "logger", "run_name", "eval_split", "ckpt_path",
            *TRAINING, *ONE_MODEL),
    reads="vqa.* (model, questions, metric, prompt, reducers, ...) and measure.device",
))
