"""Evaluation of lrkv exports: perplexity, long-context retrieval, LRQK agreement, KV memory, head diversity,
and the small MHA/GQA/MQA/MLA/LRKV replication. `python -m eval run --export DIR --out REPORT_DIR` runs a suite."""
