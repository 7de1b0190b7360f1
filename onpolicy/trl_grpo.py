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
exactly 1), and for every generation writes mismatch metrics to TRL's logs
(`onpolicy/*`, through `report_to`) and to `<run_dir>/metrics.jsonl` with a
bounded sample of per-token data for the dashboard, at TRL's step (`global_step`).
In strict mode the comparison is made in the loss forward and TRL's no-grad scoring
forward is skipped, where the loss forward runs on the sampling weights
(`_scoring_deferred`); elsewhere right after generation, on TRL's scoring forward.

With `vllm_mode="server"` the sampler is a vLLM server started with the plugin (`onpolicy serve
MODEL`, or `ONPOLICY_VLLM=1 trl vllm-serve`): once TRL connected, the server's workers are audited
(`onpolicy.server.audit_server`: every layer and the sampler onpolicy's, processed logprobs, a weight
transfer), the trainer takes the server's dtype and tensor-parallel size, and the logprobs the server
returned are compared as in colocate mode. The per-step `weights` fingerprint is the trainer's policy,
as in colocate mode; a mismatch's engine report holds the server's audit and weight checksums
(docs/server-mode.md).

Before the engine is built it refuses the settings it cannot make bitwise (penalties,
Liger, an fp32 LM head: `check_settings`). `top_k` / `top_p` / `min_p` are made bitwise:
the sampler and the policy's LM head apply one truncation (`onpolicy_kernels.truncate_logprobs`),
so the trainer scores the truncated distribution vLLM drew from; TRL's default
`bf16=True` is made bitwise (the patched forward runs with autocast off). A LoRA policy
(`peft_config`) is made bitwise: its patched forward multiplies by the merged weight TRL's sync sends,
and the sync merges out of place (trainer/lora.py). After the
engine is built it checks that the plugin runs every layer and the sampler. A run
directory holding an earlier run's records is refused unless `overwrite_run_dir=True`
or `train(resume_from_checkpoint=...)` continues it. A step whose tokens differ gets
`engine_step<N>.json` beside the metrics: what the sampler's engine ran (every mismatch in
strict mode, the first in monitor mode), so a report of a mismatch can be diagnosed.
"""
from __future__ import annotations

import contextlib
import logging
import os
import types
from typing import Optional

import torch

from .metrics import MismatchError, describe_mismatch, mismatch_metrics
from .runlog import RunLog, check_run_dir, checkpoint_step
from .trainer import patch_model
from .trainer.forward import SUPPORTED_TP, router_logits_of
from .trainer.logprobs import score_tokens
from .vllm_plugin import compat

MODES = ("strict", "monitor", "off")
logger = logging.getLogger("onpolicy")

# vLLM sampling options that change the sampled distribution before the logprobs are taken, where the
# trainer (which scores the unpenalised distribution at the temperature, truncated by GRPOConfig's own
# top_k / top_p / min_p) cannot follow. top_k / top_p / min_p here would override GRPOConfig's for vLLM only.
_GENERATION_KWARGS_OFF_POLICY = {
    "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "top_k": (0, -1, None),
    "top_p": 1.0, "min_p": (0.0, None), "logit_bias": (None, {}), "bad_words": (None, []),
    "allowed_token_ids": (None, []), "min_tokens": (0, None), "logits_processors": (None, []),
    "structured_outputs": (None, {}), "thinking_token_budget": (None,),
}


def _is_default(value, default) -> bool:
    return value in default if isinstance(default, tuple) else value == default


def check_settings(cfg, mode: str) -> list[str]:
    """Refuse, before the engine is built, the TRL settings that change the trainer's (or the sampler's)
    numbers in a way onpolicy cannot make bitwise. Returns warnings for those that are only logged.

    Made bitwise rather than refused: `bf16` / `fp16` (the patched forward runs with autocast off: the
    weights are already in the dtype vLLM runs, which `_check_dtypes` checks once the model is loaded).
    """
    if mode == "off":
        if not getattr(cfg, "vllm_importance_sampling_correction", True):
            raise ValueError("vllm_importance_sampling_correction=False: TRL then does not recompute the trainer's "
                             "logprobs of the sampled tokens, so even the control run has nothing to compare. Set "
                             "vllm_importance_sampling_correction=True")
        return []
    problems, warnings = [], []
    # top_k / top_p / min_p: made bitwise (the policy's LM head applies the sampler's truncation); only
    # their values are checked here, before the engine is built
    from .trainer.logprobs import check_truncation

    try:
        check_truncation(getattr(cfg, "top_k", 0), getattr(cfg, "top_p", 1.0), getattr(cfg, "min_p", None), 1)
    except (TypeError, ValueError) as e:
        problems.append(str(e))
    rp = getattr(cfg, "repetition_penalty", 1.0)
    if rp != 1.0:
        msg = (f"repetition_penalty={rp!r}: vLLM penalises the logits before sampling and the trainer does not, so "
               "penalised tokens are off-policy; set repetition_penalty=1.0")
        if mode == "strict":
            problems.append(msg + " (or use onpolicy='monitor' to log the mismatch instead of failing)")
        else:
            warnings.append(msg)
    for key, value in (getattr(cfg, "generation_kwargs", None) or {}).items():
        if key in _GENERATION_KWARGS_OFF_POLICY and not _is_default(value, _GENERATION_KWARGS_OFF_POLICY[key]):
            fix = (f"set GRPOConfig({key}=...) instead, which onpolicy applies on both sides"
                   if key in ("top_k", "top_p", "min_p") else "remove it from generation_kwargs")
            problems.append(f"generation_kwargs[{key!r}]={value!r}: changes vLLM's sampled distribution, which the "
                            f"trainer does not reproduce; {fix}")
    regex = getattr(cfg, "vllm_structured_outputs_regex", None)
    if regex:
        problems.append(f"vllm_structured_outputs_regex={regex!r}: vLLM masks the logits to the grammar before "
                        "sampling and the trainer does not, so masked steps are off-policy; remove it")
    if getattr(cfg, "use_liger_kernel", False):
        problems.append("use_liger_kernel=True: Liger's kernels replace the model's layers, while onpolicy runs the "
                        "trainer on the kernels vLLM runs; set use_liger_kernel=False (onpolicy's kernels replace "
                        "them)")
    if getattr(cfg, "cast_lm_head_to_fp32", False):
        problems.append("cast_lm_head_to_fp32=True: the trainer's LM head would run in float32 while vLLM's runs in "
                        "the model dtype; set cast_lm_head_to_fp32=False")
    if not getattr(cfg, "vllm_importance_sampling_correction", True):
        problems.append("vllm_importance_sampling_correction=False: TRL then does not recompute the trainer's "
                        "logprobs of the sampled tokens, so onpolicy has nothing to compare; set it to True (with "
                        "onpolicy the importance ratio is exactly 1, so the correction changes nothing)")
    if problems:
        raise ValueError(f"OnPolicyGRPOTrainer(onpolicy={mode!r}) cannot make this GRPOConfig bitwise on-policy:\n  - "
                         + "\n  - ".join(problems))
    return warnings


def config_suspects(cfg) -> list[str]:
    """Settings of this run that change the numbers without touching the kernels (for the mismatch hint)."""
    out = []
    if getattr(cfg, "repetition_penalty", 1.0) != 1.0:
        out.append(f"repetition_penalty={cfg.repetition_penalty}")
    for key, value in (getattr(cfg, "generation_kwargs", None) or {}).items():
        out.append(f"generation_kwargs[{key!r}]={value!r}")
    return out


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


def add_onpolicy_lm_head(model: torch.nn.Module, temperature: float, top_k=0, top_p=1.0, min_p=None,
                         reference_pass=None) -> None:
    """Serve TRL's `model(..., labels=..., fused_lm_head=True)` contract with onpolicy's kernels.

    top_k / top_p / min_p (GRPOConfig's, as TRL passes them to vLLM): the logprobs and entropy are
    those of the truncated distribution the onpolicy sampler drew from (`score_tokens`).
    reference_pass: a callable, true while the model serves as the reference (a PEFT policy with its
    adapter off): the full distribution then, as a separate reference model scores it."""
    from trl.trainer.utils import FusedCausalLMOutput

    previous = model.forward
    trunc = (top_k, top_p, min_p)

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                output_router_logits=None, **kwargs):
        if not fused_lm_head:
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                       ("num_items_in_batch", num_items_in_batch),
                                       ("output_router_logits", output_router_logits)) if v is not None}
            return previous(*args, **kwargs, **extra)
        if shift_labels is not None:
            raise NotImplementedError("onpolicy's LM head does not support pre-shifted labels (context parallelism)")
        input_ids = kwargs.pop("input_ids", args[0] if args else None)
        unknown = {k for k, v in kwargs.items() if v is not None and k not in ("attention_mask", "position_ids", "use_cache")}
        if unknown:
            raise NotImplementedError(f"onpolicy's LM head got inputs it does not support: {sorted(unknown)}")
        mask = labels[:, 1:] != -100
        if reference_pass is not None and reference_pass():
            top_k, top_p, min_p = 0, 1.0, None
        else:
            top_k, top_p, min_p = trunc
        with router_logits_of(self.model) as calls:  # MoE (TRL asks for the load-balancing loss): collected
            lp, ent = score_tokens(self, input_ids, kwargs.get("attention_mask"), kwargs.get("position_ids"), mask,
                                   temperature, with_entropy=True, top_k=top_k, top_p=top_p,
                                   min_p=min_p)
        n = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss, aux = -lp.sum() / n, None
        if output_router_logits:  # as transformers' MoE forward and TRL's own fused head compute it
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            cfg = self.config
            aux = load_balancing_loss_func(calls[-1], cfg.num_experts, cfg.num_experts_per_tok,
                                           kwargs.get("attention_mask"))
            loss = loss + getattr(cfg, "router_aux_loss_coef", 0.0) * aux
        return FusedCausalLMOutput(loss=loss, log_probs=lp, entropy=ent, label_mask=mask, aux_loss=aux)

    model.forward = types.MethodType(forward, model)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap fingerprint of the policy's weights (a strided sample of every parameter), to show syncs."""
    import hashlib

    with torch.no_grad():
        parts = []
        for p in model.parameters():
            p = p.detach()
            if hasattr(p, "to_local"):  # FSDP2 / DTensor: this rank's shard (no collective from one rank)
                p = p.to_local()
            flat = p.reshape(-1)
            parts.append(flat[:: max(1, flat.numel() // 64)].float())
        sample = torch.cat(parts).cpu() if parts else torch.zeros(0)  # one copy to the host
    return hashlib.sha1(sample.numpy().tobytes()).hexdigest()[:16]


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


def _scored_mask(batch: dict) -> torch.Tensor:
    """The completion tokens TRL scores (completion mask, and its tool mask where it has one), bool."""
    mask = batch["completion_mask"].bool()
    if "tool_mask" in batch:
        mask &= batch["tool_mask"].bool()
    return mask


def _peft_base(model):
    """The transformers model inside a PEFT model (the model itself otherwise)."""
    get = getattr(model, "get_base_model", None)
    return get() if get is not None and hasattr(model, "peft_config") else model


def _reference_pass_of(model):
    """A callable: whether a PEFT policy now serves as TRL's reference (`use_adapter`: its adapter disabled,
    or its frozen "ref" copy active); always false for a model without an adapter."""
    from .trainer.lora import lora_layers

    layers = lora_layers(model) if hasattr(model, "peft_config") else []
    if not layers:
        return lambda: False
    first = layers[0][1]
    return lambda: bool(first.disable_adapters) or "ref" in first.active_adapters


def _check_peft_args(peft_config, model, cfg) -> None:
    """Refuse, before the engine is built, a PEFT config (or a PEFT model passed in) the trainer's merged
    LoRA forward does not compute (trainer/lora.py)."""
    configs = [peft_config] if peft_config is not None else []
    if model is not None and not isinstance(model, str) and hasattr(model, "peft_config"):
        configs += list(model.peft_config.values())
    if not configs:
        return
    from .trainer.lora import check_lora_config

    problems = [p for c in configs for p in check_lora_config(c, bool(getattr(cfg, "disable_dropout", False)))]
    if problems:
        raise ValueError("OnPolicyGRPOTrainer cannot make this PEFT config bitwise on-policy:\n  - "
                         + "\n  - ".join(problems))


def _trl_grpo_trainer():
    from trl import GRPOTrainer

    return GRPOTrainer


def make_trainer_class():
    """Build the subclass on first use, so importing onpolicy never imports TRL."""
    GRPOTrainer = _trl_grpo_trainer()

    class OnPolicyGRPOTrainer(GRPOTrainer):
        """trl.GRPOTrainer with onpolicy's kernels on both sides (see the module docstring)."""

        def __init__(self, *args, onpolicy: str = "strict", run_dir: Optional[str] = None,
                     overwrite_run_dir: bool = False, **kwargs):
            if onpolicy not in MODES:
                raise ValueError(f"onpolicy must be one of {MODES}, got {onpolicy!r}")
            cfg = kwargs.get("args")
            if cfg is None or not getattr(cfg, "use_vllm", False):
                raise ValueError("OnPolicyGRPOTrainer compares vLLM's sampled logprobs with the trainer's: "
                                 "pass args=GRPOConfig(use_vllm=True, ...)")
            if cfg.vllm_mode not in ("colocate", "server"):
                raise ValueError(f"vllm_mode={cfg.vllm_mode!r}: OnPolicyGRPOTrainer supports 'colocate' and 'server'")
            server = cfg.vllm_mode == "server"
            import warnings

            for w in check_settings(cfg, onpolicy):  # refuses what cannot be bitwise, before the engine is built
                warnings.warn(f"onpolicy: {w}", stacklevel=2)
            if onpolicy != "off":  # LoRA (PEFT): refused configs before the engine is built
                _check_peft_args(kwargs.get("peft_config"), kwargs.get("model", args[0] if args else None), cfg)
            tp = int(getattr(cfg, "vllm_tensor_parallel_size", 1) or 1)
            if onpolicy != "off" and not server and tp not in SUPPORTED_TP:  # before the engine is built, not after
                raise ValueError(f"vllm_tensor_parallel_size={tp} is not supported with onpolicy: use 1, 2, 4 or 8 "
                                 "(the trainer mirrors vLLM's tensor-parallel reductions at those sizes)")
            self.onpolicy_mode = onpolicy
            self.onpolicy_server = None  # server mode: what the server's workers report (server_audit)
            plugin = None if onpolicy == "off" or server else "1"  # server mode: no engine in this process
            cpu_control = onpolicy == "off" and not server and not torch.cuda.is_available()
            with _env("ONPOLICY_VLLM", plugin), compat.cpu_weights_loadable(cpu_control):
                if plugin:
                    from . import vllm_plugin

                    vllm_plugin.register()  # in-process, so it needs no entry points (VLLM_PLUGINS may exclude them)
                super().__init__(*args, **kwargs)
            if plugin:
                self._verify_plugin()
            if server and onpolicy != "off":
                self.onpolicy_server = self._verify_server()
                tp = self.onpolicy_server["tensor_parallel_size"]  # the trainer mirrors the server's reductions
            if cpu_control:
                gen = self.vllm_generation
                sync = gen.sync_weights

                def sync_and_repack():
                    sync()
                    compat.repack_cpu_heads(gen.llm)

                gen.sync_weights = sync_and_repack
            self._check_dtypes()
            # a PEFT policy: true during TRL's reference pass (adapter off), which is scored, not skipped
            self._onpolicy_reference_pass = _reference_pass_of(self.model)
            if onpolicy != "off":
                # the policy scores the truncated distribution vLLM samples from (TRL passes these three
                # to vLLM); the reference model, a KL anchor, keeps the full one as in TRL
                trunc = {"top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p}
                for m in (self.model, getattr(self, "ref_model", None)):
                    if m is not None:
                        core = _peft_base(m)  # a PEFT model: its transformers model (LoRA layers inside)
                        patch_model(core, tensor_parallel_size=tp)  # mirrors vLLM's TP reductions (1, 2, 4, 8)
                        add_onpolicy_lm_head(core, self.temperature, **(trunc if m is self.model else {}),
                                             reference_pass=self._onpolicy_reference_pass)
                self._onpolicy_setup_lora()
            self.onpolicy_run_dir = run_dir or cfg.output_dir
            self.onpolicy_overwrite = overwrite_run_dir
            self.onpolicy_log = None  # opened by train(): a fresh run, or a resumed one continuing its records

        def _onpolicy_setup_lora(self):
            """A LoRA policy: refuse what the merged forward does not compute, and make TRL's weight sync
            merge with `merged_weight`, out of place (trainer/lora.py): vLLM gets the bits the trainer
            multiplies by, and the frozen base weights keep theirs."""
            if _peft_base(self.model) is self.model:
                return
            from accelerate.utils import DistributedType

            from .trainer import lora

            problems = lora.check_lora_model(self.model)
            if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
                problems.append(f"{self.accelerator.distributed_type.value} with a PEFT model: not supported yet "
                                "(the exact merge is tested unsharded); use DDP or one process")
            if problems:
                raise ValueError("OnPolicyGRPOTrainer cannot make this LoRA model bitwise on-policy:\n  - "
                                 + "\n  - ".join(problems))
            lora.install_exact_merge(self.model)

        def train(self, resume_from_checkpoint=None, *args, **kwargs):
            """`trl.GRPOTrainer.train`, opening the run directory first (before the first step).

            A run directory holding an earlier run's records (metrics.jsonl, tokens/, TensorBoard events) is
            refused unless the trainer was built with overwrite_run_dir=True (they are removed) or this call
            resumes from a checkpoint: the records after the checkpoint's global step are dropped, and the
            run continues them at the next step.
            """
            resume_step = None
            if resume_from_checkpoint:
                ckpt = resume_from_checkpoint
                if ckpt is True:
                    from transformers.trainer_utils import get_last_checkpoint

                    ckpt = get_last_checkpoint(self.args.output_dir)
                    if ckpt is None:
                        raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir} holds no "
                                         "checkpoint-* directory")
                resume_step = checkpoint_step(ckpt)
            if resume_step is None:  # every process reaches the same verdict (none waits in a collective alone)
                check_run_dir(self.onpolicy_run_dir, self.onpolicy_overwrite)
            if self.accelerator.is_main_process:  # the one process that writes the run's records
                self.onpolicy_log = RunLog.open(self.onpolicy_run_dir, overwrite=self.onpolicy_overwrite,
                                                resume_step=resume_step)
            out = super().train(resume_from_checkpoint, *args, **kwargs)
            if self.accelerator.is_main_process and self.onpolicy_log is not None:
                self.onpolicy_log.finish()  # the end record: the dashboard shows the run finished
            return out

        def _verify_plugin(self):
            """The engine TRL built must run on onpolicy (layers, attention, sampler), or the run fails now,
            not at the first weight sync or with a mismatch."""
            from .vllm_plugin import OnpolicyVllmError, verify

            llm = getattr(getattr(self, "vllm_generation", None), "llm", None)
            if llm is None:
                return
            try:
                verify(llm)
            except OnpolicyVllmError as e:
                raise OnpolicyVllmError(
                    f"the onpolicy vLLM plugin is not active on the sampler TRL built ({e}). Check that "
                    "onpolicy is installed in this Python (`pip install -e .`), that VLLM_PLUGINS (if set) does "
                    "not exclude it, and that no other platform or worker plugin replaced it") from None

        def _verify_server(self) -> dict:
            """Server mode: the server TRL connected to must run onpolicy as an RL server (every layer and
            the sampler audited in each worker, processed logprobs), in a tensor-parallel size the trainer
            mirrors. Asked by the main process (`/collective_rpc onpolicy_audit`, a dev-mode endpoint TRL's
            sync needs anyway); its verdict is shared, so every process fails together."""
            from accelerate.utils import broadcast_object_list

            from .server import ServerCheckError, audit_server

            box = [None]
            if self.accelerator.is_main_process:
                try:
                    box[0] = audit_server(self.vllm_generation.vllm_client)
                except ServerCheckError as e:
                    box[0] = str(e)
            if self.accelerator.num_processes > 1:
                broadcast_object_list(box, from_process=0)
            if isinstance(box[0], str):
                raise ValueError(box[0])
            return box[0]

        def _check_dtypes(self):
            """The trainer must compute in the dtype vLLM runs the model in, or no token can match."""
            if self.onpolicy_server is not None:  # server mode
                want = getattr(torch, self.onpolicy_server["dtype"])
                have = next(self.model.parameters()).dtype
                if want != have:
                    raise ValueError(f"the trainer model is {have} but the vLLM server runs it in {want}: pass "
                                     f"model_init_kwargs={{'dtype': '{self.onpolicy_server['dtype']}'}} in the "
                                     "GRPOConfig, or start the server with --dtype matching the trainer's")
                return
            gen = getattr(self, "vllm_generation", None)
            llm = getattr(gen, "llm", None)
            if llm is None:
                return
            want = llm.llm_engine.vllm_config.model_config.dtype
            have = next(self.model.parameters()).dtype
            if want != have and self.onpolicy_mode != "off":
                raise ValueError(f"the trainer model is {have} but vLLM runs it in {want}: pass "
                                 f"model_init_kwargs={{'dtype': '{str(want).removeprefix('torch.')}'}} in the "
                                 "GRPOConfig (bf16=True / fp16=True autocast is not enough: onpolicy runs the "
                                 "trainer in its weights' dtype, with autocast off, as vLLM runs the model)")

        def _likely_cause(self, step: int) -> str:
            """What most likely parted sampler and trainer, for the mismatch hint (config vs kernels)."""
            suspects = config_suspects(self.args)
            if suspects:
                return (f"likely cause: this run's configuration ({', '.join(suspects)}) changes vLLM's numbers "
                        "but not the trainer's; remove it")
            model = getattr(self.model, "name_or_path", None) or "<path>"
            dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
            if step > 1 and getattr(self, "_onpolicy_bitwise_steps", 0):
                return (f"likely cause: the weights vLLM samples with differ from the trainer's (earlier steps "
                        f"were bitwise, so the kernels agree): a weight sync that did not reach vLLM, or a "
                        f"parameter TRL's sync skipped. Else: run `onpolicy check --model {model} --dtype {dtype}`")
            return (f"no setting of this run is known to change the numbers, so likely the kernels: run "
                    f"`onpolicy check --model {model} --dtype {dtype}` to find the first layer where the two "
                    "stacks part")

        def _scoring_deferred(self) -> bool:
            """Whether this generation's logprobs are compared in the loss forward instead of TRL's own
            no-grad scoring forward (`old_per_token_logps`), which is then skipped.

            With onpolicy the trainer's logprobs of the sampled tokens equal the sampler's bitwise, so
            TRL's second forward over the completions only re-derives numbers the loss forward computes
            anyway: in strict mode (a mismatch stops the run before any backward), training, one
            optimisation pass per generation (num_iterations=1) and every chunk of the generation batch
            trained before the next optimizer step (gradient_accumulation_steps a multiple of
            steps_per_generation), the loss forward runs on the very weights that sampled, and TRL uses
            its logprobs as the old ones (`old_per_token_logps` absent). Elsewhere TRL's forward runs.
            """
            a = self.args
            return (self.onpolicy_mode == "strict" and self.model.training and self.num_iterations == 1
                    and a.gradient_accumulation_steps % a.steps_per_generation == 0)

        def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
            if (getattr(self, "_onpolicy_skip_scoring", False) and model is self.model
                    and not self._onpolicy_reference_pass()):
                # TRL's scoring forward of the policy, deferred to the loss forward: NaN makes TRL's importance
                # ratio exactly 1 (it zeroes NaN differences) and leaves NaN out of its mismatch metrics; the
                # tensor itself is dropped before training (see _generate_and_score_completions).
                input_ids = args[0] if args else kwargs["input_ids"]
                logits_to_keep = args[2] if len(args) > 2 else kwargs["logits_to_keep"]
                nan = torch.full((input_ids.shape[0], logits_to_keep), float("nan"), device=input_ids.device)
                return nan, None, None
            out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
            capture = getattr(self, "_onpolicy_capture", None)
            if capture is not None and not capture:  # the loss forward of a deferred comparison
                capture.append(out[0].detach())
            return out

        def _generate_and_score_completions(self, inputs):
            defer = self.onpolicy_mode != "off" and self._scoring_deferred()
            self._onpolicy_skip_scoring = defer
            try:
                out = super()._generate_and_score_completions(inputs)
            finally:
                self._onpolicy_skip_scoring = False
            mode = "train" if self.model.training else "eval"
            sampler, trainer = out.get("sampling_per_token_logps"), out.get("old_per_token_logps")
            # TRL's step: this generation feeds the optimizer step global_step + 1 (and, with
            # num_iterations / steps_per_generation > 1, the steps after it), where TRL logs its metrics.
            ctx = {"step": self.state.global_step + 1, "mode": mode,
                   "reward_mean": self._metrics[mode].get("reward", [None])[-1],
                   "reward_std": self._metrics[mode].get("reward_std", [None])[-1]}
            if defer and sampler is not None:
                out.pop("old_per_token_logps", None)  # TRL then takes the loss forward's logprobs as the old ones
                self._onpolicy_pending = {**ctx, "left": self.args.steps_per_generation, "chunks": []}
            elif sampler is not None and trainer is not None:
                self._onpolicy_compare(ctx, out["completion_ids"], _scored_mask(out), sampler, trainer)
            return out

        def _onpolicy_pass(self) -> int:
            """Which optimisation pass over its generation batch this micro-step is: 1 runs on the weights
            that sampled, 2..num_iterations on weights updated since (off-policy by design). TRL reuses
            a generation for steps_per_generation x num_iterations micro-steps (`_prepare_inputs`) and
            counts them in `_step` after each."""
            return (self._step // self.args.steps_per_generation) % self.num_iterations + 1

        def _loss_and_logprobs(self, model, inputs):
            """TRL's loss, and the per-token logprobs its forward computed (captured, detached)."""
            self._onpolicy_capture = []
            try:
                loss = super()._compute_loss(model, inputs)
                return loss, self._onpolicy_capture[0]
            finally:
                self._onpolicy_capture = None

        def _gathered_metrics(self, sampler, trainer, mask) -> dict:
            """mismatch_metrics over every process's tokens (padded to one width, then gathered)."""
            acc = self.accelerator
            g_s, g_t, g_m = (acc.gather(acc.pad_across_processes(x, dim=1)) for x in (sampler, trainer, mask.int()))
            return mismatch_metrics(g_s, g_t, g_m.bool())

        def _compute_loss(self, model, inputs):
            pending = getattr(self, "_onpolicy_pending", None)
            if (pending is None and self.model.training and self.onpolicy_mode != "off" and self.num_iterations > 1
                    and self._onpolicy_pass() > 1):
                return self._onpolicy_later_pass_loss(model, inputs)
            if pending is None or not self.model.training:
                return super()._compute_loss(model, inputs)
            loss, trainer = self._loss_and_logprobs(model, inputs)
            mask, sampler = _scored_mask(inputs), inputs["sampling_per_token_logps"]
            pending["chunks"].append((inputs["completion_ids"], mask, sampler, trainer))
            pending["left"] -= 1
            done = pending["left"] == 0  # the generation's last chunk: one record for the whole generation batch
            if not done:  # a chunk that differs (on any process) stops the run now, before its backward
                differs = (torch.where(mask, sampler, 0) != torch.where(mask, trainer, 0)).any().reshape(1).int()
                done = bool(int(self.accelerator.gather(differs).sum()))
            if done:
                self._onpolicy_pending = None
                self._onpolicy_compare(pending, *[torch.cat(x) for x in zip(*pending.pop("chunks"))])
            return loss

        def _onpolicy_later_pass_loss(self, model, inputs):
            """A later pass (num_iterations > 1): TRL's loss, and the distance of the loss forward's logprobs
            from the sampler's -- off-policy by design, never a failure -- recorded once the pass's chunks are
            done, at the optimizer step it feeds, as `pass` k and `offpolicy_*` metrics."""
            k = self._onpolicy_pass()
            later = getattr(self, "_onpolicy_later", None)
            if later is None or later["pass"] != k:
                later = self._onpolicy_later = {"pass": k, "left": self.args.steps_per_generation, "chunks": []}
            loss, trainer = self._loss_and_logprobs(model, inputs)
            later["chunks"].append((inputs["sampling_per_token_logps"], trainer, _scored_mask(inputs)))
            later["left"] -= 1
            if later["left"] == 0:
                self._onpolicy_later = None
                m = self._gathered_metrics(*(torch.cat(x) for x in zip(*later["chunks"])))
                rec = {"pass": k, **{f"offpolicy_{n}": v for n, v in m.items() if isinstance(v, (int, float))}}
                for n, v in rec.items():
                    self._metrics["train"][f"onpolicy/{n}"].append(float(v))
                if self.accelerator.is_main_process and self.onpolicy_log is not None:
                    self.onpolicy_log.log_step(self.state.global_step + 1, rec)
            return loss

        def _onpolicy_compare(self, ctx: dict, completion_ids, mask, sampler, trainer):
            """Compare the sampler's and the trainer's logprobs of one generation batch: TRL's metrics
            (`onpolicy/*`), the run log (a step record and per-token samples), and in strict mode a
            MismatchError (with what the engine ran) when a token differs."""
            acc = self.accelerator
            mode, step = ctx["mode"], ctx["step"]
            m = self._gathered_metrics(sampler, trainer, mask)
            passes = {"pass": 1} if mode == "train" and self.num_iterations > 1 else {}  # later passes: see above
            for k, v in {**m, **passes}.items():
                if isinstance(v, (int, float)):
                    self._metrics[mode][f"onpolicy/{k}"].append(float(v))
            if acc.is_main_process:
                if self.onpolicy_log is None:  # a generation outside train() (e.g. evaluate())
                    self.onpolicy_log = RunLog.open(self.onpolicy_run_dir, overwrite=self.onpolicy_overwrite)
                # the weights of this generation: a deferred comparison runs before the next optimizer step
                rec = {**m, **passes, "onpolicy": self.onpolicy_mode != "off", "reward_mean": ctx["reward_mean"],
                       "weights": weights_fingerprint(self.model), "reward_std": ctx["reward_std"]}
                samples = _token_samples(self.processing_class, completion_ids.cpu(), mask.cpu(),
                                         sampler.cpu(), trainer.cpu(), None, self.onpolicy_log.max_samples)
                self.onpolicy_log.log_step(step, rec, samples)
            if m["bitwise_equal_frac"] == 1.0:
                self._onpolicy_bitwise_steps = getattr(self, "_onpolicy_bitwise_steps", 0) + 1
            if m["bitwise_equal_frac"] < 1.0 and self.onpolicy_mode != "off":
                report = self._record_engine(step)
                if self.onpolicy_mode == "strict":
                    msg = describe_mismatch(m, step, cause=self._likely_cause(step))
                    raise MismatchError(msg + (f" What the sampler's engine ran: {report}" if report else ""))

        def _record_engine(self, step: int):
            """Write what the sampler's engine ran (linear picks, compile cache, decode graphs, versions)
            next to the metrics: at every mismatch in strict mode, at the first in monitor mode. The
            path, or None (not the main process, no in-process engine, or the report failed: logged)."""
            if not self.accelerator.is_main_process or self.onpolicy_log is None:
                return None
            if self.onpolicy_mode == "monitor" and getattr(self, "_onpolicy_engine_reported", False):
                return None
            gen = getattr(self, "vllm_generation", None)
            llm = getattr(gen, "llm", None)
            client = getattr(gen, "vllm_client", None)
            if llm is None and client is None:
                return None
            try:
                if llm is not None:
                    from .vllm_plugin.diagnostics import engine_report

                    report = engine_report(llm)
                else:  # server mode: what its workers report, and a checksum of every weight it holds
                    from .server import server_report

                    report = server_report(client)
                path = self.onpolicy_log.write_engine_report(step, report)
            except Exception as e:  # noqa: BLE001 -- the report must never hide the mismatch itself
                logger.warning("onpolicy: could not record what the engine ran at step %d: %s", step, e)
                return None
            self._onpolicy_engine_reported = True
            return path

    return OnPolicyGRPOTrainer


def __getattr__(name):
    if name == "OnPolicyGRPOTrainer":
        cls = make_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
