"""Side-by-side benchmarks: ferrox against its comparators, in one run.

    python benches/run.py [NAME ...] [--quick] [--skip-slow] [--repeats N] [--sides A,B] [--cases A,B] [--results DIR]

Each ``benches/bench_NAME.py`` defines ``NAME``, ``CASES``, ``setup(case,
quick)``, ``SIDES`` (name -> callable(inputs); the first is ferrox, the
reference), ``MAIN_COMPARATOR`` and optionally:

- ``check(results)`` or ``check(results, case, inputs)``: ``results`` maps each
  side to what its first run returned; it raises when the sides disagree. It
  runs after one untimed run of every side (the warm-up) and before any
  timing, so a fast wrong answer never gets a time;
- ``SLOW_SIDES`` (never fewer than 3 timed runs either), ``REPEATS``;
- ``before(side, inputs)``: untimed clean-up before each run (e.g. deleting
  the previous output);
- ``COMMANDS``: side -> callable(inputs) returning ``{"argv": [...], "env":
  {...} or None, "result": value for check}``: whole-process sides, each run a
  fresh subprocess timed by wall clock (start-up included), with the child's
  peak RSS from ``wait4``; their results go to the same ``check``;
- ``FOR_SCALE``: case -> {side: other case}: that side does no equivalent work
  in this case, so it is not run; its row repeats the other case's numbers,
  labelled ``SCALE_NOTE``, with no speed-up;
- ``STARTUP``: label -> argv (or a callable(quick) returning that): start-up alone, timed as whole processes, with
  whether the process imported torch (``PYTHONPROFILEIMPORTTIME``);
- ``REQUIRES = "cuda"``: skipped with a printed reason when torch has no CUDA
  device, and an error when named explicitly.

In-process timings share this process. Peak memory cannot be split inside one
process, so each in-process side also runs once in a fresh child process that
resets the kernel's high-water mark after setup (``/proc/self/clear_refs``;
``ru_maxrss`` where that is not allowed), takes its RSS as the baseline and
reports the peak after the side ran.
"""

import argparse
import datetime
import gc
import importlib.util
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
MIN_REPEATS = 3


def load(name):
    path = os.path.join(HERE, f"bench_{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def available():
    return sorted(f[6:-3] for f in os.listdir(HERE) if f.startswith("bench_") and f.endswith(".py"))


def requirement_missing(name):
    """Why benchmark `name` cannot run here, or None. Reads the module-level
    ``REQUIRES`` without importing the module (a CUDA bench may fail to
    import without a device)."""
    import ast

    with open(os.path.join(HERE, f"bench_{name}.py")) as f:
        tree = ast.parse(f.read())
    requires = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "REQUIRES" for t in node.targets):
            requires = ast.literal_eval(node.value)
    if requires is None:
        return None
    if requires != "cuda":
        raise SystemExit(f"bench_{name}: unknown REQUIRES = {requires!r} (supported: \"cuda\")")
    import torch

    if not torch.cuda.is_available():
        return f"bench_{name} needs a CUDA device (REQUIRES = \"cuda\") and torch.cuda.is_available() is False"
    return None


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
    if hasattr(mod, "before"):
        mod.before(side, inputs)
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


def spawn(spec_json):
    """Runs in a small launcher process: starts one command, waits for it and
    prints its wall time and its own peak RSS. A child's ru_maxrss counts the
    memory of the process it was forked from, so the harness (hundreds of MB
    after a merge) must not fork the measured command itself; this launcher
    is a few MB of plain Python (no torch), the floor of what it reports."""
    spec = json.loads(spec_json)
    with open(spec["stdout"], "wb") as out, open(spec["stderr"], "wb") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(spec["argv"], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env=None if spec["env"] is None else {**os.environ, **spec["env"]})
        # wait4: this child's own rusage (RUSAGE_CHILDREN would be the
        # maximum over every child so far).
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
    print(json.dumps({"wall_s": wall, "maxrss_kb": usage.ru_maxrss, "rc": os.waitstatus_to_exitcode(status)}))


