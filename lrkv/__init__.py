"""lrkv: pretrain LRKV-attention language models and serve them with an LRQK hybrid-cache decoder."""
