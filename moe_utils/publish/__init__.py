"""Publishing: the notebook runner, the CLI, the book build, rendering, plots and the explorer."""
