"""Inference options (issue 15): image size, encode once / query many, bf16 and fp16, optional NMS and top-k.

Each option keeps the default path as it was (transformers' bits); each test checks the option against transformers
or against our own default run. Small checkpoints and inputs: the whole file runs in a couple of minutes on 2 cores.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gdino_reference as R
import numpy as np
import pytest
import torch
from conftest import DATA, PHOTOS
from dfine_reference import checkpoint as dfine_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import common
import dfine
import gdino
from common import InputError

CATS = DATA / "coco_000000039769.png"
PROMPT = "a cat. a remote control."
PROMPTS = {PHOTOS[0]: PROMPT, PHOTOS[1]: "a cat. a wall?", PHOTOS[2]: "a cup. a spoon. coffee?"}
SMALL_SIZE = {"shortest_edge": 320, "longest_edge": 533}  # the small checkpoint's preprocessor (as test_gdino.py)
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def small_folder():
    return R.checkpoint("gdino-small", R.small_config(), temper=True, size=SMALL_SIZE)


@pytest.fixture(scope="module")
def small(small_folder):
    return gdino.GroundingDino.from_pretrained(small_folder)


@pytest.fixture(scope="module")
def proc():
    return R.processor()


def assert_same_detections(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]), k


def calls(module: torch.nn.Module) -> list:
    """A list that grows by one at each forward of `module`."""
    seen = []
    module.register_forward_hook(lambda *_: seen.append(1))
    return seen


# -----------------------------------------------------------------------------
# 1. Image size


def test_size_matches_the_processor_at_that_size(small_folder, small, proc):
    """detect(size=(s, l)) = transformers' processor with size={"shortest_edge": s, "longest_edge": l} + model +
    post-processing, at a size other than the checkpoint's (and so another input shape)."""
    ref = R.load(small_folder)
    size = (256, 400)
    img = Image.open(CATS).convert("RGB")
    inputs = proc(images=img, text=PROMPT, size={"shortest_edge": size[0], "longest_edge": size[1]},
                  return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (256, 341)  # not the checkpoint's 320 x 426
    assert small.encode_image(img, size).pixel_values.shape == inputs["pixel_values"].shape
    with torch.no_grad():
        out = ref(**inputs)
    want = proc.post_process_grounded_object_detection(out, inputs["input_ids"], threshold=0.6, text_threshold=0.6,
                                                       target_sizes=[img.size[::-1]])[0]
    got = small.detect(img, PROMPT, threshold=0.6, text_threshold=0.6, size=size)
    assert len(want["scores"]) > 0
    assert torch.equal(got["scores"], want["scores"]) and torch.equal(got["boxes"], want["boxes"])
    assert got["labels"] == want["text_labels"]


@pytest.mark.parametrize("size", [(800,), (0, 800), (400.0, 800), "800x1333", (16, 800)])
def test_bad_sizes_are_refused(small, size):
    with pytest.raises(InputError, match="size must be"):
        small.detect(CATS, PROMPT, size=size)


# -----------------------------------------------------------------------------
# 2. Encode once, query many


def test_one_image_many_prompts_is_bit_identical(small):
    prompts = [PROMPT, ["a remote", "a sofa", "a blanket"]]
    backbone, bert = calls(small.backbone), calls(small.text_backbone)
    image = small.encode_image(CATS)
    reused = [small.detect(image, p, threshold=0.5, text_threshold=0.5) for p in prompts]
    assert (len(backbone), len(bert)) == (1, 2)  # the backbone ran once for both prompts
    for p, r in zip(prompts, reused):
        assert_same_detections(r, small.detect(CATS, p, threshold=0.5, text_threshold=0.5))
    assert sum(len(r["scores"]) for r in reused) > 0
    with pytest.raises(InputError, match="encoded at size"):
        small.detect(image, PROMPT, size=(256, 400))


def test_one_prompt_many_images_is_bit_identical(small):
    images = [DATA / p for p in PHOTOS[:2]]
    backbone, bert = calls(small.backbone), calls(small.text_backbone)
    prompt = small.encode_prompt(PROMPT)
    reused = small.detect(images, prompt, threshold=0.5, text_threshold=0.5)
    assert (len(backbone), len(bert)) == (2, 1)
    shared = small.detect(images, PROMPT, threshold=0.5, text_threshold=0.5)  # detect shares one prompt by itself
    assert (len(backbone), len(bert)) == (4, 2)
    for img, r, s in zip(images, reused, shared):
        alone = small.detect(img, PROMPT, threshold=0.5, text_threshold=0.5)
        assert_same_detections(r, alone)
        assert_same_detections(s, alone)
    assert sum(len(r["scores"]) for r in reused) > 0


# -----------------------------------------------------------------------------
# 3. bf16 / fp16
#
# transformers samples the deformable attention in the half dtype with grid_sample, and torch's CPU grid_sample in
# bfloat16 returns non-finite values for locations inside the map (on these very checkpoints transformers' bf16
# outputs are all NaN). We sample in float32 (common.ms_deform_attn), so the reference gets the same float32
# sampling here; everything else is transformers' own code in the half dtype.


def float32_sampling(model: torch.nn.Module) -> None:
    """Make a transformers model sample its deformable attention in float32, as ours does in bf16/fp16."""
    from transformers.models.d_fine import modeling_d_fine as D
    from transformers.models.grounding_dino import modeling_grounding_dino as G
    from transformers.models.mm_grounding_dino import modeling_mm_grounding_dino as MM

    for m in model.modules():
        if isinstance(m, (G.MultiScaleDeformableAttention, MM.MultiScaleDeformableAttention)):
            m.forward = lambda v, s, sl, lsi, loc, w, step, f=m.forward: f(
                v.float(), s, sl, lsi, loc.float(), w.float(), step).to(v.dtype)
        if isinstance(m, D.DFineMultiscaleDeformableAttention):
            m.ms_deformable_attn_core = lambda v, s, loc, w, n, how, f=m.ms_deformable_attn_core: f(
                v.float(), s, loc.float(), w.float(), n, how).to(v.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gdino_half_matches_transformers_in_half(small_folder, proc, dtype):
    """Every stage equal to transformers' in the same dtype: tolerance 0, measured 0.0 at every stage, as both run
    the same operations in the same dtype (position embeddings in float32 then cast, masks with the dtype's min,
    float32 logits) and the same float32 sampling."""
    ours = gdino.GroundingDino.from_pretrained(small_folder, dtype=dtype)
    ref = R.load(small_folder, dtype)
    float32_sampling(ref)
    assert ours.level_embed.dtype == dtype and ref.model.level_embed.dtype == dtype
    inputs = dict(proc(images=Image.open(CATS), text=PROMPT, size=SMALL_SIZE, return_tensors="pt"))
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():  # as R.run: with autograd on, torch's CPU SDPA takes another bf16 kernel (other bits)
        mine = ours(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"],
                    inputs["pixel_mask"], return_stages=True).stages
    theirs = R.run(ref, inputs)
    assert mine["encoder_vision"].dtype == dtype and mine["logits"].dtype == torch.float32  # as transformers
    assert torch.isfinite(mine["pred_boxes"]).all()
    for name, r in theirs.items():
        if not name.startswith("_"):
            for a, b in zip(*((mine[name], r) if isinstance(r, list) else ([mine[name]], [r]))):
                assert a.dtype == b.dtype and torch.equal(a, b), name


def test_dfine_bf16_matches_transformers_in_bf16():
    """D-FINE nano in bf16 on a 256 x 256 crop (a valid input: multiples of 32, more tokens than queries): logits
    and boxes equal to transformers' in bf16 (tolerance 0, measured 0.0, for the reasons of the test above)."""
    from transformers import DFineForObjectDetection

    folder = dfine_checkpoint("n")
    ours = dfine.DFine.from_pretrained(folder, dtype=torch.bfloat16)
    ref = DFineForObjectDetection.from_pretrained(folder, dtype=torch.bfloat16).eval()
    float32_sampling(ref)
    px = dfine.preprocess([common.load_image(CATS)])[:, :, :256, :256].contiguous().to(torch.bfloat16)  # a crop
    with torch.inference_mode():
        a, b = ours(px), ref(pixel_values=px)
    assert a.logits.dtype == torch.bfloat16 and torch.isfinite(a.logits).all()
    assert torch.equal(a.logits, b.logits) and torch.equal(a.pred_boxes, b.pred_boxes)


def assert_near_fp32(got: dict, fp32: dict, label: str, score_tol: float) -> None:
    """A bf16 model's float32 detections at 1024 px: coordinates past 512 not rounded to bf16's multiples of 4, and
    the fp32 model's best detection found again (same label) within bf16's network error (0.012 of the image)."""
    big = got["boxes"][got["boxes"] >= 512]
    assert len(big) >= 4 and (big % 4 != 0).any()
    best = fp32["scores"].argmax()
    near = (got["boxes"] - fp32["boxes"][best]).abs().amax(-1).masked_fill(got[label] != fp32[label][best],
                                                                           float("inf"))  # (n,)
    j = near.argmin()
    assert near[j] <= 0.012 * 1024 and abs(got["scores"][j] - fp32["scores"][best]) <= score_tol, near[j]


def test_gdino_bf16_detections_are_float32_pixels():
    """detect on a bf16 model: float32 scores and boxes, post-processed in float32 from the network's bf16 outputs.
    Corners and pixels are not rounded to bf16's 8 significant bits once more (which put every coordinate between 512
    and 1024 px on a multiple of 4), and the clear detection is the fp32 model's within bf16's network error: 0.012
    of the image (measured 1.2-1.7 px) and 0.025 in probability, as for D-FINE below. The probability error depends on
    the CPU's bf16 arithmetic: measured 0.002 where oneDNN runs AVX-512 without bf16 instructions, 0.011 on AVX2, and
    0.019 where its GEMMs take AVX512-BF16 dot products (transformers in bf16 gives the same bits as ours on each:
    test_gdino_half_matches_transformers_in_half). The score sits near 0.5, where a probability moves most per
    logit. The shipped gdino-shapes model on its scene, upscaled to 1024 px so that boxes pass 512."""
    folder = ROOT / "notebooks" / "models" / "gdino-shapes"
    image = Image.open(folder.parent / "shapes_scene.png").convert("RGB").resize((1024, 1024), Image.BICUBIC)
    labels = ["yellow circle", "blue triangle", "red square"]
    fp32 = gdino.GroundingDino.from_pretrained(folder).detect(image, labels)
    model = gdino.GroundingDino.from_pretrained(folder, dtype=torch.bfloat16)
    got = model.detect(image, labels)
    assert got["scores"].dtype == got["boxes"].dtype == torch.float32
    enc, prompt = model.encode_image(image), model.encode_prompt(labels)
    tok = prompt.tokens[0]
    with torch.inference_mode():  # the network's own outputs stay bf16 (so do the stage dumps)
        out = model(enc.pixel_values, tok["input_ids"], tok["attention_mask"], tok["token_type_ids"], enc.pixel_mask,
                    backbone_maps=enc.maps, text=prompt.text[0])
    assert out.pred_boxes.dtype == torch.bfloat16
    keep = out.logits[0].sigmoid().amax(-1) > 0.25
    assert torch.equal(got["boxes"], common.center_to_corners(out.pred_boxes[0][keep].float()) * 1024)
    assert_near_fp32(got, fp32, "label_ids", score_tol=0.025)


def test_dfine_bf16_detections_are_float32_pixels():
    """detect on a bf16 D-FINE: float32 scores and boxes, post-processed in float32 from the network's bf16 outputs
    (as Grounding DINO's above), so numpy takes them; the fp32 model's best detection within the bounds
    test_dfine_bf16_against_our_fp32 holds for bf16's network error (0.012 of the image, 0.025 in probability).
    The shipped dfine-shapes model on its scene, upscaled to 1024 px so that boxes pass 512."""
    folder = ROOT / "notebooks" / "models" / "dfine-shapes"
    image = Image.open(folder.parent / "shapes_scene.png").convert("RGB").resize((1024, 1024), Image.BICUBIC)
    fp32 = dfine.DFine.from_pretrained(folder).detect(image)[0]
    model = dfine.DFine.from_pretrained(folder, dtype=torch.bfloat16)
    got = model.detect(image)[0]
    assert got["scores"].dtype == got["boxes"].dtype == torch.float32
    assert np.asarray(got["boxes"]).dtype == np.float32
    with torch.inference_mode():  # the network's own outputs stay bf16 (so do the stage dumps)
        out = model(dfine.preprocess([image], model.input_size).bfloat16(), return_stages=True)
    assert out.pred_boxes.dtype == out.stages["decoder_hidden"][-1].dtype == torch.bfloat16
    ref = dfine.postprocess(out.logits.float(), out.pred_boxes.float(), [(1024, 1024)], 0.5, model.cfg.id2label)[0]
    assert torch.equal(got["boxes"], ref["boxes"]) and torch.equal(got["scores"], ref["scores"])
    assert_near_fp32(got, fp32, "labels", score_tol=0.025)


@torch.inference_mode()
def stages_with_queries(model, photo: str, topk: torch.Tensor | None = None) -> dict:
    """Our stages on a photo; with `topk`, the decoder starts from those tokens instead of the model's own choice."""
    image, prompt = model.encode_image(DATA / photo, (256, 400)), model.encode_prompt(PROMPTS[photo])
    text = prompt.text[0]
    lv = model.prepare_levels(image.maps, image.pixel_mask)
    memory, text_feats = model.encoder(lv, text, model.backend)
    sel = model.select_queries(memory, lv, text_feats, text["token_mask"])
    if topk is not None:
        sel["init_reference_points"] = sel["enc_outputs_coord_logits"].gather(1, topk[..., None].expand(-1, -1, 4))
        sel["init_reference_points"] = sel["init_reference_points"].sigmoid()
    target = model.query_position_embeddings.weight[None]  # (1, Q, 256)
    hidden, refs = model.decoder(target, sel["init_reference_points"], memory, lv, text_feats, text["token_mask"],
                                 model.box_head, model.backend)
    logits, boxes = model.predict(hidden, sel["init_reference_points"], refs, text_feats, text["token_mask"])
    return {"memory": memory, **sel, "logits": logits, "boxes": boxes}


@pytest.mark.parametrize("photo", PHOTOS)
def test_bf16_against_our_fp32(small_folder, small, photo):
    """bf16 against our fp32 run on the photos. bf16 keeps 8 significant bits (steps of 2^-8 relative), and the
    rounding compounds through Swin, BERT and the enhancer: the encoder's token scores (at most about 26) move by
    up to 0.55 (measured at 256/400; asserted below 1).
    Three effects follow, each checked for what it is:
    - anchors on the (0.01, 0.99) border of encoder_proposals flip validity (their bf16 centres round across it;
      transformers does the same): a few % of the tokens, all on the image's border rows and columns;
    - query selection: every token whose fp32 score beats the 51st by more than twice the measured score error is
      selected in bf16 too (closer ones are near-ties: random weights make many);
    - with fp32's queries, probabilities and boxes agree within 0.015 and 0.012 (measured at most 0.0071 and
      0.0057 on these photos at 256/400: about twice that)."""
    bf16 = gdino.GroundingDino.from_pretrained(small_folder, dtype=torch.bfloat16)
    a = stages_with_queries(small, photo)
    b = stages_with_queries(bf16, photo, a["topk_indices"])
    ok32, ok16 = (torch.isfinite(s["enc_outputs_coord_logits"]).all(-1)[0] for s in (a, b))  # (S,) valid anchors
    assert (ok32 != ok16).float().mean() < 0.03  # validity flips on the border only
    both = ok32 & ok16
    s32, s16 = (s["enc_outputs_class"].max(-1)[0][0].masked_fill(~both, -1e9) for s in (a, b))  # (S,)
    err = (s32 - s16)[both].abs().max().item()
    assert err < 1.0
    clear = (s32 > s32.sort(descending=True)[0][small.cfg.num_queries] + 2 * err).nonzero()[:, 0]
    assert len(clear) > 0 and set(clear.tolist()) <= set(b["topk_indices"][0].tolist())
    q = both[a["topk_indices"][0]]  # fp32's queries whose anchor is valid in both runs
    assert q.float().mean() > 0.9
    print(f"flips {(ok32 != ok16).float().mean():.3f} score error {err:.3g} probabilities "
          f"{(b['logits'][0][q].sigmoid() - a['logits'][0][q].sigmoid()).abs().max():.3g} boxes "
          f"{(b['boxes'][0][q].float() - a['boxes'][0][q]).abs().max():.3g}")
    torch.testing.assert_close(b["logits"][0][q].sigmoid(), a["logits"][0][q].sigmoid(), atol=0.015, rtol=0)
    torch.testing.assert_close(b["boxes"][0][q].float(), a["boxes"][0][q], atol=0.012, rtol=0)


@torch.inference_mode()
def dfine_stages(model, px: torch.Tensor, topk: torch.Tensor | None = None) -> tuple[dict, dict]:
    """D-FINE's query selection and decoder; with `topk`, the decoder starts from those tokens."""
    q = model.select_queries(model.encode(model.backbone(px)))
    if topk is not None:
        memory = model.enc_output(q["valid_mask"].to(q["memory"].dtype) * q["memory"])  # as select_queries
        q["init_reference_points"] = q["enc_outputs_coord_logits"].gather(1, topk[..., None].expand(-1, -1, 4))
        q["target"] = memory.gather(1, topk[..., None].expand(-1, -1, memory.shape[-1]))
    return q, model.decoder(q["target"], q["init_reference_points"], q["memory"], q["spatial_shapes"], model.backend)


def test_dfine_bf16_against_our_fp32():
    """D-FINE nano, bf16 against our fp32 run on a 320 x 320 crop of each photo (one batch). Token scores move by
    up to 0.037 (measured); every token beating the 301st by more than twice that (100 of each photo's 300, measured)
    is selected in bf16 too; with fp32's queries, probabilities and boxes agree within 0.025 and 0.012 (measured at
    most 0.0113 and 0.0069). bf16's 8 significant bits set the scale, as for Grounding DINO above."""
    folder = dfine_checkpoint("n")
    px = dfine.preprocess([common.load_image(DATA / p) for p in PHOTOS])[:, :, 64:384, 64:384].contiguous()
    qa, a = dfine_stages(dfine.DFine.from_pretrained(folder), px)
    qb, b = dfine_stages(dfine.DFine.from_pretrained(folder, dtype=torch.bfloat16), px.bfloat16(), qa["topk_indices"])
    sa, sb = qa["enc_outputs_class"].max(-1)[0], qb["enc_outputs_class"].max(-1)[0].float()  # (B, S)
    err = (sa - sb).abs().max().item()
    assert err < 0.05
    for i in range(len(PHOTOS)):
        clear = (sa[i] > sa[i].sort(descending=True)[0][300] + 2 * err).nonzero()[:, 0]
        print(f"photo {i}: {len(clear)} tokens clear of the 301st by {2 * err:.4f}, all selected in bf16 too")
        assert len(clear) >= 100 and set(clear.tolist()) <= set(qb["topk_indices"][i].tolist())  # a third of 300
    torch.testing.assert_close(b["logits"].float().sigmoid(), a["logits"].sigmoid(), atol=0.025, rtol=0)
    torch.testing.assert_close(b["pred_boxes"].float(), a["pred_boxes"], atol=0.012, rtol=0)


def test_bad_dtype_is_refused(small_folder):
    with pytest.raises(InputError, match="unsupported dtype"):
        gdino.GroundingDino.from_pretrained(small_folder, dtype=torch.int8)
    with pytest.raises(InputError, match="unsupported dtype"):
        dfine.DFine.from_pretrained(dfine_checkpoint("n"), dtype=torch.float64)


# -----------------------------------------------------------------------------
# 4. NMS and top-k


def brute_force_nms(boxes: np.ndarray, scores: np.ndarray, iou: float, classes) -> list[int]:
    """Greedy NMS by definition, one pair at a time, in float32 like common.nms."""
    f = np.float32
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        def overlap(j):
            w = max(f(0), min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
            h = max(f(0), min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
            area = [max(f(0), b[2] - b[0]) * max(f(0), b[3] - b[1]) for b in (boxes[i], boxes[j])]
            inter = w * h
            union = area[0] + area[1] - inter
            return union > 0 and inter / union > iou
        if not any(overlap(j) and (classes is None or classes[i] == classes[j]) for j in kept):
            kept.append(i)
    return kept


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 25), st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]), st.booleans())
def test_nms_equals_brute_force(n, seed, iou, per_class):
    g = np.random.default_rng(seed)
    xy = g.integers(0, 20, (n, 2)).astype(np.float32)  # a small grid: many overlaps, equal and empty boxes
    boxes = np.concatenate([xy, xy + g.integers(0, 8, (n, 2))], 1).astype(np.float32)
    scores = g.integers(0, 5, n).astype(np.float32) / 4  # ties, to check the order among them
    classes = g.integers(0, 3, n) if per_class else None
    got = common.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou,
                     None if classes is None else torch.from_numpy(classes))
    assert got.tolist() == brute_force_nms(boxes, scores, iou, classes)


