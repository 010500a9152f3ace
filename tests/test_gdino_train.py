"""gdino.py training (section 12) against transformers 5.23: loss terms, gradients, and the two places we differ.

Parity runs in train mode with every dropout and drop-path probability set to 0 in the config (the Hub configs train
with 0.1 in BERT, Swin, the fusion and the encoder/decoder), and with auxiliary_loss on. transformers' two bugs are
not compared against transformers: its encoder term is replaced by the corrected one, built from its own outputs
and its own criterion (test_parity), and the batch of 3 with different prompts is checked image by image.
"""
from __future__ import annotations

import gdino_reference as R
import pytest
import torch
from conftest import DATA, PHOTOS, hub_config
from PIL import Image

import gdino
from common import InputError, load_image  # noqa: F401

LOSS_ATOL = 1e-5  # the contract for every loss term (fp32 sums over ~10^5 focal terms)
GRAD_ATOL = 1e-4  # the contract for every parameter's gradient
SIZE = (256, 320)  # (h, w): small inputs keep the real-config tests fast
PROMPT = "a cat. a remote control. a couch."  # three phrases, the second of two words
NO_DROPOUT = {"dropout": 0.0, "fusion_droppath": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
              "fusion_dropout": 0.0, "text_enhancer_dropout": 0.0, "auxiliary_loss": True}


