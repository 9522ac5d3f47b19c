"""Every attention variant scores exactly as one sequence at a time, whatever the batching.

Windowed attention (sliding windows: Mistral, Qwen2/3, Phi-3, Gemma-2/3, Cohere2, Starcoder2, OLMo-3,
Mixtral, GPT-OSS, GPT-Neo's local layers; Llama-4's chunks), often alternating with global layers,
counts cache slots, not positions. So padding between a prompt and its responses, or a KV cache
layer that keeps only the last window, changes what a response attends to. A window of 4 tokens
makes any such error large. Gemma-2 also soft-caps its logits, which the fused LM head must not skip.
"""

from __future__ import annotations

import pytest
import torch
from test_scoring import FLOAT_METRICS, random_encoded

from learndyn.dynamics.step import explain_mode
from learndyn.dynamics.sequences import (
    ResponseLogits,
    SharedPromptLogits,
    full_inputs,
    probe_batch,
    probe_batches,
    probe_sequences,
)
from learndyn.probes.files import Probe
from learndyn.lm import can_pad_prompts, split_model
from learndyn.scoring import score_encoded, score_plain

WINDOW = 4
_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=512)
# family: (config class, its settings); every layer type the family knows appears in 4 layers
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW)),
    "mixtral": ("MixtralConfig", dict(sliding_window=WINDOW, num_local_experts=2)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)),
    "qwen3": ("Qwen3Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)),
    "phi3": ("Phi3Config", dict(sliding_window=WINDOW)),
    "gemma2": ("Gemma2Config", dict(sliding_window=WINDOW)),  # alternating local/global, soft-capped logits
    "gemma3": ("Gemma3TextConfig", dict(sliding_window=WINDOW, layer_types=["sliding_attention"] * 3 + ["full_attention"])),
    "cohere2": ("Cohere2Config", dict(sliding_window=WINDOW)),  # scaled logits
    "starcoder2": ("Starcoder2Config", dict(sliding_window=WINDOW)),
    "olmo3": ("Olmo3Config", dict(sliding_window=WINDOW)),
    "gpt_oss": ("GptOssConfig", dict(sliding_window=WINDOW, num_local_experts=2, num_experts_per_tok=2)),
    "llama4": ("Llama4TextConfig", dict(attention_chunk_size=WINDOW, intermediate_size_mlp=64, num_local_experts=2)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=2, n_positions=512)),
    "gpt_neo": ("GPTNeoConfig", dict(hidden_size=32, num_layers=2, num_heads=2, window_size=WINDOW,
                                     attention_types=[[["global", "local"], 1]], max_position_embeddings=512)),
}


def tiny_model(config_name: str, settings: dict, tokenizer):
    """A tiny random float32 model of transformers' `config_name`, in eval mode (skips if it has none)."""
    import transformers

    config_class = getattr(transformers, config_name, None)
    if config_class is None:
        pytest.skip(f"this transformers has no {config_name}")
    special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tokenizer), **settings, **special)
    return transformers.AutoModelForCausalLM.from_config(config).to(torch.float32).eval()


@pytest.fixture(params=list(FAMILIES))
def family(request, tiny_tokenizer, one_thread):
    """(name, model, tokenizer): a tiny random model of the family."""
    name = request.param
    config_name, settings = FAMILIES[name]
    small = {} if name in ("gpt2", "gpt_neo") else _SMALL
    model = tiny_model(config_name, {**small, **settings}, tiny_tokenizer)
    with torch.no_grad():  # logits large enough that soft-capping and scaling are far from the identity
        model.get_output_embeddings().weight.mul_(20)
    return name, model, tiny_tokenizer


@pytest.mark.parametrize("batch_tokens", [1, 4096])
def test_scores_equal_plain_loop_on_every_attention_variant(family, batch_tokens):
    """1: every response alone; 4096: prompts of 1 to 12 tokens share batches (window 4)."""
    name, model, tokenizer = family
    encoded = random_encoded(len(tokenizer), 14)
    fast = score_encoded(model, encoded, batch_tokens=batch_tokens, progress=None)
    plain = score_plain(model, encoded)
    for metric in FLOAT_METRICS:
        rel = ((fast[metric] - plain[metric]).abs() / plain[metric].abs().clip(lower=1e-6)).max()
        assert rel < 1e-5, f"{name} {metric}: relative difference {rel:.2e}"


def test_logit_postprocessing_keeps_the_models_own_head(family):
    """Soft-capping (Gemma-2) and scaling (Cohere-2) happen after the LM head: no fused head there;
    the check is not so strict that plain heads lose the fused route."""
    name, model, _ = family
    if name in ("gemma2", "cohere2"):
        assert not split_model(model).fused
    elif name in ("llama", "gpt2", "gpt_neox", "mistral", "qwen2", "phi3", "gemma3"):
        assert split_model(model).fused


