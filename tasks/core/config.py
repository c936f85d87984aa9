"""The pipeline's one typed config.

Loaded from YAML (`load_config`), overridable with dotted `key=value` strings (`sftpipe run data.dedup.threshold=0.7`)
or a nested dict of Prefect flow parameters (`apply_overrides`). Every field has a default and a description;
`sftpipe config` prints them. An invalid value fails at load with the field's dotted name in the message.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.core import storage

Format = Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference"]
# The fields a file's columns can be mapped onto (what tasks/data/formats.py reads).
OurField = Literal["instruction", "input", "output", "system", "history", "conversations", "messages", "prompt",
                   "chosen", "rejected", "chosen_messages", "rejected_messages", "responses", "tools", "functions",
                   "label"]
# Speakers a turn's role value can be mapped onto (function_call: a ShareGPT turn whose value is the call as JSON).
OurRole = Literal["system", "user", "assistant", "tool", "function_call"]


class Section(BaseModel):
    # Unknown keys are typos, not extensions: fail loudly instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def fingerprint(self) -> str:
        """Stable hash of this section's values; part of every cache key that depends on it."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


class FieldMapping(Section):
    columns: dict[str, OurField] = Field(default_factory=dict, description="A file's field -> ours, e.g. "
                                         "{question: instruction, answer: output} or {dialog: messages}.")
    role_key: str | None = Field(None, description="The field of each turn that names the speaker (ours: role, "
                                 "or ShareGPT's from).")
    content_key: str | None = Field(None, description="The field of each turn that holds its text (ours: content, "
                                    "or ShareGPT's value).")
    roles: dict[str, OurRole] = Field(default_factory=dict, description="A speaker value -> ours, e.g. "
                                      "{customer: user, agent: assistant, api: tool}.")


class IngestConfig(Section):
    inputs: list[str] = Field(
        default_factory=list,
        description="Files or folders of .json/.jsonl/.jsonl.gz/.csv/.parquet. Empty: the embedded sample data "
        "that the pipeline writes to <storage_root>/sample_data.",
    )
    formats: dict[str, Format] = Field(
        default_factory=dict,
        description="Per-file format override: glob pattern (matched against the file path) -> format. "
        "Files not matched are auto-detected from their fields.",
    )
    csv_delimiter: str = Field(",", description="Delimiter of .csv inputs.")
    bulk: bool = Field(True, description="Read JSON Lines and Parquet files whose rows all fit a plain layout in bulk "
                       "(native readers, DuckDB JSON functions); any other file is read line by line. Both give the "
                       "same warehouse rows; false reads every file line by line.")
    mappings: dict[str, FieldMapping] = Field(
        default_factory=dict,
        description="Per-file field mapping, like a dataset registry entry: glob pattern (matched against the file "
        "path) -> {columns: {their field: ours}, role_key, content_key, roles: {their speaker: ours}}. Applied "
        "before format detection; raw rows stay as read.",
    )


class CleanConfig(Section):
    min_turn_chars: int = Field(1, ge=0, description="A user/assistant turn shorter than this (after normalisation) "
                                "rejects the row (reason too_short).")
    max_chars: int = Field(32_000, ge=1, description="A row whose text is longer than this rejects it (too_long).")
    max_tokens: int | None = Field(None, ge=1, description="With a tokenizer known (model.base), rows longer than this "
                                   "many tokens are rejected (too_long_tokens). None: no token limit.")
    normalize_form: Literal["NFC", "NFKC"] = Field("NFC", description="Unicode normal form applied to all text.")


PiiAction = Literal["redact", "reject", "keep"]


