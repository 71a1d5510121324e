"""AdamW with its moments in host memory, streamed through the GPU one FSDP unit at a time (`parallel.optimizer_offload`).

FSDP2's CPUOffloadPolicy moves parameters, gradients and the optimizer step to the host: the step then runs at host
memory speed on the CPU (5.8 s of a 7.6 s 12B step on 2 H200s, bench/RESULTS.md). Here only the two AdamW moments
(8 of the 16 bytes per parameter) live in pinned host memory; the fp32 master weights and gradients stay on the GPU,
and the step is the same fused AdamW kernel on the GPU. For each unit (the root's own parameters, then every block in
forward order) three streams pipeline the work: copy the unit's moments in, update, copy them back out.

The step is exact AdamW (clip coefficient and non-finite skip included), not a delayed update: it is queued when the
trainer calls `step()` and each unit's forward pre-hook makes the compute stream wait for that unit's update only, so
the copies overlap the next step's forward instead of stalling before it. Anything else that reads the weights or
the moments (checkpoint, EMA, export) calls `flush()` first. On a CPU there is nothing to stream: the update of a
unit is then deferred to the same hook (or `flush()`), which is how the CPU tests exercise the ordering.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from fluxtrain.parallel.fsdp import blocks


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A state tensor shaped like `param` (a DTensor of the same sharding) over the given local storage, left where
    it is (DTensor.from_local would copy a host tensor to the mesh's GPU; FSDP2's CPU offload builds its DTensors
    this way too)."""
    if isinstance(param, DTensor):
        return DTensor(local, param._spec, requires_grad=False)
    return local


def units(model: torch.nn.Module) -> list[tuple[torch.nn.Module, list[torch.nn.Parameter]]]:
    """(module, its trainable parameters) in forward order: the root's own (embedders, final norm and projection)
    first, then each block's: the order in which FSDP all-gathers them."""
    bl = blocks(model)
    inside = {id(p) for b in bl for p in b.parameters()}
    root = [p for p in model.parameters() if p.requires_grad and id(p) not in inside]
    return [(model, root)] + [(b, [p for p in b.parameters() if p.requires_grad]) for b in bl]


