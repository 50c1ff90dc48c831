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
        # the layers "half" leaves out: disjoint from it
        "odd": make_lora(pipe, root / "odd.safetensors", rank=4, targets=lora_targets(pipe)[1::2]),
        "dora": make_lora(pipe, root / "dora.safetensors", rank=4, use_dora=True),
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


REF = "  reference (union padding): "
DIF = "  diffusers + PEFT (first file's targets): "


def test_inspect_several_ranks_and_the_max_rank(capsys, adapters):
    code, out, err = run(capsys, "inspect", adapters["r8"], adapters["r16"], "--max-rank", 16)
    assert (code, err) == (0, "")
    assert "max rank: 16 (checked against --max-rank 16)" in out
    lines = out.splitlines()
    at = lines.index(f"{adapters['r16']}:")
    assert lines[at + 1 : at + 3] == [
        REF + "ok",
        DIF + "ok, targets same layers as the first (83 of 83 layers)",
    ]

    # A rank above the max: both refuse it, listed; the inspection itself succeeded.
    code, out, err = run(capsys, "inspect", adapters["r8"], adapters["r16"], "--max-rank", 8)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    at = lines.index(f"{adapters['r16']}:")
    assert lines[at + 1 : at + 3] == [
        REF + "refused: rank 16 > max rank 8 (prepare with a larger max rank)",
        DIF + "rejected: rank 16 > max rank 8",
    ]
    assert lines[-1] == (
        "reference (union padding): 1 ok, 1 refused; "
        "diffusers + PEFT (first file's targets): 1 ok, 1 rejected"
    )


def test_inspect_subset_is_accepted_and_superset_rejected_by_diffusers(capsys, adapters):
    code, out, _ = run(capsys, "inspect", adapters["r8"], adapters["half"], adapters["three"])
    assert code == 0
    lines = out.splitlines()
    at = lines.index(f"{adapters['r8']}:")
    assert lines[at + 1 : at + 3] == [REF + "ok", DIF + "ok, loaded first"]
    at = lines.index(f"{adapters['half']}:")
    assert lines[at + 2] == DIF + "ok, targets a subset of the first (42 of 83 layers)"
    at = lines.index(f"{adapters['three']}:")
    assert lines[at + 2] == DIF + "ok, targets a subset of the first (3 of 83 layers)"

    code, out, _ = run(capsys, "inspect", adapters["half"], adapters["r8"])
    assert code == 0  # a verdict, not a failure
    lines = out.splitlines()
    at = lines.index(f"{adapters['r8']}:")
    assert lines[at + 1] == REF + "ok"  # the union padding takes it
    assert lines[at + 2].startswith(DIF + "rejected: targets 41 layers the first does not (unet.")


def test_inspect_disjoint_folder_exits_0_reference_ok_diffusers_rejected(
    capsys, adapters, tmp_path
):
    import shutil

    folder = tmp_path / "disjoint"
    folder.mkdir()
    shutil.copy(adapters["half"], folder / "a-half.safetensors")
    shutil.copy(adapters["odd"], folder / "b-odd.safetensors")
    code, out, err = run(capsys, "inspect", folder, "--max-rank", "auto")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert (
        "union of targets: 83 layers from 2 usable files (padding every layer any of them targets "
        "lets each hotswap, reference implementation)"
    ) in lines
    at = lines.index(f"{folder / 'b-odd.safetensors'}:")
    assert lines[at + 1] == REF + "ok"
    assert lines[at + 2].startswith(DIF + "rejected: targets 41 layers the first does not (unet.")
    assert lines[-1] == (
        "reference (union padding): 2 ok, 0 refused; "
        "diffusers + PEFT (first file's targets): 1 ok, 1 rejected"
    )
    # The JSON says the same and exits the same.
    code, out, err = run(capsys, "inspect", folder, "--max-rank", "auto", "--json")
    assert (code, err) == (0, "")
    half, odd = json.loads(out)["files"]
    assert (half["verdict"], half["verdict_diffusers"]) == ("ok", "ok, loaded first")
    assert odd["verdict"] == "ok"
    assert odd["verdict_diffusers"].startswith("rejected: targets 41 layers the first does not")
    assert (odd["subset_of_first"], len(odd["rejected"])) == (False, 1)

    # --check diffusers turns the disjoint file into a failure; --check reference does not.
    code, _, err = run(capsys, "inspect", folder, "--max-rank", "auto", "--check", "diffusers")
    assert code == 1
    assert err == (
        "pytest-hotswap inspect: --check diffusers: 1 of 2 files rejected by diffusers + PEFT "
        f"(first file's targets): {folder / 'b-odd.safetensors'}\n"
    )
    code, _, err = run(capsys, "inspect", folder, "--max-rank", "auto", "--check", "reference")
    assert (code, err) == (0, "")


