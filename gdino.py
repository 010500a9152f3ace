"""Grounding DINO: open-set object detection from a text prompt, in one file of plain PyTorch.

Paper: Liu et al., "Grounding DINO: Marrying DINO with Grounded Pre-Training for Open-Set Object Detection" (2023).
Mirrors transformers 5.23 `GroundingDinoForObjectDetection` (and `MMGroundingDinoForObjectDetection`, which only
differs in its heads; see section 9) op for op, so that the outputs match it bit for bit on CPU in fp32;
and `GroundingDinoProcessor` with the PIL image processor for preprocessing and post-processing.
Deliberate differences, each said where it happens: prompts over 256 tokens are refused by forward and chunked by
`detect`, which runs images one at a time and post-processes in float32; bf16/fp16 sample the deformable attention
in float32; in training each image's class targets come from its own prompt and the encoder term trains the
encoder's proposals, as the paper (transformers offsets class ids by the wrong phrase count, and trains no proposal).
Loads the Hub checkpoints IDEA-Research/grounding-dino-{tiny,base} (and the MM Grounding DINO / LLMDet ones of
model_type "mm-grounding-dino") from their config.json, tokenizer.json (or vocab.txt) and model.safetensors.
Leaves out: the timm/ResNet backbones, the single-stage (`two_stage=False`) variant, `output_attentions`, denoising
queries (transformers' Grounding DINO has none either). Deformable attention is common.py's readable version or, by
default on x86 CPUs, kernels.py's Numba kernel, which gives the same bits (common.resolve_backend).

Stages, in the order `forward` runs them (section numbers are the notebook's):
  1. config             config.json -> GroundingDinoConfig (Swin and BERT sub-configs filled with their defaults)
  2. inputs             image resize/normalise/pad; prompt normalisation, tokens, sub-sentence mask, position ids
  3. Swin backbone      image -> 3 (or 4) feature maps before each stage's downsampling
  4. BERT               tokens -> text features (B, T, 768) -> projected to (B, T, 256)
  5. multi-scale input  1x1 conv + GroupNorm per map, one extra strided level; masks; sine position embeddings
  6. feature enhancer   6 x (image-text fusion, text self-attention, deformable self-attention on the image)
  7. query selection    encoder proposals scored against the text; the top 900 become the decoder's boxes
  8. decoder            6 x (self-attention, text cross-attention, deformable cross-attention, FFN, box refinement)
  9. heads, the model   contrastive class logits (B, Q, 256) against the text tokens, boxes (B, Q, 4) cxcywh;
                        GroundingDino, whose forward runs sections 3-9 in order
 10. detection          detect (long label lists in chunks; backbone and BERT reusable via encode_image/_prompt);
                        post-processing as post_process_grounded_object_detection
 11. loading, saving    one key table read both ways (Hub and transformers 5.x names), from_pretrained, save_pretrained
 12. training           label maps from the prompt, Hungarian matching, focal/L1/GIoU set loss; init from scratch
 13. fast inference     an option: the bi-attention's projections folded into the text side, the FFN in row
                        blocks; not bit-exact (off by default)
 14. ONNX export        model.export_onnx(path): dynamic batch, image size and prompt length
 15. command line

Shapes: B batch, S image tokens (all levels), T text tokens, Q queries (900), L levels, P sampling points per
level, nH heads, hD head dim, C channels, N tokens in a Swin window (ws * ws).
"""
from __future__ import annotations

import itertools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.utils.rnn import pad_sequence

import common
from common import InputError, LoadError, center_to_corners, check_threshold, load_image, ms_deform_attn

MODEL_TYPES = ("grounding-dino", "mm-grounding-dino")
DEFAULT_MODEL = "IDEA-Research/grounding-dino-tiny"

# -----------------------------------------------------------------------------
# 1. Config: the Hub config.json, with every field it leaves out filled from the SwinConfig/BertConfig defaults


@dataclass
class SwinConfig:
    embed_dim: int = 96
    depths: list = field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list = field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5
    out_features: list = field(default_factory=lambda: ["stage2", "stage3", "stage4"])  # stage1..4 for Swin-L
    drop_path_rate: float = 0.1  # training: stochastic depth, rising linearly to this over the blocks


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12  # BERT's own; every Grounding DINO LayerNorm uses layer_norm_eps below
    hidden_dropout_prob: float = 0.1  # training only, as the two below
    attention_probs_dropout_prob: float = 0.1


def known_fields(klass, d: dict):
    return klass(**{k: d[k] for k in klass.__dataclass_fields__ if k in d})  # the rest: training-only fields


@dataclass
class GroundingDinoConfig:
    model_type: str = "grounding-dino"  # "mm-grounding-dino": class head scaled by 1/sqrt(d) plus a learned bias
    backbone: SwinConfig = field(default_factory=SwinConfig)
    text: BertConfig = field(default_factory=BertConfig)
    d_model: int = 256
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8  # the text enhancer and the fusion use half of these
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048  # the text enhancer FFN and the fusion width use half of this
    decoder_ffn_dim: int = 2048
    encoder_n_points: int = 4
    decoder_n_points: int = 4
    num_feature_levels: int = 4  # backbone maps + extra strided levels; 5 for the Swin-L checkpoints
    num_queries: int = 900
    max_text_len: int = 256  # the class head's width: longer prompts are refused (detect splits them)
    layer_norm_eps: float = 1e-5
    positional_embedding_temperature: float = 20  # image sine embedding; text and query sines use 10000
    # one box MLP (MM: also one class bias) for all decoder layers? None = config.json does not say: Grounding DINO
    # shares (its default); an MM checkpoint's weights say (mm_layout)
    decoder_bbox_embed_share: bool | None = None
    decoder_cls_embed_share: bool | None = None
    # training only (section 12): dropout, drop path, and the matcher's and the loss's weights
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    fusion_dropout: float = 0.0
    fusion_droppath: float = 0.1
    text_enhancer_dropout: float = 0.0
    class_cost: float = 1.0
    bbox_cost: float = 5.0
    giou_cost: float = 2.0
    class_loss_coefficient: float = 2.0  # not a transformers config field: its loss fixes this weight at 2.0
    bbox_loss_coefficient: float = 5.0
    giou_loss_coefficient: float = 2.0
    focal_alpha: float = 0.25
    auxiliary_loss: bool = False  # the Hub configs say false; the papers train every decoder layer (set true)
    id2label: dict[int, str] | None = None  # fine-tuned (train): the dataset's classes, detect's default prompt
    coco_category_ids: list[int] | None = None  # fine-tuned: each class's id in the dataset (common.COCO_IDS_KEY)

    @classmethod
    def from_dict(cls, cfg: dict) -> GroundingDinoConfig:
        bb, tx = dict(cfg.get("backbone_config") or {}), dict(cfg.get("text_config") or {})
        swin, bert, top = "backbone_config.", "text_config.", ""  # where a key sits, for the message
        fixed = [(swin, "model_type", "swin"), (bert, "model_type", "bert"), (swin, "use_absolute_embeddings", False),
                 (top, "two_stage", True), (top, "embedding_init_target", True), (swin, "hidden_act", "gelu"),
                 (bert, "hidden_act", "gelu"), (top, "activation_function", "relu"), (top, "query_dim", 4),
                 (top, "position_embedding_type", "sine"), (swin, "hidden_dropout_prob", 0.0),
                 (swin, "attention_probs_dropout_prob", 0.0)]
        if cfg.get("model_type") == "grounding-dino":  # MM checkpoints share it
            fixed.append((top, "two_stage_bbox_embed_share", False))
        for where, k, v in fixed:  # what every released checkpoint uses and the only thing implemented here
            d = {swin: bb, bert: tx, top: cfg}[where]
            if d.get(k, v) != v:
                raise LoadError(f"config {where}{k}={d[k]!r} is not supported (only {v!r})")
        if not bb.get("out_features") and bb.get("out_indices"):  # older configs name stages by index only
            bb["out_features"] = [["stem", "stage1", "stage2", "stage3", "stage4"][i] for i in bb["out_indices"]]
        top = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg and k not in ("backbone", "text")}
        if top.get("id2label"):  # JSON keys are strings
            top["id2label"] = {int(k): v for k, v in top["id2label"].items()}
        return cls(backbone=known_fields(SwinConfig, bb), text=known_fields(BertConfig, tx), **top)

    @property
    def is_mm(self) -> bool:
        return self.model_type == "mm-grounding-dino"

    @property
    def share_box(self) -> bool:
        return self.decoder_bbox_embed_share if self.decoder_bbox_embed_share is not None else not self.is_mm

    @property
    def share_cls(self) -> bool:  # Grounding DINO's class heads have no parameters: nothing to share
        return not self.is_mm or (self.decoder_cls_embed_share if self.decoder_cls_embed_share is not None else False)


# -----------------------------------------------------------------------------
# 2. Inputs: images (as the PIL GroundingDinoImageProcessor) and text (as GroundingDinoProcessor + BERT tokenizer)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHORTEST_EDGE, LONGEST_EDGE = 800, 1333  # the Hub preprocessors' resize, used where a checkpoint gives none


@dataclass(frozen=True)
class SpecialTokens:
    """The ids the model reads from the tokenizer's vocabulary (bert-base-uncased: 101, 102, 0, 100, 1012, 1029)."""
    cls: int
    sep: int
    pad: int
    unk: int
    dot: int
    question: int

    @property
    def delimiters(self) -> tuple[int, ...]:  # the tokens that close a phrase
        return self.cls, self.sep, self.dot, self.question


@torch.compiler.assume_constant_result  # torch.compile reads the ids once, not the tokenizer in the graph
def special_tokens(tokenizer) -> SpecialTokens:
    if tokenizer is None:
        raise InputError("the model has no tokenizer; set model.tokenizer = gdino.load_tokenizer(FOLDER)")
    names = {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "unk": "[UNK]", "dot": ".", "question": "?"}
    ids = {k: tokenizer.token_to_id(t) for k, t in names.items()}
    if None in ids.values():
        raise LoadError(f"the tokenizer lacks {[names[k] for k, v in ids.items() if v is None]}; Grounding DINO needs "
                        f"a BERT WordPiece vocabulary")
    return SpecialTokens(**ids)


def resized_size(h: int, w: int, shortest: int = SHORTEST_EDGE, longest: int = LONGEST_EDGE) -> tuple[int, int]:
    """Shortest edge to `shortest` unless the longest would pass `longest`; transformers truncates with int()
    (480x640 -> 800x1066, where mmdet rounds to 1067) and keeps the unrounded size for the long side."""
    size, raw = shortest, None
    if max(h, w) / min(h, w) * size > longest:
        raw = longest * min(h, w) / max(h, w)
        size = round(raw)  # Python's round: ties to even, as transformers
    if (h <= w and h == size) or (w <= h and w == size):
        return h, w
    if w < h:
        return int((raw if raw is not None else size) * h / w), size
    return size, int((raw if raw is not None else size) * w / h)


def preprocess_images(images: Sequence, shortest: int = SHORTEST_EDGE, longest: int = LONGEST_EDGE, mean=IMAGENET_MEAN,
                      std=IMAGENET_STD) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Images (anything common.load_image reads) -> pixel_values (B, 3, H, W), pixel_mask (B, H, W) int64 with 1 on
    the image and 0 on the bottom/right zero padding, and each image's original (height, width)."""
    arrays, sizes = [], []
    for src in images:
        img = load_image(src)
        sizes.append((img.height, img.width))
        oh, ow = resized_size(img.height, img.width, shortest, longest)
        img = img.resize((ow, oh), Image.BILINEAR)  # PIL returns a copy when the size is unchanged
        # transformers rescales in float64 then casts to float32, and normalises in float32: the same here
        x = (np.asarray(img).astype(np.float64) * (1 / 255)).astype(np.float32)
        x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
        arrays.append(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))))  # (3, h, w)
    H, W = max(a.shape[1] for a in arrays), max(a.shape[2] for a in arrays)
    pixel_values = torch.zeros(len(arrays), 3, H, W)
    pixel_mask = torch.zeros(len(arrays), H, W, dtype=torch.long)
    for i, a in enumerate(arrays):
        pixel_values[i, :, : a.shape[1], : a.shape[2]] = a
        pixel_mask[i, : a.shape[1], : a.shape[2]] = 1
    return pixel_values, pixel_mask, sizes