class OffloadedAdamW(torch.optim.AdamW):
    """torch's AdamW (state dict, LR scheduler, DCP checkpoints unchanged) whose `step()` streams the moments."""

    def __init__(self, model: torch.nn.Module, lr: float, betas, eps: float, weight_decay: float):
        self.units = [(m, ps) for m, ps in units(model) if ps]
        # model order, as build_optimizer's AdamW has it: a plain state dict (indexed by position) loads either way
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        self.device = _local(params[0]).device
        self.cuda = self.device.type == "cuda"
        # each unit's (param, offset, numel) in its flat host buffers and staging slots, fixed for the run
        self._layout: list[list[tuple[torch.nn.Parameter, int, int]]] = []
        self._sizes: list[int] = []
        for _, ps in self.units:
            sizes = [_local(p).numel() for p in ps]
            offs = [sum(sizes[:i]) for i in range(len(sizes))]
            self._layout.append(list(zip(ps, offs, sizes)))
            self._sizes.append(sum(sizes))
        self._homed = [False] * len(self.units)  # moments in the host buffers (again false after a load)
        self._flat: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.units)  # host m, v per unit
        self._pending: list[dict | None] = [None] * len(self.units)  # CPU: the update a unit still owes
        self._done: list[torch.cuda.Event | None] = [None] * len(self.units)
        self._last_out: torch.cuda.Event | None = None
        if self.cuda:
            self._h2d, self._upd, self._d2h = (torch.cuda.Stream(self.device) for _ in range(3))
            size = max(self._sizes)
            # two slots: unit j+1's moments come in while unit j updates and unit j-1's go out
            self._slots = [torch.empty(2, size, device=self.device) for _ in range(2)]
            self._slot_free: list[torch.cuda.Event | None] = [None, None]
        for j, (mod, _) in enumerate(self.units):
            # prepend: before FSDP's own pre-forward hook, which all-gathers the unit's weights
            mod.register_forward_pre_hook(self._hook(j), prepend=True)

    def _hook(self, j: int):
        @torch._dynamo.disable  # eager, like FSDP's hooks, when the block is compiled
        def hook(_mod, _args):
            self._ready(j)
        return hook

    # -- state: each unit's moments are views of one pinned host buffer, its step count a tensor on the device --
    def _home(self, j: int) -> None:
        """Give unit j host-resident moments (zeros for a fresh optimizer; a loaded state dict's values, which
        Optimizer.load_state_dict put on the parameters' device, are copied back to the host). Once per unit until
        the next load: step() calls it for every unit."""
        if self._homed[j]:
            return
        if self._flat[j] is None:
            self._flat[j] = tuple(torch.zeros(self._sizes[j], pin_memory=self.cuda) for _ in range(2))
        for p, off, k in self._layout[j]:
            st = self.state[p]
            for key, flat in zip(("exp_avg", "exp_avg_sq"), self._flat[j]):
                view = flat[off:off + k].view_as(_local(p))
                old = st.get(key)
                if old is None or _local(old).data_ptr() != view.data_ptr():
                    if old is not None:
                        view.copy_(_local(old))
                    st[key] = _like(p, view)
                    if _local(st[key]).data_ptr() != view.data_ptr():
                        raise RuntimeError(f"optimizer_offload: {key} did not stay in host memory")
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=self.device)
            elif st["step"].device != self.device:
                st["step"] = st["step"].to(self.device)
        self._homed[j] = True

    @torch.no_grad()
    def step(self, closure=None):
        """Queue the update of every unit (CUDA) or record it for the unit's next forward (CPU)."""
        if closure is not None:
            raise ValueError("OffloadedAdamW.step takes no closure")
        for j in range(len(self.units)):  # a unit not run since the last step (none in training) updates now
            self._ready(j)
        scale, found = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        g = self.param_groups[0]
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record()  # gradients, clip coefficient and skip flag are final on the compute stream
            if self._last_out is not None:  # the host buffers are read again only after the last step wrote them
                self._h2d.wait_event(self._last_out)
        for j, lay in enumerate(self._layout):
            entries = [e for e in lay if e[0].grad is not None]
            if not entries:
                continue
            self._home(j)
            ps = [p for p, _, _ in entries]
            job = dict(entries=entries, ps=ps, grads=[_local(p.grad) for p in ps], lr=float(g["lr"]), betas=g["betas"], eps=g["eps"],
                       wd=g["weight_decay"], scale=scale, found=found)
            if self.cuda:
                self._issue(j, job, ready)
            else:
                self._pending[j] = job

    def _adamw(self, job: dict, ms: list[torch.Tensor], vs: list[torch.Tensor]) -> None:
        import torch.optim.adam as adam  # the functional fused AdamW that torch.optim.AdamW(fused=True) calls

        b1, b2 = job["betas"]
        adam.adam([_local(p) for p in job["ps"]], job["grads"], ms, vs, [], [self.state[p]["step"] for p in job["ps"]],
                  fused=True, grad_scale=job["scale"], found_inf=job["found"], decoupled_weight_decay=True,
                  amsgrad=False, beta1=b1, beta2=b2, lr=job["lr"], weight_decay=job["wd"], eps=job["eps"],
                  maximize=False)

    @staticmethod
    def _views(entries, base: torch.Tensor) -> list[torch.Tensor]:
        return [base[off:off + k].view_as(_local(p)) for p, off, k in entries]

    def _issue(self, j: int, job: dict, ready: torch.cuda.Event) -> None:
        """Unit j on the three streams: host→slot, fused AdamW on the slot, slot→host."""
        slot_i = j % 2
        slot = self._slots[slot_i]
        m_flat, v_flat = self._flat[j]
        n = self._sizes[j]
        with torch.cuda.stream(self._h2d):
            if self._slot_free[slot_i] is not None:
                self._h2d.wait_event(self._slot_free[slot_i])
            slot[0, :n].copy_(m_flat, non_blocking=True)
            slot[1, :n].copy_(v_flat, non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record()
        with torch.cuda.stream(self._upd):
            self._upd.wait_event(ready)
            self._upd.wait_event(arrived)
            self._adamw(job, self._views(job["entries"], slot[0]), self._views(job["entries"], slot[1]))
            for t in job["grads"] + [x for x in (job["scale"], job["found"]) if x is not None]:
                t.record_stream(self._upd)  # freed by zero_grad on the compute stream: not reused before this runs
            done = torch.cuda.Event()
            done.record()
        self._done[j] = done
        with torch.cuda.stream(self._d2h):
            self._d2h.wait_event(done)
            m_flat.copy_(slot[0, :n], non_blocking=True)
            v_flat.copy_(slot[1, :n], non_blocking=True)
            out = torch.cuda.Event()
            out.record()
        self._slot_free[slot_i] = out
        self._last_out = out

    def _ready(self, j: int) -> None:
        """Unit j's weights are updated before anything after this call on the compute stream reads them."""
        if self.cuda:
            if self._done[j] is not None:
                torch.cuda.current_stream(self.device).wait_event(self._done[j])
                self._done[j] = None
        elif self._pending[j] is not None:
            job, self._pending[j] = self._pending[j], None  # on the host buffers, as the GPU path copies them
            self._adamw(job, *(self._views(job["entries"], flat) for flat in self._flat[j]))

    def flush(self, host: bool = True) -> None:
        """Every queued update is seen by the compute stream (EMA, fp8 scales read the weights next) and, with
        `host`, every copy out is complete for the host too (a checkpoint or export reads the moments)."""
        for j in range(len(self.units)):
            self._ready(j)
        if host and self.cuda and self._last_out is not None:
            self._last_out.synchronize()

    def state_dict(self):
        self.flush()
        return super().state_dict()

    def load_state_dict(self, state_dict):
        self.flush()
        super().load_state_dict(state_dict)
        self._homed = [False] * len(self.units)
        for j, (_, ps) in enumerate(self.units):  # loaded moments land on the parameters' device: back to the host
            if any(p in self.state for p in ps):
                self._home(j)
