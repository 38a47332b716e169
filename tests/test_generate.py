"""task=generate (engine/generation.py): samples unreduced and reduced side by side, on the project's
Fashion-MNIST DiT (tiny, random weights here) and on a diffusers pipeline saved locally."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import cli

import tokenreduce
from tokenreduce.diffusion_sampling import sample
from tokenreduce.engine.diffusion_module import DiffusionModule
from tokenreduce.engine.generation import (
    FmnistJudge,
    GenerateSettings,
    fidelity,
    merge_map_figure,
    sample_grid,
    to_uint8,
)
from tokenreduce.errors import ConfigError
from tokenreduce.models.fmnist_diffusion import create_fmnist_diffusion, load_fmnist_diffusion, noise_schedule

pytestmark = pytest.mark.usefixtures("no_wandb", "clean_hydra")

TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A task=train_diffusion-like checkpoint of a tiny random model: its EMA differs from its weights."""
    torch.manual_seed(0)
    module = DiffusionModule(create_fmnist_diffusion(**TINY), noise_schedule("train"), ema_decay=0.5)
    with torch.no_grad():
        for p in module.ema.module.parameters():
            p.add_(0.01)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    saved = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(saved)
    torch.save(saved, path)
    return path, module


def generate(monkeypatch, tmp_path, ckpt, *args):
    out = tmp_path / "run"
    cli(monkeypatch, "task=generate", f"ckpt_path={ckpt}", "generate.steps=3", "generate.samples=1",
        "generate.reference_images=100", f"hydra.run.dir={out}", *args)
    return out, json.loads((out / "generation.json").read_text())


# --- loading the project's model -------------------------------------------------------------------
def test_load_takes_the_checkpoints_ema_and_architecture(checkpoint):
    path, module = checkpoint
    model = load_fmnist_diffusion(path)  # no overrides: the architecture comes from the checkpoint
    assert model.config.num_layers == 2 and not model.training
    for (name, p), q in zip(model.state_dict().items(), module.ema.module.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(next(model.parameters()), next(module.model.parameters()))


def test_load_refuses_missing_and_foreign_files(tmp_path, checkpoint):
    with pytest.raises(ConfigError, match="is not a file"):
        load_fmnist_diffusion(tmp_path / "nothing.ckpt")
    with pytest.raises(ConfigError, match="does not fit model fmnist_diffusion"):
        load_fmnist_diffusion(checkpoint[0], num_layers=3)


# --- settings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"samples": 0}, "samples=0 is invalid"),
    ({"steps": 1.5}, "steps=1.5 is invalid"),
    ({"classes": [3, 10]}, "holds 10, which is invalid"),
    ({"classes": [True]}, "holds True"),
    ({"prompts": ["a coat"]}, "class-conditional"),
    ({"size": 64}, "size=64 is invalid"),
    ({"reducers": {"name": "tomesd"}}, "generate.reducers="),
    ({"reducers": [{"ratio": 0.5}]}, r"generate.reducers\[0\]"),
    ({"reducers": [{"name": "tomesd", "ratio": 2}]}, "ratio"),
    ({"reducers": [{"name": "nosuch"}]}, "nosuch"),
    ({"pipeline": "some/pipe"}, "needs conditions"),
    ({"pipeline": "some/pipe", "classes": [1], "prompts": ["x"]}, "both set"),
])
def test_settings_refuse_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GenerateSettings(**kwargs)


def test_settings_defaults_and_condition_files(tmp_path):
    assert GenerateSettings().conditions == list(range(10))
    classes = tmp_path / "classes.txt"
    classes.write_text("3\n\n7\n")
    assert GenerateSettings(classes=str(classes)).conditions == [3, 7]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red coat\n a bag \n")
    assert GenerateSettings(pipeline="local/pipe", prompts=str(prompts)).conditions == ["a red coat", "a bag"]
    classes.write_text("3\nseven\n")
    with pytest.raises(ConfigError, match="'seven'"):
        GenerateSettings(classes=str(classes))
    with pytest.raises(ConfigError, match="is not a file"):
        GenerateSettings(classes=str(tmp_path / "none.txt"))


# --- measures --------------------------------------------------------------------------------------
def test_fidelity_by_hand():
    a = torch.full((2, 1, 16, 16), 0.5)
    psnr, ssim = fidelity(a.clone(), a)
    assert math.isinf(psnr) and ssim == pytest.approx(1.0)
    psnr, _ = fidelity(a + 0.1, a)  # MSE 0.01 on a range of 1: 20 dB
    assert psnr == pytest.approx(20.0, abs=1e-3)
    b = a.clone()
    b[1] += 0.01  # per-image PSNR, then the mean: (inf-free) 20 and 40 dB
    psnr, _ = fidelity(torch.cat([a[:1] + 0.1, b[1:]]), a)
    assert psnr == pytest.approx(30.0, abs=1e-3)


def test_to_uint8_rounds_as_a_saved_image():
    x = torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1]).view(1, 1, 1, 5)
    assert to_uint8(x).tolist() == [[[0, 128, 255, 255, 0]]]


