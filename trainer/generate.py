"""Batched autoregressive decoding with a KV cache: the sampling core of `jpeglm sample`, `jpeglm eval` and the
sample grids written during training.

    gens = generate(model, prompts, max_new_tokens, SamplingParams(), eos_id=tok.eos_id, eoi=EOIDetector(...))

Prompts (token lists starting with BOS) may differ in length: the batch is prefilled up to the shortest, then a
row whose prompt is longer is fed its own next prompt token instead of a sampled one until its prompt is used up
(as Meta's Llama reference generate() does), so one cache serves the batch. Sort prompts by length so that a batch
holds similar ones. A row stops at EOS, when the bytes FF D9 (JPEG EOI) appear in its decoded byte stream, after
max_new_tokens, or at the model's max_seq_len; finished rows leave the batch (and the cache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pipeline.codec import EOI  # the JPEG end marker FF D9 ends a sample
from trainer.model import KVCache, Transformer



@dataclass
class SamplingParams:
    """temperature 0 = greedy. top_k 0 / top_p 1.0 disable the filter. Defaults: the authors' settings."""

    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.9

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) fp32 -> token ids (B,): greedy, or temperature + top-k + top-p (nucleus) sampling."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already cover top_p (the best token always stays).
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class EOIDetector:
    """Finds the JPEG end-of-image marker FF D9 in each row's decoded byte stream, token by token.

    A BPE piece may hold FF D9 whole, or end with FF while the next starts with D9. In entropy-coded data a 0xFF
    byte is always stuffed (FF 00) or starts a restart marker, so FF D9 means end of image.
    """

    def __init__(self, token_bytes: list[bytes]):
        self.contains_eoi = [EOI in b for b in token_bytes]
        self.starts_d9 = [b[:1] == b"\xd9" for b in token_bytes]
        self.ends_ff = [None if not b else b[-1:] == b"\xff" for b in token_bytes]  # None: no bytes (specials)

    def prompt_state(self, prompt_tokens: list[int]) -> bool:
        """Whether the prompt's byte stream ends with FF (so a first D9 closes the image)."""
        last_ff = False
        for t in prompt_tokens:
            if self.ends_ff[t] is not None:
                last_ff = self.ends_ff[t]
        return last_ff

    def step(self, token: int, last_ff: bool) -> tuple[bool, bool]:
        """(EOI reached, new last_ff)."""
        done = self.contains_eoi[token] or (last_ff and self.starts_d9[token])
        ends = self.ends_ff[token]
        return done, last_ff if ends is None else ends


@dataclass
class Generation:
    tokens: list[int]  # generated tokens, without the prompt; includes the EOS / EOI-closing token
    stop: str  # "eos", "eoi" or "max_tokens"


@dataclass
class GenerationStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    new_tokens: int = 0
    steps: int = 0
    rows: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()  # not inference_mode: under ZeRO-3, parameters gathered here are used by training afterwards
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams,
    eos_id: int | None = None,
    eoi: EOIDetector | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    stats: GenerationStats | None = None,
    on_step=None,
    suppress_ids: list[int] | None = None,
    sync_tokens=None,
    max_len: int | None = None,
) -> list[Generation]:
    """Autoregressive decoding of a batch of prompts (each starts with BOS; see the module docstring).

    suppress_ids: tokens never to generate (e.g. <unk>, which stands for no byte).
    use_cache=False recomputes the whole sequence at every step (the reference, and the benchmark's baseline).
    max_len: at most this many tokens per row, prompt included (the model's max_seq_len always applies).
    on_step(n_active) is called after every decoding step (progress bars).
    sync_tokens(ids) -> ids is applied to each step's sampled ids: in a distributed job, broadcast them from rank 0
    so that every rank decodes the same tokens and runs the same forward passes (ZeRO-3 gathers in each).
    """
    params.validate()
    if not prompts or not all(prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    max_seq_len = min(model.cfg.max_seq_len, max_len or model.cfg.max_seq_len)
    lengths = [len(p) for p in prompts]
    if max(lengths) >= max_seq_len:
        raise ValueError(f"prompt of {max(lengths)} tokens leaves no room under max_seq_len={max_seq_len}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    limit = [min(max_seq_len, n + max_new_tokens) for n in lengths]  # total tokens per row
    stats = stats if stats is not None else GenerationStats()
    n, start = len(prompts), min(lengths)
    out: list[list[int]] = [[] for _ in range(n)]
    stop = ["max_tokens"] * n
    last_ff = [eoi.prompt_state(p[:start]) if eoi else False for p in prompts]
    active = list(range(n))  # original row index of each row still in the batch

    seq = torch.tensor([p[:start] for p in prompts], dtype=torch.long, device=device)
    shared = use_cache and n > 1 and all(p == prompts[0] for p in prompts)
    t0 = time.perf_counter()
    if shared:
        # Several samples of one prompt (unconditional, or completions of one image): prefill it once and copy
        # its cache rows.
        cache = KVCache(model.cfg, 1, max(limit), device, dtype)
        logits = model(seq[:1], cache)[:, -1].expand(n, -1).contiguous()
        cache.k = [k.repeat(n, 1, 1, 1) for k in cache.k]
        cache.v = [v.repeat(n, 1, 1, 1) for v in cache.v]
    else:
        cache = KVCache(model.cfg, n, max(limit), device, dtype) if use_cache else None
        logits = model(seq, cache)[:, -1]
    _sync(device)
    stats.prefill_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    pos = start  # position of the token chosen in this step
    while True:
        if suppress_ids:
            logits[:, suppress_ids] = float("-inf")
        tok = next_tokens(logits, params, generator)
        if sync_tokens is not None:
            tok = sync_tokens(tok)
        forced = [j for j, row in enumerate(active) if pos < lengths[row]]
        if forced:  # rows still inside their (longer) prompt take its next token
            idx = torch.tensor(forced, device=device)
            tok = tok.index_copy(0, idx, torch.tensor([prompts[active[j]][pos] for j in forced], device=device))
        tok_list = tok.tolist()  # one host sync per step: the stop tests need the ids
        keep, generated = [], 0
        for j, (row, t) in enumerate(zip(active, tok_list)):
            if pos < lengths[row]:
                if eoi is not None:
                    last_ff[row] = eoi.step(t, last_ff[row])[1]
                keep.append(j)
                continue
            out[row].append(t)
            generated += 1
            if eos_id is not None and t == eos_id:
                stop[row] = "eos"
                continue
            if eoi is not None:
                done, last_ff[row] = eoi.step(t, last_ff[row])
                if done:
                    stop[row] = "eoi"
                    continue
            if pos + 1 < limit[row]:
                keep.append(j)
        pos += 1
        stats.new_tokens += generated
        stats.steps += 1
        if on_step:
            on_step(len(keep))
        if not keep:
            break
        if len(keep) < len(active):
            # Drop finished rows: the remaining ones compute (and cache) nothing for them.
            idx = torch.tensor(keep, device=device)
            tok = tok[idx]
            active = [active[j] for j in keep]
            if cache is not None:
                cache.k = [k.index_select(0, idx) for k in cache.k]
                cache.v = [v.index_select(0, idx) for v in cache.v]
            else:
                seq = seq.index_select(0, idx)
        if cache is not None:
            logits = model(tok[:, None], cache)[:, -1]
        else:
            seq = torch.cat([seq, tok[:, None]], dim=1)
            logits = model(seq)[:, -1]
    _sync(device)
    stats.decode_s += time.perf_counter() - t0
    stats.rows.append(n)
    return [Generation(o, s) for o, s in zip(out, stop)]
