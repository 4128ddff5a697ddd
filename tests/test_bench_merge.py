"""benches/run.py --merge: one report from partial runs of a benchmark."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = os.path.join(HERE, "..", "benches", "run.py")


def _row(case, side, median):
    return {"case": case, "side": side, "median_s": median, "min_s": median, "max_s": median, "runs": 3,
            "peak_mb": 1.0, "baseline_mb": 100.0, "ferrox_speedup": 123.0}


def _partial(folder, rows, notes=None, quick=False):
    folder.mkdir()
    data = {"bench": "codebook_kmeans", "quick": quick, "machine": {"cpus": 2, "folder": folder.name},
            "rows": rows, "process_rows": [], "startup": []}
    if notes is not None:
        data["case_notes"] = notes
    (folder / "codebook_kmeans.json").write_text(json.dumps(data))
    # A run from before the JSON kept its notes: they are read from the report.
    (folder / "codebook_kmeans.md").write_text("### not the same work\n\n- **model k=16**: MSE from the md\n")
    return str(folder)


def _merge(tmp_path, *dirs):
    out = tmp_path / "merged"
    r = subprocess.run([sys.executable, RUN, "codebook_kmeans", "--merge", *dirs, "--results", str(out)],
                       capture_output=True, text=True, timeout=300)
    return r, out


def test_merge_orders_rows_adds_for_scale_rows_and_recomputes_speedups(tmp_path):
    # The model case first and without scikit-learn; the matrix case later.
    a = _partial(tmp_path / "a", [_row("model k=16", "faiss", 20.0), _row("model k=16", "ferrox", 0.5)])
    b = _partial(tmp_path / "b", [_row("matrix k=16", "ferrox", 0.1), _row("matrix k=16", "faiss", 3.0),
                                  _row("matrix k=16", "sklearn", 2.0)], notes={"matrix k=16": "MSE from the json"})
    r, out = _merge(tmp_path, a, b)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((out / "codebook_kmeans.json").read_text())
    got = [(x["case"], x["side"]) for x in data["rows"]]
    assert got == [("matrix k=16", "ferrox"), ("matrix k=16", "faiss"), ("matrix k=16", "sklearn"),
                   ("model k=16", "ferrox"), ("model k=16", "faiss"), ("model k=16", "sklearn")]
    speed = {(x["case"], x["side"]): x["ferrox_speedup"] for x in data["rows"]}
    assert speed[("matrix k=16", "faiss")] == 30.0 and speed[("model k=16", "faiss")] == 40.0
    # scikit-learn was not run on the model: the matrix's row, for scale, with no speed-up.
    scale = data["rows"][-1]
    assert scale["for_scale_from"] == "matrix k=16" and scale["median_s"] == 2.0 and speed[("model k=16", "sklearn")] is None
    assert data["case_notes"] == {"matrix k=16": "MSE from the json", "model k=16": "MSE from the md"}
    assert [m["folder"] for m in data["merged_from"]] == ["a", "b"]
    md = (out / "codebook_kmeans.md").read_text()
    assert "| model k=16 | faiss | 20.0000 |" in md and "40.00x" in md and "- **model k=16**: MSE from the md" in md


def test_merge_keeps_the_later_row_and_refuses_mixed_or_unknown_runs(tmp_path):
    a = _partial(tmp_path / "a", [_row("matrix k=4", "ferrox", 1.0), _row("matrix k=4", "faiss", 2.0)])
    b = _partial(tmp_path / "b", [_row("matrix k=4", "faiss", 8.0)])
    r, out = _merge(tmp_path, a, b)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((out / "codebook_kmeans.json").read_text())["rows"]
    assert [(x["side"], x["median_s"], x["ferrox_speedup"]) for x in rows] == [("ferrox", 1.0, 1.0), ("faiss", 8.0, 8.0)]
    q = _partial(tmp_path / "q", [_row("matrix k=4", "ferrox", 1.0)], quick=True)
    r, _ = _merge(tmp_path, a, q)
    assert r.returncode != 0 and "merge runs of one kind" in r.stderr
    u = _partial(tmp_path / "u", [_row("matrix k=5", "ferrox", 1.0)])
    r, _ = _merge(tmp_path, u)
    assert r.returncode != 0 and "no such case" in r.stderr and "matrix k=5" in r.stderr
