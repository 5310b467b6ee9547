"""Writes a run: raw JSON (every sample), a tidy CSV (one row per case x implementation),
a Markdown report with a speedup table per op, and PNG plots when matplotlib is installed."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

RAW, CSV, REPORT, PLOTS = "raw.json", "results.csv", "report.md", "plots"
OUTPUTS = (RAW, CSV, REPORT, PLOTS)

#: columns of the run info repeated on every CSV row, so rows from several runs can be mixed
INFO_COLUMNS = ("device_name", "torch_version", "fastreg_commit", "fastreg_backend", "set", "date")


def write_raw(folder: Path, info: dict, rows: list[dict]) -> None:
    (folder / RAW).write_text(json.dumps({"info": info, "rows": rows}, indent=1, default=str) + "\n")


#: what every row of a raw.json has, whichever version wrote it (compare reads only these)
ROW_KEYS = ("case", "impl", "status", "median_ms")


class NotARun(ValueError):
    """The folder holds no readable raw.json of a fastreg.bench run."""


def load_raw(folder: Path) -> tuple[dict, list[dict]]:
    path = Path(folder) / RAW
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise NotARun(f"{folder} is not a fastreg.bench run: cannot read {path} ({error.strerror or error})") from None
    except ValueError as error:
        raise NotARun(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("info"), dict) or not isinstance(data.get("rows"), list):
        raise NotARun(f"{path} is not the raw.json of a fastreg.bench run (no 'info' and 'rows')")
    for row in data["rows"]:
        missing = [key for key in ROW_KEYS if not isinstance(row, dict) or key not in row]
        if missing:
            raise NotARun(f"{path} is not the raw.json of a fastreg.bench run (a row without {', '.join(missing)})")
    return data["info"], data["rows"]


def write_csv(folder: Path, info: dict, rows: list[dict]) -> None:
    columns = [c for c in rows[0] if c != "samples_ms"] + list(INFO_COLUMNS) if rows else list(INFO_COLUMNS)
    with open(folder / CSV, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: info.get(k, "") for k in INFO_COLUMNS}, **row})


# ---------------------------------------------------------------- formatting helpers


def _nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_time(ms: float) -> str:
    if _nan(ms):
        return "-"
    if ms < 1:
        return f"{ms * 1e3:.1f} us"
    return f"{ms:.2f} ms" if ms < 100 else f"{ms:.0f} ms"


def fmt_bytes(n: float) -> str:
    if _nan(n):
        return "n/a"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _failed_cell(row: dict) -> str | None:
    return {"mismatch": "**MISMATCH**", "error": "**ERROR**", "skipped": "skipped"}.get(row["status"])


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def _cases(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """case id -> impl -> row, in run order."""
    found: dict[str, dict[str, dict]] = {}
    for row in rows:
        found.setdefault(row["case"], {})[row["impl"]] = row
    return found


def _impls(rows: list[dict], baseline: bool) -> list[str]:
    return list(dict.fromkeys(r["impl"] for r in rows if bool(r["baseline"]) == baseline))


def _case_cells(case_rows: dict[str, dict]) -> list[str]:
    any_row = next(iter(case_rows.values()))
    return [any_row["kind"], any_row["dtype"], any_row["size"]]


def _time_cell(row: dict | None) -> str:
    if row is None:
        return ""
    failed = _failed_cell(row)
    if failed:
        return failed
    speedup = row.get("speedup_vs_eager")
    return fmt_time(row["median_ms"]) + ("" if _nan(speedup) else f" ({speedup:.2f}x)")


def _best_torch_cell(row: dict | None) -> str:
    if row is None or row["status"] != "ok" or _nan(row.get("speedup_vs_best_torch")):
        return ""
    return f"{row['speedup_vs_best_torch']:.2f}x"


def _bandwidth_cell(row: dict | None) -> str:
    if row is None:
        return ""
    failed = _failed_cell(row)
    if failed:
        return failed
    pct = row.get("pct_of_copy_inplace")
    return _figure(row["gbps"]) + ("" if _nan(pct) or row["baseline"] else f" ({_figure(pct, 0)}%)")


def _figure(value: float, decimals: int = 1) -> str:
    """A number with ``decimals`` decimals, and two significant digits where those would show
    0 (a host-bound row's 0.0031 GB/s is not 0.0)."""
    if value != 0 and abs(value) < 0.5 * 10**-decimals:
        return f"{value:.2g}"
    return f"{value:.{decimals}f}"


def op_section(op: str, rows: list[dict]) -> list[str]:
    cases = _cases(rows)
    impls, baselines = _impls(rows, False), _impls(rows, True)
    eager = next((r["eager"] for r in rows if r.get("eager")), "PyTorch eager")
    lines = [f"## {op}", "", f"### Median time per call (speedup over {eager})", ""]
    lines += _table(
        ["kind", "dtype", "size", *impls, "fastreg vs best PyTorch"],
        [
            _case_cells(c) + [_time_cell(c.get(i)) for i in impls] + [_best_torch_cell(c.get("fastreg"))]
            for c in cases.values()
        ],
    )
    lines += ["", "### GB/s on the ideal bytes (% of the in-place copy bandwidth measured beside it)", ""]
    lines += _table(
        ["kind", "dtype", "size", *impls, *baselines],
        [_case_cells(c) + [_bandwidth_cell(c.get(i)) for i in impls + baselines] for c in cases.values()],
    )
    if any(not _nan(r.get("saved_bytes")) for r in rows):
        lines += ["", "### Bytes kept for backward (measured with saved_tensors_hooks)", ""]
        lines += _table(
            ["kind", "dtype", "size", *impls],
            [
                _case_cells(c)
                + [fmt_bytes(c[i].get("saved_bytes")) if i in c and c[i]["status"] == "ok" else "" for i in impls]
                for c in cases.values()
                if next(iter(c.values()))["kind"] in ("fwd", "train_fwd")
            ],
        )
    return lines + [""]


def gate_section(rows: list[dict]) -> list[str]:
    failed = [r for r in rows if r["status"] in ("mismatch", "error")]
    skipped = [r for r in rows if r["status"] == "skipped"]
    checked = [r for r in rows if r["status"] != "skipped"]
    lines = ["## Correctness gate", ""]
    if failed:
        lines.append(f"**{len(failed)} of {len(checked)} rows FAILED the gate and were not timed:**")
        lines += [""] + [f"- `{r['case']}` / `{r['impl']}`: {r['message']}" for r in failed]
    else:
        lines.append(
            f"All {len(checked)} rows passed the gate before being timed "
            "(fastreg and reference: bit-exact for the same rng_state; PyTorch: dropout semantics; "
            "penalty: per-dtype tolerances; batch norm: reference within per-dtype tolerances)."
        )
    if skipped:
        reasons = sorted({f"`{r['op']}`: {r['message']}" for r in skipped})
        lines += ["", f"{len(skipped)} rows skipped:"] + [f"- {reason}" for reason in reasons]
    return lines + [""]


def markdown(info: dict, rows: list[dict], plot_note: str = "", plot_files: list[str] | None = None) -> str:
    lines = [f"# fastreg benchmark: `{info.get('set')}` set on {info.get('device_name')}", ""]
    lines += _table(
        ["", ""],
        [
            [k, f"`{info[k]}`"]
            for k in (
                "date",
                "device",
                "device_name",
                "threads",
                "torch_version",
                "cuda_version",
                "fastreg_commit",
                "fastreg_backend",
                "wall_time_s",
                "load_average_start",
                "load_average_end",
                "command",
                "note",
            )
            if info.get(k)
        ],
    )
    lines += [
        "",
        "Method: docs/benchmark.md. Times are medians over rounds; `Nx` is the speedup over PyTorch eager "
        "measured in this run. GB/s counts the bytes an ideal kernel moves (dropout: read x + write y, and read dy + "
        "write dx for fwd_bwd; penalty: read w, read g, write g; batch norm: read x + write y, and read x + read dy + "
        "write dx for train_fwd_bwd). Raw samples: raw.json; every metric: results.csv.",
        "",
    ]
    lines += gate_section(rows)
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in rows if r["op"] == op]
        if all(r["status"] == "skipped" for r in op_rows):
            continue
        lines += op_section(op, op_rows)
    lines += ["## Plots", ""]
    if plot_files:
        lines += [f"![{Path(f).stem}]({f})" for f in plot_files]
    lines += [plot_note] if plot_note else []
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- plots