def load_tokenizer(folder: str | Path):
    """The checkpoint's tokenizer.json with the `tokenizers` library; MM/LLMDet repos may ship only vocab.txt."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.txt").is_file():
        raise LoadError(f"{folder} has neither tokenizer.json nor vocab.txt")
    try:
        if (folder / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        else:
            tok = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=True)  # uncased, like the Hub files
    except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
        raise LoadError(f"cannot read the tokenizer in {folder}: {e}") from None
    tok.no_truncation()  # a long prompt is split by detect() or refused by forward(), never cut silently
    tok.no_padding()
    return tok


def normalize_prompt(prompt: str | Sequence[str]) -> str:
    """A label list ["A cat", "remote"] -> "a cat. remote." as the transformers processor joins it; a string passes
    unchanged (without a final '.' its last phrase is no phrase, in transformers too: keep the dot)."""
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, str) for t in prompt):
        if not prompt:
            raise InputError("the label list is empty; give at least one label")
        if any(not t.strip() for t in prompt):
            raise InputError(f"the label list {list(prompt)} has an empty label")
        if any("." in t for t in prompt):
            raise InputError(f"labels {list(prompt)} contain '.', which separates labels; pass one string instead")
        text = ". ".join(t.strip().lower() for t in prompt) + "."
    else:
        raise InputError(f"a prompt is a string or a list of label strings, got {type(prompt).__name__}")
    if not text.strip():
        raise InputError("the prompt is empty; give labels like 'a cat. a remote control.'")
    return text


def tokenize(tokenizer, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Texts -> input_ids, attention_mask, token_type_ids (B, T), padded with [PAD] as padding="longest" does."""
    special = special_tokens(tokenizer)
    encs = [tokenizer.encode(t) for t in texts]
    for t, e in zip(texts, encs):
        words = [i for i in e.ids if i not in special.delimiters]
        if not words:
            raise InputError(f"the prompt {t!r} has no words, only punctuation; give labels like 'a cat.'")
        if all(i == special.unk for i in words):
            raise InputError(f"no word of the prompt {t!r} is in the vocabulary (all [UNK]); use English words")
    ids = pad_sequence([torch.tensor(e.ids) for e in encs], batch_first=True, padding_value=special.pad)  # (B, T)
    mask = pad_sequence([torch.ones(len(e.ids), dtype=torch.long) for e in encs], batch_first=True)  # (B, T)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def phrase_masks(input_ids: torch.Tensor, delimiters: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-sentence self-attention mask (B, T, T), True = may attend, and per-phrase position ids (B, T). A phrase
    is the run of tokens up to and including its closing delimiter ('.', '?', [SEP]); its tokens see each other only
    and count positions from 0. [CLS], [SEP], [PAD] and the tokens after the last interior delimiter see only
    themselves, at position 0 (transformers' generate_masks_with_special_tokens_and_transfer_map)."""
    B, T = input_ids.shape
    delim = (input_ids[..., None] == torch.tensor(delimiters, device=input_ids.device)).any(-1)  # (B, T)
    idx = torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, -1)  # (B, T)
    before = idx.unsqueeze(1) < idx.unsqueeze(2)  # (B, T, T): [b, t, s] is True where token s comes before t
    prev = torch.where(delim.unsqueeze(1) & before, idx.unsqueeze(1), -1).amax(-1)  # (B, T): last delimiter before
    nxt = torch.where(delim.unsqueeze(1) & ~before, idx.unsqueeze(1), T).amin(-1)  # (B, T): first delimiter at/after
    valid = (nxt != 0) & (nxt != T - 1) & (nxt != T)  # phrases closed by [CLS], the final [SEP] or nothing don't count
    mask = (nxt.unsqueeze(2) == nxt.unsqueeze(1)) & valid.unsqueeze(1)  # (B, T, T)
    mask = (idx.unsqueeze(2) == idx.unsqueeze(1)) | mask  # (B, T, T): every token sees itself
    position_ids = torch.where(valid, idx - prev - 1, torch.zeros_like(idx)).clamp(min=0).long()
    return mask, position_ids


# -----------------------------------------------------------------------------
# 3. Swin backbone (Liu et al. 2021): shifted-window attention; maps taken before each stage's downsampling


class DropPath(nn.Module):
    """Stochastic depth: in training, each sample's residual branch is dropped with probability p, kept ones / (1-p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device) >= self.p  # (B, 1, ..)
        return x * keep / (1 - self.p)


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)  # (B, H/ws, ws, W/ws, ws, C)
    return x.transpose(2, 3).contiguous().view(-1, ws, ws, C)  # (B*nW, ws, ws, C), batch outermost


def relative_position_index(ws: int) -> torch.Tensor:
    """(N, N): row of the bias table for each (query, key) pair of a window, (dh + ws-1) * (2ws-1) + (dw + ws-1)."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    return (rel[..., 0] + ws - 1) * (2 * ws - 1) + (rel[..., 1] + ws - 1)


def shift_mask(H: int, W: int, ws: int, shift: int) -> torch.Tensor:
    """(nW, N, N) additive mask for shifted windows: -100 (not -inf, as Swin) between tokens that the cyclic roll
    brought together from different regions. Regions per axis: [0, n-ws), [n-ws, n-shift), [n-shift, n)."""
    h, w = torch.arange(H), torch.arange(W)
    rh = (h >= H - ws).long() + (h >= H - shift).long()
    rw = (w >= W - ws).long() + (w >= W - shift).long()
    label = (rh[None, :, None, None] * 3 + rw[None, None, :, None]).float()  # (1, H, W, 1)
    label = window_partition(label, ws).view(-1, ws * ws)  # (nW, N)
    diff = label.unsqueeze(1) - label.unsqueeze(2)  # (nW, N, N)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ws: int, shift: int, cfg: SwinConfig, drop_path: float):
        super().__init__()
        self.heads, self.ws, self.shift = heads, ws, shift
        self.layernorm_before = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.query, self.key, self.value = (nn.Linear(dim, dim, bias=cfg.qkv_bias) for _ in range(3))
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        self.proj = nn.Linear(dim, dim)
        self.layernorm_after = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.fc1, self.fc2 = nn.Linear(dim, int(cfg.mlp_ratio * dim)), nn.Linear(int(cfg.mlp_ratio * dim), dim)
        # on both branches, as the original Swin (transformers' drops the attention branch only)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        B, _, C = x.shape
        ws, N, s = self.ws, self.ws * self.ws, self.shift
        y = self.layernorm_before(x).view(B, h, w, C)  # (B, h, w, C)
        # zero-pad after the norm to whole windows; padded tokens are keys like any other (no padding mask in Swin)
        y = F.pad(y, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))  # (B, Hp, Wp, C)
        Hp, Wp = y.shape[1], y.shape[2]
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        win = window_partition(y, ws).view(-1, N, C)  # (B*nW, N, C)
        bias = self.relative_position_bias_table[relative_position_index(ws).view(-1).to(x.device)]  # (N*N, nH)
        mask = bias.view(N, N, -1).permute(2, 0, 1).contiguous().unsqueeze(0)  # (1, nH, N, N)
        if s:  # the same (nW, N, N) mask for every image: batch outermost, as the windows
            mask = mask + shift_mask(Hp, Wp, ws, s).to(x.device, x.dtype).repeat(B, 1, 1)[:, None]  # (B*nW,nH,N,N)
        q, k, v = (lin(win).view(win.shape[0], N, -1, C // self.heads).transpose(1, 2)  # (B*nW, nH, N, hD)
                   for lin in (self.query, self.key, self.value))
        # transformers' Swin runs SDPA with the float bias(+shift) mask; the same call gives the same rounding
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=(C // self.heads) ** -0.5)
        a = a.transpose(1, 2).contiguous().reshape(win.shape[0], N, -1).contiguous()  # (B*nW, N, C)
        a = self.proj(a).view(B, Hp // ws, Wp // ws, ws, ws, C)  # (B, Hp/ws, Wp/ws, ws, ws, C)
        y = a.transpose(2, 3).contiguous().view(B, Hp, Wp, C)  # (B, Hp, Wp, C): windows back in place
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + self.drop_path(y[:, :h, :w].contiguous().view(B, h * w, C))  # (B, h*w, C)
        return x + self.drop_path(self.fc2(F.gelu(self.fc1(self.layernorm_after(x)))))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (4C), normed, projected to 2C: halves the resolution (odd sizes padded)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=eps)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        B, _, C = x.shape
        x = F.pad(x.view(B, h, w, C), (0, 0, 0, w % 2, 0, h % 2))  # (B, h', w', C), even
        # order (row, col) = (0,0), (1,0), (0,1), (1,1): the checkpoint's reduction weights expect it
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)  # (B, h/2, w/2, 4C)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))  # (B, h/2 * w/2, 2C)


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, cfg: SwinConfig, downsample: bool, drops: list[float]):
        super().__init__()
        # odd blocks shift by ws // 2, always: transformers' SwinBackbone never shrinks the window on small maps
        self.blocks = nn.ModuleList([SwinBlock(dim, heads, cfg.window_size, (i % 2) * (cfg.window_size // 2), cfg,
                                               drops[i]) for i in range(depth)])
        self.downsample = PatchMerging(dim, cfg.layer_norm_eps) if downsample else None

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:  # (B, h*w, C), before the downsampling
        for block in self.blocks:
            x = block(x, h, w)
        return x


class SwinBackbone(nn.Module):
    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patch_embed = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)
        self.patch_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        n, blocks = len(cfg.depths), sum(cfg.depths)
        drops = [cfg.drop_path_rate * i / max(blocks - 1, 1) for i in range(blocks)]  # rising linearly with depth
        self.stages = nn.ModuleList([SwinStage(cfg.embed_dim * 2 ** i, cfg.depths[i], cfg.num_heads[i], cfg, i < n - 1,
                                               drops[sum(cfg.depths[:i]):]) for i in range(n)])
        self.out_features = list(cfg.out_features)
        self.channels = [cfg.embed_dim * 2 ** (int(s[5:]) - 1) for s in self.out_features]
        self.hidden_states_norms = nn.ModuleDict({s: nn.LayerNorm(c, eps=cfg.layer_norm_eps)
                                                  for s, c in zip(self.out_features, self.channels)})

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:  # one (B, C_l, H_l, W_l) per out_feature
        ps, (H, W) = self.patch_size, pixel_values.shape[-2:]
        x = F.pad(pixel_values, (0, (ps - W % ps) % ps, 0, (ps - H % ps) % ps))  # right/bottom zeros to whole patches
        x = self.patch_embed(x)  # (B, C, H/4, W/4)
        h, w = x.shape[-2:]
        x = self.patch_norm(x.flatten(2).transpose(1, 2))  # (B, h*w, C)
        maps = []
        for i, stage in enumerate(self.stages):
            x = stage(x, h, w)
            if f"stage{i + 1}" in self.out_features:  # before downsampling; swin.layernorm is never used
                y = self.hidden_states_norms[f"stage{i + 1}"](x)
                maps.append(y.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous())  # (B, C, h, w)
            if stage.downsample is not None:
                x = stage.downsample(x, h, w)
                h, w = (h + 1) // 2, (w + 1) // 2
        return maps


# -----------------------------------------------------------------------------
# 4. BERT text encoder (bert-base-uncased layout, post-LN, no pooler), fed the per-phrase position ids


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        d, self.heads = cfg.hidden_size, cfg.num_attention_heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attention_dropout = cfg.attention_probs_dropout_prob  # SDPA's dropout_p, training only
        self.attention_dense = nn.Linear(d, d)
        self.attention_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(d, cfg.intermediate_size)
        self.output = nn.Linear(cfg.intermediate_size, d)
        self.output_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        hD = d // self.heads
        q, k, v = (lin(x).view(B, T, -1, hD).transpose(1, 2)  # (B, nH, T, hD)
                   for lin in (self.query, self.key, self.value))
        # boolean mask straight into SDPA, as transformers' default sdpa path (its eager path adds the bool as 0/1
        # to the scores, which masks nothing, so phrases would see each other there)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hD ** -0.5,
                                           dropout_p=self.attention_dropout if self.training else 0.0)  # (B,nH,T,hD)
        a = a.transpose(1, 2).contiguous().reshape(B, T, -1).contiguous()  # (B, T, d)
        x = self.attention_norm(self.dropout(self.attention_dense(a)) + x)
        return self.output_norm(self.dropout(self.output(F.gelu(self.intermediate(x)))) + x)


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.embeddings_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.layers = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, input_ids, token_type_ids, position_ids, mask) -> torch.Tensor:
        """ids (B, T), mask (B, T, T) bool True = attend -> (B, T, hidden)."""
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = self.dropout(self.embeddings_norm(x + self.position_embeddings(position_ids)))
        for layer in self.layers:
            x = layer(x, mask[:, None])  # (B, 1, T, T) shared by the heads
        return x


# -----------------------------------------------------------------------------
# 5. Multi-scale input: projections, masks, sine position embeddings, flattening


