"""Token-weighted perplexity of a causal LM as a local `evaluate` metric.

Loaded by path (`evaluate.load("evals/metrics/perplexity")`); unlike the hub's perplexity metric it scores only
the tokens whose label is not -100 (e.g. assistant tokens, as in training) and weights every scored token
equally: perplexity = exp(sum of token NLLs / number of scored tokens). The model is passed in memory (or as a
path), so the caller controls how it is loaded (adapter applied, dtype, device).
"""

import math

import datasets
import evaluate
import torch
import torch.nn.functional as F

_DESCRIPTION = """Perplexity over the tokens with a label (label -100: not scored), token-weighted over the whole
input; also the summed NLL and token count so callers can pool several calls exactly."""

_KWARGS_DESCRIPTION = """
Args:
    input_ids: list of token id lists (no padding).
    labels: list of label lists of the same lengths; labels[i][t] is the token predicted at position t
        (normally input_ids[i][t]) or -100 to skip it. Position 0 is never scored (nothing precedes it).
    model: a transformers causal LM (already on its device) or a path to load one from.
    batch_size: sequences per forward pass (default 8).
Returns:
    perplexity: exp(nll_sum / n_tokens); nll_sum; n_tokens; per sequence: nll_sums, token_counts and
    perplexities (nan for a sequence without scored tokens), so callers can pool any grouping exactly.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "input_ids": datasets.Sequence(datasets.Value("int64")),
                    "labels": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, input_ids, labels, model=None, batch_size=8):
        if model is None:
            raise ValueError("perplexity needs model=<causal LM or path>")
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model)
        model.eval()
        device = next(model.parameters()).device
        # Longest first: fewer pad tokens per batch. Right padding keeps position ids equal to the unpadded ones.
        order = sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i]))
        results = {}
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(input_ids[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            lab = torch.full((len(idx), width), -100, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(input_ids[i])
                ids[row, :n] = torch.tensor(input_ids[i])
                lab[row, :n] = torch.tensor(labels[i])
                mask[row, :n] = 1
            with torch.inference_mode():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            # Logits at t predict the token at t + 1.
            target = lab[:, 1:].to(device)
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="none")
            scored = target != -100
            for row, i in enumerate(idx):
                results[i] = (nll[row][scored[row]].sum().item(), int(scored[row].sum()))
        per_seq_nll = [results[i][0] for i in range(len(input_ids))]
        per_seq_n = [results[i][1] for i in range(len(input_ids))]
        nll_sum, n_tokens = sum(per_seq_nll), sum(per_seq_n)
        return {
            "perplexity": math.exp(nll_sum / n_tokens) if n_tokens else float("nan"),
            "nll_sum": nll_sum,
            "n_tokens": n_tokens,
            "nll_sums": per_seq_nll,
            "token_counts": per_seq_n,
            "perplexities": [math.exp(s / n) if n else float("nan") for s, n in zip(per_seq_nll, per_seq_n)],
        }
