"""Multi-scale deformable attention (Deformable DETR, eq. 3) as Numba kernels for CPU and CUDA, forward and backward.

The readable version is common.ms_deform_attn_torch (common.py, section 3): same contract, and the tests
(tests/test_kernels.py) check every kernel here against it, values and all three gradients. This file exists for
speed: the readable version copies each level's values into images, and grid_sample materialises every sample,
(B*nH, hD, Q, P), before it is weighted and summed; a kernel reads the four neighbours of each point and adds them
straight into the output.

0. the sampling rule, in words and in code (bilinear), then the rounding the CPU kernels copy from torch
1. Numba CPU: forward threads take blocks of queries, all heads together; backward one thread per (batch, head)
2. Numba CUDA: forward one thread per output channel, backward one thread per point with atomic adds into the
   value gradient; launch functions take device arrays (numba's, or anything with __cuda_array_interface__)
3. autograd Function and the entry point ms_deform_attn (torch tensors in, torch tensors out)

This file imports nothing of ours (common.py imports it, on first use): where the readable version matters, the
gradients' memory layout, common passes it in. `python tests/benchmark.py --kernels` times both at the models' shapes.

Shapes: B batch, S image tokens (all levels), Q queries, L levels, P points (all levels), nH heads, hD head dim.
Contract (as common.py): value (B, S, nH, hD), spatial_shapes [(H_l, W_l)] * L, points_per_level [P_l] * L,
sampling_locations (B, Q, nH, P, 2) with x, y in [0, 1] (outside allowed), points level-major, attention_weights
(B, Q, nH, P) already normalised -> output (B, Q, nH*hD), channel c = head * hD + j.
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch
from llvmlite import ir
from numba import cuda, get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from torch.autograd.function import once_differentiable


def level_table(spatial_shapes, points_per_level) -> np.ndarray:
    """(L, 4) int64 rows (H_l, W_l, first token of level l in S, P_l): the level layout every kernel reads."""
    assert len(spatial_shapes) == len(points_per_level), f"{len(spatial_shapes)} levels but {len(points_per_level)} P_l"
    rows, start = [], 0
    for (h, w), n in zip(spatial_shapes, points_per_level):
        rows.append((int(h), int(w), start, int(n)))
        start += int(h) * int(w)
    return np.array(rows, dtype=np.int64)  # (L, 4)


# -----------------------------------------------------------------------------
# 0. The sampling rule of every kernel below (the readable version's grid_sample, align_corners=False)
#   - a location x on a level W pixels wide maps to pixel coordinate ix = x * W - 0.5: pixel centres sit at +0.5
#     (the same for y with H);
#   - bilinear between the neighbours x0 = floor(ix), x0 + 1 and y0 = floor(iy), y0 + 1 with weights
#     nw (1-fy)(1-fx), ne (1-fy)fx, sw fy(1-fx), se fy fx, where fx = ix - x0 and fy = iy - y0;
#   - a neighbour outside the map reads as zero and gets no gradient. A location with ix < -1, ix >= W, iy < -1 or
#     iy >= H adds nothing; at ix = -1 exactly the east neighbours weigh 0: they add nothing to the output but do to
#     the location's gradient, as in grid_sample.


@njit(cache=True)
def pixel(x, size, t):
    """The rule's first line: location x -> pixel coordinate x * size - 0.5, rounded once to dtype t (a number type).

    Compiled on its own without fast-math, so no caller's fastmath can fold ((2x - 1) + 1) into 2x; the CUDA
    kernels call it too (numba compiles it for the GPU)."""
    return t((t(2) * x - t(1) + t(1)) * (size / 2) - 0.5)


@njit(cache=True, forceinline=True)
def bilinear(x, y, H, W, t):
    """The rule at location (x, y) of an H x W level, for every kernel here -> (fx, fy, offsets, weights, inside), the
    last three 4-tuples over the neighbours nw, ne, sw, se: offset y * W + x in the level, weight, inside the map.

    A neighbour outside weighs 0 and its offset is moved into the map, so a kernel may read its row and add nothing
    instead of branching per channel; `inside` tells the backward which rows read as zero. Inlined (a call per point
    cost the CPU forward ~7%); numba compiles it for the GPU too, as pixel."""
    ix, iy = pixel(x, W, t), pixel(y, H, t)
    if not (-1 <= ix < W and -1 <= iy < H):  # no neighbour inside: at (-1, -1) all four weigh 0, and the floor is
        ix, iy = t(-1), t(-1)  # an int (also for inf and NaN)
    x0, y0 = int(floor(ix)), int(floor(iy))  # exact, ix in [-1, W)
    fx, fy = ix - t(x0), iy - t(y0)
    in_x0, in_x1, in_y0, in_y1 = x0 >= 0, x0 + 1 < W, y0 >= 0, y0 + 1 < H  # x0 in [-1, W - 1], so one side each
    wx0, wx1 = (t(1) - fx if in_x0 else t(0)), (fx if in_x1 else t(0))
    wy0, wy1 = (t(1) - fy if in_y0 else t(0)), (fy if in_y1 else t(0))
    xa, xb = (x0 if in_x0 else 0), (x0 + 1 if in_x1 else W - 1)  # the nearest column inside (max and min do
    ya, yb = (y0 if in_y0 else 0) * W, (y0 + 1 if in_y1 else H - 1) * W  # not compile for the GPU from here)
    return (fx, fy, (ya + xa, ya + xb, yb + xa, yb + xb), (wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1),
            (in_y0 & in_x0, in_y0 & in_x1, in_y1 & in_x0, in_y1 & in_x1))


# -----------------------------------------------------------------------------
# Rounding as torch rounds: why the CPU kernels give the readable version's float32 bits
#
# The models' parity with transformers is bit for bit, and one ulp off in a sample grows to 1e-4 in Grounding DINO's
# logits (the top-k turns it into other queries), one in a gradient to 1e-4 in D-FINE's training. So the CPU kernels
# round and add in torch's order. x86 torch runs
# its AVX2 kernels (built with FMA: GCC fuses a * b + c) for grid_sample and sum also on AVX512 CPUs, as
# REGISTER_DISPATCH leaves them no AVX512 slot (ATen/native/DispatchStub.h). Other builds (DEFAULT, ARM) round
# otherwise, and there backend "auto" picks the readable version (common.resolve_backend).
#   - grid_sample (ATen/native/cpu/GridSamplerKernel.cpp, ComputeLocationBase::unnormalize, ApplyGridSample):
#     ix = fma(g + 1, W / 2, -0.5) with g = 2x - 1 (pixel() rounds it once through float64, exact for float32 x), so
#     a location on a pixel centre falls on the same side of the floor, where the gradient jumps;
#     weights rounded products; sample = fma(se, w_se, fma(sw, w_sw, fma(ne, w_ne, nw * w_nw))), outside read as 0;
#   - sample * attention weight, rounded; then the sum over P (ATen/native/cpu/SumKernel.cpp, cascade_sum), in vectors
#     of 32 bytes (width = 8 floats): whole vectors take turns over four vector sums (the last P // width % 4 go into
#     sum 0), which add lane by lane as ((s0 + s1) + s2) + s3; a scalar adds up the tail past the last whole vector,
#     then lanes 0, 1, ... (vectorized_inner_sum). For P < width four scalar sums take turns (scalar_inner_sum). So 16
#     points add up as (x0 + x8) + (x1 + x9) + ... + (x7 + x15), 12 as x8 + x9 + x10 + x11 + x0 + x1 + ... + x7, left
#     to right (sum_plan). From 512 float32 points on torch nests its sums a level deeper, which we do not copy.
#   - backward (autograd through the readable version): d sample = grad_out * attention weight, rounded. grid_sample's
#     backward takes the level's grid in steps of a vector of points: one query's points at a time, or all the level's
#     in a row where that grid is contiguous (one level and B > 1 or nH = 1, or Q = 1). Per step and channel it adds
#     weight * d sample into the value gradient corner by corner (nw, ne, sw, se), each over the step's points; and
#     d ix += fma(fma(se - sw, fy, (ne - nw) * (1 - fy)), d sample) over channels in order (d iy alike), then times
#     W / 2 (unnormalize) and 2 (2x - 1);
#   - d attention weight: grad_out * sample rounded, summed over channels down a column of a (channels, n) array
#     (vectorized_outer_sum): n = Q * P where the readable version copies grad_out (B, nH and Q all above 1), else P.
#     In the first 4 * width * (n // (4 * width)) columns (4 * (n // 4) for n < width) blocks of 16 channels, each
#     added in order, then the blocks (multi_row_sum, run_sum); in the others four sums take turns, then
#     ((s0 + s1) + s2) + s3 (row_sum); a single column (n = 1) is contiguous, added as the forward's sum (sum_plan);
#   - the gradients come back in the readable version's memory layout (readable_grad_strides).
SUM_VECTOR_BYTES = 32  # torch's AVX2 vector, whose width sets its sum's order


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c rounded once: LLVM's fma, which numba does not offer and LLVM never forms from a * b + c itself."""
    return a(a, b, c), lambda context, builder, sig, args: builder.fma(*args)