def sine_embedding(coords: torch.Tensor, num_feats: int, temperature: float = 10000) -> torch.Tensor:
    """(..., n) coordinates in [0, 1] (or position ids) -> (..., n * num_feats): per coordinate interleaved
    sin/cos of coord * 2pi / temperature^(2*floor(i/2)/num_feats); with n >= 2 the first two swap, (y, x, w, h)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    embs = [c[..., None] * (2 * math.pi) / dim_t for c in coords.unbind(-1)]  # each (..., num_feats)
    embs = [torch.stack((e[..., 0::2].sin(), e[..., 1::2].cos()), dim=-1).flatten(-2) for e in embs]  # sin,cos,...
    if len(embs) >= 2:
        embs[0], embs[1] = embs[1], embs[0]
    return torch.cat(embs, dim=-1).to(coords.dtype)  # (..., n * num_feats): float32 inside, the input's dtype out


def image_position_embedding(mask: torch.Tensor, d_model: int, temperature: float) -> torch.Tensor:
    """(B, h, w) bool valid mask -> (B, d_model, h, w): DETR's normalised sine embedding, y features first."""
    y = mask.cumsum(1, dtype=torch.float32)
    x = mask.cumsum(2, dtype=torch.float32)
    # normalised by the valid height and width, so padding does not stretch it
    xy = torch.stack((x / (x[:, :, -1:] + 1e-6), y / (y[:, -1:, :] + 1e-6)), -1)  # (B, h, w, 2)
    return sine_embedding(xy, d_model // 2, temperature).permute(0, 3, 1, 2)  # (B, d_model, h, w)


@dataclass
class Levels:
    """The flattened multi-scale image tokens and everything about their layout that later stages need."""
    source: torch.Tensor  # (B, S, 256) projected features
    mask: torch.Tensor  # (B, S) bool, True = real image (not padding)
    pos: torch.Tensor  # (B, S, 256) sine position + level embedding
    shapes: list  # [(H_l, W_l)] * L
    valid_ratios: torch.Tensor  # (B, L, 2) fraction of each map that is image, (w, h)
    maps: list  # the projected (B, 256, H_l, W_l) maps, for dumps


def valid_ratio(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    vh, vw = torch.sum(mask[:, :, 0], 1, dtype=dtype), torch.sum(mask[:, 0, :], 1, dtype=dtype)
    return torch.stack([vw / mask.shape[2], vh / mask.shape[1]], -1)  # (B, 2), (w, h) order


# -----------------------------------------------------------------------------
# 6. Feature enhancer: image and text tokens attend to themselves and to each other


class MultiheadAttention(nn.Module):
    """Plain multi-head attention with an additive float mask (the text enhancer and the decoder use it)."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.dropout = nn.Dropout(dropout)  # on the attention probabilities, training only

    def forward(self, q_in, k_in, v_in, mask=None) -> torch.Tensor:
        B, n, d = q_in.shape
        hD = d // self.heads
        q, k, v = (lin(x).view(B, -1, self.heads, hD).transpose(1, 2)  # (B, nH, n or n_k, hD)
                   for lin, x in ((self.query, q_in), (self.key, k_in), (self.value, v_in)))
        scores = torch.matmul(q, k.transpose(-1, -2)).div_(math.sqrt(hD))  # (B, nH, n, n_k)
        if mask is not None:
            scores += mask
        probs = self.dropout(scores.softmax(-1))  # (B, nH, n, n_k)
        out = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()  # (B, n, nH, hD)
        return self.out_proj(out.view(B, n, d))  # (B, n, d)


class BiAttention(nn.Module):
    """Image-to-text and text-to-image attention sharing one score matrix (the paper's bi-attention)."""

    def __init__(self, d: int, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.hD = heads, width // heads
        self.vision_proj, self.text_proj = nn.Linear(d, width), nn.Linear(d, width)
        self.values_vision_proj, self.values_text_proj = nn.Linear(d, width), nn.Linear(d, width)
        self.out_vision_proj, self.out_text_proj = nn.Linear(width, d), nn.Linear(width, d)
        self.dropout = nn.Dropout(dropout)  # on both directions' attention probabilities, training only

    def heads_first(self, x: torch.Tensor) -> torch.Tensor:
        B, n, _ = x.shape
        x = x.view(B, n, self.heads, self.hD).transpose(1, 2).contiguous()  # (B, nH, n, hD)
        return x.view(B * self.heads, n, self.hD)  # (B*nH, n, hD)

    def heads_last(self, x: torch.Tensor, B: int) -> torch.Tensor:
        x = x.view(B, self.heads, -1, self.hD).transpose(1, 2)  # (B, n, nH, hD)
        return x.reshape(B, x.shape[1], -1)  # (B, n, width)

    def forward(self, v, t, img_pad, txt_pad):
        B, nH = v.shape[0], self.heads
        q = self.heads_first(self.vision_proj(v) * self.hD ** -0.5)  # (B*nH, S, hD)
        k = self.heads_first(self.text_proj(t))  # (B*nH, T, hD)
        vv = self.heads_first(self.values_vision_proj(v))  # (B*nH, S, hD)
        vt = self.heads_first(self.values_text_proj(t))  # (B*nH, T, hD)
        A = torch.bmm(q, k.transpose(1, 2))  # (B*nH, S, T): the one score matrix both directions use
        # transformers subtracts the max over the whole tensor (all images, heads; before masking) and clamps to
        # +-50000: softmax-invariant in exact arithmetic, so we mirror it for identical rounding (and so an image's
        # result depends slightly on its batch-mates, as there)
        A = torch.clamp(A - A.max(), min=-50000, max=50000)
        At = A.transpose(1, 2)  # (B*nH, T, S): text tokens attend to image tokens
        At = torch.clamp(At - torch.max(At, dim=-1, keepdim=True)[0], min=-50000, max=50000)
        At = At.masked_fill(img_pad[:, None, None, :].repeat(1, nH, 1, 1).flatten(0, 1), float("-inf"))  # (B*nH,1,S)
        A = A.masked_fill(txt_pad[:, None, None, :].repeat(1, nH, 1, 1).flatten(0, 1), float("-inf"))  # (B*nH, 1, T)
        dv = torch.bmm(self.dropout(A.softmax(-1)), vt)  # (B*nH, S, hD): from the text
        dt = torch.bmm(self.dropout(At.softmax(-1)), vv)  # (B*nH, T, hD): from the image
        return self.out_vision_proj(self.heads_last(dv, B)), self.out_text_proj(self.heads_last(dt, B))


class FusionLayer(nn.Module):
    def __init__(self, cfg: GroundingDinoConfig):
        super().__init__()
        d, eps = cfg.d_model, cfg.layer_norm_eps
        self.layer_norm_vision, self.layer_norm_text = nn.LayerNorm(d, eps), nn.LayerNorm(d, eps)
        self.attn = BiAttention(d, cfg.encoder_ffn_dim // 2, cfg.encoder_attention_heads // 2, cfg.fusion_dropout)
        self.vision_param = nn.Parameter(torch.full((d,), 1e-4))  # layer scales (init 1e-4, learned)
        self.text_param = nn.Parameter(torch.full((d,), 1e-4))
        self.drop_path = DropPath(cfg.fusion_droppath)

    def forward(self, vision, text, img_pad, txt_pad):
        v, t = self.layer_norm_vision(vision), self.layer_norm_text(text)  # the residual starts from the normed inputs
        dv, dt = self.attn(v, t, img_pad, txt_pad)
        return v + self.drop_path(self.vision_param * dv), t + self.drop_path(self.text_param * dt)


class TextEnhancerLayer(nn.Module):
    def __init__(self, cfg: GroundingDinoConfig):
        super().__init__()
        d, eps = cfg.d_model, cfg.layer_norm_eps
        self.self_attn = MultiheadAttention(d, cfg.encoder_attention_heads // 2, cfg.attention_dropout)
        self.fc1, self.fc2 = nn.Linear(d, cfg.encoder_ffn_dim // 2), nn.Linear(cfg.encoder_ffn_dim // 2, d)
        self.layer_norm_before, self.layer_norm_after = nn.LayerNorm(d, eps), nn.LayerNorm(d, eps)
        self.dropout = nn.Dropout(cfg.text_enhancer_dropout)

    def forward(self, text, tpos, phrase_bias):
        qk = text + tpos  # position only on queries and keys
        text = self.layer_norm_before(text + self.dropout(self.self_attn(qk, qk, text, phrase_bias)))
        h = self.dropout(F.relu(self.fc1(text)))
        return self.layer_norm_after(self.dropout(self.fc2(h)) + text)


def level_sizes(shapes, like: torch.Tensor) -> torch.Tensor:
    """(L, 2): each level's (width, height) in like's dtype. While tracing (ONNX export) the sizes are 0-d tensors:
    stacking them keeps them in the graph, where torch.tensor would bake this image's sizes in as constants."""
    if torch.jit.is_tracing():
        return torch.stack([torch.stack([torch.as_tensor(wl), torch.as_tensor(hl)]) for hl, wl in shapes]).to(like)
    return torch.tensor([[wl, hl] for hl, wl in shapes], dtype=like.dtype, device=like.device)


class DeformableAttention(nn.Module):
    """Multi-scale deformable attention (Deformable DETR eq. 3): each query samples P points per level around its
    reference; the sampling itself is common.ms_deform_attn."""

    def __init__(self, d: int, heads: int, levels: int, points: int):
        super().__init__()
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(d, heads * levels * points * 2)
        self.attention_weights = nn.Linear(d, heads * levels * points)
        self.value_proj, self.output_proj = nn.Linear(d, d), nn.Linear(d, d)

    def project_value(self, value: torch.Tensor, value_mask: torch.Tensor) -> torch.Tensor:
        B, S, d = value.shape  # -> (B, S, nH, hD), the map every query samples from; padding zeroed after the bias
        return self.value_proj(value).masked_fill_(~value_mask[..., None], 0.0).view(B, S, self.heads, d // self.heads)

    def forward(self, query, value, ref, shapes, backend: str) -> torch.Tensor:
        """query (B, Q, d), value from project_value (B, S, nH, hD) -> (B, Q, d)."""
        B, Q, d = query.shape
        nH, L, P = self.heads, self.levels, self.points
        off = self.sampling_offsets(query).view(B, Q, nH, L, P, 2)  # (B, Q, nH, L, P, 2)
        w = self.attention_weights(query).view(B, Q, nH, L * P).softmax(-1)  # (B, Q, nH, L*P): over levels and points
        if ref.shape[-1] == 2:  # encoder: a point per level, offsets in pixels of that level
            norm = level_sizes(shapes, query)  # (L, 2)
            loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
        else:  # decoder: a box per level, offsets scaled by half its size over P
            loc = ref[:, :, None, :, None, :2] + off / P * ref[:, :, None, :, None, 2:] * 0.5
        out = ms_deform_attn(value, shapes, [P] * L, loc.flatten(3, 4), w, backend=backend)  # (B, Q, d)
        return self.output_proj(out.contiguous())  # contiguous as transformers: another GEMM path rounds otherwise


class DeformableLayer(nn.Module):
    def __init__(self, cfg: GroundingDinoConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = DeformableAttention(d, cfg.encoder_attention_heads, cfg.num_feature_levels,
                                             cfg.encoder_n_points)
        self.self_attn_layer_norm = nn.LayerNorm(d, cfg.layer_norm_eps)
        self.fc1, self.fc2 = nn.Linear(d, cfg.encoder_ffn_dim), nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, cfg.layer_norm_eps)
        self.dropout, self.activation_dropout = nn.Dropout(cfg.dropout), nn.Dropout(cfg.activation_dropout)

    def forward(self, vision, pos, mask, ref, shapes, backend: str):
        q = vision + pos  # before the value projection, as transformers: the same gradient sums into vision
        value = self.self_attn.project_value(vision, mask)  # (B, S, nH, hD): every image token samples this map
        vision = self.self_attn_layer_norm(vision + self.dropout(self.self_attn(q, value, ref, shapes, backend)))
        h = self.activation_dropout(F.relu(self.fc1(vision)))
        return self.final_layer_norm(vision + self.dropout(self.fc2(h)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: GroundingDinoConfig):
        super().__init__()
        self.fusion_layer = FusionLayer(cfg)
        self.text_enhancer_layer = TextEnhancerLayer(cfg)
        self.deformable_layer = DeformableLayer(cfg)

    def forward(self, vision, text, img_pad, txt_pad, tpos, phrase_bias, lv: Levels, ref, backend: str):
        vision, text = self.fusion_layer(vision, text, img_pad, txt_pad)  # image <-> text
        text = self.text_enhancer_layer(text, tpos, phrase_bias)  # text <-> text, within phrases
        return self.deformable_layer(vision, lv.pos, lv.mask, ref, lv.shapes, backend), text  # image <-> image


def encoder_reference_points(shapes, valid_ratios: torch.Tensor) -> torch.Tensor:
    """(B, S, L, 2): every token's pixel centre, normalised by the valid part of its map, seen from each level."""
    refs = []
    for lvl, (h, w) in enumerate(shapes):
        kw = {"dtype": valid_ratios.dtype, "device": valid_ratios.device}
        ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, **kw), torch.linspace(0.5, w - 0.5, w, **kw),
                                indexing="ij")
        ry = ry.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)  # (B, h*w)
        rx = rx.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)  # (B, h*w)
        refs.append(torch.stack((rx, ry), -1))  # (B, h*w, 2)
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]  # (B, S, L, 2); transformers' exact expression


class Encoder(nn.Module):
    def __init__(self, cfg: GroundingDinoConfig):
        super().__init__()
        self.d_model = cfg.d_model
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.encoder_layers)])

    def forward(self, lv: Levels, text: dict, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens (B, S, 256) and encode_text's output -> both enhanced, (B, S, 256) and (B, T, 256)."""
        vision, feats = lv.source, text["features"]
        ref = encoder_reference_points(lv.shapes, lv.valid_ratios)  # (B, S, L, 2)
        tpos = sine_embedding(text["position_ids"][..., None].to(feats.dtype), self.d_model)  # (B, T, 256)
        phrase = text["phrase_mask"][:, None].to(feats.dtype)  # (B, 1, T, T): shared by the heads
        phrase_bias = (1.0 - phrase) * torch.finfo(phrase.dtype).min  # additive, the dtype's own min, as transformers
        img_pad, txt_pad = ~lv.mask, ~text["token_mask"]
        for layer in self.layers:
            vision, feats = layer(vision, feats, img_pad, txt_pad, tpos, phrase_bias, lv, ref, backend)
        return vision, feats


# -----------------------------------------------------------------------------
# 7. Language-guided query selection: the image tokens most similar to any text token seed the 900 queries


class MLP(nn.Module):
    """Linear layers with ReLU between them (the box heads). dfine.py has its own on purpose: one file, one model."""

    def __init__(self, dims: list[int]):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in itertools.pairwise(dims)])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


