"""Clean and validate (polars): normalise text, then reject rows that break a rule, with a stable reason code.

Rules run in a fixed order and a row keeps the first rule it breaks:
  undecodable_text     text holds U+FFFD, the mark of a decoding accident upstream
  empty_turn           a user/assistant turn (or a preference answer) is empty after normalisation
  no_assistant_reply   an SFT conversation without an assistant turn
  wrong_role_order     anything but [system] (user (call tool+)* assistant)+ for SFT (the last answer may be a
                       call), or a preference prompt not ending on a user turn or tool result; a call is an
                       assistant turn with tool calls, a tool turn a tool result
  identical_responses  a preference row whose answers are not all different (chosen == rejected)
  template_lacks_tools a row with tools, tool calls or tool results when the chat template training will use
                       cannot render them (model.chat_template, else the base's own, else the default)
  too_short            a turn shorter than data.clean.min_turn_chars
  too_long             more than data.clean.max_chars characters in all
  too_long_tokens      more than data.clean.max_tokens tokens (only with a known tokenizer)
The table (clean_results, read through the clean_rows view) is rebuilt on every run, so a changed threshold
re-judges old rows too. It stores each text once: turns, answers and dedup_text only where they are not what
parsed_rows already holds or the turns spell out (STORE_CLEANED).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import polars as pl

from tasks.core import storage
from tasks.core.caching import current_run_id, stage_task
from tasks.core.config import CleanConfig, PipelineConfig
from tasks.core.results import DataResult
from tasks.core.warehouse import (
    open_warehouse,
    rebuilding,
    record_stage,
    stream,
    table_fingerprint,
    utcnow,
    zstd_text,
)
from tasks.data.chat_template import DEFAULT_CHAT_TEMPLATE, tools_problem


def _any_case(word: str) -> str:
    return "".join(f"[{ch.upper()}{ch}]" for ch in word)


ROLE_CODE = {"system": "S", "user": "U", "assistant": "A", "tool": "T"}  # C: an assistant turn with tool calls
_CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufeff\u200b]"  # keeps \t \n \r; drops BOMs and zero-width spaces
_HAN, _HANGUL, _KANA, _LATIN = r"[\u4e00-\u9fff\u3400-\u4dbf]", r"[\uac00-\ud7af]", r"[\u3040-\u30ff]", "[A-Za-z]"
_CJK, _KANA_HANGUL = r"[\u4e00-\u9fff\u3400-\u4dbf\uac00-\ud7af]", r"[\u3040-\u30ff\uac00-\ud7af]"
# ASCII case spelled out instead of lowercasing every text first (a copy of it) or (?i) (which also folds ſ to s).
_LATIN_STOPWORDS = r"\b(" + "|".join(_any_case(w) for w in (
    "the", "and", "is", "of", "to", "in", "a", "you", "that", "it", "for", "what", "with")) + r")\b"
PARSED_ROWS = ("SELECT p.row_id, p.kind, f.source, r.row_seq, p.messages, p.responses, p.tools, p.label "
               "FROM parsed_rows p JOIN raw_rows r USING (row_id) JOIN source_files f USING (file_id) "
               "WHERE p.reason IS NULL ORDER BY r.row_seq")  # what ingest parsed without error, in file order
# clean_frame's rows (with parsed_messages / parsed_responses: the batch's rows as ingest parsed them) into
# clean_results (its staging table while the stage runs), each text stored once: turns (answers) that normalising
# left as ingest parsed them are NULL with messages_as_parsed (responses_as_parsed) true, tools always NULL (clean
# never changes them), dedup_text NULL where it equals the turns' conversation_text (sql/views.sql); the clean_rows
# view reads those from parsed_rows and the turns.
STORE_CLEANED = """
INSERT INTO {table} BY NAME
SELECT * EXCLUDE (messages, responses, tools, dedup_text, text_of_turns),
    CASE WHEN NOT messages_as_parsed THEN messages END AS messages,
    CASE WHEN NOT responses_as_parsed THEN responses END AS responses,
    CASE WHEN NOT text_of_turns THEN dedup_text END AS dedup_text