class PiiConfig(Section):
    email: PiiAction = Field("redact", description="E-mail addresses: redact (replace by <EMAIL>), reject the row "
                             "(reason pii_email) or keep.")
    phone: PiiAction = Field("redact", description="Phone numbers valid in one of phone_regions or written with a "
                             "+country code (<PHONE>, pii_phone).")
    ip_address: PiiAction = Field("redact", description="Public IPv4/IPv6 addresses; private, loopback and "
                                  "documentation ranges are not personal and stay (<IP_ADDRESS>, pii_ip_address).")
    credit_card: PiiAction = Field("redact", description="Card numbers of a known network that pass the Luhn check "
                                   "(<CREDIT_CARD>, pii_credit_card).")
    iban: PiiAction = Field("redact", description="IBANs with a valid country format and checksum (<IBAN>, pii_iban).")
    secret: PiiAction = Field("redact", description="API keys, tokens and private keys of well-known shapes (AWS, "
                              "GitHub, GitLab, Slack, Stripe, OpenAI, Anthropic, Google, Hugging Face, npm, JWT, PEM "
                              "private keys) (<SECRET>, pii_secret).")
    phone_regions: list[str] = Field(["US", "GB", "CN"], description="Regions (ISO 3166 alpha-2) whose national "
                                     "phone formats are recognised; numbers with a +country code are recognised "
                                     "anywhere. Regions with short or free-length numbers (DE, FR) make dates and "
                                     "decimals look like phone numbers.")


class QualityConfig(Section):
    languages: list[str] = Field(default_factory=list, description="Keep only rows whose detected language (ISO "
                                 "639-1, e.g. en, zh) is one of these (reason language_not_allowed). Empty: any.")
    min_language_confidence: float = Field(0.0, ge=0, le=1, description="Reject rows whose language is detected with "
                                           "less confidence than this (language_not_allowed).")
    language_chars: int = Field(200, ge=50, description="Characters of each row's text the language detector reads "
                                "(the start of the conversation; its time grows with this). 200 labels 99.3 % of "
                                "the real rows in ../shared as 500 does, at 0.6 of the time; the rows that differ "
                                "mix languages (translation prompts).")
    pii: PiiConfig = Field(default_factory=PiiConfig)


class DecontaminateConfig(Section):
    against: list[str] = Field(default_factory=list, description="Benchmark files or folders (paths or URLs) in any "
                               "input format, or JSONL of {\"text\": ...}; training rows that overlap one of their "
                               "items are rejected before the split (reason benchmark_contamination). Empty: off.")
    ngram: int = Field(8, ge=2, description="n-gram size in tokens (words; single characters for Chinese, Japanese, "
                       "Korean, Thai).")
    threshold: float = Field(0.5, gt=0, le=1, description="Share of a benchmark item's prompt or answer n-grams found "
                             "in a row at or above which the row is contaminated.")


class DedupConfig(Section):
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    threshold: float = Field(0.8, gt=0, lt=1, description="Jaccard similarity of shingle sets at or above "
                             "which two rows are near-duplicates.")
    ngram: int = Field(5, ge=1, description="Shingle size in tokens; a token is a word, or a single character for "
                       "scripts written without spaces (Chinese, Japanese, Korean, Thai).")
    seed: int = Field(1, description="MinHash permutation seed (datasketch semantics).")
    verify: Literal["exact", "estimate"] = Field("exact", description="How LSH candidate pairs are confirmed: "
                                                 "exact Jaccard of their shingles (reads the candidates' texts), or "
                                                 "the signatures' estimate (faster, misses pairs just above the "
                                                 "threshold).")
    shards: int = Field(2, ge=1, description="Signature shards; each is its own Prefect task, so a Dask task runner "
                        "spreads them over workers.")


