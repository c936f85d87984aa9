"""datatrove's nearest equivalent of our data plane on the same raw JSONL; runs inside datatrove's own venv.

    PYTHONPATH=. /work/bench-venvs/datatrove/bin/python benchmarks/dataplane/datatrove_peer.py \
        --input benchmarks/out/dataplane/dataplane_10000.jsonl --work DIR --buckets 14 --rows 9 --members OUT.json

Pipeline, each step one LocalPipelineExecutor run (datatrove's own steps unless said):
  filter      JsonlReader (one Alpaca row -> text "instruction\\ninput\\noutput", id = line number) -> LambdaFilter
              with the clean stage's rules that apply to Alpaca rows (no U+FFFD, instruction and output not empty,
              at most 32,000 characters) -> PIIFormatter (e-mail and public IP redaction) -> JsonlWriter
  signatures, buckets, clusters
              its MinHash stages 1-3 (benchmarks/dedup/peers/datatrove_runner.py), word tokenizer "cmn" (jieba:
              segments Chinese into words and keeps English words; "en" leaves a Chinese clause as one token).
              --language by-script: the filter step routes rows with CJK characters to one folder, the rest to
              another (a LambdaFilter with an exclusion writer), and each gets its own four MinHash stages,
              "cmn" and "en" (jieba costs about 2.4x spaCy's English tokenizer per English row)
  dedup       JsonlReader -> MinhashDedupFilter (cluster ids loaded, removed rows to an exclusion JsonlWriter)
              -> JsonlWriter
With --no-memory-zone (a diagnostic, not datatrove as shipped) spaCy's memory_zone, which datatrove 0.10.1 enters
once per document to free that document's lexemes, is a no-op: with spaCy 3.8.x it makes the word tokenizer several
times slower here (lexemes are rebuilt for every document), so this bounds what the signature stage could gain.
JSONL is written uncompressed (datatrove's default is gzip). datatrove's JsonlReader skips lines that are not JSON but
raises on a JSON line that is not an object ("[1, 2, 3]"); the reader here is JsonlReader with only that changed: such
lines are skipped too, as our ingest rejects them.

Prints {"stages": {name: seconds}, "total_s", "kept", "removed", "versions", ...} as JSON; --members gets
[[line, cluster id], ...] for every row that reached the dedup stage (cluster id null: in no cluster).
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import MinhashDedupFilter
from datatrove.pipeline.filters import LambdaFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dedup" / "peers"))
from datatrove_runner import minhash_config, minhash_stages  # noqa: E402

MAX_CHARS = 32_000  # data.clean.max_chars
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
NO_MEMORY_ZONE = "BENCH_DATATROVE_NO_MEMORY_ZONE"  # an environment variable, so datatrove's worker processes see it

if os.environ.get(NO_MEMORY_ZONE):
    from spacy.language import Language

    Language.memory_zone = lambda self, mem=None: contextlib.nullcontext()


def alpaca(self, data: dict, path: str, id_in_file: int) -> dict:
    """One Alpaca row as a document: the turns' text joined by newlines, id = 1-based line number of the file."""
    instruction, extra, output = (str(data.get(k) or "") for k in ("instruction", "input", "output"))
    prompt = instruction + ("\n" + extra if extra else "")
    return {"text": prompt + "\n" + output, "id": str(id_in_file + 1),
            "metadata": {"shortest_turn": min(len(prompt.strip()), len(output.strip()))}}


def passes_clean(doc) -> bool:
    return doc.metadata["shortest_turn"] >= 1 and len(doc.text) <= MAX_CHARS and "\ufffd" not in doc.text


def no_cjk(doc) -> bool:
    return not CJK.search(doc.text)


