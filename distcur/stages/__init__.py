"""One module per pipeline stage: its config and ``run(store, config, ...)``.

A stage is the only code that reads or writes manifests, and it commits its output through
:func:`distcur.stages.output.commit_output` ("skip if current, else write, commit or abort").
The maths it calls (``distcur.score``, ``datamodels``, ``rebalance``, ``policy``, ``embed``,
``envs``, the source readers) works on arrays; the executors it is handed live in
``distcur.distributed``.
"""
