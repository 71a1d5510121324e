"""Rank-0 progress: a rich bar on a terminal, plain lines elsewhere (CI, Slurm logs)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, mode: str, total: int, start: int, enabled: bool = True):
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.mode = "none" if not enabled else ("bar" if mode == "auto" and sys.stderr.isatty() else
                                                 "plain" if mode == "auto" else mode)
        self.bar = None
        if self.mode == "bar":
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                    TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def _info(self, row: dict) -> str:
        mfu = row.get("mfu")
        return (f"loss {row['loss']:.4f}  {row['samples_per_s']:.1f} samples/s"
                + (f"  MFU {100 * mfu:.1f}%" if mfu is not None else ""))

    def update(self, step: int, row: dict) -> None:
        if self.mode == "bar":
            self.bar.update(self.task, completed=step, info=self._info(row))
        elif self.mode == "plain":
            done = step - self.start
            eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total}  {self._info(row)}  eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
