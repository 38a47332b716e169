"""The source map of `stats`, merge maps and trade-off plots, on timm's tiny models (CPU, fast)."""

import numpy as np
import pytest
import timm
import torch
from conftest import TINY_MODELS, images_for, make_model, run
from matplotlib.collections import PathCollection
from test_invariants import DROPS_TOKENS, NEEDS_CLASS_TOKEN, SETTINGS

import tokenreduce
from tokenreduce.errors import ConfigError
from tokenreduce.viz import merge_maps, palette, patch_colours, plot_tradeoff, token_grid
from tokenreduce.viz.merge_maps import DROPPED_GREY

TRACING = [name for name in SETTINGS if name != "none"]


def grey_model():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", img_size=32, patch_size=4, in_chans=1, embed_dim=32,
                             depth=4, num_heads=2).eval()


def traced(name, model_name, batch=2):
    model = tokenreduce.apply(make_model(model_name), name, **SETTINGS[name], trace_source=True)
    run(model, images_for(model, batch))
    return model, tokenreduce.stats(model)


# --- the source map ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, model_name", [
    pytest.param(n, m, id=f"{n}-{m}")
    for n in TRACING for m in TINY_MODELS if n not in NEEDS_CLASS_TOKEN or m == "test_vit"
])
def test_source_map_is_consistent(name, model_name):
    model, st = traced(name, model_name)
    source, n_out, prefix = st["source"], st["tokens"][-1], model.num_prefix_tokens
    assert source.dtype == torch.long and source.shape == (2, prefix + 100)  # 10x10 patches
    assert ((source >= -1) & (source < n_out)).all()  # one output token each, or dropped
    assert torch.equal(source[:, :prefix], torch.arange(prefix).expand(2, -1))
    patches = source[:, prefix:]
    assert ((patches >= prefix) | (patches == -1)).all()  # no patch ends in a class/register token
    counts = torch.stack([torch.bincount(s[s >= 0], minlength=n_out) for s in source])
    assert (counts > 0).all()  # every output token holds at least one input token
    sizes = model._tokenreduce.last_state.sizes
    if sizes is not None:
        assert torch.equal(counts.float(), sizes[..., 0])
    dropped = (source == -1).sum(dim=1)
    if name in DROPS_TOKENS:
        assert (dropped == 100 + prefix - n_out).all()  # pruning: each kept token is one patch
    else:
        assert (dropped == 0).all()


def test_source_is_none_without_tracing():
    model = tokenreduce.apply(make_model("test_vit"), "tome", r=9)
    run(model, images_for(model))
    assert tokenreduce.stats(model)["source"] is None


# --- per-patch colours -------------------------------------------------------------------------
HAND_SOURCE = [0, 1, 1, 2, -1, 3, 1]  # one prefix token, a 2x3 grid; token 1 holds three patches


def test_token_grid_and_palette_colours_by_hand():
    ids = token_grid(torch.tensor(HAND_SOURCE), (2, 3), num_prefix=1)
    assert ids.tolist() == [[1, 1, 2], [-1, 3, 1]]
    colours = patch_colours(torch.tensor(HAND_SOURCE), (2, 3), num_prefix=1, colouring="palette")
    table = palette(4)
    for i in range(2):
        for j in range(3):
            expect = DROPPED_GREY if ids[i, j] < 0 else table[ids[i, j]]
            assert np.allclose(colours[i, j], expect)
    assert len({tuple(c) for c in table}) == 4 and not any(np.allclose(c, DROPPED_GREY) for c in table)


