"""D-FINE training against transformers 5.23: every loss term, every gradient, the matcher, the denoising groups,
over-fitting one batch, bad labels, the original's pairing of outputs and the initial weights.

Our default loss is the original D-FINE's; transformers pairs the outputs otherwise (transformers_loss below). The
parity tests rebuild transformers' pairing from our outputs and require its terms and gradients.

Tolerances: loss terms 1e-5 and gradients 1e-4 (the project's bar), for both backends. Every op, and the order in
which autograd adds up a tensor's gradients, mirrors transformers, and the Numba backward rounds and adds as the
readable version's grid_sample backward and sum do (kernels.py), so what remains is a few float32 roundings.
"""
from __future__ import annotations

import time
from unittest import mock

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


def transformers_loss(model, q: dict, dec: dict, labels: list[dict], dn: dict | None):
    """transformers 5.23's D-FINE loss from our outputs (dfine.dfine_loss's arguments): it lists the outputs as
    [pre-box head with class head 0, layer 0, layer 1, ..] and pairs entry k's class and box with layer k's corners,
    so the last layer gets no FGL, the next-to-last layer's class and box no loss, and the pre-box head no term of its
    own; the encoder's proposals come as _aux_{L-1}."""
    n_dn, L = 0 if dn is None else dn["num"], len(dec["corners"])
    logits = [dec["scores"][0], *dec["layer_logits"]]  # L + 1 x (B, D + Q, K)
    boxes = [b.clamp(min=0, max=1) for b in [dec["initial_box"], *dec["boxes"]]]  # L + 1 x (B, D + Q, 4)

    def output(k: int, denoising: bool, corners: bool = True) -> dict:  # entry k, the D or the Q queries
        part = slice(0, n_dn) if denoising else slice(n_dn, None)
        o = {"logits": logits[k][:, part], "boxes": boxes[k][:, part]}
        return o | ({"corners": dec["corners"][k][:, part], "ref": dec["initial_box"].detach()[:, part]}
                    if corners else {})

    def teacher(denoising: bool) -> dict:
        part = slice(0, n_dn) if denoising else slice(n_dn, None)
        return {"corners": dec["corners"][-1][:, part], "logits": logits[-1][:, part]}

    losses = {}

    def add(suffix: str, o: dict, indices: list, num_boxes: float, teacher: dict | None = None) -> None:
        for k, v in dfine.set_losses(o, labels, indices, num_boxes, model, teacher).items():
            losses[k + suffix] = v * getattr(model.cfg, "weight_" + k)

    num_boxes = float(max(sum(len(t["class_labels"]) for t in labels), 1))
    o = output(L, False, corners=False)
    add("", o, dfine.match(o, labels, model.cfg), num_boxes)
    for k in range(L - 1):
        o = output(k, False)
        add(f"_aux_{k}", o, dfine.match(o, labels, model.cfg), num_boxes, teacher(False))
    topk = q["topk_indices"][..., None].expand(-1, -1, logits[0].shape[-1])  # (B, Q, K)
    o = {"logits": q["enc_outputs_class"].gather(1, topk), "boxes": q["init_reference_points"].sigmoid().clamp(0, 1)}
    add(f"_aux_{L - 1}", o, dfine.match(o, labels, model.cfg), num_boxes)
    if dn is not None:
        dn_indices = [(p, torch.arange(len(t["boxes"])).tile(dn["groups"])) for p, t in zip(dn["positive_idx"], labels)]
        for k in range(L):
            add(f"_dn_{k}", output(k, True), dn_indices, num_boxes * dn["groups"], teacher(True))
    return sum(losses.values()), losses


def run(model, px, labels, hf: bool = False, as_transformers: bool = False):
    """One training step's forward and backward -> (loss, loss_dict, {checkpoint-style name: gradient}); ours with
    transformers' pairing of outputs where as_transformers."""
    model.train()
    torch.manual_seed(SEED)
    with mock.patch.object(dfine, "dfine_loss", transformers_loss if as_transformers else dfine.dfine_loss):
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
    loss, terms, grads = run(model, px, labels, as_transformers=True)
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
        _, _, again = run(model, px, labels, as_transformers=True)
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