def check_nms_result(full: dict, kept: dict, iou: float, classes: str | None) -> None:
    """kept = NMS of full: sorted by score, a subset, no two kept boxes of one class over iou, each dropped box
    over iou with a better kept one of its class."""
    assert (kept["scores"][:-1] >= kept["scores"][1:]).all()
    key = "label_ids" if "label_ids" in full else "labels"  # the label, to tell one box's two labels apart
    index = [next(i for i in range(len(full["scores"])) if torch.equal(full["boxes"][i], b) and full["scores"][i] == s
                  and full[key][i] == c) for b, s, c in zip(kept["boxes"], kept["scores"], kept[key])]
    cls = (lambda r, i: 0) if classes is None else (lambda r, i: int(r[classes][i]))

    def iou_of(a, b):
        lt, rb = torch.max(a[:2], b[:2]), torch.min(a[2:], b[2:])
        inter = (rb - lt).clamp(min=0).prod()
        return inter / ((a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter)

    for x in range(len(index)):
        for y in range(x + 1, len(index)):
            assert cls(full, index[x]) != cls(full, index[y]) or iou_of(kept["boxes"][x], kept["boxes"][y]) <= iou
    for i in set(range(len(full["scores"]))) - set(index):
        assert any(cls(full, i) == cls(full, j) and full["scores"][j] >= full["scores"][i]
                   and iou_of(full["boxes"][i], full["boxes"][j]) > iou for j in index)


def test_gdino_nms_and_top_k_on_the_photos(small):
    """On each photo: detect with nms/top_k = common.best_detections of the plain result (the one call it adds),
    class-aware and class-agnostic NMS as defined, top_k the best k."""
    dropped = 0
    for photo in PHOTOS:
        image = small.encode_image(DATA / photo, (256, 400))
        full = small.detect(image, PROMPTS[photo], threshold=0.3, text_threshold=0.3)
        aware = small.detect(image, PROMPTS[photo], threshold=0.3, text_threshold=0.3, nms=0.5, top_k=50)
        assert_same_detections(aware, common.best_detections(full, 0.5, 50, full["label_ids"]))
        agnostic = common.best_detections(full, 0.5, None, None)
        check_nms_result(full, aware, 0.5, "label_ids")
        check_nms_result(full, agnostic, 0.5, None)
        assert len(agnostic["scores"]) <= len(aware["scores"]) <= len(full["scores"])
        dropped += len(full["scores"]) - len(agnostic["scores"])
        top = common.best_detections(full, None, 3, None)
        assert torch.equal(top["scores"], full["scores"].sort(descending=True)[0][:3])
    assert dropped > 0  # NMS had something to do


def test_dfine_nms_and_top_k():
    """D-FINE scores every (query, class) pair, so one query can come back with two labels and the same box:
    class-aware NMS keeps both, class-agnostic NMS keeps one. (The random weights give no such pair on this photo,
    so one is made by giving a query's best score to a second class; detect applies common.best_detections to
    postprocess's result exactly as below.)"""
    model = dfine.DFine.from_pretrained(dfine_checkpoint("n"))
    with torch.inference_mode():
        out = model(dfine.preprocess([common.load_image(CATS)]))
    size = [Image.open(CATS).size[::-1]]
    full = dfine.postprocess(out.logits, out.pred_boxes, size, 0.1, model.cfg.id2label)[0]
    kept = model.detect(CATS, threshold=0.1, nms=0.3)[0]  # the random boxes overlap by less than 0.5
    check_nms_result(full, kept, 0.3, "labels")
    assert 0 < len(kept["scores"]) < len(full["scores"])
    assert_same_detections(common.best_detections(full, 0.3, None, full["labels"]), kept)
    assert_same_detections(common.best_detections(full, None, 5, None), {k: v[:5] for k, v in full.items()})
    logits = out.logits.clone()
    best = logits[0].max(-1)  # each query's best class
    q = best.values.argmax()
    logits[0, q, (best.indices[q] + 1) % logits.shape[-1]] = best.values[q]  # the best query, a second label
    two = dfine.postprocess(logits, out.pred_boxes, size, 0.1, model.cfg.id2label)[0]
    assert torch.equal(two["boxes"][0], two["boxes"][1]) and two["labels"][0] != two["labels"][1]
    aware = common.best_detections(two, 0.5, None, two["labels"])
    agnostic = common.best_detections(two, 0.5, None, None)
    check_nms_result(two, aware, 0.5, "labels")
    check_nms_result(two, agnostic, 0.5, None)
    assert torch.equal(aware["boxes"][0], aware["boxes"][1]) and not torch.equal(agnostic["boxes"][0],
                                                                                  agnostic["boxes"][1])
    with pytest.raises(InputError, match="top_k"):
        common.best_detections(full, None, 0, None)
    with pytest.raises(InputError, match="nms"):
        common.best_detections(full, 1.5, None, None)


# -----------------------------------------------------------------------------
# command lines: --size, --dtype, --nms, --top-k


def test_gdino_command_line_options(small_folder, small):
    cmd = [sys.executable, str(ROOT / "gdino.py"), str(CATS), PROMPT, "--model", str(small_folder), "--json",
           "--threshold", "0.3", "--size", "256", "400", "--nms", "0.5", "--top-k", "3", "--dtype", "bfloat16"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    dets = json.loads(r.stdout)["detections"]
    bf16 = gdino.GroundingDino.from_pretrained(small_folder, dtype=torch.bfloat16)
    want = bf16.detect(CATS, PROMPT, 0.3, size=(256, 400), nms=0.5, top_k=3)
    assert 0 < len(dets) <= 3 and [d["label"] for d in dets] == want["labels"]
    assert [d["score"] for d in dets] == [round(float(s), 4) for s in want["scores"]]


def test_dfine_command_line_options():
    cmd = [sys.executable, str(ROOT / "dfine.py"), str(CATS), "--model", str(dfine_checkpoint("n")), "--json",
           "--threshold", "0.1", "--nms", "0.5", "--top-k", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert 0 < len(json.loads(r.stdout)[0]["detections"]) <= 4


# -----------------------------------------------------------------------------
# 5. The GPU script: every command it names exists, and its steps run small on the CPU


def test_gpu_check_script_dry_run_on_cpu(tmp_path):
    script = ROOT / "tests" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for name in ["tests/gpu_parity.py", "tests/benchmark.py", "tests/test_kernels.py"]:
        assert name in text and (ROOT / name).is_file(), name
    helps = {name: subprocess.run([sys.executable, str(ROOT / name), "--help"], capture_output=True,
                                  text=True).stdout for name in ["tests/benchmark.py", "tests/gpu_parity.py"]}
    for flag in ["--device", "--backend", "--dtype", "--reuse", "--runs", "--no-rss", "--kernels"]:
        assert flag in helps["tests/benchmark.py"], flag
    for flag in ["--device", "--quick", "--dtypes", "--backends"]:
        assert flag in helps["tests/gpu_parity.py"], flag
    r = subprocess.run(["bash", str(script), "--cpu-dry-run"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for step in range(1, 5):
        assert f"== {step}." in r.stdout
    assert "benchmark.py --kernels exists" in r.stdout
    rows = [line for line in r.stdout.splitlines() if "max abs diff vs transformers" in line]
    assert len(rows) == 2 and all("logits 0  boxes 0" in line for line in rows)  # fp32 on the CPU: bit parity
    assert "gdino-small" in r.stdout and "== done" in r.stdout
