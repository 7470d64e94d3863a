"""tuneforge: fine-tune causal language models from one CPU to many GPUs.

Importing the package is cheap on purpose: heavy libraries (torch, transformers) are
imported by the modules that need them, never here.
"""

__version__ = "0.1.0"
