"""``python -m pytest_hotswap.bench``: the smoke run's files and table, bad arguments, crashes.

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

from pytest_hotswap.bench.__main__ import MEASUREMENTS, main
from pytest_hotswap.bench.results import Result, Target, format_table

ROW_KEYS = {
    "swap_latency": {
        "model",
        "lora_layers",
        "copy_floor_ms",
        "reference_ms",
        "peft_ms",
        "reload_ms",
    },
    "recompile_stall": {"backend", "swap", "steady_call_ms", "first_call_ms", "recompiles"},
    "padding_overhead": {"model", "padded_to", "forward_ms", "x_unpadded"},
    "end_to_end": {"run", "seconds", "recompiles", "speedup_vs_eager"},
    "plugin_overhead": {"case", "plain_ms", "watched_ms", "overhead_ms"},
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "pytest_hotswap.bench", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return done, out


def test_smoke_runs_every_measurement_and_writes_json_and_png(smoke) -> None:
    done, out = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = json.loads((out / "results.json").read_text())
    assert document["schema"] == 1
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


def test_smoke_reports_the_targets_of_the_flux_shaped_models(smoke) -> None:
    _, out = smoke
    swap = json.loads((out / "results.json").read_text())["measurements"]["swap_latency"]
    names = {target["name"] for target in swap["targets"]}
    assert names == {
        "flux-wide reference/floor",
        "flux-wide PEFT/reference",
        "flux-deep reference/floor",
        "flux-deep PEFT/reference",
    }
    for target in swap["targets"]:
        assert isinstance(target["met"], bool)
        assert target["target"] in ("<= 3", ">= 3")
    for row in swap["rows"]:
        assert row["copy_floor_ms"] > 0
        assert row["lora_layers"] > 0


def test_smoke_hotswap_does_not_recompile_and_reload_does(smoke) -> None:
    """The facts behind the stall and end-to-end numbers, with the reload as negative control."""
    _, out = smoke
    measurements = json.loads((out / "results.json").read_text())["measurements"]
    stall = {row["swap"]: row["recompiles"] for row in measurements["recompile_stall"]["rows"]}
    assert stall == {"hotswap": 0, "recompiling swap": 1}
    e2e = {row["run"]: row["recompiles"] for row in measurements["end_to_end"]["rows"]}
    assert e2e["compiled, hotswap"] == 0
    assert e2e["compiled, no swaps"] == 0
    assert e2e["compiled, recompiling swaps"] == 3  # one per swap through the 4 adapters


def test_cuda_is_refused_cleanly_without_a_gpu(monkeypatch, capsys, tmp_path) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--device cuda needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quantize", "float8-dynamic"], "compute capability >= 8.9"),
        (["--swap-rank", "256"], "--swap-rank must be between 1 and --max-rank (128)"),
        (["--repeats", "0"], "--repeats must be at least 1"),
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
    assert Target("floor", 2.9, 3.0, at_least=False).met
    assert not Target("floor", 3.1, 3.0, at_least=False).met
    assert Target("speed-up", 3.0, 3.0, at_least=True).met
    assert not Target("speed-up", 2.0, 3.0, at_least=True).met


def test_table_aligns_rows_and_names_unmet_targets() -> None:
    result = Result(
        "x",
        "A title",
        rows=[{"model": "tiny", "ms": 1.23456}, {"model": "a-longer-name", "ms": 12345.6}],
        targets=[Target("ratio", 4.0, 3.0, at_least=False)],
        seconds=1.0,
    )
    lines = format_table(result).splitlines()
    assert lines[0] == "== A title [ok, 1.0 s]"
    assert lines[1:4] == [
        "           model     ms",
        "            tiny   1.23",
        "   a-longer-name  12346",
    ]
    assert lines[4] == "   target ratio: 4 <= 3: NOT met"
