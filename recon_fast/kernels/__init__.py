"""The compiled ops' typed Python faces: token_stats (ops.py) and attention_stats
(attention_stats.py), each with its fake for torch.compile and its plain-PyTorch reference, and
the loading of the compiled library (_library.py); and softcap_attention.py, the soft-capped
attention output in blocks of queries that stands in for sdpa where sdpa refuses a soft-cap."""
