"""Run by tests/test_eval.py under torchrun (2 CPU processes): trainer.sample_grid.sample_grid on a model whose
parameters DeepSpeed ZeRO-3 has partitioned across the ranks. Writes OUT/rankN.json with the grid's sha256."""

from __future__ import annotations

import hashlib
import json
import os
import sys


def main(data: str, exported: str, out: str) -> int:
    import deepspeed
    import torch
    import torch.distributed as dist

    from trainer.sample_grid import sample_grid, validation_bodies
    from pipeline.tokenizer import Tokenizer
    from trainer.pretrained import load_pretrained
    from trainer.distributed import init_deepspeed

    torch.set_num_threads(1)
    init_deepspeed("cpu")
    source, meta = load_pretrained(exported)
    ds_config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = type(source)(source.cfg)
    for name, param in model.named_parameters():  # every rank holds a slice; fill it with the exported weights
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if dist.get_rank() == 0:
                param.data.copy_(source.state_dict()[name])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                           config=ds_config)
    partitioned = all(p.ds_tensor.numel() < p.ds_numel for p in engine.module.parameters())
    tok = Tokenizer.load(os.path.join(exported, "tokenizer.model"))
    grid = sample_grid(engine.module, tok, meta["codec"], validation_bodies(data, 1), 3, out, num_unconditional=2,
                       max_len=260)
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"sha256": hashlib.sha256(grid.tobytes()).hexdigest(), "partitioned": partitioned}, f)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
