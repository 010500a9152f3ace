"""What the notebooks share: the `cmp` check that ends every section and the matplotlib helpers for the pictures.
Nothing here touches a model."""
from __future__ import annotations

import matplotlib.pyplot as plt
import torch

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


def show(ax, img, title=None, **kw) -> None:
    ax.imshow(img, **kw)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def pixels(boxes: torch.Tensor, size) -> list:
    """(..., 4) cxcywh in [0, 1] -> xyxy in pixels of an image of size (width, height)."""
    w, h = size
    return (common.center_to_corners(boxes) * torch.tensor([w, h, w, h])).tolist()


def draw_boxes(ax, boxes, colours, labels=None, lw=1.5) -> None:
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colours[i], linewidth=lw))
        if labels:
            ax.text(x0, y0, labels[i], color="white", fontsize=8, va="bottom",
                    bbox=dict(facecolor=colours[i], alpha=0.8, pad=1, edgecolor="none"))


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
