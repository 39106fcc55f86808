"""Passing blocks around the ring: every rank sends to rank + 1 and receives from rank - 1 at once,
with torch.distributed's batched point-to-point operations (P2POp + batch_isend_irecv).

A shift is issued before the step's local attention and waited for after it, so the transfer runs
while the attention computes:
- NCCL (CUDA tensors): ProcessGroupNCCL runs the send/recv kernels on its own internal stream (the
  side stream), which first waits for the work already queued on the current stream (the block being
  sent is ready). Work.wait() makes the current stream wait for the transfer, without blocking the
  host; the process group keeps the buffers alive until the transfer is done.
- gloo (CPU tensors): the transfer runs on gloo's threads; Work.wait() blocks until it is done.
- gloo with CUDA tensors (e.g. two ranks sharing one GPU, where NCCL refuses a duplicate device):
  gloo's send/recv read host memory, so each block is staged through pinned host buffers. The
  device-to-host copy must have landed before gloo reads it, so issuing a shift waits for the current
  stream (the compute queued before it); the host-to-device copy of what arrived is queued on the
  current stream after Work.wait().
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._checks import error
from ._schedule import ring_source


def _backend_for(group, device_type):
    """The backend name serving device_type in group: "gloo", "nccl", ... (torch reports a group with
    one backend per device as "cpu:gloo,cuda:nccl")."""
    backend = str(dist.get_backend(group))
    if ":" not in backend:
        return backend
    per_device = dict(entry.split(":", 1) for entry in backend.split(","))
    return per_device.get(device_type, backend)


class Ring:
    """The ring of one process group: this rank's place in it and its neighbours' global ranks."""

    def __init__(self, group, device, stage_through_host=None):
        group = dist.group.WORLD if group is None else group
        self.group = group
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise error("group", "a process group this rank belongs to",
                        f"a group without global rank {dist.get_rank()}")
        self.world_size = dist.get_world_size(group)
        self.device = device
        # P2POp takes global ranks
        self._next = dist.get_global_rank(group, (self.rank + 1) % self.world_size)
        self._prev = dist.get_global_rank(group, (self.rank - 1) % self.world_size)
        if stage_through_host is None:
            stage_through_host = device.type != "cpu" and _backend_for(group, device.type) == "gloo"
        self.stage_through_host = stage_through_host

    def source(self, step):
        """The rank whose block this rank holds at `step`."""
        return ring_source(self.rank, step, self.world_size)

    def shift(self, tensors):
        """Starts sending `tensors` to the next rank and receiving the previous rank's tensors of the same
        shapes and dtypes; returns at once. The returned Shift's wait() gives the received tensors. The
        sent tensors must not be modified until then."""
        tensors = [t.contiguous() for t in tensors]
        if self.stage_through_host:
            return _StagedShift(self, tensors)
        received = [torch.empty_like(t) for t in tensors]
        return Shift(self._start(tensors, received), received, tensors)

    def _start(self, sent, received):
        ops = [dist.P2POp(dist.isend, t, self._next, self.group) for t in sent]
        ops += [dist.P2POp(dist.irecv, t, self._prev, self.group) for t in received]
        return dist.batch_isend_irecv(ops)


class Shift:
    """One ring shift in flight."""

    def __init__(self, works, received, sent):
        self._works, self._received = works, received
        self._sent = sent  # alive until the sends are done

    def wait(self):
        for work in self._works:
            work.wait()
        self._sent = None
        return self._received


class _StagedShift(Shift):
    """A shift of device tensors over a backend that only carries host memory."""

    def __init__(self, ring, tensors):
        pin = tensors[0].is_cuda
        host_sent = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in tensors]
        for host, t in zip(host_sent, tensors):
            host.copy_(t, non_blocking=pin)
        if pin:  # gloo reads host_sent as soon as the shift is issued
            torch.cuda.current_stream(tensors[0].device).synchronize()
        host_received = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in tensors]
        super().__init__(ring._start(host_sent, host_received), host_received, host_sent)
        self._device = tensors[0].device

    def wait(self):
        host_received = super().wait()
        pin = self._device.type == "cuda"
        return [h.to(self._device, non_blocking=pin) for h in host_received]