class SplitConfig(Section):
    validation: float = Field(0.05, ge=0, lt=1, description="Target share of rows in the validation split.")
    test: float = Field(0.05, ge=0, lt=1, description="Target share of rows in the test split.")
    seed: int = Field(13, description="Split seed. A new prompt group's split is drawn from a hash of its group id "
                      "and this seed.")
    prompt_threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity (the dedup stage's shingles "
                                    "and MinHash) at or above which two prompt keys put their rows in one group.")
    prompt_min_tokens: int = Field(5, ge=1, description="A user turn after the first is a grouping key only with at "
                                   "least this many tokens (words, or characters for Chinese/Japanese/Korean/Thai); "
                                   "the first user turn always is.")
    prompt_system: bool = Field(False, description="Include the system prompt in the grouping keys (then the same "
                                "question under another system prompt is another group).")
    max_group_share: float = Field(0.1, gt=0, le=1, description="A new group larger than this share of a held-out "
                                   "split's expected rows goes to train; the other groups' held-out fractions are "
                                   "scaled up by the rows that displaces.")
    decontam_ngram: int = Field(8, ge=2, description="n-gram size (tokens) of the train/eval overlap check.")
    decontam_threshold: float = Field(0.5, gt=0, le=1, description="Share of an eval example's n-grams found in the "
                                      "training split above which it is reported as contaminated.")

    @model_validator(mode="after")
    def _ratios(self) -> SplitConfig:
        if self.validation + self.test >= 1:
            raise ValueError("validation + test must be < 1")
        return self


class DataConfig(Section):
    batch_rows: int = Field(100_000, ge=1, description="Rows the clean and quality stages hold in memory at once "
                            "(their results do not depend on it): memory grows with it, per-batch overhead shrinks.")
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)


class ModelConfig(Section):
    base: str = Field("embedded", description="Hugging Face model id or local path of the base model; 'embedded' "
                      "builds a tiny Llama from the training split (no download).")
    revision: str | None = Field(None, description="Hub model: branch, tag or commit. The base stage resolves it to "
                                 "a commit and records it; None: the default branch's head at run time (a new "
                                 "upstream commit retrains, an unchanged one stays cached).")
    trust_remote_code: bool = Field(False, description="Passed to the Auto classes.")
    chat_template: str | None = Field(None, description="Jinja chat template to use instead of the tokenizer's own "
                                      "(or the ChatML-style default where it has none).")
    max_length: int = Field(512, ge=16, description="Maximum tokens per training example.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the training stages run; auto: cuda "
                                                   "when available, else cpu.")
    attn_implementation: str | None = Field(None, description="transformers attention implementation (sdpa, eager, "
                                            "flash_attention_2, ...); None: the library default. Packing is only "
                                            "used with a flash-attention implementation, which keeps packed "
                                            "examples apart.")
    quantization: Literal["none", "4bit"] = Field("4bit", description="4bit: QLoRA, the base is loaded in 4-bit "
                                                  "with bitsandbytes while adapters train in full precision; "
                                                  "none: plain LoRA on the base in compute_dtype.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (QLoRA uses nf4).")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantise the quantisation constants too (QLoRA).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype of the 4-bit layers and of mixed precision; auto: bfloat16 on a GPU that "
        "supports it, float32 on CPU (bf16 is several times slower there).")
    embedded_vocab_size: int = Field(1024, ge=300, description="Embedded base: byte-level BPE vocabulary size.")
    embedded_hidden_size: int = Field(128, ge=16, description="Embedded base: hidden size of the tiny Llama.")
    embedded_layers: int = Field(2, ge=1, description="Embedded base: transformer layers.")
    embedded_heads: int = Field(4, ge=1, description="Embedded base: attention heads.")
    embedded_corpus: list[str] = Field(default_factory=list, description="Embedded base: plain-text files (paths "
                                       "or URLs, one document per line) its tokenizer and pretraining read. Empty: "
                                       "the sample data's pretraining_corpus.txt (facts and sentences in the sample "
                                       "tasks' vocabulary, no chat turns).")
    embedded_warmup_steps: int = Field(150, ge=0, description="Embedded base: causal-LM pretraining steps (batch "
                                       "16) on the corpus, so the base knows the language but not the chat format.")
    embedded_warmup_lr: float = Field(3e-3, gt=0, description="Embedded base: pretraining learning rate.")
    embedded_warmup_max_length: int = Field(64, ge=16, description="Embedded base: tokens per pretraining block "
                                            "(documents are packed).")
    embedded_seed: int = Field(0, description="Embedded base: seed of initialisation and warm-up.")


