"""Where training metrics go: a JSONL file (always) and TensorBoard (when installed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RunLogger:
    """One JSON object per line in ``train_log.jsonl``; scalars mirrored to TensorBoard."""

    def __init__(self, out_dir: Path, tensorboard: bool = True) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = out_dir / "train_log.jsonl"
        self._jsonl = self.jsonl_path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; logging to %s only", self.jsonl_path)

    def log(self, record: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            prefix = record.get("sae", "")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "tokens"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record.get("step", 0))

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
