"""Library code leaves process-wide state as it found it; predicates only answer."""

import pytest
import torch

from moa_train.models.backends import current_settings, kernel_settings


def flipped(settings: dict) -> dict:
    return {key: not value for key, value in settings.items()}


def test_kernel_settings_apply_inside_and_restore_on_exit():
    before = current_settings()
    with kernel_settings(tf32=not before["matmul_tf32"], sdpa_backend="math"):
        inside = current_settings()
        assert inside["matmul_tf32"] == inside["cudnn_tf32"] == (not before["matmul_tf32"])
        assert (inside["sdpa_flash"], inside["sdpa_efficient"], inside["sdpa_math"]) == (
            False,
            False,
            True,
        )
    assert current_settings() == before


def test_kernel_settings_restore_after_an_error():
    before = current_settings()
    with pytest.raises(RuntimeError), kernel_settings(tf32=True, sdpa_backend="flash"):
        raise RuntimeError("inside")
    assert current_settings() == before


def test_a_training_run_leaves_the_global_settings_as_it_found_them(train_run, tmp_path):
    """trainer.tf32 and trainer.sdpa_backend apply to the trainer's own steps and evaluations only:
    the caller's settings (here the opposite of the run's) are back after it."""
    from moa_train.models.backends import _apply

    original = current_settings()
    chosen = {**flipped(original), "sdpa_math": True}
    _apply(chosen)
    try:
        before = current_settings()
        train_run(
            tmp_path,
            "model=mha",
            "model.n_head=4",
            f"trainer.tf32={str(not before['matmul_tf32']).lower()}",
            "trainer.sdpa_backend=efficient",
        )
        assert current_settings() == before
    finally:
        _apply(original)


def test_the_scheme_router_predicate_does_not_switch_the_routing(make_cfg):
    """has_scheme_router only answers; top1 routing is set by its own call."""
    from moa_train.bench.decode import has_scheme_router, routers
    from moa_train.generation import set_inference_routing
    from moa_train.models.lm import build_model

    torch.manual_seed(0)
    cfg = make_cfg("model=moas_dynamic", "model.n_head=4")
    model = build_model(cfg.model, 64)
    assert has_scheme_router(model)
    assert {m.inference_routing for m in model.modules() if hasattr(m, "router")} == {"soft"}
    set_inference_routing(model, "top1")
    assert {m.inference_routing for m in model.modules() if hasattr(m, "router")} == {"top1"}
    assert len(routers(model)) == cfg.model.n_layer
    static = build_model(make_cfg("model=moas_static", "model.n_head=4").model, 64)
    assert not has_scheme_router(static) and routers(static) == []
