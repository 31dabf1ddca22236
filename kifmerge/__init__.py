"""kifmerge: continual learning of language models by importance-guided merging (KIF / TaSL).

The Python API is `kifmerge.api`; the command line (`kifmerge`) is a thin layer over it.
"""

__version__ = "0.1.0"
