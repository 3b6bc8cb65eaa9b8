"""A/B of grouped-GEMM tiles, interleaved rounds (drift hits every config alike). Writes JSON to argv[1]."""
import dataclasses, json, sys, time
import torch, triton
sys.path.insert(0, "benchmarks")
from tune_tiles import Problem
from simple_moe.grouped_gemm import MODEL_SHAPES, TileConfig, gemm_tile_config, device_arch

R = dataclasses.replace
ROUNDS = 3
arch = device_arch(torch.device("cuda"))

def plan_w8a8():
    out = []
    for name in ("qwen3-30b-a3b", "deepseek-v2-lite", "olmoe-1b-7b", "mixtral-8x7b"):
        E, top_k, H, I = MODEL_SHAPES[name]
        for T in (256, 1024, 4096):
            pick = gemm_tile_config(T * top_k, E, I, H, torch.bfloat16, arch, True, w_int8=True, a_int8=True)
            if pick.block_m < 128:
                continue
            c = [pick, R(pick, fused_gate_up=True), R(pick, fused_gate_up=True, block_k=64, num_stages=4),
                 R(pick, fused_gate_up=True, flatten=False), R(pick, fused_gate_up=True, programs_per_sm=0, flatten=False)]
            out.append((name, T, True, list(dict.fromkeys(c))))
    return out


def plan(quant):
    if quant == "w8a8":
        return plan_w8a8()
    out = []
    for name in ("qwen3-30b-a3b", "deepseek-v2-lite", "olmoe-1b-7b", "mixtral-8x7b"):
        E, top_k, H, I = MODEL_SHAPES[name]
        for T in (16, 64, 256, 1024, 4096):
            for gemm1 in (True, False):
                n, k = (I, H) if gemm1 else (H, I)
                pick = gemm_tile_config(T * top_k, E, n, k, torch.bfloat16, arch, gemm1, w_int8=quant != "none")
                c = [pick]
                if gemm1:
                    if pick.block_m < 128:
                        if quant == "none":
                            continue  # bf16 decode GEMM1: no arrangement won in the first sweep
                        c += [R(pick, weights_left=True), R(pick, fused_gate_up=True), R(pick, weights_left=True, fused_gate_up=True)]
                    else:
                        c += [R(pick, fused_gate_up=True, programs_per_sm=1, flatten=True),
                              R(pick, fused_gate_up=True, programs_per_sm=1),
                              R(pick, fused_gate_up=True, programs_per_sm=1, flatten=True, block_k=128, num_stages=3)]
                        if quant != "none":
                            c += [R(pick, weights_left=True), R(pick, weights_left=True, fused_gate_up=True),
                                  R(pick, weights_left=True, fused_gate_up=True, programs_per_sm=1, flatten=True)]
                else:
                    if pick.block_m < 128:
                        if pick.block_m == 16:
                            c += [TileConfig(16, 64, 128, 1, 4, 3), TileConfig(16, 64, 128, 1, 4, 3, weights_left=True),
                                  TileConfig(16, 128, 128, 1, 4, 3, weights_left=True)]
                        elif quant != "none":
                            c += [R(pick, weights_left=True)]
                        else:
                            continue
                    else:
                        if quant != "none":
                            c += [R(pick, weights_left=True), TileConfig(256, 128, 64, 8, 8, 4, weights_left=True),
                                  R(pick, programs_per_sm=1, flatten=True)]
                        else:
                            continue
                out.append((name, T, gemm1, list(dict.fromkeys(c))))
    return out

def main():
    quant = sys.argv[2]
    bench = lambda fn: triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3
    results, t0 = [], time.time()
    problem, key = None, None
    for name, T, gemm1, configs in plan(quant):
        if key != (name, T):
            problem = None; torch.cuda.empty_cache()
            problem, key = Problem(name, T, quant=quant), (name, T)
        times = {str(c): [] for c in configs}
        for c in configs:
            try:
                problem.run(c, gemm1)()
            except Exception as e:
                times[str(c)] = None
        for _ in range(ROUNDS):
            for c in configs:
                if times[str(c)] is not None:
                    times[str(c)].append(bench(problem.run(c, gemm1)))
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items() if v}
        pick = str(configs[0])
        row = {"shape": name, "T": T, "gemm": 1 if gemm1 else 2, "quant": quant, "pick": pick, "times": times, "median": med}
        results.append(row)
        print(f"{quant} {name:16s} T={T:5d} g{row['gemm']} " + " | ".join(f"{k} {v:.1f}" for k, v in med.items()), flush=True)
    json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "rounds": ROUNDS, "results": results}, open(sys.argv[1], "w"), indent=1)
    print(f"done in {time.time() - t0:.0f} s")

main()
