"""Fine-tuning on COCO-format data (common.py section 9, dfine.train, gdino.train): the category ids mapped to
classes and back, every bad input named, a few steps of each model from the shipped shape models, resume.

The data are shape scenes written as a labelling tool would (shapes.write_coco) with new categories, shapes of any
colour, under odd ids {7, 42, 1000}; runs are smoke-sized (a few steps of one or two images).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import dfine
import gdino

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "notebooks"))
import shapes  # noqa: E402  (notebooks/shapes.py: the scenes and their COCO writer)

DFINE_SHAPES = ROOT / "notebooks" / "models" / "dfine-shapes"
GDINO_SHAPES = ROOT / "notebooks" / "models" / "gdino-shapes"
CATS = {7: "circle", 42: "square", 1000: "triangle"}


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> dict:
    """A training set of 4 scenes plus one image without annotations, and a validation set of 2 scenes."""
    root = tmp_path_factory.mktemp("coco")
    train = shapes.write_coco(root / "train", range(4), categories=CATS)
    d = json.loads(train.read_text())
    shutil.copy(root / "train" / "images" / "0.png", root / "train" / "images" / "empty.png")
    d["images"].append({"id": 99, "file_name": "empty.png", "width": 320, "height": 320})
    train.write_text(json.dumps(d))
    val = shapes.write_coco(root / "val", range(shapes.VAL_SEED, shapes.VAL_SEED + 2), categories=CATS)
    return {"train": train, "images": root / "train" / "images", "val": val, "val_images": root / "val" / "images"}


def test_category_ids_become_classes_in_id_order(coco):
    data = common.read_coco(coco["train"], coco["images"])
    assert data.names == ["circle", "square", "triangle"] and data.category_ids == [7, 42, 1000]
    raw = json.loads(coco["train"].read_text())
    by_image = {im["id"]: im for im in data.images}
    assert len(data.images) == 5 and len(by_image[99]["boxes"]) == 0  # the image without annotations is kept
    for im_id in {a["image_id"] for a in raw["annotations"]}:
        anns = [a for a in raw["annotations"] if a["image_id"] == im_id]
        assert [data.category_ids[c] for c in by_image[im_id]["classes"]] == [a["category_id"] for a in anns]
        x, y, w, h = torch.tensor([a["bbox"] for a in anns]).unbind(-1)
        torch.testing.assert_close(by_image[im_id]["boxes"], torch.stack([x, y, x + w, y + h], -1))


def write_edited(coco: dict, tmp_path: Path, edit) -> Path:
    d = json.loads(coco["train"].read_text())
    edit(d)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(d))
    return path


BAD = [  # (what is wrong, the edit, what the error must say)
    ("unknown category", lambda d: d["annotations"][0].update(category_id=8), "annotation 1: category_id 8"),
    ("negative width", lambda d: d["annotations"][0].update(bbox=[10, 10, -5, 5]), "annotation 1: bbox"),
    ("zero height", lambda d: d["annotations"][0].update(bbox=[10, 10, 5, 0]), "annotation 1: bbox"),
    ("wholly outside", lambda d: d["annotations"][0].update(bbox=[330, 10, 5, 5]), "annotation 1: .*no area"),
    ("missing image", lambda d: d["images"][0].update(file_name="nowhere.png"), "nowhere.png does not exist"),
    ("duplicate id", lambda d: d["annotations"][1].update(id=1), "annotation 1: the id is used twice"),
    ("unknown image", lambda d: d["annotations"][0].update(image_id=12345), "annotation 1: .*image_id 12345"),
    ("no bbox", lambda d: d["annotations"][0].pop("bbox"), "annotation 1 needs"),
    ("no categories", lambda d: d.pop("categories"), "not a readable COCO"),
    ("empty categories", lambda d: d.update(categories=[], annotations=[]), "has no categories"),
    ("no images", lambda d: d.update(images=[], annotations=[]), "has no images"),
]


@pytest.mark.parametrize("edit, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_the_file_and_the_annotation(coco, tmp_path, edit, message):
    path = write_edited(coco, tmp_path, edit)
    with pytest.raises(common.InputError, match=message) as e:
        common.read_coco(path, coco["images"])
    assert str(path) in str(e.value)


def test_malformed_json_and_the_command_line(coco, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(common.InputError, match="not a readable COCO"):
        common.read_coco(path, coco["images"])
    r = subprocess.run([sys.executable, "dfine.py", "train", "--coco", str(path), "--images", str(coco["images"]),
                        "--init", str(DFINE_SHAPES), "--out", str(tmp_path / "out"), "--steps", "1"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr


def test_box_partly_outside_is_clipped_with_a_warning(coco, tmp_path):
    path = write_edited(coco, tmp_path, lambda d: d["annotations"][0].update(bbox=[300, 10, 40, 20]))
    with pytest.warns(UserWarning, match="annotation 1: bbox .* clipped"):
        data = common.read_coco(path, coco["images"])
    first = json.loads(path.read_text())["annotations"][0]
    im = next(im for im in data.images if im["id"] == first["image_id"])
    assert im["boxes"][0].tolist() == [300, 10, 320, 30]


def test_crowd_boxes_are_left_out_of_training(coco, tmp_path):
    path = write_edited(coco, tmp_path, lambda d: [a.update(iscrowd=1) for a in d["annotations"] if a["image_id"] == 0])
    data = common.read_coco(path, coco["images"])
    first = next(i for i, im in enumerate(data.images) if im["id"] == 0)
    assert data.images[first]["crowd"].all() and len(data.images[first]["crowd"]) > 0
    no_aug = common.coco_transforms("dfine", (320, 320), augment=False)
    samples = [common.coco_batch(data, t, 1, 0, no_aug)[0][0] for t in range(len(data.images))]  # one epoch
    assert sorted(len(s["classes"]) for s in samples) == sorted(int((~im["crowd"]).sum()) for im in data.images)


def test_dfine_fine_tunes_and_keeps_the_dataset_ids(coco, tmp_path):
    """Two steps from dfine-shapes: new heads for the 3 classes, the rest kept; the folder names the dataset's
    categories (id2label, label2id, coco_category_ids) and loads in from_pretrained and in transformers."""
    from transformers import DFineForObjectDetection

    out = tmp_path / "ft"
    hist = dfine.train(str(coco["train"]), str(coco["images"]), str(DFINE_SHAPES), str(out), steps=2, batch=2,
                       val=str(coco["val"]), val_images=str(coco["val_images"]), eval_every=1)
    assert hist["eval_step"] == [1, 2] and all(0 <= m <= 1 for m in hist["map50"])
    assert {"loss_vfl", "loss_fgl", "loss_ddf_aux_0", "loss_vfl_dn_0"} <= set(hist["terms"])  # each term's curve
    for t in range(2):  # D-FINE's terms are weighted: they add up to the loss trained on
        assert sum(v[t] for v in hist["terms"].values()) == pytest.approx(hist["loss"][t], rel=1e-5)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["id2label"] == {"0": "circle", "1": "square", "2": "triangle"}
    assert cfg["label2id"] == {"circle": 0, "square": 1, "triangle": 2} and cfg[common.COCO_IDS_KEY] == [7, 42, 1000]
    ours = dfine.DFine.from_pretrained(out)
    assert ours.enc_score_head.out_features == 3 and ours.cfg.coco_category_ids == [7, 42, 1000]
    r = ours.detect(coco["val_images"] / f"{shapes.VAL_SEED}.png", threshold=0.0, top_k=5)[0]
    assert set(r["names"]) <= set(CATS.values()) and len(r["names"]) == 5
    theirs = DFineForObjectDetection.from_pretrained(out).eval()
    assert theirs.config.id2label == {0: "circle", 1: "square", 2: "triangle"}
    px = dfine.preprocess([common.load_image(coco["val_images"] / f"{shapes.VAL_SEED}.png")], ours.input_size)
    with torch.no_grad():
        a, b = ours(px), theirs(pixel_values=px)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0)  # the project's bar
    torch.testing.assert_close(a.pred_boxes, b.pred_boxes, atol=1e-4, rtol=0)


def test_resume_continues_bit_for_bit(coco, tmp_path, monkeypatch):
    """A run stopped after step 2 and resumed from OUT/last ends where an uninterrupted run ends: the same weights,
    EMA, optimizer moments, RNG. The saved folder holds the EMA weights."""
    args = dict(coco=str(coco["train"]), images=str(coco["images"]), init=str(DFINE_SHAPES), steps=3, batch=1,
                eval_every=1, seed=3)
    dfine.train(out=str(tmp_path / "straight"), **args)
    real = common.coco_batch

    def stop_at_step_2(data, t, *a, **k):
        if t == 2:
            raise KeyboardInterrupt
        return real(data, t, *a, **k)

    monkeypatch.setattr(common, "coco_batch", stop_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        dfine.train(out=str(tmp_path / "resumed"), **args)
    monkeypatch.setattr(common, "coco_batch", real)
    assert json.loads((tmp_path / "resumed" / "last" / "state.json").read_text())["history"]["step"] == [1, 2]
    dfine.train(out=str(tmp_path / "resumed"), resume=True, **args)
    a, b = (load_file(tmp_path / run / "last" / "state.safetensors") for run in ("straight", "resumed"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    saved = dfine.DFine.from_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.equal(v, a[f"ema.module.{k}"]) for k, v in saved.items())
    assert not all(torch.equal(v, a[f"model.{k}"]) for k, v in saved.items())  # the EMA, not the last weights


def test_gdino_fine_tunes_and_detects_its_classes_without_a_prompt(coco, tmp_path):
    """Two steps from gdino-shapes: the category names are the prompt; the folder keeps them (id2label, label2id,
    coco_category_ids), so detect(image) without a prompt asks for them; a model not fine-tuned asks for a prompt."""
    from transformers import GroundingDinoConfig

    out = tmp_path / "ft"
    hist = gdino.train(str(coco["train"]), str(coco["images"]), str(GDINO_SHAPES), str(out), steps=2, batch=2,
                       val=str(coco["val"]), val_images=str(coco["val_images"]), eval_every=2)
    assert hist["eval_step"] == [2] and 0 <= hist["map50"][0] <= 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["id2label"] == {"0": "circle", "1": "square", "2": "triangle"} and cfg["label2id"]["triangle"] == 2
    assert cfg[common.COCO_IDS_KEY] == [7, 42, 1000]
    assert GroundingDinoConfig.from_pretrained(out).id2label == {0: "circle", 1: "square", 2: "triangle"}
    model = gdino.GroundingDino.from_pretrained(out)
    r = model.detect(coco["val_images"] / f"{shapes.VAL_SEED}.png", threshold=0.0, top_k=5)
    assert len(r["labels"]) == 5 and set(r["label_ids"].tolist()) <= {0, 1, 2}
    with pytest.raises(common.InputError, match="give a prompt"):
        gdino.GroundingDino.from_pretrained(GDINO_SHAPES).detect(coco["val_images"] / f"{shapes.VAL_SEED}.png")


def test_gdino_long_category_lists_train_in_chunks(coco, tmp_path, monkeypatch):
    """103 categories (a prompt over 256 tokens): each step's prompt is one chunk of whole names, as detect splits
    them, and its labels are the objects of the classes that chunk names, numbered within it."""
    fillers = [{"id": 100 + i, "name": f"filler shape number {i}"} for i in range(100)]
    path = write_edited(coco, tmp_path, lambda d: d["categories"].extend(fillers))
    monkeypatch.setattr(common, "fit", lambda model, batch, *a, **k: (model, batch))
    model, inputs = gdino.train(str(path), str(coco["images"]), str(GDINO_SHAPES), str(tmp_path / "out"), 2, 2)
    names = [model.cfg.id2label[k] for k in sorted(model.cfg.id2label)]
    chunks = gdino.chunk_prompt(model.tokenizer, names, model.cfg.max_text_len)
    assert len(chunks) > 1 and names[:2] == ["circle", "square"] and names[-1] == "triangle"
    for t, chunk in enumerate(chunks):
        kw = inputs(t)
        phrases = gdino.split_phrases(chunk)
        assert model.tokenizer.decode(kw["input_ids"][0].tolist(), skip_special_tokens=True) == chunk
        for lab in kw["labels"]:
            assert all(phrases[c] in ("circle.", "square.", "triangle.") for c in lab["class_labels"].tolist())
    assert any(len(lab["class_labels"]) for t in range(len(chunks)) for lab in inputs(t)["labels"])
