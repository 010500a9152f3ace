"""ONNX export of both models, run in onnxruntime and compared with the model's own forward (fp32, CPU).

Each model is exported once per module (small sizes: export is a trace of one forward) and run on the photos:
logits and boxes within 1e-4 of forward, query by query, and the same detections above a threshold. Queries are
matched first: onnxruntime rounds the encoder's scores differently, so near-tied tokens may swap places in the
top-k, which only reorders the decoder's queries (the decoder treats its queries as a set) and leaves the values
as they are. After export the model must compute exactly what it computed before.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import dfine_reference
import gdino_reference as R
import numpy as np
import pytest
import torch
from conftest import DATA, PHOTOS
from PIL import Image

import common
import dfine
import gdino
from common import InputError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

ATOL = 1e-4  # the parity contract; onnxruntime's kernels round unlike torch's (measured up to ~1e-5 here)
SMALL_SIZE = {"shortest_edge": 320, "longest_edge": 533}  # fast tests: the preprocessor's resize for Grounding DINO


def match_queries(ref_logits, ref_boxes, logits, boxes) -> tuple[float, int]:
    """Pair every onnxruntime query with the forward query nearest in (logits, boxes); the pairing must be a
    permutation. Returns the largest difference between paired queries and how many queries moved."""
    fin = torch.isfinite(ref_logits)
    assert torch.equal(fin, torch.isfinite(logits)), "-inf logits at other places"
    a = torch.cat([ref_logits.masked_fill(~fin, 0), ref_boxes], -1)  # (B, Q, K + 4)
    b = torch.cat([logits.masked_fill(~fin, 0), boxes], -1)  # (B, Q, K + 4)
    worst, moved = 0.0, 0
    for x, y in zip(a, b):
        d = (y[:, None] - x[None]).abs().amax(-1)  # (Q, Q): onnxruntime query i vs forward query j
        pair = d.argmin(-1)  # (Q,)
        assert torch.equal(pair.sort().values, torch.arange(len(pair))), "the queries are not the same set"
        worst = max(worst, d.gather(1, pair[:, None]).max().item())
        moved += int((pair != torch.arange(len(pair))).sum())
    return worst, moved


def gap_threshold(scores: torch.Tensor) -> float:
    """A threshold in the widest gap between the 5th and 30th best scores: detections exist and no near-tie
    straddles it, so a 1e-6 difference cannot move a detection across."""
    s = scores.flatten().sort(descending=True).values[:31]
    k = int((s[4:30] - s[5:31]).argmax()) + 5  # s[k-1] > threshold > s[k]
    return float((s[k - 1] + s[k]) / 2)


def assert_same_detections(ours: list[dict], theirs: list[dict], label_key: str) -> int:
    n = 0
    for o, t in zip(ours, theirs):
        assert len(o["scores"]) == len(t["scores"]), "another number of detections"
        # sorted by label then score: a reordered query changes the order of detections, not the detections
        def order(r):
            labels = r[label_key].tolist() if isinstance(r[label_key], torch.Tensor) else r[label_key]
            return sorted(range(len(labels)), key=lambda i: (str(labels[i]), -float(r["scores"][i])))
        io, it = order(o), order(t)
        assert [str(o[label_key][i]) for i in io] == [str(t[label_key][i]) for i in it]
        torch.testing.assert_close(o["scores"][io], t["scores"][it], atol=ATOL, rtol=0)
        torch.testing.assert_close(o["boxes"][io], t["boxes"][it], atol=ATOL * 1000, rtol=0)  # pixels, size <= 1000
        n += len(io)
    return n


# -----------------------------------------------------------------------------
# D-FINE: dynamic batch and size (multiples of 32)


def stretch(images: list[Image.Image], h: int, w: int) -> torch.Tensor:
    """dfine.preprocess at another size: PIL bilinear stretch to h x w, /255."""
    arrays = [(np.asarray(im.resize((w, h), Image.BILINEAR)).astype(np.float64) / 255).astype(np.float32)
              for im in images]
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)))  # (B, 3, h, w)


@pytest.fixture(scope="module", params=["n", "l"])
def dfine_export(request, tmp_path_factory):
    model = dfine.DFine.from_pretrained(dfine_reference.checkpoint(request.param))
    photos = [common.load_image(DATA / p) for p in PHOTOS]
    inputs = [dfine.preprocess(photos), stretch(photos[:1], 384, 512)]  # (3, 3, 640, 640), (1, 3, 384, 512)
    traced = torch.rand(2, 3, 320, 320)  # the size export_onnx traces by default
    dfine.once.cache_clear()  # the traced size not cached: an export that wrote the cache would show below
    with torch.no_grad():
        before = [model(x) for x in [*inputs, traced]]
    dfine.once.cache_clear()
    path = tmp_path_factory.mktemp("onnx") / f"dfine_{request.param}.onnx"
    backend = model.backend
    model.export_onnx(path)
    with torch.no_grad():
        after = [model(x) for x in [traced, inputs[1]]]  # the traced size first: a cache entry would be read
    assert model.backend == backend
    return model, photos, inputs, before, after, common.OnnxModel(path)


def test_dfine_forward_unchanged_after_export(dfine_export):
    _, _, _, before, after, _ = dfine_export
    for b, a in zip([before[2], before[1]], after):
        assert torch.equal(b.logits, a.logits) and torch.equal(b.pred_boxes, a.pred_boxes)


def test_dfine_onnx_matches_forward(dfine_export):
    model, photos, inputs, before, _, onnx_model = dfine_export
    for x, ref in zip(inputs, before):  # two sizes, two batch sizes
        out = onnx_model(pixel_values=x)
        assert out["logits"].shape == ref.logits.shape and out["pred_boxes"].shape == ref.pred_boxes.shape
        worst, moved = match_queries(ref.logits, ref.pred_boxes, out["logits"], out["pred_boxes"])
        print(f"{tuple(x.shape)}: max diff {worst:.2g}, {moved} queries reordered")
        assert worst <= ATOL
        sizes = [im.size[::-1] for im in photos[: len(x)]]
        t = gap_threshold(torch.sigmoid(ref.logits))
        n = assert_same_detections(dfine.postprocess(out["logits"], out["pred_boxes"], sizes, t),
                                   dfine.postprocess(ref.logits, ref.pred_boxes, sizes, t), "labels")
        assert n >= 5


def assert_found_again(ref: dict, got: dict, label_key: str) -> int:
    """Every reference detection has one of the same label with IoU >= 0.99 among got's."""
    iou = common.box_iou(ref["boxes"], got["boxes"])[0]  # (n_ref, n_got)
    same = torch.tensor([[str(a) == str(b) for b in got[label_key]] for a in ref[label_key]]).reshape(iou.shape)
    assert ((iou >= 0.99) & same).any(1).all(), iou.max(1).values
    return len(ref["boxes"])


