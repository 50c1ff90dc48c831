"""The dependency stack: the versions pytest-hotswap needs, and the known upstream defects with
the versions they were verified on.

Versions are read from package metadata, so nothing here imports torch, diffusers or PEFT. A
known defect is a strict expectation only on a stack inside its verified ranges; outside them a
defect that no longer reproduces reads "fixed upstream?" and does not fail the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import ClassVar

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

#: The oldest releases the fixtures, the marker and the reference were run on (``make stacks``);
#: ``pyproject.toml`` declares the same bounds.
MINIMUM_VERSIONS: dict[str, str] = {
    # 2.13 has isolate_recompiles; on 2.11 (a CUDA build, run on the CPU here and the GPU image's
    # torch) the marker resets dynamo before each watched test instead (watch/isolation.py)
    "torch": "2.11.0",
    "diffusers": "0.40.0",  # 0.32-0.39 cannot load a LoRA file offline without a weight_name
    "peft": "0.20.0",  # older: hotswapping a too-large rank fails differently; <=0.17 no transformers 5
    "transformers": "5.0.0",  # 4.x needs huggingface-hub < 1.0, diffusers >= 0.40 needs >= 1.23
}
#: Optional packages: checked only when installed. PEFT >= 0.19 refuses torchao < 0.16 on every
#: LoRA injection, and torchao 0.12 does not import on torch 2.13.
OPTIONAL_MINIMUM_VERSIONS: dict[str, str] = {"torchao": "0.16.0"}
#: The ranges the known defects were reproduced on (``make stacks``: oldest, pinned, newest).
VERIFIED = {"diffusers": ">=0.40,<=0.42.1", "peft": ">=0.20,<=0.21.2"}
#: The packages that make a stack, in the order the header names them.
STACK_PACKAGES = ("torch", "diffusers", "peft", "transformers", "torchao")


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def installed_stack() -> dict[str, str]:
    """``package -> version`` of every stack package installed (torchao may be absent)."""
    found = {}
    for package in STACK_PACKAGES:
        version = installed_version(package)
        if version is not None:
            found[package] = version
    return found


def too_old(stack: Mapping[str, str] | None = None) -> list[str]:
    """One message per package older than :data:`MINIMUM_VERSIONS` (or missing) or than
    :data:`OPTIONAL_MINIMUM_VERSIONS` (when installed), naming the package, the version found and
    the one needed."""
    stack = installed_stack() if stack is None else stack
    problems = []
    for package, minimum in {**MINIMUM_VERSIONS, **OPTIONAL_MINIMUM_VERSIONS}.items():
        found = stack.get(package)
        if found is None:
            if package in MINIMUM_VERSIONS:
                problems.append(
                    f"{package} is not installed; pytest-hotswap needs {package}>={minimum}"
                )
        elif _release(found) < Version(minimum):
            problems.append(
                f"{package} {found} is installed; pytest-hotswap needs {package}>={minimum} "
                f"(pip install -U '{package}>={minimum}')"
            )
    return problems


def _release(version: str) -> Version:
    """The release part of a version (``2.13.0+cpu`` -> ``2.13.0``); unparsable reads as 0."""
    try:
        parsed = Version(version)
    except InvalidVersion:
        return Version("0")
    return Version(parsed.base_version)


@dataclasses.dataclass(frozen=True)
class KnownDefect:
    """A documented upstream defect one implementation shows in one conformance scenario.

    ``failure`` is how it shows (one of the class constants). ``verified`` maps a package to the
    ``packaging`` specifier of the versions the defect was reproduced on; a stack matches when
    every listed package's installed version is inside its specifier. ``only_with`` is a pipeline
    trait (``pytest_hotswap.adapters.loading.pipeline_traits``: what a pipeline's components are,
    never its name) the defect shows with; empty: it shows on every pipeline.
    """

    NOT_REJECTED: ClassVar[str] = (
        "not rejected"  # an adapter that cannot be hotswapped was accepted
    )
    MODEL_CHANGED: ClassVar[str] = "model changed"  # a swap that raised left the model changed
    RECOMPILES: ClassVar[str] = "recompiles"  # the no_recompile marker fails the test
    WRONG_OUTPUT: ClassVar[str] = "wrong output"  # the output differs from a fresh eager load
    #: a plain load of a valid adapter through the pipeline's own LoRA loader raises
    LOAD_FAILS: ClassVar[str] = "load fails"
    FAILURES: ClassVar[tuple[str, ...]] = (
        NOT_REJECTED,
        MODEL_CHANGED,
        RECOMPILES,
        WRONG_OUTPUT,
        LOAD_FAILS,
    )

    scenario: str
    reason: str
    failure: str
    verified: Mapping[str, str] = dataclasses.field(default_factory=dict)
    only_with: str = ""

    def __post_init__(self) -> None:
        if self.failure not in self.FAILURES:
            raise ValueError(f"failure must be one of {self.FAILURES}, got {self.failure!r}")
        for package, specifier in self.verified.items():
            try:
                SpecifierSet(specifier)
            except InvalidSpecifier:
                raise ValueError(f"{package}: {specifier!r} is not a version specifier") from None

    def verified_on(self, stack: Mapping[str, str] | None = None) -> bool:
        """Whether the stack is inside every verified range (a strict expectation there)."""
        stack = installed_stack() if stack is None else stack
        for package, specifier in self.verified.items():
            found = stack.get(package)
            if found is None or not SpecifierSet(specifier).contains(
                _release(found), prereleases=True
            ):
                return False
        return True

    def shows_with(self, traits: frozenset[str] | set[str]) -> bool:
        """Whether it shows on a pipeline with ``traits`` (see ``only_with``)."""
        return not self.only_with or self.only_with in traits

    def describe_range(self) -> str:
        return ", ".join(f"{package}{spec}" for package, spec in self.verified.items())


def describe_stack(stack: Mapping[str, str] | None = None) -> str:
    stack = installed_stack() if stack is None else stack
    return ", ".join(f"{package} {version}" for package, version in stack.items())


def verified_stack(defects: Iterable[KnownDefect], stack: Mapping[str, str] | None = None) -> bool:
    """Whether the stack is inside the verified ranges of every known defect given."""
    stack = installed_stack() if stack is None else stack
    return all(defect.verified_on(stack) for defect in defects)


def stack_verdict(defects: Iterable[KnownDefect], stack: Mapping[str, str] | None = None) -> str:
    """The one sentence saying whether the stack is verified for ``defects`` (where a known defect
    is a strict expectation), as the conformance matrix prints it after the stack."""
    defects = list(defects)
    if not defects:
        return "no known defects to verify"
    if verified_stack(defects, stack):
        return "verified: the known defects were reproduced on these versions"
    return (
        "not verified: known defects are expected loosely, a vanished one reads 'fixed upstream?'"
    )
