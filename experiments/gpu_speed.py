"""One call on a GPU machine: the CUDA tests, then ViT-B/16 and ViT-L/16 in bfloat16 at batch 1, 32
and 256, unreduced, ours (ToMe through tokenreduce), a blocks-patching ToMe (the original code's
approach, written here for comparison) and the limit (SpeedLimit: the same token counts taken by
slicing), eager and under torch.compile.

    python experiments/gpu_speed.py --out DIR [--models vit_base_patch16_224 vit_large_patch16_224]
        [--batches 1 32 256] [--r 13] [--rounds 10] [--compile-batches 256] [--no-tests]
        [--device cuda] [--dtype bfloat16]

`--device cpu --dtype float32` measures the same comparison on the CPU (the CUDA tests then skip).

Writes DIR/gpu_speed.json (rows, device and versions) and DIR/gpu_speed.md (the table), and prints
the table. Every case of one (model, batch, compiled) is timed in the same interleaved rounds;
`of limit` is a case's speedup over the limit's, `vs blocks` its images/s over the blocks-patching
ToMe's. `--smoke` runs a tiny model on the CPU, for the test that keeps this script working.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch

import tokenreduce
from tokenreduce.engine.speed import compiling_many, images_per_second, interleaved_model_times
from tokenreduce.reducers.limit import SpeedLimit

ROOT = Path(__file__).resolve().parents[1]
CUDA_TESTS = ["tests/test_cuda.py", "tests/test_attention.py"]


# --- the blocks-patching ToMe: each timm Block's forward replaced, the model loop left alone -------
def _bipartite_merge(x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, r: int):
    """Merge the r best A->B pairs (A = even tokens, B = odd; token 0, the class token, never a
    source): size-weighted, with gathers and one scatter-add on the halves of the sequence."""
    metric = keys / keys.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, 0] = -float("inf")
    best, partner = scores.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)
    merged, kept = ranked[:, :r], ranked[:, r:].sort(dim=-1).values
    target = partner.gather(1, merged)
    weighted = torch.cat([x * size, size], dim=-1)
    width = weighted.shape[-1]
    src, dst = weighted[:, ::2], weighted[:, 1::2]
    out_a = src.gather(1, kept.unsqueeze(-1).expand(-1, -1, width))
    moved = src.gather(1, merged.unsqueeze(-1).expand(-1, -1, width))
    dst = dst.scatter_add(1, target.unsqueeze(-1).expand(-1, -1, width), moved)
    out = torch.cat([out_a, dst], dim=1)
    return (out[..., :-1] / out[..., -1:]).to(x.dtype), out[..., -1:]


def patch_blocks_tome(model: torch.nn.Module, r: int) -> torch.nn.Module:
    """ToMe as a patch of each block (the way the original code places it): the size rides on the
    model between blocks and resets at every forward."""
    import types

    import torch.nn.functional as F

    state = {"size": None}

    def block_forward(self, x, attn_mask=None, is_causal=False):
        size = state["size"] if state["size"] is not None else x.new_ones(x.shape[0], x.shape[1], 1, dtype=torch.float32)
        attn = self.attn
        h = self.norm1(x)
        b, n, _ = h.shape
        q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = size.log().to(x.dtype).transpose(1, 2).unsqueeze(1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, n, -1)
        x = x + self.ls1(attn.proj(y))
        step = min(r, (n - 1) // 2)
        if step > 0:
            x, size = _bipartite_merge(x, size, k.mean(dim=1), step)
        state["size"] = size
        return x + self.ls2(self.mlp(self.norm2(x)))

    original_forward = model.forward_features

    def forward_features(self, x, **kwargs):
        state["size"] = None
        return original_forward(x, **kwargs)

    for blk in model.blocks:
        blk.forward = types.MethodType(block_forward, blk)
    model.forward_features = types.MethodType(forward_features, model)
    return model


# --- timing --------------------------------------------------------------------------------------------
def build_cases(model_name: str, r: int, images: torch.Tensor, device: str, dtype: torch.dtype) -> dict:
    def fresh():
        torch.manual_seed(0)
        return timm.create_model(model_name, pretrained=False).to(device=device, dtype=dtype).eval()

    ours = tokenreduce.apply(fresh(), "tome", r=r)
    with torch.inference_mode():
        ours(images)
    limit = tokenreduce.apply(fresh(), SpeedLimit.of(ours._tokenreduce.last_state))
    return {"unreduced": fresh(), "ours": ours, "blocks": patch_blocks_tome(fresh(), r), "limit": limit}


def time_cases(cases: dict, images: torch.Tensor, rounds: int) -> dict[str, float]:
    with torch.inference_mode():
        times = interleaved_model_times(list(cases.values()), images, warmup=2, rounds=rounds)
    return {name: images_per_second(len(images), t) for name, t in zip(cases, times, strict=True)}


def measure(model_name: str, batch: int, r: int, rounds: int, compiled: bool, device: str, dtype: torch.dtype,
            img_size: int) -> dict:
    images = torch.randn(batch, 3, img_size, img_size, device=device, dtype=dtype)
    cases = build_cases(model_name, r, images, device, dtype)
    with torch.inference_mode():
        reference = cases["ours"](images).float()
        blocks_diff = (cases["blocks"](images).float() - reference).abs().max().item()
    started = time.perf_counter()
    if compiled:
        cases = {name: torch.compile(model, dynamic=False) for name, model in cases.items()}
    with compiling_many(len(cases)):
        speed = time_cases(cases, images, rounds)
    base = speed["unreduced"]
    return {"model": model_name, "batch": batch, "compiled": compiled, "r": r, "images_per_s": speed,
            "speedup": {k: v / base for k, v in speed.items()},
            "of_limit": speed["ours"] / speed["limit"], "vs_blocks": speed["ours"] / speed["blocks"],
            "blocks_max_diff": blocks_diff, "seconds": round(time.perf_counter() - started, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| model | batch | compiled | unreduced img/s | ours | blocks-patching | limit | of limit | vs blocks |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        s = row["speedup"]
        lines.append(f"| {row['model']} | {row['batch']} | {row['compiled']} | {row['images_per_s']['unreduced']:.1f} "
                     f"| {s['ours']:.2f} | {s['blocks']:.2f} | {s['limit']:.2f} | {row['of_limit']:.3f} "
                     f"| {row['vs_blocks']:.3f} |")
    return "\n".join(lines)


def environment(device: str) -> dict:
    info = {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "device": device, "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "vit_large_patch16_224"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32, 256])
    parser.add_argument("--compile-batches", nargs="*", type=int, default=[256],
                        help="batch sizes also timed under torch.compile (each compile takes a while)")
    parser.add_argument("--r", type=int, default=13)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-tests", action="store_true")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, to check the script")
    args = parser.parse_args(argv)
    device, dtype, img_size = args.device, getattr(torch, args.dtype), 224
    if args.smoke:
        args.models, device, dtype, img_size = ["test_vit"], "cpu", torch.float32, 160
    elif device == "cuda" and not torch.cuda.is_available():
        print("gpu_speed: --device cuda but no CUDA device; allowed: a machine with a GPU, --device cpu or --smoke",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"environment": environment(device), "tests": None, "rows": []}
    if not args.no_tests:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", *CUDA_TESTS], cwd=ROOT, capture_output=True,
                              text=True)
        result["tests"] = {"returncode": done.returncode, "summary": done.stdout.strip().splitlines()[-1:]}
        print("CUDA tests:", *result["tests"]["summary"], flush=True)
    for model_name in args.models:
        for batch in args.batches:
            for compiled in [False] + ([True] if batch in args.compile_batches else []):
                row = measure(model_name, batch, args.r, args.rounds, compiled, device, dtype, img_size)
                result["rows"].append(row)
                print(table([row]).splitlines()[-1], flush=True)
    (args.out / "gpu_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gpu_speed.md").write_text(f"{json.dumps(result['environment'])}\n\n{table(result['rows'])}\n")
    print(table(result["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