FROM (
    SELECT c.* EXCLUDE (messages, parsed_messages, parsed_responses), CAST(c.messages AS chat_message[]) AS messages,
        CAST(c.messages AS chat_message[]) IS NOT DISTINCT FROM CAST(c.parsed_messages AS chat_message[])
            AS messages_as_parsed,
        c.responses IS NOT DISTINCT FROM c.parsed_responses AS responses_as_parsed,
        c.dedup_text IS NOT DISTINCT FROM conversation_text(CAST(c.messages AS chat_message[])) AS text_of_turns,
        sha256(c.kind || chr(0) || c.dedup_text) AS content_hash
    FROM cleaned c
)"""


def normalize_text(expr: pl.Expr, form: str) -> pl.Expr:
    """NFC, no control characters or stray BOMs, Unix newlines, no trailing spaces, trimmed ends."""
    return (
        expr.str.normalize(form)
        .str.replace_all(_CONTROL, "")
        .str.replace_all(r"\r\n?", "\n")
        .str.replace_all(r"[ \t]+\n", "\n")
        .str.strip_chars()
    )


def with_language(df: pl.DataFrame, text: pl.Expr, name: str = "language") -> pl.DataFrame:
    """df with a script-based language guess of text, enough for a language-mix report: zh / ja / ko / en / other.

    Kana: ja; more Hangul than Han: ko; Han above a quarter of the Latin letters: zh; an English stopword: en.
    Most rows settle on searches, which stop at the first match; only rows holding Han or Hangul pay for character
    counts. Built in steps, each a column, because an eager frame recomputes a shared sub-expression at every use."""
    t = pl.col("_text")
    df = df.with_columns(text.alias("_text"))
    wide = pl.when(t.str.len_bytes() != t.str.len_chars()).then(t)  # non-ASCII text, else null
    df = df.with_columns(pl.when(wide.str.contains(_KANA_HANGUL)).then(t).alias("_rare"),  # else null: not searched
                         pl.when(wide.str.contains(_CJK)).then(t).alias("_cjk"))  # else null: not counted
    rare, cjk = pl.col("_rare"), pl.col("_cjk")
    df = df.with_columns(rare.str.contains(_KANA).fill_null(False).alias("_kana"),
                         rare.str.count_matches(_HANGUL).fill_null(0).alias("_hangul"),
                         cjk.str.count_matches(_HAN).fill_null(0).alias("_han"),
                         cjk.str.count_matches(_LATIN).fill_null(0).alias("_latin"),  # only ever compared with Han
                         t.str.contains(_LATIN_STOPWORDS).alias("_english"))  # a stopword is Latin letters
    return df.with_columns(
        pl.when("_kana").then(pl.lit("ja"))
        .when(pl.col("_hangul") > pl.col("_han")).then(pl.lit("ko"))
        .when(pl.col("_han") > pl.col("_latin") / 4).then(pl.lit("zh"))
        .when("_english").then(pl.lit("en"))
        .otherwise(pl.lit("other")).alias(name)
    ).drop("_text", "_rare", "_cjk", "_kana", "_hangul", "_han", "_latin", "_english")


def turn_text() -> pl.Expr:
    """Everything a turn says, for dedup and lengths: its reasoning, its text and its tool calls as name(arguments)."""
    calls = pl.col("tool_calls").list.eval(
        pl.format("{}({})", pl.element().struct.field("name"), pl.element().struct.field("arguments"))
    ).list.join("\n")
    nonempty = [pl.when(e != "").then(e) for e in (pl.col("reasoning"), pl.col("content"), calls)]
    return pl.concat_str(nonempty, separator="\n", ignore_nulls=True).fill_null("")


def _turns(rows: pl.DataFrame, form: str) -> pl.DataFrame:
    """One row per turn, normalised, with its text before normalisation and its number of tool calls."""
    return (
        rows.select("row_id", "messages").explode("messages").unnest("messages")
        .with_columns(normalize_text(pl.col("content"), form).alias("content"),
                      normalize_text(pl.col("reasoning"), form).alias("reasoning"),
                      (pl.col("content").fill_null("") + pl.col("reasoning").fill_null("")).alias("original"),
                      pl.col("tool_calls").list.len().fill_null(0).alias("n_calls"))
        .filter(~((pl.col("role") == "system") & (pl.col("content") == "")))  # an empty system prompt says nothing
        .with_columns(turn_text().alias("text"))
    )


def _conversations(turns: pl.DataFrame) -> pl.DataFrame:
    """Per row: the normalised messages, the role codes and what the rules need to know about its turns."""
    speaks = pl.col("role").is_in(["user", "assistant"])  # tool results are the world's words, not a turn's
    return turns.group_by("row_id", maintain_order=True).agg(
        pl.struct("role", "content", "reasoning", "tool_calls", "tool_call_id", "name").alias("messages"),
        pl.when((pl.col("role") == "assistant") & (pl.col("n_calls") > 0)).then(pl.lit("C"))
        .otherwise(pl.col("role").replace_strict(ROLE_CODE, default="?")).str.join("").alias("roles"),
        (speaks & (pl.col("text") == "")).any().alias("has_empty"),
        pl.col("original").str.contains("\ufffd", literal=True).any().alias("undecodable"),
        pl.when(speaks).then(pl.col("text").str.len_chars()).min().alias("shortest_turn"),
        pl.col("text").str.len_chars().sum().alias("turn_chars"),
        pl.format("{}: {}", "role", "text").str.join("\n").alias("conversation"),
        ((pl.col("role") == "tool") | (pl.col("n_calls") > 0)).any().alias("tool_turns"),
    )


def _responses(rows: pl.DataFrame, form: str) -> pl.DataFrame:
    """Per preference row: the normalised answers and what the rules need to know about them."""
    return (
        rows.select("row_id", "responses").explode("responses")
        .with_columns(normalize_text(pl.col("responses"), form).alias("response"),
                      pl.col("responses").alias("original"))
        .group_by("row_id", maintain_order=True).agg(
            pl.col("response").drop_nulls().alias("responses"),
            (pl.col("response") == "").any().alias("empty_response"),
            pl.col("original").str.contains("\ufffd", literal=True).any().alias("undecodable_response"),
            (pl.col("response").drop_nulls().n_unique() < pl.col("response").drop_nulls().len()).alias("dup_response"),
            pl.col("response").str.len_chars().sum().alias("response_chars"),
        )
    )


def _rules(c: CleanConfig, is_pref: pl.Expr, uses_tools: pl.Expr, problem: str | None) -> list[tuple[str, pl.Expr, str | pl.Expr]]:
    """(reason code, broken, detail) in the order rows are judged; see the module docstring."""
    sft_order_ok = pl.col("roles").str.contains(r"^S?(U(CT+)*A)*U(CT+)*[AC]$")
    pref_order_ok = pl.col("roles").str.contains(r"^S?(U(CT+)*A)*U(CT+)*$")
    return [
        ("undecodable_text", pl.col("undecodable").fill_null(False) | pl.col("undecodable_response").fill_null(False),
         "text contains U+FFFD (replacement character)"),
        ("empty_turn", pl.col("has_empty").fill_null(True) | pl.col("empty_response").fill_null(False),
         "a turn or answer is empty after whitespace normalisation"),
        ("no_assistant_reply", ~is_pref & ~pl.col("roles").fill_null("").str.contains("[AC]"),
         "the conversation has no assistant turn"),
        ("wrong_role_order", pl.when(is_pref).then(~pref_order_ok).otherwise(~sft_order_ok).fill_null(True),
         pl.format("role sequence {} (S=system U=user A=assistant C=assistant tool call T=tool result)", pl.col("roles").fill_null(""))),
        ("identical_responses", is_pref & pl.col("dup_response").fill_null(False), "chosen equals rejected"),
        ("template_lacks_tools", uses_tools & pl.lit(problem is not None), problem or ""),
        ("too_short", pl.col("shortest_turn").fill_null(0) < c.min_turn_chars,
         pl.format("shortest turn has {} characters", pl.col("shortest_turn"))),
        ("too_long", pl.col("n_chars") > c.max_chars, pl.format("{} characters", pl.col("n_chars"))),
    ]


def _judge(df: pl.DataFrame, rules: list[tuple[str, pl.Expr, str | pl.Expr]]) -> pl.DataFrame:
    """reason and detail of the first rule each row breaks (null where it breaks none)."""
    reason, detail = pl.lit(None, pl.String), pl.lit(None, pl.String)
    for code, broken, why in reversed(rules):  # built inside-out so the first broken rule wins
        reason = pl.when(broken).then(pl.lit(code)).otherwise(reason)
        detail = pl.when(broken).then(why if isinstance(why, pl.Expr) else pl.lit(why)).otherwise(detail)
    return df.with_columns(reason.alias("reason"), detail.alias("detail"))


def _judge_tokens(df: pl.DataFrame, max_tokens: int, token_counter) -> pl.DataFrame:
    """too_long_tokens for rows that passed every other rule but hold more than max_tokens tokens."""
    tokens = pl.Series(token_counter(df["dedup_text"].to_list()), dtype=pl.Int64)
    too_long = pl.col("reason").is_null() & (tokens > max_tokens)
    return df.with_columns(
        pl.when(too_long).then(pl.lit("too_long_tokens")).otherwise(pl.col("reason")).alias("reason"),
        pl.when(too_long).then(pl.format("{} tokens", tokens)).otherwise(pl.col("detail")).alias("detail"),
    )


def clean_frame(rows: pl.DataFrame, cfg: PipelineConfig, token_counter=None,
                tools_problem: Callable[[], str | None] | None = None) -> pl.DataFrame:
    """Normalise and judge parsed rows. Input columns: row_id, kind, source, row_seq, messages, responses, tools,
    label.
    token_counter(texts) gives the token count of each text (the whole batch at once).
    tools_problem() says why the training chat template cannot render tool calling (None: it can); it is asked only
    when some row uses tools."""
    c = cfg.data.clean
    df = (
        rows.select("row_id", "kind", "source", "row_seq", "tools", "label")
        .join(_conversations(_turns(rows, c.normalize_form)), on="row_id", how="left")
        .join(_responses(rows, c.normalize_form), on="row_id", how="left")
        .with_columns(pl.col("responses").fill_null([]).list.eval(pl.element()).alias("responses"))
    )
    df = df.with_columns(
        (pl.col("turn_chars").fill_null(0) + pl.col("response_chars").fill_null(0)).alias("n_chars"),
        # Preference data is deduplicated on its prompt, SFT data on the whole conversation.
        pl.col("conversation").fill_null("").alias("dedup_text"),
    )
    df = with_language(df, pl.col("dedup_text") + "\n" + pl.col("responses").list.join("\n"))
    uses_tools = pl.col("tools").is_not_null() | pl.col("tool_turns").fill_null(False)
    problem = tools_problem() if tools_problem is not None and df.select(uses_tools.any()).item() else None
    df = _judge(df, _rules(c, pl.col("kind") == "preference", uses_tools, problem))
    if token_counter is not None and c.max_tokens:
        df = _judge_tokens(df, c.max_tokens, token_counter)
    return df.select("row_id", "kind", "source", "row_seq", "messages", "responses", "tools", "dedup_text",
                     "n_chars", "language", "reason", "detail", "label")


def _base_tokenizer(cfg: PipelineConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(storage.fetched(cfg.model.base),
                                         trust_remote_code=cfg.model.trust_remote_code)


def _token_counter(cfg: PipelineConfig):
    if not cfg.data.clean.max_tokens or cfg.model.base == "embedded":
        return None  # the embedded tokenizer is trained later, on the split this stage feeds
    tok = _base_tokenizer(cfg)
    # One call for the whole batch: a fast tokenizer encodes it in Rust, in parallel, instead of once per row.
    return lambda texts: tok(texts, add_special_tokens=False, return_length=True)["length"]


def template_tools_problem(cfg: PipelineConfig) -> str | None:
    """Why the chat template training will use (model.chat_template, else the base tokenizer's, else the default)
    cannot render tool calling; None when it can."""
    if cfg.model.base == "embedded":
        from transformers.utils.chat_template_utils import render_jinja_template

        template = cfg.model.chat_template or DEFAULT_CHAT_TEMPLATE

        def render(messages, tools):
            return render_jinja_template([messages], tools=tools, chat_template=template, bos_token="<s>",
                                         eos_token="</s>")[0][0]
    else:
        tok = _base_tokenizer(cfg)
        template = cfg.model.chat_template or tok.chat_template or DEFAULT_CHAT_TEMPLATE

        def render(messages, tools):
            return tok.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False)
    return tools_problem(render)


def run_clean(cfg: PipelineConfig, ingest: DataResult, run_id: str = "local") -> DataResult:
    started = utcnow()
    token_counter = _token_counter(cfg)
    template_problem = functools.cache(lambda: template_tools_problem(cfg))  # asked once, if some row has tools
    rows = 0
    with open_warehouse(cfg.warehouse_url) as con:
        with zstd_text(con):
            with rebuilding(con, "clean_results") as staged:
                for batch in stream(con, PARSED_ROWS, cfg.data.batch_rows):
                    cleaned = clean_frame(batch, cfg, token_counter, template_problem).join(
                        batch.select("row_id", pl.col("messages").alias("parsed_messages"),
                                     pl.col("responses").alias("parsed_responses")), on="row_id", how="left")
                    con.register("cleaned", cleaned.to_arrow())
                    con.execute(STORE_CLEANED.format(table=staged["clean_results"]))
                    con.unregister("cleaned")
                    rows += len(cleaned)
            con.execute("CHECKPOINT")  # a small table's rows are only in the write-ahead log until a checkpoint
        by_reason = dict(con.execute(
            "SELECT coalesce(reason, 'passed'), count(*) FROM clean_results GROUP BY ALL ORDER BY ALL").fetchall())
        stats = {"rows": rows, "passed": by_reason.pop("passed", 0), "rejected_by_reason": by_reason}
        fingerprint = table_fingerprint(con, "SELECT row_id, content_hash, dedup_text, reason FROM clean_rows")
        record_stage(con, run_id, "clean", started, stats)
    return DataResult(stage="clean", fingerprint=fingerprint, warehouse=cfg.warehouse_url, stats=stats)


@stage_task("clean", lambda c: {"clean": c.data.clean.model_dump(), "warehouse": c.warehouse_url,
                                "tokenizer": c.model.base, "chat_template": c.model.chat_template})
def clean_task(cfg: PipelineConfig, ingest: DataResult) -> DataResult:
    return run_clean(cfg, ingest, current_run_id())
