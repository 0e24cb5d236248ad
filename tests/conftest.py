import os

# No test may reach the model hub (or any non-loopback address): transformers and the model
# wrapper only look at the local cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Caches the suite writes (imgq's weight digests) stay out of the user's home; subprocesses inherit it.
if "IMGQ_TEST_KEEP_XDG_CACHE" not in os.environ:
    import tempfile

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="imgq-test-cache-")

pytest_plugins = ["tests.fixtures.services", "tests.fixtures.model"]
