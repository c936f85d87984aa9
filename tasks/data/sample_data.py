"""The embedded sample data: what the demo runs on when no inputs are configured.

Written by the pipeline itself (deterministic, seeded), a file per main layout (Alpaca, ShareGPT, OpenAI
messages, preference; tests/test_formats.py covers the others), with the flaws real data has: exact and
near-duplicate rows, Chinese rows, a malformed line, an empty answer, a KTO-negative row, a chosen == rejected pair.
The tasks are small and regular (arithmetic, opposites, capitals, spelling) so that a tiny model trained on a CPU in
a minute measurably learns them.

Beside the conversations it writes `pretraining_corpus.txt`, the plain text the embedded base is pretrained on: the
same facts stated as sentences and other sentences with the same vocabulary, never a question with its answer nor
anything in chat form (ingest skips .txt files). So the base knows the language and the facts, and fine-tuning has
the chat format and the question-to-answer mapping left to teach.

Answers about sums, capitals and opposites come in two equally common phrasings, answer last ("48 plus 7 is 55.",
"The capital of France is Paris.") and answer first ("55 is 48 plus 7.", "Paris is the capital of France."); the
preference pairs prefer leading with the answer. SFT alone learns both phrasings (and finds the answer-last one
easier to predict), so only preference training teaches which one users want.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core import storage

OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
             ("up", "down"), ("old", "new"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
             ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"), ("wet", "dry"), ("high", "low"),
             ("open", "closed"), ("clean", "dirty"), ("thick", "thin"), ("first", "last"), ("near", "far"),
             ("safe", "dangerous"), ("sweet", "sour"), ("brave", "afraid"), ("tall", "short"), ("wide", "narrow")]
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
            ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Canada", "Ottawa"), ("Norway", "Oslo"), ("Chile", "Santiago"),
            ("Greece", "Athens"), ("Poland", "Warsaw"), ("Cuba", "Havana"), ("India", "New Delhi"),
            ("Germany", "Berlin"), ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
            ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Russia", "Moscow"),
            ("China", "Beijing"), ("Thailand", "Bangkok"), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"),
            ("Brazil", "Brasilia"), ("Morocco", "Rabat"), ("Ghana", "Accra"), ("Turkey", "Ankara")]
CAPITAL_QUESTIONS = ["What is the capital of {}?", "Which city is the capital of {}?", "Name the capital city of {}.",
                     "Tell me the capital of {}.", "Do you know the capital of {}?", "What city is {}'s capital?"]
OPPOSITE_QUESTIONS = ["What is the opposite of {}?", "Give the opposite of the word {}.", "Name the antonym of {}.",
                      "What word means the opposite of {}?", "Tell me the opposite of {}.",
                      "Which word is the opposite of {}?"]
ANIMALS = ["cat", "dog", "fox", "owl", "bear", "wolf", "duck", "frog", "lion", "deer", "seal", "crab"]
NUM_ZH = "零一二三四五六七八九十"
CORPUS_FILE = "pretraining_corpus.txt"


WORDS = ANIMALS + ["apple", "river", "cloud", "stone", "green", "music", "table", "light", "dream", "house",
                   "tiger", "plant", "ocean", "bread", "smile", "chair", "storm", "sugar", "paper", "glass"]


def _sum(a: int, op: str, b: int, answer_first: bool) -> str:
    result = a + b if op == "plus" else a - b
    return f"{result} is {a} {op} {b}." if answer_first else f"{a} {op} {b} is {result}."


def _arith_question(rng: random.Random) -> tuple[str, int, str, int]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", a, "plus", b
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", a, "minus", b


def _arith(rng: random.Random) -> tuple[str, str]:
    q, a, op, b = _arith_question(rng)
    return q, _sum(a, op, b, rng.random() < 0.5)


def _opposite(w: str, o: str, answer_first: bool) -> str:
    return f"{o.capitalize()} is the opposite of {w}." if answer_first else f"The opposite of {w} is {o}."


def _capital(country: str, city: str, answer_first: bool) -> str:
    return f"{city} is the capital of {country}." if answer_first else f"The capital of {country} is {city}."


def _english_pair(rng: random.Random) -> tuple[str, str]:
    kind = rng.choices(range(5), weights=[5, 2, 2, 2, 2])[0]
    if kind == 0:
        return _arith(rng)
    if kind == 1:
        w, o = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            w, o = o, w
        return rng.choice(OPPOSITE_QUESTIONS).format(w), _opposite(w, o, rng.random() < 0.5)
    if kind == 2:
        c, cap = rng.choice(CAPITALS)
        return rng.choice(CAPITAL_QUESTIONS).format(c), _capital(c, cap, rng.random() < 0.5)
    w = rng.choice(WORDS)
    if kind == 3:
        return f"How do you spell {w} backwards?", f"{w} backwards is {w[::-1]}."
    return f"How many letters are in the word {w}?", f"The word {w} has {len(w)} letters."


def _zh_pair(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return (f"{NUM_ZH[a]}加{NUM_ZH[b]}等于多少？请用阿拉伯数字回答并说明计算过程。",
            f"{NUM_ZH[a]}加{NUM_ZH[b]}等于{a + b}，因为{a}加{b}的和是{a + b}。")


def _style_preferences(rng: random.Random, n_sums: int) -> list[dict]:
    """Every capital and opposite question once and n_sums sums: the answer-first phrasing chosen over the
    answer-last one."""
    prefs = []
    for _ in range(n_sums):
        q, a, op, b = _arith_question(rng)
        prefs.append({"prompt": q, "chosen": _sum(a, op, b, True), "rejected": _sum(a, op, b, False)})
    prefs += [{"prompt": q.format(c), "chosen": _capital(c, cap, True), "rejected": _capital(c, cap, False)}
             for c, cap in CAPITALS for q in CAPITAL_QUESTIONS]
    prefs += [{"prompt": q.format(w), "chosen": _opposite(w, o, True), "rejected": _opposite(w, o, False)}
              for a, b in OPPOSITES for w, o in ((a, b), (b, a)) for q in OPPOSITE_QUESTIONS]
    rng.shuffle(prefs)
    return prefs


FILLER_SUBJECTS = ["The cat", "A small dog", "The old fox", "An owl", "The bear", "A young wolf", "The duck", "A frog",
                   "The lion", "A deer", "The seal", "A crab", "The tiger", "My friend", "The teacher", "A child"]
FILLER_VERBS = ["sat by", "walked to", "looked at", "ran past", "slept near", "sang about", "dreamed of", "found"]
FILLER_OBJECTS = ["the river", "the green house", "a cloud", "the stone", "the table", "an apple", "the ocean",
                  "some bread", "a chair", "the storm", "the paper", "a glass", "the light", "the music"]
NAMES = ["Tom", "Anna", "Li", "Sara", "Omar", "Mia", "Ken", "Lena"]


def _corpus_paragraph(rng: random.Random) -> str:
    """One plain-text paragraph. Later sentences name what earlier ones said, so the base learns to use its
    context (the skill answering a question needs), without ever seeing a question and its answer."""
    kind = rng.random()
    name = rng.choice(NAMES)
    if kind < 0.25:
        country, city = rng.choice(CAPITALS)
        return rng.choice([
            f"{country} is a country. {_capital(country, city, rng.random() < 0.5)} Many people visit {city}.",
            f"{name} travelled to {country} last year. {_capital(country, city, rng.random() < 0.5)}",
            f"{city} is a big city. {_capital(country, city, rng.random() < 0.5)} {name} lives in {city}.",
        ])
    if kind < 0.45:
        w, o = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            w, o = o, w
        return rng.choice([
            f"The word {w} has an opposite. {_opposite(w, o, rng.random() < 0.5)}",
            f"{w.capitalize()} and {o} are opposites. {_opposite(w, o, rng.random() < 0.5)}",
            f"{name} learned a new word today: {w}. {_opposite(w, o, rng.random() < 0.5)}",
        ])
    if kind < 0.7:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if rng.random() < 0.5:
            return rng.choice([f"{name} had {a} apples and got {b} more. ", f"Take {a} and add {b}. "]) + \
                _sum(a, "plus", b, rng.random() < 0.5)
        a, b = max(a, b), min(a, b)
        return rng.choice([f"{name} had {a} coins and gave away {b}. ", f"Start with {a} and take away {b}. "]) + \
            _sum(a, "minus", b, rng.random() < 0.5)
    if kind < 0.8:
        w = rng.choice(WORDS)
        return rng.choice([f"{name} wrote the word {w}. The word {w} has {len(w)} letters.",
                           f"{name} wrote the word {w} from right to left. {w} backwards is {w[::-1]}."])
    if kind < 0.88:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{name}有{NUM_ZH[a]}个苹果，又买了{NUM_ZH[b]}个。{NUM_ZH[a]}加{NUM_ZH[b]}等于{a + b}，因为{a}加{b}的和是{a + b}。"
    return " ".join(f"{rng.choice(FILLER_SUBJECTS)} {rng.choice(FILLER_VERBS)} {rng.choice(FILLER_OBJECTS)}."
                    for _ in range(rng.randint(1, 3)))


def pretraining_corpus(seed: int = 0, n: int = 4000) -> list[str]:
    """Plain-text documents (one line each) the embedded base learns the language from: every capital and opposite
    stated in both phrasings, then short paragraphs about the same facts, sums, spellings and Chinese sums, and
    filler sentences over the same vocabulary. No questions, no chat turns."""
    rng = random.Random(seed + 7919)  # its own stream: the corpus never replays the conversations' numbers
    docs = []
    for country, city in CAPITALS:
        docs += [_capital(country, city, True), _capital(country, city, False)]
    for a, b in OPPOSITES:
        for w, o in ((a, b), (b, a)):
            docs += [_opposite(w, o, True), _opposite(w, o, False)]
    while len(docs) < n:
        docs.append(_corpus_paragraph(rng))
    rng.shuffle(docs)
    return docs


def _write_jsonl(path: Path, rows: list) -> None:
    text = "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)
    data = text.encode("utf-8")
    # mtime=0: the same rows give the same bytes, so the file's content hash (and every cache key) is stable.
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


def _alpaca_rows(rng: random.Random, n: int) -> list:
    """Alpaca rows, with exact copies, near copies and a few rows the clean stage must reject."""
    alpaca = []
    for _ in range(n):
        q, a = _english_pair(rng)
        alpaca.append({"instruction": q, "input": "", "output": a})
    alpaca += [dict(alpaca[i]) for i in range(0, 30, 3)]  # exact duplicates
    for i in range(1, 30, 3):  # near duplicates: same long answer with one word changed
        base = {"instruction": "Write a short story about a fox and an owl who become friends in the forest.",
                "input": "", "output": "Once upon a time a small fox met a wise owl in the green forest. They "
                "talked every night under the moon, shared berries and stories, and learned that friends can be "
                f"very different. Story number {i} ends with the fox and the owl watching the sunrise together."}
        alpaca.append(base)
    return alpaca + [{"instruction": "Say nothing.", "input": "", "output": "   "},  # empty answer
                     {"instruction": "What is 2 plus 2?", "input": "", "output": 4}]  # wrong type


def _chinese_rows(rng: random.Random, n: int) -> list[dict]:
    """Chinese Alpaca rows, with a near duplicate."""
    zh = [{"instruction": q, "input": "", "output": a} for q, a in (_zh_pair(rng) for _ in range(n))]
    story = "从前有一只小狐狸住在森林里，它每天早上都去河边喝水，然后和朋友们一起在草地上玩耍，直到太阳下山才回家。"
    return zh + [{"instruction": "讲一个关于小狐狸的故事。", "input": "", "output": story},
                 {"instruction": "讲一个关于小狐狸的故事。", "input": "", "output": story.replace("每天早上", "每天清晨")}]


def _sharegpt_rows(rng: random.Random, n: int) -> list[dict]:
    """Two-turn ShareGPT conversations, and one with two human turns in a row."""
    sharegpt = []
    for i in range(n):
        (q1, a1), (q2, a2) = _english_pair(rng), _english_pair(rng)
        sharegpt.append({"id": f"chat-{i}", "conversations": [
            {"from": "human", "value": q1}, {"from": "gpt", "value": a1},
            {"from": "human", "value": q2}, {"from": "gpt", "value": a2}]})
    sharegpt.append({"id": "bad-order", "conversations": [{"from": "human", "value": "Hello?"},
                                                          {"from": "human", "value": "Anyone?"}]})
    return sharegpt


def _openai_rows(rng: random.Random, n: int) -> list:
    """OpenAI messages with a system prompt, a malformed line and a KTO-negative row."""
    msgs = []
    for _ in range(n):
        q, a = _english_pair(rng)
        msgs.append({"messages": [{"role": "system", "content": "You answer in one short sentence."},
                                  {"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    msgs.append('{"messages": [{"role": "user", "content": "truncated')
    msgs.append({"messages": [{"role": "user", "content": "What is 1 plus 1?"},
                              {"role": "assistant", "content": "1 plus 1 is 3."}], "label": False})
    return msgs


def _preference_rows(rng: random.Random, n: int) -> list[dict]:
    """Preference pairs: the answer-first phrasing is chosen; one ranked list; one chosen == rejected."""
    prefs = _style_preferences(rng, n)
    prefs.append({"instruction": "What is the capital of Peru?", "input": "",
                  "output": ["The capital of Peru is Lima.", "Peru's capital is Cusco.", "I don't know."]})
    prefs.append({"prompt": "What is 3 plus 3?", "chosen": "3 plus 3 is 6.", "rejected": "3 plus 3 is 6."})
    return prefs


def write_sample_data(out: Path, seed: int = 0, n: int = 600) -> list[Path]:
    """Write the sample files into `out` (replacing any there) and return their paths."""
    rng = random.Random(seed)  # drawn from in this order, so the same seed writes the same bytes
    out.mkdir(parents=True, exist_ok=True)
    alpaca = _alpaca_rows(rng, n)
    (out / "instructions_alpaca.json").write_text(json.dumps(alpaca, ensure_ascii=False, indent=1), encoding="utf-8")
    _write_jsonl(out / "instructions_zh.jsonl", _chinese_rows(rng, n // 4))
    sharegpt = _sharegpt_rows(rng, n // 4)
    (out / "chat_sharegpt.json").write_text(json.dumps(sharegpt, ensure_ascii=False), encoding="utf-8")
    _write_jsonl(out / "chat_messages.jsonl.gz", _openai_rows(rng, n // 4))
    _write_jsonl(out / "preferences.jsonl", _preference_rows(rng, n // 2))
    # A Parquet file of plain Alpaca rows (a typical export from another tool).
    rows = [dict(zip(("instruction", "output"), _english_pair(rng))) for _ in range(n // 6)]
    pq.write_table(pa.Table.from_pylist(rows), out / "instructions_export.parquet")
    (out / CORPUS_FILE).write_text("\n".join(pretraining_corpus(seed)) + "\n", encoding="utf-8")
    write_feedback_sample(out)
    return sorted(out.iterdir())


UNHELPFUL = ["I don't know. Look it up yourself.", "Why would you ask me that?", "That is not my problem.",
             "Figure it out on your own.", "No idea, and I do not care.", "Ask someone else."]


def write_feedback_sample(out: Path, seed: int = 1, n: int = 240) -> Path:
    """KTO-shaped rows (messages + label): each question gets one answer, the right one (label true) or an
    unhelpful or wrong one (label false). Its own seed, so the other files do not change with it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q, a = _english_pair(rng)
        desirable = rng.random() < 0.5
        if not desirable:
            a = rng.choice(UNHELPFUL) if rng.random() < 0.75 else a.rsplit(" ", 1)[0] + " " + rng.choice(WORDS) + "."
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                     "label": desirable})
    _write_jsonl(out / "feedback_kto.jsonl", rows)
    return out / "feedback_kto.jsonl"


def ensure_sample_data(url: str) -> str:
    """Write the sample data to url once; later runs reuse it so its content hash (and every cache key) is stable.

    Written to a temporary folder and renamed into place, so a concurrent run never reads half-written files; then
    published (uploaded, when url is remote)."""
    if storage.is_published(url):
        return url
    out = storage.local_path(url)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".sample_data-", dir=out.parent))
        write_sample_data(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another run got there first; its files are identical
            shutil.rmtree(tmp, ignore_errors=True)
    return storage.publish(url)