PROBES = [  # prompts of 26, 29 and 30 tokens: one batch, with 0 to 4 pad slots
    Probe("a", "Human: How do I make a cup of tea? Assistant:", {"chosen": " Boil the water, then steep.", "rejected": " No."}),
    Probe("b", "Human: How do I make a cup of tea now? Assistant:", {"chosen": " Python is a language.", "shuffled_chosen": "language. a Python is"}),
    Probe("c", "Human: How do I make a cup of tea today? Assistant:", {"chosen": " Yes, it jumps over the lazy dog."}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_explainer_shared_prompt_route_equals_full_sequences(family, dtype):
    """The explainer's jvp runs prompts together on a shared KV cache: its logits and their tangents
    equal those of every (prompt + response) run alone. In float32 the three prompt lengths share a
    batch (left-padded); in float64 eager attention they may not (see `can_pad_prompts`)."""
    name, model, tok = family
    model.to(dtype)
    obs = probe_sequences(PROBES, tok, None, None)
    params = {f"lm.{n}": p.detach() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    tangent = {n: torch.randn_like(p) for n, p in params.items()}
    full, shared = ResponseLogits(model), SharedPromptLogits(model)
    # float64 Llama-style eager attention still takes its softmax in float32
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    with explain_mode(model), torch.no_grad():
        batches = list(probe_batches(obs, 4096, pad=can_pad_prompts(model)))
        assert len(batches) == (1 if dtype == torch.float32 else 3)  # mixed prompt lengths, or one length each
        for groups in batches:
            batch = probe_batch(obs, groups, 4096, model.device)
            z, dz = torch.func.jvp(lambda p: torch.func.functional_call(shared, p, (batch,)), (params,), (tangent,))
            for i, seq in enumerate(batch.index):  # each reference sequence alone: no padding at all
                one = full_inputs(obs, [seq], model.device)
                z_i, dz_i = torch.func.jvp(lambda p: torch.func.functional_call(full, p, one[:4]), (params,), (tangent,))
                at = batch.seq == i
                assert torch.equal(batch.labels[at], one[4])
                assert (z[at] - z_i).norm() < tol * z_i.norm(), name
                assert (dz[at] - dz_i).norm() < tol * dz_i.norm(), name


def test_float64_eager_scores_equal_plain_loop(tiny_tokenizer, one_thread):
    """Left padding in a float64 model with eager attention would give NaN (see `can_pad_prompts`)."""
    import transformers

    config = transformers.MistralConfig(vocab_size=len(tiny_tokenizer), **_SMALL, sliding_window=WINDOW,
                                        attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).double().eval()
    encoded = random_encoded(len(tiny_tokenizer), 14)
    fast = score_encoded(model, encoded, batch_tokens=4096, progress=None)
    plain = score_plain(model, encoded)
    for metric in FLOAT_METRICS:
        assert ((fast[metric] - plain[metric]).abs() / plain[metric].abs().clip(lower=1e-6)).max() < 1e-6, metric


RECURRENT = {  # models whose cache holds a recurrent state, alone or beside keys and values
    "mamba": ("MambaConfig", dict(hidden_size=32, state_size=4, num_hidden_layers=2)),
    "lfm2": ("Lfm2Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, layer_types=["conv", "full_attention"])),
}


@pytest.mark.parametrize("name", list(RECURRENT))
def test_models_with_a_recurrent_state_score_a_sequence_at_a_time(name, tiny_tokenizer, one_thread):
    """Their cache cannot be copied per response: the scorer notices and runs each sequence alone,
    exactly, and explain refuses them in one line instead of a traceback."""
    from learndyn.dynamics.step import explain_step
    from learndyn.errors import LearndynError

    model = tiny_model(*RECURRENT[name], tiny_tokenizer)
    encoded = random_encoded(len(tiny_tokenizer), 8)
    fast = score_encoded(model, encoded, batch_tokens=4096, progress=None)
    plain = score_plain(model, encoded)
    assert not split_model(model).shares_cache()
    for metric in FLOAT_METRICS:
        assert ((fast[metric] - plain[metric]).abs() / plain[metric].abs().clip(lower=1e-6)).max() < 1e-5, metric
    with pytest.raises(LearndynError, match="recurrent state"):
        explain_step(model, tiny_tokenizer, [], PROBES)


def test_attention_models_share_the_prompt_cache(tiny_llama):
    """The check that sends recurrent models down the slow route keeps attention models on the fast one."""
    model, _ = tiny_llama
    assert split_model(model).shares_cache()
