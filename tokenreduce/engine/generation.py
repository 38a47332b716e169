"""`task=generate`: samples of a diffusion model, unreduced and with each configured reducer, side by side.

The same conditions and seeds go through every setting, batch by batch, the settings interleaved
within each batch (so machine noise hits them alike). Per setting: seconds per image, peak memory,
MACs of the denoiser over the run, fidelity to the unreduced sample of the same seed (PSNR, SSIM);
on the project's Fashion-MNIST model also the class accuracy of the samples by `fmnist_vit` and a
Fréchet distance between `fmnist_vit`'s features of the samples and of test images (not the
Inception FID: another network, another scale). Written: the table (markdown, CSV, JSON), a grid of
samples (the unreduced row above each reduced one, same seeds) and merge maps over the denoising steps.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

import tokenreduce
from tokenreduce.engine.config import plain, settings_of
from tokenreduce.engine.console import progress, show
from tokenreduce.engine.record import csv_table, save_figure, write_new
from tokenreduce.engine.speed import peak_memory, resolve_device, synchronize
from tokenreduce.errors import ConfigError, check_number
from tokenreduce.reducers.base import create_reducer

OWN_MODEL = "fmnist_diffusion"
TABLE_MD, TABLE_CSV, RECORD = "generation.md", "generation.csv", "generation.json"
GRID, MERGE_MAPS = "samples.png", "merge_maps.png"
CSV_COLUMNS = ("reducer", "params", "seconds_per_image", "speedup", "peak_memory_mb", "mac_fraction", "psnr", "ssim",
               "class_accuracy", "frechet_distance")


@dataclass
class GenerateSettings:
    """pipeline: `fmnist_diffusion` (the project's model, its shipped weights or `ckpt_path`'s), or a
              diffusers pipeline: a local folder or a hub id (`DiffusionPipeline.from_pretrained`).
    classes / prompts: the conditions, a list or a text file of one per line; a class-conditional
              model takes classes (fmnist_diffusion: every class when neither is given), a
              text-to-image pipeline prompts.
    samples: samples per condition, with seeds `seed`, `seed + 1`, ... in condition order.
    steps, guidance: the sampler's denoising steps and classifier-free guidance scale.
    size: image height and width for a pipeline that takes them (None: its default).
    reducers: the reduced settings, each {name: reducer, its parameters..., adapter_options: {...}}.
    batch_size: samples per sampler call.
    merge_maps: denoising steps shown per reduced setting in merge_maps.png (0: none).
    reference_images: test images whose `fmnist_vit` features the Fréchet distance compares with.
    grid_samples: samples per row of samples.png."""

    pipeline: str = OWN_MODEL
    classes: list[int] | str | None = None
    prompts: list[str] | str | None = None
    samples: int = 4
    steps: int = 50
    guidance: float = 4.0
    size: int | None = None
    reducers: list[dict] = field(default_factory=list)
    batch_size: int = 16
    merge_maps: int = 6
    reference_images: int = 10000
    grid_samples: int = 10

    def __post_init__(self):
        check_number("generate", "samples", self.samples, low=1, integer=True)
        check_number("generate", "steps", self.steps, low=1, integer=True)
        check_number("generate", "guidance", self.guidance, low=0, finite=True)
        check_number("generate", "batch_size", self.batch_size, low=1, integer=True)
        check_number("generate", "merge_maps", self.merge_maps, low=0, integer=True)
        check_number("generate", "reference_images", self.reference_images, low=2, integer=True)
        check_number("generate", "grid_samples", self.grid_samples, low=1, integer=True)
        if self.size is not None:
            check_number("generate", "size", self.size, low=8, integer=True)
        if not isinstance(self.pipeline, str) or not self.pipeline:
            raise ConfigError(f"generate.pipeline={self.pipeline!r} is invalid; allowed: {OWN_MODEL}, a local "
                              "pipeline folder or a hub id")
        self.classes = _conditions("classes", self.classes, int)
        self.prompts = _conditions("prompts", self.prompts, str)
        if self.classes is not None and self.prompts is not None:
            raise ConfigError("generate.classes and generate.prompts are both set; allowed: one of them")
        if self.pipeline == OWN_MODEL:
            from tokenreduce.models.fmnist_diffusion import NUM_CLASSES

            if self.prompts is not None:
                raise ConfigError(f"generate.prompts is set, but generate.pipeline={OWN_MODEL} is class-conditional; "
                                  "allowed: generate.classes")
            if self.size is not None:
                raise ConfigError(f"generate.size={self.size} is invalid for generate.pipeline={OWN_MODEL} "
                                  "(28x28 images); allowed: null")
            self.classes = list(range(NUM_CLASSES)) if self.classes is None else self.classes
            bad = [c for c in self.classes if not 0 <= c < NUM_CLASSES]
            if bad:
                raise ConfigError(f"generate.classes holds {bad[0]}, which is invalid; allowed: class indices in "
                                  f"[0, {NUM_CLASSES})")
        elif self.classes is None and self.prompts is None:
            raise ConfigError(f"generate.pipeline={self.pipeline} needs conditions; allowed: generate.classes (a "
                              "class-conditional pipeline) or generate.prompts (text-to-image), a list or a file")
        if isinstance(self.reducers, (str, dict)) or not isinstance(self.reducers, list):
            raise ConfigError(f"generate.reducers={self.reducers!r} is invalid; allowed: a list of "
                              "{name: reducer, parameters...}")
        self.reducers = [_reducer_entry(i, entry) for i, entry in enumerate(self.reducers)]

    @property
    def conditions(self) -> list:
        return self.classes if self.classes is not None else self.prompts


def _conditions(key: str, value, kind: type) -> list | None:
    if value is None:
        return None
    if isinstance(value, str):  # a file, one condition per line
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"generate.{key}={value!r} is not a file; allowed: a list, or a text file of one "
                              "per line")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if kind is int:
            bad = [line for line in lines if not line.lstrip("-").isdigit()]
            if bad:
                raise ConfigError(f"generate.classes file {value} holds {bad[0]!r}; allowed: one integer class "
                                  "index per line")
            lines = [int(line) for line in lines]
        value = lines
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"generate.{key}={value!r} is invalid; allowed: a non-empty list, or a file")
    for item in value:
        ok = isinstance(item, int) and not isinstance(item, bool) if kind is int else isinstance(item, str) and item
        if not ok:
            raise ConfigError(f"generate.{key} holds {item!r}, which is invalid; allowed: "
                              f"{'integer class indices' if kind is int else 'non-empty prompts'}")
    return list(value)


def _reducer_entry(index: int, entry) -> dict:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ConfigError(f"generate.reducers[{index}]={entry!r} is invalid; allowed: {{name: reducer, "
                          "parameters...}, e.g. {name: tomesd, ratio: 0.5}")
    params = {k: v for k, v in entry.items() if k not in ("name", "adapter_options")}
    create_reducer(entry["name"], **params)  # an unknown reducer or parameter fails now
    options = entry.get("adapter_options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"generate.reducers[{index}].adapter_options={options!r} is invalid; allowed: a mapping")
    return {"name": entry["name"], "params": params, "adapter_options": dict(options)}


def settings_from(cfg: DictConfig) -> GenerateSettings:
    return settings_of(GenerateSettings, cfg.get("generate"), "generate")


# --- samplers -------------------------------------------------------------------------------------
class Sampler:
    """Images [B, C, H, W] in [0, 1] for conditions, the i-th seeded `seed + i`; `denoiser` is the
    module the reducers go on (what `tokenreduce.apply` is given)."""

    denoiser: nn.Module

    def __call__(self, conditions: list, seed: int) -> Tensor:
        raise NotImplementedError


class OwnSampler(Sampler):
    """The project's Fashion-MNIST DiT with `diffusion_sampling.sample` (DDIM, guidance)."""

    def __init__(self, model: nn.Module, steps: int, guidance: float):
        self.denoiser, self.steps, self.guidance = model, steps, guidance

    def __call__(self, conditions: list, seed: int) -> Tensor:
        from tokenreduce.diffusion_sampling import sample

        images = sample(self.denoiser, conditions, steps=self.steps, guidance=self.guidance, seed=seed)
        return (images.float() + 1) / 2


