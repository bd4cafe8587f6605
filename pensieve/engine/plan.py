"""The per-step plan: what the runner wrote into its persistent buffers for one forward (pensieve/engine/runner.py).

The tensors themselves stay in `StepBuffers`; the plan says how much of them this step uses and what kind of step it
is, which is all the runner needs to pick eager, compiled or CUDA-graph execution.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepPlan:
    """One packed forward over `num_seqs` sub-sequences, `num_tokens` tokens in all."""

    num_tokens: int  # T: rows of input_ids, position_ids, slot_mapping
    num_seqs: int  # B: rows of block_tables, seq_lens_k; cu_seqlens_q has B + 1
    num_logits: int  # S: sampled rows (logits_rows)
    decode_only: bool  # every sub-sequence is one token (T == B)