def plots(folder: Path, rows: list[dict]) -> tuple[list[str], str]:
    """PNG per (op, kind, dtype, variant): time and GB/s against size, one line per implementation.
    A size label "SHAPE-VARIANT" (batch norm's "32x64x56x56-cl") plots each variant apart."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "Plots skipped: matplotlib is not installed (pip install 'fastreg[bench]')."
    out = folder / PLOTS
    out.mkdir(exist_ok=True)
    written = []
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        if row["status"] == "ok":
            variant = row["size"].rpartition("-")[2] if "-" in row["size"] else ""
            label = f"{row['dtype']} {variant}".strip()  # "fp32", "fp32 cl"
            groups.setdefault((row["op"], row["kind"], label), []).append(row)
    for (op, kind, label), group in groups.items():
        figure, (ax_time, ax_bw) = plt.subplots(1, 2, figsize=(11, 4))
        for impl in dict.fromkeys(r["impl"] for r in group):
            points = sorted((r["numel"], r["median_ms"], r["gbps"]) for r in group if r["impl"] == impl)
            style = "--" if impl.startswith("copy") else "-"
            ax_time.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=impl)
            ax_bw.plot([p[0] for p in points], [p[2] for p in points], style, marker="o", label=impl)
        ax_time.set(
            xscale="log",
            yscale="log",
            xlabel="elements",
            ylabel="median ms per call",
            title=f"{op} {kind} {label}: time",
        )
        ax_bw.set(xscale="log", yscale="log", xlabel="elements", ylabel="GB/s", title=f"{op} {kind} {label}: bandwidth")
        ax_bw.legend(fontsize=8)
        figure.tight_layout()
        name = f"{PLOTS}/{op}-{kind}-{label.replace(' ', '-')}.png"
        figure.savefig(folder / name, dpi=90)
        plt.close(figure)
        written.append(name)
    return written, ""


def write_all(folder: Path, info: dict, rows: list[dict]) -> None:
    write_raw(folder, info, rows)
    write_csv(folder, info, rows)
    plot_files, note = plots(folder, rows)
    (folder / REPORT).write_text(markdown(info, rows, note, plot_files))
