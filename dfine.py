"""D-FINE: real-time DETR with fine-grained distribution refinement, in one readable file.

Paper: "D-FINE: Redefine Regression Task in DETRs as Fine-grained Distribution Refinement" (Peng et al., 2024).
Mirrors transformers 5.23 `DFineForObjectDetection` (modeling_d_fine.py, modeling_hgnet_v2.py) and its PIL RT-DETR
image processor, bit for bit in fp32 on CPU, and loads the Hub checkpoints as they are:
`ustc-community/dfine-{nano,small,medium,large,xlarge}-coco`, `dfine-{small,medium,large,xlarge}-obj365` (366
classes), `dfine-{small,medium,xlarge}-obj2coco`, `dfine-large-obj2coco-e25`. Training (section 9): the original
D-FINE's loss terms. Left out: dropout (0 in every config), the unused "discrete" sampling method, and wide layers
after eval_idx (no checkpoint has them).

Stages (the numbered sections below; notebooks/dfine.ipynb uses the same numbers):
  1. config            config.json -> a flat dataclass
  2. preprocessing     stretch to 640x640 (the checkpoint's size) with PIL bilinear, /255, no normalisation
  3. backbone          HGNetV2: stem, 4 stages of HG blocks -> 2 or 3 maps at strides 8/16/32
  4. hybrid encoder    input projections, AIFI (one transformer layer on the coarsest map), CCFF (FPN + PAN)
  5. query selection   anchors, then (DFine.select_queries, in 7) encoder head and top-300 proposals
  6. decoder           self-attention, deformable cross-attention, gate; FDR edge distributions; LQE
  7. the model         forward as a short list of the stages above
  8. detection         detect: images in; sigmoid scores, top-300 over query x class, threshold, boxes in pixels out
  9. training          denoising queries, Hungarian matching, VFL, L1, GIoU, FGL, DDF; initial weights
 10. loading, saving   one key table (Hub names <-> ours) read both ways; from_pretrained, save_pretrained
 11. fast inference    an option: batch norms folded into the convs, not bit-exact (off by default)
 12. ONNX export       model.export_onnx(path): dynamic batch and size (multiples of 32), readable attention
 13. command line

Shapes: B batch, C channels, H W map size, S tokens of all levels, Q queries (300), L levels, P points (all levels),
nH heads, hD head dim, d model width, K classes, N bins (max_num_bins = 32, so N + 1 = 33 bin edges).
"""
from __future__ import annotations

import functools
import json
import math
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
from common import InputError, center_to_corners, inverse_sigmoid

ACT = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu}  # gelu is the exact erf form, as transformers


# -----------------------------------------------------------------------------
# 1. Config

STAGE_NAMES = ["stem", "stage1", "stage2", "stage3", "stage4"]  # the backbone's out_features, out_indices 0..4


@dataclass
class DFineConfig:
    """The fields of the Hub config.json that inference uses (backbone_config flattened in); names as on the Hub."""

    # HGNetV2 backbone
    stem_channels: list[int] = field(default_factory=lambda: [3, 32, 48])
    stem_strides: list[int] = field(default_factory=lambda: [2, 1, 1, 2, 1])
    stage_in_channels: list[int] = field(default_factory=lambda: [48, 128, 512, 1024])
    stage_mid_channels: list[int] = field(default_factory=lambda: [48, 96, 192, 384])
    stage_out_channels: list[int] = field(default_factory=lambda: [128, 512, 1024, 2048])
    stage_num_blocks: list[int] = field(default_factory=lambda: [1, 1, 3, 1])
    stage_numb_of_layers: list[int] = field(default_factory=lambda: [6, 6, 6, 6])
    stage_downsample: list[bool] = field(default_factory=lambda: [False, True, True, True])
    stage_downsample_strides: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    stage_light_block: list[bool] = field(default_factory=lambda: [False, False, True, True])
    stage_kernel_size: list[int] = field(default_factory=lambda: [3, 3, 5, 5])
    use_learnable_affine_block: bool = False  # the small models (B0, B2) scale and shift after each activation
    hidden_act: str = "relu"
    out_indices: list[int] = field(default_factory=lambda: [2, 3, 4])  # 0 is the stem, k is stage k
    freeze_backbone_batch_norms: bool = True  # frozen BN's scale-and-shift formula rounds unlike F.batch_norm
    # hybrid encoder
    encoder_in_channels: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    feat_strides: list[int] = field(default_factory=lambda: [8, 16, 32])  # for readers; shapes come from tensors
    encoder_hidden_dim: int = 256
    encode_proj_layers: list[int] = field(default_factory=lambda: [2])  # AIFI runs on these levels only
    encoder_layers: int = 1
    encoder_ffn_dim: int = 1024
    encoder_attention_heads: int = 8
    encoder_activation_function: str = "gelu"
    activation_function: str = "silu"
    positional_encoding_temperature: int = 10000
    hidden_expansion: float = 1.0
    depth_mult: float = 1.0
    eval_size: list[int] | None = None  # when set, transformers precomputes AIFI's position embedding for that size
    batch_norm_eps: float = 1e-5
    layer_norm_eps: float = 1e-5
    # query selection and decoder
    d_model: int = 256
    num_queries: int = 300
    decoder_in_channels: list[int] = field(default_factory=lambda: [256, 256, 256])
    num_feature_levels: int = 3
    decoder_n_points: list[int] = field(default_factory=lambda: [3, 6, 3])  # points per level, per head
    decoder_layers: int = 6
    decoder_attention_heads: int = 8
    decoder_ffn_dim: int = 1024
    decoder_activation_function: str = "relu"
    decoder_offset_scale: float = 0.5
    top_prob_values: int = 4
    lqe_hidden_dim: int = 64
    max_num_bins: int = 32
    anchor_image_size: list[int] | None = None  # when set, anchors are fixed to that size; we refuse both
    id2label: dict[int, str] = field(default_factory=dict)
    # training (section 9)
    num_denoising: int = 100  # denoising queries per batch (at most; whole groups of the objects); 0 turns them off
    label_noise_ratio: float = 0.5  # half of it is the share of denoising labels replaced by a random class
    box_noise_scale: float = 1.0  # denoising corners move by up to this many half box sizes (negatives: 1-2x that)
    matcher_class_cost: float = 2.0  # matching cost = class * focal cost + bbox * L1 + giou * (-GIoU)
    matcher_bbox_cost: float = 5.0
    matcher_giou_cost: float = 2.0
    matcher_alpha: float = 0.25  # the focal class cost's alpha and gamma
    matcher_gamma: float = 2.0
    focal_loss_alpha: float = 0.75  # VFL: negatives weighted by alpha * score^gamma
    focal_loss_gamma: float = 2.0
    weight_loss_vfl: float = 1.0  # each term's weight in the summed loss
    weight_loss_bbox: float = 5.0
    weight_loss_giou: float = 2.0
    weight_loss_fgl: float = 0.15
    weight_loss_ddf: float = 1.5
    reg_scale: float = 4.0  # W(n)'s curvature and range for a model built from the config (checkpoints hold theirs)
    up: float = 0.5
    initializer_bias_prior_prob: float | None = None  # initial class probability; None: 0.01, as the original
    coco_category_ids: list[int] | None = None  # fine-tuned: each class's id in the dataset (common.COCO_IDS_KEY)

    @classmethod
    def from_dict(cls, cfg: dict) -> "DFineConfig":
        flat = {**cfg.get("backbone_config", {}), **cfg}  # the model's own fields win over the backbone's
        known = {f.name for f in fields(cls)}
        c = cls(**{k: v for k, v in flat.items() if k in known})
        c.id2label = {int(k): v for k, v in cfg.get("id2label", {}).items()}
        if isinstance(c.decoder_n_points, int):
            c.decoder_n_points = [c.decoder_n_points] * c.num_feature_levels
        if "out_indices" not in cfg.get("backbone_config", {}) and "out_features" in cfg.get("backbone_config", {}):
            c.out_indices = [STAGE_NAMES.index(n) for n in cfg["backbone_config"]["out_features"]]
        # What no Hub checkpoint uses, refused rather than silently computed another way:
        unsupported = {"normalize_before": False, "learn_initial_query": False, "decoder_method": "default",
                       "layer_scale": 1.0}
        for k, ok in unsupported.items():
            if k in cfg and cfg[k] != ok:
                raise common.LoadError(f"config sets {k}={cfg[k]!r}; dfine.py supports only {ok!r}")
        if cfg.get("eval_idx", -1) not in (-1, c.decoder_layers - 1):
            raise common.LoadError(f"config sets eval_idx={cfg['eval_idx']}; dfine.py supports only the last layer")
        if c.num_feature_levels != len(c.decoder_in_channels):  # transformers would add stride-2 levels
            raise common.LoadError(f"config has {c.num_feature_levels} feature levels for "
                                   f"{len(c.decoder_in_channels)} encoder outputs; dfine.py needs them equal")
        if c.eval_size is not None or c.anchor_image_size is not None:
            raise common.LoadError("config sets eval_size or anchor_image_size, which fix the input size; "
                                   "dfine.py computes both from the real input (set them to null)")
        return c


# -----------------------------------------------------------------------------
# 2. Preprocessing: what transformers' RTDetrImageProcessorPil does with the Hub preprocessor_config.json

INPUT_SIZE = (640, 640)  # (height, width) of every Hub preprocessor; a checkpoint's preprocessor_config.json may differ


def preprocess(images: list[Image.Image], size: tuple[int, int] = INPUT_SIZE) -> torch.Tensor:
    """RGB PIL images -> (B, 3, H, W) in [0, 1], (H, W) = size. A plain stretch: no aspect ratio kept, no padding."""
    arrays = []
    for img in images:
        img = img.resize(size[::-1], Image.BILINEAR)  # PIL's bilinear anti-aliases when shrinking
        a = np.asarray(img).astype(np.float64) * (1 / 255)  # float64 then float32, as the processor: exact bits
        arrays.append(a.astype(np.float32).transpose(2, 0, 1))  # (3, H, W)
    # contiguous NCHW: np.stack keeps the transposed (channels-last) strides, and conv picks another algorithm
    # for those, which rounds differently (0.01 on logits through the top-k)
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))  # (B, 3, H, W)


