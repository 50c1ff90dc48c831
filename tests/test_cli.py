"""The ``pytest-hotswap`` command: ``compare`` on committed reports, ``inspect`` on factory adapters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from pytest_hotswap.cli import main

# Its module fixtures are built once, on one worker.
pytestmark = pytest.mark.xdist_group("cli")

DATA = Path(__file__).parent / "data"
BASELINE = str(DATA / "report_baseline.json")
REGRESSED = str(DATA / "report_regressed.json")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Factory adapters for the tiny SD pipeline, plus a truncated and a pickle file."""
    import torch

    from pytest_hotswap.adapters import lora_targets, make_lora
    from pytest_hotswap.pipelines import build_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("adapters")
    pipe = build_tiny_sd_pipeline()
    files = {
        "r8": make_lora(pipe, root / "r8.safetensors", rank=8, alpha=16),
        "r16": make_lora(pipe, root / "r16.safetensors", rank=16),
        "half": make_lora(pipe, root / "half.safetensors", rank=4, targets="half"),
        "three": make_lora(
            pipe, root / "three.safetensors", rank=4, targets=lora_targets(pipe)[:3]
        ),
        "te": make_lora(pipe, root / "te.safetensors", rank=4, text_encoder=True),
        "kohya": make_lora(pipe, root / "kohya.safetensors", rank=4, fmt="kohya"),
    }
    data = files["r8"].read_bytes()
    files["truncated"] = root / "truncated.safetensors"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["pickle"] = root / "pickle.bin"
    torch.save({"unet.conv_in.lora_A.weight": torch.ones(4, 4)}, files["pickle"])
    return files


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- compare -------------------------------------------------------------------------------------


def test_compare_equal_reports_passes(capsys):
    code, out, _ = run(capsys, "compare", BASELINE, BASELINE, "--fail-on", "recompiles:0")
    assert code == 0
    assert out.splitlines() == [
        "compared 3 tests with the baseline on recompiles:0",
        "no regressions",
    ]


def test_compare_regression_exits_1_with_the_table(capsys):
    code, out, _ = run(capsys, "compare", BASELINE, REGRESSED, "--fail-on", "compile_s:+50%")
    assert code == 1
    lines = out.splitlines()
    assert lines[1] == "1 regressions:"
    assert lines[3].split() == [
        "tests/test_lora.py::test_swap",
        "compile_s",
        "2.00",
        "3.50",
        "compile_s:+50%",
    ]
    assert "new since the baseline (not compared): tests/test_lora.py::test_added" in lines
    assert "gone since the baseline: tests/test_lora.py::test_removed" in lines


def test_compare_default_thresholds_fail_on_more_recompiles(capsys):
    code, out, _ = run(capsys, "compare", BASELINE, REGRESSED)
    assert code == 1
    assert "recompiles:+0%,graph_breaks:+0%" in out.splitlines()[0]
    assert "2 regressions:" in out


def test_compare_unreadable_report_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    code, out, err = run(capsys, "compare", BASELINE, bad)
    assert code == 2
    assert out == ""
    assert err.startswith(f"pytest-hotswap compare: {bad}: not JSON")


def test_compare_bad_fail_on_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["compare", BASELINE, BASELINE, "--fail-on", "speed:0"])
    assert info.value.code == 2
    assert "bad threshold 'speed:0'" in capsys.readouterr().err


# --- inspect -------------------------------------------------------------------------------------


def test_inspect_one_diffusers_adapter(capsys, adapters):
    code, out, _ = run(capsys, "inspect", adapters["r8"])
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{adapters['r8']}: diffusers, rank 8, alpha 16"
    assert lines[1].startswith("  layers: 83 unet (conv_in x1, conv_out x1,")
    assert "to_q x8" in lines[1]
    assert lines[2] == "  text-encoder layers: none"
    assert len(lines) == 3  # one file, nothing to judge