def box_logit(x: torch.Tensor) -> torch.Tensor:
    """The one inverse sigmoid of this file: torch.special.logit(eps=1e-5), as transformers uses here. Not
    common.inverse_sigmoid (D-FINE's): the two differ for boxes saturated at 1.0 (selected padding anchors)."""
    return torch.special.logit(x, eps=1e-5)


def encoder_proposals(memory: torch.Tensor, pad: torch.Tensor, shapes) -> tuple[torch.Tensor, torch.Tensor]:
    """One anchor box per image token (its cell centre, side 0.05 * 2^level), in logit space; +inf for padding
    and for anchors not strictly inside (0.01, 0.99). Returns those and the memory zeroed at the same places."""
    B, props, start = memory.shape[0], [], 0
    for lvl, (h, w) in enumerate(shapes):
        m = pad[:, start: start + h * w].view(B, h, w, 1)  # (B, h, w, 1)
        vh, vw = torch.sum(~m[:, :, 0, 0], 1), torch.sum(~m[:, 0, :, 0], 1)
        kw = {"dtype": memory.dtype, "device": memory.device}
        gy, gx = torch.meshgrid(torch.linspace(0, h - 1, h, **kw), torch.linspace(0, w - 1, w, **kw), indexing="ij")
        scale = torch.stack([vw, vh], -1).view(B, 1, 1, 2)  # (B, 1, 1, 2) valid (w, h)
        grid = (torch.stack([gx, gy], -1).expand(B, -1, -1, -1) + 0.5) / scale  # (B, h, w, 2) cell centres
        props.append(torch.cat((grid, torch.full_like(grid, 0.05 * 2.0 ** lvl)), -1).view(B, -1, 4))  # (B, h*w, 4)
        start += h * w
    boxes = torch.cat(props, 1)  # (B, S, 4)
    ok = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True)  # (B, S, 1)
    boxes = box_logit(boxes)  # the clamp to [1e-5, 1 - 1e-5] changes no valid anchor; the others become +inf below
    boxes = boxes.masked_fill(pad.unsqueeze(-1), float("inf")).masked_fill(~ok, float("inf"))  # (B, S, 4)
    q = memory.masked_fill(pad.unsqueeze(-1), 0.0).masked_fill(~ok, 0.0)  # (B, S, 256)
    return q, boxes


# -----------------------------------------------------------------------------
# 8. Decoder: queries refine their boxes layer by layer, attending to themselves, the text and the image


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GroundingDinoConfig):
        super().__init__()
        d, nH = cfg.d_model, cfg.decoder_attention_heads
        self.self_attn = MultiheadAttention(d, nH, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d, cfg.layer_norm_eps)
        self.encoder_attn_text = MultiheadAttention(d, nH, cfg.attention_dropout)
        self.encoder_attn_text_layer_norm = nn.LayerNorm(d, cfg.layer_norm_eps)
        self.encoder_attn = DeformableAttention(d, nH, cfg.num_feature_levels, cfg.decoder_n_points)
        self.encoder_attn_layer_norm = nn.LayerNorm(d, cfg.layer_norm_eps)
        self.fc1, self.fc2 = nn.Linear(d, cfg.decoder_ffn_dim), nn.Linear(cfg.decoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, cfg.layer_norm_eps)
        self.dropout, self.activation_dropout = nn.Dropout(cfg.dropout), nn.Dropout(cfg.activation_dropout)

    def forward(self, h, qpos, ref, memory, mem_mask, text, text_bias, shapes, backend: str, self_attn_mask=None):
        q = h + qpos
        h = self.self_attn_layer_norm(h + self.dropout(self.self_attn(q, q, h, self_attn_mask)))
        a = self.encoder_attn_text(h + qpos, text, text, text_bias)  # (B, Q, d): what each query reads in the prompt
        h = self.encoder_attn_text_layer_norm(h + self.dropout(a))
        value = self.encoder_attn.project_value(memory, mem_mask)  # (B, S, nH, hD)
        h = self.encoder_attn_layer_norm(h + self.dropout(self.encoder_attn(h + qpos, value, ref, shapes, backend)))
        a = self.activation_dropout(F.relu(self.fc1(h)))
        return self.final_layer_norm(h + self.dropout(self.fc2(a)))


class Decoder(nn.Module):
    def __init__(self, cfg: GroundingDinoConfig):
        super().__init__()
        self.d_model = cfg.d_model
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.decoder_layers)])
        self.layer_norm = nn.LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.reference_points_head = MLP([2 * cfg.d_model, cfg.d_model, cfg.d_model])

    def forward(self, target, ref, memory, lv: Levels, text, text_mask, box_head: Callable[[int], MLP], backend: str,
                self_attn_mask: torch.Tensor | None = None) -> tuple[list, list]:
        """Queries target (B, Q, 256) at boxes ref (B, Q, 4) -> per layer the layer-normed query features (B, Q, 256)
        and the refined boxes (B, Q, 4); box_head(i): layer i's box MLP; self_attn_mask: additive, (Q, Q) or
        (B, 1, Q, Q)."""
        h = target
        text_bias = (~text_mask)[:, None, None, :].to(h.dtype) * torch.finfo(h.dtype).min  # (B, 1, 1, T)
        hidden, refs = [], []
        for i, layer in enumerate(self.layers):
            ref_in = ref[:, :, None] * torch.cat([lv.valid_ratios, lv.valid_ratios], -1)[:, None]  # (B, Q, L, 4)
            qpos = self.reference_points_head(sine_embedding(ref_in[:, :, 0, :], self.d_model // 2))  # (B, Q, 256)
            h = layer(h, qpos, ref_in, memory, lv.mask, text, text_bias, lv.shapes, backend, self_attn_mask)
            # the box is refined from the raw layer output; the heads see the layer-normed one (as upstream)
            ref = (box_head(i)(h) + box_logit(ref)).sigmoid().detach()
            hidden.append(self.layer_norm(h))
            refs.append(ref)
        return hidden, refs


# -----------------------------------------------------------------------------
# 9. Heads (the one place Grounding DINO and MM differ), and the model: forward runs sections 3-9 in order


class ContrastiveHead(nn.Module):
    """logits[q, t] = query . text token t, over the prompt's tokens, -inf elsewhere up to max_text_len.
    Grounding DINO: the plain dot product, no parameters. MM Grounding DINO / LLMDet (mmdet's
    ContrastiveEmbed(log_scale='auto', bias=True)): divided by sqrt(d) = 16 plus a learned scalar bias, which is why
    their scores run lower and want thresholds of about 0.3-0.4."""

    def __init__(self, max_text_len: int, mm: bool):
        super().__init__()
        self.max_text_len = max_text_len
        self.bias = nn.Parameter(torch.tensor(0.0)) if mm else None

    def forward(self, queries, text, text_mask) -> torch.Tensor:
        r = queries @ text.transpose(-1, -2)  # (B, Q, T)
        if self.bias is not None:
            r = r / math.sqrt(queries.shape[-1]) + self.bias
        r = r.masked_fill(~text_mask[:, None, :], float("-inf"))  # [CLS], '.', [SEP] stay visible, as upstream
        # float32 whatever the model's dtype: transformers writes the logits into a default-dtype -inf canvas
        return F.pad(r.float(), (0, self.max_text_len - r.shape[-1]), value=float("-inf"))  # (B, Q, 256)


@dataclass
class GroundingDinoOutput:
    logits: torch.Tensor  # (B, Q, max_text_len), -inf beyond the prompt's tokens
    pred_boxes: torch.Tensor  # (B, Q, 4) cx, cy, w, h relative to the unpadded image
    stages: dict | None = None  # name -> tensor or list of tensors, in data-flow order, when asked
    loss: torch.Tensor | None = None  # with labels: the weighted sum of loss_dict's terms (section 12)
    loss_dict: dict | None = None  # with labels: every term under transformers' key names


class GroundingDino(nn.Module):
    def __init__(self, cfg: GroundingDinoConfig, backend: str = "auto"):
        super().__init__()
        self.cfg, self.backend = cfg, backend  # backend: the deformable attention's, see common.resolve_backend
        d, L = cfg.d_model, cfg.num_feature_levels
        self.backbone = SwinBackbone(cfg.backbone)
        self.text_backbone = Bert(cfg.text)
        self.text_projection = nn.Linear(cfg.text.hidden_size, d)
        chans = self.backbone.channels
        extra = [chans[-1]] + [d] * (L - len(chans) - 1)  # the first extra level reads the raw last backbone map
        self.input_proj_vision = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in chans]
            + [nn.Sequential(nn.Conv2d(c, d, 3, stride=2, padding=1), nn.GroupNorm(32, d)) for c in extra])
        self.level_embed = nn.Parameter(torch.zeros(L, d))
        self.encoder = Encoder(cfg)
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d, cfg.layer_norm_eps)
        self.encoder_output_bbox_embed = MLP([d, d, d, 4])
        self.encoder_output_class_embed = ContrastiveHead(cfg.max_text_len, cfg.is_mm)
        self.query_position_embeddings = nn.Embedding(cfg.num_queries, d)
        self.decoder = Decoder(cfg)
        n_box = 1 if cfg.share_box else cfg.decoder_layers
        n_cls = 1 if cfg.share_cls else cfg.decoder_layers
        self.bbox_embed = nn.ModuleList([MLP([d, d, d, 4]) for _ in range(n_box)])  # one module when shared
        self.class_embed = nn.ModuleList([ContrastiveHead(cfg.max_text_len, cfg.is_mm) for _ in range(n_cls)])
        self.tokenizer = None  # set by from_pretrained
        self.preprocessor = {"shortest": SHORTEST_EDGE, "longest": LONGEST_EDGE, "mean": IMAGENET_MEAN,
                             "std": IMAGENET_STD}
        init_weights(self)  # section 12; from_pretrained builds on the meta device, where this costs nothing

    def box_head(self, i: int) -> MLP:
        return self.bbox_embed[i if len(self.bbox_embed) > 1 else 0]

    def class_head(self, i: int) -> ContrastiveHead:
        return self.class_embed[i if len(self.class_embed) > 1 else 0]

    # --- the stages forward runs, each callable alone -------------------------------------------------------------

    def encode_text(self, input_ids, attention_mask, token_type_ids=None) -> dict:
        """Tokens -> projected BERT features (B, T, 256) plus the masks every later stage needs."""
        phrase, position_ids = phrase_masks(input_ids, special_tokens(self.tokenizer).delimiters)  # (B,T,T), (B,T)
        token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        feats = self.text_backbone(input_ids, token_type_ids, position_ids, phrase)  # (B, T, 768)
        return {"features": self.text_projection(feats), "token_mask": attention_mask.bool(), "phrase_mask": phrase,
                "position_ids": position_ids}

    def prepare_levels(self, maps: list[torch.Tensor], pixel_mask: torch.Tensor) -> Levels:
        """Backbone maps -> L projected maps flattened to (B, S, 256) with masks and position embeddings."""
        srcs = [proj(m) for proj, m in zip(self.input_proj_vision, maps)]  # (B, 256, H_l, W_l) each
        for lvl in range(len(maps), self.cfg.num_feature_levels):
            srcs.append(self.input_proj_vision[lvl](maps[-1] if lvl == len(maps) else srcs[-1]))
        # nearest-neighbour downsampling of the full-resolution mask (F.interpolate's default)
        masks = [F.interpolate(pixel_mask[None].float(), size=s.shape[-2:]).to(torch.bool)[0] for s in srcs]  # (B,h,w)
        temperature = self.cfg.positional_embedding_temperature
        pos = [image_position_embedding(m, self.cfg.d_model, temperature).to(s.dtype)  # float32 inside
               for m, s in zip(masks, srcs)]
        return Levels(
            source=torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1),  # (B, S, 256)
            mask=torch.cat([m.flatten(1) for m in masks], 1),  # (B, S)
            pos=torch.cat([pe.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                           for lvl, pe in enumerate(pos)], 1),  # (B, S, 256): level embedding on positions only
            shapes=[tuple(s.shape[-2:]) for s in srcs],
            valid_ratios=torch.stack([valid_ratio(m, srcs[0].dtype) for m in masks], 1),  # (B, L, 2)
            maps=srcs)

    def select_queries(self, memory, lv: Levels, text_feats, text_mask) -> dict:
        """Score every image token against the text; the top Q (sorted: the rank picks the target embedding)
        give the initial boxes."""
        q, proposals = encoder_proposals(memory, ~lv.mask, lv.shapes)
        q = self.enc_output_norm(self.enc_output(q))  # (B, S, 256)
        enc_class = self.encoder_output_class_embed(q, text_feats, text_mask)  # (B, S, 256)
        enc_coord = self.encoder_output_bbox_embed(q) + proposals  # (B, S, 4) logits, +inf where invalid
        topk = torch.topk(enc_class.max(-1)[0], self.cfg.num_queries, dim=1)[1]  # (B, Q)
        # detached: the decoder refines these boxes but trains the proposals only through the encoder loss
        ref = torch.gather(enc_coord, 1, topk.unsqueeze(-1).repeat(1, 1, 4)).detach().sigmoid()  # (B, Q, 4)
        return {"enc_outputs_class": enc_class, "enc_outputs_coord_logits": enc_coord, "topk_indices": topk,
                "init_reference_points": ref}

    def predict(self, hidden, init_ref, refs, text_feats, text_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The heads on the last decoder layer: class logits (B, Q, 256) and boxes (B, Q, 4); the box head of layer
        i refines layer i-1's box."""
        i = len(hidden) - 1
        inter = torch.stack(hidden, 1)[:, i]  # (B, Q, 256); sliced from the stack as transformers does
        prev = init_ref if i == 0 else torch.stack(refs, 1)[:, i - 1]  # (B, Q, 4)
        logits = self.class_head(i)(inter, text_feats, text_mask)
        boxes = (self.box_head(i)(inter) + box_logit(prev)).sigmoid()
        return logits, boxes

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, pixel_mask: torch.Tensor | None = None,
                return_stages: bool = False, backbone_maps: list[torch.Tensor] | None = None,
                text: dict | None = None, labels: list[dict] | None = None) -> GroundingDinoOutput:
        """Sections 3-9 in order. backbone_maps, text: the backbone's and encode_text's outputs for these inputs,
        computed earlier (detect reuses them across chunks and images); None runs them here. labels (training): per
        image {"class_labels" (n,) phrase indices into its prompt, "boxes" (n, 4) cx, cy, w, h in [0, 1]}; the output
        then carries loss and loss_dict."""
        if labels is not None:  # bad labels fail before the forward, not after it
            check_grounding_labels(labels, label_maps(input_ids, self.cfg.max_text_len, special_tokens(self.tokenizer)))
        B, _, H, W = pixel_values.shape
        if input_ids.shape[1] > self.cfg.max_text_len:
            raise InputError(f"the prompt has {input_ids.shape[1]} tokens; the model reads at most "
                             f"{self.cfg.max_text_len}. Use model.detect(), which splits long label lists into chunks")
        assert input_ids.shape[0] == B, f"{input_ids.shape[0]} prompts for {B} images"
        if pixel_mask is None:
            pixel_mask = torch.ones(B, H, W, dtype=torch.long, device=pixel_values.device)
        maps = self.backbone(pixel_values) if backbone_maps is None else backbone_maps  # 3 (4) x (B, C_l, H_l, W_l)
        text = self.encode_text(input_ids, attention_mask, token_type_ids) if text is None else text  # (B, T, 256)
        lv = self.prepare_levels(maps, pixel_mask)  # (B, S, 256) and layout
        memory, text_feats = self.encoder(lv, text, self.backend)  # (B, S, 256), (B, T, 256)
        sel = self.select_queries(memory, lv, text_feats, text["token_mask"])  # top-Q boxes (B, Q, 4)
        target = self.query_position_embeddings.weight.unsqueeze(0).repeat(B, 1, 1)  # (B, Q, 256): learned queries
        hidden, refs = self.decoder(target, sel["init_reference_points"], memory, lv, text_feats, text["token_mask"],
                                    self.box_head, self.backend)
        logits, boxes = self.predict(hidden, sel["init_reference_points"], refs, text_feats, text["token_mask"])
        stages = None
        if return_stages or labels is not None:
            stages = {"backbone": maps, "text_features": text["features"], "text_position_ids": text["position_ids"],
                      "projected_maps": lv.maps, "encoder_vision": memory, "encoder_text": text_feats, **sel,
                      "decoder_hidden": hidden, "decoder_boxes": refs, "logits": logits, "pred_boxes": boxes}
        out = GroundingDinoOutput(logits=logits, pred_boxes=boxes, stages=stages)
        if labels is not None:
            out.loss, out.loss_dict = grounding_loss(self, out, input_ids, attention_mask, labels)
            out.stages = stages if return_stages else None
        return out


