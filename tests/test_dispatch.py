"""Parity that does not depend on which kernels a CPU's libraries pick.

BLAS, oneDNN and ATen choose their kernels by CPU and by shape, and two kernels may add the same numbers in another
order. gdino.py and dfine.py run every GEMM, bmm, conv, sum and softmax on the shapes transformers uses, so whatever
kernel the libraries pick for one, they pick for both, and the outputs stay equal bit for bit. These tests check it on
the cases most sensitive to it (full-size Grounding DINO tiny, where the top-900 of 17821 tokens has near-ties; D-FINE
n and l), each in a fresh process: once with the libraries as they are, once held to AVX2 (what a CPU with AVX-512
and AMX otherwise never runs) and once to SSE4 with ATen's scalar kernels (what no current x86 CPU runs by itself,
so that every machine tests at least two dispatches), through MKL's GEMMs (MKL_ENABLE_INSTRUCTIONS, MKL_CBWR), ATen's
own kernels (ATEN_CPU_CAPABILITY) and oneDNN's convolutions (ONEDNN_MAX_CPU_ISA). The bar is 0.0 and the same top-k: a
difference of one ulp anywhere would show up here first. The thread count changes kernels too: every parity family
also runs at 1 thread (the machine's count above).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

RUN = Path(__file__).parent / "parity_run.py"
# MKL held to an older instruction set on an Intel CPU with AVX-512 rounds by more than the shapes: by its buffers'
# alignment (a 64 -> 1 Linear 1.9e-9 apart on bit-equal inputs, SSE4.2) and by its dynamic threads (AVX2: a process's
# first forward of D-FINE N 2e-7 from its second in the encoder, another top-300; MKL_DYNAMIC=FALSE alone removed it).
# MKL_CBWR=<set>,STRICT runs the same kernels independent of both, so the held dispatches compare operation against
# operation; the machine as it is ("default") is left as it is.
DISPATCH = {  # name -> the environment that holds the libraries to it, and the capability torch then reports
    "default": ({}, None),
    "avx2": ({"MKL_ENABLE_INSTRUCTIONS": "AVX2", "MKL_CBWR": "AVX2,STRICT", "ATEN_CPU_CAPABILITY": "avx2",
              "ONEDNN_MAX_CPU_ISA": "AVX2"}, "AVX2"),
    "sse4": ({"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "MKL_CBWR": "SSE4_2,STRICT", "ATEN_CPU_CAPABILITY": "default",
              "ONEDNN_MAX_CPU_ISA": "SSE41"}, "DEFAULT"),
}
HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # torch's intra-op count and MKL's
TRAIN_ATOL = {"loss": 1e-5, "gradients": 1e-4}  # the training tests' bars (measured: terms 0.0, gradients <= 2e-6)


def parity_run(case: str, forced: dict) -> dict:
    """tests/parity_run.py CASE in a fresh process, the libraries as `forced` holds them, at the machine's thread
    count unless `forced` sets one."""
    drop = (*DISPATCH["avx2"][0], *THREAD_VARIABLES)
    env = {k: v for k, v in os.environ.items() if k not in drop} | forced
    done = subprocess.run([sys.executable, str(RUN), case], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["default", "sse4", pytest.param("avx2", marks=pytest.mark.skipif(
    not HAS_AVX2, reason="the CPU has no AVX2 to hold the libraries to"))])
@pytest.mark.parametrize("case", ["gdino-tiny", "dfine-n", "dfine-l"])
def test_bit_parity_under_cpu_dispatch(case, dispatch):
    forced, capability = DISPATCH[dispatch]
    result = parity_run(case, forced)
    if capability:
        assert result["capability"] == capability, f"{forced} did not take: torch runs {result['capability']}"
    assert result["threads"][0] == result["threads"][1], f"the thread count changed midway: {result['threads']}"
    assert result["same_topk"], f"{case} ({dispatch}): the top-k query selection differs from transformers'"
    worst = {k: v for k, v in result["diffs"].items() if v != 0.0}
    assert not worst, f"{case} ({dispatch}): stages that are not bit-equal to transformers': {worst}"


ONE_THREAD = ["dfine-n", "dfine-s", "dfine-m", "dfine-l", "dfine-x", "dfine-s-obj365", "gdino-tiny", "gdino-mm",
              "gdino-llmdet", "dfine-train", "gdino-train"]


@pytest.fixture(scope="module")
def one_thread_runs(request):
    """The selected cases of the test below, started together, as many at a time as the machine has cores: each runs
    on one, so together they take about 1 / cores of the time one after another."""
    cases = [item.callspec.params["case"] for item in request.session.items
             if item.originalname == "test_parity_on_one_thread"]
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    try:
        yield {case: pool.submit(parity_run, case, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
               for case in cases}
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure under -x, start no more


@pytest.mark.slow
@pytest.mark.parametrize("case", ONE_THREAD)
def test_parity_on_one_thread(case, one_thread_runs):
    """Every parity family at 1 thread under the default dispatch (the test above runs the machine's count): other
    thread counts make other blocks for a convolution or a GEMM, and a kernel that changed the count midway (numba's
    thread pool did, kernels.py) would round the ops after it otherwise than transformers. Inference bit-equal at
    every stage; training within the training tests' bars, per loss term and over every parameter's gradient."""
    result = one_thread_runs[case].result()
    assert result["threads"] == [1, 1], f"torch ran at {result['threads']} threads (start, end), not 1"
    assert result["same_topk"], f"{case} (1 thread): the top-k query selection differs from transformers'"
    train = case.endswith("train")
    worst = {k: v for k, v in result["diffs"].items() if v > (TRAIN_ATOL.get(k, TRAIN_ATOL["loss"]) if train else 0.0)}
    assert not worst, f"{case} (1 thread): not within the bar of transformers': {worst}"