class PipelineSampler(Sampler):
    """A diffusers pipeline, called with `class_labels` or `prompt`, one CPU generator per sample."""

    def __init__(self, pipe, steps: int, guidance: float, size: int | None, prompts: bool):
        from tokenreduce.adapters.diffusers_models import denoiser_of

        self.pipe, self.steps, self.guidance, self.size, self.prompts = pipe, steps, guidance, size, prompts
        self.denoiser = denoiser_of(pipe)

    def __call__(self, conditions: list, seed: int) -> Tensor:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(conditions))]
        kwargs = {"prompt": conditions} if self.prompts else {"class_labels": conditions}
        if self.size is not None:
            kwargs.update(height=self.size, width=self.size)
        out = self.pipe(**kwargs, num_inference_steps=self.steps, guidance_scale=self.guidance,
                        generator=generators, output_type="pt")
        return out.images.float().clamp(0, 1).cpu()


def build_sampler(settings: GenerateSettings, cfg: DictConfig, device: torch.device) -> Sampler:
    if settings.pipeline == OWN_MODEL:
        from tokenreduce.models.fmnist_diffusion import load_fmnist_diffusion

        model = load_fmnist_diffusion(cfg.get("ckpt_path"), **(plain(cfg.get("diffusion", {})).get("model") or {}))
        return OwnSampler(model.to(device), settings.steps, settings.guidance)
    if cfg.get("ckpt_path") is not None:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} is invalid with generate.pipeline={settings.pipeline}; allowed: "
                          f"null (a pipeline's weights are its own), or generate.pipeline={OWN_MODEL}")
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(settings.pipeline)
    except (OSError, ValueError) as err:
        raise ConfigError(f"generate.pipeline={settings.pipeline!r} cannot be loaded ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:300]}); allowed: {OWN_MODEL}, a local diffusers pipeline "
                          "folder, or a hub id this machine can reach") from None
    pipe.set_progress_bar_config(disable=True)
    return PipelineSampler(pipe.to(device), settings.steps, settings.guidance, settings.size,
                           prompts=settings.prompts is not None)