def test_inspect_several_ranks_and_the_max_rank(capsys, adapters):
    code, out, _ = run(capsys, "inspect", adapters["r8"], adapters["r16"], "--max-rank", 16)
    assert code == 0
    assert "max rank: 16 (checked against --max-rank 16)" in out
    assert f"{adapters['r16']}: ok, targets same layers as the first (83 of 83 layers)" in out

    code, out, _ = run(capsys, "inspect", adapters["r8"], adapters["r16"], "--max-rank", 8)
    assert code == 1
    assert f"{adapters['r16']}: REJECTED: rank 16 > max rank 8" in out


def test_inspect_subset_is_accepted_and_superset_rejected(capsys, adapters):
    code, out, _ = run(capsys, "inspect", adapters["r8"], adapters["half"], adapters["three"])
    assert code == 0
    assert f"{adapters['half']}: ok, targets a subset of the first (42 of 83 layers)" in out
    assert f"{adapters['three']}: ok, targets a subset of the first (3 of 83 layers)" in out

    code, out, _ = run(capsys, "inspect", adapters["half"], adapters["r8"])
    assert code == 1
    assert f"{adapters['r8']}: REJECTED: targets 41 layers the first does not (unet." in out


def test_inspect_text_encoder_adapter_is_rejected(capsys, adapters):
    code, out, _ = run(capsys, "inspect", adapters["r8"], adapters["te"])
    assert code == 1
    assert "  text-encoder layers: 12" in out
    assert (
        f"{adapters['te']}: REJECTED: has 12 text-encoder layers, which hotswap does not support "
        "without the text-encoder opt-in" in out
    )


def test_inspect_kohya_adapter_matches_the_diffusers_layers(capsys, adapters):
    code, out, _ = run(capsys, "inspect", adapters["r8"], adapters["kohya"])
    assert code == 0
    assert f"{adapters['kohya']}: kohya, rank 4, alpha 4" in out  # from its per-layer alpha scalars
    assert f"{adapters['kohya']}: ok, targets same layers as the first (83 of 83 layers)" in out


def test_inspect_broken_files_get_one_clear_line(capsys, adapters, tmp_path):
    missing = tmp_path / "missing.safetensors"
    code, out, err = run(capsys, "inspect", adapters["truncated"], adapters["pickle"], missing)
    assert code == 1
    assert err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"{adapters['truncated']}: error: not a valid safetensors file (")
    assert lines[0].endswith("truncated or corrupt?")
    assert lines[1].startswith(f"{adapters['pickle']}: error: is a pickle (torch.save) file")
    assert lines[2] == f"{missing}: error: no such file"
    assert f"{adapters['pickle']}: REJECTED: unreadable" in lines


def test_inspect_json(capsys, adapters):
    files = [adapters[name] for name in ("r8", "three", "half", "te", "pickle")]
    code, out, _ = run(capsys, "inspect", *files, "--json", "--max-rank", 8)
    data = json.loads(out)
    assert code == 1
    assert (data["max_rank"], data["limit"]) == (8, 8)
    r8, three, half, te, pickle = data["files"]
    assert (r8["format"], r8["rank"], r8["alpha"], len(r8["layers"])) == ("diffusers", 8, 16, 83)
    assert r8["subset_of_first"] is None  # the first file is what the others are swapped into
    assert (three["subset_of_first"], three["rejected"]) == (True, [])
    assert set(three["ranks"].values()) == {4}
    assert (half["subset_of_first"], len(half["layers"])) == (True, 42)
    assert len(te["text_encoder_layers"]) == 12
    assert all(name.startswith("text_encoder.") for name in te["text_encoder_layers"])
    assert te["rejected"] == [
        "has 12 text-encoder layers, which hotswap does not support without the text-encoder opt-in"
    ]
    assert pickle["error"].startswith("is a pickle")
    assert pickle["rejected"] == ["unreadable"]