# -----------------------------------------------------------------------------
# 3. Backbone: HGNetV2 (PP-HGNetV2 from PaddleDetection, as used by D-FINE)


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics as transformers writes it (scale and shift, eps 1e-5): F.batch_norm rounds
    otherwise, which before the top-k is enough to reorder near-tied queries."""

    eps = 1e-5

    def __init__(self, n: int):
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.zeros(n))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # (C,)
        bias = self.bias - self.running_mean * scale  # (C,)
        return x * scale.view(-1, 1, 1) + bias.view(-1, 1, 1)  # (B, C, H, W)


class LearnableAffineBlock(nn.Module):
    """y = scale * x + bias with two scalars: a cheap learned re-scaling after each activation (B0/B2 backbones)."""

    def __init__(self):
        super().__init__()
        self.scale, self.bias = nn.Parameter(torch.ones(1)), nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.scale * x + self.bias


class ConvLayer(nn.Module):
    """conv -> BN -> activation -> learnable affine (only where there is an activation)."""

    def __init__(self, cfg: DFineConfig, cin, cout, k, stride=1, groups=1, act=True):
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2, groups=groups, bias=False)
        self.normalization = FrozenBatchNorm2d(cout) if cfg.freeze_backbone_batch_norms else nn.BatchNorm2d(cout)
        self.act = ACT[cfg.hidden_act] if act else None
        self.lab = LearnableAffineBlock() if act and cfg.use_learnable_affine_block else None

    def forward(self, x):
        x = self.normalization(self.convolution(x))
        x = self.act(x) if self.act is not None else x
        return self.lab(x) if self.lab is not None else x


class LightConvLayer(nn.Module):
    """A kxk conv made cheap: 1x1 to mid channels (no activation), then a kxk depthwise conv."""

    def __init__(self, cfg, cin, cout, k):
        super().__init__()
        self.conv1, self.conv2 = ConvLayer(cfg, cin, cout, 1, act=False), ConvLayer(cfg, cout, cout, k, groups=cout)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class Embedder(nn.Module):
    """The stem: stride 4, with a 2x2 conv branch beside a 2x2 max-pool branch."""

    def __init__(self, cfg: DFineConfig):
        super().__init__()
        (c0, c1, c2), s = cfg.stem_channels, cfg.stem_strides
        self.stem1 = ConvLayer(cfg, c0, c1, 3, s[0])
        self.stem2a = ConvLayer(cfg, c1, c1 // 2, 2, s[1])  # 2x2 kernel: padding 0, hence the F.pad below
        self.stem2b = ConvLayer(cfg, c1 // 2, c1, 2, s[2])
        self.stem3 = ConvLayer(cfg, c1 * 2, c1, 3, s[3])
        self.stem4 = ConvLayer(cfg, c1, c2, 1, s[4])

    @staticmethod
    def pool(x):
        """MaxPool2d(kernel 2, stride 1, ceil_mode=True) as the max of shifted views, rows then columns: a max
        rounds nothing, so the bits are the same as the pooling op's, which is slow on CPU."""
        x = torch.maximum(x[..., :-1, :], x[..., 1:, :])  # (B, C, H-1, W): each row with the one below
        return torch.maximum(x[..., :-1], x[..., 1:])  # (B, C, H-1, W-1)

    def forward(self, x):  # (B, 3, H, W)
        x = F.pad(self.stem1(x), (0, 1, 0, 1))  # (B, c1, H/2+1, W/2+1): pad right and bottom
        x2 = self.stem2b(F.pad(self.stem2a(x), (0, 1, 0, 1)))  # (B, c1, H/2, W/2)
        x = torch.cat([self.pool(x), x2], dim=1)  # (B, 2*c1, H/2, W/2): pooled branch first
        return self.stem4(self.stem3(x))  # (B, c2, H/4, W/4)


