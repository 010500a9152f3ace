"""One parity run against transformers in a fresh process, so that tests/test_dispatch.py can start it with the
CPU libraries held to a dispatch or a thread count (the environment must be set before torch is imported).

    python tests/parity_run.py CASE    (CASE in CASES below)

prints one JSON line: the CPU capability torch runs, its thread count at the start and the end, whether the top-k
query indices are equal, and per stage the max abs difference from transformers (every stage's tensors, all decoder
layers, logits and boxes); for the training cases per loss term, and "gradients" over every parameter's gradient.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]

import torch  # noqa: E402

import common  # noqa: E402
from conftest import DATA, PHOTOS, hub_config  # noqa: E402


def max_diff(a, b) -> float:
    pairs = list(zip(a, b)) if isinstance(a, list) else [(a, b)]
    assert all(x.shape == y.shape for x, y in pairs), "shapes differ"
    worst = 0.0
    for x, y in pairs:
        x, y = x.double(), y.double()
        if not torch.equal(torch.isinf(x), torch.isinf(y)):
            return float("inf")
        fin = torch.isfinite(y)
        worst = max(worst, (x[fin] - y[fin]).abs().max().item() if fin.any() else 0.0)
    return worst


def gdino_tiny() -> tuple[dict, dict]:
    """The real tiny config at full size: the cats photo resized to 800x1066, "a cat. a remote control."."""
    import gdino_reference as R
    from PIL import Image

    import gdino

    folder = R.checkpoint("gdino-tiny", hub_config("grounding-dino-tiny"), hub_layout=True)
    inputs = dict(R.processor()(images=Image.open(DATA / PHOTOS[0]), text="a cat. a remote control.",
                                return_tensors="pt"))
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 800, 1066)
    ours = gdino.GroundingDino.from_pretrained(folder)
    with torch.no_grad():
        mine = ours(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"],
                    inputs["pixel_mask"], return_stages=True).stages
    del ours
    theirs = R.run(R.load(folder), inputs)
    return mine, {k: v for k, v in theirs.items() if not k.startswith("_")}


def dfine(size: str, dataset: str = "coco") -> tuple[dict, dict]:
    """The real config of dfine-{size}-{dataset} on the three photos at 640x640, as one batch."""
    import dfine_reference as R
    from test_dfine import hf_forward

    import dfine

    folder = R.checkpoint(size, dataset)
    px = dfine.preprocess([common.load_image(DATA / p) for p in PHOTOS])
    with torch.no_grad():
        out = dfine.DFine.from_pretrained(folder)(px, return_stages=True)
    theirs, seen = hf_forward(R.hf_model(folder), px)
    s = out.stages
    mine = {"backbone": s["backbone"], "encoder": s["encoder"], "enc_outputs_class": s["enc_outputs_class"],
            "topk_indices": s["topk_indices"], "init_reference_points": s["init_reference_points"],
            "decoder_sampling_locations": s["decoder_sampling_locations"], "decoder_hidden": s["decoder_hidden"],
            "decoder_boxes": s["decoder_boxes"], "logits": out.logits, "pred_boxes": out.pred_boxes}
    ref = {"backbone": seen["backbone"], "encoder": list(theirs.encoder_last_hidden_state),
           "enc_outputs_class": theirs.enc_outputs_class,
           "topk_indices": theirs.enc_outputs_class.max(-1).values.topk(out.logits.shape[1], dim=1).indices,
           "init_reference_points": theirs.init_reference_points, "decoder_sampling_locations": seen["locations"],
           "decoder_hidden": list(theirs.intermediate_hidden_states), "decoder_boxes": seen["boxes"],
           "logits": theirs.logits, "pred_boxes": theirs.pred_boxes}
    return mine, ref


def gdino_mm(name: str) -> tuple[dict, dict]:
    """A real MM Grounding DINO / LLMDet config at 320 px, as tests/test_gdino.py's test_mm_parity_at_real_configs."""
    import gdino_reference as R
    from test_gdino import mm_inputs, our_stages

    import gdino

    folder = R.checkpoint(f"mm-{name}", hub_config(name))
    inputs = mm_inputs(R.processor())
    mine = our_stages(gdino.GroundingDino.from_pretrained(folder), inputs)
    return mine, {k: v for k, v in R.run(R.load(folder), inputs).items() if not k.startswith("_")}


def dfine_train() -> dict:
    """One training step of dfine-n (tests/test_dfine_train.py's batch, transformers' pairing): terms and gradients."""
    import test_dfine_train as T

    import dfine

    ref_loss, ref_terms, ref_grads = T.reference("n")
    loss, terms, grads = T.run(dfine.DFine.from_pretrained(T.checkpoint("n")), *T.batch("n"), as_transformers=True)
    assert list(terms) == list(ref_terms), "loss terms differ in name or order"
    diffs = {k: (terms[k] - ref_terms[k]).abs().item() for k in terms} | {"loss": (loss - ref_loss).abs().item()}
    return diffs | {"gradients": max((grads[k] - ref_grads[k]).abs().max().item() for k in grads)}


def gdino_train() -> dict:
    """One training step of the shrunk tiny config on a batch of two (tests/test_gdino_train.py's test_parity)."""
    import gdino_reference as R
    import test_gdino_train as T

    import gdino

    ours, hf = T.load_pair(R.checkpoint("gdino-small-train", T.parity_config(R.small_config())))
    x = T.inputs(gdino.load_tokenizer(R.TOKENIZER_DIR), PHOTOS[:2], [T.PROMPT] * 2)
    labels = T.random_labels([4, 2], [3] * 2)
    out = T.ours_forward(ours, x, labels)
    terms, ref_loss = T.reference_loss(hf, x, labels)
    assert list(out.loss_dict) == list(terms), "loss_dict keys or their order differ"
    diffs = {k: abs(out.loss_dict[k].item() - v.item()) for k, v in terms.items()}
    diffs["loss"] = abs(out.loss.item() - ref_loss.item())
    out.loss.backward()
    ref_loss.backward()
    return diffs | {"gradients": T.compare_gradients(ours, hf)[0]}


CASES = {"gdino-tiny": gdino_tiny, "gdino-mm": lambda: gdino_mm("mm_grounding_dino_tiny_o365v1_goldg"),
         "gdino-llmdet": lambda: gdino_mm("llmdet_base"), "dfine-s-obj365": lambda: dfine("s", "obj365"),
         **{f"dfine-{size}": lambda size=size: dfine(size) for size in "nsmlx"},
         "dfine-train": dfine_train, "gdino-train": gdino_train}  # the last two return diffs only


if __name__ == "__main__":
    threads = torch.get_num_threads()
    run = CASES[sys.argv[1]]()
    result = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": [threads, torch.get_num_threads()]}
    if isinstance(run, dict):  # training: per loss term and over the gradients
        print(json.dumps(result | {"same_topk": True, "diffs": run}))
    else:
        mine, ref = run
        same_topk = torch.equal(mine["topk_indices"], ref["topk_indices"])
        diffs = {k: max_diff(mine[k], ref[k]) for k in ref if k != "topk_indices"} if same_topk else {}
        print(json.dumps(result | {"same_topk": same_topk, "diffs": diffs}))
