"""A tiny random-weight LLaMA checkpoint made at test time (no download): config, weights, tokenizer.

The tokenizer is a WordLevel one over words `w0 .. w{n-1}` split on whitespace, so any text of those
words round-trips and decoding is the words joined by spaces. float32, so that sglang's CPU forward
and HF transformers' agree token for token under greedy decoding.
"""

from __future__ import annotations

import pathlib

VOCAB = 384
SPECIAL = ["<unk>", "<s>", "</s>"]
# sglang's OpenAI chat endpoint renders messages with the tokenizer's chat template.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def words(n: int, *, seed: int) -> str:
    """A prompt of `n` vocabulary words, deterministic in `seed`."""
    import random

    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(VOCAB - len(SPECIAL))}" for _ in range(n))


def make(path: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Write the model to `path` (created) and return it. Deterministic in `seed`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({f"w{i}": len(SPECIAL) + i for i in range(VOCAB - len(SPECIAL))})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # one KV head per rank at tp=2
        head_dim=16,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="float32",
        initializer_range=0.2,  # wide enough that greedy output does not collapse into one token
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_greedy(path: pathlib.Path, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF transformers' greedy continuation of `input_ids` (no EOS stop): the reference output."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
            min_new_tokens=max_new_tokens,
        )
    return [int(x) for x in out[0, len(input_ids) :]]
