"""What the evaluation tasks of Hugging Face `transformers` models share (docs/tasks.md); each task is
a module of engine/tasks/ that declares a `TransformersTask`. Each is measured unreduced and with
the configured reducer, side by side:

- `task=retrieval`: image->text and text->image recall@1/5/10 of CLIP/SigLIP on a Karpathy-split
  Flickr30k or COCO layout;
- `task=zeroshot`: CLIP/SigLIP zero-shot top-1/top-5 on a folder of class folders, the class
  embeddings from prompt templates;
- `task=text_classification`: accuracy of a `*ForSequenceClassification` model on a CSV/JSON-lines set;
- `task=video_classification` / `task=audio_classification`: top-1/top-5 (mAP for a multi-label set)
  of `VideoMAEForVideoClassification` / `ASTForAudioClassification` on frame folders / WAV files.

`reducer` acts on the image tower (or the text, video or audio model); `text_reducer` on the text
tower of an image-text model. Speed is items per second of the model's forward passes alone (data
loading and preprocessing excluded, one untimed warm-up batch per setting); MACs are `stats` of
each pass, per item, averaged over the set. The results go to `tasks.json` and `table.md` in the
run directory, and the table to the terminal.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

import tokenreduce
from tokenreduce.data import hf_sets
from tokenreduce.data.splits import resolved
from tokenreduce.engine.config import build_reducer, default_run_name, non_default_params, plain, reducer_spec
from tokenreduce.engine.console import progress, show
from tokenreduce.engine.loggers import build_loggers, check_loggers, finish_loggers
from tokenreduce.engine.record import TASK_SUMMARY, TASKS_JSON, TASKS_TABLE, write_new
from tokenreduce.engine.speed import (
    LOAD_MARGIN,
    LOADED,
    Load,
    check_measure,
    load_average,
    synchronize,
    timing_marks,
)
from tokenreduce.engine.tasks import Task, available, register_task
from tokenreduce.errors import ConfigError, check_number

MODEL_KEYS = ("hf", "hf_class", "pretrained", "attn_implementation", "adapter_options")
# the top-level settings no transformers task reads
UNUSED = ("ckpt_path", "eval_split", "trainer", "optim", "loss", "checkpoint", "compare", "search", "budget")


@dataclass(frozen=True)
class TransformersTask:
    """What makes one transformers task: its model classes, data, processor and evaluation. Each
    task's module (engine/tasks/) declares one and registers it with `register_transformers_task`."""

    name: str
    classes: tuple[str, ...]  # the model's class: one of these, or a class ending in one ("ForXClassification")
    data_keys: tuple[str, ...]  # the settings its data config may have
    data_names: tuple[str, ...]  # its data configs (conf/data/)
    processor: str  # the transformers Auto class of its processor
    units: tuple[str, ...]  # the towers timed: the first is the model, "text" its text tower
    read_data: Callable[[dict, Callable[[], object]], object]  # (data settings, config_of) -> the set's index
    evaluate: Callable[[Job], dict]  # its metrics on one setting

    @property
    def image_text(self) -> bool:
        """A dual encoder's task: its text tower takes `text_reducer`."""
        return "text" in self.units[1:]


SPECS: dict[str, TransformersTask] = {}


def register_transformers_task(spec: TransformersTask) -> Task:
    """Register `spec` and the engine task that runs it."""
    SPECS[spec.name] = spec
    return register_task(Task(
        name=spec.name, unused=UNUSED,
        check=lambda cfg, overrides: check_hf_task(cfg, spec.name, overrides),
        run=lambda context, checked: run_task(context.cfg, spec.name, context.output_dir, context.overrides, checked),
    ))


def specs() -> dict[str, TransformersTask]:
    """Every registered transformers task, by name."""
    available()  # the package's own task modules register theirs when first asked
    return SPECS


INSTALL_HINT = "pip install 'tokenreduce[hf]' (transformers>=5)"


# --- the pieces ----------------------------------------------------------------------------------
def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"task needs Hugging Face transformers, which is not installed; install {INSTALL_HINT}") \
            from None
    return transformers


