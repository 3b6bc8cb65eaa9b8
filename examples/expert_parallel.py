"""Expert parallelism with `cutlass_fused_moe` (and `fused_moe_simple`) over torch.distributed.

Every rank builds the same tokens and routing from a fixed seed, holds `E / world_size` experts (its slice of the same seeded
weights), runs the MoE layer with `ep_size=world_size, ep_rank=rank` on global expert ids, and the ranks' partial outputs are summed
with `all_reduce`. Rank 0 then checks the sum against the single-process result and a float64 reference, and prints the time per step.

    torchrun --nproc-per-node 2 examples/expert_parallel.py --shape 8,2,4096,14336 --tokens 64 --dtype bfloat16
    python examples/expert_parallel.py --world-size 2                 # spawns the ranks itself
    TRITON_INTERPRET=1 python examples/expert_parallel.py --world-size 2 --device cpu --shape 4,2,32,32 --tokens 8 --dtype float16

NCCL on GPUs (one GPU per rank), gloo on the CPU (kernels then run in Triton's interpreter if TRITON_INTERPRET=1 was set, else in
plain torch). The partial outputs are all-reduced in float32, then cast, so the sum rounds once like the single-process layer does.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import time

# NVLink multicast (NVLS) stays off, in this process and in every rank it starts: it can take a shared host's GPUs down.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

try:
    import simple_moe  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from simple_moe import cutlass_fused_moe, fused_moe_simple, reference_moe  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
REL_L2 = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # the library's tolerances vs float64


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="8,2,1024,2048", help="E,top_k,H,I (global expert count E)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on GPUs, float32 on the CPU")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after one warm-up step)")
    p.add_argument("--world-size", type=int, default=None, help="spawn this many ranks (without torchrun)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.num_experts, args.top_k, args.hidden, args.inter = (int(v) for v in args.shape.split(","))
    except ValueError:
        p.error(f"--shape: expected four integers E,top_k,H,I, got {args.shape!r}")
    return args


# ---------------------------------------------------------------------------------------------------------------------------------
# Same data on every rank


def make_tokens(args, device, dtype):
    """Tokens and routing (softmax -> top-k -> renormalise), identical on every rank: generated on the CPU from the seed."""
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.tokens, args.hidden, generator=g)
    probs = torch.softmax(torch.randn(args.tokens, args.num_experts, generator=g), dim=-1)
    scales, ids = probs.topk(args.top_k, dim=-1)
    scales = scales / scales.sum(dim=-1, keepdim=True)
    return x.to(device, dtype), ids.to(device, torch.int32), scales.to(device)


def make_experts(args, experts, device, dtype):
    """fc1 `[len(experts), 2I, H]`, fc2 `[len(experts), H, I]`: expert e's weights come from its own seed, so a rank builds only
    its experts and they equal the same experts of the whole model."""
    fc1, fc2 = [], []
    for e in experts:
        g = torch.Generator().manual_seed(args.seed * 100003 + 1 + e)
        fc1.append(torch.randn(2 * args.inter, args.hidden, generator=g) / math.sqrt(args.hidden))
        fc2.append(torch.randn(args.hidden, args.inter, generator=g) / math.sqrt(args.inter))
    return torch.stack(fc1).to(device, dtype), torch.stack(fc2).to(device, dtype)


# ---------------------------------------------------------------------------------------------------------------------------------
# One rank


def run_rank(rank: int, world_size: int, args, device: torch.device) -> bool:
    dtype = DTYPES[args.dtype]
    if args.num_experts % world_size:
        raise SystemExit(f"--shape: E={args.num_experts} must be a multiple of the world size {world_size}")
    local_experts = args.num_experts // world_size
    x, ids, scales = make_tokens(args, device, dtype)
    fc1, fc2 = make_experts(args, range(rank * local_experts, (rank + 1) * local_experts), device, dtype)

    def cutlass_step():
        out = cutlass_fused_moe(x, ids, scales, fc1, fc2, dtype, None, ep_size=world_size, ep_rank=rank)[0]
        total = out.float()
        dist.all_reduce(total)
        return total.to(dtype)

    def simple_step():
        out = fused_moe_simple(x, ids, scales, fc1, fc2, activation="swiglu", ep_size=world_size, ep_rank=rank)
        total = out.float()
        dist.all_reduce(total)
        return total.to(dtype)

    results, times = {}, {}
    for name, step in (("cutlass_fused_moe", cutlass_step), ("fused_moe_simple", simple_step)):
        results[name] = step()  # warm-up (compiles the kernels)
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        times[name] = (time.perf_counter() - start) / max(args.steps, 1)

    if rank != 0:
        return True
    # Rank 0: the single-process layer over all experts, and the float64 reference, on the same data.
    all_fc1, all_fc2 = make_experts(args, range(args.num_experts), device, dtype)
    single = {
        "cutlass_fused_moe": cutlass_fused_moe(x, ids, scales, all_fc1, all_fc2, dtype, None)[0],
        "fused_moe_simple": fused_moe_simple(x, ids, scales, all_fc1, all_fc2, activation="swiglu"),
    }
    layout = {"cutlass_fused_moe": "up_first", "fused_moe_simple": "gate_first"}
    ok = True
    print(f"expert parallel: world_size={world_size} backend={dist.get_backend()} device={device.type} "
          f"E={args.num_experts} (E_local={local_experts}) top_k={args.top_k} H={args.hidden} I={args.inter} "
          f"T={args.tokens} dtype={args.dtype}")
    for name, total in results.items():
        ref = reference_moe(x, ids, scales, all_fc1, all_fc2, "swiglu", gate_layout=layout[name])
        err_ref = _rel_l2(total, ref)
        err_single = _rel_l2(total, single[name])
        passed = err_ref < REL_L2[dtype] and err_single < REL_L2[dtype] and not torch.isnan(total).any().item()
        ok &= passed
        print(f"  {name:18s} {times[name] * 1e3:9.3f} ms/step (MoE + all_reduce)   rel-L2 vs single process {err_single:.2e}, "
              f"vs float64 {err_ref:.2e} (limit {REL_L2[dtype]:.0e})  {'OK' if passed else 'FAILED'}")
    print("expert parallel check:", "OK" if ok else "FAILED")
    return ok


def _rel_l2(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pick_device(args, local_rank: int, world_size: int) -> torch.device:
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.device_count() >= world_size)
    if use_cuda:
        if torch.cuda.device_count() < world_size:
            raise SystemExit(f"--device cuda: {world_size} ranks need {world_size} GPUs, found {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    torch.set_num_threads(1)  # the ranks share the CPU's cores
    return torch.device("cpu")


def _worker(rank: int, world_size: int, args, port: int, failed) -> None:
    """One spawned rank (without torchrun)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    if not _main_in_rank(args):
        failed.value = 1


def _main_in_rank(args) -> bool:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = _pick_device(args, int(os.environ.get("LOCAL_RANK", rank)), world_size)
    if args.dtype is None:
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        return run_rank(rank, world_size, args, device)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        return 0 if _main_in_rank(args) else 1
    world_size = args.world_size or 2
    failed = mp.get_context("spawn").Value("i", 0)
    mp.spawn(_worker, args=(world_size, args, _free_port(), failed), nprocs=world_size, join=True)
    return failed.value


if __name__ == "__main__":
    sys.exit(main())
