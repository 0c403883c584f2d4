"""`jpeglm preprocess`: images -> canonical JPEG -> BPE tokens -> packed WebDataset shards, on Ray.

    jpeglm preprocess --input data/sample-images --output out/preprocess --shard-size 4MB

Phases (each resumable; formats in schemas/README.md):
1. plan: stream the input listing into work units, written as OUTPUT/_work/units/NNNNNN.json while listing (the
   driver never holds all names); `_work/plan.json` marks the plan done.
2. tokenizer: canonicalize a deterministic sample of --bpe-sample images spread over all units (Ray tasks writing
   the bodies to `_work/bpe/`), fit SentencePiece BPE in one task -> OUTPUT/tokenizer.model + tokenizer.json.
   Skipped with --tokenizer (the model is copied).
3. encode: one Ray task per unit, at most --max-in-flight at once (backpressure): read (bounded read-ahead),
   canonicalize, tokenize; write each ok image's tokens grouped by shuffle bucket (`_work/encoded/NNNNNN.bin`, with
   each bucket's offsets in the unit's done record), the unit's failures' stats, then its done record.
   environment check: `unsupported`, `read_error`, `internal_error` over --max-failed-fraction stop the job here.
4. shuffle: one task per bucket reads its slice of every unit's file (ranged reads), drops exact duplicates (same
   canonical body sha256), orders the images by sha256(seed, body sha256) and writes each split's stream and the
   bucket's per-image stats. The split is a function of the body's hash, so it never depends on the listing.
5. shards: the buckets' streams in bucket order are each split's token stream, cut into rows of seq_len; one Ray
   task per output shard reads the stream slices it needs and writes its tar (and row index) atomically. Nothing is
   dropped: only each split's very last row can be partial (padded with EOS, or dropped: --last-row).
6. manifest.json (written last; its presence means the output is complete) and summary.json; `_work/` is removed.

Every task's output depends only on the inputs and the config, so the number of workers, retries, crashes and
reruns cannot change a byte of the shards or the manifest. Ray only schedules: the stages are plain functions
(sources, codec, tokenizer, packing, shards) and no image data passes through Ray's object store.

Modules (one concept each): cli (flags, the command), config (what determines the output, its hash), layout
(paths under OUTPUT), checks (inputs and OUTPUT before anything is created, cluster paths, environment failures),
plan (work units, bucket count, BPE sample choice), bpe (BPE sample and fit tasks), encode (the encode task),
shuffle (split, dedup, the bucket task), write (shard planning and the shard task), ranged (one GET per slice of
the intermediate files), results (done records, chunked for a cheap resume), executor (Ray: init, remote with
declared memory, bounded submission), job (the driver: phases, resume, manifest, summary), faults (a test hook).
"""
