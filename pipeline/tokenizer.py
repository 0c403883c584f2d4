"""Byte-level BPE tokenizer for JPEG bodies (SentencePiece), as in JPEG-LM.

Each byte b is written as the character chr(0x2800 + b) (the Unicode Braille block), so a JPEG body becomes a
string of one character per byte, and a SentencePiece BPE model over those strings turns it into tokens. This is
the authors' mapping, so their released `tokenizer.model` loads here too (see docs/tokenizer.md).

    tok = Tokenizer.train(bodies, vocab_size=320)   # deterministic: same bodies -> same model file -> same fingerprint
    tok.save("s3://bucket/out/tokenizer.model")     # writes exactly the model file that `fingerprint` hashes
    ids = tok.encode(body)                          # no BOS/EOS; the packer adds them
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == body

Exact round trip: training adds one sentence holding all 256 characters, so every byte value has a piece even when
the training sample lacks it (SentencePiece's byte_fallback would need a vocabulary of at least 513 pieces).
"""

from __future__ import annotations

import hashlib
import io
import logging
import operator
import os
import time
from typing import Iterable, Iterator, NoReturn, Sequence

import numpy as np

log = logging.getLogger(__name__)

BYTE_OFFSET = 0x2800  # byte b <-> chr(BYTE_OFFSET + b)
DEFAULT_VOCAB_SIZE = 320
# Models are stored as uint16 tokens in the shards; a BPE vocabulary must hold <unk>, <s>, </s> and the 256 bytes.
MIN_VOCAB_SIZE = 256 + 3
MAX_VOCAB_SIZE = 1 << 16
# SentencePiece counts sentence length in UTF-8 bytes (3 per mapped byte) and silently skips longer sentences;
# canonical bodies are ~5 KB, so this only guards against non-canonical input (bodies over ~1.4 MB are refused).
MAX_SENTENCE_UTF8_BYTES = 1 << 22
MAX_BODY_BYTES = MAX_SENTENCE_UTF8_BYTES // 3
# Recorded in the model file, so fixed: the fingerprint must depend on the bodies alone, not on the machine.
# The learned pieces do not depend on it (measured: 1, 2 and 8 threads gave identical pieces; 2 was fastest here).
TRAIN_NUM_THREADS = 2
# SentencePiece's whitespace meta symbol: models trained with add_dummy_prefix (the default) start every sentence
# with it, and their decoder strips it again.
_META_SYMBOL = "\u2581"

_BYTE_TO_CODE = np.arange(BYTE_OFFSET, BYTE_OFFSET + 256, dtype="<u2")
ALL_BYTES = bytes(range(256))


def bytes_to_text(data: bytes) -> str:
    """Map bytes to the tokenizer's string: byte b -> chr(0x2800 + b). Vectorized (no per-byte Python work)."""
    return _BYTE_TO_CODE[np.frombuffer(data, dtype=np.uint8)].tobytes().decode("utf-16-le")


def text_to_bytes(text: str) -> bytes:
    """Inverse of bytes_to_text; ValueError if a character is outside chr(0x2800)..chr(0x28FF)."""
    codes = np.frombuffer(text.encode("utf-16-le", "surrogatepass"), dtype="<u2") - np.uint16(BYTE_OFFSET)
    # uint16 arithmetic wraps, so characters below the block (and surrogate halves above it) also exceed 255.
    if codes.size and codes.max() > 255:
        pos, char = next((i, c) for i, c in enumerate(text) if not BYTE_OFFSET <= ord(c) < BYTE_OFFSET + 256)
        raise ValueError(
            f"character {char!r} (U+{ord(char):04X}) at position {pos} is not a mapped byte "
            f"(bytes are chr(0x{BYTE_OFFSET:X} + b))"
        )
    return codes.astype(np.uint8).tobytes()


