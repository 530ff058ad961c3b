"""The batch run stage: list an input folder or bucket, plan shards, run workers, write outputs.

Modules, in pipeline order: :mod:`.options` (``RunOptions``: every option, default and check),
:mod:`.storage` (local folders and object stores; :mod:`.backends` one class per store, :mod:`.urls`
paths and URLs), :mod:`.plan` (shards, in-process small runs), :mod:`.runner`
(``run()``: the Ray job), :mod:`.dispatch` (shards to actors; :mod:`.raypool` its Ray side), :mod:`.policy` (what a failed shard
means), :mod:`.probe` (whose fault a worker's death is),
:mod:`.worker` (the actor: decode, predict, write), :mod:`.outputs` (layout, part files,
``coverage.csv``, ``run.json``), :mod:`.lock` (one run per output), :mod:`.modelcheck` (the model
checked before anything is written), :mod:`.quiet` (Ray's lines kept off the terminal).

The public function is :func:`batchmask.run`; this package is named ``batch`` (not ``run``) so that
importing it never shadows that function on the ``batchmask`` package.
"""
