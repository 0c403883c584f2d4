"""`jpeglm train`: the Llama decoder under DeepSpeed ZeRO-3 on preprocessed shards; setup -> fit -> validate.

    torchrun --standalone --nproc_per_node 2 -m trainer.train --config tiny --data out/preprocess --run-dir RUN
    deepspeed --num_gpus 8 --module trainer.train --config 7b --data s3://bucket/out --run-dir /shared/run
    jpeglm train --config tiny --data out/preprocess --run-dir RUN            (one process)

Every process runs this module; DeepSpeed's launcher, torchrun (single node with --standalone, several with
--nnodes/--rdzv-endpoint) or a scheduler sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT. Without them it runs as
a single process. See docs/training.md for multi-node launches, the metrics and the checkpoint layout.

Determinism (what makes a killed-and-resumed run bitwise equal to an uninterrupted one): the samples of each step
are a pure function of (seed, consumed samples) (trainer/data.py); the learning rate is a pure function of the step
(set on the optimizer before each step, so there is no scheduler state to restore or to lose in a universal
checkpoint); the RNG is re-seeded for every micro-batch from (seed, position of its first sample), which does not
depend on the world size; the optimizer is torch AdamW, whose state DeepSpeed checkpoints exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from jpeglm.errors import UserError
from trainer import checkpoint as ckpt
from trainer import resume as resume_
from trainer.config import ConfigError, ModelConfig, RunConfig, gradient_accumulation_steps, load_config
from trainer.data import DataError, Manifest, SampleOrder, SampleRecord, TrainStream, ValidationSet, windows_per_row
from trainer.ds_config import deepspeed_config
from trainer.preemption import StopRequest
from trainer.validate import validate

log = logging.getLogger("trainer.train")
REFUSAL_GRACE_S = 3.0  # how long ranks other than 0 wait before exiting on a refusal rank 0 explains


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from trainer.config import presets

    parser.add_argument("--config", required=True,
                        help=f"preset name ({', '.join(presets())}: trainer/configs/NAME.yaml) or a YAML file's path")
    parser.add_argument("--data",
                        help="output folder of `jpeglm preprocess` (local path or s3://bucket/prefix) "
                             "or its manifest.json (required unless --print-config)")
    parser.add_argument("--run-dir",
                        help="folder for checkpoints, metrics.jsonl, tensorboard/, loss.png, summary.json "
                             "(a filesystem every process can reach; required unless --print-config)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (preset, overrides, --init-from's model) as YAML and exit")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (default): continue from the run dir's latest checkpoint if there is one; "
                             "'none': start fresh (refused if the run dir has checkpoints); or a checkpoint path")
    parser.add_argument("--init-from", default=None, metavar="DIR",
                        help="fine-tune: start from the weights of an exported jpeglm folder or a Hugging Face Llama "
                             "folder (e.g. the authors' released JPEG-LM weights), local or s3://; the model shape "
                             "comes from it and its tokenizer.model must be the one the data was made with "
                             "(same as train.init_from=DIR)")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                        help="config overrides, e.g. optimizer.lr=1e-3 train.max_steps=100 model.n_layers=2")
    parser.set_defaults(train_parser=parser)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """--config, its overrides and --init-from as one checked config."""
    cfg = load_config(args.config, args.overrides)
    if args.init_from:
        cfg.train.init_from = args.init_from
    if cfg.train.init_from:
        from trainer.init_from import with_init_model

        cfg = with_init_model(cfg)
    return cfg


def run(args: argparse.Namespace) -> int:
    from jpeglm.logs import setup_logging
    from trainer.run_dir import check_output_folder

    if args.print_config:
        from trainer.config import to_yaml

        print(to_yaml(resolve_config(args)), end="")
        return 0
    missing = [flag for flag, value in (("--data", args.data), ("--run-dir", args.run_dir)) if value is None]
    if missing:
        args.train_parser.error(f"the following arguments are required: {', '.join(missing)}")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's
    # Before anything logs (plan_run may warn): our format, rank 0 at INFO, each line marked with its rank.
    setup_logging(logging.INFO if rank == 0 else logging.WARNING, prefix=f"[rank {rank}] ")
    try:
        run_dir = check_output_folder(args.run_dir, "--run-dir", local_only=True)  # before loading anything
        cfg = resolve_config(args)
        plan = plan_run(cfg, args.data, run_dir, args.resume, config_name=args.config)
    except UserError as e:
        if rank != 0:
            # A plan reads the same files on every rank, so all refuse alike: rank 0 says why. Wait a moment first:
            # torchrun stops the other ranks as soon as one exits, and rank 0 may be a little behind.
            time.sleep(REFUSAL_GRACE_S)
            return e.exit_code
        raise
    except KeyboardInterrupt:
        return _interrupted_before_training(rank)
    try:
        return train(plan)
    except UserError as e:
        # From here an error can be this rank's alone (a corrupt row only it reads, its share of a resume, the
        # conversion it waited for): each rank says its own.
        if world > 1:
            e.args = (f"rank {rank}: {e}",)
        raise
    except (RuntimeError, OSError) as e:
        from pipeline.environment import problem_of
        from trainer.distributed import lost_a_peer

        if lost_a_peer(e):
            print(f"jpeglm train: rank {rank} stopped: another rank ended (its output says why)", file=sys.stderr,
                  flush=True)
            return 1
        problem = problem_of(e)
        if problem is None:
            raise
        # e.g. metrics.jsonl on a full disk: the environment must change, the last checkpoint is intact
        print(f"jpeglm train: error: rank {rank}: {problem.line('--run-dir')}; a rerun resumes from the last "
              "complete checkpoint", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return _interrupted_before_training(rank)


def _interrupted_before_training(rank: int) -> int:
    # Before the signal handlers are installed (imports, conversion, process group): nothing to save yet.
    if rank == 0:
        print("\njpeglm train: interrupted before training started; nothing was saved", file=sys.stderr, flush=True)
    return 130


def train(plan: Plan) -> int:
    if plan.finished is not None:
        return report_finished(plan)
    ctx = setup(plan)
    try:
        summary = fit(ctx)
    finally:
        ctx.close()
    return summary["exit_code"]


# ---- setup -----------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a start will do, decided from files alone (before any process group): every refusal happens here."""

    cfg: RunConfig
    config_name: str | None  # --config as given (preset name or YAML path)
    run_dir: str
    device: str
    manifest: Manifest
    tokenizer_bytes: bytes
    tokenizer: object
    point: resume_.ResumePoint | None  # None: a fresh start
    finished: dict | None  # the saved summary when the run already reached train.max_steps


