"""Benchmark output: terminal table, Markdown summary, JSON file and a log-log throughput plot."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Sequence

from ..utils.files import atomic_output, atomic_write_bytes
from .render import markdown as render_markdown

HEADER = ("case", "provider", "cell-upd/s", "ms/step (min-max)", "x ref", "% floor", "peak mem", "note")


def _si(v: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.3g}"


def _mem(b) -> str:
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def rows(report: dict) -> List[List[str]]:
    out = []
    for r in report["results"]:
        case = f"{r['model']} {r['size']}² b{r['batch']}"
        if r["status"] != "ok":
            out.append([case, r["provider"], "-", "-", "-", "-", "-", f"{r['status']}: {r['reason']}"])
            continue
        note = f"compile {r['compile_s']:.1f} s" if r.get("compile_s") else ""
        out.append([
            case, r["provider"], _si(r["cells_per_s"]),
            f"{r['median_s'] * 1e3:.3g} ({r['min_s'] * 1e3:.3g}-{r['max_s'] * 1e3:.3g})",
            "-" if r["speedup"] is None else f"{r['speedup']:.2f}",
            f"{100 * r['floor_fraction']:.2g}", _mem(r["peak_mem_bytes"]), note])
    return out


def header_lines(report: dict) -> List[str]:
    d, m, v = report["device"], report["machine"], report["versions"]
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "jax", "cax") if v.get(k))
    return [f"device: {d['name']} ({d['type']}); copy bandwidth {d['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s",
            f"machine: {m['cpu']}, {m['cpus_usable']} usable CPUs, torch threads {m['torch_threads']}",
            f"versions: nca_fast {report['nca_fast']}, {libs}", f"date: {report['created']}"]


def table(report: dict) -> str:
    """The terminal table (fixed-width columns)."""
    body = rows(report)
    widths = [max(len(str(x)) for x in col) for col in zip(HEADER, *body)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    lines = header_lines(report) + ["", fmt(HEADER), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in body]
    lines += ["", "cell-upd/s: median throughput; x ref: speed-up over `reference` in the same case; "
              "% floor: time to read+write the state at the measured copy bandwidth / step time."]
    lines += render_markdown(report.get("render", []))
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """A Markdown summary: context lines and the table."""
    lines = ["# nca-fast bench", ""] + [f"- {h}" for h in header_lines(report)] + [""]
    lines.append("| " + " | ".join(HEADER) + " |")
    lines.append("|" + "---|" * len(HEADER))
    for r in rows(report):
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |")
    lines += ["", "Throughput is the median over the timed steps (min and max in brackets), one stochastic "
              "step per sample, inputs rotated so that they do not sit in the last-level cache; "
              "`% floor` compares each step with the time to read and write the state at the copy "
              "bandwidth measured in the same run. Every provider was verified against the reference "
              "(one step, explicit mask or fire rate 1) before it was timed.", ""]
    lines += render_markdown(report.get("render", [])) + [""]
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    atomic_write_bytes(path, json.dumps(report, indent=1).encode())


def plot(report: dict, path: Path) -> None:
    """Throughput against grid size, log-log, one line per provider (one panel per model, batch 1)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError('the benchmark plot needs matplotlib: pip install "nca-fast[bench]"') from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if r["status"] == "ok" and r["batch"] == 1]
    models = sorted({r["model"] for r in report["results"]})
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(6 * max(1, len(models)), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        series: Dict[str, List] = {}
        for r in ok:
            if r["model"] == model:
                series.setdefault(r["provider"], []).append((r["size"], r["cells_per_s"]))
        for prov, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("grid size (cells per side)")
        ax.set_ylabel("cell-updates / s")
        ax.set_title(f"{model} (batch 1)")
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend()
    fig.suptitle(f"nca-fast bench: {report['device']['name']}", fontsize=10)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def default_stem(report: dict) -> str:
    """``<device>-<date>``, e.g. ``cpu-2core-2026-11-27`` or ``nvidia-h100-80gb-hbm3-2026-11-27``."""
    d = report["device"]
    if d["type"] == "cpu":
        name = f"cpu-{report['machine']['cpus_usable']}core"
    else:
        name = re.sub(r"[^a-z0-9]+", "-", d["name"].lower()).strip("-")
    return f"{name}-{report['created'][:10]}"


def unused_stem(out_dir: Path, stem: str, suffixes: Sequence[str] = (".json", ".md", ".png")) -> str:
    """``stem``, or ``stem-2``, ``stem-3``, ... : the first that names none of ``out_dir``'s files, so a
    second run on the same day keeps the first's results (an explicit ``--name`` overwrites)."""
    candidate, n = stem, 1
    while any((out_dir / f"{candidate}{s}").exists() for s in suffixes):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def write_all(report: dict, out_dir: Path, stem: str = "", plot_png: bool = True) -> Dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``; returns the paths.
    Without ``stem``: :func:`default_stem`, made unique in ``out_dir`` (:func:`unused_stem`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or unused_stem(out_dir, default_stem(report))
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    write_json(report, paths["json"])
    atomic_write_bytes(paths["md"], markdown(report).encode())
    if plot_png:
        paths["png"] = out_dir / f"{stem}.png"
        plot(report, paths["png"])
    return paths
