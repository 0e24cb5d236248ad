"""imgq: caption and embed images at scale with BLIP.

The base package (this one, plus :mod:`imgq.producer` and :mod:`imgq.db`) imports no
torch; :mod:`imgq.worker` needs the ``worker`` extra.
"""

__version__ = "0.1.0"