def test_mean_colours_by_hand():
    rng = np.random.default_rng(0)
    image = rng.random((4, 6, 3))  # 2x2-pixel patches
    colours = patch_colours(HAND_SOURCE, (2, 3), image, num_prefix=1, colouring="mean")
    ids = token_grid(HAND_SOURCE, (2, 3), num_prefix=1)
    cell = {(i, j): image[2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(-1, 3).mean(0) for i in range(2) for j in range(3)}
    for (i, j) in cell:
        members = [cell[k] for k in cell if ids[k] == ids[i, j]]
        expect = DROPPED_GREY if ids[i, j] < 0 else np.mean(members, axis=0)
        assert np.allclose(colours[i, j], expect)


@pytest.mark.parametrize("name", ["tome", "pitome", "mctf", "evit", "topk"])
def test_colours_agree_with_a_real_source_map(name):
    model, st = traced(name, "test_vit", batch=1)
    source = st["source"][0]
    ids = token_grid(source, (10, 10), num_prefix=1).reshape(-1)
    image = np.random.default_rng(1).random((160, 160, 3))
    for colouring in ("palette", "mean"):
        colours = patch_colours(source, (10, 10), image, 1, colouring).reshape(-1, 3)
        for token in np.unique(ids):
            members = colours[ids == token]
            assert np.allclose(members, members[0])  # one colour per output token
            if token < 0:
                assert np.allclose(members[0], DROPPED_GREY)
        if colouring == "palette":
            kept = np.unique(ids[ids >= 0])
            assert len({tuple(colours[ids == t][0]) for t in kept}) == len(kept)  # tokens differ


@pytest.mark.parametrize("kwargs", [
    {"source": [0, 1, 2], "grid_size": (2, 3)},                                  # too short
    {"source": [0, 1, 2, 3, 4, 5, -2], "grid_size": (2, 3), "num_prefix": 1},  # below -1
    {"source": HAND_SOURCE, "grid_size": (2, 0), "num_prefix": 1},
    {"source": HAND_SOURCE, "grid_size": (2, 3), "num_prefix": 1, "colouring": "rainbow"},
    {"source": HAND_SOURCE, "grid_size": (2, 3), "num_prefix": 1},            # "mean" needs an image
    {"source": HAND_SOURCE, "grid_size": (2, 3), "num_prefix": 1, "image": np.zeros((5, 6, 3))},
    {"source": HAND_SOURCE, "grid_size": (2, 3), "num_prefix": 1, "colouring": "palette", "dropped": (1, 2, 0)},
])
def test_patch_colours_refuses_bad_input(kwargs):
    with pytest.raises(ConfigError):
        patch_colours(**kwargs)


# --- merge maps --------------------------------------------------------------------------------
REDUCERS = {"ToMe": ("tome", {"r": 9}), "top-k": ("topk", {"ratio": 0.7, "layers": [1, 3]})}


def test_merge_maps_layout_non_square_grid_and_restores_an_unreduced_model():
    model = make_model("test_vit")
    images = torch.randn(3, 3, 160, 96)  # dynamic image size: a 10x6 grid
    before = run(model, images)
    fig = merge_maps(model, images, REDUCERS, colouring="palette")
    assert len(fig.axes) == 3 * (1 + len(REDUCERS))
    assert fig.axes[1].images[0].get_array().shape == (10, 6, 3)
    assert tokenreduce.reducer_of(model) is None and type(model) is timm.models.VisionTransformer
    assert torch.equal(run(model, images), before)


def test_merge_maps_restores_the_previous_reducer_its_stats_and_modes():
    model = tokenreduce.apply(make_model("test_vit"), "pitome", ratio=0.9)
    images = images_for(model)
    before = run(model, images)
    tokens = tokenreduce.stats(model)["tokens"]
    previous = tokenreduce.reducer_of(model)
    model.train()
    model.blocks[0].eval()  # a mixed state survives too
    merge_maps(model, images[:1], REDUCERS)
    assert tokenreduce.reducer_of(model) is previous
    assert tokenreduce.stats(model)["tokens"] == tokens
    assert model.training and previous.training and not model.blocks[0].training
    model.eval()
    assert torch.equal(run(model, images), before)


def test_merge_maps_on_a_grey_model_undoes_the_normalisation():
    model = grey_model()
    pixels = torch.rand(2, 1, 32, 32)
    mean, std = np.mean(model.pretrained_cfg["mean"]), np.mean(model.pretrained_cfg["std"])
    fig = merge_maps(model, (pixels - mean) / std, {"ToMe": ("tome", {"r": 8})})
    assert len(fig.axes) == 2 * 2
    shown = np.asarray(fig.axes[0].images[0].get_array())
    assert shown.shape == (32, 32, 3)
    assert np.allclose(shown, pixels[0, 0, :, :, None].expand(32, 32, 3).numpy(), atol=1e-5)
    colours = np.asarray(fig.axes[1].images[0].get_array())
    assert colours.shape == (8, 8, 3) and np.allclose(colours, colours[..., :1])  # grey tokens stay grey


@pytest.mark.parametrize("reducers, images, match", [
    ({"none": ("none", {})}, None, "reducer='none'"),
    ({"ToMe": ("tome", {"r": 9, "trace_source": False})}, None, "trace_source"),
    ({"ToMe": ("tome", {"bogus": 1})}, None, "bogus"),
    ({"ToMe": "tome"}, None, "reducers"),
    ({}, None, "reducers"),
    (REDUCERS, torch.randn(2, 1, 160, 160), "images"),
    (REDUCERS, torch.randn(2, 3, 150, 160), "images"),
])
def test_merge_maps_refuses_bad_input_before_running(reducers, images, match):
    model = make_model("test_vit")
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ConfigError, match=match):
        merge_maps(model, images_for(model) if images is None else images, reducers)
    assert not calls and tokenreduce.reducer_of(model) is None


def test_merge_maps_checks_every_reducer_against_the_model_first():
    model = make_model("test_vit2")  # no class token: evit cannot rank by its attention
    with pytest.raises(ConfigError):
        merge_maps(model, images_for(model), {"ToMe": ("tome", {"r": 4}), "EViT": ("evit", SETTINGS["evit"])})
    assert tokenreduce.reducer_of(model) is None


# --- trade-off plots ---------------------------------------------------------------------------
def tradeoff_rows():
    rows = [{"reducer": "none", "params": {}, "mac_fraction": 1.0, "top1": 80.0, "speedup": 1.0, "run": "base"}]
    for name, strengths in (("tome", (16, 4, 8)), ("evit", (0.5, 0.9, 0.7))):
        for s in strengths:
            fraction = 1 - s / 20 if name == "tome" else s
            rows.append({"reducer": name, "params": {"r" if name == "tome" else "ratio": s, "layers": [3]},
                         "mac_fraction": fraction, "top1": 80 - 10 * (1 - fraction), "speedup": 0.9 / fraction})
    return rows


