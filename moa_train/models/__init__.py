from moa_train.models.lm import LanguageModel, build_model  # noqa: F401
