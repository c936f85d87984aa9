-- Views named for the questions people ask of the warehouse. Recreated on every connect.
--   duckdb runs/warehouse.duckdb -c "select * from quality_summary"

-- The text of a conversation's turns as dedup compares it (tasks/data/clean.py: turn_text and clean_frame's
-- dedup_text): one line group per turn, "role: " and its reasoning, content and tool calls as name(arguments), the
-- empty ones left out.
CREATE OR REPLACE MACRO conversation_text(messages) AS coalesce(array_to_string(list_transform(messages,
    lambda m: m.role || ': ' || concat_ws(chr(10), nullif(m.reasoning, ''), nullif(m.content, ''),
        nullif(array_to_string(list_transform(m.tool_calls, lambda c: c.name || '(' || c.arguments || ')'), chr(10)),
            ''))), chr(10)), '');

-- What MinHash compares of a dedup_text: its words without the "role: " label that opens each turn. Labels would
-- sit inside the shingles across a turn boundary, so two copies of one text cut into prompt and answer at places
-- a few words apart would differ there more than in their words.
CREATE OR REPLACE MACRO minhash_text(t) AS regexp_replace(t, '(^|\n)(system|user|assistant|tool): ', '\1', 'g');

-- What the clean stage made of every parsed row (clean_results), each row with its turns, answers, tools and
-- dedup_text: where clean changed none of them the table holds NULL and they come from parsed_rows, as ingest
-- parsed them, and dedup_text from the turns (conversation_text: clean stores its own only where that differs).
CREATE OR REPLACE VIEW clean_rows AS
SELECT row_id, kind, source, row_seq, messages, responses, tools,
    coalesce(dedup_text, conversation_text(messages)) AS dedup_text,
    content_hash, n_chars, language, reason, detail, label
FROM (
    SELECT c.* EXCLUDE (messages, responses, tools),
        CASE WHEN c.messages_as_parsed THEN p.messages ELSE c.messages END AS messages,
        CASE WHEN c.responses_as_parsed THEN p.responses ELSE c.responses END AS responses,
        coalesce(c.tools, p.tools) AS tools
    FROM clean_results c
    LEFT JOIN parsed_rows p USING (row_id)
);

-- The rows every stage after quality reads: clean_rows with personal data redacted by the quality stage, and the
-- first rule each row broke in clean or in quality (NULL: accepted so far).
CREATE OR REPLACE VIEW curated_rows AS
SELECT
    c.row_id, c.kind, c.source, c.row_seq,
    coalesce(q.messages, c.messages) AS messages,
    coalesce(q.responses, c.responses) AS responses,
    c.tools,
    coalesce(q.dedup_text, c.dedup_text) AS dedup_text,
    coalesce(q.content_hash, c.content_hash) AS content_hash,
    coalesce(q.n_chars, c.n_chars) AS n_chars,
    coalesce(q.language, c.language) AS language,
    q.language_confidence,
    coalesce(c.reason, q.reason) AS reason,
    coalesce(c.detail, q.detail) AS detail,
    c.label
FROM clean_rows c
LEFT JOIN quality_rows q USING (row_id);

-- What happened to every raw row: accepted, rejected (reason), duplicate (of which row), or pending (a later
-- stage has not run yet).
CREATE OR REPLACE VIEW row_dispositions AS
SELECT
    r.row_id, r.file_id, f.source, f.path, r.row_number,
    CASE
        WHEN p.reason IS NOT NULL OR c.reason IS NOT NULL THEN 'rejected'
        WHEN m.method IN ('exact', 'near') THEN 'duplicate'
        WHEN m.method = 'representative' THEN 'accepted'
        ELSE 'pending'
    END AS status,
    coalesce(p.reason, c.reason) AS reason,
    coalesce(p.detail, c.detail) AS detail,
    CASE WHEN m.method IN ('exact', 'near') THEN m.cluster_id END AS duplicate_of,
    CASE WHEN m.method IN ('exact', 'near') THEN m.similarity END AS similarity
