"""Data: records, chat templates and loss masks, tokenization cache, packing, samplers, batches."""