def run_process(argv, env=None):
    """Wall time and peak RSS (MB) of one fresh process, start-up included,
    and its stderr. Measured by a launcher (`spawn`)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"argv": [str(a) for a in argv], "env": env,
                "stdout": os.path.join(tmp, "out"), "stderr": os.path.join(tmp, "err")}
        r = subprocess.run([sys.executable, __file__, "--spawn", json.dumps(spec)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"launcher failed:\n{r.stderr[-3000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        with open(spec["stderr"], errors="replace") as f:
            stderr = f.read()
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(spec['argv'])} exited with {res['rc']}:\n{stderr[-3000:]}")
    return res["wall_s"], res["maxrss_kb"] / 1024, stderr


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


def _check(mod, results, case, inputs):
    if not hasattr(mod, "check"):
        return
    if len(inspect.signature(mod.check).parameters) == 1:
        mod.check(results)
    else:
        mod.check(results, case, inputs)


def _stats(times):
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": len(times)}


def run_bench(name, args):
    mod = load(name)
    slow = getattr(mod, "SLOW_SIDES", set())
    first = next(iter(mod.SIDES))
    if args.sides and first not in args.sides and hasattr(mod, "check"):
        raise SystemExit(f"--sides must include {first!r}: the other sides are checked against it")

    def chosen(table):
        return [s for s in table if not (args.skip_slow and s in slow) and (not args.sides or s in args.sides)]

    sides, commands = chosen(mod.SIDES), chosen(getattr(mod, "COMMANDS", {}))
    repeats = max(MIN_REPEATS, getattr(mod, "REPEATS", args.repeats) if args.repeats_default else args.repeats)
    for_scale = getattr(mod, "FOR_SCALE", {})
    before = getattr(mod, "before", lambda side, inputs: None)
    cases = [c for c in mod.CASES if not args.cases or c in args.cases]
    rows, proc_rows = [], []
    for case in cases:
        skip = for_scale.get(case, {})
        t0 = time.perf_counter()
        inputs = mod.setup(case, args.quick)
        # One untimed run of every side: the warm-up (page cache, lazy
        # initialisation) and the values the agreement check compares.
        results = {}
        for side in sides + commands:
            if side in skip:
                continue
            before(side, inputs)
            if side in mod.SIDES:
                results[side] = mod.SIDES[side](inputs)
            else:
                spec = mod.COMMANDS[side](inputs)
                run_process(spec["argv"], spec.get("env"))
                results[side] = spec["result"]
        _check(mod, results, case, inputs)
        print(f"{name}/{case}: {len(results)} sides agree ({time.perf_counter() - t0:.0f} s); timing", flush=True)

        timing = {}
        for side in sides:
            if side in skip:
                continue
            reps = MIN_REPEATS if side in slow else repeats
            times = []
            for _ in range(reps):
                before(side, inputs)
                t = time.perf_counter()
                mod.SIDES[side](inputs)
                times.append(time.perf_counter() - t)
            timing[side] = times
        proc = {}
        for side in commands:
            if side in skip:
                continue
            runs = []
            for _ in range(MIN_REPEATS if side in slow else repeats):
                before(side, inputs)
                spec = mod.COMMANDS[side](inputs)
                runs.append(run_process(spec["argv"], spec.get("env"))[:2])
            proc[side] = runs
        del inputs, results
        gc.collect()
        print(f"{name}/{case}: timed ({time.perf_counter() - t0:.0f} s); memory", flush=True)

        for side in sides:
            if side in skip:
                continue
            mem = measure_memory(name, case, side, args.quick)
            rows.append({"case": case, "side": side, **_stats(timing[side]),
                         "peak_mb": (mem["peak_kb"] - mem["baseline_kb"]) / 1024, "baseline_mb": mem["baseline_kb"] / 1024})
        for side in commands:
            if side in skip:
                continue
            proc_rows.append({"case": case, "side": side, **_stats([w for w, _ in proc[side]]),
                              "peak_mb": max(m for _, m in proc[side])})
        _derive(mod, rows, proc_rows, case, sides, commands)
    startup = time_startup(mod, repeats, args.quick) if hasattr(mod, "STARTUP") else []
    report(name, mod, rows, proc_rows, startup, args)
    return rows


def _derive(mod, rows, proc_rows, case, sides, commands):
    """A case's for-scale rows (a side not run on it shows another case's
    row, where that case was run) and every row's speed-up."""
    for table, names in ((rows, sides), (proc_rows, commands)):
        for side, other in getattr(mod, "FOR_SCALE", {}).get(case, {}).items():
            if side not in names:
                continue
            src = next((r for r in table if r["case"] == other and r["side"] == side), None)
            if src is not None:  # the other case was run (not filtered out)
                table.append({**src, "case": case, "for_scale_from": other, "note": getattr(mod, "SCALE_NOTE", "for scale")})
        # The reference is the table's first side (ferrox), run or not.
        first_of = next(iter(mod.SIDES if table is rows else getattr(mod, "COMMANDS", {})), None)
        ref = next((r for r in table if r["case"] == case and r["side"] == first_of), None)
        for r in table:
            if r["case"] == case:
                r["ferrox_speedup"] = (None if ref is None or "for_scale_from" in r
                                       else r["median_s"] / ref["median_s"])