# --- measuring ------------------------------------------------------------------------------------
@dataclass
class Setting:
    reducer: str
    params: dict
    adapter_options: dict = field(default_factory=dict)
    images: list[Tensor] = field(default_factory=list)  # per batch, [B, C, H, W] in [0, 1]
    seconds: float = 0.0
    peak_mb: float | None = None
    macs: int = 0
    maps: list[tuple[int, Tensor, tuple[int, int]]] = field(default_factory=list)  # (step, slots, grid)
    values: dict = field(default_factory=dict)  # the table's measures

    @contextlib.contextmanager
    def placed(self, denoiser: nn.Module):
        """The setting's reducer on `denoiser` for the block, removed after it (also on an error)."""
        tokenreduce.apply(denoiser, self.reducer, adapter_options=self.adapter_options or None, **self.params)
        try:
            yield
        finally:
            tokenreduce.remove(denoiser)

    @property
    def label(self) -> str:
        from tokenreduce.engine.compare import format_params

        return self.reducer if self.reducer == "none" else f"{self.reducer} {format_params(self.params)}"


class CallRecorder:
    """After each denoiser call: its MACs (per sample, times the samples of the call) and, while
    `maps` is a list, the first merging block's slots of the call's first sample."""

    def __init__(self, denoiser: nn.Module):
        self.denoiser, self.macs, self.maps = denoiser, 0, None
        self.handle = denoiser.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        stats = tokenreduce.stats(self.denoiser)
        blocks = stats.get("blocks") or []
        self.macs += stats["macs"] * self.batch_of(args)
        if self.maps is not None:
            merging = next((b for b in blocks if b.get("slots") is not None), None)
            if merging is not None:
                self.maps.append((len(self.maps), merging["slots"][0].cpu(), tuple(merging["grid"])))

    @staticmethod
    def batch_of(args) -> int:
        return args[0].shape[0] if args and isinstance(args[0], Tensor) else 1


