import dataclasses
import json
from datetime import datetime
from pathlib import Path

import pytest
import torch
from cli_fixtures import tiny_tokenizer
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from locas.evaluation.config import CONDITIONS
from locas.evaluation.locomo import (
    OFFICIAL_COUNTS,
    QASettings,
    answer_questions,
    answering_model,
    evaluate_locomo,
    learn_dialogue,
    load_locomo,
    parse_conversation,
    parse_session_date,
    prompt_pieces,
    question_prompt,
    render_dialogue,
    score_answer,
    training_config,
)
from locas.memory import Memory
from locas.training.config import OnlineConfig

pytestmark = pytest.mark.usefixtures("one_thread")

LOCOMO = Path(__file__).resolve().parents[2] / "shared/data/locomo/locomo10.json"
TRAINING = OnlineConfig(chunk_size=48, context_window=48, width=4, lora_rank=4, lr=1e-2)
SETTINGS = QASettings(max_new_tokens=6)


def turns(session: int, lines: list[tuple[str, str]]) -> list[dict]:
    return [{"speaker": s, "text": t, "dia_id": f"D{session}:{i + 1}"} for i, (s, t) in enumerate(lines)]


def synthetic(sample_id: str = "conv-test") -> dict:
    """Two sessions whose numbers run against their dates, and one question of each category."""
    return {
        "sample_id": sample_id,
        "conversation": {
            "speaker_a": "Anna",
            "speaker_b": "Ben",
            "session_1_date_time": "3:00 pm on 2 May, 2023",
            "session_1": turns(1, [("Anna", "I painted a sunrise."), ("Ben", "My cat is called Tom.")]),
            "session_2_date_time": "10:15 am on 20 April, 2023",
            "session_2": turns(2, [("Anna", "I live in Paris."), ("Ben", "I adopted a dog today!")]),
        },
        "qa": [
            {"question": "Where does Anna live?", "answer": "Paris", "evidence": ["D2:1"], "category": 4},
            {"question": "When did Ben adopt a dog?", "answer": "20 April 2023", "evidence": ["D2:2"], "category": 2},
            {"question": "What pets does Ben have?", "answer": "dog, cat", "evidence": [], "category": 1},
            {"question": "Would Anna like art?", "answer": "Yes; she paints", "evidence": [], "category": 3},
            {"question": "What did Ben paint?", "adversarial_answer": "a sunrise", "evidence": [], "category": 5},
        ],
    }


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def dialogue_model(tokenizer, config_class=LlamaConfig, **options):
    """A random 2-layer model of `config_class` with the tiny tokenizer's vocabulary and a 1,024-token window."""
    torch.manual_seed(0)
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        **options,
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return dialogue_model(tokenizer)


# --- the file --------------------------------------------------------------------------------------


def test_the_real_file_has_the_official_categories_and_a_subset_can_be_chosen():
    conversations = load_locomo(LOCOMO)
    assert len(conversations) == 10
    assert sum(len(c.questions) for c in conversations) == sum(OFFICIAL_COUNTS.values()) == 1986
    first = conversations[0]
    assert (first.sample_id, first.speaker_a, first.speaker_b) == ("conv-26", "Caroline", "Melanie")
    assert len(first.sessions) == 19  # 35 dates, but only 19 sessions with turns
    assert all(q.answer is not None for c in conversations for q in c.questions if q.category != 5)
    assert all(q.adversarial_answer for c in conversations for q in c.questions if q.category == 5)
    (chosen,) = load_locomo(LOCOMO, ["conv-30"])
    assert chosen.sample_id == "conv-30" and len(chosen.questions) == 105
    with pytest.raises(ValueError, match="no conversation 'conv-99'"):
        load_locomo(LOCOMO, ["conv-99"])


def test_a_corrupted_category_is_refused_with_the_expected_and_found_counts(tmp_path):
    data = json.loads(LOCOMO.read_text())
    question = next(q for q in data[3]["qa"] if q["category"] == 4)
    question["category"] = 2
    corrupted = tmp_path / "locomo10.json"
    corrupted.write_text(json.dumps(data))
    with pytest.raises(ValueError) as error:
        load_locomo(corrupted)
    message = str(error.value)
    assert str(corrupted) in message
    assert "category 2 (temporal): expected 321, found 322" in message
    assert "category 4 (single-hop): expected 841, found 840" in message
    # A partial file is not count-checked unless asked.
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(data[:1]))
    assert len(load_locomo(partial)) == 1
    with pytest.raises(ValueError, match="expected 282"):
        load_locomo(partial, check_counts=True)


