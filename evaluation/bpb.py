"""Bits per byte of a model on a preprocess output's validation split: how well it compresses held-out JPEGs.

    bits/byte = sum of -ln p(next token) / (ln 2 x the JPEG bytes those tokens spell)

as in training (trainer/metrics.py): BOS and EOS spell no bytes but their loss counts; 8 means no compression.
The split's rows are read in order and cut into windows of the largest divisor of the row length that fits the
model's context (trainer.data.window_arrays: the same targets and masking as the trainer's validation), up to
`max_tokens` predicted tokens.
"""

from __future__ import annotations

import math

import numpy as np


def context_window(row_len: int, max_seq_len: int) -> int:
    """The largest divisor of the data's row length that fits the model's context."""
    return max(d for d in range(1, min(row_len, max_seq_len) + 1) if row_len % d == 0)


def validation_bits_per_byte(model, tokenizer, uri: str, manifest: dict, max_tokens: int, batch: int = 4,
                             split: str = "validation") -> dict:
    """{"bits_per_byte", "loss" (nats/token), "tokens", "bytes", "window"} over the first `max_tokens` predicted
    tokens of the split."""
    import torch
    import torch.nn.functional as F

    from trainer.data import IGNORE_INDEX

    device = next(model.parameters()).device
    row_len = int(manifest["seq_len"])
    window = context_window(row_len, model.cfg.max_seq_len)
    byte_len = torch.tensor([len(b) for b in tokenizer.token_bytes()], dtype=torch.float64, device=device)
    loss_sum, tokens, n_bytes = 0.0, 0, 0.0
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def flush():
        nonlocal loss_sum, tokens, n_bytes
        inputs = torch.from_numpy(np.stack([p[0] for p in pending])).to(device)
        targets = torch.from_numpy(np.stack([p[1] for p in pending])).to(device)
        with torch.no_grad():
            logits = model(inputs)
        loss_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                          ignore_index=IGNORE_INDEX, reduction="sum"))
        valid = targets != IGNORE_INDEX
        tokens += int(valid.sum())
        n_bytes += float(byte_len[targets.clamp(min=0)][valid].sum())
        pending.clear()

    for inputs, targets in _windows(uri, manifest, split, window):
        pending.append((inputs, targets))
        if len(pending) == batch:
            flush()
            if tokens >= max_tokens:
                break
    if pending:
        flush()
    return {"bits_per_byte": loss_sum / math.log(2) / n_bytes if n_bytes else float("nan"),
            "loss": loss_sum / tokens if tokens else float("nan"), "tokens": tokens, "bytes": int(n_bytes),
            "window": window}


def _windows(uri: str, manifest: dict, split: str, window: int):
    """(inputs, targets) of every window of the split's rows, in order, skipping windows with nothing to predict."""
    from pipeline import storage
    from pipeline.shards import read_samples
    from trainer.data import IGNORE_INDEX, window_arrays

    row_len = int(manifest["seq_len"])
    for shard in sorted((s for s in manifest["shards"] if s["split"] == split), key=lambda s: s["first_row"]):
        for _, row, meta in read_samples(storage.join(uri, shard["path"])):
            for w in range(row_len // window):
                inputs, targets = window_arrays(row, int(meta["valid_tokens"]), w, window)
                if (targets != IGNORE_INDEX).any():
                    yield inputs, targets