class TrainerSettings(Section):
    """What every adapter-training method shares, mapped onto trl's config classes in one place
    (tasks/training/trainer.py: trainer_arguments). A method section subclasses it, adds its own fields and may give
    shared fields other defaults through `defaults` (each field is still declared once, here)."""

    defaults: ClassVar[dict[str, Any]] = {}

    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name.")
    warmup_steps: float = Field(0.03, ge=0, description="Warm-up: steps, or a fraction of all steps when < 1.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_steps: int = Field(100, description="Optimizer steps; -1: run num_train_epochs instead.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs when max_steps is -1.")
    per_device_batch_size: int = Field(8, ge=1, description="Examples (or pairs) per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (saves GPU memory, "
                                         "costs ~20% time).")
    eval_steps: int = Field(25, ge=1, description="Validation metrics every this many steps (and at start and end).")
    save_steps: int = Field(25, ge=1, description="Checkpoint every this many steps; a retried stage resumes from the "
                            "last one.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept.")
    logging_steps: int = Field(5, ge=1, description="Training metrics every this many steps.")
    max_train_examples: int | None = Field(None, ge=1, validation_alias=AliasChoices("max_train_examples",
                                           "max_train_pairs"), description="Use at most this many training examples "
                                           "(or pairs; None: all).")
    max_eval_examples: int = Field(128, ge=1, validation_alias=AliasChoices("max_eval_examples", "max_eval_pairs"),
                                   description="Validation examples (or pairs) evaluated.")
    seed: int = Field(42, description="Seed of adapter init, data order and dropout.")
    num_processes: int = Field(1, ge=1, description="Data-parallel processes; > 1 launches the stage with "
                               "`launcher` (one per GPU; gloo processes on CPU).")
    launcher: Literal["accelerate", "torchrun"] = Field("accelerate", description="Multi-process launcher.")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="How the processes share the model: ddp "
                                                "(each holds all of it) or fsdp (FSDP2 shards the base, the adapter "
                                                "and the optimizer state over them, QLoRA's 4-bit weights included; "
                                                "for models that do not fit on one GPU). fsdp always runs under the "
                                                "launcher, also with one process.")
    fsdp_cpu_offload: bool = Field(False, description="fsdp on GPUs: keep the parameter shards in host memory and "
                                   "copy each layer in for its computation (slower; for models that do not fit even "
                                   "sharded).")
    accelerate_config: str | None = Field(None, description="An accelerate config file (`accelerate config "
                                          "--config_file`) for `accelerate launch`, e.g. DeepSpeed ZeRO-3: its "
                                          "settings apply, num_processes still sets the process count. Needs "
                                          "distributed=ddp.")

    @model_validator(mode="after")
    def _one_way_to_distribute(self):
        if self.accelerate_config and (self.launcher != "accelerate" or self.distributed != "ddp"):
            raise ValueError("accelerate_config is passed to `accelerate launch`, which then decides how the "
                             "processes share the model: it needs launcher=accelerate and distributed=ddp")
        return self

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if cls.defaults:
            for name, value in cls.defaults.items():
                cls.model_fields[name].default = value
            cls.model_rebuild(force=True)


class SFTConfig(TrainerSettings):
    # The embedded demo base is a tiny model learning the chat format in 100 steps; billion-parameter bases usually
    # want about 2e-4.
    defaults: ClassVar[dict[str, Any]] = {"learning_rate": 2e-3}

    assistant_only_loss: bool = Field(True, description="Loss only on assistant tokens (needs a chat template with "
                                      "generation markers; the default template has them). False: whole sequence.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: str | list[str] = Field("all-linear", description="Modules that get adapters: 'all-linear' "
                                            "(every linear layer except the output head) or a list of names.")
    packing: bool = Field(False, description="Pack examples into max_length blocks. Only honoured with a "
                          "flash-attention implementation (model.attn_implementation); otherwise packed examples "
                          "would attend to each other, so it is switched off with a log line.")


