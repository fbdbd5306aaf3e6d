"""Prints an end of a dependency's pinned range, as installed from pyproject.toml: `python scripts/pins.py lowest NAME`.

CI uses it to install the oldest release the pins allow (the newest is what a plain install resolves).
"""

import sys
from importlib.metadata import requires

from packaging.requirements import Requirement


def lowest(name: str) -> str:
    for line in requires("csp-circuits") or []:
        requirement = Requirement(line)
        runtime = requirement.marker is None or requirement.marker.evaluate({"extra": "app"})  # the app's too
        if requirement.name.lower() == name.lower() and runtime:
            bounds = [s.version for s in requirement.specifier if s.operator in (">=", "==")]
            if bounds:
                return bounds[0]
    raise SystemExit(f"error: no lower bound for {name} in csp-circuits' requirements (pip install -e . first)")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "lowest":
        raise SystemExit("usage: python scripts/pins.py lowest NAME")
    print(lowest(sys.argv[2]))
