"""Side-by-side benchmarks: ferrox against its comparators, in one run.

    python benches/run.py [NAME ...] [--quick] [--skip-slow] [--repeats N] [--results DIR]

Each ``benches/bench_NAME.py`` defines ``NAME``, ``CASES``, ``setup(case,
quick)``, ``SIDES`` (name -> callable(inputs); the first is ferrox),
``MAIN_COMPARATOR`` and optionally ``SLOW_SIDES``, ``REPEATS``, ``WARMUP``
and ``check(results)``.
Timings share this process (one warm-up, then the median of repeats). Peak
memory cannot be split inside one process, so each side also runs once in a
fresh child process that resets the kernel's high-water mark after setup
(``/proc/self/clear_refs``; ``ru_maxrss`` where that is not allowed), takes
its RSS as the baseline and reports the peak after the side ran.
"""

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def load(name):
    path = os.path.join(HERE, f"bench_{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def available():
    return sorted(f[6:-3] for f in os.listdir(HERE) if f.startswith("bench_") and f.endswith(".py"))


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak():
    """Resets the kernel's high-water mark to the current RSS (Linux >= 4.0),
    so the peak excludes transients of imports and setup."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(name, case, side, quick):
    """Runs in a fresh process: peak RSS of one side above its baseline."""
    mod = load(name)
    inputs = mod.setup(case, quick)
    gc.collect()
    if _reset_peak():
        base = _status_kb("VmRSS")
        mod.SIDES[side](inputs)
        peak = _status_kb("VmHWM")
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mod.SIDES[side](inputs)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"baseline_kb": base, "peak_kb": peak}))


def measure_memory(name, case, side, quick):
    cmd = [sys.executable, __file__, "--child", name, case, side] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory child for {name}/{case}/{side} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_side(fn, inputs, repeats, warmup=True):
    result = fn(inputs) if warmup else None  # warm-up, and the value for check()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn(inputs)
        times.append(time.perf_counter() - t)
    return (result if warmup else value), times


def machine():
    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
        info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        pass
    try:
        import ferrox

        info.update(ferrox=ferrox.__version__, ferrox_threads=ferrox.get_num_threads())
    except ImportError:
        pass
    return info


def run_bench(name, args):
    mod = load(name)
    slow = getattr(mod, "SLOW_SIDES", set())
    sides = [s for s in mod.SIDES if not (args.skip_slow and s in slow) and (not args.sides or s in args.sides)]
    first = next(iter(mod.SIDES))
    rows = []
    for case in mod.CASES:
        inputs = mod.setup(case, args.quick)
        results, timing = {}, {}
        for side in sides:
            reps = 1 if side in slow else getattr(mod, "REPEATS", args.repeats)
            results[side], timing[side] = time_side(mod.SIDES[side], inputs, reps, getattr(mod, "WARMUP", True))
        if hasattr(mod, "check"):
            mod.check(results)
        del inputs
        for side in sides:
            mem = measure_memory(name, case, side, args.quick)
            rows.append({
                "case": case, "side": side,
                "median_s": statistics.median(timing[side]), "min_s": min(timing[side]),
                "peak_mb": (mem["peak_kb"] - mem["baseline_kb"]) / 1024, "baseline_mb": mem["baseline_kb"] / 1024,
            })
        by_side = {r["side"]: r for r in rows if r["case"] == case}
        for r in by_side.values():
            r["ferrox_speedup"] = r["median_s"] / by_side[first]["median_s"] if first in by_side else float("nan")
    report(name, mod, rows, args)
    return rows


def report(name, mod, rows, args):
    lines = [f"## {name}" + (" (quick)" if args.quick else ""), "",
             f"main comparator: `{mod.MAIN_COMPARATOR}`; speed-up = side time / ferrox time; memory = peak RSS above the post-setup baseline, each side in its own process", "",
             "| case | side | median s | min s | ferrox speed-up | peak MB | baseline MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['side']} | {r['median_s']:.4f} | {r['min_s']:.4f} | "
                     f"{r['ferrox_speedup']:.2f}x | {r['peak_mb']:.1f} | {r['baseline_mb']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, f"{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.results, f"{name}.json"), "w") as f:
        json.dump({"bench": name, "quick": args.quick, "machine": machine(), "rows": rows}, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {available()})")
    p.add_argument("--quick", action="store_true", help="small inputs, 2 repeats")
    p.add_argument("--skip-slow", action="store_true", help="skip sides marked slow")
    p.add_argument("--repeats", type=int, default=None)
    # Machines without a comparator installed (the GPU box has no mergekit).
    p.add_argument("--sides", type=lambda v: v.split(","), default=None, help="comma-separated subset of sides to run")
    # A trial run elsewhere keeps the committed results intact.
    p.add_argument("--results", default=RESULTS, help="folder for NAME.md and NAME.json (default: benches/results)")
    p.add_argument("--child", nargs=3, metavar=("NAME", "CASE", "SIDE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child, args.quick)
    args.repeats = args.repeats or (2 if args.quick else 5)
    for name in args.names or available():
        if name not in available():
            p.error(f"no benchmark {name!r}; available: {available()}")
        run_bench(name, args)


if __name__ == "__main__":
    main()
