"""`python -m distillrec ...` = the `distillrec` command (torchrun/accelerate launch it this way)."""
import sys

from distillrec.cli import main

if __name__ == "__main__":
    sys.exit(main())
