"""Speed and memory, ours next to transformers on the same weights and input: `python tests/benchmark.py`.

For each model: the forward time of ours and of transformers in one process (median and min-max of --runs runs, taken
in turns, each after an untimed run of the same model), their ratio (the median of each turn's ratio), ours split by
stage, the GFLOP/s ours achieves (FLOPs counted by torch's FlopCounterMode: matmuls and convolutions, not grid_sample
or elementwise ops), and the peak RSS of each, each measured in a fresh process of its own. The weights are the tests'
reference checkpoints (random, the real configs: same FLOPs as the real ones); nothing is timed inside pytest.
`dfine-<size>-fast` rows time ours after dfine.fast_inference (other rounding; see dfine.py section 11).
`dfine-n-train` times one training step's forward + backward (train mode, labels, denoising queries; no optimizer
step) at 320x320, batch 8, 3 objects per image; `gdino-tiny-train` the same for Grounding DINO tiny at 320x426,
batch 1, 3 objects. `--quick` runs D-FINE nano twice for a smoke test (tests/test_benchmark.py), and the rows below
on the tests' small Grounding DINO.
`--reuse`: Grounding DINO detect on ten prompts x one image and one prompt x ten images, with and without
encode_image / encode_prompt. `--bf16-rss`: our peak RSS in float32 and in bfloat16. `--device cuda` (with `--backend
numba|torch` for ours, `--dtype`): the GPU rows, TF32 off (tests/gpu_check.sh runs them). `--kernels`: the
deformable attention alone at the models' shapes, the readable version (common.py) against kernels.py's Numba kernels,
forward and forward + backward, on the CPU and on CUDA where there is one.
`--engines`: D-FINE N and L at 640x640 and Grounding DINO tiny at 800x1066 (the cats photo, the test weights) through
each engine a user can pick: ours (default), ours after fast_inference (fast), torch.compile of ours (compiled,
inductor; the first call, which compiles, reported apart), our ONNX export (fixed to the input's size) in onnxruntime
with one intra-op thread per core, for D-FINE also the export of ours after fast_inference (onnx-fast), and
transformers. Per model all engines are built in one process and called
once (timed apart), then --runs turns of one timed call each, right after an untimed one of the same engine; ratios
are to transformers' median; each engine's peak RSS is that of a fresh process that builds and calls only it
(--no-rss skips them).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

TESTS = Path(__file__).parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import common  # noqa: E402
from conftest import DATA  # noqa: E402

CATS = DATA / "coco_000000039769.png"
PROMPT = "a cat. a remote control."
WORDS = ["cat", "remote control", "sofa", "blanket", "cup", "spoon", "wall", "floor", "table", "plate"]
DEVICE, BACKEND, DTYPE = torch.device("cpu"), "auto", torch.float32  # set by main: --device, --backend, --dtype
DFINE_SIZES = ["n", "s", "m", "l", "x"]
GDINO_CONFIGS = {"gdino-tiny": "grounding-dino-tiny", "mm-gdino-tiny": "mm_grounding_dino_tiny_o365v1_goldg"}


def timed(fns, runs: int) -> list[list[float]]:
    """Run the functions in turns (a, b, a, b, ...) so a change in the machine's load hits both alike. Each timed
    run follows an untimed run of the same function: the heap then has that model's own shape, not the other's
    (right after the other model the same forward took up to 20% more or less time, from page faults)."""
    out = [[] for _ in fns]
    for _ in range(runs):
        for fn, times in zip(fns, out):
            fn()  # settles the allocator for this model (and, the first time, first-call costs)
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return out


# -----------------------------------------------------------------------------
# Each model: build ours and theirs on one checkpoint, their inputs, and our stage-by-stage calls


def dfine_case(size: str, build=("ours", "theirs"), fast: bool = False):
    import dfine
    from dfine_reference import checkpoint, hf_model

    folder = checkpoint(size)
    ours = dfine.DFine.from_pretrained(folder, backend=BACKEND, dtype=DTYPE).to(DEVICE) if "ours" in build else None
    ours = dfine.fast_inference(ours) if fast and ours is not None else ours
    theirs = hf_model(folder).to(DEVICE, DTYPE) if "theirs" in build else None
    px = dfine.preprocess([common.load_image(CATS)]).to(DEVICE, DTYPE)

    def stages():
        t = {}
        clock = time.perf_counter()
        maps = ours.backbone(px)
        t["backbone"], clock = time.perf_counter() - clock, time.perf_counter()
        feats = ours.encode(maps)
        t["encoder"], clock = time.perf_counter() - clock, time.perf_counter()
        q = ours.select_queries(feats)
        t["query selection"], clock = time.perf_counter() - clock, time.perf_counter()
        ours.decoder(q["target"], q["init_reference_points"], q["memory"], q["spatial_shapes"], ours.backend)
        t["decoder + heads"] = time.perf_counter() - clock
        return t

    return ours, lambda: ours(px), lambda: theirs(pixel_values=px), stages


def dfine_train_case(size: str, build=("ours", "theirs")):
    """forward + backward of a training step, both models in train mode on the same batch and denoising seed."""
    import dfine
    from dfine_reference import checkpoint, hf_model

    folder = checkpoint(size)
    ours = dfine.DFine.from_pretrained(folder).train() if "ours" in build else None
    theirs = hf_model(folder).train() if "theirs" in build else None
    g = torch.Generator().manual_seed(0)
    px = torch.rand(8, 3, 320, 320, generator=g)
    labels = [{"class_labels": torch.randint(0, 80, (3,), generator=g),
               "boxes": torch.cat([torch.rand(3, 2, generator=g) * 0.5 + 0.25, torch.rand(3, 2, generator=g) * 0.3
                                   + 0.1], dim=1)} for _ in range(8)]

    def step(model, **inputs):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        model(**inputs, labels=labels).loss.backward()

    return (ours, lambda: step(ours, pixel_values=px), lambda: step(theirs, pixel_values=px), None)


def gdino_case(name: str, build=("ours", "theirs")):
    import gdino
    import gdino_reference as R
    from conftest import hub_config

    # the tests' own reference checkpoints (same cache): tiny in the Hub's key layout, MM tiny as built
    if name == "gdino-small":  # the tests' small checkpoint (320/533 resize): for --quick
        folder = R.checkpoint("gdino-small", R.small_config(), temper=True,
                              size={"shortest_edge": 320, "longest_edge": 533})
    elif name == "gdino-tiny":
        folder = R.checkpoint("gdino-tiny", hub_config(GDINO_CONFIGS[name]), hub_layout=True)
    else:
        folder = R.checkpoint(f"mm-{GDINO_CONFIGS[name]}", hub_config(GDINO_CONFIGS[name]))
    ours = (gdino.GroundingDino.from_pretrained(folder, backend=BACKEND, dtype=DTYPE).to(DEVICE) if "ours" in build
            else None)
    theirs = R.load(folder, DTYPE).to(DEVICE) if "theirs" in build else None
    size = (320, 533) if name == "gdino-small" else (800, 1333)  # 800x1066, as the Hub processor
    pixel_values, pixel_mask, _ = gdino.preprocess_images([CATS], *size)
    inputs = {"pixel_values": pixel_values.to(DTYPE), "pixel_mask": pixel_mask,
              **gdino.tokenize(gdino.load_tokenizer(folder), [PROMPT])}
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    pixel_values, pixel_mask = inputs["pixel_values"], inputs["pixel_mask"]

    def stages():
        t, clock = {}, time.perf_counter()

        def lap(name):
            nonlocal clock
            t[name], clock = time.perf_counter() - clock, time.perf_counter()

        maps = ours.backbone(pixel_values)
        lap("backbone")
        text = ours.encode_text(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
        lap("text")
        lv = ours.prepare_levels(maps, pixel_mask)
        memory, text_feats = ours.encoder(lv, text, ours.backend)
        lap("encoder")
        sel = ours.select_queries(memory, lv, text_feats, text["token_mask"])
        lap("query selection")
        target = ours.query_position_embeddings.weight[None]  # (1, Q, 256)
        hidden, refs = ours.decoder(target, sel["init_reference_points"], memory, lv, text_feats, text["token_mask"],
                                    ours.box_head, ours.backend)
        lap("decoder")
        ours.predict(hidden, sel["init_reference_points"], refs, text_feats, text["token_mask"])
        lap("heads")
        return t

    return ours, lambda: ours(**inputs), lambda: theirs(**inputs), stages


def gdino_train_case(build=("ours", "theirs")):
    """forward + backward of a training step of Grounding DINO tiny at 320x426, batch 1, train mode."""
    import gdino
    import gdino_reference as R
    from conftest import hub_config

    folder = R.checkpoint("gdino-tiny", hub_config("grounding-dino-tiny"), hub_layout=True)
    ours = gdino.GroundingDino.from_pretrained(folder).train() if "ours" in build else None
    theirs = R.load(folder).train() if "theirs" in build else None
    pixel_values, pixel_mask, _ = gdino.preprocess_images([CATS], shortest=320, longest=533)  # 320x426
    inputs = {"pixel_values": pixel_values, "pixel_mask": pixel_mask,
              **gdino.tokenize(gdino.load_tokenizer(folder), [PROMPT])}
    labels = [{"class_labels": torch.tensor([0, 0, 1]),
               "boxes": torch.tensor([[0.25, 0.5, 0.45, 0.9], [0.75, 0.4, 0.45, 0.75], [0.2, 0.2, 0.2, 0.1]])}]

    def step(model):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks on every run
        model(**inputs, labels=labels).loss.backward()

    return ours, lambda: step(ours), lambda: step(theirs), None


def case(name: str, build=("ours", "theirs")):
    """gdino-tiny, mm-gdino-tiny, gdino-small (the tests' small checkpoint), gdino-tiny-train, dfine-<size>,
    dfine-<size>-fast (ours after dfine.fast_inference), or dfine-<size>-train (a training step's forward +
    backward)."""
    if name.startswith("dfine-") and name.endswith("-train"):
        return dfine_train_case(name.split("-")[1], build)
    if name == "gdino-tiny-train":
        return gdino_train_case(build)
    if name.startswith("dfine-"):
        return dfine_case(name.split("-")[1], build, fast=name.endswith("-fast"))
    return gdino_case(name, build)


# -----------------------------------------------------------------------------
# Peak RSS: each implementation alone in a fresh process (a shared process would report the larger of the two)


def rss_child(name: str, impl: str, dtype: str = "float32") -> None:
    """Build only `impl`, run it once, report the process's peak resident memory. VmHWM, not ru_maxrss: on Linux
    ru_maxrss survives exec, so a child would report its parent's peak."""
    global DTYPE
    DTYPE = getattr(torch, dtype)
    _, run_ours, run_theirs, _ = case(name, build=(impl,))
    with mode(name):
        (run_ours if impl == "ours" else run_theirs)()
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"peak_rss_mb": int(hwm.split()[1]) / 1024}))