class PreferenceSettings(TrainerSettings):
    """What the methods that continue the SFT adapter against it as reference share (DPO, KTO)."""

    defaults: ClassVar[dict[str, Any]] = {"learning_rate": 5e-5, "max_steps": 50, "per_device_batch_size": 4,
                                          "max_eval_examples": 64}

    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference (SFT) model.")
    train_probe_examples: int = Field(32, ge=0, validation_alias=AliasChoices("train_probe_examples",
                                      "train_probe_pairs"), description="A fixed sample of training rows also "
                                      "evaluated at start and end, so training reward accuracy is measured on the "
                                      "same rows both times.")


class DPOConfig(PreferenceSettings):
    defaults: ClassVar[dict[str, Any]] = {**PreferenceSettings.defaults, "learning_rate": 1e-4}

    loss_type: str = Field("sigmoid", description="trl DPO loss type (sigmoid, ipo, hinge, robust, ...).")
    precompute_ref_log_probs: bool = Field(True, description="Compute the reference log-probs once and cache them on "
                                           "disk (keyed by SFT result + pairs), so a rerun with a new beta reuses "
                                           "them.")


class KTOConfig(PreferenceSettings):
    desirable_weight: float = Field(1.0, gt=0, description="Loss weight of desirable answers; raise it when they "
                                    "are fewer than the undesirable ones.")
    undesirable_weight: float = Field(1.0, gt=0, description="Loss weight of undesirable answers.")


class PreferenceConfig(Section):
    method: Literal["dpo", "kto"] = Field("dpo", description="The stage after SFT that continues its adapter: dpo "
                                          "(chosen / rejected pairs, section dpo) or kto (answers labelled "
                                          "desirable or not, section kto).")


class MergeConfig(Section):
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Precision the base is loaded in "
                                                           "for merging (never 4-bit: merging into quantised "
                                                           "weights loses accuracy) and the merged model is saved in.")
    parity_examples: int = Field(4, ge=1, description="Validation examples whose logits must match between the "
                                 "adapter model and the merged model.")
    parity_atol: float | None = Field(None, gt=0, description="Largest allowed absolute logit difference; None: "
                                      "1e-3 for float32, 0.25 for float16, 1.0 for bfloat16.")


class EvalConfig(Section):
    max_examples: int = Field(64, ge=1, description="Examples per split (validation, test) scored for perplexity, "
                              "taken round-robin over sources so every dataset is represented.")
    max_generate_examples: int = Field(32, ge=1, description="Test examples each variant generates answers for "
                                       "(ROUGE and the sample table); a subset of the scored ones.")
    max_preference_pairs: int = Field(64, ge=1, description="Test preference pairs each variant is scored on "
                                      "(preference accuracy and margin), taken round-robin over sources.")
    max_new_tokens: int = Field(48, ge=1, description="Greedy generation length cap.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass (scoring and generation).")
    seed: int = Field(0, description="Seed set before generating (greedy decoding needs none; sampling-free "
                      "kernels may).")
    perplexity_tokens: Literal["auto", "assistant", "all"] = Field(
        "auto", description="Tokens perplexity is measured on; auto: those training has loss on (assistant tokens "
        "when sft.assistant_only_loss).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Precision variants are loaded in (adapters on a full-precision base, as merged).")
    stop_strings: list[str] = Field(["<|im_end|>"], description="A generated answer is cut at the first of these "
                                    "(end-of-turn markers that are plain text in the vocabulary).")
    sample_rows: int = Field(8, ge=0, description="Rows of the eval-samples table artifact.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Level of the bootstrap confidence intervals in the "
                              "report and eval_results (percentile bootstrap over examples, paired for deltas).")
    bootstrap_resamples: int = Field(2000, ge=100, description="Bootstrap resamples per interval (seeded by "
                                     "eval.seed, so intervals are reproducible).")