def test_missing_file_bad_json_and_missing_keys_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_locomo(tmp_path / "nothing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(ValueError, match="broken.json: not a JSON file"):
        load_locomo(broken)
    for remove, expected in [("speaker_a", "missing key 'speaker_a'"), ("session_2_date_time", "session_2_date_time")]:
        raw = synthetic()
        del raw["conversation"][remove]
        path = tmp_path / f"without-{remove}.json"
        path.write_text(json.dumps([raw]))
        with pytest.raises(ValueError, match=rf"without-{remove}.json: conversation 0 \(conv-test\).*{expected}"):
            load_locomo(path)
    raw = synthetic()
    del raw["qa"][0]["answer"]
    with pytest.raises(ValueError, match="question 0: missing key 'answer'"):
        parse_conversation(raw)
    raw["qa"][0]["category"] = 7
    with pytest.raises(ValueError, match="unknown category 7"):
        parse_conversation(raw)


def test_sessions_are_ordered_by_their_parsed_dates_not_their_numbers_or_strings():
    assert parse_session_date("1:56 pm on 8 May, 2023") == datetime(2023, 5, 8, 13, 56)
    assert parse_session_date("12:15 am on 2 May, 2023") == datetime(2023, 5, 2, 0, 15)
    assert parse_session_date("12:30 pm on 2 May, 2023") == datetime(2023, 5, 2, 12, 30)
    with pytest.raises(ValueError, match="unreadable session date"):
        parse_session_date("2023-05-08 13:56")
    dates = {
        1: "9:00 am on 2 May, 2023",
        2: "10:30 am on 10 April, 2023",
        3: "12:30 pm on 2 May, 2023",
        4: "1:00 pm on 2 May, 2023",
        5: "12:15 am on 2 May, 2023",
    }
    raw = synthetic()
    raw["conversation"] = {"speaker_a": "Anna", "speaker_b": "Ben"}
    for number, date in dates.items():
        raw["conversation"][f"session_{number}_date_time"] = date
        raw["conversation"][f"session_{number}"] = turns(number, [("Anna", f"This is session {number}.")])
    expected = [2, 5, 1, 3, 4]  # by date; by string it would be 4, 2, 5, 3, 1
    assert sorted(dates, key=dates.get) != expected
    conversation = parse_conversation(raw)
    assert [s.number for s in conversation.sessions] == expected
    text = render_dialogue(conversation)
    assert [line for line in text.splitlines() if line.startswith("Anna")] == [
        f"Anna: This is session {n}." for n in expected
    ]
    assert text.startswith("DATE: 10:30 am on 10 April, 2023\nAnna: This is session 2.\n\nDATE: 12:15 am")


def test_scoring_rules_per_category():
    questions = {q.category: q for q in parse_conversation(synthetic()).questions}
    assert score_answer("Paris, France", questions[4]) == pytest.approx((2 / 3, 2 / 3))  # [pari, franc] vs [pari]
    assert score_answer("a dog", questions[1]) == pytest.approx((0.5, 0.5))  # gold parts dog -> 1, cat -> 0
    assert score_answer("yes", questions[3]) == (1.0, 1.0)  # gold cut at ';': 'Yes'
    assert score_answer("Not mentioned in the conversation.", questions[5]) == (0.0, 1.0)
    assert score_answer("No information available", questions[5]) == (0.0, 1.0)
    assert score_answer("A sunrise", questions[5]) == (-1.0, 0.0)  # -F1 against 'a sunrise'
    assert score_answer("sunrise, I think", questions[5]) == pytest.approx((-0.5, 0.0))  # [sunris, i, think]


# --- prompts ---------------------------------------------------------------------------------------


def test_prompts_keep_the_dialogues_tail_and_fit_the_window(model, tokenizer):
    conversation = parse_conversation(synthetic())
    dialogue_ids = tokenizer(render_dialogue(conversation), add_special_tokens=False).input_ids
    prompts = []

    def generate(input_ids, attention_mask, max_new_tokens, **options):
        prompts.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True))
        answer = torch.tensor([tokenizer(" Paris\nmore", add_special_tokens=False).input_ids])
        return torch.cat([input_ids, answer.expand(len(input_ids), -1)], dim=1)

    settings = QASettings(prompt_window=300, max_new_tokens=10, reuse_prefix=False)
    questions = conversation.questions
    answers, kept = answer_questions(model, tokenizer, generate, conversation, questions, dialogue_ids, settings)
    assert answers == ["Paris"] * len(questions)  # first line, stripped
    assert 0 < kept < len(dialogue_ids)
    for question, prompt in zip(questions, prompts, strict=True):
        before, after = prompt_pieces(tokenizer, question_prompt(question, conversation, True, settings))
        assert prompt == before + dialogue_ids[-kept:] + after
    longest = max(len(p) for p in prompts)
    assert longest + settings.max_new_tokens == 300  # the longest question fills the window exactly
    temporal = tokenizer.decode(prompts[1])
    assert temporal.endswith("Use DATE of CONVERSATION to answer with an approximate date.\nShort answer:")
    with pytest.raises(ValueError, match="cannot hold"):
        answer_questions(
            model, tokenizer, generate, conversation, questions, dialogue_ids, QASettings(prompt_window=50)
        )