# -----------------------------------------------------------------------------
# 10. Detection: images and prompts in, boxes in pixels out (detect), what it can reuse (encode_image, encode_prompt),
#     the chunking of long label lists, and post-processing as transformers' post_process_grounded_object_detection


@dataclass
class EncodedPrompt:
    """A prompt through the text branch once (model.encode_prompt): it depends on the prompt alone, so detect takes
    it in place of the prompt, for any number of images."""
    tokens: list[dict]  # per chunk of whole labels: input_ids, attention_mask, token_type_ids (1, T)
    text: list[dict]  # per chunk: encode_text's output, features (1, T, 256) and masks
    labels: list[int]  # per chunk: its number of labels (label_ids count on across chunks)


@dataclass
class EncodedImage:
    """An image through preprocessing and the backbone once (model.encode_image): they depend on the image alone,
    so detect takes it in place of the image, for any number of prompts."""
    pixel_values: torch.Tensor  # (1, 3, H, W)
    pixel_mask: torch.Tensor  # (1, H, W)
    size: tuple[int, int]  # the original (height, width): boxes are scaled to it
    resize: tuple[int, int]  # the (shortest, longest) edges it was resized to
    maps: list  # the backbone's 3 (4) x (1, C_l, H_l, W_l)


def resize_edges(model: GroundingDino, size: tuple[int, int] | None) -> tuple[int, int]:
    """The (shortest, longest) edges images are resized to: `size` if given, else the checkpoint's preprocessor."""
    if size is None:
        return model.preprocessor["shortest"], model.preprocessor["longest"]
    if not (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(e, int) and not isinstance(e, bool) and e >= 32 for e in size)):
        raise InputError(f"size must be two whole numbers (shortest edge, longest edge) of at least 32, "
                         f"e.g. (480, 800); got {size!r}")
    return size[0], size[1]


@torch.inference_mode()
def encode_prompt(model: GroundingDino, prompt: str | Sequence[str], run_text: bool = True) -> EncodedPrompt:
    """The text branch (tokens, BERT, projection) of one prompt, for detect to take in place of the prompt."""
    dev = model.level_embed.device
    chunks = chunk_prompt(model.tokenizer, prompt, model.cfg.max_text_len)
    tokens = [{k: v.to(dev) for k, v in tokenize(model.tokenizer, [c]).items()} for c in chunks]
    text = [model.encode_text(t["input_ids"], t["attention_mask"], t["token_type_ids"]) if run_text else None
            for t in tokens]
    return EncodedPrompt(tokens, text, [len(split_phrases(c)) for c in chunks])


@torch.inference_mode()
def encode_image(model: GroundingDino, image, size: tuple[int, int] | None = None, backbone=True) -> EncodedImage:
    """The preprocessing and backbone of one image, for detect to take in place of the image; size as detect's."""
    resize = resize_edges(model, size)
    pixel_values, pixel_mask, sizes = preprocess_images([image], *resize, model.preprocessor["mean"],
                                                        model.preprocessor["std"])
    pixel_values = pixel_values.to(model.level_embed.device, model.level_embed.dtype)  # the model's dtype
    return EncodedImage(pixel_values, pixel_mask.to(pixel_values.device), sizes[0], resize,
                        model.backbone(pixel_values) if backbone else None)


@torch.inference_mode()
def detect(model: GroundingDino, images, prompts=None, threshold: float = 0.25, text_threshold: float = 0.25,
           size: tuple[int, int] | None = None, nms: float | None = None, top_k: int | None = None,
           class_agnostic: bool = False, engine: common.OnnxModel | None = None) -> dict | list[dict]:
    """Images (path, URL, PIL, array, EncodedImage; or a list) and prompts (or EncodedPrompts; None: a fine-tuned
    model's classes) -> per image {"scores", "boxes" (xyxy, original pixels), "labels" (phrase text)} as transformers
    gives them, plus "label_ids": each box's best-scoring label in the prompt (a class id); float32 whatever the
    model's dtype. size: (shortest, longest) resize edges (None: the checkpoint's). nms: an IoU above which a box is
    dropped for a better one of its label (of any label with class_agnostic); top_k: keep the k best; either sorts
    by score. engine: common.OnnxModel(path) of this model's export runs the forward (the backbone and BERT too) in
    onnxruntime, with the same preprocessing and post-processing.

    Images run one at a time: in a padded batch Swin sees the padding zeros (it has no padding mask) and the
    fusion's global max spans the batch, so a padded image's outputs would change (in transformers too). A prompt
    over max_text_len tokens is split into chunks of whole labels; the backbone runs once for all of them. Only the
    backbone and BERT can be reused: the feature enhancer mixes the text into the image tokens."""
    threshold = check_threshold("threshold", threshold)
    text_threshold = check_threshold("text_threshold", text_threshold)
    prompts = class_names(model) if prompts is None else prompts
    single = not isinstance(images, (list, tuple))
    images = [images] if single else list(images)
    if not images:
        raise InputError("no images given")
    resize = resize_edges(model, size)
    encoded = {}  # id(prompt) -> EncodedPrompt: a prompt shared by several images goes through BERT once
    results = []
    for img, prompt in zip(images, prompts_per_image(prompts, len(images))):
        if not isinstance(prompt, EncodedPrompt):
            if id(prompt) not in encoded:
                encoded[id(prompt)] = encode_prompt(model, prompt, run_text=engine is None)
            prompt = encoded[id(prompt)]
        if isinstance(img, EncodedImage) and size is not None and img.resize != resize:
            raise InputError(f"the image was encoded at size {img.resize}, detect was asked for {resize}")
        img = img if isinstance(img, EncodedImage) else encode_image(model, img, resize, backbone=engine is None)
        parts, offset = [], 0
        for tok, text, n_labels in zip(prompt.tokens, prompt.text, prompt.labels):
            out = model(img.pixel_values, tok["input_ids"], tok["attention_mask"], tok["token_type_ids"],
                        img.pixel_mask, backbone_maps=img.maps, text=text) if engine is None else common.run_engine(
                engine, "grounding-dino", pixel_values=img.pixel_values, pixel_mask=img.pixel_mask, **tok)
            part = post_process(out.logits, out.pred_boxes, tok["input_ids"], model.tokenizer, threshold,
                                text_threshold, [img.size])[0]
            part["label_ids"] = part["label_ids"] + offset  # ids into the whole label list, not the chunk
            offset += n_labels
            parts.append(part)
        r = {"scores": torch.cat([p["scores"] for p in parts]),  # chunk after chunk, query order within
             "boxes": torch.cat([p["boxes"] for p in parts]),  # (n, 4)
             "labels": [lab for p in parts for lab in p["labels"]],
             "label_ids": torch.cat([p["label_ids"] for p in parts])}
        results.append(common.best_detections(r, nms, top_k, None if class_agnostic else r["label_ids"]))
    return results[0] if single else results


def class_names(model: GroundingDino) -> list[str]:
    """The classes a fine-tuned model was trained on (its config's id2label), the prompt detect uses without one."""
    if not model.cfg.id2label:
        raise InputError(f"{getattr(model, 'name_or_path', 'this model')} has no classes of its own (it was not "
                         f"fine-tuned here); give a prompt, e.g. \"a cat. a remote control.\"")
    return [model.cfg.id2label[k] for k in sorted(model.cfg.id2label)]


GroundingDino.encode_prompt = encode_prompt  # methods of the model, defined here to keep the model class the model
GroundingDino.encode_image = encode_image
GroundingDino.detect = detect


def split_phrases(prompt: str | Sequence[str]) -> list[str]:
    """A label list or a 'a. b. c.' string -> its phrases, each as the text it contributes to a chunk."""
    if isinstance(prompt, str):
        return [p.strip() for p in re.findall(r"[^.?]*[.?]|[^.?]+$", prompt) if p.strip()]
    return [t.strip().lower() + "." for t in prompt]


