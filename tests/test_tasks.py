"""The task registry: lookup, the settings each task refuses, and the worked example of a new task in
docs/architecture.md, run as a plugin task."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import tokenreduce
from tokenreduce.engine.config import compose
from tokenreduce.engine.run import run
from tokenreduce.engine.tasks import BUILTIN, available, get_task
from tokenreduce.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["experiment=smoke", "trainer.enable_progress_bar=false", "data.train_samples=8", "data.val_samples=8",
         "data.batch_size=4", "measure.enabled=false"]


pytestmark = pytest.mark.usefixtures("clean_hydra")


def test_every_builtin_task_is_registered_and_an_unknown_one_lists_them():
    assert available()[: len(BUILTIN)] == list(BUILTIN)
    for name in BUILTIN:
        assert get_task(name).name == name
    with pytest.raises(ConfigError, match="task='train' is invalid; allowed: evaluate, finetune, compare, search, "
                                          "retrieval, zeroshot, text_classification"):
        get_task("train")


def test_python_m_tokenreduce_task_unknown_lists_the_registered_tasks(tmp_path, monkeypatch, capsys):
    from conftest import cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli(monkeypatch, "task=unknown")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"allowed: {', '.join(available())}" in err


def agreement_by_hand(cfg) -> float:
    """The worked example's number, by a loop here: the same seed, model and validation images."""
    import lightning as L
    from hydra.utils import instantiate

    from tokenreduce.engine.run import build_model

    L.seed_everything(cfg.seed, verbose=False)
    model = build_model(cfg.model).eval()
    data = instantiate(cfg.data)
    data.bind_model(model)
    data.setup("validate")
    same = total = 0
    with torch.no_grad():
        for images, _ in data.val_dataloader():
            plain = model(images).argmax(-1)
            tokenreduce.apply(model, "tome", r=4)
            same += int((model(images).argmax(-1) == plain).sum())
            tokenreduce.remove(model)
            total += len(images)
    return same / total


def test_the_worked_example_of_a_new_task_runs_as_a_plugin(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "architecture.md").read_text()
    code = re.search(r"```python\n(# tokenreduce/engine/tasks/agreement\.py.*?)```", text, re.DOTALL).group(1)
    (tmp_path / "agreement_task.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose([*SMOKE, "task=agreement", "imports=[agreement_task]", "reducer.r=4"])
    try:
        run(cfg, tmp_path / "run")
    finally:
        from tokenreduce.engine import tasks

        tasks._TASKS.pop("agreement", None)  # the registry outlives this test
        sys.modules.pop("agreement_task", None)
    written = json.loads((tmp_path / "run" / "agreement.json").read_text())
    assert written["weights"] == "random"
    assert written["agreement"] == pytest.approx(agreement_by_hand(cfg))


SEARCH = ["experiment=smoke", "task=search", "reducer=none", "budget.macs=0.6"]
COMPARE = ["experiment=smoke", "task=compare", "reducer=none"]
# for every registered task: a configuration of it with one bad setting that only its own check reads
BAD = {
    "evaluate": (["experiment=smoke", "measure.repeats=0"], "measure.repeats=0"),
    "finetune": (["experiment=smoke_finetune", "optim.lr=-1"], "optim.lr=-1"),
    "compare": ([*COMPARE, "compare.mac_fractions=[1.5]"], "mac_fractions=1.5"),
    "search": ([*SEARCH, "search.steps=-1"], "steps=-1"),
    "retrieval": (["experiment=retrieval_clip_flickr30k", "data.batch_size=0"], "batch_size=0 is invalid"),
    "zeroshot": (["experiment=zeroshot_clip", "data.batch_size=0"], "batch_size=0 is invalid"),
    "text_classification": (["experiment=text_sst2", "data.batch_size=0"], "batch_size=0 is invalid"),
    "video_classification": (["experiment=video_videomae_k400", "data.batch_size=0"], "batch_size=0 is invalid"),
    "audio_classification": (["experiment=audio_ast_audioset", "data.batch_size=0"], "batch_size=0 is invalid"),
    "train_diffusion": (["experiment=train_fmnist_diffusion", "diffusion.optim.lr=-1"], "lr=-1 is invalid"),
    "train_vlm": (["experiment=train_fmnist_vlm", "vlm.optim.lr=-1"], "lr=-1 is invalid"),
    "generate": (["experiment=quickstart_diffusion", "generate.samples=0"], "samples=0 is invalid"),
    "vqa": (["experiment=vqa_llava15_7b_gqa", "vqa.limit=0"], "limit=0 is invalid"),
}


@pytest.mark.parametrize("name", BUILTIN)
def test_each_task_checks_its_settings_before_any_model_is_built(name, monkeypatch, tmp_path):
    pytest.importorskip("transformers", reason="the transformers tasks need the hf extra")
    from tokenreduce.engine import hf_tasks
    from tokenreduce.engine.tasks import common, lightning
    from tokenreduce.engine.tasks import compare as compare_task

    for module in (common, lightning, compare_task):
        monkeypatch.setattr(module, "build_model", lambda *a, **k: pytest.fail("built a model"))
    monkeypatch.setattr(hf_tasks, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    overrides, phrase = BAD[name]
    cfg = compose(overrides)
    assert cfg.task == name
    with pytest.raises(ConfigError, match=re.escape(phrase)):
        run(cfg, tmp_path / "run", overrides=overrides)
    assert not (tmp_path / "run").exists()
