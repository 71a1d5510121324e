"""Step-range profiling: a torch.profiler trace and, on CUDA, an allocator memory snapshot, for steps [a, b].

Configured by `log.profile_steps = [a, b]` (inclusive; `[]` = off, `[a]` = just step a) and
`log.profile_ranks = "rank0" | "all"`. The train loop calls `.step(step)` at the END of every training step and
`.close()` when it leaves, so profiling starts at the end of step a-1 (or at construction when the run's first step
is already in range) and stops at the end of step b.

Outputs, in `<run_dir>/profile/`:

- `trace-rank{r}-steps{a}-{b}.json.gz` — a Chrome trace-event file (gzip), opened by https://ui.perfetto.dev or
  chrome://tracing. CPU ops, and CUDA kernels when CUDA is available; shapes recorded, no Python stacks.
  Each step is a `ProfilerStep#N` span with N the training step.
- `memory-rank{r}.pickle` (CUDA only) — a snapshot of the CUDA caching allocator with the allocation history of the
  profiled steps, written by `torch.cuda.memory._dump_snapshot`. This is PyTorch's own (pickle) format: drag it
  onto https://pytorch.org/memory_viz to see it; it is not meant to be read by anything else. On CPU nothing is
  written for it (one log line says so).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("fluxtrain")

# Allocation events kept by the memory history ring buffer (each ~ a few hundred bytes with its stack).
MEMORY_HISTORY_ENTRIES = 100_000


def profile_range(profile_steps) -> tuple[int, int] | None:
    """`[]` → None, `[a]` → (a, a), `[a, b]` → (a, b); anything else is a ConfigError."""
    steps = list(profile_steps or [])
    if not steps:
        return None
    if len(steps) == 1:
        steps = steps * 2
    if len(steps) != 2 or not all(isinstance(s, int) for s in steps) or not 1 <= steps[0] <= steps[1]:
        from fluxtrain.config import ConfigError

        raise ConfigError(f"log.profile_steps must be [] or [first, last] with 1 <= first <= last (steps are "
                          f"1-based, inclusive), got {profile_steps}")
    return steps[0], steps[1]


class StepProfiler:
    """Profiles training steps [a, b] on the selected ranks; a no-op everywhere else."""

    def __init__(self, log_cfg, run_dir: str | Path, rank: int, start_step: int = 0):
        """`start_step`: the last step already done (the resume step), so a range that begins at the run's
        first step is profiled from construction on."""
        rng = profile_range(getattr(log_cfg, "profile_steps", []))
        ranks = getattr(log_cfg, "profile_ranks", "rank0")
        self.enabled = rng is not None and (ranks == "all" or rank == 0)
        self.first, self.last = rng or (0, 0)
        self.rank = rank
        self.out_dir = Path(run_dir) / "profile"
        self.prof = None
        self.started_at = None  # first step inside the profile
        self.seen = start_step  # last step completed
        self.cuda = torch.cuda.is_available()
        self.done = not self.enabled or start_step >= self.last
        if self.enabled and self.done:
            log.info(f"profiler: steps {self.first}-{self.last} are before the resume step {start_step}; not profiling")
        self._maybe_start(start_step + 1)

    @property
    def active(self) -> bool:
        return self.prof is not None

    def trace_path(self, first: int, last: int) -> Path:
        return self.out_dir / f"trace-rank{self.rank}-steps{first}-{last}.json.gz"

    def memory_path(self) -> Path:
        return self.out_dir / f"memory-rank{self.rank}.pickle"

    def _maybe_start(self, next_step: int) -> None:
        if self.done or self.prof is not None or not self.first <= next_step <= self.last:
            return
        from torch.profiler import ProfilerAction, ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.cuda:
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        # A schedule that always records: it is what makes the profiler mark each step with a ProfilerStep#N span.
        self.prof = profile(activities=activities, record_shapes=True, with_stack=False,
                            schedule=lambda _step: ProfilerAction.RECORD)
        self.prof.step_num = next_step  # the first span is named ProfilerStep#<training step>
        self.prof.start()
        self.started_at = next_step
        log.info(f"profiler: recording steps {next_step}-{self.last} on rank {self.rank}")

    def step(self, step: int) -> None:
        """Call at the end of training step `step`."""
        if self.done:
            return
        self.seen = step
        if self.prof is not None:
            if step >= self.last:
                self._stop(step)
            else:
                self.prof.step()
            return
        self._maybe_start(step + 1)

    def _stop(self, last: int) -> None:
        prof, self.prof, self.done = self.prof, None, True
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.cuda:
            torch.cuda.synchronize()
        prof.stop()
        trace = self.trace_path(self.started_at, last)
        prof.export_chrome_trace(str(trace))  # a path ending in .gz is written gzip-compressed
        log.info(f"profiler: trace of steps {self.started_at}-{last} written to {trace}")
        if self.cuda:
            mem = self.memory_path()
            torch.cuda.memory._dump_snapshot(str(mem))
            torch.cuda.memory._record_memory_history(enabled=None)
            log.info(f"profiler: CUDA memory snapshot written to {mem} (open it at https://pytorch.org/memory_viz)")
        else:
            log.info("profiler: no memory snapshot on CPU (the CUDA allocator history is CUDA-only)")

    def close(self) -> None:
        """Ends a profile cut short (run stopped inside the range): writes what was recorded."""
        if self.prof is not None:
            self._stop(max(self.seen, self.started_at))
        self.done = True
