"""Publishing: run the notebooks, build the site, the ``moe-book`` command."""