FROM raw_rows r
JOIN source_files f USING (file_id)
LEFT JOIN parsed_rows p USING (row_id)
LEFT JOIN curated_rows c USING (row_id)
LEFT JOIN cluster_members m USING (row_id);

-- Per file version: raw = accepted + rejected + duplicate must hold (balanced) once every stage has run.
CREATE OR REPLACE VIEW row_conservation AS
SELECT
    f.file_id, f.path, f.source, f.status AS file_status, f.reason AS file_reason,
    count(d.row_id) AS raw,
    count(*) FILTER (WHERE d.status = 'accepted') AS accepted,
    count(*) FILTER (WHERE d.status = 'rejected') AS rejected,
    count(*) FILTER (WHERE d.status = 'duplicate') AS duplicate,
    count(*) FILTER (WHERE d.status = 'pending') AS pending,
    count(d.row_id) = count(*) FILTER (WHERE d.status IN ('accepted', 'rejected', 'duplicate')) AS balanced
FROM source_files f
LEFT JOIN row_dispositions d USING (file_id)
GROUP BY ALL
ORDER BY f.path, f.file_id;

-- One line per source dataset: how much survived, why the rest did not, and where it went.
CREATE OR REPLACE VIEW quality_summary AS
WITH splits AS (
    SELECT c.source,
        count(*) FILTER (WHERE s.split = 'train') AS train,
        count(*) FILTER (WHERE s.split = 'validation') AS validation,
        count(*) FILTER (WHERE s.split = 'test') AS test
    FROM curated_rows c
    JOIN cluster_members m ON m.row_id = c.row_id AND m.method = 'representative'
    JOIN split_assignments s ON s.cluster_id = m.cluster_id
    GROUP BY ALL
)
SELECT
    d.source,
    count(DISTINCT d.file_id) AS files,
    count(*) AS raw,
    count(*) FILTER (WHERE d.status = 'accepted') AS accepted,
    count(*) FILTER (WHERE d.status = 'rejected') AS rejected,
    count(*) FILTER (WHERE d.status = 'duplicate') AS duplicates,
    count(*) FILTER (WHERE d.status = 'pending') AS pending,
    round(count(*) FILTER (WHERE d.status = 'accepted') / count(*), 4) AS accepted_share,
    coalesce(any_value(sp.train), 0) AS train,
    coalesce(any_value(sp.validation), 0) AS validation,
    coalesce(any_value(sp.test), 0) AS test
FROM row_dispositions d
LEFT JOIN splits sp USING (source)
GROUP BY d.source
ORDER BY d.source;

CREATE OR REPLACE VIEW rejections_by_reason AS
SELECT reason, source, count(*) AS rows, list(row_id ORDER BY row_id)[1:5] AS example_rows, any_value(detail) AS example_detail
FROM row_dispositions
WHERE status = 'rejected'
GROUP BY ALL
ORDER BY rows DESC, reason, source;

-- Files that could not be read at all, with why.
CREATE OR REPLACE VIEW quarantined_files AS
SELECT path, file_id, reason, detail, ingested_at FROM source_files WHERE status = 'quarantined' ORDER BY path;

-- Each cluster with more than one member: its kept row, its size, and what the duplicates look like.
CREATE OR REPLACE VIEW duplicate_clusters AS
SELECT
    m.cluster_id AS representative,
    count(*) AS members,
    count(*) FILTER (WHERE m.method = 'exact') AS exact_copies,
    count(*) FILTER (WHERE m.method = 'near') AS near_copies,
    min(m.similarity) AS min_similarity,
    any_value(rep.source) AS source,
    left(any_value(rep.dedup_text), 120) AS representative_text,
    list(m.row_id ORDER BY m.row_id) FILTER (WHERE m.method <> 'representative') AS duplicate_rows
FROM cluster_members m
JOIN curated_rows rep ON rep.row_id = m.cluster_id
GROUP BY m.cluster_id
HAVING count(*) > 1
ORDER BY members DESC, representative;

-- Rows per source, kind and split, with their share of the source's rows and how many prompt groups they come from.
CREATE OR REPLACE VIEW split_balance AS
SELECT c.source, c.kind, s.split, count(*) AS rows,
    round(count(*) / sum(count(*)) OVER (PARTITION BY c.source, c.kind), 4) AS share,
    count(DISTINCT g.group_id) AS groups, round(avg(c.n_chars), 1) AS avg_chars
