-- The warehouse schema: every table the pipeline writes. Idempotent (IF NOT EXISTS); applied on every connect.
-- Views a person queries live in views.sql.
-- Keys: tables appended to (raw and parsed rows, split assignments, caches) keep a primary key, the guard against a
-- row written twice. Tables a stage rebuilds whole from rows that are unique by construction (clean_results,
-- quality_rows, cluster_members, split_groups, ...) have none: each key's index costs 3.75 MiB per 100k rows and
-- checks nothing there. Warehouses made before keep theirs (same rows, more bytes).
-- While clean and quality run, staging_<table> copies of their tables (same columns) take the batches; the stage's
-- last transaction moves the rows over and drops them (tasks/core/warehouse.py: rebuilding).

-- One row: the warehouse's identity, so caches keyed on it miss when the file is recreated.
CREATE TABLE IF NOT EXISTS warehouse_meta (key VARCHAR PRIMARY KEY, value VARCHAR);

-- One row per pipeline run of a stage: timings and the stage's stats, for "what did last night's run do".
CREATE TABLE IF NOT EXISTS stage_runs (
    run_id      VARCHAR NOT NULL,
    stage       VARCHAR NOT NULL,
    started_at  TIMESTAMP NOT NULL,
    finished_at TIMESTAMP NOT NULL,
    stats       JSON
);

-- ============================================================== data plane: ingest
-- One turn of a conversation (tasks/data/formats.py documents the fields). tool_calls' arguments are the text of a
-- JSON object; a field a turn does not have is NULL.
CREATE TYPE IF NOT EXISTS chat_message AS STRUCT(
    role         VARCHAR,                   -- system | user | assistant | tool
    content      VARCHAR,
    reasoning    VARCHAR,                   -- an assistant turn's reasoning
    tool_calls   STRUCT(id VARCHAR, name VARCHAR, arguments VARCHAR)[],
    tool_call_id VARCHAR,                   -- a tool result: the call it answers
    name         VARCHAR                    -- a tool result: the function that produced it
);

-- One row per (path, content) version of an input file. A changed file is a new version; the same file again
-- is a no-op. A file that cannot be read at all (corrupt gzip, empty, unknown layout) is kept with its reason.
CREATE TABLE IF NOT EXISTS source_files (
    file_id        VARCHAR PRIMARY KEY,     -- sha256(file name, content sha256), 16 hex
    path           VARCHAR NOT NULL,
    source         VARCHAR NOT NULL,        -- dataset name: the file name without extensions
    content_sha256 VARCHAR NOT NULL,
    size_bytes     BIGINT NOT NULL,
    file_type      VARCHAR NOT NULL,        -- json | jsonl | csv | parquet
    data_format    VARCHAR,                 -- alpaca | sharegpt | messages | preference (NULL: undetected)
    n_rows         BIGINT NOT NULL,         -- raw rows kept for this file
    status         VARCHAR NOT NULL,        -- ingested | quarantined
    reason         VARCHAR,                 -- file-level reason code when quarantined
    detail         VARCHAR,
    ingest_run_id  VARCHAR NOT NULL,
    ingested_at    TIMESTAMP NOT NULL
);

-- Every raw row verbatim with provenance. raw holds the text as read; raw_bytes only rows that are not UTF-8.
CREATE TABLE IF NOT EXISTS raw_rows (
    row_id        VARCHAR PRIMARY KEY,      -- <file_id>:<row_number>
    file_id       VARCHAR NOT NULL,
    row_number    BIGINT NOT NULL,          -- 1-based line (jsonl/csv) or array index + 1 (json) or row (parquet)
    row_seq       BIGINT NOT NULL,          -- global ingest order: earlier rows win duplicate clusters
    raw           VARCHAR,
    raw_bytes     BLOB,
    ingest_run_id VARCHAR NOT NULL
);

