"""The tile rules on their own (grouped_gemm_tiles.py): pure functions of the shape, checked without a GPU."""
import itertools

import torch

from simple_moe.grouped_gemm import BENCH_TOKENS, MODEL_SHAPES, splits_tail_tiles
from simple_moe.grouped_gemm_tiles import SMEM_BY_ARCH, _smem_bytes, block_m_for, gemm_tile_config


def test_block_m_holds_the_busiest_expert():
    # The row tile holds twice the average expert (routing is uneven) up to 64 rows, then the 128-row prefill tile.
    assert [block_m_for(rows, 8) for rows in (1, 8, 64, 65, 128, 129, 256, 257, 4096)] == [16, 16, 16, 32, 32, 64, 64, 128, 128]
    # Fewer rows than experts: at most `rows` experts are active, each with one row.
    assert block_m_for(16, 128) == 16 and block_m_for(200, 128) == 16 and block_m_for(1024, 128) == 16


def test_every_pick_fits_shared_memory():
    # Every shape the library measures, in every dtype and INT8 scheme, on every arch: the picked tile's operand buffers fit
    # the arch's shared memory with 8 KiB left for the epilogue, or the tile is already down to 2 stages of 32-deep K steps.
    schemes = [(torch.float32, False, False), (torch.float16, False, False), (torch.bfloat16, False, False),
               (torch.bfloat16, True, False), (torch.bfloat16, True, True)]
    for (name, (experts, top_k, hidden, inter)), tokens, arch, (dtype, w_int8, a_int8), gated in itertools.product(
            MODEL_SHAPES.items(), BENCH_TOKENS, SMEM_BY_ARCH, schemes, (True, False)):
        n, k = (inter, hidden) if gated else (hidden, inter)
        cfg = gemm_tile_config(tokens * top_k, experts, n, k, dtype, arch, gated, w_int8=w_int8, a_int8=a_int8)
        used = _smem_bytes(cfg, dtype, gated, w_int8, arch, a_int8)
        assert used <= SMEM_BY_ARCH[arch] - 8192 or (cfg.num_stages == 2 and cfg.block_k == 32), (name, tokens, arch, dtype, cfg)


def test_rules_split_tails_and_cut_groups_where_measured():
    # SM90 16-bit prefill (OLMoE's shape, E=64): GEMM1 splits its tails off from 384 rows an expert (a half tile counted at
    # 80% of a full one, 100% from 1024 rows) and cuts its groups per expert, 16 high, from 128 rows an expert (with 64+
    # experts; with 8, Mixtral's, only where the tails split, which for 8 experts starts at 256 rows, at 100%); the GEMM2
    # runs on TMA with its groups cut per expert, 16 high up to 1024 rows an expert and 8 above, with GEMM1's tail split
    # above 384 rows; W8A8 and the archs without the flattened loop do neither.
    E, H, I = 64, 2048, 1024
    for per_expert, cost in ((96, 0), (128, 0), (256, 0), (384, 80), (1023, 80), (1024, 100), (4096, 100)):
        gemm1 = gemm_tile_config(per_expert * E, E, I, H, torch.bfloat16, 90, gated=True)
        assert gemm1.flatten and gemm1.flat_tail_cost == cost and splits_tail_tiles(gemm1) == (cost > 0), per_expert
        assert gemm1.expert_groups == (per_expert >= 128) and gemm1.group_m == (16 if per_expert >= 128 else 8), per_expert
        few_experts = gemm_tile_config(per_expert * 8, 8, 14336, 4096, torch.bfloat16, 90, gated=True)
        few_cost = 100 if 256 <= per_expert < 384 else cost  # 8 experts: split at 100% from 256 rows, as from 1024
        assert few_experts.flat_tail_cost == few_cost and few_experts.expert_groups == (few_cost > 0), per_expert
        gemm2 = gemm_tile_config(per_expert * E, E, H, I, torch.bfloat16, 90, gated=False)
        assert gemm2.flatten and gemm2.tma and gemm2.expert_groups, per_expert
        assert gemm2.flat_tail_cost == (0 if per_expert <= 384 else cost), per_expert
        assert gemm2.group_m == (16 if per_expert <= 1024 else 8), per_expert
        for arch, kwargs in ((80, {}), (86, {}), (90, dict(w_int8=True, a_int8=True))):
            for gated, n, k in ((True, I, H), (False, H, I)):
                other = gemm_tile_config(per_expert * E, E, n, k, torch.bfloat16, arch, gated=gated, **kwargs)
                assert not other.flat_tail_cost and not other.expert_groups, (arch, kwargs, gated, per_expert)
