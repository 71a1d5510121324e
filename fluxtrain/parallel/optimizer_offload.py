"""AdamW with its moments in host memory, streamed through the GPU one FSDP unit at a time (`parallel.optimizer_offload`).

FSDP2's CPUOffloadPolicy moves parameters, gradients and the optimizer step to the host: the step then runs at host
memory speed on the CPU (5.8 s of a 7.6 s 12B step on 2 H200s, bench/RESULTS.md). Here only the two AdamW moments
(8 of the 16 bytes per parameter) live in pinned host memory; the fp32 master weights and gradients stay on the GPU,
and the step is the same fused AdamW kernel on the GPU. For each unit (the root's own parameters, then every block in
forward order) three streams pipeline the work: copy the unit's moments in, update, copy them back out.

The step is exact AdamW (clip coefficient and non-finite skip included), not a delayed update: it is queued when the
trainer calls `step()` and each unit's forward pre-hook makes the compute stream wait for that unit's update only, so
the copies overlap the next step's forward instead of stalling before it. The hook also holds FSDP2's all-gather
streams, which otherwise read a block's sharded weights as soon as the host reaches it. Anything else that reads the
weights or the moments (checkpoint, EMA, export) calls `flush()` first.

The moments pass through a ring buffer on the GPU (`parallel.optimizer_offload_buffer_gib`; at least two units). Right
after a step is queued, as many units of the next step as the ring holds are copied in again, behind that step's
copies out: those copies run under the forward and backward instead of holding up the next forward. A bigger ring
trades GPU memory for hidden copies.

`parallel.optimizer_offload_dtype = "bf16"` keeps the moments in bf16 on the host: half the bytes each way. They are
widened to fp32 in the ring, updated by the same fp32 kernel and rounded back stochastically (`round_to_bf16`): AdamW's
second moment grows by (1 - beta2) g^2, 0.1% a step, under bf16's half step of 0.4%, so rounding to nearest would
freeze it where stochastic rounding keeps its expectation. Not exact AdamW, unlike fp32.

On a CPU there is nothing to stream: the update of a unit is then deferred to the same hook (or `flush()`), which is
how the CPU tests exercise the ordering.
"""

from __future__ import annotations

from collections import deque

import torch
from torch.distributed.tensor import DTensor

from fluxtrain.parallel.fsdp import blocks
from fluxtrain.pinned import pinned_zeros


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A state tensor shaped like `param` (a DTensor of the same sharding) over the given local storage, left where
    it is (DTensor.from_local would copy a host tensor to the mesh's GPU; FSDP2's CPU offload builds its DTensors
    this way too)."""
    if isinstance(param, DTensor):
        spec = param._spec
        if local.dtype != param.dtype:  # bf16 moments of fp32 parameters: the spec's metadata says so
            from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

            tm = spec.tensor_meta
            spec = DTensorSpec(spec.mesh, spec.placements, tensor_meta=TensorMeta(tm.shape, tm.stride, local.dtype))
        return DTensor(local, spec, requires_grad=False)
    return local


def units(model: torch.nn.Module) -> list[tuple[torch.nn.Module, list[torch.nn.Parameter]]]:
    """(module, its trainable parameters) in forward order: the root's own (embedders, final norm and projection)
    first, then each block's: the order in which FSDP all-gathers them."""
    bl = blocks(model)
    inside = {id(p) for b in bl for p in b.parameters()}
    root = [p for p in model.parameters() if p.requires_grad and id(p) not in inside]
    return [(model, root)] + [(b, [p for p in b.parameters() if p.requires_grad]) for b in bl]


