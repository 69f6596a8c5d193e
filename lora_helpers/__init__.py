"""Helpers shared by the LoRA from Scratch notebooks.

Each module holds code once a notebook has explained it: ``tokenizer`` (GPT-2 BPE),
``data`` (verified downloads, datasets), ``model`` (the GPT), ``train`` (loop and checkpoints),
``device`` (cuda → mps → cpu), ``plots`` (figure style) and ``settings`` (LORA_QUICK, folders).
"""

__version__ = "0.1.0"
