"""kernels.py against the readable version (common.ms_deform_attn_torch): the output and all three gradients.

float64 first and tight, 1e-10: the kernels and grid_sample do the same arithmetic and differ only in the order
they add things up. Then float32 at 1e-5, except the CPU kernels, which copy torch's rounding and order of adds
(see the banner in kernels.py) and so equal the readable version bit for bit, forward and backward, which we check
with torch.equal on the x86 builds of torch whose arithmetic the banner describes. The reference gradients come from
torch autograd through the readable version.

The CUDA kernels run under numba's simulator (NUMBA_ENABLE_CUDASIM=1, which must be set before numba is imported,
hence a subprocess that runs this file) on tiny shapes, and on a real GPU at the real shapes (marked cuda).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numba
import numpy as np
import pytest
import torch

import kernels
from benchmark import KERNEL_SHAPES
from common import ms_deform_attn, ms_deform_attn_torch

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


def special_locations(shapes, points, Q: int, nH: int, g: torch.Generator) -> torch.Tensor:
    """(1, Q, nH, P, 2) locations on the rule's edge cases, per level: 0 and 1, pixel centres (k + 0.5) / W, pixel
    edges k / W, the centre of the pixel just outside (-0.5 / W: pixel coordinate -1 exactly), and beyond the map."""
    def candidates(size):  # along one axis of a map `size` pixels long
        return torch.tensor([0.0, 1.0, -0.5 / size, -1.0, 1.5] + [(k + 0.5) / size for k in range(size)]
                            + [k / size for k in range(size)])

    columns = []
    for (h, w), n in zip(shapes, points):
        xs, ys = candidates(w), candidates(h)
        pick_x = torch.randint(len(xs), (Q, nH, n), generator=g)
        pick_y = torch.randint(len(ys), (Q, nH, n), generator=g)
        columns.append(torch.stack([xs[pick_x], ys[pick_y]], -1))  # (Q, nH, P_l, 2)
    return torch.cat(columns, 2)[None]  # (1, Q, nH, P, 2)


def make_inputs(B, Q, nH, hD, shapes, points, dtype, locations="spread", seed=0):
    """value, sampling_locations, attention_weights; locations "spread" are uniform over [-0.25, 1.25]."""
    g = torch.Generator().manual_seed(seed)
    S, P = sum(h * w for h, w in shapes), sum(points)
    value = torch.randn(B, S, nH, hD, generator=g, dtype=torch.float64)
    if locations == "spread":
        loc = torch.rand(B, Q, nH, P, 2, generator=g, dtype=torch.float64) * 1.5 - 0.25
    else:
        loc = special_locations(shapes, points, Q, nH, g).expand(B, -1, -1, -1, -1).to(torch.float64)
    attn = torch.rand(B, Q, nH, P, generator=g, dtype=torch.float64).softmax(-1)
    return [x.to(dtype).contiguous() for x in (value, loc, attn)]


def value_and_grads(fn, value, shapes, points, loc, attn, grad_out=None):
    """fn's output and d(output . grad_out)/d(value, loc, attn)."""
    inputs = [x.detach().requires_grad_() for x in (value, loc, attn)]  # detach keeps the strides
    out = fn(inputs[0], shapes, points, inputs[1], inputs[2])
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out))
    return [out.detach(), *grads]


def assert_matches_readable(B, Q, nH, hD, shapes, points, dtype, locations="spread", seed=0):
    args = make_inputs(B, Q, nH, hD, shapes, points, dtype, locations, seed)
    ours = value_and_grads(kernels.ms_deform_attn, args[0], shapes, points, *args[1:])
    ref = value_and_grads(ms_deform_attn_torch, args[0], shapes, points, *args[1:])
    for name, a, b in zip(["output", "grad value", "grad locations", "grad attention"], ours, ref):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{name}: {m}")


