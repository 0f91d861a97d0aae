"""A simulated CUDA device for CPU-only machines: catches host/device mix-ups in the CUDA code path.

``with simulated_cuda(): ...`` makes ``device="cuda"`` work without a GPU.  A tensor "on cuda" is a
``SimCudaTensor``: it reports ``device == cuda:0`` and ``is_cuda``, keeps its real values in a CPU tensor,
and every ATen operation on it runs twice: once under PyTorch's ``FakeTensorMode`` with the devices the
tensors claim (so PyTorch's own device rules reject, for example, a CPU tensor of shape ``(n,)`` meeting a
CUDA tensor, exactly as a GPU would), and once on the real CPU values (so values, data-dependent control
flow and host reads behave as on a GPU).  Triton kernels launched with simulated tensors run in Triton's
interpreter on the real values, after checking that every tensor argument is on the simulated device.

What it catches: a host tensor meeting a device tensor in an operation (other than the CPU scalars PyTorch
allows), a host tensor handed to a device kernel, ``.numpy()`` of a device tensor, and it counts host
synchronisations (``.item()``, ``.tolist()``, copies to the host, ``nonzero``) so that code meant to stay
on the device can be checked.  What it cannot catch: anything about real GPU execution — races between
programs, memory ordering, numerics of compiled kernels, speed, memory use — and host/device mixes inside
libraries that bypass ATen (DALI's GPU pipelines, NCCL).  Backward passes cannot go through autograd's
engine (it needs a real CUDA device); ``grad_of(loss)`` runs the loss's own backward node instead.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                           FakeTensorMode)
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
# Operations that make the host wait for a CUDA device (what torch.cuda.set_sync_debug_mode reports).
_SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim",
            "aten::_unique2", "aten::unique_consecutive", "aten::repeat_interleave"}


class SimCudaTensor(torch.Tensor):
    """A tensor that claims to live on ``cuda:0``; its values are in ``.values_on_host`` (CPU)."""

    values_on_host: torch.Tensor
    fake: torch.Tensor

    @staticmethod
    def __new__(cls, real: torch.Tensor, fake: torch.Tensor):
        # Like FakeTensor: meta storage (C++ device guards see no CUDA device to initialise), CUDA dispatch
        # keys (``is_cuda``), and ``device`` answered by the mode.
        meta = torch.empty(real.untyped_storage().nbytes() // real.element_size(), dtype=real.dtype,
                           device="meta").as_strided(real.shape, real.stride(), real.storage_offset())
        t = torch.Tensor._make_subclass(cls, meta, real.requires_grad, dispatch_device=True,
                                        device_for_backend_keys=CUDA)
        t.values_on_host, t.fake = real, fake
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("simulated CUDA tensors are only usable inside simulated_cuda()")

    def tolist(self):
        _current().count_sync("Tensor.tolist")
        return self.values_on_host.tolist()

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        "to host memory first.")

    def data_ptr(self):
        return self.values_on_host.data_ptr()

    def untyped_storage(self):
        raise RuntimeError("the storage of a simulated CUDA tensor is not reachable from the host")

    def __repr__(self, **kwargs):
        return f"SimCudaTensor({self.values_on_host!r})"


class SimulatedCuda(TorchDispatchMode):
    """The dispatch mode behind ``simulated_cuda()``; ``syncs`` counts host synchronisations by kind."""

    def __init__(self):
        super().__init__()
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.syncs: Counter = Counter()
        self.pinned: set[int] = set()  # data pointers of host tensors allocated with pin_memory=True

    def count_sync(self, what: str) -> None:
        self.syncs[what] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default:
            return CUDA if isinstance(args[0], SimCudaTensor) else func(*args)
        if func in (torch.ops.aten._pin_memory.default, torch.ops.aten.is_pinned.default):
            return self._pinning(func, args[0])
        pinned = kwargs.pop("pin_memory", None)  # pinning needs a driver: remembered, not done
        flat, _ = tree_flatten((args, kwargs))
        on_device = any(isinstance(a, SimCudaTensor) for a in flat) or _names_cuda(kwargs.get("device"))
        if not on_device:
            out = func(*args, **kwargs)
            if pinned and isinstance(out, torch.Tensor):
                self.pinned.add(out.data_ptr())
            return out
        name = func._schema.name
        if name in _SYNCING or (name in ("aten::_to_copy", "aten::copy_") and self._waits_for_device(func, args,
                                                                                                    kwargs)):
            self.count_sync(name)
        fake_args, fake_kwargs = tree_map(self._to_fake, (args, kwargs))
        try:
            with self.fake_mode:
                fake_out = func(*fake_args, **fake_kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            fake_out = None  # data-dependent: checked by hand below, shaped by the real result
        real_args, real_kwargs = tree_map(_to_real, (args, kwargs))
        real_out = func(*real_args, **real_kwargs)
        if fake_out is None:
            _check_one_device(name, flat)
            return tree_map(lambda r: self._wrap_like_inputs(r), real_out)
        return _zip_wrap(real_out, fake_out)

    def _pinning(self, func, t: torch.Tensor):
        """Page-locked host memory, simulated: a copy whose address is remembered as pinned."""
        if func is torch.ops.aten.is_pinned.default:
            return t.data_ptr() in self.pinned
        out = t.clone()
        self.pinned.add(out.data_ptr())
        return out

    def _waits_for_device(self, func, args, kwargs) -> bool:
        """A copy from the device to the host, except a non-blocking one into pinned memory."""
        if func._schema.name == "aten::copy_":  # dst.copy_(src, non_blocking)
            dst, src = args[0], args[1]
            if isinstance(dst, SimCudaTensor) or not isinstance(src, SimCudaTensor):
                return False
            non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
            return not (non_blocking and dst.data_ptr() in self.pinned)
        device = kwargs.get("device")
        return isinstance(args[0], SimCudaTensor) and device is not None and not _names_cuda(device)

    def _to_fake(self, x):
        if isinstance(x, SimCudaTensor):
            return x.fake
        if isinstance(x, torch.Tensor):
            return self.fake_mode.from_tensor(x)
        return CUDA if _names_cuda(x) else x

    def _wrap_like_inputs(self, r):
        if not isinstance(r, torch.Tensor):
            return r
        with self.fake_mode:
            fake = torch.empty_strided(r.shape, r.stride(), dtype=r.dtype, device=CUDA)
        return SimCudaTensor(r, fake)


def _names_cuda(x) -> bool:
    return (isinstance(x, torch.device) and x.type == "cuda") or (isinstance(x, str) and x.startswith("cuda"))


def _to_real(x):
    if isinstance(x, SimCudaTensor):
        return x.values_on_host
    return torch.device("cpu") if _names_cuda(x) else x




def _check_one_device(name: str, flat) -> None:
    """The rule of a CUDA kernel: every tensor on the device, except CPU scalars (0-d)."""
    cpu = [a for a in flat if isinstance(a, torch.Tensor) and not isinstance(a, SimCudaTensor) and a.dim() > 0]
    if cpu:
        raise RuntimeError(f"{name}: expected all tensors to be on the same device, but found at least two "
                           f"devices, cuda:0 and {cpu[0].device}!")


def _zip_wrap(real, fake):
    if isinstance(fake, torch.Tensor):
        return SimCudaTensor(real, fake) if fake.device.type == "cuda" else real
    if isinstance(fake, (tuple, list)):
        return type(real)(_zip_wrap(r, f) for r, f in zip(real, fake))
    return real


_MODES: list[SimulatedCuda] = []


def _current() -> SimulatedCuda:
    if not _MODES:
        raise RuntimeError("simulated CUDA tensors are only usable inside simulated_cuda()")
    return _MODES[-1]


def _launch_on_real_values(run):
    """Wrap Triton's interpreter launch: tensors must be on the simulated device; run on their values."""

    def launch(self, *args, **kwargs):
        def unwrap(x):
            if isinstance(x, SimCudaTensor):
                return x.values_on_host
            if isinstance(x, torch.Tensor):
                raise RuntimeError(f"Triton kernel {getattr(self.fn, '__name__', self)} got a {x.device} tensor "
                                   f"of shape {tuple(x.shape)} on the CUDA path: a GPU would read a host address")
            return x

        args, kwargs = tree_map(unwrap, (args, kwargs))
        with _disable_current_modes():
            return run(self, *args, **kwargs)

    return launch


