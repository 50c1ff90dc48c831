"""What the plugin reads and checks when a session starts: options, catalog, pipelines, header.

Each check fails the session once, as a ``pytest.UsageError`` naming the option, the value and
what to do, instead of an error in every test. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pytest_hotswap import options as opts

if TYPE_CHECKING:
    from pytest_hotswap.adapters.catalog import Catalog
    from pytest_hotswap.plugin.session import HotswapSession


def header_lines(session: HotswapSession) -> list[str]:
    """The ``hotswap:`` lines after collection, for a session that uses the plugin (the
    versions come from package metadata: nothing is imported)."""
    if not session.uses_hotswap and session.options == opts.HotswapOptions():
        return []
    return _header_lines(session)


def _header_lines(session: HotswapSession) -> list[str]:
    from pytest_hotswap.stacks import describe_stack, verified_stack

    o = session.options
    rank = f"{o.max_rank}" + (
        f" (auto: {session.max_rank_source})" if session.max_rank_source else ""
    )
    settings = (
        f"max_rank={rank} backend={o.backend} mode={o.mode} device={o.device} dtype={o.dtype} "
        f"quantize={o.quantize} pipelines={','.join(o.pipelines)} "
        f"implementations={','.join(o.implementations)}"
    )
    flags = "".join(f" {flag}" for flag in ("strict", "fresh", "count_all") if getattr(o, flag))
    defects = [
        d
        for name in o.implementations
        if name in session.implementations
        for d in session.implementations[name].defects_for()
    ]
    verified = (
        "verified" if verified_stack(defects) else "not verified: known defects expected loosely"
    )
    lines = [f"hotswap: {describe_stack()} ({verified}) | {settings}{flags}"]
    if o.adapters is not None:
        lines.append(f"hotswap catalog: {o.adapters}")
    return lines


def check_implementations(session: HotswapSession) -> None:
    """Refuse unknown ``--hotswap-implementations`` names (hooks may add some)."""
    if session.options.implementations == opts.IMPLEMENTATIONS.default:
        return  # the built-in ones: nothing to import to know them
    try:
        session.implementations.choose(session.options.implementations)
    except ValueError as error:
        given = ",".join(session.options.implementations)
        raise pytest.UsageError(f"--hotswap-implementations={given}: {error}") from None


def read_options(config: pytest.Config) -> opts.HotswapOptions:
    """Command line beats ini beats default; each bad value is a usage error naming its source.

    ``auto`` device and dtype stay ``auto`` (resolving them imports torch), and so does an
    ``auto`` max rank (the session resolves it against the catalog it reads).
    """
    values: dict[str, object] = {}
    for option in opts.OPTIONS:
        raw = config.getoption(option.ini)
        source = option.cli
        if raw is None:
            raw = config.getini(option.ini)
            source = f"ini option {option.ini}"
            if option.path and raw:  # relative to the ini file, like pytest's own paths
                raw = str(_ini_dir(config) / str(raw))
        if raw is None or raw == "" or raw == []:
            continue
        if option.flag:
            values[option.field] = bool(raw)
            continue
        try:
            values[option.field] = option.parse(raw)
        except ValueError as error:
            raise pytest.UsageError(f"{source}={raw}: {error}") from None
    return opts.HotswapOptions(**values)  # type: ignore[arg-type]


def is_xdist_controller(config: pytest.Config) -> bool:
    """A pytest-xdist controller: its workers' records come in at the end, whatever it ran."""
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


def read_catalog(source: str | None) -> Catalog | None:
    if source is None:
        return None
    from pytest_hotswap.adapters.catalog import CatalogError, load_catalog

    try:
        return load_catalog(source)
    except CatalogError as error:
        raise pytest.UsageError(f"--hotswap-adapters={error}") from None


def check_pipelines(names: tuple[str, ...], config: pytest.Config) -> tuple[str, ...]:
    """Check the ``--hotswap-pipelines`` entries that look like paths; return the entries with
    each folder as its resolved absolute path (its identity from any working directory).

    A path must be a saved pipeline (``model_index.json``) the driver can drive: a pipeline
    class without a LoRA loader, or whose call needs an input the driver cannot make (an
    image), is one usage error here naming the class, what is missing and the build hook;
    unless a ``pytest_hotswap_build_pipeline`` hook besides pytest-hotswap's own is installed,
    which may build it (its refusal then comes when the pipeline is built). Registered names
    and names hooks build are checked when a pipeline is built (hooks may take any name).
    """
    if set(names) <= set(opts.PIPELINES.default):
        return names  # the built-in tiny pipelines: nothing to look at
    from pytest_hotswap.pipelines.saved import (
        find_saved_pipeline,
        identity_of,
        looks_like_path,
    )

    hooks = config.pluginmanager.hook.pytest_hotswap_build_pipeline.get_hookimpls()
    own_hook_only = len(hooks) <= 1
    for name in names:
        if not looks_like_path(name):
            continue
        try:
            saved = find_saved_pipeline(name)
            if own_hook_only and saved.class_name is not None:
                from pytest_hotswap.pipelines.families_driver import check_drivable

                check_drivable(saved.pipeline_class())
        except ValueError as error:  # PipelineNotFoundError, UnsupportedPipelineError
            raise pytest.UsageError(f"--hotswap-pipelines: {_named(name, error)}") from None
    return tuple(identity_of(name) for name in names)


def check_quantize(quantize: str) -> None:
    """Quantization asked for (``--hotswap-quantize``, ini ``hotswap_quantize``) needs torchao,
    an optional extra: without it, one usage error now rather than an error per test. (Not
    asked for, the conformance suite's quantized-base scenario says "not supported".)"""
    if quantize == "none":
        return
    import importlib.util

    try:
        found = importlib.util.find_spec("torchao") is not None
    except ValueError:  # a module without a spec in sys.modules
        found = False
    if not found:
        raise pytest.UsageError(
            f"{opts.QUANTIZE_OPTION.cli}={quantize} needs torchao, which is not installed: "
            "pip install 'pytest-hotswap[quant]'"
        )


def _named(name: str, error: ValueError) -> str:
    """The error, prefixed with the entry unless the message starts with it already."""
    from pytest_hotswap.pipelines.saved import PipelineNotFoundError

    return str(error) if isinstance(error, PipelineNotFoundError) else f"{name!r}: {error}"


def resolve_max_rank(
    options: opts.HotswapOptions, catalog: Catalog | None
) -> tuple[opts.HotswapOptions, str | None]:
    """``--hotswap-max-rank=auto`` becomes the catalog's largest rank; the second value names the
    file it came from."""
    if isinstance(options.max_rank, int):
        return options, None
    from pytest_hotswap.adapters.catalog import CatalogError, resolve_max_rank

    try:
        rank, source = resolve_max_rank(
            options.max_rank,
            catalog,
            flag=opts.MAX_RANK.cli,
            catalog_flag=f"{opts.ADAPTERS.cli}=DIR|GLOB",
        )
    except CatalogError as error:
        raise pytest.UsageError(str(error)) from None
    return dataclasses.replace(options, max_rank=rank), source


def _ini_dir(config: pytest.Config) -> Path:
    """The directory ini-given paths are relative to: the ini file's, else the rootdir."""
    return config.inipath.parent if config.inipath is not None else config.rootpath
