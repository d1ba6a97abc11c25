"""A run remembers its data: the fingerprint of the prepared directory it was trained on.

``--resume`` used to continue on whatever ``--data`` named, then compare validation scores
across two datasets; ``mtfm evaluate`` scored a model on data it was not trained for with no
word. A run now stores :func:`mtfm.data.store.data_fingerprint` (the hash of ``manifest.json``,
which lists every shard's checksum) in its config (``data.fingerprint``, in every checkpoint
and in metrics.json); resuming, evaluating or predicting on a directory with another
fingerprint is refused unless the caller allows it (``--allow-other-data``), and then warned.

Runs trained before fingerprints were recorded have none: they are not checked (a warning
says so), since refusing them would strand every existing run.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from mtfm.data.store import data_fingerprint

ALLOW_FLAG = "--allow-other-data"


class DataMismatchError(ValueError):
    """A run asked to resume or score on data other than the data it was trained on."""


def data_record(data_dir: str | Path) -> dict[str, str]:
    """What a run stores about its data (merged into the run config's ``data``)."""
    return {"dir": str(Path(data_dir).resolve()), "fingerprint": data_fingerprint(data_dir)}


def check_run_data(run_data: dict | None, data_dir: str | Path, *, run: str, action: str,
                   allow_other_data: bool = False) -> None:
    """Refuse (or, when allowed, warn about) ``data_dir`` if it is not the data the run recorded.

    ``run_data``: the run config's ``data`` entry; ``run`` names the run (a checkpoint path) and
    ``action`` what is refused ("resume", "evaluate", ...) in the message.
    """
    saved = (run_data or {}).get("fingerprint")
    if saved is None:
        warnings.warn(f"{run}: the run records no data fingerprint (trained before they were stored); "
                      f"cannot check that {data_dir} is its data", stacklevel=2)
        return
    current = data_fingerprint(data_dir)
    if current == saved:
        return
    message = (f"{data_dir}: not the data {run} was trained on (manifest fingerprint {current}; the run "
               f"recorded {saved}, prepared at {(run_data or {}).get('dir', '?')})")
    if not allow_other_data:
        raise DataMismatchError(f"{message}; pass {ALLOW_FLAG} to {action} on it anyway")
    warnings.warn(f"{message}; going on ({ALLOW_FLAG})", stacklevel=2)


def check_checkpoint_data(ckpt: str | Path, data_dir: str | Path, *, action: str, allow_other_data: bool = False) -> None:
    """:func:`check_run_data` for the run config saved in checkpoint ``ckpt`` (what evaluate
    and predict score with)."""
    from mtfm.train.checkpoint import read_checkpoint_config

    check_run_data(read_checkpoint_config(ckpt).get("data"), data_dir, run=str(ckpt), action=action,
                   allow_other_data=allow_other_data)
