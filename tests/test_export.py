"""Exporting reduced models: torch.export with a symbolic batch and ONNX (run with onnxruntime), each
equal to the eager model at two batch sizes; the stable order export computes without a sort; and
the refusals, which name the reducer and the reason."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import images_for, make_model
from test_invariants import SETTINGS, STAGES

import tokenreduce
from tokenreduce.core.merge import argsort_by_counting, stable_argsort
from tokenreduce.errors import ConfigError
from tokenreduce.export import export_onnx, export_program
from tokenreduce.reducers import mstm

TOLERANCE = 1e-4  # largest absolute difference of the logits from the eager model's
BATCHES = (1, 3)  # the example is batch 2: both differ from it, and 1 is the size export likes to fix
# Images compared: onnxruntime rounds attention differently from PyTorch in the last bit, so where a
# ranking reducer's kept and next-best scores are about 1 ulp apart it keeps another token (the tiny
# random ViT's near-uniform class attention, with images_for(seed=1), has such a pair); these seeds
# have none, so any difference beyond rounding is the export's.
SEEDS = {1: 100, 3: 103}
# The setting each reducer exports with on the tiny ViT (test_vit: class token, 100 patches, 6 blocks):
# the invariants' where those export as they are.
EXPORTS = {
    **SETTINGS,
    "random": {**SETTINGS["random"], "seed": None},  # the seeded draws are refused (below)
    "atc": {"r": 6, "layers": STAGES},  # each join is unrolled into the graph: a few keep it small
    "compose": {"parts": [{"name": "atc", "layers": [1], "r": 4}, {"name": "tome", "layers": [2, 3], "r": 8}]},
    "ppt": {"r": 9, "layers": STAGES, "threshold": 1e-5},
    "diffrate": {"prune": [0, 4, 0, 4], "merge": [0, 8, 6, 4]},
}
# Reducers for other model families, which a timm ViT refuses at apply.
NOT_FOR_VIT = {"todo": "diffusion models", "tomesd": "diffusion models", "fastv": "vision-language models",
               "pyramiddrop": "vision-language models", "dart": "vision-language models",
               "sparsevlm": "vision-language models",
               "visionzip": "vision-language models", "prumerge": "vision-language models",
               "prumerge+": "vision-language models"}
RANDOM_DRAWS = {"random"}  # ONNX has its own random source: only the shapes can be compared


def reduced(name: str, model_name: str = "test_vit") -> torch.nn.Module:
    return tokenreduce.apply(make_model(model_name), name, **EXPORTS[name])


def eager(model, images):
    with torch.no_grad():
        return model(images)


def onnx_session(program, path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'tokenreduce[export]')")
    program.save(str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(session, images):
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def needs_onnxscript():
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'tokenreduce[export]')")


def check_program(program, model, name=""):
    assert "sort.stable" not in str(program.graph)  # what ONNX cannot take
    module = program.module()
    for batch in BATCHES:
        images = images_for(model, batch, seed=SEEDS[batch])
        if name in RANDOM_DRAWS:  # the program draws from the same global source as the eager model
            torch.manual_seed(batch)
            want = eager(model, images)
            torch.manual_seed(batch)
        else:
            want = eager(model, images)
        got = module(images)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= TOLERANCE, (name, batch)
        assert name == "none" or tokenreduce.stats(model)["tokens"][-1] < model.patch_embed.num_patches + 1


def check_onnx(session, model, name=""):
    for batch in BATCHES:
        images = images_for(model, batch, seed=SEEDS[batch])
        got, want = run_onnx(session, images), eager(model, images)
        assert got.shape == want.shape
        if name not in RANDOM_DRAWS:
            assert (got - want).abs().max() <= TOLERANCE, (name, batch)


# --- the stable order ---------------------------------------------------------------------------
def tied(shape, seed, dtype=torch.float32):
    """Values with many ties (and for floats NaN, +-inf and -0.0 among them)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 6, shape, generator=g)
    if not dtype.is_floating_point:
        return values.to(dtype)
    out = values.to(dtype)
    out[values == 5] = float("nan")
    out[values == 4] = float("inf")
    out[values == 3] = float("-inf")
    out[(values == 0) & (torch.rand(shape, generator=g) < 0.5)] = -0.0
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8, torch.long, torch.bool])
@pytest.mark.parametrize("descending", [False, True])
def test_counting_gives_the_order_of_the_stable_sort_on_ties(dtype, descending):
    for seed, shape in enumerate([(1,), (7,), (3, 40), (2, 3, 33), (4, 98)]):
        values = tied(shape, seed, dtype) if dtype is not torch.bool else tied(shape, seed, torch.long) > 2
        want = values.argsort(dim=-1, descending=descending, stable=True)
        assert torch.equal(argsort_by_counting(values, descending), want)


