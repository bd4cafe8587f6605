"""The oracle for constrained replies: HF generate with the same grammar's mask as a logits processor, from its own
xgrammar compiler and matcher (nothing shared with the engine but the grammar's definition)."""

import json

import torch
import transformers as tf
import xgrammar as xg

from pensieve.config import StructuredOutput
from pensieve.structured.grammar import JSON_FORMAT, tokenizer_info


class GrammarProcessor(tf.LogitsProcessor):
    """HF's side of the oracle: its own matcher masks each step's scores (what the grammar allows)."""

    def __init__(self, tokenizer, vocab: int, eos: int, spec, prompt_len: int, kept=()) -> None:
        compiler = xg.GrammarCompiler(tokenizer_info(tokenizer, vocab, [eos], kept), cache_enabled=False)
        if isinstance(spec, xg.Grammar):
            compiled = compiler.compile_grammar(spec)
        elif spec.json is not None:
            compiled = compiler.compile_json_schema(json.dumps(spec.json), **JSON_FORMAT)
        else:
            compiled = compiler.compile_regex(spec.regex)
        self.matcher, self.vocab, self.prompt_len = xg.GrammarMatcher(compiled), vocab, prompt_len
        self.bitmask = xg.allocate_token_bitmask(1, vocab)

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] > self.prompt_len:
            assert self.matcher.accept_token(int(input_ids[0, -1]))
        self.matcher.fill_next_token_bitmask(self.bitmask)
        allowed = ((self.bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[: self.vocab]
        return scores.masked_fill(~allowed.bool()[None], float("-inf"))


def hf_constrained(
    oracle, tokenizer, ids: list[int], spec: StructuredOutput | xg.Grammar, max_new_tokens: int, kept=(), **kwargs
):
    """HF greedy generate under spec's grammar; kept: special tokens the grammar may write (tool-call markers);
    kwargs go to generate (sequence_bias: a logit_bias)."""
    eos = oracle.generation_config.eos_token_id
    processor = GrammarProcessor(tokenizer, oracle.config.vocab_size, eos, spec, len(ids), kept)
    with torch.no_grad():
        out = oracle.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            logits_processor=tf.LogitsProcessorList([processor]),
            eos_token_id=eos,
            pad_token_id=eos,
            **kwargs,
        )
    return out[0, len(ids) :].tolist()
