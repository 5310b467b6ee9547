"""Compares two runs case by case: median times side by side and the ratio B / A."""

from __future__ import annotations

from pathlib import Path

from .report import _nan, _table, fmt_time, load_raw


def compare(run_a: Path, run_b: Path) -> str:
    info_a, rows_a = load_raw(run_a)
    info_b, rows_b = load_raw(run_b)
    b_by_key = {(r["case"], r["impl"]): r for r in rows_b}
    lines = [f"# Comparing runs: A = `{run_a}`, B = `{run_b}`", ""]
    lines += _table(
        ["", "A", "B"],
        [
            [k, f"`{info_a.get(k, '')}`", f"`{info_b.get(k, '')}`"]
            for k in ("date", "device_name", "torch_version", "fastreg_commit", "set")
        ],
    )
    lines += ["", "B/A < 1 means B is faster. Rows that failed the gate in either run show its status.", ""]
    body = []
    for a in rows_a:
        b = b_by_key.pop((a["case"], a["impl"]), None)
        if b is None:
            body.append([a["case"], a["impl"], _cell(a), "absent", ""])
            continue
        ratio = (
            ""
            if a["status"] != "ok" or b["status"] != "ok" or _nan(a["median_ms"])
            else f"{b['median_ms'] / a['median_ms']:.2f}"
        )
        body.append([a["case"], a["impl"], _cell(a), _cell(b), ratio])
    body += [[b["case"], b["impl"], "absent", _cell(b), ""] for b in b_by_key.values()]
    lines += _table(["case", "impl", "A median", "B median", "B/A"], body)
    return "\n".join(lines) + "\n"


def _cell(row: dict) -> str:
    return fmt_time(row["median_ms"]) if row["status"] == "ok" else row["status"].upper()
