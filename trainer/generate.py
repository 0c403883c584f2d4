"""Batched autoregressive decoding with a KV cache: the sampling core of `jpeglm sample`, `jpeglm eval` and the
sample grids written during training.

    gens = generate(model, prompts, max_new_tokens, SamplingParams(), eos_id=tok.eos_id, eoi=EOIDetector(...))

Prompts (token lists starting with BOS) may differ in length: the batch is prefilled up to the shortest, then a
row whose prompt is longer is fed its own next prompt token instead of a sampled one until its prompt is used up
(as Meta's Llama reference generate() does), so one cache serves the batch. Sort prompts by length so that a batch
holds similar ones. A row stops at EOS, when the bytes FF D9 (JPEG EOI) appear in its decoded byte stream, after
max_new_tokens, or at the model's max_seq_len; finished rows leave the batch (and the cache).

With a `JpegConstraint` (the default of `jpeglm sample`, the eval's `model_constrained` rows and the training-time
grids) every row's bytes stay a prefix of a canonical JPEG body (pipeline/jpeg_grammar.py) that can still be closed
within the row's token budget: a token is drawn from the model's (filtered) distribution renormalized over the
tokens that keep the stream valid, so each sample ends as a whole, strictly decodable image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

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
    probs, ids = sampling_set(logits, params)
    return ids.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)


def sampling_set(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) -> (probs, ids), both (B, K): the tokens sampling may draw (the top-k, then the top-p
    nucleus of them) and their probabilities, softmax(logits / T) renormalized over that set (0 outside it).

    Top-k first: sorting k = 50 candidates instead of the vocabulary is a third of the cost per step."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        logits, ids = torch.topk(logits, params.top_k, dim=-1)  # sorted, descending
    elif params.top_p < 1.0:
        logits, ids = torch.sort(logits, dim=-1, descending=True)
    else:
        ids = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)
    probs = logits.softmax(dim=-1)
    if params.top_p < 1.0:
        # Drop a token when the tokens before it already cover top_p (the best token always stays).
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= params.top_p, 0.0)
    return probs, ids


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


class PromptRejected(ValueError):
    """A prompt whose bytes are not a prefix of a canonical JPEG body (or cannot be closed within the budget)."""


class BudgetTooSmall(PromptRejected):
    """A valid prompt whose image cannot be closed within the token limit."""


class JpegConstraint:
    """Keeps each row's byte stream a valid prefix of a canonical JPEG body, token by token.

    A token is allowed when its bytes extend the row's stream by the grammar (pipeline/jpeg_grammar.py) and the
    image can still be closed within the row's remaining token budget: each byte value has a one-byte token, so
    `min_bytes_to_complete` more tokens always suffice. BOS only opens a prompt; EOS only after EOI (a row stops at
    EOI, so never in practice); <unk> and other specials never. Transitions are memoized per (state, token).
    """

    def __init__(self, grammar, token_bytes: list[bytes], bos_id: int | None = None):
        self.grammar = grammar
        self.bos_id = bos_id
        # b"" stands for specials and <unk>: no byte, never allowed inside an image.
        self.token_bytes = [b or None for b in token_bytes]
        single = {b[0] for b in token_bytes if len(b) == 1}
        if len(single) < 256:
            missing = sorted(set(range(256)) - single)[:8]
            raise ValueError(f"the tokenizer has no one-byte token for byte(s) {[hex(b) for b in missing]}: the "
                             "token budget of a constrained row could not be guaranteed")
        self._memo: dict = {}
        self._start = grammar.start()
        self.draws = self.rejected = 0  # sampled tokens checked, and how many of them had to be drawn again

    def start(self):
        return self._start

    def step(self, state, token: int):
        """(new state, shortest completion in bytes) after `token`, or None when the token is not allowed."""
        key = (state, token)
        hit = self._memo.get(key, False)
        if hit is not False:
            return hit
        data = self.token_bytes[token] if 0 <= token < len(self.token_bytes) else None
        new = None if data is None else self.grammar.advance(state, data)
        hit = None if new is None else (new, self.grammar.min_bytes_to_complete(new))
        if len(self._memo) > 2_000_000:  # bounded: a long eval revisits the same states, a leak would not
            self._memo.clear()
        self._memo[key] = hit
        return hit

    def allows(self, state, token: int, budget: int) -> bool:
        """Whether `token` keeps the row valid and closable with `budget` tokens left after it."""
        r = self.step(state, token)
        return r is not None and r[1] <= budget

    def allowed_mask(self, state, budget: int, device) -> torch.Tensor:
        """(V,) bool: every allowed token (used when sampling's first draws are rejected)."""
        return torch.tensor([self.allows(state, t, budget) for t in range(len(self.token_bytes))], device=device)

    def is_complete(self, state) -> bool:
        return self.grammar.is_complete(state)

    def prompt_state(self, prompt: list[int], budget: int):
        """The state after a prompt (BOS first, then body tokens); PromptRejected naming the first bad byte."""
        state, offset = self._start, 0
        for i, t in enumerate(prompt):
            if i == 0 and t == self.bos_id:
                continue
            data = self.token_bytes[t] if 0 <= t < len(self.token_bytes) else None
            if data is None:
                raise PromptRejected(f"prompt token {i} (id {t}) stands for no byte of an image")
            new = self.grammar.advance(state, data)
            if new is None:
                bad, before = _first_bad_byte(self.grammar, state, data)
                raise PromptRejected(f"the prompt is not the start of a canonical JPEG body: byte {offset + bad} "
                                     f"(0x{data[bad]:02X}, in prompt token {i}) is invalid there: "
                                     f"{self.grammar.explain(before, data[bad])}")
            state, offset = new, offset + len(data)
        need = self.grammar.min_bytes_to_complete(state)
        if need > budget:
            raise BudgetTooSmall(f"closing the image after this prompt takes at least {need} more tokens, but only "
                                 f"{budget} fit: raise the token limit")
        return state


def _first_bad_byte(grammar, state, data: bytes) -> tuple[int, object]:
    """(index of the first byte of `data` the grammar refuses after `state`, the state before it)."""
    for i in range(len(data)):
        nxt = grammar.advance(state, data[i : i + 1])
        if nxt is None:
            return i, state
        state = nxt
    raise AssertionError("every byte is valid alone but not together")


def _constrained_draw(logits_row: torch.Tensor, probs_row: torch.Tensor | None, ids_row: torch.Tensor | None,
                      first: int, state, constraint: JpegConstraint, budget: int, params: SamplingParams,
                      generator: torch.Generator | None) -> int:
    """A token from the row's sampling distribution renormalized over the allowed tokens, given that the first
    draw `first` was refused; when the top-k/top-p set holds no allowed token, from the allowed tokens of the full
    (temperature-scaled) distribution."""
    if params.temperature == 0:  # greedy: the most likely allowed token
        for t in torch.argsort(logits_row, descending=True).tolist():
            if constraint.allows(state, t, budget):
                return t
        raise RuntimeError("no token is allowed: the grammar reached a dead end (a bug)")
    # The allowed tokens of the set, then one draw among them by their probabilities (the same as masking the
    # refused draw and redrawing until a token is allowed, in one step). In log space: renormalizing the few allowed
    # tokens of a peaked distribution (low temperature) must not underflow (torch.multinomial silently returns
    # index 0 for a distribution of denormals).
    ids = ids_row.tolist()
    keep = [i for i, (t, p) in enumerate(zip(ids, probs_row.tolist()))
            if p > 0 and t != first and constraint.allows(state, t, budget)]
    if keep:
        logp = probs_row.log().index_select(0, torch.tensor(keep, device=probs_row.device))
        return ids[keep[int(torch.multinomial(logp.softmax(-1), 1, generator=generator))]]
    # The top-k/top-p set holds no allowed token: the allowed tokens of the full distribution.
    mask = constraint.allowed_mask(state, budget, logits_row.device)
    masked = (logits_row / params.temperature).masked_fill(~mask, float("-inf"))
    if not torch.isfinite(masked).any():
        raise RuntimeError("no token is allowed: the grammar reached a dead end (a bug)")
    return int(torch.multinomial(masked.softmax(-1), 1, generator=generator))


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
    constraint: JpegConstraint | None = None,
) -> list[Generation]:
    """Autoregressive decoding of a batch of prompts (each starts with BOS; see the module docstring).

    suppress_ids: tokens never to generate (e.g. <unk>, which stands for no byte).
    use_cache=False recomputes the whole sequence at every step (the reference, and the benchmark's baseline).
    max_len: at most this many tokens per row, prompt included (the model's max_seq_len always applies).
    on_step(n_active) is called after every decoding step (progress bars).
    constraint: keep every row a valid, closable JPEG body (module docstring); a prompt it rejects raises
    PromptRejected before any decoding.
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
    # A row's grammar state after its whole prompt: rows still inside their prompt are fed it, not constrained.
    state = [constraint.prompt_state(p, lim - len(p)) for p, lim in zip(prompts, limit)] if constraint else None
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
        if constraint is None:
            tok = next_tokens(logits, params, generator)
        else:
            tok = _constrained_tokens(logits, params, generator, constraint, state, active, pos, lengths, limit)
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
            if constraint is not None:
                stepped = constraint.step(state[row], t)
                if stepped is None:  # only a token broadcast from another rank could do this
                    raise RuntimeError(f"row {row}: token {t} breaks the JPEG grammar at position {pos}")
                state[row] = stepped[0]
                if constraint.is_complete(state[row]):
                    stop[row] = "eoi"
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
    return [Generation(o, s) for o, s in zip(out, stop)]


def _constrained_tokens(logits, params, generator, constraint, state, active, pos, lengths, limit) -> torch.Tensor:
    """One step's tokens under the constraint: a batched draw as unconstrained, then, per row, a check of the drawn
    token (a memoized lookup) and a redraw only where it is not allowed."""
    if params.temperature == 0:
        probs = ids = None
        tok = logits.argmax(dim=-1)
    else:
        probs, ids = sampling_set(logits, params)
        tok = ids.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)
    tok_list = tok.tolist()
    redrawn = False
    for j, row in enumerate(active):
        if pos < lengths[row]:
            continue
        budget = limit[row] - pos - 1  # tokens this row may still take after this one
        constraint.draws += 1
        if not constraint.allows(state[row], tok_list[j], budget):
            constraint.rejected += 1
            tok_list[j] = _constrained_draw(logits[j], None if probs is None else probs[j],
                                            None if ids is None else ids[j], tok_list[j], state[row], constraint,
                                            budget, params, generator)
            redrawn = True
    return torch.tensor(tok_list, device=tok.device) if redrawn else tok
