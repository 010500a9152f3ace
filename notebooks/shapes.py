"""Shape scenes as training batches and a COCO evaluation, for the small models trained here (train_*.ipynb) and
their tests (tests/test_shapes.py). The scenes themselves are common.shape_scene.

Seeds: training batch t uses scenes t*B .. t*B + B-1; validation scenes start at VAL_SEED, test scenes at TEST_SEED,
so the three never share an image. mAP comes from pycocotools (the COCO API), not from code of our own.
"""
from __future__ import annotations

import contextlib
import io
import math
import time
from typing import Callable

import numpy as np
import torch

import common
import dfine
import gdino
from common import SHAPE_PHRASES, shape_scene

VAL_SEED, TEST_SEED = 1_000_000, 2_000_000
FULL_PROMPT = ". ".join(SHAPE_PHRASES) + "."  # the 12 phrases in class order: phrase k is class k


def targets(scene: dict, keep: list[int] | None = None) -> dict:
    """A scene's boxes as labels: {"class_labels" (n,), "boxes" (n, 4) cx, cy, w, h in [0, 1]}. keep: the classes
    to label, in the order that numbers them (a prompt's phrases); the other shapes are left out."""
    w, h = scene["image"].size
    ids, boxes = scene["class_ids"], scene["boxes"]
    if keep is not None:
        inside = np.isin(ids, keep)
        ids, boxes = np.array([keep.index(c) for c in ids[inside]], dtype=np.int64), boxes[inside]
    b = common.corners_to_center(torch.from_numpy(boxes)) / torch.tensor([w, h, w, h], dtype=torch.float32)
    return {"class_labels": torch.from_numpy(ids), "boxes": b}


def dfine_batch(seeds, size: tuple[int, int]) -> tuple[torch.Tensor, list[dict]]:
    """Scenes of (height, width) `size` -> D-FINE pixel_values (B, 3, H, W) and labels."""
    scenes = [shape_scene(s, size[::-1]) for s in seeds]
    return dfine.preprocess([s["image"] for s in scenes], size), [targets(s) for s in scenes]


def training_prompt(class_ids: np.ndarray, rng: np.random.Generator) -> list[int]:
    """The classes a training prompt names, in prompt order: half the time all 12, else 1-12 drawn at random, so
    prompts name shapes that are absent and leave out shapes that are present (those are then background)."""
    if rng.random() < 0.5:
        return rng.permutation(len(SHAPE_PHRASES)).tolist()
    k = int(rng.integers(1, len(SHAPE_PHRASES) + 1))
    return rng.choice(len(SHAPE_PHRASES), k, replace=False).tolist()


def gdino_batch(model: gdino.GroundingDino, seeds, size: int, rng: np.random.Generator | None = None) -> dict:
    """Scenes of size x size with their prompts -> the forward's keyword arguments, labels included. rng None:
    every prompt is FULL_PROMPT (evaluation); else training prompts."""
    scenes = [shape_scene(s, (size, size)) for s in seeds]
    keeps = [list(range(len(SHAPE_PHRASES))) if rng is None else training_prompt(s["class_ids"], rng) for s in scenes]
    texts = [". ".join(SHAPE_PHRASES[c] for c in keep) + "." for keep in keeps]
    pre = model.preprocessor
    pixel_values, pixel_mask, _ = gdino.preprocess_images([s["image"] for s in scenes], size, size, pre["mean"],
                                                          pre["std"])
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, **gdino.tokenize(model.tokenizer, texts),
            "labels": [targets(s, keep) for s, keep in zip(scenes, keeps)]}


