"""A reader's copies of the book's later classes, written from its semantics (not copied): the models the
benchmarks run and the tests compare against, and the classes ``swap_attention`` must recognise by
name and layout without importing ours. One module per book file, since the book reuses class names
(``MultiHeadAttention``, ``GroupedQueryAttention``) across them:

- ``kv_cache``: ch04/03_kv-cache, chapter 4's GPT with a KV cache (``generate_text_simple_cached``);
- ``kv_cache_optimized``: the same folder's optimized variant (a preallocated cache of ``kv_window_size``
  entries that drops the oldest when full, the prompt prefilled in chunks);
- ``gqa`` and ``swa``: ch04/04_gqa and ch04/06_swa, grouped-query and sliding-window attention with
  their KV caches;
- ``llama3``, ``qwen3``, ``gemma3``: the bonus models' attention (RoPE, QK-norm, a sliding window on
  Gemma 3's local layers) and a block of each;
- ``fast``: the SDPA variants (pkg ch03's ``PyTorchMultiHeadAttention`` of ``GPTModelFast``, Llama 3.2's
  ``GroupedQueryAttentionFast``).
- ``mha_variants``: the ch03 bonus notebook's variants (``Ch03_MHA``, ``Ch03_MHA_Wrapper``,
  ``MultiHeadAttentionCombinedQKV``, ``MHAEinsum``, the SDPA ones, ``MHAPyTorchClass``);
- ``buffers``: ch03/03_understanding-buffers' ``CausalAttentionWithBuffer`` and ``CausalAttentionWithoutBuffers``;
- ``noncausal``: ch06/02_bonus_additional-experiments' ``MultiHeadAttention(..., disable_causal_mask=...)``.
"""
