"""What Grounding DINO (gdino.py) and D-FINE (dfine.py) truly share, and nothing model-specific.

0. command line: the options, checks and outputs both files' `main` share
1. images: load_image (path, URL, PIL image or array; EXIF orientation; any mode to RGB)
2. boxes: center <-> corners, inverse_sigmoid
3. multi-scale deformable attention, readable PyTorch (kernels.py implements the same contract)
4. loading: a Hub id or a local folder -> files (huggingface_hub); safetensors -> model through an explicit key map
5. drawing: detections over the image, saved as PNG (matplotlib)
6. stage dumps: save named tensors with metadata; `python common.py compare A B`
7. training: labels checked, the Hungarian matcher (scipy), focal class cost, box IoU/GIoU, L1 and GIoU losses
8. ONNX: export a forward (logits, pred_boxes) with named inputs; run the file in onnxruntime, inputs checked
9. training on your data: a COCO file read and checked, augmentations (torchvision), the loop (AdamW, EMA, resume)

Shapes: B batch, S image tokens (all levels), Q queries, L levels, P points (all levels), nH heads, hD head dim.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import platform
import sys
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError


class InputError(ValueError):
    """Bad input from the user (image, prompt, threshold, model id): the message says what to do."""


class LoadError(RuntimeError):
    """A checkpoint that cannot be loaded as it is: the message names the file or the keys."""


def check_threshold(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise InputError(f"{name} must be between 0 and 1, got {value}")
    return float(value)


# -----------------------------------------------------------------------------
# 0. Command line: what both files' `main` share. Detections go to stdout (JSON only, with --json); everything else
#    ("saved ...", progress) to stderr; output folders are checked before the model loads; a user's mistake prints one
#    line and exits 2, never a traceback.


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    try:
        sys.exit(main(argv) or 0)
    except (InputError, LoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def status(message: str) -> None:
    print(message, file=sys.stderr)


def cli_parser(description: str, default_model: str, threshold: float) -> argparse.ArgumentParser:
    """The options both command lines take; each file adds what to detect (images, a prompt) and its own options."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default=default_model, help="Hub id or local folder (config.json, model.safetensors)")
    ap.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    ap.add_argument("--threshold", type=float, default=threshold, help="keep detections scoring above this")
    ap.add_argument("--backend", default="auto", choices=BACKENDS, help="deformable attention kernel")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights' dtype")
    ap.add_argument("--nms", type=float, metavar="IOU", help="drop a box overlapping a better one of its label")
    ap.add_argument("--top-k", type=int, help="keep the k best detections per image")
    ap.add_argument("--save", metavar="OUT.png", help="draw the detections (of the first image) into this PNG")
    ap.add_argument("--json", action="store_true", help="print the detections as JSON, and nothing else, on stdout")
    ap.add_argument("--dump", metavar="STAGES.safetensors", help="save every stage's tensors (first image)")
    ap.add_argument("--export-onnx", metavar="FILE", help="also write the model to this ONNX file")
    return ap


def check_cli_args(args: argparse.Namespace) -> None:
    """Before any work: the threshold, and that the folder of every file to write exists."""
    check_threshold("--threshold", args.threshold)
    for out in (args.save, args.dump, args.export_onnx):
        if out and not Path(out).resolve().parent.is_dir():
            raise InputError(f"cannot write {out}: folder {Path(out).resolve().parent} does not exist")


def train_cli(description: str, train: Callable[..., dict], argv: list[str]) -> int:
    """`python dfine.py train ...` and `python gdino.py train ...`: fine-tune on a COCO dataset (section 9)."""
    ap = argparse.ArgumentParser(prog="train", description=description)
    ap.add_argument("--coco", required=True, help="the training images' COCO instances JSON")
    ap.add_argument("--images", required=True, help="the folder its file_name entries are in")
    ap.add_argument("--init", required=True, help="the model to start from: Hub id or local folder")
    ap.add_argument("--out", required=True, help="folder for the best EMA weights; OUT/last: the state to resume")
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=8, help="images per step")
    ap.add_argument("--val", help="a validation COCO JSON: mAP (pycocotools) every --eval-every steps")
    ap.add_argument("--val-images", help="its images folder (default: --images)")
    ap.add_argument("--eval-every", type=int, default=500, help="steps between evaluations and saved states")
    ap.add_argument("--lr", type=float, help="AdamW's peak learning rate (default: the original recipe's)")
    ap.add_argument("--seed", type=int, default=0, help="the order of the images, augmentations, new heads")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last")
    args = vars(ap.parse_args(argv))
    if min(args["steps"], args["batch"], args["eval_every"]) < 1:
        raise InputError("--steps, --batch and --eval-every must be at least 1")
    if not Path(args["out"]).resolve().parent.is_dir():
        raise InputError(f"cannot write {args['out']}: folder {Path(args['out']).resolve().parent} does not exist")
    train(**args)
    return 0


def detection_rows(labels: Sequence[str], label_ids, scores, boxes) -> list[dict]:
    """One image's detections as JSON-ready rows: label, label_id, score (4 decimals), box xyxy (2 decimals)."""
    return [{"label": lab, "label_id": int(i), "score": round(float(s), 4), "box": [round(float(v), 2) for v in b]}
            for lab, i, s, b in zip(labels, label_ids, scores, boxes)]


def write_cli_outputs(args: argparse.Namespace, image: Image.Image, rows: list[dict],
                      stages: Callable[[], tuple[dict, torch.Tensor]], export: Callable[[str], None]) -> None:
    """--save draws `rows` over `image`; --dump saves stages() = ({name: tensors}, the pixel input); --export-onnx."""
    if args.save:
        draw_detections(image, [r["box"] for r in rows], [r["label"] for r in rows], [r["score"] for r in rows],
                        args.save)
        status(f"saved {args.save}")
    if args.dump:
        tensors, pixels = stages()
        save_stages(args.dump, tensors, args.model, args.revision, pixels)
        status(f"saved {args.dump}")
    if args.export_onnx:
        export(args.export_onnx)
        status(f"saved {args.export_onnx}")


