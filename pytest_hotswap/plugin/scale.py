"""``--hotswap-devices`` and ``--hotswap-compile-cache`` (pytest glue; the logic is in
``pytest_hotswap.scale``).

Runs first in ``pytest_configure``: on a pytest-xdist worker it pins ``CUDA_VISIBLE_DEVICES`` to
the worker's GPU before anything can start CUDA, and in every process it points torch's compile
caches at the option's directory or Redis before torch reads them. The controller decides the GPU
plan once (``nvidia-smi``, never CUDA) and hands it to the workers in ``workerinput``; the
workers hand their cache counters back in ``workeroutput``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_hotswap import options as opts
from pytest_hotswap import scale
from pytest_hotswap.plugin.start import is_xdist_controller, read_options

WORKERINPUT_KEY = "pytest_hotswap_devices"
WORKEROUTPUT_KEY = "pytest_hotswap_cache_counters"


class Scale:
    """The devices and the compile cache of one pytest process (``config.stash[SCALE_KEY]``)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.options = read_options(config)
        self._label: str | None = None
        self.worker_id: str | None = getattr(config, "workerinput", {}).get("workerid")
        self.plan: tuple[scale.Device, ...] = ()
        self.device: scale.Device | None = None  # the GPU this process is pinned to
        self.restore: dict[str, str | None] = {}
        self.counters: dict[str, int] = {}
        self.start = scale.cache_counters()

    # -- devices ---------------------------------------------------------------------------------

    def pin(self) -> None:
        explicit = self.options.devices != opts.AUTO
        if self.worker_id is not None:
            entries = self.config.workerinput.get(WORKERINPUT_KEY, [])  # type: ignore[attr-defined]
            self.plan = tuple(scale.Device(label, entry) for label, entry in entries)
        elif explicit or is_xdist_controller(self.config):
            self.plan = self._plan()
        # Without xdist, auto changes nothing: its first GPU is already cuda:0.
        if self.worker_id is None and (not explicit or is_xdist_controller(self.config)):
            return
        device = scale.device_for_worker(self.plan, self.worker_id)
        if device is None:
            return
        if scale.cuda_initialized() and os.environ.get(scale.CUDA_VISIBLE) != device.entry:
            raise pytest.UsageError(
                f"{opts.DEVICE_LIST.cli}: CUDA was started before pytest-hotswap could pin this "
                f"process to {device.label} (a conftest or plugin used CUDA at import): move that "
                "into a fixture"
            )
        self.device = device
        self._set(scale.CUDA_VISIBLE, device.entry)

    def _plan(self) -> tuple[scale.Device, ...]:
        spec = self.options.devices
        if self.options.device == "cpu":
            if spec != opts.AUTO:
                raise pytest.UsageError(
                    f"{opts.DEVICE_LIST.cli}={_show(spec)} asks for GPUs but "
                    f"{opts.DEVICE.cli}=cpu: drop one of them"
                )
            return ()
        try:
            return scale.plan_devices(
                spec, scale.visible_gpus(), allowed=os.environ.get(scale.CUDA_VISIBLE)
            )
        except scale.ScaleError as error:
            raise pytest.UsageError(f"{opts.DEVICE_LIST.cli}={_show(spec)}: {error}") from None

    # -- compile cache ---------------------------------------------------------------------------

    def point_caches(self) -> None:
        location = self.options.compile_cache
        if location is None:
            return
        from_ini = self.config.getoption(opts.COMPILE_CACHE.ini) is None
        base = _ini_dir(self.config) if from_ini else self.config.invocation_params.dir
        if scale.is_redis(location) and self.worker_id is None:
            try:
                scale.check_redis(location)
            except scale.ScaleError as error:
                raise pytest.UsageError(f"{opts.COMPILE_CACHE.cli}={location}: {error}") from None
        for name, value in scale.cache_env(location, base).items():
            self._set(name, value)
        if scale.is_redis(location):
            scale.switch_loaded_configs()

    def session_counters(self) -> dict[str, int]:
        """This process's counters since configure, plus the workers'."""
        now = scale.cache_counters()
        own = {name: now[name] - self.start.get(name, 0) for name in now}
        return {name: own[name] + self.counters.get(name, 0) for name in own}

    def shows_counters(self) -> bool:
        return self.options.compile_cache is not None or scale.any_cache_activity(
            self.session_counters()
        )

    # -- hooks (this object is registered as the plugin ``hotswap-scale-state``) ------------------

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: object, error: object) -> None:
        output = getattr(node, "workeroutput", {})
        for name, value in output.get(WORKEROUTPUT_KEY, {}).items():
            self.counters[name] = self.counters.get(name, 0) + int(value)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.worker_id is not None:
            session.config.workeroutput[WORKEROUTPUT_KEY] = self.session_counters()  # type: ignore[attr-defined]

    def pytest_hotswap_report(self, report: dict[str, object]) -> None:
        if self.shows_counters():
            report["compile_cache"] = {
                "location": self.options.compile_cache or "",
                **self.session_counters(),
            }

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.worker_id is None and self.shows_counters():
            where = self.options.compile_cache or os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
            terminalreporter.write_sep("-", f"hotswap compile cache {where}".rstrip())
            terminalreporter.write_line(scale.describe_counters(self.session_counters()))

    def _set(self, name: str, value: str | None) -> None:
        self.restore.setdefault(name, os.environ.get(name))
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    def close(self) -> None:
        for name, value in self.restore.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self.restore.clear()


SCALE_KEY = pytest.StashKey[Scale]()


def device_label(config: pytest.Config) -> str:
    """The device this process's tests ran on, as records and JUnit properties give it."""
    state = config.stash.get(SCALE_KEY, None)
    if state is None:
        return ""
    if state._label is None:
        # --hotswap-device decides cpu or cuda (auto: whether torch sees CUDA, resolved once).
        device = state.options.device
        if device == opts.AUTO:
            device = opts.resolve_device(device)
        on_gpu = device != scale.CPU
        state._label = (state.device.label if state.device else "cuda:0") if on_gpu else scale.CPU
    return state._label


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    state = Scale(config)
    try:
        state.pin()
        state.point_caches()
    except BaseException:
        state.close()
        raise
    config.stash[SCALE_KEY] = state
    config.pluginmanager.register(state, "hotswap-scale-state")


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(SCALE_KEY, None)
    if state is not None:
        state.close()
        if config.pluginmanager.is_registered(state):
            config.pluginmanager.unregister(state)
        del config.stash[SCALE_KEY]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: object) -> None:
    """xdist controller: every worker gets the plan; it picks its device by its number."""
    state = node.config.stash[SCALE_KEY]  # type: ignore[attr-defined]
    node.workerinput[WORKERINPUT_KEY] = [[d.label, d.entry] for d in state.plan]  # type: ignore[attr-defined]


def _ini_dir(config: pytest.Config) -> Path:
    return config.inipath.parent if config.inipath is not None else config.rootpath


def _show(spec: object) -> str:
    if isinstance(spec, tuple):
        return ",".join(f"cuda:{index}" for index in spec)
    return str(spec)
