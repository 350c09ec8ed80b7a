"""``python -m regbench`` runs the same app as the ``regbench`` console script."""

from regbench.cli import main

if __name__ == "__main__":
    main()
