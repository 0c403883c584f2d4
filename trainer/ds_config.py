"""The DeepSpeed config of a run, derived from the typed run config (trainer/config.py); nothing else here.

    ds = deepspeed_config(load_config("tiny"), world_size=2)     # the dict deepspeed.initialize takes
"""

from __future__ import annotations

from trainer.config import RunConfig, gradient_accumulation_steps


def deepspeed_config(cfg: RunConfig, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed config dict for this run. The optimizer is a client torch AdamW and the learning rate a pure
    function of the step (trainer.train), so neither appears here."""
    t, z = cfg.train, cfg.zero
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(cfg, world_size),
        "gradient_clipping": float(cfg.optimizer.grad_clip),
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_optimization": {
            "stage": z.stage,
            "overlap_comm": bool(z.overlap_comm),
            "contiguous_gradients": True,
            "reduce_bucket_size": int(z.reduce_bucket_size),
        },
        # torch.optim.AdamW as the client optimizer: no JIT-compiled op, and bitwise-resumable (trainer/optim.py).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if z.stage == 3:
        ds["zero_optimization"].update(
            {
                "stage3_prefetch_bucket_size": int(z.prefetch_bucket_size),
                "stage3_param_persistence_threshold": int(z.param_persistence_threshold),
                "stage3_max_live_parameters": int(z.max_live_parameters),
                # Export consolidates the fp32 shards itself (trainer/export.py); no 16-bit copy at save time.
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    return ds
