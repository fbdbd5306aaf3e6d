"""The model as a Hub folder needs it: `configuration_csp` and `modeling_csp` (the remote code, copied into
every model folder), the tokenizer (`tokenization`), and reading (`loading`) and writing (`saving`) folders."""