def test_check_diffusers_passes_a_subset_catalog(capsys, adapters):
    # negative control of --check diffusers: every later file within the first's targets
    code, _, err = run(
        capsys, "inspect", adapters["r8"], adapters["half"], "--check", "diffusers", "--json"
    )
    assert (code, err) == (0, "")


@pytest.mark.parametrize("refused", ["pickle", "dora", "r16"])
def test_check_reference_fails_on_a_refused_file(capsys, adapters, tmp_path, refused):
    import shutil

    folder = tmp_path / "catalog"
    folder.mkdir()
    for name in ("r8", "half", refused):
        shutil.copy(adapters[name], folder / adapters[name].name)
    name = adapters[refused].name
    for json_flag in ((), ("--json",)):
        code, _, err = run(capsys, "inspect", folder, "--max-rank", 8, *json_flag)
        assert (code, err) == (0, "")  # listed, not a failure
        code, _, err = run(
            capsys, "inspect", folder, "--max-rank", 8, "--check", "reference", *json_flag
        )
        assert code == 1
        assert err == (
            "pytest-hotswap inspect: --check reference: 1 of 3 files refused by the reference "
            f"(union padding): {folder / name}\n"
        )
    # negative control: without the refused file
    (folder / name).unlink()
    code, _, err = run(capsys, "inspect", folder, "--max-rank", 8, "--check", "reference")
    assert (code, err) == (0, "")


def test_inspect_dora_and_text_encoder_files_are_refused_by_the_reference(capsys, adapters):
    code, out, _ = run(capsys, "inspect", adapters["r8"], adapters["dora"], adapters["te"])
    assert code == 0
    lines = out.splitlines()
    assert f"{adapters['dora']}: diffusers, DoRA, rank 4, alpha 4" in lines
    at = lines.index(f"{adapters['dora']}:")
    assert lines[at + 1 : at + 3] == [
        REF + "refused: a DoRA adapter (only plain LoRA is hotswapped)",
        DIF + "rejected: a DoRA adapter, not a plain LoRA",
    ]
    at = lines.index(f"{adapters['te']}:")
    assert lines[at + 1 : at + 3] == [
        REF + "refused: text-encoder keys (12 text-encoder layers: hotswap them with the "
        "text-encoder opt-in, or strip them)",
        DIF + "rejected: has 12 text-encoder layers, which hotswap does not support without the "
        "text-encoder opt-in",
    ]


def test_inspect_text_encoder_adapter_is_rejected(capsys, adapters):
    code, out, _ = run(capsys, "inspect", adapters["r8"], adapters["te"])
    assert code == 0
    assert "  text-encoder layers: 12" in out
    assert (
        DIF + "rejected: has 12 text-encoder layers, which hotswap does not support "
        "without the text-encoder opt-in\n" in out
    )
    code, _, _ = run(capsys, "inspect", adapters["r8"], adapters["te"], "--check", "diffusers")
    assert code == 1


def test_inspect_kohya_adapter_matches_the_diffusers_layers(capsys, adapters):
    code, out, _ = run(capsys, "inspect", adapters["r8"], adapters["kohya"], "--check", "diffusers")
    assert code == 0
    assert f"{adapters['kohya']}: kohya, rank 4, alpha 4" in out  # from its per-layer alpha scalars
    lines = out.splitlines()
    at = lines.index(f"{adapters['kohya']}:")
    assert lines[at + 1 : at + 3] == [
        REF + "ok",
        DIF + "ok, targets same layers as the first (83 of 83 layers)",
    ]


