"""The PNG: one panel per measurement, read next to the printed table (matplotlib, imported lazily)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.results import Result


def _bars(ax: Any, groups: list[str], series: dict[str, list[float | None]], ylabel: str) -> None:
    """Grouped bars, one group per label; missing values are left out."""
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + i * width for g, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def _swap(ax: Any, result: Result) -> None:
    rows = result.rows
    columns = {
        "copy floor": "copy_floor_ms",
        "reference": "reference_ms",
        "PEFT hotswap": "peft_ms",
        "unload + load": "reload_ms",
    }
    _bars(
        ax,
        [r["model"].split(" ")[0] for r in rows],
        {label: [r.get(key) for r in rows] for label, key in columns.items()},
        "ms per swap",
    )
    ax.set_yscale("log")


def _stall(ax: Any, result: Result) -> None:
    backends = list(dict.fromkeys(r["backend"] for r in result.rows))
    series: dict[str, list[float | None]] = {}
    for row in result.rows:
        series.setdefault(f"first call after {row['swap']}", [None] * len(backends))
        series[f"first call after {row['swap']}"][backends.index(row["backend"])] = row[
            "first_call_ms"
        ]
    series["steady call"] = [
        next(r["steady_call_ms"] for r in result.rows if r["backend"] == b) for b in backends
    ]
    _bars(ax, backends, series, "ms")
    ax.set_yscale("log")


def _padding(ax: Any, result: Result) -> None:
    for model in dict.fromkeys(r["model"] for r in result.rows):
        rows = [r for r in result.rows if r["model"] == model and r["padded_to"] != "none"]
        unpadded = next(
            r["forward_ms"] for r in result.rows if r["model"] == model and r["padded_to"] == "none"
        )
        line = ax.plot(
            [r["padded_to"] for r in rows],
            [r["forward_ms"] for r in rows],
            "o-",
            label=model.split(" ")[0],
        )
        ax.axhline(unpadded, color=line[0].get_color(), linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("padded to rank (dotted: unpadded)")
    ax.set_ylabel("forward ms")
    ax.legend(fontsize=7)


def _end_to_end(ax: Any, result: Result) -> None:
    rows = result.rows
    _bars(
        ax,
        [r["run"] for r in rows],
        {"speed-up over eager": [r["speedup_vs_eager"] for r in rows]},
        "x (higher is better)",
    )
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.tick_params(axis="x", labelrotation=12)


def _overhead(ax: Any, result: Result) -> None:
    rows = result.rows
    _bars(
        ax,
        [r["case"] for r in rows],
        {"plain": [r["plain_ms"] for r in rows], "watched": [r["watched_ms"] for r in rows]},
        "ms",
    )


PANELS: dict[str, Callable[[Any, Result], None]] = {
    "swap_latency": _swap,
    "recompile_stall": _stall,
    "padding_overhead": _padding,
    "end_to_end": _end_to_end,
    "plugin_overhead": _overhead,
}


def plot(results: Sequence[Result], path: Path, config: BenchConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    flat = list(axes.flat)
    for ax, result in zip(flat, results, strict=False):
        ax.set_title(result.title, fontsize=8, wrap=True)
        if result.status == "ok" and result.rows and result.name in PANELS:
            PANELS[result.name](ax, result)
        else:
            ax.text(
                0.5,
                0.5,
                f"{result.status}\n{result.note}",
                ha="center",
                va="center",
                fontsize=8,
                wrap=True,
                transform=ax.transAxes,
            )
            ax.set_axis_off()
    summary = flat[len(results)] if len(results) < len(flat) else None
    if summary is not None:
        lines = [
            f"{t.name}: {t.value:.3g} ({'met' if t.met else 'NOT met'})"
            for r in results
            for t in r.targets
        ]
        summary.text(
            0.0,
            1.0,
            "targets\n" + "\n".join(lines or ["(none measured)"]),
            va="top",
            fontsize=8,
            family="monospace",
            transform=summary.transAxes,
        )
        summary.set_axis_off()
    for ax in flat[len(results) + 1 :]:
        ax.set_axis_off()
    fig.suptitle(
        f"pytest-hotswap bench: {config.device}, {config.dtype}, "
        f"{'smoke' if config.smoke else 'full'}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