@dataclass
class Context:
    cfg: RunConfig
    config_name: str | None
    run_dir: str
    manifest: Manifest
    device: str
    rank: int
    world: int
    gas: int
    engine: object
    model_cfg: ModelConfig
    stream: TrainStream
    val: ValidationSet
    record: SampleRecord
    logger: object
    byte_lengths: object  # torch tensor: bytes spelled by each token id
    tokenizer_bytes: bytes
    start_step: int
    attempt: int
    resumed_from: str | None
    peak: float | None
    tokenizer: object  # pipeline.tokenizer.Tokenizer of the data
    grid_bodies: list[bytes] | None  # validation images the sample grid completes; None: no grid (eval.sample_grid 0)
    stop: StopRequest = field(default_factory=StopRequest)

    def close(self) -> None:
        self.stream.close()
        self.logger.close()


def _read_tokenizer(manifest: Manifest):
    from pipeline import storage
    from pipeline.tokenizer import Tokenizer

    try:
        model_bytes = storage.read_bytes(manifest.tokenizer_uri)
    except FileNotFoundError:
        raise DataError(f"{manifest.tokenizer_uri} is missing: the run needs the data's tokenizer "
                        "(bits per byte, export)") from None
    tokenizer = Tokenizer.from_bytes(model_bytes)
    if tokenizer.fingerprint != manifest.fingerprint:
        raise DataError(f"{manifest.tokenizer_uri} has fingerprint {tokenizer.fingerprint[:12]}, but the manifest says "
                        f"{manifest.fingerprint[:12]}: the data folder is inconsistent")
    return model_bytes, tokenizer