def measure_settings(sampler: Sampler, settings: list[Setting], conditions: list, seed: int, batch_size: int,
                     device: torch.device, record_maps: bool) -> None:
    """Sample every condition with every setting, batch by batch, the settings in turn within a batch,
    after one untimed sample of each setting."""
    batches = [(start, conditions[start:start + batch_size]) for start in range(0, len(conditions), batch_size)]
    denoiser = sampler.denoiser
    for s in settings:  # one untimed sample each first: kernels, allocator pools and caches warm alike
        with s.placed(denoiser):
            sampler(conditions[:1], seed)
    for start, batch in progress(batches, "generate", unit="batches",
                                 note=lambda item: f"{len(settings)} settings of samples {item[0]}..{item[0] + len(item[1]) - 1}"):
        for s in settings:
            with s.placed(denoiser):
                recorder = CallRecorder(denoiser)
                recorder.maps = [] if record_maps and start == 0 and s.reducer != "none" else None
                try:
                    with peak_memory(device) as peak:
                        began = time.perf_counter()
                        images = sampler(batch, seed + start)
                        synchronize(device)
                        s.seconds += time.perf_counter() - began
                finally:
                    recorder.handle.remove()
            s.images.append(images)
            if peak.mb is not None:
                s.peak_mb = max(s.peak_mb or 0.0, peak.mb)
            s.macs += recorder.macs
            if recorder.maps is not None:
                s.maps = recorder.maps


def fidelity(images: Tensor, reference: Tensor) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM of `images` against the unreduced `reference` of the same seeds, both
    [N, C, H, W] in [0, 1]; PSNR is inf where every image is identical."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    psnr = peak_signal_noise_ratio(images, reference, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(images, reference, data_range=1.0)
    return float(psnr.mean()), float(ssim)


def to_uint8(images: Tensor) -> Tensor:
    """[N, 1, H, W] in [0, 1] -> [N, H, W] uint8, as a saved grey image holds them."""
    return (images[:, 0] * 255).round().clamp(0, 255).to(torch.uint8)


class FmnistJudge:
    """`fmnist_vit` (the shipped classifier) on 28x28 grey images: the class accuracy of samples and a
    Fréchet distance between its pre-logit features of samples and of the first `reference_images`
    Fashion-MNIST test images (computed in float64 by torchmetrics)."""

    def __init__(self, reference_images: int, device: torch.device):
        import timm
        from torchmetrics.image.fid import FrechetInceptionDistance

        from tokenreduce.data.fashion_mnist import DEBIAN_ROOT, ShapeImages, load_split
        from tokenreduce.models.fmnist import FMNIST_MEAN, FMNIST_STD

        self.device = device
        self.model = timm.create_model("fmnist_vit", pretrained=True).to(device).eval()
        self.shaper = ShapeImages((1, 32, 32), FMNIST_MEAN, FMNIST_STD, "pad").to(device)
        self.fid = FrechetInceptionDistance(feature=_Features(self), reset_real_features=False, normalize=True)
        self.fid.set_dtype(torch.float64)
        images, _ = load_split(DEBIAN_ROOT, "test")
        for chunk in images[:reference_images].split(500):
            self.fid.update(chunk.unsqueeze(1).float() / 255, real=True)

    @torch.no_grad()
    def features(self, uint8_images: Tensor) -> Tensor:
        x = self.shaper(uint8_images.to(self.device))
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    @torch.no_grad()
    def accuracy(self, images: Tensor, classes: list[int]) -> float:
        logits = torch.cat([self.model(self.shaper(to_uint8(chunk).to(self.device))) for chunk in images.split(256)])
        return float((logits.argmax(-1).cpu() == torch.as_tensor(classes)).float().mean())

    def frechet(self, images: Tensor) -> float:
        self.fid.reset()  # the test images' statistics stay
        for chunk in images.split(256):
            self.fid.update(to_uint8(chunk).unsqueeze(1).float() / 255, real=False)
        return float(self.fid.compute())