def chunk_prompt(tokenizer, prompt: str | Sequence[str], max_tokens: int = 256) -> list[str]:
    """Split a prompt into texts of at most max_tokens tokens ([CLS] and [SEP] included), whole phrases only: each
    chunk is the text transformers would get for that sub-list of labels ("a. b."), as mmdet's chunked_size."""
    text = normalize_prompt(prompt)
    if len(tokenizer.encode(text).ids) <= max_tokens:
        return [text]
    chunks, current, n = [], [], 2  # [CLS] and [SEP]
    for phrase in split_phrases(prompt):
        k = len(tokenizer.encode(phrase).ids) - 2
        if k + 2 > max_tokens:
            raise InputError(f"the label {phrase!r} alone has {k} tokens, more than the {max_tokens - 2} that fit")
        if current and n + k > max_tokens:
            chunks.append(" ".join(current))
            current, n = [], 2
        current.append(phrase)
        n += k
    chunks.append(" ".join(current))
    for c in chunks:  # tokens of joined phrases add up for BERT's pre-tokenizer, but never trust it silently
        assert len(tokenizer.encode(c).ids) <= max_tokens, f"chunk of {len(tokenizer.encode(c).ids)} tokens"
    return chunks


def prompts_per_image(prompts, n: int) -> list:
    """One prompt for all images, or one per image. Like transformers, a list of strings none of which contains
    '.' is one label list; any other list of strings (or of label lists) has one entry per image."""
    if isinstance(prompts, (str, EncodedPrompt)):
        return [prompts] * n
    if isinstance(prompts, (list, tuple)) and not prompts:
        raise InputError("the prompt list is empty; give labels like ['a cat', 'a remote control']")
    if isinstance(prompts, (list, tuple)) and all(isinstance(p, str) and "." not in p for p in prompts):
        return [list(prompts)] * n
    if isinstance(prompts, (list, tuple)) and len(prompts) == n:
        return list(prompts)
    raise InputError(f"give one prompt for all images or one per image; got {len(prompts)} prompts for {n} images")


def post_process(logits: torch.Tensor, pred_boxes: torch.Tensor, input_ids: torch.Tensor, tokenizer,
                 threshold: float = 0.25, text_threshold: float = 0.25,
                 target_sizes: Sequence[tuple[int, int]] | None = None) -> list[dict]:
    """Raw outputs -> per image {"scores" (n,), "boxes" (n, 4) xyxy, "labels" [n phrase strings], "label_ids" (n,)}.
    score = max over the prompt's tokens of sigmoid(logit); a query is kept when score > threshold, in query order,
    without NMS or clipping; boxes scaled by the original (h, w) if given. A label is the prompt's tokens above
    text_threshold, as transformers: without column 0 ([CLS]) and columns from max_text_len - 1 on, '.' and [SEP]
    kept ('cat. [SEP]'); no detections give no labels (transformers: one empty label). In float32: bfloat16 would
    round the boxes once more to 8 significant bits (between 512 and 1024 pixels, onto a multiple of 4)."""
    probs = torch.sigmoid(logits.float())  # (B, Q, max_text_len)
    scores = torch.max(probs, dim=-1)[0]  # (B, Q)
    boxes = center_to_corners(pred_boxes.float())  # (B, Q, 4) xyxy in [0, 1]
    if target_sizes is not None:
        scale = torch.tensor([[float(w), float(h)] * 2 for h, w in target_sizes])  # (B, 4) w, h, w, h
        boxes = boxes * scale[:, None, :].to(boxes.device)  # (B, Q, 4) pixels
    results = []
    for b in range(logits.shape[0]):
        keep = scores[b] > threshold
        pos = probs[b][keep] > text_threshold  # (n, max_text_len)
        pos[:, 0] = False
        pos[:, pos.shape[-1] - 1:] = False
        token_ids = [[int(input_ids[b, i]) for i in row.nonzero(as_tuple=True)[0].tolist()] for row in pos]
        results.append({"scores": scores[b][keep], "boxes": boxes[b][keep],
                        "labels": [tokenizer.decode(t, skip_special_tokens=False) for t in token_ids],
                        "label_ids": phrase_ids(probs[b][keep], input_ids[b], special_tokens(tokenizer))})
    return results


def phrase_ids(probs: torch.Tensor, input_ids: torch.Tensor, special: SpecialTokens) -> torch.Tensor:
    """(n, max_text_len) kept queries' token probabilities -> (n,) index of the phrase (label) that holds the best
    word token: a class id, which transformers does not give. Phrase k is the run before the (k+1)-th '.' or '?'."""
    ids = input_ids.to(probs.device)
    stop = torch.isin(ids, torch.tensor([special.dot, special.question], device=ids.device)).long()  # (T,) 1 at . ?
    phrase = torch.cumsum(stop, 0) - stop  # (T,) the number of stops strictly before each token
    word = ~torch.isin(ids, torch.tensor(special.delimiters + (special.pad,), device=ids.device))  # (T,) label tokens
    p = probs[:, : ids.shape[0]].masked_fill(~word, -1.0)  # (n, T): only word tokens compete
    return phrase[p.argmax(-1)]  # (n,)


# -----------------------------------------------------------------------------
# 11. Loading and saving: the checkpoint key map (one table, read both ways), from_pretrained, save_pretrained

SWIN, BERT = "model.backbone.conv_encoder.model.", "model.text_backbone."
BLOCK, OUR_BLOCK = SWIN + "encoder.layers.#.blocks.#.", "backbone.stages.#.blocks.#."  # "#": a layer number

# The port in one table: (the checkpoint's name, ours), each the start of a key whose rest (".weight", ".bias")
# carries over. Loading reads it left to right, saving right to left; the longest entry that fits a key wins.
# The left names are the Hub files' and what transformers' save_pretrained writes.
KEY_TABLE = [
    (SWIN + "embeddings.patch_embeddings.projection.", "backbone.patch_embed."),
    (SWIN + "embeddings.norm.", "backbone.patch_norm."),
    (BLOCK + "attention.self.query.", OUR_BLOCK + "query."),
    (BLOCK + "attention.self.key.", OUR_BLOCK + "key."),
    (BLOCK + "attention.self.value.", OUR_BLOCK + "value."),
    (BLOCK + "attention.self.relative_position_bias_table", OUR_BLOCK + "relative_position_bias_table"),
    (BLOCK + "attention.output.dense.", OUR_BLOCK + "proj."),
    (BLOCK + "intermediate.dense.", OUR_BLOCK + "fc1."),
    (BLOCK + "output.dense.", OUR_BLOCK + "fc2."),
    (SWIN + "encoder.layers.", "backbone.stages."),  # the blocks' norms and the downsampling keep their names
    (SWIN, "backbone."),  # hidden_states_norms
    (BERT + "embeddings.LayerNorm.", "text_backbone.embeddings_norm."),
    (BERT + "embeddings.", "text_backbone."),  # word_, position_, token_type_embeddings
    (BERT + "encoder.layer.#.attention.self.", "text_backbone.layers.#."),  # query, key, value
    (BERT + "encoder.layer.#.attention.output.dense.", "text_backbone.layers.#.attention_dense."),
    (BERT + "encoder.layer.#.attention.output.LayerNorm.", "text_backbone.layers.#.attention_norm."),
    (BERT + "encoder.layer.#.intermediate.dense.", "text_backbone.layers.#.intermediate."),
    (BERT + "encoder.layer.#.output.dense.", "text_backbone.layers.#.output."),
    (BERT + "encoder.layer.#.output.LayerNorm.", "text_backbone.layers.#.output_norm."),
    ("bbox_embed.", "bbox_embed."),  # the decoder's heads sit outside `model.` (shared ones: see key_map_for)
    ("class_embed.", "class_embed."),
    ("model.", ""),  # the rest: our names are transformers' names
]
LOAD_ONLY = [  # names loading also reads, and never writes; None drops the key on purpose
    (SWIN + "layernorm.", None),  # SwinModel's final norm: the backbone never uses it
    (BLOCK + "attention.self.relative_position_index", None),  # a constant, recomputed in SwinBlock.forward
    (BERT + "embeddings.position_ids", None),  # constant buffers
    (BERT + "embeddings.token_type_ids", None),
    (BERT + "pooler.", None),  # unused by Grounding DINO (absent from Hub files)
    ("model.decoder.bbox_embed.", "bbox_embed."),  # transformers' second name of each decoder head
    ("model.decoder.class_embed.", "class_embed."),
]
# Swin's tensors as transformers 5.x names them in memory (state dicts saved without save_pretrained): loading
# reads each such part of a key as the file's name for it, then the table
SWIN_5X = {".swin.": ".", ".attention.q_proj.": ".attention.self.query.", ".attention.k_proj.": ".attention.self.key.",
           ".attention.v_proj.": ".attention.self.value.", ".attention.o_proj.": ".attention.output.dense.",
           ".attention.relative_position_bias.": ".attention.self.", ".mlp.fc1.": ".intermediate.dense.",
           ".mlp.fc2.": ".output.dense."}


def rename(key: str, table: list[tuple[str, str | None]]) -> str | None:
    """key through the longest entry of table whose left side starts it, numbers carried over (None: dropped);
    the key unchanged where no entry fits."""
    fits = [(left, right, m) for left, right in table
            if (m := re.match(re.escape(left).replace(r"\#", r"(\d+)"), key))]  # "#" matches a layer number
    if not fits:
        return key
    _, right, m = max(fits, key=lambda fit: len(fit[0]))
    if right is None:
        return None
    for number in m.groups():
        right = right.replace("#", number, 1)
    return right + key[m.end():]


def key_map_for(cfg: GroundingDinoConfig) -> Callable[[str], str | None]:
    """A checkpoint's key -> our parameter name (None = dropped on purpose), by KEY_TABLE and LOAD_ONLY. transformers
    keeps the decoder's box (and MM class) heads twice, as `bbox_embed.i` and `model.decoder.bbox_embed.i`, and files
    store some of those copies (grounding-dino-tiny only `bbox_embed.0`): each copy of layer i maps to our head i, or
    to head 0 when shared; load_weights checks that copies landing on one parameter are equal."""
    def key_map(key: str) -> str | None:
        if key.startswith(SWIN):  # transformers 5.x's names first become the file's
            for name_5x, name in SWIN_5X.items():
                key = key.replace(name_5x, name)
        name = rename(key, KEY_TABLE + LOAD_ONLY)
        m = re.match(r"^(bbox_embed|class_embed)\.(\d+)\.(.*)$", name or "")
        if m:
            head, i, rest = m.groups()
            shared = cfg.share_box if head == "bbox_embed" else cfg.share_cls
            return f"{head}.{0 if shared else int(i)}.{rest}"
        return name

    return key_map


def checkpoint_key(name: str) -> str:
    """Our parameter name -> the checkpoint's key, as save_pretrained writes it: KEY_TABLE read right to left."""
    return rename(name, [(ours, theirs) for theirs, ours in KEY_TABLE])