def test_inspect_broken_files_get_one_clear_line(capsys, adapters, tmp_path):
    missing = tmp_path / "missing.safetensors"
    code, out, err = run(capsys, "inspect", adapters["truncated"], adapters["pickle"], missing)
    assert code == 1  # paths named on the command line that are no adapter
    lines = out.splitlines()
    assert lines[0].startswith(f"{adapters['truncated']}: error: not a valid safetensors file (")
    assert lines[0].endswith("truncated or corrupt?")
    assert lines[1].startswith(f"{adapters['pickle']}: error: is a pickle (torch.save) file")
    assert lines[2] == f"{missing}: error: no such file"
    at = lines.index(f"{adapters['pickle']}:")
    assert lines[at + 1].startswith(REF + "refused: unreadable (is a pickle (torch.save) file")
    assert lines[at + 2] == DIF + "rejected: unreadable"
    err_lines = err.splitlines()
    assert len(err_lines) == 3
    assert err_lines[0].startswith(
        f"pytest-hotswap inspect: {adapters['truncated']}: not a valid safetensors file ("
    )
    assert err_lines[2] == f"pytest-hotswap inspect: {missing}: no such file"


def test_inspect_json(capsys, adapters):
    files = [adapters[name] for name in ("r8", "three", "half", "te", "pickle")]
    code, out, err = run(capsys, "inspect", *files, "--json", "--max-rank", 8)
    data = json.loads(out)
    assert code == 1  # the pickle was named on the command line
    assert err.startswith(f"pytest-hotswap inspect: {adapters['pickle']}: is a pickle")
    assert data["failures"] == [f"{adapters['pickle']}: {data['files'][4]['error']}"]
    assert (data["max_rank"], data["limit"], data["check"]) == (8, 8, [])
    r8, three, half, te, pickle = data["files"]
    assert (r8["format"], r8["rank"], r8["alpha"], len(r8["layers"])) == ("diffusers", 8, 16, 83)
    assert r8["subset_of_first"] is None  # the first file is what the others are swapped into
    assert (three["subset_of_first"], three["rejected"]) == (True, [])
    assert three["verdict_diffusers"] == "ok, targets a subset of the first (3 of 83 layers)"
    assert set(three["ranks"].values()) == {4}
    assert (half["subset_of_first"], len(half["layers"])) == (True, 42)
    assert len(te["text_encoder_layers"]) == 12
    assert all(name.startswith("text_encoder.") for name in te["text_encoder_layers"])
    assert te["rejected"] == [
        "has 12 text-encoder layers, which hotswap does not support without the text-encoder opt-in"
    ]
    assert te["verdict"] == (
        "refused: text-encoder keys (12 text-encoder layers: hotswap them with the text-encoder "
        "opt-in, or strip them)"
    )
    assert pickle["error"].startswith("is a pickle")
    assert pickle["rejected"] == ["unreadable"]
    assert pickle["verdict_diffusers"] == "rejected: unreadable"


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
    code, out, err = run(capsys, "inspect", path)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"{path}: peft, rank 4-8 (varies), alpha 16",
        "  layers: 2 model (to_k x1, to_q x1)",
        "  text-encoder layers: none",
        "    base_model.model.blocks.0.to_k: rank 8",
        "    base_model.model.blocks.0.to_q: rank 4",
        # one file, but refused: the verdicts say why
        "max rank: 8 (checked against --max-rank 128)",
        "union of targets: 0 layers from 0 usable files (padding every layer any of them targets "
        "lets each hotswap, reference implementation)",
        f"{path}:",
        REF + "refused: PEFT-native keys (base_model.model.) (diffusers' load_lora_weights cannot "
        "read them; write the adapter with save_lora_weights (transformer. / unet. keys))",
        DIF + "rejected: PEFT-native keys (base_model.model.), which diffusers' load_lora_weights "
        "cannot read",
        "reference (union padding): 0 ok, 1 refused; "
        "diffusers + PEFT (first file's targets): 0 ok, 1 rejected",
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
    assert code == 0
    assert f"{narrow}: diffusers, rank 4, alpha not in metadata" in out
    assert (
        f"{wide}:\n" + REF + "ok\n" + DIF + "rejected: 1 layers have other in/out shapes than in "
        "the first, so it is for another model (transformer.proj)\n"
    ) in out
    code, _, _ = run(capsys, "inspect", narrow, wide, "--check", "diffusers")
    assert code == 1
    code, _, _ = run(capsys, "inspect", narrow, narrow, "--check", "diffusers")
    assert code == 0  # negative control: the same shapes (and a file given twice counts once)


# --- the plan of a catalog folder --------------------------------------------------------------


