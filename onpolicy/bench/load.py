"""The workload: one target prompt sent many times, mixed into seeded random traffic, plus bad input.

Everything is bounded: a finite schedule, a semaphore of `concurrency` requests in
flight, a timeout per request and one for the whole run.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

TARGET_SEED = 1234  # the per-request seed of every seeded (T=1) target request


@dataclass
class Job:
    kind: str  # "target" (T=0), "seeded" (T=1, fixed seed) or "background"
    prompt: list
    max_tokens: int
    temperature: float
    seed: Optional[int] = None


@dataclass
class Probe:
    case: str
    round: int


@dataclass
class Result:
    job: Job
    ok: bool
    latency_s: float = 0.0
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    completion_tokens: int = 0
    error: Optional[str] = None


@dataclass
class ProbeResult:
    case: str
    round: int
    status: Optional[int]
    message: str
    ok: bool


# case -> what it sends; every case but the first must be refused with a 4xx and a message
PROBE_CASES = {
    "disconnect mid-stream": "stream=true, read 2 chunks, close the connection (expects 200, then the server aborts)",
    "bad JSON body": "a truncated JSON body",
    "negative max_tokens": "max_tokens=-1",
    "prompt longer than the context": "max_model_len + 8 prompt tokens",
    "token id out of vocabulary": "a prompt token id past the vocabulary",
    "unknown model": "model='no-such-model'",
}


def plan(pool: list, n: int, n_seeded: int, n_background: int, max_tokens: int, prompt_len: int,
         seed: int, probe_rounds: int = 2) -> tuple[list, list[Union[Job, Probe]]]:
    """(target prompt, schedule): target, seeded and background jobs shuffled, probe rounds spread out."""
    rng = random.Random(seed)
    target = [rng.choice(pool) for _ in range(min(16, prompt_len))]
    jobs: list = [Job("target", target, max_tokens, 0.0) for _ in range(n)]
    jobs += [Job("seeded", target, max_tokens, 1.0, TARGET_SEED) for _ in range(n_seeded)]
    for _ in range(n_background):
        p = [rng.choice(pool) for _ in range(rng.randint(1, prompt_len))]
        t = rng.choice((0.0, 0.7, 1.0))
        jobs.append(Job("background", p, rng.randint(1, max_tokens), t, rng.randrange(2**31) if t else None))
    rng.shuffle(jobs)
    for r in range(probe_rounds, 0, -1):
        at = len(jobs) * r // (probe_rounds + 1)
        jobs[at:at] = [Probe(c, r) for c in PROBE_CASES]
    return target, jobs


def request_body(model: str, job: Job, stream: bool = False) -> dict:
    body = {"model": model, "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": job.temperature,
            # override any sampling defaults of the model's generation_config
            "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
            "ignore_eos": True, "logprobs": 0, "return_token_ids": True, "return_tokens_as_token_ids": True}
    if job.seed is not None:
        body["seed"] = job.seed
    if stream:
        body["stream"] = True
        body.pop("logprobs")
    return body


def _tokens_of(choice: dict) -> list:
    ids = choice.get("token_ids")
    if ids:
        return [int(t) for t in ids]
    toks = (choice.get("logprobs") or {}).get("tokens") or []
    if not all(isinstance(t, str) and t.startswith("token_id:") for t in toks):
        raise ValueError("the response has neither token_ids nor 'token_id:N' tokens (return_tokens_as_token_ids)")
    return [int(t.split(":", 1)[1]) for t in toks]


def _message(resp) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)[:300]
        return str(err)[:300]
    return str(data)[:300]


async def complete(client, model: str, job: Job) -> Result:
    import httpx

    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/completions", json=request_body(model, job))
    except httpx.HTTPError as e:
        return Result(job, False, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        return Result(job, False, dt, error=f"HTTP {r.status_code}: {_message(r)}")
    try:
        data = r.json()
        choice = data["choices"][0]
        tokens = _tokens_of(choice)
        lps = [float(x) for x in choice["logprobs"]["token_logprobs"]]
        n_gen = int(data["usage"]["completion_tokens"])
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return Result(job, False, dt, error=f"unexpected response ({e}): {r.text[:200]}")
    if len(lps) != len(tokens):
        return Result(job, False, dt, error=f"{len(tokens)} tokens but {len(lps)} logprobs")
    return Result(job, True, dt, tokens, lps, n_gen)


async def probe(client, model: str, p: Probe, target: list, max_tokens: int, max_model_len: int,
                vocab_end: int, pool: list) -> ProbeResult:
    import httpx

    def done(status, message, ok):
        return ProbeResult(p.case, p.round, status, message, ok)

    base = Job("probe", target, max(4, max_tokens), 0.0)
    try:
        if p.case == "disconnect mid-stream":
            chunks = 0
            async with client.stream("POST", "/v1/completions", json=request_body(model, base, stream=True)) as r:
                if r.status_code != 200:
                    await r.aread()
                    return done(r.status_code, _message(r), False)
                async for line in r.aiter_lines():
                    if line.startswith("data:") and "[DONE]" not in line:
                        chunks += 1
                        if chunks >= 2:
                            break
            return done(200, f"closed after {chunks} chunk(s)", chunks >= 1)  # leaving the block closes it
        if p.case == "bad JSON body":
            r = await client.post("/v1/completions", content=b'{"model": "x", "prompt": [1, 2',
                                  headers={"content-type": "application/json"})
        else:
            body = request_body(model, base)
            if p.case == "negative max_tokens":
                body["max_tokens"] = -1
            elif p.case == "prompt longer than the context":
                body["prompt"] = [pool[i % len(pool)] for i in range(max_model_len + 8)]
            elif p.case == "token id out of vocabulary":
                body["prompt"] = target[:-1] + [vocab_end + 7]
            elif p.case == "unknown model":
                body["model"] = "no-such-model"
            r = await client.post("/v1/completions", json=body)
    except httpx.HTTPError as e:
        return done(None, f"{type(e).__name__}: {e}", False)
    msg = _message(r)
    return done(r.status_code, msg, 400 <= r.status_code < 500 and bool(msg.strip()))


async def run(url: str, model: str, schedule: list, *, concurrency: int, request_timeout: float, run_timeout: float,
              max_model_len: int, vocab_end: int, pool: list, target: list, max_tokens: int,
              on_done: Callable[[], None] = lambda: None) -> tuple[list[Result], list[ProbeResult], float]:
    """Send the schedule in order, at most `concurrency` in flight; (results, probe results, wall seconds)."""
    import httpx

    results: list = [None] * len(schedule)
    sem = asyncio.Semaphore(concurrency)
    # Idle connections expire on the client (1 s) before the server closes them (uvicorn: 5 s);
    # otherwise a request sent on a connection the server is closing fails with ReadError.
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency,
                          keepalive_expiry=1.0)

    async with httpx.AsyncClient(base_url=url, timeout=request_timeout, limits=limits, trust_env=False) as client:
        async def one(i, item):
            try:
                if isinstance(item, Job):
                    results[i] = await complete(client, model, item)
                else:
                    results[i] = await probe(client, model, item, target, max_tokens, max_model_len, vocab_end, pool)
            finally:
                sem.release()
                on_done()

        async def feed():
            tasks = []
            for i, item in enumerate(schedule):
                await sem.acquire()
                tasks.append(asyncio.create_task(one(i, item)))
            await asyncio.gather(*tasks)

        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(feed(), run_timeout)
        except asyncio.TimeoutError:
            pass  # what did not finish is reported as failed below
        wall = time.perf_counter() - t0

    out, probes = [], []
    late = f"not finished within {run_timeout:.0f} s"
    for item, res in zip(schedule, results):
        if isinstance(item, Job):
            out.append(res if res is not None else Result(item, False, error=late))
        else:
            probes.append(res if res is not None else ProbeResult(item.case, item.round, None, late, False))
    return out, probes, wall
