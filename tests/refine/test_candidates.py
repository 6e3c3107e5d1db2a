import numpy as np
import pytest

from near_ray.names import majority_label
from near_ray.refine.candidates import candidate_sets
from near_ray.refine.knn import knn

PUBLISHED = {"neighbour_votes": "similarity"}  # the published vote; the default, above_chance, is tested below


def _clustered(sizes, seed=0):
    """Unit vectors in tight clusters, one per class; returns (vectors, class of each row)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(sizes), 32))
    cls = np.repeat(np.arange(len(sizes)), sizes)
    x = centers[cls] + 0.1 * rng.normal(size=(len(cls), 32))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), cls


def test_mislabeled_image_gets_its_neighbours_label():
    x, cls = _clustered([8, 8])
    names = ["Crimson-barred Warbler", "Crimson-spotted Warbler"]
    own = [[names[c]] * 3 for c in cls]
    own[2] = ["Crimson-spotted Warbler"] * 3  # image 2 shows a barred warbler; every sample says spotted
    ids, sims = knn(x, 5)
    sets = candidate_sets(own, ids, sims, neighbour_weight=0.5, min_neighbour_votes=0.0, **PUBLISHED)
    s = sets[2]
    assert set(s.candidates) == set(names)
    conf = dict(zip(s.candidates, s.confidences, strict=True))
    assert conf["Crimson-barred Warbler"] > 0.3  # one third: own samples 1, neighbours 0.5
    # and a correctly labeled image keeps its own label on top
    assert sets[10].candidates[0] == "Crimson-spotted Warbler"


@pytest.mark.parametrize("mode", ["above_chance", "similarity", "agreement"])
def test_confidences_are_inside_the_set_and_sum_to_one(mode):
    x, cls = _clustered([5, 6, 4], seed=1)
    rng = np.random.default_rng(1)
    vocab = ["A", "B", "C", "D"]
    own = [[vocab[rng.integers(4)] for _ in range(rng.integers(0, 4))] for _ in cls]
    ids, sims = knn(x, 4)
    ids[::3, -1] = -1  # rows an approximate index could not fill
    sets = candidate_sets(own, ids, sims, neighbour_weight=0.7, min_neighbour_votes=0.0, neighbour_votes=mode)
    for i, s in enumerate(sets):
        neighbour_names = {n for j in ids[i] if j >= 0 for n in own[j]}
        assert set(own[i]) <= set(s.candidates) <= set(own[i]) | neighbour_names
        if mode == "similarity" or not own[i]:  # every name a neighbour gave stays (no floor here)
            assert set(s.candidates) == set(own[i]) | neighbour_names
        if s.candidates:
            assert all(c >= 0 for c in s.confidences)
            assert sum(s.confidences) == pytest.approx(1.0, abs=1e-6)
            assert s.confidences == sorted(s.confidences, reverse=True)


def test_unparsable_image_gets_candidates_from_neighbours_only():
    x, cls = _clustered([6, 6], seed=2)
    own = [["Rosy Lotus"] if c == 0 else ["Amber Anemone", "Amber Anemone", "Rosy Lotus"] for c in cls]
    own[0] = []  # all of image 0's answers were unparsable
    ids, sims = knn(x, 4)
    s = candidate_sets(own, ids, sims, neighbour_weight=0.5, min_neighbour_votes=0.0, **PUBLISHED)[0]
    assert s.candidates == ["Rosy Lotus"] and s.confidences == [pytest.approx(1.0)]


def test_no_neighbours_and_no_labels():
    own = [["Rosy Lotus", "Rosy Lotus", "Amber Anemone"]]
    ids, sims = knn(np.ones((1, 4), np.float32) / 2, 5)
    s = candidate_sets(own, ids, sims, 0.5, 0.0)[0]
    assert s.candidates == ["Rosy Lotus", "Amber Anemone"]
    assert s.confidences == [pytest.approx(2 / 3), pytest.approx(1 / 3)]
    empty = candidate_sets([[]], ids, sims, 0.5, 0.0)[0]
    assert empty.candidates == [] and empty.confidences == []


def test_an_unknown_vote_is_an_error_naming_the_option():
    with pytest.raises(ValueError, match="refine.neighbour_votes: 'above-chance' is not one of"):
        candidate_sets([["A"]], np.full((1, 1), -1), np.zeros((1, 1), np.float32), 0.5, 1.0, "above-chance")


def test_majority_label_is_deterministic():
    assert majority_label([]) is None
    assert majority_label(["B", "A", "B"]) == "B"
    assert majority_label(["B", "A"]) == majority_label(["A", "B"]) == "A"  # tie: alphabetical
    assert majority_label(["B", "A"], support={"B": 9, "A": 2}) == "B"  # tie: better supported name


def test_a_name_needs_a_neighbours_worth_of_votes_to_join_the_set():
    # image 0 and its four neighbours (equal similarity): two neighbours call it "A" (all samples),
    # one says "B" once in three samples, one says "C" in all its samples.
    own = [["X", "X", "X"], ["A"] * 3, ["A"] * 3, ["D", "D", "B"], ["C"] * 3]
    ids = np.array([[1, 2, 3, 4]] + [[-1, -1, -1, -1]] * 4)
    sims = np.full(ids.shape, 0.8, dtype=np.float32)
    strict = candidate_sets(own, ids, sims, neighbour_weight=0.5, min_neighbour_votes=1.0, **PUBLISHED)[0]
    assert set(strict.candidates) == {"X", "A", "C"}  # "B" (a third of one neighbour) and "D" (two thirds) stay out
    assert sum(strict.confidences) == pytest.approx(1.0)
    everything = candidate_sets(own, ids, sims, neighbour_weight=0.5, min_neighbour_votes=0.0, **PUBLISHED)[0]
    assert set(everything.candidates) == {"X", "A", "B", "C", "D"}
    two = candidate_sets(own, ids, sims, neighbour_weight=0.5, min_neighbour_votes=2.0, **PUBLISHED)[0]
    assert set(two.candidates) == {"X", "A"}
    # an image without parsed names of its own keeps every name its neighbours gave
    own[0] = []
    alone = candidate_sets(own, ids, sims, neighbour_weight=0.5, min_neighbour_votes=2.0, **PUBLISHED)[0]
    assert set(alone.candidates) == {"A", "B", "C", "D"}


def test_agreement_votes_drop_close_neighbours_whose_answers_share_nothing_with_the_image():
    # image 0: its own answers split between the true name A and a stray B. Neighbour 1 (an image of
    # the same class) answers A; neighbours 2 and 3, closer in embedding space, are of another class
    # and answer C.
    own = [["A", "A", "B"], ["A", "A", "D"], ["C", "C", "C"], ["C", "C", "E"]]
    ids = np.array([[2, 3, 1], [0, 2, 3], [3, 0, 1], [2, 0, 1]])
    sims = np.array([[0.9, 0.9, 0.6], [0.6, 0.5, 0.5], [0.9, 0.9, 0.5], [0.9, 0.9, 0.5]], dtype=np.float32)
    by_sim = candidate_sets(own, ids, sims, 0.5, 1.0, **PUBLISHED)[0]
    by_agreement = candidate_sets(own, ids, sims, 0.5, 1.0, neighbour_votes="agreement")[0]
    assert "C" in by_sim.candidates  # two close neighbours of another class bring their name in
    assert "C" not in by_agreement.candidates and by_agreement.candidates[0] == "A"
    conf = dict(zip(by_agreement.candidates, by_agreement.confidences, strict=True))
    # the corroborating neighbour's votes go to A (and its own stray D stays out: under one neighbour's worth)
    assert set(by_agreement.candidates) == {"A", "B"} and conf["A"] > 2 / 3


def test_agreement_votes_keep_similarity_weights_for_an_image_without_own_answers():
    own = [[], ["A", "A", "A"], ["A", "B", "A"]]
    ids = np.array([[1, 2], [0, 2], [0, 1]])
    sims = np.array([[0.8, 0.7], [0.8, 0.6], [0.7, 0.6]], dtype=np.float32)
    s = candidate_sets(own, ids, sims, 0.5, 1.0, neighbour_votes="agreement")[0]
    assert s.candidates[0] == "A" and s == candidate_sets(own, ids, sims, 0.5, 1.0, **PUBLISHED)[0]


def test_agreement_votes_equal_similarity_votes_when_every_neighbour_answers_alike():
    x, cls = _clustered([6, 6])
    own = [[f"name {c}"] * 3 for c in cls]
    ids, sims = knn(x, 4)
    a = candidate_sets(own, ids, sims, 0.5, 1.0, neighbour_votes="agreement")
    b = candidate_sets(own, ids, sims, 0.5, 1.0, **PUBLISHED)
    assert [s.candidates for s in a] == [s.candidates for s in b]
    for sa, sb in zip(a, b, strict=True):
        assert np.allclose(sa.confidences, sb.confidences)


def test_above_chance_votes_leave_out_a_name_the_neighbours_give_no_more_often_than_anyone():
    # a domain where the annotator calls 6 of 17 images "warbler" (a coarse name: base rate 6/17).
    # Image 0 answers "Yellow Warbler" and "Pine Warbler"; its neighbours give "warbler" a third of
    # their votes, under its base rate, and "Yellow Warbler" two thirds, far above its rate (0.16).
    own = ([["Yellow Warbler", "Yellow Warbler", "Pine Warbler"]]
           + [["warbler"] * 3, ["Yellow Warbler"] * 3, ["Yellow Warbler"] * 3]
           + [["warbler"] * 3] * 5 + [["Pine Warbler"] * 3] * 4 + [["Magnolia Warbler"] * 3] * 4)
    ids = np.full((len(own), 3), -1)
    ids[0] = [1, 2, 3]
    sims = np.full(ids.shape, 0.8, dtype=np.float32)
    plain = candidate_sets(own, ids, sims, 0.5, 1.0, **PUBLISHED)[0]
    lifted = candidate_sets(own, ids, sims, 0.5, 1.0, neighbour_votes="above_chance")[0]
    assert "warbler" in plain.candidates  # one whole neighbour's worth of votes
    assert "warbler" not in lifted.candidates
    conf = dict(zip(lifted.candidates, lifted.confidences, strict=True))
    assert lifted.candidates[0] == "Yellow Warbler" and conf["Yellow Warbler"] > dict(
        zip(plain.candidates, plain.confidences, strict=True))["Yellow Warbler"]


def test_above_chance_votes_still_let_a_pure_neighbourhood_correct_a_consistently_wrong_answer():
    # image 0 is consistently called B; its neighbours, one class of many, all answer A: A is far
    # above its base rate, so it joins the set with most of the neighbourhood's weight (which the
    # agreement votes would drop: the neighbours share no name with the image).
    x, cls = _clustered([5] * 6)
    own = [[f"name {c}"] * 3 for c in cls]
    own[0] = ["wrong"] * 3
    ids, sims = knn(x, 4)
    lifted = candidate_sets(own, ids, sims, 0.5, 1.0, neighbour_votes="above_chance")[0]
    by_agreement = candidate_sets(own, ids, sims, 0.5, 1.0, neighbour_votes="agreement")[0]
    right = f"name {cls[0]}"
    assert right in lifted.candidates and right not in by_agreement.candidates
    conf = dict(zip(lifted.candidates, lifted.confidences, strict=True))
    assert conf[right] == pytest.approx(0.5 * (1 - 4 / 30) / (1 + 0.5 * (1 - 4 / 30)))


def test_above_chance_votes_fall_back_to_the_own_answers_in_a_neighbourhood_at_chance():
    # every image's neighbours are all the others: the names they give sit at their base rates (a
    # little above, 8/31 against 8/32, since an image's own answers count in the base and not among
    # its neighbours; under the one-neighbour floor), so the sets are the images' own answers, as
    # without kNN, and nothing is lost for an image without any
    own = [[f"n{c}"] * 3 for c in range(4) for _ in range(8)]
    ids = np.array([[j for j in range(len(own)) if j != i] for i in range(len(own))])
    sims = np.full(ids.shape, 0.5, dtype=np.float32)
    lifted = candidate_sets(own, ids, sims, 0.5, 1.0, neighbour_votes="above_chance")
    assert all(s.candidates == [own[i][0]] for i, s in enumerate(lifted))
    own[0] = []
    alone = candidate_sets(own, ids, sims, 0.5, 1.0, neighbour_votes="above_chance")[0]
    assert alone == candidate_sets(own, ids, sims, 0.5, 1.0, **PUBLISHED)[0] and len(alone.candidates) == 4