class PromoteConfig(Section):
    candidate: str = Field("merged", description="Variant promoted (falls back to dpo or kto, then sft, when absent).")
    split: Literal["validation", "test"] = Field("test", description="Split whose overall metrics the gate reads.")
    rule: Literal["interval", "point"] = Field(
        "interval", description="interval: a change counts as a regression only when the whole paired-bootstrap "
        "interval (promote.confidence) of the candidate-minus-baseline delta lies beyond the tolerance, i.e. it is "
        "beyond it with that confidence; point: when the point estimate is (no allowance for noise).")
    confidence: float = Field(0.95, gt=0, lt=1, description="Level of the paired-bootstrap intervals the interval "
                              "rule reads.")
    max_perplexity_rise: float = Field(0.0, ge=0, description="Allowed relative perplexity rise against the "
                                       "baseline (0.0: must not rise).")
    max_rouge_l_drop: float = Field(0.02, ge=0, description="Allowed absolute ROUGE-L drop against the baseline.")
    min_preference_accuracy: float | None = Field(0.5, ge=0, le=1, description="Preference accuracy (test pairs) "
                                                  "the candidate must reach; None: no minimum. Checked only when "
                                                  "the data has test preference pairs.")
    max_preference_accuracy_drop: float = Field(0.05, ge=0, description="Allowed absolute preference-accuracy drop "
                                                "against the baseline.")
    first_run_baseline: Literal["base", "none"] = Field(
        "base", description="Baseline when nothing was promoted yet: this run's base variant, or none (promote).")


class ServeConfig(Section):
    venv: str = Field(".venv-serve", description="Serving virtualenv (made by .ci/setup-serve); relative paths are "
                      "from the repository root.")
    command: str | None = Field(None, description="Command that starts vLLM's OpenAI server for {model} (placeholders "
                                "{python}, {vllm}: the venv's executables). None: `{vllm} serve {model}` with CUDA, "
                                "`{python} -m vllm.entrypoints.openai.api_server --model {model} --enforce-eager` on "
                                "CPU. The stage appends --host 127.0.0.1 --port <free> and the options below.")
    extra_args: list[str] = Field(default_factory=list, description="More server arguments, appended last; not "
                                  "--host or --port: the server listens on 127.0.0.1 and a free port only.")
    env: dict[str, str] = Field({"VLLM_CPU_KVCACHE_SPACE": "1"}, description="Extra environment of the server "
                                "(KV cache GiB on CPU).")
    dtype: str = Field("float32", description="--dtype of the server; parity needs the reference's precision.")
    max_model_len: int = Field(1024, ge=16, description="--max-model-len (capped at the model's context).")
    startup_timeout_s: float = Field(600, gt=0, description="Give up waiting for /health after this long.")
    request_timeout_s: float = Field(120, gt=0, description="Timeout of one request.")
    parity_prompts: int = Field(3, ge=1, description="Validation prompts whose greedy output must equal the "
                                "transformers reference.")
    max_tokens: int = Field(16, ge=1, description="Tokens generated per smoke / parity request.")
    check_lora: bool = Field(False, description="Also serve the adapter on the base with --enable-lora and check "
                             "its parity (a second server start).")
    seed: int = Field(0, description="Server and request seed.")
    preflight: bool = Field(True, description="Refuse, before starting the server, model shapes the installed vLLM "
                            "backend is known not to serve (on CPU: attention head sizes other than 32..512).")

    @field_validator("extra_args")
    @classmethod
    def _no_bind_override(cls, args: list[str]) -> list[str]:
        bound = [a for a in args if a.split("=", 1)[0] in ("--host", "--port")]
        if bound:
            raise ValueError(f"{bound}: the server is bound to 127.0.0.1 on a free port by the stage; --host / --port "
                             "may not be overridden")
        return args


class OrchestrationConfig(Section):
    gpu_deployment: str | None = Field(None, description="Prefect deployment (flow/deployment) that runs the GPU "
                                       "stages (base, sft, dpo, merge, evaluate, serve), e.g. sft-stage/gpu, so they "
                                       "run on the GPU work pool's worker. None: run them in the pipeline's process.")
    stage_timeout_s: int = Field(6 * 3600, ge=60, description="How long the pipeline waits for a dispatched stage.")


