"""The fast paths (named options, off by default) against the default path they stand in for, held to the same
detections rather than to the bits: gdino.fast_inference sums in another order, so its logits move by ~1e-5 and
near-tied encoder tokens may swap ranks, which hands those two proposals each other's query embedding. Bars: every
detection of the default found again (IoU >= 0.99, score within 1e-3) on the shipped shapes model, and the default's
20 best queries (by their best logit: random weights saturate the sigmoid) found again on the real-config test
weights (IoU >= 0.99)."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import gdino_reference as R
import torch
from conftest import DATA, hub_config

import common
import gdino

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "notebooks"))
import shapes  # noqa: E402

CATS = DATA / "coco_000000039769.png"
SCENE = ROOT / "notebooks" / "models" / "shapes_scene.png"


def assert_found_again(ref: dict, fast: dict, score_tol: float = 1e-3) -> None:
    """Every reference box has a fast box with IoU >= 0.99, the same label and a score within score_tol."""
    iou = common.box_iou(ref["boxes"], fast["boxes"])[0]  # (n_ref, n_fast)
    for i in range(len(ref["boxes"])):
        ok = (iou[i] >= 0.99) & ((fast["scores"] - ref["scores"][i]).abs() <= score_tol)
        ok &= torch.tensor([lab == ref["labels"][i] for lab in fast["labels"]], dtype=torch.bool)
        assert ok.any(), f"detection {i} ({ref['labels'][i]}, {float(ref['scores'][i]):.4f}) not found again"


def test_gdino_fast_finds_every_default_detection_on_the_shapes_model():
    model = gdino.GroundingDino.from_pretrained(ROOT / "notebooks" / "models" / "gdino-shapes")
    fast = gdino.fast_inference(copy.deepcopy(model))
    prompt = ". ".join(shapes.SHAPE_PHRASES) + "."
    images = [SCENE] + [shapes.shape_scene(s)["image"] for s in range(shapes.TEST_SEED, shapes.TEST_SEED + 4)]
    ref, got = model.detect(images, prompt, threshold=0.3), fast.detect(images, prompt, threshold=0.3)
    for r, g in zip(ref, got):
        assert_found_again(r, g)
    print("default detections per image:", [len(r["boxes"]) for r in ref], "fast:", [len(g["boxes"]) for g in got])
    assert sum(len(r["boxes"]) for r in ref) >= 10  # enough detections for the test to prove something


def test_gdino_fast_finds_the_default_top20_on_the_tiny_test_weights():
    folder = R.checkpoint("gdino-tiny", hub_config("grounding-dino-tiny"), hub_layout=True)
    model = gdino.GroundingDino.from_pretrained(folder)
    fast = gdino.fast_inference(copy.deepcopy(model))
    pixel_values, pixel_mask, _ = gdino.preprocess_images([CATS], 320, 533)
    inputs = {"pixel_values": pixel_values, "pixel_mask": pixel_mask,
              **gdino.tokenize(model.tokenizer, ["a cat. a remote control."])}
    with torch.inference_mode():
        ref, got = model(**inputs), fast(**inputs)
    T = inputs["input_ids"].shape[1]
    best = ref.logits[0, :, :T].max(-1).values.topk(20).indices  # (20,)
    mine = got.logits[0, :, :T].max(-1).values.topk(20).indices
    iou = common.box_iou(common.center_to_corners(ref.pred_boxes[0, best]),
                         common.center_to_corners(got.pred_boxes[0, mine]))[0]  # (20, 20)
    assert iou.max(1).values.min() >= 0.99, iou.max(1).values
    assert (ref.logits - got.logits)[torch.isfinite(ref.logits)].abs().max() > 0  # another path, not the default's



def test_torch_compile_sees_each_forward_as_one_graph():
    """torch.compile(model) traces forward whole (fullgraph: a graph break would raise): the Numba kernel is left
    out of the graph for the readable deformable attention and the tokenizer's ids are read once, as constants.
    Dynamo's own "eager" backend runs the traced graph op for op, so it gives the eager model's bits."""
    import dfine
    from dfine_reference import checkpoint

    torch._dynamo.reset()
    model = dfine.DFine.from_pretrained(checkpoint("n"))
    px = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(px), torch.compile(model, backend="eager", fullgraph=True)(px)
    assert torch.equal(ref.logits, got.logits) and torch.equal(ref.pred_boxes, got.pred_boxes)
    size = {"shortest_edge": 320, "longest_edge": 533}  # the tests' small checkpoint, as tests/test_gdino.py builds it
    folder = R.checkpoint("gdino-small", R.small_config(), temper=True, size=size)
    model = gdino.GroundingDino.from_pretrained(folder)
    pixel_values, pixel_mask, _ = gdino.preprocess_images([CATS], 320, 533)
    inputs = {"pixel_values": pixel_values, "pixel_mask": pixel_mask, **gdino.tokenize(model.tokenizer, ["a cat."])}
    with torch.no_grad():
        ref, got = model(**inputs), torch.compile(model, backend="eager", fullgraph=True)(**inputs)
    assert torch.equal(ref.logits, got.logits) and torch.equal(ref.pred_boxes, got.pred_boxes)
