"""Issue 12 part 4: the union of targets. ``prepare_for_hotswap(model, max_rank, targets=[...])``
pads a LoRA onto every layer any of the named modules or adapters targets, so adapters for
disjoint layers hotswap with zero recompiles and the outputs of a fresh eager load."""

from __future__ import annotations

import pytest
import torch
from reference_support import (
    ARCHS,
    Arch,
    model_checksum,
    parameter_identity,
    tensor_layout,
)

from pytest_hotswap.adapters import lora_targets, make_lora
from pytest_hotswap.reference import (
    HotswapError,
    RankTooLargeError,
    TextEncoderLoraError,
    UnexpectedTargetsError,
    hotswap,
    prepare_for_hotswap,
)
from pytest_hotswap.watch import CompileWatcher

# Its module fixtures are built once, on one worker.
pytestmark = [
    pytest.mark.usefixtures("reference_compile_environment"),
    pytest.mark.xdist_group("reference_targets"),
]

MAX_RANK = 8


def _disjoint(arch: Arch, directory) -> tuple[list[str], list[str], dict[str, object]]:
    """Two disjoint halves of the model's layers and adapters for each, plus one for both."""
    model = arch.build()
    names = lora_targets(model)
    first, second = names[::2], names[1::2]
    files = {
        "A": make_lora(model, directory / "a.safetensors", rank=4, alpha=8, targets=first, seed=1),
        "B": make_lora(model, directory / "b.safetensors", rank=8, alpha=2, targets=second, seed=2),
        "B low": make_lora(
            model, directory / "b2.safetensors", rank=2, alpha=3, targets=second[:3], seed=3
        ),
        "both": make_lora(
            model,
            directory / "ab.safetensors",
            rank=6,
            alpha=6,
            targets=[first[0], second[0], second[-1]],
            seed=4,
        ),
    }
    return first, second, files


@pytest.mark.parametrize("arch", list(ARCHS.values()), ids=list(ARCHS))
def test_disjoint_adapters_swap_through_the_union(arch: Arch, tmp_path) -> None:
    _, _, files = _disjoint(arch, tmp_path)
    model = arch.with_lora(files["A"])
    before = arch.run(model)
    index = prepare_for_hotswap(model, MAX_RANK, targets=[files["B"]])
    torch.testing.assert_close(arch.run(model), before, rtol=0, atol=0)  # the zeros add nothing
    assert len(index.slots) == len(lora_targets(model))  # A's half and B's half
    identity = parameter_identity(model)
    compiled = torch.compile(model, backend="eager")

    with CompileWatcher() as watch:
        with watch.warmup(arch.name):
            first = arch.run(compiled)
        for label in ("B", "B low", "both", "A"):
            watch.step(label)
            hotswap(compiled, files[label])
            torch.testing.assert_close(
                arch.run(compiled),
                arch.run(arch.with_lora(files[label])),
                msg=lambda m, label=label: f"{label}: {m}",
            )
    watch.assert_no_recompile()
    assert watch.recompiles == 0
    assert parameter_identity(model) == identity
    hotswap(compiled, files["A"])
    assert torch.equal(arch.run(compiled), first)


def test_targets_by_module_name_and_by_state_dict(tmp_path) -> None:
    import safetensors.torch

    arch = ARCHS["flux"]
    first, second, files = _disjoint(arch, tmp_path)
    model = arch.with_lora(files["A"])
    state = safetensors.torch.load_file(files["both"])
    index = prepare_for_hotswap(model, MAX_RANK, targets=[second[0], second[-1], state])
    assert index.layer_names == {*first, second[0], second[-1]}
    # Preparing again with targets already covered is a no-op; new ones need a fresh load.
    assert prepare_for_hotswap(model, MAX_RANK, targets=[second[0]]) is index
    with pytest.raises(HotswapError, match="already prepared with max_rank=8"):
        prepare_for_hotswap(model, MAX_RANK, targets=[second[1]])
    compiled = torch.compile(model, backend="eager")
    with CompileWatcher() as watch:
        with watch.warmup("flux"):
            arch.run(compiled)
        hotswap(compiled, state)
        torch.testing.assert_close(arch.run(compiled), arch.run(arch.with_lora(files["both"])))
        with pytest.raises(UnexpectedTargetsError, match=r"prepare with targets=\[\.\.\.\]"):
            hotswap(compiled, files["B"])  # second[1:-1] are outside the union
    watch.assert_no_recompile()


@pytest.mark.parametrize(
    ("targets", "error", "match"),
    [
        (["transformer_blocks.0.attn.to_qq"], UnexpectedTargetsError, r"did you mean .*to_q"),
        (["no.such.layer"], UnexpectedTargetsError, r"valid names \(\d+\): context_embedder, "),
        (["norm_out"], UnexpectedTargetsError, "not a Linear or Conv2d module"),
        (
            ["text_encoder.encoder.layers.0.self_attn.q_proj"],
            TextEncoderLoraError,
            "only valid with",
        ),
        ("x_embedder", HotswapError, "got a single str; wrap it in a list"),
        ([3], HotswapError, "each target is a module name"),
        (7, HotswapError, "targets must be an iterable"),
    ],
)
def test_bad_targets_are_refused_before_anything_changes(tmp_path, targets, error, match) -> None:
    arch = ARCHS["flux"]
    _, _, files = _disjoint(arch, tmp_path)
    model = arch.with_lora(files["A"])
    checksum, layout = model_checksum(model), tensor_layout(model)
    with pytest.raises(error, match=match):
        prepare_for_hotswap(model, MAX_RANK, targets=targets)
    assert model_checksum(model) == checksum and tensor_layout(model) == layout


def test_target_adapters_are_read_and_checked_like_swaps(tmp_path) -> None:
    arch = ARCHS["flux"]
    _, second, files = _disjoint(arch, tmp_path)
    model = arch.with_lora(files["A"])
    checksum = model_checksum(model)
    high = make_lora(arch.build(), tmp_path / "r16.safetensors", rank=16, targets=second)
    with pytest.raises(RankTooLargeError, match=r"targets: adapter .* has rank 16 at .*max_rank=8"):
        prepare_for_hotswap(model, MAX_RANK, targets=[high])
    text_encoder = make_lora("flux", tmp_path / "te.safetensors", rank=4, text_encoder=True)
    with pytest.raises(TextEncoderLoraError, match="only valid with text_encoder=True"):
        prepare_for_hotswap(model, MAX_RANK, targets=[text_encoder])
    with pytest.raises(HotswapError, match=r"cannot be read: .*no such file"):
        prepare_for_hotswap(model, MAX_RANK, targets=[tmp_path / "missing.safetensors"])
    assert model_checksum(model) == checksum
