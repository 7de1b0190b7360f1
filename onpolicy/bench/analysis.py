"""What a run's responses say: distinct completions, where they part, latency, and logprobs vs the trainer."""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Optional


def distinct(completions: list) -> dict:
    """Distinct completions of one prompt: count, how often each came, first position where one differs
    from the most common (None when all agree)."""
    counts = Counter(tuple(c) for c in completions)
    if not counts:
        return {"requests": 0, "distinct": 0, "counts": [], "first_divergence": None, "most_common": []}
    ranked = counts.most_common()
    mode = ranked[0][0]
    first = None
    for other, _ in ranked[1:]:
        pos = next((i for i, (a, b) in enumerate(zip(mode, other)) if a != b), min(len(mode), len(other)))
        first = pos if first is None else min(first, pos)
    return {"requests": len(completions), "distinct": len(counts), "counts": [c for _, c in ranked],
            "first_divergence": first, "most_common": list(mode)}


def percentile(values: list, p: float) -> Optional[float]:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def trainer_temperature(logprobs_mode: str, request_temperature: float) -> Optional[float]:
    """The temperature `token_logprobs` must use to reproduce what the server returned (None: not comparable).

    raw_logprobs (vLLM's default) are log-softmax of the logits at temperature 1; processed_logprobs divide by
    the request's temperature first (greedy requests: 1)."""
    if logprobs_mode == "raw_logprobs":
        return 1.0
    if logprobs_mode == "processed_logprobs":
        return request_temperature if request_temperature > 0 else 1.0
    return None


class TrainerLogprobs:
    """`onpolicy.token_logprobs` of the transformers model (bf16, patched), memoised per sequence.

    Sequences are scored in right-padded batches (as a trainer does); the kernels make a row's bits
    independent of its batch, so this equals scoring each alone."""

    def __init__(self, model_path: str, max_batch_tokens: int = 8192, max_rows: int = 64):
        self.model_path, self.max_batch_tokens, self.max_rows = model_path, max_batch_tokens, max_rows
        self._model = None
        self._cache: dict = {}

    def model(self):
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM

            from onpolicy import patch_model

            m = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.bfloat16).eval()
            if torch.cuda.is_available():
                m = m.cuda()
            self._model = patch_model(m)
        return self._model

    def release(self) -> None:
        """Free the model (its results stay cached): on a GPU, the next configuration's server wants the memory."""
        import torch

        self._model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def missing(self, keys: list) -> int:
        return len({k for k in keys if k not in self._cache})

    def score(self, keys: list, on_done: Callable[[int], None] = lambda k: None) -> None:
        """Compute the logprobs of every (prompt, completion, temperature) key not cached yet."""
        todo = sorted({k for k in keys if k not in self._cache}, key=lambda k: len(k[0]) + len(k[1]))
        batch: list = []
        for k in todo:
            width = len(k[0]) + len(k[1])
            if batch and (len(batch) + 1 > self.max_rows or (len(batch) + 1) * width > self.max_batch_tokens):
                self._score_batch(batch)
                on_done(len(batch))
                batch = []
            batch.append(k)
        if batch:
            self._score_batch(batch)
            on_done(len(batch))

    def _score_batch(self, batch: list) -> None:
        import torch

        from onpolicy import token_logprobs

        model = self.model()
        dev = next(model.parameters()).device
        width = max(len(p) + len(c) for p, c, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for b, (p, c, _) in enumerate(batch):
            ids[b, : len(p) + len(c)] = torch.tensor(p + c)
            mask[b, : len(p) + len(c)] = 1
        temps = {t for _, _, t in batch}
        t = temps.pop() if len(temps) == 1 else torch.tensor([t for _, _, t in batch], dtype=torch.float32)
        with torch.no_grad():
            lp = token_logprobs(model, ids.to(dev), mask.to(dev), temperature=t).float().cpu()
        for b, (p, c, temp) in enumerate(batch):
            self._cache[(p, c, temp)] = lp[b, len(p) - 1 : len(p) - 1 + len(c)].clone()

    def __call__(self, prompt, completion, temperature: float):
        key = (tuple(prompt), tuple(completion), temperature)
        self.score([key])
        return self._cache[key]


def compare_logprobs(results: list, scorer: TrainerLogprobs, logprobs_mode: str,
                     on_total: Callable[[int], None] = lambda n: None,
                     on_done: Callable[[int], None] = lambda k: None) -> dict:
    """Server logprob of every sampled token vs the trainer's, bitwise (float32 `==`)."""
    import torch

    out = {"logprobs_mode": logprobs_mode, "equal": 0, "compared": 0, "sequences": 0, "sequences_equal": 0,
           "max_abs_diff": 0.0, "first_mismatch": None}
    todo = []
    for i, r in enumerate(results):
        t = trainer_temperature(logprobs_mode, r.job.temperature) if r.ok else None
        if t is not None and r.tokens:
            todo.append((i, r, (tuple(r.job.prompt), tuple(r.tokens), t)))
    keys = [k for _, _, k in todo]
    on_total(scorer.missing(keys))
    scorer.score(keys, on_done)
    for i, r, key in todo:
        want = scorer(*key)
        got = torch.tensor(r.logprobs, dtype=torch.float32)  # JSON floats from float32 round-trip exactly
        eq = got == want
        out["equal"] += int(eq.sum())
        out["compared"] += got.numel()
        out["sequences"] += 1
        out["sequences_equal"] += bool(eq.all())
        out["max_abs_diff"] = max(out["max_abs_diff"], float((got - want).abs().max()))
        if out["first_mismatch"] is None and not eq.all():
            j = int((~eq).nonzero()[0])
            out["first_mismatch"] = {"request": i, "kind": r.job.kind, "token": j, "server": float(got[j]),
                                     "trainer": float(want[j])}
    return out