# -----------------------------------------------------------------------------
# 1. Images

MIN_SIDE = 16  # smaller images carry nothing a detector can use; refuse rather than return noise


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: PIL's own conversion, alpha dropped without compositing (transformers'
    convert("RGB")), except 16/32-bit grey scaled by 1/257 and float grey clipped to [0, 255] (PIL's convert would
    clip those at 255 and turn most pixels white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        top = 255.0 if img.mode == "F" else 65535.0  # 65535 / 255 = 257, exactly
        a = np.rint(np.clip(np.asarray(img, dtype=np.float64), 0, top) / (top / 255)).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    return img.convert("RGB")


def load_image(source: str | Path | Image.Image | np.ndarray) -> Image.Image:
    """A path, an http(s) URL, a PIL image or an (H, W, 3) uint8 array -> an RGB PIL image, EXIF-upright."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise InputError(f"an image array must be (H, W, 3) uint8, got {source.shape} {source.dtype}")
        img = Image.fromarray(source, mode="RGB")
    elif isinstance(source, Image.Image):
        img = source
    elif isinstance(source, (str, Path)):
        s = str(source)
        if s.startswith(("http://", "https://")):
            try:
                with urllib.request.urlopen(s, timeout=20) as r:
                    data = r.read()
            except Exception as e:  # URLError, timeouts, HTTP errors: all say the same to the user
                raise InputError(f"cannot download image {s} ({e}); check the URL or pass a local file") from None
            name, fp = s, io.BytesIO(data)
        else:
            p = Path(s).expanduser()
            if not p.exists():
                raise InputError(f"image not found: {p}")
            if p.is_dir():
                raise InputError(f"{p} is a directory; pass an image file")
            name, fp = str(p), p
        try:
            img = Image.open(fp)
            img.load()  # decode now, so a truncated file fails here and not inside the model
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
            raise InputError(f"{name} is not a readable image ({e})") from None
    else:
        raise InputError(f"cannot read an image from {type(source).__name__}; pass a path, URL, PIL image or array")
    img = _to_rgb(ImageOps.exif_transpose(img))  # EXIF first: a phone photo stored sideways is turned upright
    if min(img.size) < MIN_SIDE:
        raise InputError(f"image is {img.width}x{img.height} pixels; detection needs at least {MIN_SIDE} per side")
    return img


# -----------------------------------------------------------------------------
# 2. Boxes


def center_to_corners(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)  # (..., 4) xyxy


def corners_to_center(b: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)  # (..., 4) cxcywh


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float, classes: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy non-maximum suppression: (n, 4) xyxy boxes, (n,) scores -> (n_kept,) indices, best score first (ties:
    the earlier box). A box is dropped when its IoU with a kept, better box is above `iou`; given (n,) classes, only
    boxes of the same class suppress each other."""
    order = torch.sort(scores, descending=True, stable=True)[1]  # (n,)
    b = boxes[order].float()  # (n, 4)
    area = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)  # (n,)
    wh = (torch.min(b[:, None, 2:], b[None, :, 2:]) - torch.max(b[:, None, :2], b[None, :, :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]  # (n, n)
    over = inter / (area[:, None] + area[None, :] - inter) > iou  # (n, n); two empty boxes give nan: not over
    if classes is not None:
        over &= classes[order][:, None] == classes[order][None, :]
    keep = torch.ones(len(order), dtype=torch.bool, device=order.device)
    for i in range(len(order)):  # each kept box, best first, drops the worse boxes it overlaps
        if keep[i]:
            keep[i + 1:] &= ~over[i, i + 1:]
    return order[keep]


def best_detections(result: dict, nms_iou: float | None, top_k: int | None, classes: torch.Tensor | None) -> dict:
    """A detect() result (tensors and lists, one entry per box) -> after optional NMS, the top_k best, sorted by score.
    Both None: the result unchanged (the models' own output, as transformers gives it)."""
    if nms_iou is None and top_k is None:
        return result
    if nms_iou is not None:
        check_threshold("nms", nms_iou)
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k must be a whole number >= 1, got {top_k!r}")
    keep = (nms(result["boxes"], result["scores"], nms_iou, classes) if nms_iou is not None
            else torch.sort(result["scores"], descending=True, stable=True)[1])[:top_k]
    return {k: v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in keep.tolist()] for k, v in result.items()}


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


# -----------------------------------------------------------------------------
# 3. Multi-scale deformable attention (Deformable DETR, eq. 3), readable version
#
# The contract, shared with kernels.py:
#   value               (B, S, nH, hD)   S = sum of H_l * W_l, levels flattened row-major, fine to coarse
#   spatial_shapes      [(H_l, W_l)] * L
#   points_per_level    [P_l] * L        Grounding DINO [P] * L, D-FINE [3, 6, 3]; P = sum(P_l), level-major
#   sampling_locations  (B, Q, nH, P, 2) x, y in [0, 1] of the map (values outside are allowed)
#   attention_weights   (B, Q, nH, P)    already normalised by the caller
#   -> output           (B, Q, nH * hD)  channel c = head * hD + j
# Sampling rule (align_corners=False): location x maps to pixel coordinate x * W_l - 0.5, so pixel centres sit at
# +0.5; bilinear between the four neighbours; a neighbour outside the map reads as zero.


def ms_deform_attn_torch(value, spatial_shapes, points_per_level, sampling_locations, attention_weights):
    B, S, nH, hD = value.shape
    _, Q, _, P, _ = sampling_locations.shape
    assert S == sum(h * w for h, w in spatial_shapes), f"value has {S} tokens, shapes {spatial_shapes} give another"
    assert P == sum(points_per_level), f"{P} points but points_per_level {points_per_level}"
    assert len(points_per_level) == len(spatial_shapes), f"points {points_per_level} for {len(spatial_shapes)} levels"
    values = value.split([h * w for h, w in spatial_shapes], dim=1)  # L x (B, H_l*W_l, nH, hD)
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)  # (B*nH, Q, P, 2) in grid_sample's [-1, 1]
    grids = grids.split(list(points_per_level), dim=2)  # L x (B*nH, Q, P_l, 2)
    sampled = []
    for (h, w), v, g in zip(spatial_shapes, values, grids):
        v = v.flatten(2).transpose(1, 2).reshape(B * nH, hD, h, w)  # (B*nH, hD, H_l, W_l): one image per head
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
        # each (B*nH, hD, Q, P_l)
    weights = attention_weights.transpose(1, 2).reshape(B * nH, 1, Q, P)  # (B*nH, 1, Q, P)
    out = (torch.cat(sampled, dim=-1) * weights).sum(-1)  # (B*nH, hD, Q)
    return out.view(B, nH * hD, Q).transpose(1, 2).contiguous()  # (B, Q, nH*hD)


