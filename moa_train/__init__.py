"""moa_train: training language models whose attention layers are mixtures (MHA/GQA/MQA, MoAS, MoA)."""
__version__ = "0.1.0"

# the attention variants register their config schemas, which every composition of
# configs/train.yaml needs, on the first import of anything in the package
import moa_train.models.registry  # noqa: E402,F401


def load_run(run_dir, map_location: str = "cpu"):
    """(model with the run's latest checkpoint weights, config): see moa_train.api.load_run."""
    from moa_train.api import load_run as _load_run

    return _load_run(run_dir, map_location)