def merge(name, dirs, args):
    """One report from partial runs of a bench in `dirs` (each a --results
    folder; a run writes only when it ends, so long benches run case by
    case). A case and side measured twice keeps the later folder's row."""
    mod = load(name)
    found, proc, notes, machines = {}, {}, {}, []
    for d in dirs:
        with open(os.path.join(d, f"{name}.json")) as f:
            data = json.load(f)
        if data["quick"] != args.quick:
            raise SystemExit(f"{d}: a {'--quick' if data['quick'] else 'full'} run; merge runs of one kind")
        for table, rows in ((found, data["rows"]), (proc, data["process_rows"])):
            for r in rows:
                if "for_scale_from" not in r:
                    table[(r["case"], r["side"])] = r
        notes.update(data.get("case_notes") or _md_notes(os.path.join(d, f"{name}.md")))
        machines.append(data["machine"])
    order = {c: i for i, c in enumerate(mod.CASES)}
    unknown = sorted({c for c, _ in [*found, *proc]} - set(order))
    if unknown:
        raise SystemExit(f"{name}: no such case(s) {unknown} (renamed since those runs?)")
    side_order = {s: i for i, s in enumerate([*mod.SIDES, *getattr(mod, "COMMANDS", {})])}
    key = lambda r: (order[r["case"]], side_order.get(r["side"], len(side_order)))
    rows, proc_rows = sorted(found.values(), key=key), sorted(proc.values(), key=key)
    for case in sorted({r["case"] for r in rows + proc_rows}, key=order.get):
        _derive(mod, rows, proc_rows, case, list(mod.SIDES), list(getattr(mod, "COMMANDS", {})))
    rows.sort(key=key)
    proc_rows.sort(key=key)
    mod.CASE_NOTES = notes
    report(name, mod, rows, proc_rows, [], args, machines)


def _md_notes(path):
    """The case notes of a report written before the JSON kept them."""
    notes = {}
    with open(path) as f:
        for line in f:
            if line.startswith("- **") and "**: " in line:
                case, note = line[4:].split("**: ", 1)
                notes[case] = note.rstrip("\n")
    return notes


