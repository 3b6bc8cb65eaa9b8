"""`python -m simple_moe check-build`: compile every registered Triton kernel variant for GPUs that are not present.

For each `KernelVariant` from `simple_moe._variants.all_kernel_variants()` and each requested arch in `variant.archs`
the kernel is compiled ahead of time with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, which
runs the whole Triton pipeline down to a cubin through the `ptxas` shipped inside Triton's package. No GPU and no CUDA
driver is needed. For each compiled kernel we report

* registers and spill bytes, from the `ptxas -v` log (Triton prints it when `knobs.nvidia.dump_ptxas_log` is set);
  `cuobjdump -res-usage` is the fallback for registers when the log is missing;
* shared memory per block: `metadata.shared` (Triton's dynamic shared memory) plus the static shared memory that
  ptxas put in the cubin (`SHARED:` in `cuobjdump -res-usage`; sm_90 cubins carry 1 KiB of it). Both count against
  the per-block opt-in limit of the arch;
* the tensor-core and async-copy instructions in the SASS (`cuobjdump -sass`).

These facts are kept as JSON beside the cubin in Triton's cache, so a second run over unchanged kernels takes seconds.

The run fails when a variant does not compile, when its shared memory exceeds the arch's per-block limit, when its
threads x registers exceed the register file, or when a variant that has a `tl.dot` loop (`has_matrix_loop=True`)
shows no tensor-core instruction (HMMA / IMMA / QMMA / HGMMA / IGMMA / QGMMA) in its SASS. Spills are reported only.

At launch Triton's JIT specialises the arguments: a pointer whose address is a multiple of 16 (torch allocations
always are) and an int that is a multiple of 16 get a divisibility-16 hint, and an int equal to 1 becomes a constexpr.
Without those facts the loads of a tile cannot be vectorised or turned into cp.async, and the SASS (registers, shared
memory, pipelining) is not the one that runs. check-build gives every pointer argument the hint (unless the kernel lists
it in `do_not_specialize_on_alignment`). Ints are the variant's to describe: "i32:16" / "i64:16" in the signature marks
a multiple of 16, and "constexpr" with the value 1 in constexprs a unit stride. A tl.dot kernel with num_stages >= 2
whose SASS shows no cp.async is listed in a note at the end.

TRITON_INTERPRET=1 makes `@triton.jit` return interpreter objects that cannot be compiled, so whenever it is set (or
`--jobs` > 1) the compiles run in fresh worker processes started without it.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import importlib
import importlib.util
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from ._host import triton_interpreting
from .grouped_gemm_tiles import SMEM_BY_ARCH

ARCHS = (80, 86, 89, 90)

# Largest shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), static + dynamic, in bytes: the same
# table the tile heuristics fit their configs into.
SMEM_LIMIT = SMEM_BY_ARCH
# 64K 32-bit registers per SM (and per block) on every arch we target.
REGISTER_FILE = 65536

TENSOR_CORE_OPS = ("HMMA", "IMMA", "QMMA", "HGMMA", "IGMMA", "QGMMA")
COPY_OPS = ("LDGSTS", "LDSM", "STSM", "UTMALDG", "UTMASTG")
REPORTED_OPS = TENSOR_CORE_OPS + COPY_OPS

_SASS_OP_RE = re.compile(r"^\s*/\*[0-9a-fA-F]{4,}\*/\s+(?:@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_]*)", re.MULTILINE)
_PTXAS_REGS_RE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK_RE = re.compile(r"(\d+) bytes stack frame")
_RES_USAGE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


# --------------------------------------------------------------------------------------------------------------------
# Pure helpers


def parse_archs(text: str | Iterable[int]) -> tuple[int, ...]:
    """'80,90' or 'sm_80,sm90' -> (80, 90); every arch must be one we target."""
    items = text.split(",") if isinstance(text, str) else list(text)
    archs: list[int] = []
    for item in items:
        item = str(item).strip().lower().removeprefix("sm_").removeprefix("sm")
        if not item:
            continue
        try:
            arch = int(item)
        except ValueError:
            raise ValueError(f"bad arch {item!r}: expected numbers such as 80,86,89,90") from None
        if arch not in SMEM_LIMIT:
            raise ValueError(f"unsupported arch {arch}: supported are {', '.join(map(str, ARCHS))}")
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise ValueError("no arch given")
    return tuple(archs)


def count_sass_ops(sass: str) -> collections.Counter:
    """Count the SASS instructions of `cuobjdump -sass` output by base opcode ('HMMA.16816.F32.BF16' -> 'HMMA')."""
    return collections.Counter(_SASS_OP_RE.findall(sass))


def reported_ops(counts: collections.Counter) -> dict[str, int]:
    return {op: counts[op] for op in REPORTED_OPS if counts.get(op)}


def has_tensor_core_ops(counts: dict) -> bool:
    return any(counts.get(op, 0) > 0 for op in TENSOR_CORE_OPS)


def parse_ptxas_log(log: str) -> dict:
    """Registers and spill bytes from `ptxas -v` output; missing values are None."""
    out: dict = {"regs": None, "spill_stores": None, "spill_loads": None, "stack": None}
    if m := _PTXAS_REGS_RE.search(log):
        out["regs"] = int(m.group(1))
    if m := _PTXAS_SPILL_RE.search(log):
        out["spill_stores"], out["spill_loads"] = int(m.group(1)), int(m.group(2))
    if m := _PTXAS_STACK_RE.search(log):
        out["stack"] = int(m.group(1))
    return out


def parse_res_usage(text: str) -> dict:
    """REG / STACK / SHARED (static) / LOCAL from `cuobjdump -res-usage`; empty dict when absent."""
    m = _RES_USAGE_RE.search(text)
    if not m:
        return {}
    return dict(zip(("regs", "stack", "static_smem", "local"), map(int, m.groups())))


def smem_limit_error(arch: int, smem_bytes: int) -> str | None:
    limit = SMEM_LIMIT[arch]
    if smem_bytes > limit:
        return f"shared memory {smem_bytes} B exceeds the sm_{arch} per-block limit of {limit} B"
    return None


def register_error(regs: int | None, num_warps: int) -> str | None:
    if regs is None:
        return None
    need = regs * num_warps * 32
    if need > REGISTER_FILE:
        return f"{num_warps} warps x 32 threads x {regs} registers = {need} > {REGISTER_FILE} registers per block"
    return None


# --------------------------------------------------------------------------------------------------------------------
# Compiling one variant


@dataclass
class Result:
    kernel: str
    variant: str
    arch: int
    num_warps: int
    num_stages: int
    has_matrix_loop: bool
    ok: bool = False
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    smem: int | None = None  # dynamic + static bytes per block
    static_smem: int | None = None
    ops: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    seconds: float = 0.0


def _unwrap_jit(fn):
    from triton.runtime.jit import JITFunction

    if isinstance(fn, JITFunction):
        return fn
    raise TypeError(
        f"{getattr(fn, '__name__', fn)!r} is a {type(fn).__name__}, not a triton JITFunction "
        "(TRITON_INTERPRET=1 in the compiling process? check-build compiles in workers started without it)"
    )


def build_source_args(variant) -> tuple[dict, dict, dict]:
    """signature, constexprs and attrs for `ASTSource`, completed the way Triton's JIT would at launch."""
    fn = _unwrap_jit(variant.fn)
    signature: dict = {}
    constexprs = dict(variant.constexprs)
    attrs: dict = {}
    unknown = set(variant.signature) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"signature names unknown arguments {sorted(unknown)} of {fn.__name__}{tuple(fn.arg_names)}")
    unknown = set(constexprs) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"constexprs name unknown arguments {sorted(unknown)} of {fn.__name__}")
    for param in fn.params:
        name = param.name
        ty = variant.signature.get(name)
        if ty is None:
            if name in constexprs:
                ty = "constexpr"
            elif param.is_constexpr and param.has_default:
                ty, constexprs[name] = "constexpr", param.default
            else:
                raise ValueError(f"argument {name!r} of {fn.__name__} is missing from the signature")
        ty = str(ty).strip()
        if ty == "constexpr":
            if name not in constexprs:
                if param.has_default:
                    constexprs[name] = param.default
                else:
                    raise ValueError(f"constexpr argument {name!r} of {fn.__name__} has no value in constexprs")
        elif ty.endswith(":16"):
            ty = ty[:-3]
            attrs[(param.num,)] = [["tt.divisibility", 16]]
        elif ty.startswith("*") and not param.do_not_specialize_on_alignment:
            attrs[(param.num,)] = [["tt.divisibility", 16]]
        signature[name] = ty
    return signature, constexprs, attrs


