"""A small grid of samples while training: what the model draws at step N, next to the validation loss.

    bodies = validation_bodies(data_uri, 3)                       # once, at setup: the first validation images
    grid = sample_grid(engine.module, tokenizer, codec, bodies, step, run_dir)   # on every rank, identically
    tb.add_image("samples", grid, step, dataformats="HWC")        # rank 0

The grid's first row holds `num_unconditional` images sampled from BOS; then one row per validation image:
its prompt (the top `ratio` of its MCU rows), the model's completion, the original. Labels say how each sample
ended. The same seed at every step, so consecutive grids differ by the model only. rank 0 writes
RUN/images/step-NNNNNN.png.

Distributed: under ZeRO-3 every forward pass gathers parameters across ranks, so every rank must call this with
the same arguments and run the same forward passes: the sampled tokens are broadcast from rank 0 at each step, so
all ranks decode the same tokens and stop together. It runs under torch.no_grad and puts the model back in the
mode it found it in.
"""

from __future__ import annotations

import logging

import os

import numpy as np

log = logging.getLogger("jpeglm.train")


def validation_bodies(data_uri: str, num: int, manifest: dict | None = None, tokenizer=None) -> list[bytes]:
    """The canonical bodies of the first `num` images of a preprocess output's validation split (empty if it has
    none), the same on every rank. The first rather than spread over the split: the packed order is already a hash
    shuffle, so they are as representative as any, and only the split's first row(s) are read (spread images would
    stream most of it: ~2 GB per rank at 23M images). Under torch.distributed rank 0 reads them and broadcasts them
    (~4.5 KB each). manifest / tokenizer: the output's, when the caller has them loaded (else read from data_uri)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    bodies = None
    if not distributed or dist.get_rank() == 0:
        bodies = _first_validation_bodies(data_uri, num, manifest, tokenizer)
    if distributed:
        box = [bodies]
        dist.broadcast_object_list(box, src=0)
        bodies = box[0]
    return bodies


def _first_validation_bodies(data_uri: str, num: int, manifest: dict | None, tokenizer) -> list[bytes]:
    from pipeline import storage
    from pipeline.manifest import DataError, read_manifest, split_image_tokens
    from pipeline.tokenizer import Tokenizer

    try:
        manifest = manifest if manifest is not None else read_manifest(data_uri)
    except DataError:
        return []
    if not (manifest.get("totals") or {}).get("validation", {}).get("images", 0):
        return []
    if tokenizer is None:
        tokenizer = Tokenizer.load(storage.join(data_uri, manifest["tokenizer"]["path"]))
    return [tokenizer.decode(tokens.tolist())
            for _, _, tokens in split_image_tokens(data_uri, manifest, "validation", list(range(num)))]


def sample_grid(model, tokenizer, codec: dict, bodies: list[bytes], step: int, run_dir: str | None,
                num_unconditional: int = 4, ratio: float = 0.5, seed: int = 0, max_len: int | None = None,
                constrain: str = "jpeg") -> np.ndarray:
    """Sample the grid (see the module docstring); returns it as an (H, W, 3) uint8 array. constrain "jpeg": the
    JPEG grammar keeps every sample a whole image (trainer.generate.JpegConstraint); "none": unconstrained."""
    import torch
    import torch.distributed as dist

    from pipeline.repair import prompt_prefix
    from trainer.generate import EOIDetector, PromptRejected, SamplingParams, generate
    from trainer.grids import ending_label, make_grid
    from trainer.sampling import jpeg_constraint, render

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    device = next(model.parameters()).device
    # Up to twice the longest validation image: an untrained model never closes its images.
    longest = max((len(tokenizer.encode(b)) + 2 for b in bodies), default=model.cfg.max_seq_len)
    max_len = min(max_len or 2 * longest, model.cfg.max_seq_len)
    completions = [(b, p, [tokenizer.bos_id] + tokenizer.encode(p)) for b in bodies
                   for p in [prompt_prefix(b, ratio)]]
    constraint = jpeg_constraint(tokenizer, codec) if constrain == "jpeg" else None

    def fits(prompt: list[int]) -> bool:  # with the grammar: the prompt and the shortest way to close the image
        if constraint is None:
            return len(prompt) < max_len
        try:
            constraint.prompt_state(prompt, max_len - len(prompt))
            return True
        except PromptRejected:
            return False

    if constraint is not None and not fits([tokenizer.bos_id]):
        # A context shorter than a whole image (e.g. the tiny preset at 256x256): the grid is still drawn, cut.
        log.warning("sample grid: %d tokens cannot hold a whole %dx%d image; sampling it unconstrained (cut at the "
                    "limit)", max_len, codec["size"], codec["size"])
        constraint = None
    completions = [c for c in completions if fits(c[2])]  # a prompt the context cannot hold is left out
    prompts = [[tokenizer.bos_id]] * num_unconditional + [c[2] for c in completions]

    def broadcast(ids: torch.Tensor) -> torch.Tensor:
        dist.broadcast(ids, src=0)
        return ids

    was_training = model.training
    model.eval()
    try:
        gens = generate(model, prompts, max_len, SamplingParams(), tokenizer.eos_id,
                        EOIDetector(tokenizer.token_bytes()), torch.Generator(device=device).manual_seed(seed),
                        suppress_ids=[tokenizer.unk_id], sync_tokens=broadcast if distributed else None,
                        max_len=max_len, constraint=constraint)
    finally:
        model.train(was_training)

    samples = []
    for prompt, g in zip(prompts, gens):
        image, report = render(tokenizer.decode(prompt + g.tokens), codec)
        samples.append((image, ending_label(g.stop, report.complete, len(prompt) + len(g.tokens))))
    rows = [[im for im, _ in samples[:num_unconditional]]]
    labels = [[label for _, label in samples[:num_unconditional]]]
    for (body, prefix, _), (image, label) in zip(completions, samples[num_unconditional:]):
        rows.append([render(prefix, codec)[0], image, render(body, codec)[0]])
        labels.append([f"prompt {ratio:g}", label, "original"])
    rows, labels = [r for r in rows if r], [lab for lab in labels if lab]
    grid = make_grid(rows, labels)
    if rank == 0 and run_dir is not None:
        folder = os.path.join(run_dir, "images")  # RUN/samples/ holds the loader's per-rank sample records
        os.makedirs(folder, exist_ok=True)
        grid.save(os.path.join(folder, f"step-{step:06d}.png"))
    return np.asarray(grid)
