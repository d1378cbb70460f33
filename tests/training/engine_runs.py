"""Runs of ``spactor train`` whose live engine a test inspects after the run (in its own processes)."""


def train_and_inspect(runs, inspect) -> dict:
    """Trains each (name, config) of ``runs`` in turn in this process; ``{name: inspect(config,
    result, engine)}`` with the run's live engine. Call inside a ``run_distributed`` worker."""
    from spactor_mega.parallel.state import destroy_parallel
    from spactor_mega.training import loop

    built = []
    original = loop.build_engine  # the loop's name for it: wrapped to keep each run's engine

    def keep(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    loop.build_engine = keep
    out = {}
    try:
        for name, cfg in runs:
            try:
                out[name] = inspect(cfg, loop.train(cfg), built[-1])
            finally:
                built.clear()
                destroy_parallel(destroy_process_group=False)
    finally:
        loop.build_engine = original
        destroy_parallel()
    return out
