"""Concept extraction and the Concept Consistency Graph rule."""

from __future__ import annotations

from paser.selection.concepts import ConceptGraph, candidate_phrases, extract_concepts


def test_phrases_split_on_stop_words_and_punctuation():
    phrases = candidate_phrases("Explain the water cycle, and describe cloud formation.")
    assert ("explain",) in phrases and ("water", "cycle") in phrases
    assert ("cloud", "formation") in phrases


def test_extract_is_ranked_capped_and_normalised():
    text = "Photosynthesis converts sunlight into chemical energy. Plants use chemical energy for growth."
    concepts = extract_concepts(text, max_concepts=3)
    assert len(concepts) == 3 and all(c == c.lower() for c in concepts)
    assert "chemical energy" in concepts
    assert extract_concepts("Sort the boxes and the studies") == ["sort", "box", "study"]
    assert extract_concepts("12 34 56") == []


def test_graph_accepts_and_rejects_by_the_rule():
    g = ConceptGraph()
    assert g.offer(["a", "b"]) == (True, None)  # new concepts: accepted, clique added
    assert g.offer(["a", "c"]) == (True, None)  # only one known concept: no pair to check
    assert g.offer(["b", "c", "d"]) == (False, ("b", "c"))  # b and c known, never together
    assert "d" not in g  # a rejected record adds nothing
    assert g.offer(["a", "b", "e"]) == (True, None)  # a-b edge exists
    assert g.offer(["c", "a"]) == (True, None)
    assert g.offer(["x"]) == (True, None) and "x" in g and len(g) == 5


def test_duplicates_in_a_record_are_ignored():
    g = ConceptGraph()
    g.add(["a", "a", "b"])
    assert g.conflict(["a", "b", "a"]) is None


def test_cluster_names_are_distinctive_and_deterministic():
    from paser.selection.concepts import cluster_names

    clusters = [0, 0, 0, 1, 1, 1]
    concepts = [["convert", "minute", "task"], ["convert", "hour", "task"], ["minute", "task"],
                ["capital", "city", "task"], ["capital", "country", "task"], ["city", "task"]]
    names = cluster_names(clusters, concepts)
    # "task" is in every record of both clusters: it names neither
    assert names == {0: "convert / minute / hour", 1: "capital / city / country"}
    assert cluster_names(clusters[::-1], concepts[::-1]) == names
    assert cluster_names([0, 1], [["a"], []]) == {0: "a", 1: ""}
