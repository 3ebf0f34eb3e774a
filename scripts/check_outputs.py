"""Check the output directory of runs made inside a container.

    python scripts/check_outputs.py OUTPUTS IMAGE_ID [LOCK_SHA256]

At least one manifest.json under OUTPUTS; each says status "complete" and records IMAGE_ID as its
container_image (and, given LOCK_SHA256, a stack record of that lock with no package off its pin); every file
and folder under OUTPUTS belongs to the invoking user (so --user and --userns=keep-id worked). Standard library
only: CI runs it with the runner's python3.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def problems(outputs: Path, image_id: str, lock_sha256: str | None = None) -> list[str]:
    found = []
    manifests = sorted(outputs.rglob("manifest.json"))
    if not manifests:
        found.append(f"no manifest.json under {outputs}")
    for path in manifests:
        manifest = json.loads(path.read_text())
        if manifest.get("status") != "complete":
            found.append(f"{path}: status {manifest.get('status')!r}")
        if manifest.get("container_image") != image_id:
            found.append(f"{path}: container_image {manifest.get('container_image')!r}, expected {image_id!r}")
        stack = manifest.get("stack") or {}
        if lock_sha256 and stack.get("lock_sha256") != lock_sha256:
            found.append(f"{path}: stack lock_sha256 {stack.get('lock_sha256')!r}, expected {lock_sha256!r}")
        if lock_sha256 and stack.get("drift"):
            found.append(f"{path}: packages off the lock: {', '.join(stack['drift'])}")
    uid = os.getuid()
    found += [f"{p}: owned by uid {p.stat().st_uid}, not {uid}" for p in outputs.rglob("*") if p.stat().st_uid != uid]
    return found


if __name__ == "__main__":
    outputs, image_id = Path(sys.argv[1]), sys.argv[2]
    errors = problems(outputs, image_id, sys.argv[3] if len(sys.argv) > 3 else None)
    for line in errors:
        print(f"check_outputs: {line}", file=sys.stderr)
    if errors:
        sys.exit(1)
    print(f"check_outputs: ok ({len(list(outputs.rglob('manifest.json')))} runs, image {image_id})")
