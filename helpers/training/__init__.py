"""The training library behind both training scripts, one module per concern:

- :mod:`~helpers.training.backbone` / :mod:`~helpers.training.rerank`: the two runs (``train_backbone.py``,
  ``train_rerank.py``) as named phases, each with its task (one step, its state, its weights);
- :mod:`~helpers.training.run`: the set-up both share (session, run directory, AMP, DDP wrapping, optimisation);
- :mod:`~helpers.training.build`: the models training starts from;
- :mod:`~helpers.training.loop`: the step loop (resumable data order, corrupt items, progress, JSONL metrics,
  checkpoints), the run's start (an existing run only with --resume / --overwrite; orphaned temporaries of killed
  writes removed) and summary;
- :mod:`~helpers.training.optim`: learning-rate schedule, optimizer, and the AMP + clipping optimizer step;
- :mod:`~helpers.training.state`: seeds, runtime determinism, RNG capture / restore, training checkpoint files;
- :mod:`~helpers.training.data`: resumable distributed sampler, corrupt-image accounting, labelled training sets;
- :mod:`~helpers.training.mining`: CVNet-Rerank's positive / hard-negative mining, its cache and curriculum;
- :mod:`~helpers.training.objectives`: the thin modules DistributedDataParallel wraps, and the EMA key encoder
  of any global model.

Distributed pieces (DistEnv, collectives) live in :mod:`helpers.distributed`; models and weights come from
:mod:`helpers.builders`. Import from the submodules: this package imports nothing, so it loads without torch.

Crash safety rests on one rule: everything a step consumes is a pure function of saved state. The data of a step
comes from (seed, epoch, position) through :class:`~helpers.training.data.ResumableDistributedSampler` and
datasets that draw their randomness from ``numpy.random.default_rng([seed, epoch, index])``; DataLoader workers
get their seeds from a generator seeded by (seed, epoch), never from the global torch RNG; and every piece of
mutable training state (model, key encoder, queue, optimizer, scheduler, AMP scaler, RNG states, corrupt-image
tally, step) goes into one atomically written file. A run killed at any point and resumed from that file
therefore replays exactly the steps the uninterrupted run would have taken.
"""
