"""The Fashion-MNIST diffusion model: its builder and schedules, the guided DDIM sampler, the training
module and task=train_diffusion end to end, all on tiny configurations on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli

from tokenreduce.diffusion_sampling import sample
from tokenreduce.engine.diffusion_module import DiffusionModule, DiffusionOptim
from tokenreduce.errors import ConfigError
from tokenreduce.models.fmnist_diffusion import CONFIG, NULL_CLASS, create_fmnist_diffusion, noise_schedule

TINY = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = create_fmnist_diffusion(**TINY).eval()
    # DiT's adaLN-zero starts every block and the output at zero: randomise them so that the class,
    # the timestep and guidance change the prediction
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


def test_full_config_is_the_documented_model():
    model = create_fmnist_diffusion()
    c = model.config
    assert (c.sample_size, c.in_channels, c.out_channels, c.patch_size, c.num_layers) == (28, 1, 1, 2, 6)
    assert c.num_attention_heads * c.attention_head_dim == 128
    assert (c.sample_size // c.patch_size) ** 2 == 196
    table = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == 11 and NULL_CLASS == 10  # 10 classes and the null row
    assert sum(p.numel() for p in model.parameters()) * 4 < 20e6  # fits the 20 MB budget in float32


def test_builder_overrides_and_refusals():
    model = create_fmnist_diffusion(**TINY)
    assert model.config.num_layers == 2 and model.config.num_attention_heads == 2
    # diffusers' own label dropout is off: a training-mode forward keeps the labels
    model.train()
    emb = model.transformer_blocks[0].norm1.emb.class_embedder
    labels = torch.arange(10).repeat(50)
    assert torch.equal(emb(labels), emb.embedding_table(labels))
    with pytest.raises(ConfigError, match="width=.*allowed: sample_size"):
        create_fmnist_diffusion(width=32)
    with pytest.raises(ConfigError, match="num_layers=0 is invalid"):
        create_fmnist_diffusion(num_layers=0)
    with pytest.raises(ConfigError, match="patch_size=3 is invalid for sample_size=28"):
        create_fmnist_diffusion(patch_size=3)
    assert set(CONFIG) >= set(TINY)


def test_noise_schedules():
    from diffusers import DDIMScheduler, DDPMScheduler

    train, sampling = noise_schedule("train"), noise_schedule("sample", beta_schedule="cosine")
    assert isinstance(train, DDPMScheduler) and isinstance(sampling, DDIMScheduler)
    assert train.config.prediction_type == sampling.config.prediction_type == "epsilon"
    assert train.config.num_train_timesteps == 1000
    assert torch.isclose(train.betas[0], torch.tensor(1e-4)) and torch.isclose(train.betas[-1], torch.tensor(0.02))
    assert sampling.config.beta_schedule == "squaredcos_cap_v2"
    for bad, match in [(dict(kind="x"), "kind='x'"), (dict(beta_schedule="quad"), "beta_schedule='quad'"),
                       (dict(num_train_timesteps=1), "num_train_timesteps=1"), (dict(steps=3), "steps=3")]:
        kind = bad.pop("kind", "train")
        with pytest.raises(ConfigError, match=match):
            noise_schedule(kind, **bad)


def test_sample_is_deterministic_in_range_and_guided(tiny):
    a = sample(tiny, [0, 3, 9], steps=4, guidance=3.0, seed=5)
    b = sample(tiny, [0, 3, 9], steps=4, guidance=3.0, seed=5)
    assert a.shape == (3, 1, 28, 28) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.allclose(a, sample(tiny, [0, 3, 9], steps=4, guidance=3.0, seed=6))
    assert not torch.allclose(a, sample(tiny, [0, 3, 9], steps=4, guidance=1.0, seed=5))
    assert not tiny.training


def reference_conditional(model, classes, steps, seed, recompute_noise=True):
    """DDIM with the conditional prediction only, written out apart from the sampler and diffusers:
    x0 = (x - sqrt(1 - a) eps) / sqrt(a) clipped to [-1, 1], the noise recomputed from the clipped x0,
    x' = sqrt(a') x0 + sqrt(1 - a') eps, a' = 1 after the last step."""
    alphas = noise_schedule("train").alphas_cumprod.double()
    stride = len(alphas) // steps
    labels = torch.tensor(classes)
    x = torch.stack([torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(seed + i))
                     for i in range(len(classes))]).double()
    with torch.no_grad():
        for t in range((steps - 1) * stride, -1, -stride):
            eps = model(x.float(), torch.full((len(classes),), t), class_labels=labels, return_dict=False)[0].double()
            a, a_next = alphas[t], alphas[t - stride] if t - stride >= 0 else torch.tensor(1.0, dtype=torch.float64)
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            if recompute_noise:
                eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x.clamp(-1, 1).float()


def test_guidance_one_is_the_conditional_prediction(tiny):
    got = sample(tiny, [1, 7], steps=5, guidance=1.0, seed=2)
    torch.testing.assert_close(got, reference_conditional(tiny, [1, 7], 5, 2), atol=1e-4, rtol=1e-4)
    # the clipping reaches the noise: stepping with the raw noise instead gives other images
    assert (got - reference_conditional(tiny, [1, 7], 5, 2, recompute_noise=False)).abs().max() > 1e-2


def test_one_batched_call_of_both_halves_per_step(tiny):
    calls = []
    handle = tiny.register_forward_hook(lambda m, args, kwargs, out: calls.append(
        (args[0].shape[0], kwargs["class_labels"].tolist())), with_kwargs=True)
    try:
        sample(tiny, [2, 4, 6], steps=7, guidance=2.0, seed=0)
    finally:
        handle.remove()
    assert len(calls) == 7
    assert all(n == 6 and labels == [2, 4, 6, NULL_CLASS, NULL_CLASS, NULL_CLASS] for n, labels in calls)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_each_sample_independent_of_its_batch(tiny, eta):
    batch = sample(tiny, [0, 5, 8], steps=4, guidance=2.0, seed=10, eta=eta)
    for i, c in enumerate([0, 5, 8]):
        alone = sample(tiny, [c], steps=4, guidance=2.0, seed=10 + i, eta=eta)
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(sample(tiny, [0], steps=4, seed=0, eta=1.0), sample(tiny, [0], steps=4, seed=0, eta=0.0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps=0 is invalid"), (dict(steps=1001), "steps=1001 is invalid"),
    (dict(steps=2.5), "steps=2.5 is invalid"), (dict(guidance=-1.0), "guidance=-1.0 is invalid"),
    (dict(guidance=float("nan")), "guidance=nan is invalid"), (dict(eta=2.0), "eta=2.0 is invalid"),
    (dict(seed=-1), "seed=-1 is invalid"), (dict(classes=[10]), "classes holds 10"),
    (dict(classes=[-1]), "classes holds -1"), (dict(classes=[]), r"classes=\[\] is invalid"),
    (dict(classes=[[1]]), "classes=.*is invalid"), (dict(classes=[0.5]), "classes=.*is invalid"),
])
def test_sample_refuses_bad_input(tiny, kwargs, match):
    args = {"classes": [1], "steps": 2, **kwargs}
    calls = []
    handle = tiny.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ConfigError, match=match):
            sample(tiny, **args)
    finally:
        handle.remove()
    assert not calls  # refused before any compute


@pytest.mark.filterwarnings("ignore:You are trying to")
def test_training_lowers_the_loss_and_drops_labels():
    torch.manual_seed(0)
    module = DiffusionModule(create_fmnist_diffusion(**TINY), noise_schedule("train"),
                             DiffusionOptim(lr=1e-3, warmup_steps=0), class_dropout=0.5, ema_decay=0.9)
    images = torch.rand(8, 1, 28, 28) * 2 - 1
    labels = torch.arange(8)
    g = torch.Generator().manual_seed(0)
    noise, steps = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 1000, (8,), generator=g)
    opt = module.configure_optimizers()["optimizer"]
    with torch.no_grad():
        before = module.loss(module.model, images, labels, noise, steps).item()
    seen = []
    hook = module.model.register_forward_hook(lambda m, a, k, o: seen.append(k["class_labels"].clone()),
                                              with_kwargs=True)
    ema_before = [p.clone() for p in module.ema.parameters()]
    module.train()
    for _ in range(15):
        loss = module.training_step((images, labels), 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        module.on_train_batch_end(None, None, 0)
    hook.remove()
    with torch.no_grad():
        after = module.loss(module.model, images, labels, noise, steps).item()
    assert after < 0.8 * before
    dropped = torch.cat(seen)
    assert (dropped == NULL_CLASS).any() and (dropped == torch.arange(8).repeat(15)).sum() > 30
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, module.ema.parameters(), strict=True))
    assert module.sampling_model is module.ema.module


def test_loss_noises_as_the_schedule_does():
    schedule = noise_schedule("train", beta_schedule="cosine")
    module = DiffusionModule(create_fmnist_diffusion(**TINY), schedule, ema_decay=None)
    images, noise = torch.rand(4, 1, 28, 28) * 2 - 1, torch.randn(4, 1, 28, 28)
    steps = torch.tensor([0, 10, 500, 999])
    seen = {}

    def echo(noisy, timesteps, class_labels, return_dict):  # predicts its input, which the test reads back
        seen["timesteps"], seen["labels"] = timesteps, class_labels
        return (noisy,)

    loss = module.loss(echo, images, torch.arange(4), noise, steps)
    expected = schedule.add_noise(images, noise, steps)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(expected, noise))
    assert torch.equal(seen["timesteps"], steps) and torch.equal(seen["labels"], torch.arange(4))
    assert module.sampling_model is module.model


def test_token_merging_acts_on_every_block_under_guidance():
    import tokenreduce

    torch.manual_seed(0)
    model = create_fmnist_diffusion(**TINY).eval()
    plain = sample(model, [1, 2], steps=3, seed=0)
    tokenreduce.apply(model, "tomesd", ratio=0.5, seed=0)
    try:
        merged = sample(model, [1, 2], steps=3, seed=0)
        stats = tokenreduce.stats(model)
        assert [b["tokens"] for b in stats["blocks"]] == [196, 196]
        assert [b["attn"] for b in stats["blocks"]] == [98, 98]  # the default merges half at every block
        assert merged.shape == plain.shape and not torch.equal(merged, plain)
    finally:
        tokenreduce.remove(model)


def test_module_refuses_bad_settings():
    model = create_fmnist_diffusion(**TINY)
    with pytest.raises(ConfigError, match="class_dropout=1.5"):
        DiffusionModule(model, noise_schedule("train"), class_dropout=1.5)
    with pytest.raises(ConfigError, match="ema_decay=1 is invalid"):
        DiffusionModule(model, noise_schedule("train"), ema_decay=1)
    with pytest.raises(ConfigError, match="lr=0"):
        DiffusionOptim(lr=0)
    with pytest.raises(ConfigError, match="betas"):
        DiffusionOptim(betas=(0.9,))


SMALL = ["experiment=train_fmnist_diffusion", "trainer.max_steps=2", "trainer.accelerator=cpu",
         "trainer.precision=32-true", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
         "data.batch_size=4", "data.eval_batch_size=4", "data.val_size=8", "diffusion.model.num_layers=1",
         "diffusion.model.num_attention_heads=2", "diffusion.model.attention_head_dim=16",
         "diffusion.samples.per_class=1", "diffusion.samples.steps=2", "diffusion.optim.warmup_steps=1"]


def test_experiment_runs_in_process(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli(monkeypatch, *SMALL, f"hydra.run.dir={tmp_path}")
    record = json.loads((tmp_path / "diffusion.json").read_text())
    assert record["global_step"] == 2 and record["val_loss"] > 0
    assert (tmp_path / "samples.png").is_file()
    assert record["checkpoints"]["last"] and record["checkpoints"]["best"]
    from PIL import Image

    assert Image.open(tmp_path / "samples.png").size == (28, 280)
    # the sampling (EMA) weights, as shipped: the same as the last checkpoint's
    from tokenreduce.models.fmnist_diffusion import load_fmnist_diffusion

    shipped = load_fmnist_diffusion(tmp_path / record["weights"], num_layers=1, num_attention_heads=2,
                                    attention_head_dim=16)
    last = load_fmnist_diffusion(record["checkpoints"]["last"])
    for (name, a), b in zip(shipped.state_dict().items(), last.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_experiment_resumes_from_its_last_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli(monkeypatch, *SMALL, f"hydra.run.dir={tmp_path / 'first'}")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2
    assert any(k.startswith("ema.") for k in saved["state_dict"])  # the average is resumed too
    cli(monkeypatch, *SMALL, "trainer.max_steps=3", f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'second'}")
    record = json.loads((tmp_path / "second" / "diffusion.json").read_text())
    assert record["global_step"] == 3  # one more step, not three from the start


@pytest.mark.parametrize("override, match", [
    ("+diffusion.lr=1", "diffusion.lr is not a setting"),
    ("diffusion.optim.lr=-1", "lr=-1 is invalid"),
    ("diffusion.model.num_layers=0", "num_layers=0 is invalid"),
    ("diffusion.schedule.beta_schedule=quad", "beta_schedule='quad'"),
    ("checkpoint.monitor=val/top1", "checkpoint.monitor='val/top1'"),
    ("diffusion.class_dropout=2", "class_dropout=2 is invalid"),
    ("diffusion.ema_decay=1", "ema_decay=1 is invalid"),
    ("diffusion.samples.steps=1001", "steps=1001 is invalid"),
    ("diffusion.samples.guidance=-1", "guidance=-1 is invalid"),
    ("data.root=/nonexistent", "data.root=/nonexistent"),
    ("optim.lr=1", "optim.lr=1 is not used by task=train_diffusion"),
])
def test_experiment_refuses_bad_settings(monkeypatch, tmp_path, capsys, override, match):
    with pytest.raises(SystemExit) as err:
        cli(monkeypatch, *SMALL, override, f"hydra.run.dir={tmp_path}")
    assert err.value.code == 2  # a ConfigError, said in one line
    assert match in capsys.readouterr().err
    assert not (tmp_path / "diffusion.json").exists()


@pytest.mark.parametrize("decay", ["constant", "cosine"])
def test_learning_rate_schedules(decay):
    from types import SimpleNamespace

    module = DiffusionModule(create_fmnist_diffusion(num_layers=1, num_attention_heads=2, attention_head_dim=16),
                             noise_schedule("train"), DiffusionOptim(lr=1e-3, warmup_steps=10, decay=decay, min_lr=1e-4))
    module._trainer = SimpleNamespace(estimated_stepping_batches=110)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    factors = [scheduler.lr_lambdas[0](step) for step in (5, 10, 60, 110)]
    if decay == "constant":
        assert factors == pytest.approx([6 / 11, 1.0, 1.0, 1.0])
    else:  # linear from 0 over 10 steps, then half a cosine from 1e-3 to 1e-4 over the other 100
        assert factors == pytest.approx([0.5, 1.0, 0.55, 0.1])
    with pytest.raises(ConfigError, match="decay='linear' is invalid"):
        DiffusionOptim(decay="linear")
    with pytest.raises(ConfigError, match="min_lr"):
        DiffusionOptim(lr=1e-4, min_lr=1e-3)
