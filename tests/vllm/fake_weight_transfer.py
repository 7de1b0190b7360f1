"""A stand-in for NCCL in TRL's server-mode weight sync, so the sync runs on the CPU.

TRL 1.16's sync (trl/generation/vllm_client.py, `VLLMClient.update_named_params`) posts the
tensors' names, dtypes and shapes to the server's `/update_weights` while it broadcasts the
tensors over an NCCL group (`packed_nccl_broadcast_producer`); the server's worker receives them
in vLLM's NCCL weight-transfer engine and loads each with `model.load_weights`, between
`/start_weight_update` and `/finish_weight_update` (vLLM's layerwise reload). NCCL needs GPUs,
so here only the transport is replaced, on both ends:

* trainer end (`install_trainer_side`): `VLLMClient.init_communicator` asks the server's workers
  (`/collective_rpc install_fake_transfer`) to read from a directory, and the producer writes the
  tensors TRL streams into one safetensors file there (the "broadcast");
* server end (`FakeTransferExtension`, vLLM's `--worker-extension-cls`): the NCCL engine's
  `update_weights` parses the update info as vLLM does, waits for that file, and loads each
  tensor with the model's `load_weights`, in the announced order -- what the engine's receive
  does with each broadcast tensor. (The NCCL engine's own receive needs CUDA streams.)

Everything else is TRL's and vLLM's own code: the HTTP endpoints, the worker's start / update /
finish of the session, the layerwise reload, `load_weights`, the prefix-cache reset.
"""
from __future__ import annotations

import os
import time

FILE = "weights-{}.safetensors"  # one file per update, numbered from 0


def _wait_for(path: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no weights arrived at {path} in {timeout} s")
        time.sleep(0.05)


class FakeTransferExtension:
    """Mixed into the server's worker (`--worker-extension-cls fake_weight_transfer.FakeTransferExtension`)."""

    def install_fake_transfer(self, directory: str) -> str:
        import torch
        from safetensors.torch import load_file

        engine = self.weight_transfer_engine
        if engine is None:
            raise RuntimeError("the server has no weight-transfer engine (--weight-transfer-config)")
        received = [0]  # this worker's count of updates: update k reads the k-th file (every rank reads it)

        def update_weights(update_info: dict) -> None:
            info = engine.parse_update_info(update_info)  # vLLM's validation of TRL's request
            path = os.path.join(directory, FILE.format(received[0]))
            _wait_for(path)
            received[0] += 1
            tensors = load_file(path)
            for name, dtype_name, shape in zip(info.names, info.dtype_names, info.shapes):
                weight = tensors[name]
                if weight.dtype != getattr(torch, dtype_name) or list(weight.shape) != list(shape):
                    raise ValueError(f"{name}: announced {dtype_name} {shape}, got {weight.dtype} {list(weight.shape)}")
                engine.model.load_weights([(name, weight)])

        engine.update_weights = update_weights
        return type(engine).__name__


class FakeGroup:
    """The trainer end's "communicator": where the producer writes."""

    def __init__(self, directory: str):
        self.directory = directory
        self.sent = 0


def fake_producer(iterator, group, src=0, post_iter_func=None, **_):
    """`packed_nccl_broadcast_producer`'s place: every streamed tensor into one file, written atomically."""
    from safetensors.torch import save_file

    tensors = {}
    for item in iterator:
        name = item[0]
        t = post_iter_func(item) if post_iter_func is not None else item[1]
        tensors[name] = t.detach().to("cpu").contiguous().clone()
    path = os.path.join(group.directory, FILE.format(group.sent))
    save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)
    group.sent += 1


def install_trainer_side(monkeypatch, directory: str) -> None:
    """Make TRL's VLLMClient sync through the directory instead of NCCL (pytest monkeypatch)."""
    import trl.generation.vllm_client as vc

    if not vc._HAS_STATEFUL_TRAINER_ENGINE:
        raise RuntimeError("this fake follows TRL's path for vLLM >= 0.28 (packed_nccl_broadcast_producer)")

    def init_communicator(self, device=0):
        r = self.session.post(f"{self.base_url}/collective_rpc",
                              json={"method": "install_fake_transfer", "args": [str(directory)]})
        if r.status_code != 200:
            raise RuntimeError(f"install_fake_transfer: {r.status_code} {r.text}")
        self.communicator = FakeGroup(str(directory))

    monkeypatch.setattr(vc.VLLMClient, "init_communicator", init_communicator)
    monkeypatch.setattr(vc, "packed_nccl_broadcast_producer", fake_producer)
