"""Reference checkpoints and reference runs for tests/test_gdino.py, built with transformers (the parity target).

A reference checkpoint is transformers' Grounding DINO (or MM Grounding DINO) at a real config with seeded random
weights, every parameter perturbed so that no path is trivially zero or one (default init leaves the deformable
offsets, attention weights and last box layers at 0 and the fusion layer scales at 1e-4), saved with
save_pretrained next to the real grounding-dino-tiny tokenizer and preprocessor files from tests/data.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from conftest import DATA, cached_checkpoint, hub_config

TOKENIZER_DIR = DATA / "grounding-dino-tiny"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "added_tokens.json", "preprocessor_config.json"]
BUILDER_VERSION = 1  # bump to rebuild every cached reference checkpoint
REAL_TINY_BYTES = 689_359_096  # the Hub's grounding-dino-tiny model.safetensors (LFS pointer size)


def small_config(name: str = "grounding-dino-tiny", **top) -> dict:
    """A real config shrunk for fast tests: 32-wide Swin, 2-layer 64-wide BERT (real vocabulary), d_model 64,
    2+2 layers, 50 queries. Everything else (levels, points, max_text_len 256, head sharing) as the real one."""
    cfg = hub_config(name)
    cfg["backbone_config"].update(embed_dim=32, num_heads=[1, 2, 4, 8], depths=[1, 1, 2, 1])
    cfg["text_config"].update(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    cfg.update(d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=2, decoder_layers=2,
               num_queries=50)
    cfg.update(top)
    return cfg


def _model_classes(cfg: dict):
    if cfg["model_type"] == "mm-grounding-dino":
        from transformers import MMGroundingDinoConfig, MMGroundingDinoForObjectDetection
        return MMGroundingDinoConfig, MMGroundingDinoForObjectDetection
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection
    return GroundingDinoConfig, GroundingDinoForObjectDetection


def build(folder: Path, cfg: dict, seed: int, temper: bool = False, size: dict | None = None) -> None:
    config_cls, model_cls = _model_classes(cfg)
    torch.manual_seed(seed)
    model = model_cls(config_cls.from_dict(cfg)).eval()  # the direct constructor: sdpa, as from_pretrained
    with torch.no_grad():
        for p in model.parameters():  # parameters() lists a tied head once, so ties stay ties
            p.add_(0.05 * torch.randn_like(p))
        if temper:  # shrink the decoder's output norm so class scores spread over (0, 1) and thresholds matter
            model.model.decoder.layer_norm.weight.mul_(0.03)
            model.model.decoder.layer_norm.bias.mul_(0.03)
    model.save_pretrained(folder)
    for f in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / f, folder / f)
    if size:  # a smaller resize for fast tests, written where from_pretrained reads it
        pre = json.loads((folder / "preprocessor_config.json").read_text())
        (folder / "preprocessor_config.json").write_text(json.dumps({**pre, "size": size}))


def to_hub_layout(folder: Path) -> int:
    """Rewrite model.safetensors with exactly the key set of the Hub's grounding-dino-tiny file: no
    swin.layernorm (5.23 writes it, the Hub file lacks it), plus each Swin block's relative_position_index
    int64 (ws^2, ws^2) buffer (the Hub file has them; 5.23 no longer saves them). Returns the file size."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in list(f.keys()) if ".swin.layernorm." not in k}
    ws = json.loads((folder / "config.json").read_text())["backbone_config"]["window_size"]
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    index = ((rel[..., 0] + ws - 1) * (2 * ws - 1) + rel[..., 1] + ws - 1).contiguous()
    for k in [k for k in tensors if k.endswith("attention.self.relative_position_bias_table")]:
        tensors[k.replace("relative_position_bias_table", "relative_position_index")] = index.clone()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path.stat().st_size


def checkpoint(tag: str, cfg: dict, seed: int = 0, hub_layout: bool = False, temper: bool = False,
               size: dict | None = None) -> Path:
    def make(folder: Path) -> None:
        build(folder, cfg, seed, temper, size)
        if hub_layout:
            to_hub_layout(folder)

    key = {"cfg": cfg, "seed": seed, "hub_layout": hub_layout, "temper": temper, "size": size, "v": BUILDER_VERSION}
    return cached_checkpoint(tag, key, make)


def load(folder: Path, dtype: torch.dtype | None = None):
    """The reference as users get it: from_pretrained (sdpa BERT: eager adds the boolean phrase mask as 0/1, which
    masks nothing); dtype as from_pretrained's (None: float32)."""
    cfg = json.loads((folder / "config.json").read_text())
    model = _model_classes(cfg)[1].from_pretrained(folder, **({"dtype": dtype} if dtype else {})).eval()
    assert model.model.text_backbone.config._attn_implementation == "sdpa"
    return model


def processor():
    from transformers import AutoTokenizer, GroundingDinoProcessor
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

    return GroundingDinoProcessor(GroundingDinoImageProcessorPil.from_pretrained(TOKENIZER_DIR),
                                  AutoTokenizer.from_pretrained(TOKENIZER_DIR))


@torch.no_grad()
def run(model, inputs: dict) -> dict:
    """One transformers forward; returns its stages under our stage names (hooks catch the intermediate ones)."""
    caught = {}
    m = model.model
    hooks = [m.backbone.conv_encoder.model.register_forward_hook(
                 lambda mod, i, o: caught.__setitem__("backbone", list(o.feature_maps))),
             m.text_projection.register_forward_hook(lambda mod, i, o: caught.__setitem__("text_features", o))]
    for lvl, proj in enumerate(m.input_proj_vision):
        hooks.append(proj.register_forward_hook(
            lambda mod, i, o, lvl=lvl: caught.setdefault("projected", {}).update({lvl: o})))
    try:
        out = model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    L = len(caught["projected"])
    return {"backbone": caught["backbone"], "text_features": caught["text_features"],
            "projected_maps": [caught["projected"][lvl] for lvl in range(L)],
            "encoder_vision": out.encoder_last_hidden_state_vision, "encoder_text": out.encoder_last_hidden_state_text,
            "enc_outputs_class": out.enc_outputs_class, "enc_outputs_coord_logits": out.enc_outputs_coord_logits,
            "topk_indices": torch.topk(out.enc_outputs_class.max(-1)[0], model.config.num_queries, dim=1)[1],
            "init_reference_points": out.init_reference_points,
            "decoder_hidden": list(out.intermediate_hidden_states.unbind(1)),
            "decoder_boxes": list(out.intermediate_reference_points.unbind(1)),
            "logits": out.logits, "pred_boxes": out.pred_boxes, "_out": out}
