"""The serving check: an export run in the engines that serve its format, against lotaqaf's own probe.

    child.py    the engine side, a standalone script (another venv's python may run it)
    probe.py    the probe prompts, lotaqaf's reference continuations and logits, the comparison
    engines.py  the engines each format is checked in, and the subprocess that runs one
"""
