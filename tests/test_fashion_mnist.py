"""Fashion-MNIST: the IDX reader, the datamodule's shaping of images, and the shipped fmnist_vit."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import timm
import torch

from tokenreduce.data import FashionMNISTDataModule, read_idx
from tokenreduce.data.fashion_mnist import DEBIAN_ROOT, FILES, ShapeImages, load_split
from tokenreduce.errors import ConfigError
from tokenreduce.models.fmnist import WEIGHTS


def idx_bytes(array: torch.Tensor) -> bytes:
    """An IDX file written by hand: two zero bytes, the type code, the rank, big-endian sizes, data."""
    codes = {torch.uint8: (0x08, "B"), torch.int32: (0x0C, ">i"), torch.float32: (0x0D, ">f")}
    code, fmt = codes[array.dtype]
    header = bytes([0, 0, code, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    values = array.flatten().tolist()
    return header + b"".join(struct.pack(fmt, v) for v in values)


def write_split(folder: Path, split: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    image_file, label_file = FILES[split]
    (folder / image_file).write_bytes(gzip.compress(idx_bytes(images)))
    (folder / label_file).write_bytes(gzip.compress(idx_bytes(labels.to(torch.uint8))))


def tiny_dataset(folder: Path, train: int = 12, test: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", train), ("test", test)):
        images = torch.randint(0, 256, (count, 28, 28), generator=generator, dtype=torch.uint8)
        write_split(folder, split, images, torch.arange(count) % 10)
    return folder


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.float32])
@pytest.mark.parametrize("compressed", [True, False])
def test_idx_reader_reads_what_was_written(tmp_path, dtype, compressed):
    array = (torch.arange(24).reshape(2, 3, 4) * (3 if dtype != torch.uint8 else 1)).to(dtype)
    if dtype != torch.uint8:
        array = array - 30  # negative values check the sign of big-endian integers and floats
    raw = idx_bytes(array)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    back = read_idx(path)
    assert back.dtype == dtype and back.shape == (2, 3, 4)
    assert torch.equal(back, array)


def test_idx_reader_refuses_corrupt_files_naming_path_and_key(tmp_path):
    good = idx_bytes(torch.zeros(4, 28, 28, dtype=torch.uint8))
    cases = {
        "truncated.gz": gzip.compress(good)[:-9],  # a cut-off download
        "short.idx": good[:-5],  # fewer bytes than the header says
        "magic.idx": b"\x08\x03" + good[2:],
        "empty.idx": b"",
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ConfigError) as err:
            read_idx(path)
        assert str(path) in str(err.value) and "data.root" in str(err.value), name
    with pytest.raises(ConfigError, match="does not exist.*data.root"):
        read_idx(tmp_path / "missing.gz")


def test_missing_folder_names_the_key_and_the_package(tmp_path):
    dm = FashionMNISTDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"data.root=.*nowhere: no such folder.*dataset-fashion-mnist"):
        dm.check("test")
    with pytest.raises(ConfigError, match="data: val_size=70000 is invalid; allowed: an integer in \\[0, 59999\\]"):
        FashionMNISTDataModule(val_size=70000)
    with pytest.raises(ConfigError, match="data.scaling='crop' is invalid"):
        FashionMNISTDataModule(scaling="crop")


def test_labels_and_images_must_agree(tmp_path):
    folder = tiny_dataset(tmp_path / "fm")
    write_split(folder, "test", torch.zeros(5, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="expected \\[N, 28, 28\\] images and N labels"):
        load_split(folder, "test")


def test_splits_hold_out_validation_from_training(tmp_path):
    folder = tiny_dataset(tmp_path / "fm", train=12, test=6)
    model = timm.create_model("fmnist_vit")
    dm = FashionMNISTDataModule(root=str(folder), val_size=4, test_samples=5, batch_size=4, eval_batch_size=3)
    dm.check("fit")
    dm.bind_model(model)
    dm.setup("fit")
    train_images, _ = load_split(folder, "train")
    assert len(dm.train_set) == 8 and len(dm.val_set) == 4 and len(dm.test_set) == 5
    assert torch.equal(dm.val_set.images, train_images[8:])  # the last val_size training images
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (3, 1, 32, 32) and labels.tolist() == [0, 1, 2]
    assert len(dm.train_dataloader()) == 2  # incomplete training batches are dropped
    other = timm.create_model("test_vit", num_classes=7)
    with pytest.raises(ConfigError, match="model.num_classes=10"):
        dm.bind_model(other)


def test_training_batches_resume_with_the_same_images_and_augmentation(tmp_path):
    folder = tiny_dataset(tmp_path / "fm", train=24, test=4)
    dm = FashionMNISTDataModule(root=str(folder), val_size=4, batch_size=4)
    dm.bind_model(timm.create_model("fmnist_vit"))
    dm.setup("fit")
    dm.shuffle_seed = 5
    loader = dm.train_dataloader()
    loader.order.set_epoch(2)
    whole = list(loader)
    assert len(whole) == 5
    torch.manual_seed(99)  # the process's own random state plays no part in the augmentation
    iterator = iter(dm.train_dataloader())
    next(iterator)  # a fresh loader at epoch 0: a different order from epoch 2
    resumed = dm.train_dataloader()
    resumed.load_state_dict({"epoch": 2, "batches": 3})
    rest = list(resumed)
    assert len(rest) == 2
    for (images, labels), (want_images, want_labels) in zip(rest, whole[3:], strict=True):
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    shuffled = dm.train_dataloader()
    shuffled.order.set_epoch(3)
    assert not torch.equal(next(iter(shuffled))[0], whole[0][0])


def test_padding_centres_the_image_and_normalises():
    shaper = ShapeImages((1, 32, 32), mean=(0.5,), std=(0.25,), scaling="pad")
    image = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    out = shaper(image)
    expected = torch.full((2, 1, 32, 32), (0 - 0.5) / 0.25)
    expected[:, 0, 2:30, 2:30] = (image.float() / 255 - 0.5) / 0.25
    assert torch.allclose(out, expected, atol=1e-6)


def test_resizing_to_a_colour_model_repeats_channels_with_their_own_statistics():
    shaper = ShapeImages((3, 56, 56), mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 4.0), scaling="auto")
    assert shaper.scaling == "resize"
    image = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    out = shaper(image)
    assert out.shape == (1, 3, 56, 56)
    for c, (m, s) in enumerate(((0.1, 1.0), (0.2, 2.0), (0.3, 4.0))):
        assert torch.allclose(out[0, c], torch.full((56, 56), (1 - m) / s), atol=1e-5)
    with pytest.raises(ConfigError, match="scaling=pad needs a model input of at least 28x28"):
        ShapeImages((1, 16, 16), (0.5,), (0.5,), scaling="pad")


def test_training_shift_and_flip_move_pixels_without_changing_them():
    image = torch.zeros(64, 28, 28, dtype=torch.uint8)
    image[:, 10, 13] = 255  # one bright pixel
    shaper = ShapeImages((1, 28, 28), mean=(0.0,), std=(1.0,), scaling="pad", shift=2, hflip=0.5)
    out = shaper(image, training=True, generator=torch.Generator().manual_seed(0))
    rows, cols = [], []
    for sample in out[:, 0]:
        where = (sample == 1).nonzero()
        assert len(where) == 1 and float(sample.sum()) == 1.0  # one pixel, moved, nothing else
        rows.append(int(where[0, 0]))
        cols.append(int(where[0, 1]))
    # a flip sends column 13 to 14; then a shift of at most 2 pixels either way
    assert set(rows) <= set(range(8, 13)) and set(cols) <= set(range(11, 17))
    assert len(set(rows)) > 1 and len(set(cols)) > 1
    assert torch.equal(shaper(image), shaper(image))  # evaluation is deterministic


@pytest.mark.skipif(not Path(DEBIAN_ROOT, FILES["test"][0]).is_file(),
                    reason=f"Fashion-MNIST is not installed in {DEBIAN_ROOT} (apt-get install dataset-fashion-mnist)")
def test_real_files_read_and_the_shipped_model_classifies_them():
    images, labels = load_split(DEBIAN_ROOT, "test")
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [1000] * 10
    assert WEIGHTS.is_file(), f"the shipped weights {WEIGHTS} are missing"
    model = timm.create_model("fmnist_vit", pretrained=True).eval()
    dm = FashionMNISTDataModule(test_samples=200, eval_batch_size=200)
    dm.bind_model(model)
    dm.setup("test")
    batch, targets = next(iter(dm.test_dataloader()))
    with torch.inference_mode():
        accuracy = (model(batch).argmax(-1) == targets).float().mean().item()
    assert accuracy >= 0.80, accuracy


def test_download_is_skipped_when_the_files_are_there(tmp_path, monkeypatch):
    import torchvision.datasets

    folder = tiny_dataset(tmp_path / "fm")

    def no_network(*args, **kwargs):
        raise AssertionError("download attempted although every file is present")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_network)
    images, labels = load_split(folder, "test", download=True)
    assert images.shape == (6, 28, 28) and labels.tolist() == [0, 1, 2, 3, 4, 5]