def _cuobjdump(cubin: bytes) -> str:
    from triton import knobs

    tool = knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory(prefix="simple_moe_cb_") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([tool, "-res-usage", "-sass", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


_FACTS_FILE = "simple_moe_check_build.v1.json"


def kernel_facts(src, arch: int, num_warps: int, num_stages: int, force: bool = False, maxnreg: int | None = None) -> dict:
    """Compile `src` for `arch` and gather what check-build needs from it.

    Returns {"shared": Triton's dynamic smem bytes, "ptxas": parse_ptxas_log(...), "usage": parse_res_usage(...),
    "ops": SASS opcode counts, "num_warps": the compiled warp count}. Triton prints the `ptxas -v` log only when it runs
    ptxas (not on a cache hit), and disassembling with cuobjdump takes about half a second, so the facts are stored as
    JSON in the kernel's own Triton cache directory next to its cubin; a cache hit without them is compiled again.
    """
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.cache import get_cache_manager

    out = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(out):
        knobs.nvidia.dump_ptxas_log = True
        if force:
            knobs.compilation.always_compile = True
        options = {"num_warps": num_warps, "num_stages": num_stages, **({"maxnreg": maxnreg} if maxnreg else {})}
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptxas = parse_ptxas_log(out.getvalue())
    try:
        cache = get_cache_manager(kernel.hash)
    except Exception:  # noqa: BLE001 - no cache: nothing to reuse
        cache = None
    if ptxas["regs"] is None and not force:
        try:
            path = cache.get_file(_FACTS_FILE) if cache is not None else None
            if path is not None:
                return json.loads(Path(path).read_text())
        except Exception:  # noqa: BLE001 - unreadable: compile again
            pass
        return kernel_facts(src, arch, num_warps, num_stages, force=True, maxnreg=maxnreg)
    dump = _cuobjdump(kernel.asm["cubin"])
    facts = {"shared": int(kernel.metadata.shared or 0), "ptxas": ptxas, "usage": parse_res_usage(dump),
             "ops": dict(count_sass_ops(dump)), "num_warps": int(kernel.metadata.num_warps)}
    if cache is not None and ptxas["regs"] is not None:
        with contextlib.suppress(Exception):
            cache.put(json.dumps(facts), _FACTS_FILE, binary=False)
    return facts


def compile_variant(variant, arch: int) -> Result:
    """Compile one variant for one arch and check it. Never raises: failures land in `Result.errors`."""
    res = Result(variant.kernel, variant.variant, arch, variant.num_warps, variant.num_stages,
                 bool(variant.has_matrix_loop))
    t0 = time.perf_counter()
    try:
        from triton.compiler import ASTSource

        signature, constexprs, attrs = build_source_args(variant)
        fn = _unwrap_jit(variant.fn)
        try:  # a Gluon kernel compiles from Gluon's own source type (Triton >= 3.5 ships it)
            from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction
        except ImportError:  # pragma: no cover - a Triton without Gluon has no Gluon variants
            GluonASTSource = GluonJITFunction = None
        source = GluonASTSource if GluonJITFunction is not None and isinstance(fn, GluonJITFunction) else ASTSource
        src = source(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        facts = kernel_facts(src, arch, variant.num_warps, variant.num_stages, maxnreg=variant.maxnreg)
        ptxas, usage = facts["ptxas"], facts["usage"]
        res.regs = ptxas["regs"] if ptxas["regs"] is not None else usage.get("regs")
        res.spill_stores, res.spill_loads = ptxas["spill_stores"], ptxas["spill_loads"]
        res.static_smem = usage.get("static_smem", 0)
        res.smem = facts["shared"] + res.static_smem
        res.ops = reported_ops(collections.Counter(facts["ops"]))
        if (err := smem_limit_error(arch, res.smem)) is not None:
            res.errors.append(err)
        # The compiled warp count: a warp-specialised Gluon kernel runs its worker partitions' warps beside num_warps.
        if (err := register_error(res.regs, facts.get("num_warps", variant.num_warps))) is not None:
            res.errors.append(err)
        if res.has_matrix_loop and not has_tensor_core_ops(res.ops):
            res.errors.append(f"has_matrix_loop but the sm_{arch} SASS has no tensor-core instruction "
                              f"({'/'.join(TENSOR_CORE_OPS)})")
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the run
        msg = f"compile failed: {type(exc).__name__}: {exc}".strip()
        if os.environ.get("SIMPLE_MOE_CHECK_BUILD_TRACEBACK"):
            msg += "\n" + traceback.format_exc()
        res.errors.append(msg)
    res.ok = not res.errors
    res.seconds = round(time.perf_counter() - t0, 3)
    return res


# --------------------------------------------------------------------------------------------------------------------
# Variant enumeration and worker processes


def _import_extra(spec: str) -> None:
    """Import a module by dotted name or a .py file by path (it may register more variants)."""
    if spec.endswith(".py") or os.sep in spec:
        path = Path(spec).resolve()
        name = "_simple_moe_cb_extra_" + re.sub(r"\W", "_", str(path))
        if name in sys.modules:
            return
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot import {spec}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        importlib.import_module(spec)


def _keyed(variants: list) -> dict:
    """(kernel, variant, n-th of that name) -> variant: the same key in every process, whatever the import order."""
    seen: collections.Counter = collections.Counter()
    out = {}
    for v in variants:
        seen[(v.kernel, v.variant)] += 1
        out[(v.kernel, v.variant, seen[(v.kernel, v.variant)])] = v
    return out


def load_variants(extra_imports: Iterable[str] = ()) -> dict:
    for spec in extra_imports:
        _import_extra(spec)
    from simple_moe._variants import all_kernel_variants

    return _keyed(all_kernel_variants())


_WORKER_VARIANTS: dict | None = None


def _worker_init(extra_imports: tuple) -> None:
    global _WORKER_VARIANTS
    os.environ.pop("TRITON_INTERPRET", None)
    _WORKER_VARIANTS = load_variants(extra_imports)


def _worker_compile(key: tuple, arch: int) -> Result:
    assert _WORKER_VARIANTS is not None
    variant = _WORKER_VARIANTS.get(key)
    if variant is None:
        return Result(key[0], key[1], arch, 0, 0, False, errors=["variant not registered in the worker process"])
    return compile_variant(variant, arch)


@contextlib.contextmanager
def _env_without_interpret():
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def run_jobs(variants: dict, jobs: list[tuple[tuple, int]], n_procs: int, extra_imports: tuple,
             on_result=None) -> list[Result]:
    """Compile (key, arch) jobs, in this process when that is possible and asked for, else in spawned workers."""
    from triton.runtime.jit import JITFunction

    results: list[Result | None] = [None] * len(jobs)
    compilable_here = not triton_interpreting() and all(isinstance(variants[key].fn, JITFunction) for key, _ in jobs)
    if n_procs <= 1 and compilable_here:
        for i, (key, arch) in enumerate(jobs):
            results[i] = compile_variant(variants[key], arch)
            if on_result:
                on_result(results[i])
        return results  # type: ignore[return-value]

    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited TRITON_INTERPRET-built kernels
    with _env_without_interpret(), concurrent.futures.ProcessPoolExecutor(
            max_workers=max(1, min(n_procs, len(jobs))), mp_context=ctx, initializer=_worker_init,
            initargs=(tuple(extra_imports),)) as pool:
        futures = {pool.submit(_worker_compile, key, arch): i for i, (key, arch) in enumerate(jobs)}
        for fut in concurrent.futures.as_completed(futures):
            i = futures[fut]
            try:
                r = fut.result()
            except Exception as exc:  # noqa: BLE001 - a dead worker is a failure of that job
                key, arch = jobs[i]
                v = variants[key]
                r = Result(v.kernel, v.variant, arch, v.num_warps, v.num_stages, bool(v.has_matrix_loop),
                           errors=[f"worker failed: {type(exc).__name__}: {exc}"])
            results[i] = r
            if on_result:
                on_result(r)
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------------
# Output


def _fmt_spills(r: Result) -> str:
    if r.spill_stores is None:
        return "?" if r.regs is not None else "-"
    if r.spill_stores == 0 and r.spill_loads == 0:
        return "0"
    return f"{r.spill_stores}/{r.spill_loads}"


def format_table(results: list[Result]) -> str:
    header = ("kernel", "variant", "arch", "regs", "spills st/ld B", "smem bytes", "tensor-core & copy instrs", "status")
    rows = []
    for r in results:
        ops = " ".join(f"{op}:{n}" for op, n in r.ops.items()) or "-"
        rows.append((r.kernel, r.variant, f"sm_{r.arch}", "-" if r.regs is None else str(r.regs), _fmt_spills(r),
                     "-" if r.smem is None else str(r.smem), ops, "ok" if r.ok else "FAIL"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    right = {2, 3, 4, 5}

    def line(cells):
        return " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "-+-".join("-" * w for w in widths)]
    out.extend(line(row) for row in rows)
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simple_moe check-build",
        description="Compile every registered Triton kernel variant for SM80/86/89/90 without a GPU; report registers, "
        "spills, shared memory and tensor-core instructions; fail on compile errors, shared memory over the arch "
        "limit, or a tl.dot loop without tensor-core instructions.")
    p.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma separated archs (default: %(default)s)")
    p.add_argument("--kernel", action="append", default=[], metavar="NAME",
                   help="only this kernel family (repeatable, or comma separated)")
    p.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1, help="compile processes (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON to PATH")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import a module (dotted name or .py path) that registers extra variants; repeatable")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="one line per compile on stderr (default: when stderr is a terminal)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        archs = parse_archs(args.arch)
    except ValueError as exc:
        print(f"check-build: {exc}", file=sys.stderr)
        return 2
    wanted = {k.strip() for item in args.kernel for k in item.split(",") if k.strip()}
    if args.json and Path(args.json).is_dir():  # found before the compiles, not after them
        print(f"check-build: --json: {args.json!r} is a directory; give a file path", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    try:
        variants = load_variants(args.imports)
    except Exception as exc:  # noqa: BLE001
        print(f"check-build: FAILED to load the kernel variants: {type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc()
        return 1
    if not variants:
        print("check-build: FAILED: no kernel variants registered (an empty proof proves nothing)", file=sys.stderr)
        return 1
    if wanted:
        known = {k[0] for k in variants}
        missing = wanted - known
        if missing:
            print(f"check-build: FAILED: no variants of kernel(s) {', '.join(sorted(missing))}; registered kernels: "
                  f"{', '.join(sorted(known))}", file=sys.stderr)
            return 1
        variants = {k: v for k, v in variants.items() if k[0] in wanted}

    jobs = [(key, arch) for key, v in variants.items() for arch in archs if arch in tuple(v.archs)]
    if not jobs:
        print(f"check-build: FAILED: no variant is built for arch(s) {','.join(map(str, archs))}", file=sys.stderr)
        return 1

    done = [0]
    show_progress = sys.stderr.isatty() if args.progress is None else args.progress

    def progress(r: Result) -> None:
        done[0] += 1
        if show_progress:
            print(f"[{done[0]}/{len(jobs)}] {r.kernel} {r.variant} sm_{r.arch}: {'ok' if r.ok else 'FAIL'} "
                  f"({r.seconds:.1f}s)", file=sys.stderr, flush=True)

    results = run_jobs(variants, jobs, max(1, args.jobs), tuple(args.imports), on_result=progress)
    elapsed = time.perf_counter() - t0

    print(format_table(results))
    failures = [r for r in results if not r.ok]
    spilling = [r for r in results if (r.spill_stores or 0) + (r.spill_loads or 0) > 0]
    if spilling:
        print(f"\nnote: {len(spilling)} compiled kernel(s) spill registers: "
              + ", ".join(f"{r.kernel}[{r.variant}]@sm_{r.arch}" for r in spilling))
    unpipelined = [r for r in results if r.ok and r.has_matrix_loop and r.num_stages >= 2
                   and not any(r.ops.get(op) for op in ("LDGSTS", "UTMALDG"))]
    if unpipelined:
        print(f"\nnote: {len(unpipelined)} tl.dot kernel(s) with num_stages >= 2 show no cp.async (LDGSTS) or TMA load: "
              "their loads were not pipelined. At launch Triton's JIT turns an int argument equal to 1 into a constexpr "
              "and marks ints divisible by 16; describe the same in the variant (\"constexpr\" with value 1 for unit "
              "strides, \"i32:16\" / \"i64:16\" for multiples of 16) or this SASS is not the one that runs: "
              + ", ".join(f"{r.kernel}[{r.variant}]@sm_{r.arch}" for r in unpipelined[:8])
              + (" ..." if len(unpipelined) > 8 else ""))
    if failures:
        print("\nfailures:")
        for r in failures:
            for err in r.errors:
                print(f"  {r.kernel} [{r.variant}] sm_{r.arch}: {err}")
    n_variants = len({key for key, _ in jobs})
    print(f"\ncheck-build: {len(results)} compiles ({n_variants} variants x archs {','.join(map(str, archs))}) "
          f"in {elapsed:.1f}s, {len(failures)} failure(s)")

    if args.json:
        payload = {
            "archs": list(archs),
            "smem_limits": {str(a): SMEM_LIMIT[a] for a in archs},
            "results": [asdict(r) for r in results],
            "failures": len(failures),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
