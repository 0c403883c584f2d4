"""`jpeglm preprocess`: images -> canonical JPEG -> BPE tokens -> packed WebDataset shards, on Ray.

    jpeglm preprocess --input data/sample-images --output out/preprocess --shard-size 4MB

Phases (each resumable; formats in schemas/README.md):
1. plan: stream the input listing into work units, written as OUTPUT/_work/units/NNNNNN.json while listing (the
   driver never holds all names); `_work/plan.json` marks the plan done.
2. tokenizer: canonicalize a deterministic sample of --bpe-sample images spread over all units (Ray tasks writing
   the bodies to `_work/bpe/`), fit SentencePiece BPE in one task -> OUTPUT/tokenizer.model + tokenizer.json.
   Skipped with --tokenizer (the model is copied).
3. encode: one Ray task per unit, at most --max-in-flight at once (backpressure): read, canonicalize, tokenize,
   append BOS+tokens+EOS of each image to its split's stream (`_work/encoded/NNNNNN/{train,validation}.u16`),
   write the unit's per-image stats (OUTPUT/stats/unit-NNNNNN.parquet), then its done-marker.
4. shards: the concatenation of the units' streams (in unit order) is each split's token stream, cut into rows of
   seq_len; one Ray task per output shard reads the stream slices it needs and writes its tar atomically.
   Nothing is dropped: only each split's very last row can be partial (padded with EOS, or dropped: --last-row).
5. manifest.json (written last; its presence means the output is complete) and summary.json; `_work/` is removed.

Every task's output depends only on the inputs and the config, so the number of workers, retries, crashes and
reruns cannot change a byte of the shards or the manifest. Ray only schedules: the stages are plain functions
(sources, codec, tokenizer, packing, shards) and no image data passes through Ray's object store.

Modules (one concept each): cli (flags, the command), config (what determines the output, its hash), layout
(paths under OUTPUT), plan (work units, BPE sample choice), bpe (BPE sample and fit tasks), encode (the encode task),
write (shard planning and the shard task), executor (Ray: init, remote, bounded submission), job (the driver:
phases, resume, manifest, summary), faults (a test hook).
"""