class ObjectsJsonlReader(JsonlReader):
    """JsonlReader that skips JSON lines that are not objects, as it skips lines that are not JSON."""

    def read_file(self, filepath: str):
        import orjson

        with self.data_folder.open(filepath, "r", compression=self.compression) as f:
            for li, line in enumerate(f):
                with self.track_time():
                    try:
                        data = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if not isinstance(data, dict):
                        continue
                    document = self.get_document_from_dict(data, filepath, li)
                if document:
                    yield document


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--input", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--buckets", type=int, required=True)
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--language", default="cmn", help='datatrove word tokenizer, or "by-script": rows with CJK '
                   'characters through a "cmn" MinHash pipeline, the others through an "en" one')
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--members", required=True)
    p.add_argument("--no-memory-zone", action="store_true", help="diagnostic: spaCy's memory_zone made a no-op")
    a = p.parse_args()
    if a.no_memory_zone and not os.environ.get(NO_MEMORY_ZONE):  # re-run so this process is patched at import too
        os.environ[NO_MEMORY_ZONE] = "1"
        os.execv(sys.executable, [sys.executable, *sys.argv])

    work, source = Path(a.work), Path(a.input)
    shutil.rmtree(work, ignore_errors=True)
    config = minhash_config(a.buckets, a.rows)
    common = dict(logging_dir=str(work / "logs"), skip_completed=False)
    # One MinHash pipeline per group of rows, each with its word tokenizer.
    groups = {"en": "en", "zh": "cmn"} if a.language == "by-script" else {"all": a.language}
    if len(groups) == 1:
        route = [JsonlWriter(str(work / "all" / "filtered"), compression=None)]
    else:  # rows with CJK characters to the Chinese tokenizer, the rest to the English one
        route = [LambdaFilter(no_cjk,
                              exclusion_writer=JsonlWriter(str(work / "zh" / "filtered"), compression=None)),
                 JsonlWriter(str(work / "en" / "filtered"), compression=None)]
    stages = dict.fromkeys(("filter", "signatures", "buckets", "clusters", "dedup"), 0.0)

    t0 = time.perf_counter()
    LocalPipelineExecutor(pipeline=[
        ObjectsJsonlReader(str(source.parent), glob_pattern=source.name, adapter=alpaca),
        LambdaFilter(passes_clean),
        PIIFormatter(),
        *route,
    ], tasks=1, workers=1, **common).run()
    stages["filter"] = time.perf_counter() - t0
    for group, language in groups.items():
        folder = work / group
        times = minhash_stages(JsonlReader(str(folder / "filtered")), 1, folder, config, language, a.workers)
        for stage, key in (("signatures", "signature_s"), ("buckets", "buckets_s"), ("clusters", "clusters_s")):
            stages[stage] += times[key]
        t1 = time.perf_counter()
        LocalPipelineExecutor(pipeline=[
            JsonlReader(str(folder / "filtered")),
            MinhashDedupFilter(str(folder / "clusters"), load_cluster_ids=True,
                               exclusion_writer=JsonlWriter(str(folder / "removed"), compression=None)),
            JsonlWriter(str(folder / "output"), compression=None),
        ], tasks=1, workers=1, **common).run()
        stages["dedup"] += time.perf_counter() - t1
    total = time.perf_counter() - t0

    # Not timed: every row that reached the dedup stage with the cluster datatrove put it in (null: none).
    counts, members = {"output": 0, "removed": 0}, []
    for group in groups:
        for part in ("output", "removed"):
            for f in sorted((work / group / part).glob("*.jsonl")):
                for line in f.open("rb"):
                    doc = json.loads(line)
                    cluster = int(doc["metadata"]["minhash_cluster_id"])
                    members.append([int(doc["id"]), f"{group}{cluster}" if cluster >= 0 else None])
                    counts[part] += 1
    Path(a.members).write_text(json.dumps(members))
    from importlib.metadata import version

    print(json.dumps({"stages": stages, "total_s": total, "kept": counts["output"], "removed": counts["removed"],
                      "language": a.language, "workers": a.workers,
                      "spacy_memory_zone": not a.no_memory_zone,
                      "versions": {k: version(k) for k in ("datatrove", "spacy", "jieba", "xxhash")}}))


if __name__ == "__main__":  # datatrove's workers re-import this file
    main()