FROM curated_rows c
JOIN cluster_members m ON m.row_id = c.row_id AND m.method = 'representative'
JOIN split_assignments s ON s.cluster_id = m.cluster_id
LEFT JOIN split_groups g ON g.cluster_id = m.cluster_id
GROUP BY c.source, c.kind, s.split
ORDER BY c.source, c.kind, s.split;

-- Prompt groups with more than one row, largest first: what they hold and which splits they are in (more than
-- one only after a bridge, see bridged_rows).
CREATE OR REPLACE VIEW prompt_groups AS
SELECT g.group_id, count(*) AS rows,
    count(*) FILTER (WHERE c.kind = 'sft') AS sft_rows,
    count(*) FILTER (WHERE c.kind = 'preference') AS preference_rows,
    list(DISTINCT s.split ORDER BY s.split) AS splits,
    left(any_value(first.dedup_text), 120) AS first_text
FROM split_groups g
JOIN curated_rows c ON c.row_id = g.cluster_id
JOIN split_assignments s ON s.cluster_id = g.cluster_id
JOIN curated_rows first ON first.row_id = g.group_id
GROUP BY g.group_id
HAVING count(*) > 1
ORDER BY rows DESC, g.group_id;

-- New rows that joined prompt groups already in different splits: the split each was given and the groups it
-- joined. Their leftover overlap with training, if any, is in contaminated_examples.
CREATE OR REPLACE VIEW bridged_rows AS
SELECT b.bridged_at, b.cluster_id AS row_id, b.split, b.group_id, b.joined_groups, b.joined_splits,
    left(c.dedup_text, 120) AS text
FROM split_bridges b
JOIN curated_rows c ON c.row_id = b.cluster_id
ORDER BY b.bridged_at DESC, b.cluster_id;

-- Character lengths of accepted rows per source, in power-of-two buckets.
CREATE OR REPLACE VIEW length_distribution AS
SELECT c.source, c.kind,
    CAST(pow(2, floor(log2(greatest(c.n_chars, 1)))) AS BIGINT) AS chars_from,
    count(*) AS rows
FROM curated_rows c
JOIN cluster_members m ON m.row_id = c.row_id AND m.method = 'representative'
GROUP BY ALL
ORDER BY c.source, c.kind, chars_from;

CREATE OR REPLACE VIEW length_stats AS
SELECT c.source, c.kind, count(*) AS rows, min(c.n_chars) AS min_chars,
    CAST(quantile_cont(c.n_chars, 0.5) AS BIGINT) AS median_chars,
    CAST(quantile_cont(c.n_chars, 0.95) AS BIGINT) AS p95_chars, max(c.n_chars) AS max_chars
FROM curated_rows c
JOIN cluster_members m ON m.row_id = c.row_id AND m.method = 'representative'
GROUP BY ALL
ORDER BY c.source, c.kind;

-- Detected languages per source among the rows that reached the quality stage: share, how many were kept (not
-- rejected by a quality rule), and the detector's mean confidence.
CREATE OR REPLACE VIEW language_mix AS
WITH counts AS (
    SELECT c.source, q.language, count(*) AS rows, count(*) FILTER (WHERE q.reason IS NULL) AS kept,
        round(avg(q.language_confidence), 3) AS mean_confidence
    FROM quality_rows q JOIN clean_rows c USING (row_id)
    GROUP BY c.source, q.language
)
SELECT source, language, rows, round(rows / sum(rows) OVER (PARTITION BY source), 4) AS share, kept, mean_confidence
FROM counts
ORDER BY source, rows DESC, language;

-- Personal data found, per source and kind: rows holding it, matches, and what the policy did with them.
CREATE OR REPLACE VIEW pii_findings AS
SELECT c.source, p.kind, p.action, count(*) AS rows, sum(p.matches)::BIGINT AS matches,
    list(p.row_id ORDER BY p.row_id)[1:5] AS example_rows