def test_default_loss_pairs_each_layer_as_the_original():
    """The default (the original's) against transformers' pairing of the same outputs: each class-and-box term is
    transformers' term one entry further on (the pre-box head's is its entry 0, the encoder's its _aux_{L-1}), bit
    for bit; the last layer gets FGL and the next-to-last layer's matched queries their class and box terms, which
    transformers gives neither."""
    px, labels = batch("n")
    ours, theirs = (run(dfine.DFine.from_pretrained(checkpoint("n")), px, labels, as_transformers=a)
                    for a in (False, True))
    (loss, terms, grads), (_, ref, ref_grads) = ours, theirs
    L = dfine.DFine.from_pretrained(checkpoint("n")).cfg.decoder_layers
    box, local = ["vfl", "bbox", "giou"], ["vfl", "bbox", "giou", "fgl", "ddf"]
    expected = [("", box + ["fgl"]), *((f"_aux_{k}", local) for k in range(L - 1)), ("_pre", box), ("_enc_0", box),
                *((f"_dn_{k}", local) for k in range(L)), ("_dn_pre", box)]
    assert list(terms) == [f"loss_{t}{s}" for s, ts in expected for t in ts]
    same = {"": "", "_pre": "_aux_0", "_enc_0": f"_aux_{L - 1}", "_dn_pre": "_dn_0",
            **{f"_aux_{k}": f"_aux_{k + 1}" for k in range(L - 2)},
            **{f"_dn_{k}": f"_dn_{k + 1}" for k in range(L - 1)}}  # ours -> transformers' term of the same output
    for a, b in same.items():  # the same outputs, the same terms
        for t in ("vfl", "bbox", "giou"):
            assert torch.equal(terms[f"loss_{t}{a}"], ref[f"loss_{t}{b}"]), (a, b, t)
    assert "loss_fgl" not in ref and terms["loss_fgl"] > 0 and torch.allclose(loss, sum(terms.values()))
    left_out = terms[f"loss_vfl_aux_{L - 2}"]  # the next-to-last layer's matched queries: no term in transformers
    assert not any(torch.equal(left_out, v) for v in ref.values())
    head = f"decoder.class_embed.{L - 2}.weight"  # in transformers only through the denoising queries
    assert not torch.equal(grads[head], ref_grads[head])


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


def test_fgl_targets_are_in_the_decoders_own_units():
    """FGL's target for a true edge, read back through the decoder's own W(n) and distance2bbox, is that edge: with
    the reg_scale the weights hold (8, as D-FINE X's file), not the config's (4, as its config.json)."""
    model = dfine.DFine(dfine.DFineConfig.from_dict(hub_config("dfine_n_coco")))
    model.decoder.reg_scale.fill_(8.0)
    g = torch.Generator().manual_seed(0)
    ref = torch.cat([0.3 + 0.4 * torch.rand(20, 2, generator=g), 0.2 + 0.3 * torch.rand(20, 2, generator=g)], 1)
    gt = dfine.center_to_corners(ref + 0.03 * torch.randn(20, 4, generator=g))  # (20, 4) xyxy, near each ref
    d, N = model.decoder, model.cfg.max_num_bins
    for reg_scale, exact in ((d.reg_scale, True), (torch.tensor([model.cfg.reg_scale]), False)):
        bins, w_right, w_left = dfine.edge_targets(ref, gt, N, reg_scale, d.up)
        edges, i = dfine.weighting_function(N, d.up, d.reg_scale), bins.long()
        dist = (w_left * edges[i] + w_right * edges[i + 1]).reshape(20, 4)  # the edge offsets the target means
        back = dfine.center_to_corners(dfine.distance2bbox(ref, dist, d.reg_scale))
        assert torch.allclose(back, gt, atol=1e-5) == exact
