"""Quality of a predicted clustering against the generator's ground truth.

- precision: of the document pairs a method puts in one cluster, the share that truly belong together (pairwise).
- recall (eligible): of the copies and near-duplicates whose true 5-gram Jaccard to their origin is >= threshold,
  the share clustered with their origin. MinHash-LSH estimates Jaccard, so a pair below the threshold is a
  *correct* miss for every method; counting it would only measure how many heavy edits the corpus contains.
- recall_all: the same over every injected copy and near-duplicate (informational).
- merged_below: of the near-duplicates whose true Jaccard is < threshold, the share clustered with their origin
  anyway. They share provenance, so precision does not count them, but by the Jaccard criterion they are over-merges.
- hard_negatives_merged: share of hard negatives (half an origin + other text, Jaccard ~0.3) clustered with it.

Jaccard is the definition of a near-duplicate here, so the rare hard negative whose kept half happens to carry most
of the text (true Jaccard >= threshold; about 1 in 800) counts as a duplicate of its origin, not as a negative.
"""

from __future__ import annotations

import numpy as np
import polars as pl


def _pairs_within(labels: np.ndarray) -> int:
    _, counts = np.unique(labels, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def quality(corpus: pl.DataFrame, predicted: np.ndarray, threshold: float) -> dict:
    origin = corpus["origin"].to_numpy()
    kind = corpus["kind"].to_numpy()
    jac = corpus["jaccard"].to_numpy()
    truth = corpus["cluster"].to_numpy().copy()
    similar_negative = (kind == "hard_negative") & (jac >= threshold)
    truth[similar_negative] = truth[origin[similar_negative]]
    joint = truth.astype(np.int64) * (int(predicted.max()) + 1) + predicted
    predicted_pairs, true_pos = _pairs_within(predicted), _pairs_within(joint)
    with_origin = predicted == predicted[origin]
    derived = np.isin(kind, ["copy", "normalized_copy", "near_dup"]) | similar_negative
    eligible = derived & (jac >= threshold)
    below = derived & (jac < threshold)
    hard = (kind == "hard_negative") & ~similar_negative
    return {
        "precision": true_pos / predicted_pairs if predicted_pairs else 1.0,
        "recall_eligible": float(with_origin[eligible].mean()) if eligible.any() else 1.0,
        "recall_all": float(with_origin[derived].mean()) if derived.any() else 1.0,
        "merged_below": float(with_origin[below].mean()) if below.any() else 0.0,
        "hard_negatives_merged": float(with_origin[hard].mean()) if hard.any() else 0.0,
        "eligible_docs": int(eligible.sum()),
        "removed_docs": int(len(predicted) - len(np.unique(predicted))),
        "true_removable_docs": int(len(truth) - len(np.unique(truth))),
    }
