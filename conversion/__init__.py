"""Converters from the original circuit_sparsity release format to Hugging Face folders."""
