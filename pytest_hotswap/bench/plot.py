"""The PNG: one panel per measurement, read next to the printed table (matplotlib, imported lazily).

Bars are medians with error bars from the interquartile range; dashed segments are the goals of
``pytest_hotswap.bench.goals`` over the bar they judge. A log axis is used where a bar would
otherwise be invisible next to the others.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.goals import goals_of
from pytest_hotswap.bench.results import Result, Stat, median

Value = Stat | float | None


def _value(row: dict[str, Any], key: str) -> Value:
    value = row.get(key)
    return value if isinstance(value, (Stat, int, float)) else None


def _bars(
    ax: Any,
    groups: list[str],
    series: dict[str, list[Value]],
    ylabel: str,
) -> dict[tuple[str, int], float]:
    """Grouped bars with IQR error bars; returns the x of each (series, group) bar."""
    width = 0.8 / max(len(series), 1)
    positions: dict[tuple[str, int], float] = {}
    for i, (name, values) in enumerate(series.items()):
        xs, heights, low, high = [], [], [], []
        for g, value in enumerate(values):
            if value is None:
                continue
            x = g + i * width
            positions[(name, g)] = x
            xs.append(x)
            heights.append(median(value))
            low.append(median(value) - value.q1 if isinstance(value, Stat) else 0.0)
            high.append(value.q3 - median(value) if isinstance(value, Stat) else 0.0)
        ax.bar(xs, heights, width, label=name, yerr=[low, high], capsize=2, ecolor="0.3")
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6)
    return positions


def _goal_marks(
    ax: Any,
    result: Result,
    groups: list[dict[str, Any]],
    columns: dict[str, str],
    positions: dict[tuple[str, int], float],
    width: float,
) -> None:
    """A dashed segment at each goal's limit over the bar it judges."""
    labelled = False
    for goal in goals_of(result.name):
        name = next((label for label, column in columns.items() if column == goal.column), None)
        group = next((g for g, row in enumerate(groups) if goal.matches(row)), None)
        if name is None or group is None or (name, group) not in positions:
            continue
        x = positions[(name, group)]
        ax.hlines(
            goal.limit,
            x - width / 2,
            x + width / 2,
            colors="black",
            linestyles="--",
            linewidth=1.5,
            label=None if labelled else "goal",
        )
        labelled = True
    if labelled:
        ax.legend(fontsize=6)


def _swap(ax: Any, result: Result) -> None:
    rows = result.rows
    columns = {
        "reference / padded floor": "reference_x_padded_floor",
        "reference / written floor": "reference_x_written_floor",
        "PEFT function / reference": "peft_fn_x_reference",
        "diffusers / reference": "diffusers_x_reference",
    }
    positions = _bars(
        ax,
        [r["model"] for r in rows],
        {label: [_value(r, key) for r in rows] for label, key in columns.items()},
        "ratio (median, IQR)",
    )
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    _goal_marks(ax, result, rows, columns, positions, 0.8 / len(columns))


def _stall(ax: Any, result: Result) -> None:
    backends = list(dict.fromkeys(r["backend"] for r in result.rows))
    series: dict[str, list[Value]] = {}
    for row in result.rows:
        label = f"first call after {row['swap']}"
        series.setdefault(label, [None] * len(backends))
        series[label][backends.index(row["backend"])] = _value(row, "first_call_ms")
    series["steady call"] = [
        next(_value(r, "steady_call_ms") for r in result.rows if r["backend"] == b)
        for b in backends
    ]
    _bars(ax, backends, series, "ms (log)")
    ax.set_yscale("log")


def _padding(ax: Any, result: Result) -> None:
    for model in dict.fromkeys(r["model"] for r in result.rows):
        rows = [r for r in result.rows if r["model"] == model and r["padded_to"] != "none"]
        ratios = [r["x_unpadded"] for r in rows]
        ax.errorbar(
            [r["padded_to"] for r in rows],
            [median(v) for v in ratios],
            yerr=[
                [median(v) - v.q1 for v in ratios],
                [v.q3 - median(v) for v in ratios],
            ],
            fmt="o-",
            capsize=3,
            label=model,
        )
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("padded to rank R (the adapter's rank: 16)")
    ax.set_ylabel("forward time / unpadded (median, IQR)")
    ax.legend(fontsize=7)


