"""Where the shared offline data lives: `../shared/data` beside the repository, or $PYRAMIDINFER_DATA."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def shared_data() -> Path:
    env = os.environ.get("PYRAMIDINFER_DATA")
    return Path(env) if env else repo_root().parent / "shared" / "data"