-- The canonical form of each raw row, or why it could not be put in that form.
-- kind sft:        messages = the whole conversation.
-- kind preference: messages = the prompt turns; responses = assistant answers best-first (a pair has two).
-- kind feedback:   messages = the whole conversation; label = whether its last answer is desirable (KTO rows).
CREATE TABLE IF NOT EXISTS parsed_rows (
    row_id     VARCHAR PRIMARY KEY,
    kind       VARCHAR,                     -- sft | preference | feedback (NULL when unparsed)
    messages   chat_message[],
    responses  VARCHAR[],
    tools      VARCHAR,                     -- function schemas offered to the model, JSON (NULL: none)
    reason     VARCHAR,                     -- reason code when the row could not be parsed
    detail     VARCHAR,
    label      BOOLEAN                      -- feedback rows: the last answer is desirable (true) or not (false)
);

-- ============================================================== data plane: clean / dedup / split
-- Rebuilt by the clean stage: normalised text and the first rule each row broke (NULL: passed every rule). Read it
-- through the clean_rows view (views.sql): the text of a row clean did not change is not stored twice, the view takes
-- it from parsed_rows (which ingest only ever appends to), and dedup_text is derived from the turns.
CREATE TABLE IF NOT EXISTS clean_results (
    row_id     VARCHAR NOT NULL,
    kind       VARCHAR NOT NULL,
    source     VARCHAR NOT NULL,
    row_seq    BIGINT NOT NULL,
    messages   chat_message[],              -- NULL where messages_as_parsed
    responses  VARCHAR[],                   -- NULL where responses_as_parsed
    tools      VARCHAR,                     -- NULL: parsed_rows.tools (clean never changes them)
    dedup_text VARCHAR,                     -- what dedup compares: the conversation (sft) or the prompt (preference),
                                            -- tool calls and reasoning included as assistant text; NULL where it
                                            -- is conversation_text(the turns) (views.sql)
    content_hash VARCHAR,                   -- sha256 of kind and dedup_text, the exact-duplicate key
    n_chars    BIGINT,
    language   VARCHAR,                     -- zh | ja | ko | en | other (script-based)
    reason     VARCHAR,
    detail     VARCHAR,
    label      BOOLEAN,                     -- feedback rows: the last answer is desirable (true) or not (false)
    messages_as_parsed  BOOLEAN,            -- true: normalising changed no turn, the turns are parsed_rows.messages
    responses_as_parsed BOOLEAN             -- true: ... no answer, the answers are parsed_rows.responses
);
-- Warehouses made before the text was stored once had a clean_rows table with every row's turns (tasks/core/
-- warehouse.py renames it to clean_results before this runs): their as_parsed flags are NULL, the stored turns hold.
ALTER TABLE clean_results ADD COLUMN IF NOT EXISTS messages_as_parsed BOOLEAN;
ALTER TABLE clean_results ADD COLUMN IF NOT EXISTS responses_as_parsed BOOLEAN;

-- Warehouses made before turns could carry tool calls: add the tools column (tasks/core/warehouse.py widens their
-- messages to chat_message[]).
ALTER TABLE parsed_rows ADD COLUMN IF NOT EXISTS tools VARCHAR;
ALTER TABLE clean_results ADD COLUMN IF NOT EXISTS tools VARCHAR;
-- ... and before feedback (KTO) rows were kept.
ALTER TABLE parsed_rows ADD COLUMN IF NOT EXISTS label BOOLEAN;
ALTER TABLE clean_results ADD COLUMN IF NOT EXISTS label BOOLEAN;

