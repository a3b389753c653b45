"""Optional TensorBoard logging (``run.tensorboard = true``): every metrics.jsonl record as scalars.

Events go to ``<run>/tensorboard``; a resumed run purges the events logged after its checkpoint (as
metrics.jsonl is truncated there). Needs the ``tensorboard`` package (``pip install
'radio-train[tensorboard]'``); ``TrainConfig.validate`` says so before a run directory is made.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TensorBoardLog"]


class TensorBoardLog:
    def __init__(self, run_dir: str | Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def log(self, record: dict) -> None:
        """Numeric fields of one metrics.jsonl record at its ``step`` (NaN / Inf included)."""
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
