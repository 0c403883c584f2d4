"""The training objective and what is counted with it, in one place for training and validation.

For a micro-batch: the mean next-token cross-entropy over its valid targets (what backward sees), and three sums
for the metrics, reduced over micro-batches and ranks by the caller: loss in nats, valid targets, and the JPEG
bytes those targets spell (bits per byte = loss / ln 2 / bytes; trainer/metrics.py).
"""

from __future__ import annotations

from trainer.data import IGNORE_INDEX

COUNTS = ("loss_sum", "tokens", "bytes")  # the entries of the counts tensor, in order


def loss_and_counts(logits, targets, byte_lengths, per_row: bool = False):
    """(mean loss over valid targets, float64 counts [loss_sum, tokens, bytes]; with per_row, one such row per
    sequence of the micro-batch, shape (micro, 3), for sums that must not depend on how rows are spread over ranks).

    A micro-batch of padding only (windows past a row's valid_tokens) gives loss 0 and no gradient, where a plain
    mean would be 0/0 = NaN and poison the weights. byte_lengths[id] = bytes spelled by token id."""
    import torch
    import torch.nn.functional as F

    valid = targets != IGNORE_INDEX
    n = valid.sum()
    flat_logits, flat_targets = logits.view(-1, logits.size(-1)), targets.view(-1)
    n_bytes = torch.where(valid, byte_lengths[targets.clamp(min=0)], 0)
    if per_row:  # one cross-entropy: the per-token losses give both the sum and the rows' sums
        per_token = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="none")
        loss_sum = per_token.sum()
        counts = torch.stack([per_token.detach().view(targets.shape).double().sum(1), valid.double().sum(1),
                              n_bytes.double().sum(1)], dim=1)
    else:
        loss_sum = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
        counts = torch.stack([loss_sum.detach().double(), n.double(), n_bytes.double().sum()])
    return loss_sum / n.clamp(min=1), counts


def forward_loss(model, batch, byte_lengths, per_row: bool = False):
    """Move a data batch to byte_lengths' device, run the model, return loss_and_counts."""
    import torch

    device = byte_lengths.device
    inputs = torch.from_numpy(batch.inputs).to(device)
    targets = torch.from_numpy(batch.targets).to(device)
    return loss_and_counts(model(inputs), targets, byte_lengths, per_row)
