"""One parity run against transformers in a fresh process, so that tests/test_dispatch.py can start it with the
CPU libraries held to a dispatch (the environment must be set before torch is imported).

    python tests/parity_run.py gdino-tiny | dfine-n | dfine-l

prints one JSON line: the CPU capability torch runs, whether the top-k query indices are equal, and per stage the
max abs difference from transformers (every stage's tensors, all decoder layers, logits and boxes).
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


def dfine(size: str) -> tuple[dict, dict]:
    """The real config of dfine-{size}-coco on the three photos at 640x640, as one batch."""
    import dfine_reference as R
    from test_dfine import hf_forward

    import dfine

    folder = R.checkpoint(size)
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


if __name__ == "__main__":
    case = sys.argv[1]
    mine, ref = gdino_tiny() if case == "gdino-tiny" else dfine(case.split("-")[1])
    same_topk = torch.equal(mine["topk_indices"], ref["topk_indices"])
    diffs = {k: max_diff(mine[k], ref[k]) for k in ref if k != "topk_indices"} if same_topk else {}
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "same_topk": same_topk, "diffs": diffs}))
