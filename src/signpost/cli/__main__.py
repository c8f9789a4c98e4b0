"""``python -m signpost.cli``: what ``entry`` re-executes (once, with the allocator settings) and torchrun runs."""

from signpost.cli import entry

entry()
