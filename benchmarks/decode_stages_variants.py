"""Every decode variant check-build enumerates (the rules' tiles, all schemes and dtypes) again with its K loop through 2, 3
and 4 shared-memory stages (`DecodeTile.stages`, NOTES experiment 13), for check-build to compile without a GPU:

    PYTHONPATH=src python3 -m simple_moe check-build --kernel decode --import benchmarks/decode_stages_variants.py \\
        --json benchmarks/results/check_build_decode_stages.json

The table then shows, per variant and arch, the registers, spills and shared memory a staged tile costs, and the SASS counts
(LDGSTS: the cp.async copies the pipeline issues).
"""
from __future__ import annotations

import dataclasses

from simple_moe import decode
from simple_moe._variants import register_variants

STAGES = (2, 3, 4)


@register_variants
def _staged_decode_variants():
    return [dataclasses.replace(v, variant=f"{v.variant} s{stages}", constexprs={**v.constexprs, "K_STAGES": stages})
            for v in decode._decode_variants() for stages in STAGES]
