"""What the notebooks share: the `cmp` check that ends every section and the matplotlib helpers for the pictures.
Nothing here touches a model."""
from __future__ import annotations

import io
import sys

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

import common


def cmp(name: str, a, b, tol: float = 1e-6) -> None:
    """Print whether a equals b exactly, within tol, and the largest difference; raise if not within tol.

    A section calls the same function on the same input as forward, so exact equality is expected. Lists (one tensor
    per level or per layer) are compared item by item; -inf on both sides (logits beyond a prompt) counts as equal."""
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{name}: {len(a)} tensors against {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            cmp(f"{name}[{i}]", x, y, tol)
        return
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} against {tuple(b.shape)}"
    same_inf = torch.isinf(a) & (a == b)
    diff = (a.double() - b.double()).masked_fill(same_inf, 0).abs().max().item() if a.numel() else 0.0
    print(f"{name:40} {str(tuple(a.shape)):18} exact: {torch.equal(a, b)!s:5}  close: {diff <= tol!s:5}  "
          f"max diff: {diff:.1e}  (tol {tol:g})")
    if not diff <= tol:  # also catches NaN
        raise AssertionError(f"{name} differs by {diff:.3g} (tolerance {tol})")


def compact_pictures(dpi: int = 80, colours: int = 256) -> None:
    """Inline pictures at `dpi`, stored as PNGs of at most `colours` colours: a third of the bytes of a full-colour
    PNG (the shape scenes' noisy backgrounds compress badly), which adds up in a notebook committed with its outputs.
    Outside IPython only the dpi is set."""
    plt.rcParams["figure.dpi"] = dpi
    ipython = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
    if ipython is None:
        return
    plt.close(plt.figure())  # loads the inline backend, which registers its own PNG formatter; ours replaces it

    def png(fig: Figure) -> bytes:
        buf = io.BytesIO()
        fig.canvas.print_figure(buf, format="png", bbox_inches="tight", facecolor="white")
        out = io.BytesIO()
        Image.open(buf).convert("RGB").quantize(colours, dither=Image.Dither.NONE).save(out, "png", optimize=True)
        return out.getvalue()

    ipython.display_formatter.formatters["image/png"].for_type(Figure, png)


def show(ax, img, title=None, **kw) -> None:
    ax.imshow(img, **kw)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def pixels(boxes: torch.Tensor, size) -> list:
    """(..., 4) cxcywh in [0, 1] -> xyxy in pixels of an image of size (width, height)."""
    w, h = size
    return (common.center_to_corners(boxes) * torch.tensor([w, h, w, h])).tolist()


def label(ax, x, y, text, colour, below=False, right=False, stack=0) -> None:
    """White text on a dark box edged in `colour`: legible on any background. At (x, y), above it (or below), its
    left end there (or its right end); the `stack`-th label at one point goes below the ones before it."""
    below, stack = below or stack > 0, stack - (stack > 0 and not below)  # above: only the first; then downwards
    ax.annotate(text, (x, y), xytext=(0, -10 * stack), textcoords="offset points", annotation_clip=False,
                color="white", fontsize=7, va="top" if below else "bottom", ha="right" if right else "left",
                bbox=dict(facecolor="black", alpha=0.75, pad=1.2, edgecolor=colour, linewidth=1))


def draw_boxes(ax, boxes, colours, labels=None, lw=1.5) -> None:
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colours[i], linewidth=lw))
        if labels:
            label(ax, x0, y0, labels[i], colours[i])


# what each detection is, judged against the ground truth as COCO's evaluation does (best score first, IoU >= 0.5)
STYLES = {"true positive": dict(edgecolor="limegreen", linestyle="-"),
          "duplicate": dict(edgecolor="orange", linestyle="--"),
          "wrong class": dict(edgecolor="magenta", linestyle="-"),
          "false positive": dict(edgecolor="red", linestyle=":"),
          "missed": dict(edgecolor="cyan", linestyle="--")}