def test_inspect_a_folder_prints_the_plan_with_union_and_padding(capsys, adapters, tmp_path):
    import shutil

    folder = tmp_path / "catalog"
    folder.mkdir()
    for name in ("r8", "half", "three", "pickle"):
        shutil.copy(adapters[name], folder / adapters[name].name)
    code, out, err = run(capsys, "inspect", folder, "--max-rank", "auto")
    assert (code, err) == (0, "")  # the pickle is refused, never loaded: a verdict, no failure
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
    at = lines.index(f"{folder / 'pickle.bin'}:")
    assert lines[at + 1].startswith(REF + "refused: unreadable (is a pickle (torch.save) file")
    assert lines[at + 2] == DIF + "rejected: unreadable"
    # r8 targets 41 layers "half" does not: upstream's rule rejects it, the union takes it.
    at = lines.index(f"{folder / 'r8.safetensors'}:")
    assert lines[at + 1] == REF + "ok"
    assert lines[at + 2].startswith(DIF + "rejected: targets 41 layers the first does not")
    assert lines[at + 3].startswith("  padding at rank 8: 1.0x its LoRA multiply-adds")
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
    assert code == 1
    assert out.splitlines()[0] == f"{path}: error: {error}"
    assert err == f"pytest-hotswap inspect: {path}: {error}\n"


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


def test_max_rank_auto_without_a_readable_lora_is_an_error_like_in_the_session(capsys, adapters):
    """``auto`` is resolved by the one function the pytest session uses: no readable LoRA file to
    take the rank from is an error (exit 2), not a silent fall back to the default 128."""
    pickle = adapters["pickle"]
    code, out, err = run(capsys, "inspect", pickle, "--max-rank", "auto")
    assert (code, out) == (2, "")
    assert err.splitlines()[-1] == (
        f"pytest-hotswap inspect: --max-rank=auto: {pickle}: no readable LoRA adapter in it"
    )
    # negative control: a readable file gives auto its rank (r8's 8), no error
    code, out, err = run(capsys, "inspect", adapters["r8"], pickle, "--max-rank", "auto")
    assert (code, "max rank: 8 (checked against --max-rank 8)" in out.splitlines()) == (1, True)


# --- unreadable paths: one clear line, never a traceback ----------------------------------------


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            PermissionError(13, "Permission denied"),
            "permission denied; make the file (and its folder) readable for this user, or copy "
            "it somewhere readable",
        ),
        (
            IsADirectoryError(21, "Is a directory"),
            "is a directory; give the .safetensors file inside it",
        ),
        (
            OSError(5, "Input/output error"),
            "cannot read it (Input/output error); check the file and its disk",
        ),
    ],
    ids=["permission", "directory", "io error"],
)
def test_an_unreadable_file_is_one_clear_line(
    capsys, adapters, tmp_path, monkeypatch, error, message
):
    import shutil

    folder = tmp_path / "catalog"
    folder.mkdir()
    locked = folder / "locked.safetensors"
    shutil.copy(adapters["r8"], locked)
    shutil.copy(adapters["half"], folder / "half.safetensors")
    real_open = Path.open

    def open_(self, *args, **kwargs):
        if self == locked:
            raise error
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    # Named on the command line: an error, exit 1.
    code, out, err = run(capsys, "inspect", locked)
    assert code == 1
    assert out.splitlines()[0] == f"{locked}: error: {message}"
    assert err == f"pytest-hotswap inspect: {locked}: {message}\n"
    # Found in a folder: a refused entry of the catalog, exit 0.
    code, out, err = run(capsys, "inspect", folder)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    at = lines.index(f"{locked}:")
    assert lines[at + 1] == REF + f"refused: unreadable ({message})"
    # The catalog reads it the same way (the --hotswap-adapters fixtures).
    from pytest_hotswap.adapters.catalog import load_catalog

    entries = {entry.name: entry for entry in load_catalog(folder).entries}
    assert entries["locked.safetensors"].error == message
    assert entries["half.safetensors"].readable  # negative control
    # negative control: the same file, readable
    monkeypatch.setattr(Path, "open", real_open)
    code, _, err = run(capsys, "inspect", locked)
    assert (code, err) == (0, "")


def test_a_directory_named_like_an_adapter(capsys, adapters, tmp_path):
    import shutil

    folder = tmp_path / "catalog"
    folder.mkdir()
    shutil.copy(adapters["r8"], folder / "r8.safetensors")
    (folder / "x.safetensors").mkdir()
    code, out, err = run(capsys, "inspect", folder)
    assert (code, err) == (0, "")  # a refused entry of the folder
    assert (
        f"{folder / 'x.safetensors'}: error: is a directory; give the .safetensors file inside it"
        in out.splitlines()
    )
    # Named on the command line, it is a folder with nothing in it: exit 1.
    code, _, err = run(capsys, "inspect", folder / "x.safetensors")
    assert code == 1
    assert err == f"pytest-hotswap inspect: {folder / 'x.safetensors'}: no files in it\n"


