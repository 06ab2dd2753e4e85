# SPDX-License-Identifier: Apache-2.0
r"""
Triton kernels of :mod:`pyro_sp.nn.regenerated_noise`: the products of a
``Linear`` layer with :math:`N` sampled weights
:math:`W_n = \mu + \sigma \odot \varepsilon_n`, where the standard normals
:math:`\varepsilon_n` are drawn inside the kernels (Philox4x32, Box–Muller) from
particle :math:`n`'s 64-bit seed and the element's position, never written to
memory, and drawn again, identically, by the backward kernels.

Element :math:`(o, k)` of :math:`\varepsilon_n` (weight shape ``(O, K)``) is lane
``k % 4`` of the Philox block at counter ``o * ceil(K / 4) + k // 4`` under key
``seeds[n]``: a function of the position alone, so every kernel, whatever its
tiling, draws the same value. The generator is written here rather than taken
from ``triton.language`` so that the noise of a seed does not change with
Triton's version, and so that Triton's interpreter can run it.

This file is executed by :func:`pyro_sp.nn.regenerated_noise.kernels` once per
mode (compiled for CUDA, or Triton's interpreter for CPU tensors), so it defines
nothing but kernels.
"""

import os

import triton
import triton.language as tl


# Philox4x32 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011):
# its round multipliers and key increments
_ROUND_A = tl.constexpr(0xD2511F53)
_ROUND_B = tl.constexpr(0xCD9E8D57)
_KEY_A = tl.constexpr(0x9E3779B9)
_KEY_B = tl.constexpr(0xBB67AE85)


@triton.jit
def _philox(seed, counter, ROUNDS: tl.constexpr):
    """The four 32-bit words of Philox4x32 for the 64-bit key ``seed`` and the counters
    ``(counter, 0, 0, 0)``."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = counter.to(tl.uint32, bitcast=True)
    c1 = c0 * 0
    c2 = c0 * 0
    c3 = c0 * 0
    for _ in tl.static_range(ROUNDS):
        hi_b, lo_b = _mulhilo(c2, _ROUND_B)
        hi_a, lo_a = _mulhilo(c0, _ROUND_A)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1 = lo_b
        c3 = lo_a
        k0 = k0 + _KEY_A
        k1 = k1 + _KEY_B
    return c0, c1, c2, c3


#: Compiled for a GPU, Box–Muller's logarithm, sine and cosine are the hardware's approximate
#: instructions (``lg2.approx``, ``sin.approx``, ``cos.approx``: a few ulp, a fraction of the
#: cost of the exact library functions); Triton's interpreter, which has no inline assembly,
#: uses NumPy's. For the same seeds the two differ by at most 3e-5 (|eps| up to 4.3, measured on
#: one H100 by ``benchmarks/regenerated_check.py``).
_APPROX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def _approx(x, INSTRUCTION: tl.constexpr):
    return tl.inline_asm_elementwise(INSTRUCTION + ".approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _mulhilo(a, M: tl.constexpr):
    """The high and low 32-bit words of the 64-bit product ``a * M`` (``a`` uint32). Compiled, one
    ``mul.wide.u32`` (the 64-bit product written in Triton is widened by LLVM into 64-bit arithmetic for
    the whole round, twice the instructions; ``umulhi`` and a low product are two multiplications)."""
    if _APPROX:
        return tl.inline_asm_elementwise("{ .reg .b64 t; mul.wide.u32 t, $2, $3; mov.b64 {$1, $0}, t; }",
                                         "=r,=r,r,r", [a, tl.full(a.shape, M, tl.uint32)],
                                         dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
    else:
        return tl.umulhi(a, M), a * M


@triton.jit
def _uniform(word):
    """A 32-bit word to a uniform number in (0, 1]: its 31 high bits, centred in their interval (1 only
    where fp32 rounds the largest ones up; Box–Muller's radius is then 0)."""
    return (word >> 1).to(tl.int32).to(tl.float32) * 4.656612873077393e-10 + 2.3283064365386963e-10


@triton.jit
def _box_muller(w0, w1):
    """Two independent standard normals from two words (Box–Muller, the angle in [-pi, pi))."""
    u = _uniform(w0)
    theta = 6.283185307179586 * _uniform(w1) - 3.141592653589793
    if _APPROX:
        radius = tl.sqrt(-1.3862943611198906 * _approx(u, "lg2"))  # -2 ln u = -2 ln 2 log2 u
        return radius * _approx(theta, "cos"), radius * _approx(theta, "sin")
    else:
        radius = tl.sqrt(-2.0 * tl.log(u))
        return radius * tl.cos(theta), radius * tl.sin(theta)


@triton.jit
def _noise(seed, offs_o, k0, Kq, BO: tl.constexpr, BK: tl.constexpr, ROUNDS: tl.constexpr):
    """The ``[BO, BK]`` tile of :math:`\\varepsilon` at rows ``offs_o``, columns ``k0 + arange(BK)``
    (``k0`` a multiple of 4)."""
    blocks = k0 // 4 + tl.arange(0, BK // 4)
    w0, w1, w2, w3 = _philox(seed, offs_o[:, None] * Kq + blocks[None, :], ROUNDS)
    n0, n1 = _box_muller(w0, w1)
    n2, n3 = _box_muller(w2, w3)
    # lane l of block j is column 4 j + l
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BO, BK))