def peak_rss(name: str, impl: str, dtype: str = "float32") -> float:
    r = subprocess.run([sys.executable, __file__, "--rss-child", name, impl, dtype], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"RSS child for {name}/{impl} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def mode(name: str):
    """Inference rows run under inference_mode, as detect does; training rows need autograd."""
    return contextlib.nullcontext() if name.endswith("-train") else torch.inference_mode()


def synced(fn):
    """fn, then wait for the GPU: CUDA calls return before the work is done."""
    return (lambda: (fn(), torch.cuda.synchronize())) if DEVICE.type == "cuda" else fn


def bench(name: str, runs: int, rss: bool) -> dict:
    ours, run_ours, run_theirs, stages = case(name)
    run_ours, run_theirs = synced(run_ours), synced(run_theirs)
    with mode(name):
        t_ours, t_theirs = timed([run_ours, run_theirs], runs)
        split = [stages() for _ in range(runs)] if stages else [{}]
        gflop = flops(run_ours) / 1e9
    med = statistics.median(t_ours)
    row = {"model": name, "ours_s": med, "ours_min": min(t_ours), "ours_max": max(t_ours),
           "theirs_s": statistics.median(t_theirs), "theirs_min": min(t_theirs), "theirs_max": max(t_theirs),
           # the ratio of each turn's two runs, which ran seconds apart: a slow spell of the machine cancels out
           "ratio": statistics.median(pairs := [a / b for a, b in zip(t_ours, t_theirs)]),
           "ratio_min": min(pairs), "ratio_max": max(pairs), "gflop": gflop, "gflops": gflop / med,
           "stages": {k: statistics.median(s[k] for s in split) for k in split[0]}}
    if rss:
        row["ours_rss_mb"], row["theirs_rss_mb"] = peak_rss(name, "ours"), peak_rss(name, "theirs")
    return row


def reuse_rows(name: str, n: int, runs: int) -> list[dict]:
    """n prompts on one image and one prompt on n images (the photos in turn): detect each time from scratch, and
    with the image's backbone (encode_image) or the prompt's BERT (encode_prompt) computed once, in the timing."""
    from conftest import PHOTOS

    ours = case(name, build=("ours",))[0]
    size = (320, 533) if name == "gdino-small" else None
    images = [common.load_image(DATA / PHOTOS[i % len(PHOTOS)]) for i in range(n)]
    prompts = [f"a {WORDS[i % 10]}. a {WORDS[(i + 1) % 10]}." for i in range(n)]

    def prompts_plain():
        return [ours.detect(images[0], p, size=size) for p in prompts]

    def prompts_reused():
        image = ours.encode_image(images[0], size)
        return [ours.detect(image, p) for p in prompts]

    def images_plain():
        return [ours.detect(im, PROMPT, size=size) for im in images]

    def images_reused():
        prompt = ours.encode_prompt(PROMPT)
        return [ours.detect(im, prompt, size=size) for im in images]

    rows = []
    for task, plain, reused in ((f"{n} prompts x 1 image", prompts_plain, prompts_reused),
                                (f"1 prompt x {n} images", images_plain, images_reused)):
        t_plain, t_reused = timed([synced(plain), synced(reused)], runs)
        rows.append({"model": name, "task": task, "plain_s": statistics.median(t_plain),
                     "reused_s": statistics.median(t_reused)})
    return rows


def print_reuse(rows: list[dict]) -> None:
    print(f"\nencode once, query many: detect's total time, median of the turns ({DEVICE.type}, {DTYPE})")
    print(f"{'model':<14} {'task':<22} {'plain s':>9} {'reused s':>9} {'saved':>7}")
    for r in rows:
        print(f"{r['model']:<14} {r['task']:<22} {r['plain_s']:>9.3f} {r['reused_s']:>9.3f} "
              f"{1 - r['reused_s'] / r['plain_s']:>7.0%}")


def print_table(rows: list[dict]) -> None:
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {DTYPE}, batch 1 (dfine-n-train: 8), "
          f"median of the turns, {torch.cuda.get_device_name(DEVICE) if DEVICE.type == 'cuda' else 'cpu'}, ours with "
          f"backend {BACKEND}")
    print(f"{'model':<14} {'ours s (min-max)':>22} {'transformers s (min-max)':>26} {'ratio (min-max)':>17} "
          f"{'GFLOP':>7} {'GFLOP/s':>8} {'RSS ours/theirs MB':>19}")
    for r in rows:
        rss = f"{r['ours_rss_mb']:.0f}/{r['theirs_rss_mb']:.0f}" if "ours_rss_mb" in r else "-"
        print(f"{r['model']:<14} {r['ours_s']:>8.3f} ({r['ours_min']:.3f}-{r['ours_max']:.3f}) "
              f"{r['theirs_s']:>10.3f} ({r['theirs_min']:.3f}-{r['theirs_max']:.3f}) "
              f"{r['ratio']:>5.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) "
              f"{r['gflop']:>7.1f} {r['gflops']:>8.1f} {rss:>19}")
    print("\nours by stage (median s):")
    for r in rows:
        print(f"  {r['model']:<14} " + ", ".join(f"{k} {v:.3f}" for k, v in r["stages"].items()))


