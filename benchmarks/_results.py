"""What every benchmark writes beside its numbers: device, library versions and date."""
from __future__ import annotations

import datetime
import importlib
import json
import platform
from pathlib import Path
from typing import Any

import torch


def write_result(name: str, device: torch.device, out_dir: str | Path, libraries: tuple[str, ...],
                 **fields: Any) -> Path:
    """Write ``out_dir/<name>_<device type>.json`` with the run's context and ``fields``."""
    gpu = device.type == "cuda"
    result = {
        "benchmark": name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine(),
        "device_type": device.type, "cpu_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     **{lib: importlib.import_module(lib).__version__ for lib in libraries}},
        **fields,
    }
    out = Path(out_dir) / f"{name}_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return out
