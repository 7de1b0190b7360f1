"""Where an op runs: the Triton path on CUDA tensors, the CPU path elsewhere.

`ONPOLICY_KERNELS_BACKEND=triton` forces the Triton path on CPU tensors too (with
`TRITON_INTERPRET=1`, for testing the GPU kernels on a CPU machine);
`ONPOLICY_KERNELS_BACKEND=cpu` forces the portable path. The two paths are each
batch-invariant but are different programs: sampler and trainer must run on
the same path, which they do when both run on the same kind of device.
"""
from __future__ import annotations


import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import envs

def backend() -> str:
    return envs.ONPOLICY_KERNELS_BACKEND


def use_triton(x: torch.Tensor) -> bool:
    b = backend()
    if b == "auto":
        return x.is_cuda
    return b == "triton"


class _Defined:
    """An op this process already defined: calls it; a second copy's registrations are dropped."""

    def __init__(self, opdef, body):
        self._opdef = opdef
        self.body = body

    def __call__(self, *args, **kwargs):
        return self._opdef(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._opdef, name)

    def register_fake(self, fn, /):
        return fn

    def register_autograd(self, backward, /, *, setup_context=None):
        return None


def custom_op(name: str, *, mutates_args):
    """`torch.library.custom_op`, defined at most once per process; the op keeps its Python
    body as `.body` and, once its autograd formula is registered, the same body and formula
    as an autograd.Function, `.function` (see `call`).

    Defining an op again (these modules run a second time on a reload, e.g. a notebook's
    autoreload) makes torch destroy the first
    definition: the dispatcher entry is freed while every op object bound before
    (torch.ops.onpolicy.*, the functions of the first import) still points at it. Calls
    through them then read freed memory -- intermittent segfaults, std::bad_alloc,
    "schema for '' not registered". So a second definition gets the first one.
    """

    def define(fn):
        opdef = OPDEFS.get(name)
        if opdef is not None:  # the first definition's body too: one implementation (and chooser) per process
            return _Defined(opdef, getattr(opdef, "body", fn))
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        op.body = fn
        op.function = None
        register = op.register_autograd

        def register_autograd(backward, /, *, setup_context=None):
            op.function = _eager_function(name, op, backward, setup_context)
            return register(backward, setup_context=setup_context)

        op.register_autograd = register_autograd
        return op

    return define


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager_function(name: str, op, backward, setup_context):
    """The op's body (`op.body`) and registered autograd formula as a torch.autograd.Function.

    forward(ctx, *args) runs the body (autograd off inside, as in the op) and then the
    registered setup_context on (inputs, output); backward is the registered one. So a
    call computes what the op computes and differentiates the same way, without the
    dispatcher's custom-op layers (autograd wrapper, redispatch, torch.compile guard,
    alias checks) that an eager training step otherwise pays per call, forward and backward.
    """

    def forward(ctx, *args):
        out = op.body(*args)
        if setup_context is not None:
            setup_context(ctx, args, out)
        return out

    cls = type(f"{name.replace('::', '_')}_eager", (torch.autograd.Function,),
               {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    return cls


def _eager_grad(args):
    """None where the call must go through the op: something traces it (torch.compile, a
    dispatch or function mode, FX proxies, fake or meta tensors). Else whether it needs
    autograd: grad is on and some tensor argument requires it. One pass over the arguments
    (every op call pays this)."""
    if (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
            or _get_current_dispatch_mode() is not None):
        return None
    grad = torch.is_grad_enabled()
    needs = False
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN or a.device.type == "meta":
                return None
            needs = needs or (grad and a.requires_grad)
        elif a is not None and not isinstance(a, (bool, int, float)):
            return None
    return needs


def direct(args) -> bool:
    """Whether a call with `args` may run an op's body instead of going through the dispatcher.

    Yes for a plain eager call that needs no autograd: nothing traces it (torch.compile,
    a dispatch or function mode, FX proxies, fake or meta tensors), and no tensor argument
    requires grad while grad is on. The body is the very function the registered op runs,
    so the result is the same bits; what is saved is the dispatcher's host time per call
    (10-20 us on this project's CPU machine; on the H200's host the difference was inside
    the timer's spread), paid at every step by the ops a vLLM decode step runs eagerly (the
    LM head, the sampler's log-softmax)."""
    return _eager_grad(args) is False


def call(op, *args):
    """`op(*args)`, run the cheapest way that computes the same thing:

    * a plain eager call needing no autograd (`direct`): the op's body itself;
    * a plain eager call needing autograd (a training step): `op.function`, the body and
      the op's registered autograd formula as an autograd.Function -- the same forward
      bits and the same backward;
    * anything traced (torch.compile, modes, fake tensors) or an op without an autograd
      formula: the registered op, through the dispatcher.
    """
    needs = _eager_grad(args)
    if needs is False:
        return op.body(*args)
    if needs:
        fn = getattr(op, "function", None)
        if fn is not None:
            return fn.apply(*args)
    return op(*args)


def rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., N] as 2-D rows [-1, N]; x itself when it is 2-D already (no view op: in a
    training step every view is one more autograd node for the backward to walk)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def shaped(t: torch.Tensor, shape) -> torch.Tensor:
    """t viewed as `shape`; t itself when it has that shape already (see `rows`)."""
    return t if t.shape == shape else t.view(shape)


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; onpolicy kernels support float32, float16 and bfloat16")


def check_out(out: torch.Tensor, shape: tuple, dtype: torch.dtype, device) -> None:
    """An op's `out=` tensor: `shape` and `dtype` on `device`, rows contiguous (it may be the first rows of
    a larger buffer, as a CUDA graph's static output is)."""
    shape = tuple(shape)
    if (tuple(out.shape) != shape or out.dtype != dtype or out.device != torch.device(device)
            or (out.numel() and (out.stride(1) != 1 or out.stride(0) != shape[1]))):
        raise ValueError(f"out must be a {shape} {dtype} tensor with contiguous rows on {device}, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()} on {out.device}")


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, dtype: bool = True) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; move both to one device")
    if dtype and a.dtype != b.dtype:
        raise TypeError(f"{name_a} is {a.dtype} but {name_b} is {b.dtype}; cast them to one dtype")
