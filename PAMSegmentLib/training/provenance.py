"""What code a training or evaluation run ran: the git commit of the repository and the tracked
files changed since it (a run of edited code is not the code of its commit)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def git_revision(short: bool = False) -> str:
    """The repository's HEAD commit ("unknown" outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return out or "unknown"
    except Exception:  # noqa: BLE001 - no git, not a checkout
        return "unknown"


def git_changes() -> list[str]:
    """Tracked files changed since the commit (``git status --porcelain``); [] for a clean tree."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout
    except Exception:  # noqa: BLE001
        return ["unknown"]
    return sorted(line[3:] for line in out.splitlines() if line.strip())