def check_model_config(task: str, model_cfg: dict) -> dict:
    """The `model` settings of a transformers task, checked (no file is read)."""
    unknown = sorted(set(model_cfg) - set(MODEL_KEYS) - {"name"})
    if unknown or not model_cfg.get("hf"):
        problem = f"model.{unknown[0]} is not a setting" if unknown else f"model.hf={model_cfg.get('hf')!r} is missing"
        raise ConfigError(f"task={task}: {problem}; allowed: a transformers model config ({', '.join(MODEL_KEYS)}), "
                          "e.g. model=hf_clip_b16, with model.hf a hub id or a local folder")
    cls = model_cfg.get("hf_class")
    rules = specs()[task].classes
    if not isinstance(cls, str) or not (cls in rules or cls.endswith(rules)):
        raise ConfigError(f"task={task}: model.hf_class={cls!r} is invalid; allowed: "
                          f"{' or '.join(('a ' if r.startswith('For') else '') + r for r in rules)}"
                          f"{' class' if rules[0].startswith('For') else ''} of transformers")
    if getattr(_transformers(), cls, None) is None:
        raise ConfigError(f"task={task}: model.hf_class={cls!r} is not a class of transformers "
                          f"{_transformers().__version__}")
    impl = model_cfg.get("attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager"):
        raise ConfigError(f"model.attn_implementation={impl!r} is invalid; allowed: sdpa, eager (the reducers add a "
                          "float attention mask)")
    return {"pretrained": True, "attn_implementation": "sdpa", "adapter_options": None, **model_cfg}


def load_config(model_cfg: dict):
    """The model's transformers config (no weights read)."""
    try:
        return _transformers().AutoConfig.from_pretrained(model_cfg["hf"])
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.hf={model_cfg['hf']!r}: cannot read its config ({err.__class__.__name__}: "
                          f"{str(err).splitlines()[0]}); allowed: a local folder written by save_pretrained, or a hub "
                          "id reachable from here (or in the Hugging Face cache)") from None


def load_model(task: str, model_cfg: dict, config) -> tuple[nn.Module, object]:
    """The model (pretrained weights, or random ones with `pretrained: false`) and its processor."""
    transformers = _transformers()
    cls = getattr(transformers, model_cfg["hf_class"])
    impl = model_cfg["attn_implementation"]
    if model_cfg["pretrained"]:
        model = cls.from_pretrained(model_cfg["hf"], attn_implementation=impl)
    else:
        model = cls._from_config(config, attn_implementation=impl)
    loader = getattr(transformers, specs()[task].processor)
    try:
        processor = loader.from_pretrained(model_cfg["hf"])
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.hf={model_cfg['hf']!r} has no processor (tokenizer, image processor or feature "
                          f"extractor) to read: {str(err).splitlines()[0]}") from None
    return model.eval(), processor


def part(processor, name: str):
    """The tokenizer / image processor of a combined processor, or the processor itself."""
    return getattr(processor, name, None) or processor


def _features(output) -> Tensor:
    """Embeddings from get_image_features / get_text_features (a tensor, or an output's pooler_output)."""
    return output if isinstance(output, Tensor) else output.pooler_output


