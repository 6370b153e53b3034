"""Orbax checkpoints of the training state in `<workdir>/checkpoints`, one per saved step.

Saves are asynchronous; a partially written step is never listed by Orbax, so restore always
sees a complete checkpoint.
"""

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A thin CheckpointManager: save(step, state), restore(like), latest_step()."""

  def __init__(self, directory: str, *, keep: int = 3):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    self._manager.save(step, args=ocp.args.StandardSave(state))

  def restore(self, like=None, step: int | None = None):
    """Restores `step` (default: the latest).

    With `like`, arrays come back with its shapes, dtypes and shardings; without it, as saved
    (numpy arrays on the host), e.g. for inspecting a checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    if like is None:
      return self._manager.restore(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
