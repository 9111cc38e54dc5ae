"""A quiet console: TensorFlow's C++ start-up lines (oneDNN notices, CUDA probing on
machines without a GPU) are printed by every rank before Python can filter them. When
hyparflow is the first to import TensorFlow, it imports it with the process's stderr set
aside, and prints what was said only if the import fails. HYPARFLOW_TF_LOGS=1 shows them."""

from __future__ import annotations

import os
import sys
import tempfile


def import_tensorflow_quietly() -> None:
    if "tensorflow" in sys.modules or os.environ.get("HYPARFLOW_TF_LOGS") == "1":
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as said:
        os.dup2(said.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # probes the devices now, while stderr is aside
        except BaseException:
            os.dup2(saved, 2)
            said.seek(0)
            sys.stderr.write(said.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