def recall_at_k(similarity: Tensor, image_of: Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image recall@k as fractions, from the [images, texts] similarity and the
    image `image_of[t]` of each text.

    Image->text: an image is found at k when any of its texts is among its k most similar texts;
    text->image: a text is found when its image is among its k most similar images. A rank counts
    the candidates scored strictly higher, so ties do not count against the right answer."""
    similarity = similarity.float()
    texts = torch.arange(similarity.shape[1])
    # text->image: images scored above the text's own image
    own = similarity[image_of, texts]  # [T]
    t2i_rank = (similarity > own[None, :]).sum(0)
    # image->text: the best-ranked own text of each image; a text's rank among all texts of its image's row
    rows = similarity[image_of]  # [T, T]: row t is the scores of t's image against every text
    i2t_text_rank = (rows > own[:, None]).sum(1)
    i2t_rank = torch.full((similarity.shape[0],), similarity.shape[1], dtype=torch.long)
    i2t_rank = i2t_rank.scatter_reduce(0, image_of, i2t_text_rank, reduce="amin")
    result = {}
    for k in ks:
        result[f"i2t_r{k}"] = (i2t_rank < k).float().mean().item()
    for k in ks:
        result[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item()
    result["rsum"] = sum(result.values())
    return result


def topk_accuracy(logits: Tensor, labels: Tensor, k: int) -> float | None:
    """The fraction of items whose label is among the k highest logits (None with fewer than k classes)."""
    if logits.shape[1] < k:
        return None
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(1).float().mean().item()


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """Macro mAP (a fraction) over the classes that have at least one positive (AudioSet's convention)."""
    from torchmetrics.functional.classification import multilabel_average_precision

    present = targets.sum(0) > 0
    value = multilabel_average_precision(scores[:, present].float(), targets[:, present],
                                         num_labels=int(present.sum()), average="macro")
    return value.item()


@dataclass
class Meter:
    """Forward seconds, items and MACs of one tower over an evaluation."""

    tower: nn.Module
    device: torch.device
    seconds: float = 0.0
    items: int = 0
    macs: float = 0.0
    warm: bool = False

    def __call__(self, forward: Callable, count: int):
        if not self.warm:  # one untimed pass: first-call costs stay out of the speed
            forward()
            self.warm = True
        synchronize(self.device)
        start = time.perf_counter()
        output = forward()
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        self.items += count
        self.macs += tokenreduce.stats(self.tower)["macs"] * count
        return output

    def summary(self, unit: str) -> dict:
        return {f"{unit}_per_s": self.items / self.seconds if self.seconds else None,
                f"gmacs_{unit}": self.macs / max(self.items, 1) / 1e9}


def _batches(items: list, batch_size: int, num_workers: int, decode: Callable):
    return torch.utils.data.DataLoader(items, batch_size=batch_size, num_workers=num_workers, collate_fn=decode)


def _to(batch: dict, device, dtype) -> dict:
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}


# --- the evaluations -------------------------------------------------------------------------------
@dataclass
class Job:
    """What every evaluation needs: the model, its processor, the data settings, where to compute."""

    task: str
    model: nn.Module
    processor: object
    data: dict
    dataset: object
    device: torch.device
    dtype: torch.dtype
    meters: dict = field(default_factory=dict)
    label: str = ""  # the setting under way, in the progress of its passes

    def loader(self, items, decode):
        return _batches(items, self.data["batch_size"], self.data["num_workers"], decode)

    def text_inputs(self, texts: list[str]) -> dict:
        tokenizer = part(self.processor, "tokenizer")
        siglip = self.model.config.model_type == "siglip"
        max_length = self.data.get("max_length") or (64 if siglip else None)
        # SigLIP was trained on texts padded to 64 tokens, and pools the last position
        padding = "max_length" if siglip else True
        encoded = tokenizer(texts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
        keys = ("input_ids", "attention_mask") if not siglip else ("input_ids",)
        return {k: encoded[k] for k in keys if k in encoded}

    def image_inputs(self, paths: list[Path]) -> dict:
        images = [hf_sets.load_image(p) for p in paths]
        return {"pixel_values": part(self.processor, "image_processor")(images=images, return_tensors="pt")[
            "pixel_values"]}

    def outputs(self, items: list, decode: Callable, forward: Callable, unit: str) -> list:
        """`forward` of every batch of `items` (decoded by `decode`), timed and counted as `unit`."""
        meter = self.meters[unit]
        out = []
        what = ", ".join(part for part in (self.task, self.label, f"{unit}s") if part)
        for batch in progress(self.loader(items, decode), what, unit="batches"):
            batch = _to(batch, self.device, self.dtype)
            out.append(meter(partial(forward, **batch), len(next(iter(batch.values())))))
        return out

    def embed_texts(self, texts: list[str]) -> Tensor:
        out = self.outputs(texts, self.text_inputs, self.model.get_text_features, "text")
        return torch.nn.functional.normalize(torch.cat([_features(o) for o in out]).float(), dim=-1)

    def embed_images(self, paths: list[Path]) -> Tensor:
        out = self.outputs(paths, self.image_inputs, self.model.get_image_features, "image")
        return torch.nn.functional.normalize(torch.cat([_features(o) for o in out]).float(), dim=-1)


def classify(job: Job, decode: Callable, unit: str) -> dict:
    """top1/top5 of a classifier on the job's labelled set, or mAP where items have several labels;
    `decode` turns a batch of items into the model's inputs."""
    data: hf_sets.LabelledSet = job.dataset
    logits = torch.cat([out.logits.float() for out in job.outputs(data.items, decode, job.model, unit)])
    if data.multilabel:
        return {"map": mean_average_precision(logits.sigmoid(), hf_sets.multi_hot(data.labels, logits.shape[1]))}
    labels = torch.tensor(data.labels)
    return {"top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 5)}


# --- settings and data ---------------------------------------------------------------------------
def check_data(task: str, data_cfg: dict, config_of: Callable[[], object]) -> tuple[dict, object]:
    """The data settings with defaults, and the set's index (files checked, nothing decoded).
    `config_of()` gives the model's config, read only once the data's files are found (a classifier's
    labels are checked against its classes)."""
    spec = specs()[task]
    unknown = sorted(set(data_cfg) - set(spec.data_keys))
    if unknown:
        raise ConfigError(f"task={task}: data.{unknown[0]} is not a setting of this task's data; allowed: "
                          f"{', '.join(spec.data_keys)} (data={'|'.join(spec.data_names)})")
    data = {"batch_size": 32, "num_workers": 0, "max_length": None, **data_cfg}
    check_number("data", "batch_size", data["batch_size"], low=1, integer=True)
    check_number("data", "num_workers", data["num_workers"], low=0, integer=True)
    for key in ("images", "texts", "clips", "max_length"):
        if data.get(key) is not None:
            check_number("data", key, data[key], low=1, integer=True)
    return data, spec.read_data(data, config_of)


def read_labelled(task: str, data: dict, config_of: Callable[[], object], files: dict[str, str],
                  read: Callable[[dict, list[str]], object]):
    """A classifier's labelled set: `files` (setting -> "file" or "folder") checked first, then
    `read(data, class names)` with the data's class names or the model's, whose classes must cover
    the set's."""
    who = f"data ({task.replace('_', ' ')})"
    for key, kind in files.items():
        hf_sets.existing(who, f"data.{key}", data.get(key), kind)
    config = config_of()
    dataset = read(data, data.get("class_names") or label_names(config))
    if len(dataset.class_names) > config.num_labels:
        raise ConfigError(f"task={task}: the data has {len(dataset.class_names)} classes and the model "
                          f"{config.num_labels}; allowed: labels of the model's classes (data.class_names lists them "
                          "in the model's order)")
    return dataset


def label_names(config) -> list[str]:
    """The model's class names in id order (transformers' id2label)."""
    return [str(config.id2label[i]) for i in range(config.num_labels)]


def _towers(task: str, model: nn.Module) -> dict[str, nn.Module]:
    """unit -> the module whose reducer and stats count it."""
    if specs()[task].image_text:
        return {"image": model, "text": model.text_model}
    return {specs()[task].units[0]: model}


def _settings(cfg: DictConfig, task: str, overrides) -> list[tuple[str, dict, str, dict]]:
    """(reducer, params, text reducer, params) of the unreduced model and of the configured one."""
    build_reducer(cfg.reducer, overrides)
    reduced = reducer_spec(cfg.reducer)
    text = reducer_spec(cfg.text_reducer) if cfg.get("text_reducer") is not None else ("none", {})
    if text[0] != "none" and not specs()[task].image_text:
        raise ConfigError(f"task={task}: text_reducer={text[0]} is invalid; allowed: none (the text tower of an "
                          "image-text model is reduced only in task=retrieval and task=zeroshot; reducer reduces this "
                          "task's model)")
    from tokenreduce.reducers import create_reducer

    create_reducer(text[0], **text[1])
    return [("none", {}, "none", {}), (*reduced, *text)]


@dataclass
class TaskSettings:
    """A transformers task's settings, checked before the model loads."""

    rows: list[tuple[str, dict, str, dict]]  # (reducer, params, text reducer, params) of each row
    model: dict  # the model settings with their defaults
    config_of: Callable[[], object]  # the model's transformers config, read once
    data: dict  # the data settings with their defaults
    dataset: object  # the set's index
    dtype: torch.dtype
    device: torch.device


def check_hf_task(cfg: DictConfig, task: str, overrides: list[str] | None = None) -> TaskSettings:
    """Every setting of a transformers task, checked before the model loads."""
    rows = _settings(cfg, task, overrides)
    model_cfg = check_model_config(task, plain(cfg.model))
    check_loggers(plain(cfg.logger))
    config_of = cache(partial(load_config, model_cfg))  # read once: a hub id is looked up online
    data, dataset = check_data(task, plain(cfg.data), config_of)
    mcfg = plain(cfg.measure)
    dtype, _, device = check_measure(mcfg["batch_size"], mcfg["dtype"], mcfg["autocast"], mcfg["device"],
                                     mcfg["warmup"], mcfg["repeats"], probe=True)
    return TaskSettings(rows, model_cfg, config_of, data, dataset, dtype, device)


# --- the run ---------------------------------------------------------------------------------------
def run_task(cfg: DictConfig, task: str, output_dir: Path, overrides: list[str] | None = None,
             checked: TaskSettings | None = None) -> list[dict]:
    """Evaluate the model unreduced and reduced on the task's data; write and print the results.
    `checked`: what `check_hf_task` returned for this configuration, when it has run already."""
    started = time.perf_counter()
    checked = checked or check_hf_task(cfg, task, overrides)
    settings, model_cfg, config_of, data, dataset = (checked.rows, checked.model, checked.config_of, checked.data,
                                                     checked.dataset)
    dtype, device = checked.dtype, checked.device
    torch.manual_seed(cfg.seed)
    model, processor = load_model(task, model_cfg, config_of())
    model.to(device=device, dtype=dtype)
    towers = _towers(task, model)
    text_tower = towers["text"] if specs()[task].image_text else None
    rows = []
    before = load_average()
    with torch.inference_mode():
        for i, (reducer, params, text_reducer, text_params) in enumerate(settings, 1):
            tokenreduce.apply(model, reducer, adapter_options=model_cfg["adapter_options"], **params)
            if text_tower is not None:
                tokenreduce.apply(text_tower, text_reducer, **text_params)
            job = Job(task, model, processor, data, dataset, device, dtype,
                      meters={unit: Meter(tower, device) for unit, tower in towers.items()},
                      label=f"setting {i}/{len(settings)} ({reducer}"
                            f"{'' if text_tower is None else f' / text {text_reducer}'})")
            metrics = specs()[task].evaluate(job)
            row = {"reducer": reducer, "params": params, **metrics}
            if text_tower is not None:
                row.update(text_reducer=text_reducer, text_params=text_params)
            for unit, meter in job.meters.items():
                row.update(meter.summary(unit))
            rows.append(row)
    load = Load.since(before)
    for tower in towers.values():
        tokenreduce.remove(tower)
    _relative(rows)
    protocol = {"task": task, "model": model_cfg["hf"], "class": model_cfg["hf_class"],
                "weights": "pretrained" if model_cfg["pretrained"] else "random", "data": _describe(data, dataset),
                "device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
                "batch_size": data["batch_size"], "seed": cfg.seed, "load": load.as_record()}
    table = markdown_table(task, rows)
    output_dir.mkdir(parents=True, exist_ok=True)
    elapsed = time.perf_counter() - started
    write_new(output_dir / TASKS_JSON, json.dumps({
        "protocol": protocol, "rows": rows, "seconds": round(elapsed, 1),
        "finished": datetime.datetime.now().isoformat(timespec="seconds")}, indent=2) + "\n")
    header = (f"{task}: {protocol['model']} ({protocol['weights']}) on {protocol['data']}; {protocol['device']}, "
              f"{protocol['dtype']}, batch {data['batch_size']}, {protocol['threads']} threads; {load.words()}"
              + (f" ({LOADED} loaded: above the cores + {LOAD_MARGIN:g}, so its speeds are doubtful)" if timing_marks(load.as_record())
                 else ""))
    write_new(output_dir / TASKS_TABLE, f"{header}\n\n{table}\n")
    show(f"{header}\n\n{table}\n\nin {elapsed:.0f} s; results: {output_dir}")
    log_rows(cfg, output_dir, model_cfg.get("name") or Path(model_cfg["hf"]).name, rows)
    return rows


def log_rows(cfg: DictConfig, output_dir: Path, model_name: str, rows: list[dict]) -> None:
    """The numbers of both rows to the run's loggers (CSV, W&B): `baseline/<key>` for the unreduced
    model, `result/<key>` for the reduced one, so a sweep compares runs by `result/...`."""
    reducer, params = reducer_spec(cfg.reducer)
    run_name = cfg.get("run_name") or default_run_name(model_name, reducer, params)
    loggers = build_loggers(plain(cfg.logger), output_dir, run_name)
    try:
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            lg.log_metrics({f"{prefix}/{key}": float(value) for prefix, row in zip(("baseline", "result"), rows, strict=True)
                            for key, value in row.items() if isinstance(value, (int, float)) and value is not None})
    finally:
        finish_loggers(loggers)


def _describe(data: dict, dataset) -> str:
    """The data in words: name, split, resolved files and folders, and what was evaluated; runs whose
    words differ are different protocols in `collect_task_results`."""
    where = " ".join(resolved(data[k]) for k in ("root", "annotations", "path") if data.get(k))
    split = f" {data['split']}" if data.get("split") else ""
    if isinstance(dataset, hf_sets.CaptionSet):
        count = f"{len(dataset.images)} images, {len(dataset.captions)} captions"
    else:
        count = f"{len(dataset.items)} items, {len(dataset.class_names)} classes"
    return f"{data.get('name', 'data')}{split} {where} ({count})"


def _relative(rows: list[dict]) -> None:
    """Speed-up and MAC fraction of every row against the unreduced (first) row, per unit."""
    base = rows[0]
    for row in rows:
        for key in list(row):
            if key.endswith("_per_s") and base.get(key):
                row[f"speedup_{key[:-len('_per_s')]}"] = row[key] / base[key] if row[key] else None
            if key.startswith("gmacs_") and base.get(key):
                row[f"mac_fraction_{key[len('gmacs_'):]}"] = row[key] / base[key]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def markdown_table(task: str, rows: list[dict], lead: tuple[str, ...] = ()) -> str:
    """The rows as a Markdown table: the `lead` columns, the setting, the metrics, then speed and MACs
    per unit."""
    setting = [*lead, "reducer", "params"] + (["text_reducer", "text_params"] if "text_reducer" in rows[0] else [])
    metrics = [k for k in rows[0] if k not in setting and not k.startswith(("gmacs_", "speedup_", "mac_fraction_"))
               and not k.endswith("_per_s")]
    units = specs()[task].units
    speed = [col for unit in units for col in (f"{unit}_per_s", f"speedup_{unit}", f"gmacs_{unit}",
                                               f"mac_fraction_{unit}")]
    names = {**{f"{u}_per_s": f"{u}s/s" for u in units}, **{f"speedup_{u}": f"{u} speed-up" for u in units},
             **{f"gmacs_{u}": f"GMACs/{u}" for u in units}, **{f"mac_fraction_{u}": f"{u} MAC frac." for u in units}}
    columns = setting + metrics + speed
    lines = ["| " + " | ".join(names.get(c, c) for c in columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:  # a reducer's parameters at their defaults are left out
        shown = {**row, "params": non_default_params(row["reducer"], row["params"])}
        if "text_reducer" in row:
            shown["text_params"] = non_default_params(row["text_reducer"], row["text_params"])
        lines.append("| " + " | ".join(_cell(c, shown.get(c), metrics) for c in columns) + " |")
    return "\n".join(lines)


def _cell(column: str, value, metrics: list[str]) -> str:
    """Metrics (fractions, as the project shows them everywhere) with 4 decimals, speed-ups as 1.71x."""
    if isinstance(value, float) and column in metrics:
        return f"{value:.4f}"
    if isinstance(value, float) and column.startswith("speedup_"):
        return f"{value:.2f}x"
    if isinstance(value, float) and column.startswith("mac_fraction_"):
        return f"{value:.3f}"
    return _fmt(value)


PROTOCOL_KEYS = ("task", "model", "class", "weights", "data", "device", "dtype", "batch_size")


def collect_task_results(sweep_dir: str | Path) -> Path | None:
    """One table of a sweep's transformers-task runs (`task_summary.md` in `sweep_dir`): per protocol
    (task, model, data, measuring), its first run's unreduced row, then every run's reduced row with
    its ratios to its own unreduced row. None when the sweep has no such run."""
    sweep_dir = Path(sweep_dir)
    files = sorted(sweep_dir.rglob(TASKS_JSON))
    if not files:
        return None
    groups: dict[tuple, list] = {}
    for file in files:
        result = json.loads(file.read_text())
        key = tuple(str(result["protocol"].get(k)) for k in PROTOCOL_KEYS)
        groups.setdefault(key, []).append((str(file.parent.relative_to(sweep_dir)) or ".", result["rows"]))
    parts = []
    for key, runs in groups.items():
        protocol = dict(zip(PROTOCOL_KEYS, key, strict=True))
        rows = [{"run": runs[0][0], **runs[0][1][0]}] + [{"run": run, **rows[-1]} for run, rows in runs]
        parts.append(f"{protocol['task']}: {protocol['model']} ({protocol['weights']}) on {protocol['data']}; "
                     f"{protocol['device']}, {protocol['dtype']}, batch {protocol['batch_size']}\n\n"
                     f"{markdown_table(protocol['task'], rows, lead=('run',))}")
    return write_new(sweep_dir / TASK_SUMMARY, "\n\n".join(parts) + "\n")
