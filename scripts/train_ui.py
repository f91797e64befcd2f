"""Browser GUI: ``python scripts/train_ui.py [--host H] [--port P]`` (serves on 127.0.0.1 by default).

A thin wrapper of ``tuneonce-ui`` (tuneonce.ui.server); it needs the package installed (``pip install -e .``).
"""
import sys

try:
    from tuneonce.ui.server import main
except ModuleNotFoundError as error:  # the checkout is no longer put on sys.path: the package is `tuneonce`
    if error.name != "tuneonce":
        raise
    sys.exit("error: tuneonce is not installed in this Python: pip install -c requirements/lock.txt -e . (README)")

if __name__ == "__main__":
    sys.exit(main())
