"""``python -m pytest_hotswap.bench``: the smoke run's files and table, bad arguments, crashes, the
GPU check without a GPU, and the pieces the figures rest on (spreads, interleaving, goals).

Speed is never asserted here; what is asserted is the shape of the results and the facts the
benchmark rests on (a hotswap does not recompile, a reload does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_hotswap.bench import gpu_check, scaling
from pytest_hotswap.bench.__main__ import MEASUREMENTS, main
from pytest_hotswap.bench.goals import GOALS, evaluate
from pytest_hotswap.bench.results import Result, Stat, Target, format_table
from pytest_hotswap.bench.timing import interleaved, ratio, split

# Its module fixtures are built once, on one worker.
pytestmark = pytest.mark.xdist_group("bench")

ROW_KEYS = {
    "swap_latency": {
        "model",
        "lora_layers",
        "padded_floor_ms",
        "written_floor_ms",
        "reference_ms",
        "peft_fn_ms",
        "diffusers_ms",
        "reload_ms",
        "reference_x_padded_floor",
        "reference_x_written_floor",
        "peft_fn_x_reference",
        "diffusers_x_reference",
    },
    "recompile_stall": {"backend", "swap", "steady_call_ms", "first_call_ms", "recompiles"},
    "padding_overhead": {"model", "padded_to", "forward_ms", "x_unpadded"},
    "end_to_end": {"run", "swap", "reads_file_per_swap", "seconds", "recompiles"},
    "plugin_overhead": {"case", "unit", "without_ms", "with_ms", "overhead_ms"},
    "installed_plugin": {"run", "wall_ms", "cpu_ms", "peak_mib", "torch_imported"},
    "slots": {"model", "slots", "swap_ms"},
    "verdict_cost": {"model", "verdict", "failing_call_ms", "compiles", "samples"},
    "scaling": {"run", "workers", "wall_s", "compiles", "fx_hits", "fx_misses", "same_verdicts"},
    "conformance_split": {"part", "seconds", "share_pct", "report_created", "xdist_workers"},
}
#: What `make conformance` writes for the conformance_split measurement to read (made up here).
CONFORMANCE_SECONDS = {"tests": 100.0, "compiling": 80.0, "swapping": 1.0, "eager references": 5.0}
#: The two kinds of rows of the slots measurement: N slots, and the text-encoder opt-in.
SLOT_KEYS = {"forward_ms", "forward_x_one_slot", "swap_x_one_slot"}
TEXT_ENCODER_KEYS = {"text_encoder", "te_forward_ms", "te_forward_x_no_opt_in", "swap_x_no_opt_in"}
#: A timed value in the JSON: its median and its spread.
STAT_KEYS = {"median", "q1", "q3", "min", "max", "n"}
#: Columns that hold a timed value (or a ratio of two) in every row that has them.
TIMED = {
    key
    for keys in [*ROW_KEYS.values(), SLOT_KEYS, TEXT_ENCODER_KEYS]
    for key in keys
    if key.endswith(("_ms", "_x_reference", "_floor", "_one_slot", "_mib", "_no_opt_in"))
    or key == "x_unpadded"
} - {"without_ms"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench")
    report = out / "conformance.json"
    report.write_text(json.dumps({"conformance": {"seconds": CONFORMANCE_SECONDS}}))
    done = subprocess.run(
        [sys.executable, "-m", "pytest_hotswap.bench", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CONFORMANCE_REPORT": str(report)},
    )
    return done, out


def _measurements(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["measurements"]


@pytest.mark.slow
def test_smoke_runs_every_measurement_and_writes_json_and_png(smoke) -> None:
    done, out = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = json.loads((out / "results.json").read_text())
    assert document["schema"] == 2
    assert {"torch", "diffusers", "peft"} <= set(document["versions"])
    assert document["config"]["smoke"] is True
    assert list(document["measurements"]) == list(MEASUREMENTS)
    for name, measurement in document["measurements"].items():
        assert measurement["status"] == "ok", (name, measurement["note"])
        assert measurement["rows"], name
        for row in measurement["rows"]:
            assert ROW_KEYS[name] <= set(row), (name, row)
        assert f"== {measurement['title']} [ok" in done.stdout
    assert (out / "bench.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.slow
def test_smoke_gives_every_timed_value_its_spread(smoke) -> None:
    _, out = smoke
    for name, measurement in _measurements(out).items():
        for row in measurement["rows"]:
            for key in TIMED & set(row):
                if row[key] == "-":  # no swap in a run without swaps
                    continue
                assert set(row[key]) == STAT_KEYS, (name, key, row[key])
                value = row[key]
                assert value["min"] <= value["q1"] <= value["median"] <= value["q3"] <= value["max"]


def test_smoke_reports_every_goal_in_json_and_table(smoke) -> None:
    done, out = smoke
    measurements = _measurements(out)
    reported = {
        target["name"]: target
        for measurement in measurements.values()
        for target in measurement["targets"]
    }
    assert set(reported) == {goal.name for goal in GOALS}
    for goal in GOALS:
        target = reported[goal.name]
        assert target["target"] == f"{'>=' if goal.at_least else '<='} {goal.limit:g}"
        assert isinstance(target["met"], bool)
        assert f"   target {goal.name}: " in done.stdout
    swap = {row["model"]: row for row in measurements["swap_latency"]["rows"]}
    assert set(swap) == {"tiny-flux", "flux-wide", "flux-deep"}
    for row in swap.values():
        assert 0 < row["written_mib"] < row["padded_mib"]


def test_smoke_hotswap_does_not_recompile_and_reload_does(smoke) -> None:
    """The facts behind the stall and end-to-end numbers, with the reload as negative control."""
    _, out = smoke
    measurements = _measurements(out)
    stall = {row["swap"]: row for row in measurements["recompile_stall"]["rows"]}
    assert stall["hotswap"]["recompiles"] == 0
    assert stall["recompiling swap"]["recompiles"] == stall["recompiling swap"]["swaps"] >= 1
    e2e = {row["run"]: row for row in measurements["end_to_end"]["rows"]}
    assert list(e2e) == [
        "eager, reloads",
        "compiled, no swaps",
        "compiled, hotswap (diffusers)",
        "compiled, hotswap (reference)",
        "compiled, recompiling swaps",
    ]
    for run in (
        "compiled, no swaps",
        "compiled, hotswap (diffusers)",
        "compiled, hotswap (reference)",
    ):
        assert e2e[run]["recompiles"] == 0, run
    recompiling = e2e["compiled, recompiling swaps"]
    assert recompiling["recompiles"] == recompiling["sequences"]  # smoke: 2 adapters, one swap
    assert e2e["compiled, hotswap (reference)"]["reads_file_per_swap"] is True
    assert e2e["compiled, no swaps"]["reads_file_per_swap"] is False


def test_smoke_measures_the_installed_plugin_and_slots(smoke) -> None:
    _, out = smoke
    measurements = _measurements(out)
    installed = {row["run"]: row for row in measurements["installed_plugin"]["rows"]}
    assert list(installed) == ["with plugin", "-p no:hotswap", "plugin cost"]
    for run in ("with plugin", "-p no:hotswap"):
        assert isinstance(installed[run]["torch_imported"], bool)
        assert installed[run]["peak_mib"]["median"] > 10
    slots = [row for row in measurements["slots"]["rows"] if "text_encoder" not in row]
    assert [(row["model"], row["slots"]) for row in slots] == [
        (model, n) for model in ("tiny-flux", "flux-deep") for n in (1, 2, 4)
    ]
    assert all(set(row) >= SLOT_KEYS for row in slots)
    # The text-encoder opt-in (smoke: the tiny CLIP only): forward and swap, with and without.
    text_encoder = [row for row in measurements["slots"]["rows"] if "text_encoder" in row]
    assert [(row["model"], row["text_encoder"]) for row in text_encoder] == [
        ("tiny-sd", "no opt-in: no LoRA"),
        ("tiny-sd", "LoRA rank 32, unpadded (diffusers load)"),
        ("tiny-sd", "opt-in: LoRA padded to 128"),
    ]
    assert all(set(row) >= TEXT_ENCODER_KEYS for row in text_encoder)
    off, unpadded, on = text_encoder
    assert (off["te_lora_layers"], unpadded["te_lora_layers"], on["te_lora_layers"]) == (0, 12, 12)
    assert unpadded["swap_ms"] == "-"  # not prepared: it cannot hotswap
    assert set(on["swap_x_no_opt_in"]) == STAT_KEYS
    cases = [row["case"] for row in measurements["plugin_overhead"]["rows"]]
    assert cases == [
        "compiled call in a watcher",
        "CompileWatcher.step",
        "CompileWatcher.step, 5 more frames",
        "watcher scope enter + exit",
        "compiled call, isolate_recompiles=True",
        "no_recompile(fresh=True): reset + recompile",
        "fresh automatic-dynamic record (watch.profile)",
        "layout check around a swap (HotswapPipeline.swap)",
        "cached pipeline hand-out (reusable)",
        "pytest test, no_recompile",
        "pytest test, no_recompile(fresh=True)",
    ]


def test_smoke_verdict_cost_fails_at_the_guard_without_compiling(smoke) -> None:
    """Issue 22: the failing call refused at the guard compiles nothing; the same call compiling
    on (count_all) compiles once per sample, its negative control."""
    _, out = smoke
    rows = _measurements(out)["verdict_cost"]["rows"]
    assert [(row["model"], row["verdict"]) for row in rows] == [
        (model, verdict)
        for model in ("tiny-sd", "tiny-flux")
        for verdict in ("fail at the guard", "compile on")
    ]
    for row in rows:
        expected = 0 if row["verdict"] == "fail at the guard" else row["samples"]
        assert row["compiles"] == expected, row


def test_smoke_scaling_runs_the_suite_five_ways_with_the_same_verdicts(smoke) -> None:
    """Issue 24: whole conformance runs (eager, flux-reference, same_rank and a_b_a) on 1 and 2
    workers and sharing a cache; eager never looks up inductor's FX graph cache."""
    _, out = smoke
    rows = _measurements(out)["scaling"]["rows"]
    assert [(row["run"], row["workers"]) for row in rows] == [
        ("cold", 1),
        ("cold", 2),
        ("warm local dir (second run)", 1),
        ("redis, first run", 1),
        ("redis, second run (fresh local dir)", 1),
    ]
    ran = rows if scaling.redis_missing() == "" else rows[:3]
    assert rows[0]["result"] == "2 passed" and rows[0]["same_verdicts"] == "-"
    for row in ran:
        assert set(row["wall_s"]) == STAT_KEYS and row["wall_s"]["n"] == 1
        assert (row["fx_hits"], row["fx_misses"]) == (0, 0)
        # One worker builds and compiles the column once; two may each build it while
        # --dist loadgroup does not group (pytest 9.2 + pytest-xdist 3.8, pytest-xdist#1386).
        assert row["compiles"] in ((1,) if row["workers"] == 1 else (1, 2)), row
    assert [row["same_verdicts"] for row in ran[1:]] == [True] * (len(ran) - 1)
    for row in rows[len(ran) :]:
        assert row["result"] == scaling.redis_missing() and row["wall_s"] == "-"


