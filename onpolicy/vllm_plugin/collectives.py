"""The tensor-parallel reduction under onpolicy: a rank-order sum beyond two ranks.

vLLM's row-parallel layers (o_proj, down_proj) and its vocab-parallel embedding
end with an all-reduce of the ranks' partial outputs (GroupCoordinator.all_reduce
-> the platform's device communicator `.all_reduce`, in vLLM 0.26 and 0.32 alike).
With two ranks every algorithm computes one correctly rounded addition, so the
plugin leaves it alone. With more, the order and the precision of the additions
depend on the algorithm (ring, tree, vLLM's custom all-reduce, the CPU's
shared-memory one) and on the message size, which the trainer cannot mirror.

onpolicy's platform therefore hands vLLM a subclass of its own device
communicator (CpuCommunicator, CudaCommunicator) whose `all_reduce`, for a group
of more than two ranks and a floating-point tensor, all-gathers the partials
(vLLM's own all-gather of that communicator: NCCL through pynccl on the GPU,
shared memory or gloo on the CPU; data movement only) and sums them with
`onpolicy_kernels.rank_sum`: float32, rank 0 first, one rounding to the tensor's
dtype. The result depends only on the partials and their rank order, and the
trainer computes the same sum (trainer/forward.row_parallel_linear). Everything
else (all-gather, broadcast, send/recv, the two-rank all-reduce, integer
all-reduces) is vLLM's unchanged.
"""
from __future__ import annotations

import torch

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# Beyond this many ranks vLLM's all-reduce is replaced (two terms: one rounding in any algorithm).
PLAIN_MAX_RANKS = 2


def needs_rank_order(world_size: int, t: torch.Tensor) -> bool:
    return world_size > PLAIN_MAX_RANKS and t.dtype in _FLOATS


def rank_order_all_reduce(comm, input_: torch.Tensor) -> torch.Tensor:
    """Sum of `input_` over the ranks of `comm`'s group: all-gather, then rank-order float32 sum."""
    import onpolicy_kernels

    x = input_.contiguous()
    parts = comm.all_gather(x.unsqueeze(0), 0)  # [world, *shape], rank order (concat-style gather on dim 0)
    return onpolicy_kernels.rank_sum(parts)


class RankOrderAllReduceMixin:
    """Placed before vLLM's communicator class in the MRO; overrides `all_reduce` only."""

    onpolicy = True

    def all_reduce(self, input_):
        if needs_rank_order(self.world_size, input_):
            return rank_order_all_reduce(self, input_)
        return super().all_reduce(input_)  # type: ignore[misc]


_SUBCLASSES: dict[str, type] = {}
_PREFIX = "Onpolicy"


def communicator_qualname(base_qualname: str) -> str:
    """The qualified name of onpolicy's subclass of the communicator class `base_qualname` (what the
    platform's `get_device_communicator_cls` returns; resolved in each worker by `__getattr__`)."""
    return f"{__name__}.{_PREFIX}{base_qualname.rsplit('.', 1)[1]}"


def subclass_for(base: type) -> type:
    if issubclass(base, RankOrderAllReduceMixin):
        return base
    name = f"{_PREFIX}{base.__name__}"
    cls = _SUBCLASSES.get(name)
    if cls is None:
        cls = type(name, (RankOrderAllReduceMixin, base), {"__module__": __name__})
        cls.__qualname__ = name
        _SUBCLASSES[name] = cls
    return cls


def __getattr__(name: str):
    # "onpolicy.vllm_plugin.collectives.OnpolicyCpuCommunicator" etc.: built on first use from the
    # platform's own communicator class, so nothing CUDA is imported on a CPU machine.
    if name.startswith(_PREFIX) and name not in _SUBCLASSES:
        import vllm.platforms as vp
        from vllm.utils.import_utils import resolve_obj_by_qualname

        platform = vp.current_platform
        base_qualname = (platform.vllm_device_communicator_cls() if getattr(platform, "onpolicy", False)
                         else platform.get_device_communicator_cls())
        base = resolve_obj_by_qualname(base_qualname)
        if f"{_PREFIX}{base.__name__}" == name:
            globals()[name] = subclass_for(base)
    if name in _SUBCLASSES:
        return _SUBCLASSES[name]
    raise AttributeError(name)


def check_tp_reduction() -> None:
    """In a worker: raise unless the tensor-parallel group reduces in rank order where it must
    (more than two ranks), i.e. its device communicator is onpolicy's subclass."""
    from vllm.distributed import get_tp_group

    from .errors import OnpolicyVllmError

    group = get_tp_group()
    if group.world_size <= PLAIN_MAX_RANKS:
        return
    comm = group.device_communicator
    if not isinstance(comm, RankOrderAllReduceMixin):
        raise OnpolicyVllmError(
            f"tensor_parallel_size={group.world_size}: the tensor-parallel group's communicator is "
            f"{type(comm).__name__}, not onpolicy's rank-order one, so the all-reduce's result depends on its "
            "algorithm; the vLLM platform of this worker was not onpolicy's when the group was built (enable "
            "the plugin with ONPOLICY_VLLM=1 or onpolicy.vllm_plugin.enable() before LLM(...))")
