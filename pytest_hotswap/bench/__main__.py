"""Command line: ``python -m pytest_hotswap.bench [--smoke] [--out DIR] [--device cuda] ...``.

Writes ``results.json`` and ``bench.png`` into ``--out`` and prints one table per measurement.
Exit status 1 when a measurement crashed (the others still run and are written), 2 for bad
arguments (``--device cuda`` without a GPU included); goals are reported, never turned into a
failure. ``--gpu-check`` runs the prepared GPU check instead (``pytest_hotswap.bench.gpu_check``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

from pytest_hotswap.bench import config as defaults
from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.results import Result, format_table, write_json
from pytest_hotswap.options import (
    BACKENDS,
    DEVICE,
    DEVICES,
    DTYPE,
    DTYPES,
    MAX_RANK,
    MODES,
    QUANTIZE,
    parse_list,
    resolve_device,
    resolve_dtype,
)
from pytest_hotswap.pipelines import quiet_diffusers

#: Measurement name -> module with ``run(config, workdir) -> Result``, in running order.
MEASUREMENTS = {
    "swap_latency": "pytest_hotswap.bench.swap",
    "recompile_stall": "pytest_hotswap.bench.stall",
    "padding_overhead": "pytest_hotswap.bench.padding",
    "end_to_end": "pytest_hotswap.bench.end_to_end",
    "plugin_overhead": "pytest_hotswap.bench.overhead",
    "installed_plugin": "pytest_hotswap.bench.installed",
    "slots": "pytest_hotswap.bench.slots",
    "verdict_cost": "pytest_hotswap.bench.verdict",
    "conformance_split": "pytest_hotswap.bench.split",
    "scaling": "pytest_hotswap.bench.scaling",
}


def _comma_list(choices: Sequence[str]):
    def parse(value: str) -> tuple[str, ...]:
        try:
            return parse_list(value, choices)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_hotswap.bench",
        description="Measure LoRA hotswap against recompiling swaps, and pytest-hotswap's overhead",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="Output directory")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes and eager only: seconds")
    parser.add_argument(
        "--device", choices=DEVICES, default="cpu", help=f"{DEVICE.help}. Default: %(default)s"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default=DTYPE.default, help=f"{DTYPE.help}. Default: %(default)s"
    )
    parser.add_argument(
        "--backends",
        type=_comma_list(BACKENDS),
        help="Compile backends for the stall and end-to-end measurements (default: all; smoke: eager)",
    )
    parser.add_argument(
        "--mode", choices=MODES, help="Inductor mode (default: max-autotune-no-cudagraphs on cuda)"
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE,
        help="torchao config (default: float8-dynamic on cuda of compute capability >= 8.9)",
    )
    parser.add_argument(
        "--max-rank",
        type=int,
        default=MAX_RANK.default,
        help="Rank every LoRA is padded to. Default: %(default)s",
    )
    parser.add_argument(
        "--swap-rank",
        type=int,
        default=32,
        help="Rank of the swapped-in LoRAs. Default: %(default)s",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"Timed calls per median of a swap, copy or forward (default {defaults.REPEATS}; "
        f"smoke {defaults.SMOKE_REPEATS})",
    )
    parser.add_argument(
        "--samples",
        type=int,
        help=f"Samples of reloads, stalls, end-to-end sequences and pytest processes (default "
        f"{defaults.SAMPLES}; smoke {defaults.SMOKE_SAMPLES})",
    )
    parser.add_argument(
        "--only", type=_comma_list(tuple(MEASUREMENTS)), help="Run only these measurements"
    )
    parser.add_argument(
        "--gpu-check",
        action="store_true",
        help="Run the prepared check on one CUDA GPU (GPU bench + conformance suite) into --out; "
        "fails (exit 2) without a GPU",
    )
    return parser


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchConfig:
    import torch

    device = resolve_device(args.device)
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error(
            f"--device cuda needs a CUDA GPU, but torch {torch.__version__} sees none here; "
            "run it on a GPU machine, or drop --device cuda to measure on the CPU"
        )
    float8 = cuda and torch.cuda.get_device_capability() >= (8, 9)
    quantize = args.quantize or ("float8-dynamic" if float8 else "none")
    if quantize == "float8-dynamic" and not float8:
        parser.error(
            "--quantize float8-dynamic needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper); "
            "use --quantize float8-weight-only or int8-weight-only here"
        )
    for name in ("repeats", "samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    if not 1 <= args.swap_rank <= args.max_rank:
        parser.error(
            f"--swap-rank must be between 1 and --max-rank ({args.max_rank}), got {args.swap_rank}"
        )
    smoke = args.smoke
    return BenchConfig(
        smoke=smoke,
        device=device,
        dtype=resolve_dtype(args.dtype, device),
        backends=args.backends or (("eager",) if smoke else BACKENDS),
        mode=args.mode or ("max-autotune-no-cudagraphs" if cuda else "default"),
        quantize=quantize,
        max_rank=args.max_rank,
        swap_rank=args.swap_rank,
        repeats=args.repeats or (defaults.SMOKE_REPEATS if smoke else defaults.REPEATS),
        samples=args.samples or (defaults.SMOKE_SAMPLES if smoke else defaults.SAMPLES),
    )


def _run_one(name: str, config: BenchConfig, workdir: Path) -> Result:
    start = time.perf_counter()
    try:
        result = importlib.import_module(MEASUREMENTS[name]).run(config, workdir)
    except Exception as error:
        traceback.print_exc()
        result = Result(name, name.replace("_", " "), status="error", note=repr(error))
    result.seconds = time.perf_counter() - start
    return result


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread, as in the anchor measurements; the caller's setting is put back."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.gpu_check:
        from pytest_hotswap.bench import gpu_check

        given = [
            f"--{name.replace('_', '-')}"
            for name, value in vars(args).items()
            if name not in ("out", "gpu_check") and value != parser.get_default(name)
        ]
        if given:
            parser.error(
                f"--gpu-check runs its own prepared steps and takes only --out; drop "
                f"{', '.join(given)}"
            )

        return gpu_check.run(args.out)
    config = _config(args, parser)

    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / "results.json", args.out / "bench.png"

    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(quiet_diffusers())
        if config.device == "cpu":
            stack.enter_context(_one_thread())
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hotswap-bench-")))
        for name in args.only or MEASUREMENTS:
            results.append(_run_one(name, config, workdir))
            print(format_table(results[-1]), flush=True)
            write_json(json_path, config.as_dict(), results)  # a run stopped later keeps these

    from pytest_hotswap.bench.plot import plot

    plot(results, png_path, config)
    print(f"wrote {json_path} and {png_path}")
    return 1 if any(result.status == "error" for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
