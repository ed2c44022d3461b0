"""`python -m mergekit_lab` (so `accelerate launch -m mergekit_lab <cmd>` works)."""

from mergekit_lab.cli.app import main

if __name__ == "__main__":
    main()