def test_an_unlistable_folder_is_one_clear_line(capsys, adapters, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "catalog"
    folder.mkdir()
    shutil.copy(adapters["r8"], folder / "r8.safetensors")
    code, _, err = run(capsys, "inspect", folder)
    assert (code, err) == (0, "")  # negative control
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == folder:
            raise PermissionError(13, "Permission denied")
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    code, out, err = run(capsys, "inspect", folder)
    assert code == 1
    assert out == f"{folder}: error: permission denied; make the folder readable for this user\n"
    assert err == (
        f"pytest-hotswap inspect: {folder}: permission denied; make the folder readable for "
        "this user\n"
    )


# --- stacks: malformed reports ------------------------------------------------------------------


def _stack_report(conformance: object) -> dict:
    return {"schema_version": 1, "tests": [], "conformance": conformance}


GOOD_MATRIX = {
    "stack": {"diffusers": "0.42.1"},
    "rows": [{"scenario": "same rank", "results": {"sd-diffusers": "pass"}}],
}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "a report must be a JSON object, got a JSON list"),
        (
            {"schema_version": 1, "tests": []},
            "no conformance matrix in it (run the conformance suite)",
        ),
        (_stack_report([1]), "'conformance' must be an object, got a JSON array"),
        (_stack_report("x"), "'conformance' must be an object, got a JSON string"),
        (
            _stack_report({"rows": {"a": 1}}),
            "'conformance.rows' must be a list, got a JSON object",
        ),
        (
            _stack_report({"rows": [5]}),
            "'conformance.rows[0]' must be an object, got a JSON number",
        ),
        (
            _stack_report({"rows": [{"results": {}}]}),
            "'conformance.rows[0].scenario' must be a string, got null",
        ),
        (
            _stack_report({"rows": [{"scenario": "s", "results": ["pass"]}]}),
            "'conformance.rows[0].results' must be an object mapping columns to verdict strings, "
            "got a JSON array",
        ),
        (
            _stack_report({"rows": [{"scenario": "s"}]}),
            "'conformance.rows[0].results' must be an object mapping columns to verdict strings, "
            "got null",
        ),
        (
            _stack_report({"rows": [{"scenario": "s", "results": {"sd": None}}]}),
            "'conformance.rows[0].results.sd' must be a string, got null",
        ),
        (
            _stack_report({**GOOD_MATRIX, "stack": {"torch": 2}}),
            "'conformance.stack.torch' must be a string, got a JSON number",
        ),
        (
            _stack_report({**GOOD_MATRIX, "stack": "torch 2"}),
            "'conformance.stack' must be an object mapping package names to version strings, "
            "got a JSON string",
        ),
    ],
    ids=[
        "not an object",
        "no matrix",
        "matrix a list",
        "matrix a string",
        "rows an object",
        "row a number",
        "no scenario",
        "results a list",
        "no results",
        "verdict null",
        "version a number",
        "stack a string",
    ],
)
def test_stacks_malformed_report_is_one_clear_line(capsys, tmp_path, data, message):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_stack_report(GOOD_MATRIX)))
    bad.write_text(json.dumps(data))
    code, out, err = run(capsys, "stacks", good, bad)
    assert (code, out) == (2, "")
    assert err == f"pytest-hotswap stacks: {bad}: {message}\n"


def test_stacks_good_reports_and_a_name_given_twice(capsys, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        (tmp_path / folder / "r.json").write_text(json.dumps(_stack_report(GOOD_MATRIX)))
    (tmp_path / "r2.json").write_text(json.dumps(_stack_report({"rows": []})))
    # negative control: well-formed reports, a missing stack falls back to the versions
    code, out, err = run(capsys, "stacks", tmp_path / "a" / "r.json", tmp_path / "r2.json")
    assert (code, err) == (0, "")
    assert out.splitlines()[:2] == ["r: diffusers 0.42.1", "r2: "]
    # two reports with one name would be one column: refused
    code, _, err = run(capsys, "stacks", tmp_path / "a" / "r.json", tmp_path / "b" / "r.json")
    assert code == 2
    assert err == (
        f"pytest-hotswap stacks: {tmp_path / 'b' / 'r.json'}: a second report named 'r'; "
        "stacks are named by file name, so give each report its own\n"
    )