PEAKS = """
import torch
from tokenreduce.engine.speed import peak_memory
freed = [torch.ones(2**20) for _ in range(100)]  # 400 MB allocated and freed first: the heap may keep it
del freed
for megabytes in (200, 40):
    with peak_memory(torch.device("cpu")) as peak:
        held = [torch.ones(2**18) for _ in range(megabytes)]  # 1 MB each
        del held
    print(round(peak.mb))
"""


def test_peak_memory_sees_what_a_block_allocates():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", PEAKS], check=True, capture_output=True, text=True).stdout.split()
    assert 190 <= int(out[0]) <= 215 and 35 <= int(out[1]) <= 55


def test_judge_classifies_test_images_and_measures_distance():
    from tokenreduce.data.fashion_mnist import DEBIAN_ROOT, load_split

    judge = FmnistJudge(300, torch.device("cpu"))
    images, labels = load_split(DEBIAN_ROOT, "test")
    real = images[:300].unsqueeze(1).float() / 255
    assert judge.accuracy(real, labels[:300].tolist()) > 0.8
    noise = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    close, far = judge.frechet(real), judge.frechet(noise)
    assert -1e-6 < close < far / 10  # the same images: zero up to rounding


def test_stats_give_each_merging_blocks_slots_and_grid():
    model = create_fmnist_diffusion(**TINY).eval()
    x, t, c = torch.randn(3, 1, 28, 28), torch.tensor([500] * 3), torch.tensor([1, 2, 10])
    tokenreduce.apply(model, "tomesd", ratio=0.5)
    model(x, t, class_labels=c)
    for block in tokenreduce.stats(model)["blocks"]:
        assert block["grid"] == (14, 14)
        slots = block["slots"]
        assert slots.shape == (3, 196) and int(slots.max()) == block["attn"] - 1
        assert torch.bincount(slots[0]).min() >= 1  # every slot holds a token
    tokenreduce.remove(model)
    tokenreduce.apply(model, "none")
    model(x, t, class_labels=c)
    assert all(b["slots"] is None for b in tokenreduce.stats(model)["blocks"])


