"""Command line: ``python -m pytest_hotswap.bench [--smoke] [--out DIR] [--device cuda] ...``.

Writes ``results.json`` and ``bench.png`` into ``--out`` and prints one table per measurement.
Exit status 1 when a measurement crashed (the others still run and are written), 2 for bad arguments (``--device cuda`` without a GPU
included); speed targets are reported, never turned into a failure.
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

from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.results import Result, format_table, write_json
from pytest_hotswap.options import BACKENDS, DTYPES, MODES, QUANTIZE, parse_list
from pytest_hotswap.pipelines import quiet_diffusers

#: Measurement name -> module with ``run(config, workdir) -> Result``, in running order.
MEASUREMENTS = {
    "swap_latency": "pytest_hotswap.bench.swap",
    "recompile_stall": "pytest_hotswap.bench.stall",
    "padding_overhead": "pytest_hotswap.bench.padding",
    "end_to_end": "pytest_hotswap.bench.end_to_end",
    "plugin_overhead": "pytest_hotswap.bench.overhead",
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
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bf16 on cuda")
    parser.add_argument(
        "--backends",
        type=_comma_list(BACKENDS),
        help="Compile backends for the stall and end-to-end measurements (default: all; smoke: eager)",
    )
    parser.add_argument(
        "--mode", choices=MODES, help="Inductor mode (default: max-autotune on cuda)"
    )
    parser.add_argument(
        "--quantize", choices=QUANTIZE, help="torchao config (default: float8-dynamic on cuda)"
    )
    parser.add_argument("--max-rank", type=int, default=128, help="Rank every LoRA is padded to")
    parser.add_argument("--swap-rank", type=int, default=32, help="Rank of the swapped-in LoRAs")
    parser.add_argument("--repeats", type=int, help="Timed repeats per median (default 7; smoke 3)")
    parser.add_argument(
        "--only", type=_comma_list(tuple(MEASUREMENTS)), help="Run only these measurements"
    )
    return parser


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchConfig:
    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error(
            f"--device cuda needs a CUDA GPU, but torch {torch.__version__} sees none here; "
            "run it on a GPU machine, or drop --device cuda to measure on the CPU"
        )
    quantize = args.quantize or ("float8-dynamic" if cuda else "none")
    if quantize == "float8-dynamic" and (not cuda or torch.cuda.get_device_capability() < (8, 9)):
        parser.error(
            "--quantize float8-dynamic needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper); "
            "use --quantize float8-weight-only or int8-weight-only here"
        )
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if not 1 <= args.swap_rank <= args.max_rank:
        parser.error(
            f"--swap-rank must be between 1 and --max-rank ({args.max_rank}), got {args.swap_rank}"
        )
    return BenchConfig(
        smoke=args.smoke,
        device=args.device,
        dtype=("bfloat16" if cuda else "float32") if args.dtype == "auto" else args.dtype,
        backends=args.backends or (("eager",) if args.smoke else BACKENDS),
        mode=args.mode or ("max-autotune" if cuda else "default"),
        quantize=quantize,
        max_rank=args.max_rank,
        swap_rank=args.swap_rank,
        repeats=args.repeats or (3 if args.smoke else 7),
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
    config = _config(args, parser)

    args.out.mkdir(parents=True, exist_ok=True)

    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(quiet_diffusers())
        if config.device == "cpu":
            stack.enter_context(_one_thread())
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hotswap-bench-")))
        for name in args.only or MEASUREMENTS:
            results.append(_run_one(name, config, workdir))
            print(format_table(results[-1]), flush=True)

    json_path, png_path = args.out / "results.json", args.out / "bench.png"
    write_json(json_path, config.as_dict(), results)
    from pytest_hotswap.bench.plot import plot

    plot(results, png_path, config)
    print(f"wrote {json_path} and {png_path}")
    return 1 if any(result.status == "error" for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
