"""Training metrics: loss, bits per byte, throughput, TFLOP/s, MFU; written to JSONL, TensorBoard and a progress bar.

Bits per byte. The data are JPEG bytes, so compression is measured per byte, not per token:

    bits/byte = sum over predicted tokens of -ln p(token)  /  (ln 2 * number of JPEG bytes those tokens spell)

A token's bytes come from the tokenizer (Tokenizer.token_bytes(): BOS/EOS spell 0 bytes, but their loss counts).
With ~1.05 bytes per token, bits/byte is about bits/token / 1.05; 8 bits/byte means no compression at all.

Throughput. Model FLOPs per token are 6N + 12*L*d*T (ModelConfig.flops_per_token: N non-embedding parameters,
T the context); TFLOP/s per device = tokens/s x FLOPs per token / devices; MFU = that / the device's dense peak.
Activation recomputation is not counted (it is "model" FLOPs utilization).
"""

from __future__ import annotations

import json
import math
import os
import time

# Dense bf16/fp16 tensor-core peaks in TFLOP/s per device (vendor datasheets, without sparsity). Matched in order
# against torch.cuda.get_device_name(), so more specific names come first.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
]


def peak_tflops(device_name: str | None, override: float | None = None) -> float | None:
    """The per-device peak for MFU: the override if given, else the table entry for the device, else None."""
    if override:
        return float(override)
    if not device_name:
        return None
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def mfu_note(peak: float | None, device_name: str | None, override: float | None) -> str:
    """One line said at the start of a run: the peak MFU is quoted against, or how to get MFU at all."""
    if peak:
        source = "log.peak_tflops" if override else device_name
        return f"MFU: against a dense peak of {peak:g} TFLOP/s per device ({source})"
    why = f"{device_name} is not in trainer.metrics.PEAK_TFLOPS" if device_name else "no peak is known for a CPU"
    return (f"MFU: not reported ({why}); set log.peak_tflops=N, the device's dense bf16 TFLOP/s (e.g. 989 for an "
            "H100 SXM), to get it")


def without_unknown(perf: dict) -> dict:
    """Throughput figures without "mfu": None: records carry MFU only when a peak is known (mfu_note says how)."""
    return {k: v for k, v in perf.items() if v is not None}


def bits_per_byte(loss_sum_nats: float, num_bytes: float) -> float:
    return loss_sum_nats / math.log(2) / num_bytes if num_bytes else float("nan")


def throughput(tokens: float, seconds: float, flops_per_token: float, devices: int, peak: float | None) -> dict:
    tokens_per_s = tokens / seconds if seconds > 0 else float("nan")
    tflops = tokens_per_s * flops_per_token / devices / 1e12
    return {
        "tokens_per_s": tokens_per_s,
        "tflops_per_device": tflops,
        "mfu": tflops / peak if peak else None,
    }


class MetricsLogger:
    """Rank 0's sink: appends every record to RUN/metrics.jsonl, scalars to TensorBoard (tensorboardX), and shows a
    tqdm progress bar. Other ranks get a logger whose methods do nothing."""

    def __init__(self, run_dir: str, enabled: bool, total_steps: int, initial_step: int, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=initial_step or None)
        from tqdm import tqdm

        self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True,
                         mininterval=1.0, disable=None)  # None: no bar when stderr is not a terminal (logs, CI)

    def log(self, record: dict, prefix: str = "train") -> None:
        """One record: must hold "step"; numeric values also go to TensorBoard as prefix/name."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), "kind": prefix, **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time", "kind") and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def progress(self, step: int, postfix: dict) -> None:
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(step - self._bar.n)  # redraws at most once per mininterval

    def write(self, line: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def image(self, tag: str, image, step: int) -> None:
        """An (H, W, 3) uint8 image to TensorBoard (e.g. the grid of samples at an evaluation)."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            tb, self._tb = self._tb, None
            try:
                tb.close()  # flushes: fails on a full disk, which a failed save has already reported
            except (RuntimeError, OSError) as e:
                import logging

                logging.getLogger(__name__).warning("TensorBoard events not flushed: %s: %s", type(e).__name__, e)
                _abandon(tb)


def _abandon(tb) -> None:
    """Stop a tensorboardX writer whose close() failed, so that neither its atexit hook nor its thread tries (and
    fails, with a traceback) again at exit. tensorboardX internals, hence every step may fail quietly."""
    import contextlib

    for writer in list((getattr(tb, "all_writers", None) or {}).values()):
        events = getattr(writer, "event_writer", None)
        if events is None or getattr(events, "_closed", True):
            continue
        with contextlib.suppress(Exception):
            events._worker.stop()
        with contextlib.suppress(Exception):
            events._ev_writer.close()
        events._closed = True


def read_metrics(path: str) -> list[dict]:
    """Records of metrics.jsonl; for a step logged by several attempts (a resumed run replays the steps after its
    checkpoint), only the last one of each kind is kept."""
    latest: dict[tuple[str, int], dict] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                latest[(rec.get("kind", "train"), rec["step"])] = rec
    return sorted(latest.values(), key=lambda r: (r["step"], r.get("kind", "")))