FROM pii_matches p
JOIN clean_rows c USING (row_id)
GROUP BY ALL
ORDER BY c.source, p.kind;

-- Training rows rejected for reproducing a benchmark item: which file and item, and how much of it.
CREATE OR REPLACE VIEW benchmark_contamination AS
SELECT b.row_id, c.source, b.benchmark, b.item, b.part, round(b.overlap, 4) AS overlap, left(c.dedup_text, 120) AS text
FROM benchmark_matches b
JOIN curated_rows c USING (row_id)
ORDER BY b.overlap DESC, b.row_id;

-- Validation/test rows left out of training's and evaluation's held-out sets, and why.
CREATE OR REPLACE VIEW eval_exclusions AS
SELECT k.split, c.kind, 'overlaps training' AS reason, count(*) AS rows
FROM contamination k
JOIN curated_rows c USING (row_id)
GROUP BY ALL
ORDER BY k.split, c.kind;

CREATE OR REPLACE VIEW contaminated_examples AS
SELECT k.split, k.overlap, k.row_id, left(e.dedup_text, 120) AS text, k.closest_train_row,
    left(t.dedup_text, 120) AS closest_train_text
FROM contamination k
JOIN curated_rows e ON e.row_id = k.row_id
LEFT JOIN curated_rows t ON t.row_id = k.closest_train_row
ORDER BY k.overlap DESC;

-- Tool calling in accepted rows, per source and function: how many calls, in how many rows, and whether the
-- row's tool schemas declare the function (NULL: the row lists no tools).
CREATE OR REPLACE VIEW tool_calls AS
WITH calls AS (
    SELECT c.source, c.row_id, c.tools, unnest(flatten(list_transform(c.messages, lambda m: coalesce(m.tool_calls, []))))
        AS call
    FROM curated_rows c
    JOIN cluster_members m ON m.row_id = c.row_id AND m.method = 'representative'
)
SELECT source, call.name AS function, count(*) AS calls, count(DISTINCT row_id) AS rows,
    bool_and(list_contains(json_extract_string(tools, '$[*].function.name'), call.name)) AS declared,
    any_value(call.arguments) AS example_arguments
FROM calls
GROUP BY ALL
ORDER BY calls DESC, source, function;

-- ============================================================== what training reads
-- Conversations for SFT: one per duplicate cluster, with its split. Validation/test rows that overlap the training
-- split (contamination) are left out: scoring them would measure memorisation. Feedback rows count only when their
-- answer is labelled desirable: SFT must never learn an answer marked undesirable.
CREATE OR REPLACE VIEW sft_examples AS
SELECT c.row_id AS example_id, s.split, c.source, c.messages, c.tools
FROM curated_rows c
JOIN cluster_members m ON m.row_id = c.row_id AND m.method = 'representative'
JOIN split_assignments s ON s.cluster_id = m.cluster_id
WHERE (c.kind = 'sft' OR (c.kind = 'feedback' AND c.label)) AND c.row_id NOT IN (SELECT row_id FROM contamination);

-- Labelled answers for KTO: the prompt turns, the last (assistant) answer and whether it is desirable (contaminated
-- validation/test rows left out, as for sft_examples).
CREATE OR REPLACE VIEW feedback_examples AS
SELECT c.row_id AS example_id, s.split, c.source, c.messages[1:len(c.messages) - 1] AS prompt,
    c.messages[len(c.messages)].content AS completion, c.label, c.tools
FROM curated_rows c
JOIN cluster_members m ON m.row_id = c.row_id AND m.method = 'representative'
JOIN split_assignments s ON s.cluster_id = m.cluster_id
WHERE c.kind = 'feedback' AND c.row_id NOT IN (SELECT row_id FROM contamination);