def test_counting_gives_the_order_of_the_stable_sort_on_cosine_similarities():
    # the values ToMe sorts: each token's best similarity, with exact duplicates from repeated tokens
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(2, 60, 8, generator=g), dim=-1)
    keys[:, 30:] = keys[:, :30]
    best = (keys[:, ::2] @ keys[:, 1::2].transpose(1, 2)).amax(dim=-1)
    want = best.argsort(dim=-1, descending=True, stable=True)
    assert torch.equal(argsort_by_counting(best, True), want)


def test_stable_argsort_sorts_eagerly_and_counts_while_exporting(monkeypatch):
    values = tied((3, 25), 1)
    want = values.argsort(dim=-1, descending=True, stable=True)
    calls = []
    monkeypatch.setattr("tokenreduce.core.merge.argsort_by_counting",
                        lambda v, d: calls.append(d) or argsort_by_counting(v, d))
    assert torch.equal(stable_argsort(values, descending=True), want) and not calls
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert torch.equal(stable_argsort(values, descending=True), want) and calls == [True]


def test_mstm_finds_its_crucial_tokens_without_nonzero_while_exporting(monkeypatch):
    g = torch.Generator().manual_seed(0)
    importance, keys = torch.rand(3, 30, generator=g), torch.randn(3, 31, 8, generator=g)
    want = mstm.crucial_assignment(importance, keys, 12, num_prefix=1)
    monkeypatch.setattr(torch, "nonzero", None)  # the exporting path must not reach it
    monkeypatch.setattr(torch.Tensor, "nonzero", None)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    got = mstm.crucial_assignment(importance, keys, 12, num_prefix=1)
    assert torch.equal(got.dest, want.dest) and torch.equal(got.merged, want.merged) and got.n_out == want.n_out


# --- torch.export and ONNX on the tiny ViT --------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_tome():
    return reduced("tome")


@pytest.fixture(scope="module")
def tiny_program(tiny_tome):
    # an example of batch 1 is widened, so the program still takes any batch
    return export_program(tiny_tome, images_for(tiny_tome, 1))


def test_torch_export_with_a_dynamic_batch_equals_eager(tiny_tome, tiny_program):
    check_program(tiny_program, tiny_tome)


def test_onnx_with_a_dynamic_batch_equals_eager(tiny_tome, tiny_program, tmp_path):
    needs_onnxscript()
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'tokenreduce[export]')")
    path = tmp_path / "tome.onnx"
    export_onnx(tiny_program, path=path, optimize=False)  # the optimiser is checked in the slow tests
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    check_onnx(session, tiny_tome)


def test_export_onnx_refuses_a_missing_or_needless_example(tiny_tome, tiny_program):
    needs_onnxscript()
    with pytest.raises(ConfigError, match="example=None is invalid for a model"):
        export_onnx(tiny_tome)
    with pytest.raises(ConfigError, match="an example given with an exported program is invalid"):
        export_onnx(tiny_program, images_for(tiny_tome, 2))


