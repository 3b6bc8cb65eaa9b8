"""Tile choice for the grouped GEMM (grouped_gemm.py): `TileConfig`, the tile of one launch, and `gemm_tile_config`, the rule
that picks it from the problem's shape, dtype and arch.

The rules are pure functions of the shape, so they run on the host without touching the device, are cached, and are tested
without a GPU. Each rule carries the measurement that justified it (the result files are under benchmarks/results/);
`autotune.py` can replace the rule's pick with a measured one per shape.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch



@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    # 0: one program per tile of the host-known bound. n > 0: persistent, n programs per SM, each looping over tiles.
    programs_per_sm: int = 0
    flatten: bool = False  # persistent only: one software pipeline across the tile loop and the K loop
    half_tail: bool = True  # allow half-height last row blocks (see splits_tail_tiles)
    # Compute out^T = W @ A^T (WEIGHTS_LEFT): the weight tile becomes the tensor-core instruction's left operand, which SM90's
    # wgmma may read from registers, so int8 weights converted there skip a trip back through shared memory.
    weights_left: bool = False
    # Gated GEMM1: gate and up columns alternate in one weight tile of 2 x block_n rows, one dot instead of two (FUSED_GATE_UP).
    fused_gate_up: bool = False
    # GEMM2 on SM90+, persistent: both operand tiles copied by TMA (grouped_gemm_tma.py) instead of cp.async.
    tma: bool = False
    # Flattened persistent loops: 0 keeps each expert's tail full height; n > 0 runs tails of <= block_m/2 rows as half-height
    # tiles in a second group of programs, a half tile counted as n % of a full one when the programs are split (tail_roles).
    flat_tail_cost: int = 0
    # Persistent loops: row-block groups (group_m high) cut per expert instead of across experts (tile_coordinates).
    expert_groups: bool = False

    def __str__(self) -> str:
        persistent = f" p{self.programs_per_sm}{'f' if self.flatten else ''}" if self.programs_per_sm else ""
        return (f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} w{self.num_warps} s{self.num_stages}{persistent}"
                + ("" if self.half_tail else " nh") + (" wl" if self.weights_left else "")
                + (" fgu" if self.fused_gate_up else "") + (" tma" if self.tma else "")
                + (f" t{self.flat_tail_cost}" if self.flat_tail_cost else "") + (" eg" if self.expert_groups else ""))


# Shared memory one block may use (bytes): A100 163 KiB, consumer Ampere (SM86) and Ada (SM89) 99 KiB, H100 227 KiB.
SMEM_BY_ARCH = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def block_m_for(rows: int, num_experts: int) -> int:
    """Rows per tile, sized for the busiest expert rather than the average one (at most min(E, rows) experts are active).

    An expert with one row more than BLOCK_M takes two row tiles and so reads its weights twice, which is what decode time is
    made of; routing is uneven, so the tile must hold about twice the average. On the H100 (stage_times_h100_v2.txt) Mixtral
    at T=64 (16 rows an expert on average) ran GEMM1 in 929 us with 16-row tiles, slower than at T=16 (628 us), because experts
    with 17-32 rows read their weights twice. From 128 rows a tile the prefill config takes over: in the sweep
    (tune_h100_v1.json) Mixtral at T=256 ran GEMM1 in 697 us with 128-row tiles against 777 us with 64-row ones.
    """
    busiest = 2 * rows / max(1, min(num_experts, rows))
    for block_m in (16, 32, 64):
        if busiest <= block_m:
            return block_m
    return 128


def flat_tail_cost_for(rows: int, num_experts: int, gated: bool) -> int:
    """`TileConfig.flat_tail_cost` for SM90's flattened 16-bit prefill tiles (GEMM1 when `gated`, else GEMM2): from 384 rows
    an expert on average (GEMM2: above 384; GEMM1 with 8 or fewer experts: from 256, at 100% below 384, see the end), tails
    of <= 64 rows run as half-height tiles in a second group of programs, split for a half tile costing 80% of a full one,
    100% from 1024 rows an expert. H100, `ab_tiles.py --plan tails`, 3-5 interleaved rounds
    (ab_tails_bf16_h100{,_repeat,_t8192}.json), full-height tails / t80 / t100, GEMM1:
    OLMoE T=4096 (512 rows an expert) 539.4 / 495.9 / 517.8 us, Qwen3-30B T=8192 (512) 835.6 / 780.0 / 798.3,
    DeepSeek-V2-Lite T=4096 (384) 595.7 / 573.1 / 566.5, T=8192 (768) 1063.0 / 1031.4 / 1046.7,
    OLMoE T=8192 (1024) 1005.0 / 984.3 / 959.9, Mixtral T=4096 (1024) 3509 / 3207 / 3114, T=8192 (2048) 6723 / 6858 / 6422;
    GEMM2 alike (OLMoE T=4096 299.4 / 277.7 / 290.6, T=8192 549.1 / 542.7 / 514.5; Mixtral T=8192 3346 / 3520 / 3073).
    Below 384 rows it loses (Qwen3-30B T=4096, 256 rows: 432.9 / 479.3 / 455.8; DeepSeek-V2-Lite T=2048, 192 rows: 323.8 /
    474.4 / 479.8), as does the TMA GEMM2 (Qwen3-30B T=4096 259.1 / 282.0 / 286.5), which keeps full-height tails up to
    384 rows an expert. (These GEMM2 figures are the cp.async kernel's; above 384 rows GEMM2 now runs on TMA with the same
    split; with groups of 16 cut per expert, split against full-height tails: OLMoE T=4096 270.6 vs 282.2 us, Mixtral
    T=4096 1500.4 vs 1614.9, ab_tma_eg_bf16_h100.json.)
    The split is sensitive (Mixtral T=8192 at t80 is slower than full tails): the tails saved are a few per cent of the
    rows, and a group that finishes early idles.
    GEMM1 with 8 or fewer experts (Mixtral) splits at 100% from 256 rows an expert: at T=1024 (256 rows) GEMM1 alone took
    1040.4 us with it and groups per expert against 1105.2 without (ab_expert-groups_gemm1_t1024-4096_bf16_h100_v28.json);
    the layer in CUDA graphs, 8 rounds with the sides alternating, bitwise equal
    (ab_revision_v29_exp30_mixtral_bf16_h100.json): 1751.6 -> 1674.7 us, lower in every round; fp16 1731.2 -> 1669.7 (6
    rounds); T=1280 (320 rows) even in both dtypes (+0.3 to +0.6%); T=512 (128 rows, outside the rule) unmoved."""
    if gated and num_experts <= 8 and 256 * num_experts <= rows < 384 * num_experts:
        return 100
    if rows < 384 * num_experts + (0 if gated else 1):
        return 0
    return 80 if rows < 1024 * num_experts else 100


@functools.lru_cache(maxsize=4096)
def gemm_tile_config(rows: int, num_experts: int, n: int, k: int, dtype: torch.dtype, arch: int, gated: bool,
                     w_int8: bool = False, a_int8: bool = False) -> TileConfig:
    """Tile config for one grouped GEMM: `rows` expanded rows, `n` output columns (I for gated GEMM1), reduction `k`.

    The numbers are from the H100 bf16 sweeps in benchmarks/results/ (benchmarks/tune_tiles.py): tune_h100_v1.json, and
    tune_h100_v4_wide.json (`--space wide`: narrow and deep tiles, 2 warps, persistent schedules).
    """
    block_m = block_m_for(rows, num_experts)
    elem = 4 if dtype == torch.float32 else 2
    if block_m <= 64:
        # Decode: the time is reading the active experts' weights; 64 columns a program with 128-deep K tiles keeps 32-64 KiB
        # of loads in flight per program (GEMM2: 256 deep, 3 stages). Qwen3-30B T=1: GEMM1 30 us with 64 columns vs 33 us
        # with 32; GEMM2 18 us vs 23 us with 32x128 (v1); Mixtral T=1 GEMM2 (K = 14336) 94 us vs 104 us with 128-deep tiles
        # (v1, and bench v4a). In the wide sweep (v4) no decode tile (16-64 columns, K tiles 128-512, 2-6 stages, 2-4 warps,
        # persistent) beat these by more than 5% at T=1.
        block_k = (128 if gated else 256) if elem == 2 else 64
        cfg = TileConfig(block_m, 64, block_k, 1, 4, 4 if gated else 3)
        if not gated and elem == 2 and block_m == 16 and arch >= 90 and not w_int8 and not a_int8:
            # 16-bit GEMM2 at 16 rows a tile on SM90: 128 columns x 128 deep computed transposed (wgmma m64n16 with the weights
            # as M instead of mma.sync with 16 rows). H200, 3 interleaved rounds (tiles_operands_bf16_h200.json), T=16/64:
            # Qwen3-30B 76.9/109.0 vs 84.1/117.6 us, DeepSeek-V2-Lite 85.8/100.0 vs 89.1/104.7, OLMoE 70.8/78.4 vs 73.5/81.0,
            # Mixtral T=16 227.5 vs 229.5. Int8 weights lose with it (Mixtral W8A16 162.5 vs 135.2 us).
            cfg = TileConfig(16, 128, 128, 1, 4, 3, weights_left=True)
        if not gated and w_int8 and not a_int8 and elem == 2 and block_m == 16 and arch >= 90:
            # W8A16 GEMM2 at 16 rows a tile on SM90 (benchmarks/ab_tiles.py --plan int8-depth, H200, 3 interleaved rounds,
            # ab_int8_depth_w8a16_h200.json), T=16/64 against 16 x 64 x 256 with 3 stages: with K = I <= 1408, 128-deep
            # tiles in 4 stages: Qwen3-30B 53.5/71.8 vs 55.4/76.9 us, DeepSeek-V2-Lite 58.0/63.7 vs 60.6/67.4, OLMoE
            # 50.4/52.4 vs 50.3/52.5. Mixtral's K = 14336 wants more bytes a program instead: 128 columns x 256 deep,
            # 126.9 vs 135.3 us at T=16 (128-deep: 139.3). The split at K = 4096 puts GPT-OSS (K = 2880, not timed) with
            # the short ones.
            cfg = TileConfig(16, 64, 128, 1, 4, 4) if k <= 4096 else TileConfig(16, 128, 256, 1, 4, 3)
        if gated and w_int8 and not a_int8 and elem == 2 and block_m == 16 and arch >= 90:
            # W8A16 GEMM1 at 16 rows a tile on SM90: 256-deep K tiles, 3 stages (int8 weights bring half the bytes of a
            # 16-bit K step, so twice the depth keeps the same bytes in flight). H100, 3 interleaved rounds
            # (ab_int8-depth_w8a16_t{16,64}_h100.json), T=16/64 against 16 x 64 x 128 with 4 stages: Qwen3-30B 106.1/151.4
            # vs 110.1/157.4 us, DeepSeek-V2-Lite 121.7/143.3 vs 125.8/148.4, OLMoE 99.7/109.9 vs 106.5/113.9, Mixtral T=16
            # 328.7 vs 348.2. (An H200 sweep of an earlier kernel, ab_int8_depth_w8a16_h200.json, found it even: -2.0 to
            # +3.6%.)
            cfg = TileConfig(16, 64, 256, 1, 4, 3)
        if gated and w_int8 and not a_int8 and elem == 2 and block_m == 64 and arch >= 90:
            # W8A16 GEMM1 at 64 rows a tile on SM90: computed transposed, the int8 weight tile converted in registers feeds
            # wgmma as its register operand instead of going back through shared memory (tiles_operands_w8a16_h200.json, T=256:
            # DeepSeek-V2-Lite 197.0 vs 239.0 us, OLMoE 142.6 vs 174.3). Not at 16-32 rows (Qwen3-30B T=256 186.1 vs 134.6).
            cfg = dataclasses.replace(cfg, weights_left=True)
        if not gated and elem == 2 and block_m >= 32:
            # GEMM2 from 32 rows an expert: 32 x 128 tiles whatever the busiest expert (its K = I is short, and an expert's
            # row tiles run side by side and share its weight tiles in L2). Mid-size sweep (tune_h100_v4_mid.json), T=256:
            # OLMoE 114 vs 121 us, DeepSeek-V2-Lite 146 vs 159, Qwen3-30B 156 vs 157; Mixtral T=64 330 vs 332.
            cfg = TileConfig(32, 128, 128, 1, 4, 3)
    else:
        # Prefill: compute bound; 8 warps, 4 stages. GEMM1 128 rows x (2 x 128) columns: Qwen3-30B T=4096 496 us vs 690 us with
        # 2 x 64; GEMM2 128 x 256: 298 us vs 435 us with 128 x 128 (Mixtral T=4096: 1625 vs 2169 us).
        # Before SM90 (mma.sync) a 128x256 fp32 accumulator, or two 128x128 ones, spill at 8 warps (check-build, sm_80/sm_86:
        # 224-1236 bytes), so those archs take half the columns; exact fp32 (FMA) takes 64 columns everywhere for the same reason.
        if elem == 4:
            block_n = 64
        elif arch >= 90:
            block_n = 128 if gated else 256
        else:
            block_n = 64 if gated else 128
        cfg = TileConfig(128, block_n, 64 if elem == 2 else 32, 8, 8, 4)
        if a_int8:
            # W8A8 (int8 x int8): 128-deep K tiles, the bytes of the 16-bit 64-deep ones. W8A8 sweep at T=4096
            # (tune_h100_w8a8.json): GEMM1 3 stages: Qwen3-30B 320 vs 404 us with the 16-bit rule, DeepSeek-V2-Lite 392 vs
            # 483, OLMoE 370 vs 452 (that sweep's GEMM1 was persistent; one program a tile with fused gate/up replaced it,
            # below); GEMM2 128 x 256 x 128, 4 stages: 222 vs 251, 222 vs 252, 230 vs 256.
            cfg = dataclasses.replace(cfg, block_k=128, num_stages=3 if gated else 4)
            if arch >= 90 and not gated and (rows >= 64 * num_experts or k >= 8192):
                # GEMM2 on SM90 with both operands copied by TMA (grouped_gemm_tma.py), persistent, one pipeline across
                # tiles, 4 stages. H200, 3 interleaved rounds, bitwise equal (ab_tma_w8a8_h200.json), against the cp.async
                # tile with 3 stages and half-height tails, T=4096: Qwen3-30B 182.1 vs 208.9 us, DeepSeek-V2-Lite 193.8 vs
                # 210.0, OLMoE 200.7 vs 219.1, Mixtral 925.1 vs 927.2; T=256/1024 Mixtral 140.0/307.1 vs 149.0/322.8, OLMoE
                # T=1024 74.8 vs 85.7. (That run's TMA times at T=1024 were bimodal, e.g. DeepSeek-V2-Lite 78.5 with 3
                # stages, 106.7 with 4: the launches then went through Triton's own launcher, whose host time showed; in the
                # layer after the direct-launch fix, ab_revision_tma_w8a8_h200.json, DeepSeek-V2-Lite T=1024 267.8 -> 259.5
                # us, OLMoE 249.2 -> 240.2.) Re-timed after that fix (ab_tma256_w8a8_h200.json): Qwen3-30B T=1024, 64 rows
                # an expert, 91.2 vs 97.6 us (the first run's 128.3 was the launcher), so from 64 rows an expert; below
                # that, not measured. Mixtral's K = 14336 (112 K steps a tile) gains nothing from one pipeline across
                # tiles and loses its registers: without it T=1024/4096 297.2/890.7 vs 310.7/944.5 (first run 307.2/886.9
                # vs 307.1/925.1). 256 x 128 tiles for experts of 256+ rows: no gain (Qwen3-30B T=4096 not in the top 3).
                cfg = dataclasses.replace(cfg, programs_per_sm=1, flatten=k < 8192, tma=True)
            elif arch >= 90 and not gated:
                # The cp.async GEMM2 with the 3 stages every H200 measurement of it ran with (the shared-memory estimate
                # used to count int8 A tiles at 2 bytes, which cut the 4 stages asked for above to 3).
                cfg = dataclasses.replace(cfg, num_stages=3)
            if arch >= 90 and gated:
                # Gate and up in one dot (fused_gate_up), one program per tile with half-height tails: H200, 3 interleaved
                # rounds (tiles_operands_w8a8_h200.json), T=1024/4096: Qwen3-30B 144.3/294.2 vs 156.6/307.3 us with the v5
                # persistent two-dot rule, OLMoE 136.7/358.1 vs 141.6/364.1, Mixtral 591.6/2054.3 vs 695.7/2174.8,
                # DeepSeek-V2-Lite 155.7/378.8 vs 150.3/389.2.
                cfg = dataclasses.replace(cfg, fused_gate_up=True)
        elif arch >= 90 and gated and elem == 2:
            # GEMM1 on SM90: gate and up columns interleaved in one 128 x 256 weight tile, one wgmma chain instead of two that
            # re-read the A tile (fused_gate_up); with one accumulator left, a persistent program per SM can pipeline across
            # tiles. H200, 3 interleaved rounds (tiles_operands_bf16_h200.json), T=1024/4096 against the two-dot tile:
            # Qwen3-30B 226.3/422.7 vs 231.4/531.4 us, DeepSeek-V2-Lite 221.6/543.8 vs 239.5/658.1, OLMoE 196.1/495.1 vs
            # 210.6/619.0, Mixtral 965.8/3075.3 vs 1095.7/3889.5. Int8 weights (converted in the loop) keep half-height tails
            # instead of the cross-tile pipeline (tiles_operands_w8a16_h200.json, T=4096: Qwen3-30B 620.0 vs 643.6 flattened
            # vs 658.9 two dots, DeepSeek-V2-Lite 834.8/859.2/868.5, OLMoE 791.6/805.3/816.2, Mixtral 4712/5022/4951).
            cfg = dataclasses.replace(cfg, fused_gate_up=True, programs_per_sm=1, flatten=not w_int8)
            if not w_int8:  # the 16-bit GEMM1's stages, tails and tile order; int8 weights keep the tile above
                # The weight tile copied by one TMA box (grouped_gemm_tma.py; the gathered A rows stay cp.async): a
                # thread's 16-byte copies a K step go from 12 to 4 (sm_90 LDGSTS 48 -> 16), and no spill at 255 registers.
                # H100, GEMM1 inside the layer at T=4096 (kernel_times_v33_tma_gemm1_*_h100.json, two processes a side):
                # Qwen3-30B 433.0/428.5 vs 438.9/437.5 us, DeepSeek-V2-Lite 552.4/553.0 vs 558.9/557.2, OLMoE 470.6/470.7
                # vs 477.0/478.4; the layer in 8 alternating rounds, bitwise equal (ab_revision_v33_tma_gemm1_r8_bf16_
                # h100.json), T=2048/4096: -0.3/-0.4% OLMoE, -0.7/-1.5% DeepSeek-V2-Lite, -0.5/-1.6% Qwen3-30B; Mixtral
                # T=1024/4096 -0.6/0.0% (6 rounds).
                cfg = dataclasses.replace(cfg, tma=True)
                if 4 * rows <= 3 * 128 * num_experts:
                    # Up to 96 rows an expert (most experts one row block): 3 stages instead of 4. H100, 3 interleaved
                    # rounds (benchmarks/ab_tiles.py --plan neighbours, ab_neighbours_bf16_h100.json), T=1024: Qwen3-30B
                    # 312.6 vs 323.1 us, DeepSeek-V2-Lite 298.1 vs 303.8; not from 128 rows (OLMoE T=1024 239.1 vs 240.7,
                    # Mixtral 1136.9 vs 1010.4, every T=4096 shape 6-9% slower).
                    cfg = dataclasses.replace(cfg, num_stages=3)
                elif rows <= 128 * num_experts:
                    # 97-128 rows an expert (one or two row blocks): 16 row blocks a group instead of 8. Same run: OLMoE
                    # T=1024 232.8 vs 240.7 us (32 a group: 231.0); at 64-96 rows even (Qwen3-30B 323.7 vs 323.1,
                    # DeepSeek-V2-Lite 304.2 vs 303.8); from 256 rows slower (T=4096 +2 to +8%).
                    cfg = dataclasses.replace(cfg, group_m=16)
                else:
                    cfg = dataclasses.replace(cfg, flat_tail_cost=flat_tail_cost_for(rows, num_experts, gated))
                if cfg.flat_tail_cost or (num_experts >= 64 and rows >= 128 * num_experts):
                    # Row-block groups cut per expert, 16 high (as GEMM2's), where the tails split off (from 384 rows an
                    # expert; 256 with <= 8 experts) and, for 64+ experts, from 128 rows an expert. GEMM1 alone, H100, 6 rounds in a new random
                    # order each (ab_expert-groups_gemm1{,_t1024-4096}_bf16_h100_v28.json), against groups of 8 across
                    # experts with the same tails: DeepSeek-V2-Lite T=4096 544.9 vs 578.2 us, T=8192 1010.1 vs 1068.4, OLMoE
                    # T=8192 959.0 vs 990.0, Qwen3-30B T=2048 (128 rows) 346.0 vs 359.1, T=4096 (256) 432.7 vs 441.7 and
                    # 447.3 vs 453.6, OLMoE T=2048 309.8 vs 314.9; even or within 2% at OLMoE T=4096 and Mixtral
                    # T=4096/8192. The layer in CUDA graphs, sides alternating
                    # (ab_revision_v28_gemm1_expert_groups_bf16_h100.json, 8 rounds, the rule from 384 rows against none):
                    # -0.5 to -3.7% at five of the eight points it moves, +0.6 to +1.8% at Qwen3-30B, OLMoE and Mixtral
                    # T=8192, whose rounds spread +-10% (Qwen3-30B T=4096, unmoved, -1.5%); from 128 rows
                    # (ab_revision_v28_eg128_bf16_h100.json, 8 rounds): OLMoE T=1024 397.6 -> 380.0 us (every round),
                    # Qwen3-30B T=2048/4096 -2.1/-3.8%, DeepSeek-V2-Lite and OLMoE T=2048 +0.5/+0.6%. Mixtral (8 experts)
                    # without the tail split loses: T=1024 (256 rows) 1276.2 vs 1105.2 (with it, where flat_tail_cost_for
                    # splits from 256 rows for 8 experts, it gains).
                    cfg = dataclasses.replace(cfg, group_m=16, expert_groups=True)
        elif arch >= 90 and not gated and elem == 2 and w_int8 and k >= 8192 and rows >= 256 * num_experts:
            # W8A16 GEMM2 with a long K (Mixtral: I = 14336) once the average expert fills a 256-row tile: 256 rows x 128
            # columns computed transposed, the converted int8 weight tile as wgmma's register operand (ab_int8_depth_w8a16_h200
            # .json): Mixtral T=1024/4096 753.6/2305.8 vs 841.2/2606.8 us. Not at T=256 (64 rows an expert: 369.8 vs 292.0)
            # nor with a short K (Qwen3-30B T=1024, K = 768: 247.5 vs 153.2).
            cfg = TileConfig(256, 128, 64, 8, 8, 4, weights_left=True)
        elif arch >= 90 and not gated and elem == 2 and not w_int8:
            # GEMM2 (K = I is short: 768-1408 for three of the four shapes) runs persistent, one program per SM, with one
            # software pipeline across tiles, so a tile's epilogue overlaps the next tile's loads (v4): T=4096 Qwen3-30B 273 vs
            # 298 us, DeepSeek-V2-Lite 306 vs 352, OLMoE 285 vs 339, Mixtral 1580 vs 1658. GEMM1 does not gain (Qwen3 516 vs
            # 489 us: its two accumulators leave no registers for the overlap). Not measured before SM90, so not used there.
            # Both operands are copied by TMA (grouped_gemm_tma.py) and the groups of row blocks are cut per expert
            # (expert_groups, tile_coordinates: an expert's row blocks share each weight tile in L2 and no group reads two
            # experts' weights), 16 high up to 1024 rows an expert, 8 above; above 384 rows an expert with the half-height
            # tails of flat_tail_cost_for (the TMA kernel walks them in a second group of programs, as the cp.async one does).
            # - Up to 384 rows, H100, 3 interleaved rounds, bitwise equal (ab_tiles.py --plan expert-groups,
            #   ab_expert-groups_bf16_h100.json) against groups of 8 across experts: T=4096 Qwen3-30B 258.0 vs 267.9 us,
            #   DeepSeek-V2-Lite 278.5 vs 285.9; T=2048 OLMoE 167.5 vs 177.6, DeepSeek-V2-Lite 195.6 vs 199.2; T=1024 OLMoE
            #   133.4 vs 136.7, Mixtral 522.0 vs 546.7. TMA against cp.async: H200 (ab_tma_bf16_h200.json) T=1024 Qwen3-30B
            #   136.0 vs 140.4, OLMoE 108.0 vs 118.3, Mixtral 517.4 vs 529.0.
            # - Above 1024 rows (Mixtral T=8192, 16 row blocks an expert: two groups of 8; one of 16 holds 58 MB of A rows at
            #   K = 14336, more than L2), GEMM2 alone against the cp.async tile this replaced, bitwise equal: H100, 5 rounds,
            #   2653.8 vs 3080.1 us (16 high: 2920.5; ab_tma_eg_bf16_h100_v27.json); H200 2818.7 vs 3128.2
            #   (ab_tma_eg_t8192_bf16_h200_v27.json); the layer with GEMM1's rule too (ab_revision_v27_rules_bf16_h100.json)
            #   9123 -> 8655 us.
            # - From 385 to 1024 rows, H100, 3 rounds (ab_tma_eg_bf16_h100.json), 8 high against the cp.async tile, T=4096:
            #   OLMoE 267.5 vs 275.2 us, Mixtral 1455.6 vs 1644.4. 16 high gives the same tile order wherever no expert has
            #   more than 8 row blocks (all four bench shapes there), so one threshold serves. (The 3-14% the v27 rounds put
            #   between the two there is the harness's: each candidate always ran after the same neighbour. ab_tiles.py now
            #   shuffles its rounds.)
            cfg = dataclasses.replace(cfg, programs_per_sm=1, flatten=True, tma=True, expert_groups=True,
                                      group_m=16 if rows <= 1024 * num_experts else 8,
                                      flat_tail_cost=flat_tail_cost_for(rows, num_experts, gated))
    return _fit_shared_memory(cfg, dtype, arch, gated, w_int8, a_int8)


def _smem_bytes(cfg: TileConfig, dtype: torch.dtype, gated: bool, w_int8: bool, arch: int, a_int8: bool = False) -> int:
    w_elem = 1 if w_int8 else dtype.itemsize
    elem = 1 if a_int8 else dtype.itemsize
    per_stage = cfg.block_m * cfg.block_k * elem + (2 if gated else 1) * cfg.block_n * cfg.block_k * w_elem
    # Triton's cp.async pipeline keeps num_stages - 1 tiles in shared memory (check-build, sm_86: 16x64x128 gated bf16 with 2
    # stages allocates 36864 bytes, one stage's worth); the wgmma pipeline on SM90 keeps num_stages (128x256x64 bf16, 4
    # stages: 197632 bytes).
    return per_stage * (cfg.num_stages if arch >= 90 else max(1, cfg.num_stages - 1))


def _fit_shared_memory(cfg: TileConfig, dtype, arch: int, gated: bool, w_int8: bool, a_int8: bool = False) -> TileConfig:
    # Drop pipeline stages (never below 2) until the operand buffers fit the arch, with 8 KiB left for the epilogue's layout
    # conversion; then halve BLOCK_K. check-build verifies the compiled result against the same limits.
    limit = SMEM_BY_ARCH.get(arch, SMEM_BY_ARCH[86]) - 8192
    while _smem_bytes(cfg, dtype, gated, w_int8, arch, a_int8) > limit:
        if cfg.num_stages > 2:
            cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.block_k > 32:
            cfg = dataclasses.replace(cfg, block_k=cfg.block_k // 2)
        else:
            break
    return cfg
