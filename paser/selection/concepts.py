"""Stage 7 (NTEM): concepts of a record and the Concept Consistency Graph.

Concepts are key phrases of instruction + input + response, found RAKE-style: runs of words
between stop words (scikit-learn's English list, which ships in the package) and punctuation,
scored by word degree / frequency; lower-cased, numbers dropped, plurals lightly folded; the top
``max_concepts`` kept. The graph's nodes are concepts; an edge joins two concepts that appeared
together in an accepted record. A record is rejected when two of its concepts are both already
nodes but share no edge; otherwise it is accepted and its concepts are added as a clique.

    python -c "from paser.selection.concepts import extract_concepts; \
print(extract_concepts('Explain how photosynthesis converts sunlight into chemical energy.'))"
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from paser.selection.configs import ConceptConfig

_SPLIT = re.compile(r"[.,;:!?()\[\]{}\"<>|/\\\n\t=+*#`~]+")
_WORD = re.compile(r"[a-z][a-z0-9'\-]*")


def _fold(word: str) -> str:
    """Light plural folding: studies -> study, boxes -> box, notes -> note; short words untouched."""
    word = word.strip("'-")
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "ches", "shes", "xes")):
        return word[:-2]
    if len(word) > 4 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def candidate_phrases(text: str, max_words: int = 3) -> list[tuple[str, ...]]:
    """Runs of content words between stop words and punctuation, at most ``max_words`` long."""
    phrases = []
    for fragment in _SPLIT.split(text.lower()):
        run: list[str] = []
        for token in fragment.split():
            words = _WORD.findall(token)
            word = _fold(words[0]) if words else ""
            if not word or word in ENGLISH_STOP_WORDS or len(word) < 2:
                if run:
                    phrases.append(tuple(run))
                run = []
                continue
            run.append(word)
            if len(run) == max_words:
                phrases.append(tuple(run))
                run = []
        if run:
            phrases.append(tuple(run))
    return phrases


def extract_concepts(text: str, max_concepts: int = 4, max_words: int = 3) -> list[str]:
    """The top ``max_concepts`` RAKE key phrases of ``text``, best first (ties: first seen)."""
    phrases = candidate_phrases(text, max_words)
    freq: dict[str, int] = {}
    degree: dict[str, int] = {}
    for phrase in phrases:
        for word in phrase:
            freq[word] = freq.get(word, 0) + 1
            degree[word] = degree.get(word, 0) + len(phrase)
    scored: dict[str, tuple[float, int]] = {}
    for position, phrase in enumerate(phrases):
        name = " ".join(phrase)
        if name not in scored:
            scored[name] = (sum(degree[w] / freq[w] for w in phrase), position)
    best = sorted(scored.items(), key=lambda item: (-item[1][0], item[1][1]))
    return [name for name, _ in best[:max_concepts]]


def record_concepts(record, config: ConceptConfig) -> list[str]:
    text = "\n".join(part for part in (record.instruction, record.input, record.response) if part)
    return extract_concepts(text, config.max_concepts, config.max_phrase_words)


class ConceptGraph:
    """Concepts seen in accepted records, and which of them appeared together."""

    def __init__(self):
        self.neighbours: dict[str, set[str]] = {}

    def __contains__(self, concept: str) -> bool:
        return concept in self.neighbours

    def __len__(self) -> int:
        return len(self.neighbours)

    def conflict(self, concepts: list[str]) -> tuple[str, str] | None:
        """The first pair of known concepts with no edge between them, or None."""
        known = [c for c in dict.fromkeys(concepts) if c in self.neighbours]
        for a, b in itertools.combinations(known, 2):
            if b not in self.neighbours[a]:
                return a, b
        return None

    def add(self, concepts: list[str]) -> None:
        unique = list(dict.fromkeys(concepts))
        for c in unique:
            self.neighbours.setdefault(c, set())
        for a, b in itertools.combinations(unique, 2):
            self.neighbours[a].add(b)
            self.neighbours[b].add(a)

    def offer(self, concepts: list[str]) -> tuple[bool, tuple[str, str] | None]:
        """Accept (and add) the record's concepts unless they conflict; returns (accepted, pair)."""
        pair = self.conflict(concepts)
        if pair is None:
            self.add(concepts)
            return True, None
        return False, pair


def cluster_names(clusters, concepts, n_words: int = 3) -> dict[int, str]:
    """Each cluster named by its most distinctive concepts, e.g. "convert / minute / hour".

    A concept's weight in a cluster is the number of the cluster's records that have it times
    log(K / the number of clusters where it occurs) (class-based tf-idf: a concept of every
    cluster weighs nothing and names none, unless a cluster has no other); the ``n_words``
    heaviest are joined by " / ", ties by count, then alphabetically, so the names are
    deterministic. A cluster whose records have no concept gets "".
    """
    counts: dict[int, Counter] = {}
    for cluster, found in zip(clusters, concepts):
        counts.setdefault(int(cluster), Counter()).update(set(found))
    spread = Counter(c for counter in counts.values() for c in counter)
    k = len(counts)
    names = {}
    for cluster, counter in counts.items():
        weight = {c: n * math.log(k / spread[c]) for c, n in counter.items()}
        distinctive = [c for c in weight if weight[c] > 0] or list(weight)
        top = sorted(distinctive, key=lambda c: (-weight[c], -counter[c], c))[:n_words]
        names[cluster] = " / ".join(top)
    return names
