"""Reference D-FINE checkpoints for the tests: transformers' DFineForObjectDetection of each real config with seeded
random weights, saved with save_pretrained and cached by conftest.cached_checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import cached_checkpoint, hub_config

SIZES = ["n", "s", "m", "l", "x"]
TENSORS = {"n": 644, "s": 764, "m": 1009, "l": 1197, "x": 1465}  # per size, as in the Hub files
BUILDER_VERSION = 2  # bump when the way weights are made changes


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
        # The encoder's padding tokens (zeros after the valid mask) become LayerNorm(bias) in enc_output, and the
        # valid ones LayerNorm(bias + a small W x): with a noisy bias both look alike and, at random, the padding
        # ring can win the whole top-300 (it did for S and M), which leaves 300 identical queries and a decoder
        # test that proves nothing. A zero bias sends padding to the LayerNorm's shift alone and keeps the valid
        # tokens' own directions; test_parity_stage_by_stage checks the queries come from the image.
        model.model.enc_output[0].bias.zero_()


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
        if size == "x":  # the real X checkpoint stores reg_scale 8 while its config says 4
            model.model.decoder.reg_scale.fill_(8.0)
        model.save_pretrained(folder)

    folder = cached_checkpoint(f"dfine-{size}-{dataset}", {"config": cfg, "builder": BUILDER_VERSION}, build)
    check_hub_layout(folder, size)
    return folder


def check_hub_layout(folder: Path, size: str) -> None:
    """The file must look like the Hub's: transformers 5.23's save_pretrained writes the 4.x names itself (it undoes
    its load-time renames), so no rewrite is needed, but the tests rely on it, so it is checked here."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == TENSORS[size], f"{folder}: {len(keys)} tensors, the Hub file has {TENSORS[size]}"
    assert any(k.startswith("model.encoder.encoder.0.layers.0.fc1.") for k in keys), "AIFI not under 4.x names"
    assert not any(".o_proj." in k or ".mlp.layers." in k or ".aifi." in k for k in keys), "5.x names in the file"
    assert not any(k.startswith(("class_embed.", "bbox_embed.")) for k in keys), "heads should be under model.decoder"