# -----------------------------------------------------------------------------
# --engines: each engine alone in a fresh process: build, a first call (compiles), timed runs, peak RSS

ENGINES = ["default", "fast", "compiled", "onnxruntime", "onnx-fast", "transformers"]  # onnx-fast: D-FINE only


def engine_inputs(name: str) -> dict:
    """The forward's inputs by name, as case() builds them: the cats photo, 640x640 or resized to 800x1066."""
    import dfine
    import gdino
    import gdino_reference as R
    from conftest import hub_config

    if name.startswith("dfine-"):
        return {"pixel_values": dfine.preprocess([common.load_image(CATS)])}
    tokenizer = gdino.load_tokenizer(R.checkpoint(name, hub_config(GDINO_CONFIGS[name]), hub_layout=True))
    pixel_values, pixel_mask, _ = gdino.preprocess_images([CATS], 800, 1333)
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, **gdino.tokenize(tokenizer, [PROMPT])}


def export_child(name: str, path: str, engine: str = "onnxruntime") -> None:
    import dfine

    ours = case(name, build=("ours",))[0]
    if engine == "onnx-fast":
        dfine.fast_inference(ours)
    ours.export_onnx(path, tuple(engine_inputs(name)["pixel_values"].shape[-2:]))


def engine_fn(name: str, engine: str, onnx_path: str):
    """A call of `engine` on the model's input, built alone (a model of its own: fast and compiled change theirs)."""
    import dfine
    import gdino

    if engine in ("onnxruntime", "onnx-fast"):
        path = onnx_path.replace(".onnx", "-fast.onnx") if engine == "onnx-fast" else onnx_path
        model, inputs = common.OnnxModel(path, threads=os.cpu_count()), engine_inputs(name)
        return lambda: model(**inputs)
    ours, run_ours, run_theirs, _ = case(name, build=("theirs",) if engine == "transformers" else ("ours",))
    if engine == "fast":
        (dfine if name.startswith("dfine-") else gdino).fast_inference(ours)  # in place: run_ours runs it
    if engine == "compiled":
        ours.forward = torch.compile(ours.forward)
    return run_theirs if engine == "transformers" else run_ours


