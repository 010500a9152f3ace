"""Reference D-FINE checkpoints for the tests: transformers' DFineForObjectDetection of each real config with seeded
random weights, saved with save_pretrained and cached by conftest.cached_checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import cached_checkpoint, hub_config

SIZES = ["n", "s", "m", "l", "x"]
BUILDER_VERSION = 1  # bump when the way weights are made changes


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Make every weight and BN statistic non-trivial, so a wrong formula anywhere shows up in the outputs.

    transformers' init leaves many tensors at 0 or 1 (biases, BN stats, the last FDR layer); noise on all floats and
    running_var in [0.5, 2] exercise them. reg_scale/up stay as initialised (set separately where wanted).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or name.endswith(("reg_scale", "up", "num_points_scale")):
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + 1.5 * torch.rand(t.shape, generator=g))
            else:
                t.add_(0.05 * torch.randn(t.shape, generator=g))


def hf_model(folder: Path):
    from transformers import DFineForObjectDetection

    return DFineForObjectDetection.from_pretrained(folder).eval()


def checkpoint(size: str, dataset: str = "coco") -> Path:
    """The folder of a reference checkpoint at the real config of dfine-{size}-{dataset}."""
    cfg = hub_config(f"dfine_{size}_coco")
    if dataset == "obj365":  # same architecture with the 366-way Objects365 head (labels generic here)
        cfg = {**cfg, "id2label": {str(i): f"object{i}" for i in range(366)}}
        cfg.pop("label2id", None)

    def build(folder: Path) -> None:
        from transformers import DFineConfig, DFineForObjectDetection

        torch.manual_seed(SIZES.index(size))
        model = DFineForObjectDetection(DFineConfig(**cfg)).eval()
        perturb_(model, seed=100 + SIZES.index(size))
        if size == "x":  # the real X checkpoint stores reg_scale 8 while its config says 4 (spec P2)
            model.model.decoder.reg_scale.fill_(8.0)
        model.save_pretrained(folder)

    return cached_checkpoint(f"dfine-{size}-{dataset}", {"config": cfg, "builder": BUILDER_VERSION}, build)
