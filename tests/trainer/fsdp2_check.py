"""Run by test_fsdp2.py under `torch.distributed.run --nproc_per_node N` (N = 2 or 4; gloo, CPU).

A tiny patched Qwen3 sharded with FSDP2 (each layer, then the root) against the same
model unsharded in the same process (every rank on the same batch, so FSDP2's averaged
gradients equal one rank's): each rank writes OUT_DIR/rank{r}.json (the ranks'
stdout shares one pipe, where two prints can interleave) with whether the token logprobs
are bitwise equal and the largest gradient difference.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import Qwen3Config, Qwen3ForCausalLM

import onpolicy


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    weights = torch.randn(2, 15, generator=torch.Generator().manual_seed(2))
    models = []
    for shard in (False, True):
        torch.manual_seed(0)
        cfg = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        m = Qwen3ForCausalLM(cfg)
        onpolicy.patch_model(m)
        if shard:
            for layer in m.model.layers:
                fully_shard(layer)
            fully_shard(m)
        lp = onpolicy.token_logprobs(m, ids, mask)
        (lp * weights).sum().backward()
        models.append((m, lp.detach()))
    (ref, lp_ref), (sharded, lp) = models
    diff = 0.0
    for p, q in zip(sharded.parameters(), ref.parameters()):
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        diff = max(diff, (g - q.grad).abs().max().item())
    # the control: transformers' own forward (unpatched) of the unsharded model must give other bits,
    # else equal logprobs would prove nothing about the patched forward under sharding
    onpolicy.unpatch_model(ref)
    with torch.no_grad():
        logits = ref(ids, attention_mask=mask).logits[:, :-1].float()
    plain = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": dist.get_world_size(), "bitwise": torch.equal(lp, lp_ref),
                   "control_bitwise": torch.equal(plain[valid], lp_ref[valid]), "grad_diff": diff}, f)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: there a rank aborted in about one run of
    # eight ("terminate called without an active exception", after both results were
    # written), failing the launch although every check had run.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