def test_dfine_detect_through_onnxruntime(dfine_export):
    """detect(..., engine=): onnxruntime runs the forward, detect's pre- and post-processing stay: the same 20 best."""
    model, photos, *_, onnx_model = dfine_export
    for ref, got in zip(model.detect(photos, threshold=0.0, top_k=20),
                        model.detect(photos, threshold=0.0, top_k=20, engine=onnx_model)):
        assert set(got) == set(ref) and assert_found_again(ref, got, "labels") == 20


def test_dfine_fast_export_keeps_the_best_20(dfine_export, tmp_path):
    """The export of the model after fast_inference (folded convs, the stem pool one MaxPool, the sampling offsets by
    axis) rounds otherwise before the top-300; held to the default's 20 best detections (IoU >= 0.99, same class)."""
    import onnx

    model, photos, *_ = dfine_export
    fast = dfine.fast_inference(copy.deepcopy(model))
    fast.export_onnx(tmp_path / "fast.onnx", (640, 640))
    graph = onnx.load(str(tmp_path / "fast.onnx")).graph
    assert "MaxPool" in {node.op_type for node in graph.node}
    assert all(node.input[-1] for node in graph.node if node.input)  # none ends in "": onnxruntime fuses Pad into Conv
    engine = common.OnnxModel(tmp_path / "fast.onnx")
    for ref, got in zip(model.detect(photos, threshold=0.0, top_k=20),
                        model.detect(photos, threshold=0.0, top_k=20, engine=engine)):
        assert assert_found_again(ref, got, "labels") == 20


def test_dfine_onnx_refuses_what_forward_refuses(dfine_export):
    onnx_model = dfine_export[-1]
    with pytest.raises(InputError, match="multiple of 32"):
        onnx_model(pixel_values=torch.rand(1, 3, 320, 300))
    with pytest.raises(InputError, match="4-D float32"):
        onnx_model(pixel_values=torch.rand(1, 3, 320, 320, dtype=torch.float64))
    with pytest.raises(InputError, match="takes"):
        onnx_model(images=torch.rand(1, 3, 320, 320))
    with pytest.raises(InputError, match="multiples of 32"):
        dfine_export[0].export_onnx(DATA / "never.onnx", image_size=(100, 100))


