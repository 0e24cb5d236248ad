"""Peak memory of one decode stays a small multiple of the final RGB image, whatever the mode.

Measured in a fresh subprocess (ru_maxrss), since Pillow's own buffers are invisible to
tracemalloc. At 4000x4000, before the banded conversion a 16-bit PNG grew the process by 8.3x the
RGB size (a float64 copy of the whole image) and an RGBA one by 2.9x (three full RGBA copies);
after it, 1.3x at most."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SIDE = 4000
PROBE = """
import resource, sys
data = open(sys.argv[1], "rb").read()
import numpy, PIL.Image
from imgq.worker.decode import decode
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = decode(data, max_pixels=50_000_000).image
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024, image.mode, *image.size)
"""


@pytest.mark.parametrize("mode", ["I;16", "RGBA"])
def test_decode_peak_memory_is_a_small_multiple_of_the_rgb_result(mode: str, tmp_path: Path):
    if mode == "I;16":
        ramp = np.add.outer(np.arange(SIDE, dtype=np.uint32), np.arange(SIDE, dtype=np.uint32)) * 7 % 65536
        image = Image.fromarray(ramp.astype(np.uint16))
    else:
        image = Image.new("RGBA", (SIDE, SIDE), (10, 200, 30, 128))
    path = tmp_path / "big.png"
    image.save(path, "PNG", compress_level=1)
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grown, result_mode, width, height = out.stdout.split()
    rgb_bytes = SIDE * SIDE * 3
    assert (result_mode, int(width), int(height)) == ("RGB", SIDE, SIDE)
    assert int(grown) < 2.5 * rgb_bytes, f"{mode}: decode peak {int(grown) / rgb_bytes:.1f}x the RGB size"


def test_large_decodes_are_bounded_per_process_and_small_ones_never_wait(monkeypatch):
    import threading

    import imgq.worker.decode as decode_mod

    class Counting:
        def __init__(self) -> None:
            self.inner = threading.BoundedSemaphore(2)
            self.now = self.peak = self.entered = 0
            self.lock = threading.Lock()

        def __enter__(self) -> None:
            self.inner.acquire()
            with self.lock:
                self.now += 1
                self.entered += 1
                self.peak = max(self.peak, self.now)

        def __exit__(self, *exc: object) -> None:
            with self.lock:
                self.now -= 1
            self.inner.release()

    gate = Counting()
    monkeypatch.setattr(decode_mod, "_LARGE", gate)
    monkeypatch.setattr(decode_mod, "LARGE_PIXELS", 1_000_000)
    import io

    big, small = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (1500, 1000), (1, 2, 3)).save(big, "PNG")
    Image.new("RGB", (640, 480), (1, 2, 3)).save(small, "JPEG")
    results: list[tuple[int, int]] = []

    def work(data: bytes) -> None:
        image = decode_mod.decode(data, max_pixels=50_000_000, target=384).image
        results.append(image.size)

    threads = [threading.Thread(target=work, args=(big.getvalue(),)) for _ in range(6)]
    threads += [threading.Thread(target=work, args=(small.getvalue(),)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == sorted([(1500, 1000)] * 6 + [(640, 480)] * 4)  # draft keeps 640x480 >= 384
    assert gate.entered == 6 and gate.peak <= 2