def test_cuda_is_refused_cleanly_without_a_gpu(monkeypatch, capsys, tmp_path) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--device cuda needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_gpu_check_fails_loudly_without_a_gpu(monkeypatch, capsys, tmp_path) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu"
    assert main(["--gpu-check", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "gpu-check: FAILED: gpu-check needs a CUDA GPU" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "dropped"),
    [
        (["--smoke"], "--smoke"),
        (["--max-rank", "64"], "--max-rank"),
        (["--dtype", "float16", "--swap-rank", "8"], "--dtype, --swap-rank"),
        (["--device", "cuda"], "--device"),
    ],
)
def test_gpu_check_takes_only_out(capsys, tmp_path, extra, dropped) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--gpu-check", *extra, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert (
        f"--gpu-check runs its own prepared steps and takes only --out; drop {dropped}"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(("capability", "float8"), [((9, 0), True), ((8, 0), False)])
def test_gpu_check_plans_the_bench_in_both_modes_and_the_conformance_suite(
    capability, float8, tmp_path
) -> None:
    steps = {step.name: step.command for step in gpu_check.steps(tmp_path, capability)}
    assert list(steps) == [
        "bench-max-autotune-no-cudagraphs",
        "bench-reduce-overhead",
        "conformance",
    ]
    assert "max-autotune-no-cudagraphs" in steps["bench-max-autotune-no-cudagraphs"]
    assert "reduce-overhead" in steps["bench-reduce-overhead"]
    for name in ("bench-max-autotune-no-cudagraphs", "bench-reduce-overhead"):
        assert steps[name][steps[name].index("--device") + 1] == "cuda"
        assert str(tmp_path / name) in steps[name]
    conformance = steps["conformance"]
    assert {"--hotswap-device=cuda", "--hotswap-mode=reduce-overhead"} <= set(conformance)
    assert ("--hotswap-quantize=float8-dynamic" in conformance) is float8
    assert f"--hotswap-report={tmp_path / 'conformance.json'}" in conformance


