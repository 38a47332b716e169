"""`import tokenreduce` and the plain API (apply, forward, stats, match_macs) load torch and timm only:
the training stack (lightning, hydra, plots, metrics) is imported where the engine uses it, and
transformers only for a transformers model. The checks run in a fresh interpreter, since this one
has long imported everything."""

import json
import subprocess
import sys

import pytest

import tokenreduce.data

# the libraries the plain API must not import; those timm imports itself (with them installed,
# timm 1.0 imports wandb and torchvision, and torch imports tqdm) cost nothing more and are left out
HEAVY = ("lightning", "pytorch_lightning", "lightning_fabric", "transformers", "wandb", "matplotlib", "hydra",
         "omegaconf", "torchmetrics", "rich", "tqdm", "torchvision", "sentence_transformers")

PLAIN_API = """
import importlib.util, json, sys
import timm, torch
timm.create_model("test_vit", pretrained=False)
def top_level():  # third-party packages only
    return {name.partition(".")[0] for name in sys.modules} - set(sys.stdlib_module_names)
report = {"from_timm": sorted(top_level())}
import tokenreduce
from tokenreduce.adapters import adapter_for
report["after_import"] = sorted(top_level() - set(report["from_timm"]))
model = timm.create_model("test_vit", pretrained=False).eval()
tokenreduce.apply(model, "tome", r=2)
with torch.no_grad():
    report["logits"] = list(model(torch.randn(2, 3, *model.pretrained_cfg["input_size"][1:])).shape)
report["tokens"] = tokenreduce.stats(model)["tokens"]
report["adapter"] = adapter_for(model).name
tokenreduce.remove(model)
report["fraction"] = tokenreduce.match_macs(model, "tome", 0.8, tolerance=0.2)[1]
report["fmnist_vit"] = timm.is_model("fmnist_vit")
report["after_use"] = sorted(top_level() - set(report["from_timm"]))
report["hf"] = None
if importlib.util.find_spec("transformers"):  # the user imports transformers: its models are claimed
    import transformers
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, image_size=32, patch_size=4, num_labels=3)
    model = transformers.ViTForImageClassification(config).eval()
    tokenreduce.apply(model, "tome", r=4)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32)).logits
    report["hf"] = {"adapter": adapter_for(model).name, "logits": list(logits.shape),
                    "tokens": tokenreduce.stats(model)["tokens"]}
print(json.dumps(report))
"""

ENGINE = """
import tokenreduce.__main__, tokenreduce.engine.run
from hydra.utils import get_class
from tokenreduce.engine.tasks import available
for name in ("FashionMNISTDataModule", "ImageFolderDataModule", "SyntheticDataModule"):
    get_class("tokenreduce.data." + name)  # how the data configs' _target_ is found
print(" ".join(available()))
"""


def python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def plain_api():
    return json.loads(python(PLAIN_API))


def test_plain_api_imports_torch_and_timm_only(plain_api):
    for stage in ("after_import", "after_use"):
        assert not set(HEAVY) & set(plain_api[stage]), (stage, plain_api[stage])
        assert set(plain_api[stage]) == {"tokenreduce"}, (stage, plain_api[stage])  # nothing beyond timm's either
    # the checks above looked at something real: the model ran reduced, and the offline models are registered
    assert plain_api["adapter"] == "timm_vit" and plain_api["logits"][0] == 2
    assert plain_api["tokens"][-1] < plain_api["tokens"][0]
    assert 0.6 <= plain_api["fraction"] <= 1.0
    assert plain_api["fmnist_vit"]
    # the training stack really is left out, not imported by timm already
    assert not {"lightning", "hydra", "omegaconf", "matplotlib", "torchmetrics"} & set(plain_api["from_timm"])


def test_transformers_models_are_claimed_once_the_user_imports_transformers(plain_api):
    if plain_api["hf"] is None:
        pytest.skip("transformers is not installed")
    assert plain_api["hf"]["adapter"] == "hf_vit" and plain_api["hf"]["logits"] == [2, 3]
    assert plain_api["hf"]["tokens"][-1] < plain_api["hf"]["tokens"][0]


def test_engine_and_datamodule_targets_import():
    tasks = python(ENGINE).split()
    assert {"evaluate", "finetune", "compare", "search"} <= set(tasks)


def test_data_reexports_resolve_to_their_modules():
    from tokenreduce.data import fashion_mnist, folder, hf_sets, synthetic, transforms

    homes = {"FashionMNISTDataModule": fashion_mnist, "read_idx": fashion_mnist, "ImageFolderDataModule": folder,
             "check_split": folder, "SyntheticDataModule": synthetic, "SyntheticImages": synthetic,
             "model_data_config": transforms}
    assert set(homes) == set(tokenreduce.data.__all__)
    for name, module in homes.items():
        assert getattr(tokenreduce.data, name) is getattr(module, name)
    assert set(tokenreduce.data.__all__) <= set(dir(tokenreduce.data))
    assert hf_sets.__name__ == "tokenreduce.data.hf_sets"  # a submodule not in the table still imports
    with pytest.raises(AttributeError, match="no attribute 'Missing'"):
        tokenreduce.data.Missing  # noqa: B018
