"""Training checkpoints: orbax `CheckpointManager` with composite items.

Each checkpoint holds the `TrainState` pytree (adapters, optimizer state, step; restored straight
into its shardings), the data iterator's state and JSON metadata. `restore_latest` falls back to
an older checkpoint when the newest is unreadable (a crash mid-write).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "meta")


def manager(workdir: Path, keep: int) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                        enable_async_checkpointing=True)
    return ocp.CheckpointManager((Path(workdir) / "checkpoints").absolute(), options=opts,
                                 item_names=ITEMS)


def latest_step(workdir: Path) -> int | None:
    """The newest finished checkpoint's step, without building a manager's writers."""
    root = Path(workdir) / "checkpoints"
    if not root.is_dir():
        return None
    steps = [int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir()]
    return max(steps) if steps else None


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict, meta: dict,
         *, force: bool = False) -> None:
    mngr.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)))


def restore_latest(mngr: ocp.CheckpointManager, abstract_state) -> tuple[int, Any, dict | None]:
    """(step, state, data-iterator state) of the newest readable checkpoint; (0, None, None)
    when there is none. `abstract_state` carries the target shapes and shardings."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            got = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back
            print(f"warning: checkpoint {step} in {mngr.directory} is unreadable "
                  f"({type(e).__name__}); falling back to an older one", file=sys.stderr)
            continue
        return int(step), got["state"], got["data"]
    return 0, None, None


# Fields that fix the shape of the saved state or the meaning of its data position: a workdir's
# checkpoints only resume a run that agrees on them.
RUN_FIELDS = ("model.backbone", "model.text_tower", "model.feature_layers", "model.text_layout",
              "data.name", "data.image_size", "train.batch_size", "seed")


def saved_config(mngr: ocp.CheckpointManager) -> dict | None:
    """The config stored with the newest checkpoint (None without a readable one)."""
    step = mngr.latest_step()
    if step is None:
        return None
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception:  # noqa: BLE001 - unreadable: restore_latest reports and falls back
        return None
    return meta.get("config")


def check_same_run(saved: dict | None, config: dict, workdir) -> None:
    """Refuses to resume the checkpoints of a different run (another backbone, taps, image size,
    batch or seed) instead of silently starting over in the same workdir."""
    if not saved:
        return
    for field in RUN_FIELDS:
        old, new = saved, config
        for part in field.split("."):
            old, new = (old or {}).get(part), (new or {}).get(part)
        if isinstance(old, list):
            old = tuple(old)
        if isinstance(new, list):
            new = tuple(new)
        if old is not None and old != new:
            raise ValueError(f"{workdir}: its checkpoints are of a run with {field}={old!r}, this "
                             f"config has {new!r}; use a new --workdir (or the old setting)")


def abstract(tree):
    """Shapes, dtypes and shardings of a tree of arrays (the restore target)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