def test_export_onnx_reports_an_operator_onnx_lacks():
    needs_onnxscript()

    class StableSort(torch.nn.Module):
        def forward(self, x):
            return x.argsort(dim=-1, stable=True)

    program = torch.export.export(StableSort(), (torch.randn(2, 5),))
    with pytest.raises(ConfigError, match=r"export_onnx: the exported program .*No ONNX function found for .*sort"):
        export_onnx(program, optimize=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_every_exporting_reducer_equals_eager_under_torch_export(name):
    model = reduced(name)
    check_program(export_program(model, images_for(model, 2)), model, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_every_exporting_reducer_equals_eager_in_onnx(name, tmp_path):
    needs_onnxscript()
    model = reduced(name)
    check_onnx(onnx_session(export_onnx(model, images_for(model, 2)), tmp_path / f"{name}.onnx"), model, name)


@pytest.mark.slow
def test_a_static_batch_is_fixed_at_the_example_s(tiny_tome, tmp_path):
    needs_onnxscript()
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'tokenreduce[export]')")
    program = export_program(tiny_tome, images_for(tiny_tome, 2), dynamic_batch=False)
    assert (program.module()(images_for(tiny_tome, 2)) - eager(tiny_tome, images_for(tiny_tome, 2))).abs().max() <= TOLERANCE
    with pytest.raises(Exception, match="(?i)shape|size|guard|expected"):
        program.module()(images_for(tiny_tome, 3))
    export_onnx(program, path=tmp_path / "static.onnx")
    assert onnx.load(str(tmp_path / "static.onnx")).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


# --- ViT-S/16 ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_s_tome():
    torch.manual_seed(0)
    return tokenreduce.apply(timm.create_model("vit_small_patch16_224", pretrained=False).eval(), "tome", r=13)


def test_vit_s_exports_with_a_dynamic_batch_to_torch_export_and_onnx(vit_s_tome, tmp_path):
    """ViT-S/16 with ToMe r=13: one dynamic-batch program, checked at batch 1 and 3 itself and as an
    ONNX file run by onnxruntime (the ONNX optimiser is checked on the tiny model, in the slow tests)."""
    program = export_program(vit_s_tome, images_for(vit_s_tome, 2))
    check_program(program, vit_s_tome)
    needs_onnxscript()
    check_onnx(onnx_session(export_onnx(program, optimize=False), tmp_path / "vit_s.onnx"), vit_s_tome)


# --- refusals --------------------------------------------------------------------------------------
def test_every_registered_reducer_is_classified():
    assert set(tokenreduce.available()) == set(EXPORTS) | set(NOT_FOR_VIT)


def test_seeded_random_pruning_is_refused_by_name_in_plain_and_wrapped_export():
    model = tokenreduce.apply(make_model("test_vit"), "random", ratio=0.7, layers=[1], seed=3)
    images = images_for(model, 2)
    with pytest.raises(ConfigError, match=r"random: seed=3 cannot be exported.*allowed: seed=None"):
        export_program(model, images)
    with pytest.raises(ConfigError, match=r"random: seed=3 cannot be exported"):
        torch.export.export(model, (images,))


def test_a_model_in_training_mode_is_refused(tiny_tome):
    with pytest.raises(ConfigError, match="training mode"):
        export_program(tiny_tome.train(), images_for(tiny_tome, 2))
    tiny_tome.eval()


def test_an_unexportable_pass_is_reported_with_the_reducer(monkeypatch):
    model = tokenreduce.apply(make_model("test_vit"), "tome", r=9)
    reduce = model.token_reducer.reduce

    def branches_on_data(x, signals, state, layer, removal):  # a data-dependent branch export cannot trace
        return reduce(x, signals, state, layer, removal) if x.sum() > 0 else x

    monkeypatch.setattr(model.token_reducer, "reduce", branches_on_data)
    with pytest.raises(ConfigError, match=r"export: reducer 'tome' \(r=9.*could not be exported") as caught:
        export_program(model, images_for(model, 2))
    assert caught.value.__cause__ is not None  # PyTorch's own error, kept as the cause