def time_startup(mod, repeats, quick):
    commands = mod.STARTUP(quick) if callable(mod.STARTUP) else mod.STARTUP
    out = []
    for label, argv in commands.items():
        run_process(argv)  # warm-up: page cache of the interpreter and libraries
        runs = [run_process(argv)[:2] for _ in range(repeats)]
        # -X importtime as an environment variable works for console scripts too.
        stderr = run_process(argv, {"PYTHONPROFILEIMPORTTIME": "1"})[2]
        imported = {line.split("|")[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
        out.append({"command": label, **_stats([w for w, _ in runs]), "peak_mb": max(m for _, m in runs),
                    "imports_torch": "torch" in imported})
    return out


def _speedup(r):
    if r.get("ferrox_speedup") is None:
        return "— (" + r["note"] + ")" if "note" in r else "—"
    return f"{r['ferrox_speedup']:.2f}x"


def report(name, mod, rows, proc_rows, startup, args, machines=None):
    reps = f"median of >= {MIN_REPEATS} timed runs after one untimed run (warm-up and agreement check)"
    lines = [f"## {name}" + (" (quick)" if args.quick else ""), "",
             f"main comparator: `{mod.MAIN_COMPARATOR}`; {reps}; speed-up = side time / ferrox time; "
             "every side's output was checked against ferrox's before timing", "",
             "### in-process", "",
             "memory = peak RSS above the post-setup baseline, each side in its own process", "",
             "| case | side | median s | min s | max s | ferrox speed-up | peak MB | baseline MB |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['side']} | {r['median_s']:.4f} | {r['min_s']:.4f} | {r['max_s']:.4f} | "
                     f"{_speedup(r)} | {r['peak_mb']:.1f} | {r['baseline_mb']:.0f} |")
    if proc_rows:
        lines += ["", "### whole process", "",
                  getattr(mod, "COMMANDS_NOTE", "each run a fresh process, start-up included") +
                  "; wall clock of the subprocess; peak MB = the child's whole peak RSS (wait4), imports included", "",
                  "| case | command | median s | min s | max s | ferrox speed-up | peak MB |",
                  "|---|---|---:|---:|---:|---|---:|"]
        for r in proc_rows:
            lines.append(f"| {r['case']} | {r['side']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | "
                         f"{_speedup(r)} | {r['peak_mb']:.0f} |")
    # CASE_NOTES: case -> where the sides do not do the same work.
    notes = {c: n for c, n in getattr(mod, "CASE_NOTES", {}).items() if any(r["case"] == c for r in rows + proc_rows)}
    if notes:
        lines += ["", "### not the same work", ""] + [f"- **{c}**: {n}" for c, n in notes.items()]
    if startup:
        lines += ["", "### start-up alone", "",
                  "| command | median s | min s | max s | peak MB | imports torch |", "|---|---:|---:|---:|---:|---|"]
        for r in startup:
            lines.append(f"| `{r['command']}` | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | "
                         f"{r['peak_mb']:.0f} | {'yes' if r['imports_torch'] else 'no'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, f"{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.results, f"{name}.json"), "w") as f:
        json.dump({"bench": name, "quick": args.quick, "machine": machines[0] if machines else machine(),
                   **({"merged_from": machines} if machines else {}), "rows": rows,
                   "process_rows": proc_rows, "startup": startup, "case_notes": notes}, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {available()})")
    p.add_argument("--quick", action="store_true", help=f"small inputs, {MIN_REPEATS} repeats")
    p.add_argument("--skip-slow", action="store_true", help="skip sides marked slow")
    p.add_argument("--repeats", type=int, default=None, help=f"timed runs per side (at least {MIN_REPEATS}; default 5, {MIN_REPEATS} with --quick)")
    # Machines without a comparator installed (the GPU box has no mergekit).
    p.add_argument("--sides", type=lambda v: v.split(","), default=None, help="comma-separated subset of sides to run")
    p.add_argument("--cases", type=lambda v: v.split(","), default=None, help="comma-separated subset of cases to run")
    # A trial run elsewhere keeps the committed results intact.
    p.add_argument("--results", default=RESULTS, help="folder for NAME.md and NAME.json (default: benches/results)")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="write one report of NAME from the --results folders of partial runs")
    p.add_argument("--child", nargs=3, metavar=("NAME", "CASE", "SIDE"), help=argparse.SUPPRESS)
    p.add_argument("--spawn", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.spawn:
        return spawn(args.spawn)
    if args.child:
        return child(*args.child, args.quick)
    if args.repeats is not None and args.repeats < MIN_REPEATS:
        p.error(f"--repeats must be at least {MIN_REPEATS}, got {args.repeats}")
    args.repeats_default = args.repeats is None
    args.repeats = args.repeats or (MIN_REPEATS if args.quick else 5)
    if args.merge:
        if len(args.names) != 1:
            p.error("--merge takes exactly one benchmark name")
        return merge(args.names[0], args.merge, args)
    for name in args.names:
        if name not in available():
            p.error(f"no benchmark {name!r}; available: {available()}")
        why = requirement_missing(name)
        if why:
            p.error(why)  # named explicitly: a missing device is a failure
    for name in args.names or available():
        why = requirement_missing(name)
        if why:
            print(f"skipping {name}: {why}", flush=True)
            continue
        run_bench(name, args)


if __name__ == "__main__":
    main()