@intrinsic
def floor(typingctx, x):
    """LLVM's floor, one instruction on x86 and GPUs: numba's math.floor calls libm on the CPU, np.floor has no CUDA."""
    def codegen(context, builder, sig, args):
        return builder.call(builder.module.declare_intrinsic("llvm.floor", [args[0].type]), args)
    return x(x), codegen


@njit(cache=True)
def sum_plan(P, width):
    """torch's sum of P numbers x_p (above) as steps (p, into, keep, add): into = (into if keep else 0) + ((other if
    add else 0) + x_p), into 0 s, 1 r (other s) or 2 acc (other r), the result. acc adds the tail, then lane by lane
    r = ((s_0 + s_1) + s_2) + s_3, s_k the lane's numbers in vector sum k: a sum's last number also adds the sum into
    the next, so no sum takes a pass of its own (from 8 vectors on a lane may need one more step, adding x_P = 0)."""
    lanes = width if P >= width else 1  # below one vector, four scalar sums take turns: one lane
    n = P // lanes  # whole vectors (or numbers)
    steps = [(p, 2, int(p > n * lanes), 0) for p in range(n * lanes, P)]  # the tail: acc = acc + x_p
    for lane in range(lanes):
        first = len(steps)
        for k in range(4 if n >= 4 else 1):  # vectors take turns over four sums, the last n % 4 of them join sum 0
            ps = [u * lanes + lane for u in range(n) if (0 if u >= n - n % 4 else u % 4) == k]
            for i, p in enumerate(ps):
                last = int(i == len(ps) - 1)
                if k == 0 or len(ps) == 1:  # r = x_p, then r = r + x_p
                    steps.append((p, 1, int(len(steps) > first), 0))
                else:  # s = x_p, s = s + x_p, ..., r = r + (s + x_p)
                    steps.append((p, last, int(i > 0), last))
        if len(steps) == first or steps[-1][3]:  # none (P = 0), or the last one added s into r: add x_P = 0 too
            steps.append((P, 1, int(len(steps) > first), 0))
        p, _, keep, _ = steps[-1]
        steps[-1] = (p, 2, int(first > 0), keep)  # the lane's last number: acc = acc + (r + x_p)
    return steps