class _Event:
    """torch.cuda.Event on the simulated device: work is synchronous, so it has always completed."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def query(self) -> bool:
        return True

    def synchronize(self):
        pass


@contextlib.contextmanager
def simulated_cuda():
    """Make ``cuda`` a simulated device for the duration; yields the mode (``.syncs`` counts host syncs).

    Needs ``TRITON_INTERPRET=1`` (set by the test-suite's conftest) so that kernels run on the CPU.
    """
    import os

    from triton.runtime.interpreter import InterpretedFunction

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("simulated_cuda() runs Triton kernels in the interpreter: set TRITON_INTERPRET=1")
    patches = {
        (torch.cuda, "_lazy_init"): lambda: None,
        (torch.cuda, "is_available"): lambda: True,
        (torch.cuda, "current_device"): lambda: 0,
        (torch.cuda, "device_count"): lambda: 1,
        (torch.cuda, "synchronize"): lambda device=None: None,
        (torch.cuda, "get_device_name"): lambda device=None: "simulated CUDA device",
        (torch.cuda, "Event"): _Event,
        (InterpretedFunction, "run"): _launch_on_real_values(InterpretedFunction.run),
    }
    saved = {key: getattr(*key) for key in patches}
    mode = SimulatedCuda()
    lift_cpu_only = torch._C._only_lift_cpu_tensors()
    try:
        for (obj, name), value in patches.items():
            setattr(obj, name, value)
        # As FakeTensorMode does without a GPU: a no-op CUDA device guard, and torch.tensor(..., device="cuda")
        # built on the host first and then moved through the dispatcher (where the mode sees it).
        torch._C._ensureCUDADeviceGuardSet()
        torch._C._set_only_lift_cpu_tensors(True)
        _MODES.append(mode)
        with mode:
            yield mode
    finally:
        _MODES.pop()
        torch._C._set_only_lift_cpu_tensors(lift_cpu_only)
        for (obj, name), value in saved.items():
            setattr(obj, name, value)


def to_host(t):
    """The real values of a simulated tensor (a CPU tensor), without counting a sync; others unchanged."""
    return t.values_on_host if isinstance(t, SimCudaTensor) else t


def grad_of(loss: torch.Tensor, grad_output: torch.Tensor | None = None):
    """What ``loss.backward()`` hands to ``loss``'s inputs, by calling its backward node directly."""
    node = loss.grad_fn
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    return node.apply(grad_output) if hasattr(node, "_forward_cls") else node(grad_output)