def test_dfine_fixed_size_graph_refuses_another_size(tmp_path):
    model = dfine.DFine.from_pretrained(dfine_reference.checkpoint("n"))
    model.train()
    model.backbone.eval()  # a mix of modes, as a fine-tuning run may leave: traced in eval, then left as it was
    model.export_onnx(tmp_path / "n.onnx", image_size=(320, 320))
    assert model.training and model.encoder.training and not model.backbone.training
    model.eval()
    onnx_model = common.OnnxModel(tmp_path / "n.onnx")
    assert onnx_model.session.get_inputs()[0].shape == ["batch", 3, 320, 320]
    x = torch.rand(1, 3, 320, 320)
    with torch.no_grad():
        ref = model(x)
    out = onnx_model(pixel_values=x)
    assert match_queries(ref.logits, ref.pred_boxes, out["logits"], out["pred_boxes"])[0] <= ATOL  # traced in eval
    with pytest.raises(InputError, match=r"takes only size 320 in dimension 2.*Resize to 320x320"):
        onnx_model(pixel_values=torch.rand(1, 3, 640, 320))
    with pytest.raises(InputError, match=r"takes only size 320 in dimension 2.*export again"):
        model.detect(DATA / PHOTOS[0], engine=onnx_model)  # detect preprocesses at the model's 640x640


# -----------------------------------------------------------------------------
# Grounding DINO and MM Grounding DINO: dynamic batch and prompt length; image size dynamic or fixed on request


@pytest.fixture(scope="module", params=["gdino-small", "mm-small-fixed-size"])
def gdino_export(request, tmp_path_factory):
    fixed = request.param.endswith("fixed-size")
    if request.param == "gdino-small":
        folder = R.checkpoint("gdino-small", R.small_config(), temper=True, size=SMALL_SIZE)
    else:
        folder = R.checkpoint("mm-small", R.small_config("mm_grounding_dino_tiny_o365v1_goldg"), temper=True)
    model = gdino.GroundingDino.from_pretrained(folder)
    model.preprocessor = {**model.preprocessor, "shortest": 320, "longest": 533}  # small images: fast
    prompts = ["a cat. a remote control.", "a cat.", "a cup. a saucer. a spoon. a table."]
    pv, pm, sizes = gdino.preprocess_images([DATA / p for p in PHOTOS], **model.preprocessor)  # padded: 320x481
    # then one image alone: chelsea is 320x481 unpadded (the fixed graph's size), the cats 320x426 (another size)
    pv1, pm1, sizes1 = gdino.preprocess_images([DATA / PHOTOS[1 if fixed else 0]], **model.preprocessor)
    batches = [{"pixel_values": pv, **gdino.tokenize(model.tokenizer, prompts), "pixel_mask": pm},
               {"pixel_values": pv1, **gdino.tokenize(model.tokenizer, ["a small grey cat. a brown sofa."]),
                "pixel_mask": pm1}]
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]
    with torch.no_grad():
        before = [model(*[b[k] for k in gdino.ONNX_INPUTS]) for b in batches]
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    model.export_onnx(path, tuple(pv.shape[-2:]) if fixed else None)
    with torch.no_grad():
        after = [model(*[b[k] for k in gdino.ONNX_INPUTS]) for b in batches]
    return model, batches, [sizes, sizes1], before, after, common.OnnxModel(path), fixed


def test_gdino_forward_unchanged_after_export(gdino_export):
    model, _, _, before, after, *_ = gdino_export
    assert model.backend == "auto"
    for b, a in zip(before, after):
        assert torch.equal(b.logits, a.logits) and torch.equal(b.pred_boxes, a.pred_boxes)


def test_gdino_onnx_matches_forward(gdino_export):
    model, batches, sizes, before, _, onnx_model, _ = gdino_export
    for batch, size, ref in zip(batches, sizes, before):  # two batch sizes, two prompt lengths (two image sizes)
        out = onnx_model(**batch)
        worst, moved = match_queries(ref.logits, ref.pred_boxes, out["logits"], out["pred_boxes"])
        print(f"{tuple(batch['pixel_values'].shape)} {tuple(batch['input_ids'].shape)}: max diff {worst:.2g}, "
              f"{moved} queries reordered")
        assert worst <= ATOL
        t = gap_threshold(torch.sigmoid(ref.logits).amax(-1))
        ours = gdino.post_process(out["logits"], out["pred_boxes"], batch["input_ids"], model.tokenizer, t, 0.25, size)
        theirs = gdino.post_process(ref.logits, ref.pred_boxes, batch["input_ids"], model.tokenizer, t, 0.25, size)
        assert assert_same_detections(ours, theirs, "labels") >= 5