def save_pretrained(model: GroundingDino, folder: str | Path) -> None:
    """Write config.json (backbone_config and text_config nested, unset head-sharing flags left out),
    model.safetensors (transformers' key names), tokenizer.json and preprocessor_config.json (the model's resize and
    normalisation) to `folder`: what from_pretrained, and transformers, read."""
    from safetensors.torch import save_file

    cfg, p, folder = model.cfg, model.preprocessor, Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {checkpoint_key(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    top = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k not in ("backbone", "text")}
    arch = "MMGroundingDinoForObjectDetection" if cfg.is_mm else "GroundingDinoForObjectDetection"
    config = {"architectures": [arch], **{k: v for k, v in top.items() if v is not None},
              **({"label2id": {v: k for k, v in cfg.id2label.items()}} if cfg.id2label else {}),
              "backbone_config": {"model_type": "swin", **asdict(cfg.backbone)},
              "text_config": {"model_type": "bert", **asdict(cfg.text)}}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model.tokenizer.save(str(folder / "tokenizer.json"))
    pre = {"image_processor_type": "GroundingDinoImageProcessor", "processor_class": "GroundingDinoProcessor",
           "do_resize": True, "size": {"shortest_edge": p["shortest"], "longest_edge": p["longest"]}, "resample": 2,
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(p["mean"]),
           "image_std": list(p["std"]), "do_pad": True}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")


def header_shapes(files: Sequence[Path]) -> dict[str, tuple]:
    """key -> shape from the safetensors headers, without reading the tensors ({} if unreadable: load_weights then
    says so by name)."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                shapes.update({k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()})  # noqa: SIM118
    except (OSError, SafetensorError):
        return {}
    return shapes


def mm_layout(cfg: GroundingDinoConfig, shapes: dict[str, tuple]) -> GroundingDinoConfig:
    """An MM config completed from its weights (header_shapes) where config.json is silent: converted before the
    share flags existed, such files store heads for decoder layers 1.. when those are per-layer."""
    if cfg.is_mm and None in (cfg.decoder_bbox_embed_share, cfg.decoder_cls_embed_share):
        layers = {m.group(1) for k in shapes if (m := re.match(r"^(?:model\.decoder\.)?(\w+_embed)\.[1-9]", k))}
        if cfg.decoder_bbox_embed_share is None:
            cfg.decoder_bbox_embed_share = "bbox_embed" not in layers
        if cfg.decoder_cls_embed_share is None:
            cfg.decoder_cls_embed_share = "class_embed" not in layers
    return cfg


def checkpoint_config(folder: Path) -> GroundingDinoConfig:
    """The config from_pretrained builds a checkpoint folder's model from."""
    cfg = GroundingDinoConfig.from_dict(common.read_config(folder, MODEL_TYPES))
    return mm_layout(cfg, header_shapes(common.weight_files(folder)) if cfg.is_mm else {})


def from_pretrained(name_or_path: str | Path, revision: str | None = None, backend: str = "auto",
                    dtype: torch.dtype | None = None) -> GroundingDino:
    """A Hub id or a local folder (config.json, model.safetensors, tokenizer.json or vocab.txt) -> the model, in eval
    mode. backend: the deformable attention's (common.resolve_backend). dtype: the weights' and activations' (None:
    float32); position embeddings are computed in float32 and the class logits come out in float32, as transformers."""
    common.resolve_backend(backend, torch.device("cpu"))  # a typo fails here, not at the first forward
    dtype = common.check_dtype(dtype)
    folder = common.resolve_checkpoint(name_or_path, revision)
    cfg = GroundingDinoConfig.from_dict(common.read_config(folder, MODEL_TYPES))  # another model's fails here, by name
    files = common.weight_files(folder)
    shapes = header_shapes(files) if cfg.is_mm else {}  # MM converters differ in how they store the heads
    cfg = mm_layout(cfg, shapes)
    with torch.device("meta"):  # no random init of 172M+ parameters that the checkpoint overwrites anyway
        model = GroundingDino(cfg, backend=backend)
    model = model.to_empty(device="cpu").to(dtype)  # load_weights casts the file's tensors to it
    # some MM converters store the scalar class bias as (1,): broadcasting makes it the same
    if next((s for k, s in shapes.items() if re.search(r"class_embed(\.\d+)?\.bias$", k)), ()) == (1,):
        for head in [model.encoder_output_class_embed, *model.class_embed]:
            head.bias = nn.Parameter(torch.zeros(1))
    common.load_weights(model, files, key_map_for(cfg))
    model.tokenizer = load_tokenizer(folder)
    f = folder / "preprocessor_config.json"  # resize and normalisation; the Hub's defaults for what it leaves out
    pre = common.read_json(f) if f.is_file() else {}
    size = pre.get("size") or {}
    model.preprocessor = {"shortest": size.get("shortest_edge", SHORTEST_EDGE),
                          "longest": size.get("longest_edge", pre.get("max_size", LONGEST_EDGE)),
                          "mean": tuple(pre.get("image_mean", IMAGENET_MEAN)),
                          "std": tuple(pre.get("image_std", IMAGENET_STD))}
    model.name_or_path, model.revision = str(name_or_path), revision
    return model.eval()


GroundingDino.from_pretrained = staticmethod(from_pretrained)  # methods of the model, beside the key map they use
GroundingDino.save_pretrained = save_pretrained


# -----------------------------------------------------------------------------
# 12. Training: the set loss of DETR (Hungarian matching, then per matched pair a focal loss over the prompt's tokens,
#     L1 and GIoU) on the last decoder layer, every earlier layer (auxiliary_loss) and the encoder's proposals


def label_maps(input_ids: torch.Tensor, width: int, special: SpecialTokens) -> list[torch.Tensor]:
    """Per image (n_phrases, width) 0/1: the tokens of each phrase (label) of its prompt. A phrase is a run of
    tokens between delimiters ([CLS], [SEP], '.', '?', [PAD]), numbered in prompt order (transformers'
    build_label_maps); class id k of an image's labels means phrase k of that image's own prompt."""
    delim = torch.isin(input_ids, torch.tensor(special.delimiters + (special.pad,), device=input_ids.device))  # (B, T)
    run = torch.cumsum(delim, 1) * ~delim  # (B, T): the same number for the tokens of one phrase, 0 at delimiters
    maps = []
    for r in run:
        ids = r.unique()
        ids = ids[ids > 0]  # (n,)
        maps.append(F.pad((r[None] == ids[:, None]).float(), (0, width - r.shape[0])))  # (n, width)
    return maps


def check_grounding_labels(labels, maps: list[torch.Tensor]) -> None:
    """Boxes and structure by common.check_labels; then each class id must name a phrase of its own prompt."""
    common.check_labels(labels, len(maps), max(len(m) for m in maps))
    for i, (t, m) in enumerate(zip(labels, maps)):
        for j, c in enumerate(t["class_labels"].tolist()):
            if not 0 <= c < len(m):
                raise InputError(f"labels[{i}] box {j}: class id {c}, but image {i}'s prompt has {len(m)} phrases "
                                 f"(ids 0..{len(m) - 1}); a class id indexes the phrases of that image's prompt")


@torch.no_grad()
def match(logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict], maps: list[torch.Tensor],
          cfg: GroundingDinoConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Hungarian matching per image of queries to target boxes. Cost = bbox_cost * L1 + class_cost * focal cost
    averaged over the target phrase's tokens + giou_cost * (-GIoU), as transformers' GroundingDinoHungarianMatcher."""
    B, Q, _ = logits.shape
    prob = logits.flatten(0, 1).sigmoid()  # (B*Q, W)
    token_share = torch.cat([m[t["class_labels"]] for m, t in zip(maps, targets)])  # (N, W): each target's tokens
    token_share = token_share / token_share.sum(-1, keepdim=True)  # (N, W): rows sum to 1
    pred, tgt = boxes.flatten(0, 1), torch.cat([t["boxes"] for t in targets])  # (B*Q, 4), (N, 4)
    class_cost = common.focal_cost(prob) @ token_share.t()  # (B*Q, N)
    bbox_cost = torch.cdist(pred, tgt, p=1)  # (B*Q, N)
    giou_cost = -common.generalized_box_iou(center_to_corners(pred), center_to_corners(tgt))  # (B*Q, N)
    cost = cfg.bbox_cost * bbox_cost + cfg.class_cost * class_cost + cfg.giou_cost * giou_cost
    return common.hungarian_match(cost.view(B, Q, -1), [len(t["boxes"]) for t in targets])


def sigmoid_focal_loss(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """RetinaNet's focal loss (gamma 2), elementwise: BCE scaled by (1 - p_t)^2, positives weighted alpha."""
    p = x.sigmoid()
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    return (alpha * y + (1 - alpha) * (1 - y)) * (ce * ((1 - p_t) ** 2))


def set_loss(logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict], maps: list[torch.Tensor],
             text_mask: torch.Tensor, num_boxes: float, cfg: GroundingDinoConfig) -> dict:
    """One prediction set (B, Q, W) logits and (B, Q, 4) boxes -> loss_ce, loss_bbox, loss_giou, cardinality_error.
    A matched query's class target is its box's phrase's tokens in its own image's prompt (transformers offsets
    image i's class ids by image i's own phrase count, which reads another image's phrases from batch 3 on or with
    prompts of different lengths). The focal loss runs over the prompt's tokens ([CLS], '.', [SEP] negatives)."""
    indices = match(logits, boxes, targets, maps, cfg)
    img = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])  # (M,) image of each match
    query = torch.cat([q for q, _ in indices])  # (M,)
    onehot = torch.zeros_like(logits)  # (B, Q, W)
    onehot[img, query] = torch.cat([m[t["class_labels"][k]] for m, t, (_, k) in zip(maps, targets, indices)])
    x, y = torch.masked_select(logits, text_mask), torch.masked_select(onehot, text_mask)  # the prompts' tokens
    out = {"loss_ce": sigmoid_focal_loss(x, y, cfg.focal_alpha).sum() / num_boxes}
    target_boxes = torch.cat([t["boxes"][k] for t, (_, k) in zip(targets, indices)])  # (M, 4)
    out.update(common.box_losses(boxes[img, query], target_boxes, num_boxes))
    with torch.no_grad():  # logged, not trained: how many queries score above 0.5 vs how many boxes there are
        n_pred = (logits.sigmoid().max(-1).values > 0.5).sum(1).float()  # (B,)
        out["cardinality_error"] = F.l1_loss(n_pred, torch.tensor([float(len(t["boxes"])) for t in targets],
                                                                  device=n_pred.device))
    return out


def grounding_loss(model: GroundingDino, out: GroundingDinoOutput, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, labels: list[dict]) -> tuple[torch.Tensor, dict]:
    """The total loss and its terms under transformers' keys: loss_ce, loss_bbox, loss_giou (last layer), the same
    with _0 .. _{L-2} (earlier decoder layers, if cfg.auxiliary_loss) and with _enc (the encoder's proposals). The
    encoder term is the paper's (DINO's two-stage supervision): the top-Q proposals' class logits and undetached
    boxes, so the proposal head trains (transformers scores the learned queries with detached boxes: no gradient)."""
    cfg, st = model.cfg, out.stages
    B, Q, W = out.logits.shape
    maps = label_maps(input_ids, W, special_tokens(model.tokenizer))
    dev = out.logits.device
    targets = [{"class_labels": t["class_labels"].to(dev).long(), "boxes": t["boxes"].to(dev)} for t in labels]
    num_boxes = max(float(sum(len(t["boxes"]) for t in targets)), 1.0)
    text_mask = F.pad(attention_mask.bool(), (0, W - attention_mask.shape[1]))[:, None, :].expand(B, Q, W)
    text, token_mask = st["encoder_text"], attention_mask.bool()
    # every layer's predictions (as predict() computes the last: equal to out.logits, out.pred_boxes), made in layer
    # order as transformers makes them, so that gradients sum into shared heads and the text in the same order
    n = len(st["decoder_hidden"])
    preds = []
    for i in range(n) if cfg.auxiliary_loss else [n - 1]:
        ref = st["init_reference_points"] if i == 0 else st["decoder_boxes"][i - 1]
        h = st["decoder_hidden"][i]
        preds.append((model.class_head(i)(h, text, token_mask), (model.box_head(i)(h) + box_logit(ref)).sigmoid()))
    sets = [("", *preds[-1])] + [(f"_{i}", *p) for i, p in enumerate(preds[:-1])]  # transformers' key order
    topk = st["topk_indices"][..., None]  # (B, Q, 1)
    sets.append(("_enc", torch.gather(st["enc_outputs_class"], 1, topk.expand(-1, -1, W)),  # (B, Q, W)
                 torch.gather(st["enc_outputs_coord_logits"], 1, topk.expand(-1, -1, 4)).sigmoid()))  # (B, Q, 4)
    loss_dict = {}
    for suffix, logits, boxes in sets:
        terms = set_loss(logits, boxes, targets, maps, text_mask, num_boxes, cfg)
        loss_dict.update({k + suffix: v for k, v in terms.items()})
    weight = {"loss_ce": cfg.class_loss_coefficient, "loss_bbox": cfg.bbox_loss_coefficient,
              "loss_giou": cfg.giou_loss_coefficient}
    loss = sum(v * weight["_".join(k.split("_")[:2])] for k, v in loss_dict.items() if k.startswith("loss_"))
    return loss, loss_dict


PRIOR = 0.01  # the class score a model starts from (RetinaNet's: the many negatives don't swamp the first steps)