def phrase_scores(logits: torch.Tensor, input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """(B, Q, W) token logits -> (B, Q, n) per phrase the mean of its tokens' probabilities (mmdet's reading of a
    grounding head as a closed-set classifier)."""
    maps = gdino.label_maps(input_ids, logits.shape[-1], gdino.special_tokens(tokenizer))  # B x (n, W)
    share = torch.stack([m / m.sum(-1, keepdim=True) for m in maps])  # (B, n, W)
    return logits.sigmoid() @ share.transpose(1, 2)  # (B, Q, n)


def coco_map(detections: list[dict], scenes: list[dict]) -> dict:
    """COCO box mAP of per-image detections {"boxes" xyxy pixels, "scores", "labels" class ids} against the scenes'
    shapes, by pycocotools: {"map": AP@[.5:.95], "map50": AP@.5, "map75": AP@.75} (100 detections per image)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, gt, dt = [], [], []
    for i, (d, s) in enumerate(zip(detections, scenes)):
        images.append({"id": i, "width": s["image"].size[0], "height": s["image"].size[1]})
        for b, c in zip(s["boxes"].tolist(), s["class_ids"].tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            gt.append({"id": len(gt) + 1, "image_id": i, "category_id": c, "bbox": [b[0], b[1], w, h], "area": w * h,
                       "iscrowd": 0})
        for b, sc, c in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist()):
            dt.append({"image_id": i, "category_id": int(c), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                       "score": float(sc)})
    truth = COCO()
    truth.dataset = {"info": {}, "images": images, "annotations": gt,
                     "categories": [{"id": k, "name": p} for k, p in enumerate(SHAPE_PHRASES)]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth.createIndex()
        if not dt:
            return {"map": 0.0, "map50": 0.0, "map75": 0.0}
        ev = COCOeval(truth, truth.loadRes(dt), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return {"map": float(ev.stats[0]), "map50": float(ev.stats[1]), "map75": float(ev.stats[2])}


@torch.no_grad()
def evaluate_dfine(model: dfine.DFine, seeds, batch: int = 16) -> dict:
    """mAP of a D-FINE model on the scenes of `seeds` at the model's input size (its top-100 class-query pairs)."""
    was_training, dets, scenes = model.training, [], []
    model.eval()
    h, w = model.input_size
    seeds = list(seeds)
    for i in range(0, len(seeds), batch):
        chunk = [shape_scene(s, (w, h)) for s in seeds[i:i + batch]]
        out = model(dfine.preprocess([s["image"] for s in chunk], (h, w)))
        dets += dfine.postprocess(out.logits, out.pred_boxes, [(h, w)] * len(chunk), threshold=0.0)
        scenes += chunk
    model.train(was_training)
    return coco_map([{**d, "scores": d["scores"][:100], "boxes": d["boxes"][:100], "labels": d["labels"][:100]}
                     for d in dets], scenes)


@torch.no_grad()
def evaluate_gdino(model: gdino.GroundingDino, seeds, size: int, batch: int = 16) -> dict:
    """mAP of a Grounding DINO model on the scenes of `seeds`, prompted with all 12 phrases: each (query, phrase)
    pair scored by the phrase's mean token probability, the 100 best per image kept."""
    was_training, dets, scenes = model.training, [], []
    model.eval()
    seeds = list(seeds)
    for i in range(0, len(seeds), batch):
        kw = gdino_batch(model, seeds[i:i + batch], size)
        kw.pop("labels")
        out = model(**kw)
        scores = phrase_scores(out.logits, kw["input_ids"], model.tokenizer)  # (B, Q, 12)
        B, Q, K = scores.shape
        top, idx = scores.flatten(1).topk(min(100, Q * K), dim=1)  # (B, 100)
        boxes = common.center_to_corners(out.pred_boxes) * size  # (B, Q, 4) pixels
        for b in range(B):
            dets.append({"scores": top[b], "labels": idx[b] % K, "boxes": boxes[b, idx[b] // K]})
        scenes += [shape_scene(s, (size, size)) for s in seeds[i:i + batch]]
    model.train(was_training)
    return coco_map(dets, scenes)


def fit(model: torch.nn.Module, batch: Callable[[int], dict], steps: int, lr: float, evaluate: Callable[[], dict],
        eval_every: int, warmup: int = 100, weight_decay: float = 1e-4, clip: float = 0.1,
        log: Callable[[str], None] = print, log_every: int = 25) -> dict:
    """Train with the model's own loss (forward with labels): AdamW, a linear warm-up then a cosine decay to 0,
    gradients clipped to norm `clip` (the DETR recipe). batch(t) gives step t's forward arguments; evaluate() a
    dict with "map50", run every eval_every steps and at the end; a progress line every log_every steps. Returns the
    history: per-step losses, the mAPs, the seconds it took."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    ramp = lambda t: min(1.0, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * t / steps))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, ramp)
    hist = {"step": [], "loss": [], "eval_step": [], "map50": [], "map": [], "seconds": []}
    start = time.perf_counter()
    model.train()
    for t in range(steps):
        out = model(**batch(t))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        schedule.step()
        hist["step"].append(t + 1), hist["loss"].append(out.loss.item())
        minutes = (time.perf_counter() - start) / 60
        if (t + 1) % eval_every == 0 or t + 1 == steps:
            m = evaluate()
            hist["eval_step"].append(t + 1), hist["map50"].append(m["map50"]), hist["map"].append(m["map"])
            log(f"step {t + 1:5d}/{steps}  loss {np.mean(hist['loss'][-eval_every:]):7.3f}  "
                f"mAP@0.5 {m['map50']:.3f}  mAP {m['map']:.3f}  {minutes:5.1f} min")
        elif (t + 1) % log_every == 0:
            log(f"step {t + 1:5d}/{steps}  loss {np.mean(hist['loss'][-log_every:]):7.3f}  {minutes:5.1f} min")
    hist["seconds"] = time.perf_counter() - start
    return hist


def one_phrase_precision(model: gdino.GroundingDino, seeds, iou: float = 0.5) -> dict:
    """Prompt each scene with the phrase of its first shape and run model.detect at its default thresholds: a
    detection is right when it overlaps a not yet found shape of that phrase by IoU >= iou (greedy, best score
    first). Returns {"precision", "recall", "detections"} over all scenes."""
    right = found = wanted = 0
    for seed in seeds:
        s = shape_scene(seed, (model.preprocessor["shortest"],) * 2)
        phrase = s["phrases"][0]
        r = model.detect(s["image"], [phrase])
        truth = torch.from_numpy(s["boxes"][np.array(s["phrases"]) == phrase])  # (n, 4)
        wanted += len(truth)
        found += len(r["scores"])
        free = torch.ones(len(truth), dtype=torch.bool)
        for k in r["scores"].argsort(descending=True).tolist():
            overlap = common.box_iou(r["boxes"][k:k + 1], truth)[0][0] * free  # (n,)
            if len(truth) and overlap.max() >= iou:
                free[overlap.argmax()] = False
                right += 1
    return {"precision": right / max(found, 1), "recall": right / max(wanted, 1), "detections": found}