def parity_config(cfg: dict) -> dict:
    cfg = {**cfg, **NO_DROPOUT}
    cfg["text_config"] = {**cfg.get("text_config", {}), "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    cfg["backbone_config"] = {**cfg["backbone_config"], "drop_path_rate": 0.0}
    return cfg


def pixels(names, size=SIZE) -> dict:
    """Photos resized to exactly `size`, so a batch has no padding (padding changes a padded image's outputs)."""
    imgs = [load_image(DATA / n).resize(size[::-1], Image.BILINEAR) for n in names]
    pv, pm, _ = gdino.preprocess_images(imgs, shortest=min(size), longest=max(size))
    return {"pixel_values": pv, "pixel_mask": pm}


def inputs(tok, names, prompts) -> dict:
    return {**pixels(names), **gdino.tokenize(tok, [gdino.normalize_prompt(p) for p in prompts])}


def random_labels(counts, n_phrases, seed=1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, k in zip(counts, n_phrases):
        cxcy = 0.25 + 0.5 * torch.rand(n, 2, generator=g)
        wh = 0.05 + 0.35 * torch.rand(n, 2, generator=g)
        out.append({"class_labels": torch.randint(0, k, (n,), generator=g), "boxes": torch.cat([cxcy, wh], 1)})
    return out


def ours_forward(model, x, labels):
    return model(x["pixel_values"], x["input_ids"], x["attention_mask"], x["token_type_ids"], x["pixel_mask"],
                 labels=labels)


def reference_loss(hf, x, labels) -> dict:
    """transformers' loss_dict with its encoder term replaced by the paper's (top-Q proposals, undetached boxes),
    computed by transformers' own criterion on transformers' own encoder outputs; returns terms and the total."""
    from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher, GroundingDinoImageLoss
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps, build_text_mask

    out = hf(**x, labels=[dict(t) for t in labels])
    c = hf.config
    crit = GroundingDinoImageLoss(GroundingDinoHungarianMatcher(class_cost=c.class_cost, bbox_cost=c.bbox_cost,
                                                                giou_cost=c.giou_cost), c.focal_alpha,
                                  ["labels", "boxes", "cardinality"])
    topk = torch.topk(out.enc_outputs_class.max(-1)[0], c.num_queries, dim=1)[1][..., None]
    enc = {"logits": torch.gather(out.enc_outputs_class, 1, topk.expand(-1, -1, out.logits.shape[-1])),
           "pred_boxes": torch.gather(out.enc_outputs_coord_logits, 1, topk.expand(-1, -1, 4)).sigmoid(),
           "label_maps": build_label_maps(out.logits, x["input_ids"]),
           "text_mask": build_text_mask(out.logits, x["attention_mask"])}
    terms = {k: v for k, v in out.loss_dict.items() if not k.endswith("_enc")}
    terms.update({k + "_enc": v for k, v in crit(enc, labels).items()})
    weight = {"loss_ce": 2.0, "loss_bbox": c.bbox_loss_coefficient, "loss_giou": c.giou_loss_coefficient}
    loss = sum(v * weight["_".join(k.split("_")[:2])] for k, v in terms.items() if k.startswith("loss_"))
    return terms, loss


def compare_gradients(ours, hf) -> tuple[float, float]:
    """Every transformers parameter's gradient against ours (through the checkpoint key map). Returns the max abs
    diff and the max relative one (diff / the tensor's largest reference gradient).

    Tolerance: GRAD_ATOL times the tensor's largest gradient where that exceeds 1. The Numba backward sums each
    value's gradient in another order than grid_sample's backward, a difference of ~1e-7 of the gradient itself;
    random weights give gradients up to ~1e4 (hundreds of queries score every token), where fp32 rounding alone
    passes 1e-4 in absolute terms."""
    key_map, params = gdino.key_map_for(ours.cfg), dict(ours.named_parameters())
    worst_abs = worst_rel = 0.0
    n = 0
    for name, p in hf.named_parameters():
        mine = key_map(name)
        if mine is None:
            continue
        g, r = params[mine].grad, p.grad
        if r is None:
            assert g is None or not g.any(), f"{mine}: we have a gradient, transformers has none"
            continue
        assert g is not None, f"{mine}: transformers has a gradient, we have none"
        d, scale = (g - r).abs().max().item(), r.abs().max().item()
        assert d <= GRAD_ATOL * max(1.0, scale), f"{mine}: gradient max abs diff {d:.3g} (largest {scale:.3g})"
        worst_abs = max(worst_abs, d)
        if scale > 1e-6:  # key biases: zero in exact arithmetic (softmax ignores them), rounding noise here
            worst_rel = max(worst_rel, d / scale)
        n += 1
    assert n > 100, f"only {n} gradients compared"
    return worst_abs, worst_rel


def temper(ours, hf, factor: float = 0.03) -> None:
    """Shrink the decoder's and the encoder proposals' output norms in both models alike: random weights
    otherwise saturate every class logit (a loss of ~6000), far from any model that is being trained."""
    with torch.no_grad():
        for m in (ours.decoder.layer_norm, ours.enc_output_norm, hf.model.decoder.layer_norm, hf.model.enc_output_norm):
            m.weight.mul_(factor)
            m.bias.mul_(factor)


# -----------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tok():
    return gdino.load_tokenizer(R.TOKENIZER_DIR)


@pytest.fixture(scope="module")
def tiny_folder():
    return R.checkpoint("gdino-tiny-train", parity_config(hub_config("grounding-dino-tiny")))


@pytest.fixture(scope="module")
def mm_folder():
    return R.checkpoint("gdino-mm-small-train", parity_config(R.small_config("mm_grounding_dino_tiny_o365v1_goldg")))


@pytest.fixture(scope="module")
def small_folder():
    return R.checkpoint("gdino-small-train", parity_config(R.small_config()))


def load_pair(folder, backend="auto"):
    ours = gdino.GroundingDino.from_pretrained(folder, backend=backend).train()
    hf = R.load(folder).train()
    temper(ours, hf)
    return ours, hf


# -----------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("which,batch,backend", [("small", 1, "auto"), ("small", 2, "auto"), ("small", 2, "torch"),
                                               ("tiny", 2, "auto"), ("mm", 2, "auto")])
def test_parity(which, batch, backend, tok, request):
    """loss and every loss_dict term within 1e-5, every gradient within 1e-4, in train mode; small = the tiny config
    shrunk (tests/gdino_reference.small_config), tiny = the real grounding-dino-tiny config, mm = MM tiny shrunk."""
    ours, hf = load_pair(request.getfixturevalue(f"{which}_folder"), backend)
    x = inputs(tok, PHOTOS[:batch], [PROMPT] * batch)
    labels = random_labels([4, 2][:batch], [3] * batch)
    out = ours_forward(ours, x, labels)
    terms, ref_loss = reference_loss(hf, x, labels)
    assert list(out.loss_dict) == list(terms), "loss_dict keys or their order differ"
    diffs = {k: abs(out.loss_dict[k].item() - v.item()) for k, v in terms.items()}
    print({k: f"{v:.2g}" for k, v in diffs.items()}, "loss", ref_loss.item(), abs(out.loss.item() - ref_loss.item()))
    assert max(diffs.values()) <= LOSS_ATOL, diffs
    assert abs(out.loss.item() - ref_loss.item()) <= LOSS_ATOL
    out.loss.backward()
    ref_loss.backward()
    print("gradients: max abs %.3g, max relative %.3g" % compare_gradients(ours, hf))
