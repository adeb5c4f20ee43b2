#!/usr/bin/env python3
"""Install the Python layer of an ``sglang-kernel`` wheel, without its CUDA libraries.

    python cpu_sgl_kernel.py WHEEL DEST      # writes DEST/sgl_kernel/

SGLang imports ``sgl_kernel`` unconditionally, but PyPI has only the CUDA build of it (the CPU
build has to be compiled from source). On a CPU without AMX, SGLang's CPU path runs plain
torch operators and never calls a compiled kernel, so the package's Python files are enough
once the loading of its shared library is allowed to fail. This copies those files out of
the wheel and makes that one change; it stops with an error if the wheel's code no longer
has the line it expects.
"""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

LOAD = "    common_ops = _load_architecture_specific_ops()\n"
GUARDED = (
    "    try:\n"
    "        common_ops = _load_architecture_specific_ops()\n"
    "    except Exception:  # trio-router's CPU test install: no compiled operators\n"
    "        common_ops = None\n"
)


def main(wheel: Path, dest: Path) -> None:
    target = dest / "sgl_kernel"
    if target.exists():
        shutil.rmtree(target)
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith("sgl_kernel/") and name.endswith(".py"):
                path = dest / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(archive.read(name))
    init = target / "__init__.py"
    source = init.read_text()
    if source.count(LOAD) != 1:
        sys.exit(f"cpu_sgl_kernel: {wheel.name} no longer loads its ops as expected; update me")
    init.write_text(source.replace(LOAD, GUARDED))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
