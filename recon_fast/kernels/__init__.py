"""The compiled ops' typed Python faces: token_stats (token_stats.py) and attention_stats
(attention_stats.py), each with its fake for torch.compile and its plain-PyTorch reference; the
statistics each op writes, one table per op (stats_tables.py); the loading of the compiled library
and the backend each op runs on (_library.py), built as build_config.py says; and
softcap_attention.py, the soft-capped attention output in blocks of queries that stands in for
sdpa where sdpa refuses a soft-cap. ops.py is a deprecated alias of token_stats.py."""
