"""Chat evaluation: letter choice follows a rigged model's preference and is the same batched or one at a time;
generation goes through the engine; ChatCORE; the command line alone, under torchrun, and on bad input."""
import json

import pytest
import torch

from conftest import assert_user_error, one_line_error, run_python
from nanochat_nb import checkpoint
from nanochat_nb.chat_eval import chatcore, choose_letters, evaluate_task, generate_answers, main, run_chat_eval
from nanochat_nb.common import UserError
from nanochat_nb.engine import Engine
from nanochat_nb.gpt import GPT, GPTConfig
from nanochat_nb.tasks import ARC, GSM8K, MMLU, SpellingBee, spread_evenly


def tiny_model(vocab_size: int, randomise: bool = False) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=1024, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    if randomise:  # init_weights zeroes the output projections; a random model needs them to mix in its context
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("c_proj.weight", "lm_head.weight")):
                    p.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def arc():
    return spread_evenly(ARC("easy"), 120)


def rig(model, tokenizer, conversation, letter: str):
    """Make `model` prefer `letter` after <|assistant_start|>: with its blocks' outputs zero (as initialised), the
    last hidden state depends only on the prompt's last tokens, the same for every question; point the letter's
    row of lm_head along it and zero the others."""
    seen = []
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0][0, -1].clone()))
    with torch.no_grad():
        model(torch.tensor([tokenizer.render_for_completion(conversation)]))
        handle.remove()
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.encode(letter)[0]] = seen[0].float()


@pytest.mark.parametrize("letter", ["A", "C"])
def test_letter_choice_picks_what_the_rigged_model_prefers(byte_tokenizer, arc, letter, one_thread):
    model = tiny_model(byte_tokenizer.vocab_size)
    rig(model, byte_tokenizer, arc[0], letter)
    conversations = list(arc)
    assert choose_letters(model, byte_tokenizer, conversations, batch_size=16) == [letter] * len(conversations)
    result = evaluate_task(Engine(model, byte_tokenizer), arc, batch_size=16)
    expected = sum(c["messages"][1]["content"] == letter for c in conversations)
    assert result["total"] == 120 and result["correct"] == expected and result["accuracy"] == expected / 120


def test_batched_letter_choice_equals_one_at_a_time(tokenizer, one_thread):
    "Padding and batching change nothing: rows of different lengths give the letters they give alone."
    model = tiny_model(tokenizer.vocab_size, randomise=True)
    conversations = list(spread_evenly(MMLU("test"), 24)) + list(spread_evenly(ARC("challenge"), 24))
    alone = choose_letters(model, tokenizer, conversations, batch_size=1)
    assert choose_letters(model, tokenizer, conversations, batch_size=7) == alone
    assert len(set(alone)) > 1  # the random model does not answer one letter everywhere
    long = {**conversations[0], "messages": [{"role": "user", "content": "word " * 3000}, conversations[0]["messages"][1]]}
    assert choose_letters(model, tokenizer, [long])[0] in long["letters"]  # longer than the context: keeps the end


def test_generation_goes_through_the_engine(tokenizer, one_thread):
    model = tiny_model(tokenizer.vocab_size, randomise=True)
    engine = Engine(model, tokenizer)
    gsm8k = GSM8K("test", stop=6)
    answers = generate_answers(engine, list(gsm8k), max_tokens=12, batch_size=4)
    prompts = [tokenizer.render_for_completion(c) for c in gsm8k]
    tokens, _ = engine.generate_batch(prompts[:4], max_tokens=12, temperature=0.0)
    assert answers[:4] == [tokenizer.decode(t) for t in tokens] and len(answers) == 6
    result = evaluate_task(engine, gsm8k, max_tokens=12)
    assert result["total"] == 6 and result["correct"] == 0 and result["eval_type"] == "generative"


def test_a_correct_generation_scores(tokenizer):
    "The scoring path end to end: the engine's forced tokens (a calculator call it runs itself) become the answer."
    model = tiny_model(tokenizer.vocab_size)
    engine = Engine(model, tokenizer)
    bee = SpellingBee(50, "test")
    item = next(c for c in bee if c["kind"] == "count")
    call = item["messages"][1]["content"][1]["text"]  # e.g. 'word'.count('o')
    force = [tokenizer.id_of("<|python_start|>"), *tokenizer.encode(call), tokenizer.id_of("<|python_end|>")]
    tokens, masks = engine.generate_batch(tokenizer.render_for_completion(item), max_tokens=len(force) + 6,
                                          temperature=0.0, force=force)
    text = tokenizer.decode(tokens[0])
    assert f"<|output_start|>{item['answer']}<|output_end|>" in text  # the engine's calculator answered
    assert bee.evaluate(item, f"{text}\n#### {item['answer']}") and not bee.evaluate(item, text)


def test_chatcore():
    assert chatcore({"ARC-Easy": 0.25, "MMLU": 0.25, "GSM8K": 0.0}) == 0.0
    assert chatcore({"ARC-Easy": 1.0, "GSM8K": 0.5}) == pytest.approx(0.75)
    assert chatcore({"ARC-Challenge": 0.4, "HumanEval": 0.1}) == pytest.approx((0.2 + 0.1) / 2)
    assert chatcore({"X": 0.4}, {"X": "categorical"}) == pytest.approx(0.2)
    with pytest.raises(UserError, match="Unknown chat-eval task 'ARC-Hard'"):
        run_chat_eval(None, ["ARC-Hard"])


# ---------------------------------------------------------------------------------------------------------------
# the command line

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("runs") / "chatsft_checkpoints" / "d2"
    model = tiny_model(tokenizer.vocab_size, randomise=True)
    checkpoint.save(folder, 3, model, meta={"tokenizer": checkpoint.tokenizer_fingerprint(tokenizer)})
    tokenizer.save(folder / "tokenizer")
    return folder


def test_cli_alone_and_under_torchrun(run_dir):
    flags = ["--checkpoint", str(run_dir), "--tasks", "ARC-Easy,SpellingBee", "--max-items", "20",
             "--max-tokens", "8", "--device-type", "cpu"]
    single = run_python("-m", "nanochat_nb.chat_eval", *flags, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "ChatCORE" in single.stdout
    one = json.loads((run_dir / "chat_eval_000003.json").read_text())
    assert one["step"] == 3 and [t["total"] for t in one["tasks"].values()] == [20, 20]
    double = run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "nanochat_nb.chat_eval", *flags, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "on 2 process(es)" in double.stdout
    two = json.loads((run_dir / "chat_eval_000003.json").read_text())
    for name, task in one["tasks"].items():
        assert (two["tasks"][name]["correct"], two["tasks"][name]["total"]) == (task["correct"], task["total"]), name
    assert two["chatcore"] == pytest.approx(one["chatcore"])


def test_cli_bad_input(run_dir, tmp_path, capsys):
    line = one_line_error(run_python("-m", "nanochat_nb.chat_eval", "--checkpoint", str(run_dir), "--tasks",
                                     "ARC-Easy,ARC-Hard", timeout=120), "nanochat-chat-eval")
    assert "unknown task 'ARC-Hard'" in line
    assert_user_error(capsys, "--max-items must be at least 1, got 0", main, ["--checkpoint", str(run_dir), "--max-items", "0"])
    assert_user_error(capsys, "--batch-size must be at least 1", main, ["--checkpoint", str(run_dir), "--batch-size", "-2"])
    assert_user_error(capsys, f"{tmp_path / 'nowhere'}", main, ["--checkpoint", str(tmp_path / "nowhere")])