def test_gpu_check_writes_logs_and_summary_and_fails_on_a_failed_or_late_step(
    monkeypatch, capsys, tmp_path
) -> None:
    python = sys.executable
    monkeypatch.setattr(gpu_check, "gpu", lambda: gpu_check.Gpus(("Fake GPU",), (9, 0)))
    monkeypatch.setattr(
        gpu_check,
        "steps",
        lambda out, capability, gpus: [
            gpu_check.Step("ok", [python, "-c", "print('fine')"]),
            gpu_check.Step("broken", [python, "-c", "raise SystemExit(3)"]),
            gpu_check.Step("slow", [python, "-c", "import time; time.sleep(60)"]),
        ],
    )
    assert gpu_check.run(tmp_path, budget_s=5) == 1
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    statuses = {step["name"]: step["status"] for step in summary["steps"]}
    assert statuses["ok"] == "passed"
    assert statuses["broken"] == "failed (exit 3)"
    assert statuses["slow"].startswith("timed out") or statuses["slow"].startswith("not run")
    assert (tmp_path / "ok.log").read_text() == "fine\n"
    err = capsys.readouterr().err
    assert "gpu-check: FAILED: broken failed (exit 3)" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quantize", "float8-dynamic"], "compute capability >= 8.9"),
        (["--swap-rank", "256"], "--swap-rank must be between 1 and --max-rank (128)"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--samples", "0"], "--samples must be at least 1"),
        (["--backends", "eager,tvm"], "unknown tvm"),
        (["--only", "swap,end_to_end"], "unknown swap"),
    ],
)
def test_bad_arguments_exit_2_with_the_fix(argv, message, capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_crashing_measurement_is_recorded_and_fails_the_run(
    monkeypatch, capsys, tmp_path
) -> None:
    from pytest_hotswap.bench import padding

    def crash(config, workdir):
        raise RuntimeError("boom in padding")

    monkeypatch.setattr(padding, "run", crash)
    assert main(["--smoke", "--only", "padding_overhead", "--out", str(tmp_path)]) == 1
    measurement = json.loads((tmp_path / "results.json").read_text())["measurements"]
    assert measurement["padding_overhead"]["status"] == "error"
    assert "boom in padding" in measurement["padding_overhead"]["note"]
    assert (tmp_path / "bench.png").exists()
    assert "RuntimeError: boom in padding" in capsys.readouterr().err


def test_targets_compare_in_their_direction() -> None:
    assert Target("floor", 1.2, 1.3, at_least=False).met
    assert not Target("floor", 1.4, 1.3, at_least=False).met
    assert Target("speed-up", 4.0, 4.0, at_least=True).met
    assert not Target("speed-up", 2.0, 4.0, at_least=True).met


def test_goals_read_their_row_and_column_with_the_spread() -> None:
    spread = Stat.of([1.1, 1.2, 1.25, 1.4])
    result = Result(
        "swap_latency",
        "swaps",
        rows=[
            {"model": "flux-wide", "reference_x_padded_floor": 0.8, "peft_fn_x_reference": 3.0},
            {"model": "flux-deep", "reference_x_padded_floor": spread},
        ],
    )
    targets = {target.name: target for target in evaluate(result)}
    assert set(targets) == {
        "flux-wide reference / padded floor",
        "flux-wide PEFT function / reference",
        "flux-deep reference / padded floor",
    }
    deep = targets["flux-deep reference / padded floor"]
    assert (deep.value, deep.limit, deep.met, deep.spread) == (spread.median, 1.3, True, spread)
    assert not targets["flux-wide PEFT function / reference"].met
    assert targets["flux-wide reference / padded floor"].as_dict()["target"] == "<= 1"


def test_stat_holds_median_quartiles_and_extremes() -> None:
    stat = Stat.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stat.median, stat.q1, stat.q3, stat.min, stat.max, stat.n) == (3, 2, 4, 1, 5, 5)
    assert stat.text() == "3 [2, 4]"
    assert Stat.of([7.0]).text() == "7"
    assert Stat.of([7.0]).as_dict() == {"median": 7, "q1": 7, "q3": 7, "min": 7, "max": 7, "n": 1}
    with pytest.raises(ValueError, match="at least one sample"):
        Stat.of([])


