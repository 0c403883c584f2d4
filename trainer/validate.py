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
    if ctx.grid_bodies is not None:
        sample_images(ctx, step)
    return rec


def sample_images(ctx, step: int) -> None:
    """What the model draws at this step: a grid of samples from BOS and completions of fixed validation images,
    RUN/images/step-N.png and TensorBoard's "samples". Collective (every rank runs the same forward passes)."""
    import time

    from trainer.sample_grid import sample_grid

    t0 = time.perf_counter()
    grid = sample_grid(ctx.engine.module, ctx.tokenizer, ctx.manifest.raw["codec"], ctx.grid_bodies, step,
                       ctx.run_dir if ctx.rank == 0 else None, constrain=ctx.cfg.eval.sample_constrain)
    ctx.logger.image("samples", grid, step)
    ctx.logger.write(f"step {step}: samples in {ctx.run_dir}/images/step-{step:06d}.png "
                     f"({time.perf_counter() - t0:.1f} s)")
