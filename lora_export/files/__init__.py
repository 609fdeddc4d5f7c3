"""Safe file I/O: atomic output sets, staging folders, input and output checks."""
