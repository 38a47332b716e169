"""`fmnist_vit`: the project's own ViT, trained on Fashion-MNIST by `experiment=train_fmnist_vit`.

A timm `VisionTransformer` for 1-channel 32x32 input (the 28x28 images zero-padded): 4x4 patches,
so 64 patch tokens and a class token, 8 blocks of width 128 with 4 heads. Registered with timm, so
`timm.create_model("fmnist_vit", pretrained=True)` loads the weights shipped in this package, and
timm's standard evaluation transform pads a 28x28 image as the project does (`crop_pct`).
"""

from __future__ import annotations

from pathlib import Path

from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

WEIGHTS = Path(__file__).resolve().parent / "weights" / "fmnist_vit.safetensors"
# Fashion-MNIST's pixel mean and std over the 60,000 training images (on the 0..1 scale)
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
ARCH = dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=8, num_heads=4,
            mlp_ratio=4.0)

default_cfgs = generate_default_cfgs({
    "fmnist_vit.tr_fmnist": {
        "file": str(WEIGHTS),
        "num_classes": 10,
        "input_size": (1, 32, 32),
        "fixed_input_size": True,
        "interpolation": "bilinear",
        # timm's eval transform resizes to floor(32 / crop_pct) = 28, a no-op on a 28x28 image, then
        # center-crops to 32, which pads 2 zero pixels each side: the padding the model was trained with
        "crop_pct": 32 / 28,
        "mean": FMNIST_MEAN,
        "std": FMNIST_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "label_names": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                        "Bag", "Ankle boot"),
        "license": "apache-2.0",
        "description": "tokenreduce's ViT trained from scratch on Fashion-MNIST (docs/models.md)",
    },
})


@register_model
def fmnist_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return build_model_with_cfg(VisionTransformer, "fmnist_vit", pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **{**ARCH, **kwargs})
