"""Validation during training: the token-weighted loss and bits per byte of the fixed validation samples.

Every rank runs the same number of forward passes on its share (trainer/data.py ValidationSet) and each sample's
sums are placed in its own slot before one all-reduce, so the result does not depend on the world size. Whatever else is measured on the
validation side at the same moment (e.g. a grid of sampled images) belongs in `validate`, after the loss: every
rank calls it at the same step, so collectives are safe there, and rank 0 writes.
"""

from __future__ import annotations


def validation_loss(engine, val, byte_lengths) -> dict:
    """{"loss", "bits_per_byte", "tokens", "samples"} over `val`'s batches, summed over ranks."""
    import torch

    from trainer.loss import forward_loss
    from trainer.metrics import bits_per_byte

    engine.eval()
    with torch.no_grad():
        per_row = torch.cat([forward_loss(engine, batch, byte_lengths, per_row=True)[1] for batch in val.batches])
    engine.train()
    # Exact whatever the world size: each sample's sums land in its own slot (trainer/data.py), one all-reduce.
    loss_sum, tokens, n_bytes = val.total(per_row)
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
