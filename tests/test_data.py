"""The datamodules: synthetic images and ImageNet-layout folders with the model's transforms."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from PIL import Image, ImageFile

from tokenreduce.data import (
    ImageFolderDataModule,
    SyntheticDataModule,
    SyntheticImages,
    check_split,
    model_data_config,
)
from tokenreduce.data.folder import UnreadableImageError, load_rgb
from tokenreduce.errors import ConfigError


def test_synthetic_images_are_reproducible_and_disjoint():
    a = SyntheticImages(6, 3, (3, 8, 8), seed=1)
    b = SyntheticImages(6, 3, (3, 8, 8), seed=1)
    for i in range(6):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
        assert 0 <= a[i][1] < 3
    later = SyntheticImages(6, 3, (3, 8, 8), seed=1, first_index=6)
    assert not any(torch.equal(a[i][0], later[j][0]) for i in range(6) for j in range(6))
    assert not torch.equal(a[0][0], SyntheticImages(6, 3, (3, 8, 8), seed=2)[0][0])
    with pytest.raises(IndexError):
        a[6]


def test_synthetic_image_is_noise_plus_its_class_pattern():
    clean = SyntheticImages(4, 2, (3, 4, 4), seed=0, signal=0.0)
    strong = SyntheticImages(4, 2, (3, 4, 4), seed=0, signal=2.5)
    for i in range(4):
        (noise, label), (image, label_again) = clean[i], strong[i]
        assert label == label_again
        assert torch.allclose(image, noise + 2.5 * strong.pattern(label))
    # every image of one class carries the same pattern
    assert torch.equal(strong.pattern(1), SyntheticImages(9, 2, (3, 4, 4), seed=0, first_index=50).pattern(1))


def test_synthetic_datamodule_takes_size_and_classes_from_the_model():
    model = timm.create_model("test_vit", img_size=48, num_classes=7)
    dm = SyntheticDataModule(train_samples=10, val_samples=5, batch_size=4)
    dm.bind_model(model)
    assert dm.input_size == (3, 48, 48) and dm.num_classes == 7
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 2  # incomplete training batches are dropped
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 48, 48) and labels.dtype == torch.int64
    too_many = SyntheticDataModule(num_classes=9)
    with pytest.raises(ConfigError, match="data.num_classes=9 exceeds the model's 7"):
        too_many.bind_model(model)
    with pytest.raises(ConfigError, match="data.batch_size=0"):
        SyntheticDataModule(batch_size=0)
    with pytest.raises(ConfigError, match="train_samples=2 is smaller than data.batch_size=4"):
        SyntheticDataModule(train_samples=2, batch_size=4).check("fit")


def make_folder(root: Path, classes=("dog", "cat"), per_class=3, size=(50, 40)) -> Path:
    for split in ("train", "val"):
        for i, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for j in range(per_class):
                Image.new("RGB", size, (60 * i, 30 * j, 90)).save(root / split / name / f"img{j}.jpg")
    return root


def test_check_split_names_the_path_and_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.root is not set; set data.root="):
        check_split(None, "val")
    with pytest.raises(ConfigError, match=f"data.root={tmp_path}: the folder {tmp_path / 'val'} does not exist"):
        check_split(str(tmp_path), "val")
    (tmp_path / "val").mkdir()
    with pytest.raises(ConfigError, match="has no class folders"):
        check_split(str(tmp_path), "val")
    (tmp_path / "val" / "cls").mkdir()
    # one class would make any classifier right: refused, rather than model.num_classes=1 recommended
    with pytest.raises(ConfigError, match=r"has 1 class folder \(cls\); allowed: at least 2 class folders"):
        check_split(str(tmp_path), "val")
    (tmp_path / "val" / "other").mkdir()
    (tmp_path / "val" / "cls" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="hold no images"):
        check_split(str(tmp_path), "val")
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "cls" / "a.png")
    assert check_split(str(tmp_path), "val") == tmp_path / "val"


def test_image_folder_uses_the_model_transforms_and_sorted_labels(tmp_path):
    root = make_folder(tmp_path)
    model = timm.create_model("test_vit", img_size=32, num_classes=2)
    dm = ImageFolderDataModule(root=str(root), batch_size=2, num_workers=0,
                               augment={"scale": [0.5, 1.0], "hflip": 0.5, "re_prob": 0.25})
    dm.check("fit")
    dm.bind_model(model)
    assert dm.data_config["input_size"] == (3, 32, 32)
    assert dm.data_config["mean"] == model.pretrained_cfg["mean"]
    dm.setup("fit")
    assert dm.val_set.class_to_idx == {"cat": 0, "dog": 1}  # sorted folder names, as ImageNet's synsets
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 32)
    val_images, _ = next(iter(dm.val_dataloader()))
    # evaluation: resize + center crop + normalise with the model's mean and std (0.5 for test_vit)
    image = Image.open(root / "val" / "cat" / "img0.jpg")
    expected = dm.val_set.transform(image)
    assert torch.allclose(val_images[0], expected)
    assert val_images.min() >= -1.0 - 1e-6 and val_images.max() <= 1.0 + 1e-6


def test_image_folder_checks_the_head_against_the_classes(tmp_path):
    root = make_folder(tmp_path, classes=("a", "b", "c"))
    dm = ImageFolderDataModule(root=str(root), num_workers=0)
    with pytest.raises(ConfigError, match="has 3 classes but the model has 10; set model.num_classes=3"):
        dm.bind_model(timm.create_model("test_vit", img_size=32, num_classes=10))
    missing = ImageFolderDataModule(root=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="data.root=.*nope.*does not exist"):
        missing.check("validate")
    only_val = tmp_path / "only_val"
    make_folder(only_val)
    import shutil

    shutil.rmtree(only_val / "train")
    evaluation = ImageFolderDataModule(root=str(only_val))
    evaluation.check("validate")  # evaluation reads only val
    with pytest.raises(ConfigError, match="train does not exist"):
        evaluation.check("fit")


def truncated_folder(root: Path) -> Path:
    """A folder of noisy JPEGs whose val/cat/img0.jpg lost the last half of its bytes (its header intact)."""
    make_folder(root)
    noise = torch.randint(0, 256, (40, 50, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    bad = root / "val" / "cat" / "img0.jpg"
    Image.fromarray(noise.numpy()).save(bad)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return bad


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_is_an_error_naming_its_file(tmp_path, workers):
    bad = truncated_folder(tmp_path)
    dm = ImageFolderDataModule(root=str(tmp_path), batch_size=8, num_workers=workers)
    dm.bind_model(timm.create_model("test_vit", img_size=32, num_classes=2))
    dm.setup("validate")
    with pytest.raises(UnreadableImageError, match=f"the image {bad} cannot be read .*truncated") as caught:
        next(iter(dm.val_dataloader()))
    assert isinstance(caught.value, ConfigError) and "\n" not in str(caught.value)  # one line, from a worker too


def test_load_truncated_images_does_not_let_a_truncated_image_pass(tmp_path, monkeypatch):
    bad = truncated_folder(tmp_path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(UnreadableImageError, match=f"the image {bad} cannot be read"):
        load_rgb(str(bad))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the setting is left as it was
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(UnreadableImageError, match="notes.jpg cannot be read"):
        load_rgb(str(tmp_path / "notes.jpg"))
    good = load_rgb(str(tmp_path / "val" / "cat" / "img1.jpg"))
    assert good.mode == "RGB" and good.size == (50, 40)


def test_model_data_config_follows_img_size():
    assert model_data_config(timm.create_model("test_vit"))["input_size"] == (3, 160, 160)
    assert model_data_config(timm.create_model("test_vit", img_size=64))["input_size"] == (3, 64, 64)
