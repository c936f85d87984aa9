"""ROUGE-1/2/L/Lsum as a local `evaluate` metric that also scores Chinese, Japanese, Korean and Thai.

Loaded by path (`evaluate.load("evals/metrics/rouge")`), so nothing is fetched from the hub at run time.
rouge_score's default tokenizer keeps only [a-z0-9] runs, so a Chinese sentence becomes no tokens at all and
identical Chinese strings score 0. Here a token is a run of letters/digits of any script, except that scripts
written without spaces are split into single characters (the usual ROUGE practice for them). On lowercase-ASCII
text this is exactly rouge_score's tokenisation, so English scores are unchanged.
"""

import re

import datasets
import evaluate
from nltk.stem.porter import PorterStemmer
from rouge_score import rouge_scorer

# Han (incl. extensions and compatibility ideographs), kana, Hangul syllables, Thai.
_CHAR_SCRIPTS = "\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002ffff"
_TOKEN_RE = re.compile(rf"[{_CHAR_SCRIPTS}]|(?:(?![{_CHAR_SCRIPTS}])[^\W_])+")
_ASCII_WORD_RE = re.compile(r"^[a-z0-9]+$")


class MultilingualTokenizer:
    """rouge_score tokenizer interface (`tokenize(text) -> list[str]`)."""

    def __init__(self, use_stemmer: bool = False):
        self.stemmer = PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        tokens = _TOKEN_RE.findall(text.lower())
        if self.stemmer:
            # As rouge_score: stem only English words longer than 3 characters.
            tokens = [self.stemmer.stem(t) if len(t) > 3 and _ASCII_WORD_RE.match(t) else t for t in tokens]
        return tokens


_DESCRIPTION = """ROUGE F-measures (rouge1, rouge2, rougeL, rougeLsum) between predictions and references, averaged
over examples, with a tokenizer that handles scripts written without spaces. rougeLsum splits on newlines."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, one per prediction.
    rouge_types: subset of ["rouge1", "rouge2", "rougeL", "rougeLsum"] (default: all four).
    use_aggregator: True (default): the mean F-measure per type; False: a list of per-example F-measures.
    use_stemmer: Porter-stem English words (default False).
Returns:
    {rouge_type: float} or {rouge_type: list[float]}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, rouge_types=None, use_aggregator=True, use_stemmer=False):
        rouge_types = list(rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"])
        scorer = rouge_scorer.RougeScorer(rouge_types, tokenizer=MultilingualTokenizer(use_stemmer))
        per_example = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
        if not use_aggregator:
            return {t: [s[t].fmeasure for s in per_example] for t in rouge_types}
        # A plain mean, not rouge_score's BootstrapAggregator: deterministic, and what the report's n refers to.
        n = max(len(per_example), 1)
        return {t: sum(s[t].fmeasure for s in per_example) / n for t in rouge_types}