def plan_run(cfg: RunConfig, data: str, run_dir: str, resume: str = "auto", config_name: str | None = None) -> Plan:
    """run_dir: as check_output_folder returned it."""
    from trainer.devices import resolve_device
    from trainer.run_dir import finished_summary

    device = resolve_device(cfg.train.device, "train.device").type
    manifest = Manifest.load(data)
    t = cfg.train
    windows = windows_per_row(manifest.seq_len, t.seq_len)
    if manifest.tokenizer.get("vocab_size", cfg.model.vocab_size) > cfg.model.vocab_size:
        raise ConfigError(f"the data's tokenizer has {manifest.tokenizer['vocab_size']} tokens but model.vocab_size="
                          f"{cfg.model.vocab_size}")
    order_fingerprint = SampleOrder(manifest.split("train"), windows, t.seed,
                                    cfg.data.shuffle_block_shards).fingerprint()
    tokenizer_bytes, tokenizer = _read_tokenizer(manifest)
    if t.init_from:
        from trainer.init_from import check_init_tokenizer

        check_init_tokenizer(t.init_from, manifest)
    point = resume_.find(resume, run_dir)
    if point:
        resume_.check_resume_state(point.state, cfg, manifest, order_fingerprint, point.path)
    finished = finished_summary(run_dir, point.step, t.max_steps) if point else None
    return Plan(cfg=cfg, config_name=config_name, run_dir=run_dir, device=device, manifest=manifest,
                tokenizer_bytes=tokenizer_bytes, tokenizer=tokenizer, point=point, finished=finished)