-- Preference pairs for DPO: a ranked list of n answers gives n*(n-1)/2 (better, worse) pairs (contaminated
-- validation/test rows left out, as for sft_examples).
CREATE OR REPLACE VIEW preference_pairs AS
WITH ranked AS (
    SELECT c.row_id, s.split, c.source, c.messages, c.responses, c.tools
    FROM curated_rows c
    JOIN cluster_members m ON m.row_id = c.row_id AND m.method = 'representative'
    JOIN split_assignments s ON s.cluster_id = m.cluster_id
    WHERE c.kind = 'preference' AND c.row_id NOT IN (SELECT row_id FROM contamination)
), idx AS (
    SELECT r.*, i.i, j.j
    FROM ranked r,
        LATERAL (SELECT unnest(generate_series(1, len(r.responses))) AS i) i,
        LATERAL (SELECT unnest(generate_series(1, len(r.responses))) AS j) j
    WHERE i.i < j.j
)
SELECT
    CASE WHEN len(responses) = 2 THEN row_id ELSE row_id || '#' || i || '>' || j END AS example_id,
    split, source, messages AS prompt, responses[i] AS chosen, responses[j] AS rejected, tools
FROM idx;

-- ============================================================== training plane
-- "How did last night's run train": select * from training_curves where run_id = (select run_id from
-- training_summary where stage = 'sft' limit 1) order by step, or the one-line-per-run summary below.
CREATE OR REPLACE VIEW training_summary AS
SELECT
    r.run_id, r.stage, r.finished_at, r.wall_s, r.tokens_per_s, r.resumed_from_step, r.base_model,
    max(c.step) AS steps,
    arg_min(c.value, c.step) FILTER (WHERE c.metric = 'loss') AS first_loss,
    arg_max(c.value, c.step) FILTER (WHERE c.metric = 'loss') AS last_loss,
    arg_min(c.value, c.step) FILTER (WHERE c.metric = 'eval_loss') AS first_eval_loss,
    arg_max(c.value, c.step) FILTER (WHERE c.metric = 'eval_loss') AS last_eval_loss,
    arg_max(c.value, c.step) FILTER (WHERE c.metric = 'eval_validation_rewards/accuracies') AS eval_reward_accuracy,
    arg_max(c.value, c.step) FILTER (WHERE c.metric = 'eval_validation_rewards/margins') AS eval_reward_margin,
    r.output_dir, r.fingerprint
FROM training_runs r
LEFT JOIN training_curves c USING (run_id)
GROUP BY ALL
ORDER BY r.finished_at DESC;

-- The curves of the most recent run of each stage, wide enough to eyeball: one row per (stage, step).
CREATE OR REPLACE VIEW latest_training_curves AS
WITH latest AS (
    SELECT stage, arg_max(run_id, finished_at) AS run_id FROM training_runs GROUP BY stage
)
SELECT c.stage, c.step,
    max(c.value) FILTER (WHERE c.metric = 'loss') AS loss,
    max(c.value) FILTER (WHERE c.metric = 'eval_loss') AS eval_loss,
    max(c.value) FILTER (WHERE c.metric = 'learning_rate') AS learning_rate,
    max(c.value) FILTER (WHERE c.metric = 'grad_norm') AS grad_norm,
    max(c.value) FILTER (WHERE c.metric = 'tokens_per_s') AS tokens_per_s,
    max(c.value) FILTER (WHERE c.metric = 'rewards/accuracies') AS reward_accuracy,
    max(c.value) FILTER (WHERE c.metric = 'rewards/margins') AS reward_margin,
    max(c.value) FILTER (WHERE c.metric = 'eval_validation_rewards/accuracies') AS eval_reward_accuracy,
    max(c.value) FILTER (WHERE c.metric = 'eval_validation_rewards/margins') AS eval_reward_margin
FROM training_curves c
JOIN latest l USING (stage, run_id)
GROUP BY c.stage, c.step
ORDER BY c.stage, c.step;

