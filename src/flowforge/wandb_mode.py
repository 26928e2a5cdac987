"""Which mode Weights & Biases runs in: ``$WANDB_MODE`` when set, else ``online`` when an API key is configured
(``$WANDB_API_KEY`` or an ``api.wandb.ai`` entry in ``~/.netrc``), else ``offline`` (sync later with
``wandb sync <run dir>/wandb/offline-run-*``).  Shared by the logger config and ``flowforge.report``; no
Lightning import."""

from __future__ import annotations

import os
from pathlib import Path


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    if os.environ.get("WANDB_API_KEY") or (netrc.exists() and "api.wandb.ai" in netrc.read_text()):
        return "online"
    return "offline"