# name: B, Q, nH, hD, spatial shapes (H, W), points per level
CASES = {
    "gdino-layout": (2, 5, 3, 7, [(5, 3), (3, 2), (2, 1), (1, 1)], [2, 2, 2, 2]),
    "dfine-layout": (1, 4, 2, 5, [(6, 4), (3, 5), (1, 1)], [3, 6, 3]),
    "dfine-nano-layout": (2, 3, 2, 4, [(4, 7), (2, 3)], [6, 6]),
    "one-pixel-levels": (1, 3, 2, 3, [(1, 1), (1, 1)], [2, 3]),
    "B=Q=1": (1, 1, 1, 3, [(2, 3)], [2]),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("locations", ["spread", "special"])
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_kernel_matches_readable(case, locations, dtype):
    assert_matches_readable(*CASES[case], dtype, locations)


TORCH_X86 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")  # the builds whose rounding we copy


@pytest.mark.skipif(not TORCH_X86, reason="the rule copies the rounding of torch's AVX2 kernels (also run on AVX512)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_sum_plan_is_torchs(dtype):
    """kernels.sum_plan, run step by step as the CPU forward runs it (here on (3,) rows, not (hD,)), adds up as
    torch's CPU sum over a contiguous last axis, for every length below 64 vectors."""
    width = kernels.SUM_VECTOR_BYTES // (4 if dtype == torch.float32 else 8)
    g = torch.Generator().manual_seed(0)
    for P in range(1, 64 * width):
        x = (torch.randn(3, P, generator=g) * torch.randn(3, P, generator=g).mul(4).exp()).to(dtype)  # wide range
        x = torch.cat([x, torch.zeros(3, 1, dtype=dtype)], 1)  # number P: the 0 that some steps add
        sums, z = [torch.zeros(3, dtype=dtype) for _ in range(3)], torch.full((3,), -0.0, dtype=dtype)  # s, r, acc
        for p, into, keep, add in kernels.sum_plan(P, width):
            other = sums[0] if into == 1 else sums[1]
            sums[into] = (sums[into] if keep else z) + ((other if add else z) + x[:, p])
        assert torch.equal(sums[2], x[:, :P].sum(-1)), f"P = {P}"


@pytest.mark.skipif(not TORCH_X86, reason="the rule copies the rounding of torch's AVX2 kernels (also run on AVX512)")
def test_float32_forward_equals_readable_bit_for_bit():
    """CASES, then a seeded loop over the models' point layouts and random ones (up to 36 points: vector sums and
    tails), odd maps and one-pixel levels, B up to 2, at locations spread over and beyond the map and on pixel centres,
    edges, 0 and 1; then a wide map, where a pixel coordinate rounded twice instead of once puts samples 5e-6 off."""
    rng = np.random.default_rng(0)
    layouts = [[4] * 4, [3, 6, 3], [6, 6]] + [[int(rng.integers(1, 10)) for _ in range(int(rng.integers(1, 5)))]
                                             for _ in range(27)]
    cases = list(CASES.values()) + [(*(int(rng.integers(1, k)) for k in (3, 9, 4, 9)),
                                     [(int(rng.integers(1, 10)), int(rng.integers(1, 10))) for _ in points], points)
                                    for points in layouts]
    for n, (B, Q, nH, hD, shapes, points) in enumerate(cases):
        for locations in ("spread", "special"):
            value, loc, attn = make_inputs(B, Q, nH, hD, shapes, points, torch.float32, locations, seed=n)
            ours = kernels.ms_deform_attn(value, shapes, points, loc, attn)
            ref = ms_deform_attn_torch(value, shapes, points, loc, attn)
            assert torch.equal(ours, ref), f"{shapes} {points} {locations}: max diff {(ours - ref).abs().max():.3g}"
    for points in ([4], [16], [12], [70]):  # 70: vector sums of several vectors, sum_plan's extra step
        shapes = [(100, 134)]
        value, loc, attn = make_inputs(2, 500, 2, 8, shapes, points, torch.float32)
        assert torch.equal(kernels.ms_deform_attn(value, shapes, points, loc, attn),
                           ms_deform_attn_torch(value, shapes, points, loc, attn)), f"{points} points on {shapes}"


@pytest.mark.skipif(not TORCH_X86, reason="the rule copies the rounding of torch's AVX2 kernels (also run on AVX512)")
def test_float32_backward_equals_readable_bit_for_bit():
    """The three gradients, torch.equal. The readable version's order of adds depends on B, nH and Q (its reshapes
    copy only when B, nH and Q all exceed 1) and on the level layout, so: the models' layouts at hD 32 and 16 with
    B 1 and 2, nH 1 and 3, Q 1 and more (steps of 8 points, sums over 32 columns and their tails); one level, one
    point per level; CASES; every case at locations spread over and beyond the map and on pixel centres and edges.
    Also the same strides, through common's dispatch (which hands kernels.py the readable version): layout decides
    how the ops downstream round (kernels.readable_grad_strides)."""
    layouts = [([(9, 7), (5, 4), (3, 2), (2, 1)], [4] * 4), ([(8, 6), (4, 3), (2, 2)], [3, 6, 3]),
               ([(7, 8), (4, 4)], [6, 6]), ([(6, 5)], [5]), ([(6, 5)], [12]), ([(5, 4), (2, 3)], [1, 2]),
               ([(4, 3)], [1])]
    cases = [(B, Q, nH, hD, shapes, points) for shapes, points in layouts for B, nH in ((1, 3), (2, 3), (2, 1))
             for Q, hD in ((1, 16), (11, 32), (7, 16))] + list(CASES.values())
    for n, (B, Q, nH, hD, shapes, points) in enumerate(cases):
        for locations in ("spread", "special"):
            args = make_inputs(B, Q, nH, hD, shapes, points, torch.float32, locations, seed=n)
            ours = value_and_grads(lambda *a: ms_deform_attn(*a, backend="numba"), args[0], shapes, points, *args[1:])
            ref = value_and_grads(ms_deform_attn_torch, args[0], shapes, points, *args[1:])
            for name, a, b in zip(["grad value", "grad locations", "grad attention"], ours[1:], ref[1:]):
                assert torch.equal(a, b), f"{name}, {B, Q, nH, hD} {shapes} {points} {locations}: " \
                    f"max diff {(a - b).abs().max():.3g}"
                layout = [[s for s, n in zip(x.stride(), x.shape) if n > 1] for x in (a, b)]  # size-1 dims: any
                assert layout[0] == layout[1], f"{name}: layout {a.stride()}, readable {b.stride()}"


def test_cpu_kernel_gradcheck():
    """Finite differences, one forward per input element: small, but with D-FINE's uneven points per level."""
    B, Q, nH, hD, shapes, points = 1, 2, 2, 2, [(2, 3), (2, 1), (1, 1)], [3, 6, 3]
    value, loc, attn = make_inputs(B, Q, nH, hD, shapes, points, torch.float64)
    inputs = [x.requires_grad_() for x in (value, loc, attn)]
    assert torch.autograd.gradcheck(lambda v, lo, a: kernels.ms_deform_attn(v, shapes, points, lo, a), inputs)


def test_random_shapes_match_readable():
    """Seeded loop over random shapes, layouts and locations, float64: 200 cases (2 s here), or fewer after 15 s."""
    rng = np.random.default_rng(0)
    start, n = time.perf_counter(), 0
    while n < 200 and time.perf_counter() - start < 15:
        L = int(rng.integers(1, 5))
        shapes = [(int(rng.integers(1, 9)), int(rng.integers(1, 9))) for _ in range(L)]
        points = [int(rng.integers(1, 5)) for _ in range(L)]
        B, Q, nH, hD = (int(rng.integers(1, k)) for k in (3, 7, 4, 9))
        assert_matches_readable(B, Q, nH, hD, shapes, points, torch.float64, rng.choice(["spread", "special"]), n)
        n += 1
    assert n >= 10, f"only {n} random cases ran in the time allowed"


def test_dispatcher_and_strided_inputs():
    """common.ms_deform_attn(backend="numba") goes through kernels.py, also with views as the models make them."""
    B, Q, nH, hD, shapes, points = CASES["dfine-layout"]
    value, loc, attn = make_inputs(B, Q, nH, hD, shapes, points, torch.float32)
    value = value.flatten(2).transpose(1, 2).contiguous().transpose(1, 2).unflatten(2, (nH, hD))  # same, strided
    loc = loc.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (B, Q, nH, P, 2) with Q not outermost
    assert not value.is_contiguous() and not loc.is_contiguous()
    ours = value_and_grads(lambda *a: ms_deform_attn(*a, backend="numba"), value, shapes, points, loc, attn)
    ref = value_and_grads(lambda *a: ms_deform_attn(*a, backend="torch"), value, shapes, points, loc, attn)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    ones = torch.ones(1, 1, 1).expand(B, Q, nH * hD)  # the gradient of out.sum() arrives like this, strides 0
    ours = value_and_grads(kernels.ms_deform_attn, value, shapes, points, loc, attn, ones)
    ref = value_and_grads(ms_deform_attn_torch, value, shapes, points, loc, attn, ones)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_cpu_backward_is_deterministic_across_thread_counts():
    """The CPU backward owns each value-gradient slice in one thread, so 1 thread and all threads agree bit for bit."""
    B, Q, nH, hD, shapes, points = 2, 40, 3, 8, [(6, 7), (3, 4)], [3, 3]
    args = make_inputs(B, Q, nH, hD, shapes, points, torch.float32)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = value_and_grads(kernels.ms_deform_attn, args[0], shapes, points, *args[1:])
    finally:
        numba.set_num_threads(threads)
    many = value_and_grads(kernels.ms_deform_attn, args[0], shapes, points, *args[1:])
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_kernels_import_nothing_of_ours():
    """kernels.py is the lower layer: common.py imports it (on first use) and hands it the readable version."""
    code = "import sys, kernels; ours = {'common', 'gdino', 'dfine'} & set(sys.modules); assert not ours, ours"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def test_kernels_leave_torchs_thread_count_alone():
    """Numba's thread pool sets OpenMP's thread count, which is torch's, to the CPU count as it starts: started by a
    first kernel call, it switched a run at OMP_NUM_THREADS=1 to all cores midway, and the convolutions after it
    rounded otherwise than the same run's reference. A fresh process at 1 thread stays at 1 through a forward and
    backward (numba keeps its pool of all cores)."""
    code = ("import numba, torch, kernels\n"
            "value = torch.rand(1, 16, 2, 4, requires_grad=True)\n"
            "loc, attn = torch.rand(1, 3, 2, 4, 2, requires_grad=True), torch.rand(1, 3, 2, 4, requires_grad=True)\n"
            "kernels.ms_deform_attn(value, [(4, 4)], [4], loc, attn).sum().backward()\n"
            "assert torch.get_num_threads() == 1, torch.get_num_threads()\n"
            "assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS, numba.get_num_threads()")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def test_entry_point_rejects_what_the_kernels_cannot_take():
    B, Q, nH, hD, shapes, points = CASES["B=Q=1"]
    value, loc, attn = make_inputs(B, Q, nH, hD, shapes, points, torch.float32)
    with pytest.raises(AssertionError, match="float32 or float64"):
        kernels.ms_deform_attn(value.half(), shapes, points, loc.half(), attn.half())
    with pytest.raises(AssertionError, match="float32 or float64"):
        kernels.ms_deform_attn(value.double(), shapes, points, loc, attn)
    with pytest.raises(AssertionError, match="points_per_level"):
        kernels.ms_deform_attn(value, shapes, [points[0] + 1], loc, attn)
    with pytest.raises(AssertionError, match="tokens"):
        kernels.ms_deform_attn(value, [(1, 1)], points, loc, attn)


# -----------------------------------------------------------------------------
# CUDA: the simulator on this machine, a real GPU where there is one


def run_cuda_kernels_on_arrays(value, shapes, points, loc, attn, grad_out):
    """The CUDA launch functions on numba device arrays (what the simulator can run: it has no torch CUDA tensors)."""
    from numba import cuda

    levels = kernels.level_table(shapes, points)
    B, Q, nH, P = attn.shape
    d = {k: cuda.to_device(x.numpy()) for k, x in dict(value=value, loc=loc, attn=attn, grad_out=grad_out).items()}
    out = cuda.device_array((B, Q, nH * value.shape[3]), value.numpy().dtype)
    grads = [cuda.to_device(np.zeros(x.shape, x.numpy().dtype)) for x in (value, loc, attn)]
    dl = cuda.to_device(levels)
    kernels.cuda_forward(d["value"], dl, d["loc"], d["attn"], out)
    kernels.cuda_backward(d["value"], dl, d["loc"], d["attn"], d["grad_out"], *grads)
    return [torch.from_numpy(x.copy_to_host()) for x in (out, *grads)]


def cudasim_checks() -> None:
    """Runs in the subprocess with NUMBA_ENABLE_CUDASIM=1: tiny shapes, since each simulated thread costs ~0.4 ms."""
    from numba import config

    assert config.ENABLE_CUDASIM, "set NUMBA_ENABLE_CUDASIM=1 before numba is imported"
    for shapes, points in ([(2, 3), (1, 1)], [2, 1]), ([(3, 2), (2, 2), (1, 1)], [1, 2, 1]):
        for locations in ("spread", "special"):
            for dtype in (torch.float64, torch.float32):
                B, Q, nH, hD = 1, 2, 2, 3
                value, loc, attn = make_inputs(B, Q, nH, hD, shapes, points, dtype, locations)
                grad_out = torch.randn(B, Q, nH * hD, generator=torch.Generator().manual_seed(1), dtype=dtype)
                ours = run_cuda_kernels_on_arrays(value, shapes, points, loc, attn, grad_out)
                ref = value_and_grads(ms_deform_attn_torch, value, shapes, points, loc, attn, grad_out)
                for name, a, b in zip(["output", "grad value", "grad locations", "grad attention"], ours, ref):
                    torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{name}, {dtype}, {locations}: {m}")
    print("cudasim ok")


def test_cuda_kernels_under_the_simulator():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])  # kernels, common
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": path}
    res = subprocess.run([sys.executable, __file__, "cudasim"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "cudasim ok" in res.stdout, res.stdout + res.stderr


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_kernel_matches_readable(case, dtype):
    """Against the readable version on the CPU, whose rounding of the pixel coordinate the kernels copy (torch's
    CUDA grid_sample computes it another way). The location gradient jumps at pixel centres, where one ulp decides
    the side, and the GPU fuses multiply-adds: so at the special locations it is left out."""
    B, Q, nH, hD, shapes, points = CASES[case]
    for locations in ("spread", "special"):
        args = make_inputs(B, Q, nH, hD, shapes, points, dtype, locations)
        ours = value_and_grads(kernels.ms_deform_attn, args[0].cuda(), shapes, points, *[x.cuda() for x in args[1:]])
        ref = value_and_grads(ms_deform_attn_torch, args[0], shapes, points, *args[1:])
        for i, name in enumerate(["output", "grad value", "grad locations", "grad attention"]):
            assert ours[i].is_cuda
            if not (locations == "special" and name == "grad locations"):
                torch.testing.assert_close(ours[i].cpu(), ref[i], **TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.cuda
@pytest.mark.parametrize("name", [s[0] for s in KERNEL_SHAPES])
def test_cuda_kernel_at_real_shapes(name):
    """float32 at the models' shapes, the CUDA kernel against the CPU kernel (same rule) and the readable version.
    Not the location gradient: among millions of points some sit within rounding of a pixel centre, where the
    gradient jumps, and the GPU's fused multiply-adds may put them on the other side."""
    _, shapes, Q, nH, hD, points = next(s for s in KERNEL_SHAPES if s[0] == name)
    args = make_inputs(1, Q, nH, hD, shapes, points, torch.float32, "spread")
    cpu = value_and_grads(kernels.ms_deform_attn, args[0], shapes, points, *args[1:])
    gpu = value_and_grads(kernels.ms_deform_attn, args[0].cuda(), shapes, points, *[x.cuda() for x in args[1:]])
    ref = ms_deform_attn_torch(args[0].cuda(), shapes, points, *[x.cuda() for x in args[1:]])
    torch.testing.assert_close(gpu[0], ref, atol=1e-5, rtol=1e-5)
    for i, what in [(0, "output"), (1, "grad value"), (3, "grad attention")]:
        torch.testing.assert_close(gpu[i].cpu(), cpu[i], atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}: {m}")


if __name__ == "__main__" and sys.argv[1:] == ["cudasim"]:
    cudasim_checks()
