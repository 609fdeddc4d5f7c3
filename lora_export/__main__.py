"""``python -m lora_export``: the ``lora-export`` command line."""

from .cli import main

if __name__ == "__main__":
    main()