def method_lines(ax):
    return {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}


@pytest.mark.parametrize("x", ["mac_fraction", "speedup"])
def test_tradeoff_lines_follow_mac_fraction(x):
    rows = tradeoff_rows()
    ax = plot_tradeoff(rows, x).axes[0]
    lines = method_lines(ax)
    assert set(lines) == {"tome", "evit"}
    for name, line in lines.items():
        ordered = sorted((r for r in rows if r["reducer"] == name), key=lambda r: r["mac_fraction"])
        assert list(line.get_xdata()) == [r[x] for r in ordered]
        assert list(line.get_ydata()) == [r["top1"] for r in ordered]
    assert lines["tome"].get_color() != lines["evit"].get_color()
    assert lines["tome"].get_marker() != lines["evit"].get_marker()
    assert ax.get_xlabel() and ax.get_ylabel()


def test_tradeoff_baseline_is_a_separate_black_star_on_top():
    fig = plot_tradeoff(tradeoff_rows(), "mac_fraction")
    ax = fig.axes[0]
    stars = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(stars) == 1
    star = stars[0]
    assert np.allclose(star.get_offsets(), [[1.0, 80.0]])
    assert np.allclose(star.get_facecolor()[0][:3], 0.0)
    assert star.get_zorder() > max(line.get_zorder() for line in ax.lines)
    fig.canvas.draw()
    legend = ax.get_legend()
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1  # outside the data
    assert "none (baseline)" in [t.get_text() for t in legend.get_texts()]


def test_tradeoff_saves_a_png_and_never_overwrites(tmp_path):
    path = tmp_path / "tradeoff.png"
    plot_tradeoff(tradeoff_rows(), "speedup", path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG")
    with pytest.raises(ConfigError, match="already exists"):
        plot_tradeoff(tradeoff_rows(), "speedup", path)
    assert path.read_bytes() == data


@pytest.mark.parametrize("rows, x", [
    (tradeoff_rows(), "gmacs"),
    ([], "mac_fraction"),
    (tradeoff_rows() + tradeoff_rows()[:1], "mac_fraction"),  # two baselines
    ([{"reducer": "tome", "params": {}, "top1": 70.0}], "mac_fraction"),
    ([{"reducer": "tome", "params": {}, "top1": 70.0, "mac_fraction": 0.5}], "speedup"),
    ([{"reducer": "tome", "params": "r=4", "top1": 70.0, "mac_fraction": 0.5}], "mac_fraction"),
])
def test_tradeoff_refuses_bad_input(rows, x):
    with pytest.raises(ConfigError):
        plot_tradeoff(rows, x)


def test_tradeoff_lines_follow_strength_not_x():
    rows = [{"reducer": "none", "params": {}, "mac_fraction": 1.0, "top1": 80.0, "speedup": 1.0}]
    # measured speed-ups are noisy: r=4 came out slower than r=2; lines must still follow r
    for r, fraction, speedup in ((2, 0.9, 1.3), (8, 0.6, 1.9), (4, 0.8, 1.25)):
        rows.append({"reducer": "tome", "params": {"r": r}, "mac_fraction": fraction, "top1": 80 - r / 2,
                     "speedup": speedup})
    for ratio, speedup in ((0.9, 1.1), (0.5, 2.0), (0.7, 1.45)):
        rows.append({"reducer": "evit", "params": {"ratio": ratio}, "mac_fraction": ratio, "top1": 70 + 10 * ratio,
                     "speedup": speedup, "method": "evit keep_cls"})
    lines = method_lines(plot_tradeoff(rows, "speedup").axes[0])
    assert set(lines) == {"tome", "evit keep_cls"}  # `method` names the line, `reducer` gives its strength
    assert list(lines["tome"].get_xdata()) == [1.9, 1.25, 1.3]  # r = 8, 4, 2: strongest first
    assert list(lines["evit keep_cls"].get_xdata()) == [2.0, 1.45, 1.1]  # ratio = 0.5, 0.7, 0.9


def test_tradeoff_labels_overlap_nothing_when_lines_meet():
    rows = [{"reducer": "none", "params": {}, "mac_fraction": 1.0, "top1": 80.0, "speedup": 1.0}]
    for k, name in enumerate(("tome", "pitome", "tofu", "mctf")):
        for ratio in (0.95, 0.9, 0.85, 0.8, 0.75):
            rows.append({"reducer": name, "params": {"ratio": ratio}, "mac_fraction": ratio - 0.005 * k,
                         "top1": 80 - 20 * (1 - ratio) - 0.2 * k, "speedup": 1 / ratio})
    fig = plot_tradeoff(rows, "mac_fraction", label_points="all")
    ax = fig.axes[0]
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.texts]
    assert len(boxes) == 20
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    star = ax.transData.transform([(1.0, 80.0)])[0]
    assert not any(b.contains(*star) for b in boxes)
