"""Parity that does not depend on which kernels a CPU's libraries pick.

BLAS, oneDNN and ATen choose their kernels by CPU and by shape, and two kernels may add the same numbers in another
order. gdino.py and dfine.py run every GEMM, bmm, conv, sum and softmax on the shapes transformers uses, so whatever
kernel the libraries pick for one, they pick for both, and the outputs stay equal bit for bit. These tests check it on
the cases most sensitive to it (full-size Grounding DINO tiny, where the top-900 of 17821 tokens has near-ties; D-FINE
N and L), each in a fresh process: once with the libraries as they are, once held to AVX2 (what a CPU with AVX-512
and AMX otherwise never runs) and once to SSE4 with ATen's scalar kernels (what no current x86 CPU runs by itself,
so that every machine tests at least two dispatches), through MKL's GEMMs (MKL_ENABLE_INSTRUCTIONS), ATen's own
kernels (ATEN_CPU_CAPABILITY) and oneDNN's convolutions (ONEDNN_MAX_CPU_ISA). The bar is 0.0 and the same top-k: a
difference of one ulp anywhere would show up here first.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RUN = Path(__file__).parent / "parity_run.py"
DISPATCH = {  # name -> the environment that holds the libraries to it, and the capability torch then reports
    "default": ({}, None),
    "avx2": ({"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, "AVX2"),
    "sse4": ({"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
             "DEFAULT"),
}
HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["default", "sse4", pytest.param("avx2", marks=pytest.mark.skipif(
    not HAS_AVX2, reason="the CPU has no AVX2 to hold the libraries to"))])
@pytest.mark.parametrize("case", ["gdino-tiny", "dfine-n", "dfine-l"])
def test_bit_parity_under_cpu_dispatch(case, dispatch):
    forced, capability = DISPATCH[dispatch]
    env = {k: v for k, v in os.environ.items() if k not in DISPATCH["avx2"][0]} | forced
    done = subprocess.run([sys.executable, str(RUN), case], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if capability:
        assert result["capability"] == capability, f"{forced} did not take: torch runs {result['capability']}"
    assert result["same_topk"], f"{case} ({dispatch}): the top-k query selection differs from transformers'"
    worst = {k: v for k, v in result["diffs"].items() if v != 0.0}
    assert not worst, f"{case} ({dispatch}): stages that are not bit-equal to transformers': {worst}"
