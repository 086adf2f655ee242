"""The options of a generate call: :class:`SamplingConfig` (what to sample) and
:class:`KernelConfig` (how the compiled program computes it).

Both are frozen, hashable dataclasses, validated when built. The sampling values travel into the
compiled program as traced scalars (changing them never recompiles); a KernelConfig is a static
argument of the jitted programs, so it is part of their compile-cache key: two configs never
share a trace, and nothing read while tracing lives in a module global.

:func:`kernel_config` is the one place that chooses, by device and shape, what ``'auto'`` means
(attention and GEMM implementations, the top-k threshold, cuBLAS compiler options); the tiling
tables below are read with the shapes a kernel sees when it is traced (on a mesh, each device's
rows and heads). The defaults were measured on an H200 (BENCHMARKS.md).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .checks import check_sampling_args
from .config import ConfigError, GPTConfig

IMPLS = ("xla", "pallas", "pallas-interpret")  # attention and gemm: the reference, the GPU kernel, its interpreter
KTH_IMPLS = ("sort", "pallas", "pallas-interpret")
# small_matmul loads its rows as a tile of this many (the tensor-core dot's least M), the rest
# masked: the most rows the GEMV takes. A constant of the kernel, not a knob.
GEMV_ROWS = 16


def pallas_available() -> bool:
    """Whether this jax has the Pallas Triton API the kernels are written against (jax 0.10/0.11)."""
    try:
        from jax.experimental.pallas import triton as plgpu
    except ImportError:  # pragma: no cover
        return False
    return all(hasattr(plgpu, n) for n in ("load", "store", "CompilerParams"))


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """LlamaGen's sampling settings; the defaults are its ``sample_c2i.py`` (cfg 4.0, top-k 2000).

    cfg_scale: classifier-free guidance scale, finite >= 0; guidance is on iff > 1 (then every image
    has a conditional and a null row). cfg_interval: -1 guides every token, else image tokens
    0..cfg_interval only. temperature: finite >= 0 (0 samples greedily). top_k: keep the k largest
    logits, ties kept (0: off). top_p: nucleus sampling in (0, 1] (1: off).
    """

    cfg_scale: float = 4.0
    cfg_interval: float = -1.0
    temperature: float = 1.0
    top_k: int = 2000
    top_p: float = 1.0

    def __post_init__(self):
        # One validator for the Python API and the command line (adsa_jax.checks): one ConfigError
        # line naming the argument (and its flag) and its range.
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.cfg_scale, self.cfg_interval)
        for name, kind in (("cfg_scale", float), ("cfg_interval", float), ("temperature", float), ("top_k", int),
                           ("top_p", float)):
            object.__setattr__(self, name, kind(getattr(self, name)))

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance is on (cfg_scale > 1)."""
        return self.cfg_scale > 1.0

    @property
    def top_p_on(self) -> bool:
        """Whether top-p filters (it needs a sort of the logits; off at top_p = 1)."""
        return self.top_p < 1.0


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Kernel choices and tuning for a generate / score call (a static jit argument).

    ``attention``, ``gemm``, ``kth`` and ``cublas`` may be ``'auto'`` / None: :func:`kernel_config`
    resolves them for a device and a call's shape. Everything else is used as given.
    """

    # --- implementations ('auto': chosen by kernel_config)
    attention: str = "auto"  # decode attention: 'xla' (the reference), 'pallas' (GPU), 'pallas-interpret'
    gemm: str = "auto"  # the decode steps' weight GEMMs: 'xla', 'pallas' (split-K GEMV, small_matmul), ...
    kth: str = "auto"  # top-k's threshold when top-p is off: 'sort', 'pallas' (kth_largest), 'pallas-interpret'
    cublas: bool | None = None  # compile with CUBLAS_OPTIONS (cuBLAS GEMMs, no dot merger); None: auto
    # Split the decode scan into this many static length buckets: with XLA attention, dense and
    # adsa-select read only the filled part of the cache (faster steps, longer compile). The Pallas
    # kernels read only filled slots without buckets.
    segments: int = 1
    # Stack each layer's w1 and w3 once per call (model.stack_ffn): the FFN's first projection is one
    # GEMM XLA need not merge. H200, GPT-XL 256 px: batch 64 0.609 vs 0.642 s, batch 256 1.467 vs
    # 1.507 s, batch 1 equal; costs one copy of w1|w3 per call (0.6 GiB for GPT-XL bf16). One device only.
    stack_ffn: bool = True
    # Batch invariance: every call decodes its images in groups of exactly invariant_group (the batch
    # padded up, each device's rows on a mesh), one group after another, with the kernels resolved
    # for one group on one device. Each group is then the same program, so an image's tokens depend
    # only on its seed, its index, the settings and invariant_group, not on the batch, its position
    # in it or the number of data-parallel devices (docs/reliability.md says what holds where).
    batch_invariant: bool = False
    invariant_group: int = 32  # images a group (CFG doubles the rows); the guarantee holds per value

    # --- decode_attention (kernels/attention.py); chosen on an H100 by timing the kernel alone over
    # block sizes, warps and stages (benchmarks/step_kernel_time.py times it at these values)
    block_k: int = 128
    num_warps: int = 2
    num_stages: int = 1

    # --- evict_step (kernels/evict_step.py): dense / window / adsa-evict layer steps as one kernel.
    # On (default) where one_kernel_fits. H200, GPT-XL batch 64: adsa-evict 0.935 vs 1.191 s at 256 px
    # and 2.715 vs 2.970 s at 384 px; dense 0.730 vs 0.864 s at 256 px and 2.184 vs 2.752 s at 384 px.
    dense_one_kernel: bool = True
    evict_one_kernel: bool = True
    # Period s > 1: the decode scan is cut into blocks of s steps whose first step is the leaving one
    # (a static schedule), so no step branches. Off: one lax.cond a step, which XLA:GPU runs by
    # copying its predicate to the host and waiting for the stream to drain. H200, GPT-XL 384 px batch 64,
    # budget 0.5, s = 8: 2.18 vs 2.48 s per head, 2.29 vs 2.56 s per layer; the step is traced more
    # often (a leaving and a plain step, per piece), so it compiles longer (36 vs 25 s, 3 compiles at once).
    period_blocks: bool = True
    # With period_blocks, on the kernel path: the step before a leaving step computes that step's
    # candidate scores (v_i . total, |v_i|^2) in its kernel, as it reads V, instead of the leaving
    # step reading every layer's V again in XLA (0.08 s a call per head, 0.12 s per layer in the
    # profile, H200 384 px batch 64, s = 8). With the changes after it, head at s = 8 took 1.762 s
    # (2.259 before), layer 1.705 (2.136), 2026-12-05.
    leave_score_in_kernel: bool = True
    # On the kernel path, a leaving step's lax.top_k (XLA compiles it as a sort of every candidate:
    # 92,160 rows of 224 at GPT-XL 384 px batch 64 per head) as kernels.top_indices, the same indices.
    # H100, GPT-XL 384 px batch 64, period 8 per head: 2.089 s a call against 2.128 off (2026-12-05).
    leave_top_in_kernel: bool = True
    # Layer granularity at period 1 on the kernel path: before the layers, XLA picks every layer's
    # victims from last step's score terms (summed over heads) and the three layer-vector norms the
    # moves need (from the terms' |v|^2: one reduction for all layers), and each layer's evict_step moves o, updates
    # the running sum and returns next step's terms, a slot's |v|^2 written once with its token
    # rather than recomputed every step (off: XLA moves o and updates the sum, three
    # scatters and about six fusions a layer, then the window's kernel). H200, GPT-XL 384 px batch 64,
    # budget 0.5: 1.879 s a call against head's 1.741 (2026-12-05; 2.745 on 2026-12-04, 1.940 with
    # the norms read from V); off: 631 kernels a step.
    layer_move_in_kernel: bool = True
    # Period 1 on the kernel path (head's one kernel, or layer with layer_move_in_kernel): the steps
    # before the first choice (P + M + K - 1, the step before the pool fills: half a call's steps at
    # 0.5) are a decode scan of their own, and the steps from it another. Before, layer skips its
    # XLA choice (nothing reads it yet) and the step kernel is compiled without the victim score:
    # for the H200, head 96 registers a thread (13 warps an SM -> 21; window: 80), layer 119 (156
    # with both loops). The step is compiled twice: GPT-XL 384 px for the H200 target without a GPU,
    # layer 28 s against 17. H100, GPT-XL 384 px batch 64, 0.5: head 2.020 s a call against 2.071
    # off, layer 2.060 against 2.126 (2026-12-05).
    first_choice_scan: bool = True
    # Layer granularity, period 1: every layer's choice (the head sums of the score terms, the first
    # maximum, the four norm lanes) as one Pallas kernel, a program per (row, layer) reading each
    # layer's terms in place, instead of XLA fusions over their 36-way stack (0.18 s of a 1.94 s call,
    # 384 px batch 64, 2026-12-05: 319 us a step). H100, the same: 2.055 s a call against 2.100 off.
    layer_choice_in_kernel: bool = True
    # One program per (row, head) loops over the cache's blocks: with few programs and a long cache
    # that loop is the step's latency, where the other path splits the slots over programs. With 256
    # slots a block over 8 warps one kernel is faster at batch 1 over every cache measured (dense
    # GPT-XL 384 px 0.653 vs 0.808 s, 512 px 1.232 vs 1.473, t2i 512 px 1.286 vs 1.541); longer
    # caches are not measured.
    one_kernel_min_row_heads: int = 256
    one_kernel_max_slots: int = 1200
    # The step kernel applies RoPE to q and k itself instead of an XLA fusion writing rotated q/k/v
    # first. H200, GPT-XL: dense 256 px batch 64 0.600 vs 0.642 s; adsa-evict 384 px batch 64 2.280 vs 2.369.
    rope_in_kernel: bool = True
    # (least row-heads, slots a block, warps), largest grids first; row-heads = programs. H200:
    # - from 1024: 32 / 1, compute-bound (one warp a block: no reduction crosses warps); 256 px batch 64
    #   dense 0.547 s against 0.575 at 64 / 2, batch 256 1.372 against 1.409; 384 px adsa-evict 0.5
    #   batch 64 2.067 against 2.219.
    # - from 512: 64 / 2. Batch 16 (640 row-heads) 0.387 s against 0.402 at 32 / 1, 0.392 at 128 / 4.
    # - from 256: 128 / 4. Batch 8 (320) 0.316 s against 0.326 at 64 / 2, 0.330 at 256 / 8.
    # - below: 256 / 8, where each program's loop is the step's latency. Batch 1 (40) 0.278 s against
    #   0.303 at 64 / 2. Triton pipeline stages (2, 3) change nothing.
    evict_tiers: tuple = ((1024, 32, 1), (512, 64, 2), (256, 128, 4), (0, 256, 8))
    # The always-scoring step kernel of first_choice_scan's second piece (head's victim search,
    # layer's score terms) over a tile of its own: (slots a block, warps); None: evict_tiers'. For
    # the H200 target, head at 384 px batch 64: 16 slots over 1 warp 96 registers a thread (twice the
    # blocks), against 149 at 32 over 1; 32 over 2 warps 127. Slower on an H100 (2026-12-05): (16, 1)
    # 2.149 s a call against 2.018 without; (32, 2) at 0.25 1.788 against 1.591.
    score_tile: tuple | None = None
    # The step kernels (evict_step, decode_attention) widen each bf16 K and V block to float32 by its
    # bits (kernels.common.widen: the same values) instead of astype. For the H200 target (jaxlib
    # 0.10.2, SASS read with nvdisasm) the adsa-evict step kernel at 384 px batch 64 goes from 1,440 to
    # 1,376 instructions, its block loop (32 slots of K and V over one warp) from 899 (FADD 250, FMUL
    # 208, widening 195 for 128 values a thread, SHFL 74) to 835; the one without the score from 1,176
    # to 1,112; registers stay 149 and 96 (13 and 21 warps an SM; the window's kernel: 80, 25). On an
    # H100 (2026-12-06, run_perf_grid part 15, kernel_switch_time.json; equal tokens): adsa-evict 0.5
    # 384 px batch 64 1.955 s a call against 1.968 (every timing on below every one off), batch 256
    # 5.650 against 5.662, dense 256 px batch 64 0.628 against 0.629: small, never slower.
    widen_by_bits: bool = True
    # The victim score (head granularity) widens each bf16 V block on its own, the other way than the
    # attention (astype against by bits: equal values, two programs the compiler cannot merge), so
    # the block stays live as bf16 (half the registers) between its two uses. For the H200 target
    # (jaxlib 0.10.2), 384 px batch 64: the scoring kernel from 149 registers a thread to 123 (13 to
    # 16 warps an SM; 5 waves of its 10,240 programs at batch 256 against 6) for 1,544 instructions
    # against 1,376. Not for the score terms (window form, layer: 157 to 144 registers): there the
    # interpreter's sums of the two programs differed by ulps. Off until timed (run_perf_grid part 16).
    score_widens_apart: bool = False

    # --- small_matmul (kernels/gemv.py): the decode GEMMs at 1-16 rows as a split-K GEMV. H200:
    # GPT-XL 256 px batch 1 0.313 vs 0.343 s (XLA), batch 8 0.335 vs 0.354; of warps, stages,
    # programs, K block and column block only the K block moved (64 over 128).
    gemv_block_n: int = 64
    gemv_block_k: int = 64
    gemv_programs: int = 512  # aim: about this many (column block, K split) programs per call
    gemv_num_warps: int = 4
    gemv_num_stages: int = 3
    # Per weight shape: ((K, N), (block_n, block_k, splits) or None for XLA's GEMM); other shapes
    # follow gemv_tiling's rule. Empty: a table from a sweep was no faster end to end.
    gemv_tiles: tuple = ()
    # After the wo and w2 GEMVs, the partial sum + residual add + next RMSNorm in one kernel
    # (add_rms_norm): GPT-XL 256 px batch 1 0.301 vs 0.310 s with 16 partials per load over 16 warps.
    add_norm: bool = True
    add_norm_chunk: int = 16
    add_norm_num_warps: int = 16

    # --- thresholds kernel_config reads to resolve 'auto'
    # Batch rows (CFG included) from which one GPU compiles with CUBLAS_OPTIONS; None: never. At 128+
    # rows XLA's Triton GEMMs split K and write float32 partials the next kernel sums; cuBLAS does not
    # (at 2 rows cuBLAS is slower).
    gemm_cublas_min_rows: int | None = 128
    # Measured and removed: XLA's wo and w2 GEMMs (N = E; at 128 rows cuBLAS reads their weights at
    # 0.67 and 1.13 TB/s, gemm_time.json) as batched GEMMs over 2 or 4 K slices, the float32 partials
    # summed by the consumer. Slower on an H100 (2026-12-06, kernel_switch_time.json): GPT-XL 256 px
    # batch 64 1.016x and 1.034x, batch 256 1.047x, window 384 px 0.25 1.034x. cuBLAS adds the
    # residual in its epilogue in place; the partials need another pass (an add kernel per layer,
    # 2.6 MB of float32 each at 4 slices).
    gemv_max_rows: int = 16  # rows up to which 'auto' runs the weight GEMMs on small_matmul; 0: never
    # Row-heads below which dense keeps XLA attention where the one-kernel step does not fit: at batch
    # 1 the attention kernel's split-combine costs more than it saves (GPT-XL 384 px batch 1 0.857 s
    # with XLA, 0.873 with the one-kernel step).
    small_row_heads: int = 64

    def __post_init__(self):
        for name, allowed in (("attention", IMPLS), ("gemm", IMPLS), ("kth", KTH_IMPLS)):
            val = getattr(self, name)
            if val != "auto" and val not in allowed:
                raise ConfigError(f"KernelConfig {name} must be 'auto' or one of {', '.join(allowed)}, got {val!r}")
        if not isinstance(self.batch_invariant, bool):
            raise ConfigError(f"KernelConfig batch_invariant must be True or False, got {self.batch_invariant!r}")
        for name in ("segments", "invariant_group", "block_k", "num_warps", "num_stages", "one_kernel_min_row_heads",
                     "one_kernel_max_slots", "gemv_block_n", "gemv_block_k", "gemv_programs", "gemv_num_warps",
                     "gemv_num_stages", "add_norm_chunk", "add_norm_num_warps"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ConfigError(f"KernelConfig {name} must be an integer >= 1, got {val!r}")
        tiers = self.evict_tiers
        if (not tiers or any(len(t) != 3 for t in tiers) or [t[0] for t in tiers] != sorted({t[0] for t in tiers}, reverse=True)
                or tiers[-1][0] != 0):
            raise ConfigError("KernelConfig evict_tiers must be (least row-heads, block, warps) triples, least "
                              f"row-heads strictly decreasing down to 0, got {tiers!r}")
        st = self.score_tile
        if st is not None and (not isinstance(st, tuple) or len(st) != 2
                               or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in st)):
            raise ConfigError(f"KernelConfig score_tile must be None or (slots a block, warps), integers >= 1, "
                              f"got {st!r}")
        if isinstance(self.gemv_tiles, dict):  # accept a dict for convenience; stored hashable
            object.__setattr__(self, "gemv_tiles", tuple(sorted(self.gemv_tiles.items())))

    @property
    def resolved(self) -> bool:
        return "auto" not in (self.attention, self.gemm, self.kth) and self.cublas is not None

    # Shape rules read while tracing (a device of a mesh sees its own rows and heads).

    def evict_tile(self, row_heads: int) -> tuple[int, int]:
        """(slots a block, warps) of evict_step for a grid of ``row_heads`` programs."""
        for least, block, warps in self.evict_tiers:
            if row_heads >= least:
                return block, warps
        raise AssertionError("evict_tiers ends at 0")  # checked in __post_init__

    def one_kernel_fits(self, rows: int, heads: int, slots: int) -> bool:
        """Whether evict_step (one program per (row, head)) is the faster path for ``rows`` batch rows
        (CFG included) x ``heads`` over a cache of ``slots``: enough programs, or a short cache."""
        return rows * heads >= self.one_kernel_min_row_heads or slots <= self.one_kernel_max_slots

    def gemv_tile(self, k: int, n: int):
        """The gemv_tiles entry for a (k, n) weight: a tiling, None (XLA's GEMM), or () (not listed)."""
        return dict(self.gemv_tiles).get((k, n), ())


def kernel_config(cfg: GPTConfig, policy=None, rows: int = 2, dtype=jnp.bfloat16, *, mesh=None,
                  base: KernelConfig | None = None, backend: str | None = None,
                  pallas: bool | None = None) -> KernelConfig:
    """``base`` (default ``KernelConfig()``) with every 'auto' resolved for one call, and explicit
    choices that cannot run refused with a :class:`ConfigError`.

    cfg: the model; policy: the cache policy (None: dense); rows: batch rows, CFG included;
    dtype: the weights' dtype; mesh: the call's mesh or None; backend: default
    ``jax.default_backend()``; pallas: whether the Pallas Triton API exists (default: checked).

    - attention 'auto': the Pallas kernels on a GPU with a power-of-two head_dim >= 16, except dense
      where rows x heads < small_row_heads and the one-kernel step does not fit; XLA elsewhere.
    - gemm 'auto': small_matmul on one GPU for at most gemv_max_rows rows of 2-byte weights (float32
      keeps XLA's exact GEMMs); XLA elsewhere.
    - kth 'auto': kth_largest on one GPU (on a mesh the sampler stays in XLA, which partitions it).
    - cublas None: on one GPU from gemm_cublas_min_rows rows.
    - stack_ffn is kept on one device only (a mesh splits w1 and w3 over its model axis).
    - segments is kept for a policy whose slot c + t holds token t (dense with XLA attention,
      adsa-select), else 1.
    - batch_invariant: ``rows`` must be one group's rows (``invariant_group`` images, CFG included)
      and ``mesh`` is ignored: each device runs the one-device program on its own groups.
    """
    kc = KernelConfig() if base is None else base
    if not isinstance(kc, KernelConfig):
        raise ConfigError(f"options must be an adsa_jax.KernelConfig, got {type(kc).__name__}")
    if kc.batch_invariant:
        mesh = None
    backend = jax.default_backend() if backend is None else backend
    pallas = pallas_available() if pallas is None else bool(pallas)
    gpu = backend == "gpu"
    d = cfg.head_dim
    dim_ok = d >= 16 and not d & (d - 1)
    dense = policy is None or getattr(policy, "name", None) == "dense"
    slots = cfg.cls_token_num + cfg.num_image_tokens - 1 if policy is None else getattr(policy, "slots", 0)

    attention = kc.attention
    if attention == "auto":
        small = (dense and rows * cfg.n_head < kc.small_row_heads
                 and not (kc.dense_one_kernel and kc.one_kernel_fits(rows, cfg.n_head, slots)))
        attention = "pallas" if gpu and dim_ok and pallas and not small else "xla"
    elif attention != "xla":
        if not pallas:
            raise ConfigError(f"attention={attention!r} needs the Pallas Triton API of jax >= 0.10 (this is jax "
                              f"{jax.__version__}): upgrade jax or use attention='xla'")
        if not dim_ok:
            raise ConfigError(f"the Pallas decode kernel needs a power-of-two head_dim >= 16; this model has {d}: "
                              "use attention='xla'")
        if attention == "pallas" and not gpu:
            raise ConfigError(f"attention='pallas' compiles for a GPU; this backend is {backend!r}: use "
                              "attention='auto', 'xla' or 'pallas-interpret'")

    gemm = kc.gemm
    if gemm == "auto":
        ok = gpu and pallas and mesh is None and rows <= kc.gemv_max_rows and jnp.dtype(dtype).itemsize == 2
        gemm = "pallas" if ok else "xla"
    elif gemm != "xla":
        if not pallas:
            raise ConfigError(f"gemm={gemm!r} needs the Pallas Triton API of jax >= 0.10 (this is jax "
                              f"{jax.__version__}): use gemm='xla'")
        if rows > GEMV_ROWS:
            raise ConfigError(f"gemm={gemm!r} is a small-batch kernel (at most {GEMV_ROWS} rows, CFG "
                              f"included); this call has {rows}: use gemm='auto' or 'xla'")
        if mesh is not None:
            raise ConfigError(f"gemm={gemm!r} runs on one device; on a mesh use gemm='auto' or 'xla'")
        if gemm == "pallas" and not gpu:
            raise ConfigError(f"gemm='pallas' compiles for a GPU; this backend is {backend!r}: use "
                              "gemm='auto', 'xla' or 'pallas-interpret'")

    kth = kc.kth
    if kth == "auto":
        kth = "pallas" if gpu and pallas and mesh is None else "sort"
    elif kth != "sort" and not pallas:
        raise ConfigError(f"kth={kth!r} needs the Pallas Triton API of jax >= 0.10: use kth='sort'")

    cublas = kc.cublas
    if cublas is None:
        cublas = (gpu and mesh is None and kc.gemm_cublas_min_rows is not None and rows >= kc.gemm_cublas_min_rows)
    # Length buckets help only a cache whose slot c + t holds token t (dense, adsa-select) read by
    # XLA's attention or adsa-select's candidate scan (dense's kernels read only the filled slots).
    full = policy is None or getattr(policy, "full_cache", False)
    segments = kc.segments if full and not (dense and attention != "xla") else 1
    return dataclasses.replace(kc, attention=attention, gemm=gemm, kth=kth, cublas=bool(cublas),
                               stack_ffn=kc.stack_ffn and mesh is None, segments=segments)


# The reference: XLA everywhere, nothing left to resolve (a policy's default when none is given).
XLA_KERNELS = KernelConfig(attention="xla", gemm="xla", kth="sort", cublas=False)