def test_interleaved_rotates_the_order_and_ratios_are_per_round() -> None:
    order: list[str] = []
    candidates = {name: (lambda name=name: order.append(name)) for name in "abc"}
    rounds = interleaved(candidates, "cpu", repeats=6, warmup=0, max_rounds=3)
    assert split(6, 3) == (3, 2)
    assert [len(r) for r in rounds["a"]] == [2, 2, 2]
    assert order == list("aabbccbbccaaccaabb")
    assert ratio([[2.0, 2.0], [6.0]], [[1.0, 1.0], [2.0]]).median == 2.5


def test_table_aligns_rows_prints_spreads_and_names_unmet_targets() -> None:
    result = Result(
        "x",
        "A title",
        rows=[
            {"model": "tiny", "ms": Stat.of([1.0, 1.5, 2.0])},
            {"model": "a-longer-name", "ms": 12345.6},
        ],
        targets=[Target("ratio", 4.0, 3.0, at_least=False)],
        seconds=1.0,
    )
    lines = format_table(result).splitlines()
    assert lines[0] == "== A title [ok, 1.0 s]"
    assert lines[1:4] == [
        "           model                ms",
        "            tiny  1.5 [1.25, 1.75]",
        "   a-longer-name             12346",
    ]
    assert lines[4] == "   target ratio: 4 (goal <= 3): NOT met"