@torch.no_grad()
def init_weights(model: GroundingDino) -> None:
    """From scratch, as the originals: Swin's truncated normal and BERT's normal (std 0.02), Xavier elsewhere, zero
    biases, a normal level embedding, deformable attention sampling a ring around its reference with uniform
    weights, box heads that start at their reference (last layer zero), fusion layer scales of 1e-4; then
    class_prior."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if name.startswith("backbone."):
                nn.init.trunc_normal_(m.weight, std=0.02)
            elif name.startswith("text_backbone."):
                nn.init.normal_(m.weight, std=0.02)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, DeformableAttention):
            theta = torch.arange(m.heads, dtype=torch.float32) * (2 * math.pi / m.heads)
            ring = torch.stack([theta.cos(), theta.sin()], -1)  # (nH, 2): one direction per head
            ring = ring / ring.abs().max(-1, keepdim=True)[0]  # onto the square's border
            grid = ring[:, None, None, :] * torch.arange(1, m.points + 1, dtype=torch.float32)[None, None, :, None]
            m.sampling_offsets.bias.copy_(grid.expand(-1, m.levels, -1, -1).reshape(-1))  # point k at k+1 pixels
            for t in (m.sampling_offsets.weight, m.attention_weights.weight, m.attention_weights.bias):
                t.zero_()
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02 if name.startswith("text_backbone.") else 1.0)
        elif isinstance(m, SwinBlock):
            nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
    for seq in model.input_proj_vision:
        nn.init.xavier_uniform_(seq[0].weight)
        nn.init.zeros_(seq[0].bias)
    for mlp in [model.encoder_output_bbox_embed, *model.bbox_embed]:
        mlp.layers[-1].weight.zero_(), mlp.layers[-1].bias.zero_()
    nn.init.normal_(model.level_embed)
    class_prior(model)


@torch.no_grad()
def class_prior(model: GroundingDino) -> None:
    """Class scores that start at PRIOR: MM's class biases at logit(PRIOR), as mmdet's ContrastiveEmbed. Grounding
    DINO's head has no parameter, and its logits are dot products of two LayerNorm outputs (about N(0, 256)), so
    every score would start saturated: beyond the originals, the decoder's and the encoder proposals' output norms
    and the last text norm get weight d^-1/4 and biases +-sqrt(-logit(PRIOR)) along one direction, so that q . t
    starts at logit(PRIOR)."""
    bias = -math.log((1 - PRIOR) / PRIOR)
    if model.cfg.is_mm:
        for head in [model.encoder_output_class_embed, *model.class_embed]:
            head.bias.fill_(bias)
        return
    d = model.cfg.d_model
    u = torch.zeros(d)
    u[0] = 1.0  # the shared direction
    text_norm = model.encoder.layers[-1].text_enhancer_layer.layer_norm_after
    for norm, sign in ((model.decoder.layer_norm, 1.0), (model.enc_output_norm, 1.0), (text_norm, -1.0)):
        norm.weight.fill_(d ** -0.25)
        norm.bias.copy_(sign * math.sqrt(-bias) * u)


# Fine-tuning on a COCO dataset (common.read_coco, common.fit) with mmdetection's Grounding DINO recipe: no new head,
# the category names become the prompt's phrases (a long list in chunks, as detect splits it: one chunk per step).


def train(coco: str, images: str, init: str, out: str, steps: int, batch: int = 4, val: str | None = None,
          val_images: str | None = None, eval_every: int = 500, lr: float | None = None, seed: int = 0,
          resume: bool = False, log=None) -> dict:
    """Fine-tune `init` (Hub id or folder) on a COCO dataset as mmdetection does: AdamW (lr 1e-4 unless given, Swin
    and BERT at a tenth of it), flip and resize-and-crop, a shortest edge drawn per batch from 0.6-1 of the model's
    (mmdet's 480-800 for 800), every decoder layer's loss, EMA; the best EMA weights go to `out` (common.fit), with
    the class names in config.json, so its detect(image) asks for them. Returns fit's history."""
    data = common.read_coco(coco, images)
    test = common.read_coco(val, val_images or images) if val else None
    torch.manual_seed(seed)
    model = from_pretrained(init)
    model.cfg.id2label, model.cfg.coco_category_ids = dict(enumerate(data.names)), list(data.category_ids)
    model.cfg.auxiliary_loss = True
    chunks = chunk_prompt(model.tokenizer, data.names, model.cfg.max_text_len)
    first = np.cumsum([0] + [len(split_phrases(c)) for c in chunks])  # chunk k holds classes first[k]..first[k+1]-1
    p = model.preprocessor
    scales = [round(p["shortest"] * s / 800) for s in range(480, 801, 32)]

    def inputs(t: int) -> dict:
        k = t % len(chunks)
        samples, s = common.coco_batch(data, t, batch, seed, common.coco_transforms("gdino", (p["shortest"],), True),
                                       scales)
        pics = [Image.fromarray(x["image"].permute(1, 2, 0).numpy()) for x in samples]
        pixel_values, pixel_mask, _ = preprocess_images(pics, s, round(s * p["longest"] / p["shortest"]), p["mean"],
                                                        p["std"])
        labels = []
        for x, pic in zip(samples, pics):
            keep = (x["classes"] >= first[k]) & (x["classes"] < first[k + 1])  # the classes this chunk names
            wh = torch.tensor(pic.size * 2, dtype=torch.float32)  # w, h, w, h
            labels.append({"class_labels": x["classes"][keep] - int(first[k]),
                           "boxes": common.corners_to_center(x["boxes"][keep]) / wh})
        return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "labels": labels,
                **tokenize(model.tokenizer, [chunks[k]] * len(samples))}

    def evaluate(m: GroundingDino) -> dict:  # detect's 100 best boxes per image, each with its best class
        dets = m.detect([im["file"] for im in test.images], data.names, 0.0, 0.0, top_k=100)
        return common.coco_eval(test, [{**r, "labels": r["label_ids"]} for r in dets])

    return common.fit(model, inputs, steps, out, evaluate if test else None, eval_every, lr or 1e-4,
                      ("backbone.", "text_backbone."), 0.1, resume=resume, log=log)


# -----------------------------------------------------------------------------
# 13. Fast inference: an option applied to a loaded model, not the reference
#
# fast_inference(model): the same sums in another order, so other rounding. The bi-attention folds its weights into
# the text side (q.k = v.(Wq^T k) + bq.k; sum_h P_h (vt_h Wo_h^T); (P v) Wv^T + bv, rows of P summing to 1) and never
# forms its (S, width) projections; the deformable layer runs in blocks of ROWS image tokens after the value map, so
# its temporaries (the FFN's (ROWS, 2048)) stay in cache, where (S, 2048) ones fault in fresh pages every layer.
ROWS = 2048


class FastBiAttention(BiAttention):
    def forward(self, v, t, img_pad, txt_pad):
        (B, S, d), T, nH, hD = v.shape, t.shape[1], self.heads, self.hD
        k = self.text_proj(t).view(B, T, nH, hD) * hD ** -0.5  # (B, T, nH, hD)
        Wq, bq = self.vision_proj.weight.view(nH, hD, d), self.vision_proj.bias.view(nH, hD)
        M = torch.einsum("hed,bthe->bdht", Wq, k).flatten(2)  # (B, d, nH*T): the queries' weights times the keys
        A = (v @ M + torch.einsum("he,bthe->bht", bq, k).flatten(1)[:, None]).view(B, S, nH, T).transpose(1, 2)
        A = torch.clamp(A - A.max(), min=-50000, max=50000)  # (B, nH, S, T): the global max and clamp as BiAttention
        At = torch.clamp(A.mT - A.mT.amax(-1, keepdim=True), min=-50000, max=50000)  # (B, nH, T, S)
        Pt = At.masked_fill(img_pad[:, None, None, :], float("-inf")).softmax(-1)  # (B, nH, T, S)
        Pv = A.masked_fill(txt_pad[:, None, None, :], float("-inf")).softmax(-1)  # (B, nH, S, T)
        vt = self.values_text_proj(t).view(B, T, nH, hD)  # (B, T, nH, hD)
        Z = torch.einsum("bthe,dhe->bhtd", vt, self.out_vision_proj.weight.view(d, nH, hD))  # (B, nH, T, d)
        dv = Pv.transpose(1, 2).reshape(B, S, nH * T) @ Z.reshape(B, nH * T, d) + self.out_vision_proj.bias
        Y = (Pt.reshape(B, nH * T, S) @ v).view(B, nH, T, d)  # (B, nH, T, d): P v before the value projection
        Wv, bv = self.values_vision_proj.weight.view(nH, hD, d), self.values_vision_proj.bias.view(nH, hD)
        dt = torch.einsum("bhtd,hed->bthe", Y, Wv) + bv  # (B, T, nH, hD)
        return dv, self.out_text_proj(dt.reshape(B, T, nH * hD))  # (B, S, d), (B, T, d)


class FastDeformableLayer(DeformableLayer):
    def forward(self, vision, pos, mask, ref, shapes, backend: str):
        value = self.self_attn.project_value(vision, mask)  # (B, S, nH, hD): all tokens, before any block reads it
        out = torch.empty_like(vision)  # (B, S, d)
        for i in range(0, vision.shape[1], ROWS):  # every step after the value map is per token
            x, rows = vision[:, i:i + ROWS], slice(i, i + ROWS)  # (B, rows, d)
            x = self.self_attn_layer_norm(x + self.self_attn(x + pos[:, rows], value, ref[:, rows], shapes, backend))
            out[:, rows] = self.final_layer_norm(x + self.fc2(F.relu_(self.fc1(x))))
        return out


@torch.no_grad()
def fast_inference(model: GroundingDino) -> GroundingDino:
    """The loaded model, changed in place for speed (see above): for inference only, not bit-exact."""
    for m in model.modules():  # the same parameters, another forward
        m.__class__ = {BiAttention: FastBiAttention, DeformableLayer: FastDeformableLayer}.get(type(m), type(m))
    return model.eval()


# -----------------------------------------------------------------------------
# 14. ONNX export: the forward as a graph (five inputs -> logits, pred_boxes), post-processing left outside
#
# Batch, prompt length (up to max_text_len) and image size stay dynamic (level_sizes keeps the map sizes traced),
# unless export_onnx is given image_size, which fixes height and width for runtimes that want static shapes.

ONNX_INPUTS = ["pixel_values", "input_ids", "attention_mask", "token_type_ids", "pixel_mask"]


def export_onnx(model: GroundingDino, path: str | Path, image_size: tuple[int, int] | None = None) -> None:
    """Write model's forward to an ONNX file. image_size = (height, width) of the padded pixel_values fixes the
    graph to that size; None leaves it dynamic (traced at the size the preprocessor gives a 480x640 photo)."""
    pre = model.preprocessor
    h, w = image_size or resized_size(480, 640, pre["shortest"], pre["longest"])
    dev = model.level_embed.device
    tok = tokenize(model.tokenizer, ["a cat. a remote control.", "a cat."])  # two lengths: padding is traced too
    pixel_values = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0)).to(dev)
    args = [pixel_values, *(tok[k].to(dev) for k in ONNX_INPUTS[1:4]), torch.ones(2, h, w, dtype=torch.long).to(dev)]
    dynamic = {"pixel_values": {0: "batch"} if image_size else {0: "batch", 2: "height", 3: "width"},
               "pixel_mask": {0: "batch"} if image_size else {0: "batch", 1: "height", 2: "width"},
               **{k: {0: "batch", 1: "tokens"} for k in ONNX_INPUTS[1:4]}}
    hint = (f"Pad to {h}x{w} with pixel_mask 0 on the padding, or export again with image_size=None (any size) "
            f"or the size of your pixel_values.")
    meta = {"model": getattr(model, "name_or_path", ""), "model_type": "grounding-dino", "fixed": hint,
            "max_tokens": model.cfg.max_text_len,
            "max_tokens_hint": "Split long label lists with gdino.chunk_prompt, as detect does."}
    common.export_onnx(model, args, path, ONNX_INPUTS, dynamic, meta)


GroundingDino.export_onnx = export_onnx  # a method of the model, defined here to keep the export in its own section


# -----------------------------------------------------------------------------
# 15. Command line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        return common.train_cli("Fine-tune Grounding DINO on a COCO dataset.", train, argv[1:])
    ap = common.cli_parser("Open-set detection: boxes for the phrases of a text prompt.", DEFAULT_MODEL, 0.25)
    ap.add_argument("image", help="image path or URL")
    ap.add_argument("prompt", nargs="?", help="phrases ending in '.', e.g. \"a cat. a remote control.\" (default: a "
                    "fine-tuned model's classes)")
    ap.add_argument("--text-threshold", type=float, default=0.25, help="tokens above this form the label")
    ap.add_argument("--size", type=int, nargs=2, metavar=("SHORTEST", "LONGEST"),
                    help="resize edges (default: the checkpoint's, 800 1333): smaller is faster")
    args = ap.parse_args(argv)
    common.check_cli_args(args)
    check_threshold("--text-threshold", args.text_threshold)
    image = load_image(args.image)
    model = GroundingDino.from_pretrained(args.model, args.revision, args.backend, getattr(torch, args.dtype))
    t0 = time.perf_counter()
    size = tuple(args.size) if args.size else None
    prompt = args.prompt or class_names(model)
    r = model.detect(image, prompt, args.threshold, args.text_threshold, size, args.nms, args.top_k)
    seconds = time.perf_counter() - t0
    rows = common.detection_rows(r["labels"], r["label_ids"], r["scores"], r["boxes"])
    if args.json:
        print(json.dumps({"image": args.image, "prompt": prompt, "model": args.model, "detections": rows}))
    else:
        for d in rows:
            print(f"{d['label']:<24} {d['score']:.3f}  {d['box']}")
        common.status(f"{len(rows)} detections in {seconds:.1f} s")

    def stages():  # the first chunk's, for a prompt over max_text_len tokens
        enc, tok = model.encode_image(image, size), model.encode_prompt(prompt).tokens[0]
        with torch.inference_mode():
            out = model(enc.pixel_values, **tok, pixel_mask=enc.pixel_mask, return_stages=True, backbone_maps=enc.maps)
        return {"pixel_values": enc.pixel_values, "input_ids": tok["input_ids"], **out.stages}, enc.pixel_values

    common.write_cli_outputs(args, image, rows, stages, model.export_onnx)
    return 0


if __name__ == "__main__":
    common.run_cli(main)
