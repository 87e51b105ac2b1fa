"""Print the memory planner's table for the Gemma 2 report's training set-ups.

    .venv/bin/python benchmarks/memory_plan.py

Rows: per-chip parameters, gradients, AdamW state, fp32 master copy, activations with and without
rematerialisation, KV cache with and without the local-layer ring buffer, and whether training fits
in the chip's HBM — first as this package computes attention and the loss, then with a fused
attention kernel and a chunked loss (what-ifs; see gemma2_lite/memory.py).
"""

from gemma2_lite.memory import plan_table

if __name__ == "__main__":
    print("bf16 weights and activations, fp32 Adam moments and master copy:")
    plan_table(param_dtype="bfloat16", act_dtype="bfloat16")
    print("\n... with flash attention and the loss in 1024-token chunks:")
    plan_table(param_dtype="bfloat16", act_dtype="bfloat16", flash=True, logits_chunk=1024)
