"""Triton kernel: attention forward and its tangent (JVP) in one pass over the keys.

Math (SPEC-rcm §9.1), per (batch, head), scale c, tangents tQ, tK, tV of Q, K, V:

    S = c Q K^T,  P = softmax_row(S),  O = P V
    dS = c (tQ K^T + Q tK^T)                        (tangent of S)
    dP = P * (dS - rowsum(P * dS))                  (tangent of the softmax)
    tO = dP V + P tV = P tV + (P * dS) V - mu O,    mu = rowsum(P * dS)

Streaming form (FlashAttention-2 online softmax), for one block of query rows and key blocks j,
with running max m (base 2), and every accumulator rescaled by alpha = exp2(m_old - m_new):

    P~_j = exp2(S_j log2(e) - m)    l <- alpha l + rowsum(P~_j)    O~ <- alpha O~ + P~_j V_j
    H~_j = P~_j * dS_j              r <- alpha r + rowsum(H~_j)    T~ <- alpha T~ + P~_j tV_j + H~_j V_j
    epilogue:  O = O~ / l,  mu = r / l,  tO = T~ / l - mu O,  LSE = (m + log2 l) ln 2

T~ merges the two tangent accumulators of SPEC-rcm §9.1 (A~ + B~): both are rescaled by the same
alpha, so one (BLOCK_M, D) float32 accumulator fewer stays in registers. Six matmuls per tile pair
(QK^T, tQ K^T, Q tK^T, P~V, P~tV, H~V), 12 Sq Skv D flops per (batch, head); no Sq x Skv buffer.
When K and V carry no tangent (KV_TANGENT off: cross-attention to a text, whose tangent is zero in
sCM) Q tK^T and P~tV are skipped: four matmuls, 8 Sq Skv D flops.

Numerics: scores and accumulators in float32; QK^T-type dots take input-dtype operands; P~ and H~
are cast to V's dtype for their dots; float32 inputs use exact ("ieee") dots, not tf32. Ragged
tails: keys beyond Skv only in the last block, whose loads are masked and scores set to -inf; head
dims that are not a power of two are padded to BLOCK_D by masked loads.

Layout: (B, S, H, D) with arbitrary strides per tensor (tangents may differ from their primals);
outputs O, tO are written contiguous (B, Sq, H, D) in the input dtype, LSE as float32 (B, H, Sq).
Grid: (ceil(Sq / BLOCK_M), B * H), block sizes autotuned on CUDA, fixed and small elsewhere (the
Triton interpreter, `TRITON_INTERPRET=1`, which CI uses on CPU tensors).
"""

import inspect

import torch
import triton
import triton.language as tl

# The kernels' argument lists stay one stride group per line: ruff's one-name-per-line layout would
# triple their length without making them easier to check against the call sites.
# fmt: off


