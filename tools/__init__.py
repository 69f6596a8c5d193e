"""Maintenance commands of the LoRA from Scratch collection, run from the repository root as
``python -m tools.<name>`` like ``benchmarks/`` (``python tools/<name>.py`` works too):
``run_all`` executes the notebooks and stamps them, ``colab`` keeps the Colab badges and setup
cells current, ``prose`` lists the numbers the prose quotes that no output prints."""
