"""Shape scenes as training batches and a COCO evaluation, for the small models trained here (train_*.ipynb) and
their tests (tests/test_shapes.py): the scenes themselves (shape_scene), then batches and the evaluation.

Seeds: training batch t uses scenes t*B .. t*B + B-1; validation scenes start at VAL_SEED, test scenes at TEST_SEED,
so the three never share an image. mAP comes from pycocotools (the COCO API), not from code of our own.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

import common
import dfine
import gdino

# -----------------------------------------------------------------------------
# Shape scenes: the synthetic data of train_*.ipynb and of the models in notebooks/models/
#
# A smooth two-colour gradient with noise and faint strokes as background, then 1-8 filled shapes, each a colour and
# a shape of SHAPE_PHRASES (class id = index), sides 5-40% of the short side, drawn at twice the size and shrunk (so
# edges are anti-aliased). Shapes may overlap a little and be cut by the border; the box is the visible part's.

SHAPE_COLOURS = {"red": (215, 40, 35), "green": (40, 160, 60), "blue": (35, 75, 215), "yellow": (240, 205, 30)}
SHAPE_KINDS = ("circle", "square", "triangle")
SHAPE_PHRASES = [f"{c} {k}" for c in SHAPE_COLOURS for k in SHAPE_KINDS]  # "red circle", ..., "yellow triangle"


def shape_outline(kind: str, cx: float, cy: float, side: float, angle: float) -> list[tuple[float, float]]:
    """The polygon of a shape (a circle as 64 points): a square turned by `angle`, an equilateral triangle of that
    side turned by `angle` around its centroid."""
    n, r = {"circle": (64, side / 2), "square": (4, side / math.sqrt(2)), "triangle": (3, side / math.sqrt(3))}[kind]
    a = angle + np.arange(n) * (2 * math.pi / n) + (math.pi / 4 if kind == "square" else 0.0)
    return list(zip((cx + r * np.cos(a)).tolist(), (cy + r * np.sin(a)).tolist()))


def shape_background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Muted colours (so that no shape colour is the background's): a linear gradient, blurred noise, faint strokes."""
    c0, c1 = rng.uniform(70, 190, 3), rng.uniform(70, 190, 3)  # (3,) each
    t = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)  # (h, w) each
    g = (np.cos(t) * xx + np.sin(t) * yy)[..., None]  # (h, w, 1) position along the gradient
    g = (g - g.min()) / max(np.ptp(g), 1e-6)
    img = c0 * (1 - g) + c1 * g  # (h, w, 3)
    blotches = rng.normal(0, 1, (max(h // 16, 2), max(w // 16, 2), 3))  # coarse noise, upsampled: soft texture
    img += 18 * np.asarray(Image.fromarray(((blotches + 4) * 32).clip(0, 255).astype(np.uint8)).resize(
        (w, h), Image.BICUBIC), dtype=np.float64) / 32 - 18 * 4
    img += rng.normal(0, 6, (h, w, 3))  # fine grain
    pic = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    for _ in range(rng.integers(2, 7)):  # strokes: edges that are not objects
        x0, y0, x1, y1 = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, h)
        grey = tuple(int(v) for v in rng.uniform(60, 200, 3))
        draw.line([(x0, y0), (x1, y1)], fill=grey, width=int(rng.integers(1, 4)))
    return pic.filter(ImageFilter.GaussianBlur(0.6))


def shape_scene(seed: int, size: tuple[int, int] = (320, 320), max_shapes: int = 8) -> dict:
    """One seeded scene -> {"image": PIL RGB of size (width, height), "boxes": (n, 4) float32 xyxy pixels,
    "class_ids": (n,) int64 indices into SHAPE_PHRASES, "phrases": n strings}. The same seed gives the same scene."""
    w, h = size
    rng = np.random.default_rng(seed)
    bg = shape_background(rng, w, h)
    canvas = Image.new("RGB", (2 * w, 2 * h))  # shapes drawn at 2x on a transparent layer, then shrunk
    alpha = Image.new("L", (2 * w, 2 * h), 0)
    dc, da = ImageDraw.Draw(canvas), ImageDraw.Draw(alpha)
    short = min(w, h)
    boxes, ids, n = [], [], int(rng.integers(1, max_shapes + 1))
    area = lambda b: (b[..., 2:] - b[..., :2]).prod(-1)  # noqa: E731
    for _ in range(200):  # tries: a shape mostly cut off or covering another is drawn again elsewhere
        if len(boxes) == n:
            break
        cls = int(rng.integers(len(SHAPE_PHRASES)))
        kind = SHAPE_KINDS[cls % 3]
        side = rng.uniform(0.05, 0.40) * short
        cx, cy = rng.uniform(-0.2 * side, w + 0.2 * side), rng.uniform(-0.2 * side, h + 0.2 * side)
        pts = np.array(shape_outline(kind, cx, cy, side, rng.uniform(0, 2 * math.pi)))  # (n, 2)
        full = np.concatenate([pts.min(0), pts.max(0)])  # (4,) xyxy before the border cuts it
        box = np.concatenate([np.maximum(full[:2], 0), np.minimum(full[2:], [w, h])])
        if area(box) < 0.6 * area(full):  # mostly cut off
            continue
        if boxes:  # overlap a little at most: no box, old or new, covered by more than 20%
            b = np.array(boxes)  # (k, 4)
            inter = (np.minimum(b[:, 2:], box[2:]) - np.maximum(b[:, :2], box[:2])).clip(0).prod(1)  # (k,)
            if (inter > 0.2 * np.minimum(area(b), area(box))).any():
                continue
        colour = np.array(SHAPE_COLOURS[SHAPE_PHRASES[cls].split()[0]]) + rng.integers(-20, 21, 3)
        dc.polygon([(2 * x, 2 * y) for x, y in pts], fill=tuple(int(v) for v in colour.clip(0, 255)))
        da.polygon([(2 * x, 2 * y) for x, y in pts], fill=255)
        boxes.append(box), ids.append(cls)
    shapes = canvas.resize((w, h), Image.BOX)
    img = Image.composite(shapes, bg, alpha.resize((w, h), Image.BOX))
    return {"image": img, "boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
            "class_ids": np.array(ids, dtype=np.int64), "phrases": [SHAPE_PHRASES[i] for i in ids]}



# -----------------------------------------------------------------------------
# Batches and evaluation (the training loop is common.fit)

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
    shapes, by pycocotools: {"map": AP@[.5:.95], "map50": AP@.5, "map75": AP@.75, "map50_per_class": AP@.5 of each
    of the 12 classes} (100 detections per image)."""
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
            return {"map": 0.0, "map50": 0.0, "map75": 0.0, "map50_per_class": [0.0] * len(SHAPE_PHRASES)}
        ev = COCOeval(truth, truth.loadRes(dt), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    p50 = ev.eval["precision"][0, :, :, 0, -1]  # (101 recalls, 12 classes) at IoU 0.5, all areas, 100 detections
    per_class = [float(p[p > -1].mean()) if (p > -1).any() else float("nan") for p in p50.T]  # nan: class absent
    return {"map": float(ev.stats[0]), "map50": float(ev.stats[1]), "map75": float(ev.stats[2]),
            "map50_per_class": per_class}


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


def write_coco(folder: str | Path, seeds, size: tuple[int, int] = (320, 320), categories: dict[int, str] | None = None,
               name: str = "instances.json") -> Path:
    """Shape scenes as a COCO-format dataset, what a labelling tool exports: folder/images/<seed>.png and
    folder/<name>, returned. categories {id: name}: a shape is labelled with the category its phrase ends with
    ({7: "circle"} labels every circle, whatever its colour); None: the 12 phrases, ids 0..11."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    categories = categories or dict(enumerate(SHAPE_PHRASES))
    images, annotations = [], []
    for seed in seeds:
        s = shape_scene(seed, size)
        s["image"].save(folder / "images" / f"{seed}.png")
        images.append({"id": int(seed), "file_name": f"{seed}.png", "width": size[0], "height": size[1]})
        for b, phrase in zip(s["boxes"].tolist(), s["phrases"]):
            for cid, cname in categories.items():
                if phrase.endswith(cname):
                    annotations.append({"id": len(annotations) + 1, "image_id": int(seed), "category_id": cid,
                                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "iscrowd": 0,
                                        "area": (b[2] - b[0]) * (b[3] - b[1])})
    cats = [{"id": k, "name": v} for k, v in categories.items()]
    path = folder / name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return path


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
