"""Merging one bf16 tensor of 3 fine-tunes on CUDA vs on the CPU (ferrox both).

    python benches/bench_merge_cuda.py [--quick] [--repeats N] [--results DIR]

Cases: TIES (magnitude density 0.3, sign election) and Breadcrumbs (density
0.3, gamma 0.01) on a 4096x4096 and a 131072x8192 tensor (--quick: 1024x1024
and 8192x1024), whole-tensor ranks. Inputs are generated on the GPU (seeded)
and copied to the host; both sides get resident tensors, so the times are the
merges alone (no transfers). Before any timing, the CUDA output must be
bitwise the CPU output. The CUDA side is timed with CUDA events on torch's
current stream around `merge_tensors` (which returns after its one host
wait), the CPU side by wall clock; each at least 3 timed runs after one
untimed warm-up. Results: benches/results/merge_cuda.md and .json.

Refuses to run without a CUDA device. `benches/run.py merge_cuda` runs the
same cases through the shared harness (wall clock; REQUIRES = "cuda").
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

NAME = "merge_cuda"
REQUIRES = "cuda"
MAIN_COMPARATOR = "ferrox_cpu"
REPEATS = 3
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

SHAPES = {"full": [(4096, 4096), (131072, 8192)], "quick": [(1024, 1024), (8192, 1024)]}
METHODS = {
    "ties": dict(weight=[0.5, 0.3, 0.2], density=0.3),
    "breadcrumbs": dict(weight=[0.5, 0.3, 0.2], density=0.3, gamma=0.01),
}
CASES = [f"{m}_{r}x{c}" for m in METHODS for r, c in SHAPES["full"]]


def _require_cuda():
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_merge_cuda: needs a CUDA device (torch.cuda.is_available() is False); nothing was run")


def _inputs(shape, seed=0):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    base = torch.randn(shape, generator=g, device="cuda").to(torch.bfloat16)
    models = [(base.float() + 0.01 * torch.randn(shape, generator=g, device="cuda")).to(torch.bfloat16)
              for _ in range(3)]
    torch.cuda.synchronize()
    return base, models


def _parse(case):
    method, shape = case.rsplit("_", 1)
    rows, cols = (int(v) for v in shape.split("x"))
    return method, (rows, cols)


def setup(case, quick):
    """Inputs of one case for benches/run.py (quick shrinks each shape by
    the same factor as SHAPES['quick'])."""
    _require_cuda()
    method, shape = _parse(case)
    if quick:
        shape = SHAPES["quick"][SHAPES["full"].index(shape)]
    base, models = _inputs(shape)
    return {"method": method, "gpu": (base, models), "cpu": (base.cpu(), [m.cpu() for m in models])}


def _merge(inputs, where):
    from ferrox.merge import merge_tensors

    base, models = inputs[where]
    return merge_tensors(inputs["method"], base, models, **METHODS[inputs["method"]])


SIDES = {
    "ferrox_cuda": lambda inputs: _merge(inputs, "gpu"),
    "ferrox_cpu": lambda inputs: _merge(inputs, "cpu"),
}


def check(results):
    import torch

    gpu, cpu = results["ferrox_cuda"].cpu(), results["ferrox_cpu"]
    if not torch.equal(gpu.view(torch.int16), cpu.view(torch.int16)):
        bad = (gpu.view(torch.int16) != cpu.view(torch.int16)).sum().item()
        raise AssertionError(f"CUDA and CPU merges differ in {bad} of {cpu.numel()} elements")


def _time_cuda(fn, repeats):
    import torch

    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return times


def _time_cpu(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (1024x1024, 8192x1024)")
    ap.add_argument("--repeats", type=int, default=REPEATS, help="timed runs per side (at least 3)")
    ap.add_argument("--results", default=RESULTS, help="folder for merge_cuda.md / merge_cuda.json")
    args = ap.parse_args(argv)
    _require_cuda()
    import torch

    import ferrox

    repeats = max(3, args.repeats)
    rows = []
    for (r, c) in SHAPES["quick" if args.quick else "full"]:
        base, models = _inputs((r, c))
        inputs = {"gpu": (base, models), "cpu": (base.cpu(), [m.cpu() for m in models])}
        for method in METHODS:
            inputs["method"] = method
            # Warm-up (kernel compile, allocator) and the bitwise check first.
            check({"ferrox_cuda": SIDES["ferrox_cuda"](inputs), "ferrox_cpu": SIDES["ferrox_cpu"](inputs)})
            gpu = _time_cuda(lambda: SIDES["ferrox_cuda"](inputs), repeats)
            cpu = _time_cpu(lambda: SIDES["ferrox_cpu"](inputs), repeats)
            row = {"case": f"{method}_{r}x{c}", "elements": r * c, "repeats": repeats,
                   "cuda_s": {"median": statistics.median(gpu), "min": min(gpu), "max": max(gpu), "runs": gpu},
                   "cpu_s": {"median": statistics.median(cpu), "min": min(cpu), "max": max(cpu), "runs": cpu}}
            row["speedup"] = row["cpu_s"]["median"] / row["cuda_s"]["median"]
            rows.append(row)
            print(f"{row['case']}: CUDA {row['cuda_s']['median']:.4f} s, CPU {row['cpu_s']['median']:.4f} s, "
                  f"{row['speedup']:.1f}x", flush=True)
        del base, models, inputs
        torch.cuda.empty_cache()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "ferrox": ferrox.__version__, "cpu_threads": ferrox.get_num_threads(), "machine": platform.machine(),
            "quick": args.quick, "timing": "CUDA events on the current stream (CUDA), wall clock (CPU)"}
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "merge_cuda.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    lines = ["## merge_cuda", "",
             f"one bf16 tensor, 3 fine-tunes, whole-tensor ranks; {meta['gpu']}, torch {meta['torch']} "
             f"(CUDA {meta['torch_cuda']}), CPU merge on {meta['cpu_threads']} threads; {meta['timing']}; "
             f"CUDA output bitwise the CPU's (checked before timing); {repeats} timed runs each; {meta['date']}", "",
             "| case | elements | CUDA median s | CUDA min s | CPU median s | CPU min s | CUDA speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['case']} | {row['elements']} | {row['cuda_s']['median']:.4f} | {row['cuda_s']['min']:.4f} "
                     f"| {row['cpu_s']['median']:.4f} | {row['cpu_s']['min']:.4f} | {row['speedup']:.1f}x |")
    with open(os.path.join(args.results, "merge_cuda.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
