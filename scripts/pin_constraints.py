"""Re-resolve constraints/ci.txt: the exact versions of the test, sweep and launcher tools (the
[dev], [sweep], [launchers] and [wandb] extras and what they alone pull in) that scripts/setup.sh
installs, as CI does.

    python3 scripts/pin_constraints.py      # the newest versions pyproject.toml's ranges allow

The packages are resolved in a throw-away venv. The runtime dependencies are installed there too,
without torch, so that what they pull in is left out: they keep pyproject.toml's ranges (a GPU image
keeps its own torch, numpy).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "constraints" / "ci.txt"
EXTRAS = ("dev", "sweep", "launchers", "wandb")
HEADER = """\
# The exact versions of the test, sweep and launcher tools (extras dev, sweep, launchers, wandb;
# dev takes hf) that scripts/setup.sh installs (pip -c): what CI runs with. Runtime dependencies
# keep pyproject.toml's ranges.
# Upgrade: python3 scripts/pin_constraints.py
"""

# runs in the venv: {name: version} of everything the requirements pull in, extras and markers
# followed
CLOSURE = r"""
import json, sys
from importlib import metadata
from packaging.requirements import Requirement

def closure(reqs):
    found, seen, todo = {}, set(), [Requirement(r) for r in reqs]
    while todo:
        req = todo.pop()
        if (req.name.lower(), frozenset(req.extras)) in seen:
            continue
        seen.add((req.name.lower(), frozenset(req.extras)))
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:  # left out by its marker
            continue
        found[dist.metadata["Name"]] = dist.version
        for r in map(Requirement, dist.requires or []):
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
                todo.append(r)
    return found

runtime, extras = (json.loads(a) for a in sys.argv[1:])
shared = {n.lower() for n in closure(runtime)}
print(json.dumps({n: v for n, v in closure(extras).items() if n.lower() not in shared}))
"""


def requirements(project: dict, extras) -> list:
    """The extras' requirements, self-references such as moa_train[wandb,launchers] expanded."""
    out = []
    for extra in extras:
        for req in project["optional-dependencies"][extra]:
            nested = re.fullmatch(rf"{project['name']}\[(.+)\]", req.strip())
            out += requirements(project, nested.group(1).split(",")) if nested else [req]
    return out


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [r for r in project["dependencies"] if not r.startswith("torch")]
    extras = requirements(project, EXTRAS)
    with tempfile.TemporaryDirectory() as tmp:
        venv.create(tmp, with_pip=True)
        py = str(Path(tmp) / "bin" / "python")
        subprocess.run([py, "-m", "pip", "install", "-q", *runtime, *extras], check=True)
        pins = json.loads(
            subprocess.run(
                [py, "-c", CLOSURE, json.dumps(runtime), json.dumps(extras)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(
        HEADER + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items(), key=lambda p: p[0].lower()))
    )
    print(f"{OUT.relative_to(ROOT)}: {len(pins)} pins", file=sys.stderr)


if __name__ == "__main__":
    main()