@triton.jit
def _load_rows(base, rows, offs_d, stride_row, stride_d, num_rows, HEAD_DIM: tl.constexpr,
               MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, zero-filled past num_rows / HEAD_DIM when those masks are on."""
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :] * stride_d
    if MASK_ROWS and MASK_D:
        tile = tl.load(ptrs, mask=(rows[:, None] < num_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif MASK_ROWS:
        tile = tl.load(ptrs, mask=rows[:, None] < num_rows, other=0.0)
    elif MASK_D:
        tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _update(
    acc_o, acc_t, m_i, l_i, r_i, q, tq, k, tk, v, tv, n, seq_kv, qk_scale_log2, scale,
    MASK_N: tl.constexpr, PRECISION: tl.constexpr, KV_TANGENT: tl.constexpr,
):
    """Fold one key block (k, tk, v, tv at key rows n) into the running softmax state; without
    KV_TANGENT, tk and tv are zero and their two matmuls are skipped (tk, tv are not read)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASK_N:
        s = tl.where(n[None, :] < seq_kv, s, float("-inf"))
    # The scale goes inside exp2's argument (one FMA); max commutes with a positive scale.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale_log2)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale_log2 - m_new[:, None])
    ds = tl.dot(tq, tl.trans(k), input_precision=PRECISION)
    if KV_TANGENT:
        ds = tl.dot(q, tl.trans(tk), ds, input_precision=PRECISION)
    h = p * (ds * scale)
    l_i = l_i * alpha + tl.sum(p, 1)
    r_i = r_i * alpha + tl.sum(h, 1)
    p_in = p.to(v.dtype)
    acc_o = tl.dot(p_in, v, acc_o * alpha[:, None], input_precision=PRECISION)
    acc_t = acc_t * alpha[:, None]
    if KV_TANGENT:
        acc_t = tl.dot(p_in, tv, acc_t, input_precision=PRECISION)
    acc_t = tl.dot(h.to(v.dtype), v, acc_t, input_precision=PRECISION)
    return acc_o, acc_t, m_new, l_i, r_i


@triton.jit
def _store_outputs(
    O, TO, LSE, acc_o, acc_t, m_i, l_i, r_i, off_b, off_h, offs_m, offs_d, num_heads, seq_q,
    HEAD_DIM: tl.constexpr,
):
    """Epilogue: O = O~/l, tO = T~/l - mu O, LSE; O, tO contiguous (B, Sq, H, D), LSE (B, H, Sq)."""
    inv_l = 1.0 / l_i
    out = acc_o * inv_l[:, None]
    mu = r_i * inv_l
    tout = acc_t * inv_l[:, None] - mu[:, None] * out
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log
    mask_q = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
    out_offs = ((off_b * seq_q + offs_m[:, None]) * num_heads + off_h) * HEAD_DIM + offs_d[None, :]
    tl.store(O + out_offs, out.to(O.dtype.element_ty), mask=mask_q)
    tl.store(TO + out_offs, tout.to(TO.dtype.element_ty), mask=mask_q)
    tl.store(LSE + (off_b * num_heads + off_h) * seq_q + offs_m, lse, mask=offs_m < seq_q)


@triton.jit
def _key_block(
    acc_o, acc_t, m_i, l_i, r_i, q, tq,
    k_base, tk_base, v_base, tv_base,
    stride_kn, stride_kd, stride_tkn, stride_tkd, stride_vn, stride_vd, stride_tvn, stride_tvd,
    start_n, seq_kv, qk_scale_log2, scale, offs_n, offs_d,
    HEAD_DIM: tl.constexpr, MASK_N: tl.constexpr, MASK_D: tl.constexpr, PRECISION: tl.constexpr,
    KV_TANGENT: tl.constexpr,
):
    """Pointer loads of the key block starting at start_n, then `_update`."""
    n = start_n + offs_n
    k = _load_rows(k_base, n, offs_d, stride_kn, stride_kd, seq_kv, HEAD_DIM, MASK_N, MASK_D)
    v = _load_rows(v_base, n, offs_d, stride_vn, stride_vd, seq_kv, HEAD_DIM, MASK_N, MASK_D)
    if KV_TANGENT:
        tk = _load_rows(tk_base, n, offs_d, stride_tkn, stride_tkd, seq_kv, HEAD_DIM, MASK_N, MASK_D)
        tv = _load_rows(tv_base, n, offs_d, stride_tvn, stride_tvd, seq_kv, HEAD_DIM, MASK_N, MASK_D)
    else:
        tk, tv = k, v  # unused: _update skips the products with the (zero) key and value tangents
    return _update(acc_o, acc_t, m_i, l_i, r_i, q, tq, k, tk, v, tv, n, seq_kv, qk_scale_log2, scale,
                   MASK_N, PRECISION, KV_TANGENT)


# Lengths and head counts are not specialised (Triton would compile a variant for values of 1 and for
# multiples of 16): each new resolution or caption length would otherwise compile the kernel again, and
# nothing the kernel loads in bulk gets its alignment from them (strides and HEAD_DIM give that).
@triton.jit(do_not_specialize=["num_heads", "seq_q", "seq_kv"])
def _attention_fwd_jvp_kernel(
    Q, K, V, TQ, TK, TV, O, TO, LSE,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_tqb, stride_tqs, stride_tqh, stride_tqd,
    stride_tkb, stride_tks, stride_tkh, stride_tkd,
    stride_tvb, stride_tvs, stride_tvh, stride_tvd,
    num_heads, seq_q, seq_kv, scale,
    seq_q_bucket, seq_kv_bucket,  # autotuning keys only (see `length_bucket`)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, KV_TANGENT: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, head) against all keys (pointer loads)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    MASK_D: tl.constexpr = BLOCK_D != HEAD_DIM

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    tq_base = TQ + off_b * stride_tqb + off_h * stride_tqh
    q = _load_rows(q_base, offs_m, offs_d, stride_qs, stride_qd, seq_q, HEAD_DIM, True, MASK_D)
    tq = _load_rows(tq_base, offs_m, offs_d, stride_tqs, stride_tqd, seq_q, HEAD_DIM, True, MASK_D)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    tk_base = TK + off_b * stride_tkb + off_h * stride_tkh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    tv_base = TV + off_b * stride_tvb + off_h * stride_tvh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale_log2 = scale * 1.4426950408889634  # log2(e): scores live in the exp2 domain

    # Full key blocks without masks, then at most one ragged block with them.
    full_end = (seq_kv // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc_o, acc_t, m_i, l_i, r_i = _key_block(
            acc_o, acc_t, m_i, l_i, r_i, q, tq, k_base, tk_base, v_base, tv_base,
            stride_ks, stride_kd, stride_tks, stride_tkd, stride_vs, stride_vd, stride_tvs, stride_tvd,
            start_n, seq_kv, qk_scale_log2, scale, offs_n, offs_d,
            HEAD_DIM=HEAD_DIM, MASK_N=False, MASK_D=MASK_D, PRECISION=PRECISION, KV_TANGENT=KV_TANGENT,
        )
    if full_end < seq_kv:
        acc_o, acc_t, m_i, l_i, r_i = _key_block(
            acc_o, acc_t, m_i, l_i, r_i, q, tq, k_base, tk_base, v_base, tv_base,
            stride_ks, stride_kd, stride_tks, stride_tkd, stride_vs, stride_vd, stride_tvs, stride_tvd,
            full_end, seq_kv, qk_scale_log2, scale, offs_n, offs_d,
            HEAD_DIM=HEAD_DIM, MASK_N=True, MASK_D=MASK_D, PRECISION=PRECISION, KV_TANGENT=KV_TANGENT,
        )
    _store_outputs(O, TO, LSE, acc_o, acc_t, m_i, l_i, r_i, off_b, off_h, offs_m, offs_d, num_heads, seq_q,
                   HEAD_DIM)


# fmt: on

# Search space from a sweep on an H100 (bf16, (1, 4096, 40, 128); scripts/attention_sweep.py):
# (128, 64, 8, 2) was fastest at 1.87 ms with 255 registers and 8 spilled; BLOCK_N = 128 or
# BLOCK_M = 128 with 4 warps spill hundreds of registers (3-10x slower). The two float32 (BLOCK_M, D)
# accumulators plus the S and dS tiles bound the tile sizes at D = 128; D = 64 has more room.
TUNING_SPACE = [
    # BLOCK_M, BLOCK_N, num_warps, num_stages
    (128, 64, 8, 2),
    (128, 64, 8, 3),
    (128, 32, 8, 3),
    (64, 64, 4, 3),
    (64, 32, 4, 3),
]
# Also tried on every shape: small enough in shared memory for float32 and head dims up to 256.
FALLBACK_CONFIG = (64, 32, 4, 1)
# Off CUDA (the interpreter) one small config and no tuning.
INTERPRETER_CONFIG = (16, 16, 1, 1)


def pipelined_tile_bytes(block_n: int, block_d: int, stages: int, element_bytes: int, kv_tangent: bool) -> int:
    """Shared memory the software pipeline holds for the key-side tiles: K and V (and their tangents)
    of BLOCK_N x BLOCK_D each, one buffer per stage. A lower bound of what the compiled kernel takes."""
    return stages * (4 if kv_tangent else 2) * block_n * block_d * element_bytes


def fitting_configs(configs, element_bytes: int, block_d: int, kv_tangent: bool, limit_bytes: int) -> list:
    """The configurations whose pipelined tiles fit in `limit_bytes` of shared memory, the smallest one
    always kept. Configurations that do not fit fail to compile only after Triton has tried them: the
    float32 autotuning of one shape bucket took 34-39 s on an H200 (issue: first-call cost), most of it
    spent on such failures."""
    size = lambda c: pipelined_tile_bytes(  # noqa: E731
        c.kwargs["BLOCK_N"], block_d, c.num_stages, element_bytes, kv_tangent
    )
    kept = [c for c in configs if size(c) <= limit_bytes]
    return kept or [min(configs, key=size)]


def _shared_memory_limit(device: torch.device) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"]


def _prune_for_shared_memory(configs, named_args, **kwargs):
    """Triton's early_config_prune hook. Pruning only saves time: if this Triton passes its arguments
    otherwise than expected, every configuration is tried, as before."""
    try:
        q, block_d, kv_tangent = named_args["Q"], kwargs["BLOCK_D"], kwargs["KV_TANGENT"]
        limit = _shared_memory_limit(q.device) if q.is_cuda else 1 << 40
    except (KeyError, AttributeError, RuntimeError):
        return configs
    return fitting_configs(configs, q.element_size(), block_d, kv_tangent, limit)


# cache_results: the choice per key is stored in Triton's on-disk cache, so a restarted job does not tune
# the same shape bucket again (a Triton without the option tunes once per process, as before).
_PERSISTENT = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
_attention_fwd_jvp_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in [*TUNING_SPACE, FALLBACK_CONFIG]
    ],
    key=["seq_q_bucket", "seq_kv_bucket", "HEAD_DIM", "KV_TANGENT"],
    prune_configs_by={"early_config_prune": _prune_for_shared_memory},
    **_PERSISTENT,
)(_attention_fwd_jvp_kernel)