class _Features(nn.Module):
    """fmnist_vit's pre-logit features of [N, 1, 28, 28] images in [0, 1] (on the uint8 grid)."""

    def __init__(self, judge: FmnistJudge):
        super().__init__()
        self.judge = [judge]  # not a sub-module: torchmetrics must not move or copy the classifier
        self.num_features = judge.model.num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.judge[0].features(to_uint8(images)).double()


# --- the run --------------------------------------------------------------------------------------
def run_generate(cfg: DictConfig, settings_cfg: GenerateSettings, output_dir: Path) -> list[Setting]:
    device = resolve_device(cfg.measure.get("device", "auto"))
    sampler = build_sampler(settings_cfg, cfg, device)
    settings = [Setting("none", {})] + [Setting(r["name"], r["params"], r["adapter_options"])
                                        for r in settings_cfg.reducers]
    for s in settings[1:]:  # every reducer fits the model before any sample is drawn
        with s.placed(sampler.denoiser):
            pass
    own = settings_cfg.pipeline == OWN_MODEL
    judge = FmnistJudge(settings_cfg.reference_images, device) if own else None
    conditions = [c for c in settings_cfg.conditions for _ in range(settings_cfg.samples)]
    measure_settings(sampler, settings, conditions, cfg.seed, settings_cfg.batch_size, device,
                     record_maps=settings_cfg.merge_maps > 0)
    base = settings[0]
    reference = torch.cat(base.images)
    for s in settings:
        images = torch.cat(s.images)
        s.values = {"seconds_per_image": s.seconds / len(conditions), "peak_memory_mb": s.peak_mb,
                    "speedup": base.seconds / s.seconds if s.seconds else None,
                    "mac_fraction": s.macs / base.macs if base.macs else None,
                    "psnr": None, "ssim": None, "class_accuracy": None, "frechet_distance": None}
        if s is not base:
            s.values["psnr"], s.values["ssim"] = fidelity(images, reference)
        if judge is not None:
            s.values["class_accuracy"] = judge.accuracy(images, conditions)
            # a covariance needs two samples at least
            s.values["frechet_distance"] = judge.frechet(images) if len(images) > 1 else None
    protocol = (f"generate: {len(conditions)} samples ({settings_cfg.samples} per condition, seeds {cfg.seed}.."
                f"{cfg.seed + len(conditions) - 1}) of {settings_cfg.pipeline}, {settings_cfg.steps} steps, guidance "
                f"{settings_cfg.guidance:g}, batches of {settings_cfg.batch_size} with the settings in turn, on "
                f"{device.type}")
    if judge is not None:
        protocol += (f"; class accuracy by fmnist_vit; Fréchet distance in fmnist_vit's features against the first "
                     f"{settings_cfg.reference_images} test images (not Inception FID)")
    table = markdown_table(settings, own)
    show(f"{protocol}\n\n{table}")
    write_new(output_dir / TABLE_MD, f"{protocol}\n\n{table}\n")
    write_new(output_dir / TABLE_CSV, csv_text(settings))
    write_new(output_dir / RECORD, json.dumps({
        "task": "generate", "protocol": protocol, "pipeline": settings_cfg.pipeline,
        "conditions": settings_cfg.conditions, "samples": settings_cfg.samples, "steps": settings_cfg.steps,
        "guidance": settings_cfg.guidance, "seed": cfg.seed, "device": str(device), "rows": rows(settings),
        "finished": datetime.datetime.now().isoformat(timespec="seconds")}, indent=2, default=str))
    save_figure(sample_grid(settings, settings_cfg.grid_samples, conditions), output_dir / GRID)
    if settings_cfg.merge_maps and any(s.maps for s in settings):
        save_figure(merge_map_figure(settings, settings_cfg.merge_maps), output_dir / MERGE_MAPS)
    show(f"results: {output_dir / TABLE_MD}, {output_dir / GRID}")
    return settings


def _fmt(value, pattern: str) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else format(value, pattern)