def test_inspect_reads_headers_only_and_never_imports_torch(adapters):
    code = (
        "import sys; from pytest_hotswap.cli import main; "
        f"rc = main(['inspect', {str(adapters['r8'])!r}, {str(adapters['pickle'])!r}]); "
        "assert 'torch' not in sys.modules, 'inspect imported torch'; sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_console_script_help_lists_the_commands():
    script = Path(sys.executable).parent / "pytest-hotswap"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    assert "compare" in result.stdout
    assert "inspect" in result.stdout


def test_inspect_peft_keys_with_ranks_varying_per_layer(capsys, tmp_path):
    path = tmp_path / "peft.safetensors"
    tensors = {
        "base_model.model.blocks.0.to_q.lora_A.weight": np.zeros((4, 32), np.float32),
        "base_model.model.blocks.0.to_q.lora_B.weight": np.zeros((32, 4), np.float32),
        "base_model.model.blocks.0.to_k.lora_A.weight": np.zeros((8, 32), np.float32),
        "base_model.model.blocks.0.to_k.lora_B.weight": np.zeros((32, 8), np.float32),
    }
    config = {"lora_alpha": 16, "r": 8}
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(config)})
    code, out, _ = run(capsys, "inspect", path)
    assert code == 0
    assert out.splitlines() == [
        f"{path}: peft, rank 4-8 (varies), alpha 16",
        "  layers: 2 model (to_k x1, to_q x1)",
        "  text-encoder layers: none",
        "    base_model.model.blocks.0.to_k: rank 8",
        "    base_model.model.blocks.0.to_q: rank 4",
    ]


def test_inspect_reads_per_layer_alphas_from_the_alpha_pattern(capsys, tmp_path):
    path = tmp_path / "pattern.safetensors"
    tensors = {
        f"transformer.blocks.{i}.to_{p}.lora_{ab}.weight": np.zeros(
            (4, 32) if ab == "A" else (32, 4), np.float32
        )
        for i in (0, 1)
        for p in "qk"
        for ab in "AB"
    }
    config = {
        "transformer.lora_alpha": 8,
        "transformer.r": 4,
        "transformer.alpha_pattern": {"blocks.1.to_q": 2, "to_k": 4},
    }
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(config)})
    code, out, _ = run(capsys, "inspect", path, "--json")
    assert code == 0, out
    (entry,) = json.loads(out)["files"]
    assert entry["alpha"] == {
        "transformer.blocks.0.to_q": 8.0,
        "transformer.blocks.0.to_k": 4.0,
        "transformer.blocks.1.to_q": 2.0,
        "transformer.blocks.1.to_k": 4.0,
    }


def test_inspect_rejects_an_adapter_for_another_model(capsys, tmp_path):
    def write(name: str, width: int) -> Path:
        path = tmp_path / name
        tensors = {
            "transformer.proj.lora_A.weight": np.zeros((4, width), np.float32),
            "transformer.proj.lora_B.weight": np.zeros((width, 4), np.float32),
        }
        save_file(tensors, str(path))
        return path

    narrow, wide = write("narrow.safetensors", 32), write("wide.safetensors", 64)
    code, out, _ = run(capsys, "inspect", narrow, wide)
    assert code == 1
    assert f"{narrow}: diffusers, rank 4, alpha not in metadata" in out
    assert (
        f"{wide}: REJECTED: 1 layers have other in/out shapes than in the first, so it is for "
        "another model (transformer.proj)"
    ) in out


# --- the plan of a catalog folder --------------------------------------------------------------


def test_inspect_a_folder_prints_the_plan_with_union_and_padding(capsys, adapters, tmp_path):
    import shutil

    folder = tmp_path / "catalog"
    folder.mkdir()
    for name in ("r8", "half", "three", "pickle"):
        shutil.copy(adapters[name], folder / adapters[name].name)
    code, out, _ = run(capsys, "inspect", folder, "--max-rank", "auto")
    assert code == 1  # the pickle is refused, never loaded
    lines = out.splitlines()
    # Files in name order: half (rank 4, 42 layers), pickle.bin, r8 (rank 8, 83), three (rank 4, 3).
    assert "max rank: 8 (checked against --max-rank 8)" in lines
    assert (
        f"{folder / 'half.safetensors'}: loaded first; later files are hotswapped into it" in lines
    )
    assert (
        "union of targets: 83 layers from 3 usable files (padding every layer any of them targets lets each hotswap, reference implementation)"
        in lines
    )
    assert f"{folder / 'pickle.bin'}: REJECTED: unreadable" in lines
    # r8 targets 41 layers "half" does not: upstream's rule rejects it, the union takes it.
    assert any(
        line.startswith(f"{folder / 'r8.safetensors'}: REJECTED: targets 41 layers")
        for line in lines
    )
    # Padding a rank-4 adapter on 42 of 83 layers to rank 8: twice its own multiply-adds.
    padding = lines[
        lines.index(
            f"{folder / 'half.safetensors'}: loaded first; later files are hotswapped into it"
        )
        + 1 :
    ]
    assert any(
        line.startswith("  padding at rank 8: 2.0x its LoRA multiply-adds")
        and line.endswith("41 union layers it leaves zero")
        for line in padding
    )


