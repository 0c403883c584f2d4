"""Bits per byte of a model on a preprocess output's validation split: how well it compresses held-out JPEGs.

    bits/byte = sum of -ln p(next token) / (ln 2 x the JPEG bytes those tokens spell)

as in training (trainer/metrics.py): BOS and EOS spell no bytes but their loss counts; 8 means no compression.
The split's rows are read in order and cut into windows of the largest divisor of the row length that fits the
model's context, through the trainer's own `trainer.data.window_slice` / `batch_arrays` and
`trainer.loss.loss_and_counts` (the same targets, masking and byte counts as its validation), up to `max_tokens`
predicted tokens.
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

    from trainer.data import batch_arrays
    from trainer.loss import loss_and_counts

    device = next(model.parameters()).device
    row_len = int(manifest["seq_len"])
    window = context_window(row_len, model.cfg.max_seq_len)
    byte_len = torch.tensor([len(b) for b in tokenizer.token_bytes()], dtype=torch.float64, device=device)
    loss_sum, tokens, n_bytes = 0.0, 0, 0.0
    pending: list = []  # window slices (trainer.data.window_slice)

    def flush():
        nonlocal loss_sum, tokens, n_bytes
        inputs, targets = (torch.from_numpy(a).to(device) for a in batch_arrays(pending, window))
        with torch.no_grad():
            _, counts = loss_and_counts(model(inputs), targets, byte_len)  # the trainer's own objective and counts
        loss_sum += float(counts[0])
        tokens += int(counts[1])
        n_bytes += float(counts[2])
        pending.clear()

    for piece in _windows(uri, manifest, split, window):
        pending.append(piece)
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
    """trainer.data.window_slice of every window of the split's rows, in order, skipping windows with nothing to
    predict."""
    from pipeline import storage
    from pipeline.shards import read_samples
    from trainer.data import window_slice

    row_len = int(manifest["seq_len"])
    for shard in sorted((s for s in manifest["shards"] if s["split"] == split), key=lambda s: s["first_row"]):
        for _, row, meta in read_samples(storage.join(uri, shard["path"])):
            for w in range(row_len // window):
                piece = window_slice(row, int(meta["valid_tokens"]), w, window)
                if piece[1] > 0:
                    yield piece