def length_bucket(length: int) -> int:
    """The sequence length the autotuner keys on: the next power of two, at least 1024.

    Keying on exact lengths re-tuned (compiling and timing every configuration) for each new
    resolution or caption length; tiles are at most 128 long, so lengths within a factor of two
    share a best configuration, and below 1024 the launch is too small for the choice to matter.
    """
    return max(1024, triton.next_power_of_2(length))


DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def attention_fwd_jvp(q, k, v, tq, tk, tv, scale: float, outputs=None, config=None):
    """Launch the fused kernel: returns (O, tO, LSE) for (B, S, H, D) inputs of any strides.

    tk and tv both None: keys and values carry no tangent (the four-matmul variant).

    `outputs` optionally gives contiguous (O, tO, LSE) to write into (tests poison them first);
    `config` = (BLOCK_M, BLOCK_N, num_warps, num_stages) skips autotuning (sweeps).
    """
    if q.dtype not in DTYPES:
        raise ValueError(f"the Triton attention kernel takes {DTYPES}, got {q.dtype}")
    batch, seq_q, heads, head_dim = q.shape
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"the Triton attention kernel takes head dims up to {MAX_HEAD_DIM}, got {head_dim}")
    if outputs is None:
        out = torch.empty((batch, seq_q, heads, head_dim), dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
        outputs = (out, torch.empty_like(out), lse)
    if seq_q == 0 or batch * heads == 0 or k.shape[1] == 0:
        return outputs
    _launch((q, k, v, tq, tk, tv), outputs, scale, config)
    return outputs


def _launch(inputs, outputs, scale, config):
    """Build the arguments and run the kernel, autotuned unless `config` is given; returns the
    compiled kernel when `config` is given (sweeps read its registers and spills)."""
    q, k = inputs[0], inputs[1]
    batch, seq_q, heads, head_dim = q.shape
    kv_tangent = inputs[4] is not None
    if not kv_tangent:  # the kernel never reads them; k and v stand in for pointers and strides
        inputs = (*inputs[:4], inputs[1], inputs[2])
    args = [*inputs, *outputs]
    for x in inputs:
        args.extend(x.stride())
    args.extend([heads, seq_q, k.shape[1], scale, length_bucket(seq_q), length_bucket(k.shape[1])])
    meta = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        KV_TANGENT=kv_tangent,
    )
    if config is None and q.is_cuda:
        grid = lambda cfg: (triton.cdiv(seq_q, cfg["BLOCK_M"]), batch * heads)
        _attention_fwd_jvp_tuned[grid](*args, **meta)
        return None
    block_m, block_n, warps, stages = config or INTERPRETER_CONFIG
    grid = (triton.cdiv(seq_q, block_m), batch * heads)
    return _attention_fwd_jvp_kernel[grid](
        *args, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **meta
    )


def tuned_config(seq_q: int, seq_kv: int, head_dim: int, dtype: torch.dtype, kv_tangent: bool = True) -> str:
    """The autotuner's choice for these sizes, as text ("" if they were not tuned yet)."""
    wanted = (length_bucket(seq_q), length_bucket(seq_kv), head_dim, kv_tangent)
    for key, cfg in _attention_fwd_jvp_tuned.cache.items():
        if tuple(key[:4]) == wanted and str(dtype) in map(str, key):
            return str(cfg)
    return ""
