"""Which packages ``make setup`` installs on which platform.

``scripts/setup_tf_metal_env.sh`` runs this file with the interpreter it chose (before the virtual
environment exists, so only the standard library and ``packaging`` may be used, and the code must
run on Python 3.9). One requirements file serves every platform through environment markers; this
module evaluates those markers for a *simulated* platform, so that ``DRY_RUN=1`` can show what a
Mac would install while running on Linux, and the tests can check every platform on one machine.

    python -m devtools.platforms REQUIREMENTS PLATFORM [--gpu cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pragma: no cover - a bare interpreter (setup runs before the venv exists) has pip's copy only
    from pip._vendor.packaging.requirements import Requirement

TF_VERSION = "2.15.1"

#: Supported platforms: setup's name → the marker variables pip sees there.
MARKER_ENV: dict[str, dict[str, str]] = {
    "darwin-arm64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
    "darwin-x86_64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "x86_64"},
    "linux-x86_64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
    "linux-aarch64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
}


def _packaging() -> type[Requirement]:
    """``packaging``'s Requirement (the installed one, else the copy vendored in pip)."""
    return Requirement


def requirements_for(path: Path | str, platform: str, python: str | None = None) -> list[str]:
    """Pinned requirements of ``path`` that apply on ``platform`` (markers evaluated there).

    ``python`` ("3.11") sets the interpreter version for the markers; default: the running one.
    """
    requirement = _packaging()
    from_markers = dict(MARKER_ENV[platform])
    if python:
        from_markers.update(python_version=python, python_full_version=f"{python}.0")
    active = []
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = requirement(line)
        if req.marker is None or req.marker.evaluate(from_markers):
            active.append(f"{req.name}{req.specifier}")
    return active


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.platforms",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("requirements")
    parser.add_argument("platform", choices=sorted(MARKER_ENV))
    parser.add_argument("--gpu", choices=["cuda"], default=None)
    parser.add_argument("--python", default=None, help="interpreter version for the markers, e.g. 3.11")
    args = parser.parse_args(argv)
    for req in requirements_for(args.requirements, args.platform, args.python):
        print(f"PLAN package {req}")
    if args.gpu == "cuda":
        print(f"PLAN package tensorflow[and-cuda]=={TF_VERSION}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