def engine_child(name: str, engine: str, onnx_path: str) -> None:
    """Peak RSS of one engine alone: build it, call it twice (the first call compiles), print JSON."""
    fn = engine_fn(name, engine, onnx_path)
    with torch.inference_mode():
        fn(), fn()
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"rss_mb": int(hwm.split()[1]) / 1024}))


def child(*args: str) -> dict | None:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else None


def bench_engines(names: list[str], engines: list[str], runs: int, rss: bool) -> list[dict]:
    """Per model: every engine built in this process and called once (compiling; timed apart), then `runs` turns of one
    timed call each, right after an untimed one of the same engine, in turns (a change in the machine's load hits all
    alike); peak RSS in fresh processes."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = str(Path(tmp) / f"{name}.onnx")
            model_engines = [e for e in engines if e != "onnx-fast" or name.startswith("dfine-")]
            if "onnxruntime" in model_engines:
                child("--export-child", name, path)
            if "onnx-fast" in model_engines:
                child("--export-child", name, path.replace(".onnx", "-fast.onnx"), "onnx-fast")
            fns, first = {e: engine_fn(name, e, path) for e in model_engines}, {}
            with torch.inference_mode():
                for e, fn in fns.items():
                    t = time.perf_counter()
                    fn()
                    first[e] = time.perf_counter() - t
                times = {e: [] for e in model_engines}
                for _ in range(runs):
                    for e, fn in fns.items():
                        fn()  # untimed: the timed call runs on the heap its own engine left, not another's
                        t = time.perf_counter()
                        fn()
                        times[e].append(time.perf_counter() - t)
            del fns
            rows += [{"model": name, "engine": e, "first_s": first[e], "s": statistics.median(times[e]),
                      "min": min(times[e]), "max": max(times[e]),
                      "rss_mb": child("--engine-child", name, e, path)["rss_mb"] if rss else None}
                     for e in model_engines]
            print_engines([r for r in rows if r["model"] == name], runs)  # each model as it is done: runs are long
    return rows


def print_engines(rows: list[dict], runs: int) -> None:
    print(f"\nengines: torch {torch.__version__}, {torch.get_num_threads()} threads, onnxruntime on {os.cpu_count()}, "
          f"float32, batch 1, median of {runs} turns after a first call, load average {os.getloadavg()[0]:.1f}")
    print(f"{'model':<12} {'engine':<13} {'s (min-max)':>22} {'x transformers':>15} {'first call s':>13} "
          f"{'peak RSS MB':>12}")
    for r in rows:
        base = next((b["s"] for b in rows if b["engine"] == "transformers"), None)
        ratio = f"{r['s'] / base:.2f}" if base else "-"
        rss_mb = f"{r['rss_mb']:.0f}" if r["rss_mb"] else "-"
        print(f"{r['model']:<12} {r['engine']:<13} {r['s']:>8.3f} ({r['min']:.3f}-{r['max']:.3f}) {ratio:>15} "
              f"{r['first_s']:>13.1f} {rss_mb:>12}", flush=True)


# -----------------------------------------------------------------------------
# --autocast: training steps of the two recipes trained here (notebooks/train_*.ipynb), float32 against bfloat16
# autocast, from the same weights on the same batches: seconds a step and the loss each gives


def recipe(name: str):
    """The notebooks' model, from the same seed, and its step -> batch function (shape scenes)."""
    import dfine
    import gdino

    sys.path.insert(0, str(TESTS.parent / "notebooks"))
    import shapes

    config = json.loads((TESTS / "data" / "configs" / ("dfine_n_coco.json" if name == "dfine-n" else
                                                       "grounding-dino-tiny.json")).read_text())
    torch.manual_seed(0)
    if name == "dfine-n":  # train_dfine.ipynb: nano, 12 classes, learning batch norms, 320x320, batch 8
        config.update(id2label={str(k): p for k, p in enumerate(shapes.SHAPE_PHRASES)},
                      label2id={p: k for k, p in enumerate(shapes.SHAPE_PHRASES)}, freeze_backbone_batch_norms=False)
        model = dfine.DFine(dfine.DFineConfig.from_dict(config))
        return model, lambda t: dict(zip(["pixel_values", "labels"], shapes.dfine_batch(range(8 * t, 8 * t + 8),
                                                                                          (320, 320))))
    config["backbone_config"].update(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[2, 4, 8, 16], window_size=8,
                                     drop_path_rate=0.0)  # train_gdino.ipynb's small model, 256x256, batch 4
    config["text_config"].update(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=192,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config.update(d_model=96, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
                  encoder_ffn_dim=384, decoder_ffn_dim=384, num_queries=100, auxiliary_loss=True, dropout=0.0,
                  fusion_droppath=0.0)
    model = gdino.GroundingDino(gdino.GroundingDinoConfig.from_dict(config))
    model.tokenizer = gdino.load_tokenizer(TESTS / "data" / "grounding-dino-tiny")
    return model, lambda t: shapes.gdino_batch(model, range(4 * t, 4 * t + 4), 256, np.random.default_rng(t))


def bench_autocast(steps: int) -> None:
    print(f"\ntraining steps (forward, loss, backward, AdamW), {torch.get_num_threads()} threads, {steps} steps from "
          f"the same weights and batches; the first 2 untimed")
    for name in ["dfine-n", "gdino-small"]:
        model, batch = recipe(name)
        batches = [batch(t) for t in range(steps)]
        runs = {}
        for bf16 in (False, True):
            m = copy.deepcopy(model).train()
            opt = torch.optim.AdamW(m.parameters(), lr=2e-4, weight_decay=1e-4)
            torch.manual_seed(1)  # the same denoising noise
            times, losses = [], []
            for b in batches:
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = m(**b).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                times.append(time.perf_counter() - t)
                losses.append(loss.item())
            runs[bf16] = statistics.median(times[2:]), losses
        (s32, l32), (s16, l16) = runs[False], runs[True]
        print(f"{name:<12} s/step float32 {s32:.2f}, bfloat16 autocast {s16:.2f} ({s16 / s32:.2f}x); loss float32 "
              f"{l32[0]:.2f} -> {l32[-1]:.2f}, bfloat16 {l16[0]:.2f} -> {l16[-1]:.2f}, at most "
              f"{max(abs(a - b) for a, b in zip(l32, l16)):.2f} apart")


# -----------------------------------------------------------------------------
# --kernels: the deformable attention alone, the readable version (common.py) and kernels.py's Numba kernels

KERNEL_SHAPES = [  # name, spatial shapes, Q, nH, hD, points per level (B = 1 throughout)
    ("Grounding DINO encoder", [(100, 134), (50, 67), (25, 34), (13, 17)], 17821, 8, 32, [4, 4, 4, 4]),
    ("Grounding DINO decoder", [(100, 134), (50, 67), (25, 34), (13, 17)], 900, 8, 32, [4, 4, 4, 4]),
    ("D-FINE L decoder", [(80, 80), (40, 40), (20, 20)], 300, 8, 32, [3, 6, 3]),
    ("D-FINE nano decoder", [(40, 40), (20, 20)], 300, 8, 16, [6, 6]),
]


def kernel_inputs(shapes, Q: int, nH: int, hD: int, points, encoder: bool, device: torch.device):
    """Inputs like the models': each point a few pixels (normal, sd 2) from its query's reference point, which is
    the query's own token centre in the encoder and a box centre anywhere on the image in a decoder. Where the
    points fall matters: spread uniformly they would miss the caches and run the kernel 2-3x slower."""
    g = torch.Generator().manual_seed(0)
    S, P = sum(h * w for h, w in shapes), sum(points)
    centres = [torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h, indexing="xy"),
                           -1).reshape(h * w, 2) for h, w in shapes]  # L x (H_l*W_l, 2) as x, y
    ref = torch.cat(centres) if encoder else torch.rand(Q, 2, generator=g)  # (Q, 2)
    size = torch.tensor([[w, h] for (h, w), n in zip(shapes, points) for _ in range(n)], dtype=torch.float32)  # (P, 2)
    loc = ref[:, None, None, :] + 2 * torch.randn(Q, nH, P, 2, generator=g) / size  # (Q, nH, P, 2)
    value, attn = torch.randn(1, S, nH, hD, generator=g), torch.randn(1, Q, nH, P, generator=g).softmax(-1)
    grad = torch.randn(1, Q, nH * hD, generator=g)
    return [x.to(device).requires_grad_(i < 3) for i, x in enumerate((value, loc[None], attn, grad))]