class TrackingConfig(Section):
    tensorboard: bool = Field(True, description="Write every training stage's curves (base warm-up, sft, dpo, ...) as "
                              "TensorBoard event files under <storage_root>/tensorboard/<stage>/<run>; view them with "
                              "`tensorboard --logdir <storage_root>/tensorboard`.")
    report_to: list[str] = Field(default_factory=list, description="More trackers for the training stages, by "
                                 "transformers' integration name (wandb, trackio, comet_ml, ...; each must be "
                                 "installed and configured through its own environment variables).")
    mlflow_uri: str | None = Field(None, description="MLflow tracking server (http://host:5000) or store URI: each "
                                   "pipeline run becomes an MLflow run with a nested run per stage (config as params, "
                                   "curves, data counts and eval metrics as metrics, the eval report as artifact), and "
                                   "every promotion candidate a version in the model registry. None: off.")
    mlflow_experiment: str = Field("sft-pipeline", description="MLflow experiment of the pipeline runs.")
    registry_model: str = Field("sft-pipeline", description="Registered model in MLflow's registry that every "
                                "merged candidate becomes a version of (tagged with its promotion decision).")
    registry_alias: str = Field("prod", description="Alias set on a promoted version (moved from the one before); a "
                                "rejected candidate is registered without it.")


class PipelineConfig(Section):
    storage_root: str = Field("runs", description="Where the warehouse, sample data, models, reports and Prefect "
                              "results live: a local folder or any fsspec URL (s3://bucket/prefix, gs://..., ...); "
                              "credentials come from each worker's environment.")
    warehouse: str | None = Field(None, description="DuckDB file (path or URL); default "
                                  "<storage_root>/warehouse.duckdb.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    kto: KTOConfig = Field(default_factory=KTOConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @property
    def root(self) -> str:
        """The storage root as a URL: an absolute path when it is local."""
        return storage.normalize(self.storage_root)

    def url(self, *parts: str) -> str:
        """A place under the storage root (tasks/storage.py moves files to and from it)."""
        return storage.join(self.storage_root, *parts)

    @property
    def warehouse_url(self) -> str:
        return storage.normalize(self.warehouse) if self.warehouse else self.url("warehouse.duckdb")

    @property
    def sample_data_url(self) -> str:
        return self.url("sample_data")

    def cache_dir(self, name: str) -> Path:
        """A machine-local cache (never published): under the root when it is local, else in the work dir."""
        return storage.local_path(self.url("cache", name))


class ConfigError(ValueError):
    """Raised for an unreadable or invalid config; the message names the offending field."""


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n" + "\n".join(lines)


def _parse_value(text: str) -> Any:
    # YAML scalars give the user's intent: 0.7 -> float, true -> bool, [a, b] -> list, x -> str.
    return yaml.safe_load(text) if text != "" else ""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"invalid override {dotted!r}: {p} is not a section")
    node[parts[-1]] = value


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(cfg: PipelineConfig | dict, overrides: list[str] | dict | None = None) -> PipelineConfig:
    """Return a new config with `key.sub=value` strings or a nested dict applied on top of `cfg`."""
    tree = cfg.model_dump() if isinstance(cfg, PipelineConfig) else dict(cfg)
    if isinstance(overrides, dict):
        nested: dict = {}
        for key, value in overrides.items():  # dotted keys allowed: {"dpo.beta": 0.2}
            _set_dotted(nested, key, value) if "." in key else nested.update({key: value})
        tree = _deep_merge(tree, nested)
    else:
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"invalid override {item!r}: expected key=value, e.g. data.dedup.threshold=0.7")
            key, value = item.split("=", 1)
            _set_dotted(tree, key.strip(), _parse_value(value.strip()))
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> PipelineConfig:
    """Load YAML (or defaults when `path` is None) and apply overrides. `path` may be a URL (s3://bucket/sft.yaml),
    so workers on other machines read the same file."""
    tree: dict = {}
    if path is not None:
        try:
            tree = yaml.safe_load(storage.read_text(path)) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
    return apply_overrides(tree, overrides)


def describe_fields(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, description) of every leaf field, for `sftpipe config --describe` and the README."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            rows += describe_fields(ann, f"{prefix}{name}.")
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((f"{prefix}{name}", json.dumps(default), field.description or ""))
    return rows
