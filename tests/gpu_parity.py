"""Both models on one device against transformers on the same device and weights: max abs differences, printed.

Run by tests/gpu_check.sh. fp32 with TF32 off; bf16 and fp16 with transformers' deformable sampling made float32 as
ours is (common.ms_deform_attn; see tests/test_inference.py). One line per (model, backend, dtype): the max abs
difference of the logits and of the boxes, and whether the top-k query selection is the same. Nothing is asserted:
the figures go to the README. `--quick`: the tests' small Grounding DINO at 320 px and D-FINE nano on a 256 crop.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import common  # noqa: E402
import dfine  # noqa: E402
import gdino  # noqa: E402
import gdino_reference as R  # noqa: E402
from conftest import DATA, hub_config  # noqa: E402
from dfine_reference import checkpoint as dfine_checkpoint  # noqa: E402
from dfine_reference import hf_model  # noqa: E402
from PIL import Image  # noqa: E402
from test_inference import float32_sampling  # noqa: E402

CATS = DATA / "coco_000000039769.png"
PROMPT = "a cat. a remote control."


def diffs(a_logits, a_boxes, b_logits, b_boxes, a_topk=None, b_topk=None) -> str:
    fin = torch.isfinite(b_logits)
    lg = (a_logits.float()[fin] - b_logits.float()[fin]).abs().max().item()
    bx = (a_boxes.float() - b_boxes.float()).abs().max().item()
    same = "" if a_topk is None else f"  top-k {'same' if torch.equal(a_topk, b_topk) else 'DIFFERENT'}"
    return f"logits {lg:.3g}  boxes {bx:.3g}{same}"


@torch.no_grad()
def gdino_row(quick: bool, device: torch.device, backend: str, dtype: torch.dtype) -> str:
    folder = (R.checkpoint("gdino-small", R.small_config(), temper=True, size={"shortest_edge": 320,
                                                                             "longest_edge": 533}) if quick
              else R.checkpoint("gdino-tiny", hub_config("grounding-dino-tiny"), hub_layout=True))
    ours = gdino.GroundingDino.from_pretrained(folder, backend=backend, dtype=dtype).to(device)
    ref = R.load(folder, dtype).to(device)
    if dtype != torch.float32:
        float32_sampling(ref)
    size = {"shortest_edge": 320, "longest_edge": 533} if quick else {"shortest_edge": 800, "longest_edge": 1333}
    inputs = dict(R.processor()(images=Image.open(CATS), text=PROMPT, size=size, return_tensors="pt"))
    inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    mine = ours(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"],
                inputs["pixel_mask"], return_stages=True).stages
    theirs = R.run(ref, inputs)
    return diffs(mine["logits"], mine["pred_boxes"], theirs["logits"], theirs["pred_boxes"], mine["topk_indices"],
                 theirs["topk_indices"])


@torch.no_grad()
def dfine_row(quick: bool, device: torch.device, backend: str, dtype: torch.dtype) -> str:
    folder = dfine_checkpoint("n" if quick else "l")
    ours = dfine.DFine.from_pretrained(folder, backend=backend, dtype=dtype).to(device)
    ref = hf_model(folder).to(device, dtype)
    if dtype != torch.float32:
        float32_sampling(ref)
    px = dfine.preprocess([common.load_image(CATS)])
    px = (px[:, :, :256, :256] if quick else px).contiguous().to(device, dtype)
    a, b = ours(px), ref(pixel_values=px)
    return diffs(a.logits, a.pred_boxes, b.logits, b.pred_boxes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small models and inputs (a CPU dry run)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    ap.add_argument("--backends", nargs="+", default=["numba", "torch"], choices=common.BACKENDS)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # plain fp32
    device = torch.device(args.device)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    for name, row in (("gdino", gdino_row), ("dfine", dfine_row)):
        for backend in args.backends:
            for dtype in args.dtypes:
                print(f"{name:<6} {backend:<6} {dtype:<9} max abs diff vs transformers: "
                      f"{row(args.quick, device, backend, getattr(torch, dtype))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
