"""Hopper (sm_90) path of the fused attention forward + JVP, written in Gluon.

Same math and outputs as `kernel.py` (see its docstring, SPEC-rcm §9.1); what changes is the
schedule, which Gluon lets us state and the portable kernel cannot. Each program takes 128 query rows
of one (batch, head) and has three partitions (`gl.warp_specialize`):

- a producer warp (24 registers) that copies Q, tQ once and then the K pairs (K, tK) and V pairs
  (V, tV) of each key block by TMA into a two-stage ring, each pair behind its own barrier, as soon
  as both consumers have freed the stage (K pairs after a block's score products, V pairs after its
  value products);
- two consumer warpgroups of 64 rows each (240 registers each). Per key block j, a consumer issues
  the value products of block j (P~ V, P~ tV, H~ V), retires them, issues the score products of
  block j + 1 (S = Q K^T, dS = tQ K^T + Q tK^T), and then computes the softmax of block j + 1,
  whose exponentials run while its dS products are still on the tensor cores. The two warpgroups
  take turns to issue (a pair of mbarriers), so one's softmax overlaps the other's products.

Register budget: retiring the value products before issuing the next scores keeps the in-flight
accumulators within 240 registers. With both in flight (the accumulators, P~ and H~, and the new S
and dS tiles), ptxas "serialises" every warpgroup MMA (its warning C7512) and the kernel ran 1.3x
slower than the portable one; `scripts/attention_registers.py --hopper` checks this offline.

Scope: bf16 and fp16, head dims 64 and 128, tensors whose (B, S, H, D) layout has unit head-dim
stride, heads packed (stride D) and batches stacked (batch stride = S x sequence stride), which a
TMA descriptor over the (B*S, H*D) matrix describes; `supports` decides and everything else takes
the portable kernel. Rows past a sequence's end read the next batch's rows (or zeros past the
tensor): their scores are masked to -inf for keys, and query rows there are never stored.
"""

import functools

import torch
import triton

try:  # Gluon is experimental; versions without it (or without its Hopper module) use kernel.py
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # Renamed between triton 3.6 and 3.9 (same arguments).
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed triton
    HAVE_GLUON = False

HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16)
# Each program: two consumer warpgroups of ROWS query rows and one producer warp.
ROWS = 64
# (BLOCK_N, consumer registers, producer registers, ping-pong) per head dim: the two float32 (64, D)
# accumulators and the S and dS tiles fill a consumer's registers at D = 128.
CONFIGS = {64: (128, 240, 24, True), 128: (64, 240, 24, True)}
NUM_STAGES = 2
# The shortest key lengths at which `ops.attention` takes this kernel (`min_keys`). Alone, on the
# H200 at 16 heads of 128, it is faster than the portable kernel at every length measured when keys
# and values carry tangents (0.108 vs 0.117 ms at 512 keys, 0.645 vs 0.778 ms at 4,096), but not
# at 512 keys without them (cross-attention to a caption: 0.090 vs 0.086 ms), where the loop is
# too short to hide the pipeline's start; from 1,024 keys it is faster again (docs/benchmarks.md).
MIN_KEYS = 0
MIN_KEYS_NO_KV_TANGENT = 1024