def report_finished(plan: Plan) -> int:
    """A rerun of a finished run: say so and show its summary, leaving every file as it is."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{plan.run_dir} is already finished: step {plan.point.step} of train.max_steps="
              f"{plan.cfg.train.max_steps} ({plan.point.path}). To train further, raise train.max_steps; for a "
              f"new run, use another --run-dir. Its summary ({os.path.join(plan.run_dir, 'summary.json')}):\n"
              + json.dumps(plan.finished, indent=2), flush=True)
    return 0


def setup(plan: Plan) -> Context:
    from trainer.distributed import launch_env

    cfg, run_dir, device, point = plan.cfg, plan.run_dir, plan.device, plan.point
    t, timeouts = cfg.train, cfg.distributed
    rank, world = launch_env(device)  # before deepspeed is imported (by the conversion, or below)
    if point and point.needs_universal(world):
        # Before the process group exists, so no collective timeout can fire however long it takes: rank 0
        # converts (unless `jpeglm checkpoint convert` did already), the others poll for the result.
        from trainer.convert import ensure_universal

        ensure_universal(point.root, point.tag, convert=rank == 0, wait_s=timeouts.startup_timeout_s)

    import torch

    import deepspeed
    from trainer.distributed import init_deepspeed, set_collective_timeout
    from trainer.metrics import MetricsLogger, peak_tflops
    from trainer.model import Transformer
    from trainer.optim import build_optimizer
    from trainer.rng import seed_all
    from trainer.run_dir import next_attempt, write_run_files

    init_deepspeed(device, timeouts.startup_timeout_s)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    gas = gradient_accumulation_steps(cfg, world)
    ds_cfg = deepspeed_config(cfg, world, load_universal=bool(point) and point.needs_universal(world))

    model_cfg = cfg.model
    if rank == 0:
        from trainer.disk import quiet_thread_failures, space_warning

        quiet_thread_failures()  # the TensorBoard writer's thread on a full disk: one line
        short = space_warning(run_dir, model_cfg.num_params(non_embedding=False), cfg.checkpoint.keep_last)
        if short:
            log.warning("%s", short)
    seed_all(t.seed)  # identical initial weights on every rank and in every run with this seed
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg, enabled=cfg.zero.stage == 3 and cfg.zero.init):
        # Transformer initializes through self.apply, which zero.Init intercepts: each partitioned parameter is
        # gathered, initialized and re-partitioned (tests/test_train_distributed.py checks the statistics).
        model = Transformer(model_cfg)
    if t.init_from and not point:
        from trainer.init_from import load_initial_weights

        load_initial_weights(model, t.init_from, rank)
    optimizer, weight_decays = build_optimizer(model, cfg.optimizer, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)

    start_step, consumed = resume_.load(engine, point, world, weight_decays) if point else (0, 0)
    attempt = next_attempt(run_dir, rank)

    stream = TrainStream(plan.manifest, t.seq_len, t.seed, t.global_batch_size, t.micro_batch_size, rank,
                         world, consumed=consumed, block_shards=cfg.data.shuffle_block_shards,
                         prefetch_micro_batches=cfg.data.prefetch_micro_batches,
                         read_threads=cfg.data.read_threads)
    val = ValidationSet(plan.manifest, t.seq_len, t.micro_batch_size, rank, world, cfg.eval.max_samples,
                        read_threads=cfg.data.read_threads)
    byte_lengths = torch.tensor([len(b) for b in plan.tokenizer.token_bytes()], dtype=torch.float64,
                                device=engine.device)
    device_name = torch.cuda.get_device_name() if device == "cuda" else None
    peak = peak_tflops(device_name, cfg.log.peak_tflops)

    logger = MetricsLogger(run_dir, rank == 0, t.max_steps, start_step, cfg.log.tensorboard)
    grid_bodies = None
    if cfg.eval.sample_grid:
        from trainer.sample_grid import validation_bodies

        grid_bodies = validation_bodies(plan.manifest.root, cfg.eval.sample_grid, plan.manifest.raw,
                                        plan.tokenizer)  # read by rank 0, broadcast
    ctx = Context(cfg=cfg, config_name=plan.config_name, run_dir=run_dir, manifest=plan.manifest, device=device,
                  rank=rank, world=world, gas=gas, engine=engine, model_cfg=model_cfg, stream=stream, val=val,
                  record=SampleRecord(run_dir, rank, world, attempt), logger=logger, byte_lengths=byte_lengths,
                  tokenizer_bytes=plan.tokenizer_bytes, start_step=start_step, attempt=attempt,
                  resumed_from=os.path.join(point.root, point.load_tag(world)) if point else None, peak=peak,
                  tokenizer=plan.tokenizer, grid_bodies=grid_bodies)
    if rank == 0:
        write_run_files(run_dir, cfg, plan.tokenizer_bytes)
        _print_header(ctx, device_name)
    set_collective_timeout(timeouts.collective_timeout_s)  # start-up is over: training collectives are short
    ctx.stop.install()
    return ctx


def _print_header(ctx: Context, device_name: str | None) -> None:
    from trainer.metrics import mfu_note

    t = ctx.cfg.train
    n = ctx.model_cfg.num_params(non_embedding=True)
    total = ctx.model_cfg.num_params(non_embedding=False)
    fpt = ctx.model_cfg.flops_per_token(t.seq_len)
    lines = [
        f"model: {n / 1e6:,.2f}M non-embedding parameters ({total / 1e6:,.2f}M with embeddings), "
        f"{ctx.model_cfg.n_layers} layers, d {ctx.model_cfg.d_model}, {ctx.model_cfg.n_heads} heads",
        f"training FLOPs per token: 6N + 12*L*d*T = {6 * n / 1e9:,.3f} + "
        f"{12 * ctx.model_cfg.n_layers * ctx.model_cfg.d_model * t.seq_len / 1e9:,.3f} = {fpt / 1e9:,.3f} GFLOP "
        f"(T={t.seq_len})",
        f"processes: {ctx.world} x {device_name or ctx.device} ({t.precision}), "
        f"ZeRO stage {ctx.cfg.zero.stage}; micro-batch {t.micro_batch_size} x accumulation {ctx.gas} "
        f"x {ctx.world} = {t.global_batch_size} samples "
        f"= {t.global_batch_size * t.seq_len:,} tokens per step",
        f"data: {ctx.manifest.root}: {ctx.stream.order.num_samples:,} train samples per epoch "
        f"({ctx.stream.windows} windows of {t.seq_len} per {ctx.manifest.seq_len}-token row), "
        f"{ctx.val.num_samples} validation samples; tokenizer {ctx.manifest.fingerprint[:12]}",
        mfu_note(ctx.peak, device_name, ctx.cfg.log.peak_tflops),
        f"collective timeout: {ctx.cfg.distributed.collective_timeout_s:g} s while training "
        f"({ctx.cfg.distributed.startup_timeout_s:g} s during start-up)",
        (f"resumed from {ctx.resumed_from} at step {ctx.start_step} (attempt {ctx.attempt})" if ctx.resumed_from
         else f"starting fresh in {ctx.run_dir}"),
    ]
    for line in lines:
        ctx.logger.write(line)


# ---- fit ---------------------------------------------------------------------------------------------------------


def train_step(ctx: Context, lr: float):
    """One optimizer step: gas micro-batches forward/backward on this rank. Returns this rank's float64 sums
    [loss_sum, tokens, bytes, stop requested] (the caller all-reduces them)."""
    import torch

    from trainer.loss import forward_loss
    from trainer.optim import set_lr
    from trainer.rng import micro_batch_seed

    engine = ctx.engine
    set_lr(engine.optimizer, lr)
    sums = torch.zeros(4, dtype=torch.float64, device=engine.device)
    for _ in range(ctx.gas):
        batch = ctx.stream.next_batch()
        ctx.record.add(batch)
        torch.manual_seed(micro_batch_seed(ctx.cfg.train.seed, batch.positions[0]))
        loss, counts = forward_loss(engine, batch, ctx.byte_lengths)
        engine.backward(loss)
        engine.step()  # DeepSpeed updates only at the accumulation boundary (the last micro-batch)
        sums[:3] += counts
    sums[3] = 1.0 if ctx.stop.requested() else 0.0
    return sums


def fit(ctx: Context) -> dict:
    import torch
    import torch.distributed as dist

    from trainer.metrics import bits_per_byte, throughput, without_unknown
    from trainer.optim import lr_at

    cfg, engine = ctx.cfg, ctx.engine
    t, o = cfg.train, cfg.optimizer
    seq_len, max_steps = t.seq_len, t.max_steps
    flops_per_token = ctx.model_cfg.flops_per_token(seq_len)
    tokens_per_step = t.global_batch_size * seq_len
    step, last_saved = ctx.start_step, ctx.start_step if ctx.resumed_from else None
    step_times: list[float] = []
    last_val: dict = {}
    started = time.perf_counter()
    engine.train()

    while step < max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, o, max_steps)
        sums = train_step(ctx, lr)
        step += 1
        ctx.record.end_step(step)
        dist.all_reduce(sums)  # also a step barrier: the time below is the slowest rank's
        if ctx.device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step_times.append(dt)
        loss_sum, tokens, n_bytes, stop = sums.tolist()
        rec = {
            "step": step,
            "loss": loss_sum / tokens if tokens else float("nan"),  # nan: this step saw padding only
            "bits_per_byte": bits_per_byte(loss_sum, n_bytes),
            "lr": lr,
            "grad_norm": _grad_norm(engine),
            "step_time_s": dt,
            "samples_seen": ctx.stream.consumed,
            "epoch": ctx.stream.consumed / ctx.stream.order.num_samples,
            **without_unknown(throughput(tokens_per_step, dt, flops_per_token, ctx.world, ctx.peak)),
        }
        ctx.logger.log(rec)
        ctx.logger.progress(step, {"loss": f"{rec['loss']:.3f}", "bpb": f"{rec['bits_per_byte']:.3f}",
                                   "lr": f"{lr:.2e}", "tok/s": f"{rec['tokens_per_s']:,.0f}"})
        if cfg.log.every_steps and step % cfg.log.every_steps == 0:
            mfu = f", MFU {rec['mfu']:.1%}" if "mfu" in rec else ""
            ctx.logger.write(f"step {step}/{max_steps}: loss {rec['loss']:.4f} ({rec['bits_per_byte']:.3f} bits/byte), "
                             f"lr {lr:.2e}, grad norm {rec['grad_norm']:.3f}, {rec['tokens_per_s']:,.0f} tokens/s, "
                             f"{rec['tflops_per_device']:.2f} TFLOP/s per device{mfu}")
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < max_steps:
            last_val = validate(ctx, step)
        if stop:
            save_checkpoint(ctx, step)
            ctx.logger.write(f"stopping on signal {ctx.stop.name()}: checkpoint saved at step {step}; "
                             "resume with --resume auto")
            return _finish(ctx, step, step_times, last_val, started, exit_code=128 + ctx.stop.signum(),
                           preempted=True)
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
            save_checkpoint(ctx, step)
            last_saved = step
    if last_saved != step:
        save_checkpoint(ctx, step)
    last_val = validate(ctx, step) or last_val
    return _finish(ctx, step, step_times, last_val, started, exit_code=0, preempted=False)


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if hasattr(norm, "item") else norm)


def save_checkpoint(ctx: Context, step: int) -> str:
    from trainer.rng import rng_state

    t0 = time.perf_counter()
    root = ckpt.checkpoints_dir(ctx.run_dir)
    loader = ctx.stream.state()
    client_state = {"step": step, "loader": loader, "rng": rng_state()}
    state = {
        "format": ckpt.CHECKPOINT_FORMAT,
        "format_version": ckpt.CHECKPOINT_FORMAT_VERSION,
        "step": step,
        "world_size": ctx.world,
        "attempt": ctx.attempt,
        "time": time.time(),
        "config": ctx.cfg.to_dict(),
        "model": ctx.model_cfg.to_dict(),
        "tokenizer": dict(ctx.manifest.tokenizer),
        "codec": ctx.manifest.raw.get("codec"),  # image size and JPEG quality of the training data
        "data": {"uri": ctx.manifest.root, "order_fingerprint": loader["order_fingerprint"],
                 "samples_per_epoch": loader["samples_per_epoch"]},
        "loader": loader,
    }
    resume_from = ckpt.latest_tag(root)
    try:
        tag = ckpt.save(ctx.engine, root, step, client_state, state, ctx.cfg.checkpoint.keep_last,
                        tokenizer_bytes=ctx.tokenizer_bytes if ctx.rank == 0 else None)
    except (RuntimeError, OSError) as e:
        from trainer.disk import checkpoint_bytes, save_failed
        from trainer.distributed import lost_a_peer

        needed = checkpoint_bytes(ctx.model_cfg.num_params(non_embedding=False))
        failed = None if lost_a_peer(e) else save_failed(e, os.path.join(root, ckpt.tag_for(step)), step, needed,
                                                         resume_from and os.path.join(root, resume_from))
        if failed is None:
            raise
        raise failed from None
    ctx.logger.write(f"step {step}: checkpoint {os.path.join(root, tag)} ({time.perf_counter() - t0:.1f} s)")
    return tag


def _finish(ctx: Context, step: int, step_times: list[float], last_val: dict, started: float, exit_code: int,
            preempted: bool) -> dict:
    from trainer.metrics import read_metrics, throughput, without_unknown
    from trainer.run_dir import METRICS, plot_losses, write_summary

    t = ctx.cfg.train
    steps_run = len(step_times)
    # The first step includes warm-up (allocations, first gathers): leave it out of the throughput.
    timed = step_times[1:] or step_times
    tokens_per_step = t.global_batch_size * t.seq_len
    perf = throughput(tokens_per_step * len(timed), sum(timed), ctx.model_cfg.flops_per_token(t.seq_len),
                      ctx.world, ctx.peak) if timed else {}
    summary = {
        "exit_code": exit_code,
        "preempted": preempted,
        "config": ctx.config_name,
        "step": step,
        "max_steps": t.max_steps,
        "steps_this_attempt": steps_run,
        "attempt": ctx.attempt,
        "resumed_from": ctx.resumed_from,
        "world_size": ctx.world,
        "device": ctx.device,
        "precision": t.precision,
        "params_non_embedding": ctx.model_cfg.num_params(non_embedding=True),
        "flops_per_token": ctx.model_cfg.flops_per_token(t.seq_len),
        "tokens_this_attempt": tokens_per_step * steps_run,
        "wall_s": time.perf_counter() - started,
        **without_unknown(perf),
        "validation_loss": last_val.get("loss"),
        "validation_bits_per_byte": last_val.get("bits_per_byte"),
        "validation_samples": last_val.get("samples"),
        "checkpoint": ckpt.latest_tag(ckpt.checkpoints_dir(ctx.run_dir)),
    }
    if ctx.rank == 0:
        records = read_metrics(os.path.join(ctx.run_dir, METRICS))
        train_losses = [r["loss"] for r in records if r["kind"] == "train"]
        summary["train_loss_last10"] = float(np.mean(train_losses[-10:])) if train_losses else None
        summary["loss_plot"] = plot_losses(ctx.run_dir, records, ctx.config_name)
        write_summary(ctx.run_dir, summary)
        ctx.logger.close()
        print("summary: " + json.dumps(summary, indent=2), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.train ARGS` = `jpeglm train ARGS` (same messages, exit codes and Ctrl-C handling)."""
    from jpeglm.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
