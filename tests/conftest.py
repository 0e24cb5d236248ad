import os

# No test may reach the model hub (or any non-loopback address): transformers and the model
# wrapper only look at the local cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ["tests.fixtures.services", "tests.fixtures.model"]