BACKENDS = ("auto", "torch", "numba")


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto": kernels.py's Numba kernel for CPU tensors where torch runs its AVX2 kernels (x86 with AVX2 or AVX-512),
    as there it rounds exactly as grid_sample + sum (tested bit for bit) and is ~10x faster; else the readable one."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    exact = device.type == "cpu" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return backend if backend != "auto" else "numba" if exact else "torch"


DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what from_pretrained(dtype=...) takes


def check_dtype(dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"unsupported dtype {dtype}; use torch.float32, torch.bfloat16 or torch.float16")
    return dtype or torch.float32


def ms_deform_attn(value, spatial_shapes, points_per_level, sampling_locations, attention_weights, backend="auto"):
    """The one call both models make; backend "numba" runs kernels.py (CPU or CUDA by the tensors' device).
    bfloat16/float16 are sampled in float32 (transformers samples in the half dtype, but torch's CPU grid_sample in
    bfloat16 returns non-finite values inside the map, and the kernels take float32/float64 only)."""
    if value.dtype in (torch.bfloat16, torch.float16):
        return ms_deform_attn(value.float(), spatial_shapes, points_per_level, sampling_locations.float(),
                              attention_weights.float(), backend).to(value.dtype)
    # a traced or compiled graph (ONNX export, torch.compile) holds the readable version's operations, whatever the
    # model's backend: the Numba kernel is opaque to both
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or resolve_backend(backend, value.device) == "torch":
        return ms_deform_attn_torch(value, spatial_shapes, points_per_level, sampling_locations, attention_weights)
    import kernels  # imported on first use: numba takes a second to import and the readable path needs none

    # the readable version last: the kernels' gradients take its memory layout (kernels.py imports nothing of ours)
    return kernels.ms_deform_attn(value, spatial_shapes, points_per_level, sampling_locations, attention_weights,
                                  ms_deform_attn_torch)


# -----------------------------------------------------------------------------
# 4. Loading: files from the Hub or a folder, then safetensors through an explicit key map

HUB_FILES = ["*.json", "*.safetensors", "*.txt"]  # config, tokenizer, vocab, weights; never *.bin or *.pth