# --- the task ------------------------------------------------------------------------------------
def test_generate_on_the_projects_model(monkeypatch, tmp_path, checkpoint):
    path, _ = checkpoint
    out, record = generate(monkeypatch, tmp_path, path, "generate.classes=[0,3,7]", "generate.samples=2",
                           "generate.batch_size=4",
                           "generate.reducers=[{name: tomesd, ratio: 0.5}, {name: tomesd, ratio: 0.0}, "
                           "{name: todo, downsample: 2}]")
    rows = record["rows"]
    assert [r["reducer"] for r in rows] == ["none", "tomesd", "tomesd", "todo"]
    none, half, zero, todo = rows
    assert none["psnr"] is None and none["mac_fraction"] == 1.0
    assert math.isinf(zero["psnr"]) and zero["ssim"] == pytest.approx(1.0) and zero["mac_fraction"] == 1.0
    assert half["mac_fraction"] < 0.8 and todo["mac_fraction"] < 1.0
    assert 0 < half["ssim"] < 1 and half["psnr"] > 0
    for row in rows:
        assert 0 <= row["class_accuracy"] <= 1 and row["frechet_distance"] > 0
        assert row["seconds_per_image"] > 0 and row["speedup"] > 0
    assert record["conditions"] == [0, 3, 7] and record["seed"] == 0
    for name in ("generation.md", "samples.png", "merge_maps.png", "tokenreduce.log"):
        assert (out / name).is_file(), name
    with open(out / "generation.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and json.loads(table[1]["params"]) == {"ratio": 0.5}
    assert "Fréchet distance (fmnist_vit)" in (out / "generation.md").read_text()


def test_generate_samples_do_not_depend_on_the_batch(monkeypatch, tmp_path, checkpoint):
    """Batches of 2 and of 5 give the unreduced samples of `sample` itself, seed + i for sample i."""
    path, _ = checkpoint
    model = load_fmnist_diffusion(path)
    classes = [1, 1, 4, 4, 9, 9]
    expected = (sample(model, classes, steps=3, guidance=4.0, seed=5) + 1) / 2
    from tokenreduce.engine.generation import OwnSampler, Setting, measure_settings

    for batch_size in (2, 5):
        base, merged = Setting("none", {}), Setting("tomesd", {"ratio": 0.5})
        measure_settings(OwnSampler(model, 3, 4.0), [base, merged], classes, 5, batch_size,
                         torch.device("cpu"), record_maps=True)
        assert torch.allclose(torch.cat(base.images), expected, atol=1e-4)  # batched GEMMs round apart
        assert len(merged.maps) == 3 and not base.maps  # a map per denoising step of the first batch
        assert merged.maps[0][1].shape == (196,) and merged.maps[0][2] == (14, 14)
    assert tokenreduce.reducer_of(model) is None  # every setting removed after its batch


def test_figures_have_a_row_per_setting(checkpoint):
    from tokenreduce.engine.generation import OwnSampler, Setting, measure_settings

    model = load_fmnist_diffusion(checkpoint[0])
    settings = [Setting("none", {}), Setting("tomesd", {"ratio": 0.5}), Setting("todo", {"downsample": 2})]
    measure_settings(OwnSampler(model, 4, 4.0), settings, [0, 1, 2], 0, 3, torch.device("cpu"), True)
    grid = sample_grid(settings, 2, [0, 1, 2])
    assert len(grid.axes) == 3 * 2
    maps = merge_map_figure(settings, 3)
    assert len(maps.axes) == 1 * 3  # todo merges nothing: no row of its own


def test_generate_refuses_before_sampling(monkeypatch, tmp_path, checkpoint, capsys):
    with pytest.raises(SystemExit):
        cli(monkeypatch, "task=generate", f"ckpt_path={checkpoint[0]}",
            "generate.reducers=[{name: evit, ratio: 0.7}]", f"hydra.run.dir={tmp_path / 'a'}")
    assert "evit" in capsys.readouterr().err
    assert not (tmp_path / "a" / "generation.json").exists()
    with pytest.raises(SystemExit):
        cli(monkeypatch, "task=generate", "+generate.nosuch=1", f"hydra.run.dir={tmp_path / 'b'}")
    assert "generate.nosuch is not a setting" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(monkeypatch, "task=generate", "reducer=tome", f"hydra.run.dir={tmp_path / 'c'}")
    assert "reducer=tome is not used by task=generate" in capsys.readouterr().err


def test_generate_after_train_diffusion(monkeypatch, tmp_path):
    """The workflow: a (tiny) train_diffusion run, then generate from its last checkpoint."""
    cli(monkeypatch, "experiment=train_fmnist_diffusion", "trainer.max_steps=1", "trainer.accelerator=cpu",
        "trainer.precision=32-true", "trainer.val_check_interval=1", "trainer.limit_val_batches=1",
        "data.batch_size=4", "data.eval_batch_size=4", "data.val_size=8", "diffusion.model.num_layers=1",
        "diffusion.model.num_attention_heads=2", "diffusion.model.attention_head_dim=16",
        "diffusion.samples.per_class=0", "diffusion.optim.warmup_steps=1", f"hydra.run.dir={tmp_path / 'train'}")
    _, record = generate(monkeypatch, tmp_path, tmp_path / "train" / "checkpoints" / "last.ckpt",
                         "generate.classes=[2]", "generate.reducers=[{name: tome, r: 40, prop_attn: false}]")
    assert [r["reducer"] for r in record["rows"]] == ["none", "tome"]
    assert record["rows"][1]["mac_fraction"] < 1
    assert record["rows"][0]["frechet_distance"] is None  # one sample has no covariance


# --- a diffusers pipeline ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit_pipeline(tmp_path_factory):
    """A tiny class-conditional DiTPipeline (random weights) saved as a local folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(sample_size=8, in_channels=4, out_channels=4, patch_size=2,
                                        num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                        num_embeds_ada_norm=1000, norm_num_groups=8)  # DiTPipeline's null class is 1000
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, sample_size=8)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    path = tmp_path_factory.mktemp("pipe") / "tiny_dit"
    pipe.save_pretrained(path)
    return path


def test_generate_on_a_local_pipeline(monkeypatch, tmp_path, dit_pipeline):
    out = tmp_path / "run"
    cli(monkeypatch, "task=generate", f"generate.pipeline={dit_pipeline}", "generate.classes=[0,4]",
        "generate.samples=2", "generate.steps=3", "generate.batch_size=3",
        "generate.reducers=[{name: tomesd, ratio: 0.5}, {name: tomesd, ratio: 0.0}]", f"hydra.run.dir={out}")
    rows = json.loads((out / "generation.json").read_text())["rows"]
    none, half, zero = rows
    assert none["class_accuracy"] is None and none["frechet_distance"] is None
    assert math.isinf(zero["psnr"]) and half["mac_fraction"] < 1
    text = (out / "generation.md").read_text()
    assert "class accuracy" not in text and "| tomesd | ratio=0.5 |" in text


def test_a_pipeline_refuses_a_checkpoint_and_a_missing_folder(monkeypatch, tmp_path, dit_pipeline, capsys,
                                                              checkpoint):
    with pytest.raises(SystemExit):
        cli(monkeypatch, "task=generate", f"generate.pipeline={dit_pipeline}", "generate.classes=[0]",
            f"ckpt_path={checkpoint[0]}", f"hydra.run.dir={tmp_path / 'a'}")
    assert "is invalid with generate.pipeline" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(monkeypatch, "task=generate", f"generate.pipeline={tmp_path / 'nothing'}", "generate.classes=[0]",
            f"hydra.run.dir={tmp_path / 'b'}")
    assert "cannot be loaded" in capsys.readouterr().err