-- ============================================================== evaluation plane
-- "How did the variants of each run compare": one row per (run, variant), overall metrics side by side, each
-- with its bootstrap confidence interval (_low, _high) and the examples it was computed over.
CREATE OR REPLACE VIEW eval_summary AS
SELECT
    e.run_id, r.finished_at, e.variant,
    max(e.value) FILTER (WHERE e.split = 'validation' AND e.metric = 'perplexity') AS ppl_validation,
    max(e.ci_low) FILTER (WHERE e.split = 'validation' AND e.metric = 'perplexity') AS ppl_validation_low,
    max(e.ci_high) FILTER (WHERE e.split = 'validation' AND e.metric = 'perplexity') AS ppl_validation_high,
    max(e.value) FILTER (WHERE e.split = 'test' AND e.metric = 'perplexity') AS ppl_test,
    max(e.ci_low) FILTER (WHERE e.split = 'test' AND e.metric = 'perplexity') AS ppl_test_low,
    max(e.ci_high) FILTER (WHERE e.split = 'test' AND e.metric = 'perplexity') AS ppl_test_high,
    max(e.examples) FILTER (WHERE e.split = 'test' AND e.metric = 'perplexity') AS ppl_test_examples,
    max(e.value) FILTER (WHERE e.split = 'test' AND e.metric = 'rouge1') AS rouge1,
    max(e.value) FILTER (WHERE e.split = 'test' AND e.metric = 'rouge2') AS rouge2,
    max(e.value) FILTER (WHERE e.split = 'test' AND e.metric = 'rougeL') AS rougeL,
    max(e.ci_low) FILTER (WHERE e.split = 'test' AND e.metric = 'rougeL') AS rougeL_low,
    max(e.ci_high) FILTER (WHERE e.split = 'test' AND e.metric = 'rougeL') AS rougeL_high,
    max(e.value) FILTER (WHERE e.split = 'test' AND e.metric = 'rougeLsum') AS rougeLsum,
    max(e.n) FILTER (WHERE e.split = 'test' AND e.metric = 'rougeL') AS generated_examples,
    max(e.value) FILTER (WHERE e.split = 'test' AND e.metric = 'preference_accuracy') AS preference_accuracy,
    max(e.ci_low) FILTER (WHERE e.split = 'test' AND e.metric = 'preference_accuracy') AS preference_accuracy_low,
    max(e.ci_high) FILTER (WHERE e.split = 'test' AND e.metric = 'preference_accuracy') AS preference_accuracy_high,
    max(e.value) FILTER (WHERE e.split = 'test' AND e.metric = 'preference_margin') AS preference_margin,
    max(e.n) FILTER (WHERE e.split = 'test' AND e.metric = 'preference_accuracy') AS preference_pairs,
    p.decision AS promotion
FROM eval_results e
LEFT JOIN eval_runs r USING (run_id)
LEFT JOIN promotions p ON p.run_id = e.run_id AND p.variant = e.variant
WHERE e.source = 'all'
GROUP BY e.run_id, r.finished_at, e.variant, p.decision
ORDER BY r.finished_at DESC NULLS LAST, e.run_id,
    CASE e.variant WHEN 'base' THEN 0 WHEN 'sft' THEN 1 WHEN 'dpo' THEN 2 WHEN 'merged' THEN 3 ELSE 4 END;

-- The model that serves now: the most recently promoted run's merged model.
CREATE OR REPLACE VIEW current_model AS
SELECT run_id, variant, model_path, decided_at, checks
FROM promotions
WHERE decision = 'promoted'
ORDER BY decided_at DESC
LIMIT 1;

CREATE OR REPLACE VIEW promotion_history AS
SELECT decided_at, run_id, variant, decision, baseline_kind, baseline_run_id, reasons, model_path
FROM promotions
ORDER BY decided_at DESC;

-- Serving smoke tests: startup time, request latency and throughput, parity.
CREATE OR REPLACE VIEW serving_smoke_summary AS
SELECT
    s.run_id, s.target, s.passed, s.startup_s, s.parity_passed, s.parity_total, s.reason,
    round(avg(q.latency_s) FILTER (WHERE q.endpoint <> '/v1/models'), 4) AS mean_latency_s,
    round(sum(q.completion_tokens) / nullif(sum(q.latency_s) FILTER (WHERE q.completion_tokens IS NOT NULL), 0), 1)
        AS tokens_per_s,
    s.model_path, s.finished_at
FROM serve_smoke_runs s
LEFT JOIN serve_smoke_requests q USING (smoke_id)
GROUP BY ALL
ORDER BY s.finished_at DESC;
