"""The Hydra configuration: every file composes, every group builds, reducer files match the registry."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import OmegaConf
from PIL import Image
from test_fashion_mnist import tiny_dataset
from timm.models.vision_transformer import VisionTransformer

import tokenreduce
from tokenreduce.adapters import adapter_for
from tokenreduce.engine.config import (
    build_reducer,
    compose,
    config_files_dir,
    config_source,
    default_run_name,
    reducer_spec,
)
from tokenreduce.engine.hf_tasks import check_model_config, specs
from tokenreduce.engine.loggers import build_loggers, has_wandb_key, wandb_mode
from tokenreduce.engine.run import build_model, build_trainer, check_task, resolve_precision
from tokenreduce.engine.sweeps import baselines, grid
from tokenreduce.engine.tasks import available
from tokenreduce.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def presets() -> list[str]:
    """The reducer group's presets: a registered reducer's file with some parameters set (`defaults`)."""
    return [n for n in options("reducer") if "defaults" in yaml.safe_load((CONF / "reducer" / f"{n}.yaml").read_text())]


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home"))
    yield
    GlobalHydra.instance().clear()


def test_config_source_is_the_repository_conf_in_a_checkout():
    # in a source checkout (PYTHONPATH) the package tokenreduce.conf is not importable
    assert Path(config_source()) == CONF or config_source() == "pkg://tokenreduce.conf"
    assert (config_files_dir() / "config.yaml").is_file()
    assert config_files_dir().resolve() == CONF.resolve()


# --- experiments -----------------------------------------------------------------------------
REQUIRED_EXPERIMENTS = ("tome_vit_b", "pitome_vit_b", "tofu_vit_b", "mctf_deit_s", "evit_deit_s", "baseline_vit_b",
                        "finetune_tome_deit_s", "finetune_mctf_deit_s")


def test_required_experiments_exist():
    assert set(REQUIRED_EXPERIMENTS) <= set(options("experiment"))


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_composes(name):
    cfg = compose([f"experiment={name}"])
    assert cfg.task in available()
    reducer, params = reducer_spec(cfg.reducer)
    assert (CONF / "reducer" / f"{reducer}.yaml").is_file()
    assert cfg.model.name and cfg.data.batch_size >= 1
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_builds_its_reducer_and_model(name):
    cfg = compose([f"experiment={name}"])
    reducer_name, _ = reducer_spec(cfg.reducer)
    if reducer_name not in tokenreduce.available():
        pytest.skip(f"reducer {reducer_name!r} is not registered in this installation")
    reducer = build_reducer(cfg.reducer)
    if cfg.task in specs():  # hub weights: the model settings fit the task (tests/test_hf_tasks.py runs them)
        pytest.importorskip("transformers", reason="the transformers tasks need the hf extra")
        check_model_config(cfg.task, OmegaConf.to_container(cfg.model))
        return
    model = build_model({**OmegaConf.to_container(cfg.model), "pretrained": False, "checkpoint": None})
    tokenreduce.apply(model, reducer)  # the schedule fits the model
    assert isinstance(model, VisionTransformer)


def test_experiment_overrides_its_groups():
    cfg = compose(["experiment=tome_vit_b"])
    assert cfg.model.name.startswith("vit_base_patch16_224")
    assert cfg.reducer.name == "tome" and cfg.reducer.r == 13
    assert cfg.data.name == "imagenet"
    ft = compose(["experiment=finetune_tome_deit_s"])
    assert ft.task == "finetune" and ft.model.drop_path_rate == 0.1 and ft.loss.mixup == 0.8
    mctf = compose(["experiment=finetune_mctf_deit_s"])
    assert mctf.reducer.consistency_weight == 3.0 and mctf.loss.reducer_losses


def test_unknown_experiment_lists_the_available_ones():
    with pytest.raises(MissingConfigException) as err:
        compose(["experiment=no_such_experiment"])
    assert "no_such_experiment" in str(err.value)
    assert "tome_vit_b" in str(err.value)


# --- reducer files match the registry ----------------------------------------------------------
def _as_yaml_value(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", sorted(set(tokenreduce.available()) | set(options("reducer")) - set(presets())))
def test_reducer_file_matches_the_registered_parameters(name):
    path = CONF / "reducer" / f"{name}.yaml"
    if name not in tokenreduce.available():
        pytest.skip(f"{path.name} names a reducer that is not registered in this installation")
    assert path.is_file(), f"reducer {name!r} is registered but has no conf/reducer/{name}.yaml"
    data = yaml.safe_load(path.read_text())
    assert data.pop("name") == name
    defaults = tokenreduce.reducer_defaults(name)
    assert list(data) == list(defaults), f"conf/reducer/{name}.yaml keys differ from the parameters of {name!r}"
    assert data == {k: _as_yaml_value(v) for k, v in defaults.items()}, "the file must hold the defaults"


@pytest.mark.parametrize("name", [n for n in options("reducer") if n not in presets()])
def test_reducer_group_builds(name):
    if name not in tokenreduce.available():
        pytest.skip(f"reducer {name!r} is not registered in this installation")
    reducer = build_reducer(compose([f"reducer={name}"]).reducer)
    assert reducer.name == name


@pytest.mark.parametrize("name", presets())
def test_a_reducer_preset_is_its_reducers_file_then_some_of_its_parameters(name):
    data = yaml.safe_load((CONF / "reducer" / f"{name}.yaml").read_text())
    [reducer, last] = data.pop("defaults")
    assert last == "_self_" and reducer in tokenreduce.available() and "name" not in data
    defaults = tokenreduce.reducer_defaults(reducer)
    assert data and set(data) <= set(defaults), f"{name}: sets what is not a parameter of {reducer}"
    assert all(data[k] != _as_yaml_value(defaults[k]) for k in data), f"{name}: sets a parameter to its default"
    built, params = reducer_spec(compose([f"reducer={name}"]).reducer)
    assert built == reducer and params == {**{k: _as_yaml_value(v) for k, v in defaults.items()}, **data}
    build_reducer(compose([f"reducer={name}"]).reducer)
    assert reducer_spec(compose([f"reducer@text_reducer={name}"]).text_reducer) == (built, params)


def test_misspelt_reducer_key_is_an_error():
    with pytest.raises(ConfigCompositionException, match="rr"):
        compose(["reducer=tome", "reducer.rr=4"])
    cfg = compose(["reducer=tome", "+reducer.rr=4"])  # added on purpose past Hydra's check
    with pytest.raises(ConfigError, match="rr.*allowed: r, inflect"):
        build_reducer(cfg.reducer)


def test_unregistered_reducer_name_is_an_error():
    with pytest.raises(ConfigError, match="no_such.*not registered"):
        build_reducer({"name": "no_such"})
    with pytest.raises(ConfigError, match="'name'"):
        build_reducer({"r": 3})


NOT_GIVEN = "r=13 was not given on the command line (the experiment or a config file set it): drop it with ~reducer.r"


@pytest.mark.parametrize("overrides, message", [
    (["experiment=tome_vit_b", "reducer.ratio=0.3"], f"tome: give either r=13 or ratio=0.3, not both; {NOT_GIVEN}"),
])
def test_reducer_error_names_what_the_command_line_did_not_give(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_reducer(compose(overrides).reducer, overrides)
    assert str(err.value) == message
    build_reducer(compose([*overrides, "~reducer.r"]).reducer, overrides)  # the way out it gives works
    with pytest.raises(ConfigError) as err:  # where the values came from unknown: no guess
        build_reducer(compose(overrides).reducer)
    assert "command line" not in str(err.value)


def test_reducer_error_does_not_blame_the_experiment_for_the_command_line():
    overrides = ["experiment=tome_vit_b", "reducer.layers=abc"]  # wrong with or without the experiment's r
    with pytest.raises(ConfigError) as err:
        build_reducer(compose(overrides).reducer, overrides)
    assert str(err.value) == "tome: layers='abc' is invalid; allowed: a list of integers >= 0"
    overrides = ["experiment=tome_vit_b", "reducer.r=2", "reducer.ratio=0.3"]  # both given: no hint
    with pytest.raises(ConfigError) as err:
        build_reducer(compose(overrides).reducer, overrides)
    assert str(err.value) == "tome: give either r=2 or ratio=0.3, not both"


def tokenreduce_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", "tokenreduce", *args, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)


def test_cli_reports_an_experiment_parameter_in_one_line(tmp_path):
    done = tokenreduce_cli(tmp_path, "experiment=tome_vit_b", "reducer.ratio=0.3")  # the command line reaches it
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip() == f"tokenreduce: error: tome: give either r=13 or ratio=0.3, not both; {NOT_GIVEN}"


# --- the other groups --------------------------------------------------------------------------
@pytest.mark.parametrize("name", options("model"))
def test_model_group_builds(name):
    cfg = compose([f"model={name}"]).model
    if "hf" in cfg:  # a transformers model: its class at its default size, on the meta device (no memory)
        transformers = pytest.importorskip("transformers", reason="the transformers models need the hf extra")
        cls = getattr(transformers, cfg.hf_class)
        with torch.device("meta"):
            model = cls(cls.config_class())
        adapter_for(model).describe(model)
        return
    model = build_model({**OmegaConf.to_container(cfg), "pretrained": False})
    adapter_for(model).describe(model)  # a family tokenreduce reduces, every detail supported
    assert model.default_cfg["architecture"] == cfg.name.split(".")[0]


def test_model_checkpoint_file_loads_local_weights(tmp_path):
    source = build_model({"name": "test_vit", "pretrained": False})
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    model = build_model({"name": "test_vit", "pretrained": False, "checkpoint": str(tmp_path / "weights.pth")})
    for (key, a), b in zip(source.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    # like pretrained weights: another number of classes keeps the backbone and makes a new head
    new_head = build_model({"name": "test_vit", "num_classes": 10, "checkpoint": str(tmp_path / "weights.pth")})
    assert new_head.head.out_features == 10
    assert torch.equal(new_head.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    with pytest.raises(ConfigError, match="model.checkpoint=.*missing.pth"):
        build_model({"name": "test_vit", "checkpoint": str(tmp_path / "missing.pth")})
    with pytest.raises(ConfigError, match="model.name='no_such_vit'"):
        build_model({"name": "no_such_vit"})
    with pytest.raises(ConfigError, match="model.colour"):
        build_model({"name": "test_vit", "colour": 1})


def _image_folder(root: Path, classes=("a", "b", "c"), per_class=2, size=40) -> Path:
    for split in ("train", "val"):
        for i, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(per_class):
                Image.new("RGB", (size, size), (40 * i, 20 * j, 100)).save(folder / f"{j}.png")
    return root


# the transformers tasks' data settings are read by their task (tests/test_hf_tasks.py), not instantiated
@pytest.mark.parametrize("name", sorted(set(options("data")) - {n for spec in specs().values() for n in spec.data_names}))
def test_data_group_builds(name, tmp_path):
    overrides = [f"data={name}", "data.num_workers=0"]
    if name == "fashion_mnist":
        overrides += [f"data.root={tiny_dataset(tmp_path / 'fm')}", "data.val_size=2"]
    elif name != "synthetic":
        overrides.append(f"data.root={_image_folder(tmp_path)}")
    cfg = compose(overrides).data
    datamodule = instantiate(cfg, _convert_="all")
    assert isinstance(datamodule, L.LightningDataModule)
    classes = 10 if name == "fashion_mnist" else 3
    model = build_model({"name": "test_vit", "img_size": 32, "num_classes": classes})
    datamodule.check("fit")
    datamodule.bind_model(model)
    datamodule.setup("fit")
    images, labels = next(iter(datamodule.val_dataloader()))
    assert images.shape[1:] == (3, 32, 32)
    assert int(labels.max()) < classes


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_group_builds(name, tmp_path):
    cfg = OmegaConf.to_container(compose([f"trainer={name}"]).trainer)
    if cfg["accelerator"] == "gpu" and not torch.cuda.is_available():
        cfg["accelerator"], cfg["devices"] = "cpu", 2 if cfg["strategy"] == "ddp" else 1
    trainer = build_trainer(cfg, [], [], tmp_path, checkpointing=False)
    assert isinstance(trainer, L.Trainer)
    assert trainer.num_devices == (cfg["devices"] if cfg["devices"] != -1 else 1)


def test_trainer_rejects_unknown_arguments(tmp_path):
    with pytest.raises(ConfigError, match="trainer.*max_epoch"):
        build_trainer({"max_epoch": 3}, [], [], tmp_path, checkpointing=False)


def test_precision_auto_is_fp32_on_the_cpu():
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("16-mixed", "gpu") == "16-mixed"
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "auto") == "32-true"


@pytest.mark.parametrize("name", options("logger"))
def test_logger_group_builds(name, tmp_path):
    cfg = OmegaConf.to_container(compose([f"logger={name}"]).logger)
    loggers = build_loggers(cfg, tmp_path, "run")
    kinds = {type(lg) for lg in loggers}
    assert CSVLogger in kinds  # always a CSV log
    assert (WandbLogger in kinds) == ("wandb" in cfg)


def test_unknown_logger_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="logger.mlflow"):
        build_loggers({"mlflow": {}}, tmp_path, "run")


def test_wandb_is_offline_without_an_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not has_wandb_key()
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled"
    assert wandb_mode("offline") == "offline"
    with pytest.raises(ConfigError, match="logger.wandb.mode='sometimes'"):
        wandb_mode("sometimes")


def test_wandb_key_from_netrc(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc_file = tmp_path / ".netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert has_wandb_key()


def _no_wandb_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))


def test_wandb_online_without_a_key_is_refused(monkeypatch, tmp_path):
    _no_wandb_key(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ConfigError) as err:
        wandb_mode("auto")
    assert str(err.value) == ("WANDB_MODE='online' needs a W&B API key and none is configured; allowed: a key "
                              "(WANDB_API_KEY or `wandb login`), WANDB_MODE=offline (sync later with `wandb sync`) "
                              "or disabled, or logger=csv")
    with pytest.raises(ConfigError, match="^logger.wandb.mode='online' needs a W&B API key"):
        wandb_mode("online")
    assert wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode("online") == "online"


def test_cli_refuses_wandb_online_without_a_key_in_one_line(monkeypatch, tmp_path):
    _no_wandb_key(monkeypatch, tmp_path)
    done = tokenreduce_cli(tmp_path, "experiment=smoke", "logger=default", WANDB_MODE="online")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().startswith("tokenreduce: error: WANDB_MODE='online' needs a W&B API key")
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "run" / "wandb").exists()


@pytest.mark.parametrize("name", options("sweep"))
def test_sweep_configs_compose(name):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[f"sweep={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert len(params) >= 1
    for key, values in params.items():
        assert len(str(values).split(",")) >= 2, key


DOCUMENTED = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "experiments" / "README.md",
              *sorted(CONF.glob("sweep/*.yaml")), ROOT / "tokenreduce" / "__main__.py"]


def documented_multiruns() -> list[str]:
    """The arguments of every `python -m tokenreduce -m ...` the docs show (continuation lines joined,
    comments and the closing backtick left out)."""
    found = set()
    for path in DOCUMENTED:
        text = path.read_text().replace("\\\n", " ")
        found |= {m.strip() for m in re.findall(r"python -m tokenreduce -m ([^`#|\n]+)", text)}
    return sorted(found)


@pytest.mark.parametrize("command", documented_multiruns())
def test_documented_sweeps_compose_every_job(command):
    """Each job of the multirun, as the sweeper makes them (the sweep file's values, then the command
    line's, then the unreduced baselines it adds), composes and builds its reducer."""
    args = shlex.split(command)
    hydra_args = [a for a in args if a.lstrip("+~").startswith("hydra")]
    task_args = [a for a in args if a not in hydra_args]
    parser = OverridesParser.create()
    single = [o.input_line for o in parser.parse_overrides(args) if not o.is_sweep_override()]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        swept = hydra_compose("config", overrides=single, return_hydra_config=True).hydra.sweeper.params
        jobs = grid(OmegaConf.to_container(swept) if swept is not None else {}, task_args)
        jobs += baselines(jobs, lambda job: hydra_compose("config", overrides=[*hydra_args, *job]))
        for job in jobs:
            cfg = hydra_compose("config", overrides=[*hydra_args, *job])
            check_task(cfg)
            build_reducer(cfg.reducer, job)
            if "data.root=/data/imagenet" in job:
                assert cfg.data.name == "imagenet" and cfg.data.root == "/data/imagenet"
    assert len(jobs) >= 2 or "hydra/launcher=slurm" in args


def test_slurm_launcher_config_composes():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                                 "trainer.num_nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == 4 and launcher.gpus_per_node == 4 and launcher.nodes == 2
    # the plugin's SlurmQueueConf fields (hydra-submitit-launcher 1.2)
    expected = {"submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb",
                "nodes", "name", "stderr_to_stdout", "partition", "qos", "comment", "constraint", "exclude",
                "gres", "cpus_per_gpu", "gpus_per_task", "mem_per_gpu", "mem_per_cpu", "account",
                "signal_delay_s", "max_num_timeout", "additional_parameters", "array_parallelism", "setup"}
    assert set(launcher) - {"_target_"} == expected


def test_wandb_sweep_files_run_the_entry_point_with_composable_arguments():
    files = sorted((ROOT / "experiments").glob("wandb_sweep_*.yaml"))
    assert files
    for path in files:
        sweep = yaml.safe_load(path.read_text())
        assert sweep["command"][:4] == ["${env}", "python", "-m", "tokenreduce"], path.name
        assert "${args_no_hyphens}" in sweep["command"], path.name
        assert sweep["metric"]["name"].startswith("result/")
        grid = {k: v.get("values", [v.get("value")]) for k, v in sweep["parameters"].items()}
        for combination in itertools.product(*grid.values()):
            overrides = [f"{k}={_override_value(v)}" for k, v in zip(grid, combination, strict=True)]
            cfg = compose(overrides)
            reducer_spec(cfg.reducer)


def _override_value(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


# --- run names -----------------------------------------------------------------------------------
def test_run_name_lists_only_changed_parameters():
    assert default_run_name("vit_base_patch16_224.augreg_in21k_ft_in1k", "tome",
                            {**tokenreduce.reducer_defaults("tome"), "r": 13}) == "vit_base_patch16_224-tome-r=13"
    assert default_run_name("deit_small_patch16_224", "none", {}) == "deit_small_patch16_224-none"
    name = default_run_name("test_vit", "tome", {"r": [2, 1], "ratio": None, "layers": [0, 3]})
    assert name == "test_vit-tome-r=2-1-layers=0-3"
    assert "/" not in default_run_name("a/b", "tome", {"mode": "x/y"})