class HGBlock(nn.Module):
    """n convs in a chain, all their outputs concatenated, then squeeze (1x1 to cout/2) and excite (1x1 to cout)."""

    def __init__(self, cfg, cin, mid, cout, n_layers, k, light, residual):
        super().__init__()
        self.layers = nn.ModuleList(
            LightConvLayer(cfg, cin if i == 0 else mid, mid, k) if light
            else ConvLayer(cfg, cin if i == 0 else mid, mid, k) for i in range(n_layers))
        total = cin + n_layers * mid  # every layer's output and the input, concatenated
        self.aggregation = nn.Sequential(ConvLayer(cfg, total, cout // 2, 1), ConvLayer(cfg, cout // 2, cout, 1))
        self.residual = residual

    def forward(self, x):
        feats = [x]
        for layer in self.layers:
            feats.append(layer(feats[-1]))
        y = self.aggregation(torch.cat(feats, dim=1))  # (B, cin + n*mid, H, W) -> (B, cout, H, W)
        return y + x if self.residual else y


class Stage(nn.Module):
    def __init__(self, cfg: DFineConfig, s: int):
        super().__init__()
        cin, mid, cout = cfg.stage_in_channels[s], cfg.stage_mid_channels[s], cfg.stage_out_channels[s]
        self.downsample = (ConvLayer(cfg, cin, cin, 3, cfg.stage_downsample_strides[s], groups=cin, act=False)
                           if cfg.stage_downsample[s] else None)  # depthwise stride-2, no activation
        self.blocks = nn.ModuleList(
            HGBlock(cfg, cin if b == 0 else cout, mid, cout, cfg.stage_numb_of_layers[s], cfg.stage_kernel_size[s],
                    cfg.stage_light_block[s], residual=b > 0) for b in range(cfg.stage_num_blocks[s]))

    def forward(self, x):
        if self.downsample is not None:
            x = self.downsample(x)  # (B, C, H/2, W/2)
        for block in self.blocks:
            x = block(x)
        return x


class HGStages(nn.Module):  # the checkpoint calls this `backbone.encoder`; it holds `stages`
    def __init__(self, cfg):
        super().__init__()
        self.stages = nn.ModuleList(Stage(cfg, s) for s in range(len(cfg.stage_in_channels)))

    def forward(self, x):  # the stem's map, then each stage's: strides 4, 8, 16, 32
        maps = [x]
        for stage in self.stages:
            maps.append(stage(maps[-1]))
        return maps


class HGNetV2(nn.Module):
    def __init__(self, cfg: DFineConfig):
        super().__init__()
        self.embedder = Embedder(cfg)
        self.encoder = HGStages(cfg)
        self.out_indices = cfg.out_indices

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        maps = self.encoder(self.embedder(pixel_values))  # from (B, C, H/4, W/4), the stem's
        return [maps[i] for i in self.out_indices]  # L maps (B, C_l, H_l, W_l)


# -----------------------------------------------------------------------------
# 4. Hybrid encoder: input projections, AIFI on the coarsest map, CCFF (top-down FPN, then bottom-up PAN)


class ConvNorm(nn.Module):
    """conv -> BatchNorm2d (plain F.batch_norm in eval, unlike the backbone) -> optional activation."""

    def __init__(self, cfg, cin, cout, k, stride=1, groups=1, act=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(cout, eps=cfg.batch_norm_eps)
        self.act = ACT[act] if act else None

    def forward(self, x):
        x = self.norm(self.conv(x))
        return self.act(x) if self.act is not None else x


def input_proj(cin: int, cout: int, eps: float = 1e-5) -> nn.Sequential:
    """1x1 conv + BatchNorm2d, keys `.0.weight` and `.1.*` as in the checkpoint. transformers gives the encoder's
    projections the default eps and the decoder's config.batch_norm_eps; both are 1e-5 in every checkpoint."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout, eps=eps))


def sincos_2d(h: int, w: int, dim: int, temperature: float, device=None) -> torch.Tensor:
    """(1, H*W, dim) fixed 2-D position embedding [sin(y w_k), cos(y w_k), sin(x w_k), cos(x w_k)], built in float64
    and cast, as transformers 5.23 (the original and transformers 4.x: float32, a grid swapping x and y if H != W)."""
    f64 = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64  # mps has no float64
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=f64, device=device) / (dim // 4))  # (dim/4,)
    gy, gx = torch.meshgrid(torch.arange(h, dtype=f64, device=device), torch.arange(w, dtype=f64, device=device),
                            indexing="ij")  # (H, W) each
    ey, ex = gy.flatten().outer(omega), gx.flatten().outer(omega)  # (H*W, dim/4) each; token k = y*W + x
    return torch.cat([ey.sin(), ey.cos(), ex.sin(), ex.cos()], dim=1).float()[None]  # (1, H*W, dim)


@functools.lru_cache(maxsize=16)
def once(fn, *args):
    """fn(*args), computed once per distinct args (input size, dtype, device) and kept: the position embeddings and
    anchors depend on the input size only. Made outside autograd and inference mode, so either may use them."""
    with torch.inference_mode(False), torch.no_grad():
        return fn(*args)


def per_size(fn, *args):
    """fn(*args) from the cache (once); in a graph being traced (export, torch.compile) computed afresh, from the
    traced input's size, and never kept (the cache would hold the tracer's tensors; dynamo would trace through it)."""
    return fn(*args) if torch.jit.is_tracing() or torch.compiler.is_compiling() else once(fn, *args)


class SelfAttention(nn.Module):
    """Multi-head self-attention with the position embedding added to queries and keys only (DETR)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, pos, mask=None):  # x, pos (B, n, d); mask (n, n) added to the scores (denoising only)
        B, n, d = x.shape
        qk = x + pos
        q, k, v = (p(t).view(B, n, self.heads, -1).transpose(1, 2)  # (B, nH, n, hD) each
                   for p, t in ((self.q_proj, qk), (self.k_proj, qk), (self.v_proj, x)))
        # the same SDPA call transformers makes by default: its kernel's rounding is part of the reference
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=(d // self.heads) ** -0.5)  # (B,nH,n,hD)
        return self.out_proj(a.transpose(1, 2).reshape(B, n, d))  # (B, n, d)


class AIFILayer(nn.Module):
    """Post-norm transformer encoder layer (attention-based intra-scale feature interaction)."""

    def __init__(self, cfg: DFineConfig):
        super().__init__()
        d = cfg.encoder_hidden_dim
        self.self_attn = SelfAttention(d, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1, self.fc2 = nn.Linear(d, cfg.encoder_ffn_dim), nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.act = ACT[cfg.encoder_activation_function]

    def forward(self, x, pos):
        x = self.self_attn_layer_norm(x + self.self_attn(x, pos))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class AIFI(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(AIFILayer(cfg) for _ in range(cfg.encoder_layers))

    def forward(self, x, pos):  # (B, H*W, C), pos (1, H*W, C)
        for layer in self.layers:
            x = layer(x, pos)
        return x


class RepVggBlock(nn.Module):
    """3x3 conv-BN plus 1x1 conv-BN, summed, then SiLU (RepVGG, not re-parameterised here)."""

    def __init__(self, cfg, c):
        super().__init__()
        self.conv1, self.conv2 = ConvNorm(cfg, c, c, 3), ConvNorm(cfg, c, c, 1)
        self.act = ACT[cfg.activation_function]

    def forward(self, x):
        return self.act(self.conv1(x) + self.conv2(x))


class CSPRepLayer(nn.Module):
    """Cross-stage partial: one 1x1 branch through RepVGG blocks, one plain 1x1 branch, summed."""

    def __init__(self, cfg, cin, cout, n_blocks):
        super().__init__()
        act = cfg.activation_function
        self.conv1, self.conv2 = ConvNorm(cfg, cin, cout, 1, act=act), ConvNorm(cfg, cin, cout, 1, act=act)
        self.bottlenecks = nn.Sequential(*(RepVggBlock(cfg, cout) for _ in range(n_blocks)))

    def forward(self, x):
        return self.bottlenecks(self.conv1(x)) + self.conv2(x)


class RepNCSPELAN4(nn.Module):
    """GELAN block (YOLOv9): split, two CSP-RepVGG stages, concatenate all four parts, fuse with a 1x1 conv."""

    def __init__(self, cfg: DFineConfig):
        super().__init__()
        C = cfg.encoder_hidden_dim
        c4 = round(cfg.hidden_expansion * C // 2)  # n: round(43.52 // 2) = 21
        nb = round(3 * cfg.depth_mult)  # Python's round half to even: n 1.5 -> 2, s 1.02 -> 1
        self.conv1 = ConvNorm(cfg, 2 * C, 2 * C, 1, act="silu")  # silu hard-coded here, as upstream
        self.csp_rep1, self.conv2 = CSPRepLayer(cfg, C, c4, nb), ConvNorm(cfg, c4, c4, 3, act="silu")
        self.csp_rep2, self.conv3 = CSPRepLayer(cfg, c4, c4, nb), ConvNorm(cfg, c4, c4, 3, act="silu")
        self.conv4 = ConvNorm(cfg, 2 * C + 2 * c4, C, 1, act="silu")

    def forward(self, x):  # (B, 2C, H, W)
        a, b = self.conv1(x).chunk(2, dim=1)  # (B, C, H, W) each
        b1 = self.conv2(self.csp_rep1(b))  # (B, c4, H, W)
        b2 = self.conv3(self.csp_rep2(b1))  # (B, c4, H, W)
        return self.conv4(torch.cat([a, b, b1, b2], dim=1))  # (B, 2C + 2*c4, H, W) -> (B, C, H, W)


class SCDown(nn.Module):
    """Stride-2 downsampling: 1x1 conv-BN, then 3x3 depthwise stride-2 conv-BN, no activation."""

    def __init__(self, cfg, c):
        super().__init__()
        self.conv1, self.conv2 = ConvNorm(cfg, c, c, 1), ConvNorm(cfg, c, c, 3, stride=2, groups=c)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class HybridEncoder(nn.Module):
    def __init__(self, cfg: DFineConfig):
        super().__init__()
        C, n = cfg.encoder_hidden_dim, len(cfg.encoder_in_channels) - 1
        self.cfg = cfg
        self.aifi = nn.ModuleList(AIFI(cfg) for _ in cfg.encode_proj_layers)
        self.lateral_convs = nn.ModuleList(ConvNorm(cfg, C, C, 1) for _ in range(n))
        self.fpn_blocks = nn.ModuleList(RepNCSPELAN4(cfg) for _ in range(n))
        self.downsample_convs = nn.ModuleList(SCDown(cfg, C) for _ in range(n))
        self.pan_blocks = nn.ModuleList(RepNCSPELAN4(cfg) for _ in range(n))

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:  # L x (B, C, H_l, W_l)
        maps = list(maps)
        for aifi, lvl in zip(self.aifi, self.cfg.encode_proj_layers):  # AIFI: only the coarsest map (n: 20x20)
            B, C, H, W = maps[lvl].shape
            x = maps[lvl].flatten(2).transpose(1, 2)  # (B, H*W, C), row-major tokens
            pos = per_size(sincos_2d, H, W, C, self.cfg.positional_encoding_temperature, x.device)  # (1, H*W, C)
            x = aifi(x, pos.to(x.dtype))  # (B, H*W, C)
            maps[lvl] = x.transpose(1, 2).reshape(B, C, H, W).contiguous()  # (B, C, H, W)
        n = len(maps) - 1
        fpn = [maps[-1]]  # top-down: coarse to fine
        for i in range(n):
            top = self.lateral_convs[i](fpn[-1])
            fpn[-1] = top  # the list keeps the lateral output, which the PAN below reuses
            up = F.interpolate(top, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
            fpn.append(self.fpn_blocks[i](torch.cat([up, maps[n - 1 - i]], dim=1)))  # (B, 2C, ..) -> (B, C, ..)
        fpn.reverse()  # fine to coarse
        pan = [fpn[0]]  # bottom-up: fine to coarse
        for i in range(n):
            down = self.downsample_convs[i](pan[-1])  # (B, C, H/2, W/2)
            pan.append(self.pan_blocks[i](torch.cat([down, fpn[i + 1]], dim=1)))  # (B, 2C, ..) -> (B, C, ..)
        return pan  # L x (B, C, H_l, W_l)


# -----------------------------------------------------------------------------
# 5. Query selection: anchors on every token, a score per token, the 300 best become the decoder's queries


class MLP(nn.Module):
    """n linear layers with ReLU between them. gdino.py has its own on purpose: one file, one model."""

    def __init__(self, din, dhid, dout, n):
        super().__init__()
        dims = [din] + [dhid] * (n - 1) + [dout]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def make_anchors(spatial_shapes: list[tuple[int, int]], dtype=torch.float32, device=None):
    """One anchor box per token in logit space (1, S, 4), centre of its cell, size 0.05 * 2^level, and the valid mask
    (1, S, 1): edge tokens invalid. gdino.encoder_proposals builds the same its own way (it masks padding)."""
    anchors = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        gy, gx = torch.meshgrid(torch.arange(h, device=device).to(dtype), torch.arange(w, device=device).to(dtype),
                                indexing="ij")  # (H, W) each
        xy = torch.stack([(gx + 0.5) / w, (gy + 0.5) / h], dim=-1)  # (H, W, 2): +0.5 before dividing, as upstream
        wh = torch.ones_like(xy) * 0.05 * (2.0 ** lvl)
        anchors.append(torch.cat([xy, wh], dim=-1).reshape(1, h * w, 4))  # (1, H*W, 4) cxcywh
    anchors = torch.cat(anchors, dim=1)  # (1, S, 4)
    valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1, keepdim=True)  # (1, S, 1): drops the outer ring at 80x80
    anchors = inverse_sigmoid(anchors)  # its clamps change no valid anchor; the others are replaced below
    return torch.where(valid, anchors, torch.finfo(dtype).max), valid  # invalid -> sigmoid 1, as transformers


# -----------------------------------------------------------------------------
# 6. Decoder: deformable cross-attention around each box, Fine-grained Distribution Refinement, LQE


class DeformableAttention(nn.Module):
    """D-FINE's deformable attention: no value or output projection; offsets scaled by the box size (Eq. 3 of
    Deformable DETR in its two-stage form, with each level's own point count n_l)."""

    def __init__(self, cfg: DFineConfig):
        super().__init__()
        self.heads, self.points = cfg.decoder_attention_heads, list(cfg.decoder_n_points)
        P, self.offset_scale = sum(self.points), cfg.decoder_offset_scale
        self.sampling_offsets = nn.Linear(cfg.d_model, self.heads * P * 2)
        self.attention_weights = nn.Linear(cfg.d_model, self.heads * P)
        self.register_buffer("num_points_scale", torch.cat([torch.full((n,), 1.0 / n) for n in self.points]))  # (P,)

    def forward(self, query, ref, memory, spatial_shapes, backend="auto"):
        (B, Q, _), P = query.shape, sum(self.points)
        value = memory.reshape(B, memory.shape[1], self.heads, -1)  # (B, S, nH, hD): no value projection
        off = self.sampling_offsets(query).reshape(B, Q, self.heads, P, 2)  # (B, Q, nH, P, 2)
        w = F.softmax(self.attention_weights(query).reshape(B, Q, self.heads, P), dim=-1)  # over ALL levels' points
        scale = self.num_points_scale[:, None]  # (P, 1)
        # offsets in units of the box size, divided by the level's point count, halved; multiplied in upstream's
        # order, since another order rounds differently
        loc = ref[:, :, None, :, :2] + off * scale * ref[:, :, None, :, 2:] * self.offset_scale  # (B, Q, nH, P, 2)
        return common.ms_deform_attn(value, spatial_shapes, self.points, loc, w, backend), loc, w  # (B, Q, d)


class Gate(nn.Module):
    """Replaces the residual + norm after cross-attention: a learned sigmoid mix of the two streams."""

    def __init__(self, d):
        super().__init__()
        self.gate, self.norm = nn.Linear(2 * d, 2 * d), nn.LayerNorm(d)

    def forward(self, residual, x):
        g1, g2 = torch.sigmoid(self.gate(torch.cat([residual, x], dim=-1))).chunk(2, dim=-1)  # (B, Q, d) each
        return self.norm(g1 * residual + g2 * x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DFineConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = SelfAttention(d, cfg.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.encoder_attn = DeformableAttention(cfg)
        self.gateway = Gate(d)
        self.fc1, self.fc2 = nn.Linear(d, cfg.decoder_ffn_dim), nn.Linear(cfg.decoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.act = ACT[cfg.decoder_activation_function]

    def forward(self, h, pos, ref, memory, spatial_shapes, backend="auto", mask=None):  # h, pos (B, Q, d)
        h = self.self_attn_layer_norm(h + self.self_attn(h, pos, mask))  # ref (B, Q, 1, 4)
        x, loc, w = self.encoder_attn(h + pos, ref, memory, spatial_shapes, backend)
        h = self.gateway(h, x)
        h = h + self.fc2(self.act(self.fc1(h)))
        return self.final_layer_norm(h.clamp(min=-65504, max=65504)), loc, w  # the fp16 clamp, kept for parity


class LQE(nn.Module):
    """Location Quality Estimator: how peaked the four edge distributions are shifts every class logit."""

    def __init__(self, cfg: DFineConfig):
        super().__init__()
        self.k = cfg.top_prob_values
        self.reg_conf = MLP(4 * (self.k + 1), cfg.lqe_hidden_dim, 1, 2)

    def forward(self, logits, corners):  # (B, Q, K), (B, Q, 4*(N+1))
        B, Q, _ = corners.shape
        prob = F.softmax(corners.reshape(B, Q, 4, -1), dim=-1)  # (B, Q, 4, N+1)
        top = prob.topk(self.k, dim=-1).values  # (B, Q, 4, k), sorted descending
        stat = torch.cat([top, top.mean(dim=-1, keepdim=True)], dim=-1).reshape(B, Q, -1)  # (B, Q, 4*(k+1))
        return logits + self.reg_conf(stat)  # (B, Q, K) + (B, Q, 1)


def weighting_function(n_bins: int, up: torch.Tensor, reg_scale: torch.Tensor) -> torch.Tensor:
    """W(n), the N+1 bin edges of the edge-offset distributions (paper Eq. 4): dense near 0, +-2*up*c at the ends;
    float32 tensor ops on the checkpoint's own `up` and `reg_scale`, as transformers (Python floats round otherwise)."""
    ub1 = abs(up[0]) * abs(reg_scale)
    ub2 = ub1 * 2
    step = (ub1 + 1) ** (2 / (n_bins - 2))
    left = [-(step ** i) + 1 for i in range(n_bins // 2 - 1, 0, -1)]
    right = [(step ** i) - 1 for i in range(1, n_bins // 2)]
    values = [-ub2] + left + [torch.zeros_like(up[0][None])] + right + [ub2]
    return torch.cat(values, 0)  # (N+1,)


def integral(corners: torch.Tensor, project: torch.Tensor) -> torch.Tensor:
    """Expected edge offset under each edge's distribution: sum_n softmax(logits)_n * W(n)."""
    B, Q, _ = corners.shape
    prob = F.softmax(corners.reshape(-1, project.shape[0]), dim=1)  # (B*Q*4, N+1), edges l, t, r, b
    return F.linear(prob, project).reshape(B, Q, 4)  # F.linear, as transformers: a sum rounds differently


def distance2bbox(ref: torch.Tensor, dist: torch.Tensor, reg_scale: torch.Tensor) -> torch.Tensor:
    """Edge distances (in units of box size / reg_scale) from the initial box -> a cxcywh box."""
    rs = abs(reg_scale)
    cx, cy, w, h = ref.unbind(-1)
    x1 = cx - (0.5 * rs + dist[..., 0]) * (w / rs)
    y1 = cy - (0.5 * rs + dist[..., 1]) * (h / rs)
    x2 = cx + (0.5 * rs + dist[..., 2]) * (w / rs)
    y2 = cy + (0.5 * rs + dist[..., 3]) * (h / rs)
    return common.corners_to_center(torch.stack([x1, y1, x2, y2], dim=-1))  # (B, Q, 4)


class Decoder(nn.Module):
    def __init__(self, cfg: DFineConfig):
        super().__init__()
        d, K, n_layers = cfg.d_model, len(cfg.id2label), cfg.decoder_layers
        self.max_num_bins = cfg.max_num_bins
        self.query_pos_head = MLP(4, 2 * d, d, 2)
        self.pre_bbox_head = MLP(d, d, 4, 3)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(n_layers))
        self.bbox_embed = nn.ModuleList(MLP(d, d, 4 * (cfg.max_num_bins + 1), 3) for _ in range(n_layers))
        # a class head and an LQE per layer: every layer's classes are supervised in training
        self.class_embed = nn.ModuleList(nn.Linear(d, K) for _ in range(n_layers))
        self.lqe_layers = nn.ModuleList(LQE(cfg) for _ in range(n_layers))
        self.register_buffer("reg_scale", torch.tensor([4.0]))  # from the weights: x's file says 8, its config 4
        self.register_buffer("up", torch.tensor([0.5]))

    def forward(self, target, ref_unact, memory, spatial_shapes, backend="auto", mask=None) -> dict:
        """mask: the denoising queries' attention mask (training), else None. Each layer's box is passed on detached,
        as upstream: a layer learns its own refinement; gradients reach earlier layers through h and the corners."""
        project = weighting_function(self.max_num_bins, self.up, self.reg_scale)  # (N+1,)
        ref = torch.sigmoid(ref_unact)  # (B, Q, 4) cxcywh in [0, 1]
        h, prev_h, prev_corners = target, 0, 0
        out = {"hidden": [], "boxes": [], "corners": [], "scores": [], "layer_logits": [], "sampling_locations": [],
               "attention_weights": []}
        for i, layer in enumerate(self.layers):
            pos = self.query_pos_head(ref).clamp(min=-10, max=10)  # (B, Q, d)
            h, loc, w = layer(h, pos, ref[:, :, None], memory, spatial_shapes, backend, mask)  # ref (B, Q, 1, 4)
            out["sampling_locations"].append(loc)  # (B, Q, nH, P, 2) in [0, 1]: where each head looked
            out["attention_weights"].append(w)  # (B, Q, nH, P): how much each sample counted
            if i == 0:  # the initial box all FDR distances are measured from, fixed for every later layer
                out["initial_box"] = torch.sigmoid(self.pre_bbox_head(h) + inverse_sigmoid(ref))  # (B, Q, 4)
                ref0 = out["initial_box"].detach()
            corners = self.bbox_embed[i](h + prev_h) + prev_corners  # (B, Q, 4*(N+1)): residual in logit space
            box = distance2bbox(ref0, integral(corners, project), self.reg_scale)  # (B, Q, 4)
            ref, prev_h, prev_corners = box.detach(), h.detach(), corners  # next layer's reference box
            for name, t in (("hidden", h), ("boxes", box), ("corners", corners)):
                out[name].append(t)
            # every layer's class logits: training supervises each, inference reads the last (the detections)
            out["scores"].append(self.class_embed[i](h))  # (B, Q, K) before LQE
            out["layer_logits"].append(self.lqe_layers[i](out["scores"][-1], corners))  # (B, Q, K), LQE included
        out["logits"] = out["layer_logits"][-1]
        out["pred_boxes"] = box
        return out


# -----------------------------------------------------------------------------
# 7. The model: forward is the list of stages


@dataclass
class DFineOutput:
    logits: torch.Tensor  # (B, Q, K) class logits (sigmoid for scores)
    pred_boxes: torch.Tensor  # (B, Q, 4) cxcywh, normalised to the input
    stages: dict | None = None  # every stage's tensors, in data-flow order, when return_stages=True
    loss: torch.Tensor | None = None  # with labels: the weighted sum of loss_dict (section 9)
    loss_dict: dict | None = None  # every weighted term under transformers' name


class DFine(nn.Module):
    def __init__(self, cfg: DFineConfig, backend: str = "auto"):
        super().__init__()
        self.cfg, self.backend = cfg, backend
        C, d = cfg.encoder_hidden_dim, cfg.d_model
        self.backbone = HGNetV2(cfg)
        self.encoder_input_proj = nn.ModuleList(input_proj(c, C) for c in cfg.encoder_in_channels)
        self.encoder = HybridEncoder(cfg)
        # x: the encoder is 384 wide and the decoder 256, so a projection; the others need none
        self.decoder_input_proj = nn.ModuleList(
            input_proj(c, d, cfg.batch_norm_eps) if c != d else nn.Identity() for c in cfg.decoder_in_channels)
        self.enc_output = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d, eps=cfg.layer_norm_eps))
        self.enc_score_head, self.enc_bbox_head = nn.Linear(d, len(cfg.id2label)), MLP(d, d, 4, 3)
        self.decoder = Decoder(cfg)
        if cfg.num_denoising > 0:  # training only: the class embedding of the denoising queries (K: padding)
            self.denoising_class_embed = nn.Embedding(len(cfg.id2label) + 1, d, padding_idx=len(cfg.id2label))
        self.input_size = INPUT_SIZE  # (height, width) detect resizes to; from_pretrained reads the checkpoint's
        init_weights(self)  # from scratch as the original; from_pretrained then overwrites every tensor

    def encode(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        proj = [p(m) for p, m in zip(self.encoder_input_proj, maps)]  # L x (B, C, H_l, W_l)
        return self.encoder(proj)

    def select_queries(self, feats: list[torch.Tensor]) -> dict:
        """Every token is scored and gets a box; the Q best tokens become the decoder's queries."""
        feats = [p(f) for p, f in zip(self.decoder_input_proj, feats)]  # L x (B, d, H_l, W_l)
        shapes = [tuple(f.shape[2:]) for f in feats]
        memory = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], dim=1)  # (B, S, d), fine to coarse
        if memory.shape[1] < self.cfg.num_queries:
            raise InputError(f"the input gives {memory.shape[1]} image tokens, fewer than the {self.cfg.num_queries} "
                             f"queries; use a larger input (dfine.preprocess makes 640x640)")
        anchors, valid = per_size(make_anchors, tuple(shapes), memory.dtype, memory.device)  # (1, S, 4), (1, S, 1)
        out_mem = self.enc_output(valid.to(memory.dtype) * memory)  # (B, S, d): invalid tokens zeroed for the head
        enc_class = self.enc_score_head(out_mem)  # (B, S, K)
        enc_coord = self.enc_bbox_head(out_mem) + anchors  # (B, S, 4) box logits
        topk = enc_class.max(-1).values.topk(self.cfg.num_queries, dim=1).indices  # (B, Q), best score first
        ref_unact = enc_coord.gather(1, topk[..., None].expand(-1, -1, 4))  # (B, Q, 4)
        target = out_mem.gather(1, topk[..., None].expand(-1, -1, out_mem.shape[-1]))  # (B, Q, d)
        return {"memory": memory, "spatial_shapes": shapes, "anchors": anchors, "valid_mask": valid,
                "enc_outputs_class": enc_class, "enc_outputs_coord_logits": enc_coord, "topk_indices": topk,
                "target": target, "init_reference_points": ref_unact}

    def forward(self, pixel_values: torch.Tensor, labels: list[dict] | None = None,
                return_stages: bool = False) -> DFineOutput:
        """labels (transformers' convention, section 9): per image {"class_labels": (n,), "boxes": (n, 4) cxcywh in
        [0, 1]}; then .loss and .loss_dict are set, with denoising queries in train mode."""
        B, C, H, W = pixel_values.shape if pixel_values.ndim == 4 else (0, 0, 1, 1)
        weight = self.enc_score_head.weight
        if C != 3 or H % 32 or W % 32 or pixel_values.dtype != weight.dtype or pixel_values.device != weight.device:
            raise InputError(f"pixel_values must be (B, 3, H, W) with H, W multiples of 32, {weight.dtype} on "
                             f"{weight.device} as the model; got {tuple(pixel_values.shape)} {pixel_values.dtype} on "
                             f"{pixel_values.device}; use dfine.preprocess")
        if labels is not None:
            common.check_labels(labels, B, self.enc_score_head.out_features)
        pixel_values = pixel_values.contiguous()  # a channels-last input would change conv rounding (see preprocess)
        maps = self.backbone(pixel_values)  # L x (B, C_l, H_l, W_l), strides 8/16/32
        feats = self.encode(maps)  # L x (B, C, H_l, W_l)
        q = self.select_queries(feats)  # top-Q proposals from the encoder tokens
        # the queries enter the decoder detached, as upstream: the encoder head learns from its own loss only
        target, ref_unact, mask = q["target"].detach(), q["init_reference_points"].detach(), None
        dn = denoising_queries(self, labels) if self.training and labels is not None else None  # section 9
        if dn is not None:  # training: D denoising queries in front of the Q queries, kept apart by the mask
            target = torch.cat([dn["queries"], target], dim=1)  # (B, D + Q, d)
            ref_unact, mask = torch.cat([dn["boxes_unact"], ref_unact], dim=1), dn["attn_mask"]  # (B, D + Q, 4)
        dec = self.decoder(target, ref_unact, q["memory"], q["spatial_shapes"], self.backend, mask)
        stages = {"pixel_values": pixel_values, "backbone": maps, "encoder": feats,
                  **{k: v for k, v in q.items() if k != "spatial_shapes"},
                  **{f"decoder_{k}": dec[k] for k in ("sampling_locations", "attention_weights", "initial_box",
                                                      "hidden", "boxes", "corners")},
                  "logits": dec["logits"], "pred_boxes": dec["pred_boxes"]} if return_stages else None
        loss, loss_dict = dfine_loss(self, q, dec, labels, dn) if labels is not None else (None, None)
        n_dn = 0 if dn is None else dn["num"]  # the Q queries' outputs only
        return DFineOutput(dec["logits"][:, n_dn:], dec["pred_boxes"][:, n_dn:], stages, loss, loss_dict)


# -----------------------------------------------------------------------------
# 8. Detection: images in, boxes in pixels out (detect), post-processed as transformers' post_process_object_detection
#    with use_focal_loss=True


@torch.inference_mode()
def detect(model: DFine, images, threshold: float = 0.5, nms: float | None = None, top_k: int | None = None,
           class_agnostic: bool = False, engine: common.OnnxModel | None = None) -> list[dict]:
    """Images (paths, URLs, PIL images or arrays; any sizes) -> per image scores, labels, names, xyxy boxes.
    nms: an IoU above which a box is dropped for a better one of the same class (of any class with
    class_agnostic, which also merges one query's several labels), common.nms; top_k: keep the k best.
    Both None (the default): transformers' post-processing as is. engine: common.OnnxModel(path) of this model's
    export runs the forward in onnxruntime instead (same preprocessing and post-processing)."""
    common.check_threshold("threshold", threshold)
    images = [common.load_image(im) for im in (images if isinstance(images, (list, tuple)) else [images])]
    if not images:
        raise InputError("detect got no images; pass one or more paths, URLs, PIL images or arrays")
    weight = model.enc_score_head.weight
    px = preprocess(images, model.input_size).to(weight.device, weight.dtype)  # (B, 3, H, W)
    out = model(px) if engine is None else common.run_engine(engine, "d-fine", pixel_values=px)
    # in float32 whatever the model's dtype: pixels in bf16 would round once more (to 4 px between 512 and 1024)
    results = postprocess(out.logits.float(), out.pred_boxes.float(), [im.size[::-1] for im in images],
                          threshold, model.cfg.id2label)
    return [common.best_detections(r, nms, top_k, None if class_agnostic else r["labels"]) for r in results]


def postprocess(logits, pred_boxes, sizes: list[tuple[int, int]], threshold: float = 0.5,
                id2label: dict | None = None) -> list[dict]:
    """Per image: the top-Q (query, class) pairs by sigmoid score above `threshold` (strict >), boxes in pixels of
    the original (height, width) in sizes. No NMS, no clipping, as upstream: a query may come with several labels."""
    B, Q, K = logits.shape
    boxes = center_to_corners(pred_boxes)  # (B, Q, 4) xyxy in [0, 1] of the stretched input = of the original
    scale = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=torch.int64)  # int, as transformers: float*int
    boxes = boxes * scale[:, None, :].to(boxes.device)  # (B, Q, 4) pixels
    scores, idx = torch.sigmoid(logits).flatten(1).topk(Q, dim=-1)  # (B, Q) over all Q*K pairs
    labels, query = idx % K, idx // K
    boxes = boxes.gather(1, query[..., None].expand(-1, -1, 4))  # (B, Q, 4)
    results = []
    for s, lab, b in zip(scores, labels, boxes):
        keep = s > threshold
        results.append({"scores": s[keep], "labels": lab[keep], "boxes": b[keep],
                        "names": [(id2label or {}).get(int(i), str(int(i))) for i in lab[keep]]})
    return results


DFine.detect = detect  # a method of the model, defined here to keep the model class the model


# -----------------------------------------------------------------------------
# 9. Training: denoising queries, Hungarian matching, the loss terms, initial weights
#
# With labels, forward returns the original D-FINE's loss (Peterande/D-FINE), term by term, each weighted by the config:
#   main          the last layer's Q queries: VFL, L1, GIoU (matched by the Hungarian algorithm) and FGL
#   _aux_k        k < L-1: layer k's class, box and edge distributions: VFL, L1, GIoU, FGL and DDF
#   _pre          the first layer's pre-box head with class head 0: VFL, L1, GIoU
#   _enc_0        the encoder's top-Q proposals: VFL, L1, GIoU
#   _dn_k, _dn_pre  k < L: the same for the denoising queries, each matched to the object it was made from
# VFL: varifocal loss, the IoU as the soft target of the matched class. FGL: each edge's distribution pushed
# towards the two bins around the true edge. DDF (GO-LSD): every layer's distributions distilled from the last's.
# transformers pairs layer k's distributions with the layer before's class and box (README, tests).


def denoising_queries(model: "DFine", labels: list[dict]) -> dict | None:
    """Contrastive denoising groups (DN-DETR, DINO): every object twice per group, a positive (corners moved by under
    half its size, to reconstruct) and a negative (moved by 1-2 halves, to reject), some labels replaced at random.
    The random calls are transformers', in its order, so the same torch seed gives the same groups."""
    cfg, n_gt = model.cfg, [len(t["class_labels"]) for t in labels]
    K, M, B, device = model.enc_score_head.out_features, max(n_gt), len(labels), labels[0]["class_labels"].device
    if cfg.num_denoising <= 0 or M == 0:
        return None
    G = max(cfg.num_denoising // M, 1)  # groups
    cls = torch.full([B, M], K, dtype=torch.int32, device=device)  # (B, M): padded with the no-object id K
    box, real = torch.zeros([B, M, 4], device=device), torch.zeros([B, M], dtype=torch.bool, device=device)
    for i, (t, n) in enumerate(zip(labels, n_gt)):
        cls[i, :n], box[i, :n], real[i, :n] = t["class_labels"], t["boxes"], True
    cls, box, real = cls.tile([1, 2 * G]), box.tile([1, 2 * G, 1]), real.tile([1, 2 * G])  # (B, D) .. D = 2GM
    negative = torch.zeros([B, 2 * M, 1], device=device)
    negative[:, M:] = 1
    negative = negative.tile([1, G, 1])  # (B, D, 1): the second half of each group
    positive_idx = torch.nonzero((1 - negative).squeeze(-1) * real)[:, 1].split([n * G for n in n_gt])  # (n*G,)..
    if cfg.label_noise_ratio > 0:
        flip = torch.rand_like(cls, dtype=torch.float) < cfg.label_noise_ratio * 0.5  # (B, D)
        cls = torch.where(flip & real, torch.randint_like(flip, 0, K, dtype=cls.dtype), cls)
    if cfg.box_noise_scale > 0:
        corners = center_to_corners(box)  # (B, D, 4)
        half = torch.tile(box[..., 2:] * 0.5, [1, 1, 2]) * cfg.box_noise_scale  # (B, D, 4): w/2, h/2, w/2, h/2
        sign = torch.randint_like(box, 0, 2) * 2.0 - 1.0
        part = torch.rand_like(box)
        part = (part + 1.0) * negative + part * (1 - negative)  # in [0, 1) for positives, [1, 2) for negatives
        corners = (corners + part * sign * half).clip(min=0.0, max=1.0)
        box = inverse_sigmoid(common.corners_to_center(corners))  # (B, D, 4) box logits
    D, Q = 2 * G * M, cfg.num_queries
    mask = torch.zeros([D + Q, D + Q], device=device)  # added to the self-attention scores
    mask[D:, :D] = -torch.inf  # the Q queries must not see the objects hidden in the denoising queries
    for g in range(G):  # nor a group the other groups
        mask[2 * M * g: 2 * M * (g + 1), : 2 * M * g] = -torch.inf
        mask[2 * M * g: 2 * M * (g + 1), 2 * M * (g + 1): D] = -torch.inf
    return {"queries": model.denoising_class_embed(cls), "boxes_unact": box, "attn_mask": mask,
            "positive_idx": positive_idx, "groups": G, "num": D}


@torch.no_grad()
def match(o: dict, labels: list[dict], cfg: DFineConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each image's objects (O in all) to distinct queries at the least total cost (transformers' RT-DETR matcher)."""
    B, Q, _ = o["logits"].shape
    ids, boxes = torch.cat([t["class_labels"] for t in labels]), torch.cat([t["boxes"] for t in labels])  # (O,)..
    prob = o["logits"].flatten(0, 1).sigmoid()[:, ids]  # (B*Q, O): each query's probability of each object's class
    pred = o["boxes"].flatten(0, 1)  # (B*Q, 4)
    giou = common.generalized_box_iou(center_to_corners(pred), center_to_corners(boxes))  # (B*Q, O)
    cost = (cfg.matcher_bbox_cost * torch.cdist(pred, boxes, p=1)
            + cfg.matcher_class_cost * common.focal_cost(prob, cfg.matcher_alpha, cfg.matcher_gamma)
            + cfg.matcher_giou_cost * -giou)  # (B*Q, O)
    return common.hungarian_match(cost.view(B, Q, -1), [len(t["boxes"]) for t in labels])


def edge_targets(ref: torch.Tensor, gt: torch.Tensor, n_bins: int, reg_scale, up):
    """FGL's target: each true edge's distance from the reference box (xyxy gt, cxcywh ref, (K, 4) each) in W(n)'s
    units, as the index of the bin edge left of it and the weights of that edge and the next -> (4K,) each."""
    rs = abs(reg_scale)
    w, h = ref[:, 2] / rs + 1e-16, ref[:, 3] / rs + 1e-16  # (K,) box size per unit of distance
    d = torch.stack([(ref[:, 0] - gt[:, 0]) / w - 0.5 * rs, (ref[:, 1] - gt[:, 1]) / h - 0.5 * rs,
                     (gt[:, 2] - ref[:, 0]) / w - 0.5 * rs, (gt[:, 3] - ref[:, 1]) / h - 0.5 * rs], -1).reshape(-1)
    edges = weighting_function(n_bins, up, reg_scale)  # (N+1,)
    idx = (((edges[None] - d[:, None]) <= 0).sum(1) - 1).to(d.dtype)  # (4K,) the last edge <= d; -1: none
    w_right, w_left = torch.zeros_like(idx), torch.zeros_like(idx)
    inside = (idx >= 0) & (idx < n_bins)
    i = idx[inside].long()
    left, right = (d[inside] - edges[i]).abs(), (edges[i + 1] - d[inside]).abs()
    w_right[inside] = left / (left + right)  # linear interpolation between the two edges
    w_left[inside] = 1.0 - w_right[inside]
    below, above = idx < 0, idx >= n_bins  # outside W(n): all weight on the end bin
    w_right[below], w_left[below], idx[below] = 0.0, 1.0, 0.0
    w_right[above], w_left[above], idx[above] = 1.0, 0.0, n_bins - 0.1
    return idx.clamp(min=0, max=n_bins - 0.1), w_right, w_left


def set_losses(o: dict, labels: list[dict], indices: list, num_boxes: float, model: "DFine",
               teacher: dict | None = None) -> dict[str, torch.Tensor]:
    """One output's terms (unweighted): VFL, L1 and GIoU; with corners also FGL and, from the teacher, DDF."""
    cfg, logits, n_bins = model.cfg, o["logits"], model.cfg.max_num_bins
    idx = (torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]),
           torch.cat([q for q, _ in indices]))  # (batch, query) of every matched pair
    gt = torch.cat([t["boxes"][j] for t, (_, j) in zip(labels, indices)])  # (K, 4)
    iou = torch.diag(common.box_iou(center_to_corners(o["boxes"][idx].detach()), center_to_corners(gt))[0])  # (K,)
    # VFL: binary cross-entropy on every (query, class) against IoU for the matched class, 0 elsewhere
    classes = torch.full(logits.shape[:2], logits.shape[2], dtype=torch.int64, device=logits.device)  # (B, Q)
    classes[idx] = torch.cat([t["class_labels"][j] for t, (_, j) in zip(labels, indices)])
    onehot = F.one_hot(classes, logits.shape[2] + 1)[..., :-1]  # (B, Q, K), the no-object column dropped
    score = torch.zeros_like(classes, dtype=logits.dtype)
    score[idx] = iou.to(logits.dtype)
    score = score.unsqueeze(-1) * onehot  # (B, Q, K)
    weight = (cfg.focal_loss_alpha * logits.detach().sigmoid().pow(cfg.focal_loss_gamma) * (1 - onehot) + score)
    vfl = F.binary_cross_entropy_with_logits(logits, score, weight=weight.to(logits.dtype), reduction="none")
    losses = {"loss_vfl": vfl.mean(1).sum() * logits.shape[1] / num_boxes, **common.box_losses(o["boxes"][idx], gt,
                                                                                                  num_boxes)}
    if "corners" not in o:
        return losses
    # FGL: cross-entropy of each matched edge's distribution against the two bins around the true edge, by IoU
    corners = o["corners"][idx].reshape(-1, n_bins + 1)  # (4K, N+1)
    bins, w_right, w_left = edge_targets(o["ref"][idx].detach(), center_to_corners(gt), n_bins,
                                         model.decoder.reg_scale, model.decoder.up)
    iou = torch.diag(common.box_iou(center_to_corners(o["boxes"][idx]), center_to_corners(gt))[0])  # (K,)
    iou4 = iou.unsqueeze(-1).repeat(1, 1, 4).reshape(-1).detach()  # (4K,)
    fgl = (F.cross_entropy(corners, bins.long(), reduction="none") * w_left.reshape(-1)
           + F.cross_entropy(corners, bins.long() + 1, reduction="none") * w_right.reshape(-1))
    losses["loss_fgl"] = (fgl * iou4).sum() / num_boxes
    if teacher is None:  # the last layer: no distillation
        return losses
    # DDF: KL of every query's edge distributions (temperature T) from the last layer's, weighted by the teacher's
    # score (unmatched) or the IoU (matched); the two groups averaged apart and mixed by sqrt of their sizes
    T, pred = 5, o["corners"].reshape(-1, n_bins + 1)  # (B*Q*4, N+1)
    target = teacher["corners"].reshape(-1, n_bins + 1)
    if torch.equal(pred, target):  # the last layer's denoising queries are their own teacher
        losses["loss_ddf"] = pred.sum() * 0
        return losses
    w = teacher["logits"].sigmoid().max(dim=-1)[0]  # (B, Q)
    pos = torch.zeros_like(w, dtype=torch.bool)
    pos[idx] = True
    pos = pos.unsqueeze(-1).repeat(1, 1, 4).reshape(-1)  # (B*Q*4,)
    w[idx] = iou.reshape_as(w[idx]).to(w.dtype)
    w = w.unsqueeze(-1).repeat(1, 1, 4).reshape(-1).detach()  # (B*Q*4,)
    kl = F.kl_div(F.log_softmax(pred / T, dim=1), F.softmax(target.detach() / T, dim=1), reduction="none").sum(-1)
    kl = w * (T**2) * kl  # (B*Q*4,)
    per_image = 1 / logits.shape[0]
    n_pos, n_neg = (pos.sum() * per_image) ** 0.5, ((~pos).sum() * per_image) ** 0.5
    l_pos, l_neg = kl[pos].mean() if pos.any() else 0, kl[~pos].mean() if (~pos).any() else 0
    losses["loss_ddf"] = (l_pos * n_pos + l_neg * n_neg) / (n_pos + n_neg)
    return losses


def dfine_loss(model: "DFine", q: dict, dec: dict, labels: list[dict], dn: dict | None):
    """-> (loss, loss_dict): every output's terms (section header), weighted by the config."""
    cfg, n_dn, L = model.cfg, 0 if dn is None else dn["num"], len(dec["corners"])
    ref0 = dec["initial_box"].detach()  # the box FDR measures every layer's edges from

    def layer(k: int, denoising: bool, teacher: bool = True) -> tuple[dict, dict | None]:  # the D or the Q queries
        part = slice(0, n_dn) if denoising else slice(n_dn, None)
        o = {"logits": dec["layer_logits"][k][:, part], "boxes": dec["boxes"][k][:, part].clamp(min=0, max=1),
             "corners": dec["corners"][k][:, part], "ref": ref0[:, part]}
        last = {"corners": dec["corners"][-1][:, part], "logits": dec["layer_logits"][-1][:, part]}
        return o, last if teacher else None

    def pre(denoising: bool) -> dict:  # the pre-box head with class head 0 (no LQE)
        part = slice(0, n_dn) if denoising else slice(n_dn, None)
        return {"logits": dec["scores"][0][:, part], "boxes": dec["initial_box"][:, part].clamp(min=0, max=1)}

    losses = {}

    def add(suffix: str, o: dict, indices: list, num_boxes: float, teacher: dict | None = None) -> None:
        for k, v in set_losses(o, labels, indices, num_boxes, model, teacher).items():
            losses[k + suffix] = v * getattr(cfg, "weight_" + k)

    num_boxes = float(max(sum(len(t["class_labels"]) for t in labels), 1))
    outputs = [("", layer(L - 1, False, teacher=False)), *((f"_aux_{k}", layer(k, False)) for k in range(L - 1)),
               ("_pre", (pre(False), None))]
    topk = q["topk_indices"][..., None].expand(-1, -1, dec["scores"][0].shape[-1])  # (B, Q, K)
    enc = {"logits": q["enc_outputs_class"].gather(1, topk), "boxes": q["init_reference_points"].sigmoid().clamp(0, 1)}
    for suffix, (o, teacher) in [*outputs, ("_enc_0", (enc, None))]:
        add(suffix, o, match(o, labels, cfg), num_boxes, teacher)
    if dn is not None:  # denoising query j of a group stands for object j: no matching needed
        dn_indices = [(p, torch.arange(len(t["boxes"]), device=p.device).tile(dn["groups"]))
                      for p, t in zip(dn["positive_idx"], labels)]
        for suffix, (o, teacher) in [*((f"_dn_{k}", layer(k, True)) for k in range(L)), ("_dn_pre", (pre(True), None))]:
            add(suffix, o, dn_indices, num_boxes * dn["groups"], teacher)
    return sum(losses.values()), losses


@torch.no_grad()
def init_weights(model: "DFine") -> None:
    """From a config, as the original D-FINE: class biases at the prior (every query 'nothing here'), box heads' last
    layers at 0 (boxes at the anchors, edges at W's centre), sampling points on a ring (head h at angle 2*pi*h/nH, a
    level's k-th point k steps out), uniform attention, gates at 0.5, frozen BNs the identity; xavier as upstream."""
    cfg, d = model.cfg, model.decoder
    p = cfg.initializer_bias_prior_prob or 0.01
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.fill_(1.0), m.running_var.fill_(1.0)
        elif isinstance(m, DeformableAttention):
            theta = torch.arange(m.heads, dtype=torch.float32) * (2.0 * math.pi / m.heads)  # (nH,)
            ring = torch.stack([theta.cos(), theta.sin()], -1)  # (nH, 2)
            ring = ring / ring.abs().max(-1, keepdim=True).values  # on the square's edge: max(|x|, |y|) = 1
            steps = torch.cat([torch.arange(1, n + 1) for n in m.points])  # (P,) 1..n_l for every level
            m.sampling_offsets.bias.copy_((ring[:, None, :] * steps[None, :, None]).flatten())  # (nH*P*2,)
            for t in (m.sampling_offsets.weight, m.attention_weights.weight, m.attention_weights.bias):
                t.zero_()
        elif isinstance(m, Gate):  # sigmoid(0) = 0.5: the two streams mixed evenly
            m.gate.weight.zero_(), m.gate.bias.zero_()
        elif isinstance(m, DecoderLayer):
            nn.init.xavier_uniform_(m.fc1.weight), nn.init.xavier_uniform_(m.fc2.weight)
    for head in [model.enc_score_head, *d.class_embed]:
        head.bias.fill_(-math.log((1 - p) / p))  # sigmoid(bias) = p
    for mlp in [model.enc_bbox_head, d.pre_bbox_head, *d.bbox_embed, *(lqe.reg_conf for lqe in d.lqe_layers)]:
        mlp.layers[-1].weight.zero_(), mlp.layers[-1].bias.zero_()
    for w in [model.enc_output[0].weight, *(layer.weight for layer in d.query_pos_head.layers),
              *(m[0].weight for m in model.decoder_input_proj if isinstance(m, nn.Sequential))]:
        nn.init.xavier_uniform_(w)
    d.reg_scale.fill_(cfg.reg_scale), d.up.fill_(cfg.up)


# Fine-tuning on a COCO dataset (common.read_coco, common.fit) with the original's recipe

NO_AUG_SHARE = 0.1  # the original turns augmentation and multi-scale off for its last epochs (72 of 80 for L)


def with_classes(model: DFine, names: list[str], category_ids: list[int]) -> DFine:
    """The model for a dataset's classes: the class heads (encoder and every decoder layer) and the denoising label
    embedding made anew, as from scratch, unless the names are the model's own; every other weight kept."""
    cfg = replace(model.cfg, id2label=dict(enumerate(names)), coco_category_ids=list(category_ids))
    new = DFine(cfg, model.backend)
    heads = () if list(names) == list(model.cfg.id2label.values()) else (
        "enc_score_head.", "decoder.class_embed.", "denoising_class_embed.")
    new.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(heads)}, strict=False)
    new.input_size = model.input_size
    return new


def train(coco: str, images: str, init: str, out: str, steps: int, batch: int = 8, val: str | None = None,
          val_images: str | None = None, eval_every: int = 500, lr: float | None = None, seed: int = 0,
          resume: bool = False, log=None) -> dict:
    """Fine-tune `init` (Hub id or folder) on a COCO dataset as the original does: AdamW (lr 2e-4 unless given,
    the backbone at half of it), its augmentations and multi-scale, off for the last NO_AUG_SHARE of the steps,
    EMA; the best EMA weights go to `out` (common.fit). Returns fit's history."""
    data = common.read_coco(coco, images)
    test = common.read_coco(val, val_images or images) if val else None
    torch.manual_seed(seed)
    model = with_classes(DFine.from_pretrained(init), data.names, data.category_ids)
    H, W = model.input_size
    low = list(range(int(H * 0.75 / 32) * 32, H, 32))  # the original's scales: 0.75-1.25 of the size, base x3
    scales = low + [H] * 3 + [int(H * 1.25 / 32) * 32 - 32 * i for i in range(len(low))]
    scales = [s for s in scales if sum((s // k) ** 2 * W // H for k in model.cfg.feat_strides) >= model.cfg.num_queries]

    def inputs(t: int) -> dict:
        aug = t < steps - int(steps * NO_AUG_SHARE)
        samples, s = common.coco_batch(data, t, batch, seed, common.coco_transforms("dfine", (H, W), aug),
                                       scales if aug else ())
        pixel_values = torch.stack([x["image"] for x in samples]).float() / 255  # (B, 3, H, W) in [0, 1]
        if s:  # as the original's collate: the whole batch resized (nearest), boxes stay normalised
            pixel_values = F.interpolate(pixel_values, size=(s, round(s * W / H / 32) * 32))
        wh = torch.tensor([W, H, W, H], dtype=torch.float32)
        return {"pixel_values": pixel_values, "labels": [{"class_labels": x["classes"],
                "boxes": common.corners_to_center(x["boxes"]) / wh} for x in samples]}

    def evaluate(m: DFine) -> dict:  # the 100 best (query, class) pairs per image
        files = [im["file"] for im in test.images]
        dets = [r for i in range(0, len(files), 16) for r in m.detect(files[i:i + 16], 0.0, top_k=100)]
        return common.coco_eval(test, dets)

    return common.fit(model, inputs, steps, out, evaluate if test else None, eval_every, lr or 2e-4,
                      backbone_lr=0.5, resume=resume, log=log)


# -----------------------------------------------------------------------------
# 10. Loading and saving: the checkpoint key map (one table, read both ways), from_pretrained, save_pretrained

# The port in one table: (the checkpoint's name, ours), each the start of a key whose rest carries over. Loading
# reads it left to right, saving right to left; the first entry that fits a key wins. The left names are the Hub
# files' (transformers 4.x) and what transformers' save_pretrained writes.
KEY_TABLE = [
    ("model.backbone.model.", "backbone."),
    ("model.encoder.encoder.", "encoder.aifi."),  # 5.x files: model.encoder.aifi., read by the last entry
    ("model.", ""),  # the rest, denoising_class_embed included: our names are transformers' names
]
LOAD_ONLY = [("class_embed.", "decoder.class_embed."),  # transformers' second name of each decoder head
             ("bbox_embed.", "decoder.bbox_embed.")]
NAMES_5X = {".self_attn.o_proj.": ".self_attn.out_proj.", ".mlp.layers.0.": ".fc1.",  # transformers 5.x's names of
            ".mlp.layers.1.": ".fc2."}  # the AIFI and decoder layers' parts, read as the 4.x files' (ours)


def rename(key: str, table: list[tuple[str, str]]) -> str:
    """key through the first entry of table whose left side starts it; unchanged where none fits."""
    return next((right + key[len(left):] for left, right in table if key.startswith(left)), key)


def key_map(key: str) -> str:
    """A checkpoint's key (4.x or 5.x names) -> our parameter name."""
    for name_5x, name in NAMES_5X.items():
        key = key.replace(name_5x, name)
    return rename(key, KEY_TABLE + LOAD_ONLY)


def checkpoint_key(name: str) -> str:
    """Our parameter name -> the checkpoint's key, as save_pretrained writes it: KEY_TABLE read right to left."""
    return rename(name, [(ours, theirs) for theirs, ours in KEY_TABLE])


# Saving writes what from_pretrained (and transformers) read: transformers 4.x key names, a nested config.json.
BACKBONE_FIELDS = ("stem_channels", "stem_strides", "stage_in_channels", "stage_mid_channels", "stage_out_channels",
                   "stage_num_blocks", "stage_numb_of_layers", "stage_downsample", "stage_downsample_strides",
                   "stage_light_block", "stage_kernel_size", "use_learnable_affine_block", "hidden_act", "out_indices")


def from_pretrained(name_or_path: str | Path, revision: str | None = None, backend: str = "auto",
                    dtype: torch.dtype | None = None) -> "DFine":
    """A Hub id (downloaded through huggingface_hub) or a local folder -> the model in eval mode. backend: the
    deformable attention's, see common.resolve_backend ("torch" forces the readable one). dtype: of the weights and
    activations (torch.bfloat16, or torch.float16 where the device has it); None keeps float32."""
    common.resolve_backend(backend, torch.device("cpu"))  # a typo fails here, not at the first forward
    dtype = common.check_dtype(dtype)
    folder = common.resolve_checkpoint(name_or_path, revision)
    cfg = DFineConfig.from_dict(common.read_config(folder, ["d_fine"]))
    model = DFine(cfg, backend).to(dtype)  # load_weights casts the file's tensors to it
    # a file may lack the BN step counters (unused in eval) and num_points_scale (1/n_l, built at init)
    common.load_weights(model, common.weight_files(folder), key_map,
                        optional=lambda name: name.endswith((".num_batches_tracked", ".num_points_scale")))
    f = folder / "preprocessor_config.json"  # the (height, width) it resizes to; 640x640 where the folder has none
    size = common.read_json(f).get("size", {}) if f.is_file() else {}
    h, w = size.get("height", INPUT_SIZE[0]), size.get("width", INPUT_SIZE[1])
    if h % 32 or w % 32:
        raise common.LoadError(f"{f} resizes to {h}x{w}; D-FINE needs multiples of 32")
    model.input_size, model.name_or_path, model.revision = (h, w), str(name_or_path), revision
    return model.eval()


def save_pretrained(model: DFine, folder: str | Path) -> None:
    """Write config.json (the backbone's fields nested under backbone_config), model.safetensors and
    preprocessor_config.json (the model's input size) to `folder`."""
    from safetensors.torch import save_file

    cfg, folder = model.cfg, Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {checkpoint_key(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    flat = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "id2label"}
    backbone = {k: flat.pop(k) for k in BACKBONE_FIELDS}
    backbone.update(model_type="hgnet_v2", out_features=[STAGE_NAMES[i] for i in backbone["out_indices"]],
                    hidden_sizes=backbone["stage_out_channels"])  # transformers takes the channels from these
    config = {"model_type": "d_fine", "architectures": ["DFineForObjectDetection"], **flat, "backbone_config": backbone,
              "id2label": {str(k): v for k, v in cfg.id2label.items()},
              "label2id": {v: k for k, v in cfg.id2label.items()}}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    h, w = model.input_size
    pre = {"image_processor_type": "RTDetrImageProcessor", "do_resize": True, "size": {"height": h, "width": w},
           "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": False, "do_pad": False}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")


DFine.from_pretrained = staticmethod(from_pretrained)  # methods of the model, beside the key map they use
DFine.save_pretrained = save_pretrained


# -----------------------------------------------------------------------------
# 11. Fast inference: an option applied to a loaded model, not the reference
#
# fast_inference(model) swaps conv blocks for FusedConv: batch norms folded into the conv (in float64, rounded once),
# with a ReLU and an affine s*x + c (s > 0) after it max(conv(x), c); RepVGG's 3x3 and 1x1 branches one 3x3 conv;
# convs channels-last. Other rounding: near-tied tokens may swap at the 300th place, hence not the default. Two more
# changes keep the bits and speed up the fast model's export in onnxruntime: the stem pool one MaxPool in the graph,
# and the sampling offsets laid out (x|y, head, point), so that every product broadcasts along a long last axis.


class FusedConv(nn.Module):
    """One conv with a bias, then the activation (and a learnable affine), or max(conv(x), floor)."""

    def __init__(self, conv: nn.Conv2d, act=None, floor: float | None = None, lab: nn.Module | None = None):
        super().__init__()
        self.conv, self.act, self.floor, self.lab = conv, act, floor, lab

    def forward(self, x):
        x = self.conv(x)
        if self.floor is not None:  # s * relu(y) + c = max(s*y + c, c) for s > 0: one pass instead of three
            return x.clamp_min(self.floor)
        x = self.act(x) if self.act is not None else x
        return self.lab(x) if self.lab is not None else x


def fold(conv: nn.Conv2d, bn: nn.Module, s=1.0, c=0.0) -> nn.Conv2d:
    """conv -> batch norm -> s*y + c as one float64 conv with a bias (cast to the model's dtype at the end)."""
    scale = bn.weight.double() * (bn.running_var.double() + bn.eps).rsqrt()  # (C,): gamma / sqrt(var + eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      groups=conv.groups, bias=True, dtype=torch.float64, device=conv.weight.device)
    fused.weight.copy_(conv.weight.double() * (scale * s)[:, None, None, None])
    fused.bias.copy_((bn.bias.double() - bn.running_mean.double() * scale) * s + c)
    return fused


class AxisFirstAttention(nn.Module):
    """DeformableAttention with sampling_offsets' rows reordered from (head, point, x|y) to (x|y, head, point): the
    same products in the same order, on (B, Q, 2, nH*P) instead of (B, Q, nH, P, 2) (onnxruntime broadcasts a last
    axis of 2 element pair by element pair, ~0.4 ms a product at D-FINE N's 300 queries)."""

    def __init__(self, m: DeformableAttention):
        super().__init__()
        self.heads, self.points, self.offset_scale = m.heads, m.points, m.offset_scale
        order = torch.arange(m.sampling_offsets.out_features).view(-1, 2).t().reshape(-1)  # (nH*P*2,): x rows first
        self.sampling_offsets = m.sampling_offsets  # reordered in place: fast_inference replaces m by this module
        for p in self.sampling_offsets.parameters():
            p.copy_(p[order])  # p[order] is a copy, so no row is read after it is written
        self.attention_weights = m.attention_weights
        self.register_buffer("num_points_scale", m.num_points_scale.repeat(m.heads))  # (nH*P,): 1/n_l per point

    def forward(self, query, ref, memory, spatial_shapes, backend="auto"):
        (B, Q, _), P = query.shape, sum(self.points)
        value = memory.reshape(B, memory.shape[1], self.heads, -1)  # (B, S, nH, hD)
        off = self.sampling_offsets(query).reshape(B, Q, 2, self.heads * P)  # (B, Q, 2, nH*P)
        w = F.softmax(self.attention_weights(query).reshape(B, Q, self.heads, P), dim=-1)  # (B, Q, nH, P)
        ref = ref.reshape(B, Q, 4, 1)  # (B, Q, 4, 1): cx, cy, w, h
        loc = ref[:, :, :2] + off * self.num_points_scale * ref[:, :, 2:] * self.offset_scale  # (B, Q, 2, nH*P)
        loc = loc.view(B, Q, 2, self.heads, P).permute(0, 1, 3, 4, 2)  # (B, Q, nH, P, 2)
        return common.ms_deform_attn(value, spatial_shapes, self.points, loc, w, backend), loc, w  # (B, Q, d)


class StemPool(torch.autograd.Function):
    """Embedder.pool: in torch its two maxima (torch's max_pool2d is 5-30x slower on CPU), in an ONNX graph one
    MaxPool(2, stride 1) (onnxruntime's is faster than two shifted slices and a Max each); the same maxima."""

    @staticmethod
    def forward(ctx, x):
        return Embedder.pool(x)  # (B, C, H-1, W-1)

    @staticmethod
    def symbolic(g, x):
        return g.op("MaxPool", x, kernel_shape_i=[2, 2], strides_i=[1, 1])


def fused(m: nn.Module) -> nn.Module | None:
    """The module that computes what m computes faster (a FusedConv for a conv block), or None."""
    if isinstance(m, DeformableAttention):
        return AxisFirstAttention(m)
    if isinstance(m, RepVggBlock):  # 3x3 + 1x1 = one 3x3 conv with the 1x1 kernel added at its centre
        conv, one = fold(m.conv1.conv, m.conv1.norm), fold(m.conv2.conv, m.conv2.norm)
        conv.weight[:, :, 1:2, 1:2] += one.weight
        conv.bias += one.bias
        return FusedConv(conv, m.act)
    if isinstance(m, ConvLayer) and m.lab is not None and m.act is F.relu and m.lab.scale.item() > 0:
        s, c = m.lab.scale.double(), m.lab.bias.double()
        return FusedConv(fold(m.convolution, m.normalization, s, c), floor=m.lab.bias.item())
    if isinstance(m, ConvLayer):
        return FusedConv(fold(m.convolution, m.normalization), m.act, lab=m.lab)
    if isinstance(m, ConvNorm):
        return FusedConv(fold(m.conv, m.norm), m.act)
    if isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[1], nn.BatchNorm2d):  # the input projections
        return FusedConv(fold(m[0], m[1]))
    return None


@torch.no_grad()
def fast_inference(model: DFine) -> DFine:
    """The loaded model, changed in place for speed (see above): for inference only, not bit-exact."""
    dtype = model.enc_score_head.weight.dtype
    for parent in list(model.modules()):  # parents before children: a RepVggBlock is replaced whole
        for name, child in list(parent.named_children()):
            if (f := fused(child)) is not None:
                setattr(parent, name, f)
    model.backbone.embedder.pool = StemPool.apply
    return model.to(dtype).to(memory_format=torch.channels_last).eval()  # channels-last weights: channels-last convs


# -----------------------------------------------------------------------------
# 12. ONNX export: the forward as a graph (pixel_values -> logits, pred_boxes), post-processing left outside
#
# Batch, height and width stay dynamic (multiples of 32, as forward requires) unless export_onnx is given image_size.
# common.OnnxModel runs the file and checks its inputs.


def export_onnx(model: DFine, path: str | Path, image_size: tuple[int, int] | None = None) -> None:
    """Write model's forward to an ONNX file. image_size = (height, width), multiples of 32, fixes the graph to that
    size; None leaves it dynamic (traced at 320x320). The trace computes anchors and position embeddings in the graph
    (per_size) and takes the readable attention (common.ms_deform_attn): the model is left as it was."""
    h, w = image_size or (320, 320)
    if h % 32 or w % 32:
        raise InputError(f"image_size must be multiples of 32, got {image_size}")
    weight = model.enc_score_head.weight
    example = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    dynamic = {"pixel_values": {0: "batch"} if image_size else {0: "batch", 2: "height", 3: "width"}}
    hint = f"Resize to {h}x{w}, or export again with image_size=None (any multiple of 32)."
    common.export_onnx(model, [example], path, ["pixel_values"], dynamic, {"model": getattr(model, "name_or_path", ""),
                       "model_type": "d-fine", "size_multiple": 32, "fixed": hint})


DFine.export_onnx = export_onnx  # a method of the model, defined here to keep the export in its own section


# -----------------------------------------------------------------------------
# 13. Command line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        return common.train_cli("Fine-tune D-FINE on a COCO dataset.", train, argv[1:])
    ap = common.cli_parser("D-FINE object detection (80 COCO or 366 Objects365 classes).",
                           "ustc-community/dfine-large-coco", 0.5)
    ap.add_argument("images", nargs="+", help="image files or http(s) URLs")
    ap.add_argument("--fast", action="store_true", help="fold batch norms, channels-last convs: not bit-exact")
    args = ap.parse_args(argv)
    common.check_cli_args(args)
    images = [common.load_image(p) for p in args.images]
    model = DFine.from_pretrained(args.model, args.revision, args.backend, getattr(torch, args.dtype))
    model = fast_inference(model) if args.fast else model
    results = model.detect(images, args.threshold, args.nms, args.top_k)
    rows = [common.detection_rows(r["names"], r["labels"], r["scores"], r["boxes"]) for r in results]
    if args.json:
        print(json.dumps([{"image": str(p), "detections": d} for p, d in zip(args.images, rows)], indent=1))
    else:
        for p, dets in zip(args.images, rows):
            for d in dets:
                print(f"{p}: {d['label']:<14} {d['score']:.3f}  {d['box']}")
            if not dets:
                print(f"{p}: no detection above {args.threshold}")

    def stages():
        pixels = preprocess(images[:1], model.input_size).to(model.enc_score_head.weight.dtype)
        with torch.inference_mode():
            return model(pixels, return_stages=True).stages, pixels

    common.write_cli_outputs(args, images[0], rows[0], stages, model.export_onnx)
    return 0


if __name__ == "__main__":
    common.run_cli(main)
