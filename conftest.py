"""Every test and notebook run is offline, in SMOKE MODE, and writes into a temporary project folder.

Set before anything imports the libraries; nbval's kernels inherit this environment.
"""
import atexit
import os
import shutil
import tempfile

os.environ["HELPERS_TINY"] = "1"       # every model name resolves to its tiny offline stand-in
os.environ["HF_HUB_OFFLINE"] = "1"     # no hub here: fail in seconds instead of retrying for minutes
os.environ["HELPERS_HOME"] = tempfile.mkdtemp(prefix="helpers-home-")
atexit.register(shutil.rmtree, os.environ["HELPERS_HOME"], ignore_errors=True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