def kernel_timings(fn, device: torch.device, runs: int) -> list[float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # CUDA calls return before they finish
    fn()  # warm-up: compiles, allocates, fills caches
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def bench_kernels(runs: int) -> None:
    import numba

    import kernels

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__} on {torch.get_num_threads()} threads, numba {numba.__version__} on "
          f"{numba.get_num_threads()}; float32; {runs} runs after a warm-up; load average {os.getloadavg()[0]:.1f}")
    times = {}  # (shape, device, pass, version) -> ms
    # all readable rows first: once numba's threads exist (a second OpenMP runtime beside torch's), the two pools
    # compete for the cores and torch's small ops were seen to slow down many times over on a 2-core machine
    versions = (("readable", common.ms_deform_attn_torch),
                ("numba", lambda *a: kernels.ms_deform_attn(*a, readable=common.ms_deform_attn_torch)))
    for version, f in versions:
        for name, shapes, Q, nH, hD, points in KERNEL_SHAPES:
            for dev in devices:
                value, loc, attn, grad = kernel_inputs(shapes, Q, nH, hD, points, "encoder" in name, dev)
                with torch.no_grad():
                    times[name, dev.type, "forward", version] = kernel_timings(
                        lambda: f(value, shapes, points, loc, attn), dev, runs)
                times[name, dev.type, "fwd+bwd", version] = kernel_timings(
                    lambda: torch.autograd.backward(f(value, shapes, points, loc, attn), grad), dev, runs)
    print(f"{'shape':24}{'device':7}{'pass':9}{'version':10}{'median ms':>11}{'min-max ms':>19}{'speed-up':>10}")
    for name, dev, pass_, _ in [key for key in times if key[3] == "readable"]:
        for version in ("readable", "numba"):
            t = times[name, dev, pass_, version]
            ratio = statistics.median(times[name, dev, pass_, "readable"]) / statistics.median(t)
            print(f"{name:24}{dev:7}{pass_:9}{version:10}{statistics.median(t):11.2f}"
                  f"{f'{min(t):.2f}-{max(t):.2f}':>19}{f'{ratio:.1f}x':>10}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="subset, e.g. dfine-n gdino-tiny (default: all)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="D-FINE nano, 2 runs, no RSS: a smoke test")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--rss-only", action="store_true", help="only the peak RSS of ours and theirs")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--reuse", action="store_true", help="only the encode-once rows (gdino-tiny unless named)")
    ap.add_argument("--bf16-rss", action="store_true", help="only our peak RSS in float32 and bfloat16")
    ap.add_argument("--kernels", action="store_true", help="only the deformable attention, the readable version and "
                    "kernels.py's, at the models' shapes, forward and backward (CPU, and CUDA where there is one)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (TF32 off)")
    ap.add_argument("--backend", default="auto", choices=common.BACKENDS, help="our deformable attention's")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--engines", action="store_true", help="only the engines: default, fast, compiled, onnxruntime, "
                    "onnx-fast (D-FINE), transformers on dfine-n, dfine-l, gdino-tiny (--quick: dfine-n without "
                    "compiled, 1 run)")
    ap.add_argument("--autocast", type=int, metavar="STEPS", help="only training steps of the recipes trained here "
                    "(D-FINE N, the small Grounding DINO), float32 against bfloat16 autocast, STEPS each")
    ap.add_argument("--engine-child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--export-child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DEVICE, BACKEND, DTYPE
    DEVICE, BACKEND, DTYPE = torch.device(args.device), args.backend, getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # plain fp32 on GPUs
    if args.rss_child:
        rss_child(*args.rss_child)
        return 0
    if args.kernels:
        bench_kernels(args.runs)
        return 0
    if args.export_child:
        export_child(*args.export_child)
        return 0
    if args.engine_child:
        engine_child(*args.engine_child)
        return 0
    if args.autocast:
        if args.autocast < 3:
            ap.error("--autocast needs at least 3 steps: the first 2 are not timed")
        bench_autocast(args.autocast)
        return 0
    if args.engines:
        quick = args.quick
        engines = [e for e in ENGINES if e != "compiled"] if quick else ENGINES
        rows = bench_engines(["dfine-n"] if quick else args.models or ["dfine-n", "dfine-l", "gdino-tiny"], engines,
                             1 if quick else args.runs, not args.no_rss)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0
    if args.quick or args.reuse:
        reuse = reuse_rows("gdino-small", 2, 1) if args.quick else [
            r for n in (args.models or ["gdino-tiny"]) for r in reuse_rows(n, 10, args.runs)]
        print_reuse(reuse)
        if args.reuse:
            return 0
    if args.quick or args.bf16_rss:
        print("\npeak RSS of ours, float32 / bfloat16 (MB), each alone in a fresh process:")
        for n in ["gdino-small"] if args.quick else (args.models or [*GDINO_CONFIGS, "dfine-n", "dfine-l"]):
            print(f"{n:<14} {peak_rss(n, 'ours'):.0f} / {peak_rss(n, 'ours', 'bfloat16'):.0f}")
        if args.bf16_rss:
            return 0
    names = args.models or [*GDINO_CONFIGS, *(f"dfine-{s}{f}" for f in ("", "-fast") for s in DFINE_SIZES),
                            "dfine-n-train", "gdino-tiny-train"]
    if args.rss_only:
        for n in names:
            print(f"{n:<14} peak RSS ours {peak_rss(n, 'ours'):.0f} MB, transformers {peak_rss(n, 'theirs'):.0f} MB")
        return 0
    if args.quick:
        names, args.runs, args.no_rss = ["dfine-n"], 2, True
    rows = [bench(n, args.runs, not args.no_rss) for n in names]
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