def judge(dets: dict, truth: dict | None, iou: float = 0.5) -> tuple[list[str], list[int]]:
    """Each detection's kind (a key of STYLES) and the indices of the missed true objects. dets: detect()'s result
    (xyxy pixel boxes, names); truth: {"names": n strings, "boxes": (n, 4) xyxy pixels}. Best score first, a
    detection takes the unmatched true object of its class it overlaps most (true positive); one that overlaps an
    already matched object of its class is a duplicate; one that overlaps an object of another class, a wrong class."""
    n = len(dets["names"])
    if truth is None:
        return ["true positive"] * n, []
    ious = common.box_iou(torch.as_tensor(dets["boxes"], dtype=torch.float32).reshape(-1, 4),
                          torch.as_tensor(truth["boxes"], dtype=torch.float32).reshape(-1, 4))[0]  # (n, m)
    over = ious >= iou
    same = torch.tensor([[a == b for b in truth["names"]] for a in dets["names"]], dtype=torch.bool).reshape(over.shape)
    taken, kinds = torch.zeros(over.shape[1], dtype=torch.bool), [""] * n
    for i in torch.as_tensor(dets["scores"]).argsort(descending=True, stable=True).tolist():
        free = over[i] & same[i] & ~taken
        if free.any():
            taken[int(ious[i].masked_fill(~free, -1).argmax())] = True
            kinds[i] = "true positive"
        else:
            kinds[i] = ("duplicate" if (over[i] & same[i]).any() else "wrong class" if over[i].any()
                        else "false positive")
    return kinds, (~taken).nonzero().flatten().tolist()


def draw_detections(ax, image, dets: dict, truth: dict | None = None, title: str | None = None,
                    legend: bool = True) -> list[str]:
    """A detection panel: the image, the ground truth (thin white), each detection styled by its kind (judge) with
    its name and score on a dark label, the missed objects named; a legend of the kinds shown. Returns the kinds."""
    show(ax, image, title)
    kinds, missed, placed = *judge(dets, truth), []
    for x0, y0, x1, y1 in [] if truth is None else truth["boxes"]:
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=0.8))
    for j in missed:
        x0, y0, x1, y1 = truth["boxes"][j]
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, linewidth=2, **STYLES["missed"]))
        label(ax, x0, y1, f"missed: {truth['names'][j]}", "cyan", below=True)
    for (x0, y0, x1, y1), name, score, kind in zip(dets["boxes"].tolist(), dets["names"], dets["scores"], kinds):
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, linewidth=2, **STYLES[kind]))
        text = f"{name} {float(score):.2f}" + ("" if kind == "true positive" else f" ({kind})")
        right = x0 > 0.6 * image.size[0]  # a label near the right border ends at the box's right edge
        # a duplicate's label inside its box, at the bottom: the box it repeats has its label on top; a box at the
        # top border has its label inside, below its top edge
        top = y0 < 0.05 * image.size[1]
        x, y, below = x1 if right else x0, y1 if kind == "duplicate" else y0, top and kind != "duplicate"
        # one box may carry several names (one query, two classes): their labels stack instead of covering each other
        near = 0.03 * max(image.size)  # labels closer than this share a point
        stack = sum(abs(x - a) < near and abs(y - b) < near and (below, right) == c for a, b, c in placed)
        placed.append((x, y, (below, right)))
        label(ax, x, y, text, STYLES[kind]["edgecolor"], below=below, right=right, stack=stack)
    if legend:
        shown = [k for k in STYLES if k in kinds or (k == "missed" and missed)]
        handles = [Line2D([], [], color="white", lw=0.8, label="ground truth")] if truth is not None else []
        handles += [Line2D([], [], color=STYLES[k]["edgecolor"], ls=STYLES[k]["linestyle"], lw=2, label=k)
                    for k in shown]
        if handles:
            ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=3, fontsize=7,
                      facecolor="0.3", labelcolor="white", framealpha=1)
    return kinds


def pca_rgb(fmap: torch.Tensor):
    """(C, H, W) -> (H, W, 3): the three main directions of the channels as red, green, blue."""
    C, H, W = fmap.shape
    x = fmap.reshape(C, -1).T.double()  # (H*W, C)
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    y = x @ v[:3].T  # (H*W, 3)
    y = (y - y.min(0).values) / (y.max(0).values - y.min(0).values).clamp(min=1e-12)
    return y.reshape(H, W, 3).numpy()


def unnormalise(px: torch.Tensor, pp: dict):
    """(3, H, W) normalised pixels -> (H, W, 3) in [0, 1] for imshow; pp holds the preprocessor's mean and std."""
    mean, std = torch.tensor(pp["mean"])[:, None, None], torch.tensor(pp["std"])[:, None, None]
    return (px * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
