"""Where a benchmark's numbers came from: the command, the code's git commit, the date and the
machine (CPU cores, device name). Never fails: a commit that cannot be found is "unknown". The
package's git commit and digest are m3i.provenance's, which runs record too."""

from __future__ import annotations

import datetime

import torch

from m3i.provenance import git_commit
from m3i.train.input_rate import usable_cores


def device_name(device: torch.device) -> str:
    """The GPU's name (torch.cuda.get_device_name) for a CUDA device, else "CPU"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def provenance(command: str) -> dict[str, str | int]:
    """{command, commit, date (UTC, ISO 8601, now), cpu_cores (usable by this process)}."""
    return {
        "command": command,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_cores": usable_cores(),
    }
