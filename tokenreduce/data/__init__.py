"""LightningDataModules: ImageNet-layout image folders and synthetic images for smoke runs.

Both are built from the `data` config before the model, so a wrong path fails before any download
or compute, and are then bound to the model (`bind_model`) for its input size and transforms.
"""

from tokenreduce.data.fashion_mnist import FashionMNISTDataModule, read_idx
from tokenreduce.data.folder import ImageFolderDataModule, check_split
from tokenreduce.data.synthetic import SyntheticDataModule, SyntheticImages
from tokenreduce.data.transforms import model_data_config

__all__ = ["FashionMNISTDataModule", "ImageFolderDataModule", "read_idx", "SyntheticDataModule", "SyntheticImages", "check_split", "model_data_config"]
