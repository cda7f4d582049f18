import pytest

from locas.evaluation.token_f1 import answer_tokens, multi_answer_f1, normalize_answer, token_f1


def test_normalisation_removes_case_punctuation_articles_and_the_word_and():
    assert normalize_answer("The Cat, and a Dog!") == "cat dog"
    assert normalize_answer("An apple  AND the pear.") == "apple pear"
    # Punctuation is deleted, not turned into spaces (commas first, as the official code).
    assert normalize_answer("1,000 well-known") == "1000 wellknown"
    # Only whole words go: 'android', 'theatre', 'band' keep their letters.
    assert normalize_answer("android theatre band") == "android theatre band"


def test_tokens_are_porter_stemmed():
    assert answer_tokens("She paints sunrises") == ["she", "paint", "sunris"]
    assert answer_tokens("Counseling certification") == ["counsel", "certif"]


def test_token_f1_hand_computed():
    # "running in the park" -> [run, in, park]; "ran in park" -> [ran, in, park] ('ran' is not stemmed
    # to 'run'): 2 shared, P = R = 2/3, F1 = 2/3.
    assert token_f1("running in the park", "ran in park") == pytest.approx(2 / 3)
    # [she, paint, sunris] vs [paint, sunris]: 2 shared, P = 2/3, R = 1, F1 = 2 * (2/3) / (5/3) = 0.8.
    assert token_f1("She paints sunrises", "painted a sunrise") == pytest.approx(0.8)
    # Multisets: [dog, dog, cat] vs [dog]: 1 shared, P = 1/3, R = 1, F1 = (2/3) / (4/3) = 0.5.
    assert token_f1("dog dog cat", "dog") == pytest.approx(0.5)
    assert token_f1("salt and pepper", "Salt, pepper.") == 1.0  # 'and' and punctuation removed
    assert token_f1("7 May 2023", "7 May, 2023") == 1.0


def test_token_f1_is_zero_without_shared_tokens_or_text():
    assert token_f1("Paris", "London") == 0.0
    assert token_f1("", "London") == 0.0
    assert token_f1("London", "") == 0.0
    assert token_f1("the", "a") == 0.0  # both normalise to nothing


def test_multi_answer_f1_takes_the_best_predicted_part_per_gold_part():
    # Gold parts: bananas -> 1 (vs 'bananas'), cherries -> 0, apples -> 1 (vs 'apples'): mean 2/3.
    assert multi_answer_f1("apples, bananas", "bananas, cherries, apples") == pytest.approx(2 / 3)
    # One predicted part [appl, banana] vs gold part [appl]: P = 1/2, R = 1, F1 = 2/3; same for
    # [banana]: the mean is 2/3.
    assert multi_answer_f1("apples and bananas", "apples, bananas") == pytest.approx(2 / 3)
    # A single gold part is plain token F1 against the best predicted part.
    assert multi_answer_f1("London, running in the park", "ran in park") == pytest.approx(2 / 3)
