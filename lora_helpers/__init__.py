"""Helpers shared by the LoRA from Scratch notebooks; each module holds code once a notebook has
explained it:

- ``tokenizer``: GPT-2's byte-pair encoding (tiktoken), with a clear error when it cannot load.
- ``downloads``: verified downloads (sha256, backup addresses, timeouts, atomic renames).
- ``data``: the datasets: corpus text, next-token windows, the SMS Spam Collection and batches.
- ``model``: the GPT (GPT-2 architecture and presets) and ``generate``.
- ``params``: parameter accounting: counts, reports per layer type, and their closed forms.
- ``train``: the one training loop, evaluation and the learning-rate schedule.
- ``checkpoints``: checkpoints that store their config, and resuming an interrupted run.
- ``fast``: the speed-ups ``train`` uses: fused AdamW, the CUDA-graph step.
- ``trunk``: runs the frozen part of the network once, for head-only and last-block fine-tuning.
- ``lora``: ``LoRAConfig``, the LoRA layer and its linear and embedding wrappers.
- ``lora_model``: LoRA on a whole model: ``apply_lora`` (targets), freezing and merging.
- ``adapters``: named adapters on one base: add, switch, disable, delete, merge.
- ``adapter_files``: adapters saved and loaded (our files, and PEFT's).
- ``adapter_config``: what an adapter folder holds, and the checks a loaded one must pass.
- ``peft_format``: adapters written in Hugging Face PEFT's format, for ``transformers``' GPT-2.
- ``peft_import``: a PEFT adapter for GPT-2 read into our GPT.
- ``quant``: QLoRA's 4-bit base: NF4 codes, block-wise and double quantization, ``Linear4bit``.
- ``finetune``: the classifier head and notebook 06's fine-tuning variants.
- ``transfer``: what pretraining buys: fine-tuning from the base and from random weights.
- ``pretrain``: the base model's recipe and data, ``load_base_model`` and ``choose_base``.
- ``gpt2``: OpenAI's GPT-2 weights loaded into our GPT, and our base as ``transformers``' GPT-2.
- ``distributed``: data-parallel fine-tuning under ``torchrun`` (DDP).
- ``device``: the device (cuda → mps → cpu), native bf16, peak memory, timing.
- ``plots``: the figure style, ``save_figure`` and the notebooks' plots.
- ``settings``: the ``LORA_QUICK`` switch and the data, artifacts and images folders.
- ``files``: ``atomic_write``: a saved file is the old one or the new one, never half of one.
"""

__version__ = "0.1.0"