def test_a_chat_template_wraps_the_prompt(tokenizer):
    chat = tiny_tokenizer()
    chat.chat_template = (
        "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    conversation = parse_conversation(synthetic())
    text = question_prompt(conversation.questions[0], conversation, True, SETTINGS)
    before, after = (chat.decode(ids) for ids in prompt_pieces(chat, text))
    assert before.startswith("<|user|>Below is a conversation between Anna and Ben.")
    assert after.endswith("Question: Where does Anna live?\nShort answer:<|end|><|assistant|>")
    plain_before, _ = prompt_pieces(tokenizer, text)
    assert "<|user|>" not in tokenizer.decode(plain_before)


# --- end to end ------------------------------------------------------------------------------------


def test_a_dialogue_shorter_than_a_chunk_is_trained_as_one_chunk(model):
    assert training_config(OnlineConfig(), "locas", 300).chunk_size == 300
    assert training_config(OnlineConfig(chunk_size=16, context_window=16), "lora", 300).chunk_size == 16
    learned = learn_dialogue(model, torch.arange(20) % 7, "locas", OnlineConfig(width=4), progress=False)
    assert learned.config.chunk_size == 20 and learned.stats["tokens"] == 19
    assert learned.memory.down.abs().sum() > 0  # trained
    with pytest.raises(ValueError, match="nothing to train on"):
        training_config(OnlineConfig(), "locas", 1)


@pytest.mark.parametrize("method", ["locas", "lora"])
def test_answers_use_the_learned_memory_and_the_backbone_comes_back(model, method):
    ids = torch.arange(60) % 11
    before = model(input_ids=ids[None]).logits
    learned = learn_dialogue(model, ids, method, TRAINING, progress=False)
    with torch.no_grad(), answering_model(model, learned) as generate:
        inside = model(input_ids=ids[None]).logits
        output = generate(input_ids=ids[None, :8], max_new_tokens=3, do_sample=False)
    assert output.shape == (1, 11)
    assert not torch.allclose(inside, before)
    assert torch.equal(model(input_ids=ids[None]).logits, before)


def check_results(results, conditions, questions):
    assert results["conditions"] == list(conditions)
    assert list(results["scores"]) == list(conditions)
    for scores in results["scores"].values():
        assert scores["questions"] == questions
        for name in ("single-hop", "multi-hop", "open-domain", "temporal", "overall", "adversarial_official"):
            assert 0.0 <= scores[name] <= 1.0
        assert -1.0 <= scores["adversarial"] <= 0.0
    assert len(results["predictions"]) == questions * len(conditions)
    for record in results["predictions"]:
        assert isinstance(record["prediction"], str) and "\n" not in record["prediction"]
        assert record["official"] in (0.0, 1.0) if record["category"] == 5 else record["official"] == record["score"]


def test_every_condition_end_to_end_and_memories_are_saved_then_reloaded(model, tokenizer, tmp_path, capsys):
    conversations = [parse_conversation(synthetic())]
    results = evaluate_locomo(
        model, tokenizer, conversations, CONDITIONS, TRAINING, SETTINGS, output_dir=tmp_path, progress=False
    )
    check_results(results, CONDITIONS, questions=5)
    info = results["conversations"]["conv-test"]
    assert info["conditions"]["none"]["context_tokens"] == 0
    assert info["conditions"]["full"]["context_tokens"] == info["dialogue_tokens"]  # it fits: no cut
    assert info["training"]["locas"]["tokens"] == info["dialogue_tokens"] - 1
    assert not info["training"]["locas"]["loaded"] and not info["training"]["lora"]["loaded"]
    memory = Memory.load(tmp_path / "memories/conv-test.safetensors")
    assert memory.width == 4 and memory.down.abs().sum() > 0
    assert (tmp_path / "adapters/conv-test.pt").is_file()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["scores"] == results["scores"]
    assert (tmp_path / "locomo.png").read_bytes().startswith(b"\x89PNG")

    # Again: the memory and the adapter are loaded, not retrained; same answers, with or without the
    # shared prefix's KV cache.
    again = evaluate_locomo(
        model,
        tokenizer,
        conversations,
        CONDITIONS,
        TRAINING,
        dataclasses.replace(SETTINGS, reuse_prefix=False),
        output_dir=tmp_path,
        progress=True,
    )
    err = capsys.readouterr().err
    for method, file in (("locas", "memories/conv-test.safetensors"), ("lora", "adapters/conv-test.pt")):
        assert f"conv-test {method}: trained earlier, read from {tmp_path / file}\n" in err
    assert again["conversations"]["conv-test"]["training"]["locas"]["loaded"]
    assert again["conversations"]["conv-test"]["training"]["lora"]["loaded"]
    assert [r["prediction"] for r in again["predictions"]] == [r["prediction"] for r in results["predictions"]]
    with pytest.raises(ValueError, match=r"trained with other settings \(lr 0\.\d+ -> 0\.02\)"):
        evaluate_locomo(
            model,
            tokenizer,
            conversations,
            ["locas"],
            dataclasses.replace(TRAINING, lr=2e-2),
            SETTINGS,
            output_dir=tmp_path,
            progress=False,
        )


def test_a_truncated_context_and_a_subset_of_questions(model, tokenizer):
    conversations = [parse_conversation(synthetic("a")), parse_conversation(synthetic("b"))]
    settings = QASettings(prompt_window=400, max_new_tokens=4, categories=(4, 2, 5), max_questions=2)
    results = evaluate_locomo(
        model, tokenizer, conversations, ["full", "locas+full"], TRAINING, settings, progress=False
    )
    assert [r["category"] for r in results["predictions"]] == [4, 2] * 4
    assert list(results["per_conversation"]) == ["a", "b"]
    for info in results["conversations"].values():
        assert 0 < info["conditions"]["full"]["context_tokens"] < info["dialogue_tokens"]
    assert "adversarial" not in results["scores"]["full"]
    assert results["scores"]["full"]["questions"] == 4
    with pytest.raises(ValueError, match=r"unknown condition 'locas\+none'"):
        evaluate_locomo(model, tokenizer, conversations, ["locas+none"], progress=False)


def test_generation_stops_once_the_first_non_empty_line_is_complete(tokenizer):
    from locas.evaluation.locomo import FirstLineDone

    prompt = tokenizer("Question: where?", add_special_tokens=False).input_ids
    criterion = FirstLineDone(tokenizer, len(prompt))

    def done(answer: str) -> bool:
        ids = prompt + tokenizer(answer, add_special_tokens=False).input_ids
        return bool(criterion(torch.tensor([ids]), None)[0])

    assert not done("in Paris")
    assert not done("\n\n in Paris")  # leading blank lines are skipped, as the answer is stripped
    assert done("in Paris\nQuestion")
    assert done("\nin Paris\n")


@pytest.mark.parametrize(("with_context", "sliding"), [(True, False), (False, False), (True, True)])
def test_questions_answered_in_a_batch_get_the_answers_they_get_alone(model, tokenizer, with_context, sliding):
    # a sliding window of 8: padding between prompt and question would shift it
    model = dialogue_model(tokenizer, Gemma3TextConfig, head_dim=8, sliding_window=8) if sliding else model
    conversation = parse_conversation(synthetic())
    dialogue_ids = tokenizer(render_dialogue(conversation), add_special_tokens=False).input_ids
    questions = conversation.questions * 2  # prompts of different lengths in one batch
    context = dialogue_ids if with_context else None
    answers, masks = {}, []

    def generate(**options):
        masks.append(options["attention_mask"])
        return model.generate(**options)

    for batch in (1, 3):
        settings = QASettings(prompt_window=400, max_new_tokens=8, answer_batch=batch)
        answers[batch], _ = answer_questions(
            model, tokenizer, generate, conversation, questions, context, settings, progress=False
        )
    assert answers[3] == answers[1]
    assert len(set(answers[1])) > 1  # the questions got different answers: the rows were not mixed up
    batched = masks[len(questions) :]
    assert max(len(mask) for mask in batched) > 1  # some questions did share a batch
    # a sliding window sits at cache positions, so a sliding-window model's batches are never padded
    assert all(mask.all() for mask in batched) == sliding


def test_a_prompt_window_past_the_models_positions_is_refused_or_warned_of():
    from conftest import tiny_model

    from locas.evaluation.locomo import prompt_window

    gpt2, llama = tiny_model("gpt2"), tiny_model("llama")  # 256 positions each
    assert prompt_window(gpt2, QASettings()) == 256 and prompt_window(llama, QASettings(prompt_window=200)) == 200
    with pytest.raises(ValueError, match="prompt_window 300 is longer than the model's 256 positions; use 256"):
        prompt_window(gpt2, QASettings(prompt_window=300))
    with pytest.warns(UserWarning, match="prompt_window 300 runs past the 256 positions the model was trained on"):
        assert prompt_window(llama, QASettings(prompt_window=300)) == 300
