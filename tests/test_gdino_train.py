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
from common import InputError, load_image

LOSS_ATOL = 1e-5  # the contract for every loss term (fp32 sums over ~10^5 focal terms)
GRAD_ATOL = 1e-4  # the contract for every parameter's gradient
SIZE = (192, 256)  # (h, w): small inputs, yet 1020 image tokens, enough for the real config's 900 queries
PROMPT = "a cat. a remote control. a couch."  # three phrases, the second of two words
NO_DROPOUT = {"dropout": 0.0, "fusion_droppath": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
              "fusion_dropout": 0.0, "text_enhancer_dropout": 0.0, "auxiliary_loss": True}


def parity_config(cfg: dict) -> dict:
    cfg = {**cfg, **NO_DROPOUT}
    cfg["text_config"] = {**cfg.get("text_config", {}), "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    cfg["backbone_config"] = {**cfg["backbone_config"], "drop_path_rate": 0.0}
    return cfg


def pixels(names, size=None) -> dict:
    """Photos resized to exactly `size`, so a batch has no padding (padding changes a padded image's outputs)."""
    size = size or SIZE
    imgs = [load_image(DATA / n).resize(size[::-1], Image.BILINEAR) for n in names]
    pv, pm, _ = gdino.preprocess_images(imgs, shortest=min(size), longest=max(size))
    return {"pixel_values": pv, "pixel_mask": pm}


def inputs(tok, names, prompts, size=None) -> dict:
    return {**pixels(names, size), **gdino.tokenize(tok, [gdino.normalize_prompt(p) for p in prompts])}


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
    diff and the max relative one (diff / the tensor's largest reference gradient)."""
    key_map, params = gdino.key_map_for(ours.cfg), dict(ours.named_parameters())
    worst_abs = worst_rel = 0.0
    n, worst = 0, ""
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
        assert d <= GRAD_ATOL, f"{mine}: gradient max abs diff {d:.3g} (largest gradient {scale:.3g})"
        worst_abs = max(worst_abs, d)
        if scale > 1e-6:  # key biases: zero in exact arithmetic (softmax ignores them), rounding noise here
            worst, worst_rel = (mine, d / scale) if d / scale > worst_rel else (worst, worst_rel)
        n += 1
    assert n > 100, f"only {n} gradients compared"
    print(f"{n} gradients: max abs diff {worst_abs:.3g}, max relative {worst_rel:.3g} ({worst})")
    return worst_abs, worst_rel


def at_prior(ours, hf) -> None:
    """Start both models' class scores at the 0.01 prior, as gdino.init_weights does from scratch (the same values
    copied into transformers'). Random weights otherwise saturate every class logit: a loss of ~6000 and gradients
    of ~1e4, where fp32 rounding alone (the Numba backward sums in another order than grid_sample's) exceeds 1e-4."""
    gdino.class_prior(ours)
    params, key_map = dict(ours.named_parameters()), gdino.key_map_for(ours.cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if key_map(name) is not None:
                p.copy_(params[key_map(name)])


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
    at_prior(ours, hf)
    return ours, hf


# -----------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("which,batch,backend", [("tiny", 1, "auto"), ("small", 1, "torch"), ("small", 2, "auto"),
                                               ("mm", 2, "auto")])
def test_parity(which, batch, backend, tok, request):
    """loss and every loss_dict term within 1e-5, every gradient within 1e-4, in train mode. tiny = the real
    grounding-dino-tiny config (batch 1 only: a batch of 2 takes a minute on 2 cores), small = the same shrunk
    (tests/gdino_reference.small_config: same levels, points, text length, head sharing), mm = MM tiny shrunk;
    backend "auto" is the Numba kernel on x86, "torch" the readable grid_sample version."""
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
    compare_gradients(ours, hf)


# -----------------------------------------------------------------------------
# where we follow the paper rather than transformers


def test_batch_of_three_prompts_matches_images_one_by_one(tok, small_folder):
    """Three images, three prompts of 2, 4 and 1 phrases: the batch's terms are the per-image sums over the batch's
    box count. transformers offsets image i's class ids by its own phrase count (here: an IndexError, or with
    other counts another image's phrases). Tolerance: batching changes GEMM shapes and the fusion's global max,
    rounding-level changes of the logits that the sums over the queries carry."""
    model = gdino.GroundingDino.from_pretrained(small_folder).train()
    prompts = ["a cat. a couch.", "a remote control. a cat. a blanket. a dog.", "a cup."]
    counts = [2, 3, 1]
    labels = random_labels(counts, [2, 4, 1], seed=3)
    labels[1]["class_labels"] = torch.tensor([3, 2, 0])  # phrases beyond the first image's two
    with torch.no_grad():
        batched = ours_forward(model, inputs(tok, PHOTOS, prompts), labels).loss_dict
        alone = [ours_forward(model, inputs(tok, [img], [p]), [lab]).loss_dict
                 for img, p, lab in zip(PHOTOS, prompts, labels)]
    for k, v in batched.items():
        if k.startswith("loss_"):
            expected = sum(a[k] * n for a, n in zip(alone, counts)) / sum(counts)
            torch.testing.assert_close(v, expected, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_encoder_proposals_get_gradients(tok, small_folder):
    """The encoder term trains the proposal head (enc_output, enc_output_norm, encoder_output_bbox_embed); with
    transformers' own loss those parameters get no gradient at all."""
    ours, hf = load_pair(small_folder)
    x = inputs(tok, PHOTOS[:1], [PROMPT])
    labels = random_labels([3], [3])
    ours_forward(ours, x, labels).loss.backward()
    hf(**x, labels=labels).loss.backward()
    for name in ["enc_output", "enc_output_norm", "encoder_output_bbox_embed"]:
        for pname, p in getattr(ours, name).named_parameters():
            assert p.grad is not None and p.grad.abs().max() > 0, f"{name}.{pname}: no gradient"
        for pname, p in getattr(hf.model, name).named_parameters():
            assert p.grad is None or not p.grad.any(), f"transformers' {name}.{pname} now gets a gradient"


# -----------------------------------------------------------------------------
# from scratch, training, bad labels


@pytest.mark.parametrize("name", ["grounding-dino-tiny", "mm_grounding_dino_tiny_o365v1_goldg"])
def test_initial_scores_sit_near_the_prior(name, tok):
    """A model built from its config alone starts with class probabilities near 0.01 and a small class loss
    (transformers' fresh model: logits of std ~10, class loss ~1400)."""
    model = gdino.GroundingDino(gdino.GroundingDinoConfig.from_dict(R.small_config(name))).eval()
    model.tokenizer = tok
    x = inputs(tok, PHOTOS[:2], [PROMPT] * 2)
    with torch.no_grad():
        out = model(x["pixel_values"], x["input_ids"], x["attention_mask"], labels=random_labels([4, 2], [3, 3]),
                    return_stages=True)
    for logits in (out.logits, out.stages["enc_outputs_class"]):  # the decoder's and the encoder proposals'
        z = logits[torch.isfinite(logits)]
        p = z.sigmoid()
        assert 0.003 < p.mean() < 0.03 and torch.quantile(p, 0.99) < 0.2, (p.mean(), z.std())
    assert out.loss_dict["loss_ce"] < 10 and out.loss_dict["loss_ce_enc"] < 10, out.loss_dict


DROPOUTS = {"Swin drop path": ("backbone_config", "drop_path_rate"), "BERT": ("text_config", "hidden_dropout_prob"),
            "BERT attention": ("text_config", "attention_probs_dropout_prob"),
            "fusion drop path": ("", "fusion_droppath"), "fusion attention": ("", "fusion_dropout"),
            "text enhancer": ("", "text_enhancer_dropout"), "encoder/decoder": ("", "dropout"),
            "activation": ("", "activation_dropout"), "attention": ("", "attention_dropout")}


def test_dropout_acts_in_train_mode_only(tok):
    """Every probability at 0.5: each reaches its module; two train-mode forwards differ; in eval the model equals
    one built with them all 0 (same weights)."""
    x = inputs(tok, PHOTOS[:2], [PROMPT] * 2, size=(128, 160))
    outs, models = {}, {}
    for p in (0.5, 0.0):
        cfg = parity_config(R.small_config())
        for sub, key in DROPOUTS.values():
            (cfg[sub] if sub else cfg)[key] = p
        torch.manual_seed(0)  # the same weights for both
        model = models[p] = gdino.GroundingDino(gdino.GroundingDinoConfig.from_dict(cfg))
        model.tokenizer = tok
        with torch.no_grad():
            model.train()
            outs[p] = [model(x["pixel_values"], x["input_ids"], x["attention_mask"]).logits for _ in range(2)]
            model.eval()
            outs[p].append(model(x["pixel_values"], x["input_ids"], x["attention_mask"]).logits)
    m = models[0.5]
    blocks = [b for st in m.backbone.stages for b in st.blocks]
    bert, layer, dec = m.text_backbone, m.encoder.layers[0], m.decoder.layers[0]
    fusion, text, deformable = layer.fusion_layer, layer.text_enhancer_layer, layer.deformable_layer
    assert blocks[0].drop_path.p == 0.0 and blocks[-1].drop_path.p == 0.5  # stochastic depth rises over the blocks
    assert bert.dropout.p == bert.layers[0].dropout.p == bert.layers[0].attention_dropout == 0.5
    assert fusion.drop_path.p == fusion.attn.dropout.p == text.dropout.p == 0.5
    assert deformable.dropout.p == deformable.activation_dropout.p == dec.dropout.p == dec.activation_dropout.p == 0.5
    assert dec.self_attn.dropout.p == dec.encoder_attn_text.dropout.p == text.self_attn.dropout.p == 0.5
    # and no dropout module is left at another rate (the Swin blocks' drop paths rise from 0 by design)
    rates = {mod.p for name, mod in m.named_modules() if isinstance(mod, (torch.nn.Dropout, gdino.DropPath))
             and not name.startswith("backbone.")}
    assert rates == {0.5}, rates
    a, b, ev = outs[0.5]
    fin = torch.isfinite(a)
    assert not torch.equal(a[fin], b[fin]), "no effect in train mode"
    assert torch.equal(outs[0.0][0], outs[0.0][1]), "train mode without dropout is deterministic"
    assert torch.equal(ev, outs[0.0][2]), "dropout acts in eval mode"


def test_a_few_steps_overfit_one_batch(tok):
    """AdamW on one fixed batch (small config from scratch): the loss falls clearly within a few steps."""
    cfg = gdino.GroundingDinoConfig.from_dict(parity_config(R.small_config()))
    model = gdino.GroundingDino(cfg).train()
    model.tokenizer = tok
    x = inputs(tok, PHOTOS[:2], [PROMPT] * 2, size=(128, 160))
    labels = random_labels([3, 2], [3, 3])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-4)
    losses = []
    for _ in range(8):
        loss = ours_forward(model, x, labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        losses.append(loss.item())
    print([round(v, 3) for v in losses])
    assert losses[-1] < 0.7 * losses[0], losses


def test_bad_labels_are_refused_with_the_image_and_box(tok):
    model = gdino.GroundingDino(gdino.GroundingDinoConfig.from_dict(R.small_config())).train()
    model.tokenizer = tok
    x = inputs(tok, PHOTOS[:2], ["a cat. a couch.", PROMPT])
    good = random_labels([2, 2], [2, 3])
    cases = {
        "one dict per image": good[:1],
        "image 0's prompt has 2 phrases": [{**good[0], "class_labels": torch.tensor([0, 2])}, good[1]],
        "image 1, box 1": [good[0], {**good[1], "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 1.2, 0.1, 0.1]])}],
        "w, h > 0": [good[0], {**good[1], "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.0], [0.5, 0.5, 0.1, 0.1]])}],
        "class id -1": [{**good[0], "class_labels": torch.tensor([0, -1])}, good[1]],
    }
    for expected, labels in cases.items():
        with pytest.raises(InputError, match=expected):
            ours_forward(model, x, labels)
    empty = [{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}, good[1]]
    loss = ours_forward(model, x, empty).loss  # an image without objects trains: all its queries are negatives
    loss.backward()
    assert torch.isfinite(loss)