def _gather_streams(modules) -> list:
    """FSDP2's all-gather streams (shared by one model's FSDP modules). In the forward they wait for the compute
    stream only in the root's pre-forward, then copy each block's sharded weights in as soon as the host reaches the
    block: a block's update must hold them too."""
    from torch.distributed.fsdp import FSDPModule

    for m in modules:
        if isinstance(m, FSDPModule):
            ctx = getattr(getattr(m, "_get_fsdp_state", lambda: None)(), "_comm_ctx", None)
            streams = [getattr(ctx, a, None) for a in ("all_gather_copy_in_stream", "all_gather_stream")]
            if None in streams:  # private FSDP2 internals: a torch that moved them must not silently race
                raise RuntimeError("optimizer_offload: FSDP2's all-gather streams not found in this torch "
                                   f"({torch.__version__}); set parallel.optimizer_offload = false")
            return streams
    return []


# parallel.optimizer_offload_dtype → the moments' dtype in host memory
MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ring_elem_bytes(moment_dtype: torch.dtype) -> int:
    """GPU bytes per ring element: fp32, and with bf16 moments the bf16 twin they cross the host link through."""
    return 4 if moment_dtype == torch.float32 else 4 + 2


def ring_elems(unit_sizes: list[int], buffer_bytes: float = 0, moment_dtype: torch.dtype = torch.float32) -> int:
    """The GPU ring's elements: room for two of the largest unit's m and v, or buffer_bytes if more."""
    return max(2 * 2 * max(unit_sizes), int(buffer_bytes) // ring_elem_bytes(moment_dtype))


def _stochastic_bf16(x: torch.Tensor, start: int, salt: torch.Tensor) -> torch.Tensor:
    """fp32 x rounded to a bf16 neighbour (returned as fp32 with the low 16 bits clear): the upper one with a
    probability equal to x's distance from the lower one. The 16 random bits are a hash of x's bits, its position
    (`start` + index) and `salt` (a step count on x's device): no RNG state, so a resumed run rounds as the
    uninterrupted one did, and nothing is read back to the host."""
    bits = x.view(torch.int32)
    i = torch.arange(start, start + x.numel(), device=x.device, dtype=torch.int32)
    h = bits ^ (i * -1640531535) ^ (salt.to(torch.int32) * 668265263)  # int32 products wrap: a multiplicative hash
    h = h ^ (h >> 15)
    h = h * 739982445
    h = h ^ (h >> 13)
    h = h * 695872825
    h = h ^ (h >> 16)
    return ((bits + (h & 0xFFFF)) & -65536).view(torch.float32)


def _to_bf16(x: torch.Tensor, start: int, salt: torch.Tensor) -> torch.Tensor:
    return _stochastic_bf16(x, start, salt).to(torch.bfloat16)  # exact: the low bits are clear


_CHUNK = 1 << 22  # eager (CPU): the hash's int32 temporaries per chunk
_compiled = None


def round_to_bf16(src: torch.Tensor, out: torch.Tensor, salt: torch.Tensor) -> None:
    """out (bf16) = src (fp32, 1-D) rounded stochastically (`_stochastic_bf16`): E[out] = src. On a GPU one compiled
    kernel (static shapes: one per unit size); on the CPU eager, in chunks."""
    global _compiled
    if src.is_cuda:
        if _compiled is None:
            _compiled = torch.compile(_to_bf16, dynamic=False)
        out.copy_(_compiled(src, 0, salt))
        return
    for s in range(0, src.numel(), _CHUNK):
        out[s:s + _CHUNK].copy_(_to_bf16(src[s:s + _CHUNK], s, salt))


class Ring:
    """Regions of a circular buffer handed out in issue order. A region is in flight (its event None) until its unit
    is released with the event after its last use (the copy out); `alloc` returns the events of the released regions
    the new one overlaps, for the copy in to wait on, so the host never waits."""

    def __init__(self, size: int):
        self.size, self.head = size, 0
        self.live: deque[list] = deque()  # [start, end, event]

    def _place(self, n: int) -> tuple[int, int]:
        if n > self.size:
            raise ValueError(f"optimizer_offload: a unit of {n} elements is larger than the ring's {self.size}")
        start = self.head if self.head + n <= self.size else 0
        return start, start + n

    def _hits(self, start: int, end: int) -> list[list]:
        return [r for r in self.live if r[0] < end and start < r[1]]

    def fits(self, n: int) -> bool:
        """A region of n overlaps only released regions (a copy in there waits for copies out, never for a unit
        that has not been updated yet)."""
        return n <= self.size and all(r[2] is not None for r in self._hits(*self._place(n)))

    def alloc(self, n: int) -> tuple[list, list]:
        start, end = self._place(n)
        hits = self._hits(start, end)
        if any(r[2] is None for r in hits):
            raise RuntimeError("optimizer_offload: ring region reused while its unit is in flight")
        for r in hits:
            self.live.remove(r)
        region = [start, end, None]
        self.live.append(region)
        self.head = end
        return region, [r[2] for r in hits]


class OffloadedAdamW(torch.optim.AdamW):
    """torch's AdamW (state dict, LR scheduler, DCP checkpoints unchanged) whose `step()` streams the moments.

    `buffer_bytes`: the GPU ring the moments pass through (at least two of the largest unit's m and v). `lookahead`:
    how many units after its own a unit's forward pre-hook must see updated (FSDP's explicit forward prefetch
    all-gathers them from that hook). `moment_dtype`: the moments' dtype in host memory (fp32: exact AdamW; bf16:
    half the copies, rounded back stochastically)."""

    def __init__(self, model: torch.nn.Module, lr: float, betas, eps: float, weight_decay: float,
                 buffer_bytes: int = 0, lookahead: int = 0, moment_dtype: torch.dtype = torch.float32):
        self.units = [(m, ps) for m, ps in units(model) if ps]
        # model order, as build_optimizer's AdamW has it: a plain state dict (indexed by position) loads either way
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        self.device = _local(params[0]).device
        self.cuda = self.device.type == "cuda"
        self.lookahead = lookahead
        if moment_dtype not in MOMENT_DTYPES.values():
            raise ValueError(f"optimizer_offload: moments in fp32 or bf16, not {moment_dtype}")
        self.moment_dtype = moment_dtype
        self._low = moment_dtype != torch.float32
        # each unit's (param, offset, numel) in its flat host buffer (m, then v at +size), fixed for the run
        self._layout: list[list[tuple[torch.nn.Parameter, int, int]]] = []
        self._sizes: list[int] = []
        for _, ps in self.units:
            sizes = [_local(p).numel() for p in ps]
            offs = [sum(sizes[:i]) for i in range(len(sizes))]
            self._layout.append(list(zip(ps, offs, sizes)))
            self._sizes.append(sum(sizes))
        n = len(self.units)
        self._homed = [False] * n  # moments in the host buffers (again false after a load)
        self._flat: list[torch.Tensor | None] = [None] * n  # pinned host m and v per unit, one buffer
        self._pending: list[dict | None] = [None] * n  # CPU: the update a unit still owes
        self._done: list[torch.cuda.Event | None] = [None] * n  # unit's update, not yet waited for by compute
        self._out: list[torch.cuda.Event | None] = [None] * n  # unit's last copy out (its host buffer is final)
        self._staged: list[tuple | None] = [None] * n  # (ring region, copy-in event) of a unit copied in early
        if self.cuda:
            self._h2d, self._upd, self._d2h = (torch.cuda.Stream(self.device) for _ in range(3))
            self.ring_elems = ring_elems(self._sizes, buffer_bytes, moment_dtype)
            self._buf = torch.empty(self.ring_elems, device=self.device)
            # bf16 moments cross the host link through a bf16 twin of the ring (same regions), widened on the GPU
            self._buf16 = torch.empty(self.ring_elems, device=self.device, dtype=torch.bfloat16) if self._low else None
            # The ring comes from the compute stream's pool: its memory may still be in use by kernels queued there
            # (a freed temporary's), which the copy streams would not wait for. They wait once, here.
            allocated = torch.cuda.Event()
            allocated.record()
            for s in (self._h2d, self._upd, self._d2h):
                s.wait_event(allocated)
                for b in (self._buf, self._buf16):
                    if b is not None:
                        b.record_stream(s)  # freed with copies still queued: not reused before they run
            self._ring = Ring(self.ring_elems)
        for j, (mod, _) in enumerate(self.units):
            # prepend: before FSDP's own pre-forward hook, which all-gathers the unit's weights
            mod.register_forward_pre_hook(self._hook(j), prepend=True)

    def _hook(self, j: int):
        @torch._dynamo.disable  # eager, like FSDP's hooks, when the block is compiled
        def hook(_mod, _args):
            for k in range(j, min(j + 1 + self.lookahead, len(self.units))):
                self._ready(k)
        return hook

    # -- state: each unit's moments are views of one pinned host buffer, its step count a tensor on the device --
    def _home(self, j: int) -> None:
        """Give unit j host-resident moments (zeros for a fresh optimizer; a loaded state dict's values, which
        Optimizer.load_state_dict put on the parameters' device, are copied back to the host). Once per unit until
        the next load: step() calls it for every unit."""
        if self._homed[j]:
            return
        n = self._sizes[j]
        if self._flat[j] is None:
            self._flat[j] = pinned_zeros(2 * n, self.moment_dtype, self.cuda)
        for p, off, k in self._layout[j]:
            st = self.state[p]
            for key, base in (("exp_avg", 0), ("exp_avg_sq", n)):
                view = self._flat[j][base + off:base + off + k].view_as(_local(p))
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
        todo = []
        for j, lay in enumerate(self._layout):
            entries = [e for e in lay if e[0].grad is not None]
            if entries:
                self._home(j)  # a first step makes the step counts on the compute stream: before `ready` below
                todo.append((j, entries))
            elif self._staged[j] is not None:  # copied in early, nothing to update: the region is free after it
                (region, arrived), self._staged[j] = self._staged[j], None
                region[2] = arrived
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record()  # gradients, clip coefficient, skip flag and step counts are final on the compute stream
        for j, entries in todo:
            ps = [p for p, _, _ in entries]
            job = dict(entries=entries, ps=ps, grads=[_local(p.grad) for p in ps], lr=float(g["lr"]), betas=g["betas"],
                       eps=g["eps"], wd=g["weight_decay"], scale=scale, found=found)
            if self.cuda:
                self._issue(j, job, ready)
            else:
                self._pending[j] = job
        if self.cuda:
            self._prefetch()

    def _adamw(self, job: dict, flat: torch.Tensor) -> None:
        """Fused AdamW of one unit whose moments are `flat` (m, then v), a ring region or the host buffer."""
        import torch.optim.adam as adam  # the functional fused AdamW that torch.optim.AdamW(fused=True) calls

        n = flat.numel() // 2
        ms, vs = (self._views(job["entries"], half) for half in (flat[:n], flat[n:]))
        b1, b2 = job["betas"]
        adam.adam([_local(p) for p in job["ps"]], job["grads"], ms, vs, [], [self.state[p]["step"] for p in job["ps"]],
                  fused=True, grad_scale=job["scale"], found_inf=job["found"], decoupled_weight_decay=True,
                  amsgrad=False, beta1=b1, beta2=b2, lr=job["lr"], weight_decay=job["wd"], eps=job["eps"],
                  maximize=False)

    def _salt(self, job: dict) -> torch.Tensor:
        """The rounding's salt: the unit's step count after its update (on the device, so read without a sync; kept
        by a skipped step, whose moments are already bf16 values and round to themselves)."""
        return self.state[job["ps"][0]]["step"]

    @staticmethod
    def _views(entries, base: torch.Tensor) -> list[torch.Tensor]:
        return [base[off:off + k].view_as(_local(p)) for p, off, k in entries]

    def _copy_in(self, j: int) -> tuple[list, torch.cuda.Event]:
        """Unit j's host moments into a ring region, after the region's previous users and j's last copy out."""
        region, waits = self._ring.alloc(2 * self._sizes[j])
        with torch.cuda.stream(self._h2d):
            for e in waits + ([self._out[j]] if self._out[j] is not None else []):
                self._h2d.wait_event(e)
            if self._low:
                self._buf16[region[0]:region[1]].copy_(self._flat[j], non_blocking=True)
                self._buf[region[0]:region[1]].copy_(self._buf16[region[0]:region[1]])  # widened to fp32
            else:
                self._buf[region[0]:region[1]].copy_(self._flat[j], non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record()
        return region, arrived

    def _prefetch(self) -> None:
        """Copy in the next step's first units, as many as the ring holds beside this step's copies out: they run
        under the coming forward and backward instead of delaying the next forward."""
        for j in range(len(self.units)):
            if self._staged[j] is not None:
                continue
            if not self._homed[j] or not self._ring.fits(2 * self._sizes[j]):
                break
            self._staged[j] = self._copy_in(j)

    def _issue(self, j: int, job: dict, ready: torch.cuda.Event) -> None:
        """Unit j on the three streams: (host→ring unless prefetched), fused AdamW on the ring, ring→host."""
        staged, self._staged[j] = self._staged[j], None
        region, arrived = staged if staged is not None else self._copy_in(j)
        buf = self._buf[region[0]:region[1]]
        with torch.cuda.stream(self._upd):
            self._upd.wait_event(ready)
            self._upd.wait_event(arrived)
            self._adamw(job, buf)
            for t in job["grads"] + [x for x in (job["scale"], job["found"]) if x is not None]:
                t.record_stream(self._upd)  # freed by zero_grad on the compute stream: not reused before this runs
            done = torch.cuda.Event()
            done.record()  # the weights are final: the unit's forward waits for this, not for the rounding below
            rounded = done
            if self._low:  # the moments rounded into the bf16 twin for the copy out
                round_to_bf16(buf, self._buf16[region[0]:region[1]], self._salt(job))
                rounded = torch.cuda.Event()
                rounded.record()
        self._done[j] = done
        with torch.cuda.stream(self._d2h):
            self._d2h.wait_event(rounded)
            self._flat[j].copy_(self._buf16[region[0]:region[1]] if self._low else buf, non_blocking=True)
            out = torch.cuda.Event()
            out.record()
        region[2] = self._out[j] = out

    def _ready(self, j: int) -> None:
        """Unit j's weights are updated before anything after this call on the compute stream, or on FSDP's
        all-gather streams, reads them."""
        if self.cuda:
            if self._done[j] is not None:
                torch.cuda.current_stream(self.device).wait_event(self._done[j])
                for s in _gather_streams(m for m, _ in self.units):
                    s.wait_event(self._done[j])
                self._done[j] = None
        elif self._pending[j] is not None:
            job, self._pending[j] = self._pending[j], None  # on the host buffers, as the GPU path copies them
            if self._low:  # widened, updated and rounded back, as the GPU path does in its ring
                wide = self._flat[j].float()
                self._adamw(job, wide)
                round_to_bf16(wide, self._flat[j], self._salt(job))
            else:
                self._adamw(job, self._flat[j])

    def flush(self, host: bool = True) -> None:
        """Every queued update is seen by the compute stream (EMA, fp8 scales read the weights next) and, with
        `host`, every copy is complete for the host too (a checkpoint or export reads the moments, a load writes
        them)."""
        for j in range(len(self.units)):
            self._ready(j)
        if host and self.cuda:
            for s in (self._h2d, self._upd, self._d2h):
                s.synchronize()

    def state_dict(self):
        self.flush()
        return super().state_dict()

    def load_state_dict(self, state_dict):
        self.flush()
        super().load_state_dict(state_dict)
        n = len(self.units)
        self._homed, self._staged, self._out = [False] * n, [None] * n, [None] * n  # early copies are stale now
        if self.cuda:
            self._ring = Ring(self.ring_elems)
        for j, (_, ps) in enumerate(self.units):  # loaded moments land on the parameters' device: back to the host
            if any(p in self.state for p in ps):
                self._home(j)