def test_inspect_json_plan_of_a_folder(capsys, adapters, tmp_path):
    import shutil

    folder = tmp_path / "catalog"
    folder.mkdir()
    for name in ("r8", "r16"):
        shutil.copy(adapters[name], folder / adapters[name].name)
    code, out, _ = run(capsys, "inspect", folder, "--json", "--max-rank", "auto")
    plan = json.loads(out)
    assert code == 0
    assert plan["max_rank_file"] == str(folder / "r16.safetensors")
    assert (plan["max_rank"], plan["limit"], len(plan["union_targets"])) == (16, 16, 83)
    r16, r8 = plan["files"]
    assert (r16["verdict"], r8["verdict"]) == ("ok", "ok")
    assert r8["padding"]["macs_x"] == 2.0 and r16["padding"]["macs_x"] == 1.0


def test_inspect_refuses_a_fifo_without_blocking(capsys, tmp_path):
    import os

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    code, out, _ = run(capsys, "inspect", fifo)
    assert code == 1
    assert out.splitlines()[0] == (
        f"{fifo}: error: not a regular file (a FIFO, socket or device); adapters are read from "
        "regular .safetensors files only"
    )


@pytest.mark.parametrize(
    ("tensors", "metadata", "error"),
    [
        (
            {
                "t.x.lora_A.weight": np.zeros((), np.float32),
                "t.x.lora_B.weight": np.zeros((4, 4), np.float32),
            },
            None,
            "t.x.lora_A.weight has shape (); LoRA weights have 2 dimensions (Linear) or 4 "
            "(Conv2d): the file is corrupt or not a LoRA adapter",
        ),
        (
            {"t.x.lora_A.weight": np.zeros((4, 4), np.float32)},
            {"lora_adapter_metadata": "[1, 2]"},
            "its lora_adapter_metadata is a JSON list, not an object of LoraConfig fields; write "
            "the adapter again with diffusers or PEFT",
        ),
        (
            {"t.x.lora_A.weight": np.zeros((4, 4), np.float32)},
            {"lora_adapter_metadata": '"text"'},
            "its lora_adapter_metadata is a JSON str, not an object of LoraConfig fields; write "
            "the adapter again with diffusers or PEFT",
        ),
        (
            {"t.x.lora_A.weight": np.zeros((4, 4), np.float32)},
            {"lora_adapter_metadata": '{"lora_alpha": "x"}'},
            "lora_alpha in its lora_adapter_metadata is 'x', not a number",
        ),
        (
            {
                "lora_unet_x.lora_down.weight": np.zeros((4, 4), np.float32),
                "lora_unet_x.alpha": np.zeros(3, np.float32),
            },
            None,
            "lora_unet_x.alpha holds 3 values; a kohya alpha is one number per layer",
        ),
    ],
    ids=[
        "0-dim lora_A",
        "metadata list",
        "metadata string",
        "alpha not a number",
        "kohya alpha of 3",
    ],
)
def test_inspect_malformed_headers_get_one_clear_line(capsys, tmp_path, tensors, metadata, error):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    code, out, err = run(capsys, "inspect", path)
    assert code == 1 and err == ""
    assert out.splitlines()[0] == f"{path}: error: {error}"


def test_usage_errors_put_the_error_first(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "x.safetensors", "--max-rank", "0"])
    assert info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert (
        err[0]
        == "pytest-hotswap inspect: error: argument --max-rank: expected an integer >= 1 or 'auto', got 0"
    )
    assert err[1].startswith("usage: pytest-hotswap inspect")