# -----------------------------------------------------------------------------
# 1. Numba CPU

QUERY_BLOCK = 64  # queries per task of the CPU forward, whose scratch arrays are allocated once per task
# Numba's OpenMP pool sets OpenMP's thread count, torch's, to the CPU count as it starts: start it here, not midway
threads, _ = torch.get_num_threads(), get_num_threads()  # through a run set to 1 thread, and give torch its count back
torch.set_num_threads(threads)


@intrinsic
def prefetch(typingctx, array, index):
    """Ask the CPU to start loading the cache line of array[index]: LLVM's prefetch (a read, kept in every cache)."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, cgutils.unpack_tuple(builder, args[1]))
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        builder.call(builder.module.declare_intrinsic("llvm.prefetch", [ptr.type], fnty), [ptr, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return types.none(array, index), codegen


@njit(parallel=True, cache=True)
def cpu_forward(value, levels, loc, attn, out):
    """out[b, q, h*hD + j] = sum over points p of attn[b, q, h, p] * bilinear sample of value[b, :, h, j] at p.

    Threads take blocks of queries, all heads of each (their channels sit side by side). Per head, each point's four
    neighbours (token, weight), their rows prefetched, then a loop over channels per point in the order of torch's
    sum (sum_plan), vectorised by LLVM. Rounding as torch's (above): float32 equals the readable version bit for bit."""
    B, S, nH, hD = value.shape
    Q, P = loc.shape[1], loc.shape[3]
    t = value.dtype.type  # typed constants keep float32 arithmetic float32 (a Python number would promote to float64)
    plan = sum_plan(P, SUM_VECTOR_BYTES // value.itemsize)
    point_level = levels[np.repeat(np.arange(len(levels)), levels[:, 3])]  # (P, 4): each point's row of levels
    z = t(-0.0)  # x + -0 is x for every x, -0 too: what a step adds for a sum it leaves out
    for block in prange((B * Q + QUERY_BLOCK - 1) // QUERY_BLOCK):
        tokens, weights = np.zeros((P + 1, 4), np.int64), np.zeros((P + 1, 4), value.dtype)  # nw, ne, sw, se
        r, s = np.empty(hD, value.dtype), np.empty(hD, value.dtype)  # sum_plan's running sums
        for bq in range(block * QUERY_BLOCK, min((block + 1) * QUERY_BLOCK, B * Q)):
            b, q = bq // Q, bq % Q
            for h in range(nH):
                for p in range(P):
                    H, W, start = point_level[p, 0], point_level[p, 1], point_level[p, 2]
                    _, _, offsets, ws, _ = bilinear(loc[b, q, h, p, 0], loc[b, q, h, p, 1], H, W, t)
                    for corner in range(4):  # prefetch the row's first and last cache lines: all of it up to 128 bytes
                        tokens[p, corner], weights[p, corner] = start + offsets[corner], ws[corner]
                        prefetch(value, (b, tokens[p, corner], h, 0))
                        prefetch(value, (b, tokens[p, corner], h, hD - 1))
                acc = out[b, q, h * hD:(h + 1) * hD]  # (hD,) view: this head's output channels
                for p, into, keep, add in plan:
                    # dst and o never the same array: LLVM's overlap checks pass and its vector loop runs
                    dst, o = (acc, r) if into == 2 else ((r, s) if into == 1 else (s, r))
                    nw, ne, sw, se = value[b, tokens[p, 0], h], value[b, tokens[p, 1], h], \
                        value[b, tokens[p, 2], h], value[b, tokens[p, 3], h]  # (hD,) each
                    w_nw, w_ne, w_sw, w_se = weights[p, 0], weights[p, 1], weights[p, 2], weights[p, 3]
                    a_p = attn[b, q, h, p] if p < P else t(0)  # sum_plan's x_P = 0
                    for j in range(hD):
                        x = fma(se[j], w_se, fma(sw[j], w_sw, fma(ne[j], w_ne, nw[j] * w_nw))) * a_p
                        dst[j] = (dst[j] if keep else z) + ((o[j] if add else z) + x)


@njit(cache=True)
def run_sum(x, start, stop, step):
    """torch's sum down one column (multi_row_sum) of x[start:stop:step]: blocks of 16 numbers, each added up in
    order, the blocks' sums added up in order, then the rest's sum plus theirs (from 256 numbers torch nests deeper)."""
    t = x.dtype.type
    blocks, rest, i = t(0), t(0), start
    while i + 15 * step < stop:
        block = t(0)
        for k in range(16):
            block += x[i + k * step]
        blocks, i = blocks + block, i + 16 * step
    for k in range(i, stop, step):
        rest += x[k]
    return rest + blocks


@njit(cache=True)
def column_sum(x, how, plan):
    """torch's sum of x, one attention weight's products over channels, in the order `how` names (banner above)."""
    if how == 0:
        return run_sum(x, 0, len(x), 1)
    if how == 1:  # row_sum: four sums take turns, the tail joins sum 0
        m = len(x) // 4 * 4
        s0 = run_sum(x, 0, m, 4)
        for k in range(m, len(x)):
            s0 += x[k]
        return ((s0 + run_sum(x, 1, m, 4)) + run_sum(x, 2, m, 4)) + run_sum(x, 3, m, 4)
    z, sums = x.dtype.type(-0.0), np.full(3, -0.0, x.dtype)  # one column is contiguous: s, r, acc of sum_plan
    for p, into, keep, add in plan:
        other = sums[0] if into == 1 else sums[1]
        sums[into] = (sums[into] if keep else z) + ((other if add else z) + (x[p] if p < len(x) else z))
    return sums[2]


@njit(parallel=True, cache=True)
def cpu_backward(value, levels, loc, attn, grad_out, grad_value, grad_loc, grad_attn):
    """Gradients of cpu_forward into grad_value (zeroed by the caller), grad_loc and grad_attn (written whole).

    One thread per (b, h): it alone writes grad_value[b, :, h, :], so every sum runs in one fixed order and the
    result is the same bit for bit whatever the number of threads (atomics would make it vary run to run). The price
    is B*nH-way parallelism, plenty for 2 to 8 cores. Per level, steps of up to `lanes` points in grid_sample's
    order; rounding and order as torch's (banner above): float32 equals the readable version bit for bit."""
    B, S, nH, hD = value.shape
    Q, P = loc.shape[1], loc.shape[3]
    t = value.dtype.type
    lanes = SUM_VECTOR_BYTES // value.itemsize
    copied = B > 1 and nH > 1 and Q > 1  # the readable version's reshapes copy: its grid and gradient contiguous
    columns = Q * P if copied else P  # columns of its sum over channels; attention weight (q, p) is one of them
    block = 4 * lanes if columns >= lanes else 4  # columns that multi_row_sum takes at once
    plan = sum_plan(hD, lanes)
    for bh in prange(B * nH):
        b, h = bh // nH, bh % nH
        tokens, inside = np.zeros((lanes, 4), np.int64), np.zeros((lanes, 4), value.dtype)  # nw, ne, sw, se
        weights, g_sample = np.zeros((lanes, 4), value.dtype), np.zeros((lanes, hD), value.dtype)
        fx, fy = np.zeros(lanes, value.dtype), np.zeros(lanes, value.dtype)
        v, rows = np.zeros((4, hD), value.dtype), np.zeros((3, hD), value.dtype)  # the 4 neighbours' rows; scratch
        products, d_ix, d_iy = rows[0], rows[1], rows[2]
        first = 0  # the level's first point
        for lvl in range(len(levels)):
            H, W, start, n_points = levels[lvl, 0], levels[lvl, 1], levels[lvl, 2], levels[lvl, 3]
            row = Q * n_points if Q == 1 or (n_points == P and (B > 1 or nH == 1)) else n_points  # contiguous?
            for r0 in range(0, Q * n_points, max(row, 1)):
                for f0 in range(r0, r0 + row, lanes):  # one step: points f0 .. f0 + n - 1 of the level's grid
                    n = min(lanes, r0 + row - f0)
                    for i in range(n):
                        q, p = (f0 + i) // n_points, first + (f0 + i) % n_points
                        fx[i], fy[i], offsets, ws, ins = bilinear(loc[b, q, h, p, 0], loc[b, q, h, p, 1], H, W, t)
                        for corner in range(4):
                            tokens[i, corner], weights[i, corner] = start + offsets[corner], ws[corner]
                            inside[i, corner] = t(ins[corner])
                        a, g = attn[b, q, h, p], grad_out[b, q, h * hD:(h + 1) * hD]
                        for j in range(hD):
                            g_sample[i, j] = g[j] * a  # d loss / d sample
                    for corner in range(4):  # grid_sample adds into value corner by corner, each over the step
                        for i in range(n):
                            if inside[i, corner]:
                                w, gs, grad_row = weights[i, corner], g_sample[i], grad_value[b, tokens[i, corner], h]
                                for j in range(hD):
                                    grad_row[j] += w * gs[j]
                    for i in range(n):
                        q, p = (f0 + i) // n_points, first + (f0 + i) % n_points
                        w, g, gs = weights[i], grad_out[b, q, h * hD:(h + 1) * hD], g_sample[i]
                        for corner in range(4):  # grid_sample reads a neighbour outside as 0
                            ok, tok = inside[i, corner], tokens[i, corner]
                            for j in range(hD):
                                v[corner, j] = value[b, tok, h, j] if ok else t(0)
                        for j in range(hD):  # vectorised: no sums across channels here
                            nw, ne, sw, se = v[0, j], v[1, j], v[2, j], v[3, j]
                            d_ix[j] = fma(se - sw, fy[i], (ne - nw) * (t(1) - fy[i]))  # d sample / d ix, over gs
                            d_iy[j] = fma(se - ne, fx[i], (sw - nw) * (t(1) - fx[i]))
                            products[j] = g[j] * fma(se, w[3], fma(sw, w[2], fma(ne, w[1], nw * w[0])))
                        gx, gy = t(0), t(0)
                        for j in range(hD):
                            gx, gy = fma(d_ix[j], gs[j], gx), fma(d_iy[j], gs[j], gy)
                        col = q * P + p if copied else p
                        how = (2 if hD >= lanes else 1) if columns == 1 else int(col >= columns // block * block)
                        grad_attn[b, q, h, p] = column_sum(products, how, plan)
                        grad_loc[b, q, h, p, 0], grad_loc[b, q, h, p, 1] = gx * t(W / 2) * t(2), gy * t(H / 2) * t(2)
            first += n_points


# -----------------------------------------------------------------------------
# 2. Numba CUDA
#
# The rule and formulas of section 1, one thread per unit of work instead of loops. NVVM fuses multiply-adds, so
# float32 results differ from the CPU kernel's in the last bits. These launch functions take device arrays, so the
# simulator (NUMBA_ENABLE_CUDASIM=1, no GPU) runs them on cuda.to_device copies of numpy arrays and a real GPU on
# views of torch tensors (section 3). `stream` is a numba stream; 0 is the default stream. `cuda` is numba's built-in
# target; NVIDIA's numba-cuda package, if installed, takes over that name and runs these unchanged (README).

THREADS = 256  # per block; any multiple of 32 works, 256 is the usual middle ground


@cuda.jit
def _forward_kernel(value, levels, loc, attn, out):
    # One thread per output element (b, q, h, j): neighbouring threads read neighbouring channels of the same
    # value row (coalesced); the location arithmetic is repeated hD times, cheaper than sharing it.
    B, S, nH, hD = value.shape
    Q = loc.shape[1]
    i = cuda.grid(1)
    if i >= B * Q * nH * hD:
        return
    j, h, q, b = i % hD, (i // hD) % nH, (i // (hD * nH)) % Q, i // (hD * nH * Q)
    t = value.dtype.type
    acc = t(0)
    p = 0
    for lvl in range(levels.shape[0]):
        H, W, start, n_points = levels[lvl, 0], levels[lvl, 1], levels[lvl, 2], levels[lvl, 3]
        for _ in range(n_points):
            _, _, offsets, ws, _ = bilinear(loc[b, q, h, p, 0], loc[b, q, h, p, 1], H, W, t)
            sample = t(0)
            for corner in range(4):  # nw, ne, sw, se: one outside weighs 0
                sample += value[b, start + offsets[corner], h, j] * ws[corner]
            acc += sample * attn[b, q, h, p]
            p += 1
    out[b, q, h * hD + j] = acc


@cuda.jit
def _backward_kernel(value, levels, loc, attn, grad_out, grad_value, grad_loc, grad_attn):
    # One thread per point (b, q, h, p): it owns grad_loc and grad_attn of that point (plain stores) and adds into
    # grad_value with atomics, since other points share neighbours. Float atomics make grad_value's last bits
    # depend on the order threads run in: not deterministic, unlike the CPU backward.
    B, S, nH, hD = value.shape
    Q, P = loc.shape[1], loc.shape[3]
    i = cuda.grid(1)
    if i >= B * Q * nH * P:
        return
    p, h, q, b = i % P, (i // P) % nH, (i // (P * nH)) % Q, i // (P * nH * Q)
    t = value.dtype.type
    lvl, first = 0, levels[0, 3]  # find the level of point p: points are level-major
    while p >= first:
        lvl += 1
        first += levels[lvl, 3]
    H, W, start = levels[lvl, 0], levels[lvl, 1], levels[lvl, 2]
    fx, fy, offsets, ws, ins = bilinear(loc[b, q, h, p, 0], loc[b, q, h, p, 1], H, W, t)
    a = attn[b, q, h, p]
    ga, gx, gy = t(0), t(0), t(0)
    for corner in range(4):  # nw, ne, sw, se
        if ins[corner]:
            tok, aw = start + offsets[corner], a * ws[corner]
            dot = t(0)
            for j in range(hD):
                gj = grad_out[b, q, h * hD + j]
                dot += gj * value[b, tok, h, j]
                cuda.atomic.add(grad_value, (b, tok, h, j), gj * aw)
            ga += ws[corner] * dot
            dy, dx = corner // 2, corner % 2  # the weight wy * wx: d/d fx is +-wy, d/d fy +-wx
            wy, wx = (fy if dy else t(1) - fy), (fx if dx else t(1) - fx)
            gx = gx + wy * dot if dx else gx - wy * dot
            gy = gy + wx * dot if dy else gy - wx * dot
    gx, gy = gx * a * t(W), gy * a * t(H)
    grad_attn[b, q, h, p], grad_loc[b, q, h, p, 0], grad_loc[b, q, h, p, 1] = ga, gx, gy


def cuda_forward(value, levels, loc, attn, out, stream=0) -> None:
    """Fill out (B, Q, nH*hD) on the device; arguments as cpu_forward's, device arrays."""
    n = out.shape[0] * out.shape[1] * out.shape[2]
    if n:
        _forward_kernel[(n + THREADS - 1) // THREADS, THREADS, stream](value, levels, loc, attn, out)


def cuda_backward(value, levels, loc, attn, grad_out, grad_value, grad_loc, grad_attn, stream=0) -> None:
    """Gradients on the device; grad_value must come in zeroed (atomics add into it)."""
    n = attn.shape[0] * attn.shape[1] * attn.shape[2] * attn.shape[3]
    if n:
        _backward_kernel[(n + THREADS - 1) // THREADS, THREADS, stream](
            value, levels, loc, attn, grad_out, grad_value, grad_loc, grad_attn)


# -----------------------------------------------------------------------------
# 3. autograd Function and the entry point


def _array(x: torch.Tensor):
    """A view, no copy: numpy shares a CPU tensor's memory, numba's device array a CUDA tensor's."""
    if x.is_cuda:
        return cuda.as_cuda_array(x.detach(), sync=False)  # we launch on torch's stream, so nothing to wait for
    return x.detach().numpy()


def _torch_stream(x: torch.Tensor):
    """torch's current stream as a numba stream, so our kernels queue behind torch's work on the same stream."""
    return cuda.external_stream(torch.cuda.current_stream(x.device).cuda_stream)


class MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, sampling_locations, attention_weights, levels, readable):
        # no copies for the models' tensors, which are contiguous; the kernels are compiled for contiguous arrays
        ctx.layout = [(tuple(x.shape), x.stride()) for x in (value, sampling_locations, attention_weights)]
        ctx.readable = readable
        value, loc, attn = value.contiguous(), sampling_locations.contiguous(), attention_weights.contiguous()
        B, Q, nH, P = attn.shape
        out = value.new_empty(B, Q, nH * value.shape[3])  # (B, Q, nH*hD), every element written by the kernel
        if value.is_cuda:
            levels = torch.from_numpy(levels).to(value.device)
            with cuda.gpus[value.device.index]:
                cuda_forward(*map(_array, (value, levels, loc, attn, out)), stream=_torch_stream(value))
        else:
            cpu_forward(_array(value), levels, _array(loc), _array(attn), _array(out))
        ctx.save_for_backward(value, loc, attn, levels if value.is_cuda else torch.from_numpy(levels))
        return out

    @staticmethod
    @once_differentiable  # the backward is a kernel, not torch ops: no second derivatives
    def backward(ctx, grad_out):
        value, loc, attn, levels = ctx.saved_tensors
        layout = (*ctx.layout, (tuple(grad_out.shape), grad_out.stride()))
        grad_out = grad_out.contiguous()  # out.sum() hands in stride 0: a copy beats compiling for strided arrays
        grad_value, grad_loc, grad_attn = torch.zeros_like(value), torch.zeros_like(loc), torch.zeros_like(attn)
        arrays = [_array(x) for x in (value, levels, loc, attn, grad_out, grad_value, grad_loc, grad_attn)]
        if value.is_cuda:
            with cuda.gpus[value.device.index]:
                cuda_backward(*arrays, stream=_torch_stream(value))
        else:
            cpu_backward(*arrays)
            if ctx.readable is not None:  # the same bits, now also the same layout
                strides = readable_grad_strides(ctx.readable, *layout, tuple(map(tuple, levels.tolist())))
                grad_value, grad_loc, grad_attn = [torch.empty_strided(g.shape, s, dtype=g.dtype).copy_(g)
                                                   for g, s in zip((grad_value, grad_loc, grad_attn), strides)]
        return grad_value, grad_loc, grad_attn, None, None


@functools.lru_cache(maxsize=64)
def readable_grad_strides(readable, value, loc, attn, grad_out, levels) -> tuple:
    """Strides of the readable version's three gradients, for inputs and grad_out of these (shape, strides): autograd
    on the meta device, which computes layouts and no numbers. Layout matters downstream: the readable version hands
    value's gradient back in a channel-major layout, and a convolution fed another layout rounds otherwise."""
    value, loc, attn = [torch.empty_strided(*x, device="meta", requires_grad=True) for x in (value, loc, attn)]
    with torch.enable_grad():  # off inside a backward
        out = readable(value, [r[:2] for r in levels], [r[3] for r in levels], loc, attn)
        grads = torch.autograd.grad(out, (value, loc, attn), torch.empty_strided(*grad_out, device="meta"))
    return tuple(g.stride() for g in grads)


def ms_deform_attn(value: torch.Tensor, spatial_shapes, points_per_level, sampling_locations: torch.Tensor,
                   attention_weights: torch.Tensor, readable: Callable | None = None) -> torch.Tensor:
    """common.ms_deform_attn_torch's contract, run by the CPU kernel for CPU tensors and the CUDA one for CUDA.

    readable: that readable version, whose gradients' memory layout the CPU backward then gives its own (same bits
    either way; common.ms_deform_attn passes it); None leaves them contiguous."""
    B, S, nH, hD = value.shape
    assert sampling_locations.dim() == 5 and sampling_locations.shape[::2] == (B, nH, 2), \
        f"sampling_locations {tuple(sampling_locations.shape)} is not (B, Q, nH, P, 2) for value {tuple(value.shape)}"
    assert attention_weights.shape == sampling_locations.shape[:4], \
        f"attention_weights {tuple(attention_weights.shape)} != {tuple(sampling_locations.shape[:4])}"
    assert S == sum(h * w for h, w in spatial_shapes), f"value has {S} tokens, shapes {spatial_shapes} give another"
    assert sampling_locations.shape[3] == sum(points_per_level), \
        f"{sampling_locations.shape[3]} points but points_per_level {points_per_level}"
    dtypes = {value.dtype, sampling_locations.dtype, attention_weights.dtype}
    assert len(dtypes) == 1 and value.dtype in (torch.float32, torch.float64), \
        f"the kernels take float32 or float64, all three alike; got {dtypes}"
    devices = {value.device, sampling_locations.device, attention_weights.device}
    assert len(devices) == 1, f"inputs on several devices: {devices}"
    levels = level_table(spatial_shapes, points_per_level)
    return MSDeformAttnFunction.apply(value, sampling_locations, attention_weights, levels, readable)