def _training_sentences(bodies: Iterable[bytes], counts: dict) -> Iterator[str]:
    try:
        yield from _mapped_bodies(bodies, counts)
    except Exception as e:
        # SentencePiece turns exceptions from the iterator into a RuntimeError with a traceback dump: keep the original.
        counts["error"] = e
        raise


def _mapped_bodies(bodies: Iterable[bytes], counts: dict) -> Iterator[str]:
    # One sentence with every byte value gives each its own piece, so no byte ever becomes <unk>
    # (SentencePiece's required_chars did not achieve this in 0.2.3).
    yield bytes_to_text(ALL_BYTES)
    for i, body in enumerate(bodies):
        if not isinstance(body, (bytes, bytearray, memoryview)):
            raise TypeError(f"training body {i} is {type(body).__name__}, expected bytes")
        if len(body) == 0:
            counts["empty"] += 1
            continue
        if len(body) > MAX_BODY_BYTES:
            raise ValueError(f"training body {i} has {len(body):,} bytes; at most {MAX_BODY_BYTES:,} are supported")
        counts["bodies"] += 1
        counts["bytes"] += len(body)
        yield bytes_to_text(body)


class Tokenizer:
    """A SentencePiece model over byte-mapped strings. Create with `train`, `load` or `from_bytes`."""

    def __init__(self, model_bytes: bytes):
        import sentencepiece as spm

        self._model_bytes = bytes(model_bytes)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"not a SentencePiece model ({len(self._model_bytes):,} bytes): {e}") from e
        sp = self._sp
        self.fingerprint: str = hashlib.sha256(self._model_bytes).hexdigest()
        self.vocab_size: int = sp.get_piece_size()
        self.unk_id: int = sp.unk_id()
        self.bos_id: int = sp.bos_id()
        self.eos_id: int = sp.eos_id()
        self.pad_id: int | None = sp.pad_id() if sp.pad_id() >= 0 else None
        for name, token_id in (("BOS", self.bos_id), ("EOS", self.eos_id)):
            if token_id < 0:
                raise ValueError(f"the model has no {name} piece; JPEG-LM wraps every image in BOS ... EOS")
        for name, token_id in (("BOS", self.bos_id), ("EOS", self.eos_id), ("PAD", self.pad_id)):
            # decode() relies on SentencePiece dropping control pieces.
            if token_id is not None and not sp.is_control(token_id):
                raise ValueError(f"the model's {name} piece (id {token_id}) is not a control symbol")
        foreign = [
            sp.id_to_piece(i)
            for i in range(self.vocab_size)
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))
            and not _is_mapped_piece(sp.id_to_piece(i))
        ]
        if foreign:
            examples = ", ".join(repr(p) for p in foreign[:5])
            raise ValueError(
                f"not a byte-level JPEG tokenizer: {len(foreign)} of {self.vocab_size} pieces have characters outside "
                f"the byte mapping chr(0x{BYTE_OFFSET:X} + b) (e.g. {examples}). Use a model trained on bytes mapped "
                "this way: Tokenizer.train, or the JPEG-LM authors' tokenizer.model"
            )
        self.missing_bytes: tuple[int, ...] = tuple(
            b for b in range(256) if sp.piece_to_id(chr(BYTE_OFFSET + b)) == self.unk_id
        )
        self._token_bytes = [
            b"" if sp.is_control(i) or sp.is_unused(i) or sp.is_unknown(i) or sp.is_byte(i)
            else text_to_bytes(sp.id_to_piece(i).replace(_META_SYMBOL, ""))
            for i in range(self.vocab_size)
        ]
        # Fast decode by table (<unk> is None there), unless pieces hold the dummy-prefix symbol or are byte-fallback
        # pieces: only SentencePiece's own decoder knows how to join those.
        self._decode_table: list[bytes | None] | None = None
        if not any(_META_SYMBOL in sp.id_to_piece(i) or sp.is_byte(i) for i in range(self.vocab_size)):
            self._decode_table = [None if sp.is_unknown(i) else b for i, b in enumerate(self._token_bytes)]
        self._problems = self._find_problems()
        for problem in self._problems:
            log.warning("tokenizer %s: %s", self.fingerprint[:12], problem)

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def train(cls, bodies: Iterable[bytes], vocab_size: int = DEFAULT_VOCAB_SIZE) -> "Tokenizer":
        """Fit SentencePiece BPE on JPEG bodies (streamed; empty ones skipped). Deterministic for a given
        sentencepiece version: the same bodies in the same order give the same model bytes and fingerprint."""
        import sentencepiece as spm

        if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] (<unk>, <s>, </s> and 256 byte pieces, "
                f"uint16 token ids), got {vocab_size}"
            )
        counts = {"bodies": 0, "bytes": 0, "empty": 0, "error": None}
        model = io.BytesIO()
        start = time.perf_counter()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_sentences(bodies, counts),
                model_writer=model,
                model_type="bpe",
                vocab_size=vocab_size,
                character_coverage=1.0,
                # Identity normalization and no whitespace handling: the string is the bytes, nothing else.
                normalization_rule_name="identity",
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                split_by_whitespace=False,
                split_by_unicode_script=False,
                split_by_number=False,
                max_sentence_length=MAX_SENTENCE_UTF8_BYTES,
                num_threads=TRAIN_NUM_THREADS,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,  # padding in the shards is EOS (schemas/README.md)
                minloglevel=1,  # SentencePiece's INFO log is hundreds of lines on stderr
            )
        except RuntimeError as e:
            if counts["error"] is not None:
                raise counts["error"] from None
            raise ValueError(f"SentencePiece training failed ({counts['bodies']} bodies, vocab_size {vocab_size}): {e}") from e
        if counts["bodies"] == 0:
            raise ValueError("no non-empty bodies to train the tokenizer on")
        tokenizer = cls(model.getvalue())
        log.info(
            "trained BPE tokenizer: vocab %d on %d bodies (%.1f MB, %d empty skipped) in %.2f s; fingerprint %s",
            vocab_size, counts["bodies"], counts["bytes"] / 1e6, counts["empty"], time.perf_counter() - start,
            tokenizer.fingerprint[:12],
        )
        return tokenizer

    @classmethod
    def from_bytes(cls, model_bytes: bytes) -> "Tokenizer":
        """From the bytes of a model file (what Ray ships to workers instead of a path)."""
        return cls(model_bytes)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """From a local path or s3:// URI of a SentencePiece model file (ours or any with the same byte mapping)."""
        from pipeline import storage

        data = storage.read_bytes(path)
        try:
            return cls(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def save(self, path: str | os.PathLike) -> None:
        """Write exactly the model bytes `fingerprint` hashes, atomically (local path or s3:// URI)."""
        from pipeline import storage

        storage.write_bytes(path, self._model_bytes)

    @property
    def model_bytes(self) -> bytes:
        return self._model_bytes

    def metadata(self) -> dict:
        """What outputs record about the tokenizer (tokenizer.json, the manifest's `tokenizer` block)."""
        return {
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "unk_id": self.unk_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "byte_offset": BYTE_OFFSET,
        }

    def token_bytes(self) -> list[bytes]:
        """The bytes each token id stands for, indexed by id: b"" for BOS/EOS/PAD and <unk> (no known byte); a
        dummy-prefix symbol is dropped. For scanning generated ids for byte patterns (e.g. the EOI marker FF D9)."""
        return list(self._token_bytes)

    def check_mapping(self) -> list[str]:
        """Why this model cannot reproduce every byte string exactly; [] for models trained by `train`.
        Models with pieces outside the byte mapping are refused when loaded; these problems only warn."""
        return list(self._problems)

    # ---- encode / decode ---------------------------------------------------------------------------------------

    def encode(self, body: bytes) -> list[int]:
        """Token ids of one body, without BOS/EOS."""
        if self.missing_bytes:
            self._check_bytes_known(body)
        return self._sp.encode(bytes_to_text(body))

    def encode_batch(self, bodies: Sequence[bytes], num_threads: int = -1) -> list[list[int]]:
        """encode() of many bodies with SentencePiece's multi-threaded batch encoder; same ids as one by one.
        num_threads -1 uses every core; pass 1 inside a worker that already owns one core (e.g. a Ray task)."""
        if self.missing_bytes:
            for body in bodies:
                self._check_bytes_known(body)
        return self._sp.encode([bytes_to_text(body) for body in bodies], num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> bytes:
        """Bytes of a token sequence. BOS/EOS/PAD ids are skipped (model output contains them);
        ValueError on <unk> or an id outside the vocabulary."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy arrays, torch tensors
        if self._decode_table is not None:
            try:
                if ids and min(ids) < 0:  # negative indexes would silently wrap around in the table
                    raise IndexError
                return b"".join(map(self._decode_table.__getitem__, ids))  # <unk> is None there: TypeError
            except (IndexError, TypeError):
                self._raise_for_bad_id(ids)
        if self.unk_id in ids:
            self._raise_for_bad_id(ids)
        try:
            text = self._sp.decode(ids)
        except (IndexError, TypeError):
            self._raise_for_bad_id(ids)
        return text_to_bytes(text)

    # ---- helpers -----------------------------------------------------------------------------------------------

    def _raise_for_bad_id(self, ids: list) -> NoReturn:
        for pos, token_id in enumerate(ids):
            try:
                token_id = operator.index(token_id)  # ints, NumPy integers
            except TypeError:
                raise ValueError(f"token {pos}: {token_id!r} is not an integer id") from None
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token {pos}: id {token_id!r} is not in the vocabulary [0, {self.vocab_size})")
            if token_id == self.unk_id:
                raise ValueError(
                    f"token {pos} is <unk> (id {token_id}), which stands for no known byte: "
                    + (
                        f"this model's vocabulary lacks byte values {_hex_list(self.missing_bytes)}"
                        if self.missing_bytes
                        else "tokenizers trained by Tokenizer.train never produce it, so the ids come from another model"
                    )
                )
        raise AssertionError("no bad id found")

    def _check_bytes_known(self, body: bytes) -> None:
        present = np.bincount(np.frombuffer(body, dtype=np.uint8), minlength=256)
        absent = [b for b in self.missing_bytes if present[b]]
        if absent:
            raise ValueError(
                f"the body contains byte values {_hex_list(absent)} that this tokenizer's vocabulary lacks "
                f"(they would become <unk> and not decode); tokenizers from Tokenizer.train cover all 256 bytes"
            )

    def _find_problems(self) -> list[str]:
        problems = []
        if self.missing_bytes:
            problems.append(
                f"no piece for byte values {_hex_list(self.missing_bytes)}: bodies containing them cannot be encoded"
            )
        missing = set(self.missing_bytes)
        known = bytes(b for b in range(256) if b not in missing)
        text = bytes_to_text(known)
        try:
            round_trip = self._sp.decode(self._sp.encode(text))
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            round_trip = f"<{e}>"
        if round_trip != text:
            problems.append(
                "encode/decode does not reproduce the byte string exactly (normalization or dummy-prefix handling "
                "changes it); decoding this model's ids may fail"
            )
        return problems

    def __reduce__(self):
        # Pickle as the model bytes (SentencePiece processors are rebuilt on the other side, e.g. in Ray workers).
        return (Tokenizer.from_bytes, (self._model_bytes,))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"


def _is_mapped_piece(piece: str) -> bool:
    return bool(piece) and all(
        BYTE_OFFSET <= ord(c) < BYTE_OFFSET + 256 or c == _META_SYMBOL for c in piece
    )


def _hex_list(values: Iterable[int], limit: int = 16) -> str:
    values = list(values)
    shown = " ".join(f"{v:02X}" for v in values[:limit])
    return shown + (f" ... ({len(values)} in all)" if len(values) > limit else "")
