"""Typed recipe configuration, in three parts: the schema (``schema``: sections, defaults, choices), reading
(``overrides``: YAML and ``key=value`` overrides, type coercion, dotted paths) and the value rules
(``rules``). A recipe YAML lists only what differs from the defaults; every error names the key's path.
"""
from ..errors import RecipeError
from .overrides import (apply_options, flat_options, load_recipe, merge, parse_overrides, read_yaml, save_recipe,
                        set_dotted)
from .rules import RULES, validate
from .schema import (CACHE_DTYPES, DEFAULT_TEACHER, IMAGE_MODES, LOCKS, LORA_TOWERS, OPTIMIZERS, PRECISIONS, TEXT_MODES,
                     CacheCfg, DataCfg, LossCfg, OptimCfg, Recipe, StageCfg, StudentCfg, TeacherCfg, TokensCfg,
                     TrainCfg, TuneCfg, VlmCfg)

__all__ = ["Recipe", "TeacherCfg", "StudentCfg", "DataCfg", "CacheCfg", "LossCfg", "OptimCfg", "TokensCfg",
           "StageCfg", "TrainCfg", "TuneCfg", "VlmCfg", "load_recipe", "apply_options", "flat_options", "set_dotted",
           "parse_overrides", "read_yaml", "merge", "save_recipe", "validate", "RULES", "RecipeError",
           "DEFAULT_TEACHER", "PRECISIONS", "OPTIMIZERS", "CACHE_DTYPES", "LOCKS", "LORA_TOWERS", "IMAGE_MODES",
           "TEXT_MODES"]
