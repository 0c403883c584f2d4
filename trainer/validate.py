"""Validation during training: the token-weighted loss and bits per byte of the fixed validation samples.

Every rank runs the same number of forward passes on its share (trainer/data.py ValidationSet) and the sums are
all-reduced, so the result does not depend on how the samples are spread. Whatever else is measured on the
validation side at the same moment (e.g. a grid of sampled images) belongs in `validate`, after the loss: every
rank calls it at the same step, so collectives are safe there, and rank 0 writes.
"""

from __future__ import annotations


def validation_loss(engine, val, byte_lengths) -> dict:
    """{"loss", "bits_per_byte", "tokens", "samples"} over `val`'s batches, summed over ranks."""
    import torch
    import torch.distributed as dist

    from trainer.loss import forward_loss
    from trainer.metrics import bits_per_byte

    engine.eval()
    with torch.no_grad():
        per_row = torch.cat([forward_loss(engine, batch, byte_lengths, per_row=True)[1] for batch in val.batches])
    engine.train()
    if hasattr(val, "total"):
        # Exact whatever the world size: each sample's sums land in its own slot (trainer/data.py).
        loss_sum, tokens, n_bytes = val.total(per_row)
    else:
        sums = per_row.sum(0)
        dist.all_reduce(sums)
        loss_sum, tokens, n_bytes = sums.tolist()
    return {"loss": loss_sum / tokens if tokens else float("nan"), "bits_per_byte": bits_per_byte(loss_sum, n_bytes),
            "tokens": int(tokens), "samples": val.num_samples}


def validate(ctx, step: int) -> dict:
    """The validation record of `step` (logged to metrics.jsonl / TensorBoard and printed), or {} without a
    validation split. Collective: every rank calls it at the same step."""
    if not ctx.val.batches:
        return {}
    rec = {"step": step, **validation_loss(ctx.engine, ctx.val, ctx.byte_lengths)}
    ctx.logger.log(rec, prefix="validation")
    ctx.logger.write(f"step {step}: validation loss {rec['loss']:.4f} ({rec['bits_per_byte']:.3f} bits/byte) "
                     f"on {rec['samples']} samples")
    # Training-time samples (issue 11) go here: all ranks call e.g. sample_grid(ctx, step) after the loss.
    return rec