def _end_to_end(ax: Any, result: Result) -> None:
    rows = result.rows
    _bars(
        ax,
        [r["run"].replace("compiled, ", "compiled,\n") for r in rows],
        {"speed-up over eager": [_value(r, "speedup_vs_eager") for r in rows]},
        "x (higher is better, log)",
    )
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.tick_params(axis="x", labelsize=6)


def _overhead(ax: Any, result: Result) -> None:
    """Horizontal bars: one per mechanism, its overhead (symlog: some are near 0 or below)."""
    rows = result.rows
    values = [r.get("overhead_ms") for r in rows]
    ys = list(range(len(rows)))
    medians = [median(v) if isinstance(v, (Stat, float, int)) else 0.0 for v in values]
    low = [m - v.q1 if isinstance(v, Stat) else 0.0 for m, v in zip(medians, values, strict=True)]
    high = [v.q3 - m if isinstance(v, Stat) else 0.0 for m, v in zip(medians, values, strict=True)]
    ax.barh(ys, medians, xerr=[low, high], capsize=2, ecolor="0.3", label="overhead")
    ax.set_yticks(ys, [f"{r['case']} ({r['unit']})" for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("overhead ms (median, IQR; symlog)")
    labelled = False
    for goal in goals_of(result.name):
        y = next((i for i, row in enumerate(rows) if goal.matches(row)), None)
        if y is None or goal.column != "overhead_ms":
            continue
        ax.vlines(
            goal.limit,
            y - 0.4,
            y + 0.4,
            colors="black",
            linestyles="--",
            linewidth=1.5,
            label=None if labelled else "goal",
        )
        labelled = True
    ax.legend(fontsize=6)


def _installed(ax: Any, result: Result) -> None:
    rows = result.rows
    columns = {"wall ms": "wall_ms"}
    positions = _bars(
        ax,
        [r["run"] for r in rows],
        {"wall ms": [_value(r, "wall_ms") for r in rows]},
        "ms (symlog)",
    )
    ax.set_yscale("symlog", linthresh=10)
    _goal_marks(ax, result, rows, columns, positions, 0.8)


def _slots(ax: Any, result: Result) -> None:
    rows = result.rows
    _bars(
        ax,
        [f"{r['model']}\nN={r['slots']}" for r in rows],
        {
            "forward / N=1": [_value(r, "forward_x_one_slot") for r in rows],
            "swap into slot N-1 / N=1": [_value(r, "swap_x_one_slot") for r in rows],
        },
        "ratio (median, IQR)",
    )
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.tick_params(axis="x", labelsize=6)


def _verdict(ax: Any, result: Result) -> None:
    models = list(dict.fromkeys(r["model"] for r in result.rows))
    series: dict[str, list[Value]] = {}
    for row in result.rows:
        series.setdefault(row["verdict"], [None] * len(models))
        series[row["verdict"]][models.index(row["model"])] = _value(row, "failing_call_ms")
    _bars(ax, models, series, "ms of the failing call (log)")
    ax.set_yscale("log")


def _scaling(ax: Any, result: Result) -> None:
    groups = [
        f"{textwrap.fill(r['run'], 16)}\n{r['workers']} worker{'s' if r['workers'] > 1 else ''}"
        for r in result.rows
    ]
    _bars(ax, groups, {"wall s": [_value(r, "wall_s") for r in result.rows]}, "s per pytest run")
    ax.tick_params(axis="x", labelsize=6)


PANELS: dict[str, Callable[[Any, Result], None]] = {
    "swap_latency": _swap,
    "recompile_stall": _stall,
    "padding_overhead": _padding,
    "end_to_end": _end_to_end,
    "plugin_overhead": _overhead,
    "installed_plugin": _installed,
    "slots": _slots,
    "verdict_cost": _verdict,
    "scaling": _scaling,
}


def plot(results: Sequence[Result], path: Path, config: BenchConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-(len(results) + 1) // 4)  # a panel per measurement, and the goals
    fig, axes = plt.subplots(rows, 4, figsize=(22, 5 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, result in zip(flat, results, strict=False):
        ax.set_title(textwrap.fill(result.title, 75), fontsize=7)
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
        lines = [target.text() for r in results for target in r.targets]
        summary.text(
            0.0,
            1.0,
            "goals (median [IQR])\n" + "\n".join(lines or ["(none measured)"]),
            va="top",
            fontsize=7,
            family="monospace",
            wrap=True,
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