-- Rebuilt by the quality stage, one row per row that passed clean: its language, the first quality rule it broke,
-- and its text with personal data redacted (NULL where nothing was redacted; curated_rows then takes clean's).
CREATE TABLE IF NOT EXISTS quality_rows (
    row_id              VARCHAR NOT NULL,
    language            VARCHAR NOT NULL,   -- ISO 639 code from fastText's lid.176 (zh includes wuu, yue); und: no letters
    language_confidence DOUBLE NOT NULL,    -- the detector's probability for that language
    reason              VARCHAR,            -- language_not_allowed | pii_<kind> | benchmark_contamination
    detail              VARCHAR,
    messages            chat_message[],
    responses           VARCHAR[],
    dedup_text          VARCHAR,
    content_hash        VARCHAR,
    n_chars             BIGINT
);

-- Detected language by text, so a nightly run only detects text it has not seen. detector names the model and
-- settings (package version, characters read).
CREATE TABLE IF NOT EXISTS language_ids (
    text_hash  VARCHAR NOT NULL,            -- xxh3-128 of the text the detector read
    detector   VARCHAR NOT NULL,
    language   VARCHAR NOT NULL,
    confidence DOUBLE NOT NULL,
    PRIMARY KEY (text_hash, detector)
);

-- Rebuilt by the quality stage: personal data found per row and kind, and what was done (redact | reject | keep).
CREATE TABLE IF NOT EXISTS pii_matches (
    row_id  VARCHAR NOT NULL,
    kind    VARCHAR NOT NULL,               -- email | phone | ip_address | credit_card | iban | secret
    action  VARCHAR NOT NULL,
    matches INTEGER NOT NULL
);

-- Rebuilt by the quality stage: rows that reproduce a benchmark item (the part they overlap most).
CREATE TABLE IF NOT EXISTS benchmark_matches (
    row_id    VARCHAR NOT NULL,
    benchmark VARCHAR NOT NULL,             -- benchmark file
    item      BIGINT NOT NULL,              -- record number in that file (1-based)
    part      VARCHAR NOT NULL,             -- text | prompt | answer | response N
    overlap   DOUBLE NOT NULL               -- share of the part's n-grams found in the row
);

-- MinHash signatures by content, so a nightly run signs only texts it has not seen. params names how they were
-- made (permutations, seed, shingle size, bits kept, code version). Each value is 8 bits of the 64-bit minimum,
-- taken after a mixing step (b-bit MinHash; tasks/data/dedup.py: stored_form): 128 bytes a text, all that banding,
-- the identical-signature check and the similarity estimate need. No primary key (its index was a fifth of the table's bytes):
-- writers skip content hashes already stored. Older warehouses' table (32 bits a value, keyed) is dropped on open
-- and its texts signed again.
CREATE TABLE IF NOT EXISTS minhash_signatures (
    content_hash VARCHAR NOT NULL,
    params       VARCHAR NOT NULL,
    signature    UTINYINT[] NOT NULL
);

-- Rebuilt by the dedup stage: every clean, accepted row and the cluster it belongs to. cluster_id is the
-- representative's row_id (the earliest-ingested member); singletons are their own cluster.
CREATE TABLE IF NOT EXISTS cluster_members (
    row_id      VARCHAR NOT NULL,
    cluster_id  VARCHAR NOT NULL,
    method      VARCHAR NOT NULL,           -- representative | exact | near
    similarity  DOUBLE NOT NULL             -- estimated Jaccard to the representative (1.0 for exact copies)
);

-- Insert-only: a cluster's split never changes once assigned, whatever data arrives later. Every member of a
-- prompt group gets the group's split (see split_groups).
CREATE TABLE IF NOT EXISTS split_assignments (
    cluster_id  VARCHAR PRIMARY KEY,
    split       VARCHAR NOT NULL,           -- train | validation | test
    assigned_run VARCHAR NOT NULL,
    assigned_at TIMESTAMP NOT NULL
);

-- Rebuilt by the split stage: the prompt group of every cluster representative. group_id is the row_id of the
-- group's earliest-ingested row; rows whose prompts are near-duplicates or extend one another share a group.
CREATE TABLE IF NOT EXISTS split_groups (
    cluster_id  VARCHAR NOT NULL,
    group_id    VARCHAR NOT NULL
);

-- Insert-only: new rows whose group joined groups that were already in different splits. The row took the split
-- of the group's earliest assigned row; the older rows stayed where they were.
CREATE TABLE IF NOT EXISTS split_bridges (
    cluster_id    VARCHAR PRIMARY KEY,
    group_id      VARCHAR NOT NULL,
    split         VARCHAR NOT NULL,         -- the split the new row was given
    joined_groups VARCHAR[] NOT NULL,       -- the groups it joined (each named by its earliest row) ...
    joined_splits VARCHAR[] NOT NULL,       -- ... and the split each of them was in
    bridged_run   VARCHAR NOT NULL,
    bridged_at    TIMESTAMP NOT NULL
);

-- Rebuilt by the split stage: validation/test rows whose n-grams overlap the training split too much.
CREATE TABLE IF NOT EXISTS contamination (
    row_id          VARCHAR NOT NULL,
    split           VARCHAR NOT NULL,
    overlap         DOUBLE NOT NULL,        -- share of the row's n-grams found in the training split
    closest_train_row VARCHAR
);

-- ============================================================== training plane
-- One row per training run of a stage (base warm-up, sft, dpo, merge): what it trained from, how long it took,
-- and everything needed to reproduce it (seed and config in `config`, library versions, data fingerprint).
CREATE TABLE IF NOT EXISTS training_runs (
    run_id            VARCHAR PRIMARY KEY,  -- <stage>-<input key>: a rerun of the same inputs replaces its rows
    stage             VARCHAR NOT NULL,     -- base | sft | dpo | merge
    fingerprint       VARCHAR,              -- content hash of what the run wrote (adapter / model files)
    base_model        VARCHAR,              -- path or hub id of the base model
    data_fingerprint  VARCHAR,              -- fingerprint of the data stage result it trained on
    output_dir        VARCHAR,
    finished_at       TIMESTAMP NOT NULL,
    wall_s            DOUBLE,
    tokens_per_s      DOUBLE,
    resumed_from_step BIGINT,               -- checkpoint step a retried run continued from (NULL: from scratch)
    stats             JSON,
    config            JSON,
    versions          JSON
);

-- Every logged training / evaluation metric of every run, one value per row.
-- Metrics: loss, learning_rate, grad_norm, tokens_per_s, num_tokens, eval_loss, rewards/*, eval_*_rewards/*, ...
CREATE TABLE IF NOT EXISTS training_curves (
    run_id    VARCHAR NOT NULL,
    stage     VARCHAR NOT NULL,
    step      BIGINT NOT NULL,
    epoch     DOUBLE,
    metric    VARCHAR NOT NULL,
    value     DOUBLE,
    logged_at TIMESTAMP
);


-- ============================================================== evaluation plane
-- One row per evaluation run: what was evaluated, on which data, with which settings, and where the report is.
CREATE TABLE IF NOT EXISTS eval_runs (
    run_id           VARCHAR PRIMARY KEY,
    data_fingerprint VARCHAR,
    variants         JSON NOT NULL,         -- {variant: {model path(s), fingerprint}}
    settings         JSON NOT NULL,         -- the eval config in force
    report_path      VARCHAR,
    started_at       TIMESTAMP NOT NULL,
    finished_at      TIMESTAMP NOT NULL
);

-- Every metric of every variant: per source dataset and overall (source 'all'). n: scored tokens for
-- perplexity, examples (or preference pairs) otherwise; examples: the examples the figure is computed over (the
-- bootstrap's resampling unit); ci_low / ci_high: its bootstrap confidence interval (eval.confidence, stored in
-- eval_runs.settings; NULL below 2 examples).
CREATE TABLE IF NOT EXISTS eval_results (
    run_id   VARCHAR NOT NULL,
    variant  VARCHAR NOT NULL,              -- base | sft | dpo | merged
    split    VARCHAR NOT NULL,              -- validation | test
    source   VARCHAR NOT NULL,
    metric   VARCHAR NOT NULL,              -- perplexity | rouge1 | rouge2 | rougeL | rougeLsum | preference_accuracy | preference_margin
    value    DOUBLE,
    n        BIGINT NOT NULL,
    examples BIGINT,
    ci_low   DOUBLE,
    ci_high  DOUBLE,
    PRIMARY KEY (run_id, variant, split, source, metric)
);
-- Warehouses made before intervals were recorded.
ALTER TABLE eval_results ADD COLUMN IF NOT EXISTS examples BIGINT;
ALTER TABLE eval_results ADD COLUMN IF NOT EXISTS ci_low DOUBLE;
ALTER TABLE eval_results ADD COLUMN IF NOT EXISTS ci_high DOUBLE;

-- The per-example scores every figure above is computed from (and the paired bootstrap of deltas between variants
-- and runs resamples): perplexity: value = summed token NLL, weight = scored tokens; ROUGE: value = F-measure;
-- preference_accuracy: 1 when the variant's mean log-probability per answer token is higher for the chosen answer
-- than for the rejected one, else 0; preference_margin: that difference (chosen - rejected).
CREATE TABLE IF NOT EXISTS eval_example_scores (
    run_id     VARCHAR NOT NULL,
    variant    VARCHAR NOT NULL,
    split      VARCHAR NOT NULL,
    example_id VARCHAR NOT NULL,
    source     VARCHAR NOT NULL,
    metric     VARCHAR NOT NULL,
    value      DOUBLE NOT NULL,
    weight     DOUBLE NOT NULL,
    PRIMARY KEY (run_id, variant, split, example_id, metric)
);

-- The greedy answers behind the ROUGE numbers (and the sample table artifact).
CREATE TABLE IF NOT EXISTS eval_generations (
    run_id        VARCHAR NOT NULL,
    variant       VARCHAR NOT NULL,
    split         VARCHAR NOT NULL,
    example_id    VARCHAR NOT NULL,
    source        VARCHAR NOT NULL,
    prompt        VARCHAR NOT NULL,         -- the rendered prompt (chat template applied)
    reference     VARCHAR NOT NULL,
    prediction    VARCHAR NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    new_tokens    INTEGER NOT NULL,
    PRIMARY KEY (run_id, variant, split, example_id)
);

-- The promotion gate's decision for an evaluation run. model_path points at the promoted merged model.
CREATE TABLE IF NOT EXISTS promotions (
    run_id           VARCHAR PRIMARY KEY,
    variant          VARCHAR NOT NULL,
    decision         VARCHAR NOT NULL,      -- promoted | rejected
    model_path       VARCHAR,
    baseline_kind    VARCHAR,               -- last_promoted | base | NULL (nothing to compare with)
    baseline_run_id  VARCHAR,
    baseline_variant VARCHAR,
    checks           JSON NOT NULL,         -- [{check, candidate, baseline, limit, passed}]
    reasons          VARCHAR[] NOT NULL,    -- why not promoted (empty when promoted)
    decided_at       TIMESTAMP NOT NULL
);

-- One row per server started by the vLLM smoke test (target merged, or lora: the adapter on the base).
CREATE TABLE IF NOT EXISTS serve_smoke_runs (
    smoke_id       VARCHAR PRIMARY KEY,
    run_id         VARCHAR NOT NULL,
    target         VARCHAR NOT NULL,        -- merged | lora
    model_path     VARCHAR NOT NULL,
    command        VARCHAR NOT NULL,
    startup_s      DOUBLE,                  -- process start to /health 200 (NULL: never became healthy)
    passed         BOOLEAN NOT NULL,
    parity_total   INTEGER NOT NULL,
    parity_passed  INTEGER NOT NULL,
    reason         VARCHAR,                 -- why it failed
    started_at     TIMESTAMP NOT NULL,
    finished_at    TIMESTAMP NOT NULL
);

-- Every request of a smoke test: latency and throughput, and for parity requests whether vLLM's greedy tokens
-- equal the transformers reference.
CREATE TABLE IF NOT EXISTS serve_smoke_requests (
    smoke_id          VARCHAR NOT NULL,
    seq               INTEGER NOT NULL,
    endpoint          VARCHAR NOT NULL,     -- /v1/models | /v1/completions | /v1/chat/completions
    example_id        VARCHAR,
    latency_s         DOUBLE NOT NULL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    tokens_per_s      DOUBLE,
    parity            BOOLEAN,              -- NULL: not a parity request
    expected          VARCHAR,
    served            VARCHAR,
    PRIMARY KEY (smoke_id, seq)
);