@triton.jit
def _load(pointers, mask, EVEN: tl.constexpr):
    """``tl.load(pointers)``, zero where ``mask`` is false, unless ``EVEN``: the tiles divide the tensors
    and nothing is masked (the masks were 10-15 % of the forward loop's instructions, counted in SASS)."""
    if EVEN:
        return tl.load(pointers)
    else:
        return tl.load(pointers, mask=mask, other=0.0)


@triton.jit
def _weight(loc, scale, seed, offs_o, k0, O, K, Kq, BO: tl.constexpr, BK: tl.constexpr, ROUNDS: tl.constexpr,
            EVEN: tl.constexpr):
    """The ``[BO, BK]`` tile of :math:`W = \\mu + \\sigma \\varepsilon` (zero outside ``(O, K)``)."""
    offs_k = k0 + tl.arange(0, BK)
    mask = (offs_o[:, None] < O) & (offs_k[None, :] < K)
    where = offs_o[:, None] * K + offs_k[None, :]
    mu = _load(loc + where, mask, EVEN)
    sigma = _load(scale + where, mask, EVEN)
    eps = _noise(seed, offs_o, k0, Kq, BO, BK, ROUNDS)
    return mu + sigma * eps.to(mu.dtype)


@triton.jit
def _tile(t, R, BR: tl.constexpr, BC: tl.constexpr):
    """Tile ``t`` of a grid of ``[BR, BC]`` tiles over ``R`` rows, the row blocks fastest (the row blocks
    of one column block run side by side, reading what they share from L2): its row offsets, its first
    column and its column offsets."""
    num_r = (R + BR - 1) // BR
    c0 = (t // num_r) * BC
    return (t % num_r) * BR + tl.arange(0, BR), c0, c0 + tl.arange(0, BC)


@triton.jit
def _particle_tile(N, R, BR: tl.constexpr, BC: tl.constexpr):
    """This program's particle and :func:`_tile` in a grid of ``N`` particles times the tiles, the
    particles fastest: the ``N`` particles of one tile run side by side, so that they can share its
    :math:`\\mu`, :math:`\\sigma` through L2 (with the tiles fastest, each particle's pass over a weight
    larger than L2 comes after the others' have left it; the effect was not measured on its own)."""
    pid = tl.program_id(0)
    offs_r, c0, offs_c = _tile(pid // N, R, BR, BC)
    return pid % N, offs_r, c0, offs_c


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` with the inputs in bf16 (``PRECISION="bf16"``) or in ``b``'s dtype, as
    ``tl.dot``'s ``input_precision`` (``"ieee"``, ``"tf32"``). ``"bf16_emulated"``: the inputs
    rounded to bf16 and multiplied in fp32, the same numbers (a product of two bf16 values is exact
    in fp32), for Triton's interpreter, which cannot multiply bf16."""
    if PRECISION == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif PRECISION == "bf16_emulated":
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), acc,
                      input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def forward_kernel(x, loc, scale, seeds, y, N, M, O, K, Kq, sxn, sxm, sxk, syn, sym, syo,
                   BM: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr, ROUNDS: tl.constexpr,
                   PRECISION: tl.constexpr, ACC: tl.constexpr, EVEN: tl.constexpr):
    """``y[n] = x[n] @ W_n.T`` for this program's particle ``n`` (``sxn = 0``: one input for all
    particles), formed transposed, ``W_n @ x[n].T``: the weight tile, drawn in registers, is the
    product's first operand, which the tensor cores read from registers, and the loop no longer waits
    for each product as soon as it is issued, so the next tile's noise can be drawn while they multiply
    (as the second operand it was staged in shared memory and each product was waited for at once)."""
    n, offs_m, _, offs_o = _particle_tile(N, M, BM, BO)
    seed = tl.load(seeds + n)
    acc = tl.full((BO, BM), 0, ACC)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        xt = _load(x + n * sxn + offs_m[:, None] * sxm + offs_k[None, :] * sxk,
                   (offs_m[:, None] < M) & (offs_k[None, :] < K), EVEN)
        w = _weight(loc, scale, seed, offs_o, k0, O, K, Kq, BO, BK, ROUNDS, EVEN)
        acc = _dot(w, tl.trans(xt), acc, PRECISION)
    tl.store(y + n * syn + offs_m[:, None] * sym + offs_o[None, :] * syo, tl.trans(acc).to(y.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_o[None, :] < O))


@triton.jit
def grad_input_kernel(gy, loc, scale, seeds, gx, N, M, O, K, Kq, sgn, sgm, sgo, sxn, sxm, sxk,
                      SUM_PARTICLES: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr,
                      ROUNDS: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, EVEN: tl.constexpr):
    """``gx[n] = gy[n] @ W_n`` for this program's particle ``n``, or, with ``SUM_PARTICLES`` (an input
    shared by the particles), ``gx = sum_n gy[n] @ W_n``; formed transposed, ``W_n.T @ gy[n].T``, the
    weight tile the first operand (:func:`forward_kernel`)."""
    if SUM_PARTICLES:
        offs_m, k0, offs_k = _tile(tl.program_id(0), M, BM, BK)
        first = 0
        last = N
    else:
        first, offs_m, k0, offs_k = _particle_tile(N, M, BM, BK)
        last = first + 1
    acc = tl.full((BK, BM), 0, ACC)
    for n in range(first, last):
        seed = tl.load(seeds + n)
        for o0 in range(0, O, BO):
            offs_o = o0 + tl.arange(0, BO)
            g = _load(gy + n * sgn + offs_m[:, None] * sgm + offs_o[None, :] * sgo,
                      (offs_m[:, None] < M) & (offs_o[None, :] < O), EVEN)
            w = _weight(loc, scale, seed, offs_o, k0, O, K, Kq, BO, BK, ROUNDS, EVEN)
            acc = _dot(tl.trans(w), tl.trans(g), acc, PRECISION)
    tl.store(gx + first * sxn + offs_m[:, None] * sxm + offs_k[None, :] * sxk, tl.trans(acc).to(gx.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit
def weight_grad_kernel(p, seeds, gloc, gscale, first, C, O, K, Kq, ACCUMULATE: tl.constexpr,
                       BO: tl.constexpr, BK: tl.constexpr, ROUNDS: tl.constexpr, EVEN: tl.constexpr):
    """The weight gradients' share of particles ``first ... first + C - 1`` from their products
    ``P_c = gy[n].T @ x[n]`` (``p``, ``(C, O, K)``, written by the BLAS):
    ``gloc (+)= sum_c P_c`` and ``gscale (+)= sum_c P_c * eps_{first + c}`` (added to what they hold
    with ``ACCUMULATE``). One read of each product; the noise drawn again, tile by tile."""
    offs_o, k0, offs_k = _tile(tl.program_id(0), O, BO, BK)
    mask = (offs_o[:, None] < O) & (offs_k[None, :] < K)
    where = offs_o[:, None] * K + offs_k[None, :]
    if ACCUMULATE:
        s_loc = _load(gloc + where, mask, EVEN)
        s_scale = _load(gscale + where, mask, EVEN)
    else:
        s_loc = tl.full((BO, BK), 0, gloc.dtype.element_ty)
        s_scale = tl.full((BO, BK), 0, gloc.dtype.element_ty)
    for c in range(0, C):
        pc = _load(p + c * O * K + where, mask, EVEN).to(s_loc.dtype)
        eps = _noise(tl.load(seeds + first + c), offs_o, k0, Kq, BO, BK, ROUNDS)
        s_loc += pc
        s_scale += pc * eps.to(s_loc.dtype)
    tl.store(gloc + where, s_loc, mask=mask)
    tl.store(gscale + where, s_scale, mask=mask)


@triton.jit
def noise_kernel(seeds, out, O, K, Kq, BO: tl.constexpr, BK: tl.constexpr, ROUNDS: tl.constexpr):
    """``out[n] = eps_n`` (``(O, K)`` each), written: the reference the tests compare with."""
    n = tl.program_id(1)
    offs_o, k0, offs_k = _tile(tl.program_id(0), O, BO, BK)
    eps = _noise(tl.load(seeds + n), offs_o, k0, Kq, BO, BK, ROUNDS)
    tl.store(out + n * O * K + offs_o[:, None] * K + offs_k[None, :], eps.to(out.dtype.element_ty),
             mask=(offs_o[:, None] < O) & (offs_k[None, :] < K))


@triton.jit
def moments_kernel(seeds, m1, m2, N, O, K, Kq, BO: tl.constexpr, BK: tl.constexpr, ROUNDS: tl.constexpr):
    """``m1 = sum_n eps_n`` and ``m2 = sum_n eps_n ** 2`` (``(O, K)``): all that the sampled
    log-densities :math:`\\log p(W_n)`, :math:`\\log q(W_n)` need of the noise."""
    offs_o, k0, offs_k = _tile(tl.program_id(0), O, BO, BK)
    s1 = tl.full((BO, BK), 0, m1.dtype.element_ty)
    s2 = tl.full((BO, BK), 0, m1.dtype.element_ty)
    for n in range(0, N):
        eps = _noise(tl.load(seeds + n), offs_o, k0, Kq, BO, BK, ROUNDS).to(s1.dtype)
        s1 += eps
        s2 += eps * eps
    mask = (offs_o[:, None] < O) & (offs_k[None, :] < K)
    where = offs_o[:, None] * K + offs_k[None, :]
    tl.store(m1 + where, s1, mask=mask)
    tl.store(m2 + where, s2, mask=mask)