if HAVE_GLUON:
    # fmt: off

    @gluon.jit
    def _loader(q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc, q_smem, tq_smem, k_smem, tk_smem,
                v_smem, tv_smem, q_bar, k_ready, v_ready, k_empty, v_empty, q_row, kv_row0, col, num_blocks,
                ROWS: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                KV_TANGENT: gl.constexpr):
        """Producer warp: both halves of Q and tQ once, then K pairs and V pairs into the ring as
        the consumers free its stages (K, tK after a block's score products; V, tV after its last)."""
        mbarrier.expect(q_bar, 4 * q_desc.block_type.nbytes)
        for half in gl.static_range(2):
            _tma_load(q_desc, [q_row + half * ROWS, col], q_bar, q_smem.index(half))
            _tma_load(tq_desc, [q_row + half * ROWS, col], q_bar, tq_smem.index(half))
        pairs: gl.constexpr = 2 if KV_TANGENT else 1
        for block in range(num_blocks):
            stage = block % NUM_STAGES
            free = ((block // NUM_STAGES) & 1) ^ 1  # a fresh barrier counts as freed once
            row = kv_row0 + block * BLOCK_N
            mbarrier.wait(k_empty.index(stage), free)
            mbarrier.expect(k_ready.index(stage), pairs * k_desc.block_type.nbytes)
            _tma_load(k_desc, [row, col], k_ready.index(stage), k_smem.index(stage))
            if KV_TANGENT:
                _tma_load(tk_desc, [row, col], k_ready.index(stage), tk_smem.index(stage))
            mbarrier.wait(v_empty.index(stage), free)
            mbarrier.expect(v_ready.index(stage), pairs * v_desc.block_type.nbytes)
            _tma_load(v_desc, [row, col], v_ready.index(stage), v_smem.index(stage))
            if KV_TANGENT:
                _tma_load(tv_desc, [row, col], v_ready.index(stage), tv_smem.index(stage))

    @gluon.jit
    def _issue_scores(q, tq, k_smem, tk_smem, block, s_layout: gl.constexpr, ROWS: gl.constexpr,
                      BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, KV_TANGENT: gl.constexpr):
        """Issue S = Q K^T and dS = tQ K^T (+ Q tK^T) of key block `block` (in flight on return)."""
        stage = block % NUM_STAGES
        zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
        k_t = k_smem.index(stage).permute((1, 0))
        s = warpgroup_mma(q, k_t, zero_s, use_acc=False, is_async=True)
        ds = warpgroup_mma(tq, k_t, zero_s, use_acc=False, is_async=True)
        if KV_TANGENT:
            ds = warpgroup_mma(q, tk_smem.index(stage).permute((1, 0)), ds, is_async=True)
        return s, ds

    @gluon.jit
    def _issue_values(acc_o, acc_t, p_in, h_in, v_smem, tv_smem, stage, KV_TANGENT: gl.constexpr):
        """Issue O~ += P~ V and T~ += P~ tV + H~ V for the key block in `stage` (in flight on return)."""
        acc_o = warpgroup_mma(p_in, v_smem.index(stage), acc_o, is_async=True)
        if KV_TANGENT:
            acc_t = warpgroup_mma(p_in, tv_smem.index(stage), acc_t, is_async=True)
        acc_t = warpgroup_mma(h_in, v_smem.index(stage), acc_t, is_async=True)
        return acc_o, acc_t

    @gluon.jit
    def _softmax(s, m_i, l_i, valid, qk_scale_log2, s_layout: gl.constexpr, BLOCK_N: gl.constexpr):
        """P~ of one key block (the first `valid` keys count) against the running max; returns it
        with the new max, the rescale factor alpha and the updated row sums."""
        if valid < BLOCK_N:
            n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(gl.expand_dims(n < valid, 0), s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale_log2)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale_log2 - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, m_new, alpha, l_i

    @gluon.jit
    def _consumer(half, q_smem, tq_smem, k_smem, tk_smem, v_smem, tv_smem, q_bar, k_ready, v_ready,
                  k_empty, v_empty, turn, O, TO, LSE, pid_m, pid_bh, num_heads, seq_q, seq_kv, scale,
                  HEAD_DIM: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                  NUM_STAGES: gl.constexpr, KV_TANGENT: gl.constexpr, PINGPONG: gl.constexpr):
        """One warpgroup: ROWS query rows (half `half` of the program's block) against all keys.

        Each step issues the value products of block j, retires them, and issues the score products
        of block j + 1; the exponentials of block j + 1 run while its dS products are on the tensor
        cores. With PINGPONG the two warpgroups take turns to issue, so one's softmax overlaps the
        other's products."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        q = q_smem.index(half)
        tq = tq_smem.index(half)
        dtype: gl.constexpr = q_smem.dtype
        qk_scale_log2 = scale * 1.4426950408889634
        num_blocks = gl.cdiv(seq_kv, BLOCK_N)
        my_turn = turn.index(half)
        their_turn = turn.index(1 - half)

        # Prologue: the scores of block 0.
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_ready.index(0), 0)
        if PINGPONG:
            mbarrier.wait(my_turn, 0)
        s, ds = _issue_scores(q, tq, k_smem, tk_smem, 0, s_layout, ROWS, BLOCK_N, NUM_STAGES, KV_TANGENT)
        if PINGPONG:
            mbarrier.arrive(their_turn)
        s, ds = warpgroup_mma_wait(num_outstanding=0, deps=(s, ds))
        mbarrier.arrive(k_empty.index(0))
        m_i = gl.full([ROWS], float("-inf"), gl.float32, s_rows)
        p, m_i, alpha, l_i = _softmax(s, m_i, gl.zeros([ROWS], gl.float32, s_rows), gl.minimum(seq_kv, BLOCK_N),
                                      qk_scale_log2, s_layout, BLOCK_N)
        h = p * (ds * scale)
        r_i = gl.sum(h, 1)
        p_in = gl.convert_layout(p.to(dtype), p_layout)
        h_in = gl.convert_layout(h.to(dtype), p_layout)
        acc_o = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        acc_t = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)

        for block in range(num_blocks - 1):
            stage = block % NUM_STAGES
            nxt = block + 1
            mbarrier.wait(v_ready.index(stage), (block // NUM_STAGES) & 1)
            if PINGPONG:
                mbarrier.wait(my_turn, nxt & 1)
            acc_o, acc_t = _issue_values(acc_o, acc_t, p_in, h_in, v_smem, tv_smem, stage, KV_TANGENT)
            # Retire the value products before the next scores are issued: the accumulators, P~ and
            # H~ and the new score tiles do not all fit in registers while in flight (ptxas would
            # serialise every warpgroup MMA).
            retired = warpgroup_mma_wait(num_outstanding=0, deps=(acc_o, acc_t, p_in, h_in))
            acc_o = retired[0]
            acc_t = retired[1]
            mbarrier.arrive(v_empty.index(stage))
            mbarrier.wait(k_ready.index(nxt % NUM_STAGES), (nxt // NUM_STAGES) & 1)
            s, ds = _issue_scores(q, tq, k_smem, tk_smem, nxt, s_layout, ROWS, BLOCK_N, NUM_STAGES, KV_TANGENT)
            if PINGPONG:
                mbarrier.arrive(their_turn)
            s = warpgroup_mma_wait(num_outstanding=2 if KV_TANGENT else 1, deps=(s,))
            p, m_i, alpha, l_i = _softmax(s, m_i, l_i, gl.minimum(seq_kv - nxt * BLOCK_N, BLOCK_N),
                                          qk_scale_log2, s_layout, BLOCK_N)
            alpha_o = gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
            acc_o = acc_o * alpha_o
            acc_t = acc_t * alpha_o
            ds = warpgroup_mma_wait(num_outstanding=0, deps=(ds,))
            mbarrier.arrive(k_empty.index(nxt % NUM_STAGES))
            h = p * (ds * scale)
            r_i = r_i * alpha + gl.sum(h, 1)
            p_in = gl.convert_layout(p.to(dtype), p_layout)
            h_in = gl.convert_layout(h.to(dtype), p_layout)

        # Drain: the value products of the last block.
        last = num_blocks - 1
        stage = last % NUM_STAGES
        mbarrier.wait(v_ready.index(stage), (last // NUM_STAGES) & 1)
        if PINGPONG:
            mbarrier.wait(my_turn, num_blocks & 1)
        acc_o, acc_t = _issue_values(acc_o, acc_t, p_in, h_in, v_smem, tv_smem, stage, KV_TANGENT)
        if PINGPONG:
            mbarrier.arrive(their_turn)
        retired = warpgroup_mma_wait(num_outstanding=0, deps=(acc_o, acc_t, p_in, h_in))
        acc_o = retired[0]
        acc_t = retired[1]

        # Epilogue: O = O~/l, tO = T~/l - mu O, LSE = (m + log2 l) ln 2.
        inv_l = gl.convert_layout(1.0 / l_i, o_rows)
        mu = gl.convert_layout(r_i, o_rows) * inv_l
        out = acc_o * gl.expand_dims(inv_l, 1)
        tout = acc_t * gl.expand_dims(inv_l, 1) - gl.expand_dims(mu, 1) * out
        first = pid_m * 2 * ROWS + half * ROWS
        offs_m = first + gl.arange(0, ROWS, layout=o_rows)
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        rows = ((pid_bh // num_heads) * seq_q + offs_m).to(gl.int64) * num_heads + pid_bh % num_heads
        out_offs = gl.expand_dims(rows * HEAD_DIM, 1) + gl.expand_dims(offs_d, 0)
        mask = gl.expand_dims(offs_m < seq_q, 1)
        gl.store(O + out_offs, out.to(dtype), mask=mask)
        gl.store(TO + out_offs, tout.to(dtype), mask=mask)
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
        lse_rows = first + gl.arange(0, ROWS, layout=s_rows)
        gl.store(LSE + (pid_bh * seq_q + lse_rows), lse, mask=lse_rows < seq_q)

    @gluon.jit(do_not_specialize=["num_heads", "seq_q", "seq_kv"])
    def _fwd_jvp_hopper_kernel(
        q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc, O, TO, LSE,
        num_heads, seq_q, seq_kv, scale,
        HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
        KV_TANGENT: gl.constexpr, PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr,
        LOADER_REGS: gl.constexpr,
    ):
        """One program: two warpgroups of 64 query rows of one (batch, head) and a producer warp."""
        ROWS: gl.constexpr = q_desc.block_type.shape[0]
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        q_row = (pid_bh // num_heads) * seq_q + pid_m * 2 * ROWS
        kv_row0 = (pid_bh // num_heads) * seq_kv
        col = (pid_bh % num_heads) * HEAD_DIM
        dtype: gl.constexpr = q_desc.dtype

        q_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_desc.layout)
        tq_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], tq_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        if KV_TANGENT:
            tk_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], tk_desc.layout)
            tv_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], tv_desc.layout)
        else:
            tk_smem = k_smem
            tv_smem = v_smem
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # one arrival per consumer warpgroup
            mbarrier.init(v_empty.index(i), count=2)
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        fence_async_shared()
        mbarrier.arrive(turn.index(0))  # warpgroup 0 issues first

        num_blocks = gl.cdiv(seq_kv, BLOCK_N)
        gl.warp_specialize(
            [
                (_consumer, (0, q_smem, tq_smem, k_smem, tk_smem, v_smem, tv_smem, q_bar, k_ready, v_ready,
                             k_empty, v_empty, turn, O, TO, LSE, pid_m, pid_bh, num_heads, seq_q, seq_kv,
                             scale, HEAD_DIM, ROWS, BLOCK_N, NUM_STAGES, KV_TANGENT, PINGPONG)),
                (_consumer, (1, q_smem, tq_smem, k_smem, tk_smem, v_smem, tv_smem, q_bar, k_ready, v_ready,
                             k_empty, v_empty, turn, O, TO, LSE, pid_m, pid_bh, num_heads, seq_q, seq_kv,
                             scale, HEAD_DIM, ROWS, BLOCK_N, NUM_STAGES, KV_TANGENT, PINGPONG)),
                (_loader, (q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc, q_smem, tq_smem, k_smem,
                           tk_smem, v_smem, tv_smem, q_bar, k_ready, v_ready, k_empty, v_empty, q_row,
                           kv_row0, col, num_blocks, ROWS, BLOCK_N, NUM_STAGES, KV_TANGENT)),
            ],
            [4, 1],
            [CONSUMER_REGS, LOADER_REGS],
        )

    # fmt: on


def _row_stride(x: torch.Tensor) -> int:
    """Elements between consecutive rows of the (B*S, H*D) matrix view of (B, S, H, D) `x` (a size-one
    dimension's stride is arbitrary in PyTorch, so it is read off the next dimension that has one)."""
    batch, seq, heads, head_dim = x.shape
    if seq > 1:
        return x.stride(1)
    return x.stride(0) if batch > 1 else heads * head_dim


def _matrix_view_ok(x: torch.Tensor) -> bool:
    """Whether (B, S, H, D) `x` is a (B*S, H*D) matrix with unit column stride and distinct,
    16-byte aligned rows, as a TMA descriptor needs."""
    batch, seq, heads, head_dim = x.shape
    row = _row_stride(x)
    return (
        x.stride(3) == 1
        and (heads == 1 or x.stride(2) == head_dim)
        and row >= heads * head_dim
        and (batch == 1 or seq == 1 or x.stride(0) == seq * row)
        and (row * x.element_size()) % 16 == 0
        and x.data_ptr() % 16 == 0
    )


@functools.cache
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def supports(q, k, v, tq, tk, tv) -> bool:
    """Whether the Hopper kernel can take these inputs."""
    if not HAVE_GLUON or not q.is_cuda or not _is_sm90(q.device.index):
        return False
    if q.dtype not in DTYPES or q.shape[-1] not in HEAD_DIMS or q.numel() == 0 or k.numel() == 0:
        return False
    tensors = [x for x in (q, k, v, tq, tk, tv) if x is not None]
    return all(x.dtype == q.dtype and _matrix_view_ok(x) for x in tensors)


def min_keys(kv_tangent: bool) -> int:
    """The shortest key length at which `ops.attention` takes this kernel (MIN_KEYS raised to
    MIN_KEYS_NO_KV_TANGENT when keys and values carry no tangent)."""
    return MIN_KEYS if kv_tangent else max(MIN_KEYS, MIN_KEYS_NO_KV_TANGENT)


def preferred(q, k, v, tq, tk, tv) -> bool:
    """Whether `ops.attention`'s fused op runs this kernel rather than the portable one: inputs it
    supports, with at least `min_keys` keys."""
    return k.shape[1] >= min_keys(tk is not None) and supports(q, k, v, tq, tk, tv)


@functools.cache
def _shared_layout(block_rows: int, head_dim: int, dtype: torch.dtype):
    # Cached: building it costs about 6 us of Python per descriptor, six descriptors a call, and the
    # op's host time shows in host-bound passes (docs/benchmarks.md, Attention).
    return gl.NVMMASharedLayout.get_default_for([block_rows, head_dim], getattr(gl, str(dtype)[6:]))


def _descriptor(x: torch.Tensor, block_rows: int):
    """TMA descriptor of `x`'s (B*S, H*D) matrix view, in tiles of (block_rows, D)."""
    batch, seq, heads, head_dim = x.shape
    layout = _shared_layout(block_rows, head_dim, x.dtype)
    return TensorDescriptor(x, [batch * seq, heads * head_dim], [_row_stride(x), 1], [block_rows, head_dim], layout)


def attention_fwd_jvp_hopper(q, k, v, tq, tk, tv, scale: float, outputs=None, config=None):
    """(O, tO, LSE) as `kernel.attention_fwd_jvp` returns them, for inputs `supports` accepts; tk, tv
    None: the four-matmul variant. `outputs` optionally gives contiguous (O, tO, LSE) to write into;
    `config` = (BLOCK_N, consumer registers, producer registers, ping-pong) overrides the default."""
    batch, seq_q, heads, head_dim = q.shape
    if outputs is None:
        out = torch.empty((batch, seq_q, heads, head_dim), dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
        outputs = (out, torch.empty_like(out), lse)
    block_n, consumer_regs, loader_regs, pingpong = config or CONFIGS[head_dim]
    kv_tangent = tk is not None
    if not kv_tangent:
        tk, tv = k, v
    descs = [_descriptor(x, ROWS) for x in (q, tq)] + [_descriptor(x, block_n) for x in (k, tk, v, tv)]
    grid = (triton.cdiv(seq_q, 2 * ROWS), batch * heads)
    _fwd_jvp_hopper_kernel[grid](
        *descs, *outputs, heads, seq_q, k.shape[1], scale,
        HEAD_DIM=head_dim, BLOCK_N=block_n, NUM_STAGES=NUM_STAGES, KV_TANGENT=kv_tangent,
        PINGPONG=pingpong, CONSUMER_REGS=consumer_regs, LOADER_REGS=loader_regs, num_warps=4,
    )  # fmt: skip
    return outputs