def test_gdino_onnx_refuses_bad_inputs(gdino_export):
    model, batches, *_, onnx_model, fixed = gdino_export
    pv, pm, _ = gdino.preprocess_images([DATA / PHOTOS[0]], **model.preprocessor)  # 320x426
    if fixed:  # not the graph's 320x481
        with pytest.raises(InputError, match=r"takes only size 481 in dimension 3.*export again with image_size"):
            onnx_model(**{**batches[1], "pixel_values": pv, "pixel_mask": pm})
    else:
        with pytest.raises(InputError, match="width 481 where another input has 426"):
            onnx_model(**{**batches[1], "pixel_values": pv, "pixel_mask": batches[0]["pixel_mask"][:1]})
    with pytest.raises(InputError, match="tokens"):
        onnx_model(**{**batches[1], "attention_mask": batches[0]["attention_mask"][:1, :3]})
    long = {k: torch.ones(1, 257, dtype=torch.long) for k in ("input_ids", "attention_mask", "token_type_ids")}
    with pytest.raises(InputError, match="257 tokens; the graph reads at most 256"):
        onnx_model(**{**batches[1], **long})


def test_gdino_detect_through_onnxruntime(gdino_export):
    model, *_, onnx_model, fixed = gdino_export
    image = DATA / PHOTOS[1 if fixed else 0]  # the fixed graph's 320x481 is chelsea's size
    prompt = "a cat. a remote control. a sofa."
    ref = model.detect(image, prompt, threshold=0.0, text_threshold=0.0, top_k=20)
    got = model.detect(image, prompt, threshold=0.0, text_threshold=0.0, top_k=20, engine=onnx_model)
    assert set(got) == set(ref) and assert_found_again(ref, got, "labels") == 20


def test_an_engine_of_another_model_is_refused(dfine_export, gdino_export):
    (dfine_model, dfine_onnx), (gdino_model, gdino_onnx) = dfine_export[::5], gdino_export[0:6:5]
    with pytest.raises(InputError, match="is not a d-fine export .*'grounding-dino'.*export_onnx"):
        dfine_model.detect(DATA / PHOTOS[0], engine=gdino_onnx)
    with pytest.raises(InputError, match="is not a grounding-dino export .*'d-fine'"):
        gdino_model.detect(DATA / PHOTOS[0], "a cat.", engine=dfine_onnx)
    with pytest.raises(InputError, match="engine must be a common.OnnxModel"):
        dfine_model.detect(DATA / PHOTOS[0], engine=str(dfine_onnx.path))


def test_dfine_command_line_exports(tmp_path, capsys):
    out = tmp_path / "n.onnx"
    assert dfine.main([str(DATA / PHOTOS[0]), "--model", str(dfine_reference.checkpoint("n")), "--threshold", "0.9",
                       "--export-onnx", str(out)]) == 0
    onnx_model = common.OnnxModel(out)
    assert [i.name for i in onnx_model.session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in onnx_model.session.get_outputs()] == ["logits", "pred_boxes"]
    assert onnx_model.session.get_inputs()[0].shape == ["batch", 3, "height", "width"]


# -----------------------------------------------------------------------------
# The runner knows no model: bounds and hints come from the file's metadata


def test_runner_takes_bounds_and_hints_from_metadata(tmp_path):
    class Toy(torch.nn.Module):  # (batch, tokens) ids -> .logits (batch, 2, 3), .pred_boxes (batch, 2, 4)
        def forward(self, input_ids):
            x = input_ids.float().sum(1)[:, None, None]  # (batch, 1, 1)
            return SimpleNamespace(logits=x.expand(-1, 2, 3), pred_boxes=x.expand(-1, 2, 4))

    ids, dynamic = torch.ones(2, 4, dtype=torch.long), {"input_ids": {0: "batch", 1: "tokens"}}
    for metadata, hint in [({"max_tokens": 5, "max_tokens_hint": "Split the text."}, " Split the text."),
                           ({"max_tokens": 5}, "")]:  # no hint: the bound alone
        common.export_onnx(Toy(), [ids], tmp_path / "toy.onnx", ["input_ids"], dynamic, metadata)
        runner = common.OnnxModel(tmp_path / "toy.onnx")
        assert runner(input_ids=torch.ones(3, 5, dtype=torch.long))["logits"].tolist() == [[[5.0] * 3] * 2] * 3
        with pytest.raises(InputError) as error:
            runner(input_ids=torch.ones(1, 6, dtype=torch.long))
        assert str(error.value) == f"input_ids has 6 tokens; the graph reads at most 5.{hint}"
