"""Metrics to stderr (via logging), `metrics.jsonl` and TensorBoard (tensorboardX, no TensorFlow).

Only process 0 writes (`enabled=False` elsewhere).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("jaxvlm")


class MetricWriter:
    def __init__(self, workdir: str | Path, *, enabled: bool = True):
        self.enabled = enabled
        self.jsonl_path = Path(workdir) / "metrics.jsonl"
        self._tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops rows past `step`: a resumed run re-runs those steps and logs them again."""
        if not self.enabled or not self.jsonl_path.is_file():
            return
        lines = self.jsonl_path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        self.jsonl_path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        for key, value in scalars.items():
            self._tensorboard.add_scalar(key, value, step)
        self._tensorboard.flush()
        shown = ", ".join(f"{k}={v:.4g}" for k, v in scalars.items())
        logger.info("step %d: %s", step, shown)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


class _NoProgress:
    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, **kwargs) -> None: ...

    def close(self) -> None: ...


def progress_bar(start: int, total: int, enabled: bool):
    """A tqdm bar on stderr for long loops (a no-op when disabled or on other processes)."""
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(
        initial=start, total=total, file=sys.stderr, dynamic_ncols=True, leave=False, desc="train"
    )
