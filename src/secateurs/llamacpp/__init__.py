"""llama.cpp at run time, through llama-cpp-python: the one place the project calls it (the GGUF writer is
``secateurs.export.gguf``, which uses ``binding`` for the quantizer).

- ``binding``: the binding itself (a clear error when it is missing), the default thread count, and
  ``quiet`` (llama.cpp's own messages kept off the terminal);
- ``model``: a GGUF file checked and read (``read_info``: architecture, type, kept sizes per layer, sliding
  windows), opened (``open_model``), logits and greedy decoding;
- ``perplexity``: text-set rows by the file's own tokenizer and perplexity, the handle of ``secateurs eval``;
- ``chat``: ``ChatModel``, answers decoded under a JSON schema's grammar (the Self-Pruner's local proposer);
- ``bench``: prompt and generation speed, peak memory and FLOPs of a file, alone or against another.
"""
