"""D-FINE training against transformers 5.23: every loss term, every gradient, the matcher, the denoising groups,
over-fitting one batch, bad labels, the pre_outputs option and the initial weights.

Tolerances: loss terms 1e-5 and gradients 1e-4 (the project's bar), for both backends. Every op, and the order in
which autograd adds up a tensor's gradients, mirrors transformers, and the Numba backward rounds and adds as the
readable version's grid_sample backward and sum do (kernels.py), so what remains is a few float32 roundings.
"""
from __future__ import annotations

import time

import pytest
import torch

import common
import dfine
from conftest import hub_config
from dfine_reference import checkpoint, hf_model

SEED = 7  # the torch seed both models draw their denoising groups from


def batch(size: str):
    """Two images, 256x256 for N (320 tokens), 160x160 for L (525): the smallest sizes with 300 tokens to choose
    from. N gets one image without objects (it must train), L two with objects."""
    g = torch.Generator().manual_seed(3)
    px = torch.rand(2, 3, *([256, 256] if size == "n" else [160, 160]), generator=g)
    first = {"class_labels": torch.tensor([3, 17, 3]),
             "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.6, 0.5, 0.4], [0.5, 0.2, 0.1, 0.1]])}
    second = ({"class_labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} if size == "n" else
              {"class_labels": torch.tensor([42]), "boxes": torch.tensor([[0.5, 0.5, 0.8, 0.7]])})
    return px, [first, second]


def run(model, px, labels, hf: bool = False):
    """One training step's forward and backward -> (loss, loss_dict, {checkpoint-style name: gradient})."""
    model.train()
    torch.manual_seed(SEED)
    out = model(pixel_values=px, labels=labels) if hf else model(px, labels=labels)
    out.loss.backward()
    grads = {(dfine.key_map(n) if hf else n): p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), {k: v.detach() for k, v in out.loss_dict.items()}, grads


_reference = {}


def reference(size: str):
    if size not in _reference:
        px, labels = batch(size)
        _reference[size] = run(hf_model(checkpoint(size)), px, labels, hf=True)
    return _reference[size]


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("size", ["n", "l"])
def test_loss_and_gradients_match_transformers(size, backend):
    ref_loss, ref_terms, ref_grads = reference(size)
    px, labels = batch(size)
    t = time.perf_counter()
    model = dfine.DFine.from_pretrained(checkpoint(size), backend=backend)
    loss, terms, grads = run(model, px, labels)
    print(f"\n{size} {backend}: forward + backward {time.perf_counter() - t:.2f} s")
    assert list(terms) == list(ref_terms), "loss terms differ in name or order"
    assert any(k.endswith("_dn_0") for k in terms) and "loss_ddf_aux_0" in terms  # denoising and GO-LSD are on
    worst = max((terms[k] - ref_terms[k]).abs().item() for k in terms)
    print(f"  loss {loss.item():.6f} vs {ref_loss.item():.6f}; worst of {len(terms)} terms {worst:.2e}")
    assert (loss - ref_loss).abs().item() <= 1e-5
    assert worst <= 1e-5, {k: (terms[k].item(), ref_terms[k].item()) for k in terms}
    # transformers' from_pretrained turns reg_scale and up into trainable parameters (built with requires_grad=False);
    # the original keeps them fixed, and so do we (buffers)
    assert set(ref_grads) - set(grads) == {"decoder.reg_scale", "decoder.up"} and set(grads) <= set(ref_grads)
    diff = {k: (grads[k] - ref_grads[k]).abs().max().item() for k in grads}
    scale = {k: ref_grads[k].abs().max().item() for k in grads}
    name = max(diff, key=diff.get)
    rel = max(diff[k] / scale[k] for k in grads if scale[k] > 1e-3)  # relative to the tensor's largest gradient
    tensors = max(d for k, d in diff.items() if grads[k].numel() > 1)
    print(f"  gradients of {len(grads)} tensors: max abs {diff[name]:.2e} ({name}), {tensors:.2e} over tensors of more "
          f"than one number, max rel {rel:.2e}")
    bad = {k: d for k, d in diff.items() if d > 1e-4}
    assert not bad, bad
    if backend == "numba" and size == "n":  # the Numba backward is deterministic: the same bits twice
        first = {k: v.clone() for k, v in grads.items()}
        model.zero_grad()
        _, _, again = run(model, px, labels)
        assert all(torch.equal(first[k], again[k]) for k in first)


def test_denoising_groups_match_transformers():
    from transformers.models.d_fine.modeling_d_fine import get_contrastive_denoising_training_group

    model = dfine.DFine.from_pretrained(checkpoint("n"))
    _, labels = batch("l")
    torch.manual_seed(SEED)
    ours = dfine.denoising_queries(model, labels)
    torch.manual_seed(SEED)
    queries, boxes, mask, meta = get_contrastive_denoising_training_group(
        labels, 80, 300, model.denoising_class_embed, num_denoising_queries=100, label_noise_ratio=0.5,
        box_noise_scale=1.0)
    assert torch.equal(ours["queries"], queries) and torch.equal(ours["boxes_unact"], boxes)
    assert torch.equal(ours["attn_mask"], mask) and ours["groups"] == meta["dn_num_group"]
    assert all(torch.equal(a, b) for a, b in zip(ours["positive_idx"], meta["dn_positive_idx"]))


def test_matcher_matches_transformers_with_nan_and_inf():
    from types import SimpleNamespace

    from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher

    cfg = dfine.DFineConfig()
    hf = RTDetrHungarianMatcher(SimpleNamespace(matcher_class_cost=2.0, matcher_bbox_cost=5.0, matcher_giou_cost=2.0,
                                                use_focal_loss=True, matcher_alpha=0.25, matcher_gamma=2.0))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, 80, generator=g)
    boxes = torch.rand(3, 40, 4, generator=g) * 0.5 + 0.1
    labels = [{"class_labels": torch.randint(0, 80, (n,), generator=g), "boxes": torch.rand(n, 4, generator=g) * 0.5
               + 0.1} for n in (5, 0, 12)]
    for poison in (None, float("nan"), float("inf"), -float("inf")):
        if poison is not None:  # a diverged query: its cost turns NaN or inf, and it must be matched last
            logits[0, :3] = poison
            logits[2, 5] = poison
        ours = dfine.match({"logits": logits, "boxes": boxes}, labels, cfg)
        theirs = hf({"logits": logits, "pred_boxes": boxes}, labels)
        for (q, o), (hq, ho) in zip(ours, theirs):
            assert torch.equal(q, hq) and torch.equal(o, ho)
    cost = torch.tensor([[[float("nan"), 0.0], [float("inf"), 1.0], [5.0, -float("inf")]]])  # (1, 3 queries, 2)
    (q, o), = common.hungarian_match(cost, [2])
    assert q.tolist() == [0, 2] and o.tolist() == [1, 0]  # the finite pairs win; a NaN one fills what is left


def test_overfits_one_batch():
    """A few AdamW steps with D-FINE's clipping on one fixed batch must lower the loss clearly."""
    torch.manual_seed(0)
    px, labels = batch("n")[0], batch("l")[1]
    model = dfine.DFine.from_pretrained(checkpoint("n")).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=1e-4)
    losses = []
    for _ in range(4):
        loss = model(px, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
        opt.step()
        losses.append(loss.item())
    print("\nlosses", [round(v, 2) for v in losses])
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("labels, message", [
    ([{"class_labels": torch.tensor([80]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}],
     "image 1, box 0: class id 80"),
    ([{"class_labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 1.2, 0.2, 0.2]])}],
     "image 1, box 1"),
    ([{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.0, 0.2]])}], "image 1, box 0"),
    ([{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2]])}], "labels\\[1\\]\\['boxes'\\]"),
    ([{"class_labels": torch.tensor([1.0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}], "integer"),
    ([{"labels": torch.tensor([1])}], "labels\\[1\\] must be a dict"),
    ([], "one dict per image \\(2\\), got 1"),
])
def test_bad_labels_name_image_and_box(labels, message):
    model = dfine.DFine(dfine.DFineConfig.from_dict(hub_config("dfine_n_coco"))).train()
    good = {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    with pytest.raises(common.InputError, match=message):
        model(torch.rand(2, 3, 256, 256), labels=[good, *labels])


def test_pre_outputs_option_adds_its_terms_and_nothing_else():
    """use_pre_outputs_loss adds the original's terms on the pre-box head (matched queries and denoising queries);
    every other term stays as it was, and so do the gradients of everything the pre-box head does not depend on."""
    px, labels = batch("n")
    base = dfine.DFine.from_pretrained(checkpoint("n"))
    _, terms, grads = run(base, px, labels)
    extra = dfine.DFine.from_pretrained(checkpoint("n"))
    extra.cfg.use_pre_outputs_loss = True
    loss, extra_terms, extra_grads = run(extra, px, labels)
    added = [k for k in extra_terms if k not in terms]
    assert added == ["loss_vfl_pre", "loss_bbox_pre", "loss_giou_pre", "loss_vfl_dn_pre", "loss_bbox_dn_pre",
                     "loss_giou_dn_pre"]
    assert all(torch.equal(terms[k], extra_terms[k]) for k in terms)
    assert torch.allclose(loss, sum(extra_terms.values()))
    downstream = ("decoder.layers.1.", "decoder.layers.2.", "decoder.bbox_embed.", "decoder.lqe_layers.",
                  "decoder.class_embed.1.", "decoder.class_embed.2.", "enc_")
    for k in grads:
        if k.startswith(downstream):
            assert torch.equal(grads[k], extra_grads[k]), k
    for k in ("decoder.pre_bbox_head.layers.2.weight", "decoder.class_embed.0.weight",
              "decoder.layers.0.fc1.weight", "backbone.embedder.stem1.convolution.weight"):
        assert not torch.equal(grads[k], extra_grads[k]), k


def test_model_from_config_starts_at_the_prior():
    """Built from a config alone: class scores start near the prior probability 0.01 (no query is sure of anything),
    boxes at the anchors, and training runs."""
    torch.manual_seed(0)
    model = dfine.DFine(dfine.DFineConfig.from_dict(hub_config("dfine_n_coco"))).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 256, 256), return_stages=True)
    prob = out.logits.sigmoid()
    assert 0.005 < prob.mean().item() < 0.02 and prob.max().item() < 0.2, (prob.mean(), prob.max())
    enc = out.stages["enc_outputs_class"].sigmoid()
    assert 0.005 < enc.mean().item() < 0.02
    px, labels = batch("n")
    assert torch.isfinite(model.train()(px, labels=labels).loss)