def markdown_table(settings: list[Setting], own: bool) -> str:
    head = "| reducer | params | s/image | speed-up | peak memory MB | MAC fraction | PSNR dB | SSIM |"
    rule = "|---|---|---:|---:|---:|---:|---:|---:|"
    if own:
        head += " class accuracy | Fréchet distance (fmnist_vit) |"
        rule += "---:|---:|"
    from tokenreduce.engine.compare import format_params

    lines = [head, rule]
    for s in settings:
        v = s.values
        line = (f"| {s.reducer} | {format_params(s.params)} | {_fmt(v['seconds_per_image'], '.3f')} | "
                f"{'-' if s.reducer == 'none' else _fmt(v['speedup'], '.2f') + 'x'} | {_fmt(v['peak_memory_mb'], '.0f')} | "
                f"{_fmt(v['mac_fraction'], '.3f')} | {_fmt(v['psnr'], '.2f')} | {_fmt(v['ssim'], '.4f')} |")
        if own:
            line += f" {_fmt(v['class_accuracy'], '.4f')} | {_fmt(v['frechet_distance'], '.2f')} |"
        lines.append(line)
    return "\n".join(lines)


def rows(settings: list[Setting]) -> list[dict]:
    return [{"reducer": s.reducer, "params": s.params, **s.values} for s in settings]


def csv_text(settings: list[Setting]) -> str:
    return csv_table(rows(settings), CSV_COLUMNS)


# --- figures --------------------------------------------------------------------------------------
def _display(image: Tensor):
    """[C, H, W] in [0, 1] -> an array matplotlib shows (grey for one channel)."""
    return image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()


def sample_grid(settings: list[Setting], count: int, conditions: list):
    """The first `count` samples (spread over the conditions) of every setting: the unreduced row on
    top, a row per reduced setting below, same seeds in a column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = len(conditions)
    columns = sorted({round(i * total / min(count, total)) for i in range(min(count, total))})
    figure, axes = plt.subplots(len(settings), len(columns), squeeze=False,
                                figsize=(1.1 * len(columns) + 2.2, 1.1 * len(settings) + 0.4))
    for row, s in enumerate(settings):
        images = torch.cat(s.images)
        for col, index in enumerate(columns):
            ax = axes[row][col]
            ax.imshow(_display(images[index]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(str(conditions[index])[:18], fontsize=7)
        axes[row][0].set_ylabel(s.label, fontsize=7, rotation=0, ha="right", va="center")
    figure.tight_layout()
    return figure


def merge_map_figure(settings: list[Setting], count: int):
    """Per reduced setting, the first sample's merge groups in the first merging block at `count`
    denoising steps: tokens merged together share the mean colour of the final sample over them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokenreduce.viz.merge_maps import patch_colours

    shown = [s for s in settings if s.maps]
    steps = len(shown[0].maps)
    picks = sorted({round(i * (steps - 1) / max(count - 1, 1)) for i in range(min(count, steps))})
    figure, axes = plt.subplots(len(shown), len(picks), squeeze=False,
                                figsize=(1.3 * len(picks) + 2.2, 1.3 * len(shown) + 0.4))
    for row, s in enumerate(shown):
        image = _display(s.images[0][0])
        for col, pick in enumerate(picks):
            ax = axes[row][col]
            if pick < len(s.maps):
                step, slots, grid = s.maps[pick]
                fits = image.shape[0] % grid[0] == 0 and image.shape[1] % grid[1] == 0
                colours = patch_colours(slots, grid, image if fits else None, colouring="mean" if fits else "palette")
                ax.imshow(colours, interpolation="nearest")
                if row == 0:
                    ax.set_title(f"step {step}", fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
        axes[row][0].set_ylabel(s.label, fontsize=7, rotation=0, ha="right", va="center")
    figure.tight_layout()
    return figure


def check_generate(cfg: DictConfig) -> GenerateSettings:
    """The settings, checked before anything is built: also the device and the measure section."""
    settings = settings_from(cfg)
    resolve_device(cfg.measure.get("device", "auto"))
    return settings

