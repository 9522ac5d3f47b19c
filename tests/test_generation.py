import pytest
import torch

from learndyn.errors import LearndynError
from learndyn.generation import generate

PROMPTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog, and the dog does not mind at all.",
    [{"role": "user", "content": "How do I make a cup of tea?"}],
    "Human: What is a horseshoe?\n\nAssistant:",
    "Zebras ümlaut 😀 numbers 12345",
]


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def model_and_tokenizer(request):
    return request.getfixturevalue(request.param)


def spy_generate(model, monkeypatch):
    """Record (prompt width, output width, attention mask) of every model.generate call."""
    calls = []
    original = model.generate

    def wrapped(*args, **kwargs):
        output = original(*args, **kwargs)
        calls.append((kwargs["input_ids"].shape[1], output.shape[1], kwargs["attention_mask"]))
        return output

    monkeypatch.setattr(model, "generate", wrapped)
    return calls


def test_batched_equals_one_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    one_by_one = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=1, progress=None)
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=len(PROMPTS), progress=None)
    assert batched == one_by_one
    assert all(isinstance(text, str) for text in batched)
    assert any(batched)  # a random model still says something


def test_order_follows_input(tiny_llama):
    model, tokenizer = tiny_llama
    forward = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=2, progress=None)
    backward = generate(model, tokenizer, PROMPTS[::-1], max_new_tokens=8, batch_size=2, progress=None)
    assert backward == forward[::-1]
    singles = [generate(model, tokenizer, [p], max_new_tokens=8, progress=None)[0] for p in PROMPTS]
    assert forward == singles


def test_batches_group_similar_lengths_with_left_padding(tiny_llama, monkeypatch):
    model, tokenizer = tiny_llama
    calls = spy_generate(model, monkeypatch)
    prompts = ["a", "a much longer prompt than the others by far", "b", "another long prompt of many words"]
    generate(model, tokenizer, prompts, max_new_tokens=3, batch_size=2, progress=None)
    widths = [width for width, _, _ in calls]
    assert widths[0] > widths[1]  # the two long prompts share a batch, the two short ones the other
    for _, _, mask in calls:
        assert bool(mask[:, -1].all())  # left padding: every row ends on a real token


def test_max_new_tokens_respected(tiny_llama, monkeypatch):
    model, tokenizer = tiny_llama
    calls = spy_generate(model, monkeypatch)
    generate(model, tokenizer, PROMPTS, max_new_tokens=5, batch_size=2, progress=None)
    assert calls and all(out - width <= 5 for width, out, _ in calls)


def test_stops_at_eos_and_drops_it(tiny_llama, monkeypatch):
    model, tokenizer = tiny_llama
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 10.0  # EOS is always the argmax
    model.lm_head = head
    calls = spy_generate(model, monkeypatch)
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=10, progress=None) == [""] * len(PROMPTS)
    assert all(out - width == 1 for width, out, _ in calls)


def test_tokenizer_settings_untouched(tiny_llama):
    model, tokenizer = tiny_llama
    tokenizer.padding_side = "right"
    expected = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=1, progress=None)
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3, progress=None) == expected
    assert tokenizer.padding_side == "right"
    assert tokenizer.pad_token == "<pad>"


def test_eos_serves_as_pad_when_there_is_none(tiny_llama):
    model, tokenizer = tiny_llama
    expected = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=1, progress=None)
    tokenizer.pad_token = None
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=4, progress=None) == expected
    assert tokenizer.pad_token is None


def test_chat_prompt_is_rendered_with_the_template(tiny_llama):
    model, tokenizer = tiny_llama
    chat = [{"role": "user", "content": "Hello"}]
    rendered = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert generate(model, tokenizer, [chat], max_new_tokens=6, progress=None) == \
        generate(model, tokenizer, [rendered], max_new_tokens=6, progress=None)


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny_llama):
    model, tokenizer = tiny_llama
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.5, seed=3, progress=None)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate(model, tokenizer, PROMPTS, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate(model, tokenizer, PROMPTS, **kwargs) == first
    assert generate(model, tokenizer, PROMPTS, **{**kwargs, "seed": 4}) != first


def test_training_mode_restored(tiny_llama):
    model, tokenizer = tiny_llama
    model.train()
    generate(model, tokenizer, ["Hi"], max_new_tokens=2, progress=None)
    assert model.training


def test_progress_bar_runs(tiny_llama):
    model, tokenizer = tiny_llama
    assert len(generate(model, tokenizer, PROMPTS, max_new_tokens=2, batch_size=2, progress="Decoding")) == 5


def test_empty_input_and_bad_settings(tiny_llama):
    model, tokenizer = tiny_llama
    assert generate(model, tokenizer, [], progress=None) == []
    with pytest.raises(LearndynError, match="max_new_tokens"):
        generate(model, tokenizer, ["Hi"], max_new_tokens=0)
    with pytest.raises(LearndynError, match="batch_size"):
        generate(model, tokenizer, ["Hi"], batch_size=0)
    with pytest.raises(LearndynError, match="prompt 1 is empty"):
        generate(model, tokenizer, ["Hi", ""], progress=None)
