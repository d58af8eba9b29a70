"""Defaults that the commands and the library share, in a module that imports nothing: the command line
builds its help from them without importing torch (``secateurs.cli``).

- ``HELD_OUT_SEQLEN`` / ``HELD_OUT_ROWS``: the held-out perplexity's row length and row count, the same for
  ``eval``, ``prune`` and ``apply`` so that the numbers they print for the same model agree
  (``eval.perplexity``);
- ``DTYPE_CHOICES``: the working precisions ``--dtype`` accepts (``runtime.precision``);
- ``ENGINE_CHOICES``: what ``--engine`` of ``eval`` and ``bench`` accepts, and the engine each names
  (``eval.engines``);
- ``PRUNE_ENGINES``: what ``--engine`` of ``prune`` accepts, and what it asks of the plan (``methods``:
  ``MethodConfig.query_heads``); ``KEEP_HEADS_ENGINES``: those whose plans keep every query head
  (``methods.keeps_heads``).
"""

HELD_OUT_SEQLEN = 512
HELD_OUT_ROWS = 16
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
ENGINE_CHOICES = {"pytorch": "torch", "llamacpp": "llama.cpp"}
PRUNE_ENGINES = {"pytorch": "no constraint (the default)",
                 "vllm": "every query head kept (flap and wanda-sp prune MLP channels only; tell narrows MLPs and "
                         "removes whole blocks; depth methods are unchanged; a method that cannot keep heads is "
                         "refused): vLLM's DeciLM model has one query-head count for all layers; on gemma3 and qwen3, "
                         "which it holds only as their stock architecture, only methods with stock plans (docs/vllm.md)"}
KEEP_HEADS_ENGINES = ("vllm",)