def resolve_checkpoint(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local folder, or a Hub id downloaded (or found in the cache) by huggingface_hub -> a folder of files.
    huggingface_hub brings the cache, HF_HUB_OFFLINE and progress bars; we only turn its errors into advice."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise LoadError(f"{p} has no config.json; point to a folder saved by save_pretrained or a Hub id")
        return p
    if p.exists():
        raise LoadError(f"{p} is a file; pass the folder that holds config.json and model.safetensors")
    s = str(name_or_path)
    if s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise LoadError(f"no folder {s} and it is not a Hub id of the form owner/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        return Path(snapshot_download(s, revision=revision, allow_patterns=HUB_FILES))
    except (HFValidationError, OSError) as e:  # the Hub's HTTP errors and a miss in the offline cache are OSErrors
        first = str(e).splitlines()[0] if str(e) else ""
        advice = [  # the first class that fits says what to do (the Hub's errors subclass each other)
            (GatedRepoError, f"{s} is gated: accept its terms on the Hub and log in (`hf auth login`)"),
            (RepositoryNotFoundError, f"unknown model id {s}: no such repository on the Hugging Face Hub, or a "
                                      f"private one"),
            (RevisionNotFoundError, f"{s} has no revision {revision!r}"),
            (HFValidationError, f"{s} is neither a folder nor a valid Hub id ({e})"),
            (HfHubHTTPError, f"the Hugging Face Hub refused {s}: {first}"),
            (Exception, f"cannot reach the Hugging Face Hub and {s} is not in the local cache ({type(e).__name__}: "
                        f"{first[:120]}); download it on a connected machine, or pass a local folder with config.json "
                        f"and model.safetensors (offline: the models trained here, notebooks/models/dfine-shapes and "
                        f"gdino-shapes)")]
        raise LoadError(next(message for kind, message in advice if isinstance(e, kind))) from None


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise LoadError(f"cannot read {path}: {e}") from None


def read_config(folder: Path, model_types: Sequence[str]) -> dict:
    cfg = read_json(folder / "config.json")
    if cfg.get("model_type") not in model_types:
        raise LoadError(f"{folder} holds a {cfg.get('model_type')!r} checkpoint; this file loads {list(model_types)}")
    return cfg


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index maps each tensor to its shard
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LoadError(f"{index} has no weight_map")
        return [folder / f for f in sorted(set(weight_map.values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pth")):
        raise LoadError(f"{folder} has only .bin or .pth weights; we read safetensors only (re-save with "
                        f"save_pretrained(..., safe_serialization=True))")
    raise LoadError(f"{folder} has no model.safetensors")


def load_weights(model: torch.nn.Module, files: Sequence[Path], key_map: Callable[[str], str | None],
                 optional: Callable[[str], bool] = lambda name: False) -> None:
    """Read every tensor, rename it with key_map (None = drop on purpose) and load; any mismatch stops the load.
    Two file keys may map to one module name (a head stored twice) only when the tensors are equal. `optional(name)`:
    module tensors a file may lack (a BN step counter, a buffer rebuilt at init), kept as built."""
    from safetensors import SafetensorError, safe_open

    expected = model.state_dict()
    loaded, unexpected, wrong_shape, conflict = {}, [], [], []
    for f in files:
        if not Path(f).is_file():
            raise LoadError(f"weight file missing: {f}")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    name = key_map(key)
                    if name is None:
                        continue
                    if name not in expected:
                        unexpected.append(key if name == key else f"{key} (as {name})")
                        continue
                    t = sf.get_tensor(key)
                    if tuple(t.shape) != tuple(expected[name].shape):
                        wrong_shape.append(f"{key}: file {tuple(t.shape)}, model {tuple(expected[name].shape)}")
                    elif name in loaded and not torch.equal(loaded[name], t.to(loaded[name].dtype)):
                        conflict.append(f"{key} -> {name}")
                    else:
                        loaded[name] = t
        except SafetensorError as e:
            raise LoadError(f"cannot read {f}: {e} (truncated or not a safetensors file? download it again)") from None
    missing = [k for k in expected if k not in loaded and not optional(k)]
    problems = [(label, names) for label, names in [("missing", missing), ("unexpected", unexpected),
                                                    ("wrong shape", wrong_shape), ("conflicting", conflict)] if names]
    if problems:
        lines = [f"{len(names)} {label} key(s): " + ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
                 for label, names in problems]
        raise LoadError(f"checkpoint {Path(files[0]).parent} does not fit the model:\n  " + "\n  ".join(lines))
    loaded.update({k: v for k, v in expected.items() if k not in loaded})  # the optional ones, as built
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in loaded.items()}, strict=True)


# -----------------------------------------------------------------------------
# 5. Drawing


def draw_detections(image: Image.Image, boxes, labels: Sequence[str], scores, path: str | Path) -> None:
    """Boxes (xyxy pixels), their labels and scores over the image, written to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(image.width / 100, image.height / 100), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(image)
    ax.set_axis_off()
    colours = plt.get_cmap("tab10")
    boxes, scores = torch.as_tensor(boxes).cpu().tolist(), torch.as_tensor(scores).cpu().tolist()  # CUDA too
    for i, ((x0, y0, x1, y1), label, score) in enumerate(zip(boxes, labels, scores)):
        c = colours(i % 10)
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=c, linewidth=2))
        # the label sits above the box, or inside it where the box touches the top of the image
        ax.text(max(x0, 0), max(y0, 0), f"{label} {score:.2f}", color="white", fontsize=9,
                va="bottom" if y0 > 14 else "top",
                bbox=dict(facecolor=c, alpha=0.8, pad=1, edgecolor="none"))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
# 6. Stage dumps: reference tensors for ports to check themselves against


def save_stages(path: str | Path, stages: dict, model_id: str, revision: str | None, inputs: torch.Tensor) -> None:
    """{name: tensor | list of tensors} -> a safetensors file of name or name.i, in the order given, with metadata."""
    from safetensors.torch import save_file

    flat = {}
    for name, v in stages.items():
        for i, t in enumerate(v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(t, torch.Tensor):  # cloned: a stage may be another's very tensor, which safetensors refuses
                flat[name if t is v else f"{name}.{i}"] = t.detach().cpu().clone().contiguous()
    sha = hashlib.sha256(inputs.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    meta = {"model_id": str(model_id), "revision": str(revision), "input_sha256": sha,
            "dtype": str(inputs.dtype), "device": str(inputs.device), "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "tf32": str(torch.backends.cuda.matmul.allow_tf32), "order": ",".join(flat)}
    save_file(flat, str(path), metadata=meta)


# -----------------------------------------------------------------------------
# 7. Training: set matching and box losses (DETR's set loss, shared by both models)
#
# Labels follow transformers: per image a dict with "class_labels" (n,) int64 and "boxes" (n, 4) cx, cy, w, h
# normalised to [0, 1]. A prediction is matched to at most one object by the Hungarian algorithm on a cost
# (class + L1 + GIoU); matched pairs get the box losses, the rest learn "no object" through the class loss.


def check_labels(labels, batch_size: int, num_classes: int) -> None:
    """Raise InputError naming the image (and box) when labels break the convention above; n = 0 is valid."""
    if not isinstance(labels, (list, tuple)) or len(labels) != batch_size:
        got = f"{len(labels)} entries" if isinstance(labels, (list, tuple)) else type(labels).__name__
        raise InputError(f"labels must be a list with one dict per image ({batch_size}), got {got}")
    for i, t in enumerate(labels):
        if not isinstance(t, dict) or not {"class_labels", "boxes"} <= set(t):
            raise InputError(f"labels[{i}] must be a dict with 'class_labels' (n,) and 'boxes' (n, 4)")
        c, b = t["class_labels"], t["boxes"]
        if not isinstance(c, torch.Tensor) or c.ndim != 1 or c.is_floating_point() or c.is_complex():
            raise InputError(f"labels[{i}]['class_labels'] must be a 1-D integer tensor, got {getattr(c, 'dtype', c)}")
        if not isinstance(b, torch.Tensor) or b.shape != (len(c), 4) or not b.is_floating_point():
            raise InputError(f"labels[{i}]['boxes'] must be a float tensor ({len(c)}, 4) (cx, cy, w, h), "
                             f"got {tuple(getattr(b, 'shape', ()))} {getattr(b, 'dtype', type(b).__name__)}")
        bad = ((c < 0) | (c >= num_classes)).nonzero()[:, 0].tolist()  # boxes, of which the first is named
        if bad:
            raise InputError(f"image {i}, box {bad[0]}: class id {c[bad[0]].item()} is outside [0, {num_classes}) of "
                             f"the head")
        bad = (~((b >= 0) & (b <= 1)).all(-1) | (b[:, 2] <= 0) | (b[:, 3] <= 0)).nonzero()[:, 0].tolist()
        if bad:
            raise InputError(f"image {i}, box {bad[0]}: {b[bad[0]].tolist()} is not a normalised (cx, cy, w, h) box: "
                             f"every value must lie in [0, 1] and w, h > 0 (divide pixel boxes by the image size)")


def box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xyxy (N, 4), (M, 4) -> IoU (N, M) and the union areas (N, M)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])  # (N,)
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # (M,)
    top_left = torch.max(a[:, None, :2], b[:, :2])  # (N, M, 2)
    bottom_right = torch.min(a[:, None, 2:], b[:, 2:])  # (N, M, 2)
    wh = (bottom_right - top_left).clamp(min=0)  # (N, M, 2)
    inter = wh[:, :, 0] * wh[:, :, 1]  # (N, M)
    union = area_a[:, None] + area_b - inter  # (N, M)
    return inter / union, union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU (Rezatofighi et al. 2019) = IoU - (hull - union) / hull, for xyxy (N, 4), (M, 4) -> (N, M)."""
    if not (a[:, 2:] >= a[:, :2]).all() or not (b[:, 2:] >= b[:, :2]).all():  # inverted boxes give NaN below
        raise ValueError("generalized_box_iou needs xyxy boxes with x1 >= x0 and y1 >= y0")
    iou, union = box_iou(a, b)
    top_left = torch.min(a[:, None, :2], b[:, :2])  # (N, M, 2) the smallest box holding both
    bottom_right = torch.max(a[:, None, 2:], b[:, 2:])  # (N, M, 2)
    wh = (bottom_right - top_left).clamp(min=0)  # (N, M, 2)
    hull = wh[:, :, 0] * wh[:, :, 1]  # (N, M)
    return iou - (hull - union) / hull


def focal_cost(prob: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """The focal loss's class cost of a match (as the matcher uses it): the loss if the class were positive minus
    the loss if it were negative, on probabilities, elementwise; the 1e-8 keeps log(0) out."""
    neg = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
    pos = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
    return pos - neg


def hungarian_match(cost: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """cost (B, Q, N_total), the objects of all images side by side, sizes[i] of them image i's -> per image (query
    indices, object indices), int64, sorted by query, min(Q, n_i) pairs. NaN and +-inf costs become the dtype's
    largest float, picked only when nothing else is left (a diverged prediction must not crash training)."""
    from scipy.optimize import linear_sum_assignment  # the one use of scipy: imported only when training

    big = torch.finfo(cost.dtype).max
    cost = torch.nan_to_num(cost.detach(), nan=big, posinf=big, neginf=big).cpu()  # (B, Q, N_total)
    pairs = [linear_sum_assignment(c[i]) for i, c in enumerate(cost.split(sizes, -1))]  # c (B, Q, n_i)
    return [(torch.as_tensor(q, dtype=torch.int64), torch.as_tensor(o, dtype=torch.int64)) for q, o in pairs]


def box_losses(src_boxes: torch.Tensor, target_boxes: torch.Tensor, num_boxes: float) -> dict[str, torch.Tensor]:
    """Matched pairs, cxcywh (K, 4) each -> L1 summed over pairs and coordinates, and 1 - GIoU summed over pairs,
    both / num_boxes (the objects in the batch, at least 1)."""
    loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none").sum() / num_boxes
    giou = torch.diag(generalized_box_iou(center_to_corners(src_boxes), center_to_corners(target_boxes)))  # (K,)
    return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}


# -----------------------------------------------------------------------------
# 8. ONNX: export (TorchScript exporter, opset 17; the dynamo one takes ten times longer) and a small onnxruntime
#    runner that checks its inputs. The tracer keeps sizes taken from input shapes symbolic where they feed tensor
#    ops, but a `torch.tensor([...])` built from sizes becomes a constant. The runner's contract: the graph's
#    dimension names "batch", "height", "width", "tokens" (numbers: fixed sizes) and metadata "size_multiple",
#    "max_<dimension>" (a bound) with "max_<dimension>_hint" (what to do beyond it), "fixed" (what to do about it).

ONNX_OPSET = 17


def export_onnx(module: torch.nn.Module, args: Sequence[torch.Tensor], path: str | Path, input_names: Sequence[str],
                dynamic_axes: dict, metadata: dict[str, str]) -> None:
    """Trace module(*args)'s .logits and .pred_boxes into an ONNX file, with metadata (read back by OnnxModel)."""
    try:
        import onnx
    except ImportError:
        raise InputError("ONNX export needs the onnx package: pip install onnx onnxruntime") from None
    path = Path(path)
    if not path.resolve().parent.is_dir():
        raise InputError(f"cannot write {path}: folder {path.resolve().parent} does not exist")

    class Outputs(torch.nn.Sequential):  # what the graph computes: the forward's two tensors
        def forward(self, *inputs):
            out = self[0](*inputs)
            return out.logits, out.pred_boxes

    modes = {m: m.training for m in module.modules()}  # eval for the trace, then each module as it was
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns about every Python check on a traced size (they run once, at trace time) and about
        # the TorchScript exporter's deprecation; neither says anything about this graph
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding")  # a Slice with steps != 1 is left unfolded
        try:
            torch.onnx.export(Outputs(module).eval(), tuple(args), str(path), input_names=list(input_names),
                              output_names=["logits", "pred_boxes"], dynamic_axes=dynamic_axes,
                              opset_version=ONNX_OPSET, dynamo=False)
        finally:
            for m, training in modes.items():
                m.train(training)
    proto = onnx.load(str(path))
    for node in proto.graph.node:  # the tracer writes absent optional inputs as "" (Pad's value): onnxruntime then
        while node.input and not node.input[-1]:  # fuses no Pad into the conv after it; absent they mean the same
            node.input.pop()
    for k, v in metadata.items():
        proto.metadata_props.add(key=k, value=str(v))
    onnx.save(proto, str(path))


class OnnxModel:
    """An exported file in onnxruntime (CPU). Calling it with the forward's inputs (tensors or arrays) checks them
    against the graph (names, ranks, dtypes, fixed sizes, multiples, bounds) and returns {"logits", "pred_boxes"} as
    tensors, ready for the files' post-processing; a wrong input gets an InputError, not an onnxruntime crash."""

    DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64}

    def __init__(self, path: str | Path, threads: int = 0):
        import onnxruntime as ort

        if not Path(path).is_file():
            raise InputError(f"no ONNX file {path}")
        self.path, options = Path(path), ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per physical core
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.multiple = int(self.metadata.get("size_multiple", 1))

    def __call__(self, **inputs) -> dict[str, torch.Tensor]:
        if set(inputs) != set(self.inputs):
            raise InputError(f"the graph takes {list(self.inputs)}; got {list(inputs)}")
        feed, sizes = {}, {}  # sizes: a named dimension's size in the first input that has it
        for name, port in self.inputs.items():  # the graph's declared inputs: rank, dtype, dimensions
            x = inputs[name]
            x = feed[name] = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            if x.ndim != len(port.shape) or x.dtype != self.DTYPES[port.type]:
                raise InputError(f"{name} must be {len(port.shape)}-D {np.dtype(self.DTYPES[port.type])}, got "
                                 f"{x.shape} {x.dtype}")
            for axis, (dim, got) in enumerate(zip(port.shape, x.shape)):
                if isinstance(dim, int) and got != dim:
                    raise InputError(f"this graph was exported with {name} of shape {port.shape} and takes only "
                                     f"size {dim} in dimension {axis}; got {x.shape}. "
                                     f"{self.metadata.get('fixed', '')}".strip())
                if dim in ("height", "width") and got % self.multiple:
                    raise InputError(f"{name} {dim} must be a multiple of {self.multiple}, got {x.shape}")
                if got > int(self.metadata.get(f"max_{dim}", got)):  # a bound the export set, with its hint if any
                    raise InputError(f"{name} has {got} {dim}; the graph reads at most {self.metadata[f'max_{dim}']}. "
                                     f"{self.metadata.get(f'max_{dim}_hint', '')}".strip())
                if isinstance(dim, str) and sizes.setdefault(dim, got) != got:
                    raise InputError(f"{name} has {dim} {got} where another input has {sizes[dim]}")
        outs = self.session.run(None, feed)
        return {o.name: torch.from_numpy(v) for o, v in zip(self.session.get_outputs(), outs)}


def run_engine(engine: OnnxModel, model_type: str, **inputs) -> SimpleNamespace:
    """An exported file in place of a model's forward (detect's engine=), checked to be an export of that kind of
    model: -> .logits, .pred_boxes for the model's own post-processing."""
    if not isinstance(engine, OnnxModel):
        raise InputError(f"engine must be a common.OnnxModel(path) of an exported file, got {type(engine).__name__}")
    if engine.metadata.get("model_type") != model_type:
        raise InputError(f"{engine.path} is not a {model_type} export (it says model_type "
                         f"{engine.metadata.get('model_type')!r}): write one with model.export_onnx(path)")
    return SimpleNamespace(**engine(**inputs))


# -----------------------------------------------------------------------------
# 9. Training on your data: a COCO file, augmentations, and the loop both models train with
#
# Classes are the file's categories sorted by id (ids 7, 42, 1000 -> classes 0, 1, 2); a fine-tuned model keeps the
# names as config.json's id2label and the ids under COCO_IDS_KEY. Crowd boxes stay out of the training targets (as
# in DETR) and in the evaluation (pycocotools treats them as COCO does). Augmentations: torchvision.transforms.v2, a
# training-only dependency imported here only. A batch is a function of (seed, step), so a resumed run repeats it.

COCO_IDS_KEY = "coco_category_ids"  # config.json: the dataset's category id of each class, in class order


@dataclass
class CocoData:
    path: Path  # the JSON file
    names: list[str]  # class k's category name
    category_ids: list[int]  # class k's category id in the file
    images: list[dict]  # per image: id, file, size (w, h), boxes (n, 4) xyxy pixels, classes (n,), crowd (n,) bool
    coco: dict  # the file as read, for pycocotools


def read_coco(json_path: str | Path, images: str | Path) -> CocoData:
    """A COCO instances file and its images folder -> CocoData. What cannot be right stops with an InputError naming
    the file and the entry; a box partly outside its image is clipped, with a warning."""
    path, folder = Path(json_path), Path(images)
    try:
        d = json.loads(path.read_text())
        cats, anns = sorted(d["categories"], key=lambda c: c["id"]), d.get("annotations", [])
        ims = {i["id"]: {"id": i["id"], "file": folder / i["file_name"], "size": (i["width"], i["height"]), "rows": []}
               for i in d["images"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path} is not a readable COCO instances file ({type(e).__name__}: {e}); it needs 'images' "
                         f"(id, file_name, width, height), 'categories' (id, name), 'annotations'") from None
    if not cats or not ims:
        raise InputError(f"{path} has no {'categories' if not cats else 'images'}; a model needs both to train on")
    cls, seen = {c["id"]: k for k, c in enumerate(cats)}, set()
    for a in anns:
        where = f"{path}: annotation {a.get('id') if isinstance(a, dict) else a!r}"
        try:
            (x, y, w, h), c, im = [float(v) for v in a["bbox"]], a["category_id"], ims.get(a["image_id"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where} needs id, image_id, category_id and bbox [x, y, width, height]") from None
        if a["id"] in seen or c not in cls or im is None:
            raise InputError(f"{where}: the id is used twice" if a["id"] in seen else f"{where}: category_id {c} or "
                             f"image_id {a['image_id']} is not among the file's categories {sorted(cls)} or images")
        seen.add(a["id"])
        (W, H), box = im["size"], [max(x, 0), max(y, 0), min(x + w, im["size"][0]), min(y + h, im["size"][1])]
        if w <= 0 or h <= 0 or box[2] <= box[0] or box[3] <= box[1]:
            raise InputError(f"{where}: bbox {a['bbox']} has no area inside its {W}x{H} image (x, y, width, height)")
        if box != [x, y, x + w, y + h]:
            warnings.warn(f"{where}: bbox {a['bbox']} reaches outside its {W}x{H} image; clipped to it")
        im["rows"].append([*box, cls[c], bool(a.get("iscrowd", 0))])
    for im in ims.values():
        if not im["file"].is_file():
            raise InputError(f"{path}: image {im['id']}'s file {im['file']} does not exist; check --images {folder}")
        rows = torch.tensor(im.pop("rows"), dtype=torch.float64).reshape(-1, 6)  # (n, 6): xyxy, class, crowd
        im.update(boxes=rows[:, :4].float(), classes=rows[:, 4].long(), crowd=rows[:, 5].bool())
    return CocoData(path, [c["name"] for c in cats], [c["id"] for c in cats], list(ims.values()), d)


def coco_transforms(recipe: str, size: tuple[int, ...], augment: bool):
    """Per-image augmentations. "dfine": the original D-FINE's (photometric distortion, zoom-out, IoU crop with
    p=0.8, flip, resize to the model's (H, W) `size`; flip and resize only once `augment` is off). "gdino": mmdet's
    Grounding DINO fine-tuning (flip; half the time the short edge resized to 400-600, then a crop of sides drawn in
    [384, 600]), scaled from mmdet's short edge 800 to size[0]; preprocessing resizes to the batch's scale after."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2 as T

    class RangeCrop(T.Transform):  # mmdet's RandomCrop(crop_type="absolute_range"): each side drawn, then a place
        def make_params(self, flat_inputs):
            H, W = T.functional.get_size(next(x for x in flat_inputs if isinstance(x, tv_tensors.Image)))
            h, w = (int(torch.randint(min(lo, n), min(hi, n) + 1, ())) for n in (H, W))
            y, x = int(torch.randint(H - h + 1, ())), int(torch.randint(W - w + 1, ()))
            return dict(top=y, left=x, height=h, width=w)

        def transform(self, inpt, params):
            return T.functional.crop(inpt, **params)

    if recipe == "dfine":
        first = [T.RandomPhotometricDistort(p=0.5), T.RandomZoomOut(fill=0), T.RandomApply([T.RandomIoUCrop()], 0.8),
                 T.SanitizeBoundingBoxes(min_size=1)] if augment else []
        return T.Compose([*first, T.RandomHorizontalFlip(), T.Resize(size), T.SanitizeBoundingBoxes(min_size=1)])
    e = size[0] / 800
    lo, hi = int(384 * e), int(600 * e)
    crop = T.Compose([T.RandomChoice([T.Resize(int(e * s)) for s in (400, 500, 600)]), RangeCrop(),
                      T.SanitizeBoundingBoxes(min_size=1)])
    return T.Compose([T.RandomHorizontalFlip(), T.RandomApply([crop], 0.5)] if augment else [])


def coco_batch(data: CocoData, t: int, batch: int, seed: int, transforms, scales: Sequence = ()) -> tuple[list, object]:
    """Step t's images (each epoch a fresh seeded order), crowd boxes dropped, augmented -> per image {"image" uint8
    (3, H, W), "boxes" (n, 4) xyxy pixels, "classes" (n,)}, and one of `scales` for the batch (D-FINE's multi-scale
    collate; None without). Its own seeded RNG: the model's draws (denoising, dropout) do not depend on it."""
    from torchvision import tv_tensors

    out, n = [], len(data.images)
    with torch.random.fork_rng():
        torch.manual_seed(seed * 1_000_003 + t)
        for j in range(t * batch, (t + 1) * batch):
            im = data.images[int(torch.randperm(n, generator=torch.Generator().manual_seed(seed - 1 - j // n))[j % n])]
            pic = torch.from_numpy(np.array(load_image(im["file"]))).permute(2, 0, 1)  # (3, H, W) uint8
            if pic.shape[1:] != im["size"][::-1]:
                raise InputError(f"{data.path}: image {im['id']} is {pic.shape[2]}x{pic.shape[1]}, not {im['size']}")
            boxes = tv_tensors.BoundingBoxes(im["boxes"][~im["crowd"]], format="XYXY", canvas_size=pic.shape[1:])
            pic, target = transforms(tv_tensors.Image(pic), {"boxes": boxes, "labels": im["classes"][~im["crowd"]]})
            H, W = pic.shape[1:]
            xyxy = target["boxes"].as_subclass(torch.Tensor).clamp(min=0).minimum(torch.tensor([W, H, W, H]))
            out.append({"image": pic.as_subclass(torch.Tensor), "boxes": xyxy, "classes": target["labels"]})
        return out, scales[int(torch.randint(len(scales), ()))] if len(scales) else None


def coco_eval(data: CocoData, detections: list[dict]) -> dict:
    """Per image of `data` its detections {"boxes" xyxy pixels, "scores", "labels" classes} -> pycocotools' box mAP
    {"map": AP@[.5:.95], "map50", "map75"} in the file's category ids."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dt = [{"image_id": im["id"], "category_id": data.category_ids[int(c)], "score": float(s),
           "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]} for im, d in zip(data.images, detections)
          for b, s, c in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist())]
    if not dt:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO()
        truth.dataset = {"info": {}, **data.coco}
        truth.createIndex()
        ev = COCOeval(truth, truth.loadRes(dt), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return {"map": float(ev.stats[0]), "map50": float(ev.stats[1]), "map75": float(ev.stats[2])}


def fit(model: torch.nn.Module, batch: Callable[[int], dict], steps: int, out: str | Path | None = None,
        evaluate: Callable[[torch.nn.Module], dict] | None = None, eval_every: int = 500, lr: float = 1e-4,
        backbone: tuple[str, ...] = ("backbone.",), backbone_lr: float = 0.1, weight_decay: float = 1e-4,
        warmup: int = 100, clip: float = 0.1, ema_decay: float = 0.9999, ema_warmups: int = 2000,
        resume: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Train with the model's own loss (forward(**batch(t)).loss) as both originals do: AdamW, names starting with
    `backbone` at lr * backbone_lr, no weight decay on norms, biases and embeddings; linear warm-up, cosine decay;
    gradients clipped to `clip`; an EMA of the weights (D-FINE's: decay ema_decay * (1 - exp(-updates / ema_warmups))).
    Every eval_every steps and at the end: evaluate(the EMA model, in eval mode) -> {"map50", "map"}; `out` gets the
    EMA weights when best (without evaluate: the last) as a from_pretrained folder, out/last the state resume=True
    continues from, bit for bit (safetensors + JSON). Returns the history: losses (the total, and each term of the
    output's loss_dict under "terms"), mAPs, seconds."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    groups: dict[tuple[bool, bool], list] = {}  # (in the backbone, free of weight decay) -> parameters
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            free = p.ndim <= 1 or id(p) in embeddings or name.endswith(("position_bias_table", "level_embed"))
            groups.setdefault((name.startswith(backbone), free), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": lr * (backbone_lr if bb else 1.0),
                              "weight_decay": 0.0 if free else weight_decay} for (bb, free), ps in groups.items()])
    warmup = max(min(warmup, steps // 10), 1)  # at most a tenth of a short run
    ramp = lambda t: min(1.0, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * t / steps))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, ramp)
    rate = lambda n: ema_decay * (1 - math.exp(-float(n) / ema_warmups))  # noqa: E731
    ema = torch.optim.swa_utils.AveragedModel(model, use_buffers=True, avg_fn=lambda avg, new, n: (
        avg * rate(n) + new * (1 - rate(n)) if avg.is_floating_point() else avg))
    ema.update_parameters(model)  # the first update copies the model; updates = 1 from here, as the original's
    hist = {"step": [], "loss": [], "terms": {}, "eval_step": [], "map50": [], "map": [], "seconds": 0.0, "best": -1.0}
    last, parts = Path(out or ".") / "last", {"model": model, "ema": ema, "opt": opt, "schedule": schedule}
    if resume:
        if not out or not (last / "state.json").is_file():
            raise InputError(f"nothing to resume: {last / 'state.json'} does not exist; train without resume first")
        meta, tensors = json.loads((last / "state.json").read_text()), load_file(last / "state.safetensors")
        meta["opt"]["state"] = {int(i): {k: tensors[f"opt.{i}.{k}"] for k in names}
                                for i, names in meta["opt"]["state"].items()}
        for k, part in parts.items():
            part.load_state_dict(meta[k] if k in meta else {n.split(".", 1)[1]: v for n, v in tensors.items()
                                                            if n.startswith(k + ".")})
        torch.set_rng_state(tensors["rng"]), hist.update(meta["history"])
    log, bar = log or tqdm.write, tqdm(range(len(hist["step"]), steps), initial=len(hist["step"]), total=steps)
    model.train()
    for t in bar:
        start = time.perf_counter()
        result = model(**batch(t))
        loss = result.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step(), schedule.step(), ema.update_parameters(model)
        hist["step"].append(t + 1), hist["loss"].append(loss.item()), bar.set_postfix(loss=f"{loss.item():.3f}")
        for name, term in (getattr(result, "loss_dict", None) or {}).items():  # each weighted term, for its own curve
            hist["terms"].setdefault(name, []).append(term.item())
        done = (t + 1) % eval_every == 0 or t + 1 == steps
        if done and evaluate:
            m = evaluate(ema.module.eval())
            ema.module.train()
            hist["eval_step"].append(t + 1), hist["map50"].append(m["map50"]), hist["map"].append(m["map"])
            log(f"step {t + 1}/{steps}  loss {np.mean(hist['loss'][-25:]):.3f} (last 25)  EMA mAP@0.5 "
                f"{m['map50']:.3f}  mAP {m['map']:.3f}")
        if done and out and (not evaluate or hist["map"][-1] > hist["best"]):
            hist["best"] = hist["map"][-1] if evaluate else -1.0
            ema.module.save_pretrained(out)
        hist["seconds"] += time.perf_counter() - start
        if done and out:  # the state to resume from: the tensors in safetensors, the rest (and their names) in JSON
            state = {k: part.state_dict() for k, part in parts.items()}
            tensors = {f"{k}.{n}": v for k in ("model", "ema") for n, v in state[k].items()}
            tensors.update({f"opt.{i}.{k}": v for i, s in state["opt"]["state"].items() for k, v in s.items()})
            state["opt"]["state"] = {i: list(s) for i, s in state["opt"]["state"].items()}
            last.mkdir(parents=True, exist_ok=True)
            save_file({**tensors, "rng": torch.get_rng_state()}, str(last / "state.safetensors"))
            (last / "state.json").write_text(json.dumps({"opt": state["opt"], "schedule": state["schedule"],
                                                         "history": hist}))
    return hist


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compare two stage dumps tensor by tensor.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="print shape, max abs and max rel diff per tensor of A (inf: B lacks it)")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--atol", type=float, default=1e-4, help="exit 1 if any max abs diff exceeds this")
    args = ap.parse_args(argv)
    for f in (args.a, args.b):
        if not Path(f).is_file():
            raise InputError(f"no such file {f}")
    from safetensors import safe_open

    rows = []  # (name, shape, max abs diff, max rel diff) per tensor of A, in A's order
    with safe_open(args.a, "pt") as fa, safe_open(args.b, "pt") as fb:
        order = (fa.metadata() or {}).get("order", "").split(",")
        for name in [n for n in order if n in fa.keys()] or sorted(fa.keys()):
            x = fa.get_tensor(name)
            if name not in fb.keys() or fb.get_tensor(name).shape != x.shape:
                rows.append((name, str(tuple(x.shape)), float("inf"), float("inf")))
                continue
            x, y = x.double(), fb.get_tensor(name).double()
            d = (x - y).abs()
            rel = (d / y.abs().clamp(min=1e-12)).max().item() if d.numel() else 0.0
            rows.append((name, str(tuple(x.shape)), d.max().item() if d.numel() else 0.0, rel))
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"{'tensor':<{width}}  {'shape':<22} {'max abs':>10} {'max rel':>10}")
    for name, shape, d, r in rows:
        print(f"{name:<{width}}  {shape:<22} {d:>10.3g} {r:>10.3g}{'  FAIL' if d > args.atol else ''}")
    bad = [r for r in rows if r[2] > args.atol]
    print(f"{len(rows)} tensors, {len(bad)} over atol {args.atol}")
    return 1 if bad else 0


if __name__ == "__main__":
    run_cli(_main)
