"""Triton kernels and the autograd functions that launch them.

``flash_attention`` (training and prefill: forward, backward, dropout, causal, sliding windows, grouped
heads, softcap, sinks, the log-sum-exp), ``flash_attention_varlen`` (packed batches of sequences of different
lengths, FlashAttention-2's layout) with ``unpad_input`` / ``pad_input`` (a padded batch to a packed one and
back), ``flash_attention_with_kvcache`` (generation: a KV cache appended in place, a split-KV decode kernel)
and ``MAX_HEAD_DIM``, the largest head dim the Triton kernels take.

Installed, this folder is ``chapter3_flash.kernels``. In a checkout whose root is on ``sys.path`` (a script or a
test run from there) it is also importable by its bare name, ``kernels``, which is the import name of Hugging
Face's hub-kernel loader too (transformers 5 installs and imports it). So when this file runs under that bare
name it hands the name on (``_bare_name``): to Hugging Face's package where that is installed, with our public
names added to it (``from kernels import flash_attention`` still works there), else to ``chapter3_flash.kernels``
itself. Either way one copy of our modules serves both names.
"""

if __name__ == "kernels":
    from ._bare_name import hand_over

    hand_over()
else:
    from .decode import flash_attention_with_kvcache
    from .flash_attn import MAX_HEAD_DIM
    from .interface import flash_attention
    from .padding import pad_input, unpad_input
    from .varlen import flash_attention_varlen

    __all__ = [
        "MAX_HEAD_DIM",
        "flash_attention",
        "flash_attention_varlen",
        "flash_attention_with_kvcache",
        "pad_input",
        "unpad_input",
    ]
